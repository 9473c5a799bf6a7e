"""Seesaw diagnostics: the bookkeeping on hand-made histories, gradient cosines against an explicit per-task
backward, gate use against the gate tables, and the callbacks through a tiny fit without MLflow."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cgc_lightning.adapters.cgc_lora import expert_layout
from cgc_lightning.callbacks import SeesawTracker
from cgc_lightning.callbacks.conflict import gradient_conflict, shared_slices, split_by_task
from cgc_lightning.callbacks.gates import expert_labels, gate_usage
from cgc_lightning.callbacks.seesaw import noise_margin
from cgc_lightning.config import AdapterConfig
from cgc_lightning.inject import adapted_layers, inject_adapters
from cgc_lightning.module import token_losses
from cgc_lightning.routing import route
from tests.conftest import LAYOUT, VOCAB, randomize_adapters, tiny_model

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------------------- bookkeeping


def test_seesaw_tracker_on_a_hand_made_history_with_a_lower_is_better_metric():
    # b is a loss: its going up is degrading; c goes missing at one validation
    tracker = SeesawTracker({"a": "accuracy", "b": "loss", "c": "f1"}, margin=0.05)
    history = [
        (10, {"a": 0.50, "b": 2.0, "c": 0.30}),
        (20, {"a": 0.60, "b": 2.2, "c": 0.32}),  # a up, b worse (loss up), c within the margin: event
        (30, {"a": 0.62, "b": 2.0, "c": 0.40}),  # b and c better, nobody worse: no event
        (40, {"a": 0.50, "b": 1.9, "c": math.nan}),  # a worse, b better, c missing: event
        (50, {"a": 0.50, "b": 1.9, "c": 0.20}),  # c has no previous value; nothing moved
    ]
    changes = [tracker.update(step, values) for step, values in history]
    assert changes[0] is None
    c1, c2, c3, c4 = changes[1:]
    assert c1.delta == pytest.approx({"a": 0.10, "b": 0.2, "c": 0.02})
    assert (c1.improving, c1.degrading, c1.event) == (("a",), ("b",), True)
    assert (set(c2.improving), c2.degrading, c2.event) == ({"b", "c"}, (), False)
    assert c3.delta == pytest.approx({"a": -0.12, "b": -0.1}) and "c" not in c3.delta
    assert (c3.improving, c3.degrading, c3.event) == (("b",), ("a",), True)
    assert (c4.delta, c4.improving, c4.degrading) == ({"a": 0.0, "b": 0.0}, (), ())
    assert tracker.events == 2 and tracker.rate == pytest.approx(2 / 4)
    assert tracker.steps == [10, 20, 30, 40, 50]
    assert tracker.series("c")[:3] == [0.30, 0.32, 0.40] and math.isnan(tracker.series("c")[3])

    # the state a checkpoint keeps, so that a resumed run continues the history and the rate
    resumed = SeesawTracker(dict(tracker.metric_names), margin=0.05)
    resumed.load_state_dict(torch.load(_roundtrip(tracker.state_dict()), weights_only=True))
    assert (resumed.steps, resumed.changes, resumed.rate) == (tracker.steps, tracker.changes, tracker.rate)
    assert resumed.update(60, {"a": 0.7, "b": 2.0, "c": 0.2}).event and resumed.rate == pytest.approx(3 / 5)


def _roundtrip(obj) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_seesaw_margin_is_strict_and_counts_both_sides():
    tracker = SeesawTracker({"a": "accuracy", "b": "accuracy"}, margin=0.25)
    tracker.update(0, {"a": 0.5, "b": 0.5})
    # a moves by exactly the margin (0.75 - 0.5 == 0.25 in binary): not counted; b drops by more
    change = tracker.update(1, {"a": 0.75, "b": 0.0})
    assert (change.improving, change.degrading, change.event) == ((), ("b",), False)
    assert tracker.rate == 0.0
    assert math.isnan(SeesawTracker({"a": "accuracy"}).rate)
    with pytest.raises(ValueError, match="margin"):
        SeesawTracker({"a": "accuracy"}, margin=-1)


# -------------------------------------------------------------------------------------- gradient conflict


def _model(method: str, **adapter):
    model = tiny_model("llama", dtype=torch.float64)
    inject_adapters(model, AdapterConfig(method=method, r=2, target_modules=["q_proj", "v_proj"], **adapter), LAYOUT)
    randomize_adapters(model, seed=3)
    return model


def _probe(task: int, n: int = 2, length: int = 9, seed: int = 0) -> dict:
    """n examples of one task, right-padded to different lengths, loss on the last few tokens only."""
    g = torch.Generator().manual_seed(100 * task + seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[0, length - 3 :] = 0  # the first example is shorter
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_ids": torch.full((n,), task)}


def _explicit_grads(model, probe) -> dict[str, torch.Tensor]:
    """The reference: a plain loss.backward() of one task's mean target-token loss, gradients read off .grad."""
    model.zero_grad(set_to_none=True)
    with route(model, probe["task_ids"]):
        logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    losses, mask = token_losses(logits, probe["labels"])
    (losses.sum() / mask.sum()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _shared_vector(method: str, grads: dict[str, torch.Tensor], cluster: int) -> torch.Tensor:
    """Concatenate, by hand, the gradient entries of the parameters a task shares with others."""
    parts = []
    for name in sorted(grads):
        g = grads[name]
        if name.endswith(("lora_A", "lora_B")):
            if method == "cgc_lora":  # the cluster's S shared experts: the first S of any of its tasks' rows
                visible, _ = expert_layout(LAYOUT.task_cluster, 2, 1)
                task = LAYOUT.task_cluster.index(cluster)
                g = g[visible[task, :2]]
            parts.append(g.reshape(-1))
        elif method == "moelora" and name == "adapter_gate.gate_W":  # gate_task_emb rows are per task
            parts.append(g.reshape(-1))
    return torch.cat(parts)


def test_noise_margins_count_only_moves_beyond_each_tasks_validation_noise():
    # 1.96 * sqrt(2 p (1 - p) / n), by hand
    assert noise_margin(0.5, 100) == pytest.approx(1.959963984540054 * math.sqrt(2 * 0.25 / 100))
    assert noise_margin(0.9, 400) == pytest.approx(0.0415771, rel=1e-5) and noise_margin(1.0, 50) == 0.0
    assert noise_margin(1.2, 50) == noise_margin(-0.1, 50) == 0.0  # a level outside [0, 1] is clipped

    names = {"big": "accuracy", "small": "accuracy", "fixed": "f1"}
    tracker = SeesawTracker(names, margin=0.01, examples={"big": 1000, "small": 20})  # fixed: no count, 0.01
    tracker.update(0, {"big": 0.50, "small": 0.50, "fixed": 0.50})
    change = tracker.update(1, {"big": 0.56, "small": 0.35, "fixed": 0.52})
    # big: 0.06 > 0.0437 (n = 1000, p = .53) improves; small: -0.15 is within 0.3064 (n = 20, p = .425); fixed
    # moves 0.02 > 0.01
    assert change.margins["big"] == pytest.approx(noise_margin(0.53, 1000))
    assert change.margins["small"] == pytest.approx(noise_margin(0.425, 20)) and change.margins["fixed"] == 0.01
    assert change.improving == ("big", "fixed") and change.degrading == () and not change.event
    change = tracker.update(2, {"big": 0.50, "small": 0.05, "fixed": 0.52})
    assert change.degrading == ("big", "small") and change.improving == () and tracker.events == 0
    # the per-task margins travel with the history; a checkpoint from before them (four fields) still loads
    resumed = SeesawTracker(names, margin=0.01, examples={"big": 1000, "small": 20})
    resumed.load_state_dict(tracker.state_dict())
    assert resumed.changes == tracker.changes
    old = {**tracker.state_dict(), "changes": [c[:4] for c in tracker.state_dict()["changes"]]}
    resumed.load_state_dict(old)
    assert [c.margins for c in resumed.changes] == [{}, {}]
    with pytest.raises(ValueError, match="at least one validation example"):
        SeesawTracker(names, examples={"big": 0})


def test_seesaw_margin_options_are_checked():
    from cgc_lightning.callbacks.seesaw import SeesawMonitor

    assert SeesawMonitor().margin == "auto"
    with pytest.raises(ValueError, match="with signal: loss give the margin in loss units"):
        SeesawMonitor(signal="loss")
    with pytest.raises(ValueError, match="seesaw.margin must be 'auto' or a number >= 0, got 'big'"):
        SeesawMonitor(margin="big")
    assert SeesawMonitor(signal="loss", margin=0.05).margin == 0.05


@pytest.mark.parametrize("method", ["cgc_lora", "moelora", "joint_lora"])
def test_gradient_cosines_match_an_explicit_per_task_backward(method, expert_path):
    model = _model(method, num_experts=3)
    probes = [_probe(t) for t in range(len(LAYOUT.tasks))]
    stats = gradient_conflict(model, probes, shared_slices(model))
    assert all(p.grad is None for p in model.parameters()), "the optimizer's .grad is never touched"

    n = len(LAYOUT.tasks)
    ref = [_shared_vector(method, _explicit_grads(model, probes[t]), LAYOUT.task_cluster[t]) for t in range(n)]
    expected = torch.full((n, n), math.nan, dtype=torch.float64)
    for a in range(n):
        for b in range(n):
            # CGC-LoRA tasks of different clusters share no parameter
            if method != "cgc_lora" or LAYOUT.task_cluster[a] == LAYOUT.task_cluster[b]:
                expected[a, b] = F.cosine_similarity(ref[a], ref[b], dim=0)
    torch.testing.assert_close(stats.cos, expected, rtol=1e-10, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(stats.norms, torch.stack([v.norm() for v in ref]), rtol=1e-10, atol=1e-12)
    pairs = [float(expected[a, b]) for a in range(n) for b in range(a + 1, n) if not math.isnan(expected[a, b])]
    assert len(pairs) == (2 if method == "cgc_lora" else 6)
    assert stats.min_cos == pytest.approx(min(pairs), rel=1e-10)
    assert stats.negative_fraction == pytest.approx(sum(v < 0 for v in pairs) / len(pairs))


def test_what_counts_as_shared():
    # independent LoRA shares nothing; CGC-LoRA shares its clusters' shared experts only (not gates, not
    # task-specific experts); a cluster of one task has nothing shared
    assert shared_slices(_model("independent_lora")) == []
    slices = shared_slices(_model("cgc_lora"))
    layers = 2 * 2  # 2 decoder layers x (q_proj, v_proj)
    assert len(slices) == layers * 2 * 2  # per layer: 2 clusters x (lora_A, lora_B)
    visible, _ = expert_layout(LAYOUT.task_cluster, 2, 1)
    for s in slices:
        assert s.name.endswith(("lora_A", "lora_B"))
        users = s.users.nonzero().flatten().tolist()
        assert len({LAYOUT.task_cluster[t] for t in users}) == 1 and len(users) == 2
        assert s.experts.tolist() == visible[users[0], :2].tolist()
    gate = shared_slices(_model("moelora", num_experts=3))
    assert "adapter_gate.gate_W" in [s.name for s in gate]
    assert "adapter_gate.gate_task_emb" not in [s.name for s in gate]


def test_a_training_batch_split_by_task_drops_unused_padding():
    batch = {k: torch.cat([_probe(0)[k], _probe(2)[k]]) for k in ("input_ids", "attention_mask", "labels", "task_ids")}
    batch["attention_mask"][:, -2:] = 0
    parts = split_by_task(batch, 4, per_task=1)
    assert parts[1] is None and parts[3] is None
    assert parts[0]["task_ids"].tolist() == [0] and parts[2]["task_ids"].tolist() == [2]
    assert parts[0]["input_ids"].shape == (1, 6)  # the first example of each task has 6 real tokens


# --------------------------------------------------------------------------------------------- gate use


def test_task_gate_use_is_the_gate_table():
    model = _model("cgc_lora")
    usage = gate_usage(model, [_probe(t, seed=1) for t in range(4)])
    visible, E = expert_layout(LAYOUT.task_cluster, 2, 1)
    assert usage.experts == expert_labels(AdapterConfig(), LAYOUT, E)
    assert usage.experts[:4] == ["shared.reason.0", "shared.reason.1", "specific.qa.0", "specific.sum.0"]
    for layer_i, (name, layer) in enumerate(adapted_layers(model)):
        assert usage.layers[layer_i] == name
        for t in range(4):
            g = torch.softmax(layer.adapter.task_gate.gate_logits[t], -1).detach()
            expected = torch.full((E,), math.nan, dtype=torch.float64)
            expected[visible[t]] = g
            torch.testing.assert_close(usage.weight[layer_i, t], expected, equal_nan=True, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(usage.entropy[layer_i, t], -(g * g.log()).sum(), rtol=1e-12, atol=1e-12)
    moe = _model("moelora", num_experts=3)
    usage = gate_usage(moe, [_probe(t) for t in range(4)])
    torch.testing.assert_close(usage.mean_weight(), moe.adapter_gate.table().detach(), rtol=1e-12, atol=1e-12)
    assert gate_usage(_model("joint_lora"), [_probe(0)]) is None
    assert gate_usage(_model("independent_lora"), [_probe(0)]) is None


def test_token_gate_use_averages_each_target_token_of_each_task():
    model = _model("cgc_lora", gate_input="task+token")
    probes = [_probe(t, seed=2) for t in range(4)]
    usage = gate_usage(model, probes)
    layers = list(adapted_layers(model))
    inputs: dict[str, list[torch.Tensor]] = {name: [] for name, _ in layers}
    hooks = [
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs[name].append(args[0]))
        for name, layer in layers
    ]
    with torch.no_grad():
        for p in probes:
            with route(model, p["task_ids"]):
                model(input_ids=p["input_ids"], attention_mask=p["attention_mask"])
    for h in hooks:
        h.remove()
    visible, _ = expert_layout(LAYOUT.task_cluster, 2, 1)
    for li, (name, layer) in enumerate(layers):
        for t, p in enumerate(probes):
            x = inputs[name][t]  # (B, T, d)
            g = layer.adapter.gate_weights(x, p["task_ids"])  # (B, T, S+P)
            tokens = [g[b, i] for b in range(x.shape[0]) for i in range(x.shape[1]) if p["attention_mask"][b, i]]
            mean = torch.stack(tokens).mean(0)
            entropy = torch.stack([-(w * w.log()).sum() for w in tokens]).mean()
            torch.testing.assert_close(usage.weight[li, t, visible[t]], mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(usage.entropy[li, t], entropy, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ through a tiny fit


@pytest.mark.slow
def test_callbacks_run_in_a_fit_without_mlflow_and_leave_training_unchanged(tmp_path):
    from cgc_lightning.cli import CGCLightningCLI
    from cgc_lightning.inject import adapter_parameters
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.multitask import MultiTaskDataModule

    def fit(diagnostics: bool):
        args = [
            "--config",
            "experiments/tiny.yaml",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path}/csv{int(diagnostics)}",
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.enable_progress_bar=false",
            f"--data.cache_dir={tmp_path}/cache",
            f"--trainer.default_root_dir={tmp_path}/out",
            "--grad_conflict.every_n_steps=1",
            # no MLflow here for the per-task tables: the CSV logger gets them as metrics
            "--seesaw.per_task_metrics=true",
            "--grad_conflict.per_task_metrics=true",
            "--gate_usage.per_task_metrics=true",
        ]
        if not diagnostics:
            args += ["--seesaw.enabled=false", "--grad_conflict.enabled=false", "--gate_usage.enabled=false"]
        cwd = Path.cwd()
        os.chdir(ROOT)
        try:
            cli = CGCLightningCLI(MultiTaskLoRAModule, MultiTaskDataModule, run=False, args=args)
            cli.trainer.fit(cli.model, cli.datamodule)
        finally:
            os.chdir(cwd)
        return cli

    on, off = fit(True), fit(False)
    weights = lambda cli: {n: p.detach().clone() for n, p in adapter_parameters(cli.model.model)}
    w_on, w_off = weights(on), weights(off)
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on), "the diagnostics changed the training run"

    seesaw, conflict, gates = (
        next(c for c in on.trainer.callbacks if type(c).__name__ == n)
        for n in ("SeesawMonitor", "GradientConflictMonitor", "GateUsageMonitor")
    )
    tasks = on.model.layout.tasks
    assert seesaw.tracker.steps == [2, 4] and len(seesaw.tracker.changes) == 1
    cm = on.trainer.callback_metrics
    for t, m in zip(tasks, on.model.task_metrics, strict=True):
        assert seesaw.metric_history.values[-1][t] == pytest.approx(float(cm[f"val/{t}/{m}"]))
        assert seesaw.loss_history.values[-1][t] == pytest.approx(float(cm[f"val/{t}/loss"]))
    assert [step for step, _ in conflict.history] == [1, 2, 3, 4]
    # tiny.yaml: plausible and qa share cluster judge; count is alone in its cluster
    cos = conflict.history[-1][1].cos
    assert math.isfinite(cos[0, 1]) and all(math.isnan(cos[i, 2]) for i in (0, 1))
    mean = gates.last.mean_weight()
    torch.testing.assert_close(mean.nan_to_num().sum(1), torch.ones(3, dtype=torch.float64))

    # the numbers went to the logger there is (CSV); figures need MLflow and were skipped
    import csv

    with open(next(Path(f"{tmp_path}/csv1").rglob("metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"seesaw/rate", "seesaw/plausible/delta", "grad_conflict/cos/plausible/qa", "gate/count/entropy"} <= logged
    change = seesaw.metric_history.changes[0]
    delta = [float(r["seesaw/qa/delta"]) for r in rows if r.get("seesaw/qa/delta")]
    assert delta == [pytest.approx(change.delta["qa"])]
    # margin: auto, from the data module's validation examples per task
    counts = on.datamodule.example_counts()
    values = seesaw.metric_history.values
    for t in tasks:
        n, level = counts[t]["val"], (values[0][t] + values[1][t]) / 2
        assert seesaw.metric_history.examples[t] == n > 0
        assert change.margins[t] == pytest.approx(noise_margin(level, n))


# ------------------------------------------------------------------------------------------------- DDP


def _ddp_rows(n: int, task: int, eval_mode: bool = False) -> list[dict]:
    g = torch.Generator().manual_seed(task)
    rows = []
    for s in torch.randint(3, 400, (n, 16), generator=g).tolist():
        row = {"input_ids": s, "labels": [-100] * 8 + s[8:], "task_id": task}
        if eval_mode:
            row |= {"prompt_ids": s[:8], "references": ["x"], "target_index": -1, "choice_ids": []}
        rows.append(row)
    return rows


def _ddp_worker(rank: int, port: int, out: str) -> None:
    """One of 2 DDP ranks (CPU, gloo): 4 steps with the diagnostics (their probe forwards on rank 0 alone)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import ConcatDataset, DataLoader

    from cgc_lightning.callbacks import GateUsageMonitor, GradientConflictMonitor, SeesawMonitor
    from cgc_lightning.hf import ModelSpec
    from cgc_lightning.inject import adapter_parameters
    from cgc_lightning.module import MultiTaskLoRAModule
    from datamodules.collate import Collator

    torch.manual_seed(0)
    module = MultiTaskLoRAModule(
        ModelSpec(name_or_path=str(ROOT / "tests" / "fixtures" / "tiny-llama"), random_init=True),
        adapter=AdapterConfig(method="cgc_lora", r=4, dropout=0.1),  # dropout: the probe must not draw from the RNG
        task_names=["a", "b", "c"],
        task_clusters=["x", "x", "y"],
        max_new_tokens=2,
    )
    collate = Collator(0, [0, 0, 1])
    train = DataLoader(ConcatDataset([_ddp_rows(8, t) for t in range(3)]), batch_size=2, collate_fn=collate)
    val = [DataLoader(_ddp_rows(4, t, True), batch_size=2, collate_fn=Collator(0, [0, 0, 1], True)) for t in range(3)]
    seesaw, conflict, gates = SeesawMonitor(), GradientConflictMonitor(every_n_steps=1), GateUsageMonitor()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=DDPStrategy(find_unused_parameters=False),
        max_steps=4,
        val_check_interval=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[seesaw, conflict, gates],
    )
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    result = {
        "weights": {n: p.detach().clone() for n, p in adapter_parameters(module.model)},
        "conflict_steps": [s for s, _ in conflict.history],
        "seesaw_steps": seesaw.tracker.steps,
        "gates": gates.last is not None,
    }
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.mark.slow
def test_diagnostics_under_ddp_run_on_rank_zero_and_change_nothing(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    w0, w1 = r0["weights"], r1["weights"]
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the ranks diverged"
    assert any(k.endswith("lora_B") and w0[k].abs().sum() > 0 for k in w0), "did training run?"
    assert r0["conflict_steps"] == [1, 2, 3, 4] and r1["conflict_steps"] == []
    assert r0["seesaw_steps"] == r1["seesaw_steps"] == [2, 4]  # every rank keeps the history; rank 0 logs it
    assert r0["gates"] and not r1["gates"]
