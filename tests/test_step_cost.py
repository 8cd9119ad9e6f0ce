"""What a step costs the host: a sparse step (no refresh due) reads back at most one value.

A host synchronisation stalls the accelerator's queue, so a sparse step keeps its decisions (non-finite
skip, unused blocks, non-finite results, raw-gradient clipping, KL-clip) on the device as masks and
reads them back together once. Counted with a ``TorchDispatchMode`` (``aten._local_scalar_dense`` is
behind ``.item()`` and ``bool(tensor)``) plus ``Tensor.tolist``/``Tensor.item`` calls, which on CPU
read memory without dispatching. The deferred decisions must equal the host-side ones exactly (the
same counters, skips and masks as a run deciding on the host as it goes, block by block); gradients and
state agree to fp32 round-off, since equal-shaped blocks are batched (``bmm``) on sparse steps.

Batching: for 4 and 16 identical layers a sparse step dispatches the same number of ops (within 20%).
"""

from __future__ import annotations

import collections
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ds_soo.preconditioner import Preconditioner

METHODS = ["kfac", "shampoo", "psgd"]


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class _CountHostReads:
    """Counts ``Tensor.tolist`` and ``Tensor.item`` calls (host reads that bypass the dispatcher on CPU)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)

            def wrapped(t, *a, _original=original, **k):
                self.count += 1
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


class Net(nn.Module):
    """Identical layers; ``skip`` leaves one layer out of the forward (an unused block, zero gradient)."""

    def __init__(self, layers: int = 4, width: int = 8, conv1d: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        if conv1d:  # GPT-2's Conv1D: the weight stored (in, out)
            from transformers.pytorch_utils import Conv1D

            self.hidden = nn.ModuleList(Conv1D(width, width) for _ in range(layers))
            for layer in self.hidden:
                nn.init.normal_(layer.weight, std=0.4)
        else:
            self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, 3)
        self.skip: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        for i, layer in enumerate(self.hidden):
            if i != self.skip:
                h = torch.tanh(layer(h))
        return self.out(self.norm(h))


def _cfg(method: str, **extra) -> dict:
    # Refreshes on steps 0 and 1 (warm), then all blocks together at step 2 and never again: every later
    # step is sparse; statistics every second step.
    return {"method": method, "damping": {"value": 1e-3, "lr": 0.1}, "grad_clip": 0.5,
            "schedule": {"warm_steps": 2, "warm_interval": 1, "sparse_interval": 1000, "stats_sparse_interval": 2,
                         "stagger": False},
            **extra}  # fmt: skip


def _backward(model: Net, seed: int, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    x = x.to(next(model.parameters()).dtype)
    if nan:
        x[0, 0] = float("nan")
    model.zero_grad(set_to_none=False)  # unused layers keep an exactly-zero gradient, as under ZeRO and FSDP2
    F.cross_entropy(model(x), y).backward()


def _extra(method: str) -> dict:
    return {"kfac": {"kl_clip": 1e-4}} if method == "kfac" else {}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stats", [True, False])
def test_sparse_step_reads_the_host_at_most_once(method, stats, monkeypatch):
    if method == "psgd" and stats:
        pytest.skip("PSGD fits its preconditioner on every statistics step: that is its refresh")
    torch.manual_seed(0)
    model = Net()
    pre = Preconditioner(model, _cfg(method, **_extra(method)))
    for t in range(4):
        _backward(model, t)
        pre.step()
    if not stats:  # step 4 gathers statistics, step 5 does not
        _backward(model, 4)
        pre.step()
    assert pre._stats_now is stats
    model.skip = 2  # one unused block too
    _backward(model, 9)
    reads = _CountHostReads(monkeypatch)
    with _CountOps() as ops:
        assert pre.step()
    monkeypatch.undo()
    syncs = ops.ops["aten._local_scalar_dense.default"] + reads.count
    assert syncs <= 1, (ops.ops["aten._local_scalar_dense.default"], reads.count)
    assert pre.counters["clipped_steps"] > 0 and pre.last_grad_norm is not None
    if method == "kfac":
        assert pre.last_kl_scale is not None


def _assert_close(got: torch.Tensor | None, ref: torch.Tensor | None, msg: str) -> None:
    if ref is None or got is None:
        assert got is None and ref is None, msg
        return
    # Path against path in float64 (both models are float64): round-off ~1e-15 on every CPU.
    atol = 1e-11 * float(ref.nan_to_num().abs().max()) + 1e-14
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=atol, equal_nan=True, msg=msg)


def _all_on_host(pre: Preconditioner) -> Preconditioner:
    """The same preconditioner taking every decision on the host as it goes, block by block."""
    pre._host_decisions_now = lambda t, stats_now: True
    pre.batch_equal_blocks = False
    return pre


@pytest.mark.parametrize(("method", "conv1d"), [(m, False) for m in METHODS] + [("kfac", True)])
@pytest.mark.parametrize("interval", [1000, 3])
def test_deferred_decisions_equal_host_decisions(method, conv1d, interval, monkeypatch):
    """Sparse steps with an unused layer (also on its first statistics step), a non-finite step, clipping
    and KL-clip: counters and decisions equal a run deciding everything on the host block by block;
    gradients and state agree to float64 round-off (a float64 model; the batched path multiplies in
    another schedule).
    ``interval`` 3 refreshes between sparse steps: the batched path must use the new inverses. Those
    refreshes are staggered (the default): a step refreshing one hidden layer batches the others."""
    import ds_soo.batched as batched

    seen: list[tuple[bool, int]] = []  # (transient, blocks) of every group made
    make_group = batched.make_group

    def spy(method, blocks, states, transient=False):
        seen.append((transient, len(blocks)))
        return make_group(method, blocks, states, transient)

    monkeypatch.setattr(batched, "make_group", spy)
    torch.manual_seed(0)
    model = Net(conv1d=conv1d).double()
    twin = copy.deepcopy(model)
    cfg = _cfg(method, **_extra(method))
    cfg["schedule"].update(sparse_interval=interval, stagger="sparse")
    pre, ref = Preconditioner(model, cfg), _all_on_host(Preconditioner(twin, cfg))
    plan = {0: 3, 1: 3, 2: 3, 3: None, 4: 1, 5: None, 6: "nan", 7: None, 8: "nan", 9: 0, 10: None, 11: None}
    for t, what in plan.items():
        for m in (model, twin):
            m.skip = what if isinstance(what, int) else None
            _backward(m, t, nan=what == "nan")
        assert pre.step() == ref.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            _assert_close(p.grad, q.grad, f"step {t}: {n}")
        assert pre.counters == ref.counters, t
        assert pre.block_preconditioned == ref.block_preconditioned, t
        assert pre.last_step_skipped == ref.last_step_skipped and pre.last_grad_norm == ref.last_grad_norm
        assert (pre.last_kl_scale is None) == (ref.last_kl_scale is None)
        if ref.last_kl_scale is not None:
            assert pre.last_kl_scale == pytest.approx(ref.last_kl_scale, rel=1e-10)
        mine, theirs = pre.state_dict()["blocks"], ref.state_dict()["blocks"]
        for bid, sd in theirs.items():
            for key, value in sd.items():
                other = mine[bid][key]
                if isinstance(value, torch.Tensor) or value is None:
                    _assert_close(other, value, f"step {t}: {bid}/{key}")
                else:
                    assert other == value, (t, bid, key)
    assert pre.counters["skipped_nonfinite"] == 2
    assert pre.counters["preconditioned_steps"] == 10
    if interval == 3 and method != "psgd":
        # Every step refreshes a hidden layer or two (staggered over 3 steps): the others stayed batched,
        # in one-step groups that were not kept (PSGD fits on statistics steps instead).
        assert any(tr and n >= 2 for tr, n in seen), f"no refresh step batched the blocks not due: {seen}"
    else:
        # The sparse steps did go through the batched path (equal hidden layers form one group).
        assert any(len(g.bids) >= 3 and g.transposed == conv1d for g in pre._groups.values())
    assert all(not g.transient for g in pre._groups.values())


def _sparse_step_ops(method: str, layers: int, stats: bool) -> collections.Counter[str]:
    torch.manual_seed(0)
    model = Net(layers=layers, width=16)
    pre = Preconditioner(model, _cfg(method, **_extra(method)))
    for t in range(4 if stats else 5):
        _backward(model, t)
        pre.step()
    assert pre._stats_now is stats
    _backward(model, 9)
    with _CountOps() as ops:
        assert pre.step()
    return ops.ops


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("stats", [True, False])
def test_sparse_step_ops_do_not_grow_with_equal_layers(method, stats):
    """Equal-shaped blocks are preconditioned (and their statistics updated) as batched ops."""
    if method == "psgd" and stats:
        pytest.skip("PSGD fits its preconditioner on every statistics step: that is its refresh")
    few, many = (sum(_sparse_step_ops(method, n, stats).values()) for n in (4, 16))
    assert many <= 1.2 * few, (few, many)


class TokenNet(nn.Module):
    """Equal ``nn.Linear`` layers applied to every token of an example (KFC: trace-corrected G)."""

    def __init__(self, layers: int = 4, width: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(5, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 5); one loss term per example
        h = torch.tanh(self.inp(x))
        for layer in self.hidden:
            h = torch.tanh(layer(h))
        return self.out(h).mean(dim=1)


def _token_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)


def _fisher_traces(model: TokenNet, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Each hidden layer's empirical-Fisher trace mean_m ||d l_m / d [W, b]||^2, by per-example autograd."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p, xm, ym):
        return F.cross_entropy(torch.func.functional_call(model, p, (xm[None],)), ym[None])

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return [
        float((per[f"hidden.{i}.weight"].pow(2).sum((1, 2)) + per[f"hidden.{i}.bias"].pow(2).sum(1)).mean())
        for i in range(len(model.hidden))
    ]


def test_batched_statistics_keep_the_trace_correction(monkeypatch):
    """K-FAC statistics folded in as batched ops on sparse steps rescale G exactly as block by block.

    A float64 model of equal token layers (KFC, ``kfac.trace_correction`` on) over statistics steps and
    refreshes: gradients and factors equal a run deciding on the host block by block (no batching), and
    on each batched statistics step the new factors' tr(A) tr(G) is the exact per-example Fisher trace
    (the correction is not a no-op there), and a sparse step still reads the host at most once."""
    import ds_soo.batched as batched

    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (A, raw G, corrected G) per call
    raw_g: list[torch.Tensor] = []
    step_factors, stats = batched.kfac_step_factors, batched.kfac_stats

    def spy_factors(accs, device):
        a, g, trace = step_factors(accs, device)
        raw_g.append(g.clone())
        return a, g, trace

    def spy_stats(states, a, g, ok):
        seen.append((a.clone(), raw_g[-1], g.clone()))
        return stats(states, a, g, ok)

    monkeypatch.setattr(batched, "kfac_step_factors", spy_factors)
    monkeypatch.setattr(batched, "kfac_stats", spy_stats)
    torch.manual_seed(0)
    model = TokenNet().double()
    twin = copy.deepcopy(model)
    schedule = {"warm_steps": 2, "warm_interval": 1, "sparse_interval": 5, "stats_sparse_interval": 2}
    cfg = {"method": "kfac", "damping": {"value": 1e-3}, "kfac": {"trace_correction": True, "kl_clip": None},
           "schedule": schedule}
    pre, ref = Preconditioner(model, cfg), _all_on_host(Preconditioner(twin, cfg))
    checked = 0
    for t in range(12):
        x, y = _token_batch(t)
        for m in (model, twin):
            m.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        calls, sparse = len(seen), not pre._host_decisions_now(t, pre._stats_now)
        with pytest.MonkeyPatch.context() as mp, _CountOps() as ops:
            reads = _CountHostReads(mp)
            assert pre.step()
        if sparse:  # the correction is computed on the device: still one host read
            assert ops.ops["aten._local_scalar_dense.default"] + reads.count <= 1, t
        assert ref.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
            _assert_close(p.grad, q.grad, f"step {t}: {n}")
        for bid, state in ref.states.items():
            _assert_close(pre.states[bid].a, state.a, f"step {t}: {bid}/a")
            _assert_close(pre.states[bid].g, state.g, f"step {t}: {bid}/g")
        assert pre.counters == ref.counters, t
        if len(seen) > calls:  # a batched statistics step: the hidden layers are one group of 4
            # On a copy without the preconditioner's hooks, which would capture statistics under vmap.
            plain = TokenNet(len(model.hidden), model.inp.out_features).double()
            plain.load_state_dict(model.state_dict())
            exact = _fisher_traces(plain, x, y)
            ((a, g_raw, g),) = [call for call in seen[calls:] if call[0].shape[0] == len(exact)]
            for j, fisher in enumerate(exact):
                kron = float(torch.trace(a[j].double())) * float(torch.trace(g[j].double()))
                assert kron == pytest.approx(fisher, rel=1e-5), (t, j)
                assert abs(float(torch.trace(g[j]) / torch.trace(g_raw[j])) - 1.0) > 1e-2, (t, j)
            checked += 1
    assert checked >= 3 and pre.counters["curvature_refreshes"] >= 3
    assert any(len(g.bids) == len(model.hidden) for g in pre._groups.values())  # preconditioned batched too
