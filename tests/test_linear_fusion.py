"""The frozen linear layer inside the adapter's node (LinearMixture) against the layer called on its own, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.adapters import experts
from cgc_lightning.config import AdapterConfig
from cgc_lightning.inject import AdaptedLayer, adapted_layers, adapter_parameters, inject_adapters
from cgc_lightning.routing import route
from tests.conftest import LAYOUT, VOCAB, count_applies, randomize_adapters, tiny_model

pytestmark = pytest.mark.usefixtures("expert_path")  # both expert kernels: fused where dense, F.linear first otherwise

METHODS = [
    ("joint_lora", {}),
    ("independent_lora", {}),
    ("cgc_lora", {}),
    ("cgc_lora", {"gate_input": "task+token"}),
    ("moelora", {"num_experts": 3}),
    ("modula_res", {}),  # MoDULA's own forward: the frozen layer keeps its own call
]


def make(method="cgc_lora", dropout=0.0, **kw):
    model = tiny_model("llama")
    inject_adapters(model, AdapterConfig(method=method, dropout=dropout, **kw), LAYOUT)
    randomize_adapters(model)
    return model.train()


def batch(seed, n=4, length=6):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def linear_calls(monkeypatch):
    """How many times a layer ran the fused node (LinearMixture)."""
    return count_applies(monkeypatch, experts.LinearMixture)


def step(model, tasks, x, seed=0):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    with route(model, tasks):
        loss = model(x, labels=x).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in adapter_parameters(model) if p.grad is not None}


def unfused(monkeypatch):
    monkeypatch.setattr(AdaptedLayer, "_fusable_base", lambda self: None)


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no_dropout", "dropout"])
@pytest.mark.parametrize(("method", "kw"), METHODS)
def test_fused_frozen_layer_gives_the_loss_and_gradients_of_its_own_call(
    method, kw, dropout, expert_path, linear_calls, monkeypatch
):
    x, tasks = batch(0), torch.tensor([2, 1, 0, 3])
    fused = step(make(method, dropout, **kw), tasks, x)
    if method == "modula_res" or expert_path == "gathered":  # gathered experts: F.linear, then the gather
        assert not linear_calls
    else:
        assert len(linear_calls) == 14  # every one of the 2 x 7 adapted projections
    n_fused = len(linear_calls)
    unfused(monkeypatch)
    reference = step(make(method, dropout, **kw), tasks, x)
    assert len(linear_calls) == n_fused  # none more without fusing
    assert_close(fused[0], reference[0], rtol=1e-13, atol=1e-13)
    assert fused[1].keys() == reference[1].keys()
    for n in reference[1]:
        assert_close(fused[1][n], reference[1][n], rtol=1e-11, atol=1e-13, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("method", ["joint_lora", "cgc_lora"])
def test_packed_rows_and_checkpointing_through_the_fused_layer(method, expert_path, monkeypatch, linear_calls):
    """Packed rows (a task per token) and activation checkpointing, reentrant or not: a per-token CGC-LoRA gate
    runs GatedMixture after ``F.linear``, joint LoRA's dense layer the fused node."""
    x, tasks = batch(1), torch.tensor([[0, 0, 0, 2, 2, 2], [1, 1, 3, 3, 3, 3], [2, 2, 2, 2, 0, 0], [3, 1, 1, 1, 1, 1]])
    results = []
    for fuse in (True, False):
        if not fuse:
            unfused(monkeypatch)
        for reentrant in (None, False, True):
            model = make(method)
            if reentrant is not None:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            results.append(step(model, tasks, x))
    assert bool(linear_calls) == (method == "joint_lora" and expert_path == "dense")
    loss0, g0 = results[-1]  # unfused, no checkpointing
    for loss, g in results[:-1]:
        assert_close(loss, loss0, rtol=1e-13, atol=1e-13)
        for n in g0:
            assert_close(g[n], g0[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_a_hooked_or_trainable_frozen_layer_keeps_its_own_call(expert_path, linear_calls):
    """A forward hook on a projection still runs, and a projection whose weight was unfrozen gets its gradient."""
    model = make()
    layers = [layer for _, layer in adapted_layers(model)]
    seen = []
    layers[0].base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    layers[1].base_layer.weight.requires_grad_(True)
    x, tasks = batch(2), torch.tensor([0, 1, 2, 3])
    with route(model, tasks):
        model(x, labels=x).loss.backward()
    assert seen == [(4, 6, layers[0].base_layer.out_features)]
    assert layers[1].base_layer.weight.grad is not None and layers[1].base_layer.weight.grad.abs().sum() > 0
    assert len(linear_calls) == (12 if expert_path == "dense" else 0)  # the other 12 projections were fused


def test_a_global_module_hook_turns_fusion_off(linear_calls):
    calls = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda mod, inp, out: calls.append(type(mod)))
    try:
        model = make()
        with route(model, torch.tensor([0, 1, 2, 3])), torch.no_grad():
            model(batch(3))
    finally:
        handle.remove()
    assert torch.nn.Linear in calls and not linear_calls


def test_bf16_autocast_on_a_float32_model_matches_the_unfused_layer(monkeypatch):
    """bf16-mixed: the frozen weight is cast to bf16 as ``F.linear`` under autocast casts it, so the logits are the
    unfused layer's bit for bit; gradients to bf16's precision (one product sums the input gradient's two shares)."""
    x, tasks = batch(4), torch.tensor([0, 2, 1, 3])
    out = []
    for fuse in (True, False):
        if not fuse:
            unfused(monkeypatch)
        model = make().float()
        with route(model, tasks), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        logits.float().square().mean().backward()
        out.append((logits.detach(), {n: p.grad.clone() for n, p in adapter_parameters(model)}))
    (logits_f, g_f), (logits_u, g_u) = out
    assert logits_f.dtype == torch.bfloat16 and torch.equal(logits_f, logits_u)
    for n in g_u:
        assert_close(g_f[n], g_u[n], rtol=1.6e-2, atol=1e-5)
