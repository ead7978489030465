"""Measure the generated sample with our own engine, for sample_data/README.md and training.json."""

from __future__ import annotations

import tempfile
from pathlib import Path

from rlsub_tui.checkpoints.step_folders import resolve_runs
from rlsub_tui.compute.engine import Analysis
from rlsub_tui.compute.timeline import TimelineAnalysis
from rlsub_tui.export.outputs import directions_summary, timeline_summary
from rlsub_tui.records.criteria import ULP_LOG2_MIN, AnalysisOptions, Criterion
from rlsub_tui.records.results import SPECTRUM_RATIOS

# family -> (base, runs)
FAMILIES = {
    "grpo-lowlr": ("base", ["grpo-lowlr-seed1", "grpo-lowlr-seed2", "grpo-lowlr-seed3"]),
    "grpo-highlr": ("base", ["grpo-highlr-seed1", "grpo-highlr-seed2", "grpo-highlr-seed3"]),
    "sft": ("base", ["sft"]),
    "fp32": ("base-fp32", ["fp32-grpo-lowlr-seed1"]),
    # one RL seed beside the SFT run: whether the two objectives update the same entries and directions
    "sft-and-grpo": ("base", ["grpo-lowlr-seed1", "sft"]),
}


def measure(root: Path) -> dict:
    out = {}
    for family, (base, names) in FAMILIES.items():
        paths = [str(root / n) for n in names if (root / n).is_dir()]
        if not paths or not (root / base).is_dir():
            continue
        resolved = resolve_runs(paths)  # a timeline stands for its last step
        a = Analysis(str(root / base), [f"{label}={path}" if label else path for label, path in zip(resolved.labels, resolved.paths)],
                     AnalysisOptions(criterion=Criterion("atol", 1e-5), sweep=(1e-8, 1e-7, 1e-6, 1e-5),
                                     use_cache=False, device="cpu"))
        result = a.run_all()
        a.close()
        s = result.stats()
        fam = {"runs": {}}
        for i, label in enumerate(result.run_labels):
            fam["runs"][label] = {
                "sparsity": s.sparsity(i),
                "sparsity_sweep": [s.sweep_sparsity(i, j) for j in range(len(result.sweep))],
                "mean_rank_ratio": s.mean_rank_ratio(i),
                **{f"mean_{f}_ratio": s.mean_spectrum_ratio(f, i) for f in SPECTRUM_RATIOS},
                **precision_and_lines(s, i),
            }
        pairs = [dict(run_a=result.run_labels[x], run_b=result.run_labels[y], **p) for x, y, p in s.pairs()]
        fam["pairs"] = pairs
        fam["consensus"] = s.consensus()
        fam["consensus_chance"] = s.consensus_chance()
        fam["consensus_chance_strat"] = s.consensus_chance_strat()
        fam["sign_agreement"] = s.sign_agreement()
        fam["directions"] = directions_summary(result, s)
        norms = result.stats([n for n in result.tensors if "norm" in n])
        fam["norm_sparsity_mean"] = norms.mean_sparsity()
        if resolved.timelines:
            t = TimelineAnalysis(str(root / base), [(result.run_labels[i], tl) for i, tl in
                                                    sorted(resolved.timelines.items())], Criterion("atol", 1e-5))
            fam["timelines"] = timeline_summary(t.run())
            t.close()
        out[family] = fam
    exact = _fp32_exact(root)
    if exact:
        out["fp32_exact"] = exact
    return out


def precision_and_lines(s, i: int) -> dict:
    """Run i's hidden share, share of true updates below half a bf16 ULP (r < 1), rows and columns (docs/measures.md)."""
    rows, rows_chance = s.touched("rows", i)
    cols, cols_chance = s.touched("cols", i)
    hist, total = s.ulp_histogram[i], int(s.ulp_histogram[i].sum())
    below = int(hist[:-1 - ULP_LOG2_MIN].sum())  # bins x <= -2, i.e. log2 r = x + 1 < 0
    figures = {"hidden_by_bf16": s.hidden_by_bf16(i), "below_half_ulp": below / total if total else None,
               "row_share": rows, "row_share_chance": rows_chance, "col_share": cols, "col_share_chance": cols_chance}
    return {k: None if v is None or v != v else float(v) for k, v in figures.items()}  # JSON: no NaN


