"""Which route a computation takes: the CUDA route's code on a CUDA device, and on the CPU too when the
environment asks for it (RLSUB_TUI_CUDA_ROUTE_ON_CPU=1), so that the route's logic (large chunks, the Gram and
eigenvalue rank, staged copies, the out-of-memory fallback) runs in CI on a machine without a GPU. Only the
calls into torch.cuda itself (streams, events, pinned memory, device selection) are then left out."""

from __future__ import annotations

import os

ENV = "RLSUB_TUI_CUDA_ROUTE_ON_CPU"
CUDA_ROUTE_ON_CPU = os.environ.get(ENV) == "1"  # read at call time below, so a test may set it


def cuda_route(device_type: str) -> bool:
    """Whether work on a device of this type ('cuda', 'cpu') takes the CUDA route."""
    return device_type == "cuda" or (CUDA_ROUTE_ON_CPU and device_type == "cpu")


def real_cuda(device_type: str) -> bool:
    """Whether torch.cuda itself is to be called: only on a CUDA device."""
    return device_type == "cuda"
