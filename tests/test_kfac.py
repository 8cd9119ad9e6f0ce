"""K-FAC: one real Preconditioner step equals a dense float64 Kronecker-product solve.

The references below build A, G and the gradient matrix from the definitions (explicit patch loop for
Conv2d, no ``unfold``), form ``kron(G + rho_G I, A + rho_A I)`` in float64 and solve against the raw
gradient. Convention (``Preconditioner._reduced_factors``): with n rows (batch x positions),
``A = (1/n) sum h h^T`` and ``G = (1/n) sum (n d)(n d)^T = n sum d d^T``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ds_soo.curvature.kfac import KFACBlock, split_damping
from ds_soo.preconditioner import Preconditioner

F64 = torch.float64


# ----------------------------------------------------------------------------- independent references


def conv2d_patches(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """Rows of flattened (C, kh, kw) receptive fields, one per (batch, out position), by explicit loops."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    padded = torch.zeros(b, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    padded[:, :, ph : ph + h, pw : pw + w] = x
    oh = (h + 2 * ph - kh) // sh + 1
    ow = (w + 2 * pw - kw) // sw + 1
    rows = []
    for bi in range(b):
        for i in range(oh):
            for j in range(ow):
                rows.append(padded[bi, :, i * sh : i * sh + kh, j * sw : j * sw + kw].reshape(-1))
    return torch.stack(rows)


def conv2d_out_rows(d: torch.Tensor) -> torch.Tensor:
    """d of shape (B, out, oh, ow) -> rows (B*oh*ow, out) in the same (batch, i, j) order as the patches."""
    b, o, oh, ow = d.shape
    rows = []
    for bi in range(b):
        for i in range(oh):
            for j in range(ow):
                rows.append(d[bi, :, i, j])
    return torch.stack(rows)


def layer_rows(layer: nn.Module, x: torch.Tensor, dout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h rows with a ones column if the layer has a bias, d rows) in float64."""
    x, dout = x.double(), dout.double()
    if isinstance(layer, nn.Conv2d):
        h, d = conv2d_patches(x, layer), conv2d_out_rows(dout)
    else:
        h, d = x.reshape(-1, x.shape[-1]), dout.reshape(-1, dout.shape[-1])
    if layer.bias is not None:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=F64)], dim=1)
    return h, d


def ref_factors(layer, x, dout) -> tuple[torch.Tensor, torch.Tensor]:
    h, d = layer_rows(layer, x, dout)
    n = h.shape[0]
    a = sum(torch.outer(r, r) for r in h) / n
    g = sum(torch.outer(n * r, n * r) for r in d) / n
    return a, g


def grad_matrix(layer: nn.Module) -> torch.Tensor:
    """[dW | db] of shape (out, in [+1]) from the layer's .grad."""
    if isinstance(layer, Conv1D):
        w = layer.weight.grad.T  # Conv1D stores (in, out)
    else:
        w = layer.weight.grad.reshape(layer.weight.shape[0], -1)
    if layer.bias is not None:
        return torch.cat([w, layer.bias.grad[:, None]], dim=1).detach().clone()
    return w.detach().clone()


def ref_split(a: torch.Tensor, g: torch.Tensor, rho: float, pi_on: bool) -> tuple[float, float]:
    if not pi_on:
        return math.sqrt(rho), math.sqrt(rho)
    pi = math.sqrt((torch.trace(a).item() / a.shape[0]) / (torch.trace(g).item() / g.shape[0]))
    return pi * math.sqrt(rho), math.sqrt(rho) / pi


def dense_kfac_solve(a, g, grad, rho, pi_on) -> torch.Tensor:
    rho_a, rho_g = ref_split(a, g, rho, pi_on)
    c = torch.kron(g + rho_g * torch.eye(g.shape[0], dtype=F64), a + rho_a * torch.eye(a.shape[0], dtype=F64))
    return torch.linalg.solve(c, grad.double().reshape(-1)).view(grad.shape)


# ----------------------------------------------------------------------------- the real step


def _layers():
    return {
        "linear_bias": (lambda: nn.Linear(5, 4), lambda: torch.randn(12, 5)),
        "linear_nobias": (lambda: nn.Linear(5, 4, bias=False), lambda: torch.randn(12, 5)),
        "linear_seq": (lambda: nn.Linear(3, 4), lambda: torch.randn(3, 5, 3)),
        "conv2d": (lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=1), lambda: torch.randn(3, 2, 5, 6)),
        "conv2d_nobias": (lambda: nn.Conv2d(2, 3, 2, stride=1, padding=0, bias=False), lambda: torch.randn(2, 2, 4, 4)),
        "conv1d": (lambda: Conv1D(4, 5), lambda: torch.randn(3, 4, 5)),
    }


