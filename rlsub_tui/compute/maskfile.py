"""The mask file: per tensor, which parameters at least J of K runs updated (or each run's own), as safetensors."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlsub_tui.checkpoints.checkpoint import Checkpoint, open_checkpoint
from rlsub_tui.checkpoints.labels import checkpoint_label, run_labels, run_paths
from rlsub_tui.checkpoints.step_folders import resolve_runs, run_specs
from rlsub_tui.checkpoints.writer import DTYPE_CODES, Entry, SafetensorsWriter
from rlsub_tui.compute.engine import TensorPlan, plan_tensors
from rlsub_tui.compute.kernels import update_mask
from rlsub_tui.records.criteria import Criterion
from rlsub_tui.records.events import Progress
from rlsub_tui.util.errors import InputError
from rlsub_tui.util.files import atomic_file

MASK_FORMAT = "rlsub-tui mask file 1"
DIGEST_CHARS = 32


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 (first 128 bits, hex) of a tensor's stored bytes: identifies the base a mask was made from."""
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(data)).hexdigest()[:DIGEST_CHARS]


def base_fingerprint(base_tensors: dict[str, list]) -> str:
    """One digest over every base tensor's name, dtype, shape and bytes digest."""
    return hashlib.sha256(json.dumps(base_tensors, sort_keys=True).encode()).hexdigest()


def mask_key(label: str | None, tensor: str) -> str:
    """The key of a mask in the file: the base's tensor name, prefixed by 'RUN/' for per-run masks."""
    return tensor if label is None else f"{label}/{tensor}"


@dataclass
class MaskFileReport:
    """What `write_mask_file` wrote: its masks' true counts over the numel they cover."""

    path: Path
    labels: list[str | None]  # None: the one combined (at-least-J) mask
    min_runs: int = 1
    runs: int = 1
    numel: int = 0
    true: list[int] = field(default_factory=list)
    skipped: list = field(default_factory=list)


