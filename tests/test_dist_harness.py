"""The multi-process harness itself: results per rank, errors surfaced, and the single narrow retry."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from dist_harness import SHUTDOWN_ABORT, DistWorkerError, judge, launch

pytestmark = pytest.mark.dist


def worker_rank_info(fail_rank: int = -1) -> dict:
    import os

    if dist.get_rank() == fail_rank:
        raise RuntimeError(f"deliberate failure on rank {fail_rank}")
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "omp": os.environ.get("OMP_NUM_THREADS")}


@pytest.mark.parametrize("launcher", ["direct", "torchrun"])
def test_results_in_rank_order(launcher):
    results = launch("tests/test_dist_harness.py:worker_rank_info", nproc=2, launcher=launcher)
    assert results == [{"rank": r, "world": 2, "omp": "1"} for r in range(2)]


def worker_hang_unless_rank0_fails() -> dict:
    if dist.get_rank() == 0:
        raise RuntimeError("rank 0 gives up")
    dist.barrier()  # would wait forever for rank 0: the harness must end it
    return {}


def test_worker_error_is_raised_with_its_traceback():
    with pytest.raises(DistWorkerError, match="deliberate failure on rank 1"):
        launch("tests/test_dist_harness.py:worker_rank_info", nproc=2, args={"fail_rank": 1})


def test_failed_rank_does_not_leave_peers_hanging():
    with pytest.raises(DistWorkerError, match="rank 0 gives up"):
        launch("tests/test_dist_harness.py:worker_hang_unless_rank0_fails", nproc=2, timeout=60)


def test_retry_only_for_the_known_exit_abort_after_results():
    assert judge(0, True, "", 0) == "ok"
    assert judge(-6, True, f"... {SHUTDOWN_ABORT} ...", 0) == "retry"
    assert judge(-6, True, f"... {SHUTDOWN_ABORT} ...", 1) == "fail"  # once only
    assert judge(-6, False, f"... {SHUTDOWN_ABORT} ...", 0) == "fail"  # results missing: a real failure
    assert judge(1, True, "Traceback ...", 0) == "fail"
