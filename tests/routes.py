"""Which route the accumulator's chunks take (every position, or the changed ones alone), forced and checked."""

from __future__ import annotations

from rlsub_tui.compute import accumulate


def force_route(monkeypatch, route: str) -> list[bool]:
    """Send every chunk that may skip its unchanged positions down one route ("all" positions, or the
    "changed" ones alone); returns the list in which each such chunk records whether it skipped them."""
    monkeypatch.setattr(accumulate, "CHANGED_ONLY_BELOW", {"all": 0.0, "changed": 2.0}[route])
    skipped = []
    real = accumulate.TensorAccumulator._changed_positions

    def recorded(self, *args):
        chunk = real(self, *args)
        skipped.append(chunk.positions is not None)
        return chunk

    monkeypatch.setattr(accumulate.TensorAccumulator, "_changed_positions", recorded)
    return skipped


def check_route(skipped: list[bool], route: str, eligible: bool) -> None:
    """Every chunk took the route asked for, where the tensor could take it at all."""
    if not eligible:
        assert skipped == []
    else:
        assert skipped and all(skipped) == (route == "changed") and any(skipped) == (route == "changed")