def _fp32_exact(root: Path) -> dict:
    """The fp32 pair under `exact`: every stored change is a true update, so the hidden share is the whole story."""
    base, names = FAMILIES["fp32"]
    if not (root / base).is_dir() or not all((root / n).is_dir() for n in names):
        return {}
    a = Analysis(str(root / base), [str(root / n) for n in names],
                 AnalysisOptions(criterion=Criterion("exact"), rank=False, use_cache=False, device="cpu"))
    result = a.run_all()
    a.close()
    s = result.stats()
    return {"runs": {label: {"sparsity": s.sparsity(i), **precision_and_lines(s, i)}
                     for i, label in enumerate(result.run_labels)}}


def measure_transplant(root: Path, model_cfg, held_out) -> dict:
    """Held-out accuracy of the base plus the lowlr seeds' consensus update (from seed 1), and a random control."""
    from rlsub_tui.compute.maskfile import write_mask_file
    from rlsub_tui.compute.transplant import transplant
    from rlsub_tui.sample import train

    seeds = [str(root / f"grpo-lowlr-seed{s}") for s in (1, 2, 3)]
    with tempfile.TemporaryDirectory() as tmp:
        mask = Path(tmp) / "consensus.safetensors"
        made = write_mask_file(str(root / "base"), seeds, mask, Criterion("atol", 1e-5))
        run = resolve_runs(seeds[:1]).paths[0]  # a timeline's last step is the run
        report = transplant(str(root / "base"), run, mask, Path(tmp) / "consensus", control_seed=0)
        acc = {o.kind: train.accuracy(train.load_model(o.path, model_cfg), held_out) for o in report.outputs}
    transplanted, control = report.outputs
    return {
        "run": "grpo-lowlr-seed1", "mask": "consensus of grpo-lowlr-seed1..3 (atol 1e-5)", "control_seed": 0,
        "numel": made.numel, "mask_true": made.true[0], "run_changed": report.run_differs,
        "transplant_changed": transplanted.changed_from_base, "control_changed": control.changed_from_base,
        "accuracy_transplant": acc["transplant"], "accuracy_control": acc["random-control"],
    }


def _p(x) -> str:
    return "–" if x is None or x != x else f"{100 * x:.1f}%"


def _r(x) -> str:
    return "–" if x is None or x != x else f"{x:.3f}"


def spectrum_table(m: dict) -> list[str]:
    """Per run, the mean over matrices of each spectrum figure / min(m, n) (docs/measures.md: "Spectrum of the update")."""
    lines = ["", "Spectrum of the updates (mean over the 2-D matrices of each figure / min(m, n); README):", "",
             "| checkpoint | rank | stable rank | energy rank 90% | energy rank 99% | effective rank |",
             "|---|---|---|---|---|---|"]
    for fam in ("grpo-lowlr", "grpo-highlr", "sft", "fp32"):
        for label, v in m.get(fam, {}).get("runs", {}).items():
            lines.append(f"| {label} | {_p(v['mean_rank_ratio'])} | "
                         + " | ".join(_p(v.get(f"mean_{f}_ratio")) for f in SPECTRUM_RATIOS) + " |")
    return lines


