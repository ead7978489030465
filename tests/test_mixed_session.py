"""One session of three layouts against one base: a Hugging Face export, verl FSDP rank shards and a PEFT LoRA
adapter, each read in its stored precision; the explorer opens it and every tensor is computed."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from test_fsdp_shards import verl  # noqa: F401  (the session fixture: verl-style checkpoints written by torch)
from test_ui import settle

from rlsub_tui.records.criteria import AnalysisOptions
from rlsub_tui.ui.app import ExplorerApp, ExplorerConfig
from rlsub_tui.ui.dialogs import ErrorDialog
from rlsub_tui.ui.summary import SummaryStrip


def lora_adapter(verl_root, out):  # noqa: F811
    """A LoRA adapter on the verl fixture's base, saved by peft itself (random non-zero A and B)."""
    import peft
    from fsdp_writer import new_model

    model = new_model()
    state = {k: v.float() for k, v in load_file(str(verl_root / "base" / "model.safetensors")).items()}
    model.load_state_dict(state, strict=False)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    wrapped.save_pretrained(str(out))
    return out


async def test_an_export_fsdp_shards_and_a_lora_adapter_open_together(verl, tmp_path):  # noqa: F811
    adapter = lora_adapter(verl, tmp_path / "lora")
    runs = [verl / "export" / "seed2" / "global_step_20", verl / "runs" / "seed1" / "global_step_20", adapter]
    app = ExplorerApp(ExplorerConfig(str(verl / "base"), [str(r) for r in runs],
                                     AnalysisOptions(use_cache=False, sweep=()), tmp_path / "exports"))
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(app, pilot)
        assert not isinstance(app.screen, ErrorDialog)
        result = app.result
        lines = app.query_one(SummaryStrip).lines
    assert result.complete and len(result.tensors) == len(result.planned) and result.k == 3
    assert [h.split(",")[0] for h in result.run_read_as] == ["safetensors", "FSDP rank shards",
                                                             "PEFT adapter on the base"]
    assert all(h.endswith("fp32") or "fp32" in h for h in result.run_read_as)
    s = result.stats()
    assert all(s.fine_tensors[i] for i in range(3))  # all three stored finer than bf16: true updates counted
    lora = [r for n, r in result.tensors.items() if "q_proj" in n or "v_proj" in n]
    assert lora and all(r.runs[2].true_updated > 0 for r in lora)
    untouched = [r for n, r in result.tensors.items() if "norm" in n]
    assert untouched and all(r.runs[2].updated == 0 for r in untouched)
    assert any(line.startswith("true sp") for line in lines)
