"""The adapter math against per-expert loops, in float64 (METHODS.md section 4, layer level)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from cgc_lightning.adapters import CGCLoRA, IndependentLoRA, JointLoRA, MoELoRA
from cgc_lightning.adapters.cgc_lora import expert_layout
from tests.conftest import LAYOUT
from tests.oracles import dense_task_table, dense_task_table_forward

pytestmark = pytest.mark.usefixtures("expert_path")  # every test through both expert kernels

D_IN, D_OUT, R = 12, 10, 4
F64 = dict(dtype=torch.float64)


def make(kind: str, **kw):
    common = dict(in_features=D_IN, out_features=D_OUT, r=R, alpha=8.0, **F64)
    n = len(LAYOUT.tasks)
    if kind == "joint_lora":
        return JointLoRA(**common)
    if kind == "independent_lora":
        return IndependentLoRA(num_tasks=n, **common)
    if kind == "moelora":
        return MoELoRA(num_tasks=n, num_experts=kw.pop("num_experts", 3), gate_dim=5, **common, **kw)
    return CGCLoRA(task_clusters=LAYOUT.task_cluster, **common, **kw)


CASES = {
    "joint": ("joint_lora", {}),
    "independent": ("independent_lora", {}),
    "moelora": ("moelora", {}),
    "moelora_split": ("moelora", dict(num_experts=2, split_rank=True)),
    "cgc_task": ("cgc_lora", {}),
    "cgc_token": ("cgc_lora", dict(gate_input="token")),
    "cgc_task+token": ("cgc_lora", dict(gate_input="task+token")),
    "cgc_S0": ("cgc_lora", dict(num_shared=0, num_specific=2)),
    "cgc_P0": ("cgc_lora", dict(num_shared=3, num_specific=0)),
}


def randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))


def naive_experts(adapter, task: int, x_b: torch.Tensor):
    """Expert ids task ``task`` sees and their weights (T, K), computed without the fused path."""
    T = x_b.shape[0]
    if isinstance(adapter, JointLoRA):
        return [0], torch.ones(T, 1, **F64)
    if isinstance(adapter, IndependentLoRA):
        return [task], torch.ones(T, 1, **F64)
    if isinstance(adapter, MoELoRA):
        g = adapter.gate
        w = torch.softmax(g.gate_W @ g.gate_task_emb[task], dim=0)  # (E,)
        return list(range(adapter.experts.num_experts)), w.expand(T, -1)
    logits = torch.zeros(T, adapter.visible.shape[1], **F64)
    if adapter.task_gate is not None:
        logits = logits + adapter.task_gate.gate_logits[task]
    if adapter.gate_token_W is not None:
        logits = logits + x_b @ adapter.gate_token_W[task].t()
    return adapter.visible[task].tolist(), torch.softmax(logits, dim=-1)


def naive_forward(adapter, x, task_ids):
    """Loop over samples and experts: s * sum_k w_k B_k A_k x."""
    A, B = adapter.experts.lora_A, adapter.experts.lora_B  # (E, r, d_in), (E, r, d_out) = B_e^T
    rows = []
    for b in range(x.shape[0]):
        experts, w = naive_experts(adapter, int(task_ids[b]), x[b])
        acc = torch.zeros(x.shape[1], D_OUT, **F64)
        for k, e in enumerate(experts):
            acc = acc + w[:, k : k + 1] * (x[b] @ A[e].t() @ B[e])
        rows.append(adapter.scaling * acc)
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_naive_loop_forward_and_gradients(case):
    kind, kw = CASES[case]
    adapter = make(kind, **kw)
    randomize(adapter)
    x = torch.randn(5, 6, D_IN, **F64, requires_grad=True)
    tasks = torch.tensor([0, 1, 2, 3, 1])
    fused = adapter(x, tasks, None)
    naive = naive_forward(adapter, x, tasks)
    assert_close(fused, naive, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(fused)
    params = [x, *adapter.parameters()]
    g_fused = torch.autograd.grad((fused * upstream).sum(), params)
    g_naive = torch.autograd.grad((naive * upstream).sum(), params)
    for a, b in zip(g_fused, g_naive, strict=True):
        assert_close(a, b, rtol=1e-11, atol=1e-11)
    # every gradient is informative: no parameter is left out of the computation
    assert all(g.abs().sum() > 0 for g in g_fused)


def test_cgc_expert_layout_gives_each_task_its_cluster_set_only():
    # cluster 0 = tasks 0, 2; cluster 1 = tasks 1, 3; S = 2 shared, P = 1 specific
    visible, total = expert_layout(LAYOUT.task_cluster, num_shared=2, num_specific=1)
    assert total == 8
    assert visible.tolist() == [[0, 1, 2], [4, 5, 6], [0, 1, 3], [4, 5, 7]]


@pytest.mark.parametrize("case", list(CASES))
def test_mixed_batch_equals_each_sample_alone(case):
    kind, kw = CASES[case]
    adapter = make(kind, **kw)
    randomize(adapter, seed=3)
    x = torch.randn(4, 5, D_IN, **F64)
    tasks = torch.tensor([0, 1, 2, 3])  # clusters 0, 1, 0, 1 interleaved
    batch = adapter(x, tasks, None)
    for b in range(4):
        alone = adapter(x[b : b + 1], tasks[b : b + 1], None)
        assert_close(batch[b : b + 1], alone, rtol=1e-13, atol=1e-13)


def plain_lora(x, A, B, scaling):
    """The LoRA reference: s * B A x with A: (r, d_in), B: (d_out, r)."""
    return scaling * (x @ A.t() @ B.t())


def test_one_expert_with_gate_weight_one_equals_plain_lora():
    x = torch.randn(3, 4, D_IN, **F64)
    tasks = torch.tensor([0, 1, 3])
    # CGC with S=0, P=1: each task's gate is a softmax over a single expert, i.e. weight 1
    cgc = make("cgc_lora", num_shared=0, num_specific=1)
    randomize(cgc)
    out = cgc(x, tasks, None)
    for b, t in enumerate(tasks.tolist()):
        e = int(cgc.visible[t, 0])
        A, B = cgc.experts.lora_A[e], cgc.experts.lora_B[e].t()
        assert_close(out[b], plain_lora(x[b], A, B, cgc.scaling), rtol=1e-13, atol=1e-13)
    # MOELoRA with a single expert, and joint LoRA, are plain LoRA for every task
    for adapter in (make("moelora", num_experts=1), make("joint_lora")):
        randomize(adapter)
        A, B = adapter.experts.lora_A[0], adapter.experts.lora_B[0].t()
        assert_close(adapter(x, tasks, None), plain_lora(x, A, B, adapter.scaling), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("case", [c for c in CASES if c not in ("cgc_token", "cgc_task+token")])
def test_task_factors_reproduce_the_forward(case):
    """dW_t = B'_t A'_t, the basis of merge and PEFT export, equals the layer's update for task t."""
    kind, kw = CASES[case]
    adapter = make(kind, **kw)
    randomize(adapter, seed=7)
    x = torch.randn(2, 3, D_IN, **F64)
    for t in range(len(LAYOUT.tasks)):
        A, B = adapter.task_factors(t)
        assert A.shape[0] == B.shape[1]
        expected = adapter(x, torch.full((2,), t), None)
        assert_close(x @ adapter.delta_weight(t).t(), expected, rtol=1e-12, atol=1e-12)
        assert_close(x @ A.t() @ B.t(), expected, rtol=1e-12, atol=1e-12)