def open_runs(base: str, runs: list[str]) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open a base and runs given as PATH or NAME=PATH, with unique labels as `analyze` gives them.

    A timeline (a folder of step checkpoints) stands for its last step, labelled with the folder's name.
    """
    if not runs:
        raise InputError("no runs given: name at least one fine-tuned checkpoint after the base.")
    specs = run_specs(resolve_runs(runs))
    base_ckpt = open_checkpoint(base, label=checkpoint_label(base))
    return base_ckpt, [open_checkpoint(p, label=lbl, base=base_ckpt) for p, lbl in zip(run_paths(specs), run_labels(specs))]


def check_mask_out(out: Path, inputs: list[Checkpoint], force: bool) -> None:
    if out.suffix != ".safetensors":
        raise InputError(f"--out {out}: name a .safetensors file for the masks.")
    if out.is_dir():
        raise InputError(f"--out {out}: is a directory; name a .safetensors file.")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the folder {out.parent} does not exist.")
    if out.exists():
        if any(out.resolve() == f.resolve() for c in inputs for f in c.files):
            raise InputError(f"--out {out}: is one of the input checkpoints' files; refused.")
        if not force:
            raise InputError(f"--out {out}: already exists; add --force to replace it.")


def _metadata(criterion: Criterion, base: Checkpoint, runs: list[Checkpoint], mode: str, min_runs: int,
              counts: dict, base_tensors: dict, skipped: list) -> dict[str, str]:
    return {
        "format": "pt",
        "rlsub_tui": MASK_FORMAT,
        "criterion": criterion.name,
        "tolerance": "" if criterion.name == "exact" else repr(criterion.value),
        "mode": mode,
        "min_runs": str(min_runs),
        "runs": json.dumps([{"label": r.label, "path": str(r.source)} for r in runs]),
        "base": str(base.source),
        "base_fingerprint": base_fingerprint(base_tensors),
        "base_tensors": json.dumps(base_tensors, sort_keys=True),
        "counts": json.dumps(counts),
        "skipped": json.dumps([[s.tensor, s.run, s.reason] for s in skipped]),
    }


def _placeholder(plans: list[TensorPlan], base: Checkpoint, labels: list) -> tuple[dict, dict]:
    """Metadata values of the largest size the real ones can take, to reserve header room for them."""
    big = 10 ** 19
    tensors = {p.name: [DTYPE_CODES[base.tensors[p.name].dtype], list(p.shape), "f" * DIGEST_CHARS] for p in plans}
    counts = {"numel": big, "true": {str(lbl): big for lbl in labels}}
    return counts, tensors


def write_mask_file(base_path: str, run_paths: list[str], out: Path, criterion: Criterion,
                    min_runs: int | None = None, per_run: bool = False, force: bool = False,
                    on_progress: Callable[[Progress], None] | None = None) -> MaskFileReport:
    """Stream the base and runs tensor by tensor and write the masks to `out` atomically."""
    out = Path(out)
    base, runs = open_runs(base_path, run_paths)
    try:
        k = len(runs)
        if per_run and min_runs is not None:
            raise InputError("--per-run writes one mask per run; it cannot be combined with --min-runs.")
        j = k if min_runs is None else min_runs
        if not 1 <= j <= k:
            raise InputError(f"--min-runs {j}: must be between 1 and the number of runs ({k}).")
        check_mask_out(out, [base, *runs], force)
        planning = plan_tensors(base, runs)
        plans, skipped = planning.plans, planning.skipped
        labels = [r.label for r in runs] if per_run else [None]
        mode = "per-run" if per_run else ("consensus" if j == k else "at-least")
        report = MaskFileReport(out, labels, j, k, skipped=skipped, true=[0] * len(labels))
        entries = [Entry(mask_key(lbl, p.name), torch.bool, p.shape) for p in plans for lbl in labels]
        counts, tensors = _placeholder(plans, base, labels)
        biggest = _metadata(criterion, base, runs, mode, j, counts, tensors, skipped)
        with atomic_file(out) as tmp:
            writer = SafetensorsWriter(tmp, entries, biggest)
            try:
                base_tensors = _stream(writer, base, runs, plans, criterion, j, labels, report, on_progress)
                counts = {"numel": report.numel, "true": {str(lbl): n for lbl, n in zip(labels, report.true)}}
                writer.rewrite_metadata(_metadata(criterion, base, runs, mode, j, counts, base_tensors, skipped))
                writer.close()
            except BaseException:
                writer.abort()
                raise
        return report
    finally:
        for c in (base, *runs):
            c.close()


def _stream(writer: SafetensorsWriter, base: Checkpoint, runs: list[Checkpoint], plans: list[TensorPlan],
            criterion: Criterion, j: int, labels: list, report: MaskFileReport,
            on_progress: Callable[[Progress], None] | None) -> dict[str, list]:
    start = time.perf_counter()
    total_bytes = sum(p.nbytes for p in plans)
    done_bytes = 0
    base_tensors = {}
    for i, plan in enumerate(plans):
        raw = base.read(plan.name)
        info = base.tensors[plan.name]
        base_tensors[plan.name] = [DTYPE_CODES[info.dtype], list(info.shape), tensor_digest(raw)]
        # each run against the base in that pair's comparison dtype (see dtypes.pair_dtype)
        masks = [update_mask(raw.to(d), r.read(n).to(d), criterion)
                 for r, n, d in zip(runs, plan.run_names, plan.run_dtypes)]
        del raw
        if labels == [None]:
            votes = torch.zeros(plan.shape, dtype=torch.int16)
            for m in masks:
                votes += m
            masks = [votes >= j]
        for slot, (lbl, m) in enumerate(zip(labels, masks)):
            writer.write(mask_key(lbl, plan.name), m)
            report.true[slot] += int(torch.count_nonzero(m))
        report.numel += plan.numel
        done_bytes += plan.nbytes
        if on_progress:
            on_progress(Progress(i + 1, len(plans), done_bytes, total_bytes, time.perf_counter() - start, None, False))
    return base_tensors
