"""The one-screen text summary that `rlsub-tui analyze` prints."""

from __future__ import annotations

from rlsub_tui.checkpoints.kinship import NOT_A_FINE_TUNE
from rlsub_tui.export.outputs import sweep_label, updated_when
from rlsub_tui.records.overlap import lift
from rlsub_tui.records.results import AnalysisResult
from rlsub_tui.records.timelines import PATCH_DENSE
from rlsub_tui.util.formatting import count, pct, ratio


def summary_text(result: AnalysisResult, max_pairs: int = 12) -> str:
    """The text `analyze` prints. Over 60 lines on purpose: it is the printed report's template, one
    statement per printed line, read top to bottom in the order the lines appear."""
    s = result.stats()
    lines = [
        f"base: {result.base_label} ({result.base_path})",
        f"runs: {result.k} ({', '.join(result.run_labels)})  ·  {s.tensors} tensors, {count(s.numel)} parameters"
        f"  ·  device {result.device}"
        + ("" if result.compare_dtype == "stored" else f"  ·  every pair compared in {result.compare_dtype}")
        + ("" if result.complete else "  ·  INCOMPLETE (cancelled)"),
        f"criterion: {result.criterion.describe()}: {updated_when(result)}",
        *([f"read as: {'; '.join(f'{label} ({how})' for label, how in zip(result.run_labels, result.run_read_as))}"]
          if result.run_read_as else []),
        "",
    ]
    plain = [n for n in result.notes if NOT_A_FINE_TUNE in n]
    if plain:
        lines[-1:-1] = [f"WARNING: {n}" for n in plain]
    sweep_cols = [sweep_label(t) for t in result.sweep]
    rw = min(max([len(x) for x in result.run_labels] + [3]), 40)
    fine = bool(s.fine_tensors.any())  # runs stored finer than bf16: their true updates beside the compared ones
    dw = max([len(_dtypes(s.compared_dtypes[i])) for i in range(result.k)] + [8])
    head = (f"{'run':<{rw}} {'compared':>{dw}} {'sparsity':>9} {'updated':>9}"
            + (f" {'true sp':>9} {'hid bf16':>9}" if fine else "")
            + f" {'rank/max':>9} {'e99/max':>8} {'NaN/Inf':>8}" + "".join(f" {c:>16}" for c in sweep_cols))
    lines.append(head)
    for i, label in enumerate(result.run_labels):
        row = (f"{label[:rw]:<{rw}} {_dtypes(s.compared_dtypes[i]):>{dw}} {pct(s.sparsity(i)):>9} "
               f"{count(int(s.updated[i])):>9}")
        if fine:
            row += f" {pct(s.true_sparsity(i)):>9} {pct(s.hidden_by_bf16(i)):>9}"
        row += (f" {pct(s.mean_rank_ratio(i)):>9} {pct(s.mean_spectrum_ratio('energy_rank_99', i)):>8} "
                f"{int(s.nonfinite[i]):>8}")
        row += "".join(f" {pct(s.sweep_sparsity(i, j)):>16}" for j in range(len(result.sweep)))
        lines.append(row)
    lines.append("compared: the dtype each run was compared with the base in (sparsity, updated and every overlap "
                 "below are in it)")
    if fine:
        stored = "/".join(sorted({d for ds in s.true_dtypes for d in ds}))
        lines.append(f"true sp: sparsity of the true updates, counted in the stored precision ({stored}) whatever "
                     "the comparison dtype; hid bf16: true updates with bf16(w1) = bf16(w0), of all true updates "
                     "(chart p); – for runs stored in bf16")
    pairs = list(s.pairs())
    if pairs:
        names = [f"{result.run_labels[a]} vs {result.run_labels[b]}" for a, b, _ in pairs[:max_pairs]]
        w = min(max(len(n) for n in names), 60)
        lines += ["", "o1 = |A∩B|/|A|, o2 = |A∩B|/|B|, chance |B|/n / |A|/n (every parameter alike), strat: per "
                      "tensor × |w0| exponent;", "jaccard = |A∩B|/|A∪B|, chance pq/(p+q-pq);  J lift = jaccard / "
                      "its chance, /strat = jaccard / its stratified chance",
                  f"{'pair':<{w}} {'o1':>7} {'o2':>7} {'chance':>15} {'strat':>15} {'jaccard':>8} {'chance':>7} "
                  f"{'strat':>7} {'J lift':>6} {'/strat':>6}"]
        for name, (a, b, p) in zip(names, pairs):
            lines.append(
                f"{name[:w]:<{w}} {pct(p['o1']):>7} {pct(p['o2']):>7} "
                f"{pct(p['o1_random']) + ' / ' + pct(p['o2_random']):>15} "
                f"{pct(p['o1_random_strat']) + ' / ' + pct(p['o2_random_strat']):>15} {ratio(p['jaccard'], 3):>8} "
                f"{ratio(p['jaccard_random'], 3):>7} {ratio(p['jaccard_random_strat'], 3):>7} "
                f"{ratio(lift(p['jaccard'], p['jaccard_random']), 2):>6} "
                f"{ratio(lift(p['jaccard'], p['jaccard_random_strat']), 2):>6}")
        if len(pairs) > max_pairs:
            lines.append(f"… and {len(pairs) - max_pairs} more pairs in pairs.csv / summary.json")
        chance, strat = s.agreement_chance(), s.agreement_chance_strat()
        share = (lambda c: c / s.numel) if s.numel else (lambda c: float("nan"))
        lines += ["", "updated by exactly j runs: observed (chance pooled / stratified):"]
        lines.append("  " + "  ".join(f"j={j}: {pct(share(s.agreement[j]))} "
                                       f"({pct(share(chance[j]))} / {pct(share(strat[j]))})"
                                       for j in range(result.k + 1)))
        lines.append(f"  consensus (all runs) {pct(s.consensus())} vs {pct(s.consensus_chance())} pooled, "
                     f"{pct(s.consensus_chance_strat())} stratified chance;  union {pct(s.union())};  "
                     f"same sign where 2+ runs updated: {pct(s.sign_agreement())} "
                     f"vs {pct(s.sign_agreement_chance())} if signs were coin flips")
    if result.skipped:
        lines += ["", f"{len(result.skipped)} tensor(s) skipped (see summary.json 'skipped'):"]
        for k in result.skipped[:5]:
            lines.append(f"  {k.tensor} [{k.run}]: {k.reason}")
        if len(result.skipped) > 5:
            lines.append(f"  … {len(result.skipped) - 5} more")
    return "\n".join(lines)


