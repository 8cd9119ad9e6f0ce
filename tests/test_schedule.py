"""Curvature schedule (warm phase, k1/k2, frozen, stats intervals, stagger) and damping rules."""

from __future__ import annotations

import logging
import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from ds_soo.config import ConfigError, DampingConfig, ScheduleConfig
from ds_soo.preconditioner import Preconditioner
from ds_soo.schedule import CurvatureSchedule, damping_value


def _sched(**kw) -> CurvatureSchedule:
    return CurvatureSchedule(ScheduleConfig(**kw))


def _due(s: CurvatureSchedule, n: int, block: str | None = None) -> list[int]:
    return [t for t in range(n) if s.refresh_due(t, block)]


# ----------------------------------------------------------------------------- warm phase length


def test_warm_phase_by_fraction():
    s = _sched(warm_fraction=0.003, total_steps=100_000)
    assert s.warm_steps == 300
    assert s.in_warm_phase(299) and not s.in_warm_phase(300)
    assert _sched(warm_fraction=0.003, total_steps=100_001).warm_steps == 301  # ceil
    # Without the floor a positive fraction still never rounds to zero.
    assert _sched(warm_fraction=1e-6, total_steps=100, warm_min_refreshes=0).warm_steps == 1


def test_warm_phase_floor_in_refreshes_is_logged(caplog):
    # 0.3% of 90 steps rounds to 1 step: the floor (10 refreshes every 2 steps) wins and is logged.
    with caplog.at_level(logging.WARNING, logger="ds_soo.schedule"):
        s = _sched(warm_fraction=0.003, total_steps=90, warm_interval=2)
    assert s.warm_steps == 20
    assert "warm_fraction=0.003 of 90 steps gives a warm phase of 1 step" in caplog.text
    assert "warm_min_refreshes=10" in caplog.text and "using 20 warm steps" in caplog.text
    assert len(_due(s, 20)) == 10
    # Capped at the run length: the whole run is then the warm phase, and the log says so.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds_soo.schedule"):
        assert _sched(warm_fraction=0.003, total_steps=50).warm_steps == 50
    assert "(the whole run)" in caplog.text
    # Epochs are floored too; explicit warm_steps are taken as given, silently.
    assert _sched(warm_fraction=None, warm_epochs=0.1, steps_per_epoch=50).warm_steps == 100
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ds_soo.schedule"):
        assert _sched(warm_steps=3).warm_steps == 3
        assert _sched(warm_fraction=0.5, total_steps=1000).warm_steps == 500  # above the floor: as derived
    assert caplog.text == ""


def test_warm_phase_by_steps_and_epochs_and_precedence():
    assert _sched(warm_steps=7).warm_steps == 7
    assert _sched(warm_fraction=None, warm_epochs=0.5, steps_per_epoch=101, warm_interval=1).warm_steps == 51
    # warm_steps wins over epochs, epochs over the (default) fraction.
    assert _sched(warm_steps=3, warm_epochs=2, steps_per_epoch=10, total_steps=10_000).warm_steps == 3
    assert _sched(warm_epochs=2, steps_per_epoch=10, total_steps=10_000, warm_interval=1).warm_steps == 20
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        _sched(warm_epochs=1.0)


def test_unknown_total_steps_keeps_warm_phase_forever(caplog):
    with caplog.at_level(logging.WARNING, logger="ds_soo.schedule"):
        s = _sched(warm_fraction=0.003)
    assert s.warm_steps is None and "never ends" in caplog.text
    assert s.in_warm_phase(10**9)
    assert _due(s, 35) == [0, 10, 20, 30]


# ----------------------------------------------------------------------------- intervals


