#!/usr/bin/env bash
# rlsub-tui: the one-shot GPU check. Run it first on any GPU machine; record its table in BENCHMARKS.md.
#
# From the repository root on a CUDA machine, the project installed against a CUDA build of torch
# (on a machine with no registry: the torch already there, Textual and friends carried as py3.12 wheels,
# `pip install --no-deps --no-build-isolation -e .`):
#
#     bash benchmarks/gpu_check.sh            # ~5 min on one H200; $OUT/table.md, $OUT/summary.txt, logs
#     DRY_CPU=1 bash benchmarks/gpu_check.sh  # no GPU: checks the script itself (numbers meaningless)
#
# Steps, most valuable first, each under its own timeout, later ones skipped past DEADLINE seconds:
#   env, tests   tests/test_gpu.py (a FAIL line if it was skipped: torch sees no GPU)
#   compare      CPU vs CUDA on 17 fixture cases (dtypes, criteria, NaN/Inf, K=15/16, rows, pickles,
#                the bundled sample): every field of every tensor record and every output file cell
#   ui           the explorer (device auto) on the bundled sample: header says cuda, numbers == CPU
#   qwen ...     Qwen2.5-1.5B shapes, base + 3 bf16 runs (12.3 GB): read floor into host memory and into
#                GPU memory (the same pinned staging the engine uses), analyze --no-rank on cuda, with rank
#                on cuda, --no-rank on cpu; CPU-vs-CUDA file diff; with rank and subspaces on cuda
#   micro        rank routes (Gram+eigvalsh fp64, gesvd, gesvdj, CPU matrix_rank), chunk sizes on the
#                151936x1536 embedding, staging vs pin_memory()
#   suite        the whole test suite on the GPU box (device auto -> CUDA wherever a test does not pin cpu)
# $OUT/table.md gathers the ROW lines: one markdown table, the figures BENCHMARKS.md records.
#
# Env: PY (default python3), OUT (default /tmp/rlsub-gpu-check), WORK (scratch, ~14 GB disk, default
#      /tmp/rlsub-gpu-work), DEADLINE (s, default 300), LAYERS (default 28), SKIP (space-separated step
#      names: tests compare ui qwen cuda_norank rank cpu qdiff subspaces micro suite), DRY_CPU=1.
set -uo pipefail
PY=${PY:-python3}
OUT=${OUT:-/tmp/rlsub-gpu-check}
WORK=${WORK:-/tmp/rlsub-gpu-work}
DEADLINE=${DEADLINE:-300}
LAYERS=${LAYERS:-28}
SKIP=" ${SKIP:-} "
mkdir -p "$OUT" "$WORK"
export WORK RLSUB_TUI_CACHE_DIR="$WORK/cache" PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
[ -n "${DRY_CPU:-}" ] && export DRY_CPU && LAYERS=1
GPU=cuda; [ -n "${DRY_CPU:-}" ] && GPU=cpu
T0=$(date +%s)
CHECK="$WORK/rlsub_gpu_check.py"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

log() { echo "== [$(( $(date +%s) - T0 ))s] $*" | tee -a "$SUMMARY"; }
# step NAME TIMEOUT CMD...: runs CMD into $OUT/NAME.log, appends its tail to the summary
step() {
  local name=$1 t=$2; shift 2
  if [[ "$SKIP" == *" $name "* ]]; then log "skip $name (SKIP)"; return 0; fi
  local left=$(( DEADLINE + 30 - ($(date +%s) - T0) ))   # every step ends by DEADLINE+30 s
  if (( left < 20 )); then log "skip $name (past DEADLINE=${DEADLINE}s)"; return 0; fi
  (( t > left )) && t=$left
  log "start $name (timeout ${t}s)"
  local s; s=$(date +%s)
  timeout -k 15 "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  log "end $name rc=$rc in $(( $(date +%s) - s ))s$( ((rc == 124 || rc == 137)) && echo ' TIMED OUT')"
  grep -E '^(PASS|FAIL|WARN|INFO|TIME|RESULT|ROW| +(field|file) )' "$OUT/$name.log" | head -n 120 >> "$SUMMARY"
  if (( rc != 0 )); then
    echo "FAIL step $name exited with rc $rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') (see $name.log)" >> "$SUMMARY"
    tail -n 15 "$OUT/$name.log" | sed 's/^/    | /' >> "$SUMMARY"
  fi
  return 0
}

cat > "$CHECK" <<'PYEOF'
"""Helpers for benchmarks/gpu_check.sh: fixtures, CPU-vs-CUDA comparison, timed runs, micro-benchmarks."""
import argparse, asyncio, collections, csv, json, math, os, signal, struct, sys, time
from pathlib import Path

import torch

DRY = os.environ.get("DRY_CPU") == "1"
GPU = "cpu" if DRY else "cuda"
REPO = Path.cwd()
sys.path.insert(0, str(REPO / "benchmarks"))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def row(what, value, note=""):
    """One line of the markdown table (gathered from the summary by the shell script)."""
    print(f"ROW | {what} | {value} | {note} |", flush=True)


# ------------------------------------------------------------------------------------------ fixtures
def save(state, d, layout="safetensors"):
    from safetensors.torch import save_file
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if layout == "bin":
        torch.save(state, d / "pytorch_model.bin")
    else:
        save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text("{}")
    return str(d)


def make_base(shapes, dtype, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: (torch.ones(s) if "norm" in n else torch.randn(s, generator=g) * scale).to(dtype)
            for n, s in shapes.items()}