def render_readme(record: dict) -> str:
    """sample_data/README.md, written by the generator from what it trained and measured.

    Over 60 lines on purpose: it is the README's template, its lines in the order the file shows them."""
    m, acc, cfg = record["measurements"], record["held_out_accuracy"], record["model"]
    runs = record["runs"]
    lines = [
        "# The bundled sample: a tiny Llama, a base, GRPO from three seeds at two learning rates, and SFT",
        "",
        "Everything here was trained on a CPU by `python -m rlsub_tui.sample --out sample_data` (deterministic on one",
        "machine given the seeds: one thread per process). This file, `training.json` and `SHA256SUMS.json` are",
        "written by that command.",
        "",
        *base_note(record),
        "## What was trained",
        f"- **Model**: Llama architecture (RMSNorm, rotary embeddings, SwiGLU MLP, grouped-query attention), "
        f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, "
        f"{cfg['num_attention_heads']} heads / {cfg['num_key_value_heads']} KV heads, vocabulary {cfg['vocab_size']} "
        "(digits, +, =, BOS, EOS, PAD and one never-used token), untied head; Hugging Face names and a "
        "`config.json` that `transformers.LlamaForCausalLM` loads.",
        f"- **Task**: {record['task']}; reward 1 for an exactly right answer. Held-out accuracy is greedy decoding "
        f"on all {record['held_out_prompts']} held-out prompts.",
        f"- **Base**: trained from scratch with cross-entropy on correct answers, {record['pretrain']['steps']} steps, "
        f"batch {record['pretrain']['batch']}, AdamW lr {record['pretrain']['lr']:g}, stopped while it is right "
        "sometimes and wrong often; saved in bf16. Every run starts from this bf16 base.",
        "- **GRPO**: per step 16 prompts x 8 sampled answers (temperature 1), advantages normalised within each "
        "group, clipped policy ratio (0.2) over 2 updates per batch, no KL term, Adam (0.9, 0.95), no weight decay, "
        "gradient clipping 1.0, fp32 master weights and Adam state; final weights saved in bf16.",
    ]
    steps_taken = record.get("optimizer_steps", {})
    for name, r in sorted(runs.items()):
        c = r["config"]
        snaps = list(c.get("snapshots") or [])
        where = (f", saved at steps {', '.join(map(str, snaps + [c['steps']]))} as `{name}/checkpoint-STEP` "
                 "(a timeline; the last is the run)" if snaps else "")
        taken = f", {steps_taken[name]} optimiser steps" if name in steps_taken else ""
        lines.append(f"  - `{name}`: {r['kind']}, {c['steps']} steps{taken}, lr {c['lr']:g}, seed {c['seed']}{where}")
    lines += [
        sft_line(record),
        "- `fp32-grpo-lowlr-seed1`: the same weights as `grpo-lowlr-seed1` saved in fp32; `base-fp32` is the bf16 "
        "base stored in fp32 (identical values), to compare the two without rounding to bf16.",
        "",
        "## What was measured (by rlsub-tui's own engine, atol 1e-5 unless said)",
        "",
        "| checkpoint | held-out accuracy | sparsity | sparsity at 1e-8 / 1e-7 / 1e-6 / 1e-5 | mean rank ratio |",
        "|---|---|---|---|---|",
        f"| base | {_p(acc['base'])} | | | |",
    ]
    for fam in ("grpo-lowlr", "grpo-highlr", "sft", "fp32"):
        for label, v in m.get(fam, {}).get("runs", {}).items():
            sweep = " / ".join(_p(x) for x in v["sparsity_sweep"])
            lines.append(f"| {label} | {_p(acc.get(label))} | {_p(v['sparsity'])} | {sweep} | "
                         f"{_p(v['mean_rank_ratio'])} |")
    lines += spectrum_table(m)
    lines += precision_table(m)
    lines += ["", "Cross-seed overlap within each GRPO family, observed against two chance levels: the paper's "
              "(every parameter alike) and the stratified one (per tensor × binary exponent of |w0|, README):", "",
              "| pair | o1 | o2 | o1 chance | o2 chance | o1 / o2 chance, stratified | Jaccard | Jaccard chance "
              "| Jaccard chance, stratified |", "|---|---|---|---|---|---|---|---|---|"]
    for fam in ("grpo-lowlr", "grpo-highlr"):
        for p in m.get(fam, {}).get("pairs", []):
            lines.append(f"| {p['run_a']} vs {p['run_b']} | {_p(p['o1'])} | {_p(p['o2'])} | {_p(p['o1_random'])} | "
                         f"{_p(p['o2_random'])} | {_p(p.get('o1_random_strat'))} / {_p(p.get('o2_random_strat'))} | "
                         f"{p['jaccard']:.3f} | {p['jaccard_random']:.3f} | {_r(p.get('jaccard_random_strat'))} |")
    lines.append("")
    for fam in ("grpo-lowlr", "grpo-highlr"):
        f = m.get(fam)
        if f:
            lines.append(f"- `{fam}`: updated by all three seeds {_p(f['consensus'])} of parameters against "
                         f"{_p(f['consensus_chance'])} for independent runs ({_p(f.get('consensus_chance_strat'))} "
                         f"stratified); where two or more seeds updated a "
                         f"parameter, {_p(f['sign_agreement'])} moved it in the same direction; norm weights "
                         f"{_p(f['norm_sparsity_mean'])} sparse.")
    lines += directions_lines(m)
    lines += timeline_lines(m) + transplant_lines(m, acc)
    lines += [
        "",
        "## What it shows, honestly",
        "",
        "RL here works: held-out accuracy rises in every run. But on a model this small the updates are *dense*,",
        "not the 70-95% sparsity the paper reports for large models: an Adam step moves a weight by about lr,",
        "and over hundreds of steps that exceeds half a bf16 ULP (0.2-0.4% of a weight of typical size 0.02) for",
        "most weights. A trial reported in the project's issue found that learning rates low enough to leave",
        "most weights unchanged (1e-6) barely moved the accuracy, so this sample does not reproduce the sparse",
        "regime; it does show what the explorer is for.",
        "",
        "- The seeds update nearly the same set: overlap, Jaccard and consensus above their chance levels, and",
        "  updates of the same sign where seeds agree. The margin over chance is small because chance is high",
        "  when 90% of parameters change.",
        "- Norm weights are left alone far more often than matrices.",
        f"- Rank: {spectrum_sentence(m)}",
        f"- A fairer chance level: {strat_sentence(m)}",
        f"- SFT vs RL: {sft_sentence(m, record)}",
        f"- bf16 vs fp32: {fp32_sentence(m)}",
        f"- Hidden by bf16: {hidden_sentence(m)}",
        f"- Rows and columns: {lines_sentence(m)}",
        f"- Directions: {directions_sentence(m)}",
        *([f"- The subnetwork: {transplant_sentence(m, acc, record['held_out_prompts'])}"]
          if m.get("transplant") else []),
        "",
        "Open the GRPO runs (the default) with `rlsub-tui`"
        + (" (key `t` draws the focused node's timeline for the `grpo-lowlr` seeds)"
           if m.get("grpo-lowlr", {}).get("timelines") else "") + "; add the SFT contrast or the fp32 pair by naming them:",
        "",
        "    S=$(python -c 'from rlsub_tui.checkpoints.sample_paths import sample_dir; print(sample_dir())')",
        "    rlsub-tui $S/base $S/grpo-lowlr-seed* sft=$S/sft",
        "    rlsub-tui $S/base-fp32 $S/fp32-grpo-lowlr-seed1 --criterion exact",
        "",
    ]
    return "\n".join(lines)


