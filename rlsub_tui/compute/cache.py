"""Result cache: each finished tensor is committed as it is computed, so analyses resume and reopen fast.

One SQLite file under the user's cache folder. SQLite gives atomic commits and safe concurrent
use by two processes; a file that is corrupt or not ours is deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

from rlsub_tui.checkpoints.labels import checkpoint_label, run_labels, run_paths
from rlsub_tui.checkpoints.locate import fingerprint, locate
from rlsub_tui.records.criteria import AnalysisOptions, Criterion
from rlsub_tui.records.results import RESULT_VERSION, AnalysisResult, Skipped, TensorResult
from rlsub_tui.records.spectrum import RankFigures
from rlsub_tui.util.errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tensor_results (
    analysis TEXT NOT NULL, tensor TEXT NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (analysis, tensor));
CREATE TABLE IF NOT EXISTS analyses (analysis TEXT PRIMARY KEY, payload TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rank_spectra (
    pair TEXT NOT NULL, tensor TEXT NOT NULL, rank INTEGER NOT NULL, stable_rank REAL NOT NULL,
    energy_rank_90 INTEGER NOT NULL, energy_rank_99 INTEGER NOT NULL, effective_rank REAL NOT NULL,
    energy_curve TEXT NOT NULL, PRIMARY KEY (pair, tensor));
"""
# Ranks cached before spectra existed (table `ranks`) are never read: they are recomputed with their spectra.
APP_ID = "rlsub-tui-cache-1"
RANK_SPECTRA_COLUMNS = ("pair", "tensor", "rank", "stable_rank", "energy_rank_90", "energy_rank_99", "effective_rank",
                        "energy_curve")


def analysis_key(base_fp: str, run_fps: list[str], options: AnalysisOptions) -> str:
    """Cache key of an analysis: the checkpoints' fingerprints and every option that changes a number."""
    blob = json.dumps([RESULT_VERSION, base_fp, run_fps, options.criterion.name, options.criterion.value,
                       list(options.sweep), options.rank, options.common_rows, options.compare_dtype,
                       options.rank and options.subspaces])
    return hashlib.sha256(blob.encode()).hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("RLSUB_TUI_CACHE_DIR"):
        return Path(os.environ["RLSUB_TUI_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rlsub-tui"


class ResultCache:
    """Per-tensor results keyed by an analysis key; ranks and their spectra keyed by (base, run) and (tensor, rows, dtype)."""

    def __init__(self, directory: Path | None = None, rebuild: bool = True):
        """rebuild=False: a cache that is corrupt or not ours is left as it is (and not used), for the
        analysis to rebuild and say so."""
        self.directory = Path(directory) if directory else default_cache_dir()
        self.rebuild = rebuild
        self.path = self.directory / "results.sqlite"
        self.warning: str | None = None
        self._conn = self._open()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(SCHEMA)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(rank_spectra)")]
        if columns != list(RANK_SPECTRA_COLUMNS):  # written by an earlier layout: start it again
            conn.executescript("DROP TABLE rank_spectra;" + SCHEMA)
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
            if not self.rebuild:
                return None
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

    def store_analysis(self, analysis: str, result: AnalysisResult) -> None:
        """Record that an analysis finished, with what it compared: enough to reopen it without torch."""
        if self._conn is None:
            return
        payload = {
            "version": RESULT_VERSION, "criterion": [result.criterion.name, result.criterion.value],
            "sweep": list(result.sweep), "device": result.device, "planned": result.planned,
            "planned_numel": result.planned_numel, "notes": result.notes,
            "skipped": [[k.tensor, k.run, k.reason] for k in result.skipped],
            "tied": result.tied, "compare_dtype": result.compare_dtype, "run_read_as": result.run_read_as,
        }
        try:
            self._conn.execute("INSERT OR REPLACE INTO analyses VALUES (?, ?)", (analysis, json.dumps(payload)))
        except sqlite3.Error:
            pass

    def load_analysis(self, analysis: str) -> dict | None:
        if self._conn is None:
            return None
        try:
            row = self._conn.execute("SELECT payload FROM analyses WHERE analysis = ?", (analysis,)).fetchone()
            payload = json.loads(row[0]) if row else None
        except (sqlite3.Error, ValueError):
            return None
        return payload if isinstance(payload, dict) and payload.get("version") == RESULT_VERSION else None

    def load_ranks(self, pair: str) -> dict[str, RankFigures]:
        """Ranks with their spectrum figures, by tensor; a row that does not parse is left out (recomputed)."""
        if self._conn is None:
            return {}
        try:
            rows = self._conn.execute(
                "SELECT tensor, rank, stable_rank, energy_rank_90, energy_rank_99, effective_rank, energy_curve "
                "FROM rank_spectra WHERE pair = ?", (pair,)).fetchall()
        except sqlite3.Error:
            return {}
        out = {}
        for tensor, rank, stable, e90, e99, eff, curve in rows:
            try:
                out[tensor] = RankFigures(int(rank), float(stable), int(e90), int(e99), float(eff),
                                          tuple(float(x) for x in json.loads(curve)))
            except (TypeError, ValueError):
                continue
        return out

    def store_rank(self, pair: str, tensor: str, figures: RankFigures) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute("INSERT OR REPLACE INTO rank_spectra VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (pair, tensor, figures.rank, figures.stable_rank, figures.energy_rank_90,
                                figures.energy_rank_99, figures.effective_rank, json.dumps(list(figures.energy_curve))))
        except sqlite3.Error:
            pass

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def reopen(base: str, runs: list[str], options: AnalysisOptions) -> AnalysisResult | None:
    """A finished analysis of exactly these checkpoints and options, straight from the cache, without torch.

    None whenever anything is missing, stale or unreadable: the caller then runs the engine, which
    also reports bad input properly.
    """
    if not options.use_cache or not runs:
        return None
    try:
        paths = run_paths(runs)
        base_found = locate(base)
        found = [locate(path) for path in paths]
        cache = ResultCache(options.cache_dir, rebuild=False)  # the analysis run next rebuilds it, and says so
    except (InputError, OSError):
        return None
    try:
        key = analysis_key(fingerprint(base_found.files), [fingerprint(f.files) for f in found], options)
        meta = cache.load_analysis(key)
        if meta is None:
            return None
        tensors = cache.load_results(key)
        planned = [str(n) for n in meta["planned"]]
        if any(n not in tensors or len(tensors[n].runs) != len(runs) for n in planned):
            return None
        name, value = meta["criterion"]
        return AnalysisResult(
            base_label=checkpoint_label(base), base_path=base, run_labels=run_labels(runs),
            run_paths=paths, criterion=Criterion(str(name), float(value)),
            sweep=tuple(float(t) for t in meta["sweep"]), device=f"{meta['device']}, from cache",
            tensors={n: tensors[n] for n in planned},
            skipped=[Skipped(str(t), str(r), str(why)) for t, r, why in meta["skipped"]],
            notes=[str(n) for n in meta["notes"]], planned=planned,
            planned_numel={str(k): int(v) for k, v in meta["planned_numel"].items()}, complete=True,
            tied={str(a): str(p) for a, p in meta["tied"].items()}, compare_dtype=str(meta["compare_dtype"]),
            run_read_as=[str(x) for x in meta.get("run_read_as", [])])
    except (OSError, KeyError, TypeError, ValueError, InputError):
        return None
    finally:
        cache.close()
