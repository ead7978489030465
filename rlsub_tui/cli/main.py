"""Command line: `rlsub-tui analyze ...` writes results; `rlsub-tui [BASE RUN ...]` opens the explorer."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rlsub_tui import __version__
from rlsub_tui.util.errors import ComputeError, InputError

USAGE_EXPLORE = "rlsub-tui [BASE RUN [RUN ...]] [options]   (no arguments: the bundled sample)"
USAGE_ANALYZE = "rlsub-tui analyze BASE RUN [RUN ...] --out DIR [options]"
USAGE_TRANSPLANT = ("rlsub-tui transplant BASE RUN --mask FILE.safetensors --out DIR [--mask-run NAME] "
                    "[--random-control SEED [--control-out DIR]] [--force]")
USAGE_MASKS = "rlsub-tui masks BASE RUN [RUN ...] --out FILE.safetensors [--min-runs J | --per-run] [options]"


def _float(text: str) -> float:
    from rlsub_tui.records.criteria import parse_tolerance

    try:
        return parse_tolerance(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sweep(text: str) -> tuple[float, ...]:
    from rlsub_tui.records.criteria import parse_sweep

    if not text.replace(",", "").strip():
        raise argparse.ArgumentTypeError("give tolerances separated by commas, e.g. 1e-8,1e-7,1e-6,1e-5")
    try:
        return parse_sweep(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _group(text: str) -> tuple[str, str]:
    from rlsub_tui.summaries.groups import parse_group

    try:
        return parse_group(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_group_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group", type=_group, action="append", default=None, metavar="NAME=GLOB",
                   help="a run group (repeatable): runs whose label matches GLOB; default: runs whose labels "
                        "differ only by a trailing seed number (grpo-lowlr-seed1..3 -> grpo-lowlr)")


def add_criterion_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("what counts as updated (defaults: the paper's atol, tolerance 1e-5)")
    g.add_argument("--criterion", choices=["atol", "exact", "relative"], default="atol",
                   help="atol: |Δ| > tolerance in the pair's comparison dtype (the paper's; the default); exact: "
                        "the values differ; relative: |Δ| > eta·max(|w0|,|w1|)")
    g.add_argument("--tolerance", type=_float, default=1e-5, help="the atol tolerance (default 1e-5)")
    g.add_argument("--eta", type=_float, default=1e-3, help="the relative criterion's η (default 1e-3)")
    return g


def add_analysis_options(p: argparse.ArgumentParser) -> None:
    from rlsub_tui.records.criteria import DEFAULT_SWEEP

    sweep_default = ",".join(f"{t:g}" for t in DEFAULT_SWEEP) if DEFAULT_SWEEP else "none (no sweep)"
    g = add_criterion_options(p)
    g.add_argument("--sweep", type=_sweep, default=DEFAULT_SWEEP, metavar="T1,T2,...|none",
                   help="also report sparsity at each of these atol tolerances, in the same pass "
                        f"(default {sweep_default}; 'none' turns it off)")
    g.add_argument("--compare-dtype", choices=["stored", "bf16", "fp16", "fp32"], default="stored",
                   help="dtype each run is compared with the base in; stored (default): the less precise of "
                        "that pair; bf16 reproduces the paper's script, which loads everything in bf16")
    c = p.add_argument_group("computation")
    c.add_argument("--device", default="auto", help="auto (GPU if torch sees one; the default), cpu, cuda or cuda:N")
    c.add_argument("--no-rank", action="store_true", help="skip the update-rank computation (default: computed)")
    c.add_argument("--no-subspaces", action="store_true",
                   help="skip the subspace overlaps of the runs' top singular directions (default: computed with "
                        "the rank; off with --no-rank)")
    c.add_argument("--common-rows", action="store_true",
                   help="compare tensors whose first dimension differs (resized vocab) on the rows they share")
    c.add_argument("--no-cache", action="store_true", help="neither read nor write the result cache")


def criterion_option(args):
    from rlsub_tui.records.criteria import Criterion

    value = args.tolerance if args.criterion == "atol" else args.eta if args.criterion == "relative" else 0.0
    return Criterion(args.criterion, value)


def analysis_options(args):
    from rlsub_tui.records.criteria import AnalysisOptions

    return AnalysisOptions(criterion=criterion_option(args), sweep=tuple(args.sweep),
                           rank=not args.no_rank, subspaces=not getattr(args, "no_subspaces", False),
                           device=args.device, common_rows=args.common_rows,
                           use_cache=not args.no_cache, compare_dtype=args.compare_dtype,
                           workers=getattr(args, "workers", 1))


def analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui analyze", usage=USAGE_ANALYZE,
                                description="Compare a base checkpoint with K fine-tuned runs and write "
                                            "matrices.csv, pairs.csv, agreement.csv, groups.csv, summary.json.")
    p.add_argument("base", help="base checkpoint: model directory, .safetensors/.bin file, or cached model id")
    p.add_argument("runs", nargs="+", metavar="RUN", help="fine-tuned checkpoint, optionally NAME=PATH")
    p.add_argument("--out", required=True, type=Path, help="directory for the output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--step-gap", type=int, default=1, metavar="K",
                   help="for a timeline RUN (a folder of checkpoint-N ...), compare each step with the one K "
                        "checkpoints before (default 1)")
    p.add_argument("--version", action="version", version=f"rlsub-tui {__version__}")
    add_group_option(p)
    add_analysis_options(p)
    from rlsub_tui.compute.workers import default_workers

    p.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                   help="on the CPU, compute N tensors at once in N processes; the numbers do not change "
                        f"(default: one per core, at most 4: {default_workers()} here)")
    return p


def masks_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui masks", usage=USAGE_MASKS,
                                description="Write which parameters the runs updated, per tensor, as bool tensors "
                                            "of the base's shape in one safetensors file.")
    p.add_argument("base", help="base checkpoint: model directory, .safetensors/.bin file, or cached model id")
    p.add_argument("runs", nargs="+", metavar="RUN", help="fine-tuned checkpoint, optionally NAME=PATH")
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--min-runs", type=int, default=None, metavar="J",
                   help="true where at least J of the K runs updated the parameter (default K: the consensus)")
    p.add_argument("--per-run", action="store_true", help="one mask per run, keyed RUN/TENSOR")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_criterion_options(p)
    return p


def transplant_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui transplant", usage=USAGE_TRANSPLANT,
                                description="Write θ0 + M ⊙ Δ: the base with the run's values where the mask is "
                                            "true, as a checkpoint in the run's layout and dtype.")
    p.add_argument("base", help="base checkpoint the mask was made from")
    p.add_argument("run", help="fine-tuned checkpoint whose update is transplanted")
    p.add_argument("--mask", required=True, type=Path, help="mask file written by 'rlsub-tui masks'")
    p.add_argument("--mask-run", default=None, metavar="NAME", help="which run's mask, in a --per-run mask file")
    p.add_argument("--out", required=True, type=Path, help="directory for the transplanted checkpoint")
    p.add_argument("--random-control", type=int, default=None, metavar="SEED",
                   help="also write a control: per tensor as many true entries as the mask, drawn uniformly")
    p.add_argument("--control-out", type=Path, default=None, metavar="DIR",
                   help="directory for the control (default: OUT-randomSEED)")
    p.add_argument("--force", action="store_true", help="replace an earlier transplant in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def explore_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlsub-tui", usage=USAGE_EXPLORE,
                                description="Explore which parameters RL fine-tuning runs updated. "
                                            "Subcommand: 'analyze' (no UI, writes CSV/JSON).")
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT",
                   help="BASE then RUN ... (NAME=PATH to label a run); none: the bundled sample")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="where 'e' (the table) and 'x' (the chart's data) write their CSV files, each with a "
                        ".json beside it saying what it shows (default: the current directory)")
    p.add_argument("--step-gap", type=int, default=1, metavar="K",
                   help="timeline chart: compare each step with the one K checkpoints before (default 1)")
    p.add_argument("--version", action="version", version=f"rlsub-tui {__version__}")
    p.add_argument("--runs", default=None, metavar="SEL",
                   help="runs the pooled figures use at start: numbers (1,3 or 1-3), labels or globs "
                        "(grpo-lowlr-*), comma separated; r changes it in the explorer")
    add_group_option(p)
    add_analysis_options(p)
    return p


class ProgressLine:
    """The progress bar on stderr (rich.progress): tensors done, bytes read per second and the time left."""

    def __init__(self, label: str = "", unit: str = "tensors"):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn(label), BarColumn(bar_width=24), MofNCompleteColumn(), TextColumn(unit),
                            TextColumn("{task.fields[speed]}"),
                            console=Console(file=sys.stderr), refresh_per_second=10)
        self.task = None

    def update(self, p) -> None:
        from rlsub_tui.util.formatting import duration, size

        rate = p.bytes_done / p.elapsed if p.elapsed > 0 else 0.0
        left = (p.bytes_total - p.bytes_done) / rate if rate > 0 else float("nan")
        speed = "from the cache" if p.cached else f"{size(rate)}/s  left {duration(left)}"
        if self.task is None:
            self.bar.start()
            self.task = self.bar.add_task("", total=p.total, speed="")
        self.bar.update(self.task, completed=p.done, total=p.total, speed=speed)

    def close(self) -> None:
        """Draw the bar a last time and end its line."""
        if self.task is not None:
            self.bar.stop()


# Each pass's bar: what it compares, and the unit of its count (every run, or every step, of one tensor at a time)
PASSES = {"runs": ("runs vs base", "tensors"), "timeline": ("timeline steps vs base, prev", "tensors")}


class Bars:
    """One progress bar per pass (the runs, then the timeline) on stderr, labelled, or none with --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.kind: str | None = None
        self.bar: ProgressLine | None = None

    def show(self, kind: str, p) -> None:
        if self.quiet:
            return
        if kind != self.kind:  # a new pass: end the last one's line
            self.close()
            self.kind, self.bar = kind, ProgressLine(*PASSES.get(kind, ("", "tensors")))
        self.bar.update(p)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run_analyze(argv: list[str]) -> int:
    from rlsub_tui.checkpoints.kinship import distance_warnings
    from rlsub_tui.cli.report import summary_text
    from rlsub_tui.export.outputs import write_outputs
    from rlsub_tui.summaries.groups import resolve_groups

    args = analyze_parser().parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out}: exists and is not a directory.")
    if args.step_gap < 1:
        raise InputError(f"--step-gap {args.step_gap}: must be 1 or more.")
    result, timeline = _analysis(args)
    for warning in distance_warnings(result):
        result.notes.append(warning)
        print(f"rlsub-tui: warning: {warning}", file=sys.stderr)
    for name, r in result.tensors.items():
        for n in r.notes:
            print(f"rlsub-tui: note: {name}: {n}", file=sys.stderr)
        if any(s.nonfinite for s in r.runs):
            counts = ", ".join(f"{lbl} {s.nonfinite}" for lbl, s in zip(result.run_labels, r.runs) if s.nonfinite)
            print(f"rlsub-tui: warning: {name}: NaN/Inf values counted as updated ({counts})", file=sys.stderr)
    write_outputs(result, args.out, timeline, resolve_groups(args.group, result.run_labels))
    print(summary_text(result))
    if timeline is not None:
        from rlsub_tui.cli.report import timeline_text
        from rlsub_tui.export.outputs import timeline_summary

        print(timeline_text(timeline_summary(timeline)))
    names = "matrices,pairs,agreement,groups" + (",timeline" if timeline else "")
    print(f"\nwrote {args.out.resolve()}/{{{names}}}.csv and summary.json "
          "(fractions, not percent; summary.json records the criterion, sweep and paths they come from)")
    return 0


