"""A memory-mapped rank file's pages leave the resident set once a tensor has been read out of them, and nothing
outside the file's mapping is ever touched."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from rlsub_tui.checkpoints.mapped_pages import MappedPages
from rlsub_tui.checkpoints.restricted_pickle import load_restricted

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")


def resident_kb(file) -> int:
    """The resident kB of every mapping of `file` in this process, as the kernel counts them."""
    want, total, inside = os.path.realpath(file), 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split(maxsplit=5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                inside = len(head) == 6 and head[5].rstrip("\n") == want
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.fixture
def saved(tmp_path):
    values = np.random.default_rng(0).standard_normal(4 << 20).astype(np.float32)  # 16 MiB
    file = tmp_path / "rank0.pt"
    torch.save({"w": torch.from_numpy(values.copy()), "b": torch.arange(10.0)}, file)
    return file, values


def test_pages_read_leave_the_resident_set_and_read_again_unchanged(saved):
    file, values = saved
    state = load_restricted(file, [], "not a tensor")
    pages = MappedPages(file)
    assert pages.ranges, "torch.load(mmap=True) maps the file"
    first = state["w"].clone()
    assert resident_kb(file) >= 15 * 1024
    pages.release(state["w"])
    assert resident_kb(file) < 1024
    np.testing.assert_array_equal(first.numpy(), values)
    np.testing.assert_array_equal(state["w"].numpy(), values)  # faulted in again from the file


def test_a_slice_gives_back_only_its_own_whole_pages(saved):
    file, values = saved
    state = load_restricted(file, [], "not a tensor")
    pages = MappedPages(file)
    state["w"].sum()  # every page resident
    before = resident_kb(file)
    half = state["w"][: 2 << 20]
    pages.release(half)
    after = resident_kb(file)
    assert 7 * 1024 <= before - after <= 8 * 1024 + 8
    np.testing.assert_array_equal(state["w"].numpy(), values)


def test_memory_outside_the_mapping_is_left_alone(saved):
    file, _ = saved
    load_restricted(file, [], "not a tensor")
    pages = MappedPages(file)
    ordinary = torch.arange(float(4 << 20))
    expected = ordinary.clone()
    pages.release(ordinary)  # MADV_DONTNEED on anonymous memory would zero it
    assert torch.equal(ordinary, expected)


def test_a_file_not_mapped_has_no_ranges(tmp_path):
    file = tmp_path / "old.pt"
    torch.save({"w": torch.ones(3)}, file, _use_new_zipfile_serialization=False)  # a bare pickle: read, not mapped
    state = load_restricted(file, [], "not a tensor")
    pages = MappedPages(file)
    assert pages.ranges == []
    pages.release(state["w"])
    assert torch.equal(state["w"], torch.ones(3))


@pytest.mark.parametrize("layout", ["fsdp", "pickle"])
def test_reading_a_whole_checkpoint_leaves_little_of_it_resident(tmp_path, layout):
    """Every tensor of a verl rank file (W = 1: plain tensors) or a pytorch_model.bin read through the checkpoint
    reader: the file's pages are given back as they are read, so at the end little of it is resident."""
    from rlsub_tui.checkpoints.checkpoint import open_checkpoint

    g = torch.Generator().manual_seed(0)
    state = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 2048, generator=g) for i in range(4)}  # 16 MiB
    if layout == "fsdp":
        file = tmp_path / "actor" / "model_world_size_1_rank_0.pt"
        file.parent.mkdir()
        (file.parent / "fsdp_config.json").write_text('{"FSDP_version": 2, "world_size": 1}')
    else:
        file = tmp_path / "run" / "pytorch_model.bin"
        file.parent.mkdir()
    torch.save(state, file)
    ckpt = open_checkpoint(str(file.parent))
    for name, want in state.items():
        assert torch.equal(ckpt.read(name), want), name
    assert resident_kb(file) < 1024
    ckpt.close()
