"""Adaptive (Levenberg-Marquardt) and factor-relative damping, against hand-worked and dense references.

The rule is checked on a one-dimensional quadratic worked by hand. In a float64 training run the
reduction ratio each feedback reports is rebuilt from first principles: the gradient by ``torch.func``
at the weights before the step, the step as the weights' change (momentum and weight decay included),
the curvature as the dense Kronecker product of the layer's factors, and the loss change from a
fresh forward. The adapted damping must then reach the inverses that the next refresh computes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad

from ds_soo import Preconditioner
from ds_soo.checkpoint import load, save
from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.curvature.levenberg_marquardt import LevenbergMarquardt, model_change, reduction_ratio
from ds_soo.curvature.shampoo import ShampooBlock
from ds_soo.optim import SecondOrderOptimizer


# ------------------------------------------------------------------ the rule, by hand
def test_rule_on_a_hand_worked_quadratic():
    """f(x) = 1/2 h x^2 with h = 2 at x = 1 (g = 2); the model's curvature is c = 1, half the truth."""
    h, c, x0 = 2.0, 1.0, 1.0
    f = lambda x: 0.5 * h * x * x  # noqa: E731
    g = h * x0
    rule = LevenbergMarquardt(value=0.5, interval=2, decay=0.9, min_value=0.1, max_value=1.0)
    omega = 0.9**2
    # delta = -0.5: observed f(0.5) - f(1) = -0.75; model -1 + 1/2 (0.25 + 0.5 * 0.25) = -0.8125.
    delta = -0.5
    predicted = model_change(g * delta, c * delta * delta, delta * delta, rule.value)
    assert predicted == pytest.approx(-0.8125, abs=1e-15)
    ratio = reduction_ratio(f(x0 + delta) - f(x0), predicted)
    assert ratio == pytest.approx(0.75 / 0.8125, abs=1e-15)  # 0.923 > 3/4: trust the model more
    assert rule.update(ratio) == pytest.approx(0.5 * omega, abs=1e-15)
    # delta = -1.5: observed f(-0.5) - f(1) = -0.75; model -3 + 1/2 (2.25 + 0.405 * 2.25) = -1.419375.
    lam = rule.value
    predicted = model_change(g * -1.5, c * 2.25, 2.25, lam)
    assert predicted == pytest.approx(-3 + 0.5 * (2.25 + lam * 2.25), abs=1e-15)
    ratio = reduction_ratio(f(-0.5) - f(x0), predicted)
    assert 0.25 < ratio < 0.75  # 0.528: keep the damping
    assert rule.update(ratio) == lam
    # delta = -2: observed f(-1) - f(1) = 0 (no progress): ratio 0, raise the damping.
    ratio = reduction_ratio(f(-1.0) - f(x0), model_change(g * -2.0, c * 4.0, 4.0, lam))
    assert ratio == 0.0
    assert rule.update(ratio) == pytest.approx(lam / omega, abs=1e-15)
    # Bounds: repeated failures stop at max_value, repeated successes at min_value.
    for _ in range(20):
        rule.update(-1.0)
    assert rule.value == 1.0
    for _ in range(40):
        rule.update(1.0)
    assert rule.value == 0.1
    # A model that predicts an increase (a momentum step past its minimum): the sign decides.
    assert reduction_ratio(-0.1, 0.2) == math.inf
    assert reduction_ratio(0.1, 0.2) == -math.inf
    # No step, or a non-finite loss, decides nothing.
    assert reduction_ratio(-0.1, 0.0) is None
    assert reduction_ratio(float("nan"), -1.0) is None
    before = rule.adaptations
    assert rule.update(None) == 0.1 and rule.adaptations == before


# ------------------------------------------------------------------ float64 training against dense references
def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g)


def _cfg(**damping) -> dict:
    return {
        "method": "kfac",
        "kfac": {"kl_clip": None},
        "schedule": {"warm_interval": 2, "warm_steps": 1000},
        "damping": {"kind": "adaptive", "value": 1e-2, "adapt_interval": 1, "adapt_decay": 0.5, **damping},
    }


def _dense_terms(model, pre, params_before, x, y, loss_after) -> tuple[float, float]:
    """The observed and predicted loss changes from first principles: torch.func gradient at the weights
    before the step, the weights' change, a dense Kronecker curvature."""
    names = [n for n, _ in model.named_parameters()]
    loss_fn = lambda p: nn.functional.cross_entropy(functional_call(model, p, (x,)), y)  # noqa: E731
    g = grad(loss_fn)(params_before)
    loss_before = float(loss_fn(params_before))
    now = {n: p.detach() for n, p in model.named_parameters()}
    delta = {n: now[n] - params_before[n] for n in names}
    g_dot = sum(float((g[n] * delta[n]).sum()) for n in names)
    d_sq = sum(float(delta[n].square().sum()) for n in names)
    curv = 0.0
    for layer in ("0", "2"):
        state = pre.states[layer]
        mat = torch.cat([delta[f"{layer}.weight"], delta[f"{layer}.bias"][:, None]], dim=1)  # [dW | db]
        vec = mat.T.reshape(-1)  # column-stacking vec: vec(G D A) = (A (x) G) vec(D)
        curv += float(vec @ torch.kron(state.a, state.g) @ vec)
    predicted = g_dot + 0.5 * (curv + pre.last_damping * d_sq)
    return loss_after - loss_before, predicted


