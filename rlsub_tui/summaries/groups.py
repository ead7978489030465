"""Run groups (the same recipe under several seeds): from --group NAME=GLOB or shared label prefixes, and overlap
within each group against overlap between groups."""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from rlsub_tui.records import overlap
from rlsub_tui.records.results import Stats
from rlsub_tui.util.errors import InputError

# a trailing seed or replicate number: "-seed3", "_s2", ".run1", "-3"
SEED_SUFFIX = re.compile(r"[-_.]?(seed|s|run|rep)?[-_]?\d+$", re.IGNORECASE)


@dataclass
class RunGroup:
    name: str
    runs: tuple[int, ...]


def parse_group(text: str) -> tuple[str, str]:
    """'NAME=GLOB' -> (NAME, GLOB), for argparse."""
    name, eq, glob = text.partition("=")
    if not eq or not name.strip() or not glob.strip():
        raise ValueError(f"--group {text!r}: write NAME=GLOB, e.g. lowlr='grpo-lowlr-*'")
    return name.strip(), glob.strip()


def named_groups(specs: list[tuple[str, str]], labels: list[str]) -> list[RunGroup]:
    """Groups from --group NAME=GLOB (in the order given); a run matched by two groups, or a group matching
    no run, is refused."""
    groups, owner = [], {}
    for name, glob in specs:
        runs = tuple(i for i, label in enumerate(labels) if fnmatch.fnmatchcase(label, glob))
        if not runs:
            raise InputError(f"--group {name}={glob}: matches no run; the runs are {', '.join(labels)}.")
        for i in runs:
            if i in owner:
                raise InputError(f"--group {name}={glob}: run {labels[i]} is already in group {owner[i]}.")
            owner[i] = name
        groups.append(RunGroup(name, runs))
    return groups


def automatic_groups(labels: list[str]) -> list[RunGroup]:
    """Runs whose labels differ only by a trailing seed number form a group (grpo-lowlr-seed1..3 -> grpo-lowlr);
    none when no two runs share a prefix."""
    by_prefix: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        prefix = SEED_SUFFIX.sub("", label) or label
        by_prefix.setdefault(prefix, []).append(i)
    if all(len(v) < 2 for v in by_prefix.values()):
        return []
    return [RunGroup(name, tuple(runs)) for name, runs in by_prefix.items()]


def group_of(groups: list[RunGroup], k: int) -> list[str]:
    """Each run's group name ('' when in none)."""
    names = [""] * k
    for g in groups:
        for i in g.runs:
            names[i] = g.name
    return names


@dataclass
class BlockFigure:
    """Mean overlap over the run pairs between (or, on the diagonal, within) two groups, and its chance."""

    group_a: str
    group_b: str
    pairs: int
    o1: float
    o1_random: float
    jaccard: float
    jaccard_random: float
    o1_random_strat: float = math.nan
    jaccard_random_strat: float = math.nan

    def lift(self, measure: str) -> float:
        obs, rnd = (self.jaccard, self.jaccard_random) if measure == "jaccard" else (self.o1, self.o1_random)
        return overlap.lift(obs, rnd)

    def lift_strat(self, measure: str) -> float:
        """Observed over the stratified chance (strata: tensor × exponent of |w0|)."""
        obs, rnd = ((self.jaccard, self.jaccard_random_strat) if measure == "jaccard"
                    else (self.o1, self.o1_random_strat))
        return overlap.lift(obs, rnd)


def block(stats: Stats, ga: RunGroup, gb: RunGroup, chosen: tuple[int, ...] | None = None) -> BlockFigure:
    """Pairs (a in ga, b in gb, a ≠ b, each pair once); o1 is averaged over both directions (|A∩B|/|A| and
    |A∩B|/|B|), as in the summary strip."""
    keep = set(range(stats.k) if chosen is None else chosen)
    pairs = {(min(a, b), max(a, b)) for a in ga.runs for b in gb.runs if a != b and a in keep and b in keep}
    return _figure(ga.name, gb.name, [stats.pair(a, b) for a, b in sorted(pairs)])


def _figure(group_a: str, group_b: str, ps: list[dict]) -> BlockFigure:
    return BlockFigure(group_a, group_b, len(ps), overlap.nan_mean([p["o1"] for p in ps] + [p["o2"] for p in ps]),
                       overlap.nan_mean([p["o1_random"] for p in ps] + [p["o2_random"] for p in ps]),
                       overlap.nan_mean([p["jaccard"] for p in ps]), overlap.nan_mean([p["jaccard_random"] for p in ps]),
                       overlap.nan_mean([p["o1_random_strat"] for p in ps] + [p["o2_random_strat"] for p in ps]),
                       overlap.nan_mean([p["jaccard_random_strat"] for p in ps]))


def blocks(stats: Stats, groups: list[RunGroup], chosen: tuple[int, ...] | None = None) -> list[list[BlockFigure]]:
    return [[block(stats, ga, gb, chosen) for gb in groups] for ga in groups]


def within_between(stats: Stats, groups: list[RunGroup], chosen: tuple[int, ...] | None = None
                   ) -> tuple[BlockFigure, BlockFigure]:
    """Pooled over all groups: the mean over pairs inside a group, and over pairs across two groups."""
    keep = set(range(stats.k) if chosen is None else chosen)
    owner = {i: g.name for g in groups for i in g.runs}
    inside, across = [], []
    for a in range(stats.k):
        for b in range(a + 1, stats.k):
            if a in keep and b in keep and a in owner and b in owner:
                (inside if owner[a] == owner[b] else across).append(stats.pair(a, b))
    return _figure("within", "within", inside), _figure("between", "between", across)


def resolve_groups(specs: list[tuple[str, str]] | None, labels: list[str]) -> list[RunGroup]:
    """--group specs when given, else groups from shared label prefixes (possibly none)."""
    return named_groups(specs, labels) if specs else automatic_groups(labels)


def group_summary(stats: Stats, groups: list[RunGroup], labels: list[str]) -> dict:
    """For summary.json: the groups, every block (within on the diagonal) and the pooled within/between."""
    def as_dict(f: BlockFigure) -> dict:
        out = {"group_a": f.group_a, "group_b": f.group_b, "pairs": f.pairs}
        for key in ("o1", "o1_random", "o1_random_strat", "jaccard", "jaccard_random", "jaccard_random_strat"):
            value = getattr(f, key)
            out[key] = None if math.isnan(value) else value
        for measure in ("o1", "jaccard"):
            for name, lift in ((f"{measure}_lift", f.lift(measure)), (f"{measure}_lift_strat", f.lift_strat(measure))):
                out[name] = None if math.isnan(lift) else lift
        return out

    grid = blocks(stats, groups)
    within, between = within_between(stats, groups)
    return {
        "groups": [{"name": g.name, "runs": [labels[i] for i in g.runs]} for g in groups],
        "blocks": [as_dict(grid[a][b]) for a in range(len(groups)) for b in range(a, len(groups))],
        "within": as_dict(within), "between": as_dict(between),
    }
