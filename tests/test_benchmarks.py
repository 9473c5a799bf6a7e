"""The benchmarks run at a tiny size on the CPU (their own correctness checks included); no timing is asserted."""

import csv
import statistics
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks import adapter_layer


def test_adapter_layer_benchmark_runs_and_checks_loop_against_fused(capsys):
    adapter_layer.main(["--d", "32", "--tokens", "8", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fused/plain" in out and "adapter + base Linear" in out


def test_loss_memory_benchmark_runs_and_checks_lean_against_full(capsys):
    from benchmarks import loss_memory

    loss_memory.main(["--size", "tiny", "--device", "cpu", "--batch", "4", "--seq", "32", "--steps", "1"])
    out = capsys.readouterr().out
    assert "equal within bf16" in out and "peft" in out and "lean" in out


def test_fit_loop_benchmark_runs_the_real_fit_against_a_bare_peft_loop(capsys, monkeypatch):
    from benchmarks import fit_loop

    monkeypatch.setattr(fit_loop, "SLOW_STEP_S", 0.0)  # every step is "slow": each is reported on stderr as it ends
    result = fit_loop.main(["--config", "experiments/tiny.yaml", "--steps", "2", "--warmup", "1"])
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    # slow steps go to stderr as they end (fit runs one step past the timed ones), not into the report on stdout
    for line in (
        "fit: step 1 of 4 took",
        "fit: step 4 of 4 took",
        "bare (paired): step 3 of 3",
        "bare alone: step 3 of 3",
    ):
        assert line in err, line
    assert "took" not in out
    assert "fit loop vs bare PEFT loop" in out and "forward + routing + per-task loss" in out
    # the callbacks' host time, hook by hook under its line: the run guard's and the checkpoints', not the benchmark's
    hooks = result["fit"]["callback_hooks"]
    assert "[Callback]RunGuard.on_before_optimizer_step" in hooks and not any("PairedBare" in h for h in hooks)
    assert list(hooks.values()) == sorted(hooks.values(), reverse=True)
    assert abs(sum(hooks.values()) - result["host"]["callbacks (diagnostics, checkpoints, guard)"]) < 1e-9
    assert "    RunGuard.on_before_optimizer_step" in out
    # each hook's median and largest call beside its mean: a one-off save is told from a cost every step
    calls = result["fit"]["callback_hook_calls"]
    assert set(calls) == set(hooks) and all(c["median_ms"] <= c["max_ms"] for c in calls.values())
    assert all(hooks[h] <= c["max_ms"] + 1e-9 for h, c in calls.items()), "a mean is at most the largest call"
    assert "(median call " in out and "largest " in out
    assert result["bare"]["rank"] == 12, "cgc_lora r=4 with 2 shared + 1 specific experts: active rank 12"
    assert (result["model"]["size"], result["model"]["hidden_size"]) == ("config", 32), "tiny.yaml's fixture model"
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in (result["fit"], result["bare"]))
    # the same batches in the same order: the same widths, each of which fit met before the bare loop did
    alone = result["bare_alone"]
    assert result["bare"]["widths"] == alone["widths"] == result["fit"]["widths"] and len(alone["widths"]) == 3
    assert alone["new_widths"] == 0 and "timed steps at a width new to the process" in out
    # the bare row times a bare step paired with each of fit's timed steps; "bare alone" runs after fit
    assert len(result["bare"]["step_s"]) == len(result["fit"]["step_s"]) == 2
    assert result["bare"]["step_s"] != alone["step_s"] and "per-step fit / bare: median" in out
    assert "bare alone" in out and "PairedBare" not in out
    # the first step (compilation, first-use costs) is reported on its own, outside the medians
    assert result["fit"]["first_s"] > 0 and "first step: fit" in out
    # whole iterations hold each timed step's own window and what runs between steps (the paired bare step left out)
    fit = result["fit"]
    assert len(fit["iteration_s"]) == len(fit["step_s"]) == 2 and "fit, whole iterations" in out
    assert all(i > s for i, s in zip(fit["iteration_s"], fit["step_s"], strict=True))
    # the split: fit's module without the Trainer against the bare step, interleaved, phase by phase
    split = result["split"]
    for loop in ("module", "bare"):
        assert len(split[loop]["step_s"]) == 2 and all(split[loop][ph] > 0 for ph in fit_loop.PHASES)
    assert split["quartiles"][0] <= split["ratio"] <= split["quartiles"][1]
    assert "per-step module / bare: median" in out and "forward + loss" in out
    # the headline is printed as soon as fit is done, before the bare loop alone and the split run
    median = statistics.median(f / b for f, b in zip(fit["step_s"], result["bare"]["step_s"], strict=True))
    assert f"fit / paired bare step: median {median:.2f}x over 2 timed steps" in out
    assert out.index("fit / paired bare step") < out.index("fit loop vs bare PEFT loop")
    # both loops step fit's AdamW implementation (on the CPU, model.adamw=auto is PyTorch's default)
    assert result["adamw"] == "PyTorch's default" and "AdamW in both loops: model.adamw=auto" in out
    # and the header names the loader: data.num_workers=auto is no workers and no pinning on the CPU
    assert result["data"] == {"workers": 0, "pinned": False} and "0 loader workers, batches not pinned" in out


def test_fit_loop_says_when_the_gradient_conflict_probe_falls_in_timed_steps(capsys):
    from benchmarks import fit_loop

    argv = ["--config", "experiments/tiny.yaml", "--steps", "2", "--warmup", "1", "--diagnostics", "on"]
    result = fit_loop.main([*argv, "--set", "grad_conflict.every_n_steps=1"])
    out = capsys.readouterr().out
    # probes after optimizer steps 1, 2, 3, 4 (one step after the timed ones); the timed batches end at steps 2 and 3
    probes = result["fit"]["probes"]
    assert (probes["timed"], probes["every"]) == (2, 1) and probes["ms"] > 0
    assert "the gradient-conflict probe ran in 2 of the 2 timed steps" in out
    # at the default (every 100) the one probe, after step 1, is in the warm-up: nothing to say
    result = fit_loop.main(argv)
    assert result["fit"]["probes"]["timed"] == 0 and "gradient-conflict probe ran" not in capsys.readouterr().out


def test_fit_loop_bare_loop_knows_what_it_keeps_between_steps():
    """Fit's peak memory leaves out what the paired bare loop keeps on the device: its model and AdamW's state."""
    from benchmarks.fit_loop import BareLoop, build_cli

    cli = build_cli("experiments/tiny.yaml", [], Path(tempfile.mkdtemp()), "resident")
    bare = BareLoop(cli, cuda=False)
    batch = next(iter(cli.datamodule.train_dataloader()))
    model_bytes = sum(t.numel() * t.element_size() for t in [*bare.model.parameters(), *bare.model.buffers()])
    assert bare.resident_bytes() == model_bytes
    assert torch.isfinite(bare.step(batch))
    trainable = [p for p in bare.model.parameters() if p.requires_grad]
    # AdamW: two moments per trainable tensor and a float32 step count each
    state = sum(2 * p.numel() * p.element_size() + 4 for p in trainable)
    assert bare.resident_bytes() == model_bytes + state
    assert all(p.grad is None for p in trainable), "the step leaves no gradients behind"
    # a device named with an index matches tensors named without one, as "cuda" must match a tensor's "cuda:0"
    bare.device = torch.device("cpu", 0)
    assert bare.resident_bytes() == model_bytes + state


def test_fit_loop_counts_timed_steps_at_a_width_the_process_had_not_met():
    from benchmarks.fit_loop import summarise

    times, tokens = [0.5, 0.1, 0.4, 0.1, 0.2], [10] * 5
    r = summarise(times, tokens, warmup=1, peak=None, widths=[64, 64, 128, 64, 192])
    assert r["new_widths"] == 2 and r["ms_known_widths"] == pytest.approx(
        100.0
    )  # 128 and 192 are new; steps 1 and 3 are not
    r = summarise(times, tokens, warmup=1, peak=None, widths=[64, 64, 128, 64, 192], met=[128, 192])
    assert r["new_widths"] == 0 and r["ms_known_widths"] == pytest.approx(150.0)  # an earlier loop met every width
    assert "new_widths" not in summarise(times, tokens, warmup=1, peak=None)


def test_profile_device_time_counts_kernels_and_copies_not_the_user_ranges_spanning_them():
    """On a GPU the profiler puts ProfilerStep# and Lightning's "Optimizer.step" (the whole training step) on the
    device timeline too; counted as kernel time they made fit's device ms 550 against 37 ms of kernels."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile_steps import summarise

    def event(name, us, annotation=False):
        elapsed = SimpleNamespace(elapsed_us=lambda: us)
        return SimpleNamespace(name=name, device_type=DeviceType.CUDA, is_async=False, is_user_annotation=annotation,
                               time_range=elapsed)  # fmt: skip

    ranges = [event("ProfilerStep#1", 100_000, True), event("Optimizer.step#AdamW.step", 90_000, True)]
    work = [event("nvjet_sm90_tst_192x192", 3_000), event("Memcpy DtoH (Device -> Pageable)", 1_000)]
    r = summarise(ranges + work, steps=2, wall_s=0.2, cuda=True)
    assert (r["device_ms"], r["kernels"], r["dtoh_copies"]) == (2.0, 1.0, 0.5)


def test_profile_on_a_gpu_also_ranks_ops_by_host_time(capsys):
    """A step whose pace the host sets needs the host's side: on a GPU the ops are ranked by device time, and also
    by self host time, each loop's and fit - bare."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from benchmarks.profile_steps import report, summarise

    def op(name, host_us, device_us):
        return SimpleNamespace(name=name, device_type=DeviceType.CPU, is_async=False, self_cpu_time_total=host_us,
                               self_device_time_total=device_us, input_dtypes=[])  # fmt: skip

    fit = summarise([op("GatedMixtureBackward", 900, 0), op("aten::mm", 300, 5_000), op("aten::mm", 300, 5_000)],
                    steps=2, wall_s=0.2, cuda=True)  # fmt: skip
    bare = summarise([op("aten::mm", 200, 6_000), op("aten::addmm", 100, 2_000)], steps=2, wall_s=0.2, cuda=True)
    assert fit["host_top"][0] == {"op": "GatedMixtureBackward", "ms": 0.45, "calls": 0.5}
    assert fit["host_self_ms"]["aten::mm"] == 0.3 and fit["self_ms"]["aten::mm"] == 5.0, "host and device apart"
    extra = {"steps": 2, "trace": "t.json", "sync_sites": {}, "host_value_sites": {}, "dtypes": {}}
    report({"fit": fit | extra, "bare": bare | extra}, cuda=True)
    out = capsys.readouterr().out
    assert "fit: top 15 ops by self host ms per step" in out and "bare: top 15 ops by self host ms per step" in out
    host_diff = out.split("ops whose self host ms per step differ the most")[1]
    assert host_diff.splitlines()[1].split()[:2] == ["GatedMixtureBackward", "+0.45"]


def test_fit_loop_profile_prints_both_loops_ops_and_host_reads_and_writes_their_traces(capsys, tmp_path):
    from benchmarks import fit_loop

    args = ["--config", "experiments/tiny.yaml", "--steps", "2", "--warmup", "1", "--profile", "2"]
    result = fit_loop.main([*args, "--profile-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "profile: 2 steps of each loop" in out and "fit / bare" in out
    for loop in ("fit", "bare"):
        prof = result["bare_alone" if loop == "bare" else loop]["profile"]  # bare profiles its own run
        assert f"{loop}: top 15 ops by self CPU ms per step" in out and f"{loop}: Chrome trace" in out
        assert len(prof["top"]) == 15 and all(t["calls"] > 0 and t["ms"] >= 0 for t in prof["top"])
        assert prof["aten_ops"] > 0 and prof["device_ms"] is None, "CPU: no device time"
        assert (tmp_path / f"{loop}.json").stat().st_size > 0
        # tiny-llama runs SDPA, which on a CPU is the flash kernel, in both loops; float32 throughout (32-true)
        assert prof["attention"] == ["flash (CPU)"]
        dtypes = prof["dtypes"]
        assert dtypes["base weight"] == "torch.float32" and dtypes["hidden states in"].startswith("torch.float32")
        assert "adapter input" in dtypes
        # AdamW reads each parameter's step count on the host, in both loops
        assert any(op == "aten::_local_scalar_dense" for op, _, _ in prof["host_value_sites"])
        assert prof["compiled_regions"] == 0, "nothing is compiled without model.compile"
    sites = [where for _, _, where in result["fit"]["profile"]["host_value_sites"]]
    assert any("cgc_lightning/guard.py" in w for w in sites), "the run guard's one read of the non-finite flag"
    assert not any("cgc_lightning/" in w for _, _, w in result["bare_alone"]["profile"]["host_value_sites"])


def test_fit_loop_python_profile_covers_whole_iterations_after_the_timed_steps(capsys, tmp_path):
    """--py-profile N: N whole iterations of fit under cProfile, after the timed ones: the module's training step
    and Lightning's hooks once a step, the next batch's fetch in the window; the stats file loads with pstats."""
    import pstats

    from benchmarks import fit_loop

    args = ["--config", "experiments/tiny.yaml", "--steps", "2", "--warmup", "1", "--split", "off", "--py-profile", "3"]
    result = fit_loop.main([*args, "--profile-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "fit under cProfile: 3 whole iterations" in out and "by own time, ms per step" in out
    stats = pstats.Stats(result["fit"]["python_stats"]).stats
    calls = {name: c for (file, _, name), (_, c, *_) in stats.items() if file.endswith("cgc_lightning/module.py")}
    assert calls["training_step"] == 3, "one training step per profiled iteration, none of the timed ones"
    fetches = [c for (file, _, name), (_, c, *_) in stats.items() if name == "__next__" and "dataloader" in file]
    assert fetches and max(fetches) >= 3, "fetching the next batch is inside the window"
    assert "cgc_lightning/module.py" in out and "training_step" in out
    assert len(result["fit"]["step_s"]) == 2, "the profiled iterations are not timed"


def test_fit_loop_profile_of_a_compiled_loop_profiles_the_compiled_code(capsys, tmp_path):
    """Once a torch.compile'd function has run under a TorchDispatchMode it runs eager for the rest of the process,
    so the profiler's host-value probe (a dispatch mode) made a compiled loop's profile that of the eager loop
    (on an H200: no compiled region, 18,600 eager ops a step). Compiled, both loops' profiled steps must run their
    compiled code: one compiled region a step, and none of the adapters' eager autograd nodes."""
    import json

    from benchmarks import fit_loop

    args = ["--config", "experiments/tiny.yaml", "--steps", "1", "--warmup", "1", "--profile", "1", "--split", "off"]
    result = fit_loop.main([*args, "--set", "model.compile={backend: aot_eager}", "--profile-dir", str(tmp_path)])
    out = capsys.readouterr().out
    for loop in ("fit", "bare_alone"):
        prof = result[loop]["profile"]
        assert prof["compiled_regions"] >= 1, f"{loop}: the profiled step ran no compiled code"
        assert prof["host_value_sites"] is None
    assert "not probed: the loop is compiled" in out
    names = {e.get("name") for e in json.loads((tmp_path / "fit.json").read_text())["traceEvents"]}
    assert not any(n and n.startswith("GatedMixture") for n in names), "the adapters ran eager in fit's profile"


def test_fit_loop_benchmark_runs_both_loops_on_a_named_llama_size(capsys):
    from benchmarks import fit_loop
    from benchmarks.shapes import SIZES
    from cgc_lightning.hf import ModelSpec, load_tokenizer

    args = ["--config", "experiments/tiny.yaml", "--size", "tiny", "--steps", "2", "--warmup", "1"]
    result = fit_loop.main(args)
    out = capsys.readouterr().out
    model, (d, layers, *_) = result["model"], SIZES["tiny"]
    assert "model: size tiny" in out and f"{model['params']:,} base parameters" in out
    # the tiny shape, not the fixture model tiny.yaml names (d=32); the vocabulary is its tokenizer's
    assert (model["hidden_size"], model["layers"]) == (d, layers) != (32, 2)
    assert model["vocab_size"] == len(load_tokenizer(ModelSpec("tests/fixtures/tiny-llama")))
    assert result["bare"]["params"] == model["params"], "the bare loop trains the same base model"
    assert all(r["ms"] > 0 and r["tokens_per_s"] > 0 for r in (result["fit"], result["bare"]))


def test_packing_benchmark_runs_fit_padded_and_packed(capsys):
    from benchmarks import packing

    result = packing.main(["--config", "experiments/tiny.yaml", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert "tokens/s x padded" in out and set(result) == {"padded", "packed"}
    # tiny.yaml: 4 rows of 64 tokens hold more of its short examples than a padded batch's 4
    assert result["packed"]["examples_per_step"] > result["padded"]["examples_per_step"] == 4


def test_packing_benchmark_compiles_each_variant_afresh(capfd):
    """With ``model.compile``, the packed fit compiles as its own run would, not as a recompilation of the padded
    fit's graphs (at 135M on an H200 that had not finished its 36 steps 7 minutes later; compiled afresh, its
    first step took 92 s)."""
    from benchmarks import packing

    torch._logging.set_logs(recompiles=True)
    try:
        result = packing.main(
            ["--config", "experiments/tiny.yaml", "--set", "model.compile={backend: aot_eager}"]
            + ["--steps", "1", "--warmup", "1"]
        )
    finally:
        torch._logging.set_logs()
    err = capfd.readouterr().err
    assert set(result) == {"padded", "packed"}
    assert "Recompiling" not in err, "the packed variant recompiled the padded variant's graphs"


def test_fit_loop_leaves_memory_ratios_out_under_cuda_graphs():
    """Under CUDA graphs the bare loop's peak (its whole step replayed in graphs) reads low: no ratio is printed."""
    from benchmarks.fit_loop import graph_memory_note

    assert "mem x bare is left out" in graph_memory_note(cuda=True, graphs=True)
    assert graph_memory_note(cuda=True, graphs=False) is None
    assert graph_memory_note(cuda=False, graphs=True) is None  # no peaks on the CPU at all


def test_eval_benchmark_times_mixed_and_per_task_batches_with_equal_scores(capsys):
    from benchmarks import eval_speed

    result = eval_speed.main(["--config", "experiments/tiny.yaml", "--set", "data.generate_batch_size=5"])
    out = capsys.readouterr().out
    assert "per-task scores" in out and set(result) == {"mixed", "per_task"}
    assert "eval_batch_size=8, generate_batch_size=5," in out, "the header names both batch sizes"
    assert result["mixed"]["scores"] == result["per_task"]["scores"]
    assert result["mixed"]["examples"] == result["per_task"]["examples"] == {"choice": 6, "text": 10}


def test_eval_benchmark_on_a_subset_of_the_tasks(capsys):
    from benchmarks import eval_speed

    result = eval_speed.main(["--config", "experiments/tiny.yaml", "--tasks", "count,plausible"])
    assert set(result["mixed"]["scores"]) == {"plausible", "count"}, "only the named tasks, in the config's order"
    assert "2 tasks (1 scored by answer choice, 1 by generation)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--tasks: nope not among experiments/tiny.yaml's data.tasks \(plausible, qa"):
        eval_speed.main(["--config", "experiments/tiny.yaml", "--tasks", "count,nope"])


def test_fit_loop_bare_and_module_loops_step_fits_adamw_implementation():
    """The split compares the method and the Trainer, not optimizer kernels: both loops use fit's ``model.adamw``."""
    from benchmarks.fit_loop import BareLoop, ModuleLoop, build_cli

    cli = build_cli("experiments/tiny.yaml", ["--model.adamw=fused"], Path(tempfile.mkdtemp()), "adamw")
    bare = BareLoop(cli, cuda=False)
    ours = ModuleLoop(cli, bare)
    assert [g["fused"] for g in bare.opt.param_groups] == [True]
    assert [(g["name"], g["fused"]) for g in ours.opt.param_groups] == [("experts", True), ("gates", True)]


def test_fit_loop_bare_loop_compiles_as_fit_does_unless_told_not_to():
    """When fit compiles (``model.compile``), the bare loop compiles its PEFT model with the same arguments, so the
    ratios compare the method and the Trainer, not compilation; ``--bare-compile off`` keeps it eager."""
    from torch._dynamo.eval_frame import OptimizedModule

    from benchmarks.fit_loop import BareLoop, build_cli, compile_label

    cli = build_cli("experiments/tiny.yaml", [], Path(tempfile.mkdtemp()), "eager")
    bare = BareLoop(cli, cuda=False)
    assert bare.compile is None and bare.run is bare.model
    assert compile_label(cli.model.hparams["compile"], bare.compile is not None) == "no torch.compile"

    setting = ["--model.compile={backend: aot_eager}"]
    cli = build_cli("experiments/tiny.yaml", setting, Path(tempfile.mkdtemp()), "compiled")
    bare = BareLoop(cli, cuda=False)
    assert bare.compile == {"backend": "aot_eager"} and isinstance(bare.run, OptimizedModule)
    assert not bare.cuda_graphs
    batch = next(iter(cli.datamodule.train_dataloader()))
    with torch.no_grad():
        eager = bare.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        torch.testing.assert_close(bare.forward(batch), eager, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    assert torch.isfinite(bare.step(batch))
    label = compile_label(cli.model.hparams["compile"], True)
    assert label == "torch.compile in both loops: model.compile={'backend': 'aot_eager'}"

    off = BareLoop(cli, cuda=False, compile=False)
    assert off.compile is None and off.run is off.model
    assert compile_label(cli.model.hparams["compile"], False).startswith(
        "torch.compile in fit only (--bare-compile off)"
    )


def test_fit_loop_reports_only_slow_steps(capsys):
    from benchmarks.fit_loop import SLOW_STEP_S, say_slow_step

    say_slow_step("fit", 0, 36, SLOW_STEP_S / 2)
    say_slow_step("bare alone", 2, None, SLOW_STEP_S + 62.2)
    err = capsys.readouterr().err
    assert err == f"bare alone: step 3 took {SLOW_STEP_S + 62.2:.1f} s\n"


def test_fit_loop_without_the_split_still_prints_both_loops(capsys, tmp_path):
    """Compiled on a cold cache the split compiles again; ``--split off`` leaves it out, not the fit / bare rows.

    ``--steps-csv`` writes the timed steps behind the medians, numbered as in the run (after the warm-up).
    """
    from benchmarks import fit_loop

    steps = tmp_path / "runs" / "steps.csv"
    argv = ["--config", "experiments/tiny.yaml", "--steps", "3", "--warmup", "1", "--split", "off"]
    result = fit_loop.main([*argv, "--steps-csv", str(steps)])
    out = capsys.readouterr().out
    assert result["split"] is None and "split (after fit)" not in out and "per-step module / bare" not in out
    assert "fit / paired bare step: median" in out and "per-step fit / bare: median" in out
    assert all(r["ms"] > 0 for r in (result["fit"], result["bare"], result["bare_alone"]))
    rows = list(csv.DictReader(steps.open()))
    assert [int(r["step"]) for r in rows] == [2, 3, 4] and f"per-step times: {steps}" in out
    fit_ms, bare_ms = [float(r["fit_ms"]) for r in rows], [float(r["bare_ms"]) for r in rows]
    assert statistics.median(fit_ms) == pytest.approx(result["fit"]["ms"], rel=1e-3)
    assert statistics.median(bare_ms) == pytest.approx(result["bare"]["ms"], rel=1e-3)
    for r, f, b in zip(rows, fit_ms, bare_ms, strict=True):
        assert float(r["fit_over_bare"]) == pytest.approx(f / b, rel=1e-3)
