"""The module's small contracts: the LR schedule, the metrics' mapping, the generation cut, predict, refusals."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torchmetrics.text import BLEUScore, ROUGEScore

from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.inject import is_adapter_param
from cgc_lightning.metrics import TaskMetric
from cgc_lightning.module import MultiTaskLoRAModule

TINY = str(Path(__file__).parent / "fixtures" / "tiny-llama")


def module(**kw) -> MultiTaskLoRAModule:
    adapter = kw.pop("adapter", AdapterConfig(method="cgc_lora", r=2))
    return MultiTaskLoRAModule(
        ModelSpec(name_or_path=TINY, random_init=True), adapter=adapter, task_names=["a", "b"], **kw
    )


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_warms_up_then_decays_as_documented(schedule):
    m = module(lr=1e-3, warmup_ratio=0.2, schedule=schedule)
    m._trainer = SimpleNamespace(estimated_stepping_batches=10)  # what configure_optimizers reads
    config = m.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    warmup, total = 2, 10
    expected = []
    for step in range(10):
        if step < warmup:
            expected.append(1e-3 * (step + 1) / (warmup + 1))  # linear from 0, never 0 itself
            continue
        progress = (step - warmup) / (total - warmup)
        expected.append(
            1e-3
            * {
                "constant": 1.0,
                "linear": 1.0 - progress,
                "cosine": 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)),  # down to 10% of lr
            }[schedule]
        )
    torch.testing.assert_close(torch.tensor(lrs), torch.tensor(expected), rtol=1e-12, atol=1e-15)
    assert lrs[warmup] == pytest.approx(1e-3), "the peak right after warm-up"


def test_text_metrics_map_torchmetrics_results_into_zero_one():
    preds, refs = ["The cat sat.", "a dog ran", "blue"], [["the cat sat"], ["a cat ran", "dog ran"], ["red"]]
    em, f1 = TaskMetric("exact_match"), TaskMetric("f1")
    for m in (em, f1):
        m.update_texts(preds, refs)
    # SQuAD normalisation drops case, punctuation and articles: "a dog ran" equals "dog ran"; "blue" matches
    # nothing. torchmetrics reports percentages; ours are fractions
    assert float(em.compute()) == pytest.approx(2 / 3)
    assert float(f1.compute()) == pytest.approx((1 + 1 + 0) / 3)
    f1_partial = TaskMetric("f1")
    f1_partial.update_texts(["the big red cat"], [["red cat sat"]])  # tokens big red cat vs red cat sat
    assert float(f1_partial.compute()) == pytest.approx(2 * (2 / 3) * (2 / 3) / (2 / 3 + 2 / 3))
    rouge, bleu = TaskMetric("rouge_l"), TaskMetric("bleu")
    rouge.update_texts(preds, refs)
    bleu.update_texts(preds, refs)
    expected_rouge = ROUGEScore(rouge_keys="rougeL")(preds, refs)["rougeL_fmeasure"]
    expected_bleu = BLEUScore(n_gram=4, smooth=True)(preds, refs)
    torch.testing.assert_close(rouge.compute(), expected_rouge)
    torch.testing.assert_close(bleu.compute(), expected_bleu)
    for m in (em, f1, rouge, bleu):
        assert 0.0 <= float(m.compute()) <= 1.0 and m.needs_generation
    accuracy = TaskMetric("accuracy")
    accuracy.update_texts(["Yes.", " no", "maybe"], [["yes"], ["No"], ["perhaps"]])
    assert float(accuracy.compute()) == pytest.approx(2 / 3), "exact match after lower-casing and a trailing '.'"


def test_generations_are_cut_at_the_first_line_break():
    m = module(max_new_tokens=5)
    continuations = ["  Paris\nQuestion: next", "\n\nleading blank lines", "one line  "]
    prompt = torch.tensor([[5, 6], [7, 8], [9, 10]])
    m.model.generate = lambda input_ids, **kw: torch.cat([input_ids, torch.ones(3, 2, dtype=torch.long)], 1)
    m.tokenizer = SimpleNamespace(pad_token_id=0, batch_decode=lambda ids, **kw: continuations)
    m._line_ends = SimpleNamespace(text=torch.zeros(1, dtype=torch.bool))  # the stopping table (generate is faked)
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "task_ids": torch.tensor([0, 1, 0])}
    assert m.generate_texts(batch) == ["Paris", "leading blank lines", "one line"]
    batch["references"] = [["Paris"], ["x"], ["one line"]]
    rows = m.predict_step(batch, 0, dataloader_idx=1)
    assert rows == [
        {"task": "b", "prediction": "Paris", "references": ["Paris"]},
        {"task": "b", "prediction": "leading blank lines", "references": ["x"]},
        {"task": "b", "prediction": "one line", "references": ["one line"]},
    ], "predict names the task of its loader"


def test_generation_stops_once_every_row_has_ended_its_first_line():
    """A real tiny model whose head is steered to write: newline, "a", newline, then "a" forever. Leading blank
    lines do not end the answer, the first line break after text does: 3 tokens, not max_new_tokens."""
    m = module(max_new_tokens=8)
    newline, a = (m.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("\n", "a"))
    script, calls = [newline, a, newline], []

    def steer(head, args, logits):  # the next token of every row, by decoding step
        step = len(calls)
        calls.append(logits.shape[1])
        forced = script[step] if step < len(script) else a
        out = torch.full_like(logits, -1e4)
        out[:, -1, forced] = 0.0
        return out

    m.model.lm_head.register_forward_hook(steer)
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    batch = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "task_ids": torch.tensor([0, 1])}
    assert m.generate_texts(batch) == ["a", "a"]
    assert len(calls) == 3, f"stopped after the first line's break, not at max_new_tokens: {len(calls)} steps"


@pytest.mark.parametrize("stage", ["universal", "domain"])
def test_weight_decay_is_refused_where_frozen_experts_share_a_tensor(stage):
    adapter = AdapterConfig(method="modula_res", r=2, stage=stage)
    with pytest.raises(ValueError, match=f"stage '{stage}' freezes some experts.*set model.weight_decay: 0"):
        module(adapter=adapter, weight_decay=0.01, task_clusters=["x", "y"])
    module(adapter=AdapterConfig(method="modula_res", r=2, stage="router"), weight_decay=0.01)  # all frozen or not


def test_modula_in_one_joint_stage_says_it_is_not_the_three_stage_method(caplog):
    with caplog.at_level("WARNING", logger="cgc_lightning.module"):
        module(adapter=AdapterConfig(method="modula_res", r=2), task_clusters=["x", "y"])
    assert "trains every expert and the router at once, in one stage" in caplog.text
    assert "python -m cgc_lightning stages" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="cgc_lightning.module"):
        module(adapter=AdapterConfig(method="modula_res", r=2, stage="universal"), task_clusters=["x", "y"])
    assert "in one stage" not in caplog.text


def _adamw_steps(m: MultiTaskLoRAModule, opt: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """``steps`` AdamW steps on gradients drawn from ``seed``, the same for every module built alike."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in m.parameters() if p.requires_grad]
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)


