"""``python -m ds_soo.train`` under torchrun and the deepspeed launcher equals one process.

Every engine of the trainer (DDP, FSDP2, DeepSpeed ZeRO) runs the real CLI on 2 gloo ranks with the
same *global* batch as a single-process run of the same config; losses and final weights must agree
to rtol 3e-5 (fp32, see ``RTOL``), every step must be preconditioned, and the curvature state must be sharded (the
per-rank bytes add up to the single process's, they are not replicated). FSDP2 and DeepSpeed also
resume from a mid-run checkpoint bitwise (DDP and one process: tests/test_resume.py).
Each launch costs 5-10 s here, so every test checks several things per launch.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ds_soo.train import main

pytestmark = pytest.mark.dist

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"
# fp32: ds_soo.train builds fp32 models (it has no float64 option, only train.bf16), so these runs differ by
# fp32 summation order. Largest rel diff measured over losses, param_sq_sum and fingerprints (AVX-512 CPU):
# 5.4e-6 default kernels, 5.6e-6 ATEN_CPU_CAPABILITY=avx2, 1.08e-5 =default (which failed at 1e-5).
RTOL = 3e-5
SHUTDOWN_ABORT = "terminate called without an active exception"
LAUNCH_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env() -> dict[str, str]:
    """This environment without rank variables, one thread per rank, the checkout importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # fmt: skip
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def trainer_cmd(out: Path, overrides: tuple[str, ...], nproc: int = 2, launcher: str = "torchrun",
                config: Path = TINY, extra: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
    """torchrun / deepspeed (``--module``) around ``ds_soo.train --config C OVERRIDES --out OUT``."""
    train = ["--config", str(config), *extra, *overrides, "--out", str(out), "--quiet"]
    port = str(free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
                f"--master_port={port}", "-m", "ds_soo.train", *train]  # fmt: skip
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={nproc}", f"--master_port={port}",
                "--module", "ds_soo.train", *train]  # fmt: skip
    raise ValueError(launcher)


def run_trainer(out: Path, *overrides: str, nproc: int = 2, launcher: str = "torchrun", config: Path = TINY,
                extra: tuple[str, ...] = ()) -> dict:  # fmt: skip
    """Launch the real trainer on ``nproc`` ranks; returns rank 0's metrics.json."""
    cmd = trainer_cmd(out, overrides, nproc, launcher, config, extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=trainer_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    metrics = out / "metrics.json"
    # torch/gloo's rare exit abort (ENGINES.md) after results were written is not a training failure.
    if proc.returncode != 0 and not (SHUTDOWN_ABORT in proc.stderr + proc.stdout and metrics.is_file()):
        logs = "".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(out.glob("train*.log")))
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stderr[-3000:]}\n{logs}")
    return json.loads(metrics.read_text())


def run_single(out: Path, *overrides: str, config: Path = TINY) -> dict:
    """The single-process reference, in this process (no launcher start-up to pay)."""
    assert main(["--config", str(config), "--out", str(out), "--quiet", *overrides]) == 0
    return json.loads((out / "metrics.json").read_text())


def assert_same_training(got: dict, ref: dict, world: int, engine: str) -> None:
    """A ``world``-rank run of ``engine`` trained what the single process trained, with ds_soo on."""
    assert got["engine"] == engine and got["world_size"] == world
    assert got["steps"] == ref["steps"] == len(got["train_loss"])
    assert got["train_loss"] == pytest.approx(ref["train_loss"], rel=RTOL)
    assert got["param_sq_sum"] == pytest.approx(ref["param_sq_sum"], rel=RTOL)
    # Tensor by tensor: one tensor left unmoved cannot hide in the global sum. Attention's key bias is the
    # exception: softmax is shift-invariant, so its exact gradient is zero and what it gets is summation-order
    # rounding noise, which an Adam-normalised step turns into engine-dependent moves of ~lr.
    assert got["param_fingerprints"].keys() == ref["param_fingerprints"].keys()
    for name, want in ref["param_fingerprints"].items():
        if name.endswith("k_proj.bias"):
            continue
        total, sq, l1 = got["param_fingerprints"][name]
        # The signed sum can cancel: its error scale is the tensor's L1 norm, not the sum itself.
        assert total == pytest.approx(want[0], abs=RTOL * want[2]), name
        assert sq == pytest.approx(want[1], rel=RTOL) and l1 == pytest.approx(want[2], rel=RTOL), name
    assert got["preconditioned_steps"] == got["optimizer_steps"] == got["steps"] > 0
    assert got["curvature_refreshes"] == ref["curvature_refreshes"] and got["inverse_failures"] == 0
    # Sharded, not replicated: each block's state lives on one owner rank.
    assert len(got["curvature_bytes_per_rank"]) == world and all(b > 0 for b in got["curvature_bytes_per_rank"])
    assert sum(got["curvature_bytes_per_rank"]) == ref["curvature_bytes_per_rank"][0]
    assert got["owner_load"]["world_size"] == world and got["owner_load"]["imbalance"] >= 1.0


