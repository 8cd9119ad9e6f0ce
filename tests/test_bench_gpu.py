"""bench/gpu_bench.py on CPU: the device checks pass, catch a mis-scaled step, and the targets table fills in."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_gpu_bench", ROOT / "bench" / "gpu_bench.py")
gpu_bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_bench
spec.loader.exec_module(gpu_bench)


@pytest.fixture(autouse=True)
def _fresh_failures():
    gpu_bench.gpu_check.FAILED.clear()
    yield
    gpu_bench.gpu_check.FAILED.clear()


def test_device_checks_pass_on_cpu(capsys):
    import torch

    assert gpu_bench.device_checks(torch.device("cpu"))
    out = capsys.readouterr().out
    for method in ("kfac", "shampoo", "psgd"):
        assert f"ds_soo {method}: 3 steps on cpu (fp32) = CPU float64 | ok" in out


def test_device_check_catches_a_misscaled_step(monkeypatch):
    import torch

    real = gpu_bench._run_steps

    def off_by_one_percent(method, device, dtype, steps=3):
        out = real(method, device, dtype, steps)
        return [g * 1.01 for g in out] if dtype == torch.float32 and method == "shampoo" else out

    monkeypatch.setattr(gpu_bench, "_run_steps", off_by_one_percent)
    assert not gpu_bench.device_checks(torch.device("cpu"))
    assert gpu_bench.gpu_check.FAILED == ["ds_soo shampoo: 3 steps on cpu (fp32) = CPU float64"]


@pytest.mark.slow
def test_tiny_targets_table(tmp_path, capsys):
    out = tmp_path / "targets.json"
    # A target every model passes at once (initial loss ~4.2 < 10) exercises the time-to-target path.
    res = gpu_bench.main(["--preset", "tiny", "--device", "cpu", "--workload", "gpt", "--reps", "1", "--steps", "10",
                          "--run-steps", "12", "--target", "10", "--target-steps", "4", "--eval-every", "2",
                          "--eval-windows", "4", "--skip-checks", "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    e = res["workloads"]["gpt"]
    for m in ("kfac", "shampoo", "psgd"):
        assert math.isfinite(e["whole_run"][m]["mean_ratio"]) and e["whole_run"][m]["spike"] >= 1.0
        assert 0 < e["whole_run"][m]["after_warm_median"] < math.inf
        assert 1 <= e["whole_run"][m]["largest_at"] < 12
        assert e["warm"]["methods"][m]["status"] == "ok"
    for m in gpu_bench.STAGGERED:  # the default (staggered) runs are timed against stagger: false
        assert math.isfinite(e["whole_run"][gpu_bench.UNSTAGGERED.format(m)]["spike"])
    # 0.3% of 12 steps is under the default floor of 10 refreshes every 10 steps, so the whole run is warm.
    assert e["warm_steps_of_default"] == 12
    for m, r in e["time_to_target"].items():
        assert r["steps"] == 2 and r["seconds"] > 0 and r["best_val"] < 10, m
    table = capsys.readouterr().out
    assert "| gpt | sparse step, median | <= 1.10x |" in table and "time to val loss 10.0" in table
    assert "| gpt | largest step after warm / median, `stagger: false` | <= 3x |" in table
    assert "| gpt | default schedule after warm, median step | <= 1.10x |" in table