def test_ratio_matches_dense_reference_and_damping_reaches_the_inverses():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2)
    pre = Preconditioner(model, _cfg(), optimizer=base)
    lam, ratios, moved, signs = 1e-2, [], 0, set()
    for step in range(8):
        x, y = _data(step)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if step % 2 == 0 and step > 0:
            # A refresh step: the inverses must be computed with the damping the rule left (pi-split).
            assert pre.damping() == lam
        pre.step()
        if step % 2 == 0:
            for layer in ("0", "2"):
                s = pre.states[layer]
                ma, mg = float(torch.trace(s.a)) / s.a.shape[0], float(torch.trace(s.g)) / s.g.shape[0]
                pi = math.sqrt(ma / mg)
                eye = lambda n: torch.eye(n, dtype=torch.float64)  # noqa: E731
                want_a = torch.linalg.inv(s.a + pi * math.sqrt(lam) * eye(s.a.shape[0]))
                want_g = torch.linalg.inv(s.g + math.sqrt(lam) / pi * eye(s.g.shape[0]))
                torch.testing.assert_close(s.a_inv, want_a, rtol=1e-10, atol=0)
                torch.testing.assert_close(s.g_inv, want_g, rtol=1e-10, atol=0)
        base.step()
        base.zero_grad()
        assert pre.wants_damping_feedback
        with torch.no_grad(), pre.paused_capture():
            after = float(nn.functional.cross_entropy(model(x), y))
        ratio = pre.damping_feedback(loss.detach(), after)
        observed, predicted = _dense_terms(model, pre, before, x, y, after)
        terms = pre.adaptive.last_terms
        assert terms["observed"] == pytest.approx(observed, rel=1e-12, abs=0)
        assert terms["predicted"] == pytest.approx(predicted, rel=1e-10, abs=0)
        assert ratio == reduction_ratio(terms["observed"], terms["predicted"])
        signs.add(predicted < 0)
        ratios.append(ratio)
        new = lam * 0.5 if ratio > 0.75 else lam / 0.5 if ratio < 0.25 else lam
        assert pre.adaptive.rule.value == pytest.approx(new, rel=1e-15)
        moved += new != lam
        lam = new
        assert not pre.wants_damping_feedback
    assert moved >= 2, f"the damping never moved (ratios {ratios}): this run tests nothing"
    assert signs == {True, False}, f"ratios {ratios}: both a predicted decrease and increase should occur"
    assert pre.counters["preconditioned_steps"] == 8
    assert pre.metrics()["damping_ratio"] == ratios[-1]


def test_missing_feedback_is_refused_and_loses_nothing():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = Preconditioner(model, _cfg(), optimizer=base)
    x, y = _data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    base.step()
    base.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    steps = pre.counters["optimizer_steps"]
    with pytest.raises(ConfigError, match="damping_feedback"):
        pre.step()
    assert pre.counters["optimizer_steps"] == steps
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n


