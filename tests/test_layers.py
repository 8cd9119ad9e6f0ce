"""Layer capture: the hooks' factors equal the definitions, and gradients map to/from [dW | db] exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ds_soo.layers.handlers import LayerHandler, find_kfac_layers
from ds_soo.preconditioner import Preconditioner

F64 = torch.float64


def _patches(x: torch.Tensor, kernel, stride, padding, dilation=(1, 1)) -> torch.Tensor:
    """Explicit-loop receptive fields, flattened in (C, kh, kw) order, one row per (batch, i, j)."""
    b, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    padded = torch.zeros(b, c, h + 2 * ph, w + 2 * pw, dtype=x.dtype)
    padded[:, :, ph : ph + h, pw : pw + w] = x
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for bi in range(b):
        for i in range(oh):
            for j in range(ow):
                win = padded[bi, :, i * sh : i * sh + dh * (kh - 1) + 1 : dh, j * sw : j * sw + dw * (kw - 1) + 1 : dw]
                rows.append(win.reshape(-1))
    return torch.stack(rows)


def _cases():
    return {
        "linear": (lambda: nn.Linear(6, 4), lambda: torch.randn(9, 6)),
        "linear_3d_nobias": (lambda: nn.Linear(3, 2, bias=False), lambda: torch.randn(2, 5, 3)),
        "conv2d": (lambda: nn.Conv2d(3, 4, (2, 3), stride=(2, 1), padding=(1, 2)), lambda: torch.randn(2, 3, 5, 4)),
        "conv2d_dilated": (lambda: nn.Conv2d(2, 3, 2, dilation=2, padding=1), lambda: torch.randn(2, 2, 5, 5)),
        "conv1d": (lambda: Conv1D(5, 3), lambda: torch.randn(2, 4, 3)),
    }


@pytest.mark.parametrize("kind", list(_cases()))
def test_hook_factors_equal_definitions(kind):
    torch.manual_seed(0)
    make, make_x = _cases()[kind]
    layer = make()
    # Capture check under "expand" (every row an example); tests/test_kfac.py checks every setting's scale.
    cfg = {"kfac": {"ema_decay": 0.5, "weight_sharing": "expand", "kl_clip": None}, "damping": {"value": 0.1}}
    pre = Preconditioner(nn.Sequential(layer), cfg)
    x = make_x()
    out = layer(x)
    out.retain_grad()
    (out.pow(3).mean() + out.sum() / 7).backward()
    pre.step()
    st = pre.states["0"]
    assert st.a.dtype == torch.float32 and st.g.dtype == torch.float32

    xd, dd = x.double(), out.grad.double()
    if isinstance(layer, nn.Conv2d):
        h = _patches(xd, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
        d = dd.permute(0, 2, 3, 1).reshape(-1, dd.shape[1])  # (batch, i, j) order like the patches
    else:
        h, d = xd.reshape(-1, xd.shape[-1]), dd.reshape(-1, dd.shape[-1])
    if layer.bias is not None:
        h = torch.cat([h, torch.ones(h.shape[0], 1, dtype=F64)], dim=1)
    n = h.shape[0]
    assert d.shape[0] == n
    a_ref = torch.einsum("ni,nj->ij", h, h) / n
    g_ref = torch.einsum("ni,nj->ij", n * d, n * d) / n
    torch.testing.assert_close(st.a.double(), a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.g.double(), g_ref, rtol=1e-5, atol=1e-6 * g_ref.abs().max().item())
    if layer.bias is not None:
        # The bias corner of A is exactly E[1] = 1.
        assert st.a[-1, -1].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- vector <-> matrix maps


def _handler(model: nn.Module) -> LayerHandler:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    layers, _ = find_kfac_layers(model, shapes, [])
    assert len(layers) == 1
    return layers[0]


@pytest.mark.parametrize(
    "make",
    [lambda: nn.Linear(4, 3), lambda: nn.Linear(4, 3, bias=False), lambda: nn.Conv2d(2, 3, 2), lambda: Conv1D(3, 4)],
)
def test_to_matrix_is_dw_db_and_round_trips(make):
    torch.manual_seed(1)
    layer = make()
    h = _handler(nn.Sequential(layer))
    w, b = layer.weight.detach(), layer.bias
    vec = torch.cat([w.reshape(-1)] + ([b.detach()] if b is not None else []))
    mat = h.to_matrix(vec)
    # Independent expectation: (out, in) weight then bias column.
    w_mat = w.T if isinstance(layer, Conv1D) else w.reshape(w.shape[0], -1)
    expect = torch.cat([w_mat, b.detach()[:, None]], dim=1) if b is not None else w_mat
    assert mat.shape == (h.out_dim, h.in_dim)
    assert torch.equal(mat, expect)
    assert torch.equal(h.from_matrix(mat), vec)
    # pieces cover each parameter exactly once, weight first.
    assert [n for n, _ in h.pieces()] == (["0.weight", "0.bias"] if b is not None else ["0.weight"])
    assert sum(idx.numel() for _, idx in h.pieces()) == vec.numel()


def test_find_layers_reports_fall_through_reasons():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 4)
            self.skip = nn.Linear(4, 4)
            self.grouped = nn.Conv2d(4, 4, 1, groups=2)
            self.same = nn.Conv2d(4, 4, 3, padding="same")
            self.frozen_bias = nn.Linear(4, 2)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied

    net = Net()
    net.frozen_bias.bias.requires_grad_(False)
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters() if p.requires_grad}
    layers, reasons = find_kfac_layers(net, shapes, ["skip"])
    names = {lay.name for lay in layers}
    assert names == {"fc", "frozen_bias"}
    fb = next(lay for lay in layers if lay.name == "frozen_bias")
    assert fb.bias_name is None and fb.in_dim == 4  # a frozen bias is not folded in
    assert "tied" in reasons["emb.weight"] and "head.weight" in reasons["emb.weight"]
    assert "excluded" in reasons["skip.weight"]
    assert "skip.bias" in reasons
    for p in ("norm.weight", "norm.bias", "grouped.weight", "same.weight"):
        assert "no K-FAC handler" in reasons[p], p
    # Everything trainable is either preconditioned or has a reason: nothing silently dropped.
    covered = {n for lay in layers for n, _ in lay.pieces()}
    assert covered | set(reasons) == set(shapes)
    assert not covered & set(reasons)
