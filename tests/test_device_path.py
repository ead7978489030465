"""The pieces of the GPU path that run without a GPU: byte-range reads for pinned staging, out-of-memory handling."""

from __future__ import annotations

import pytest
import torch
from synthetic import base_state, save, sparse_run

from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.cli.main import main
from rlsub_tui.compute import engine
from rlsub_tui.util.errors import InputError


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize("rows", [None, 40])
def test_read_bytes_in_slices_equals_read(tmp_path, layout, rows):
    """Reading a tensor as byte ranges of any size (how pinned staging fills its slices) gives its bytes."""
    state = base_state(dtype=torch.float32)
    save(state, tmp_path / "ck", layout=layout)
    ck = open_checkpoint(str(tmp_path / "ck"))
    name = "model.embed_tokens.weight"
    shape, nbytes = ck.read_shape(name, rows)
    whole = state[name][:rows] if rows else state[name]
    assert shape == tuple(whole.shape) and nbytes == whole.numel() * 4
    expected = whole.contiguous().reshape(-1).view(torch.uint8)
    for slice_bytes in (1, 7, 1000, nbytes):
        got = torch.empty(nbytes, dtype=torch.uint8)
        for start in range(0, nbytes, slice_bytes):
            n = min(slice_bytes, nbytes - start)
            part = torch.empty(n, dtype=torch.uint8)
            ck.read_bytes(name, part, start)
            got[start:start + n] = part
        assert torch.equal(got, expected)
    assert torch.equal(ck.read(name, rows), whole)
    ck.close()


def test_out_of_memory_on_cpu_is_one_sentence(tmp_path, capsys, monkeypatch):
    b = base_state()
    save(b, tmp_path / "base")
    save(sparse_run(b, 0), tmp_path / "run")

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(engine, "compute_tensor", oom)
    code = main(["analyze", str(tmp_path / "base"), str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                 "--device", "cpu", "--quiet", "--no-cache", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [l for l in err.splitlines() if l.startswith("rlsub-tui: error:")]
    assert len(line) == 1 and "out of memory while comparing tensor '" in line[0], err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # what a worker process computes (analyze --workers N): the same sentence, an InputError it hands back
    analysis = engine.Analysis(str(tmp_path / "base"), [str(tmp_path / "run")],
                               engine.AnalysisOptions(device="cpu", use_cache=False))
    try:
        with pytest.raises(InputError, match="out of memory while comparing tensor '") as caught:
            analysis.compute_named(analysis.plans[0].name, [None])
    finally:
        analysis.close()
    in_process = line[0].removeprefix("rlsub-tui: error: ")
    assert str(caught.value) == in_process.removesuffix(".") + ", or use fewer --workers."


def test_cuda_device_is_named_with_its_index(monkeypatch):
    """'cuda' and 'auto' resolve to an indexed GPU, so the reader thread can set it (not create a context on 0)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert engine.resolve_device("cuda") == torch.device("cuda", 1)
    assert engine.resolve_device("auto") == torch.device("cuda", 1)
    assert engine.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(engine.InputError, match="only 2 CUDA device"):
        engine.resolve_device("cuda:2")
    calls = []

    def set_device(dev):
        if isinstance(dev, torch.device) and dev.index is None:
            raise ValueError("Expected a torch.device with a specified index")
        calls.append(dev)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    analysis = engine.Analysis.__new__(engine.Analysis)
    analysis.device = engine.resolve_device("cuda")
    analysis._reader_init()
    assert calls == [torch.device("cuda", 1)]
