"""Sequence packing (``data.packing``): packed rows give every task the loss and gradients of the padded batch.

Examples of several tasks share a row; the model attends within each example (position ids restart with each,
no attention mask: Hugging Face builds the block-diagonal causal mask) and each token goes through its own
task's experts. Compared in float64 against the padded batch of the same examples, for every method.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.config import AdapterConfig
from cgc_lightning.hf import ModelSpec
from cgc_lightning.inject import adapter_parameters
from cgc_lightning.module import MultiTaskLoRAModule
from cgc_lightning.routing import route
from datamodules.collate import IGNORE, Collator, PackingCollator, first_fit
from datamodules.sampling import PackedBatchSampler
from tests.conftest import randomize_adapters

TINY = str(Path(__file__).parent / "fixtures" / "tiny-llama")
TASKS, CLUSTERS = ["a", "b", "c", "d"], [0, 1, 0, 1]
METHODS = {
    "cgc_lora": AdapterConfig(method="cgc_lora", r=2, dropout=0.0),
    "cgc_lora_token_gate": AdapterConfig(method="cgc_lora", r=2, dropout=0.0, gate_input="token"),
    "moelora": AdapterConfig(method="moelora", r=4, num_experts=4, dropout=0.0),
    "joint_lora": AdapterConfig(method="joint_lora", r=2, dropout=0.0),
    "independent_lora": AdapterConfig(method="independent_lora", r=2, dropout=0.0),
    "modula_res_router": AdapterConfig(method="modula_res", r=2, dropout=0.0, stage="router"),
    "modula_flan_domain": AdapterConfig(method="modula_flan", r=2, dropout=0.0, stage="domain"),
}


def module(adapter: AdapterConfig, chunk: int | None) -> MultiTaskLoRAModule:
    torch.manual_seed(0)
    m = MultiTaskLoRAModule(
        ModelSpec(name_or_path=TINY, random_init=True, dtype="float64"),
        adapter=adapter,
        task_names=TASKS,
        task_clusters=CLUSTERS,
        loss_chunk_size=chunk,
    )
    randomize_adapters(m.model, seed=3)
    return m.train()


def examples(n: int, seed: int = 0, vocab: int = 50) -> list[dict]:
    """Encoded rows as the data module makes them: a prompt (no loss) then a target, of varied lengths and tasks."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, target = rng.randint(1, 7), rng.randint(1, 5)
        ids = [rng.randrange(3, vocab) for _ in range(prompt + target)]
        rows.append({"input_ids": ids, "labels": [IGNORE] * prompt + ids[prompt:], "task_id": rng.randrange(4)})
    return rows


def test_first_fit_places_in_order_and_refuses_what_does_not_fit():
    assert first_fit([5, 4, 3, 6, 1], rows=2, max_length=10) == [0, 0, 1, 1, 0]
    assert first_fit([5, 6, 6], rows=2, max_length=10) is None


@pytest.mark.parametrize("chunk", [3, None], ids=["lean_loss", "full_logits"])
@pytest.mark.parametrize("name", list(METHODS))
def test_packed_rows_give_each_task_the_loss_and_gradients_of_the_padded_batch(name, chunk):
    rows = examples(10)
    padded = Collator(pad_id=0, task_cluster=CLUSTERS)(rows)
    packed = PackingCollator(pad_id=0, task_cluster=CLUSTERS, max_length=24, rows=5)(rows)
    assert packed["input_ids"].shape[0] < len(rows) and packed["task_ids"].shape == packed["input_ids"].shape
    results = []
    for batch in (padded, packed):
        m = module(METHODS[name], chunk)
        loss, task_sum, task_tokens = m._per_task_loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in adapter_parameters(m.model) if p.grad is not None}
        results.append((loss, task_sum, task_tokens, grads))
    (l1, s1, t1, g1), (l2, s2, t2, g2) = results
    assert torch.equal(t1, t2) and t1.sum() > 0
    assert_close(s2, s1, rtol=1e-10, atol=1e-12)  # each task's summed token loss
    assert_close(l2, l1, rtol=1e-10, atol=1e-12)
    assert g1.keys() == g2.keys() and g1
    for k in g1:
        assert_close(g2[k], g1[k], rtol=1e-8, atol=1e-12, msg=k)


@pytest.mark.parametrize("name", ["cgc_lora", "moelora", "modula_res_router"])
def test_rounded_batch_widths_change_no_task_loss_or_gradient(name):
    rows = examples(10, seed=1)
    batches = [
        Collator(pad_id=0, task_cluster=CLUSTERS)(rows),
        Collator(pad_id=0, task_cluster=CLUSTERS, pad_to_multiple_of=16, max_length=26)(rows),
        PackingCollator(pad_id=0, task_cluster=CLUSTERS, max_length=26, rows=5),
        PackingCollator(pad_id=0, task_cluster=CLUSTERS, max_length=26, rows=5, pad_to_multiple_of=16),
    ]
    batches[2:] = [collate(rows) for collate in batches[2:]]
    assert batches[1]["input_ids"].shape[1] == 16 > batches[0]["input_ids"].shape[1]
    assert batches[3]["input_ids"].shape[1] == 26 > batches[2]["input_ids"].shape[1] > 16, "capped at max_length"
    results = []
    for batch in batches:
        m = module(METHODS[name], 3)
        loss, task_sum, task_tokens = m._per_task_loss(batch)
        loss.backward()
        results.append(
            (task_sum, task_tokens, {n: p.grad for n, p in adapter_parameters(m.model) if p.grad is not None})
        )
    s0, t0, g0 = results[0]
    for s, t, g in results[1:]:
        assert torch.equal(t, t0) and g.keys() == g0.keys()
        assert_close(s, s0, rtol=1e-10, atol=1e-12)
        for k in g0:
            assert_close(g[k], g0[k], rtol=1e-8, atol=1e-12, msg=k)


def test_a_task_per_token_routes_like_a_task_per_sample():
    m = module(METHODS["cgc_lora"], None).eval()
    ids = torch.randint(3, 50, (3, 6))
    tasks = torch.tensor([0, 3, 1])
    with route(m.model, tasks):
        per_sample = m.model(input_ids=ids).logits
    with route(m.model, tasks[:, None].expand(3, 6)):
        per_token = m.model(input_ids=ids).logits
    assert_close(per_token, per_sample, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"task_ids must be \(B,\), one id per sample, or \(B, T\)"):
        with route(m.model, torch.zeros(1, 2, 3, dtype=torch.long)):
            pass


def test_packed_batch_sampler_fills_rows_in_sampler_order_and_counts_examples():
    lengths = [5, 9, 3, 7, 2, 8, 4, 6]
    sampler = PackedBatchSampler(list(range(8)), lengths, rows=2, max_length=12)
    batches = list(sampler)
    assert [i for b in batches for i in b] == list(range(8)), "every example once, in the sampler's order"
    for b in batches:
        assert first_fit([lengths[i] for i in b], 2, 12) is not None
    assert sampler.examples_done == [sum(len(b) for b in batches[: k + 1]) for k in range(len(batches))]
    # each batch but the last ends because the next example fits in none of its rows
    for b, nxt in zip(batches, batches[1:], strict=False):
        assert first_fit([lengths[i] for i in [*b, nxt[0]]], 2, 12) is None
