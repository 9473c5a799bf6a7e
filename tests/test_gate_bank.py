"""The gate bank (every table-gated layer's weights in one go) against each layer computing its own, in float64."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.adapters import experts
from cgc_lightning.config import AdapterConfig
from cgc_lightning.inject import adapted_layers, adapter_parameters, inject_adapters
from cgc_lightning.routing import route, routing_state
from tests.conftest import LAYOUT, VOCAB, count_applies, randomize_adapters, tiny_model

#: (method, config) pairs whose gates the bank serves: a gate per layer, and one gate for the model
BANKED = [
    ("cgc_lora", {}),
    ("cgc_lora", {"gate_per_layer": False}),
    ("moelora", {"num_experts": 3}),
    ("moelora", {"num_experts": 3, "gate_per_layer": True}),
]


def make(method="cgc_lora", family="llama", bank=True, **kw):
    model = tiny_model(family)
    inject_adapters(model, AdapterConfig(method=method, dropout=0.0, **kw), LAYOUT)
    randomize_adapters(model)
    if not bank:
        routing_state(model).gate_bank = None
    return model.train()


def batch(seed, n=4, length=6):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def grads(model):
    return {n: p.grad.clone() for n, p in adapter_parameters(model)}


@pytest.fixture
def gated_calls(monkeypatch):
    """How many times a layer ran the per-layer gate (GatedMixture)."""
    return count_applies(monkeypatch, experts.GatedMixture)


@pytest.mark.parametrize(("method", "kw"), BANKED)
def test_bank_gives_the_per_layer_gates_loss_and_gradients(method, kw, gated_calls):
    x, tasks = batch(0), torch.tensor([2, 1, 0, 3])
    results = []
    for bank in (True, False):
        model = make(method, bank=bank, **kw)
        with route(model, tasks):
            loss = model(x, labels=x).loss
        loss.backward()
        results.append((loss.detach(), grads(model), len(gated_calls)))
        gated_calls.clear()
    (loss_b, g_b, calls_b), (loss_l, g_l, calls_l) = results
    assert calls_b == 0 and calls_l == 14  # banked: no layer ran its own gate; per layer: all 2 x 7 did
    assert loss_b == loss_l  # the weights are the softmax's values exactly
    assert g_b.keys() == g_l.keys()
    for n in g_l:
        assert_close(g_b[n], g_l[n], rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")
    assert any(g.abs().sum() > 0 for n, g in g_b.items() if "gate" in n)


def test_a_shared_gate_is_one_slot_and_every_per_layer_gate_its_own():
    assert len(routing_state(make(gate_per_layer=False)).gate_bank) == 1
    assert len(routing_state(make()).gate_bank) == 14
    assert routing_state(make("joint_lora")).gate_bank is None  # nothing to bank
    assert routing_state(make(gate_input="task+token")).gate_bank is None  # a gate that reads the tokens


def test_a_second_forward_in_one_route_block_rebuilds_the_bank_after_an_optimizer_step():
    """Two forwards, a backward and an optimizer step between them, one ``route`` block: the second forward sees
    the stepped gates and has its own graph (reusing the first's would fail in its backward)."""
    x, tasks = batch(1), torch.tensor([0, 1, 2, 3])
    outs = []
    for bank in (True, False):
        model = make(bank=bank)
        opt = torch.optim.SGD([p for _, p in adapter_parameters(model)], lr=0.5)
        with route(model, tasks):
            model(x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()
            loss = model(x, labels=x).loss
            loss.backward()
        outs.append((loss.detach(), grads(model)))
    (loss_b, g_b), (loss_l, g_l) = outs
    assert loss_b == loss_l
    for n in g_l:
        assert_close(g_b[n], g_l[n], rtol=1e-12, atol=1e-14)


def test_no_grad_then_grad_in_one_block_gives_the_gates_gradients():
    x, tasks = batch(2), torch.tensor([3, 3, 1, 0])
    model, ref = make(), make(bank=False)
    with route(model, tasks), route(ref, tasks):
        with torch.no_grad():
            model(x)
        model(x, labels=x).loss.backward()
        ref(x, labels=x).loss.backward()
    g, g_ref = grads(model), grads(ref)
    for n in g_ref:
        assert_close(g[n], g_ref[n], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_layers_recompute_their_own_weights(reentrant, gated_calls):
    """Under activation checkpointing each recomputed layer computes its own slice, the bank's values, so the
    gradients are those of the unchecked per-layer gates; the forward itself still ran on the bank."""
    x, tasks = batch(3), torch.tensor([1, 0, 3, 2])
    model, ref = make(), make(bank=False)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    with route(model, tasks):
        loss = model(x, labels=x).loss
    assert not gated_calls
    loss.backward()  # outside the block, as Lightning does it
    with route(ref, tasks):
        loss_ref = ref(x, labels=x).loss
    loss_ref.backward()
    assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    g, g_ref = grads(model), grads(ref)
    for n in g_ref:
        assert_close(g[n], g_ref[n], rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"{n}: {m}")


def test_bf16_autocast_float32_gates_give_the_same_weights_in_one_go():
    """Float32 adapters under bf16 autocast: the bank softmaxes in float32 and casts the weights once, to what
    each layer's own gate would have cast them to."""
    x, tasks = batch(4), torch.tensor([0, 2, 1, 3])
    out = []
    for bank in (True, False):
        model = make(bank=bank)
        model.float()  # a float32 model; autocast runs its products in bf16
        with route(model, tasks), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        logits.float().square().mean().backward()
        out.append((logits.detach(), grads(model)))
    (logits_b, g_b), (logits_l, g_l) = out
    assert torch.equal(logits_b, logits_l)
    # gradients to bf16's precision: a banked layer sums its input's gradient (frozen layer's and adapter's share)
    # inside one bf16 product (LinearMixture), a per-layer gate's autograd adds two bf16 products
    for n in g_l:
        assert_close(g_b[n], g_l[n], rtol=1.6e-2, atol=1e-5)


def test_generate_with_beams_and_inference_mode_use_the_per_layer_gate(gated_calls):
    model = make().eval()
    x, tasks = batch(5, n=2), torch.tensor([1, 2])
    with route(model, tasks), torch.inference_mode():
        model(x)
    assert len(gated_calls) == 14
    gated_calls.clear()
    with route(model, tasks), torch.no_grad():
        model.generate(x, max_new_tokens=2, num_beams=2, do_sample=False, pad_token_id=0)
        assert not [k for k in routing_state(model).batch_cache if k[0] == "gate_bank"]
    assert len(gated_calls) > 0  # the expanded ids are not the routed tensor: each layer gates on its own


def test_every_banked_layer_is_served_once_per_forward():
    """One build per forward however many layers (the build is what the bank saves)."""
    model = make()
    bank = routing_state(model).gate_bank
    builds = []
    real = bank._build
    bank._build = lambda *a, **kw: builds.append(1) or real(*a, **kw)
    x, tasks = batch(6), torch.tensor([0, 1, 2, 3])
    with route(model, tasks):
        model(x)
        model(x)
    assert len(builds) == 2
    assert len(list(adapted_layers(model))) == 14
