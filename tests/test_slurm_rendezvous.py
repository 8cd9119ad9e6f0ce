"""Unit tests for ds_soo.integrations.slurm: hostlists, rendezvous, hostfile and launcher argv.

Pure python and fast (no Slurm, no torch); the multi-process paths are covered by
test_multinode_netns.py and test_slurm.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ds_soo.integrations import slurm
from ds_soo.integrations.slurm import (
    Rendezvous,
    SlurmEnvError,
    build_command,
    deepspeed_cmd,
    expand_nodelist,
    hostnames,
    master_port,
    procs_per_node,
    program_from_env,
    torchrun_cmd,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("nodelist", "expected"),
    [
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("gpu5", ["gpu5"]),
        ("a,b,c", ["a", "b", "c"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("n[0-1]", ["n0", "n1"]),
        ("node[1]", ["node1"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("rack[1-2]-gpu", ["rack1-gpu", "rack2-gpu"]),
        ("x[1,3],y[2-3].dc", ["x1", "x3", "y2.dc", "y3.dc"]),
        ("node-10.cluster", ["node-10.cluster"]),
        ("", []),
    ],
)
def test_expand_nodelist(nodelist: str, expected: list[str]) -> None:
    assert expand_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "n[3-1]", "n[a-b]", "n[1-2]]", "a,,b", "n[[1]]", "n[]"])
def test_expand_nodelist_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(bad)


def _fake_scontrol(tmp_path: Path, body: str) -> str:
    exe = tmp_path / "scontrol"
    exe.write_text(f"#!/bin/sh\n{body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_hostnames_prefers_scontrol(tmp_path: Path) -> None:
    exe = _fake_scontrol(tmp_path, 'echo "from-scontrol-1"; echo "from-scontrol-2"')
    assert hostnames("ignored[1-2]", scontrol=exe) == ["from-scontrol-1", "from-scontrol-2"]


def test_hostnames_falls_back_when_scontrol_fails(tmp_path: Path) -> None:
    # Without a slurm.conf the real scontrol exits 1 ("Could not establish a configuration source").
    exe = _fake_scontrol(tmp_path, "echo 'fatal: no config' >&2; exit 1")
    assert hostnames("n[1-2]", scontrol=exe) == ["n1", "n2"]
    assert hostnames("n[1-2]", scontrol=str(tmp_path / "absent")) == ["n1", "n2"]
    assert hostnames("n[1-2]", scontrol=None) == ["n1", "n2"]


def test_hostnames_falls_back_on_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With SLURM_CONF naming a missing file the real scontrol retries for 60 s.
    monkeypatch.setattr(slurm, "SCONTROL_TIMEOUT_S", 0.3)
    exe = _fake_scontrol(tmp_path, "exec sleep 5")
    assert hostnames("n[1-2]", scontrol=exe) == ["n1", "n2"]


def test_master_port_is_stable_and_in_range() -> None:
    ports = {master_port(str(job)) for job in range(1000, 3000)}
    assert all(slurm.PORT_BASE <= p < slurm.PORT_BASE + slurm.PORT_SPAN for p in ports)
    assert len(ports) > 1800  # spread: few collisions between neighbouring job ids
    assert master_port("4242") == master_port("4242")
    # crc32, not the salted str hash: another interpreter must agree.
    code = "from ds_soo.integrations.slurm import master_port; print(master_port('4242'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert int(out.stdout) == master_port("4242")
    assert master_port(None) == slurm.DEFAULT_PORT


def test_procs_per_node_precedence() -> None:
    assert procs_per_node({"GPUS_PER_NODE": "3", "SLURM_GPUS_ON_NODE": "8"}) == 3
    assert procs_per_node({"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1"}) == 8
    assert procs_per_node({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert procs_per_node({}) == len(os.sched_getaffinity(0))
    with pytest.raises(SlurmEnvError):
        procs_per_node({"GPUS_PER_NODE": "0"})


def _env(**extra: str) -> dict[str, str]:
    env = {
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NODELIST": "node[01-03,07],gpu5",
        "SLURM_JOB_NUM_NODES": "5",
        "SLURM_NODEID": "2",
        "SLURM_GPUS_ON_NODE": "4",
    }
    env.update(extra)
    return env


def test_rendezvous_from_env() -> None:
    rdzv = Rendezvous.from_env(_env(), scontrol=None)
    assert rdzv.hosts == ("node01", "node02", "node03", "node07", "gpu5")
    assert (rdzv.master_addr, rdzv.master_port) == ("node01", master_port("777"))
    assert (rdzv.nnodes, rdzv.node_rank, rdzv.nproc_per_node, rdzv.world_size) == (5, 2, 4, 20)
    assert rdzv.env_exports() == {
        "MASTER_ADDR": "node01",
        "MASTER_PORT": str(master_port("777")),
        "NNODES": "5",
        "NODE_RANK": "2",
        "GPUS_PER_NODE": "4",
        "WORLD_SIZE": "20",
    }


def test_rendezvous_prefers_step_vars_and_overrides() -> None:
    env = _env(SLURM_STEP_NODELIST="node[02-03]", SLURM_STEP_NUM_NODES="2", SLURM_NODEID="1")
    rdzv = Rendezvous.from_env(env, scontrol=None)
    assert rdzv.hosts == ("node02", "node03") and rdzv.master_addr == "node02" and rdzv.node_rank == 1
    rdzv = Rendezvous.from_env(_env(DS_SOO_MASTER_ADDR="10.0.0.9", DS_SOO_MASTER_PORT="2345"), scontrol=None)
    assert (rdzv.master_addr, rdzv.master_port) == ("10.0.0.9", 2345)
    old = {"SLURM_JOBID": "5", "SLURM_NODELIST": "a,b", "SLURM_NNODES": "2", "SLURM_NODEID": "1"}
    rdzv = Rendezvous.from_env({**old, "GPUS_PER_NODE": "1"}, scontrol=None)
    assert (rdzv.hosts, rdzv.node_rank, rdzv.master_port) == (("a", "b"), 1, master_port("5"))


@pytest.mark.parametrize(
    "env",
    [
        {"SLURM_JOB_ID": "1"},
        _env(SLURM_JOB_NUM_NODES="4"),
        _env(SLURM_NODEID="5"),
    ],
)
def test_rendezvous_rejects_inconsistent_env(env: dict[str, str]) -> None:
    with pytest.raises(SlurmEnvError):
        Rendezvous.from_env(env, scontrol=None)


def test_hostfile_text() -> None:
    rdzv = Rendezvous.from_env(_env(), scontrol=None)
    assert rdzv.hostfile_text() == "".join(f"{h} slots=4\n" for h in ["node01", "node02", "node03", "node07", "gpu5"])


def test_torchrun_cmd_static_and_c10d() -> None:
    rdzv = Rendezvous.from_env(_env(), scontrol=None)
    port = master_port("777")
    cmd = torchrun_cmd(rdzv, ["-m", "ds_soo.train", "--out", "o"])
    assert cmd == [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=5", "--nproc_per_node=4", "--rdzv_backend=static",
        f"--rdzv_endpoint=node01:{port}", "--rdzv_id=777", "--node_rank=2",
        "-m", "ds_soo.train", "--out", "o",
    ]  # fmt: skip
    cmd = torchrun_cmd(rdzv, ["train.py", "x=1"], backend="c10d")
    assert "--rdzv_backend=c10d" in cmd and not any(a.startswith("--node_rank") for a in cmd)
    assert cmd[-2:] == ["train.py", "x=1"]
    with pytest.raises(SlurmEnvError):
        torchrun_cmd(rdzv, ["train.py"], backend="etcd")


def test_deepspeed_cmd() -> None:
    rdzv = Rendezvous.from_env(_env(), scontrol=None)
    cmd = deepspeed_cmd(rdzv, ["-m", "ds_soo.train", "--out", "o"], "/tmp/hf")
    assert cmd == [
        sys.executable, "-m", "deepspeed.launcher.runner",
        "--hostfile=/tmp/hf", "--no_ssh", "--node_rank=2",
        "--master_addr=node01", f"--master_port={master_port('777')}", "--no_local_rank",
        "--module", "ds_soo.train", "--out", "o",
    ]  # fmt: skip
    assert deepspeed_cmd(rdzv, ["t.py", "a"], "/h")[-2:] == ["t.py", "a"]
    assert "--module" not in deepspeed_cmd(rdzv, ["t.py"], "/h")


def test_program_from_env() -> None:
    env = {
        "CONFIG": "configs/x.yaml",
        "ENGINE": "deepspeed",
        "DS_CONFIG": "configs/ds/z1.json",
        "EXTRA": "steps=3 'name=a b'",
        "OUT": "runs/o",
    }
    assert program_from_env(env) == [
        "-m", "ds_soo.train", "--config", "configs/x.yaml", "train.engine=deepspeed",
        "train.ds_config=configs/ds/z1.json", "steps=3", "name=a b", "--out", "runs/o",
    ]  # fmt: skip
    default = program_from_env({"SLURM_JOB_NAME": "j", "SLURM_JOB_ID": "9", "PROGRAM": "w.py --v"})
    assert default == ["w.py", "--v", "train.engine=ddp", "--out", os.path.join("runs", "j-9")]
    renamed = program_from_env({"ENGINE_KEY": "engine", "DS_CONFIG_KEY": "ds", "DS_CONFIG": "d", "OUT": "o"})
    assert renamed[2:] == ["engine=ddp", "ds=d", "--out", "o"]
    with pytest.raises(SlurmEnvError):
        program_from_env({"ENGINE": "horovod"})


def test_build_command_picks_launcher(tmp_path: Path) -> None:
    hostfile = tmp_path / "hf"
    env = _env(ENGINE="deepspeed", OUT="o", DS_SOO_HOSTFILE=str(hostfile))
    cmd = build_command(env)
    assert cmd[2] == "deepspeed.launcher.runner"
    assert cmd[-4:] == ["ds_soo.train", "train.engine=deepspeed", "--out", "o"]
    assert hostfile.read_text().splitlines()[0] == "node01 slots=4"
    assert build_command(_env(ENGINE="fsdp2", OUT="o"))[2] == "torch.distributed.run"
    assert build_command(_env(ENGINE="deepspeed", LAUNCHER="torchrun", OUT="o"))[2] == "torch.distributed.run"
    with pytest.raises(SlurmEnvError):
        build_command(_env(LAUNCHER="pdsh"))


def test_launch_script_dry_run() -> None:
    """The shell wrapper passes env and explicit programs through to the python module."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(_env(DS_SOO_DRY_RUN="1", ENGINE="ddp", OUT="o", PATH=f"{Path(sys.executable).parent}:{env['PATH']}"))
    script = str(ROOT / "launch" / "ds_soo_launch.sh")
    out = subprocess.run(["bash", script], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip().endswith("--node_rank=2 -m ds_soo.train train.engine=ddp --out o")
    out = subprocess.run(["bash", script, "w.py", "k=v"], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("--node_rank=2 w.py k=v")
    bad = subprocess.run(["bash", script], env={**env, "ENGINE": "nope"}, capture_output=True, text=True)
    assert bad.returncode == 2 and "ENGINE='nope'" in bad.stderr


@pytest.mark.parametrize("name", ["slurm_single_node.sbatch", "slurm_multi_node.sbatch", "ds_soo_launch.sh"])
def test_launch_scripts_parse(name: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / "launch" / name)], check=True)