def assert_bitwise(got: dict, want: dict) -> None:
    for key in ("train_loss", "param_sq_sum", "param_fingerprints", "lr", "preconditioned_steps",
                "curvature_refreshes", "stats_updates", "precond_metrics"):
        assert got[key] == want[key], key


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory):
    """Single-process references, computed once per set of overrides."""
    cache: dict[tuple, dict] = {}

    def get(*overrides: str, config: Path = TINY) -> dict:
        key = (str(config), overrides)
        if key not in cache:
            cache[key] = run_single(tmp_path_factory.mktemp("single"), *overrides, config=config)
        return cache[key]

    return get


def test_ddp_with_accumulation_matches_single_process(tmp_path, single):
    """K-FAC, 2 micro-batches per step (DDP's no_sync on the first): rank 0 alone writes results."""
    overrides = ("train.grad_accum=2",)
    got = run_trainer(tmp_path, *overrides, "train.engine=ddp")
    assert_same_training(got, single(*overrides), 2, "ddp")
    assert got["config"]["train"]["engine"] == "ddp"
    assert (tmp_path / "train.log").is_file() and (tmp_path / "train.rank1.log").is_file()
    assert len(got["peak_memory_bytes_per_rank"]) == 2


def test_fsdp2_matches_single_process_and_resumes_bitwise(tmp_path, single):
    """Shampoo over FSDP2's dim-0 shards; then a restart from the step-2 checkpoint (DCP) to the end."""
    overrides = ("optim.name=shampoo", "optim.lr=0.01", "train.engine=fsdp2")
    full = run_trainer(tmp_path / "full", *overrides, "train.checkpoint_every=2")
    assert_same_training(full, single(*overrides[:2]), 2, "fsdp2")
    ckpt = tmp_path / "full" / "checkpoints" / "step_2"
    assert (ckpt / "model_optim" / ".metadata").is_file() and (ckpt / "ds_soo" / ".metadata").is_file()
    resumed = run_trainer(tmp_path / "resumed", *overrides, f"train.resume={ckpt}")
    assert resumed["resumed_from_step"] == 2
    assert_bitwise(resumed, full)


def test_deepspeed_zero2_matches_single_process_and_resumes_bitwise(tmp_path, single):
    """ZeRO-2 with the trainer's own optimizer and precond (no ds_soo block), batch fields "auto"; the
    damping adapts (Levenberg-Marquardt, the loss re-measured after every second step) as in one process."""
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps({
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "zero_optimization": {"stage": 2}, "steps_per_print": 10**6,
    }))  # fmt: skip
    adaptive = ("precond.damping.kind=adaptive", "precond.damping.adapt_interval=2", "precond.damping.adapt_decay=0.7")
    overrides = ("train.grad_accum=2", *adaptive, "train.engine=deepspeed", f"train.ds_config={ds}")
    full = run_trainer(tmp_path / "full", *overrides, "train.checkpoint_every=2")
    ref = single(*overrides[:4])
    assert_same_training(full, ref, 2, "deepspeed")
    assert full["precond_metrics"]["damping_adaptations"] == ref["precond_metrics"]["damping_adaptations"] == 2
    assert full["precond_metrics"]["damping"] == ref["precond_metrics"]["damping"] != 1e-2
    filled = full["config"]["ds_config"]
    assert (filled["train_batch_size"], filled["train_micro_batch_size_per_gpu"]) == (64, 16)
    assert filled["gradient_accumulation_steps"] == 2 and filled["gradient_clipping"] == 1.0
    resumed = run_trainer(tmp_path / "resumed", *overrides, f"train.resume={tmp_path / 'full'}")
    assert resumed["resumed_from_step"] == 2  # the newest kept checkpoint of a 4-step run
    assert_bitwise(resumed, full)


def test_deepspeed_launcher_with_a_shipped_config(tmp_path, single):
    """``deepspeed --num_gpus 2 --module ds_soo.train --deepspeed_config configs/ds/zero2_kfac.json``.

    The file's ds_soo block (scaled damping, its own schedule), its SGD optimizer section and its
    gradient_clipping replace the trainer's settings; the same settings in one process give the same run.
    """
    shipped = ROOT / "configs" / "ds" / "zero2_kfac.json"
    ds = json.loads(shipped.read_text())
    raw = yaml.safe_load(TINY.read_text())
    block = dict(ds["ds_soo"])
    raw["optim"].update(name=block.pop("method"), lr=ds["optimizer"]["params"]["lr"],
                        momentum=ds["optimizer"]["params"]["momentum"], grad_clip=ds["gradient_clipping"])  # fmt: skip
    raw["precond"] = block
    same = tmp_path / "same_in_one_process.yaml"
    same.write_text(yaml.safe_dump(raw))
    got = run_trainer(tmp_path / "ds", launcher="deepspeed", extra=("--deepspeed_config", str(shipped)))
    assert_same_training(got, single(config=same), 2, "deepspeed")
    assert got["config"]["optim"]["name"] == "kfac" and got["config"]["optim"]["lr"] == 0.1
    assert got["config"]["precond"]["damping"]["kind"] == "scaled"
    assert got["config"]["ds_config"]["optimizer"]["type"] == "SGD"
