"""MoDULA against per-expert, per-token loops in float64, its stages, and adding a domain (METHODS.md sections 3, 4)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.adapters import MoDULA
from cgc_lightning.adapters.modula import load_balance_loss
from cgc_lightning.config import AdapterConfig, TaskLayout
from cgc_lightning.export import init_from_adapter, save_adapter
from cgc_lightning.inject import adapted_layers, adapter_parameters, inject_adapters, merge_task, param_report, unmerge
from cgc_lightning.routing import disable_adapters, route
from tests.conftest import LAYOUT, VOCAB, randomize_adapters, tiny_model

D_IN, D_OUT, R = 12, 10, 3
F64 = dict(dtype=torch.float64)
STAGES = ("joint", "universal", "domain", "router")
CASES = {
    "res": dict(variant="res"),
    "flan": dict(variant="flan"),
    "res_top1": dict(variant="res", top_k=1),
    "flan_top2": dict(variant="flan", top_k=2),
    "res_u2": dict(variant="res", num_universal=2),
    "flan_u2_top2": dict(variant="flan", num_universal=2, top_k=2),
}
#: Three domains, tasks 0..4 spread over them (clusters 0, 1, 0, 2, 1).
TASK_CLUSTERS = (0, 1, 0, 2, 1)


def make(stage="joint", task_clusters=TASK_CLUSTERS, **kw):
    return MoDULA(
        in_features=D_IN, out_features=D_OUT, r=R, alpha=6.0, task_clusters=task_clusters, stage=stage, **kw, **F64
    )


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def naive_weights(adapter: MoDULA, x_b: torch.Tensor, cluster: int) -> torch.Tensor:
    """``(T, E)`` weight of every expert for every token of one sample, token by token."""
    u, E, T = adapter.num_universal, adapter.experts.num_experts, x_b.shape[0]
    w = torch.zeros(T, E, **F64)
    if adapter.stage == "universal":
        w[:, :u] = 1
        return w
    offset = u if adapter.variant == "res" else 0  # Res: U always on, outside the router; Flan: U is routed
    w[:, :offset] = 1
    if adapter.stage == "domain":  # METHODS.md 3: the router replaced by the one-hot domain label
        w[:, u + cluster] = 1
        return w
    for i in range(T):
        logits = adapter.router_W @ x_b[i]  # (n_routed,)
        p = torch.softmax(logits, dim=0)
        keep = range(len(logits)) if adapter.top_k is None else logits.argsort(descending=True)[: adapter.top_k]
        for e in keep:
            w[i, offset + int(e)] = p[e]
    return w


def naive_forward(adapter: MoDULA, x, clusters):
    """s * sum_e w_{b,t,e} B_e A_e x_{b,t}, one sample and one expert at a time."""
    A, B = adapter.experts.lora_A, adapter.experts.lora_B  # (E, r, d_in), (E, r, d_out)
    rows = []
    for b in range(x.shape[0]):
        w = naive_weights(adapter, x[b], int(clusters[b]))
        acc = torch.zeros(x.shape[1], D_OUT, **F64)
        for e in range(adapter.experts.num_experts):
            acc = acc + w[:, e : e + 1] * (x[b] @ A[e].t() @ B[e])
        rows.append(adapter.scaling * acc)
    return torch.stack(rows)


@pytest.mark.usefixtures("expert_path")
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_naive_loop_forward_and_gradients(case, stage):
    adapter = make(stage, **CASES[case])
    randomize(adapter)
    params = [adapter.router_W, adapter.experts.lora_A, adapter.experts.lora_B]
    for p in params:
        p.requires_grad_(True)  # the raw math of every tensor; which rows a stage trains is tested below
    for h in adapter._grad_hooks:
        h.remove()
    x = torch.randn(5, 6, D_IN, **F64, requires_grad=True)
    params = [x, *params]
    tasks = torch.tensor([0, 1, 2, 3, 4])
    clusters = torch.tensor([TASK_CLUSTERS[t] for t in tasks])
    fused = adapter(x, tasks, clusters)
    naive = naive_forward(adapter, x, clusters)
    assert_close(fused, naive, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(fused)
    g_fused = torch.autograd.grad((fused * upstream).sum(), params, allow_unused=True)
    g_naive = torch.autograd.grad((naive * upstream).sum(), params, allow_unused=True)
    for p, a, b in zip(params, g_fused, g_naive, strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        assert_close(a, b, rtol=1e-11, atol=1e-11)
    # the stage's own tensors are informative; the router is out of the function before stage 3
    g_router = g_fused[1]
    assert (g_router is not None and g_router.abs().sum() > 0) == (stage in ("joint", "router"))
    assert g_fused[0].abs().sum() > 0 and g_fused[2].abs().sum() > 0


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("case", ["res", "flan_top2"])
def test_mixed_batch_equals_each_sample_alone(case, stage):
    adapter = make(stage, **CASES[case])
    randomize(adapter, seed=3)
    x = torch.randn(5, 4, D_IN, **F64)
    tasks = torch.tensor([0, 1, 2, 3, 4])  # domains 0, 1, 0, 2, 1 interleaved
    clusters = torch.tensor(TASK_CLUSTERS)
    batch = adapter(x, tasks, clusters)
    for b in range(5):
        alone = adapter(x[b : b + 1], tasks[b : b + 1], clusters[b : b + 1])
        assert_close(batch[b : b + 1], alone, rtol=1e-13, atol=1e-13)


def plain_lora(x, A, B, scaling):
    """The LoRA reference: s * B A x with A: (r, d_in), B: (d_out, r)."""
    return scaling * (x @ A.t() @ B.t())


def test_domain_stage_follows_the_spec_per_variant():
    """METHODS.md 3: the domain stage routes by the one-hot domain label. MoDULA-Res keeps its always-on
    universal path; MoDULA-Flan's router mixes U with the domain experts, so one-hot on D_c leaves U out."""
    x = torch.randn(3, 4, D_IN, **F64)
    tasks, clusters = torch.tensor([0, 1, 3]), torch.tensor([TASK_CLUSTERS[t] for t in (0, 1, 3)])
    for variant in ("res", "flan"):
        adapter = make("domain", variant=variant)
        randomize(adapter, seed=6)
        A, B = adapter.experts.lora_A, adapter.experts.lora_B  # (E, r, d_in), (E, r, d_out)
        out = adapter(x, tasks, clusters)
        for b, c in enumerate(clusters.tolist()):
            expected = plain_lora(x[b], A[1 + c], B[1 + c].t(), adapter.scaling)  # D_c (one universal expert)
            if variant == "res":
                expected = expected + plain_lora(x[b], A[0], B[0].t(), adapter.scaling)  # + U
            assert_close(out[b], expected, rtol=1e-13, atol=1e-13)