def test_k1_then_k2_refresh_steps():
    s = _sched(warm_steps=25, warm_interval=10, sparse_interval=100, stagger=False)
    assert _due(s, 400) == [0, 10, 20, 25, 125, 225, 325]
    # By default statistics keep accumulating every 10 steps after the warm phase (the study's protocol) ...
    stats = [t for t in range(400) if s.stats_due(t)]
    assert stats == list(range(25)) + list(range(25, 400, 10))
    # ... and on every refresh step too, when refreshes are more frequent than that grid ...
    s = _sched(warm_steps=25, warm_interval=10, sparse_interval=4, stagger=False)
    assert [t for t in range(25, 50) if s.stats_due(t)] == [25, 29, 33, 35, 37, 41, 45, 49]
    # (staggered, some block refreshes on every step: statistics on every step)
    staggered = _sched(warm_steps=25, warm_interval=10, sparse_interval=4)
    assert all(staggered.stats_due(t) for t in range(25, 50))
    # ... and with stats_sparse_interval=None they follow the refreshes only.
    s = _sched(warm_steps=25, warm_interval=10, sparse_interval=100, stats_sparse_interval=None, stagger=False)
    assert [t for t in range(400) if s.stats_due(t)] == list(range(25)) + [25, 125, 225, 325]


def test_frozen_after_warm_phase():
    s = _sched(warm_steps=12, warm_interval=5, sparse_interval=0)
    assert _due(s, 1000) == [0, 5, 10]
    assert not any(s.stats_due(t) for t in range(12, 1000))


def test_separate_stats_intervals():
    s = _sched(warm_steps=20, warm_interval=10, stats_warm_interval=3, sparse_interval=50, stats_sparse_interval=7)
    stats = [t for t in range(100) if s.stats_due(t)]
    assert stats == [0, 3, 6, 9, 12, 15, 18] + [20, 27, 34, 41, 48, 55, 62, 69, 76, 83, 90, 97]
    assert _due(s, 100) == [0, 10, 20, 70]


def test_first_step_always_refreshes():
    s = _sched(warm_steps=100, warm_interval=7, stagger=True)
    for block in ("a", "b", "layer.3", "x.weight[0:4,0:4]"):
        assert s.refresh_due(0, block)


def test_stagger_offsets_spread_blocks_and_keep_the_interval():
    k1, k2, warm = 8, 20, 40
    s = _sched(warm_steps=warm, warm_interval=k1, sparse_interval=k2, stagger=True)
    blocks = [f"layer{i}" for i in range(16)]
    firsts = set()
    for b in blocks:
        due = _due(s, warm + 3 * k2, b)
        warm_due = [t for t in due if 0 < t < warm]
        sparse_due = [t for t in due if t >= warm]
        # One residue per block: exactly one refresh in every k1 window of the warm phase ...
        residues = {t % k1 for t in warm_due}
        assert len(residues) == 1
        (r,) = residues
        assert warm_due == [t for t in range(1, warm) if t % k1 == r]
        # ... and one in every k2 window after it.
        assert len(sparse_due) == 3 and warm <= sparse_due[0] < warm + k2
        assert sparse_due == [sparse_due[0] + i * k2 for i in range(3)]
        firsts.add(r)
        # Deterministic: a fresh schedule gives the same steps.
        assert _due(_sched(warm_steps=warm, warm_interval=k1, sparse_interval=k2, stagger=True), 100, b) == _due(
            s, 100, b
        )
    assert len(firsts) >= 3, "stagger should spread blocks over the interval"
    # Statistics on refresh steps only (stats_sparse_interval=None) then means every step ...
    only = _sched(warm_steps=warm, warm_interval=k1, sparse_interval=k2, stagger=True, stats_sparse_interval=None)
    assert all(only.stats_due(t) for t in range(warm + 3 * k2))
    # ... while the default grid of every 10 steps stays (a refresh uses the latest statistics).
    assert [t for t in range(warm, warm + 3 * k2) if s.stats_due(t)] == list(range(warm, warm + 3 * k2, 10))
    # Without stagger every block refreshes together.
    plain = _sched(warm_steps=warm, warm_interval=k1, sparse_interval=k2, stagger=False)
    assert len({tuple(_due(plain, 100, b)) for b in blocks}) == 1


# ----------------------------------------------------------------------------- damping


def test_damping_constant_uses_value_or_default():
    assert damping_value(DampingConfig(), 1e-3, 0) == 1e-3
    assert damping_value(DampingConfig(value=0.2), 1e-3, 5) == 0.2


