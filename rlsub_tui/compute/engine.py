"""The streaming analysis: match tensors across a base and K runs, then read, compare and release them one at a time."""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch

from rlsub_tui.checkpoints import fp8
from rlsub_tui.checkpoints.checkpoint import Checkpoint, open_checkpoint
from rlsub_tui.checkpoints.dtypes import CastLog, dtype_name, pair_dtype, true_update_dtype
from rlsub_tui.checkpoints.kinship import architectures_note, open_warnings
from rlsub_tui.checkpoints.labels import checkpoint_label, run_labels, run_paths
from rlsub_tui.checkpoints.names import canonical
from rlsub_tui.checkpoints.staging import PinnedStager, ready
from rlsub_tui.checkpoints.tied import find_tied, tied_note
from rlsub_tui.compute.cache import ResultCache, analysis_key
from rlsub_tui.compute.kernels import MAX_RUNS
from rlsub_tui.compute.masks import compute_tensor
from rlsub_tui.compute.workers import WORKERS_MIN_BYTES  # (tests lower it here, for the engine's own choice)
from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.records.events import Progress
from rlsub_tui.records.results import AnalysisResult, Skipped
from rlsub_tui.records.spectrum import RankFigures
from rlsub_tui.util import device_route
from rlsub_tui.util.errors import InputError
from rlsub_tui.util.formatting import size


@dataclass
class TensorPlan:
    """One tensor to compare: its name in the base and in each run, and how."""

    name: str
    run_names: list[str]
    dtype: torch.dtype  # the base's dtype as compared (float32 for a dequantised fp8 weight)
    shape: tuple[int, ...]
    rows: int | None  # compare only the first `rows` rows (vocab resized, --common-rows)
    nbytes: int
    notes: list[str]
    run_dtypes: list[torch.dtype] = field(default_factory=list)  # the dtype each run is compared in
    scales: list[str | None] = field(default_factory=list)  # block scale of the base, then of each run
    # per run: the stored precision its true updates are counted in besides the comparison (dtypes.true_update_dtype)
    true_dtypes: list[torch.dtype | None] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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


@dataclass
class Layout:
    """What planning needs to know about one checkpoint besides its header: aliases and fp8 block scales."""

    ckpt: Checkpoint
    tied: dict[str, str]  # alias -> primary
    scales: dict[str, str]  # fp8 weight -> its block scale
    block: tuple[int, int]

    @classmethod
    def of(cls, ckpt: Checkpoint) -> "Layout":
        scales = fp8.block_scales(ckpt)
        return cls(ckpt, find_tied(ckpt), scales, fp8.block_size(ckpt) if scales else fp8.DEFAULT_BLOCK)

    def compared_dtype(self, name: str) -> torch.dtype:
        """A tensor's dtype as compared: an fp8 weight with a block scale is dequantised to float32."""
        return torch.float32 if name in self.scales else self.ckpt.tensors[name].dtype

    def scale_problem(self, name: str) -> str | None:
        scale = self.scales.get(name)
        if scale is None:
            return None
        return fp8.scale_mismatch(self.ckpt.tensors[name].shape, self.ckpt.tensors[scale].shape, self.block)


@dataclass
class Planning:
    """The outcome of matching tensors: the plans, what was left out, and the notes that go with them."""

    plans: list[TensorPlan]
    skipped: list[Skipped]
    notes: list[str]
    tied: dict[str, str]


def plan_tensors(base: Checkpoint, runs: list[Checkpoint], common_rows: bool = False,
                 policy: str = "stored") -> Planning:
    """Match tensors by name (ignoring wrapper prefixes) and shape, list every one left out and why;
    tied aliases and fp8 block scales folded in, one comparison dtype per pair."""
    bl, *run_layouts = [Layout.of(c) for c in [base] + runs]
    run_maps = [_name_map(lay) for lay in run_layouts]
    casts = CastLog(policy)
    plans, skipped = _plan_base_tensors(bl, run_layouts, run_maps, common_rows, policy, casts)
    skipped += _run_only_tensors(bl, run_layouts, run_maps)
    if runs and not plans:
        raise _nothing_in_common(base, skipped)
    file_order = {f: i for i, f in enumerate(base.files)}
    plans.sort(key=lambda p: (file_order[base.tensors[p.name].file], base.tensors[p.name].offset))
    notes = [tied_note(a, prim, f"the base '{base.label}'") for a, prim in bl.tied.items()]
    notes += casts.notes() + _fp8_notes(plans, bl)
    return Planning(plans, skipped, notes, dict(bl.tied))


