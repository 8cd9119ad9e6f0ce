"""K-FAC: one real Preconditioner step equals a dense float64 Kronecker-product solve.

The references below build A, G and the gradient matrix from the definitions (explicit patch loop for
Conv2d, no ``unfold``), form ``kron(G + rho_G I, A + rho_A I)`` in float64 and solve against the raw
gradient. G is built from per-example loss gradients ``delta_n = d l_n / d s_n`` taken with torch.func
(the training loss is the mean of the per-example losses ``l_n``), not from the code's own scaling:

- plain rows (one per example): ``A = E_n[h h^T]``, ``G = E_n[delta delta^T]``;
- Conv2d and token layers by default, KFC (Grosse & Martens 2016):
  ``A = E_{n,t}[h h^T]``, ``G = E_n[sum_t delta_t delta_t^T]``, then G scaled so that tr(A) tr(G) is
  the empirical Fisher's trace ``mean_n ||d l_n / d [W, b]||^2`` (``kfac.trace_correction``), taken from
  per-example parameter gradients;
- token layers, reduce (Eschenhagen et al. 2023): ``A = E_n[hbar hbar^T]`` with ``hbar = mean_t h``,
  ``G = E_n[(sum_t delta_t)(sum_t delta_t)^T]``;
- expand (tokens as examples, per-token loss ``l_{n,t}``): ``A = E_{n,t}[h h^T]``, ``G = E_{n,t}[delta delta^T]``.
"""

from __future__ import annotations

import copy
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


def per_example_delta(out: torch.Tensor, y: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """d l_n / d s_n for the loss l_n = mean((tanh(s_n) - y_n)^2) of each example (or each token), float64."""

    def loss(s, t):
        return ((torch.tanh(s) - t) ** 2).mean()

    s, t = out.detach().double(), y.double()
    if per_token:  # every (n, position) row is an example with its own loss over the output channels
        if s.dim() == 4:  # conv: (N, C, H, W) -> channels last
            s, t = s.permute(0, 2, 3, 1), t.permute(0, 2, 3, 1)
        flat = torch.func.vmap(torch.func.grad(loss))(s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]))
        flat = flat.view(s.shape)
        return flat.permute(0, 3, 1, 2) if out.dim() == 4 else flat
    return torch.func.vmap(torch.func.grad(loss))(s, t)


def fisher_trace(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """tr(F_emp) = mean_n ||d l_n / d [W, b]||^2 from per-example parameter gradients (torch.func), float64."""
    layer64 = copy.deepcopy(layer).double()
    params = {k: v.detach() for k, v in layer64.named_parameters()}

    def loss(p, xn, yn):
        s = torch.func.functional_call(layer64, p, (xn.unsqueeze(0),)).squeeze(0)
        return ((torch.tanh(s) - yn) ** 2).mean()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.double(), y.double())
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values()).mean()


