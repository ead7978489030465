"""Tiny models that transformers itself builds, trains (a few Adam steps per seed) and saves in bf16.

Every count the engine reports is checked against an independent computation in the way of the
paper's script: load base and run with transformers, iterate `named_parameters()` (a tied tensor
appears once), Δ in bf16, updated = not torch.isclose(Δ, 0, atol=1e-5), rank = matrix_rank(Δ.float()).
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlsub_tui.compute.engine import Analysis  # noqa: E402
from rlsub_tui.records.criteria import AnalysisOptions  # noqa: E402

SEEDS = (1, 2)
SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=32)


CONFIGS = {  # family: (config class in transformers, its arguments)
    "gpt2": ("GPT2Config", dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                bos_token_id=0, eos_token_id=0)),
    "qwen2": ("Qwen2Config", dict(SMALL, tie_word_embeddings=True)),
    "llama": ("LlamaConfig", dict(SMALL, bos_token_id=0, eos_token_id=0)),
    "opt": ("OPTConfig", dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=32, word_embed_proj_dim=32, bos_token_id=0, eos_token_id=0,
                              pad_token_id=1)),
    "gemma": ("GemmaConfig", dict(SMALL, head_dim=8, bos_token_id=0, eos_token_id=0, pad_token_id=1)),
    "phi3": ("Phi3Config", dict(SMALL, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
    "mixtral": ("MixtralConfig", dict(SMALL, num_local_experts=4, num_experts_per_tok=2, bos_token_id=0,
                                      eos_token_id=0)),
}


def configs() -> dict:
    """The families this transformers has (all seven in 5.x); a missing one is skipped, not faked."""
    return {family: getattr(transformers, cls)(**kw) for family, (cls, kw) in CONFIGS.items()
            if hasattr(transformers, cls)}


# (family, layout): save_pretrained safetensors, sharded safetensors, or torch.save(model.state_dict())
CASES = [("gpt2", "safetensors"), ("gpt2", "state_dict"), ("qwen2", "sharded"), ("llama", "safetensors"),
         ("llama", "state_dict"), ("opt", "safetensors"), ("gemma", "safetensors"), ("phi3", "safetensors"),
         ("mixtral", "safetensors"), ("mixtral", "state_dict")]


def _train(model, seed: int, steps: int = 3) -> None:
    """A few real Adam steps on random tokens."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for _ in range(steps):
        ids = torch.randint(2, model.config.vocab_size, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _save(model, directory, layout: str) -> None:
    if layout == "state_dict":
        directory.mkdir(parents=True)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    elif layout == "sharded":
        model.save_pretrained(directory, max_shard_size="20KB")
    else:
        model.save_pretrained(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{family: {layout: [base dir, run dirs...]}}, built once for the module in a temp dir."""
    root = tmp_path_factory.mktemp("hf-models")
    layouts: dict[str, set[str]] = {}
    for family, layout in CASES:
        layouts.setdefault(family, set()).add(layout)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        for family, config in configs().items():
            torch.manual_seed(0)
            base = transformers.AutoModelForCausalLM.from_config(config)
            start = {n: t.clone() for n, t in base.state_dict().items()}
            dirs = {lay: [] for lay in layouts[family]}
            for i, seed in enumerate((None,) + SEEDS):
                model = transformers.AutoModelForCausalLM.from_config(config)
                model.load_state_dict(start)
                if seed is not None:
                    torch.manual_seed(seed)
                    _train(model, seed)
                model = model.to(torch.bfloat16)
                for lay in layouts[family]:
                    d = root / f"{family}-{lay}" / ("base" if seed is None else f"seed{seed}")
                    _save(model, d, lay)
                    dirs[lay].append(d)
            out[family] = dirs
    return out


def _load(directory):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
    return dict(model.named_parameters())


def _checkpoint_names(family: str, layout: str, params: dict) -> dict[str, torch.Tensor]:
    """The transformers parameters under the names the checkpoint stores them by.

    transformers 5 keeps Mixtral experts fused (3-D gate_up_proj, down_proj) but save_pretrained writes
    the per-expert w1/w3/w2 matrices; everything else is stored under its parameter name.
    """
    if family != "mixtral" or layout == "state_dict":
        return params
    out = {}
    for name, p in params.items():
        prefix, _, leaf = name.rpartition(".mlp.")
        if leaf == "experts.gate_up_proj":
            half = p.shape[1] // 2
            for e in range(p.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w1.weight"] = p[e, :half]
                out[f"{prefix}.block_sparse_moe.experts.{e}.w3.weight"] = p[e, half:]
        elif leaf == "experts.down_proj":
            for e in range(p.shape[0]):
                out[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = p[e]
        elif leaf == "gate.weight":
            out[f"{prefix}.block_sparse_moe.gate.weight"] = p
        else:
            out[name] = p
    return out


def _oracle(family, layout, dirs):
    """Per tensor: numel, each run's mask and rank, by the paper's script."""
    base = _checkpoint_names(family, layout, _load(dirs[0]))
    runs = [_checkpoint_names(family, layout, _load(d)) for d in dirs[1:]]
    out = {}
    for name, p0 in base.items():
        masks, ranks = [], []
        for run in runs:
            delta = (run[name] - p0).detach()
            masks.append(~torch.isclose(delta, torch.zeros_like(delta), atol=1e-5))
            if delta.ndim == 2:
                ranks.append(int(torch.linalg.matrix_rank(delta.float())))
            elif delta.ndim == 3:  # per expert matrix
                ranks.append(sum(int(torch.linalg.matrix_rank(d.float())) for d in delta))
            else:
                ranks.append(None)
        out[name] = (p0.numel(), masks, ranks)
    return out


@pytest.mark.parametrize("family,layout", CASES, ids=[f"{f}-{lay}" for f, lay in CASES])
def test_counts_equal_named_parameters(models, family, layout):
    if family not in models:
        pytest.skip(f"this transformers has no {CONFIGS[family][0]}")
    dirs = models[family][layout]
    a = Analysis(str(dirs[0]), [str(d) for d in dirs[1:]], AnalysisOptions(use_cache=False))
    result = a.run_all()
    a.close()
    oracle = _oracle(family, layout, dirs)
    assert not result.skipped, result.skipped[:3]
    assert set(result.tensors) == set(oracle)
    assert result.stats().numel == sum(n for n, _, _ in oracle.values())  # a tied tensor counted once
    updated_any = 0
    for name, (numel, masks, ranks) in oracle.items():
        r = result.tensors[name]
        assert r.numel == numel, name
        assert [s.updated for s in r.runs] == [int(m.sum()) for m in masks], name
        assert [s.rank for s in r.runs] == ranks, name
        assert r.both[(0, 1)] == int((masks[0] & masks[1]).sum()), name
        assert r.agreement[2] == int((masks[0] & masks[1]).sum()), name
        updated_any += sum(int(m.sum()) for m in masks)
    assert 0 < updated_any < 2 * result.stats().numel  # the runs really moved, and not everything


def test_tied_state_dict_counts_the_embedding_once(models):
    """Issue 9 item 1: GPT-2's torch.save(state_dict) holds wte and lm_head on one storage."""
    dirs = models["gpt2"]["state_dict"]
    state = torch.load(dirs[0] / "pytorch_model.bin", weights_only=True)
    assert state["lm_head.weight"].untyped_storage().data_ptr() == \
        state["transformer.wte.weight"].untyped_storage().data_ptr()
    a = Analysis(str(dirs[0]), [str(d) for d in dirs[1:]], AnalysisOptions(use_cache=False))
    result = a.run_all()
    a.close()
    assert result.tied == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in result.tensors and "transformer.wte.weight" in result.tensors
    assert any("lm_head.weight is the same tensor as transformer.wte.weight" in n for n in result.notes)
    from rlsub_tui.export.outputs import summary_dict
    assert summary_dict(result)["tied"] == [{"alias": "lm_head.weight", "counted_as": "transformer.wte.weight"}]
    # the same model saved by save_pretrained (lm_head dropped) gives the same figures
    st = models["gpt2"]["safetensors"]
    b = Analysis(str(st[0]), [str(d) for d in st[1:]], AnalysisOptions(use_cache=False))
    other = b.run_all()
    b.close()
    assert {n: [s.updated for s in r.runs] for n, r in other.tensors.items()} == \
        {n: [s.updated for s in r.runs] for n, r in result.tensors.items()}


def test_mixed_layouts_tied_in_the_runs_only(models):
    """Base from save_pretrained (no lm_head), runs from torch.save(state_dict) (lm_head on wte's storage)."""
    base = models["gpt2"]["safetensors"][0]
    runs = models["gpt2"]["state_dict"][1:]
    a = Analysis(str(base), [str(d) for d in runs], AnalysisOptions(use_cache=False, rank=False))
    result = a.run_all()
    a.close()
    assert not result.skipped and result.tied == {}
    oracle = _oracle("gpt2", "safetensors", models["gpt2"]["safetensors"])
    assert {n: [s.updated for s in r.runs] for n, r in result.tensors.items()} == \
        {n: [int(m.sum()) for m in masks] for n, (_, masks, _) in oracle.items()}
