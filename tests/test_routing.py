"""Per-sample routing stays right under activation checkpointing, generate(), and batch after batch."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.config import AdapterConfig
from cgc_lightning.inject import adapted_layers, adapter_parameters, inject_adapters
from cgc_lightning.routing import route, routing_state
from tests.conftest import LAYOUT, VOCAB, randomize_adapters, tiny_model

pytestmark = pytest.mark.usefixtures("expert_path")  # every test through both expert kernels


def make(family="llama", method="cgc_lora", **kw):
    model = tiny_model(family)
    inject_adapters(model, AdapterConfig(method=method, dropout=0.0, **kw), LAYOUT)
    randomize_adapters(model)
    return model.train()


def checkpointing(model, reentrant: bool):
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})


def grads(model):
    return {n: p.grad.clone() for n, p in adapter_parameters(model)}


def batch(seed, n=4, length=6):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize(
    ("family", "method", "kw"),
    [
        ("llama", "cgc_lora", {}),
        ("llama", "cgc_lora", {"gate_input": "task+token"}),
        ("qwen2", "moelora", {"num_experts": 3}),
        ("gpt2", "independent_lora", {}),
    ],
)
def test_checkpointing_on_and_off_give_equal_gradients(family, method, kw, reentrant):
    x, tasks = batch(0), torch.tensor([2, 1, 0, 3])
    results = []
    for gc in (False, True):
        model = make(family, method, **kw)
        if gc:
            checkpointing(model, reentrant)
        with route(model, tasks):
            loss = model(x, labels=x).loss
        loss.backward()  # outside the route block, as Lightning does it
        results.append((loss.detach(), grads(model)))
    (loss0, g0), (loss1, g1) = results
    assert_close(loss1, loss0, rtol=1e-12, atol=1e-12)
    assert g0.keys() == g1.keys()
    for n in g0:
        assert_close(g1[n], g0[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for n, g in g1.items() if "gate" in n or method == "independent_lora")


def test_two_batches_in_a_row_then_two_backwards_under_checkpointing():
    """Batch 2 goes through before batch 1's backward recomputes: each must see its own tasks."""
    x1, t1 = batch(1), torch.tensor([0, 1, 2, 3])
    x2, t2 = batch(2), torch.tensor([3, 3, 1, 0])
    results = []
    for gc in (False, True):
        model = make()
        if gc:
            checkpointing(model, reentrant=False)
        with route(model, t1):
            loss1 = model(x1, labels=x1).loss
        with route(model, t2):
            loss2 = model(x2, labels=x2).loss
        loss1.backward()
        g_first = grads(model)
        loss2.backward()
        results.append((g_first, grads(model)))
    (first_ref, total_ref), (first_gc, total_gc) = results
    for n in first_ref:
        assert_close(first_gc[n], first_ref[n], rtol=1e-10, atol=1e-12)
        assert_close(total_gc[n], total_ref[n], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("gen_kw", [dict(), dict(num_beams=2), dict(num_beams=2, num_return_sequences=2)])
def test_generate_with_a_mixed_batch_equals_each_sample_alone(family, gen_kw):
    model = make(family).eval()
    model.generation_config.pad_token_id = 0
    prompts, tasks = batch(3, n=4, length=5), torch.tensor([0, 1, 2, 3])
    kw = dict(max_new_tokens=6, do_sample=False, **gen_kw)
    with torch.no_grad(), route(model, tasks):
        together = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    per = gen_kw.get("num_return_sequences", 1)
    for b in range(4):
        with torch.no_grad(), route(model, tasks[b : b + 1]):
            alone = model.generate(prompts[b : b + 1], attention_mask=torch.ones_like(prompts[b : b + 1]), **kw)
        assert torch.equal(together[b * per : (b + 1) * per], alone)
    # the adapters matter: the same prompt under another task's experts continues differently
    with torch.no_grad(), route(model, torch.tensor([1, 0, 3, 2])):
        swapped = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)
    assert not torch.equal(swapped, together)


def test_route_restores_the_previous_ids_and_nests():
    model = make()
    state = model._cgc_routing
    with route(model, [0, 1]):
        outer = state.task_ids.clone()
        with route(model, [3]):
            assert state.task_ids.tolist() == [3]
        assert torch.equal(state.task_ids, outer)
    assert state.task_ids is None


def test_persistent_routing_refills_one_pair_of_id_tensors_per_shape_and_routes_as_before():
    model = make()
    state = model._cgc_routing
    seen = []
    for tasks in ([0, 3], [2, 1], [1, 2, 3]):
        x = batch(0, n=len(tasks))
        with torch.no_grad():
            with route(model, tasks):
                expected = model(x).logits
            with route(model, tasks, persistent=True):
                assert state.task_ids.tolist() == tasks
                assert state.cluster_ids.tolist() == [LAYOUT.task_cluster[t] for t in tasks]
                seen.append((state.task_ids.data_ptr(), state.cluster_ids.data_ptr()))
                assert_close(model(x).logits, expected, rtol=0, atol=0)
    assert seen[0] == seen[1], "a batch of the same shape gets the same tensors, refilled"
    assert seen[2] != seen[0], "another shape gets its own"
    assert state.task_ids is None


def test_rows_that_do_not_fit_the_task_ids():
    model = make()
    with pytest.raises(RuntimeError, match="got an input with 3 rows, but route\\(\\) was given 2 task ids"):
        with route(model, [0, 1]):
            model(batch(0, n=3))


@pytest.mark.parametrize(
    ("method", "module", "builder"),
    [("cgc_lora", "cgc_lora", "task_spread"), ("moelora", "moelora", "task_spread"),
     ("independent_lora", "lora", "spread_weights")],
)  # fmt: skip
def test_per_batch_tables_are_built_once_per_batch_and_never_shared_by_two_models(
    method, module, builder, expert_path, monkeypatch
):
    """What every layer derives from the batch's ids is built by one layer, per batch and per model."""
    if expert_path == "gathered":
        pytest.skip("the gathered expert path builds no per-batch table")
    import importlib

    adapters = importlib.import_module(f"cgc_lightning.adapters.{module}")
    builds = []
    real = getattr(adapters, builder)
    monkeypatch.setattr(adapters, builder, lambda *a, **kw: builds.append(1) or real(*a, **kw))
    first, second = make(method=method), make(method=method)
    assert len(list(adapted_layers(first))) == 14  # 2 blocks x 7 projections, all reading one table
    state_1, state_2 = routing_state(first), routing_state(second)
    tasks, x = torch.tensor([0, 1, 2, 3]), batch(0)
    with route(first, tasks), route(second, tasks):  # on the CPU both states hold this very ids tensor
        first(x)
        assert len(builds) == 1  # one build for all 14 layers
        first(x)  # the same batch again (as a checkpointed layer's recompute would): reused
        assert len(builds) == 1
        second(x)
        assert len(builds) == 2  # the second model builds its own, same ids or not
        assert state_1.batch_cache and state_2.batch_cache and state_1.batch_cache is not state_2.batch_cache
        tables = {k: v for k, v in state_1.batch_cache.items() if k[0] != "gate_bank"}  # the bank: tested apart
        ((key, (ids, _, value)),) = tables.items()
        assert ids is tasks and state_2.batch_cache[key][2] is not value
    assert state_1.batch_cache == {} and state_2.batch_cache == {}  # nothing outlives its batch
    with route(first, tasks):  # a new batch, even with the same ids tensor: built anew
        first(x)
    assert len(builds) == 3
