"""What the command line says: version, help with the defaults, summary wording, closed pipes, and
plain warnings when a run is not a fine-tune of the base or a folder holds checkpoints one level down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import base_state, save, sparse_run

from rlsub_tui import __version__
from rlsub_tui.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def cli(*args, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "rlsub_tui", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, **kw)


@pytest.fixture
def pair(tmp_path):
    b = base_state()
    save(b, tmp_path / "base")
    save(sparse_run(b, 0), tmp_path / "run")
    save(sparse_run(b, 1), tmp_path / "run2")
    return tmp_path


def test_version():
    for args in (["--version"], ["analyze", "--version"]):
        p = cli(*args)
        assert p.returncode == 0 and p.stdout.strip() == f"rlsub-tui {__version__}"


def test_help_states_the_defaults():
    text = " ".join(cli("--help").stdout.split())  # argparse wraps lines
    assert "(the paper's; the default)" in text and "atol" in text
    assert "the atol tolerance (default 1e-5)" in text
    assert "η (default 1e-3)" in text
    assert "(default 1e-08,1e-07,1e-06,1e-05; 'none' turns it off)" in text
    assert "'e' (the table) and 'x' (the chart's data)" in text
    assert "--version" in text
    analyze = " ".join(cli("analyze", "--help").stdout.split())
    assert "the atol tolerance (default 1e-5)" in analyze and "'none' turns it off" in analyze


def test_sweep_is_on_by_default_and_can_be_turned_off(pair, capsys):
    out = pair / "out"
    assert main(["analyze", str(pair / "base"), str(pair / "run"), "--out", str(out), "--quiet", "--no-rank"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"] == [1e-8, 1e-7, 1e-6, 1e-5]
    header = (out / "matrices.csv").read_text().splitlines()[0].split(",")
    assert header[-4:] == ["sparsity@1e-08", "sparsity@1e-07", "sparsity@1e-06", "sparsity@1e-05"]
    assert main(["analyze", str(pair / "base"), str(pair / "run"), "--out", str(out), "--quiet", "--no-rank",
                 "--sweep", "none"]) == 0
    assert json.loads((out / "summary.json").read_text())["sweep"] == []


def test_summary_names_base_and_runs_and_defines_lift(pair, capsys):
    code = main(["analyze", str(pair / "base"), str(pair / "run"), str(pair / "run2"), "--out", str(pair / "out"),
                 "--quiet", "--no-rank"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert code == 0
    assert lines[0] == f"base: base ({pair / 'base'})"
    assert lines[1].startswith("runs: 2 (run, run2)")
    assert lines[2].startswith("criterion: atol 1e-05: a parameter counts as updated when |Δ| > 1e-05")
    assert "J lift = jaccard / its chance" in out
    assert "if signs were coin flips" in out


def test_closed_stdout_ends_quietly(pair):
    p = subprocess.Popen([sys.executable, "-m", "rlsub_tui", "analyze", str(pair / "base"), str(pair / "run"),
                          "--out", str(pair / "out"), "--quiet", "--no-rank"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    p.stdout.close()  # like `| head` that has already gone
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0
    assert "Broken pipe" not in err and "error" not in err and "Exception" not in err, err
    assert (pair / "out" / "summary.json").exists()  # the files were written before anything was printed


def test_shell_pipe_into_head(pair):
    cmd = (f"{sys.executable} -m rlsub_tui analyze {pair / 'base'} {pair / 'run'} {pair / 'run2'} "
           f"--out {pair / 'out'} --quiet --no-rank | head -1; exit ${{PIPESTATUS[0]}}")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0 and p.stdout.startswith("base: base")
    assert "Broken pipe" not in p.stderr


def test_trainer_folder_names_its_checkpoints(pair, capsys):
    trainer = pair / "trainer-out"
    b = base_state()
    for step in (1000, 500, 1500):
        save(sparse_run(b, step), trainer / f"checkpoint-{step}")
    (trainer / "runs").mkdir()  # a tensorboard folder: not a checkpoint
    # as the base (one checkpoint expected) it is refused, naming what it holds
    code = main(["analyze", str(trainer), str(pair / "run"), "--out", str(pair / "out")])
    err = capsys.readouterr().err
    assert code == 2
    line = next(l for l in err.splitlines() if l.startswith("rlsub-tui: error:"))
    assert "3 checkpoint folder(s) (checkpoint-500, checkpoint-1000, checkpoint-1500)" in line
    assert str(trainer / "checkpoint-1500") in line and "runs" not in line.split("(")[1]
    # as a run it is a timeline: its last step stands for it, and timeline.csv follows it step by step
    code = main(["analyze", str(pair / "base"), str(trainer), "--out", str(pair / "out"), "--quiet", "--no-rank"])
    assert code == 0 and (pair / "out" / "timeline.csv").exists()


def tiny_transformers_model(arch: str, seed: int, path: Path) -> Path:
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=64, vocab_size=64)
    torch.manual_seed(seed)
    model = {"qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**small)),
             "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**small))}[arch]()
    model.save_pretrained(path)
    return path


def test_another_architecture_is_named_plainly(tmp_path, capsys):
    qwen = tiny_transformers_model("qwen2", 0, tmp_path / "qwen2")
    llama = tiny_transformers_model("llama", 1, tmp_path / "llama")
    code = main(["analyze", str(qwen), str(llama), "--out", str(tmp_path / "out"), "--quiet", "--no-rank"])
    captured = capsys.readouterr()
    assert code == 0
    warnings = [l for l in captured.err.splitlines() if "does not look like a fine-tune of the base" in l]
    assert any("Qwen2ForCausalLM" in w and "LlamaForCausalLM" in w for w in warnings), captured.err
    assert any("‖Δ‖/‖W0‖" in w for w in warnings), captured.err
    assert all(w.startswith("rlsub-tui: warning:") for w in warnings)
    assert "WARNING: run 'llama' does not look like a fine-tune" in captured.out
    notes = json.loads((tmp_path / "out" / "summary.json").read_text())["notes"]
    assert sum("does not look like a fine-tune" in n for n in notes) == 2


def test_unrelated_model_of_the_same_architecture_is_flagged_by_its_distance(tmp_path, capsys):
    a = tiny_transformers_model("llama", 0, tmp_path / "a")
    b = tiny_transformers_model("llama", 1, tmp_path / "b")
    assert main(["analyze", str(a), str(b), "--out", str(tmp_path / "out"), "--quiet", "--no-rank"]) == 0
    err = capsys.readouterr().err
    warning = next(l for l in err.splitlines() if "does not look like a fine-tune" in l)
    # independent check: the median over tensors of ‖Δ‖/‖W0‖ from matrices.csv's rel_delta_norm
    import csv
    import statistics
    rows = list(csv.DictReader(open(tmp_path / "out" / "matrices.csv")))
    median = statistics.median(float(r["rel_delta_norm"]) for r in rows if r["rel_delta_norm"])
    assert median > 0.5 and f"is {median:.3g}" in warning


def test_mostly_unmatched_run_is_flagged(pair, capsys):
    b = base_state()
    r = {("other." + k if "layers.0" in k or "layers.1.mlp" in k else k): v for k, v in sparse_run(b, 3).items()}
    save(r, pair / "renamed")
    assert main(["analyze", str(pair / "base"), str(pair / "renamed"), "--out", str(pair / "out"), "--quiet",
                 "--no-rank"]) == 0
    err = capsys.readouterr().err
    assert "run 'renamed' does not look like a fine-tune of the base 'base': 12 of the base's 21 tensors have " \
           "no match in it" in err


def test_a_real_fine_tune_gives_no_such_warning(pair, capsys):
    assert main(["analyze", str(pair / "base"), str(pair / "run"), "--out", str(pair / "out"), "--quiet"]) == 0
    assert "fine-tune" not in capsys.readouterr().err


def test_nothing_in_common_names_both_architectures(tmp_path, capsys):
    T = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    qwen = tiny_transformers_model("qwen2", 0, tmp_path / "qwen2")
    torch.manual_seed(2)
    T.GPT2LMHeadModel(T.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8)).save_pretrained(
        tmp_path / "gpt2")
    code = main(["analyze", str(qwen), str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    line = next(l for l in err.splitlines() if l.startswith("rlsub-tui: error:"))
    assert code == 2 and "no tensor in common" in line
    assert "(config.json: base Qwen2ForCausalLM; run(s) gpt2 GPT2LMHeadModel)." in line
    assert not (tmp_path / "out").exists()
