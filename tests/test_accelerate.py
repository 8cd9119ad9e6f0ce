"""ds_soo inside an accelerate loop: under ``accelerate launch`` with the DeepSpeed plugin, and in one process.

``test_accelerate_launch_deepspeed_zero2`` runs ``accelerate launch --config_file
configs/accelerate/deepspeed_zero2_cpu.yaml tests/hf_workers.py accelerate OUT`` (2 processes, ZeRO-2,
gradient accumulation 2, the ds_config's "ds_soo" block). Both ranks must report one preconditioned step
per optimizer step, and the weights must equal a single-process loop on the same global batch of 16 that
clips the raw gradient (DeepSpeed's ``gradient_clipping: 1.0``, moved before preconditioning), then
preconditions, then steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import hf_workers as w
import pytest
import torch
from dist_harness import ROOT, SHUTDOWN_ABORT, free_port

OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
DS_JSON = ROOT / "configs" / "ds" / "hf_accelerate_zero2.json"
YAML = ROOT / "configs" / "accelerate" / "deepspeed_zero2_cpu.yaml"


def _launch(out) -> tuple[list[dict], str]:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(YAML),
        "--main_process_port", str(free_port()), str(ROOT / "tests" / "hf_workers.py"), "accelerate", str(out),
    ]  # fmt: skip
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for attempt in range(2):
        for f in out.glob("rank*.json"):
            f.unlink()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        log = proc.stdout + proc.stderr
        files = sorted(out.glob("rank*.json"))
        done = len(files) == 2
        if proc.returncode == 0 and done:
            return [json.loads(f.read_text()) for f in files], log
        if not (attempt == 0 and done and SHUTDOWN_ABORT in log):  # retry only torch/gloo's exit abort
            raise AssertionError(f"accelerate launch exited {proc.returncode}\n{log[-4000:]}")
    raise AssertionError("unreachable")


@pytest.mark.dist
def test_accelerate_launch_deepspeed_zero2(tmp_path):
    ranks, log = _launch(tmp_path)
    block = json.loads(DS_JSON.read_text())
    steps = 4  # 64 examples / (2 ranks x micro-batch 4 x accumulation 2)
    for rank, r in enumerate(ranks):
        assert r["distributed_type"] == "DistributedType.DEEPSPEED" and r["engine"] == "DeepSpeedEngine"
        assert (r["zero_stage"], r["world_size"], r["backend"], r["gas"]) == (2, 2, "gloo", 2), r
        assert r["optimizer_steps_seen"] == steps
        c = r["counters"]
        assert c["optimizer_steps"] == c["preconditioned_steps"] == steps, (rank, c)
        assert c["curvature_refreshes"] > 0 and c["inverse_failures"] == 0, (rank, c)
        assert r["hooks_left"] == 0, "detach() must remove the capture hooks"
        assert r["engine_step_restored"], "detach() must give the engine its own step() back"
    ref = w.manual_run("gpt2", block["ds_soo"], steps, batch=16, clip=block["gradient_clipping"], trainer_loss=False)
    got, want = torch.tensor(ranks[0]["weights"]), torch.tensor(ref["weights"])
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, f"accelerate+DeepSpeed differs from clip-precondition-step by {err:.2e}"


def test_accelerate_single_process_with_accumulation(fresh_accelerate_state, monkeypatch):
    """No DeepSpeed: the wrapped ``accelerator.backward`` preconditions once per sync step, before the clip."""
    from accelerate import Accelerator

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    cfg = {"method": "kfac", "schedule": {"warm_steps": 2, "warm_interval": 1, "sparse_interval": 2}, "grad_clip": 1.0}
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    # float64 (accelerate without mixed precision keeps the model's dtype; ds_soo's state follows it):
    # accumulated micro-batches against one batch of 8 agree to round-off ~1e-15 on every CPU.
    r = w.accelerate_loop(accelerator, cfg, steps=3, dtype=torch.float64)
    assert r["dtypes"] == r["state_dtypes"] == ["torch.float64"]
    c = r["counters"]
    assert r["optimizer_steps_seen"] == 3 and len(r["losses"]) == 6
    assert c["optimizer_steps"] == c["preconditioned_steps"] == 3 and c["curvature_refreshes"] > 0, c
    assert r["hooks_left"] == 0 and r["backward_restored"]
    ref = w.manual_run("gpt2", cfg, 3, batch=8, trainer_loss=False, dtype=torch.float64)
    got, want = torch.tensor(r["weights"], dtype=torch.float64), torch.tensor(ref["weights"], dtype=torch.float64)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-10
