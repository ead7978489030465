"""What an analysis reports as it goes: the events of its stream, plain data that crosses process boundaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Union

from rlsub_tui.records.results import AnalysisResult, TensorResult

if TYPE_CHECKING:
    from rlsub_tui.records.timelines import TimelineResult


@dataclass
class Opened:
    """The checkpoints are open and matched: what will be compared (no tensors yet), owned by the consumer."""

    result: AnalysisResult
    bytes_total: int


@dataclass
class Progress:
    """One finished tensor (or, in the other passes, one step of them): done out of total, bytes read."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    result: TensorResult | None
    cached: bool


@dataclass
class Computed:
    """Several finished tensors at once (see `batched`), with the progress after the last of them."""

    results: list[TensorResult]
    progress: Progress


@dataclass
class TimelineStep:
    """The timeline pass finished one more tensor."""

    progress: Progress


@dataclass
class TimelineDone:
    timeline: "TimelineResult"


@dataclass
class Finished:
    """The stream's last event: whether every planned tensor was computed, and notes added at the end."""

    complete: bool
    notes: list[str] = field(default_factory=list)


Event = Union[Opened, Progress, Computed, TimelineStep, TimelineDone, Finished]
