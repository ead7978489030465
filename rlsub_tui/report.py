"""The one-screen text summary that `rlsub-tui analyze` prints."""

from __future__ import annotations

from rlsub_tui.export import sweep_label, updated_when
from rlsub_tui.kinship import NOT_A_FINE_TUNE
from rlsub_tui.formatting import count, pct, ratio
from rlsub_tui.results import AnalysisResult


def summary_text(result: AnalysisResult, max_pairs: int = 12) -> str:
    s = result.stats()
    lines = [
        f"base: {result.base_label} ({result.base_path})",
        f"runs: {result.k} ({', '.join(result.run_labels)})  ·  {s.tensors} tensors, {count(s.numel)} parameters"
        f"  ·  device {result.device}" + ("" if result.complete else "  ·  INCOMPLETE (cancelled)"),
        f"criterion: {result.criterion.describe()}: {updated_when(result)}",
        "",
    ]
    plain = [n for n in result.notes if NOT_A_FINE_TUNE in n]
    if plain:
        lines[-1:-1] = [f"WARNING: {n}" for n in plain]
    sweep_cols = [sweep_label(t) for t in result.sweep]
    rw = min(max([len(x) for x in result.run_labels] + [3]), 40)
    head = f"{'run':<{rw}} {'sparsity':>9} {'updated':>9} {'rank/max':>9} {'NaN/Inf':>8}" + "".join(
        f" {c:>16}" for c in sweep_cols)
    lines.append(head)
    for i, label in enumerate(result.run_labels):
        row = (f"{label[:rw]:<{rw}} {pct(s.sparsity(i)):>9} {count(int(s.updated[i])):>9} "
               f"{pct(s.mean_rank_ratio(i)):>9} {int(s.nonfinite[i]):>8}")
        row += "".join(f" {pct(s.sweep_sparsity(i, j)):>16}" for j in range(len(result.sweep)))
        lines.append(row)
    pairs = list(s.pairs())
    if pairs:
        names = [f"{result.run_labels[a]} vs {result.run_labels[b]}" for a, b, _ in pairs[:max_pairs]]
        w = min(max(len(n) for n in names), 60)
        lines += ["", "o1 = |A∩B|/|A|, o2 = |A∩B|/|B|, chance |B|/n / |A|/n;  jaccard = |A∩B|/|A∪B|, chance "
                      "pq/(p+q-pq);  J lift = jaccard / its chance",
                  f"{'pair':<{w}} {'o1':>7} {'o2':>7} {'chance':>15} {'jaccard':>8} {'chance':>7} {'J lift':>6}"]
        for name, (a, b, p) in zip(names, pairs):
            lift = p["jaccard"] / p["jaccard_random"] if p["jaccard_random"] else float("nan")
            lines.append(
                f"{name[:w]:<{w}} {pct(p['o1']):>7} {pct(p['o2']):>7} "
                f"{pct(p['o1_random']) + ' / ' + pct(p['o2_random']):>15} {ratio(p['jaccard'], 3):>8} "
                f"{ratio(p['jaccard_random'], 3):>7} {ratio(lift, 2):>6}")
        if len(pairs) > max_pairs:
            lines.append(f"… and {len(pairs) - max_pairs} more pairs in pairs.csv / summary.json")
        chance = s.agreement_chance()
        lines += ["", "updated by exactly j runs (observed vs independent-runs chance):"]
        lines.append("  " + "  ".join(f"j={j}: {pct(s.agreement[j] / s.numel if s.numel else float('nan'))} "
                                       f"({pct(chance[j] / s.numel if s.numel else float('nan'))})"
                                       for j in range(result.k + 1)))
        lines.append(f"  consensus (all runs) {pct(s.consensus())} vs {pct(s.consensus_chance())} by chance;  "
                     f"union {pct(s.union())};  same sign where 2+ runs updated: {pct(s.sign_agreement())} "
                     f"vs {pct(s.sign_agreement_chance())} if signs were coin flips")
    if result.skipped:
        lines += ["", f"{len(result.skipped)} tensor(s) skipped (see summary.json 'skipped'):"]
        for k in result.skipped[:5]:
            lines.append(f"  {k.tensor} [{k.run}]: {k.reason}")
        if len(result.skipped) > 5:
            lines.append(f"  … {len(result.skipped) - 5} more")
    return "\n".join(lines)