DIRECTION_ROWS = (("grpo-lowlr", "the three `grpo-lowlr` seeds"), ("grpo-highlr", "the three `grpo-highlr` seeds"),
                  ("sft-and-grpo", "`grpo-lowlr-seed1` and `sft`"), ("sft", "`sft`"))


def _d(figure: dict | None) -> str:
    """An overlap with its chance, `.xx (.yy)`; – where none was measured."""
    if not figure or figure.get("overlap") is None:
        return "–"
    return f"{figure['overlap']:.3f} ({figure['chance']:.3f})"


def directions_lines(m: dict) -> list[str]:
    """The subspace overlaps beside the entry overlaps: pairs of runs, and each run with the base weight's own top
    directions, at k = the smaller energy rank 90% and at k = 8 (docs/measures.md: dirL, dirR)."""
    if not any((m.get(fam) or {}).get("directions") for fam, _ in DIRECTION_ROWS):
        return []
    lines = ["", "The same directions, not only the same entries: the overlap of the runs' top-k singular subspaces "
             "(the mean squared cosine of their principal angles, pooled over the 2-D matrices weighted by k; "
             "chance k/m for left, k/n for right, in brackets), between the runs and of each run with the base "
             "weight's own top-k directions (docs/measures.md: dirL, dirR, W0 dirL, W0 dirR):", "",
             "| runs | k | left, pairs | right, pairs | left, with the base | right, with the base |",
             "|---|---|---|---|---|---|"]
    for fam, label in DIRECTION_ROWS:
        d = (m.get(fam) or {}).get("directions")
        if not d:
            continue
        for rule, k in (("e90", "energy rank 90%"), ("k8", "8")):
            e = d.get(rule, {})
            cells = [_d(e.get(side, {}).get(part)) for part in ("pairs", "with_base") for side in ("left", "right")]
            lines.append(f"| {label} | {k} | " + " | ".join(cells) + " |")
    return lines


