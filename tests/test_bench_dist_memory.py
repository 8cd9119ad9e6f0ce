"""bench/dist_memory.py's K-FAC unit model: A and G as separate units, and the achievable-balance bound."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("bench_dist_memory", ROOT / "bench" / "dist_memory.py")
dm = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = dm
spec.loader.exec_module(dm)


def test_split_units_are_the_two_factors_of_each_layer():
    layers = [("fc1", 12, 4), ("fc2", 3, 12)]
    assert dm.kfac_blocks(layers) == {"fc1": [5, 12], "fc2": [13, 3]}
    assert dm.kfac_split_units(layers) == {"fc1/A": [5], "fc1/G": [12], "fc2/A": [13], "fc2/G": [3]}


def test_balance_bound_by_hand():
    # Costs d^3: 8, 1, 1 on 3 ranks. Mean 10/3; the largest unit (8) sets the bound 8 / (10/3) = 2.4,
    # and LPT reaches it: {8}, {1}, {1}.
    lpt, bound, idle = dm.balance_figures({"a": [2], "b": [1], "c": [1]}, 3)
    assert lpt == pytest.approx(2.4) and bound == pytest.approx(2.4) and idle == 0
    # Ten ranks: seven own nothing; the bound is still the largest unit over the mean.
    lpt, bound, idle = dm.balance_figures({"a": [2], "b": [1], "c": [1]}, 10)
    assert idle == 7 and lpt == pytest.approx(8 / 1.0) and bound == pytest.approx(8.0)


def test_split_never_worse_and_fills_ranks_for_vit_b():
    layers, _ = dm.MODELS["ViT-B/16"]
    for n in (8, 64, 256):
        w_lpt, w_bound, w_idle = dm.balance_figures(dm.kfac_blocks(layers), n)
        s_lpt, s_bound, s_idle = dm.balance_figures(dm.kfac_split_units(layers), n)
        assert s_bound <= w_bound and s_idle <= w_idle
        assert s_lpt >= s_bound - 1e-9 and w_lpt >= w_bound - 1e-9
    # At 64 ranks whole layers leave 14 ranks idle (50 units); A/G units (100) use every rank.
    assert dm.balance_figures(dm.kfac_blocks(layers), 64)[2] == 14
    assert dm.balance_figures(dm.kfac_split_units(layers), 64)[2] == 0


def test_stagger_figures_by_hand_and_never_below_the_bound():
    # Costs 8, 1, 1 over 2 steps on one rank: a -> step 0, b and c -> step 1. Busiest step 8 of 10 at once,
    # and no plan can do better than the largest block (8 > 10 / 2).
    got, best = dm.stagger_figures({"a": [2], "b": [1], "c": [1]}, 1, 2)
    assert got == pytest.approx(0.8) and best == pytest.approx(0.8)
    # Four equal blocks over 4 steps: one each, a quarter of all at once.
    assert dm.stagger_figures({k: [3] for k in "abcd"}, 1, 4) == (pytest.approx(0.25), pytest.approx(0.25))
    layers, extra = dm.MODELS["GPT-2 small"]
    for blocks in (dm.kfac_blocks(layers), dm.shampoo_blocks(layers, extra, 1024)):
        for n, k in ((1, 10), (8, 10), (8, 300), (64, 300)):
            got, best = dm.stagger_figures(blocks, n, k)
            assert best - 1e-12 <= got <= 1.0
        # One rank, the default sparse interval: within 1% of the best possible.
        got, best = dm.stagger_figures(blocks, 1, 300)
        assert got <= 1.01 * best
