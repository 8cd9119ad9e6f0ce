"""PSGD-Kron: triangular Q, the preconditioned gradient, and that fitting really fits (float64 checks);
the diagonal Q of order-1 tensors against a float64 reference of its update."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_soo.curvature.psgd import PSGDKronBlock
from ds_soo.preconditioner import Preconditioner

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    # Thousands of tiny-matrix iterations: torch's intra-op thread pool only adds barrier cost here
    # (torch.triu on a 4x4 takes ~20 ms with 2 busy threads, ~1 us with one).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _p(blk: PSGDKronBlock) -> tuple[torch.Tensor, torch.Tensor]:
    ql, qr = blk.ql.double(), blk.qr.double()
    return ql.T @ ql, qr.T @ qr


def criterion(blk: PSGDKronBlock, g: torch.Tensor) -> float:
    """E_v[h^T P h + v^T P^-1 v] with h = g fixed, v ~ N(0, I): g^T P g + tr(P^-1), P = Pl (x) Pr."""
    pl, pr = _p(blk)
    p = torch.kron(pl, pr)
    vec = g.double().reshape(-1)
    return float(vec @ p @ vec + torch.trace(torch.linalg.inv(p)))


def _psd_sqrt_inv(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m.double())
    return v @ torch.diag(w**-0.5) @ v.T


def test_preconditioner_psgd_step_and_triangular_q():
    torch.manual_seed(0)
    model = nn.Linear(5, 6)
    pre = Preconditioner(
        model, {"method": "psgd", "psgd": {"fit_iterations": 2}, "schedule": {"warm_steps": 50, "warm_interval": 1}}
    )
    for _ in range(4):
        model.zero_grad()
        x = torch.randn(16, 5)
        nn.functional.mse_loss(torch.tanh(model(x)), torch.randn(16, 6)).backward()
        raw_w, raw_b = model.weight.grad.clone(), model.bias.grad.clone()
        assert pre.step()
        st = pre.states["weight"]
        assert st.ql.shape == (6, 6) and st.qr.shape == (5, 5)
        for q in (st.ql, st.qr):
            assert torch.equal(q, torch.triu(q)), "Q must stay upper-triangular"
            assert torch.isfinite(q).all()
        # The gradient written back is Ql^T Ql G Qr^T Qr with the Q just fitted this step.
        pl, pr = _p(st)
        ref = pl @ raw_w.double() @ pr
        torch.testing.assert_close(model.weight.grad.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        # The bias (order 1) has a diagonal Q: its gradient becomes q*q*g.
        qb = pre.states["bias"].q.double()
        refb = qb * qb * raw_b.double()
        torch.testing.assert_close(model.bias.grad.double(), refb, rtol=1e-5, atol=1e-6 * refb.abs().max().item())
        assert not torch.allclose(model.weight.grad, raw_w, rtol=1e-2)
    assert pre.counters["preconditioned_steps"] == 4
    assert pre.counters["curvature_refreshes"] == 4 and pre.counters["stats_updates"] == 4
    assert pre.block_refreshes["weight"] == 4


def _kron_optimum(g: torch.Tensor) -> float:
    """The smallest criterion over Kronecker P, by deterministic float64 L-BFGS on triangular factors."""
    gd = g.double().reshape(-1)
    ul = torch.eye(g.shape[0], dtype=F64, requires_grad=True)
    ur = torch.eye(g.shape[1], dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([ul, ur], max_iter=200, line_search_fn="strong_wolfe")

    def crit():
        p = torch.kron(ul.triu().T @ ul.triu(), ur.triu().T @ ur.triu())
        return gd @ p @ gd + torch.trace(torch.linalg.inv(p))

    def closure():
        opt.zero_grad()
        c = crit()
        c.backward()
        return c

    for _ in range(3):
        opt.step(closure)
    return float(crit().detach())


def test_fit_with_fixed_gradient_decreases_criterion():
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(4, 3, generator=gen)
    best = _kron_optimum(g)
    blk = PSGDKronBlock(4, 3, precond_lr=0.1)
    blk._init(g)
    start = criterion(blk, g)
    assert start > 1.2 * best  # the test means something: the initial P is far from optimal
    values = [start]
    for _ in range(6):
        assert blk.fit(g, damping=0.0, iterations=50, generator=gen)
        values.append(criterion(blk, g))
    assert all(v < start for v in values[1:]), values
    # The stochastic fit settles near the Kronecker-constrained optimum (noise from lr = 0.1).
    assert values[-1] < 1.1 * best, (values, best)
    blk.precond_lr = 0.01
    blk.fit(g, damping=0.0, iterations=300, generator=gen)
    assert criterion(blk, g) < 1.03 * best


def test_fit_drives_p_toward_inverse_sqrt_covariance():
    # Gradients from a matrix normal: vec_r(g) has covariance S_l (x) S_r. The whitening fixed point is
    # P = (S_l (x) S_r)^(-1/2), i.e. P_l ~ S_l^(-1/2) and P_r ~ S_r^(-1/2) up to one shared scale.
    gen = torch.Generator().manual_seed(2)
    ml, mr = torch.randn(4, 4, generator=gen, dtype=F64), torch.randn(3, 3, generator=gen, dtype=F64)
    s_l = ml @ ml.T / 4 + torch.eye(4, dtype=F64)  # well conditioned
    s_r = mr @ mr.T / 3 + 0.5 * torch.eye(3, dtype=F64)
    c_l, c_r = torch.linalg.cholesky(s_l), torch.linalg.cholesky(s_r)

    def sample():
        z = torch.randn(4, 3, generator=gen, dtype=F64)
        return (c_l @ z @ c_r.T).float()

    target = _psd_sqrt_inv(torch.kron(s_l, s_r))

    def rel_err(blk):
        pl, pr = _p(blk)
        return float((torch.kron(pl, pr) - target).norm() / target.norm())

    blk = PSGDKronBlock(4, 3, precond_lr=0.1)
    blk._init(sample())
    err0 = rel_err(blk)
    for lr, iters in ((0.1, 1500), (0.02, 1500)):
        blk.precond_lr = lr
        for _ in range(iters):
            assert blk.fit(sample(), damping=0.0, iterations=1, generator=gen)
    err = rel_err(blk)
    assert err < 0.15 and err < 0.5 * err0, (err0, err)
    # Whitening: E[P g g^T P] ~ I, checked with the exact covariance.
    pl, pr = _p(blk)
    p = torch.kron(pl, pr)
    white = p @ torch.kron(s_l, s_r) @ p
    assert float((white - torch.eye(12, dtype=F64)).norm() / 12**0.5) < 0.3


def test_fit_no_nan_on_extreme_or_bad_gradients():
    gen = torch.Generator().manual_seed(3)
    for scale in (1e-12, 1.0, 1e8):
        blk = PSGDKronBlock(5, 2)
        for _ in range(20):
            assert blk.fit(scale * torch.randn(5, 2, generator=gen), 1e-9, generator=gen)
        assert torch.isfinite(blk.ql).all() and torch.isfinite(blk.qr).all()
        out = blk.precondition(scale * torch.randn(5, 2, generator=gen))
        assert torch.isfinite(out).all()
    blk = PSGDKronBlock(2, 2)
    blk.fit(torch.randn(2, 2, generator=gen), 0.0, generator=gen)
    ql = blk.ql.clone()
    assert not blk.fit(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]), 0.0, generator=gen)
    assert torch.equal(blk.ql, ql)
    # A zero gradient leaves Q finite.
    blk = PSGDKronBlock(3, 3)
    assert blk.fit(torch.zeros(3, 3), 0.0, generator=gen)
    assert torch.isfinite(blk.ql).all() and torch.isfinite(blk.qr).all()


def test_inverse_apply_inverts_precondition():
    gen = torch.Generator().manual_seed(4)
    blk = PSGDKronBlock(4, 3)
    for _ in range(10):
        blk.fit(torch.randn(4, 3, generator=gen), 0.0, generator=gen)
    v = torch.randn(4, 3, generator=gen)
    torch.testing.assert_close(blk.inverse_apply(blk.precondition(v), 0.0), v, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- order-1 tensors: diagonal Q


def diag_fit_ref(g: torch.Tensor, damping: float, iterations: int, gen: torch.Generator, lr: float = 0.1,
                 init_scale: float = 1.0) -> torch.Tensor:
    """q after fitting from the first gradient, in float64: with a = q*h and b = v/q,
    q <- q - lr (a^2 - b^2) q / max|a^2 + b^2|; q starts at init_scale^2 * mean(g^2)^(-1/4)."""
    gd = g.double().reshape(-1)
    q = torch.full_like(gd, init_scale**2 * float((gd * gd).mean() + 1e-30) ** -0.25)
    for _ in range(iterations):
        noise = torch.randn(g.shape, generator=gen).double().reshape(-1)
        h = gd + damping**0.5 * gd.abs().mean() * noise
        v = torch.randn(g.shape, generator=gen).double().reshape(-1)
        a2, b2 = (q * h) ** 2, (v / q) ** 2
        q = q - lr / (a2 + b2).max() * (a2 - b2) * q
    return q


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_diagonal_fit_matches_float64_reference(damping):
    g = torch.randn(7, 1, generator=torch.Generator().manual_seed(5))
    blk = PSGDKronBlock(7, 1, precond_lr=0.2, init_scale=0.8, diagonal=True)
    assert blk.fit(g, damping, iterations=6, generator=torch.Generator().manual_seed(9))
    ref = diag_fit_ref(g, damping, 6, torch.Generator().manual_seed(9), lr=0.2, init_scale=0.8)
    assert blk.q.shape == (7,) and blk.ql is None and blk.qr is None
    torch.testing.assert_close(blk.q.double(), ref, rtol=1e-5, atol=0)
    # precondition is q*q*g, and inverse_apply undoes it.
    x = torch.randn(7, 1, generator=torch.Generator().manual_seed(6))
    out = blk.precondition(x)
    torch.testing.assert_close(out.double(), (ref * ref)[:, None] * x.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(blk.inverse_apply(out, 0.0), x, rtol=1e-5, atol=1e-6)


def test_diagonal_fit_drives_p_toward_inverse_rms():
    # Whitening fixed point of a diagonal P: p_i = E[g_i^2]^(-1/2), coordinate by coordinate.
    gen = torch.Generator().manual_seed(8)
    std = torch.tensor([0.1, 0.3, 1.0, 3.0, 10.0])
    blk = PSGDKronBlock(5, 1, diagonal=True)
    for lr, iters in ((0.1, 2000), (0.02, 2000)):
        blk.precond_lr = lr
        for _ in range(iters):
            assert blk.fit(std[:, None] * torch.randn(5, 1, generator=gen), 0.0, generator=gen)
    p = blk.q.double() ** 2
    torch.testing.assert_close(p * std.double(), torch.ones(5, dtype=F64), rtol=0.12, atol=0)


def test_diagonal_fit_keeps_q_on_bad_gradients():
    gen = torch.Generator().manual_seed(10)
    blk = PSGDKronBlock(3, 1, diagonal=True)
    assert blk.fit(torch.randn(3, 1, generator=gen), 0.0, generator=gen)
    q = blk.q.clone()
    assert not blk.fit(torch.tensor([[float("nan")], [1.0], [0.0]]), 0.0, generator=gen)
    assert torch.equal(blk.q, q)
    for scale in (1e-12, 1e8):
        assert blk.fit(scale * torch.randn(3, 1, generator=gen), 1e-9, generator=gen)
        assert torch.isfinite(blk.q).all()


@pytest.mark.parametrize("n", [10, 4096])
def test_order1_tensors_use_diagonal_q_with_linear_memory(n):
    torch.manual_seed(0)
    model = nn.Linear(3, n)
    pre = Preconditioner(model, {"method": "psgd", "schedule": {"warm_steps": 10, "warm_interval": 1}})
    for s in range(2):
        model.zero_grad()
        model(torch.randn(4, 3, generator=torch.Generator().manual_seed(s))).square().mean().backward()
        raw = model.bias.grad.clone()
        assert pre.step()
        q = pre.states["bias"].q
        torch.testing.assert_close(model.bias.grad, q * q * raw, rtol=1e-6, atol=0)
    st = pre.states["bias"]
    assert st.diagonal and st.q.shape == (n,) and st.ql is None and st.qr is None
    # O(n): one vector, no n x n triangular Q.
    assert st.nbytes() == 4 * n
    assert st.root_shapes() == {"q": (n,)}
    # A state-dict round trip keeps it, and a dense Q is refused rather than dropped.
    clone = PSGDKronBlock(n, 1, diagonal=True)
    clone.load_state_dict(st.state_dict())
    assert torch.equal(clone.q, st.q)
    with pytest.raises(ValueError, match="dense"):
        clone.load_state_dict({"ql": torch.eye(n), "qr": torch.ones(1, 1)})
