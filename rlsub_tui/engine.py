"""The streaming analysis: match tensors across a base and K runs, then read, compare and release them one at a time."""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from rlsub_tui.cache import ResultCache, analysis_key
from rlsub_tui.checkpoint import Checkpoint, open_checkpoint
from rlsub_tui.errors import InputError
from rlsub_tui.formatting import size
from rlsub_tui.criteria import AnalysisOptions, Criterion  # noqa: F401  (AnalysisOptions re-exported)
from rlsub_tui.masks import compare_dtype, compute_tensor
from rlsub_tui.locate import parse_run_spec, unique_labels  # noqa: F401  (re-exported)
from rlsub_tui.names import canonical
from rlsub_tui.results import AnalysisResult, Skipped, TensorResult
from rlsub_tui.staging import PinnedStager, ready

DTYPE_NAMES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.float8_e4m3fn: "f8_e4m3", torch.float8_e5m2: "f8_e5m2",
}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass
class TensorPlan:
    """One tensor to compare: its name in the base and in each run, and how."""

    name: str
    run_names: list[str]
    dtype: torch.dtype
    shape: tuple[int, ...]
    rows: int | None  # compare only the first `rows` rows (vocab resized, --common-rows)
    nbytes: int
    notes: list[str]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Progress:
    """One finished tensor: the engine yields these as it goes."""

    done: int
    total: int
    bytes_done: int
    bytes_total: int
    elapsed: float
    result: TensorResult
    cached: bool


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device '{device}' is not a device; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this machine has no CUDA GPU that torch can use.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present.")
        if dev.index is None:  # name the GPU: the reader thread sets it (torch.cuda.set_device needs an index)
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise InputError(f"--device '{device}' is not supported; use auto, cpu, cuda or cuda:N.")
    return dev


def plan_tensors(base: Checkpoint, runs: list[Checkpoint], common_rows: bool = False
                 ) -> tuple[list[TensorPlan], list[Skipped]]:
    """Match tensors by name (ignoring wrapper prefixes) and shape; list every one left out, and why."""
    skipped: list[Skipped] = []
    run_maps = []
    for run in runs:
        m: dict[str, str] = {}
        for name in run.tensors:
            m.setdefault(canonical(name), name)
        run_maps.append(m)
    base_keys = {canonical(n): n for n in base.tensors}
    plans = []
    for name, info in base.tensors.items():
        key = canonical(name)
        if not info.dtype.is_floating_point:
            skipped.append(Skipped(name, "*", f"not a floating-point tensor ({dtype_name(info.dtype)})"))
            continue
        run_names, reasons, dtype, rows, tnotes = [], [], info.dtype, None, []
        for run, m in zip(runs, run_maps):
            other = m.get(key)
            if other is None:
                reasons.append((run.label, "missing in this run"))
                continue
            oinfo = run.tensors[other]
            if not oinfo.dtype.is_floating_point:
                reasons.append((run.label, f"not a floating-point tensor in this run ({dtype_name(oinfo.dtype)})"))
                continue
            if oinfo.shape != info.shape:
                same_tail = len(oinfo.shape) == len(info.shape) >= 1 and oinfo.shape[1:] == info.shape[1:]
                if common_rows and same_tail:
                    r = min(oinfo.shape[0], info.shape[0])
                    rows = r if rows is None else min(rows, r)
                    tnotes.append(f"{run.label}: shape {list(oinfo.shape)} vs base {list(info.shape)}; "
                                  f"compared on the first {r} rows")
                else:
                    hint = " (use --common-rows to compare the rows they share)" if same_tail else ""
                    reasons.append((run.label, f"shape {list(oinfo.shape)} differs from base {list(info.shape)}{hint}"))
                    continue
            if oinfo.dtype != dtype:
                new = compare_dtype(dtype, oinfo.dtype)
                tnotes.append(f"{run.label}: {dtype_name(oinfo.dtype)} vs base {dtype_name(info.dtype)}; "
                              f"compared in {dtype_name(new)} (the less precise)")
                dtype = compare_dtype(new, dtype)
            run_names.append(other)
        if reasons:
            for label, reason in reasons:
                skipped.append(Skipped(name, label, reason))
            continue
        shape = info.shape if rows is None else (rows,) + info.shape[1:]
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * info.dtype.itemsize + sum(
            numel * r.tensors[n].dtype.itemsize for r, n in zip(runs, run_names))
        plans.append(TensorPlan(name, run_names, dtype, shape, rows, nbytes, tnotes))
    for run, m in zip(runs, run_maps):
        for key, name in m.items():
            if key not in base_keys:
                skipped.append(Skipped(name, run.label, "only in this run, not in the base"))
    if runs and not plans:
        raise InputError(
            f"{base.source} and the runs have no tensor in common that can be compared "
            f"({len(skipped)} tensors skipped; first: {skipped[0].tensor}: {skipped[0].reason})."
            if skipped else f"{base.source}: nothing to compare.")
    file_order = {f: i for i, f in enumerate(base.files)}
    plans.sort(key=lambda p: (file_order[base.tensors[p.name].file], base.tensors[p.name].offset))
    return plans, skipped


