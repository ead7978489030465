"""Command line: `rlsub-tui analyze ...` writes results; `rlsub-tui [BASE RUN ...]` opens the explorer."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from rlsub_tui.errors import InputError

USAGE_EXPLORE = "rlsub-tui [BASE RUN [RUN ...]] [options]   (no arguments: the bundled sample)"
USAGE_ANALYZE = "rlsub-tui analyze BASE RUN [RUN ...] --out DIR [options]"


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"'{text}' must be a finite number >= 0")
    return value


def _sweep(text: str) -> tuple[float, ...]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give tolerances separated by commas, e.g. 1e-8,1e-7,1e-6,1e-5")
    return tuple(sorted(_float(p.strip()) for p in parts))


def _group(text: str) -> tuple[str, str]:
    from rlsub_tui.groups import parse_group

    try:
        return parse_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_group_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", type=_group, action="append", default=None, metavar="NAME=GLOB",
                   help="a run group (repeatable): runs whose label matches GLOB; default: runs whose labels "
                        "differ only by a trailing seed number (grpo-lowlr-seed1..3 -> grpo-lowlr)")


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what counts as updated")
    g.add_argument("--criterion", choices=["atol", "exact", "relative"], default="atol",
                   help="atol: |Δ| > tolerance in the stored dtype (paper default); exact: stored values differ; "
                        "relative: |Δ| > eta·max(|w0|,|w1|)")
    g.add_argument("--tolerance", type=_float, default=1e-5, help="atol tolerance (default 1e-5)")
    g.add_argument("--eta", type=_float, default=1e-3, help="relative threshold (default 1e-3)")
    g.add_argument("--sweep", type=_sweep, default=(), metavar="T1,T2,...",
                   help="also report sparsity at each of these atol tolerances, in the same pass")
    c = p.add_argument_group("computation")
    c.add_argument("--device", default="auto", help="auto (GPU if torch sees one), cpu, cuda or cuda:N")
    c.add_argument("--no-rank", action="store_true", help="skip the update-rank computation")
    c.add_argument("--common-rows", action="store_true",
                   help="compare tensors whose first dimension differs (resized vocab) on the rows they share")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the result cache")


def analysis_options(args):
    from rlsub_tui.criteria import AnalysisOptions, Criterion

    value = args.tolerance if args.criterion == "atol" else args.eta if args.criterion == "relative" else 0.0
    return AnalysisOptions(criterion=Criterion(args.criterion, value), sweep=tuple(args.sweep),
                           rank=not args.no_rank, device=args.device, common_rows=args.common_rows,
                           use_cache=not args.no_cache)


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui analyze", usage=USAGE_ANALYZE,
                                description="Compare a base checkpoint with K fine-tuned runs and write "
                                            "matrices.csv, pairs.csv, agreement.csv, groups.csv, summary.json.")
    p.add_argument("base", help="base checkpoint: model directory, .safetensors/.bin file, or cached model id")
    p.add_argument("runs", nargs="+", metavar="RUN", help="fine-tuned checkpoint, optionally NAME=PATH")
    p.add_argument("--out", required=True, type=Path, help="directory for the output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_group_option(p)
    add_analysis_options(p)
    return p


def explore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui", usage=USAGE_EXPLORE,
                                description="Explore which parameters RL fine-tuning runs updated. "
                                            "Subcommand: 'analyze' (no UI, writes CSV/JSON).")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="BASE then RUN ... (NAME=PATH to label a run); none: the bundled sample")
    p.add_argument("--export-dir", type=Path, default=None, help="where 'e' writes CSVs (default: current directory)")
    p.add_argument("--runs", default=None, metavar="SEL",
                   help="runs the pooled figures use at start: numbers (1,3 or 1-3), labels or globs "
                        "(grpo-lowlr-*), comma separated; r changes it in the explorer")
    add_group_option(p)
    add_analysis_options(p)
    return p


class ProgressLine:
    """A progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.last = 0.0

    def update(self, p, final=False) -> None:
        from rlsub_tui.formatting import duration, size

        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        frac = p.done / p.total if p.total else 1.0
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        rate = p.bytes_done / p.elapsed if p.elapsed > 0 else 0.0
        left = (p.bytes_total - p.bytes_done) / rate if rate > 0 else float("nan")
        self.stream.write(f"\r[{bar}] {p.done}/{p.total} tensors  {size(rate)}/s  left {duration(left)}   ")
        if final:
            self.stream.write("\n")
        self.stream.flush()