def test_damping_scaled_formula():
    cfg = DampingConfig(
        kind="scaled",
        value=0.01,
        ref_batch_size=128,
        ref_lr=1e-3,
        batch_exponent=0.5,
        lr_exponent=1.0,
        batch_size=512,
        lr=2e-3,
    )
    # 0.01 * (512/128)^0.5 * (2e-3/1e-3)^1 = 0.01 * 2 * 2
    assert damping_value(cfg, 1.0, 0) == pytest.approx(0.04)
    cfg.batch_size, cfg.lr = 128, 1e-3
    assert damping_value(cfg, 1.0, 0) == pytest.approx(0.01)
    cfg.value = None
    assert damping_value(cfg, 3e-4, 0) == pytest.approx(3e-4)


def test_damping_callable_gets_step_batch_lr():
    seen = []

    def fn(step, batch, lr):
        seen.append((step, batch, lr))
        return 1e-3 * (step + 1)

    cfg = DampingConfig(kind="callable", fn=fn, batch_size=64, lr=0.1)
    assert damping_value(cfg, 0.0, 4) == pytest.approx(5e-3)
    assert seen == [(4, 64, 0.1)]


def test_scaled_without_batch_size_raises():
    with pytest.raises(ConfigError, match="batch_size"):
        damping_value(DampingConfig(kind="scaled", lr=1e-3), 1e-3, 0)
    pre = Preconditioner(nn.Linear(3, 2), {"damping": {"kind": "scaled", "value": 0.01}})
    with pytest.raises(ConfigError, match="batch_size"):
        pre.damping()
    pre.set_hyperparams(batch_size=512, lr=4e-3)
    assert pre.damping() == pytest.approx(0.01 * 2 * 2)


# ----------------------------------------------------------------------------- the Preconditioner follows it


def _run(cfg: dict, steps: int):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    pre = Preconditioner(model, {"kfac": {"kl_clip": None}, **cfg})
    refreshed, stats, a_seen = [], [], []
    for t in range(steps):
        model.zero_grad()
        x = torch.randn(8, 4)
        nn.functional.mse_loss(model(x), torch.randn(8, 2)).backward()
        before_r, before_s = pre.counters["curvature_refreshes"], pre.counters["stats_updates"]
        assert pre.step(), f"step {t} not preconditioned"
        if pre.counters["curvature_refreshes"] > before_r:
            refreshed.append(t)
        if pre.counters["stats_updates"] > before_s:
            stats.append(t)
        a_seen.append(pre.states["0"].a.clone() if pre.cfg.method == "kfac" else None)
    return pre, refreshed, stats, a_seen


def test_preconditioner_follows_schedule_and_skips_capture_off_schedule():
    sched = {"warm_steps": 4, "warm_interval": 2, "sparse_interval": 3, "stats_sparse_interval": None, "stagger": False}
    cfg = {"damping": {"value": 0.01}, "schedule": sched}
    pre, refreshed, stats, a_seen = _run(cfg, 11)
    assert refreshed == [0, 2, 4, 7, 10]
    assert stats == [0, 1, 2, 3, 4, 7, 10]
    assert pre.counters["preconditioned_steps"] == 11
    # Off-schedule steps leave the factors untouched (hooks did not capture).
    assert torch.equal(a_seen[5], a_seen[4]) and torch.equal(a_seen[6], a_seen[4])
    assert not torch.equal(a_seen[7], a_seen[6])


def test_preconditioner_frozen_keeps_preconditioning():
    cfg = {"damping": {"value": 0.01}, "schedule": {"warm_steps": 3, "warm_interval": 1, "sparse_interval": 0}}
    pre, refreshed, stats, a_seen = _run(cfg, 8)
    assert refreshed == [0, 1, 2] and stats == [0, 1, 2]
    assert pre.counters["preconditioned_steps"] == 8
    assert all(torch.equal(a, a_seen[2]) for a in a_seen[3:])


def test_preconditioner_shampoo_stats_interval():
    cfg = {
        "method": "shampoo",
        "damping": {"value": 0.01},
        "schedule": {"warm_steps": 100, "warm_interval": 4, "stats_warm_interval": 2},
    }
    pre, refreshed, stats, _ = _run(cfg, 9)
    assert stats == [0, 2, 4, 6, 8] and refreshed == [0, 4, 8]