def directions_sentence(m: dict) -> str:
    """What the direction overlaps say next to the entry overlaps, in the sample's own figures."""
    try:
        e90 = {fam: m[fam]["directions"]["e90"] for fam in ("grpo-lowlr", "grpo-highlr", "sft-and-grpo", "sft")}
        entry_pairs = [p for fam in ("grpo-lowlr", "grpo-highlr") for p in m[fam]["pairs"]]
    except (KeyError, TypeError):
        return "not measured."
    rl = [e90[f][side]["pairs"] for f in ("grpo-lowlr", "grpo-highlr") for side in ("left", "right")]
    cross = [e90["sft-and-grpo"][side]["pairs"] for side in ("left", "right")]
    own = [e90[f][side]["with_base"] for f in ("grpo-lowlr", "grpo-highlr", "sft") for side in ("left", "right")]
    if any(x["overlap"] is None or x["lift"] is None for x in rl + cross + own):
        return "not measured."
    entry = [p["jaccard"] / p["jaccard_random_strat"] for p in entry_pairs if p.get("jaccard_random_strat")]
    rl_low, cross_high = min(x["overlap"] for x in rl), max(x["overlap"] for x in cross)
    alike = cross_high >= 0.9 * rl_low
    shared = ("nearly as much as the RL seeds do each other" if alike else "less than the RL seeds do each other")
    meaning = ("on this sample the shared directions belong to the model and the task, not to RL" if alike else
               "part of what the seeds share is RL's own")
    return (f"at k = each matrix's energy rank 90%, the GRPO seeds' top subspaces overlap "
            f"{min(x['overlap'] for x in rl):.2f}-{max(x['overlap'] for x in rl):.2f} against a chance of "
            f"{min(x['chance'] for x in rl):.2f}-{max(x['chance'] for x in rl):.2f} "
            f"({min(x['lift'] for x in rl):.0f}-{max(x['lift'] for x in rl):.0f}x), where their entries' Jaccard "
            f"stood at {min(entry):.2f}-{max(entry):.2f}x its stratified chance: the seeds move the same directions "
            f"even where entry overlap cannot tell them from chance. But `grpo-lowlr-seed1` and `sft` share theirs "
            f"{shared} ({cross[0]['overlap']:.2f} left, {cross[1]['overlap']:.2f} right), so {meaning}; and every run's top directions meet "
            f"the base weight's own at {min(x['overlap'] for x in own):.2f}-{max(x['overlap'] for x in own):.2f} "
            f"(chance {min(x['chance'] for x in own):.2f}-{max(x['chance'] for x in own):.2f}).")


def precision_table(m: dict) -> list[str]:
    """Per run: hidden by bf16, true updates below half a bf16 ULP, rows and columns holding an update."""
    lines = ["", "Precision and structure (README: \"Precision\", \"Distance to visibility\", \"Rows and columns\"): "
             "true updates hidden by a bf16 cast (pairs finer than bf16 only), true updates with |Δ| below half a "
             "bf16 ULP of w0 (r < 1), and the shares of the 2-D matrices' rows and columns holding an update "
             "against uniform chance:", "",
             "| checkpoint | criterion | sparsity | hidden by bf16 | r < 1 | rows | rows, chance | columns | "
             "columns, chance |", "|---|---|---|---|---|---|---|---|---|"]
    for fam, criterion in (("grpo-lowlr", "atol 1e-5"), ("grpo-highlr", "atol 1e-5"), ("sft", "atol 1e-5"),
                           ("fp32", "atol 1e-5"), ("fp32_exact", "exact")):
        for label, v in m.get(fam, {}).get("runs", {}).items():
            if "row_share" not in v:
                continue
            lines.append(f"| {label} | {criterion} | {_p(v['sparsity'])} | {_p(v['hidden_by_bf16'])} | "
                         f"{_p(v['below_half_ulp'])} | {_p(v['row_share'])} | {_p(v['row_share_chance'])} | "
                         f"{_p(v['col_share'])} | {_p(v['col_share_chance'])} |")
    return lines