def test_one_expert_at_weight_one_equals_plain_lora():
    x = torch.randn(3, 4, D_IN, **F64)
    tasks, clusters = torch.tensor([0, 1, 3]), torch.tensor([0, 1, 2])
    for variant in ("res", "flan"):
        adapter = make("universal", variant=variant)
        randomize(adapter, seed=4)
        A, B = adapter.experts.lora_A[0], adapter.experts.lora_B[0].t()
        assert_close(adapter(x, tasks, clusters), plain_lora(x, A, B, adapter.scaling), rtol=1e-13, atol=1e-13)
    # Res with one domain: its router has one choice, so U plus D at weight 1, the sum of two LoRAs
    adapter = make("router", task_clusters=(0, 0), variant="res")
    randomize(adapter, seed=5)
    (A0, A1), (B0, B1) = adapter.experts.lora_A, adapter.experts.lora_B
    expected = plain_lora(x, A0, B0.t(), adapter.scaling) + plain_lora(x, A1, B1.t(), adapter.scaling)
    assert_close(adapter(x, None, None), expected, rtol=1e-13, atol=1e-13)


def test_zero_b_and_zero_router_at_init():
    x = torch.randn(2, 3, D_IN, **F64)
    for case in CASES.values():
        for stage in STAGES:
            adapter = make(stage, **case)  # fresh: B = 0
            out = adapter(x, torch.tensor([0, 3]), torch.tensor([0, 2]))
            assert torch.equal(out, torch.zeros_like(out))
    # a zero router is uniform: Flan mixes the 1 + 3 experts at 1/4 each, Res its 3 domains at 1/3
    for variant, expected in (("flan", 0.25), ("res", 1 / 3)):
        w = make("router", variant=variant).router_weights(x)  # (B, T, E)
        assert_close(w[..., -3:], torch.full_like(w[..., -3:], expected))


