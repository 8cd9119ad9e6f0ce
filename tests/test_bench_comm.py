"""bench/comm_bytes.py: collectives counted during pre.step() agree with the bytes the layouts say must move."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.dist


def _load():
    spec = importlib.util.spec_from_file_location("bench_comm_bytes", ROOT / "bench" / "comm_bytes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


comm = _load()


def test_modelled_moves_by_hand():
    # Block "a" owned by 0: rank 1 provides 3 elements to it and holds 5 that rank 0 sends back.
    # Block "b" owned by 1: rank 0 provides 2 and holds 4.
    provided = {"a": [7, 3], "b": [2, 6]}
    held = {"a": [10, 5], "b": [4, 8]}
    assert comm.modelled_moves({"a": 0, "b": 1}, provided, held, 2) == [5 + 2, 3 + 4]


def test_fsdp2_shampoo_counted_bytes_and_locality():
    ranks = comm.measure(2, ["fsdp2"], ["shampoo"])
    rows = [r[0] for r in ranks]
    blocks = rows[0]["blocks"]
    for rank, row in enumerate(rows):
        sent = row["measured"]["bytes"]
        assert row["measured"]["calls"].get("all_to_all_single") == 2, row["measured"]["calls"]  # gather + scatter
        # All-to-all bytes = the gradient elements that must move (fp32) plus at most a flag per (block, peer) each way.
        extra = sent["all_to_all_single"] - row["modelled_lpt_sent_bytes"]
        assert row["modelled_lpt_sent_bytes"] > 0
        assert 0 <= extra <= 2 * 4 * blocks, (rank, extra)
    trade = {t["assignment"]: t for t in rows[0]["tradeoff"]}
    lpt, local = trade["LPT"], trade["locality, slack 1.1"]
    assert local["strategy"] == "locality"
    assert local["imbalance"] <= 1.1 * lpt["imbalance"] + 1e-9
    assert local["total_sent_bytes"] < 0.8 * lpt["total_sent_bytes"]
    # The table renders from the same rows.
    assert "| fsdp2 | shampoo | 2 |" in comm.tables({2: ranks})
