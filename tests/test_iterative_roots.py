"""Coupled Newton inverse roots against float64 eigh references; ``inverse_root(method="newton")`` fallback."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import ds_soo.curvature.linalg as linalg
from ds_soo.curvature.iterative_roots import coupled_newton_inverse_root
from ds_soo.curvature.linalg import inverse_root

EPS32 = torch.finfo(torch.float32).eps


def _spd(n: int, cond: float, seed: int) -> torch.Tensor:
    """float64 SPD with eigenvalues log-spaced from 1 down to 1/cond, random eigenvectors."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)) @ q.T


def _ref(mat: torch.Tensor, p: int, damping: float) -> torch.Tensor:
    m = mat.double() + damping * torch.eye(mat.shape[-1], dtype=torch.float64)
    w, v = torch.linalg.eigh(m)
    return (v * w.pow(-1.0 / p).unsqueeze(-2)) @ v.transpose(-1, -2)


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(x.double() - ref) / torch.linalg.matrix_norm(ref))


@pytest.mark.parametrize("p", [1, 2, 4])
@pytest.mark.parametrize("cond", [1e2, 1e4, 1e6])
@pytest.mark.parametrize("n", [4, 32, 128])
def test_matches_float64_reference(n, cond, p):
    a = _spd(n, cond, seed=n)
    damping = 1e-2 / cond  # the damped condition number stays about ``cond``
    res = coupled_newton_inverse_root(a.float(), p, damping)
    assert res.root.dtype == torch.float32 and res.root.shape == (n, n) and bool(res.ok)
    # fp32 bound: a relative perturbation eps of the matrix moves its -1/p root by about cond * eps / p;
    # measured errors sit 5..20x below this.
    assert _rel(res.root, _ref(a, p, damping)) <= max(2e-5, cond * EPS32 / p)


def test_rank_deficient_statistic_null_space_gets_damping():
    # A Shampoo-like statistic of rank 3: the null space must come out at damping^(-1/p).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    a, damping = x @ x.T, 1e-3
    res = coupled_newton_inverse_root(a.float(), 4, damping)
    assert bool(res.ok) and _rel(res.root, _ref(a, 4, damping)) < 1e-4
    null = torch.linalg.svd(x.T).Vh[3:]  # rows spanning the null space
    got = null @ res.root.double() @ null.T
    torch.testing.assert_close(got, damping**-0.25 * torch.eye(9, dtype=torch.float64), rtol=0, atol=1e-3)


def test_batched_equals_per_matrix():
    """In float64 the batched and one-by-one iterations agree to round-off (~1e-15 on every CPU), so
    1e-10 of the root's largest entry separates any real difference between the two paths."""
    mats = torch.stack([_spd(16, c, seed=i) for i, c in enumerate((1e1, 1e3, 1e5, 1e2, 1e4, 1e6))])
    mats = mats.reshape(2, 3, 16, 16)
    f64 = torch.float64
    res = coupled_newton_inverse_root(mats, 4, 1e-6, dtype=f64)
    assert res.root.shape == (2, 3, 16, 16) and res.ok.shape == (2, 3) and bool(res.ok.all())
    assert res.root.dtype == f64
    for i in range(2):
        for j in range(3):
            alone = coupled_newton_inverse_root(mats[i, j], 4, 1e-6, max_iters=int(res.iters.max()) + 2, dtype=f64)
            assert int(alone.iters) == int(res.iters[i, j])  # frozen on its own schedule inside the stack
            atol = 1e-10 * float(alone.root.abs().max())
            torch.testing.assert_close(res.root[i, j], alone.root, rtol=1e-10, atol=atol)


def test_per_matrix_damping_tensor():
    mats = torch.stack([_spd(8, 1e3, seed=s) for s in range(4)]).reshape(2, 2, 8, 8)
    damping = torch.tensor([[1e-3, 1e-1], [1.0, 1e-5]])
    res = coupled_newton_inverse_root(mats.float(), 2, damping)
    assert bool(res.ok.all())
    for i in range(2):
        for j in range(2):
            assert _rel(res.root[i, j], _ref(mats[i, j], 2, float(damping[i, j]))) < 2e-4


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_flagged_and_never_returned(bad):
    mats = torch.stack([_spd(6, 1e2, seed=0), _spd(6, 1e2, seed=1)]).float()
    mats[1, 2, 3] = bad
    res = coupled_newton_inverse_root(mats, 4, 1e-3)
    assert res.ok.tolist() == [True, False]
    assert inverse_root(mats[1], 4, 1e-3, method="newton") is None
    assert inverse_root(mats, 4, 1e-3, method="newton") is None