def make_run(base, i, dtype=None, step=2e-4):
    """RL-like: a seed-independent hot set (25%) plus own picks (10%), steps around one bf16 ULP."""
    g, hot_g = torch.Generator().manual_seed(1000 + i), torch.Generator().manual_seed(7)
    out = {}
    for n, w in base.items():
        hot = torch.rand(w.shape, generator=hot_g) < 0.25
        own = torch.rand(w.shape, generator=g) < 0.10
        d = torch.randn(w.shape, generator=g) * step * (hot | own)
        out[n] = (w.float() + d).to(dtype or w.dtype)
    return out


def plant_nonfinite(base, runs, name):
    b = base[name]
    b[0, 0] = float("nan"); b[3, 3] = float("inf")
    for j, r in enumerate(runs):
        r[name][0, 0] = float("nan"); r[name][3, 3] = float("inf")
    runs[1][name][1, 1] = float("inf")
    runs[-1][name][2, 2] = float("-inf")
    runs[0][name][4, 4] = float("nan")


def shapes_big():
    if DRY:
        return {"model.embed_tokens.weight": (301, 64), "model.layers.0.self_attn.q_proj.weight": (96, 96),
                "model.layers.0.mlp.up_proj.weight": (256, 64), "model.layers.0.self_attn.k_proj.weight": (16, 96),
                "model.layers.0.input_layernorm.weight": (96,), "model.layers.0.self_attn.q_proj.bias": (96,),
                "model.same.weight": (64, 64), "model.nan.weight": (40, 40)}
    return {"model.embed_tokens.weight": (12289, 512),               # 6.3M elements: 2 chunks, ragged
            "model.layers.0.self_attn.q_proj.weight": (1536, 1536),  # near-square: gesvd on CUDA
            "model.layers.0.mlp.up_proj.weight": (8960, 1536),       # 13.8M: 4 chunks, Gram route
            "model.layers.0.self_attn.k_proj.weight": (256, 1536),   # wide, Gram route
            "model.layers.0.input_layernorm.weight": (1536,),
            "model.layers.0.self_attn.q_proj.bias": (1536,),
            "model.same.weight": (64, 64),                           # identical in every run: rank 0
            "model.nan.weight": (300, 300)}                          # NaN/Inf planted


def shapes_small():
    if DRY:
        return {"a.weight": (130, 70), "b.weight": (48, 32), "c.weight": (32, 160), "n.norm.weight": (32,)}
    return {"a.weight": (2100, 2050), "b.weight": (96, 64), "c.weight": (64, 640), "n.norm.weight": (64,)}


def build_fixtures(root):
    """name -> (base, [runs], [(option label, kwargs)])"""
    root = Path(root)
    fx = {}
    atol = ("atol+sweep", dict(sweep=(1e-8, 1e-6, 1e-5)))
    exact = ("exact", dict(criterion=("exact", 0.0), rank=False))
    rel = ("relative", dict(criterion=("relative", 1e-3), rank=False))

    b = make_base(shapes_big(), torch.bfloat16)
    runs = [make_run(b, i) for i in range(3)]
    for r in runs:
        r["model.same.weight"] = b["model.same.weight"].clone()
    plant_nonfinite(b, runs, "model.nan.weight")
    fx["bf16_k3"] = (save(b, root / "bf16/base"), [save(r, root / f"bf16/run{i}") for i, r in enumerate(runs)],
                     [atol, exact, rel, ("atol cuda:0", dict(gpu="cuda:0", rank=False))])

    b = make_base(shapes_small(), torch.float16)
    fx["fp16_k3"] = (save(b, root / "fp16/base"),
                     [save(make_run(b, i, step=1e-3), root / f"fp16/run{i}") for i in range(3)], [atol, exact, rel])

    b = make_base(shapes_small(), torch.float32)
    fx["fp32_bin_k2"] = (save(b, root / "fp32/base", "bin"),
                         [save(make_run(b, i, step=1e-6), root / f"fp32/run{i}", "bin") for i in range(2)],
                         [atol, rel])

    e4 = torch.float8_e4m3fn
    b = make_base(shapes_small(), e4, scale=0.5)
    r8 = [make_run(b, i, step=0.05) for i in range(3)]
    r8[2] = {n: t.to(torch.float8_e5m2) for n, t in r8[2].items()}  # mixed fp8: compared in e5m2
    fx["fp8_k3"] = (save(b, root / "fp8/base"), [save(r, root / f"fp8/run{i}") for i, r in enumerate(r8)],
                    [("atol 1e-2", dict(criterion=("atol", 1e-2))), exact])

    sm = shapes_small()
    sm["emb.weight"] = (1000, 64)
    b = make_base(sm, torch.bfloat16)
    rm = [make_run(b, i) for i in range(3)]
    big_emb = torch.cat([rm[0]["emb.weight"].float(), torch.randn(24, 64) * 0.02])
    rm[0] = {n: t.float() for n, t in rm[0].items()}
    rm[0]["emb.weight"] = big_emb                                    # resized vocab, fp32
    rm[2] = {n: t.to(torch.float16) for n, t in rm[2].items()}
    fx["mixed_rows_k3"] = (save(b, root / "mixed/base"), [save(r, root / f"mixed/run{i}") for i, r in enumerate(rm)],
                           [("atol common-rows", dict(common_rows=True, sweep=(1e-6,)))])

    kb = {"a.weight": shapes_small()["a.weight"], "b.weight": (48, 32)}
    b = make_base(kb, torch.bfloat16)
    kr = [save(make_run(b, i), root / f"k16/run{i}") for i in range(16)]
    base_k = save(b, root / "k16/base")
    fx["k15_coded"] = (base_k, kr[:15], [("atol", dict(rank=False, sweep=(1e-6,)))])
    fx["k16_uncoded"] = (base_k, kr, [("atol", dict(rank=False, sweep=(1e-6,)))])

    from rlsub_tui.checkpoints.sample_paths import sample_dir
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
    s = sample_dir()
    runs = sorted(str(p) for p in s.iterdir() if p.is_dir() and p.name.startswith("grpo-")) + [str(s / "sft")]
    runs = run_specs(resolve_runs(runs))  # a timeline (grpo-lowlr-seedN/checkpoint-STEP) stands for its last step
    fx["sample_k7"] = (str(s / "base"), runs, [atol, exact])
    fx["sample_fp32_mixed"] = (str(s / "base-fp32"),
                               run_specs(resolve_runs([str(s / "fp32-grpo-lowlr-seed1"), str(s / "grpo-lowlr-seed1")])),
                               [atol])
    return fx


