"""Adapters injected into tiny Llama, Qwen2, Gemma3 and GPT-2 models (METHODS.md section 4, model level)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers.pytorch_utils import Conv1D

from cgc_lightning.config import AdapterConfig, TaskLayout
from cgc_lightning.inject import (
    AdaptedLayer,
    adapted_layers,
    inject_adapters,
    is_adapter_param,
    merge_task,
    unmerge,
)
from cgc_lightning.routing import disable_adapters, route
from tests.conftest import LAYOUT, VOCAB, randomize_adapters, tiny_model

FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]
METHOD_CONFIGS = {
    "joint_lora": AdapterConfig(method="joint_lora", dropout=0.0),
    "independent_lora": AdapterConfig(method="independent_lora", dropout=0.0),
    "moelora": AdapterConfig(method="moelora", num_experts=3, dropout=0.0),
    "cgc_lora": AdapterConfig(method="cgc_lora", dropout=0.0),
    "cgc_lora_token": AdapterConfig(method="cgc_lora", gate_input="token", dropout=0.0),
}
TASKS = torch.tensor([0, 1, 2, 3])


def ids(seed=0, batch=4, length=7):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def adapted(family, name, seed=0):
    model = tiny_model(family, seed=seed)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    report = inject_adapters(model, METHOD_CONFIGS[name], LAYOUT)
    return model, base, report


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_logits_unchanged_at_init_and_only_adapters_train(family, name):
    x = ids()
    model = tiny_model(family)
    with torch.no_grad():
        reference = model(x).logits
    model, base, report = adapted(family, name)
    with torch.no_grad(), route(model, TASKS):
        assert torch.equal(model(x).logits, reference)  # B = 0: exactly the base model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(is_adapter_param(n) for n in trainable)
    assert report.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total == sum(p.numel() for p in model.parameters())
    layers = dict(adapted_layers(model))
    assert layers and all(isinstance(layer.base_layer, (torch.nn.Linear, Conv1D)) for layer in layers.values())
    assert not any(n.endswith("lm_head") for n in layers)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    model.train()
    with route(model, TASKS):
        out = model(x, labels=x)
    out.loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    moved = [n for n in trainable if not torch.equal(dict(model.named_parameters())[n], before[n])]
    assert any(n.endswith("lora_B") for n in moved), "one step must move the adapters"
    # the base weights inside the wrappers are the original tensors, bit for bit
    for n, layer in layers.items():
        key = f"{n}.weight"
        assert torch.equal(layer.base_layer.weight, base[key])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_mixed_batch_of_two_clusters_equals_each_sample_alone(family, name):
    model, _, _ = adapted(family, name)
    randomize_adapters(model)
    x = ids(1)
    with torch.no_grad():
        with route(model, TASKS):
            batch = model(x).logits
        for b in range(4):
            with route(model, TASKS[b : b + 1]):
                alone = model(x[b : b + 1]).logits
            assert_close(batch[b : b + 1], alone, rtol=1e-12, atol=1e-12)
        # and the tasks really differ from one another
        assert not torch.allclose(batch[0], batch[1])


@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_disabled_adapters_give_the_base_model(name):
    x = ids(2)
    reference = tiny_model("llama")(x).logits
    model, _, _ = adapted("llama", name)
    randomize_adapters(model)
    with torch.no_grad(), route(model, TASKS):
        assert not torch.allclose(model(x).logits, reference)
        with disable_adapters(model):
            assert_close(model(x).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["joint_lora", "independent_lora", "moelora", "cgc_lora"])
def test_merged_equals_unmerged_per_task_and_unmerge_restores_base(family, name):
    model, base, _ = adapted(family, name)
    randomize_adapters(model)
    x = ids(3)
    for t in range(len(LAYOUT.tasks)):
        tasks = torch.full((4,), t)
        with torch.no_grad(), route(model, tasks):
            unmerged = model(x).logits
            merge_task(model, t)
            merged = model(x).logits
            unmerge(model)
        assert_close(merged, unmerged, rtol=1e-10, atol=1e-10)
    for n, layer in adapted_layers(model):
        assert_close(layer.base_layer.weight, base[f"{n}.weight"], rtol=1e-12, atol=1e-12)


def test_merge_by_task_name_and_merge_errors():
    model, _, _ = adapted("llama", "cgc_lora")
    merge_task(model, "sum")
    assert {layer.merged_task for _, layer in adapted_layers(model)} == {2}
    with pytest.raises(RuntimeError, match="already merged"):
        merge_task(model, "qa")
    # merged weights serve "sum" alone: routing another task through them would silently give sum's output
    with pytest.raises(ValueError, match="task 'sum' is merged.*this batch routes 'qa' too: unmerge"):
        with route(model, torch.tensor([2, 0])):
            pass
    with torch.no_grad(), route(model, torch.tensor([2, 2])):
        model(ids(batch=2))
    unmerge(model)
    with torch.no_grad(), route(model, torch.tensor([2, 0])):
        model(ids(batch=2))
    with pytest.raises(ValueError, match="unknown task 'nope'.*'qa', 'nli', 'sum', 'ner'"):
        merge_task(model, "nope")
    token, _, _ = adapted("llama", "cgc_lora_token")
    with pytest.raises(ValueError, match="gate_input='token'.*cannot be merged"):
        merge_task(token, 0)


def test_no_target_matched_lists_what_exists():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"no module matched target_modules \['query'\].*q_proj, k_proj, v_proj"):
        inject_adapters(model, AdapterConfig(target_modules=["query"]), LAYOUT)


def test_target_patterns_exact_suffix_regex_and_exclusions():
    model = tiny_model("llama")
    cfg = AdapterConfig(
        method="joint_lora",
        target_modules=["model.layers.0.self_attn.q_proj", "v_proj", r"re:.*layers\.1\.mlp\.down_proj"],
        exclude_modules=["model.layers.1.self_attn.v_proj"],
    )
    inject_adapters(model, cfg, LAYOUT)
    assert sorted(n for n, _ in adapted_layers(model)) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.1.mlp.down_proj",
    ]


def test_matching_a_non_linear_module_is_an_error():
    with pytest.raises(ValueError, match=r"not nn.Linear or Conv1D: model.layers.0.mlp \(LlamaMLP\)"):
        inject_adapters(tiny_model("llama"), AdapterConfig(target_modules=["re:model.layers.0.mlp"]), LAYOUT)


def test_injecting_twice_is_an_error():
    model, _, _ = adapted("llama", "joint_lora")
    with pytest.raises(RuntimeError, match="already has adapters"):
        inject_adapters(model, METHOD_CONFIGS["joint_lora"], LAYOUT)


def test_task_id_out_of_range():
    model, _, _ = adapted("llama", "cgc_lora")
    with pytest.raises(ValueError, match=r"task id 4 is out of range.*4 tasks \(0..3: qa, nli, sum, ner\)"):
        with route(model, [0, 4]):
            pass


def test_cluster_ids_that_disagree_with_the_layout():
    model, _, _ = adapted("llama", "cgc_lora")
    with pytest.raises(ValueError, match="sample 1 has task 'nli', which is in cluster 1, but cluster_ids says 0"):
        with route(model, [0, 1], cluster_ids=[0, 0]):
            pass


def test_calling_without_task_ids_names_the_fix():
    model, _, _ = adapted("llama", "cgc_lora")
    with pytest.raises(RuntimeError, match="route\\(model, task_ids=...\\)"):
        model(ids())


@pytest.mark.parametrize(
    ("clusters", "message"),
    [
        ({"a": ["qa"], "b": ["nli"]}, r"task\(s\) \['sum'\] are in no cluster"),
        ({"a": ["qa", "sum"], "b": ["nli", "sum"]}, "task 'sum' is in two clusters, 'a' and 'b'"),
        ({"a": ["qa", "nli", "sum"], "b": []}, "cluster 'b' has no tasks"),
    ],
)
def test_task_layout_errors(clusters, message):
    with pytest.raises(ValueError, match=message):
        TaskLayout.from_clusters(clusters, tasks=["qa", "nli", "sum"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(r=0), "r must be a positive integer, got r=0"),
        (dict(r=-1), "r must be a positive integer"),
        (dict(method="cgc_lora", num_shared=0, num_specific=0), "S \\+ P >= 1"),
        (dict(method="moelora", r=8, num_experts=3, split_rank=True), "r divisible by num_experts"),
        (dict(method="cgc_lora", gate_input="token", gate_per_layer=False), "cannot be shared by all layers"),
        (dict(method="lora"), "unknown method 'lora'"),
    ],
)
def test_adapter_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdapterConfig(**kwargs)


def test_shared_gate_is_one_tensor_for_the_whole_model():
    model = tiny_model("llama")
    inject_adapters(model, AdapterConfig(method="cgc_lora", gate_per_layer=False), LAYOUT)
    gates = [n for n, _ in model.named_parameters() if "gate_logits" in n]
    assert gates == ["adapter_gate.gate_logits"]
    layers = [layer for _, layer in adapted_layers(model)]
    assert all(layer.adapter.task_gate is model.adapter_gate for layer in layers)
    assert isinstance(layers[0], AdaptedLayer)


def test_adapters_follow_the_models_train_or_eval_mode():
    model = tiny_model("llama")  # eval mode
    inject_adapters(model, AdapterConfig(method="cgc_lora", dropout=0.5), LAYOUT)
    randomize_adapters(model)
    assert not any(m.training for m in model.modules())
    x = ids(4)
    with torch.no_grad(), route(model, TASKS):
        assert torch.equal(model(x).logits, model(x).logits)  # no dropout at inference
        model.train()
        assert not torch.equal(model(x).logits, model(x).logits)


AMP_CONFIGS = {
    **METHOD_CONFIGS,
    "modula_res": AdapterConfig(method="modula_res", dropout=0.0),
    "modula_flan_domain": AdapterConfig(method="modula_flan", stage="domain", dropout=0.0),
}


@pytest.mark.parametrize("name", list(AMP_CONFIGS))
def test_bf16_autocast_trains_float32_adapters(name, expert_path):
    """``precision: bf16-mixed``: float32 model and adapters under autocast, forward and backward (METHODS.md s4)."""
    model = tiny_model("llama", dtype=torch.float32)
    inject_adapters(model, AMP_CONFIGS[name], LAYOUT)
    randomize_adapters(model)
    model.train()
    x = ids()
    with route(model, TASKS):
        reference = model(input_ids=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        logits.float().logsumexp(-1).mean().backward()  # outside autocast, as Lightning runs it
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in trained)
    assert all(torch.isfinite(p.grad).all() for _, p in trained)
    assert any(p.grad.abs().sum() > 0 for n, p in trained if ".lora_A" in n)
    assert_close(logits.float(), reference, rtol=0.05, atol=0.05)


def _small(config_cls, **kw):
    from transformers import AutoModelForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    return AutoModelForCausalLM.from_config(config_cls(**{**base, **kw}))


def test_auto_targets_every_projection_of_phi3_and_stablelm():
    from transformers import Phi3Config, StableLmConfig

    for model, expected in [
        (_small(Phi3Config, pad_token_id=0), {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}),
        (_small(StableLmConfig), {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ]:
        inject_adapters(model, AdapterConfig(method="joint_lora"), LAYOUT)
        assert {n.rsplit(".", 1)[-1] for n, _ in adapted_layers(model)} == expected


def test_auto_falls_back_on_peft_mapping_with_a_warning():
    pytest.importorskip("peft")
    from transformers import OPTConfig

    model = _small(OPTConfig, ffn_dim=32, max_position_embeddings=32, word_embed_proj_dim=16)
    match = r"no preset of its own for model_type 'opt'; using PEFT's mapping \['q_proj', 'v_proj'\]"
    with pytest.warns(UserWarning, match=match):
        inject_adapters(model, AdapterConfig(method="joint_lora"), LAYOUT)
    assert {n.rsplit(".", 1)[-1] for n, _ in adapted_layers(model)} == {"q_proj", "v_proj"}


def test_auto_without_any_mapping_names_the_model_type_and_its_layers():
    model = tiny_model("llama")
    model.config.model_type = "my_llm"
    match = r"no target-module preset for model_type 'my_llm'.*Linear layers in this model: q_proj"
    with pytest.raises(ValueError, match=match):
        inject_adapters(model, AdapterConfig(), LAYOUT)


def test_adapter_parameter_dtype_follows_the_policy():
    from cgc_lightning.inject import adapter_param_dtype

    assert adapter_param_dtype(torch.bfloat16) == adapter_param_dtype(torch.float16) == torch.float32
    assert adapter_param_dtype(torch.float64) == torch.float64 and adapter_param_dtype(torch.float32) == torch.float32
    assert adapter_param_dtype(torch.bfloat16, "base") == torch.bfloat16
    assert adapter_param_dtype(torch.float32, "bfloat16") == torch.bfloat16
    match = "adapter_dtype must be auto, base or one of float32, bfloat16, float16, float64; got 'int8'"
    with pytest.raises(ValueError, match=match):
        adapter_param_dtype(torch.float32, "int8")


@pytest.mark.parametrize("name", ["cgc_lora", "moelora", "joint_lora"])
def test_a_bf16_base_gets_float32_adapters_that_train_under_autocast(name):
    """On a bf16 base the adapters (gates included) are float32, as PEFT keeps them: in bf16 an AdamW step below
    half of bf16's spacing at the parameter's value was rounded away, so gate logits stalled near uniform."""
    model = tiny_model("llama").to(torch.bfloat16)
    inject_adapters(model, METHOD_CONFIGS[name], LAYOUT)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), route(model, TASKS):
        logits = model(ids()).logits
    assert logits.dtype == torch.bfloat16
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in trainable)
    with torch.no_grad(), route(model, TASKS):  # without autocast too: the update is added in the base's dtype
        assert model(ids()).logits.dtype == torch.bfloat16

    base = tiny_model("llama").to(torch.bfloat16)
    inject_adapters(base, METHOD_CONFIGS[name], LAYOUT, "base")  # the earlier behaviour, still reachable
    assert all(p.dtype == torch.bfloat16 for p in base.parameters())


@pytest.mark.parametrize("name", ["cgc_lora", "moelora", "joint_lora", "independent_lora"])
def test_float32_adapters_under_autocast_add_their_update_inside_the_last_product(name):
    """Under autocast the adapter's products run in bf16 whatever its weights' dtype, so an adapted layer neither
    casts its input up to float32 nor adds the update to the base output as a separate (B, T, d_out) pass. Its
    output and gradients are those of ``base(x) + adapter(x)`` computed apart (to bf16 rounding)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.calls.append(
                (str(func.overloadpacket.__name__), getattr(out, "dtype", None), tuple(getattr(out, "shape", ())))
            )
            return out

    model = tiny_model("llama").to(torch.bfloat16)
    inject_adapters(model, METHOD_CONFIGS[name], LAYOUT)
    randomize_adapters(model)
    layer = next(m for _, m in adapted_layers(model))
    x = torch.randn(4, 7, layer.base_layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), route(model, TASKS):
        with Ops() as ops:
            y = layer(x)
        reference = layer.base_layer(x) + layer.adapter(x.float(), TASKS, None).to(torch.bfloat16)
    assert y.dtype == torch.bfloat16
    out_shape = tuple(y.shape)
    assert not [c for c in ops.calls if c[0] == "_to_copy" and c[1] == torch.float32 and c[2] == tuple(x.shape)]
    assert not [c for c in ops.calls if c[0] == "add" and c[2] == out_shape], "the update goes inside addmm"
    assert_close(y.float(), reference.float(), rtol=2e-2, atol=2e-2)
    grads = []
    for value in (y, reference):
        model.zero_grad(set_to_none=True)
        x.grad = None
        value.float().square().sum().backward()
        grads.append(
            (x.grad.clone(), {n: q.grad.clone() for n, q in layer.adapter.named_parameters() if q.grad is not None})
        )
    (gx, ga), (rx, ra) = grads
    assert ga.keys() == ra.keys() and ga and all(g.dtype == torch.float32 for g in ga.values())
    for k, (g, r) in {"x": (gx.float(), rx.float()), **{k: (ga[k], ra[k]) for k in ga}}.items():
        assert (g - r).norm() <= 2e-2 * r.norm() and r.norm() > 0, k  # bf16 products: relative to the whole


def test_an_adam_step_a_bf16_gate_loses_is_kept_in_float32():
    """What the float32 default fixes: the same small AdamW step on a gate logit at 0.75."""
    steps = {}
    for dtype in (torch.bfloat16, torch.float32):
        logit = torch.nn.Parameter(torch.full((3,), 0.75, dtype=dtype))
        opt = torch.optim.AdamW([logit], lr=1e-3, weight_decay=0.0)
        logit.grad = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype)
        opt.step()
        steps[dtype] = (logit.detach().float() - 0.75).tolist()
    assert steps[torch.bfloat16] == [0.0, 0.0, 0.0], "bf16's spacing at 0.75 is 2**-8: a 1e-3 step rounds away"
    assert steps[torch.float32][0] == pytest.approx(1e-3, rel=1e-3) and steps[torch.float32][2] < 0