def hidden_sentence(m: dict) -> str:
    try:
        exact = next(iter(m["fp32_exact"]["runs"].values()))
        atol = next(iter(m["fp32"]["runs"].values()))
    except (KeyError, StopIteration):
        return "not measured."
    return (f"of the fp32 run's true updates (every stored change, criterion `exact`), {_p(exact['hidden_by_bf16'])} "
            f"would not show in a bf16 checkpoint of the same weights, and {_p(exact['below_half_ulp'])} are smaller "
            f"than half a bf16 ULP of their weight (r < 1; the base is bf16-valued, so the two differ only at exact "
            f"ties and where a "
            f"step crosses a power of two); at atol 1e-5 the hidden share is {_p(atol['hidden_by_bf16'])}. "
            + ("In this sample bf16 hides a minority of the updates: most add up to more than half a ULP."
               if exact["hidden_by_bf16"] < 0.5 else "In this sample bf16 hides most of the updates."))


def lines_sentence(m: dict) -> str:
    try:
        runs = [v for fam in ("grpo-lowlr", "grpo-highlr", "sft") for v in m[fam]["runs"].values()]
        rows = [v["row_share"] for v in runs]
        chance = [v["row_share_chance"] for v in runs]
        cols = [v["col_share"] for v in runs]
    except KeyError:
        return "not measured."
    saturated = min(chance) > 0.99
    verdict = ("with most parameters updated nearly every row and column is touched by chance alone, so this "
               "sample cannot tell whole-neuron updates from scattered ones." if saturated else
               "fewer rows than chance would mean whole neurons; about chance, scattered updates.")
    return (f"{_p(min(rows))}-{_p(max(rows))} of the matrices' rows and {_p(min(cols))}-{_p(max(cols))} of their "
            f"columns hold an update in the bf16 runs, against {_p(min(chance))}-{_p(max(chance))} of rows by "
            f"chance: {verdict}")


def sft_matched(record: dict) -> bool:
    """Whether SFT took as many optimiser steps as GRPO's nominal count (epochs per batch x batches)."""
    runs = record["runs"]
    if "sft" not in runs or "grpo-lowlr-seed1" not in runs:
        return False
    grpo = runs["grpo-lowlr-seed1"]["config"]
    return runs["sft"]["config"]["steps"] == grpo["steps"] * grpo.get("epochs", 2)


def sft_line(record: dict) -> str:
    """The SFT run's description, saying whether its optimiser steps match GRPO's."""
    head = ("- **SFT** (`sft`): the same base, cross-entropy on correct answers, batch 16, same optimiser and learning "
            "rate as `grpo-lowlr`")
    if not sft_matched(record):
        return (head + ". Its optimiser steps are NOT matched to GRPO's: GRPO takes two per batch (about twice "
                "SFT's), so comparing their sparsity compares step counts as well.")
    taken = [v for k, v in record.get("optimizer_steps", {}).items() if k.startswith("grpo-lowlr")]
    return (head + ", and as many optimiser steps as GRPO's nominal two per batch"
            + (f" (the `grpo-lowlr` runs took {min(taken)}-{max(taken)}: a batch whose groups all got one "
               "reward takes none)" if taken else "") + ", so that the SFT-vs-RL comparison is not one of step counts.")


def base_note(record: dict) -> list[str]:
    """How the base came about: trained by this command, or kept from an earlier run (`--base`)."""
    if record.get("base_retrained", True):
        return []
    return [
        "The base was not retrained: `python -m rlsub_tui.sample --out sample_data --base sample_data/base` keeps the",
        "committed bf16 base byte for byte and trains every run from it. Pretraining from scratch is deterministic on",
        "one machine but not across machines (float rounding of CPU kernels differs with the processor; on another",
        "machine the same recipe gave a base with a different held-out accuracy), so a retrained base would change",
        "every figure below.",
        "",
    ]


