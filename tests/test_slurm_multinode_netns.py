"""launch/slurm_multi_node.sbatch on TWO real Slurm nodes: one slurmd per network namespace.

The nearest thing to a real cluster on one machine: slurmctld + slurmd "dssoo<pid>-n1" in
namespace A (10.77.0.1), slurmd "dssoo<pid>-n2" in namespace B (10.77.0.2), each with its own
hostname. ``sbatch --nodes=2`` allocates both; the template's ``srun`` starts one launcher per
node with Slurm's own SLURM_NODEID / SLURM_STEP_NODELIST, and the ranks rendezvous over the veth.
Both engines must reproduce a single-process run. What runs: tests/infra/trainer.py.
Needs root, apt (Slurm) and namespaces; skipped only where one of those is unavailable.
"""

from __future__ import annotations

import pytest
from infra import slurm_cluster
from infra.netns import NetnsUnavailable, Node, netns_pair
from infra.slurm_cluster import SlurmUnavailable
from infra.trainer import assert_matches, load_metrics, run_reference, train_env

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def nodes():
    try:
        with netns_pair() as pair:
            yield pair
    except NetnsUnavailable as err:
        pytest.skip(f"network namespaces unavailable: {err}")


@pytest.fixture(scope="module")
def cluster(nodes: tuple[Node, Node], tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("slurm2")
    try:
        cl = slurm_cluster.start(state, tuple(node.spec() for node in nodes))
    except SlurmUnavailable as err:
        pytest.skip(f"Slurm cannot be installed here: {err}")
    print(f"[timing] slurm install {cl.install_s:.1f}s, 2-node cluster up {cl.start_s:.1f}s")
    try:
        yield cl
    finally:
        slurm_cluster.stop(state, cl.client)


@pytest.fixture(scope="module")
def reference(nodes: tuple[Node, Node], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_reference(tmp_path_factory.mktemp("ref") / "out", prefix=nodes[0].exec_prefix())


@pytest.mark.parametrize("engine", ["ddp", "deepspeed"])
def test_sbatch_two_nodes(cluster, nodes: tuple[Node, Node], reference: dict, tmp_path, engine: str) -> None:
    a, b = nodes
    # One exported environment for all nodes, as on a real cluster: the veth has the same name in both.
    env = cluster.env(**train_env(engine, tmp_path / "out", 1), GLOO_SOCKET_IFNAME=a.ifname, TMPDIR=str(tmp_path))
    job = cluster.run_template("slurm_multi_node.sbatch", env, tmp_path, "--nodes=2")
    metrics = load_metrics(tmp_path / "out")
    assert_matches(metrics, reference, world_size=2)
    if "ranks" in metrics:  # rank r on node r: its hostname, its namespace, Slurm's task id
        ranks = sorted(metrics["ranks"], key=lambda r: r["rank"])
        assert [r["hostname"] for r in ranks] == [a.hostname, b.hostname]
        assert [r["netns"] for r in ranks] == [a.netns_id(), b.netns_id()]
        assert [r["slurm_procid"] for r in ranks] == ["0", "1"]
        assert {r["master_addr"] for r in ranks} == {a.hostname}
        assert {r["slurm_job_id"] for r in ranks} == {job}
