"""The elementwise kernels every count is built on: Δ in the stored dtype, the criterion's mask, |w0| bins,
histograms and pair intersections, chunk sizes; each works on one chunk or one tensor, on the CPU or a GPU."""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from rlsub_tui.records.criteria import MAG_X_MAX, MAG_X_MIN, Criterion
from rlsub_tui.util import device_route

# Elementwise work is done in chunks this size: a chunk's int64 temporaries (2 MB each) stay in the CPU's
# caches; 2^22 ran the per-chunk passes 2-3x slower (BENCHMARKS.md).
CHUNK_ELEMENTS = 1 << 18
# On a GPU each chunk costs ~20 host syncs and ~90 kernel launches whatever its size: 2^26 elements ran
# the 151936x1536 embedding 3.6x faster than 2^22 on an H200 (BENCHMARKS.md), with ~2 GB of temporaries.
CUDA_CHUNK_ELEMENTS = 1 << 26


def chunk_elements(device: torch.device, k: int) -> int:
    """Elements per chunk: large on a GPU (fewer syncs), smaller there with many runs (K masks kept)."""
    if not device_route.cuda_route(device.type):
        return CHUNK_ELEMENTS
    return CUDA_CHUNK_ELEMENTS if k <= MAX_CODED_RUNS else CUDA_CHUNK_ELEMENTS >> 2
MAX_CODED_RUNS = 15  # up to this many runs, pair overlaps come from one histogram of per-parameter run codes
MAX_RUNS = 128  # per-parameter counters are int16; pair overlaps grow as K², so this is the supported K


def _arith_dtype(dtype: torch.dtype) -> torch.dtype:
    # float8 has no arithmetic kernels: subtract in float32, then round to float8, which is what
    # bf16/fp16 kernels do internally too.
    return torch.float32 if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else dtype


def stored_delta(base: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
    """Δ = run - base computed in the (common) stored dtype, as the reference does."""
    arith = _arith_dtype(base.dtype)
    if arith != base.dtype:
        return (run.to(arith) - base.to(arith)).to(base.dtype).to(arith)
    return run - base


def magnitude_table(shift: int = 0, device=None) -> torch.Tensor:
    """Bin of every float32 biased exponent 0..255 (see MAG_* above), times 2**shift."""
    biased = torch.arange(256, dtype=torch.int32)
    bins = (biased - 127).clamp(MAG_X_MIN, MAG_X_MAX) - (MAG_X_MIN - 1)
    bins[0] = 0  # zeros and subnormals
    return (bins << shift).to(device)


def magnitude_bins(base32: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """Bin index of each |w0| (times 2**shift of `table`), looked up from its float32 exponent bits."""
    if table is None:
        table = magnitude_table(device=base32.device)
    return torch.index_select(table, 0, (base32.view(torch.int32) >> 23) & 0xFF)


def rounded(value: float, dtype: torch.dtype) -> float:
    """A threshold as the stored dtype represents it (bf16: 1e-5 -> 1.00136e-5), as torch.isclose compares."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return float(torch.tensor(value, dtype=torch.float32).to(dtype).float())
    return float(torch.tensor(value, dtype=dtype))


def bincount(x: torch.Tensor | np.ndarray, minlength: int) -> np.ndarray:
    """Histogram (int64 numpy) of non-negative ints, a torch tensor or a numpy array, by torch.bincount on any
    device: on a CPU thread it counts an int32 or int64 array 1.2-3x faster than np.bincount, which first casts
    to intp and scans for the extremes (BENCHMARKS.md). Narrower ints are widened to int32 by numpy first
    (torch widens int16 several times slower); a 16-bit pattern array must come as uint16."""
    if isinstance(x, torch.Tensor):
        if device_route.cuda_route(x.device.type):
            return torch.bincount(x.reshape(-1).long(), minlength=minlength).cpu().numpy()
        x = x.numpy()
    x = x.reshape(-1)
    if x.dtype not in (np.int32, np.int64):
        x = x.astype(np.int32)
    return torch.bincount(torch.from_numpy(x), minlength=minlength).numpy()


def sum_sq(x: torch.Tensor) -> float:
    return float(torch.dot(x, x))


PAIR_BLOCK = 1 << 16  # positions per Gram block: counts stay far below 2**24, exact in float32
GRAM_MIN_RUNS = 32  # from this K the Gram product beats K²/2 mask passes (measured: 4x at K=64, slower at 16)


def pair_intersections(masks: list[torch.Tensor]) -> np.ndarray:
    """|A_a ∩ A_c| for every pair of K masks at once, as the Gram matrix M·Mᵀ of the 0/1 mask rows.

    One matrix product per block instead of K²/2 passes over the masks. Every partial sum is an
    integer below 2**24, so float32 (float64 on a GPU, where TF32 might be on) counts exactly.
    """
    k, n = len(masks), masks[0].numel()
    dtype = torch.float64 if device_route.cuda_route(masks[0].device.type) else torch.float32
    total = torch.zeros((k, k), dtype=torch.float64, device=masks[0].device)
    for start in range(0, n, PAIR_BLOCK):
        rows = torch.stack([m[start:start + PAIR_BLOCK] for m in masks]).to(dtype)
        total += (rows @ rows.T).to(torch.float64)
    return total.round().to(torch.int64).cpu().numpy()


def nonzero(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))  # far faster than mask.sum() on bool tensors


def criterion_mask(b: torch.Tensor, r: torch.Tensor, absd: torch.Tensor, criterion: Criterion, tol: float,
                   work: torch.dtype) -> torch.Tensor:
    """Updated under the criterion (NaN/Inf handled by the caller): |Δ| > tol in the stored dtype (atol), the
    stored values differ (exact), or |Δ| > η·max(|w0|, |w1|) in `work` precision (relative)."""
    if criterion.name == "atol":
        return absd > tol
    if criterion.name == "exact":
        return r != b
    bw, rw = b.to(work), r.to(work)
    return (rw - bw).abs() > criterion.value * torch.maximum(bw.abs(), rw.abs())


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """Torch's CPU ops on one thread while chunks are counted: on a chunk of CHUNK_ELEMENTS, waking the
    intra-op threads costs more than they save, and on a busy machine far more (BENCHMARKS.md). The rank,
    computed after, keeps every thread."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def update_mask(base: torch.Tensor, run: torch.Tensor, criterion: Criterion) -> torch.Tensor:
    """Which parameters count as updated (a bool tensor of base's shape), by the same rule as compute_tensor.

    `base` and `run` share one shape and one dtype. NaN/Inf in the update count as updated.
    """
    work = torch.float64 if base.dtype == torch.float64 else torch.float32
    tol = rounded(criterion.value, base.dtype) if criterion.name == "atol" else 0.0
    out = torch.empty(base.shape, dtype=torch.bool, device=base.device)
    flat_out, flat_base, flat_run = out.reshape(-1), base.reshape(-1), run.reshape(-1)
    for start in range(0, flat_base.numel(), CHUNK_ELEMENTS):
        b = flat_base[start:start + CHUNK_ELEMENTS]
        r = flat_run[start:start + CHUNK_ELEMENTS]
        d = stored_delta(b, r).to(work)
        mask = criterion_mask(b, r, d.abs(), criterion, tol, work)
        flat_out[start:start + CHUNK_ELEMENTS] = mask | ~torch.isfinite(d)
    return out