def test_preconditioner_stagger_refreshes_blocks_on_their_own_steps():
    cfg = {"damping": {"value": 0.01}, "schedule": {"warm_steps": 100, "warm_interval": 5, "stagger": True}}
    pre, refreshed, stats, _ = _run(cfg, 11)
    sched = pre.schedule
    for bid in ("0", "2"):
        expect = len([t for t in range(11) if sched.refresh_due(t, bid)])
        assert pre.block_refreshes[bid] == expect
        # One initial refresh plus one per interval window.
        assert expect in (3, 4)
    assert stats == list(range(11))


# ----------------------------------------------------------------------------- sparse_interval="auto"


def _auto(**kw) -> CurvatureSchedule:
    # Unstaggered: every block's first sparse refresh at the phase's start (test_stagger covers the spread).
    base = {"warm_steps": 5, "warm_interval": 1, "sparse_interval": "auto", "auto_min_interval": 4, "stagger": False}
    return CurvatureSchedule(ScheduleConfig(**{**base, **kw}))


def test_auto_interval_grows_shrinks_and_freezes():
    s = _auto(auto_max_interval=16, auto_grow_below=0.1, auto_shrink_above=0.3, auto_freeze_below=0.01,
              auto_freeze_patience=2, auto_growth="doubling")  # fmt: skip
    assert s.refresh_due(5, "b") and s.refresh_due(6, "b")  # every block starts due at the first sparse step
    s.auto.observe("b", 5, None)  # first sparse refresh: nothing to compare with, interval stays
    assert [t for t in range(5, 20) if s.refresh_due(t, "b")] == [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    s.auto.observe("b", 9, 0.05)  # small change: 4 -> 8
    assert not s.refresh_due(16, "b") and s.refresh_due(17, "b")
    s.auto.observe("b", 17, 0.05)  # 8 -> 16
    s.auto.observe("b", 33, 0.05)  # capped at 16
    assert s.auto.blocks["b"].interval == 16 and s.auto.blocks["b"].next_due == 49
    s.auto.observe("b", 49, 0.5)  # a large change halves it
    assert s.auto.blocks["b"].interval == 8
    s.auto.observe("b", 57, 0.2)  # in between: unchanged
    assert s.auto.blocks["b"].interval == 8
    s.auto.observe("b", 65, 0.005)
    assert not s.auto.blocks["b"].frozen  # one low change is not enough (patience 2)
    s.auto.observe("b", 81, 0.001)
    assert s.auto.blocks["b"].frozen and not any(s.refresh_due(t, "b") for t in range(81, 10_000))
    assert s.auto.summary()["b"] == {"interval": 16, "frozen": True, "sparse_refreshes": 8, "last_change": 0.001}
    # Other blocks are unaffected, and the warm phase is unchanged.
    assert s.refresh_due(81, "other") and all(s.refresh_due(t, "b") for t in range(5))
    # Statistics keep a fixed grid (every rank agrees on it) whatever the blocks do.
    assert [t for t in range(5, 40) if s.stats_due(t)] == [5, 15, 25, 35]


def test_auto_interval_grows_through_noise_level_changes_and_holds_on_a_jump():
    """A change at the block's usual (noise) level grows the interval; one that stands out does not."""
    kw = {"auto_max_interval": 64, "auto_grow_below": 0.1, "auto_shrink_above": 0.6, "auto_freeze_below": 0.0,
          "auto_growth": "doubling"}
    s, plain = _auto(**kw, auto_surprise=2.0), _auto(**kw, auto_surprise=None)
    for sched in (s, plain):
        sched.auto.observe("b", 5, None)
        for t, change in zip((9, 13, 17), (0.4, 0.3, 0.5), strict=True):
            sched.auto.observe("b", t, change)
    # The first measured change has no usual level to compare with: above grow_below, it holds (4).
    # The next two are within 2x the median of those before them: 4 -> 8 -> 16. Without auto_surprise
    # every one of them sits between the thresholds and the interval never grows.
    assert s.auto.blocks["b"].interval == 16 and plain.auto.blocks["b"].interval == 4
    s.auto.observe("b", 33, 0.9)  # > 2 x median(0.4, 0.3, 0.5) = 0.8 and above shrink_above: halve
    assert s.auto.blocks["b"].interval == 8
    s.auto.observe("b", 41, 0.55)  # median(0.3, 0.4, 0.5, 0.9) = 0.45: within 2x, grow again
    assert s.auto.blocks["b"].interval == 16
    s.auto.observe("b", 57, 0.5)  # still usual
    assert s.auto.blocks["b"].interval == 32
    s.auto.observe("b", 89, 1.2)  # stands out (median 0.5) and above shrink_above
    s.auto.observe("b", 105, 0.58)  # median of (0.4 .. 1.2) is 0.5: 0.58 is usual, grow 16 -> 32
    assert s.auto.blocks["b"].interval == 32
    # A change that stands out but stays under shrink_above holds the interval.
    h = _auto(**kw, auto_surprise=1.5)
    h.auto.observe("h", 5, None)
    for t, change in zip((9, 13, 21), (0.2, 0.2, 0.2), strict=True):
        h.auto.observe("h", t, change)
    before = h.auto.blocks["h"].interval
    h.auto.observe("h", 50, 0.5)
    assert before == 16 and h.auto.blocks["h"].interval == 16


def test_auto_interval_grows_linearly_by_default_and_keeps_later_refreshes_spread():
    """Default growth adds the minimum interval per refresh; doubling leaves ever longer gaps."""
    assert ScheduleConfig().auto_growth == "linear"
    kw = {"auto_max_interval": 1000, "auto_grow_below": 0.1, "auto_shrink_above": 0.6, "auto_freeze_below": 0.0}

    def refresh_steps(growth: str, horizon: int, change: float = 0.3) -> list[int]:
        sched = _auto(**kw, auto_growth=growth)
        steps = []
        for t in range(horizon):
            if sched.refresh_due(t, "b") and not sched.in_warm_phase(t):
                steps.append(t)
                sched.auto.observe("b", t, None if len(steps) == 1 else change)
        return steps

    linear, doubling = refresh_steps("linear", 400), refresh_steps("doubling", 400)
    # Changes at the block's usual level: the first measured one holds (no usual level yet), then
    # linear adds 4 per refresh (4, 4, 8, 12, 16, ...) while doubling goes 4, 4, 8, 16, 32, ...
    assert [b - a for a, b in pairwise(linear)][:6] == [4, 4, 8, 12, 16, 20]
    assert [b - a for a, b in pairwise(doubling)][:6] == [4, 4, 8, 16, 32, 64]
    # Over 400 steps the interval reaches about sqrt(2 * 4 * 400) = 57 steps, against 256 for doubling:
    # the linear rule keeps refreshing through the end of the run.
    assert max(b - a for a, b in pairwise(linear)) <= 60 and linear[-1] > 340
    assert doubling[-1] < 300 and len(doubling) < len(linear) < 400 // 4
    # A jump still halves the interval, and the cap holds.
    s = _auto(**{**kw, "auto_max_interval": 10})
    s.auto.observe("b", 5, None)
    for t, change in zip((9, 13, 21, 31, 41), (0.3, 0.3, 0.3, 0.3, 0.3), strict=True):
        s.auto.observe("b", t, change)
    assert s.auto.blocks["b"].interval == 10
    s.auto.observe("b", 51, 0.9)
    assert s.auto.blocks["b"].interval == 5


def test_auto_config_validation():
    with pytest.raises(ConfigError, match="sparse_interval"):
        PreconditionerConfigFromDict({"schedule": {"sparse_interval": "often"}})
    with pytest.raises(ConfigError, match="auto_max_interval"):
        PreconditionerConfigFromDict({"schedule": {"auto_min_interval": 50, "auto_max_interval": 10}})
    with pytest.raises(ConfigError, match="auto_freeze_below"):
        PreconditionerConfigFromDict({"schedule": {"auto_freeze_below": 0.5, "auto_grow_below": 0.1}})
    with pytest.raises(ConfigError, match="psgd"):
        PreconditionerConfigFromDict({"method": "psgd", "schedule": {"sparse_interval": "auto"}})
    with pytest.raises(ConfigError, match="auto_surprise"):
        PreconditionerConfigFromDict({"schedule": {"auto_surprise": 0.5}})
    with pytest.raises(ConfigError, match=r"auto_growth.*linear.*doubling"):
        PreconditionerConfigFromDict({"schedule": {"auto_growth": "exponential"}})
    with pytest.raises(ConfigError, match="multiple of"):
        PreconditionerConfigFromDict({"schedule": {"sparse_interval": "auto", "auto_min_interval": 5}})
    with pytest.raises(ConfigError, match="warm_min_refreshes"):
        PreconditionerConfigFromDict({"schedule": {"warm_min_refreshes": -1}})


def PreconditionerConfigFromDict(d):  # noqa: N802 - reads as the constructor it wraps
    from ds_soo.config import PreconditionerConfig

    return PreconditionerConfig.from_dict(d)


def test_auto_change_is_relative_change_of_the_preconditioned_gradient():
    """The measured change against a float64 dense reference: (A+r I)^-1 (x) (G+r I)^-1 applied to vec(g)."""
    from ds_soo.curvature.kfac import KFACBlock

    torch.manual_seed(0)
    n_in, n_out, rho = 4, 3, 0.1
    block = KFACBlock(n_in, n_out, ema_decay=0.0, pi_correction=False)

    def spd(n):
        x = torch.randn(n, 2 * n, dtype=torch.float64)
        return x @ x.T / (2 * n)

    a0, g0, a1, g1 = spd(n_in), spd(n_out), spd(n_in), spd(n_out)
    block.update_factors(a0.float(), g0.float())
    assert block.refresh(rho)
    grad = torch.randn(n_out, n_in)
    s = _auto()
    step = 7
    before = s.probe_before_refresh(step, block, grad)
    block.update_factors(a1.float(), g1.float())
    assert block.refresh(rho)
    seen = []
    s.auto.observe = lambda bid, t, change: seen.append((bid, t, change))
    s.after_refresh("layer", step, block, grad, before)

    def dense_apply(a, g):
        r = rho**0.5
        p = torch.kron(torch.linalg.inv(g + r * torch.eye(n_out, dtype=torch.float64)),
                       torch.linalg.inv(a + r * torch.eye(n_in, dtype=torch.float64)))  # fmt: skip
        return (p @ grad.double().reshape(-1)).reshape(n_out, n_in)  # row-major vec: G^-1 X A^-1

    old, new = dense_apply(a0, g0), dense_apply(a1, g1)
    expect = float((new - old).norm() / old.norm())
    assert seen[0][:2] == ("layer", step) and seen[0][2] == pytest.approx(expect, rel=1e-4)
    # In the warm phase, or without auto, nothing is probed.
    assert s.probe_before_refresh(2, block, grad) is None
    assert _sched(warm_steps=5).probe_before_refresh(7, block, grad) is None


def _train_kfac(schedule: dict, steps: int, stationary: bool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = Preconditioner(model, {"damping": {"value": 0.01}, "kfac": {"kl_clip": None}, "schedule": schedule})
    x0, y0 = torch.randn(64, 6), torch.randn(64, 3)
    for t in range(steps):
        model.zero_grad()
        scale = 1.0 if stationary else math.exp(t / 60)  # a growing input scale keeps curvature drifting
        x, y = (x0, y0) if stationary else (torch.randn(64, 6) * scale, torch.randn(64, 3))
        nn.functional.mse_loss(model(x), y).backward()
        assert pre.step(), f"step {t} not preconditioned"
    return pre


@pytest.mark.parametrize("growth", ["linear", "doubling"])
def test_auto_freezes_still_curvature_and_keeps_refreshing_moving_curvature(growth):
    sched = {"warm_steps": 20, "warm_interval": 2, "sparse_interval": "auto", "auto_min_interval": 5,
             "stats_sparse_interval": 5, "stagger": False, "auto_growth": growth}  # fmt: skip
    still = _train_kfac(sched, 300, stationary=True)
    summary = still.schedule.auto.summary()
    assert set(summary) == {"0", "2"}
    assert all(b["frozen"] for b in summary.values()), summary
    fixed = _train_kfac({**sched, "sparse_interval": 5}, 300, stationary=True)
    # Per-block refresh counts: fewer with auto than with the fixed interval it starts from.
    for bid in ("0", "2"):
        assert still.block_refreshes[bid] < fixed.block_refreshes[bid] // 3
        assert still.block_preconditioned[bid] == 300  # frozen blocks keep preconditioning
    moving = _train_kfac(sched, 300, stationary=False)
    msum = moving.schedule.auto.summary()
    assert not any(b["frozen"] for b in msum.values()), msum
    assert all(moving.block_refreshes[b] > still.block_refreshes[b] for b in ("0", "2"))