def _dtypes(names: set[str]) -> str:
    return "/".join(sorted(names)) or "–"


def timeline_text(timelines: list[dict]) -> str:
    """Per timeline run and step, pooled over tensors (export.timeline_summary's dicts)."""
    lines = []
    for t in timelines:
        lines += ["", f"timeline {t['label']} (step gap {t['step_gap']}):",
                  f"  {'step':>14} {'sp vs base':>10} {'sp vs prev':>10} {'overlap prev':>13} {'union dens':>10} "
                  f"{'patch/dense':>12}"]
        for s in t["per_step"]:
            prev = "" if s["prev_step"] is None else f"{s['prev_step']} → "
            overlap = "–" if s["overlap_prev"] is None else f"{pct(s['overlap_prev'])} ({pct(s['overlap_prev_random'])})"
            lines.append(f"  {prev + str(s['step']):>14} {pct(s['sparsity_vs_base']):>10} "
                         f"{pct(s['sparsity_vs_prev']):>10} "
                         f"{overlap:>13} {pct(s['union_density']):>10} "
                         f"{pct(s['patch_ratio']):>12}")
    if lines:
        lines.append("  (sp vs base / sp vs prev: sparsity against the base and the step before; overlap prev: share "
                     "of this step's updates also updated in the previous step, chance in brackets; union dens: "
                     "density of everything updated so far;")
        lines.append(f"   {PATCH_DENSE})")
    return "\n".join(lines)
