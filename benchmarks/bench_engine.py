"""Speed and memory of the engine at real model shapes: prints a table of figures and ratios.

    python benchmarks/bench_engine.py                # Qwen2.5-0.5B shapes, base + 3 runs, bf16
    python benchmarks/bench_engine.py --layers 4     # a quick look

Every figure comes from one run on the same files with the page cache warm; compare ratios.
Runs unchanged on a GPU machine (the engine picks CUDA when torch sees it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

QWEN05 = dict(vocab=151936, hidden=896, intermediate=4864, heads=14, kv_heads=2, head_dim=64)


def model_shapes(layers: int, vocab: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 head_dim: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a Qwen2-style checkpoint (tied embeddings: no lm_head)."""
    s = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        s.update({
            p + "input_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
            p + "self_attn.q_proj.bias": (heads * head_dim,),
            p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.k_proj.bias": (kv_heads * head_dim,),
            p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.bias": (kv_heads * head_dim,),
            p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
        })
    s["model.norm.weight"] = (hidden,)
    return s


def model_config(layers: int, vocab: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                 head_dim: int) -> dict:
    """The config.json of a Qwen2 model of model_shapes' shapes, so that transformers can load the files (the
    paper's script, `one_pair`); values the shapes do not fix are Qwen2.5-0.5B's."""
    return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": vocab, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0}


