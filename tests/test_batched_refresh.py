"""A refresh step's inverses as one batched factorisation per factor shape (ds_soo.curvature.batched_refresh).

The batched refresh must give what the block-by-block refresh gives (to fp32 round-off: batched LAPACK may
differ in the last bits), checked against a float64 dense reference built here with ``torch.linalg``; it
must issue O(distinct factor shapes) eigh/Cholesky calls, not O(blocks); a factor that fails leaves only
its own block on its previous pair (counted as a failed refresh); and ``sparse_interval: auto`` still
probes and observes every refreshed block.
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from test_step_cost import _CountOps
from torch import nn

import ds_soo.curvature.linalg as linalg
from ds_soo.curvature import batched_refresh
from ds_soo.curvature.batched_refresh import INVERSE, ROOT, Request, solve
from ds_soo.preconditioner import Preconditioner

FACTORISATIONS = ("aten.linalg_cholesky_ex.default", "aten._linalg_eigh.default")


def _factorisations(ops: _CountOps) -> int:
    return sum(ops.ops[name] for name in FACTORISATIONS)


class Net(nn.Module):
    """Equal-shaped hidden layers between layers of other shapes (and a LayerNorm: Shampoo's diagonal blocks)."""

    def __init__(self, layers: int = 4, width: int = 12) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(self.norm(h))


def _cfg(method: str, sparse_interval: int | str = 2, warm_steps: int = 2) -> dict:
    # No base optimizer here: the KL-clip (not the subject) is off, as "auto" would be refused.
    return {"method": method, "damping": {"value": 1e-2}, "kfac": {"kl_clip": None},
            # Every due block refreshes on the same step (what is batched), also after the warm phase.
            "schedule": {"warm_steps": warm_steps, "warm_interval": 1, "sparse_interval": sparse_interval,
                         "stagger": False}}  # fmt: skip


def _backward(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    x = x.to(next(model.parameters()).dtype)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _per_block(states, damping, dtype, retry_float64):
    """The block-by-block refresh the batched one replaces."""
    return [s.refresh(damping, dtype, retry_float64) for s in states]


def _train(model: nn.Module, pre: Preconditioner, steps: range, per_block: bool, monkeypatch) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in steps:
        _backward(model, t)
        with monkeypatch.context() as mp:
            if per_block:
                mp.setattr(batched_refresh, "refresh_states", _per_block)
            assert pre.step()
        opt.step()


# ----------------------------------------------------------------------------- float64 dense references


def _spd_power(mat: torch.Tensor, damping: float, power: float) -> torch.Tensor:
    m = mat.double()
    m = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * (evals.clamp_min(0.0) + damping).pow(power)) @ evecs.T


def _kfac_reference(state, rho: float) -> dict[str, torch.Tensor]:
    """(A + pi sqrt(rho))^-1 and (G + sqrt(rho)/pi)^-1 with pi^2 = (tr A / dim A) / (tr G / dim G)."""
    a, g = state.a.double(), state.g.double()
    pi = math.sqrt((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])) if state.pi_correction else 1.0
    eye_a, eye_g = torch.eye(a.shape[0], dtype=torch.float64), torch.eye(g.shape[0], dtype=torch.float64)
    return {"a_inv": torch.linalg.inv(0.5 * (a + a.T) + pi * math.sqrt(rho) * eye_a),
            "g_inv": torch.linalg.inv(0.5 * (g + g.T) + math.sqrt(rho) / pi * eye_g)}  # fmt: skip


def _dense(stat: torch.Tensor, n: int) -> torch.Tensor:
    """A Shampoo statistic as a dense n x n matrix: a packed one (row-major upper triangle) filled in
    element by element, without the code under test."""
    if stat.dim() == 2:
        return stat
    out, k = torch.zeros(n, n, dtype=stat.dtype), 0
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = stat[k]
            k += 1
    assert k == stat.numel()
    return out


