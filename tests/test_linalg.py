"""Safe inverses and inverse roots: values against float64 dense references, fp64 retry, never NaN."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import ds_soo.curvature.linalg as linalg
from ds_soo.curvature.linalg import damped_inverse, inverse_root, matrix_power_psd
from ds_soo.preconditioner import Preconditioner


def _spd(n: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank or n + 3, generator=g, dtype=torch.float64)
    return (x @ x.T / x.shape[1]).float()


def _ref_inverse(mat: torch.Tensor, rho: float) -> torch.Tensor:
    m = mat.double()
    return torch.linalg.inv(m + rho * torch.eye(m.shape[0], dtype=torch.float64))


def _ref_root(mat: torch.Tensor, p: int, rho: float) -> torch.Tensor:
    m = mat.double() + rho * torch.eye(mat.shape[0], dtype=torch.float64)
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag(w ** (-1.0 / p)) @ v.T


@pytest.mark.parametrize("rho", [0.0, 1e-3, 0.5])
def test_damped_inverse_matches_dense(rho):
    a = _spd(7, seed=1)
    inv = damped_inverse(a, rho)
    assert inv is not None and inv.dtype == torch.float32
    torch.testing.assert_close(inv.double(), _ref_inverse(a, rho), rtol=1e-4, atol=1e-5)
    # It really is an inverse of the damped matrix.
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(inv.double() @ (a.double() + rho * eye), eye, rtol=0, atol=1e-4)


@pytest.mark.parametrize("p", [2, 4])
def test_inverse_root_matches_dense(p):
    a = _spd(6, seed=2)
    root = inverse_root(a, p, 1e-3)
    assert root is not None and root.dtype == torch.float32
    ref = _ref_root(a, p, 1e-3)
    torch.testing.assert_close(root.double(), ref, rtol=1e-4, atol=1e-5)
    # root^p (mat + rho I) = I
    eye = torch.eye(6, dtype=torch.float64)
    prod = torch.linalg.matrix_power(root.double(), p) @ (a.double() + 1e-3 * eye)
    torch.testing.assert_close(prod, eye, rtol=0, atol=1e-3)


@pytest.mark.parametrize("batch", [3, 6])  # 6 == n: a mis-broadcast eigenvalue axis would not even raise
def test_inverse_root_of_a_stack_matches_each_matrix(batch):
    stack = torch.stack([_spd(6, seed=10 + i) for i in range(batch)])
    roots = inverse_root(stack, 4, 1e-3)
    assert roots is not None and roots.shape == stack.shape
    for i in range(batch):
        torch.testing.assert_close(roots[i].double(), _ref_root(stack[i], 4, 1e-3), rtol=1e-4, atol=1e-5)


def test_inverse_root_rank_deficient_uses_damping():
    # Rank 2 of 5: the null space gets exactly damping^(-1/p).
    a = _spd(5, seed=3, rank=2)
    root = inverse_root(a, 4, 0.1, dtype=torch.float64)
    torch.testing.assert_close(root.double(), _ref_root(a, 4, 0.1), rtol=1e-6, atol=1e-6)


def test_matrix_power_psd_matches_dense():
    a = _spd(5, seed=4)
    ref = _ref_root(a, 2, 0.2)  # (A + 0.2)^(-1/2)
    torch.testing.assert_close(matrix_power_psd(a, -0.5, 0.2), ref, rtol=1e-8, atol=1e-10)


def _fail_on(dtypes, calls):
    def fake(orig):
        def wrapper(mat):
            calls.append(mat.dtype)
            if mat.dtype in dtypes:
                raise torch.linalg.LinAlgError("injected failure")
            return orig(mat)

        return wrapper

    return fake


@pytest.mark.parametrize("fn_name", ["_cholesky", "_eigh"])
def test_fp32_failure_retried_in_fp64(monkeypatch, fn_name):
    a = _spd(6, seed=5)
    calls: list[torch.dtype] = []
    orig = getattr(linalg, fn_name)
    monkeypatch.setattr(linalg, fn_name, _fail_on({torch.float32}, calls)(orig))
    if fn_name == "_cholesky":
        out, ref = damped_inverse(a, 1e-2), _ref_inverse(a, 1e-2)
    else:
        out, ref = inverse_root(a, 4, 1e-2), _ref_root(a, 4, 1e-2)
    assert calls == [torch.float32, torch.float64]
    assert out is not None and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn_name", ["_cholesky", "_eigh"])
def test_permanent_failure_returns_none(monkeypatch, fn_name):
    a = _spd(6, seed=6)
    calls: list[torch.dtype] = []
    orig = getattr(linalg, fn_name)
    monkeypatch.setattr(linalg, fn_name, _fail_on({torch.float32, torch.float64}, calls)(orig))
    out = damped_inverse(a, 1e-2) if fn_name == "_cholesky" else inverse_root(a, 4, 1e-2)
    assert out is None
    assert calls == [torch.float32, torch.float64]


@pytest.mark.parametrize("fn_name", ["_cholesky", "_eigh"])
def test_no_retry_when_disabled(monkeypatch, fn_name):
    a = _spd(4, seed=7)
    calls: list[torch.dtype] = []
    orig = getattr(linalg, fn_name)
    monkeypatch.setattr(linalg, fn_name, _fail_on({torch.float32}, calls)(orig))
    out = (
        damped_inverse(a, 1e-2, retry_float64=False)
        if fn_name == "_cholesky"
        else inverse_root(a, 4, 1e-2, retry_float64=False)
    )
    assert out is None and calls == [torch.float32]


def test_nan_matrix_gives_none_not_nan():
    a = _spd(5, seed=8)
    a[1, 2] = float("nan")
    assert damped_inverse(a, 1e-3) is None
    assert inverse_root(a, 4, 1e-3) is None
    b = _spd(5, seed=8)
    b[0, 0] = float("inf")
    assert damped_inverse(b, 1e-3) is None
    assert inverse_root(b, 2, 1e-3) is None


def test_indefinite_matrix_without_damping_gives_none():
    # Cholesky of a clearly indefinite matrix fails in both precisions.
    a = torch.diag(torch.tensor([1.0, -1.0, 2.0]))
    assert damped_inverse(a, 0.0) is None
    # inverse_root clamps negatives to zero; with zero damping the root does not exist.
    assert inverse_root(a, 4, 0.0) is None


# ----------------------------------------------------------------------------- through the Preconditioner


def _kfac_ref_update(x: torch.Tensor, dout: torch.Tensor, grad_mat: torch.Tensor, rho: float) -> torch.Tensor:
    """(G + sqrt(rho) I)^-1 grad (A + sqrt(rho) I)^-1 via a dense float64 Kronecker solve (no pi)."""
    x, dout = x.double(), dout.double()
    h = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
    n = x.shape[0]
    a = h.T @ h / n
    g = (n * dout).T @ (n * dout) / n
    r = rho**0.5
    c = torch.kron(
        g + r * torch.eye(g.shape[0], dtype=torch.float64), a + r * torch.eye(a.shape[0], dtype=torch.float64)
    )
    return torch.linalg.solve(c, grad_mat.double().reshape(-1)).view_as(grad_mat)


def _forward_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.retain_grad()
    loss = nn.functional.mse_loss(out, y)
    loss.backward()
    return out.grad.detach().clone()


def test_preconditioner_keeps_previous_inverse_on_failure(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    rho = 0.05
    cfg = {
        "method": "kfac",
        "kfac": {"ema_decay": 0.5, "pi_damping": False, "kl_clip": None},
        "damping": {"value": rho},
        "schedule": {"warm_steps": 100, "warm_interval": 1},
    }
    pre = Preconditioner(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x1, y1 = torch.randn(16, 5), torch.randn(16, 3)
    d1 = _forward_backward(model, x1, y1)
    pre.step()
    assert pre.counters["curvature_refreshes"] == 1 and pre.counters["inverse_failures"] == 0
    state = pre.states[""]
    old = copy.deepcopy((state.a_inv, state.g_inv))
    opt.step()

    calls: list[torch.dtype] = []
    monkeypatch.setattr(linalg, "_cholesky", _fail_on({torch.float32, torch.float64}, calls)(linalg._cholesky))
    x2, y2 = torch.randn(16, 5), torch.randn(16, 3)
    _forward_backward(model, x2, y2)
    raw = torch.cat([model.weight.grad, model.bias.grad[:, None]], dim=1).clone()
    pre.step()
    assert calls, "the refresh was not attempted"
    assert pre.counters["inverse_failures"] == 1
    assert pre.counters["curvature_refreshes"] == 1
    assert pre.counters["preconditioned_steps"] == 2
    # Inverses untouched, factors still updated (EMA of both steps).
    assert torch.equal(state.a_inv, old[0]) and torch.equal(state.g_inv, old[1])
    # The gradient is preconditioned with the OLD (step-1) factors.
    ref = _kfac_ref_update(x1, d1, raw, rho)
    new = torch.cat([model.weight.grad, model.bias.grad[:, None]], dim=1)
    torch.testing.assert_close(new.double(), ref, rtol=1e-5, atol=1e-6)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
