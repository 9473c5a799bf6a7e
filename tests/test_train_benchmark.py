"""The training-step benchmark (issue 7) at the tiny size on the CPU: its variants agree. No timing is asserted."""

from __future__ import annotations

import pytest
import torch

from benchmarks import train_step


def test_train_step_benchmark_checks_every_variant_against_the_base_and_the_loop():
    argv = ["--size", "tiny", "--device", "cpu", "--seq", "16", "--steps", "1", "--rounds", "3", "--warmup", "1"]
    result = train_step.main(argv)
    assert set(result["rows"]) == set(train_step.VARIANTS)
    # paired: the median over rounds of a variant's time over PEFT's in the same round (PEFT's own is 1)
    rows = result["rows"]
    assert rows["peft_lora"]["paired"] == 1.0
    for row in rows.values():
        ratios = sorted(t / r for t, r in zip(row["times"], rows["peft_lora"]["times"], strict=True))
        assert row["paired"] == ratios[1], "the middle of the three rounds' ratios"
    checks = "\n".join(result["checks"])
    # float64: every variant's logits at init are the base model's, and fused MOELoRA is the loop, gradients too
    assert "logits at init == base for every variant (exact)" in checks
    assert "moelora fused == loop after randomising B and the gate, logits and gradients" in checks
    # at the run's size and dtype: the loss at init is bitwise the base model's
    assert "loss at init == base model's (bitwise unless noted) for " + ", ".join(train_step.VARIANTS) in checks
    assert "not bitwise" not in checks


def test_the_loop_check_fails_when_the_loop_does_not_compute_the_same_function(monkeypatch):
    # the loop keeps its copy of B = 0 while the fused model's B is randomised
    monkeypatch.setattr(train_step, "sync_loop", lambda loop_model, fused_model: None)
    with pytest.raises(AssertionError, match="moelora fused != loop"):
        train_step.check_tiny_float64(batch=4, seq=8)


def test_the_init_check_fails_when_a_variant_starts_away_from_the_base(monkeypatch):
    build = train_step.build_variant

    def nonzero_b(name, base, device):
        model, routed = build(name, base, device)
        if name == "cgc_lora":
            train_step.randomize([p for n, p in model.named_parameters() if n.endswith("lora_B")], seed=0, scale=0.1)
        return model, routed

    monkeypatch.setattr(train_step, "build_variant", nonzero_b)
    with pytest.raises(AssertionError, match="cgc_lora: logits at init differ"):
        train_step.check_tiny_float64(batch=4, seq=8)


@pytest.mark.parametrize("name", ["peft_lora", "joint_lora", "cgc_lora", "moelora"])
def test_every_variant_keeps_its_adapters_in_the_models_dtype(name):
    """Like for like on a bf16 GPU: PEFT's adapters stay in the model's dtype, and so must ours (the framework's
    own default on a bf16 base, float32 adapters, would add casts that PEFT's variant does not have)."""
    base = train_step.build_base("tiny", "cpu", torch.bfloat16)
    model, _ = train_step.build_variant(name, base, "cpu")
    dtypes = {p.dtype for p in train_step.trainable(model)}
    assert dtypes == {torch.bfloat16}, dtypes