def _analysis(args):
    """The analysis and its timeline pass (None without timelines), from the one entry point, with bars."""
    from contextlib import closing

    from rlsub_tui.analysis.stream import analyse
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
    from rlsub_tui.compute.workers import start_early
    from rlsub_tui.records.events import Finished, Opened, Progress, TimelineDone, TimelineStep

    resolved = resolve_runs(args.runs)
    start_early([args.base, *resolved.paths], args.device, args.workers)  # before the engine imports torch here
    events = analyse(args.base, run_specs(resolved), analysis_options(args), resolved.timelines, args.step_gap)
    result, timeline, bars = None, None, Bars(args.quiet)
    with closing(events), closing(bars):
        for event in events:
            if isinstance(event, Opened):
                result = event.result
                _opened(args, result, resolved.timelines)
            elif isinstance(event, Progress):
                result.take([event.result])
                bars.show("runs", event)
            elif isinstance(event, TimelineStep):
                bars.show("timeline", event.progress)
            elif isinstance(event, TimelineDone):
                timeline = event.timeline
            elif isinstance(event, Finished):
                result.finish(event.complete, event.notes)
    return result, timeline


def _opened(args, result, timelines) -> None:
    """Once the checkpoints are matched, before any tensor is read: refuse a bad --group, say what is skipped."""
    from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE
    from rlsub_tui.summaries.groups import resolve_groups

    resolve_groups(args.group, result.run_labels)
    for i, t in sorted(timelines.items()):
        print(f"rlsub-tui: note: {result.run_labels[i]} is a timeline of {len(t.steps)} checkpoints (steps "
              f"{', '.join(map(str, t.steps))}); its last step stands for it in overlap and agreement",
              file=sys.stderr)
    for k in result.skipped:
        print(f"rlsub-tui: warning: skipped {k.tensor} [{k.run}]: {k.reason}", file=sys.stderr)
    for note in result.notes:
        print(f"rlsub-tui: {'warning' if NOT_A_FINE_TUNE in note else 'note'}: {note}", file=sys.stderr)


