"""The launch/ sbatch templates under a real single-host Slurm: sbatch -> job -> metrics.json.

A private cluster (munged, slurmctld, slurmd; tests/infra/slurm_up.sh) is started once for this
module and stopped by PID afterwards. Jobs inherit this venv through ``--export=ALL``.
The single-node template runs torchrun directly in the batch step; the multi-node template goes
through ``srun`` (one launcher per node), here on the one node there is, with deepspeed's launcher.
Both must reproduce a single-process run of the same global batch ("1 node, 2 processes").
Two real Slurm nodes: test_slurm_multinode_netns.py. What runs: tests/infra/trainer.py.
Needs root and apt (the first run installs slurm-wlm and munge); skipped only where that fails.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from infra import slurm_cluster
from infra.slurm_cluster import SlurmCluster, SlurmUnavailable
from infra.trainer import assert_matches, load_metrics, run_reference, train_env

PROCS = 2

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("slurm")
    try:
        cl = slurm_cluster.start(state)
    except SlurmUnavailable as err:
        pytest.skip(f"Slurm cannot be installed here: {err}")
    print(f"[timing] slurm install {cl.install_s:.1f}s, daemons up {cl.start_s:.1f}s")
    try:
        yield cl
    finally:
        slurm_cluster.stop(state, cl.client)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_reference(tmp_path_factory.mktemp("slurm_ref") / "out")


@pytest.mark.parametrize(
    ("template", "engine", "nodes"),
    [("slurm_single_node.sbatch", "ddp", []), ("slurm_multi_node.sbatch", "deepspeed", ["--nodes=1"])],
)
def test_sbatch_template(
    cluster: SlurmCluster, reference: dict, tmp_path: Path, template: str, engine: str, nodes: list[str]
) -> None:
    env = cluster.env(**train_env(engine, tmp_path / "out", PROCS), TMPDIR=str(tmp_path))  # hostfiles land here
    # All CPUs of the node, so the jobs of this module run one after the other.
    job = cluster.run_template(template, env, tmp_path, f"--cpus-per-task={len(os.sched_getaffinity(0))}", *nodes)
    metrics = load_metrics(tmp_path / "out")
    assert_matches(metrics, reference, world_size=PROCS)
    if "ranks" in metrics:  # every rank ran inside this very job
        assert sorted(r["rank"] for r in metrics["ranks"]) == list(range(PROCS))
        assert {r["slurm_job_id"] for r in metrics["ranks"]} == {job}
