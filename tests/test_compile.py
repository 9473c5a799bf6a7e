"""torch.compile: every method traces into one graph and trains exactly as it does eagerly.

Compiling removes most of the host time per operation, which is what bounds a training step of a
small model or a small batch on a GPU (docs/benchmarks.md). The ``aot_eager`` backend runs the
same forward and backward graphs as inductor would compile, without code generation, so the
comparison with eager mode is exact in float64 and the test stays fast on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.config import AdapterConfig
from cgc_lightning.inject import adapter_parameters, inject_adapters
from cgc_lightning.routing import route
from tests.conftest import LAYOUT, randomize_adapters, tiny_model
from tests.test_inject import ids

CONFIGS = {
    "joint_lora": AdapterConfig(method="joint_lora", dropout=0.0),
    "independent_lora": AdapterConfig(method="independent_lora", dropout=0.0),
    "moelora": AdapterConfig(method="moelora", num_experts=3, dropout=0.0),
    "moelora_layer_gate": AdapterConfig(method="moelora", num_experts=3, gate_per_layer=True, dropout=0.0),
    "cgc_lora": AdapterConfig(method="cgc_lora", dropout=0.0),
    "cgc_lora_token": AdapterConfig(method="cgc_lora", gate_input="token", dropout=0.0),
    "cgc_lora_task_token": AdapterConfig(method="cgc_lora", gate_input="task+token", dropout=0.0),
    "modula_res": AdapterConfig(method="modula_res", dropout=0.0, load_balance_coef=0.01),
    "modula_flan_top1": AdapterConfig(method="modula_flan", dropout=0.0, router_top_k=1),
    "modula_res_domain": AdapterConfig(method="modula_res", dropout=0.0, stage="domain"),
}
TASKS = torch.tensor([0, 1, 2, 3])


def loss_and_grads(model, fn, x):
    with route(model, TASKS, validate=False):
        loss = fn(input_ids=x, labels=x).loss
    aux = [m.aux_loss for m in model.modules() if getattr(m, "aux_loss", None) is not None]
    total = loss + sum(aux) if aux else loss
    total.backward()
    params = [p for _, p in adapter_parameters(model) if p.requires_grad]
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    for m in model.modules():
        if getattr(m, "aux_loss", None) is not None:
            m.aux_loss = None
    return total.detach(), grads


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_step_is_one_graph_and_equals_eager(name):
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    inject_adapters(model, CONFIGS[name], LAYOUT)
    randomize_adapters(model)
    x = ids()
    loss, grads = loss_and_grads(model, model, x)
    # fullgraph: a graph break anywhere in the adapters (a host sync, an unsupported call) fails here
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for _ in range(2):  # the second call runs the cached graph
        loss_c, grads_c = loss_and_grads(model, compiled, x)
        assert_close(loss_c, loss, rtol=1e-12, atol=0)
        assert len(grads_c) == len(grads) > 0
        for g_c, g in zip(grads_c, grads, strict=True):
            assert_close(g_c, g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["joint_lora", "cgc_lora", "moelora", "modula_res"])
def test_compiled_step_under_autocast_is_one_graph_and_equals_eager(name):
    """bf16 autocast over float32 adapters, as ``bf16-mixed`` trains: the casts around the mixture nodes trace
    too. Reading a flag off the autograd function class broke the graph at every adapted layer (a CUDA graph
    per piece, re-recorded every step on the GPU), which the float64 test above, without autocast, missed."""
    torch._dynamo.reset()
    model = tiny_model("llama").float().train()
    inject_adapters(model, CONFIGS[name], LAYOUT)
    randomize_adapters(model)
    x = ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = loss_and_grads(model, model, x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        loss_c, grads_c = loss_and_grads(model, compiled, x)
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    # the same operations in the same dtypes; aot_eager may order a few bf16 reductions differently
    assert_close(loss_c, loss, rtol=1e-2, atol=0)
    assert len(grads_c) == len(grads) > 0
    for g_c, g in zip(grads_c, grads, strict=True):
        assert_close(g_c, g, rtol=5e-2, atol=1e-3)


def test_compiled_step_follows_the_batchs_task_ids():
    """The task ids are an input of the graph, not a constant baked into it: new ids, new routing."""
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    inject_adapters(model, CONFIGS["cgc_lora"], LAYOUT)
    randomize_adapters(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = ids()
    for tasks in ([0, 1, 2, 3], [3, 3, 0, 1], [2, 0, 2, 0]):
        with torch.no_grad(), route(model, tasks):
            assert_close(compiled(input_ids=x).logits, model(input_ids=x).logits, rtol=1e-12, atol=0)


def test_a_checkpointed_layer_that_breaks_the_graph_recomputes_with_its_batchs_routing():
    """A graph break inside a checkpointed layer makes dynamo run that checkpoint eagerly, and its backward then
    recomputes the layer eagerly too, after ``route`` has closed: the recompute must still find the batch's ids.
    transformers 5.25's ``kernels`` wrapper of the attention forward did this to every decoder layer, and the
    recompute found no ids, since whether to replay the routing was decided while dynamo traced the call."""
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    inject_adapters(model, CONFIGS["cgc_lora"], LAYOUT)
    randomize_adapters(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    x = ids()
    loss, grads = loss_and_grads(model, model, x)
    for layer in model.model.layers:
        layer.mlp.register_forward_pre_hook(lambda module, args: torch._dynamo.graph_break())
    torch._dynamo.utils.counters.clear()
    loss_c, grads_c = loss_and_grads(model, torch.compile(model, backend="aot_eager"), x)
    assert torch._dynamo.utils.counters["graph_break"], "the checkpointed layers were meant to break the graph"
    assert_close(loss_c, loss, rtol=1e-12, atol=0)
    assert len(grads_c) == len(grads) > 0
    for g_c, g in zip(grads_c, grads, strict=True):
        assert_close(g_c, g, rtol=1e-10, atol=1e-14)


class Active:
    """What ``kernels`` sets around each attention forward: an object outside the model, the layer running."""

    layer = None


def test_a_checkpointed_layer_that_sets_python_state_stays_in_the_graph():
    """transformers 5.25's ``kernels`` wraps each attention forward in a set and a reset of a module-level variable.
    Eager checkpointing would set it again in the recompute, so dynamo runs such a checkpointed layer eagerly, out
    of the graph; the module's compiled step (``checkpoints_in_graph``) keeps it in, and trains as eager does."""
    from cgc_lightning.module import checkpoints_in_graph

    torch._dynamo.reset()
    model = tiny_model("llama").train()
    inject_adapters(model, CONFIGS["cgc_lora"], LAYOUT)
    randomize_adapters(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # as the module sets them: each would break the graph on its own
    model.disable_input_require_grads()
    x = ids()
    loss, grads = loss_and_grads(model, model, x)
    active = Active()

    def enter(module, args):
        active.layer = module

    def leave(module, args, out):
        active.layer = None

    for layer in model.model.layers:
        layer.self_attn.register_forward_pre_hook(enter)
        layer.self_attn.register_forward_hook(leave)
    with checkpoints_in_graph(True):  # fullgraph: without it, the first checkpointed layer breaks the graph
        loss_c, grads_c = loss_and_grads(model, torch.compile(model, backend="aot_eager", fullgraph=True), x)
    assert active.layer is None
    assert_close(loss_c, loss, rtol=1e-12, atol=0)
    assert len(grads_c) == len(grads) > 0
    for g_c, g in zip(grads_c, grads, strict=True):
        assert_close(g_c, g, rtol=1e-10, atol=1e-14)


def address_recorder():
    """A compile backend (``aot_eager``) that notes, on every call of the compiled graph, the address of each input
    dynamo holds fixed (parameters, tensors read from module attributes): ``(calls, backend)``."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch._dynamo.utils import get_static_address_type

    calls = []

    def recorder(gm, example_inputs):
        names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
        fixed = [
            i
            for i, x in enumerate(example_inputs)
            if isinstance(x, torch.Tensor) and (isinstance(x, torch.nn.Parameter) or get_static_address_type(x))
        ]
        compiled = aot_eager(gm, example_inputs)

        def run(*args):
            calls.append({names[i]: args[i].data_ptr() for i in fixed})
            return compiled(*args)

        return run

    return calls, recorder


def moved_inputs(calls) -> list[str]:
    return sorted(name for name in calls[0] if len({c[name] for c in calls}) > 1)


@pytest.mark.parametrize("persistent", [False, True])
def test_persistent_routing_keeps_packed_rows_ids_where_the_compiled_graph_reads_them(persistent):
    """Packed rows route a task per token, ``(B, T)`` ids; each batch's are new. Without ``persistent`` the graph
    finds its routing ids moved in every step (what made CUDA graphs record every step), with it never."""
    torch._dynamo.reset()
    model = tiny_model("llama").train()
    inject_adapters(model, CONFIGS["cgc_lora"], LAYOUT)
    calls, recorder = address_recorder()
    compiled = torch.compile(model, backend=recorder)
    x = ids(length=6)
    for seed in range(3):
        tasks = torch.randint(0, 4, x.shape, generator=torch.Generator().manual_seed(seed))  # (B, T)
        with route(model, tasks, validate=False, persistent=persistent):
            compiled(input_ids=x, labels=x).loss.backward()
    assert len(calls) == 3
    moved = moved_inputs(calls)
    assert moved if not persistent else not moved, moved
    assert all("routing" in name for name in moved), moved


# --------------------------------------------------------------------------------- the module's option

FIXTURE = str(Path(__file__).resolve().parent / "fixtures" / "tiny-llama")


def fit_module(tmp_path, compile, gradient_checkpointing=False, steps=3, adapter=None):
    import lightning as L
    from torch.utils.data import ConcatDataset, DataLoader

    from cgc_lightning.hf import ModelSpec
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.collate import Collator
    from tests.test_seesaw import _ddp_rows

    torch.manual_seed(0)
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=FIXTURE, random_init=True, dtype="float64"),
        adapter=adapter or AdapterConfig(method="cgc_lora", r=4, dropout=0.0),
        task_names=["a", "b", "c"],
        task_clusters=["x", "x", "y"],
        gradient_checkpointing=gradient_checkpointing,
        warmup_ratio=0.0,
        compile=compile,
    )
    rows = ConcatDataset([_ddp_rows(4, t) for t in range(3)])
    # batches of 2 from a shuffled mix: each step sees a different pair of tasks
    train = DataLoader(
        rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=Collator(0, [0, 0, 1])
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, train_dataloaders=train)
    return module


@pytest.mark.parametrize("gradient_checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_module_compile_trains_like_eager_and_keeps_its_state_dict(tmp_path, gradient_checkpointing):
    torch._dynamo.reset()
    eager = fit_module(tmp_path, False, gradient_checkpointing)
    torch._dynamo.utils.counters.clear()
    compiled = fit_module(tmp_path, {"backend": "aot_eager"}, gradient_checkpointing)
    assert compiled._compiled and not eager._compiled
    # the training steps went through the compiled model, as one graph (checkpointed layers included)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    w_e, w_c = dict(adapter_parameters(eager.model)), dict(adapter_parameters(compiled.model))
    assert w_e.keys() == w_c.keys()
    assert any(name.endswith("lora_B") and p.abs().sum() > 0 for name, p in w_c.items()), "did training run?"
    for name in w_e:
        assert_close(w_c[name], w_e[name], rtol=1e-9, atol=1e-12, msg=name)
    # the compiled wrapper is not a submodule: checkpoints and state dicts name the same tensors
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    assert not any("_orig_mod" in k for k in compiled.state_dict())


@pytest.mark.parametrize(
    "adapter",
    [
        AdapterConfig(method="cgc_lora", r=4, dropout=0.0),
        AdapterConfig(method="moelora", r=4, dropout=0.0),
        AdapterConfig(method="modula_res", r=4, dropout=0.0, stage="domain"),  # the stage that reads task ids
        AdapterConfig(method="independent_lora", r=4, dropout=0.0),
    ],
    ids=lambda a: a.method,
)
def test_compiled_steps_find_what_the_graph_holds_fixed_at_the_same_address_every_batch(tmp_path, adapter):
    """CUDA graphs (``mode: reduce-overhead``) replay a graph only while every input that dynamo holds fixed
    (parameters, and tensors read from module attributes, such as the routing ids) keeps its address;
    otherwise they record the graph again, which made every compiled ``fit`` step 5x the eager one while
    the same step with one reused ids tensor ran at 0.6x (docs/benchmarks.md). Checked on the CPU with a
    backend that notes those addresses on every call of the compiled graph."""
    calls, recorder = address_recorder()
    torch._dynamo.reset()
    fit_module(tmp_path, {"backend": recorder}, steps=4, adapter=adapter)
    assert len(calls) == 4 and any("routing" in name for name in calls[0]), list(calls[0])
    moved = moved_inputs(calls)
    assert not moved, f"fixed graph inputs at a new address in a later step: {moved}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"mood": "default"}, r"unknown torch.compile argument\(s\) \['mood'\]"),
        ({"mode": "fast"}, "unknown mode 'fast'; torch.compile knows default, "),
        ({"backend": "nope"}, "unknown backend 'nope'; available: .*aot_eager"),
        ({"mode": "default", "backend": "aot_eager"}, "mode 'default' is inductor's"),
        ("yes", "must be true, false or a mapping"),
    ],
)
def test_bad_compile_settings_are_refused_before_the_model_loads(value, message, monkeypatch):
    from cgc_lightning import module as module_mod

    def no_load(spec):
        raise AssertionError("the model was loaded before the setting was checked")

    monkeypatch.setattr(module_mod, "load_model", no_load)
    with pytest.raises(ValueError, match=message):
        module_mod.MultiTaskLoRAModule(
            module_mod.ModelSpec(name_or_path=FIXTURE, random_init=True), task_names=["a"], compile=value
        )


def test_cuda_graph_modes_are_recognised():
    from cgc_lightning.module import uses_cuda_graphs

    assert uses_cuda_graphs({"mode": "reduce-overhead"}) and uses_cuda_graphs({"mode": "max-autotune"})
    assert uses_cuda_graphs({"options": {"triton.cudagraphs": True}})
    assert not uses_cuda_graphs({}) and not uses_cuda_graphs(None)
    assert not uses_cuda_graphs({"mode": "max-autotune-no-cudagraphs"})


def test_the_compile_setting_is_one_mlflow_param_whatever_its_form():
    from cgc_lightning.tracking import run_params

    forms = [False, True, {}, {"mode": "reduce-overhead", "dynamic": False}]
    values = [run_params({"model": {"compile": v}})["model.compile"] for v in forms]
    assert values == ["False", "True", "True", "dynamic=False, mode=reduce-overhead"]