def ref_factors(layer, x, out, y, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    delta = per_example_delta(out, y, per_token=mode == "expand")
    h, d = layer_rows(layer, x, delta)
    n_ex = x.shape[0]
    shared = isinstance(layer, nn.Conv2d) or x.dim() > 2
    if not shared or mode == "expand":
        a = sum(torch.outer(r, r) for r in h) / h.shape[0]
        g = sum(torch.outer(r, r) for r in d) / d.shape[0]
    elif mode == "auto":  # KFC: positions expanded, G per example, scaled to the empirical Fisher's trace
        a = sum(torch.outer(r, r) for r in h) / h.shape[0]
        g = sum(torch.outer(r, r) for r in d) / n_ex
        g = g * fisher_trace(layer, x, y) / (torch.trace(a) * torch.trace(g))
    else:  # reduce
        hbar = h.view(n_ex, -1, h.shape[-1]).mean(dim=1)
        dsum = d.view(n_ex, -1, d.shape[-1]).sum(dim=1)
        a = sum(torch.outer(r, r) for r in hbar) / n_ex
        g = sum(torch.outer(r, r) for r in dsum) / n_ex
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
    cfg["kfac"] = {"kl_clip": None, **cfg["kfac"]}  # one step against the dense solve: no KL-clip
    pre = Preconditioner(model, cfg)
    x = make_x()
    out = layer(x)
    y = torch.randn_like(out)
    loss = ((torch.tanh(out) - y) ** 2).mean()
    loss.backward()
    raw = grad_matrix(layer)
    changed = pre.step()
    return pre, layer, x, (out, y), raw, changed


@pytest.mark.parametrize("kind", list(_layers()))
@pytest.mark.parametrize("pi_on", [True, False])
def test_kfac_step_equals_dense_kronecker_solve(kind, pi_on):
    rho = 0.03
    pre, layer, x, (out, y), raw, changed = run_one_step(kind, rho, pi_on)
    assert changed
    assert pre.counters["preconditioned_steps"] == 1 and pre.counters["curvature_refreshes"] == 1
    a, g = ref_factors(layer, x, out, y)
    ref = dense_kfac_solve(a, g, raw, rho, pi_on)
    new = grad_matrix(layer)
    assert not torch.allclose(new, raw, rtol=1e-3, atol=0), "gradient was not preconditioned"
    scale = ref.abs().max().item()
    torch.testing.assert_close(new.double(), ref, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("kind", ["linear_seq", "conv2d", "conv1d"])
@pytest.mark.parametrize("mode", ["expand", "reduce"])
def test_weight_sharing_settings_match_their_definitions(kind, mode):
    rho = 0.03
    pre, layer, x, (out, y), raw, _ = run_one_step(kind, rho, True, extra_cfg={"kfac": {"weight_sharing": mode}})
    a, g = ref_factors(layer, x, out, y, mode)
    st = pre.states[next(iter(pre.states))]
    # The training loss (a mean over all elements) is also the mean of the per-row losses that expand
    # takes as examples, so the same backward serves both settings.
    torch.testing.assert_close(st.a.double(), a, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(st.g.double(), g, rtol=1e-5, atol=1e-8 * g.abs().max().item())
    ref = dense_kfac_solve(a, g, raw, rho, True)
    torch.testing.assert_close(grad_matrix(layer).double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("kind", ["linear_seq", "conv2d", "conv1d"])
def test_kfc_factors_with_and_without_the_trace_correction(kind):
    """Plain KFC when ``kfac.trace_correction`` is off; the correction changes only G's scale, never A."""
    _, layer, x, (out, y), raw, _ = run_one_step(kind, 0.03, True, extra_cfg={"kfac": {"trace_correction": False}})
    pre_on, *_ = run_one_step(kind, 0.03, True)
    pre_off, *_ = run_one_step(kind, 0.03, True, extra_cfg={"kfac": {"trace_correction": False}})
    a_ref, g_corrected = ref_factors(layer, x, out, y)
    h, d = layer_rows(layer, x, per_example_delta(out, y))
    g_ref = sum(torch.outer(r, r) for r in d) / x.shape[0]
    on, off = (next(iter(p.states.values())) for p in (pre_on, pre_off))
    torch.testing.assert_close(off.g.double(), g_ref, rtol=1e-5, atol=1e-8 * g_ref.abs().max().item())
    torch.testing.assert_close(on.g.double(), g_corrected, rtol=1e-5, atol=1e-8 * g_ref.abs().max().item())
    torch.testing.assert_close(on.a, off.a)
    assert abs(float(torch.trace(on.g) / torch.trace(off.g)) - 1.0) > 1e-3  # the correction did something
    ref = dense_kfac_solve(a_ref, g_ref, raw, 0.03, True)
    torch.testing.assert_close(grad_matrix(layer).double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


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
        {"kfac": {"ema_decay": decay, "pi_damping": True, "kl_clip": None}, "damping": {"value": rho},
         "schedule": {"warm_steps": 5}},
    )
    refs = []
    for _ in range(2):
        layer.zero_grad()
        x = torch.randn(10, 4)
        out = layer(x)
        y = torch.randn_like(out)
        ((torch.tanh(out) - y) ** 2).mean().backward()
        refs.append(ref_factors(layer, x, out, y))
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