def write_checkpoints(root: Path, shapes: dict, k: int, seed: int = 0, config: dict | None = None) -> list[Path]:
    """Base + k runs as bf16 safetensors, written tensor by tensor, each with `config` as its config.json. RL-like
    updates: sparse, with a seed-independent 'hot' set shared by all runs, steps around one bf16 ULP (some round
    away)."""
    names = sorted(shapes)
    header, offset = {}, 0
    for n in names:
        numel = 1
        for d in shapes[n]:
            numel *= d
        header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [offset, offset + 2 * numel]}
        offset += 2 * numel
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    dirs = [root / "base"] + [root / f"run{i}" for i in range(k)]
    expected = 8 + len(raw) + offset
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config or {}))
    if all((d / "model.safetensors").exists() and (d / "model.safetensors").stat().st_size == expected for d in dirs):
        return dirs  # written by an earlier run with these shapes (same seed: same bytes)
    files = []
    for d in dirs:
        fh = open(d / "model.safetensors", "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        files.append(fh)
    g = torch.Generator().manual_seed(seed)
    for n in names:
        shape = shapes[n]
        base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        if "norm" in n:
            base = torch.ones(shape, dtype=torch.bfloat16)
        files[0].write(base.view(torch.uint8).numpy().tobytes() if base.numel() else b"")
        hot = torch.rand(shape, generator=g) < 0.25
        for i in range(k):
            own = torch.rand(shape, generator=g) < 0.10
            step = torch.randn(shape, generator=g) * 2e-4 * (hot | own)
            run = (base.float() + step).to(torch.bfloat16) if "norm" not in n else base
            files[1 + i].write(run.view(torch.uint8).numpy().tobytes() if run.numel() else b"")
    for fh in files:
        fh.close()
    return dirs


def read_floor(dirs: list[Path]) -> tuple[float, int]:
    """Seconds to read every byte of the checkpoints once (page cache warm)."""
    total = 0
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for d in dirs:
        with open(d / "model.safetensors", "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return time.perf_counter() - start, total


CHILD = r"""
import json, os, resource, sys, threading, time
mode, args = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()


def tree_rss_kb() -> int:
    # this process and every descendant (analyze --workers: the forkserver and its workers), VmRSS summed
    children = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    children.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except OSError:
                pass
    total, todo = 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
        todo += children.get(pid, [])
    return total


tree_peak, stop = [0], threading.Event()


def sample():
    while not stop.is_set():
        tree_peak[0] = max(tree_peak[0], tree_rss_kb())
        stop.wait(0.05)


if mode != "ours-cold":  # as a user's shell runs `rlsub-tui analyze`: it imports torch itself, beside its workers
    import torch  # every other mode imports torch before `work` starts: the marginal rates leave import time out
if mode.startswith("ours"):
    from rlsub_tui.cli.main import main
work_start = time.perf_counter()
if mode.startswith("ours"):
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = main(args)
    stop.set()
    sampler.join()
    assert code == 0, code
elif mode == "mask":  # the anchor: the paper's mask and its count, nothing else, tensors from safe_open
    import torch
    from safetensors import safe_open
    files = [safe_open(d + "/model.safetensors", framework="pt") for d in args]
    updated = 0
    for name in files[0].keys():
        base = files[0].get_tensor(name)
        for f in files[1:]:
            updated += int(torch.count_nonzero((f.get_tensor(name) - base).abs() > 1e-5))
    print("updated", updated, file=sys.stderr)
elif mode == "paper-script":  # Mukherjee et al.'s check_sparsity.py, its steps at its README's settings
    import torch
    from transformers import AutoModelForCausalLM
    models = [AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16, device_map="cpu") for d in args]
    base, run = (m.state_dict() for m in models)
    deltas = []
    with torch.no_grad():
        for name, _ in models[0].named_parameters():  # per parameter: Δ in bf16 and its non-zero fraction
            delta = run[name] - base[name]
            (delta != 0).sum().item() / delta.numel()
            deltas.append(delta.view(-1))
    deltas = torch.cat(deltas, dim=0)
    (deltas == 0).sum().item()
    updated = deltas.numel() - int(torch.isclose(deltas, torch.zeros_like(deltas), atol=1e-5).sum().item())
    print("updated", updated, file=sys.stderr)
elif mode == "reference":
    import torch
    from safetensors.torch import load_file
    base = load_file(args[0] + "/model.safetensors")
    run = load_file(args[1] + "/model.safetensors")
    deltas = torch.cat([(run[n] - base[n]).flatten() for n in base])
    updated = int((~torch.isclose(deltas, torch.zeros_like(deltas), atol=1e-5)).sum())
    print("updated", updated, file=sys.stderr)
wall = time.perf_counter() - start
# VmHWM (peak RSS) resets at exec; ru_maxrss would carry the parent's peak over from fork
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
# with worker processes the peak is the process tree's: its summed RSS sampled every 50 ms (shared pages
# counted in every process that maps them, so an upper bound)
print(json.dumps({"wall": wall, "work": time.perf_counter() - work_start, "rss_mb": max(hwm, tree_peak[0]) / 1024}))
"""


def child(mode: str, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


WORKERS: list[str] = []  # --workers N, passed on to every analyze (default: analyze's own)


def ours(dirs: list[Path], out: Path, extra: list[str] = (), cold: bool = False) -> dict:
    """`analyze` in a child process; `cold`: torch not imported before it starts (the wall time a user sees)."""
    args = ["analyze", str(dirs[0]), *map(str, dirs[1:]), "--out", str(out), "--quiet", "--no-cache", *WORKERS,
            *extra]
    return child("ours-cold" if cold else "ours", args)


def mask_pass(dirs: list[Path]) -> dict:
    return child("mask", [str(d) for d in dirs])


def paper_script_runs() -> bool:
    """Whether this Python can run the paper's script (transformers and accelerate, for its device_map)."""
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "accelerate"))


def one_pair(dirs: list[Path], device: str, rounds: int) -> dict[str, dict]:
    """The paper's script (where transformers runs), the lighter reference approach, ours (started as a user
    starts it) and the mask pass alone on one pair, interleaved, `rounds` rounds: each one's median wall time,
    with its peak RSS."""
    names = [str(d) for d in dirs]
    runs: dict[str, list[dict]] = {"reference": [], "ours": [], "mask": []}
    if paper_script_runs():
        runs["paper"] = []
    for _ in range(rounds):
        if "paper" in runs:
            runs["paper"].append(child("paper-script", names))
        runs["reference"].append(child("reference", names))
        runs["ours"].append(ours(dirs, dirs[0].parent / "out-pair", ["--no-rank", "--device", device], cold=True))
        runs["mask"].append(mask_pass(dirs))
    return {what: {"wall": statistics.median(r["wall"] for r in got), "rss_mb": max(r["rss_mb"] for r in got),
                   "walls": [r["wall"] for r in got]} for what, got in runs.items()}


def marginal(small: dict, large: dict, small_bytes: int, large_bytes: int) -> float:
    """Seconds per GB between two model depths: fixed costs cancel out; the time to import torch (and the
    package), which varies from run to run by more than the difference, is left out of both ("work")."""
    return (large["work"] - small["work"]) / ((large_bytes - small_bytes) / 1e9)


def marginal_rates(dirs: list[Path], half_dirs: list[Path], device: str, repeats: int) -> tuple[dict, list[dict]]:
    """The mask pass and `analyze --no-rank` at two depths, interleaved, `repeats` rounds: the fastest run of
    each, and every round's runs (a round's marginal rates come from its own four runs)."""
    best: dict[tuple[str, str], dict] = {}
    rounds = []
    for _ in range(repeats):
        runs = {}
        for depth, ds in (("half", half_dirs), ("full", dirs)):
            for what in ("mask", "ours"):
                got = mask_pass(ds) if what == "mask" else ours(ds, ds[0].parent / "out-marginal",
                                                                ["--no-rank", "--device", device])
                key = (what, depth)
                runs[key] = got
                if key not in best or got["work"] < best[key]["work"]:
                    best[key] = got
        rounds.append(runs)
    return best, rounds


def rank_comparison(dirs: list[Path], layers: int, device: str) -> dict:
    from rlsub_tui.checkpoints.checkpoint import open_checkpoint
    from rlsub_tui.compute.kernels import stored_delta
    from rlsub_tui.compute.rank import reference_rank, update_rank

    base, run = open_checkpoint(str(dirs[0])), open_checkpoint(str(dirs[1]))
    names = [n for n, i in base.tensors.items() if len(i.shape) == 2 and "layers." in n
             and int(n.split("layers.")[1].split(".")[0]) < layers]
    t_ours = t_ref = 0.0
    agree, count = 0, 0
    dev = torch.device(device)
    for n in names:
        d = stored_delta(base.read(n).to(dev), run.read(n).to(dev))
        sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        r1 = update_rank(d)
        sync()
        t1 = time.perf_counter()
        r2 = reference_rank(d)
        sync()
        t2 = time.perf_counter()
        t_ours += t1 - t0
        t_ref += t2 - t1
        agree += r1 == r2
        count += 1
    return {"matrices": count, "agree": agree, "ours": t_ours, "reference": t_ref}


UI_CHILD = r"""
import asyncio, json, sys, tempfile, time
from pathlib import Path
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
dirs, compute = json.loads(sys.argv[1]), sys.argv[2]

async def go():
    app = ExplorerApp(ExplorerConfig(dirs[0], dirs[1:], AnalysisOptions(use_cache=False, rank=False),
                                     Path(tempfile.gettempdir()), compute=compute))
    ticks, state = [], {"engine": None, "first_paint": None, "computing": None}
    t0 = time.perf_counter()
    async with app.run_test(size=(120, 40)) as pilot:
        def tick():
            now = time.perf_counter()
            ticks.append(now)
            if state["engine"] is None and "rlsub_tui.compute.engine" in sys.modules:
                state["engine"] = now  # torch imported, the checkpoints about to be opened
            if state["first_paint"] is None and app.roots:
                state["first_paint"] = now - t0
            if state["computing"] is None and app.result is not None:
                state["computing"] = now
        app.set_interval(0.01, tick)
        while app.running or app.result is None:
            await pilot.pause(0.05)
            await pilot.press("j")  # a user browsing while it computes
    gaps = [(b - a - 0.01, b) for a, b in zip(ticks, ticks[1:])]
    before = [g for g, t in gaps if state["computing"] is None or t <= state["computing"]]
    during = sorted(g for g, t in gaps if state["computing"] is not None and t > state["computing"])
    print(json.dumps({"first_paint": state["first_paint"], "max_stall_ms": 1000 * max(during),
                      "p99_stall_ms": 1000 * during[int(0.99 * (len(during) - 1))],
                      "max_stall_before_ms": 1000 * max(before), "total": time.perf_counter() - t0}))

if __name__ == "__main__":  # a child process of the analysis runs this file again as __mp_main__
    asyncio.run(go())
"""


def ui_responsiveness(dirs: list[Path], compute: str = "process") -> dict:
    """In a fresh process (torch not yet imported, as for a user): first paint (tree from headers), the
    longest event-loop stall before computing starts (the worker imports torch and opens the checkpoints)
    and while the worker computes, keys pressed all along. compute: as ExplorerConfig.compute (the CLI's
    is "process")."""
    out = subprocess.run([sys.executable, "-c", UI_CHILD, json.dumps([str(d) for d in dirs]), compute],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def idle_stalls(seconds: float = 5.0) -> float:
    """The longest gap of a 10 ms timer in an idle process: this machine's scheduling noise, in ms."""
    last, worst, end = time.perf_counter(), 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        time.sleep(0.01)
        now = time.perf_counter()
        worst, last = max(worst, now - last - 0.01), now
    return 1000 * worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--rank-layers", type=int, default=2, help="layers whose matrices the rank comparison uses")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "rlsub-bench")
    p.add_argument("--device", default="auto")
    p.add_argument("--skip-ui", action="store_true")
    p.add_argument("--ui-only", action="store_true", help="measure the explorer alone (item 6) and an idle timer")
    p.add_argument("--ui-compute", choices=("process", "thread"), default="process",
                   help="where the explorer computes: a child process (the CLI's default) or a thread of its own")
    p.add_argument("--ui-half", action="store_true", help="measure the UI on the half-depth model (quicker)")
    p.add_argument("--skip-rank", action="store_true", help="leave out the with-rank analysis and the rank comparison")
    p.add_argument("--repeats", type=int, default=2, help="runs of each marginal-rate measurement (fastest kept)")
    p.add_argument("--workers", type=int, help="analyze's --workers (default: its own, one per core up to 4)")
    args = p.parse_args()
    if args.workers is not None:
        WORKERS[:] = ["--workers", str(args.workers)]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    shapes = model_shapes(args.layers, **QWEN05)
    half = model_shapes(max(1, args.layers // 2), **QWEN05)
    full_dir, half_dir = args.dir / f"L{args.layers}", args.dir / f"L{max(1, args.layers // 2)}"
    t = time.perf_counter()
    dirs = write_checkpoints(full_dir, shapes, args.runs, config=model_config(args.layers, **QWEN05))
    half_dirs = write_checkpoints(half_dir, half, args.runs, config=model_config(max(1, args.layers // 2), **QWEN05))
    print(f"# wrote checkpoints in {time.perf_counter() - t:.0f}s", file=sys.stderr)
    if args.ui_only:
        read_floor(half_dirs if args.ui_half else dirs)  # warm the page cache
        print_rows([ui_row(ui_responsiveness(half_dirs if args.ui_half else dirs, args.ui_compute), idle_stalls())])
        return 0
    params = sum(int(torch.tensor(s).prod()) if s else 1 for s in shapes.values())

    read_floor(dirs)  # warm the page cache
    floor, nbytes = min(read_floor(dirs) for _ in range(2))
    half_nbytes = read_floor(half_dirs)[1]
    rates, rounds = marginal_rates(dirs, half_dirs, device, args.repeats)
    no_rank = rates[("ours", "full")]
    with_rank = None if args.skip_rank else ours(dirs, args.dir / "out-rank", ["--device", device])
    pair = one_pair(dirs[:2], device, min(3, args.repeats))
    half_run = rates[("ours", "half")]
    rank = None if args.skip_rank else rank_comparison(dirs, args.rank_layers, device)
    ui = None if args.skip_ui else ui_responsiveness(half_dirs if args.ui_half else dirs, args.ui_compute)
    noise = idle_stalls()

    gb = nbytes / 1e9
    # per round, from that round's own runs; medians over the rounds (the fastest of each of four runs, taken
    # apart, pairs extremes of different rounds: on this noisy machine it swung the ratio from 1.7x to 5.5x)
    per_round = [(marginal(r[("mask", "half")], r[("mask", "full")], half_nbytes, nbytes),
                  marginal(r[("ours", "half")], r[("ours", "full")], half_nbytes, nbytes)) for r in rounds]
    mask_rate = statistics.median(m for m, _ in per_round)
    ours_rate = statistics.median(o for _, o in per_round)
    ratios = sorted(o / m for m, o in per_round)
    # the whole work (after imports) at full depth, ours over the anchor's, per round: fixed costs stay in
    # (starting the workers, writing the outputs), so an upper bound on the marginal ratio that noise moves less
    whole = sorted(r[("ours", "full")]["work"] / r[("mask", "full")]["work"] for r in rounds)
    rows = [
        ("machine", f"{platform.node()} · {os.cpu_count()} cores · {device}"
                    + (f" ({torch.cuda.get_device_name()})" if device.startswith("cuda") else "") + f" · {date.today()}"),
        ("model", f"Qwen2.5-0.5B shapes, {args.layers} layers, {params / 1e6:.0f}M params, base + {args.runs} runs, "
                  f"{gb:.2f} GB read"),
        ("1. floor: read every byte once", f"{floor:.2f} s  ({gb / floor:.2f} GB/s)"),
        ("2. analyze, no rank", f"{no_rank['wall']:.2f} s  ({gb / no_rank['wall']:.2f} GB/s)  "
                                f"peak RSS {no_rank['rss_mb']:.0f} MB  ->  {no_rank['wall'] / floor:.2f}x floor "
                                f"(target <= 2x)"),
        ("2a. mask pass alone (anchor)", f"{rates[('mask', 'full')]['wall']:.2f} s; marginal, median of rounds "
                                         f"{mask_rate:.3f} s/GB ({1 / mask_rate:.2f} GB/s)"),
        ("2b. analyze, no rank, marginal", f"{ours_rate:.3f} s/GB ({1 / ours_rate:.2f} GB/s) -> "
                                           f"{statistics.median(ratios):.2f}x the mask pass (target <= 2x; "
                                           f"median of {len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)})"),
        ("2c. analyze / mask pass, whole work", f"{statistics.median(whole):.2f}x at {args.layers} layers, fixed costs "
                                                f"included (median of {len(whole)} rounds: "
                                                f"{', '.join(f'{x:.2f}' for x in whole)})"),
    ]
    if with_rank:
        rows.append(("   analyze, with rank", f"{with_rank['wall']:.2f} s  peak RSS {with_rank['rss_mb']:.0f} MB"))
    if rank:
        rows.append(("3. rank: ours vs matrix_rank", f"{rank['ours']:.2f} s vs {rank['reference']:.2f} s on "
                     f"{rank['matrices']} matrices -> {rank['reference'] / max(rank['ours'], 1e-9):.1f}x faster "
                     f"(target >= 3x); ranks agree on {rank['agree']}/{rank['matrices']}"))
    rows += one_pair_rows(pair)
    rows += [
        ("5. peak RSS vs depth", f"{max(1, args.layers // 2)} layers {half_run['rss_mb']:.0f} MB, {args.layers} layers "
                                 f"{no_rank['rss_mb']:.0f} MB -> {100 * (no_rank['rss_mb'] / half_run['rss_mb'] - 1):+.1f}% "
                                 f"(target < +10%)"),
    ]
    if ui:
        rows.append(ui_row(ui, noise))
    print_rows(rows)
    return 0


def one_pair_rows(pair: dict[str, dict]) -> list[tuple[str, str]]:
    """Row 4: ours and the mask pass against the paper's script (else the lighter reference approach)."""
    against = "paper" if "paper" in pair else "reference"
    ref, mine, mask = pair[against], pair["ours"], pair["mask"]
    rows = []
    if "paper" in pair:
        rows.append(("4. one pair: the paper's script", f"{ref['wall']:.2f} s, peak RSS {ref['rss_mb']:.0f} MB (its "
                     f"steps: two from_pretrained, per-parameter Δ, cat, isclose; wall, median of "
                     f"{len(ref['walls'])}; the same for each below)"))
    lighter = pair["reference"]
    rows.append(("   one pair: load_file, cat, isclose", f"{lighter['wall']:.2f} s, peak RSS {lighter['rss_mb']:.0f} MB"
                 + ("" if "paper" in pair else " (transformers or accelerate missing: the paper's script not run)")))
    rows += [
        ("   one pair: ours (no rank)", f"{mine['wall']:.2f} s, peak RSS {mine['rss_mb']:.0f} MB  ->  "
                                       f"{ref['wall'] / mine['wall']:.1f}x faster than the {against} (target >= "
                                       f"10x), {mine['rss_mb'] / ref['rss_mb']:.2f} of its memory (target <= 0.2)"),
        ("   one pair: mask pass alone", f"{mask['wall']:.2f} s  ->  {ref['wall'] / mask['wall']:.1f}x faster than "
                                        f"the {against} (the anchor's own ceiling for that ratio)"),
    ]
    return rows


def ui_row(ui: dict, noise: float) -> tuple[str, str]:
    return ("6. UI", f"first paint {ui['first_paint']:.2f} s (target < 1 s); longest event-loop stall "
                     f"while computing {ui['max_stall_ms']:.0f} ms, p99 {ui['p99_stall_ms']:.0f} ms "
                     f"(target < 100 ms) over {ui['total']:.0f} s (no rank); before computing (torch "
                     f"import, opening) {ui['max_stall_before_ms']:.0f} ms; an idle timer's longest "
                     f"gap on this machine {noise:.0f} ms")


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{width}} | result |\n|{'-' * (width + 2)}|--------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    sys.exit(main())