def _trainable(m: MultiTaskLoRAModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def test_adamw_implementations_take_the_same_steps_in_float64():
    runs = {}
    for impl in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        m = module(adamw=impl, adapter_dtype="float64", weight_decay=0.1, lr=1e-2)
        opt = m.make_optimizer()
        assert [(g["fused"], g["foreach"]) for g in opt.param_groups] == [(impl == "fused", impl == "foreach")] * 2
        _adamw_steps(m, opt, 3, seed=1)
        runs[impl] = _trainable(m)
    start = _trainable((torch.manual_seed(0), module(adapter_dtype="float64"))[1])
    assert any(not torch.equal(start[n], p) for n, p in runs["fused"].items()), "the steps moved the adapters"
    for impl in ("foreach", "for_loop"):
        for n, p in runs["fused"].items():
            torch.testing.assert_close(runs[impl][n], p, rtol=1e-12, atol=1e-14, msg=f"{impl} vs fused: {n}")


def test_adamw_auto_is_pytorchs_default_off_cuda_and_bad_names_are_refused():
    opt = module().make_optimizer()  # CPU tensors
    assert {(g["fused"], g["foreach"]) for g in opt.param_groups} == {(None, None)}
    with pytest.raises(ValueError, match="model.adamw must be one of auto, fused, foreach, for_loop"):
        module(adamw="apex")


def test_a_resumed_optimizer_steps_with_the_configured_implementation():
    torch.manual_seed(0)
    first = module(adamw="foreach", adapter_dtype="float64")
    opt = first.make_optimizer()
    _adamw_steps(first, opt, 2, seed=1)
    checkpoint = {
        "state_dict": {k: v for k, v in first.state_dict().items() if is_adapter_param(k.removeprefix("model."))},
        "optimizer_states": [copy.deepcopy(opt.state_dict())],  # as saved: not the live state tensors
    }
    resumed = module(adamw="fused", adapter_dtype="float64")
    resumed.load_state_dict(checkpoint["state_dict"], strict=False)
    resumed.on_load_checkpoint(checkpoint)  # as Lightning calls it, before it restores the optimizer
    opt2 = resumed.make_optimizer()
    opt2.load_state_dict(checkpoint["optimizer_states"][0])
    assert {(g["fused"], g["foreach"]) for g in opt2.param_groups} == {(True, False)}, "not the checkpoint's foreach"
    # and it continues the same run: two more steps on each, from the same state
    _adamw_steps(first, opt, 2, seed=2)
    _adamw_steps(resumed, opt2, 2, seed=2)
    after, expected = _trainable(resumed), _trainable(first)
    for n, p in expected.items():
        torch.testing.assert_close(after[n], p, rtol=1e-12, atol=1e-14, msg=n)
