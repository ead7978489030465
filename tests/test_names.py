"""Tensor kinds for the common model families, on the names their checkpoints really use."""

from __future__ import annotations

import pytest

from rlsub_tui.checkpoints.names import place, tensor_kind
from rlsub_tui.summaries.tree import build_tree


def kind(name: str) -> str:
    return tensor_kind(place(name).tensor_type)


def transformers_names(family: str) -> list[str]:
    """The state-dict names of a tiny model built by `transformers` itself (on the meta device: no memory)."""
    torch = pytest.importorskip("torch")
    T = pytest.importorskip("transformers")
    small = dict(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, vocab_size=16)
    configs = {
        "gpt2": lambda: T.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8),
        "gpt_neox": lambda: T.GPTNeoXConfig(intermediate_size=16, **small),
        "opt": lambda: T.OPTConfig(ffn_dim=16, word_embed_proj_dim=8, **small),
        "falcon": lambda: T.FalconConfig(**small),
        "phi": lambda: T.PhiConfig(intermediate_size=16, **small),
        "phi3": lambda: T.Phi3Config(intermediate_size=16, pad_token_id=0, **small),
        "gemma": lambda: T.GemmaConfig(num_key_value_heads=1, head_dim=4, intermediate_size=16, **small),
        "gemma2": lambda: T.Gemma2Config(num_key_value_heads=1, head_dim=4, intermediate_size=16, **small),
        "mixtral": lambda: T.MixtralConfig(num_key_value_heads=1, intermediate_size=16, num_local_experts=2,
                                           **small),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(num_key_value_heads=1, intermediate_size=16, moe_intermediate_size=8,
                                              shared_expert_intermediate_size=8, num_experts=2,
                                              num_experts_per_tok=1, **small),
    }
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(configs[family]())
    return list(model.state_dict())


# Names as the families' checkpoints store them on disk, written down from the model code and the
# Hub files (older transformers layouts and the originals that transformers converts on load).
ON_DISK = {
    "gpt2 (Hub file)": {
        "wte.weight": "embedding", "wpe.weight": "embedding", "h.0.ln_1.weight": "norm",
        "h.0.attn.c_attn.weight": "attention", "h.0.attn.c_proj.bias": "attention", "h.0.ln_2.bias": "norm",
        "h.0.mlp.c_fc.weight": "mlp", "h.0.mlp.c_proj.weight": "mlp", "ln_f.weight": "norm",
    },
    "pythia / gpt-neox (Hub file)": {
        "gpt_neox.embed_in.weight": "embedding", "gpt_neox.layers.0.attention.query_key_value.weight": "attention",
        "gpt_neox.layers.0.attention.dense.weight": "attention", "gpt_neox.layers.0.mlp.dense_h_to_4h.weight": "mlp",
        "gpt_neox.layers.0.mlp.dense_4h_to_h.bias": "mlp", "gpt_neox.layers.0.input_layernorm.weight": "norm",
        "gpt_neox.final_layer_norm.weight": "norm", "embed_out.weight": "head",
    },
    "opt": {
        "model.decoder.embed_tokens.weight": "embedding", "model.decoder.embed_positions.weight": "embedding",
        "model.decoder.layers.0.self_attn.out_proj.weight": "attention",
        "model.decoder.layers.0.self_attn_layer_norm.weight": "norm", "model.decoder.layers.0.fc1.weight": "mlp",
        "model.decoder.layers.0.fc2.bias": "mlp", "model.decoder.layers.0.final_layer_norm.weight": "norm",
        "model.decoder.final_layer_norm.bias": "norm", "lm_head.weight": "head",
    },
    "falcon": {
        "transformer.word_embeddings.weight": "embedding",
        "transformer.h.0.self_attention.query_key_value.weight": "attention",
        "transformer.h.0.mlp.dense_4h_to_h.weight": "mlp", "transformer.h.0.ln_attn.weight": "norm",
        "transformer.h.0.ln_mlp.bias": "norm", "transformer.ln_f.weight": "norm", "lm_head.weight": "head",
    },
    "phi-2": {
        "model.layers.0.self_attn.dense.weight": "attention", "model.layers.0.mlp.fc1.weight": "mlp",
        "model.final_layernorm.weight": "norm", "lm_head.bias": "head",
    },
    "mixtral (Hub file)": {
        "model.layers.0.block_sparse_moe.gate.weight": "mlp",
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": "mlp",
        "model.layers.0.block_sparse_moe.experts.7.w2.weight": "mlp",
        "model.layers.0.self_attn.q_proj.weight": "attention", "model.layers.0.input_layernorm.weight": "norm",
    },
    "qwen2-moe (Hub file)": {
        "model.layers.0.mlp.gate.weight": "mlp", "model.layers.0.mlp.experts.0.gate_proj.weight": "mlp",
        "model.layers.0.mlp.shared_expert.up_proj.weight": "mlp", "model.layers.0.mlp.shared_expert_gate.weight": "mlp",
    },
    "gemma2": {
        "model.layers.0.pre_feedforward_layernorm.weight": "norm", "model.embed_tokens.weight": "embedding",
    },
    "llama / qwen2": {
        "model.embed_tokens.weight": "embedding", "model.layers.0.self_attn.q_proj.bias": "attention",
        "model.layers.0.mlp.down_proj.weight": "mlp", "model.layers.0.post_attention_layernorm.weight": "norm",
        "model.norm.weight": "norm", "lm_head.weight": "head",
    },
}


@pytest.mark.parametrize("family", list(ON_DISK))
def test_kinds_of_names_on_disk(family):
    got = {name: kind(name) for name in ON_DISK[family]}
    assert got == ON_DISK[family]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "opt", "falcon", "phi", "phi3", "gemma", "gemma2",
                                    "mixtral", "qwen2_moe"])
def test_every_tensor_of_a_transformers_model_has_a_kind(family):
    names = transformers_names(family)
    kinds = {name: kind(name) for name in names}
    assert "other" not in kinds.values(), {n: k for n, k in kinds.items() if k == "other"}
    # every family has attention, an mlp (or experts), norms and an embedding
    assert {"attention", "mlp", "norm", "embedding"} <= set(kinds.values()), kinds
    for name, k in kinds.items():  # a name-by-name check against words a person would read
        leaf = name.lower()
        if "norm" in leaf or ".ln_" in leaf:
            assert k == "norm", name
        elif "lm_head" in leaf:
            assert k == "head", name
        elif "embed" in leaf or ".wte." in leaf or ".wpe." in leaf:
            assert k == "embedding", name


def test_gpt2_tree_puts_embeddings_first_and_has_a_norm_kind():
    names = transformers_names("gpt2")
    model, by_type = build_tree(names)
    assert [c.label for c in model.children[:2]] == ["transformer.wte.weight", "transformer.wpe.weight"]
    assert [c.label for c in by_type.children] == ["all embedding", "all attention", "all mlp", "all norm",
                                                   "all head"]