def _count_eigh(monkeypatch) -> list[int]:
    calls = [0]
    real = linalg._eigh

    def counting(mat):
        calls[0] += 1
        return real(mat)

    monkeypatch.setattr(linalg, "_eigh", counting)
    return calls


def test_newton_method_uses_no_eigh_when_converged(monkeypatch):
    calls = _count_eigh(monkeypatch)
    a = _spd(24, 1e4, seed=3)
    out = inverse_root(a.float(), 4, 1e-4, method="newton")
    assert calls[0] == 0 and out is not None and out.dtype == torch.float32
    assert _rel(out, _ref(a, 4, 1e-4)) < 1e-4


def test_non_converging_newton_falls_back_to_eigh(monkeypatch):
    calls = _count_eigh(monkeypatch)
    monkeypatch.setattr(linalg, "coupled_newton_inverse_root",
                        functools.partial(coupled_newton_inverse_root, max_iters=1))  # fmt: skip
    a = _spd(24, 1e4, seed=3).float()
    out = inverse_root(a, 4, 1e-4, method="newton")
    assert calls[0] == 1
    torch.testing.assert_close(out, inverse_root(a, 4, 1e-4), rtol=0, atol=0)


def test_fallback_only_for_the_matrices_that_failed(monkeypatch):
    # The second matrix has an eigenvalue of -0.5: Newton on (A + 0.1 I) diverges, while the eigh path
    # clamps it to zero before damping. Only that one goes through eigh; the first keeps its Newton root.
    good = _spd(10, 1e2, seed=4)
    indefinite = _spd(10, 1e2, seed=5) - 0.5 * torch.outer(torch.ones(10), torch.ones(10)) / 10 * 3
    assert float(torch.linalg.eigvalsh(indefinite)[0]) < -0.1
    mats = torch.stack([good, indefinite]).float()
    res = coupled_newton_inverse_root(mats, 4, 0.1)
    assert res.ok.tolist() == [True, False]
    calls = _count_eigh(monkeypatch)
    out = inverse_root(mats, 4, 0.1, method="newton")
    assert calls[0] == 1 and out is not None and bool(torch.isfinite(out).all())
    torch.testing.assert_close(out[0], res.root[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], inverse_root(mats[1], 4, 0.1), rtol=0, atol=0)


def test_newton_then_eigh_failure_returns_none(monkeypatch):
    # Indefinite with no damping: Newton fails, the eigh path has a zero eigenvalue and no damping.
    a = -_spd(5, 1e1, seed=6).float()
    assert inverse_root(a, 4, 0.0, method="newton") is None


def test_unknown_method_raises():
    with pytest.raises(ValueError):
        inverse_root(torch.eye(3), 4, 1e-3, method="svd")


def test_bench_tiny_cpu_run(tmp_path):
    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("bench_inverse_roots", root / "bench" / "inverse_roots.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "roots.json"
    res = bench.main(["--sizes", "8", "16", "--batches", "1", "3", "--roots", "4", "--reps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    rows = res["rows"]
    assert {(r["method"], r["size"], r["batch"]) for r in rows} == {
        (m, n, b) for m in ("eigh", "newton") for n in (8, 16) for b in (1, 3)
    }
    for r in rows:
        assert math.isfinite(r["ms_per_matrix"]) and r["ms_per_matrix"] > 0
        assert math.isfinite(r["max_rel_err"]) and r["max_rel_err"] < 0.1
        if r["method"] == "newton":
            assert r["iters_accepted"] <= r["iters_run"] and r["converged"] == f"{r['batch']}/{r['batch']}"
    assert set(res["rule"]) == {"p=4, batch=1", "p=4, batch=3"}