def test_router_top_k_keeps_the_k_likeliest_probabilities():
    x = torch.randn(4, 5, D_IN, **F64)
    adapter = make("router", variant="flan", top_k=2)
    randomize(adapter, seed=6)
    w = adapter.router_weights(x)  # (B, T, 4)
    dense = torch.softmax(x @ adapter.router_W.t(), -1)
    assert ((w > 0).sum(-1) == 2).all()
    assert_close(w.sort(-1).values[..., 2:], dense.sort(-1).values[..., 2:], rtol=0, atol=0)
    adapter.top_k = 4  # every expert: the dense router
    assert_close(adapter.router_weights(x), dense, rtol=0, atol=0)
    res = make("router", variant="res", top_k=1)
    randomize(res, seed=6)
    w = res.router_weights(x)  # (B, T, 1 + 3)
    top1 = torch.softmax(x @ res.router_W.t(), -1).max(-1).values
    assert (w[..., 0] == 1).all() and ((w[..., 1:] > 0).sum(-1) == 1).all()
    assert_close(w[..., 1:].sum(-1), top1, rtol=0, atol=0)


def test_load_balance_loss_is_switch_transformers():
    logits = torch.randn(50, 3, **F64, requires_grad=True)
    probs = torch.softmax(logits, -1)
    top1 = torch.nn.functional.one_hot(logits.argmax(-1), 3).to(probs.dtype)
    assert_close(load_balance_loss(logits), 3 * (top1.mean(0) * probs.mean(0)).sum(), rtol=1e-14, atol=1e-14)
    assert_close(load_balance_loss(torch.zeros(8, 4, **F64), k=2), torch.tensor(1.0, **F64))  # uniform: 1
    # left by a training forward that uses the router, with its coefficient; never in eval or before stage 3
    adapter = make("router", variant="res", load_balance_coef=0.5)
    randomize(adapter, seed=2)
    x = torch.randn(2, 3, D_IN, **F64)
    adapter(x, None, None)
    expected = 0.5 * load_balance_loss(x.reshape(-1, D_IN) @ adapter.router_W.t())
    assert_close(adapter.aux_loss, expected, rtol=1e-13, atol=1e-13)
    (g,) = torch.autograd.grad(adapter.aux_loss, adapter.router_W)
    assert g.abs().sum() > 0
    adapter.aux_loss = None
    adapter.eval()
    adapter(x, None, None)
    assert adapter.aux_loss is None
    adapter.train().set_stage("domain")
    adapter(x, None, torch.tensor([0, 2]))
    assert adapter.aux_loss is None


# ------------------------------------------------------------------------------------------ model level

X = torch.randint(0, VOCAB, (4, 7), generator=torch.Generator().manual_seed(0))
TASKS = torch.tensor([0, 1, 2, 3])  # LAYOUT: clusters reason, extract, reason, extract


def modula(method="modula_res", stage="joint", layout=LAYOUT, **kw):
    model = tiny_model("llama")
    inject_adapters(model, AdapterConfig(method=method, stage=stage, dropout=0.0, r=4, **kw), layout)
    return model


