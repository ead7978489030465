"""The header reader and one reader per layout, against safetensors' own loader and torch.load."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from synthetic import base_state, save

from rlsub_tui.checkpoints.checkpoint import open_checkpoint
from rlsub_tui.checkpoints.readers import PickledStateDict, SafetensorsFile, ShardedSafetensors
from rlsub_tui.checkpoints.safetensors_header import DTYPE_SIZES, read_header
from rlsub_tui.util.errors import CheckpointError

SHAPES = {"model.embed_tokens.weight": (50, 16), "model.layers.0.self_attn.q_proj.weight": (16, 16),
          "model.layers.0.mlp.up_proj.weight": (40, 16), "model.norm.weight": (16,)}


def expected(directory: Path, layout: str) -> dict[str, torch.Tensor]:
    """The tensors as safetensors' loader (or torch.load) sees them."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    out = {}
    for f in files:
        out.update(load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return out


@pytest.mark.parametrize("layout,kind", [("safetensors", SafetensorsFile), ("sharded", ShardedSafetensors),
                                         ("bin", PickledStateDict), ("bin-sharded", PickledStateDict)])
def test_each_layout_reads_what_the_files_hold(tmp_path, layout, kind):
    state = base_state(shapes=SHAPES)
    save(state, tmp_path / "ck", layout=layout)
    ck = open_checkpoint(str(tmp_path / "ck"))
    assert isinstance(ck.reader, kind)
    truth = expected(tmp_path / "ck", layout)
    assert set(ck.tensors) == set(truth) == set(state)
    for name, t in truth.items():
        assert torch.equal(ck.read(name), t) and ck.read(name).dtype == t.dtype
        assert torch.equal(ck.read(name, rows=3), t[:3])
        shape, nbytes = ck.read_shape(name, rows=3)
        assert shape == tuple(t[:3].shape) and nbytes == t[:3].numel() * t.element_size()
        buf = torch.empty(nbytes - 2, dtype=torch.uint8)
        ck.read_bytes(name, buf, 2)
        assert torch.equal(buf, t.contiguous().reshape(-1).view(torch.uint8)[2:nbytes])
    ck.close()


def test_header_entries_match_safe_open(tmp_path):
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
             "c": torch.zeros((), dtype=torch.int64), "d": torch.zeros((0, 5), dtype=torch.float16)}
    save(state, tmp_path / "ck")
    file = tmp_path / "ck" / "model.safetensors"
    entries = read_header(file)
    raw = file.read_bytes()
    with safe_open(str(file), "pt") as fh:
        assert set(entries) == set(fh.keys())
        for name, e in entries.items():
            t = fh.get_tensor(name)
            assert e.shape == tuple(t.shape) and e.nbytes == t.numel() * DTYPE_SIZES[e.dtype]
            assert raw[e.offset:e.offset + e.nbytes] == t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_the_header_reader_imports_no_torch():
    code = ("import sys; import rlsub_tui.checkpoints.safetensors_header, rlsub_tui.checkpoints.preview, rlsub_tui.checkpoints.locate; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


def test_duplicate_name_across_shards_is_refused(tmp_path):
    d = tmp_path / "ck"
    save({"x": torch.ones(2)}, d, layout="sharded", shards=1)
    shards = sorted(d.glob("*.safetensors"))
    other = d / "other.safetensors"
    other.write_bytes(shards[0].read_bytes())
    with pytest.raises(CheckpointError, match=r"tensor 'x' also appears in"):
        ShardedSafetensors([shards[0], other])


def test_bad_size_field_named_once(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(struct.pack("<Q", 10 ** 6) + json.dumps({}).encode())
    with pytest.raises(CheckpointError, match=r"bad.safetensors: header size 1000000 is larger than the file"):
        read_header(f)