def spectrum_sentence(m: dict) -> str:
    try:
        runs = [v for fam in ("grpo-lowlr", "grpo-highlr") for v in m[fam]["runs"].values()]
        rank = [v["mean_rank_ratio"] for v in runs]
        e99 = [v["mean_energy_rank_99_ratio"] for v in runs]
        e90 = [v["mean_energy_rank_90_ratio"] for v in runs]
    except KeyError:
        return "not measured."
    fp32 = next(iter(m.get("fp32", {}).get("runs", {}).values()), None)
    fp32_part = ("" if fp32 is None else
                 f" The fp32 copy of `grpo-lowlr-seed1`, free of bf16 rounding, is alike: {_p(fp32['mean_rank_ratio'])} "
                 f"default rank, 99% of the energy in {_p(fp32.get('mean_energy_rank_99_ratio'))}.")
    return (f"by PyTorch's default tolerance the GRPO updates are nearly full rank ({_p(min(rank))}-{_p(max(rank))} "
            f"of the maximum), but 99% of their energy lies in {_p(min(e99))}-{_p(max(e99))} of the directions and "
            f"90% in {_p(min(e90))}-{_p(max(e90))}: the default rank counts every direction above float32 "
            f"precision however little it carries; a few directions dominate.{fp32_part}")


def strat_sentence(m: dict) -> str:
    try:
        pairs = [p for fam in ("grpo-lowlr", "grpo-highlr") for p in m[fam]["pairs"]]
        margin = [p["jaccard"] - p["jaccard_random"] for p in pairs]
        margin_strat = [p["jaccard"] - p["jaccard_random_strat"] for p in pairs]
    except KeyError:
        return "not measured."
    higher = all(p["jaccard_random_strat"] >= p["jaccard_random"] for p in pairs)
    return (f"chance computed per tensor and |w0| exponent is {'higher' if higher else 'not always higher'} than "
            f"the pooled one (update rates differ between tensors and weight magnitudes); the seeds' Jaccard "
            f"exceeds it by {min(margin_strat):.3f}-{max(margin_strat):.3f} instead of "
            f"{min(margin):.3f}-{max(margin):.3f} over the pooled chance.")


def sft_sentence(m: dict, record: dict | None = None) -> str:
    """SFT against the GRPO runs of the same learning rate, with the optimiser steps each took."""
    try:
        sft = next(iter(m["sft"]["runs"].values()))["sparsity"]
        rl = [v["sparsity"] for v in m["grpo-lowlr"]["runs"].values()]
    except (KeyError, StopIteration):
        return "not measured."
    relation = "sparser than" if sft > max(rl) else "denser than" if sft < min(rl) else "as sparse as"
    note = " (the opposite of the paper's finding for large models)" if relation == "sparser than" else ""
    found = f"the SFT run is {_p(sft)} sparse, {relation} the `grpo-lowlr` runs ({_p(min(rl))}-{_p(max(rl))}){note}"
    if record is None or not sft_matched(record):
        return (f"at the same learning rate {found}; but SFT took about half GRPO's optimiser steps, so this "
                f"compares step counts as much as objectives.")
    taken = record.get("optimizer_steps", {})
    low = [v for k, v in taken.items() if k.startswith("grpo-lowlr")]
    steps = (f" ({taken['sft']} for SFT; the `grpo-lowlr` runs took {min(low)}-{max(low)}, fewer where a batch's "
             f"groups all got one reward)" if "sft" in taken and low else "")
    return (f"at the same learning rate and GRPO's nominal number of optimiser steps{steps}, {found}. In the earlier "
            f"sample SFT took half GRPO's optimiser steps, which confounded this comparison.")