class Analysis:
    """A base and K runs, opened from their headers; `run()` streams through the tensors."""

    def __init__(self, base: str, runs: list[str], options: AnalysisOptions | None = None,
                 labels: list[str | None] | None = None):
        self.options = options or AnalysisOptions()
        if not runs:
            raise InputError("no runs given: name at least one fine-tuned checkpoint after the base.")
        specs = [parse_run_spec(r) for r in runs]
        if labels is None:
            labels = [name for name, _ in specs]
        paths = [path for _, path in specs]
        wanted = [lbl or Path(p.rstrip("/")).name or p for lbl, p in zip(labels, paths)]
        self.device = resolve_device(self.options.device)
        self.base = open_checkpoint(base, label=Path(base.rstrip("/")).name or base)
        self.runs = [open_checkpoint(p, label=lbl) for p, lbl in zip(paths, unique_labels(wanted))]
        self.plans, skipped = plan_tensors(self.base, self.runs, self.options.common_rows)
        notes = self._same_checkpoint_notes()
        self.result = AnalysisResult(
            base_label=self.base.label, base_path=self.base.source,
            run_labels=[r.label for r in self.runs], run_paths=[r.source for r in self.runs],
            criterion=self.options.criterion, sweep=tuple(self.options.sweep), device=str(self.device),
            skipped=skipped, notes=notes, planned=[p.name for p in self.plans],
            planned_numel={p.name: p.numel for p in self.plans})
        self.cache = ResultCache(self.options.cache_dir) if self.options.use_cache else None
        if self.cache is not None and self.cache.warning:
            self.result.notes.append(self.cache.warning)
        self._fingerprints = None
        self._stager: PinnedStager | None = None
        self.cpu_fallbacks = 0

    def _same_checkpoint_notes(self) -> list[str]:
        notes = []
        seen = {self._identity(self.base): self.base.label}
        for run in self.runs:
            ident = self._identity(run)
            if ident in seen:
                notes.append(f"run '{run.label}' is the same checkpoint as '{seen[ident]}' "
                             f"({run.source}); its update is compared all the same.")
            else:
                seen[ident] = run.label
        return notes

    @staticmethod
    def _identity(ckpt: Checkpoint) -> tuple:
        return tuple(sorted(str(f.resolve()) for f in ckpt.files))

    @property
    def bytes_total(self) -> int:
        return sum(p.nbytes for p in self.plans)

    def fingerprints(self) -> tuple[str, list[str]]:
        if self._fingerprints is None:
            self._fingerprints = (self.base.fingerprint(), [r.fingerprint() for r in self.runs])
        return self._fingerprints

    def analysis_key(self) -> str:
        base_fp, run_fps = self.fingerprints()
        return analysis_key(base_fp, run_fps, self.options)

    def _reader_init(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # else the reader thread would create a context on GPU 0

    def _pair_keys(self) -> list[str]:
        base_fp, run_fps = self.fingerprints()
        return [hashlib.sha256(f"{base_fp}|{fp}|{self.options.common_rows}".encode()).hexdigest()
                for fp in run_fps]

    def _load(self, plan: TensorPlan) -> tuple[list[torch.Tensor], object]:
        """Base and run tensors of one plan, on the analysis device (runs in the reader thread).

        On CUDA the copies are still in flight: the second value is the event to wait for (see _ready).
        """
        if self.device.type != "cuda":
            return self._load_cpu(plan), None
        if self._stager is None:
            self._stager = PinnedStager(self.device)
        sources = [(self.base, plan.name)] + list(zip(self.runs, plan.run_names))
        staged = [self._stager.to_device(ckpt, name, plan.rows) for ckpt, name in sources]
        return [t for t, _ in staged], staged[-1][1]  # one stream: the last event covers every copy

    def _load_cpu(self, plan: TensorPlan) -> list[torch.Tensor]:
        sources = [(self.base, plan.name)] + list(zip(self.runs, plan.run_names))
        return [ckpt.read(name, rows=plan.rows) for ckpt, name in sources]

    def read_tensors(self, name: str) -> list[torch.Tensor] | None:
        """Base and run tensors of one planned tensor, on the CPU in the compared dtype; None if not planned."""
        plan = next((p for p in self.plans if p.name == name), None)
        if plan is None:
            return None
        return [t if t.dtype == plan.dtype else t.to(plan.dtype) for t in self._load_cpu(plan)]

    def _compute(self, plan: TensorPlan, loaded: list[torch.Tensor], known: list[int | None]):
        tensors = [t if t.dtype == plan.dtype else t.to(plan.dtype) for t in loaded]
        return compute_tensor(tensors[0], tensors[1:], self.options.criterion, tuple(self.options.sweep),
                              want_rank=self.options.rank, ranks=known)

    def _compute_planned(self, plan: TensorPlan, pending, known: list[int | None]):
        """Wait for a tensor's read, compute it; on a GPU out-of-memory error, compute it on the CPU instead."""
        try:
            loaded, event = pending.result()
            if event is not None:
                ready(loaded, event)
            return self._compute(plan, loaded, known), []
        except torch.OutOfMemoryError:
            if self.device.type != "cuda":
                raise InputError(
                    f"out of memory while comparing tensor '{plan.name}' ({size(plan.nbytes)} for the "
                    f"base and {len(self.runs)} run(s)); compare fewer runs at a time.") from None
            torch.cuda.empty_cache()
            self.cpu_fallbacks += 1
            comp = self._compute(plan, self._load_cpu(plan), known)
            return comp, [f"computed on the CPU: the GPU ran out of memory for this tensor "
                          f"({size(plan.nbytes)} for the base and {len(self.runs)} run(s))"]

    def run(self, cancelled: Callable[[], bool] = lambda: False) -> Iterator[Progress]:
        """Yield one Progress per tensor, cached ones first; stops early (keeping what is done) if cancelled()."""
        start = time.perf_counter()
        key = self.analysis_key() if self.cache else None
        pair_keys = self._pair_keys() if self.cache else []
        cached = self.cache.load_results(key) if self.cache else {}
        ranks = [self.cache.load_ranks(pk) for pk in pair_keys] if self.cache else [{} for _ in self.runs]
        total, done, bytes_done = len(self.plans), 0, 0
        todo = []
        for plan in self.plans:
            hit = cached.get(plan.name)
            if hit is not None and len(hit.runs) == len(self.runs) and hit.numel == plan.numel:
                self.result.tensors[plan.name] = hit
                done += 1
                bytes_done += plan.nbytes
                yield Progress(done, total, bytes_done, self.bytes_total, time.perf_counter() - start, hit, True)
            else:
                todo.append(plan)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsub-read",
                                initializer=self._reader_init) as reader:
            pending = reader.submit(self._load, todo[0]) if todo else None
            for i, plan in enumerate(todo):
                if cancelled():
                    pending.cancel()
                    break
                current = pending
                pending = reader.submit(self._load, todo[i + 1]) if i + 1 < len(todo) else None
                # cached ranks are reused; with --no-rank none are passed, so none are reported
                known = [ranks[j].get(plan.name) if self.options.rank else None for j in range(len(self.runs))]
                comp, extra_notes = self._compute_planned(plan, current, known)
                del current
                result = TensorResult.from_computation(plan.name, dtype_name(plan.dtype), plan.shape, plan.numel,
                                                       comp, plan.notes + extra_notes)
                self.result.tensors[plan.name] = result
                if self.cache:
                    self.cache.store_result(key, result)
                    for j, s in enumerate(result.runs):
                        if s.rank is not None and known[j] is None:
                            self.cache.store_rank(pair_keys[j], plan.name, s.rank)
                done += 1
                bytes_done += plan.nbytes
                yield Progress(done, total, bytes_done, self.bytes_total, time.perf_counter() - start, result, False)
        self._close_stager()
        if self.cpu_fallbacks:
            self.result.notes.append(f"{self.cpu_fallbacks} tensor(s) computed on the CPU after the GPU ran out "
                                     "of memory; their figures are the same, only slower.")
        if done < total:
            return
        self.result.complete = True
        if self.cache:
            self.cache.store_analysis(key, self.result)

    def _close_stager(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def run_all(self) -> AnalysisResult:
        for _ in self.run():
            pass
        return self.result

    def close(self) -> None:
        self._close_stager()
        self.base.close()
        for r in self.runs:
            r.close()
        if self.cache:
            self.cache.close()
