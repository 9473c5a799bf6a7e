"""Saved adapters reload exactly; each task exported as PEFT LoRA matches our model in PeftModel."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from torch.testing import assert_close

from cgc_lightning.config import AdapterConfig
from cgc_lightning.export import export_peft, load_adapter, save_adapter
from cgc_lightning.inject import inject_adapters
from cgc_lightning.routing import route
from tests.conftest import LAYOUT, VOCAB, randomize_adapters, tiny_model

CONFIGS = {
    "cgc_lora": AdapterConfig(method="cgc_lora", dropout=0.0),
    "cgc_lora_shared_gate": AdapterConfig(method="cgc_lora", gate_per_layer=False, num_shared=1, num_specific=2),
    "moelora": AdapterConfig(method="moelora", num_experts=4, split_rank=True, dropout=0.0),
    "independent_lora": AdapterConfig(method="independent_lora", rslora=True),
    "joint_lora": AdapterConfig(method="joint_lora"),
}
X = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(5))


def trained(family, name):
    model = tiny_model(family)
    inject_adapters(model, CONFIGS[name], LAYOUT)
    randomize_adapters(model, seed=11)
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_peft_model_matches_ours_for_every_task(family, name, tmp_path):
    ours = trained(family, name)
    for t, task in enumerate(LAYOUT.tasks):
        out_dir = export_peft(ours, task, tmp_path / task)
        with torch.no_grad(), route(ours, torch.full((3,), t)):
            expected = ours(X).logits
        peft_model = PeftModel.from_pretrained(tiny_model(family), out_dir).eval()
        with torch.no_grad():
            got = peft_model(X).logits
        # float64 throughout; the only difference is the order of the low-rank products
        assert_close(got, expected, rtol=1e-10, atol=1e-10)
        cfg = json.loads((out_dir / "adapter_config.json").read_text())
        if name.startswith("cgc_lora"):
            c = CONFIGS[name]
            assert cfg["r"] == (c.num_shared + c.num_specific) * c.r  # (S + P) r
        assert cfg["fan_in_fan_out"] == (family == "gpt2")


def test_exported_tasks_differ_from_each_other(tmp_path):
    ours = trained("llama", "cgc_lora")
    logits = []
    for task in ("qa", "nli"):
        peft_model = PeftModel.from_pretrained(tiny_model("llama"), export_peft(ours, task, tmp_path / task))
        with torch.no_grad():
            logits.append(peft_model(X).logits)
    assert not torch.allclose(logits[0], logits[1])


def test_token_gated_export_is_refused(tmp_path):
    model = tiny_model("llama")
    inject_adapters(model, AdapterConfig(method="cgc_lora", gate_input="task+token"), LAYOUT)
    with pytest.raises(ValueError, match="cannot be merged or exported"):
        export_peft(model, 0, tmp_path / "x")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(CONFIGS) + ["cgc_token"])
def test_save_then_load_on_a_fresh_base_gives_identical_logits(family, name, tmp_path):
    configs = dict(CONFIGS, cgc_token=AdapterConfig(method="cgc_lora", gate_input="token"))
    model = tiny_model(family)
    inject_adapters(model, configs[name], LAYOUT)
    randomize_adapters(model, seed=4)
    save_adapter(model, tmp_path / "adapter", base_model="tiny")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    fresh = load_adapter(tiny_model(family), tmp_path / "adapter")
    model.eval(), fresh.eval()
    tasks = torch.tensor([3, 0, 1])
    with torch.no_grad(), route(model, tasks), route(fresh, tasks):
        assert torch.equal(fresh(X).logits, model(X).logits)
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if p.requires_grad
    ]


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json in .*not a saved cgc-lightning adapter"):
        load_adapter(tiny_model("llama"), tmp_path)
    model = trained("llama", "cgc_lora")
    save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="no module matched"):
        load_adapter(tiny_model("gpt2"), tmp_path / "a")  # saved from another architecture
    peft_dir = export_peft(model, 0, tmp_path / "peft")
    with pytest.raises(ValueError, match="not a cgc-lightning adapter config.*PeftModel.from_pretrained"):
        load_adapter(tiny_model("llama"), peft_dir)