def run_analyze(argv: list[str]) -> int:
    from rlsub_tui.engine import Analysis
    from rlsub_tui.export import write_outputs
    from rlsub_tui.groups import resolve_groups
    from rlsub_tui.report import summary_text
    from rlsub_tui.selection import run_labels

    args = analyze_parser().parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a directory.")
    resolve_groups(args.group, run_labels(args.runs))  # a bad --group is refused before any tensor is read
    analysis = Analysis(args.base, args.runs, analysis_options(args))
    try:
        for k in analysis.result.skipped:
            print(f"rlsub-tui: warning: skipped {k.tensor} [{k.run}]: {k.reason}", file=sys.stderr)
        for note in analysis.result.notes:
            print(f"rlsub-tui: note: {note}", file=sys.stderr)
        bar = None if args.quiet else ProgressLine()
        last = None
        for last in analysis.run():
            if bar:
                bar.update(last)
        if bar and last is not None:
            bar.update(last, final=True)
        result = analysis.result
    finally:
        analysis.close()
    for name, r in result.tensors.items():
        for n in r.notes:
            print(f"rlsub-tui: note: {name}: {n}", file=sys.stderr)
        if any(s.nonfinite for s in r.runs):
            counts = ", ".join(f"{lbl} {s.nonfinite}" for lbl, s in zip(result.run_labels, r.runs) if s.nonfinite)
            print(f"rlsub-tui: warning: {name}: NaN/Inf values counted as updated ({counts})", file=sys.stderr)
    write_outputs(result, args.out, resolve_groups(args.group, result.run_labels))
    print(summary_text(result))
    print(f"\nwrote {args.out.resolve()}/{{matrices,pairs,agreement,groups}}.csv and summary.json")
    return 0


def explorer_config(argv: list[str]):
    """The explorer's configuration from its arguments; bad arguments are refused here (InputError)."""
    args = explore_parser().parse_args(argv)
    if len(args.checkpoints) == 1:
        raise InputError(f"{args.checkpoints[0]}: a base needs at least one run to compare with.")
    options = analysis_options(args)
    from rlsub_tui.ui.app import ExplorerConfig
    from rlsub_tui.sample_paths import sample_checkpoints

    if args.checkpoints:
        base, runs = args.checkpoints[0], args.checkpoints[1:]
    else:
        base, runs = sample_checkpoints()
    from rlsub_tui.groups import resolve_groups
    from rlsub_tui.selection import parse_runs, run_labels

    if args.runs is not None:
        parse_runs(args.runs, run_labels(runs))  # a bad selection is refused before the UI starts
    resolve_groups(args.group, run_labels(runs))
    export_dir = (args.export_dir or Path.cwd()).expanduser().resolve()
    return ExplorerConfig(base=base, runs=runs, options=options, export_dir=export_dir,
                          run_selection=args.runs, group_specs=args.group)


def run_explore(argv: list[str]) -> int:
    from rlsub_tui.ui.app import ExplorerApp

    app = ExplorerApp(explorer_config(argv))
    app.run()
    return app.return_code or 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "analyze":
            return run_analyze(argv[1:])
        if argv and argv[0] == "serve":
            from rlsub_tui.serve import run_serve

            return run_serve(argv[1:], explorer_config)
        return run_explore(argv)
    except InputError as exc:
        print(f"rlsub-tui: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nrlsub-tui: interrupted; no output written.", file=sys.stderr)
        return 130
    except MemoryError:
        print("rlsub-tui: error: out of memory while reading a tensor; try --device cpu or fewer runs.",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"rlsub-tui: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # pragma: no cover - the last guard against a traceback
        if os.environ.get("RLSUB_TUI_DEBUG"):
            raise
        print(f"rlsub-tui: internal error: {type(exc).__name__}: {exc} (set RLSUB_TUI_DEBUG=1 for details)",
              file=sys.stderr)
        return 1