def _shampoo_reference(state, eps: float) -> dict[str, torch.Tensor]:
    if state.diagonal:
        return {"left_root": (state.left.double().clamp_min(0.0) + eps).pow(-2.0 / state.exponent)}
    return {"left_root": _spd_power(_dense(state.left, state.rows), eps, -1.0 / state.exponent),
            "right_root": _spd_power(_dense(state.right, state.cols), eps, -1.0 / state.exponent)}  # fmt: skip


def _check_against_reference(pre: Preconditioner, rho: float) -> int:
    checked = 0
    for bid, state in pre.states.items():
        ref = _kfac_reference(state, rho) if pre.cfg.method == "kfac" else _shampoo_reference(state, rho)
        for key, value in ref.items():
            got = getattr(state, key).double()
            scale = float(value.abs().max())
            torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5 * scale, msg=f"{bid}/{key}")
            checked += 1
    return checked


def _assert_close(got: torch.Tensor | None, ref: torch.Tensor | None, msg: str, rtol: float = 1e-5) -> None:
    if got is None or ref is None:
        assert got is None and ref is None, msg
        return
    atol = rtol / 10 * float(ref.abs().max()) + 1e-12
    torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=msg)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_batched_refresh_equals_per_block_and_dense_reference(method, monkeypatch):
    """Refreshes on every step of the warm phase and every second step after: the batched run's inverses
    match a float64 dense reference of its own statistics, and the run matches a block-by-block twin.

    Both runs are float64 (a float64 model keeps float64 state), so round-off is ~1e-15 on every CPU and
    1e-10 separates it from any real difference between the two paths."""
    torch.manual_seed(0)
    model = Net(layers=4).double()
    twin = copy.deepcopy(model)
    pre, ref = Preconditioner(model, _cfg(method)), Preconditioner(twin, _cfg(method))
    rho = pre.cfg.damping.value
    for t in range(6):
        _train(model, pre, range(t, t + 1), per_block=False, monkeypatch=monkeypatch)
        _train(twin, ref, range(t, t + 1), per_block=True, monkeypatch=monkeypatch)
        if t in (0, 1, 2, 4):  # refresh steps: inverses of the statistics as they are now
            assert _check_against_reference(pre, rho) >= len(pre.states)
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            _assert_close(p.detach(), q.detach(), f"step {t}: {n}", rtol=1e-10)
        mine, theirs = pre.state_dict()["blocks"], ref.state_dict()["blocks"]
        for bid, sd in theirs.items():
            for key, value in sd.items():
                if isinstance(value, torch.Tensor) or value is None:
                    assert value is None or value.dtype == torch.float64, f"{bid}/{key}"
                    _assert_close(mine[bid][key], value, f"step {t}: {bid}/{key}", rtol=1e-10)
        assert pre.counters == ref.counters and pre.block_refreshes == ref.block_refreshes
    assert pre.counters["curvature_refreshes"] == 4 and pre.counters["inverse_failures"] == 0


