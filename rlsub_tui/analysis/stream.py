"""The one entry point of an analysis: reopen it from the cache or compute it, as a stream of events.

The CLI (`analyze`) and the explorer's worker are its callers. Each consumer owns the AnalysisResult an
`Opened` event hands it and adds the tensors of each `Progress` to it; the core never writes into that
object again. No torch at import: a finished analysis reopens from the cache without it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

from rlsub_tui.compute.cache import reopen
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.records.events import Computed, Event, Finished, Opened, Progress, TimelineDone, TimelineStep
from rlsub_tui.records.results import AnalysisResult

if TYPE_CHECKING:
    from rlsub_tui.checkpoints.step_folders import Timeline
    from rlsub_tui.compute.timeline import TimelineAnalysis


def analyse(base: str, runs: list[str], options: AnalysisOptions, timelines: dict[int, "Timeline"] | None = None,
            step_gap: int = 1, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Event]:
    """Opened, one Progress per tensor (cached ones first), the timeline pass when `timelines` (run index ->
    Timeline) are given and the runs finished, then Finished. Raises InputError on bad input, before
    anything is computed. Stops early, keeping what is done, when cancelled() turns true."""
    cached = reopen(base, runs, options)
    if cached is not None:  # a finished analysis of exactly this: no torch needed at all (unless timelines)
        yield from reopened(cached, base, timelines, options, step_gap, cancelled)
        return
    from rlsub_tui.compute.engine import Analysis  # imports torch: a second or so

    analysis = Analysis(base, runs, options)
    steps = None
    try:
        # opened (and checked: step checkpoints must agree) before anything is computed
        steps = open_timelines(base, timelines, analysis.result.run_labels, options, step_gap)
        yield Opened(analysis.result.opening(), analysis.bytes_total)
        notes_before = len(analysis.result.notes)
        yield from analysis.run(cancelled)
        complete = analysis.result.complete and not cancelled()
        if complete and steps is not None:
            yield from _timeline_pass(steps, cancelled)
        yield Finished(complete, analysis.result.notes[notes_before:])
    finally:
        analysis.close()
        if steps is not None:
            steps.close()


def reopened(cached: AnalysisResult, base: str, timelines, options: AnalysisOptions, step_gap: int,
              cancelled: Callable[[], bool]) -> Iterator[Event]:
    """The same events for an analysis the cache holds whole: every tensor at once, then any timeline pass."""
    steps = open_timelines(base, timelines, cached.run_labels, options, step_gap)
    try:
        yield Opened(cached.opening(), 0)
        n = len(cached.planned)
        for i, name in enumerate(cached.planned, 1):
            yield Progress(i, n, 0, 0, 0.0, cached.tensors[name], True)
        if steps is not None:
            yield from _timeline_pass(steps, cancelled)
        yield Finished(not cancelled())
    finally:
        if steps is not None:
            steps.close()


def open_timelines(base: str, timelines: dict[int, "Timeline"] | None, labels: list[str],
                   options: AnalysisOptions, step_gap: int) -> "TimelineAnalysis | None":
    """The timeline pass's checkpoints, opened from headers (None without timelines); raises InputError."""
    if not timelines:
        return None
    from rlsub_tui.compute.timeline import TimelineAnalysis

    named = [(labels[i], t) for i, t in sorted(timelines.items())]
    return TimelineAnalysis(base, named, options.criterion, step_gap, options.compare_dtype)


def _timeline_pass(steps: "TimelineAnalysis", cancelled: Callable[[], bool]) -> Iterator[Event]:
    done = 0
    for progress in steps.stream(cancelled):
        done = progress.done
        yield TimelineStep(progress)
    if done == len(steps.plans):
        yield TimelineDone(steps.result)


def batched(events: Iterator[Event], seconds: float) -> Iterator[Event]:
    """The same stream with Progress events gathered into one Computed at most every `seconds` (a UI redraws
    far less often than tensors finish); every other event passes through, after the batch before it."""
    batch: list[Progress] = []
    last = time.monotonic()
    for event in events:
        if isinstance(event, Progress):
            batch.append(event)
            if time.monotonic() - last < seconds:
                continue
            event = None
        if batch:
            yield Computed([p.result for p in batch], batch[-1])
            batch, last = [], time.monotonic()
        if event is not None:
            yield event
    if batch:
        yield Computed([p.result for p in batch], batch[-1])