def expert_rows(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter_parameters(model)}


@pytest.mark.parametrize("method", ["modula_res", "modula_flan"])
def test_logits_unchanged_at_init_and_disabled_adapter_is_the_base(method):
    with torch.no_grad():
        reference = tiny_model("llama")(X).logits
    model = modula(method)
    layers = [layer.adapter for _, layer in adapted_layers(model)]
    for stage in STAGES:
        for adapter in layers:
            adapter.set_stage(stage)
        with torch.no_grad(), route(model, TASKS):
            assert torch.equal(model(X).logits, reference), stage
    randomize_adapters(model)
    for stage in STAGES:
        for adapter in layers:
            adapter.set_stage(stage)
        with torch.no_grad(), route(model, TASKS):
            assert not torch.allclose(model(X).logits, reference), stage
            with disable_adapters(model):
                assert torch.equal(model(X).logits, reference), stage


def test_the_router_needs_no_task_label():
    model = modula("modula_flan", "router")
    randomize_adapters(model)
    with torch.no_grad():
        without = model(X).logits
        with route(model, TASKS):
            assert torch.equal(model(X).logits, without)
    model = modula("modula_res", "domain")
    with pytest.raises(RuntimeError, match="task ids"):
        model(X)


#: Which rows of the expert axis (u = 1: row 0 universal, rows 1.. the domains) and whether the router
#: each stage trains, starting from nothing trained.
TRAINED = {"universal": ([0], False), "domain": ([1, 2], False), "router": ([], True), "joint": ([0, 1, 2], True)}


@pytest.mark.parametrize("method", ["modula_res", "modula_flan"])
def test_each_stage_moves_only_its_own_parameters(method):
    model = modula(method)
    randomize_adapters(model)
    opt_params = [p for p in model.parameters() if p.requires_grad]  # joint: every adapter tensor
    model.train()
    for stage in STAGES:
        for _, layer in adapted_layers(model):
            layer.adapter.set_stage(stage)
        rows, router = TRAINED[stage]
        expected = sum(
            len(rows) * a.experts.r * (a.experts.in_features + a.experts.out_features) + router * a.router_W.numel()
            for a in (layer.adapter for _, layer in adapted_layers(model))
        )
        assert param_report(model).trainable == expected, stage
        base = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.AdamW(opt_params, lr=1e-2, weight_decay=0.0)  # tensors without a gradient are skipped
        for step in range(2):
            opt.zero_grad()
            with route(model, TASKS.roll(step)):
                model(X, labels=X).loss.backward()
            opt.step()
        for name, p in model.named_parameters():
            if name.endswith(("lora_A", "lora_B")):
                for e in range(p.shape[0]):
                    moved = not torch.equal(p[e], base[name][e])
                    assert moved == (e in rows), f"{stage}: expert {e} of {name} moved={moved}"
            elif name.endswith("router_W"):
                assert (not torch.equal(p, base[name])) == router, f"{stage}: {name}"
            else:
                assert torch.equal(p, base[name]), f"frozen base parameter {name} changed"


@pytest.mark.parametrize("stage", ["universal", "domain"])
def test_merge_of_the_label_routed_stages_and_unmerge_restores_w0(stage):
    model = modula("modula_res", stage)
    randomize_adapters(model, seed=3)
    w0 = {n: layer.base_layer.weight.detach().clone() for n, layer in adapted_layers(model)}
    for t in range(len(LAYOUT.tasks)):
        ids = torch.full((4,), t)
        with torch.no_grad(), route(model, ids):
            expected = model(X).logits
        merge_task(model, t)
        with torch.no_grad(), disable_adapters(model):
            assert_close(model(X).logits, expected, rtol=1e-10, atol=1e-10)
        unmerge(model)
        for n, layer in adapted_layers(model):
            assert_close(layer.base_layer.weight, w0[n], rtol=0, atol=1e-14)
    router_model = modula("modula_res", "router")
    with pytest.raises(ValueError, match="routes each token.*only the universal and domain stages are mergeable"):
        merge_task(router_model, 0)


