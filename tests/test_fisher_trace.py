"""Per-example gradient norms of weight-shared layers from Gram matrices, against torch.func in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from ds_soo.curvature import fisher_trace
from ds_soo.curvature.fisher_trace import sum_sq_norms


def _reference_sq_norms(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """||d(<layer(x_m), upstream_m>)/d[W, b]||^2 per example, by vmapped per-example autograd."""
    params = {k: v.detach() for k, v in layer.named_parameters()}

    def loss(p, xm, um):
        return (functional_call(layer, p, (xm.unsqueeze(0),)).squeeze(0) * um).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, upstream)
    return sum(g.pow(2).flatten(1).sum(1) for g in grads.values())


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Linear(6, 5), (7, 2, 6)),  # 2 tokens: Gram products are cheaper
        (lambda: nn.Linear(3, 5), (7, 9, 3)),  # 9 tokens: explicit per-example gradients are cheaper
        (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 2, 4, 4)),  # 4 positions: Gram
        (lambda: nn.Conv2d(1, 4, 2, bias=False), (5, 1, 5, 5)),  # 16 positions: explicit
    ],
)
def test_sq_norms_equal_per_example_autograd(make, shape):
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    upstream = torch.randn_like(layer(x))
    # rows built here, not by the project: positions of one example are consecutive rows
    if isinstance(layer, nn.Conv2d):
        h = nn.functional.unfold(x, layer.kernel_size, padding=layer.padding, stride=layer.stride).transpose(1, 2)
        d = upstream.flatten(2).transpose(1, 2)
    else:
        h, d = x, upstream
    h_rows, d_rows = h.reshape(-1, h.shape[-1]), d.reshape(-1, d.shape[-1])
    if layer.bias is not None:
        h_rows = torch.cat([h_rows, torch.ones(h_rows.shape[0], 1, dtype=h_rows.dtype)], dim=1)
    n = shape[0]
    want = _reference_sq_norms(layer, x, upstream)
    h_rows = h_rows.double()
    positions = h_rows.shape[0] // n
    for limit in (None, 3):
        got, used = sum_sq_norms(
            lambda a, b: h_rows[a * positions : b * positions], h_rows.shape[1], d_rows.double(), n, limit
        )
        assert used == (n if limit is None else limit)
        torch.testing.assert_close(got, want[:used].sum(), rtol=1e-10, atol=1e-12)


def test_chunks_cover_every_example_once(monkeypatch):
    """A tiny memory budget forces one example per chunk; the sum must not change."""
    torch.manual_seed(1)
    h, d = torch.randn(6 * 4, 3, dtype=torch.float64), torch.randn(6 * 4, 2, dtype=torch.float64)
    calls = []

    def rows_of(a, b):
        calls.append((a, b))
        return h[a * 4 : b * 4]

    whole, _ = sum_sq_norms(rows_of, 3, d, 6)
    monkeypatch.setattr(fisher_trace, "CHUNK_BUDGET", 1)
    calls.clear()
    chunked, _ = sum_sq_norms(rows_of, 3, d, 6)
    assert calls == [(i, i + 1) for i in range(6)]
    torch.testing.assert_close(chunked, whole)
