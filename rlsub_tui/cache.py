"""Result cache: each finished tensor is committed as it is computed, so analyses resume and reopen fast.

One SQLite file under the user's cache folder. SQLite gives atomic commits and safe concurrent
use by two processes; a file that is corrupt or not ours is deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

from rlsub_tui.results import TensorResult

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensor_results (
    analysis TEXT NOT NULL, tensor TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (analysis, tensor));
CREATE TABLE IF NOT EXISTS ranks (
    pair TEXT NOT NULL, tensor TEXT NOT NULL, rank INTEGER NOT NULL,
    PRIMARY KEY (pair, tensor));
"""
APP_ID = "rlsub-tui-cache-1"


def default_cache_dir() -> Path:
    if os.environ.get("RLSUB_TUI_CACHE_DIR"):
        return Path(os.environ["RLSUB_TUI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlsub-tui"


class ResultCache:
    """Per-tensor results keyed by an analysis key; ranks keyed by (base, run) alone."""

    def __init__(self, directory: Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.path = self.directory / "results.sqlite"
        self.warning: str | None = None
        self._conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
        if row is None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('app', ?)", (APP_ID,))
        elif row[0] != APP_ID:
            raise sqlite3.DatabaseError("foreign cache")
        conn.execute("PRAGMA quick_check").fetchone()
        return conn

    def _open(self) -> sqlite3.Connection | None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.warning = f"cache folder {self.directory} cannot be created ({exc.strerror}); running without a cache."
            return None
        try:
            return self._connect()
        except sqlite3.DatabaseError:
            self.warning = f"cache {self.path} was corrupt or not ours; rebuilt it."
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.remove(str(self.path) + suffix)
                except FileNotFoundError:
                    pass
            try:
                return self._connect()
            except sqlite3.Error:
                self.warning = f"cache {self.path} cannot be used; running without a cache."
                return None
        except sqlite3.Error as exc:
            self.warning = f"cache {self.path} cannot be used ({exc}); running without a cache."
            return None

    def load_results(self, analysis: str) -> dict[str, TensorResult]:
        if self._conn is None:
            return {}
        out = {}
        try:
            rows = self._conn.execute(
                "SELECT tensor, payload FROM tensor_results WHERE analysis = ?", (analysis,)).fetchall()
        except sqlite3.Error:
            return {}
        for tensor, payload in rows:
            try:
                out[tensor] = TensorResult.from_dict(json.loads(payload))
            except (ValueError, KeyError, TypeError):
                continue  # a record we cannot trust is recomputed
        return out

    def store_result(self, analysis: str, result: TensorResult) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute("INSERT OR REPLACE INTO tensor_results VALUES (?, ?, ?)",
                               (analysis, result.name, json.dumps(result.to_dict())))
        except sqlite3.Error:
            pass

    def load_ranks(self, pair: str) -> dict[str, int]:
        if self._conn is None:
            return {}
        try:
            return {t: int(r) for t, r in
                    self._conn.execute("SELECT tensor, rank FROM ranks WHERE pair = ?", (pair,)).fetchall()}
        except sqlite3.Error:
            return {}

    def store_rank(self, pair: str, tensor: str, rank: int) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute("INSERT OR REPLACE INTO ranks VALUES (?, ?, ?)", (pair, tensor, rank))
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