# ------------------------------------------------------------------------------------------ stages


def train_steps(model, tasks=TASKS, steps=2, seed=0):
    """A few AdamW steps on the trainable tensors, routed by ``tasks``."""
    x = torch.randint(0, VOCAB, (len(tasks), 7), generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        with route(model, tasks):
            model(x, labels=x).loss.backward()
        opt.step()
    return model


def run_stage(method, stage, layout, init, tmp_path, name):
    """Build a fresh tiny model for ``stage``, start it from ``init``, train it, save it."""
    model = modula(method, stage, layout)
    untrained = init_from_adapter(model, init) if init is not None else list(layout.clusters)
    train_steps(model, torch.arange(len(layout.tasks)))
    save_adapter(model, tmp_path / name)
    return model, untrained


def layer_tensors(model, layer=None):
    """``{key: tensor}`` of one adapted layer: ``experts.lora_A``, ``experts.lora_B``, ``router_W``."""
    name, adapted = next(iter(adapted_layers(model))) if layer is None else (layer, dict(adapted_layers(model))[layer])
    return name, {k: v.detach().clone() for k, v in adapted.adapter.named_parameters()}


@pytest.mark.parametrize("method", ["modula_res", "modula_flan"])
def test_stages_and_adding_a_domain_keep_earlier_experts_bit_identical(method, tmp_path):
    u = 1
    s1, _ = run_stage(method, "universal", LAYOUT, None, tmp_path, "universal")
    s2, untrained = run_stage(method, "domain", LAYOUT, tmp_path / "universal", tmp_path, "domain")
    assert untrained == ["reason", "extract"]  # the universal stage trains no domain expert
    s3, untrained = run_stage(method, "router", LAYOUT, tmp_path / "domain", tmp_path, "router")
    assert untrained == []
    for name, layer in adapted_layers(s3):
        p1 = dict(adapted_layers(s1))[name].adapter
        p2 = dict(adapted_layers(s2))[name].adapter
        for key in ("lora_A", "lora_B"):
            t1, t2, t3 = (getattr(a.experts, key) for a in (p1, p2, layer.adapter))
            assert torch.equal(t2[:u], t1[:u]) and torch.equal(t3[:u], t1[:u]), "universal expert changed"
            assert torch.equal(t3, t2), "stage 3 changed an expert"
            assert not torch.equal(t2[u:], t1[u:]), "stage 2 trained the domain experts"
        assert not torch.equal(layer.adapter.router_W, p2.router_W), "stage 3 trained the router"

    # adding a domain: new clusters order by name (the new one in the middle), tasks renumbered
    grown = TaskLayout(("qa", "poem", "nli", "sum", "ner"), ("extract", "write", "reason"), (2, 1, 0, 2, 0))
    s4, untrained = run_stage(method, "domain", grown, tmp_path / "router", tmp_path, "grown_domain")
    assert untrained == ["write"]
    s5, untrained = run_stage(method, "router", grown, tmp_path / "grown_domain", tmp_path, "grown_router")
    assert untrained == []
    old = {"reason": 0, "extract": 1}  # domain index in LAYOUT
    new = {"extract": 0, "write": 1, "reason": 2}
    offset = u if method == "modula_flan" else 0  # Flan's router rows start with the universal expert
    for name, layer in adapted_layers(s5):
        a3, a4, a5 = dict(adapted_layers(s3))[name].adapter, dict(adapted_layers(s4))[name].adapter, layer.adapter
        for key in ("lora_A", "lora_B"):
            t3, t4, t5 = (getattr(a.experts, key) for a in (a3, a4, a5))
            assert torch.equal(t4[:u], t3[:u]) and torch.equal(t5[:u], t3[:u]), "universal expert changed"
            for d in ("reason", "extract"):
                assert torch.equal(t4[u + new[d]], t3[u + old[d]]), f"domain {d} changed while adding one"
                assert torch.equal(t5[u + new[d]], t3[u + old[d]]), f"domain {d} changed in the router stage"
            assert torch.equal(t5, t4)
        assert not torch.equal(a4.experts.lora_B[u + new["write"]], torch.zeros_like(a4.experts.lora_B[0]))
        # the old router rows came along (then stage 3 retrained the router)
        for d in ("reason", "extract"):
            assert torch.equal(a4.router_W[offset + new[d]], a3.router_W[offset + old[d]])
        assert torch.equal(a4.router_W[offset + new["write"]], torch.zeros_like(a4.router_W[0]))
        assert not torch.equal(a5.router_W, a4.router_W)


def test_adding_a_domain_errors(tmp_path):
    model = modula("modula_res", "router")
    randomize_adapters(model)
    save_adapter(model, tmp_path / "router")
    renamed = TaskLayout(("qa", "nli"), ("reason", "other"), (0, 1))
    with pytest.raises(ValueError, match=r"domain expert\(s\) \['extract'\] that are not among.*\['reason', 'other'\]"):
        init_from_adapter(modula("modula_res", "domain", renamed), tmp_path / "router")
    with pytest.raises(ValueError, match="stage 'domain' has no domain to train"):
        init_from_adapter(modula("modula_res", "domain"), tmp_path / "router")
    with pytest.raises(ValueError, match="holds a modula_res adapter; this model's method is modula_flan"):
        init_from_adapter(modula("modula_flan", "domain"), tmp_path / "router")
    with pytest.raises(ValueError, match="trained with num_universal=1, this model has num_universal=2"):
        init_from_adapter(modula("modula_res", "domain", num_universal=2), tmp_path / "router")


def test_init_adapter_warm_starts_any_method_exactly(tmp_path):
    for config in (AdapterConfig(method="independent_lora", r=4), AdapterConfig(method="cgc_lora", r=4)):
        saved = tiny_model("llama")
        inject_adapters(saved, config, LAYOUT)
        randomize_adapters(saved, seed=8)
        save_adapter(saved, tmp_path / config.method)
        fresh = tiny_model("llama")
        inject_adapters(fresh, config, LAYOUT)
        assert init_from_adapter(fresh, tmp_path / config.method) == []
        ours = dict(adapter_parameters(fresh))
        assert all(torch.equal(ours[n], p) for n, p in adapter_parameters(saved))
    with pytest.raises(ValueError, match="holds a independent_lora adapter; this model's method is cgc_lora"):
        init_from_adapter(fresh, tmp_path / "independent_lora")
    other = tiny_model("llama")
    inject_adapters(other, AdapterConfig(method="cgc_lora", r=2), LAYOUT)
    with pytest.raises(ValueError, match=r"lora_A has shape \(8, 4, 32\), the model expects \(8, 2, 32\)"):
        init_from_adapter(other, tmp_path / "cgc_lora")


def test_config_checks():
    with pytest.raises(ValueError, match="stage 'router' is a MoDULA setting; method 'cgc_lora'"):
        AdapterConfig(method="cgc_lora", stage="router")
    with pytest.raises(ValueError, match="unknown stage 'final'"):
        AdapterConfig(method="modula_res", stage="final")
    with pytest.raises(ValueError, match="router_top_k must be >= 1"):
        AdapterConfig(method="modula_flan", router_top_k=0)
    with pytest.raises(ValueError, match=r"top_k must be in 1\.\.2"):
        modula("modula_res", router_top_k=3)  # Res routes the 2 domains only
    assert AdapterConfig(method="modula_res", stage="domain").mergeable
    assert not AdapterConfig(method="modula_flan").mergeable