# ---------------------------------------------------------------------------------------- comparing
FLOAT_FIELDS = ("sum_abs_delta", "sq_delta", "sq_base")
EXPECTED_FLOAT_COLUMNS = {"mean_abs_delta", "rel_delta_norm",  # float32 reductions: order differs CPU/GPU
                          # spectra: near-square matrices take the SVD route on the CPU, the Gram route on CUDA
                          "stable_rank", "effective_rank", "mean_stable_rank_ratio", "mean_effective_rank_ratio"}
SPECTRUM_FLOATS = ("stable_rank", "effective_rank")


def rel_diff(a, b):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return 0.0
    if a == b:
        return 0.0
    try:
        return abs(a - b) / max(abs(a), abs(b))
    except (TypeError, ZeroDivisionError):
        return math.inf


def route(shape, device=None):
    """The rank route rank.update_rank_figures takes for a matrix of this shape on this device."""
    if len(shape) != 2:
        return "-"
    return "gram+eigvalsh" if (device or GPU) == "cuda" else "certified gram+eigvalsh (svd near the threshold)"


def compare_results(rc, rg, tol=1e-5, check_complete=True):
    """All differences between two AnalysisResults; float sums within tol count as equal."""
    bad, maxrel = [], 0.0
    if set(rc.tensors) != set(rg.tensors):
        bad.append(("tensor set", sorted(set(rc.tensors) ^ set(rg.tensors))[:5]))
    for what in ("planned", "run_labels"):
        if getattr(rc, what) != getattr(rg, what):
            bad.append((what, "differs"))
    if [(s.tensor, s.run, s.reason) for s in rc.skipped] != [(s.tensor, s.run, s.reason) for s in rg.skipped]:
        bad.append(("skipped", "differs"))
    if check_complete and rc.complete != rg.complete:
        bad.append(("complete", rc.complete, rg.complete))
    for name, tc in rc.tensors.items():
        tg = rg.tensors.get(name)
        if tg is None:
            continue
        for f in ("dtype", "shape", "numel", "both", "agreement", "multi", "sign_agree", "magnitude_numel", "notes"):
            if getattr(tc, f) != getattr(tg, f):
                bad.append((name, f, str(getattr(tc, f))[:80], str(getattr(tg, f))[:80]))
        for j, (sc, sg) in enumerate(zip(tc.runs, tg.runs)):
            for f in ("updated", "nonfinite", "sweep", "magnitude_updated"):
                if getattr(sc, f) != getattr(sg, f):
                    bad.append((name, f"run{j}.{f}", str(getattr(sc, f))[:80], str(getattr(sg, f))[:80]))
            for f in ("rank", "energy_rank_90", "energy_rank_99"):
                if getattr(sc, f) != getattr(sg, f):
                    bad.append((name, f"run{j}.{f}", getattr(sc, f), getattr(sg, f),
                                f"shape {tc.shape} route {route(tc.shape)}"))
            for f in SPECTRUM_FLOATS:
                x, y = getattr(sc, f), getattr(sg, f)
                if (x is None) != (y is None) or (x is not None and rel_diff(x, y) > tol):
                    bad.append((name, f"run{j}.{f}", x, y, f"shape {tc.shape} route {route(tc.shape)}"))
            for f in FLOAT_FIELDS:
                d = rel_diff(getattr(sc, f), getattr(sg, f))
                maxrel = max(maxrel, d if math.isfinite(d) else 0.0)
                if d > tol:
                    bad.append((name, f"run{j}.{f}", getattr(sc, f), getattr(sg, f), f"rel {d:.2e}"))
    return bad, maxrel


