"""Two "nodes" in two network namespaces, started exactly as Slurm's srun would start them.

Each node runs ``launch/ds_soo_launch.sh`` with simulated SLURM_* variables (same job id and
compressed nodelist, SLURM_NODEID 0 or 1) inside its own namespace, so the rendezvous it derives
(master = first host of the nodelist, port hashed from the job id, node rank) must really work
across a network. The result must equal a single-process run of the same global batch.
What runs is set in one place: tests/infra/trainer.py (TRAIN_PROGRAM).
Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN); skipped only where namespaces cannot be created.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from infra.netns import NetnsUnavailable, Node, netns_pair, routes
from infra.trainer import LAUNCH, ROOT, assert_matches, clean_env, load_metrics, run_reference, train_env

from ds_soo.integrations.slurm import master_port

RUN_TIMEOUT_S = 180

pytestmark = [pytest.mark.dist]


@pytest.fixture(scope="module")
def nodes():
    try:
        with netns_pair() as pair:
            yield pair
    except NetnsUnavailable as err:
        pytest.skip(f"network namespaces unavailable: {err}")


@pytest.fixture(scope="module")
def reference(nodes: tuple[Node, Node], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One process on one node, inside namespace A (on its loopback); shared by both engines."""
    t0 = time.monotonic()
    ref = run_reference(tmp_path_factory.mktemp("reference") / "out", prefix=nodes[0].exec_prefix())
    print(f"[timing] single-process reference {time.monotonic() - t0:.1f}s")
    return ref


def _node_env(node: Node, out: Path, engine: str, job_id: str, nodelist: str, node_rank: int) -> dict[str, str]:
    """The environment srun would give this node's task, plus the launcher's knobs."""
    return clean_env(
        **train_env(engine, out, 1),
        SLURM_JOB_ID=job_id,
        SLURM_JOB_NODELIST=nodelist,
        SLURM_JOB_NUM_NODES="2",
        SLURM_NODEID=str(node_rank),
        DS_SOO_HOSTFILE=str(out.parent / f"hostfile.{node_rank}"),
        # Gloo must use the veth: the namespace's only other interface is loopback.
        GLOO_SOCKET_IFNAME=node.ifname,
    )


def _run_nodes(cmds: list[tuple[list[str], dict[str, str]]], logdir: Path) -> list[int]:
    """Start every node's launcher at once, wait for all; kill their process groups on timeout."""
    procs = []
    for i, (cmd, env) in enumerate(cmds):
        log = open(logdir / f"node{i}.log", "w")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append((proc, log))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        codes = [-999] * len(procs)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    return codes


def _logs(logdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(logdir.glob("*.log")))


def test_namespaces_are_sealed(nodes: tuple[Node, Node]) -> None:
    """Each namespace reaches only the veth subnet: no default route, nothing to leak through."""
    for node in nodes:
        table = routes(node.netns)
        assert table and all(line.startswith("10.77.0.0/24 ") for line in table), table
    host_addrs = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    assert "10.77.0." not in host_addrs


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_two_node_run_matches_single_process(
    nodes: tuple[Node, Node], reference: dict, tmp_path: Path, engine: str
) -> None:
    a, b = nodes
    job_id = str(10_000 + uuid.uuid4().int % 80_000)
    # A compressed hostlist, so the launcher's expander (or scontrol) is part of the path.
    nodelist = f"{a.hostname.rsplit('-n', 1)[0]}-n[1-2]"
    logdir, out = tmp_path / "logs", tmp_path / "multi"
    logdir.mkdir()

    t0 = time.monotonic()
    cmds = [
        (node.exec_prefix() + ["bash", str(LAUNCH)], _node_env(node, out, engine, job_id, nodelist, rank))
        for rank, node in enumerate(nodes)
    ]
    codes = _run_nodes(cmds, logdir)
    assert codes == [0, 0], f"two-node run failed: {codes}\n{_logs(logdir)}"
    print(f"[timing] {engine}: two-node run {time.monotonic() - t0:.1f}s")

    got = load_metrics(out)
    assert_matches(got, reference, world_size=2)
    if "ranks" in got:  # placement: rank r ran on node r, in that node's namespace, via the hashed port
        ranks = sorted(got["ranks"], key=lambda r: r["rank"])
        assert [r["netns"] for r in ranks] == [a.netns_id(), b.netns_id()]
        assert [r["node_rank"] for r in ranks] == [0, 1]
        assert {r["master_addr"] for r in ranks} == {a.hostname}
        assert {int(r["master_port"]) for r in ranks} == {master_port(job_id)}
