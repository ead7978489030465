"""Bad input, faults and untrusted files: one clear sentence, exit 2, nothing half-written, nothing executed."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.checkpoint import open_checkpoint, read_safetensors_header
from rlsub_tui.cli.main import main
from rlsub_tui.util.errors import CheckpointError


@pytest.fixture
def pair(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    save(sparse_run(b, 0), tmp_path / "run")
    return tmp_path


def run_cli(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, *needles, out_dir: Path | None = None):
    assert code == 2
    assert "Traceback" not in err
    lines = [l for l in err.strip().splitlines() if l.startswith("rlsub-tui: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    if out_dir is not None:
        assert not out_dir.exists() or not any(out_dir.iterdir())


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def test_missing_path(pair, capsys):
    code, _, err = run_cli(["analyze", pair / "base", pair / "nope", "--out", pair / "out"], capsys)
    assert_refused(code, err, "nope", "no such file or directory", out_dir=pair / "out")


def test_directory_without_checkpoint(pair, capsys):
    (pair / "empty").mkdir()
    code, _, err = run_cli(["analyze", pair / "base", pair / "empty", "--out", pair / "out"], capsys)
    assert_refused(code, err, "empty", "holds no checkpoint", out_dir=pair / "out")


def test_model_id_not_in_cache(pair, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(pair / "hub"))
    code, _, err = run_cli(["analyze", pair / "base", "someone/not-here", "--out", pair / "out"], capsys)
    assert_refused(code, err, "someone/not-here", "Hugging Face cache")


def test_model_id_found_in_cache(pair, capsys, monkeypatch):
    snap = pair / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    save(sparse_run(base_state(), 1), snap)
    (pair / "hub" / "models--org--tiny" / "refs").mkdir(parents=True)
    (pair / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(pair / "hub"))
    code, out, err = run_cli(["analyze", pair / "base", "org/tiny", "--out", pair / "out", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads((pair / "out" / "summary.json").read_text())["runs"][0]["label"] == "tiny"


@pytest.mark.parametrize("case,needle", [
    ("truncated", "truncated"),
    ("not-json", "not valid JSON"),
    ("header-too-big", "larger than the file"),
    ("offsets-out", "outside"),
    ("overlap", "overlap"),
    ("bad-dtype", "unknown dtype"),
    ("short-file", "truncated safetensors file"),
])
def test_corrupt_safetensors_refused(pair, capsys, case, needle):
    bad = pair / "bad" / "model.safetensors"
    good = pair / "run" / "model.safetensors"
    if case == "truncated":
        bad.parent.mkdir()
        bad.write_bytes(good.read_bytes()[:-100])
    elif case == "not-json":
        write_raw(bad, b"{this is not json", b"")
    elif case == "header-too-big":
        write_raw(bad, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, header_len=10**6)
    elif case == "offsets-out":
        write_raw(bad, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8)
    elif case == "overlap":
        write_raw(bad, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    elif case == "bad-dtype":
        write_raw(bad, {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2)
    elif case == "short-file":
        bad.parent.mkdir()
        bad.write_bytes(b"\x01\x02")
    (pair / "out").mkdir()
    (pair / "out" / "mine.txt").write_text("keep")
    code, _, err = run_cli(["analyze", pair / "base", pair / "bad", "--out", pair / "out"], capsys)
    assert_refused(code, err, str(bad), needle)
    assert [p.name for p in (pair / "out").iterdir()] == ["mine.txt"]
    assert (pair / "out" / "mine.txt").read_text() == "keep"


@pytest.mark.parametrize("shard,needle", [
    ("missing.safetensors", "does not exist"),
    ("../outside.safetensors", "outside the checkpoint"),
    ("/etc/passwd", "outside the checkpoint"),
])
def test_index_with_bad_shard(pair, capsys, shard, needle):
    d = pair / "sharded"
    save(sparse_run(base_state(), 2), d, "sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli(["analyze", pair / "base", d, "--out", pair / "out"], capsys)
    assert_refused(code, err, "model.safetensors.index.json", shard, needle, out_dir=pair / "out")


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/rlsub-tui-pwned",))


def test_pickle_that_would_run_code_is_refused(pair, capsys):
    marker = Path("/tmp/rlsub-tui-pwned")
    marker.unlink(missing_ok=True)
    d = pair / "evil"
    d.mkdir()
    torch.save({"model.norm.weight": torch.zeros(32), "x": Exploit()}, d / "pytorch_model.bin")
    code, _, err = run_cli(["analyze", pair / "base", d, "--out", pair / "out"], capsys)
    assert_refused(code, err, "pytorch_model.bin", "refused", "would run code", out_dir=pair / "out")
    assert not marker.exists()


@pytest.mark.parametrize("args,needle", [
    (["--tolerance", "-1"], "must be a finite number >= 0"),
    (["--tolerance", "nan"], "must be a finite number >= 0"),
    (["--sweep", "1e-5,abc"], "is not a number"),
])
def test_bad_options(pair, capsys, args, needle):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(pair / "base"), str(pair / "run"), "--out", str(pair / "out"), *args])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err
    assert not (pair / "out").exists()


def test_no_runs(pair, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["analyze", str(pair / "base"), "--out", str(pair / "out")])
    assert exc.value.code == 2
    assert "RUN" in capsys.readouterr().err
    code, _, err = run_cli([pair / "base"], capsys)  # the explorer with a base only
    assert_refused(code, err, "needs at least one run")


def test_no_tensor_in_common(pair, capsys):
    save({"other.weight": torch.zeros(3, 3)}, pair / "alien")
    code, _, err = run_cli(["analyze", pair / "base", pair / "alien", "--out", pair / "out"], capsys)
    assert_refused(code, err, "no tensor in common", out_dir=pair / "out")


def test_handled_cases_are_reported(pair, capsys):
    b = base_state()
    r = sparse_run(b, 3)
    del r["model.layers.1.mlp.up_proj.weight"]
    r["model.norm.weight"] = r["model.norm.weight"].clone()
    r["model.norm.weight"][0] = float("nan")
    r["model.extra.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    r["model.embed_tokens.weight"] = torch.cat([r["model.embed_tokens.weight"], torch.zeros(2, 32, dtype=torch.bfloat16)])
    b2 = dict(b)
    b2["empty.weight"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    r["empty.weight"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    save(b2, pair / "base2")
    save(r, pair / "odd")
    code, out, err = run_cli(["analyze", pair / "base2", pair / "odd", pair / "odd", "--out", pair / "out",
                              "--quiet"], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    summary = json.loads((pair / "out" / "summary.json").read_text())
    skipped = {(s["tensor"], s["reason"].split(" (")[0]) for s in summary["skipped"]}
    assert ("model.layers.1.mlp.up_proj.weight", "missing in this run") in skipped
    assert ("model.extra.weight", "only in this run, not in the base") in skipped
    assert any(t == "model.embed_tokens.weight" and "differs from base" in why for t, why in skipped)
    assert "skipped model.embed_tokens.weight" in err and "--common-rows" in err
    assert "NaN/Inf" in err and summary["runs"][0]["nonfinite"] == 1
    assert any("same checkpoint" in n for n in summary["notes"])
    rows = (pair / "out" / "matrices.csv").read_text()
    assert "empty.weight" in rows
    # with --common-rows the resized vocabulary is compared on the shared rows
    code, out, err = run_cli(["analyze", pair / "base2", pair / "odd", "--out", pair / "out2", "--quiet",
                              "--common-rows"], capsys)
    assert code == 0
    summary = json.loads((pair / "out2" / "summary.json").read_text())
    assert not any(s["tensor"] == "model.embed_tokens.weight" for s in summary["skipped"])
    assert any("first 64 rows" in n for n in summary["notes"])


def test_out_only_touches_our_files(pair, capsys):
    out = pair / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    (out / "matrices.csv").write_text("old")
    code, _, err = run_cli(["analyze", pair / "base", pair / "run", "--out", out, "--quiet"], capsys)
    assert code == 0, err
    assert (out / "notes.md").read_text() == "mine"
    assert (out / "matrices.csv").read_text().startswith("tensor,run,")
    assert sorted(p.name for p in out.iterdir()) == ["agreement.csv", "groups.csv", "matrices.csv", "notes.md",
                                                     "pairs.csv", "subspaces.csv", "summary.json"]


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    from rlsub_tui.util import files

    target = tmp_path / "a.csv"
    target.write_text("old")

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write(target, "new content")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_corrupt_or_foreign_cache_is_rebuilt(pair, capsys, tmp_path):
    cache = Path(os.environ["RLSUB_TUI_CACHE_DIR"])
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "results.sqlite").write_bytes(b"this is not a database" * 100)
    code, out, err = run_cli(["analyze", pair / "base", pair / "run", "--out", pair / "o1", "--quiet"], capsys)
    assert code == 0 and "rebuilt" in err
    first = (pair / "o1" / "summary.json").read_text()
    # a SQLite file that is someone else's
    (cache / "results.sqlite").unlink()
    conn = sqlite3.connect(cache / "results.sqlite")
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("INSERT INTO meta VALUES ('app', 'someone-else')")
    conn.commit()
    conn.close()
    code, out, err = run_cli(["analyze", pair / "base", pair / "run", "--out", pair / "o2", "--quiet"], capsys)
    assert code == 0 and "rebuilt" in err
    # a record tampered with in our own cache is not trusted
    conn = sqlite3.connect(cache / "results.sqlite")
    conn.execute("UPDATE tensor_results SET payload = '{\"version\": 3, \"name\": 1}'")
    conn.commit()
    conn.close()
    code, out, err = run_cli(["analyze", pair / "base", pair / "run", "--out", pair / "o3", "--quiet"], capsys)
    assert code == 0
    for d in ("o2", "o3"):
        assert json.loads((pair / d / "summary.json").read_text())["runs"] == json.loads(first)["runs"]


def _big_pair(root: Path, layers: int = 24) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {f"model.layers.{i}.mlp.up_proj.weight": (384, 256) for i in range(layers)}
    b = {n: (torch.randn(s, generator=g) * 0.05).to(torch.bfloat16) for n, s in shapes.items()}
    save(b, root / "base")
    for k in range(2):
        save(sparse_run(b, k), root / f"run{k}")


def _cli(root: Path, out: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rlsub_tui", "analyze", str(root / "base"), str(root / "run0"),
                             str(root / "run1"), "--out", str(root / out), "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_resume_equals_uninterrupted(tmp_path):
    _big_pair(tmp_path)
    env = dict(os.environ, RLSUB_TUI_CACHE_DIR=str(tmp_path / "cache"))
    proc = _cli(tmp_path, "killed", env)
    db = tmp_path / "cache" / "results.sqlite"
    deadline = time.time() + 60
    rows = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(db, timeout=1) as conn:
                rows = conn.execute("SELECT COUNT(*) FROM tensor_results").fetchone()[0]
        except sqlite3.Error:
            rows = 0
        if rows >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the analysis finished before it could be killed; make the test data larger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists() or not list((tmp_path / "killed").glob("*.csv"))
    with sqlite3.connect(db) as conn:
        partial = conn.execute("SELECT COUNT(*) FROM tensor_results").fetchone()[0]
    assert 3 <= partial < 24
    resumed = _cli(tmp_path, "resumed", env)
    assert resumed.wait(120) == 0
    clean_env = dict(os.environ, RLSUB_TUI_CACHE_DIR=str(tmp_path / "cache-clean"))
    fresh = _cli(tmp_path, "fresh", clean_env)
    assert fresh.wait(120) == 0
    for name in ("matrices.csv", "pairs.csv", "agreement.csv", "groups.csv"):
        assert (tmp_path / "resumed" / name).read_text() == (tmp_path / "fresh" / name).read_text()


def test_two_analyses_at_once_share_the_cache(tmp_path):
    _big_pair(tmp_path, layers=12)
    env = dict(os.environ, RLSUB_TUI_CACHE_DIR=str(tmp_path / "cache"))
    procs = [_cli(tmp_path, f"out{i}", env) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    assert (tmp_path / "out0" / "matrices.csv").read_text() == (tmp_path / "out1" / "matrices.csv").read_text()


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_safetensors_loader_raises_only_our_error(tmp_path, data):
    """Corrupted headers and files: the loader raises CheckpointError or succeeds, nothing else."""
    path = tmp_path / "fuzz.safetensors"
    kind = data.draw(st.sampled_from(["bytes", "mutate", "header"]))
    if kind == "bytes":
        blob = data.draw(st.binary(max_size=200))
    elif kind == "mutate":
        good = json.dumps({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                           "__metadata__": {"format": "pt"}}).encode()
        blob = bytearray(struct.pack("<Q", len(good)) + good + bytes(12))
        for _ in range(data.draw(st.integers(1, 6))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(blob)))
        blob = bytes(blob[:cut]) if data.draw(st.booleans()) else bytes(blob)
    else:
        json_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 50) | st.text(max_size=5),
                                   lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                                   max_leaves=8)
        entry = st.fixed_dictionaries({}, optional={
            "dtype": st.sampled_from(["BF16", "F32", "F16", "I64", "X", 3]),
            "shape": st.lists(st.integers(-2, 5), max_size=3) | json_values,
            "data_offsets": st.lists(st.integers(-4, 40), max_size=3) | json_values,
        })
        header = data.draw(st.dictionaries(st.text(max_size=6), entry | json_values, max_size=4))
        raw = json.dumps(header).encode()
        blob = struct.pack("<Q", len(raw)) + raw + bytes(data.draw(st.integers(0, 40)))
    path.write_bytes(blob)
    try:
        infos = read_safetensors_header(path)
        ckpt = open_checkpoint(str(path)) if infos else None
        if ckpt is not None:
            for name in ckpt.tensors:
                ckpt.read(name)
            ckpt.close()
    except CheckpointError:
        pass
