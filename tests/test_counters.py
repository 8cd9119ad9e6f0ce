"""Counters report what happened: a statistics update is counted only when statistics were captured."""

from __future__ import annotations

import torch
from torch import nn

from ds_soo import Preconditioner


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def test_kfac_step_before_any_forward_counts_no_statistics_update():
    model = _model()
    pre = Preconditioner(model, {"method": "kfac", "kfac": {"kl_clip": None}})
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    raw = [p.grad.clone() for p in model.parameters()]
    assert pre.step() is False
    assert pre.counters["stats_updates"] == 0
    assert pre.counters["optimizer_steps"] == 1
    # Nothing was captured, so there is no inverse and the gradients are left for the base optimizer as they are.
    for p, g in zip(model.parameters(), raw, strict=True):
        assert torch.equal(p.grad, g)


def test_kfac_step_after_a_forward_counts_one_statistics_update():
    model = _model()
    pre = Preconditioner(model, {"method": "kfac", "kfac": {"kl_clip": None}})
    x = torch.randn(8, 5)
    model(x).pow(2).mean().backward()
    assert pre.step() is True
    assert pre.counters["stats_updates"] == 1
    assert pre.counters["preconditioned_steps"] == 1
