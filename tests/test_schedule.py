"""Curvature schedule (warm phase, k1/k2, frozen, stats intervals, stagger) and damping rules."""

from __future__ import annotations

import logging

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
    s = _sched(warm_fraction=0.003, total_steps=10_000)
    assert s.warm_steps == 30
    assert s.in_warm_phase(29) and not s.in_warm_phase(30)
    assert _sched(warm_fraction=0.003, total_steps=10_001).warm_steps == 31  # ceil
    assert _sched(warm_fraction=1e-6, total_steps=100).warm_steps == 1  # never zero for a positive fraction


def test_warm_phase_by_steps_and_epochs_and_precedence():
    assert _sched(warm_steps=7).warm_steps == 7
    assert _sched(warm_fraction=None, warm_epochs=0.5, steps_per_epoch=101).warm_steps == 51
    # warm_steps wins over epochs, epochs over the (default) fraction.
    assert _sched(warm_steps=3, warm_epochs=2, steps_per_epoch=10, total_steps=10_000).warm_steps == 3
    assert _sched(warm_epochs=2, steps_per_epoch=10, total_steps=10_000).warm_steps == 20
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
    s = _sched(warm_steps=25, warm_interval=10, sparse_interval=100)
    assert _due(s, 400) == [0, 10, 20, 25, 125, 225, 325]
    # Without separate stats intervals, stats follow the refreshes after the warm phase.
    stats = [t for t in range(400) if s.stats_due(t)]
    assert stats == list(range(25)) + [25, 125, 225, 325]


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
    # Statistics must then be gathered every step (some block refreshes at any step).
    assert all(s.stats_due(t) for t in range(warm + 3 * k2))
    # Without stagger every block refreshes together.
    plain = _sched(warm_steps=warm, warm_interval=k1, sparse_interval=k2)
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
    pre = Preconditioner(model, cfg)
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
    cfg = {"damping": {"value": 0.01}, "schedule": {"warm_steps": 4, "warm_interval": 2, "sparse_interval": 3}}
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