def _stream(work, quiet: bool):
    """Call work(on_progress) with a progress bar on stderr unless quiet; return what it returns."""
    bars = Bars(quiet)
    try:
        return work(lambda p: bars.show("work", p))
    finally:
        bars.close()


def run_masks(argv: list[str]) -> int:
    from rlsub_tui.compute.maskfile import write_mask_file

    args = masks_parser().parse_args(argv)
    report = _stream(lambda progress: write_mask_file(args.base, args.runs, args.out, criterion_option(args),
                                                      args.min_runs, args.per_run, args.force, progress),
                     args.quiet)
    for s in report.skipped:
        print(f"rlsub-tui: warning: no mask for {s.tensor} [{s.run}]: {s.reason}", file=sys.stderr)
    for label, true in zip(report.labels, report.true):
        what = f"run {label}" if label else f"updated by at least {report.min_runs} of {report.runs} run(s)"
        share = true / report.numel if report.numel else float("nan")
        print(f"{what}: {true} of {report.numel} parameters true (density {share:.4%})")
    print(f"wrote {args.out.resolve()}")
    return 0


def run_transplant(argv: list[str]) -> int:
    from rlsub_tui.compute.transplant import transplant

    args = transplant_parser().parse_args(argv)
    report = _stream(lambda progress: transplant(args.base, args.run, args.mask, args.out, args.mask_run,
                                                 args.random_control, args.control_out, args.force, progress),
                     args.quiet)
    for note in report.notes:
        print(f"rlsub-tui: note: {note}", file=sys.stderr)
    if report.copied:
        print(f"rlsub-tui: note: {len(report.copied)} tensors not in the mask were copied from the run "
              f"(first: {', '.join(report.copied[:3])}); listed in transplant.json", file=sys.stderr)
    print(f"masked tensors: {report.numel} parameters, of which the run changed {report.run_differs}")
    for o in report.outputs:
        print(f"{o.kind}: mask true at {o.mask_true}, differs from the base at {o.changed_from_base}; "
              f"wrote {o.path.resolve()}")
    return 0


