"""The benchmarks run at a tiny size on the CPU (their own correctness checks included); no timing is asserted."""

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