def fp32_sentence(m: dict) -> str:
    try:
        fp32 = next(iter(m["fp32"]["runs"].values()))
        bf16 = m["grpo-lowlr"]["runs"]["grpo-lowlr-seed1"]["sparsity"]
    except (KeyError, StopIteration):
        return "not measured."
    return (f"`grpo-lowlr-seed1` is {_p(bf16)} sparse as saved in bf16, but its fp32 copy against the fp32 base "
            f"is {_p(fp32['sparsity'])} sparse at atol 1e-5 and {_p(fp32['sparsity_sweep'][0])} at 1e-8: nearly "
            f"every parameter the bf16 checkpoint shows as unchanged did move, by less than bf16 can store.")


def timeline_lines(m: dict) -> list[str]:
    """The `grpo-lowlr` timelines, pooled per step (see docs/measures.md for the definitions)."""
    timelines = m.get("grpo-lowlr", {}).get("timelines", [])
    if not timelines:
        return []
    lines = ["", "## Training timelines (`grpo-lowlr`, atol 1e-5)", "",
             "| run | step | sparsity vs base | sparsity vs previous checkpoint | overlap with the previous step "
             "(chance) | union so far | lossless patch / dense |", "|---|---|---|---|---|---|---|"]
    for t in timelines:
        for s in t["per_step"]:
            overlap = "–" if s["overlap_prev"] is None else f"{_p(s['overlap_prev'])} ({_p(s['overlap_prev_random'])})"
            lines.append(f"| {t['label']} | {s['prev_step']} → {s['step']} | {_p(s['sparsity_vs_base'])} | "
                         f"{_p(s['sparsity_vs_prev'])} | {overlap} | {_p(s['union_density'])} | "
                         f"{_p(s['patch_ratio'])} |")
    return lines


def transplant_lines(m: dict, acc: dict) -> list[str]:
    t = m.get("transplant")
    if not t:
        return []
    n = t["numel"]
    return [
        "", "## The subnetwork transplanted", "",
        f"`rlsub-tui masks` over the three `grpo-lowlr` seeds gives the consensus mask ({_p(t['mask_true'] / n)} of "
        f"parameters, updated by all three); `rlsub-tui transplant` puts `{t['run']}`'s values there and the base's "
        f"elsewhere, and a random control takes the run's values on as many positions per tensor, drawn uniformly "
        f"(seed {t['control_seed']}). The run differs from the base at {_p(t['run_changed'] / n)} of parameters; "
        f"the transplant at {_p(t['transplant_changed'] / n)}, the control at {_p(t['control_changed'] / n)}.",
        "",
        "| checkpoint | held-out accuracy |", "|---|---|",
        f"| base | {_p(acc['base'])} |",
        f"| {t['run']} (the full run) | {_p(acc.get(t['run']))} |",
        f"| consensus transplant | {_p(t['accuracy_transplant'])} |",
        f"| random control | {_p(t['accuracy_control'])} |",
    ]


def transplant_sentence(m: dict, acc: dict, prompts: int) -> str:
    """What the consensus transplant and its random control recover of the run's gain over the base."""
    t = m["transplant"]
    base, run = acc["base"], acc.get(t["run"])
    if run is None or run == base:
        return "the run did not change the held-out accuracy, so there is nothing to recover."
    a, c = t["accuracy_transplant"], t["accuracy_control"]
    se = (run * (1 - run) / prompts) ** 0.5  # binomial standard error of one accuracy
    gap = a - c
    if abs(gap) <= 2 * se * 2 ** 0.5:  # within two standard errors of a difference of two accuracies
        verdict = "within noise of each other, so on this sample the transplant cannot tell the seeds' common " \
                  "subnetwork from a random one of the same size"
    else:
        verdict = f"the consensus does {'better' if gap > 0 else 'worse'} than the random control by more than noise"
    part = lambda x: f"{100 * (x - base) / (run - base):.0f}%"  # noqa: E731
    return (f"the consensus transplant recovers {part(a)} of the run's gain in held-out accuracy over the base, "
            f"the random control {part(c)}: {100 * abs(gap):.1f} points apart against a standard error of about "
            f"{100 * se:.1f} points for one accuracy on {prompts} prompts, {verdict}. With "
            f"{_p(t['mask_true'] / t['numel'])} of parameters in the mask, a random mask of that size still puts "
            f"the run's values on {_p(t['control_changed'] / t['numel'])} of parameters.")
