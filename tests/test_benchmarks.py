"""The benchmarks run at a tiny size on the CPU (their own correctness checks included); no timing is asserted."""

from benchmarks import adapter_layer


def test_adapter_layer_benchmark_runs_and_checks_loop_against_fused(capsys):
    adapter_layer.main(["--d", "32", "--tokens", "8", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "fused/plain" in out and "adapter + base Linear" in out
