"""torch.save files loaded under an explicit allow-list (checkpoints/restricted_pickle.py): what the file holds when
it is allowed, one sentence naming the file and the refused class when it is not, and the allow-list left as it was."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from rlsub_tui.checkpoints.readers import load_pickle
from rlsub_tui.checkpoints.restricted_pickle import load_restricted
from rlsub_tui.util.errors import CheckpointError


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"model.norm.weight": rng.standard_normal(7).astype(np.float32),
            "lm_head.weight": rng.standard_normal((5, 3)).astype(np.float32)}


@pytest.mark.parametrize("zipped", [True, False])  # torch.save's zip archive and the bare pickle of older torch
def test_both_torch_save_formats_load_as_saved(tmp_path, zipped):
    file = tmp_path / "pytorch_model.bin"
    torch.save({n: torch.from_numpy(a) for n, a in weights().items()}, file, _use_new_zipfile_serialization=zipped)
    state = load_pickle(file)
    assert sorted(state) == sorted(weights())
    for name, a in weights().items():
        assert np.array_equal(state[name].numpy(), a), name


class TrainerNote:
    """A class of the writer's own, pickled by value (no code of its own runs when it is rebuilt)."""

    def __init__(self, step: int):
        self.step = step


def test_only_the_given_classes_are_allowed_and_the_users_list_is_restored(tmp_path):
    """A class the user allowed elsewhere is refused while a file loads under another list, and allowed again after."""
    file = tmp_path / "note.pt"
    torch.save({"note": TrainerNote(7)}, file)
    torch.serialization.add_safe_globals([TrainerNote])
    try:
        before = set(torch.serialization.get_safe_globals())
        with pytest.raises(CheckpointError) as refused:
            load_restricted(file, [], "not a plain tensor")
        assert str(refused.value) == (f"{file}: refused to load: it holds {__name__}.TrainerNote, which is not a "
                                      "plain tensor; nothing in it was run.")
        assert set(torch.serialization.get_safe_globals()) == before
        assert load_restricted(file, [TrainerNote], "not a plain tensor")["note"].step == 7
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals([g for g in before if g is not TrainerNote])


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_running(tmp_path: Path, file: Path) -> None:
    torch.save({"w": torch.zeros(2), "x": RunsCode(tmp_path / "ran")}, file)


def truncated(tmp_path: Path, file: Path) -> None:
    torch.save({"w": torch.zeros(100)}, file)
    os.truncate(file, file.stat().st_size // 2)


def not_a_checkpoint(tmp_path: Path, file: Path) -> None:
    file.write_bytes(b"these are not the weights you are looking for" * 4)


@pytest.mark.parametrize("spoil, needles", [
    (code_running, ["refused to load", f"{os.system.__module__}.system", "nothing in it was run"]),
    (truncated, ["not a whole torch.save archive", "truncated"]),
    (not_a_checkpoint, ["cannot be read as a PyTorch checkpoint", "neither a torch.save zip archive"]),
])
def test_bad_files_are_one_sentence_that_names_the_file(tmp_path, spoil, needles):
    file = tmp_path / "pytorch_model.bin"
    spoil(tmp_path, file)
    with pytest.raises(CheckpointError) as bad:
        load_pickle(file)
    message = str(bad.value)
    assert message.startswith(f"{file}: ") and len(message.splitlines()) == 1 and message[-1] in ".?"
    for needle in needles:
        assert needle in message, (needle, message)
    assert not (tmp_path / "ran").exists()