def test_paused_capture_feeds_no_statistics():
    model = _model()
    pre = Preconditioner(model, _cfg(), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    x, _ = _data(0)
    with pre.paused_capture():
        model(x).sum().backward()
    assert not pre._acc and not pre._fwd_ran


def test_closure_adapts_and_equals_the_manual_loop():
    def run(use_closure: bool):
        model = _model()
        base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        pre = Preconditioner(model, _cfg(adapt_interval=2), optimizer=base)
        opt = SecondOrderOptimizer(base, pre)
        trail = []
        for step in range(8):
            x, y = _data(step)

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                return loss

            if use_closure:
                opt.step(closure)
            else:
                loss = closure()
                opt.step()
                if pre.wants_damping_feedback:
                    with torch.no_grad(), pre.paused_capture():
                        after = nn.functional.cross_entropy(model(x), y)
                    pre.damping_feedback(loss.detach(), after)
            trail.append(pre.adaptive.rule.value)
        return {n: p.detach().clone() for n, p in model.named_parameters()}, trail, pre

    w1, t1, pre = run(True)
    w2, t2, _ = run(False)
    assert t1 == t2
    assert pre.adaptive.rule.adaptations == 4
    for n in w1:
        torch.testing.assert_close(w1[n], w2[n], rtol=1e-12, atol=0)


def test_resume_is_bitwise(tmp_path):
    def fresh():
        model = _model()
        base = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
        pre = Preconditioner(model, _cfg(adapt_interval=2), optimizer=base)
        return model, base, pre

    def train(model, base, pre, steps):
        for step in steps:
            x, y = _data(step)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            pre.step()
            base.step()
            base.zero_grad()
            if pre.wants_damping_feedback:
                with torch.no_grad(), pre.paused_capture():
                    pre.damping_feedback(loss.detach(), nn.functional.cross_entropy(model(x), y))

    straight = fresh()
    train(*straight, range(10))
    first = fresh()
    train(*first, range(5))
    save(first[2], tmp_path / "pre")
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict()}, tmp_path / "rest.pt")
    second = fresh()
    rest = torch.load(tmp_path / "rest.pt")
    second[0].load_state_dict(rest["model"])
    second[1].load_state_dict(rest["opt"])
    load(second[2], tmp_path / "pre")
    assert second[2].adaptive.rule.value == first[2].adaptive.rule.value
    train(*second, range(5, 10))
    assert second[2].adaptive.rule.value == straight[2].adaptive.rule.value
    assert second[2].adaptive.rule.adaptations == straight[2].adaptive.rule.adaptations == 5
    for (n, a), (_, b) in zip(straight[0].named_parameters(), second[0].named_parameters(), strict=True):
        assert torch.equal(a, b), n


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"method": "shampoo", "damping": {"kind": "adaptive"}}, "damping.kind='adaptive'.*kfac"),
        ({"damping": {"kind": "adaptive", "adapt_decay": 1.5}}, "damping.adapt_decay"),
        ({"damping": {"kind": "adaptive", "adapt_low": 0.9, "adapt_high": 0.5}}, "adapt_low"),
        ({"damping": {"kind": "adaptive", "value": 1e3}}, r"damping.value .* \[min_value, max_value\]"),
        ({"damping": {"kind": "adaptive", "adapt_interval": 0}}, "damping.adapt_interval"),
        ({"method": "psgd", "damping": {"relative": True}}, "damping.relative"),
        ({"damping": {"kind": "levenberg"}}, "damping.kind"),
    ],
)
def test_bad_damping_config_names_the_field(cfg, match):
    with pytest.raises(ConfigError, match=match):
        PreconditionerConfig.from_dict(cfg)


def test_feedback_without_adaptive_damping_is_refused():
    model = _model()
    pre = Preconditioner(model, {"kfac": {"kl_clip": None}})
    with pytest.raises(ConfigError, match="adaptive"):
        pre.damping_feedback(1.0, 0.5)


def test_describe_states_the_rule():
    model = _model()
    pre = Preconditioner(model, _cfg(relative=True), optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    text = pre.describe()
    assert "adaptive (Levenberg-Marquardt) from 0.01" in text and "relative" in text


# ------------------------------------------------------------------ factor-relative damping
def test_relative_kfac_damping_is_a_fraction_of_each_mean_eigenvalue():
    model = _model()
    value = 0.04
    cfg = {"method": "kfac", "kfac": {"kl_clip": None}, "damping": {"value": value, "relative": True}}
    pre = Preconditioner(model, cfg)
    x, y = _data(0)
    nn.functional.cross_entropy(model(x), y).backward()
    pre.step()
    for layer in ("0", "2"):
        s = pre.states[layer]
        for factor, inv in ((s.a, s.a_inv), (s.g, s.g_inv)):
            evals, evecs = torch.linalg.eigh(factor)
            eps = math.sqrt(value) * float(evals.mean())  # mean eigenvalue = trace / dim
            want = evecs @ torch.diag(1.0 / (evals + eps)) @ evecs.T
            torch.testing.assert_close(inv, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("diagonal", [False, True])
def test_relative_shampoo_epsilon_is_a_fraction_of_each_mean_eigenvalue(diagonal):
    torch.manual_seed(1)
    rows, cols = (6, 1) if diagonal else (6, 4)
    block = ShampooBlock(rows, cols, diagonal=diagonal, relative_damping=True, grafting="none")
    for _ in range(3):
        block.update_stats(torch.randn(rows, cols, dtype=torch.float64))
    value = 1e-2
    assert block.refresh(value, dtype=torch.float64)
    if diagonal:
        d = block.left
        want = (d + value * float(d.mean())).pow(-0.5)
        torch.testing.assert_close(block.left_root, want, rtol=1e-12, atol=0)
        return
    for stat, root in ((block.left_matrix(), block.left_root), (block.right_matrix(), block.right_root)):
        evals, evecs = torch.linalg.eigh(stat)
        eps = value * float(evals.mean())
        want = evecs @ torch.diag((evals.clamp_min(0) + eps) ** -0.25) @ evecs.T
        torch.testing.assert_close(root, want, rtol=1e-9, atol=1e-12)