def _plan_base_tensors(bl: Layout, run_layouts: list[Layout], run_maps: list[dict[str, str]], common_rows: bool,
                       policy: str, casts: CastLog) -> tuple[list[TensorPlan], list[Skipped]]:
    """A plan for each base tensor every run can be compared on; the others skipped with their reasons."""
    consumed = set(bl.scales.values())  # block scales are used to dequantise, not compared themselves
    plans, skipped = [], []
    for name, info in bl.ckpt.tensors.items():
        if name in bl.tied or name in consumed:
            continue
        if not info.dtype.is_floating_point:
            skipped.append(Skipped(name, "*", f"not a floating-point tensor ({dtype_name(info.dtype)})"))
            continue
        plan, reasons = _plan_one(name, bl, run_layouts, run_maps, common_rows, policy, casts)
        if reasons:
            skipped.extend(Skipped(name, label, reason) for label, reason in reasons)
        else:
            plans.append(plan)
    return plans, skipped


def _run_only_tensors(bl: Layout, run_layouts: list[Layout], run_maps: list[dict[str, str]]) -> list[Skipped]:
    """Run tensors no base tensor matches (aliases and block scales aside), and ties the base and a run disagree on."""
    base_keys = {canonical(n) for n in bl.ckpt.tensors}
    alias_keys = {canonical(a): a for a in bl.tied}
    skipped = []
    for lay, m in zip(run_layouts, run_maps):
        for key, name in m.items():
            if key in alias_keys:
                if name not in lay.tied:
                    skipped.append(Skipped(name, lay.ckpt.label, f"tied to {bl.tied[alias_keys[key]]} in the base "
                                                                  "but a separate tensor in this run; not compared"))
            elif name in lay.tied:
                continue  # the run's own alias: compared under its primary name
            elif key not in base_keys and name not in lay.scales.values():
                skipped.append(Skipped(name, lay.ckpt.label, "only in this run, not in the base"))
    return skipped


def _nothing_in_common(base: Checkpoint, skipped: list[Skipped]) -> InputError:
    if not skipped:
        return InputError(f"{base.source}: nothing to compare.")
    return InputError(f"{base.source} and the runs have no tensor in common that can be compared "
                      f"({len(skipped)} tensors skipped; first: {skipped[0].tensor}: {skipped[0].reason}).")


def _name_map(lay: Layout) -> dict[str, str]:
    """canonical name -> the run's name, aliases kept (a tie the base lacks is compared as stored)."""
    m: dict[str, str] = {}
    for name in lay.ckpt.tensors:
        m.setdefault(canonical(name), name)
    return m


def _plan_one(name, bl: Layout, run_layouts: list[Layout], run_maps, common_rows, policy, casts: CastLog):
    """The plan for one base tensor, or the (run, reason) pairs that keep it out."""
    info = bl.ckpt.tensors[name]
    base_dtype = bl.compared_dtype(name)
    problem = bl.scale_problem(name)
    if problem:
        return None, [("*", f"fp8 weight not compared: {problem}")]
    run_names, reasons, rows, tnotes, run_dtypes, scales = [], [], None, [], [], [bl.scales.get(name)]
    true_dtypes = []
    for lay, m in zip(run_layouts, run_maps):
        run, other = lay.ckpt, m.get(canonical(name))
        reason = _pair_problem(name, bl, lay, other, common_rows)
        if reason:
            reasons.append((run.label, reason))
            continue
        oshape = run.tensors[other].shape
        if oshape != info.shape:  # --common-rows and the same trailing dimensions (else a reason above)
            r = min(oshape[0], info.shape[0])
            rows = r if rows is None else min(rows, r)
            tnotes.append(f"{run.label}: shape {list(oshape)} vs base {list(info.shape)}; "
                          f"compared on the first {r} rows")
        run_dtype = lay.compared_dtype(other)
        pair = pair_dtype(base_dtype, run_dtype, policy)
        casts.record(run.label, base_dtype, run_dtype, pair)
        run_names.append(other)
        run_dtypes.append(pair)
        scales.append(lay.scales.get(other))
        dequantised = name in bl.scales or other in lay.scales  # fp8 codes: no finer stored values to count
        true_dtypes.append(None if dequantised else true_update_dtype(base_dtype, run_dtype, pair))
    if reasons:
        return None, reasons
    shape = info.shape if rows is None else (rows,) + info.shape[1:]
    numel = math.prod(shape)
    nbytes = numel * info.dtype.itemsize + sum(
        numel * lay.ckpt.tensors[n].dtype.itemsize for lay, n in zip(run_layouts, run_names))
    return TensorPlan(name, run_names, base_dtype, shape, rows, nbytes, tnotes, run_dtypes, scales, true_dtypes), []