def test_token_gated_cgc_has_no_constant_update():
    adapter = make("cgc_lora", gate_input="token")
    assert not adapter.mergeable
    with pytest.raises(ValueError, match="gate_input='token'.*only gate_input='task' is mergeable"):
        adapter.task_factors(0)


def test_zero_b_gives_zero_update():
    for kind, kw in CASES.values():
        adapter = make(kind, **kw)  # fresh: B = 0, gates at their init
        out = adapter(torch.randn(2, 3, D_IN, **F64), torch.tensor([0, 3]), None)
        assert torch.equal(out, torch.zeros_like(out))


def test_rank_must_be_positive():
    for r in (0, -2):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            JointLoRA(in_features=4, out_features=4, r=r, alpha=1.0)


@pytest.mark.parametrize("case", ["moelora", "moelora_split", "cgc_task", "cgc_S0", "cgc_P0"])
def test_gate_table_path_equals_dense_task_table(case):
    """The forward (GatedMixture when dense: weights = spread @ softmax(logits)) against every task's gate
    written out over all experts, row t(b) for sample b, through DenseMixture (tests/oracles.py)."""
    kind, kw = CASES[case]
    adapter = make(kind, **kw)
    randomize(adapter, seed=5)
    x = torch.randn(5, 6, D_IN, **F64, requires_grad=True)
    tasks = torch.tensor([3, 1, 2, 0, 1])
    logits, spread = adapter.route_table(x, tasks, None)
    weight, rows = dense_task_table(adapter, tasks)  # a table (n_tasks, E) and the row of each sample
    E = adapter.experts.num_experts
    assert_close((spread @ torch.softmax(logits, -1).flatten()).view(5, E), weight[rows], rtol=0, atol=0)
    params = [x, *adapter.parameters()]
    upstream = torch.randn(5, 6, D_OUT, **F64)
    out_table = adapter(x, tasks, None)
    g_table = torch.autograd.grad((out_table * upstream).sum(), params)
    out_dense = dense_task_table_forward(adapter, x, tasks)
    g_dense = torch.autograd.grad((out_dense * upstream).sum(), params)
    assert_close(out_table, out_dense, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_table, g_dense, strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["cgc_lora", "moelora", "independent_lora"])
def test_per_batch_routing_is_built_once_per_batch_and_follows_new_ids(kind):
    """Layers share one routing tensor per batch of ids; new ids, also written in place, rebuild it."""
    first, second = make(kind), make(kind)  # two layers of one model
    for layer in (first, second):
        randomize(layer, seed=11)
    x = torch.randn(4, 3, D_IN, **F64)
    cache = {}  # the model's routing state holds it (RoutingState.batch_cache)

    def routing(layer, tasks, cache=cache):
        table = layer.route_table(x, tasks, None, cache)
        return table[1] if table is not None else layer.route_dense(x, tasks, None, cache)[0]

    tasks = torch.tensor([0, 1, 2, 3])
    built = routing(first, tasks)
    assert routing(second, tasks) is built  # the second layer reuses the first one's
    assert routing(first, tasks, cache={}) is not built  # another model's cache: its own
    assert routing(first, tasks, cache=None) is not built  # no cache: built every time
    assert routing(first, tasks.clone()) is not built  # equal ids in a new tensor: rebuilt (and equal)
    assert torch.equal(routing(first, tasks.clone()), built)
    tasks.copy_(torch.tensor([3, 3, 0, 1]))  # the same tensor, new ids written in place
    assert not torch.equal(routing(first, tasks), built)
    assert_close(first(x, tasks, None, cache=cache), naive_forward(first, x, tasks), rtol=1e-12, atol=1e-12)
