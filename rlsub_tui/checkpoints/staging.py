"""Moves tensors from checkpoint files to a CUDA device through a few fixed, reusable pinned buffers.

`Tensor.pin_memory()` on every tensor makes the caching host allocator keep power-of-two pinned
blocks for the life of the process (15.5 GB of them after one 1.5B-parameter analysis on an H200);
here the pinned memory is `slices * slice_bytes` whatever the model. Each slice is filled by a file
read, copied to the device on a side stream, and reused once its copy's event has completed, so the
read of one slice overlaps the copy of the previous one. The consumer waits on the returned event
before using the tensor (`ready`), which also tells the allocator the tensor is used on its stream.
"""

from __future__ import annotations

import contextlib

import torch

from rlsub_tui.checkpoints.checkpoint import Checkpoint

SLICE_BYTES = 64 << 20
SLICES = 4


class _Done:
    """A CPU device's stand-in for a CUDA event: a copy there is complete when it returns."""

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


class PinnedStager:
    """Copies checkpoint tensors to one CUDA device; create and use it from one thread. On a CPU device (the
    CUDA route taken on the CPU, device_route) the same slices, order and events run with the streams, events
    and pinning left out."""

    def __init__(self, device: torch.device, slice_bytes: int = SLICE_BYTES, slices: int = SLICES):
        self.device = device
        self.slice_bytes = slice_bytes
        self.cuda = device.type == "cuda"
        self.stream = None
        if self.cuda:
            with torch.cuda.device(device):
                self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(slice_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slices)]
        self.events: list = [None] * slices
        self._next = 0

    def _on_stream(self):
        if not self.cuda:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self.device))
        stack.enter_context(torch.cuda.stream(self.stream))
        return stack

    def _event(self):
        return torch.cuda.Event() if self.cuda else _Done()

    def to_device(self, ckpt: Checkpoint, name: str, rows: int | None = None) -> tuple[torch.Tensor, object]:
        """The tensor on the device, and the event after which it is complete."""
        info = ckpt.tensors[name]
        shape, nbytes = ckpt.read_shape(name, rows)
        with self._on_stream():
            # allocated on the copy stream: its memory cannot be handed out while a copy is pending
            out = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            for start in range(0, nbytes, self.slice_bytes):
                n = min(self.slice_bytes, nbytes - start)
                buf = self._free_slice()[:n]
                ckpt.read_bytes(name, buf, start)
                out[start:start + n].copy_(buf, non_blocking=self.cuda)
                self._record()
            done = self._event()
            done.record(self.stream)
        return out.view(info.dtype).reshape(shape), done

    def _free_slice(self) -> torch.Tensor:
        i = self._next
        if self.events[i] is not None:
            self.events[i].synchronize()  # the previous copy out of this slice has finished
        return self.buffers[i]

    def _record(self) -> None:
        event = self._event()
        event.record(self.stream)
        self.events[self._next] = event
        self._next = (self._next + 1) % len(self.buffers)

    def close(self) -> None:
        for e in self.events:
            if e is not None:
                e.synchronize()
        self.buffers.clear()


def ready(tensors: list[torch.Tensor], event) -> None:
    """Make the current stream wait for the staged copies, and keep their memory until it is done (nothing to
    wait for on a CPU device)."""
    if not tensors or tensors[0].device.type != "cuda":
        return
    stream = torch.cuda.current_stream(tensors[0].device)
    stream.wait_event(event)
    for t in tensors:
        if t.numel():
            t.record_stream(stream)