def _pair_problem(name: str, bl: Layout, lay: Layout, other: str | None, common_rows: bool) -> str | None:
    """Why a run's tensor `other` (None: no match) cannot be compared with the base's `name`; None if it can."""
    if other is None:
        return "missing in this run"
    info, oinfo = bl.ckpt.tensors[name], lay.ckpt.tensors[other]
    if not oinfo.dtype.is_floating_point:
        return f"not a floating-point tensor in this run ({dtype_name(oinfo.dtype)})"
    if oinfo.shape != info.shape:
        same_tail = len(oinfo.shape) == len(info.shape) >= 1 and oinfo.shape[1:] == info.shape[1:]
        if not (common_rows and same_tail):
            hint = " (use --common-rows to compare the rows they share)" if same_tail else ""
            return f"shape {list(oinfo.shape)} differs from base {list(info.shape)}{hint}"
    problem = lay.scale_problem(other)
    if problem:
        return f"fp8 weight not compared: {problem}"
    if name in bl.scales and oinfo.dtype in fp8.FP8 and other not in lay.scales:
        return "fp8 without a block scale in this run, with one in the base"
    return None


def _fp8_notes(plans: list[TensorPlan], bl: Layout) -> list[str]:
    scaled = sum(1 for p in plans if any(s is not None for s in p.scales))
    raw = sum(1 for p in plans if any(d in fp8.FP8 for d in p.run_dtypes))
    notes = []
    if scaled:
        notes.append(f"{scaled} fp8 tensors were dequantised with their block scales (weight_scale_inv, "
                     f"{bl.block[0]}x{bl.block[1]} blocks) and compared in float32 or less; "
                     "the scales are not compared themselves.")
    if raw:
        notes.append(f"{raw} fp8 tensors have no block scale: compared on their stored fp8 codes.")
    return notes


LAYOUT_NAMES = {"safetensors": "safetensors", "pickle": "torch pickle", "peft": "PEFT adapter on the base",
                "fsdp": "FSDP rank shards", "dcp": "torch.distributed.checkpoint", "zero": "DeepSpeed ZeRO partitions"}


def read_as(run: Checkpoint, plans: list[TensorPlan], j: int) -> str:
    """How a run was read: its layout and the dtypes its compared tensors are stored in, "FSDP rank shards, fp32",
    and the entries of its files left unread, if any, with the first and why ("3 entries not read, first ...")."""
    stored = Counter(dtype_name(run.tensors[p.run_names[j]].dtype) for p in plans)
    how = f"{LAYOUT_NAMES.get(run.layout, run.layout)}, {'/'.join(d for d, _ in stored.most_common())}"
    left = run.not_read()
    if not left:
        return how
    first, why = next(iter(left.items()))
    return f"{how}, {len(left)} entr{'y' if len(left) == 1 else 'ies'} not read, first '{first}': {why}"