def test_solve_matches_per_matrix_routines_and_dense_reference():
    """``solve`` on stacked groups (several sizes, per-matrix damping) against linalg's per-matrix routines
    and a float64 eigh reference. All float64 (float64 matrices keep float64 results): round-off is
    ~1e-15 on every CPU (these matrices have condition numbers below ~1e3), so 1e-10 of the largest
    entry separates it from any real difference."""
    g = torch.Generator().manual_seed(3)
    f64 = torch.float64
    reqs = []
    for i in range(10):
        n = (7, 7, 9)[i % 3]
        x = torch.randn(n, 3 * n, generator=g, dtype=f64)
        mat = x @ x.T / (3 * n)
        reqs.append(Request(f"inv{i}", mat, INVERSE, 0.01 * (i + 1)))
        reqs.append(Request(f"root{i}", mat, ROOT, 0.001 * (i + 1), 4))
    with _CountOps() as ops:
        out = solve(reqs, f64, True)
    assert _factorisations(ops) == 4  # (inverse, root) x (7, 9)
    for r, got in zip(reqs, out, strict=True):
        each = batched_refresh.solve_one(r, f64, True)
        assert got.dtype == f64 and each.dtype == f64, r.key
        torch.testing.assert_close(got, each, rtol=1e-10, atol=1e-10 * float(each.abs().max()), msg=r.key)
        power = -1.0 if r.kind == INVERSE else -1.0 / r.root
        dense = _spd_power(r.matrix, r.damping, power)
        torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10 * float(dense.abs().max()), msg=r.key)


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_refresh_step_factorisations_do_not_grow_with_blocks(method):
    """4 vs 16 identical layers: the same number of eigh/Cholesky calls on a refresh step, one per factor
    shape at most (the per-block path issues two per block), and the same number of host reads."""
    counts, reads = {}, {}
    for layers in (4, 16):
        torch.manual_seed(0)
        model = Net(layers=layers)
        pre = Preconditioner(model, _cfg(method))
        _backward(model, 0)
        pre.step()
        _backward(model, 1)
        with _CountOps() as ops:
            assert pre.step()  # step 1: a refresh step (warm phase)
        assert pre.block_refreshes and all(v == 2 for v in pre.block_refreshes.values())
        counts[layers] = _factorisations(ops)
        reads[layers] = ops.ops["aten._local_scalar_dense.default"]
        shapes = {(k, tuple(getattr(s, k).shape)) for s in pre.states.values()
                  for k in ("a", "g", "left_root", "right_root") if getattr(s, k, None) is not None
                  and getattr(s, k).dim() == 2}  # fmt: skip
        assert 0 < counts[layers] <= len({shape for _, shape in shapes}), (counts, shapes)
    assert counts[4] == counts[16], counts
    # Host reads too (K-FAC's pi-split traces, Shampoo's diagonal roots' finiteness): one read per kind
    # of decision, none per block (4 and 16 layers differ by 12 dense blocks and 12 bias vectors).
    assert reads[4] == reads[16], reads


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_one_failing_factor_keeps_only_its_block(method):
    """A NaN in one block's statistics on a refresh step: that block keeps its previous inverses and
    counts a failed refresh, the equal-shaped others refresh, no NaN reaches the weights, and every
    parameter with a gradient moves."""
    torch.manual_seed(0)
    model = Net(layers=4)
    pre = Preconditioner(model, _cfg(method, sparse_interval=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(2):
        _backward(model, t)
        assert pre.step()
        opt.step()
    victim = "hidden.2.weight" if method == "shampoo" else "hidden.2"
    keys = ("a_inv", "g_inv") if method == "kfac" else ("left_root", "right_root")
    stat = "a" if method == "kfac" else "left"
    old = {bid: {k: getattr(s, k).clone() for k in keys} for bid, s in pre.states.items()}
    getattr(pre.states[victim], stat).view(-1)[1] = float("nan")  # (0, 1), dense or packed
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _backward(model, 2)
    # Shampoo's statistics step folds this gradient in first; the NaN stays.
    assert pre.step()
    opt.step()
    assert pre.counters["inverse_failures"] == 1
    assert pre.block_refreshes[victim] == 2 and all(v == 3 for b, v in pre.block_refreshes.items() if b != victim)
    for k in keys:
        assert torch.equal(getattr(pre.states[victim], k), old[victim][k]), k
    peers = [b for b in pre.states if b != victim and b.startswith("hidden.") and b.endswith(victim[8:])]
    assert len(peers) == 3
    for bid in peers:
        assert not torch.equal(getattr(pre.states[bid], keys[0]), old[bid][keys[0]]), bid
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert not torch.equal(p, before[n]), f"{n} did not move"


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_batched_result_failures_fall_back_per_matrix(method, monkeypatch):
    """A matrix whose batched result is unusable, or a whole group whose batched call raises, goes through
    linalg's per-matrix routine: the refresh still succeeds and equals the plain batched one."""
    torch.manual_seed(0)
    model = Net(layers=4)
    pre = Preconditioner(model, _cfg(method))
    _backward(model, 0)
    pre.step()
    states = list(pre.states.values())
    rho = pre.cfg.damping.value
    keys = ("a_inv", "g_inv") if method == "kfac" else ("left_root", "right_root")

    def snapshot():
        return [{k: getattr(s, k) for k in keys if getattr(s, k) is not None} for s in states]

    assert all(batched_refresh.refresh_states(states, rho, torch.float32, True))
    plain = snapshot()
    calls = collections.Counter()
    if method == "kfac":
        def corrupt(m):  # the second matrix of every batch "fails"
            calls["batched"] += 1
            chol, info = torch.linalg.cholesky_ex(m)
            info = info.clone()
            info[1] = 1
            return chol, info

        monkeypatch.setattr(batched_refresh, "_batched_cholesky", corrupt)
    else:
        def boom(m):
            calls["batched"] += 1
            raise torch.linalg.LinAlgError("injected")

        monkeypatch.setattr(batched_refresh, "_batched_eigh", boom)
    original = batched_refresh.solve_one

    def counting(r, *a):
        calls["per_matrix"] += 1
        return original(r, *a)

    monkeypatch.setattr(batched_refresh, "solve_one", counting)
    assert all(batched_refresh.refresh_states(states, rho, torch.float32, True))
    assert calls["batched"] > 0 and calls["per_matrix"] > 0
    for i, (got, want) in enumerate(zip(snapshot(), plain, strict=True)):
        for k in want:
            _assert_close(got[k], want[k], f"{i}/{k}")


def test_auto_interval_probes_and_observes_every_refreshed_block(monkeypatch):
    """sparse_interval "auto": every due block is probed before the batched refresh, every block that
    refreshed is observed after it, and the intervals equal a block-by-block twin's."""
    torch.manual_seed(0)
    model = Net(layers=4)
    twin = copy.deepcopy(model)
    cfg = _cfg("kfac", sparse_interval="auto", warm_steps=2)
    cfg["schedule"] |= {"auto_min_interval": 2, "stats_sparse_interval": 1}
    pre, ref = Preconditioner(model, cfg), Preconditioner(twin, cfg)
    events: list[tuple[str, int]] = []
    probe, after, solve_all = (pre.schedule.probe_before_refresh, pre.schedule.after_refresh,
                               batched_refresh.refresh_states)  # fmt: skip

    def spy_probe(step, state, mat):
        events.append(("probe", step))
        return probe(step, state, mat)

    def spy_after(block_id, step, state, mat, before):
        events.append(("after", step))
        return after(block_id, step, state, mat, before)

    def spy_solve(states, *a):
        events.append(("solve", len(states)))
        return solve_all(states, *a)

    monkeypatch.setattr(pre.schedule, "probe_before_refresh", spy_probe)
    monkeypatch.setattr(pre.schedule, "after_refresh", spy_after)
    for t in range(10):
        with monkeypatch.context() as mp:
            mp.setattr(batched_refresh, "refresh_states", spy_solve)
            before = dict(pre.block_refreshes)
            events.clear()
            _train(model, pre, range(t, t + 1), per_block=False, monkeypatch=mp)
        _train(twin, ref, range(t, t + 1), per_block=True, monkeypatch=monkeypatch)
        refreshed = sum(pre.block_refreshes.get(b, 0) - before.get(b, 0) for b in pre.states)
        kinds = [e for e, _ in events]
        if refreshed:
            # All probes, then one batched solve for every due block, then one observation per refresh.
            assert kinds == ["probe"] * refreshed + ["solve"] + ["after"] * refreshed, (t, kinds)
            assert events[refreshed] == ("solve", refreshed)
        else:
            assert kinds == [], (t, kinds)
    mine, theirs = pre.schedule.auto.summary(), ref.schedule.auto.summary()
    assert mine.keys() == theirs.keys() and sum(v["sparse_refreshes"] for v in mine.values()) > 0
    for bid, want in theirs.items():
        assert mine[bid] == want | {"last_change": pytest.approx(want["last_change"], rel=1e-4)}, bid


@pytest.mark.parametrize("kind", [INVERSE, ROOT])
def test_non_finite_matrix_gives_none_within_a_batch(kind):
    """An Inf statistic can factorise to a finite, meaningless inverse: like linalg's routines, the batch
    gives None for it (its block keeps its previous pair), and its neighbours are unaffected."""
    g = torch.Generator().manual_seed(4)
    mats = []
    for _ in range(3):
        x = torch.randn(6, 18, generator=g)
        mats.append(x @ x.T / 18)
    bad = mats[1].clone()
    bad[-1, -1] = float("inf")  # Cholesky factorises this one (info 0) to a finite inverse
    reqs = [Request(str(i), m, kind, 0.1, 2) for i, m in enumerate([mats[0], bad, mats[2]])]
    out = solve(reqs, torch.float32, True)
    assert out[1] is None
    for i in (0, 2):
        dense = _spd_power(mats[i], 0.1, -1.0 if kind == INVERSE else -0.5)
        torch.testing.assert_close(out[i].double(), dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max()))


def test_shampoo_newton_roots_match_reference_without_eigh():
    """``numerics.root_method: newton``: each refresh's roots come from one batched coupled Newton run per
    factor shape (no eigh dispatched), match the float64 eigh reference, and every parameter moves."""
    torch.manual_seed(0)
    model = Net(layers=4)
    cfg = {**_cfg("shampoo"), "numerics": {"root_method": "newton"}}
    pre = Preconditioner(model, cfg)
    assert all(s.root_method == "newton" for s in pre.states.values())
    before = [p.detach().clone() for p in model.parameters()]
    rho = pre.cfg.damping.value
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(5):
        _backward(model, t)
        with _CountOps() as ops:
            assert pre.step()
        opt.step()
        assert ops.ops["aten._linalg_eigh.default"] == 0, f"step {t}: eigh ran"
        if t in (0, 1, 2, 4):
            # Newton stops at ||M - I||_F <= 100 ulps sqrt(n): about 1e-5 relative on the root.
            for bid, state in pre.states.items():
                for key, value in _shampoo_reference(state, rho).items():
                    scale = float(value.abs().max())
                    torch.testing.assert_close(getattr(state, key).double(), value, rtol=1e-3, atol=1e-4 * scale,
                                               msg=f"step {t}: {bid}/{key}")  # fmt: skip
    assert pre.counters["curvature_refreshes"] == 4 and pre.counters["inverse_failures"] == 0
    assert all(n == 5 for n in pre.block_preconditioned.values())
    for (name, p), b in zip(model.named_parameters(), before, strict=True):
        assert not torch.equal(p.detach(), b), f"{name} did not move"


def test_newton_failure_in_a_batch_goes_straight_to_eigh(monkeypatch):
    """A matrix the batched Newton iteration fails on (indefinite: it diverges) gets the eigh root, and
    Newton is not run on it a second time; its converged neighbours keep their Newton roots."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 30, generator=g)
    good = x @ x.T / 30
    indefinite = good - 0.3 * torch.ones(10, 10)
    assert float(torch.linalg.eigvalsh(indefinite)[0]) < 0
    reqs = [Request(f"m{i}", m, ROOT, 0.1, 4, "newton") for i, m in enumerate((good, indefinite, good))]
    newton_calls = []
    real = batched_refresh.coupled_newton_inverse_root
    monkeypatch.setattr(batched_refresh, "coupled_newton_inverse_root",
                        lambda m, *a, **k: newton_calls.append(m.shape) or real(m, *a, **k))  # fmt: skip
    monkeypatch.setattr(linalg, "coupled_newton_inverse_root",
                        lambda m, *a, **k: newton_calls.append(m.shape) or real(m, *a, **k))  # fmt: skip
    out = solve(reqs, torch.float32, True)
    assert newton_calls == [(3, 10, 10)]
    for r, got in zip(reqs, out, strict=True):
        ref = _spd_power(r.matrix, 0.1, -0.25)  # eigenvalues clamped at zero before damping
        torch.testing.assert_close(got.double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