def explorer_config(argv: list[str]):
    """The explorer's configuration from its arguments; bad arguments are refused here (InputError)."""
    args = explore_parser().parse_args(argv)
    if len(args.checkpoints) == 1:
        raise InputError(f"{args.checkpoints[0]}: a base needs at least one run to compare with.")
    options = analysis_options(args)
    from rlsub_tui.checkpoints.sample_paths import sample_checkpoints
    from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
    from rlsub_tui.ui.app import ExplorerConfig

    if args.step_gap < 1:
        raise InputError(f"--step-gap {args.step_gap}: must be 1 or more.")
    if args.checkpoints:
        base, specs = args.checkpoints[0], args.checkpoints[1:]
    else:
        base, specs = sample_checkpoints()
    from rlsub_tui.checkpoints.labels import run_labels
    from rlsub_tui.summaries.groups import resolve_groups
    from rlsub_tui.summaries.selection import parse_runs

    resolved = resolve_runs(specs)
    runs = run_specs(resolved)
    if args.runs is not None:
        parse_runs(args.runs, run_labels(runs))  # a bad selection is refused before the UI starts
    resolve_groups(args.group, run_labels(runs))
    export_dir = (args.export_dir or Path.cwd()).expanduser().resolve()
    return ExplorerConfig(base=base, runs=runs, options=options, export_dir=export_dir,
                          timelines=resolved.timelines, step_gap=args.step_gap,
                          run_selection=args.runs, group_specs=args.group, compute="process")


def run_explore(argv: list[str]) -> int:
    from rlsub_tui.ui.app import ExplorerApp

    app = ExplorerApp(explorer_config(argv))
    app.run()
    if app.failed:  # the analysis could not start: say so here too, for scripts and scrollback
        print(f"rlsub-tui: error: {app.failed}", file=sys.stderr)
    return app.return_code or 0


def _stdout_closed() -> int:
    """The reader of our stdout went away (`| head`): stop quietly, as command-line tools do.

    Output files are written before anything is printed, so they are complete. stdout is pointed at
    /dev/null so that the interpreter's last flush does not complain either.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "analyze":
            return run_analyze(argv[1:])
        if argv and argv[0] == "masks":
            return run_masks(argv[1:])
        if argv and argv[0] == "transplant":
            return run_transplant(argv[1:])
        if argv and argv[0] == "serve":
            from rlsub_tui.cli.serve import run_serve

            return run_serve(argv[1:], explorer_config)
        return run_explore(argv)
    except InputError as exc:
        print(f"rlsub-tui: error: {exc}", file=sys.stderr)
        return 2
    except ComputeError as exc:
        print(f"rlsub-tui: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return _stdout_closed()
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