def run_one_step(kind: str, rho: float, pi_on: bool, seed: int = 0, extra_cfg: dict | None = None):
    torch.manual_seed(seed)
    make_layer, make_x = _layers()[kind]
    layer = make_layer()
    model = nn.Sequential(layer, nn.Tanh())
    cfg = {
        "method": "kfac",
        "kfac": {"ema_decay": 0.9, "pi_damping": pi_on},
        "damping": {"value": rho},
        "schedule": {"warm_steps": 10, "warm_interval": 1},
    }
    cfg.update(extra_cfg or {})
    pre = Preconditioner(model, cfg)
    x = make_x()
    out = layer(x)
    out.retain_grad()
    y = torch.randn_like(out)
    loss = ((torch.tanh(out) - y) ** 2).mean()
    loss.backward()
    raw = grad_matrix(layer)
    changed = pre.step()
    return pre, layer, x, out.grad.detach().clone(), raw, changed


@pytest.mark.parametrize("kind", list(_layers()))
@pytest.mark.parametrize("pi_on", [True, False])
def test_kfac_step_equals_dense_kronecker_solve(kind, pi_on):
    rho = 0.03
    pre, layer, x, dout, raw, changed = run_one_step(kind, rho, pi_on)
    assert changed
    assert pre.counters["preconditioned_steps"] == 1 and pre.counters["curvature_refreshes"] == 1
    a, g = ref_factors(layer, x, dout)
    ref = dense_kfac_solve(a, g, raw, rho, pi_on)
    new = grad_matrix(layer)
    assert not torch.allclose(new, raw, rtol=1e-3, atol=0), "gradient was not preconditioned"
    scale = ref.abs().max().item()
    torch.testing.assert_close(new.double(), ref, rtol=1e-5, atol=1e-6 * scale)


def test_pi_damping_changes_the_result():
    # Guard against a reference that ignores pi: the two settings must differ on the same data.
    _, layer_on, *_ = run_one_step("linear_bias", 0.1, True)
    _, layer_off, *_ = run_one_step("linear_bias", 0.1, False)
    assert not torch.allclose(grad_matrix(layer_on), grad_matrix(layer_off), rtol=1e-3, atol=0)


def test_second_step_uses_ema_of_factors():
    torch.manual_seed(3)
    layer = nn.Linear(4, 3)
    decay, rho = 0.7, 0.05
    pre = Preconditioner(
        layer,
        {"kfac": {"ema_decay": decay, "pi_damping": True}, "damping": {"value": rho}, "schedule": {"warm_steps": 5}},
    )
    refs = []
    for _ in range(2):
        layer.zero_grad()
        x = torch.randn(10, 4)
        out = layer(x)
        out.retain_grad()
        (out.sin().sum() / 10).backward()
        refs.append(ref_factors(layer, x, out.grad))
        raw = grad_matrix(layer)
        pre.step()
    a = decay * refs[0][0] + (1 - decay) * refs[1][0]
    g = decay * refs[0][1] + (1 - decay) * refs[1][1]
    st = pre.states[""]
    torch.testing.assert_close(st.a.double(), a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(st.g.double(), g, rtol=1e-5, atol=1e-7)
    # warm_interval defaults to 10: step 1 is not a refresh, so the step-0 inverses are used.
    assert pre.counters["curvature_refreshes"] == 1
    ref = dense_kfac_solve(refs[0][0], refs[0][1], raw, rho, True)
    torch.testing.assert_close(grad_matrix(layer).double(), ref, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- block-level unit checks


def test_split_damping_definition():
    a = torch.diag(torch.tensor([4.0, 2.0, 3.0]))  # mean trace 3
    g = torch.diag(torch.tensor([0.5, 1.5]))  # mean trace 1
    rho_a, rho_g = split_damping(a, g, 0.04, True)
    pi = math.sqrt(3.0 / 1.0)
    assert rho_a == pytest.approx(pi * 0.2) and rho_g == pytest.approx(0.2 / pi)
    assert rho_a * rho_g == pytest.approx(0.04)
    assert split_damping(a, g, 0.04, False) == pytest.approx((0.2, 0.2))
    # Degenerate traces fall back to the plain split instead of dividing by zero.
    assert split_damping(a, torch.zeros(2, 2), 0.04, True) == pytest.approx((0.2, 0.2))


def test_block_inverse_apply_inverts_precondition():
    torch.manual_seed(1)
    blk = KFACBlock(in_dim=4, out_dim=3, pi_correction=True)
    ha, hg = torch.randn(20, 4), torch.randn(20, 3)
    blk.update_factors(ha.T @ ha / 20, hg.T @ hg / 20)
    assert blk.refresh(0.01)
    v = torch.randn(3, 4)
    back = blk.inverse_apply(blk.precondition(v), 0.01)
    torch.testing.assert_close(back, v, rtol=1e-4, atol=1e-5)


def test_block_refresh_without_factors_is_not_ready():
    blk = KFACBlock(in_dim=3, out_dim=2)
    assert not blk.refresh(0.1) and not blk.ready
    blk.update_factors(torch.eye(3), None)
    assert blk.g is None and not blk.refresh(0.1)
