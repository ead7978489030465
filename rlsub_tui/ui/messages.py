"""Messages from the analysis worker to the app: the worker never touches widgets."""

from __future__ import annotations

from dataclasses import dataclass, field

from textual.message import Message

from rlsub_tui.records.results import AnalysisResult, TensorResult


@dataclass
class TreePreview(Message):
    """Tensor names read from the base's header alone, before torch is even imported."""

    names: list[str]
    label: str
    generation: int


@dataclass
class AnalysisOpened(Message):
    """Headers read and tensors matched: enough to draw the tree before any tensor is read."""

    result: AnalysisResult
    bytes_total: int
    generation: int


@dataclass
class TensorsComputed(Message):
    """A batch of finished tensors and where the computation stands."""

    results: list[TensorResult]
    done: int
    total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    generation: int


@dataclass
class AnalysisFinished(Message):
    complete: bool
    generation: int
    notes: list[str] = field(default_factory=list)  # notes the analysis added at its end


@dataclass
class AnalysisFailed(Message):
    error: str
    generation: int


@dataclass
class TimelineProgress(Message):
    """The timeline pass (after the runs) has done `done` of `total` tensors."""

    done: int
    total: int
    generation: int


@dataclass
class TimelineComputed(Message):
    """Every step of every timeline run (a timeline.TimelineResult)."""

    timeline: object
    generation: int


@dataclass
class DetailReady(Message):
    """A tensor's mask map and Δ histogram, computed on demand (key: what it was computed for)."""

    key: tuple
    detail: object  # rlsub_tui.compute.matrix_detail.MatrixDetail


@dataclass
class DetailFailed(Message):
    key: tuple
    error: str