class Analysis:
    """A base and K runs, opened from their headers; `run()` streams through the tensors.

    `result` is the engine's own record (what the cache stores, what run_all returns, filled on this
    thread); consumers go through analysis.analyse, which hands each its own copy.
    """

    def __init__(self, base: str, runs: list[str], options: AnalysisOptions | None = None):
        self.options = options or AnalysisOptions()
        if not runs:
            raise InputError("no runs given: name at least one fine-tuned checkpoint after the base.")
        if len(runs) > MAX_RUNS:
            raise InputError(f"{len(runs)} runs given; at most {MAX_RUNS} can be compared in one analysis.")
        self.device = resolve_device(self.options.device)
        self.given = (base, list(runs))  # as named: worker processes open the same (workers.py)
        self.base = open_checkpoint(base, label=checkpoint_label(base))
        self.runs = [open_checkpoint(p, label=lbl, base=self.base) for p, lbl in zip(run_paths(runs), run_labels(runs))]
        try:
            planning = plan_tensors(self.base, self.runs, self.options.common_rows, self.options.compare_dtype)
        except InputError as exc:  # nothing in common: name the architectures, the likely reason
            raise InputError(f"{str(exc).rstrip('.')}{architectures_note(self.base, self.runs)}.") from None
        self.plans, skipped = planning.plans, planning.skipped
        self._plans_by_name = {p.name: p for p in self.plans}
        notes = open_warnings(self.base, self.runs, skipped) + [n for r in self.runs for n in r.notes()]
        notes += self._same_checkpoint_notes() + planning.notes
        self.result = AnalysisResult(
            base_label=self.base.label, base_path=self.base.source,
            run_labels=[r.label for r in self.runs], run_paths=[r.source for r in self.runs],
            criterion=self.options.criterion, sweep=tuple(self.options.sweep), device=str(self.device),
            skipped=skipped, notes=notes, planned=[p.name for p in self.plans],
            planned_numel={p.name: p.numel for p in self.plans}, tied=planning.tied,
            compare_dtype=self.options.compare_dtype, run_read_as=[read_as(r, self.plans, j)
                                                                    for j, r in enumerate(self.runs)])
        self.cache = ResultCache(self.options.cache_dir) if self.options.use_cache else None
        if self.cache is not None and self.cache.warning:
            self.result.notes.append(self.cache.warning)
        self._fingerprints = None
        if self.options.workers > 1 and not device_route.cuda_route(self.device.type):  # the bytes as opened now: workers must find the same
            self.fingerprints()
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
        """Per (base, run) pair: what a cached rank depends on besides the tensor, its rows and its dtype."""
        base_fp, run_fps = self.fingerprints()
        return [hashlib.sha256(f"{base_fp}|{fp}".encode()).hexdigest() for fp in run_fps]

    @staticmethod
    def _rank_key(plan: TensorPlan, j: int) -> str:
        """A cached rank is valid for this tensor compared on these rows in this dtype, whatever the company."""
        return f"{plan.name}|{plan.rows}|{dtype_name(plan.run_dtypes[j])}"

    def _sources(self, plan: TensorPlan) -> list[tuple[Checkpoint, str, torch.dtype, str | None]]:
        """(checkpoint, tensor name, dtype to compare in, fp8 block-scale name) for the base, then each run."""
        return [(self.base, plan.name, plan.dtype, plan.scales[0])] + list(
            zip(self.runs, plan.run_names, plan.run_dtypes, plan.scales[1:]))

    def _load(self, plan: TensorPlan) -> tuple[list[torch.Tensor], list, object]:
        """Stored tensors of one plan on the analysis device, and their fp8 block scales (reader thread).

        On CUDA the copies are still in flight: the last value is the event to wait for (staging.ready).
        """
        sources = self._sources(plan)
        scales = [ckpt.read(sc) if sc is not None else None for ckpt, _, _, sc in sources]
        if not device_route.cuda_route(self.device.type):
            return [ckpt.read(name, rows=plan.rows) for ckpt, name, _, _ in sources], scales, None
        if self._stager is None:
            self._stager = PinnedStager(self.device)
        staged = [self._stager.to_device(ckpt, name, plan.rows) for ckpt, name, _, _ in sources]
        return [t for t, _ in staged], scales, staged[-1][1]  # one stream: the last event covers every copy

    def _load_cpu(self, plan: TensorPlan) -> tuple[list[torch.Tensor], list, None]:
        sources = self._sources(plan)
        return ([ckpt.read(name, rows=plan.rows) for ckpt, name, _, _ in sources],
                [ckpt.read(sc) if sc is not None else None for ckpt, _, _, sc in sources], None)

    def read_tensors(self, name: str) -> list[torch.Tensor] | None:
        """Base and run tensors of one planned tensor on the CPU, as compared (see _prepare); None if not planned."""
        plan = self._plans_by_name.get(name)
        if plan is None:
            return None
        return self._prepare(plan, self._load_cpu(plan))

    def _prepare(self, plan: TensorPlan, loaded) -> list[torch.Tensor]:
        """Dequantise fp8 block-scaled weights and cast each tensor to its comparison dtype (base first)."""
        tensors, scales, _ = loaded
        out = []
        for (ckpt, _, dtype, _), t, scale in zip(self._sources(plan), tensors, scales):
            if scale is not None:
                t = fp8.dequantise(t, scale.to(t.device), fp8.block_size(ckpt))
            out.append(t if t.dtype == dtype else t.to(dtype))
        return out

    def _compute(self, plan: TensorPlan, loaded, known: list[RankFigures | None]):
        tensors = self._prepare(plan, loaded)
        stored = [t if dt is not None else None for t, dt in zip(loaded[0][1:], plan.true_dtypes)]
        return compute_tensor(tensors[0], tensors[1:], self.options.criterion, tuple(self.options.sweep),
                              want_rank=self.options.rank, ranks=known, dtypes=plan.run_dtypes,
                              stored=stored, true_dtypes=plan.true_dtypes, want_subspaces=self.options.subspaces)

    def compute_named(self, name: str, known: list[RankFigures | None]):
        """One planned tensor read and computed here, on the CPU (a worker process's task)."""
        plan = self._plans_by_name.get(name)
        if plan is None:
            raise InputError(f"tensor '{name}' is no longer in the checkpoints: a file changed during the analysis.")
        try:
            return self._compute(plan, self._load_cpu(plan), known)
        except torch.OutOfMemoryError:
            raise self._out_of_memory(plan, "compare fewer runs at a time, or use fewer --workers") from None

    def _out_of_memory(self, plan: TensorPlan, advice: str = "compare fewer runs at a time") -> InputError:
        return InputError(f"out of memory while comparing tensor '{plan.name}' ({size(plan.nbytes)} for the "
                          f"base and {len(self.runs)} run(s)); {advice}.")

    def _compute_planned(self, plan: TensorPlan, pending, known: list[RankFigures | None]):
        """Wait for a tensor's read, compute it; on a GPU out-of-memory error, compute it on the CPU instead."""
        try:
            loaded = pending.result()
            if loaded[2] is not None:
                ready(loaded[0], loaded[2])
            return self._compute(plan, loaded, known), []
        except torch.OutOfMemoryError:
            if not device_route.cuda_route(self.device.type):
                raise self._out_of_memory(plan) from None
            if device_route.real_cuda(self.device.type):
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
        for plan, comp, extra_notes in self._computed(todo, ranks, cancelled):
            result = replace(comp, name=plan.name, notes=plan.notes + extra_notes + comp.notes)
            self.result.tensors[plan.name] = result
            if self.cache:
                self.cache.store_result(key, result)
                known = self._known(plan, ranks)
                for j, s in enumerate(result.runs):
                    if s.rank is not None and known[j] is None:
                        self.cache.store_rank(pair_keys[j], self._rank_key(plan, j), s.rank_figures())
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

    def _known(self, plan: TensorPlan, ranks: list[dict]) -> list[RankFigures | None]:
        """The ranks the cache holds for this tensor, per run (none with --no-rank: none are reported then)."""
        if not self.options.rank:
            return [None] * len(self.runs)
        return [ranks[j].get(self._rank_key(plan, j)) for j in range(len(self.runs))]

    def _computed(self, todo: list[TensorPlan], ranks: list[dict], cancelled: Callable[[], bool]):
        """(plan, record, notes) per tensor of `todo`, in order: in worker processes (CPU, --workers > 1, at least
        WORKERS_MIN_BYTES to read), else here, with the next tensor read ahead on a reader thread."""
        if (not device_route.cuda_route(self.device.type) and self.options.workers > 1 and len(todo) > 1
                and sum(p.nbytes for p in todo) >= WORKERS_MIN_BYTES):
            from rlsub_tui.compute.workers import TensorWorkers

            pool = TensorWorkers(type(self), *self.given, self.options, min(self.options.workers, len(todo)), self.fingerprints())
            finished = False
            try:
                for plan, comp in pool.computed(todo, lambda p: self._known(p, ranks), cancelled):
                    yield plan, comp, []
                finished = not cancelled()
            finally:
                pool.close(finished)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rlsub-read",
                                initializer=self._reader_init) as reader:
            pending = reader.submit(self._load, todo[0]) if todo else None
            for i, plan in enumerate(todo):
                if cancelled():
                    pending.cancel()
                    break
                current = pending
                pending = reader.submit(self._load, todo[i + 1]) if i + 1 < len(todo) else None
                comp, extra_notes = self._compute_planned(plan, current, self._known(plan, ranks))
                del current
                yield plan, comp, extra_notes

    def _close_stager(self) -> None:
        if self._stager is not None:
            self._stager.close()
            self._stager = None

    def run_all(self) -> AnalysisResult:
        """Every tensor, in this thread (scripts and tests); the result holds them all."""
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
