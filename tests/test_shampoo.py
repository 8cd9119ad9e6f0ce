"""Shampoo: a real Preconditioner step equals (L + eps I)^(-1/4) G (R + eps I)^(-1/4) from float64 eigh,
with grafting, blocking by max_preconditioner_dim and running statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_soo.curvature.shampoo import ShampooBlock
from ds_soo.preconditioner import Preconditioner

F64 = torch.float64


def root_ref(stat: torch.Tensor, eps: float, p: int = 4) -> torch.Tensor:
    m = stat.double() + eps * torch.eye(stat.shape[0], dtype=F64)
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag(w ** (-1.0 / p)) @ v.T


def shampoo_ref(grads: list[torch.Tensor], eps: float, p: int = 4) -> torch.Tensor:
    """Direction for the last gradient with L = sum G G^T and R = sum G^T G over all of ``grads``."""
    gs = [g.double() for g in grads]
    left = sum(g @ g.T for g in gs)
    right = sum(g.T @ g for g in gs)
    return root_ref(left, eps, p) @ gs[-1] @ root_ref(right, eps, p)


def diag_ref(grads: list[torch.Tensor], eps: float, p: int = 4) -> torch.Tensor:
    """Order-1 tensors: diagonal statistics D = sum g*g and (D + eps)^(-2/p) g for the last gradient."""
    d = sum(g.double() ** 2 for g in grads)
    return (d + eps) ** (-2.0 / p) * grads[-1].double()


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(7, 10)


def _backward(model, seed):
    gen = torch.Generator().manual_seed(seed)
    model.zero_grad(set_to_none=True)
    x, y = torch.randn(8, 7, generator=gen), torch.randn(8, 10, generator=gen)
    nn.functional.mse_loss(torch.tanh(model(x)), y).backward()
    return model.weight.grad.clone(), model.bias.grad.clone()


def _pre(model, grafting, max_dim=1024, eps=0.1, **shampoo):
    cfg = {
        "method": "shampoo",
        "damping": {"value": eps},
        "shampoo": {"grafting": grafting, "max_preconditioner_dim": max_dim, **shampoo},
        "schedule": {"warm_steps": 100, "warm_interval": 1},
    }
    return Preconditioner(model, cfg)


def test_shampoo_no_grafting_matches_dense_eigh():
    model = _model()
    pre = _pre(model, "none")
    gw, gb = _backward(model, 1)
    assert pre.step()
    assert pre.counters["preconditioned_steps"] == 1 and pre.counters["curvature_refreshes"] == 1
    ref_w = shampoo_ref([gw], 0.1)
    ref_b = diag_ref([gb], 0.1)
    assert not torch.allclose(model.weight.grad, gw, rtol=1e-2)
    torch.testing.assert_close(model.weight.grad.double(), ref_w, rtol=1e-5, atol=1e-6 * ref_w.abs().max().item())
    torch.testing.assert_close(model.bias.grad.double(), ref_b, rtol=1e-5, atol=1e-6 * ref_b.abs().max().item())


def test_shampoo_statistics_accumulate_over_steps():
    model = _model()
    pre = _pre(model, "none")
    grads = []
    for s in range(3):
        gw, _ = _backward(model, 10 + s)
        grads.append(gw)
        pre.step()
    ref = shampoo_ref(grads, 0.1)
    torch.testing.assert_close(model.weight.grad.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    st = pre.states["weight"]
    left = sum(g.double() @ g.double().T for g in grads)
    torch.testing.assert_close(st.left_matrix().double(), left, rtol=1e-5, atol=1e-7)


def test_shampoo_sgd_grafting_keeps_gradient_norm():
    model = _model()
    pre = _pre(model, "sgd")
    gw, gb = _backward(model, 2)
    pre.step()
    ref = shampoo_ref([gw], 0.1)
    ref = ref * (gw.double().norm() / ref.norm())
    torch.testing.assert_close(model.weight.grad.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    assert model.weight.grad.norm().item() == pytest.approx(gw.norm().item(), rel=1e-5)
    assert model.bias.grad.norm().item() == pytest.approx(gb.norm().item(), rel=1e-5)


def test_shampoo_adam_grafting_norm_over_two_steps():
    model = _model()
    beta2, eps_g = 0.9, 1e-8
    pre = _pre(model, "adam", graft_beta2=beta2, graft_epsilon=eps_g)
    grads = []
    v = torch.zeros(10, 7, dtype=F64)
    for t in range(1, 3):
        gw, _ = _backward(model, 20 + t)
        grads.append(gw)
        pre.step()
        g = gw.double()
        v = beta2 * v + (1 - beta2) * g * g
        v_hat = v / (1 - beta2**t)
        adam = g / (v_hat.sqrt() + eps_g)
        direction = shampoo_ref(grads, 0.1)
        ref = direction * (adam.norm() / direction.norm())
        torch.testing.assert_close(model.weight.grad.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
        assert model.weight.grad.norm().item() == pytest.approx(adam.norm().item(), rel=1e-5)


def test_blocking_by_max_dim_preconditions_each_tile_independently():
    model = _model()
    pre = _pre(model, "none", max_dim=4)
    w_ids = sorted(b.block_id for b in pre.blocks if b.block_id.startswith("weight"))
    expect = sorted(
        f"weight[{r0}:{r1},{c0}:{c1}]" for r0, r1 in ((0, 4), (4, 8), (8, 10)) for c0, c1 in ((0, 4), (4, 7))
    )
    assert w_ids == expect
    assert all(max(b.rows, b.cols) <= 4 for b in pre.blocks if not b.diagonal)
    gw, gb = _backward(model, 3)
    pre.step()
    new = model.weight.grad.double()
    covered = torch.zeros(10, 7, dtype=torch.bool)
    for r0, r1 in ((0, 4), (4, 8), (8, 10)):
        for c0, c1 in ((0, 4), (4, 7)):
            tile = gw[r0:r1, c0:c1]
            ref = shampoo_ref([tile], 0.1)
            torch.testing.assert_close(new[r0:r1, c0:c1], ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
            covered[r0:r1, c0:c1] = True
    assert covered.all()
    # Blocked differs from the unblocked (whole-matrix) preconditioner.
    assert not torch.allclose(new, shampoo_ref([gw], 0.1), rtol=1e-3)
    # The bias is one diagonal block however long it is (its statistics are O(n)).
    assert [b.block_id for b in pre.blocks if b.block_id.startswith("bias")] == ["bias"]
    torch.testing.assert_close(model.bias.grad.double(), diag_ref([gb], 0.1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [4, 2])
def test_order1_tensors_use_diagonal_statistics_with_linear_memory(p):
    model = _model()
    pre = _pre(model, "none", exponent=p)
    grads = []
    for s in range(3):
        _, gb = _backward(model, 40 + s)
        grads.append(gb)
        pre.step()
    ref = diag_ref(grads, 0.1, p)
    torch.testing.assert_close(model.bias.grad.double(), ref, rtol=1e-5, atol=1e-7 * ref.abs().max().item())
    st = pre.states["bias"]
    assert st.diagonal and st.left.shape == (10,) and st.left_root.shape == (10,)
    # O(n) memory: statistics and root are vectors, no n x n factor anywhere.
    assert st.nbytes() <= 4 * (3 * 10 + 1)
    # A full-factor (L^(-1/p)) direction would differ: this is not the old n x n treatment.
    full = shampoo_ref([g[:, None] for g in grads], 0.1, p)[:, 0]
    assert not torch.allclose(model.bias.grad.double(), full, rtol=1e-3)


def test_block_beta2_ema_and_exponent_2():
    torch.manual_seed(5)
    blk = ShampooBlock(3, 4, beta2=0.8, exponent=2, grafting="none")
    g1, g2 = torch.randn(3, 4), torch.randn(3, 4)
    blk.update_stats(g1)
    blk.update_stats(g2)
    left = 0.8 * 0.2 * g1.double() @ g1.double().T + 0.2 * g2.double() @ g2.double().T
    right = 0.8 * 0.2 * g1.double().T @ g1.double() + 0.2 * g2.double().T @ g2.double()
    torch.testing.assert_close(blk.left_matrix().double(), left, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(blk.right_matrix().double(), right, rtol=1e-5, atol=1e-7)
    assert blk.refresh(0.05)
    ref = root_ref(left, 0.05, 2) @ g2.double() @ root_ref(right, 0.05, 2)
    torch.testing.assert_close(blk.precondition(g2).double(), ref, rtol=1e-5, atol=1e-6)


def test_block_refresh_failure_keeps_roots(monkeypatch):
    import ds_soo.curvature.linalg as linalg

    blk = ShampooBlock(3, 3, grafting="none")
    blk.update_stats(torch.randn(3, 3))
    assert blk.refresh(0.1)
    old = (blk.left_root.clone(), blk.right_root.clone())

    def boom(mat):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(linalg, "_eigh", boom)
    blk.update_stats(torch.randn(3, 3))
    assert not blk.refresh(0.1)
    assert torch.equal(blk.left_root, old[0]) and torch.equal(blk.right_root, old[1])


class _Singletons(nn.Module):
    """Parameters with singleton dimensions, as a ViT's position embedding (1, T, D) and (1, n) / (n, 1) gains."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.pos = nn.Parameter(0.3 * torch.randn(1, 6, 4, generator=gen))
        self.row = nn.Parameter(1 + 0.1 * torch.randn(1, 4, generator=gen))
        self.col = nn.Parameter(1 + 0.1 * torch.randn(6, 1, generator=gen))
        self.mid = nn.Parameter(0.3 * torch.randn(3, 1, 4, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 6, 4)
        h = torch.tanh((x + self.pos) * self.row * self.col)
        return h @ self.mid[:, 0, :].T  # (B, 6, 3)


def test_singleton_dimensions_are_squeezed_before_blocking():
    """(1, 6, 4) is one 6 x 4 block, (1, n) and (n, 1) are diagonal, (3, 1, 4) is 3 x 4: against float64 refs."""
    model = _Singletons()
    pre = _pre(model, "none")
    blocks = {b.block_id: b for b in pre.blocks}
    assert (blocks["pos"].rows, blocks["pos"].cols, blocks["pos"].diagonal) == (6, 4, False)
    assert (blocks["mid"].rows, blocks["mid"].cols, blocks["mid"].diagonal) == (3, 4, False)
    assert blocks["row"].diagonal and blocks["col"].diagonal and (blocks["row"].rows, blocks["col"].rows) == (4, 6)
    grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in model.named_parameters()}
    for s in range(3):
        gen = torch.Generator().manual_seed(60 + s)
        model.zero_grad(set_to_none=True)
        x, y = torch.randn(5, 6, 4, generator=gen), torch.randn(5, 6, 3, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        for n, p in model.named_parameters():
            grads[n].append(p.grad.clone())
        assert pre.step()
    refs = {
        "pos": shampoo_ref([g.view(6, 4) for g in grads["pos"]], 0.1).view(1, 6, 4),
        "mid": shampoo_ref([g.view(3, 4) for g in grads["mid"]], 0.1).view(3, 1, 4),
        "row": diag_ref([g.view(-1) for g in grads["row"]], 0.1).view(1, 4),
        "col": diag_ref([g.view(-1) for g in grads["col"]], 0.1).view(6, 1),
    }
    for n, p in model.named_parameters():
        ref = refs[n]
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=n)
    assert pre.states["row"].left.shape == (4,) and pre.states["col"].left.shape == (6,)