def flatten(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def as_float(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def diff_dirs(d1, d2, tol=1e-5):
    """Byte-compare every output file; list differing cells. Returns (real differences, expected float noise)."""
    real, noise = [], []
    files = sorted(p.name for p in Path(d1).iterdir())
    if files != sorted(p.name for p in Path(d2).iterdir()):
        real.append(("file set", files))
    for f in files:
        p2 = Path(d2) / f
        if not p2.exists():
            continue
        a, b = (Path(d1) / f).read_bytes(), p2.read_bytes()
        if a == b:
            continue
        if f.endswith(".csv"):
            ra, rb = list(csv.reader(a.decode().splitlines())), list(csv.reader(b.decode().splitlines()))
            if len(ra) != len(rb) or ra[:1] != rb[:1]:
                real.append((f, "rows/header differ", len(ra), len(rb)))
                continue
            for x, y in zip(ra[1:], rb[1:]):
                for col, u, v in zip(ra[0], x, y):
                    if u != v:
                        fu, fv = as_float(u), as_float(v)
                        ok = col in EXPECTED_FLOAT_COLUMNS and fu is not None and fv is not None and rel_diff(fu, fv) <= tol
                        (noise if ok else real).append((f, "/".join(x[:2]), col, u, v))
        else:
            fa, fb = flatten(json.loads(a)), flatten(json.loads(b))
            for k in sorted(set(fa) | set(fb)):
                u, v = fa.get(k), fb.get(k)
                if u == v or k == "device":
                    continue
                leaf = k.rsplit(".", 1)[-1]
                ok = leaf in EXPECTED_FLOAT_COLUMNS and isinstance(u, float) and isinstance(v, float) and rel_diff(u, v) <= tol
                (noise if ok else real).append((f, k, leaf, u, v))
    return real, noise


def run_analysis(base, runs, device, kw):
    from rlsub_tui.records.criteria import Criterion
    from rlsub_tui.compute.engine import Analysis
    from rlsub_tui.records.criteria import AnalysisOptions
    kw = dict(kw)
    kw.pop("gpu", None)
    crit = kw.pop("criterion", ("atol", 1e-5))
    a = Analysis(base, runs, AnalysisOptions(criterion=Criterion(*crit), device=device, use_cache=False, **kw))
    t = time.perf_counter()
    try:
        a.run_all()
    finally:
        a.close()
    return a.result, time.perf_counter() - t


def cmd_compare(args):
    from rlsub_tui.export.outputs import write_outputs
    torch.manual_seed(0)
    fx = build_fixtures(Path(args.work) / "fx")
    failures = cases = 0
    for name, (base, runs, cases_) in fx.items():
        for label, kw in cases_:
            cases += 1
            gpu = kw.get("gpu", GPU) if not DRY else "cpu"
            try:
                rc, tc = run_analysis(base, runs, "cpu", kw)
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                rg, tg = run_analysis(base, runs, gpu, kw)
            except Exception as exc:  # a crash on the GPU path is the main thing this looks for
                failures += 1
                print(f"FAIL {name} [{label}] crashed: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            bad, maxrel = compare_results(rc, rg)
            out = Path(args.work) / "out" / name / label.replace(" ", "_")
            write_outputs(rc, out / "cpu")
            write_outputs(rg, out / "gpu")
            real, noise = diff_dirs(out / "cpu", out / "gpu")
            mem = f", gpu peak reserved {torch.cuda.max_memory_reserved() / 2**20:.0f} MiB" if torch.cuda.is_available() else ""
            ok = not bad and not real
            failures += not ok
            print(f"{'PASS' if ok else 'FAIL'} {name} [{label}] K={len(runs)} {len(rc.tensors)} tensors: "
                  f"{len(bad)} field differences, float sums max rel diff {maxrel:.1e}; files: {len(real)} real / "
                  f"{len(noise)} float-noise cell differences; cpu {tc:.1f}s {gpu} {tg:.1f}s{mem}")
            for b in bad[:12]:
                print("     field", b)
            for r in real[:12]:
                print("     file ", r)
            cols = collections.Counter((f, c) for f, _, c, *_ in noise)
            if cols:
                print("     float-noise cells by column:", dict(cols))
    print(f"RESULT compare: {failures} failing case(s)")
    row("CPU vs CUDA, fixture cases (every field, every file cell)", f"{cases - failures}/{cases} identical",
        "float sums (mean |Δ|, ‖Δ‖/‖W0‖) within 1e-5 rel")
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------- UI path
def cmd_ui(args):
    """The explorer on the sample with device auto, computing in a thread and in a child process (the CLI's
    way: a forkserver child that initialises CUDA itself), each compared with the CPU engine."""
    from rlsub_tui.records.criteria import AnalysisOptions
    from rlsub_tui.checkpoints.sample_paths import sample_checkpoints
    from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
    base, runs = sample_checkpoints()
    resolved = resolve_runs(runs)  # the grpo-lowlr seeds are timelines, as the explorer opens them
    opts = dict(sweep=(1e-8, 1e-5))
    ref, _ = run_analysis(base, run_specs(resolved), "cpu", opts)

    async def go(compute):
        app = ExplorerApp(ExplorerConfig(base, run_specs(resolved), AnalysisOptions(use_cache=False, **opts),
                                         Path(args.work) / "exports", timelines=resolved.timelines,
                                         compute=compute))
        t0 = time.perf_counter()
        async with app.run_test(size=(120, 40)) as pilot:
            while app.running or app.result is None:
                if time.perf_counter() - t0 > 120:
                    raise TimeoutError("explorer did not finish in 120 s")
                await pilot.pause(0.1)
                await pilot.press("j")
            await pilot.pause(0.3)
            return app.result, app.sub_title, time.perf_counter() - t0

    failed = 0
    for compute in ("thread", "process"):
        res, sub, dt = asyncio.run(go(compute))
        bad, maxrel = compare_results(ref, res, check_complete=False)  # the app's own result never sets complete
        dev_ok = DRY or "cuda" in sub
        ok = not bad and dev_ok
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'} explorer (device auto, computing in a {compute}) on the sample, "
              f"K={len(runs)}: header '{sub}'; {len(bad)} differences vs CPU engine; float max rel {maxrel:.1e}; {dt:.1f}s")
        for b in bad[:10]:
            print("     field", b)
        row(f"explorer on the sample (device auto, {compute})", "PASS" if ok else "FAIL", f"header '{sub}'; {dt:.1f}s")
    return 1 if failed else 0


# --------------------------------------------------------------------------- realistic-size timing
Q15 = dict(vocab=151936, hidden=1536, intermediate=8960, heads=12, kv_heads=2, head_dim=128)
Q15_DRY = dict(vocab=4096, hidden=256, intermediate=1024, heads=4, kv_heads=2, head_dim=64)


def cmd_gen(args):
    """Qwen2.5-1.5B-shaped bf16 checkpoints (tied embeddings), base + k RL-like runs, generated on the GPU."""
    from bench_engine import model_shapes
    dev = "cpu" if DRY else "cuda"
    shapes = model_shapes(args.layers, **(Q15_DRY if DRY else Q15))
    names = sorted(shapes)
    header, off = {}, 0
    for n in names:
        numel = math.prod(shapes[n])
        header[n] = {"dtype": "BF16", "shape": list(shapes[n]), "data_offsets": [off, off + 2 * numel]}
        off += 2 * numel
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    root = Path(args.root)
    dirs = [root / "base"] + [root / f"run{i}" for i in range(args.k)]
    fhs = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text("{}")
        fh = open(d / "model.safetensors", "wb")
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fhs.append(fh)
    g = torch.Generator(device=dev).manual_seed(0)
    t = time.perf_counter()
    for n in names:
        s = shapes[n]
        if "norm" in n:
            base = torch.ones(s, dtype=torch.bfloat16, device=dev)
        else:
            base = (torch.randn(s, device=dev, generator=g) * 0.02).to(torch.bfloat16)
        fhs[0].write(base.view(torch.uint8).cpu().numpy().tobytes())
        hot = torch.rand(s, device=dev, generator=g) < 0.25
        for i in range(args.k):
            own = torch.rand(s, device=dev, generator=g) < 0.10
            step = torch.randn(s, device=dev, generator=g) * 2e-4 * (hot | own)
            run = base if "norm" in n else (base.float() + step).to(torch.bfloat16)
            fhs[1 + i].write(run.view(torch.uint8).cpu().numpy().tobytes())
    for fh in fhs:
        fh.close()
    params = sum(math.prod(s) for s in shapes.values())
    print(f"INFO wrote {len(dirs)} checkpoints, {len(names)} tensors, {params / 1e9:.3f}B params each, "
          f"{off * len(dirs) / 1e9:.1f} GB, in {time.perf_counter() - t:.0f}s")
    from bench_engine import read_floor
    read_floor(dirs)
    floor, nbytes = min(read_floor(dirs) for _ in range(2))
    print(f"TIME read floor (page cache warm): {floor:.2f}s for {nbytes / 1e9:.1f} GB ({nbytes / 1e9 / floor:.1f} GB/s)")
    row("read floor into host memory (page cache warm)", f"{floor:.2f} s", f"{nbytes / 1e9:.1f} GB, {nbytes / 1e9 / floor:.1f} GB/s")
    floors = {"host_s": floor, "bytes": nbytes}
    if not DRY:
        gfloor = min(gpu_floor(dirs) for _ in range(2))
        floors["gpu_s"] = gfloor
        row("read floor into GPU memory (the engine's pinned staging, no compute)", f"{gfloor:.2f} s",
            f"{nbytes / 1e9 / gfloor:.1f} GB/s")
    (root.parent / "floor.json").write_text(json.dumps(floors))
    return 0


def gpu_floor(dirs):
    """Every tensor of every checkpoint read into GPU memory as the engine reads it, nothing computed."""
    from rlsub_tui.checkpoints.checkpoint import open_checkpoint
    from rlsub_tui.checkpoints.staging import PinnedStager
    cks = [open_checkpoint(str(d)) for d in dirs]
    names = sorted(cks[0].tensors, key=lambda n: cks[0].tensors[n].offset)
    stager = PinnedStager(torch.device("cuda", torch.cuda.current_device()))
    sync()
    t = time.perf_counter()
    for name in names:
        for ck in cks:
            x, event = stager.to_device(ck, name)
            del x
    event.synchronize()
    dt = time.perf_counter() - t
    stager.close()
    for ck in cks:
        ck.close()
    return dt


def cmd_table(args):
    """Derived rows: the GPU targets of issue 14, from the saved timings."""
    work = Path(args.work)
    try:
        floor = json.loads((work / "floor.json").read_text())
        norank = json.loads((work / "time-cuda-no-rank.json").read_text())
    except (OSError, ValueError):
        print("INFO no timings to derive targets from")
        return 0
    if norank.get("rc") != 0:
        row("target: cuda no-rank analysis / GPU read floor (<= 1.5x)", "FAILED", "the analysis did not finish")
    elif "gpu_s" in floor:
        r = norank["wall_s"] / floor["gpu_s"]
        row("target: cuda no-rank analysis / GPU read floor (<= 1.5x)", f"{r:.2f}x", "PASS" if r <= 1.5 else "MISSED")
    try:
        rank = json.loads((work / "time-cuda-rank.json").read_text())
        rank_s = sum(v for k, v in rank["times_s"].items() if k.startswith("rank on"))
        if rank.get("rc") != 0 or not rank["counts"]:
            row("target: every rank of the 1.5B model, 3 runs (< 30 s)", "FAILED", "the analysis did not finish")
            return 0
        row("target: every rank of the 1.5B model, 3 runs (< 30 s)", f"{rank_s:.1f} s",
            ("PASS" if rank_s < 30 else "MISSED") + f"; {sum(rank['counts'].values())} matrices")
        both = json.loads((work / "time-cuda-rank-subspaces.json").read_text())
        if both.get("rc") != 0:
            row("target: + subspaces / analysis with rank (<= 1.30x)", "FAILED", "the analysis did not finish")
            return 0
        r = both["wall_s"] / rank["wall_s"]
        row("target: + subspaces / analysis with rank (<= 1.30x)", f"{r:.2f}x",
            ("PASS" if r <= 1.3 else "MISSED") + f"; {both['wall_s']:.1f} s against {rank['wall_s']:.1f} s")
    except (OSError, ValueError, ZeroDivisionError):
        pass
    return 0


def cmd_timed(args):
    """rlsub-tui analyze with the time split into reader thread / compute / rank routes, and peak memory."""
    from rlsub_tui.compute import engine
    from rlsub_tui.compute import masks
    times, counts = collections.defaultdict(float), collections.Counter()
    t_start = time.perf_counter()
    t_cuda = time.perf_counter()
    if torch.cuda.is_available() and not DRY and any(a.startswith("cuda") for a in args.argv):
        torch.zeros(1, device="cuda")  # context creation, timed apart from the analysis
        times["cuda context init"] = time.perf_counter() - t_cuda

    orig_load, orig_compute, orig_rank = engine.Analysis._load, engine.compute_tensor, masks.figures_and_directions

    def load(self, plan):
        t = time.perf_counter()
        r = orig_load(self, plan)
        times["reader thread: read+stage"] += time.perf_counter() - t
        return r

    def compute(*a, **k):
        t = time.perf_counter()
        r = orig_compute(*a, **k)
        times["compute_tensor incl. rank (main thread)"] += time.perf_counter() - t
        return r

    def rank(delta, known, want_directions):
        m, n = delta.shape[-2:]
        key = (f"rank on {delta.device.type} ({route((m, n), delta.device.type)}"
               f"{', with directions' if want_directions else ''})")
        t = time.perf_counter()
        r = orig_rank(delta, known, want_directions)
        times[key] += time.perf_counter() - t
        counts[key] += 1
        return r

    engine.Analysis._load, engine.compute_tensor, masks.figures_and_directions = load, compute, rank

    def report(rc, partial=False):
        stats = {"tag": args.tag, "rc": rc, "partial": partial, "wall_s": round(time.perf_counter() - t_start, 2),
                 "times_s": {k: round(v, 2) for k, v in times.items()}, "counts": dict(counts)}
        try:
            stats["peak_rss_mb"] = next(int(l.split()[1]) for l in open("/proc/self/status")
                                        if l.startswith("VmHWM:")) / 1024
        except Exception:
            pass
        if torch.cuda.is_available() and not DRY:
            stats["gpu_peak_alloc_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            stats["gpu_peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            try:
                hs = torch.cuda.host_memory_stats()
                stats["pinned_host"] = {k: v for k, v in hs.items() if "bytes" in k and ("peak" in k or "current" in k)}
            except Exception as exc:
                stats["pinned_host"] = f"n/a ({type(exc).__name__})"
        print("TIME", json.dumps(stats), flush=True)
        Path(os.environ.get("WORK", "/tmp"), f"time-{args.tag}.json").write_text(json.dumps(stats))
        t = stats["times_s"]
        rank_s = sum(v for k, v in t.items() if k.startswith("rank on"))
        row(f"analyze {args.tag}", f"{stats['wall_s']:.1f} s" if rc == 0 else f"FAILED rc {rc}", f"reader {t.get('reader thread: read+stage', 0):.1f} s, "
            f"compute {t.get('compute_tensor incl. rank (main thread)', 0):.1f} s, rank {rank_s:.1f} s; "
            f"peak RSS {stats.get('peak_rss_mb', 0):.0f} MB, GPU peak {stats.get('gpu_peak_reserved_gb', 0)} GB")

    def on_term(*_):
        report(124, partial=True)
        os._exit(124)

    signal.signal(signal.SIGTERM, on_term)
    from rlsub_tui.cli.main import main
    rc = main(args.argv)
    report(rc)
    return rc


def cmd_diffdirs(args):
    real, noise = diff_dirs(args.a, args.b)
    cols = collections.Counter((f, c) for f, _, c, *_ in noise)
    print(f"{'PASS' if not real else 'FAIL'} files {args.a} vs {args.b}: {len(real)} real differences, "
          f"{len(noise)} float-noise cells {dict(cols)}")
    for r in real[:20]:
        print("     ", r)
    row("1.5B shapes: CPU vs CUDA output files (no rank)", "identical" if not real else f"{len(real)} DIFFER",
        f"{len(noise)} float-noise cells (mean |Δ|, ‖Δ‖/‖W0‖, 1e-5 rel)")
    return 1 if real else 0


# ------------------------------------------------------------------------------------------- micro
def timed(fn, reps=1):
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        r = fn()
    sync()
    return r, (time.perf_counter() - t) / reps


def bf16_delta(m, n, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    base = (torch.randn(m, n, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    mask = torch.rand(m, n, device=dev, generator=g) < 0.3
    run = (base.float() + torch.randn(m, n, device=dev, generator=g) * 2e-4 * mask).to(torch.bfloat16)
    return run - base


def cmd_micro(args):
    from rlsub_tui.compute import kernels, masks
    from rlsub_tui.compute import rank as rk
    from rlsub_tui.records.criteria import Criterion
    dev = "cpu" if DRY else "cuda"
    # (a) rank routes
    rk.update_rank(bf16_delta(64, 64, dev))  # warm-up: cuBLAS/cuSOLVER handles, lazy modules
    if dev == "cuda":
        torch.linalg.svdvals(torch.randn(64, 64, device=dev), driver="gesvd")
        torch.linalg.svdvals(torch.randn(64, 64, device=dev), driver="gesvdj")
    sizes = [(96, 96), (256, 64)] if DRY else [(1536, 1536), (8960, 1536), (3584, 3584)]  # slowest last
    for m, n in sizes:
        d = bf16_delta(m, n, dev)
        EPS = rk.EPS32

        def gram_rank():
            eig = torch.linalg.eigvalsh(rk.gram(d))
            top = float(eig[-1])
            return 0 if top <= 0 else int((eig > top * (max(m, n) * EPS) ** 2).sum())

        res = {}
        res["update_rank (as shipped)"] = timed(lambda: rk.update_rank(d))
        res["gram+eigvalsh fp64"] = timed(gram_rank)
        if dev == "cuda":
            for drv in ("gesvd", "gesvdj"):
                def sv(drv=drv):
                    s = torch.linalg.svdvals(d.float(), driver=drv)
                    return int((s > s.max() * max(m, n) * EPS).sum())
                try:
                    res[f"svdvals {drv}"] = timed(sv)
                except Exception as exc:
                    print(f"WARN svdvals {drv} {m}x{n}: {type(exc).__name__}: {str(exc)[:120]}")
        if m * n <= 1536 * 1536 or DRY:
            dc = d.cpu()
            res["cpu matrix_rank"] = timed(lambda: int(torch.linalg.matrix_rank(dc.float())))
        ranks = {k: v[0] for k, v in res.items()}
        agree = len(set(ranks.values())) == 1
        row(f"rank {m}x{n}: shipped / gram fp64 / gesvd / gesvdj / cpu", " / ".join(
            f"{res[k][1] * 1000:.0f}" if k in res else "-" for k in ("update_rank (as shipped)", "gram+eigvalsh fp64",
                                                                    "svdvals gesvd", "svdvals gesvdj", "cpu matrix_rank")) + " ms",
            "ranks agree" if agree else f"RANKS DIFFER {ranks}")
        print(f"TIME rank {m}x{n} (route as shipped: {route((m, n))}): "
              + ", ".join(f"{k} {v[1] * 1000:.0f} ms" for k, v in res.items())
              + f"; ranks {'agree' if agree else 'DIFFER ' + str(ranks)}")
    # (b) compute_tensor chunk size, syncs and launches, on the embedding
    V, H = (4096, 256) if DRY else (151936, 1536)
    g = torch.Generator(device=dev).manual_seed(1)
    base = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(torch.bfloat16)
    runs = [(base.float() + torch.randn(V, H, device=dev, generator=g) * 2e-4
             * (torch.rand(V, H, device=dev, generator=g) < 0.3)).to(torch.bfloat16) for _ in range(3)]
    crit = Criterion("atol", 1e-5)
    default = kernels.CUDA_CHUNK_ELEMENTS if dev == 'cuda' else kernels.CHUNK_ELEMENTS
    attr = 'CUDA_CHUNK_ELEMENTS' if dev == 'cuda' else 'CHUNK_ELEMENTS'
    ref = None
    for chunk in (1 << 22, 1 << 24, 1 << 26):
        setattr(kernels, attr, chunk)
        comp, dt = timed(lambda: masks.compute_tensor(base, runs, crit, (1e-8, 1e-6), want_rank=False))
        same = ref is None or (comp.runs[0].updated == ref.runs[0].updated and comp.agreement == ref.agreement
                               and comp.both == ref.both and comp.magnitude_numel == ref.magnitude_numel
                               and [r.magnitude_updated for r in comp.runs] == [r.magnitude_updated for r in ref.runs])
        ref = ref or comp
        row(f"compute_tensor {V}x{H} bf16 K=3, chunk 2^{chunk.bit_length() - 1}", f"{dt * 1000:.0f} ms",
            f"{base.numel() * 2 * 4 / dt / 1e9:.1f} GB/s of bf16 input" + ("" if same else "; RESULTS DIFFER"))
        print(f"TIME compute_tensor {V}x{H} bf16 K=3 sweep 2, chunk 2^{chunk.bit_length() - 1}: {dt * 1000:.0f} ms"
              f" ({base.numel() * 2 * 4 / dt / 1e9:.1f} GB/s of bf16 input){'' if same else ' RESULTS DIFFER from default chunk'}")
    setattr(kernels, attr, default)
    if dev == "cuda":
        from torch.profiler import ProfilerActivity, profile
        nchunks = -(-base.numel() // default)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            masks.compute_tensor(base, runs, crit, (1e-8, 1e-6), want_rank=False)
        c = collections.Counter(e.name for e in p.events())
        syncs = sum(v for k, v in c.items() if "Synchronize" in k)
        launches = sum(v for k, v in c.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        memcpy = sum(v for k, v in c.items() if k.startswith("cudaMemcpy"))
        print(f"INFO per chunk of 2^{default.bit_length() - 1} elements ({nchunks} chunks, K=3, sweep 2): "
              f"{syncs / nchunks:.1f} host syncs, {launches / nchunks:.1f} kernel launches, {memcpy / nchunks:.1f} memcpys")
    # (c) H2D staging of the embedding for base + 3 runs, as engine._load does it and alternatives
    if dev == "cuda":
        cpu_ts = [t.cpu() for t in [base] + runs]
        del runs
        torch.cuda.empty_cache()

        def pin_path():
            return [t.pin_memory().to(dev, non_blocking=True) for t in cpu_ts]

        def pageable_path():
            return [t.to(dev) for t in cpu_ts]

        _, t1 = timed(pin_path)
        _, t2 = timed(pin_path)
        _, t3 = timed(pageable_path)
        mb = sum(t.numel() * 2 for t in cpu_ts) / 2**20
        try:
            hs = {k: v for k, v in torch.cuda.host_memory_stats().items() if "bytes" in k}
        except Exception as exc:
            hs = f"n/a ({type(exc).__name__})"
        row(f"H2D {mb:.0f} MiB: pin_memory() first / again / pageable", f"{t1 * 1000:.0f} / {t2 * 1000:.0f} / {t3 * 1000:.0f} ms",
            "the engine no longer pins per tensor (fixed staging slices)")
        print(f"TIME H2D {mb:.0f} MiB (4x embedding): pin_memory()+non_blocking first {t1 * 1000:.0f} ms, "
              f"again {t2 * 1000:.0f} ms; pageable .to() {t3 * 1000:.0f} ms; pinned cache {hs}")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("compare"); s.add_argument("--work", required=True)
    s = sub.add_parser("ui"); s.add_argument("--work", required=True)
    s = sub.add_parser("gen"); s.add_argument("--root", required=True); s.add_argument("--layers", type=int, default=28)
    s.add_argument("--k", type=int, default=3)
    s = sub.add_parser("timed"); s.add_argument("--tag", required=True); s.add_argument("argv", nargs=argparse.REMAINDER)
    s = sub.add_parser("diffdirs"); s.add_argument("a"); s.add_argument("b")
    sub.add_parser("micro")
    s = sub.add_parser("table"); s.add_argument("--work", required=True)
    args = p.parse_args()
    if args.cmd == "timed" and args.argv and args.argv[0] == "--":
        args.argv = args.argv[1:]
    return {"compare": cmd_compare, "ui": cmd_ui, "gen": cmd_gen, "timed": cmd_timed,
            "diffdirs": cmd_diffdirs, "micro": cmd_micro, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
PYEOF

# ------------------------------------------------------------------------------------------- steps
step env 60 bash -c "nvidia-smi || true; $PY -c 'import torch, rlsub_tui; print(\"INFO torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available(), torch.cuda.device_count(), torch.cuda.get_device_name() if torch.cuda.is_available() else \"-\", \"linalg\", torch.backends.cuda.preferred_linalg_library())'"

if [ -z "${DRY_CPU:-}" ]; then
  step tests 150 bash -c "$PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py; rc=\$?; echo RESULT test_gpu rc=\$rc; echo \"ROW | tests/test_gpu.py | \$(grep -E '(passed|failed)' $OUT/tests.log | tail -n 1) | rc \$rc |\""
  if [ -f "$OUT/tests.log" ] && grep -qiE '[0-9]+ skipped|SKIPPED' "$OUT/tests.log"; then log "FAIL tests/test_gpu.py was SKIPPED: torch sees no CUDA GPU"; fi
fi

step compare 240 $PY "$CHECK" compare --work "$WORK"
step ui 150 $PY "$CHECK" ui --work "$WORK"

Q="$WORK/q15"
QRUNS="$Q/base $Q/run0 $Q/run1 $Q/run2"
step qwen 150 $PY "$CHECK" gen --root "$Q" --layers "$LAYERS" --k 3
if [ -f "$Q/run2/model.safetensors" ]; then
  step cuda_norank 120 $PY "$CHECK" timed --tag cuda-no-rank -- analyze $QRUNS --out "$WORK/q-out/cuda-norank" --quiet --no-cache --no-rank --device $GPU
  step rank 240 $PY "$CHECK" timed --tag cuda-rank -- analyze $QRUNS --out "$WORK/q-out/cuda-rank" --quiet --no-cache --no-subspaces --device $GPU
  step cpu 150 $PY "$CHECK" timed --tag cpu-no-rank -- analyze $QRUNS --out "$WORK/q-out/cpu-norank" --quiet --no-cache --no-rank --device cpu
  if [ -f "$WORK/q-out/cpu-norank/summary.json" ] && [ -f "$WORK/q-out/cuda-norank/summary.json" ]; then
    step qdiff 60 $PY "$CHECK" diffdirs "$WORK/q-out/cpu-norank" "$WORK/q-out/cuda-norank"
  fi
  # the subspace overlaps' added cost: the analysis with rank again, with them (their default)
  step subspaces 240 $PY "$CHECK" timed --tag cuda-rank-subspaces -- analyze $QRUNS --out "$WORK/q-out/cuda-rank-sub" --quiet --no-cache --device $GPU
fi
step micro 150 $PY "$CHECK" micro

if [ -z "${DRY_CPU:-}" ]; then
  # device auto -> every engine/UI test that does not pin the CPU runs on CUDA here
  step suite 240 bash -c "$PY -m pytest -q -p no:cacheprovider -rs --ignore=tests/test_gpu.py; rc=\$?; echo RESULT suite rc=\$rc; echo \"ROW | the whole suite on the GPU box | \$(grep -E '(passed|failed)' $OUT/suite.log | tail -n 1) | rc \$rc |\""
fi
$PY "$CHECK" table --work "$WORK" > "$OUT/table.log" 2>&1 || echo "FAIL deriving the target rows (see table.log)" >> "$SUMMARY"
cat "$OUT/table.log" >> "$SUMMARY"
{ echo "| check | result | notes |"; echo "|---|---|---|"; grep '^ROW' "$SUMMARY" | sed 's/^ROW //'; } > "$OUT/table.md"
log "done; table in $OUT/table.md, full logs in $OUT, scratch (checkpoints, outputs) in $WORK"
fails=$(grep -c '^FAIL' "$SUMMARY")
echo "FAIL lines: $fails" | tee -a "$SUMMARY"
[ "$fails" -eq 0 ]  # the exit status says whether every check passed
