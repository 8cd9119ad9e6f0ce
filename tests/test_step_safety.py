"""No silent gradient loss, no movement on a skipped step, clipping before preconditioning, KL-clip, seeded PSGD.

Each test here failed on the code before these fixes:
- a weight used functionally (``nn.MultiheadAttention.out_proj``, ``F.linear(x, self.proj.weight)``) had
  its gradient zeroed because its module's forward hook never fired;
- a step skipped for non-finite gradients still moved the weights through momentum / Adam state;
- the trainer clipped the preconditioned direction, which shrank a grafted Shampoo step;
- PSGD drew its probes from the global RNG.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds_soo.config import ConfigError
from ds_soo.optim import SecondOrderOptimizer
from ds_soo.preconditioner import Preconditioner

METHODS = ["kfac", "shampoo", "psgd"]


def _cfg(method: str, **extra) -> dict:
    # The KL-clip is off unless a test asks for it: most have no base optimizer to resolve "auto" from.
    kfac = {"kl_clip": None, **extra.pop("kfac", {})}
    return {"method": method, "damping": {"value": 1e-3}, "schedule": {"warm_steps": 100, "warm_interval": 1},
            "kfac": kfac, **extra}  # fmt: skip


class Functional(nn.Module):
    """An MHA (out_proj applied functionally by F.multi_head_attention_forward) and a Linear whose
    weight is used through F.linear by its parent, never through its own forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h, _ = self.mha(h, h, h, need_weights=False)
        h = torch.tanh(F.linear(h, self.proj.weight, self.proj.bias))
        return self.head(h.mean(dim=1))


def _backward(model: nn.Module, seed: int, nan: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 4, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    if nan:
        x[0, 0, 0] = float("nan")
    F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("method", METHODS)
def test_functionally_used_weights_keep_their_gradient(method):
    torch.manual_seed(0)
    model = Functional()
    pre = Preconditioner(model, _cfg(method))
    _backward(model, 1)
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert before["mha.out_proj.weight"].abs().max() > 1e-4 and before["proj.weight"].abs().max() > 1e-4
    pre.step()
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0, f"{method}: the gradient of {name} was zeroed"
    if method == "kfac":
        # out_proj falls through at construction (named in describe()); proj's hook never runs, so its
        # gradient goes to the base optimizer unchanged, counted and shown.
        assert "mha.out_proj.weight" in pre.fall_through and "out_proj" in pre.describe()
        for name in ("mha.out_proj.weight", "mha.out_proj.bias", "proj.weight", "proj.bias"):
            assert torch.equal(model.get_parameter(name).grad, before[name]), name
        assert pre.counters["uncaptured_passthrough"] == 1 and "proj" in pre.describe()
        assert not torch.equal(model.inp.weight.grad, before["inp.weight"])  # the others are preconditioned


def _state_snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    sd = copy.deepcopy(opt.state_dict())
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "opt": sd}


def _assert_same(a: dict, b: dict) -> None:
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), f"weight {n} moved on a skipped step"
    sa, sb = a["opt"]["state"], b["opt"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for key, v in sa[k].items():
            w = sb[k][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, f"optimizer state {k}.{key} changed"


@pytest.mark.parametrize("base", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_skipped_step_leaves_weights_and_optimizer_state_bitwise(base, method):
    torch.manual_seed(0)
    model = Functional()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if base == "sgd_momentum"
           else torch.optim.AdamW(model.parameters(), lr=1e-2))  # fmt: skip
    pre = Preconditioner(model, _cfg(method, **({"shampoo": {"grafting": "sgd"}} if method == "shampoo" else {})))
    sopt = SecondOrderOptimizer(opt, pre)
    for step in range(2):
        sopt.zero_grad()
        _backward(model, step)
        sopt.step()
    snap = _state_snapshot(model, opt)
    sopt.zero_grad()
    _backward(model, 7, nan=True)
    sopt.step()
    assert pre.last_step_skipped and pre.counters["skipped_nonfinite"] == 1
    _assert_same(snap, _state_snapshot(model, opt))


def test_trainer_engine_skipped_step_is_bitwise_noop():
    from ds_soo.trainer.engine import EngineLoop

    torch.manual_seed(0)
    model = Functional()
    engine = EngineLoop(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
                        lambda m: Preconditioner(m, _cfg("kfac")), torch.device("cpu"), grad_clip=1.0)  # fmt: skip
    for step in range(2):
        engine.zero_grad()
        _backward(engine.model, step)
        engine.step()
    snap = _state_snapshot(engine.model, engine.optimizer)
    engine.zero_grad()
    _backward(engine.model, 9, nan=True)
    engine.step()
    assert engine.preconditioner.last_step_skipped
    _assert_same(snap, _state_snapshot(engine.model, engine.optimizer))


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).to(dtype)


def _mlp_backward(model: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 4, generator=g)
    dtype = next(model.parameters()).dtype
    x, y = x.to(dtype), y.to(dtype)
    (scale * F.mse_loss(model(x), y)).backward()


def _close64(got: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """Path against path on float64 models (float64 state): round-off ~1e-15 on every CPU, so 1e-10 of
    the reference's largest entry separates it from any real difference."""
    assert got.dtype == torch.float64 and ref.dtype == torch.float64, msg
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * float(ref.abs().max()), msg=msg)


def _raw_norm(model: nn.Module) -> float:
    return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())


def test_grafted_shampoo_step_unchanged_by_a_clip_above_the_raw_norm():
    """Adam-grafted Shampoo's direction has norm ~sqrt(#params); clipping the raw gradient at a norm
    above the raw norm must change nothing (the old trainer clipped the direction itself)."""
    from ds_soo.trainer.engine import EngineLoop

    updates = {}
    for clip in (0.0, "above"):
        model = _mlp()
        _mlp_backward(model)
        raw = _raw_norm(model)
        model.zero_grad()
        value = 0.0 if clip == 0.0 else 2.0 * raw
        cfg = _cfg("shampoo", shampoo={"grafting": "adam"})
        engine = EngineLoop(model, lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
                            lambda m, c=cfg: Preconditioner(m, c), torch.device("cpu"), grad_clip=value)  # fmt: skip
        w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        _mlp_backward(model)
        engine.step()
        updates[clip] = {n: w0[n] - p.detach() for n, p in model.named_parameters()}
        direction = float(torch.cat([u.reshape(-1) for u in updates[clip].values()]).norm()) / 0.1
        assert direction > 3 * value or clip == 0.0  # the grafted direction is far longer than the clip
    for n in updates[0.0]:
        assert torch.equal(updates[0.0][n], updates["above"][n]), n


def test_clip_acts_on_the_raw_gradient_before_preconditioning():
    clip = 0.05
    model, twin = _mlp(torch.float64), _mlp(torch.float64)
    pre = Preconditioner(model, _cfg("kfac", grad_clip=clip))
    ref = Preconditioner(twin, _cfg("kfac"))
    _mlp_backward(model)
    _mlp_backward(twin)
    raw = _raw_norm(twin)
    assert raw > 4 * clip
    pre.step()
    # Reference: the raw gradient scaled to norm clip, then preconditioned by the same factors.
    with torch.no_grad():
        for p in twin.parameters():
            p.grad.mul_(clip / (raw + 1e-6))
    ref.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        _close64(p.grad, q.grad)
    assert pre.counters["clipped_steps"] == 1 and pre.last_grad_norm == pytest.approx(raw, rel=1e-12)


def test_config_clip_and_caller_clip_must_agree():
    pre = Preconditioner(_mlp(), _cfg("kfac", grad_clip=1.0))
    pre.set_hyperparams(grad_clip=1.0)
    with pytest.raises(ConfigError, match="grad_clip"):
        pre.set_hyperparams(grad_clip=0.5)


def test_kfac_kl_clip_scales_the_step_like_kaisa():
    lr, kl = 0.5, 1e-4
    model, twin = _mlp(), _mlp()
    auto = {"kl_clip": "auto"}
    pre = Preconditioner(model, _cfg("kfac", kfac=auto))
    opt = SecondOrderOptimizer(torch.optim.SGD(model.parameters(), lr=lr), pre)
    assert opt.preconditioner.kl_clip() == pytest.approx(1e-3)  # "auto": on over an SGD base
    opt.preconditioner.cfg.kfac.kl_clip = kl
    off = Preconditioner(twin, _cfg("kfac", kfac={"kl_clip": None}))
    _mlp_backward(model)
    _mlp_backward(twin)
    raw = [p.grad.clone() for p in twin.parameters()]
    off.step()
    pg = [p.grad.clone() for p in twin.parameters()]
    vg = sum(float((a.double() * b.double()).sum()) for a, b in zip(pg, raw, strict=True)) * lr**2
    nu = min(1.0, (kl / vg) ** 0.5)
    assert nu < 0.5
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.preconditioner.last_kl_scale == pytest.approx(nu, rel=1e-4)
    for w, p, g in zip(w0, model.parameters(), pg, strict=True):
        torch.testing.assert_close(w - p.detach(), lr * nu * g, rtol=1e-4, atol=1e-7)
    # Over Adam, "auto" leaves it off.
    adam = SecondOrderOptimizer(torch.optim.Adam(_mlp().parameters()), Preconditioner(_mlp(), _cfg("kfac", kfac=auto)))
    assert adam.preconditioner.kl_clip() is None


def test_kl_clip_without_a_learning_rate_names_the_field():
    model = _mlp()
    pre = Preconditioner(model, _cfg("kfac", kfac={"kl_clip": 1e-3}))
    _mlp_backward(model)
    with pytest.raises(ConfigError, match="kl_clip"):
        pre.step()


def _psgd_run(global_seed: int, psgd_seed: int = 0) -> dict[str, torch.Tensor]:
    model = _mlp()
    pre = Preconditioner(model, _cfg("psgd", psgd={"seed": psgd_seed}))
    torch.manual_seed(global_seed)
    for step in range(3):
        model.zero_grad()
        _mlp_backward(model, step)
        pre.step()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_psgd_probes_do_not_depend_on_the_global_rng():
    a, b = _psgd_run(1), _psgd_run(2)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    c = _psgd_run(1, psgd_seed=5)  # the config seed does change them
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # and fitting leaves the global stream (data order, dropout) alone
    model = _mlp()
    pre = Preconditioner(model, _cfg("psgd"))
    _mlp_backward(model)
    torch.manual_seed(0)
    pre.step()
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(3))


@pytest.mark.parametrize("accum", [1, 2])
def test_trainer_feeds_the_mc_fisher(tmp_path, accum):
    """kfac.fisher: mc in a trainer config used to never precondition (0 steps, refreshes counted as
    failures); the trainer now runs the sampled-label backward on every micro-batch."""
    import json
    from pathlib import Path

    from ds_soo.train import main

    digits = str(Path(__file__).resolve().parent.parent / "configs" / "digits_vit.yaml")
    args = ["--config", digits, "--out", str(tmp_path), "--quiet", "model.hidden_size=16", "model.num_layers=1",
            "train.batch_size=32", "train.epochs=null", "train.steps=2", "train.progress=false",
            "train.num_threads=1", "optim.name=kfac", "optim.lr=0.05", "precond.schedule.warm_steps=10",
            "precond.schedule.warm_interval=1", "precond.kfac.fisher=mc", f"train.grad_accum={accum}"]  # fmt: skip
    assert main(args) == 0
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["preconditioned_steps"] == 2 and m["inverse_failures"] == 0 and m["stats_updates"] == 2


def test_mc_fisher_loss_is_scaled_like_the_training_loss():
    """Two micro-batches with loss_scale 1/2 give the G of one batch of both (same sampled labels)."""
    torch.manual_seed(0)
    x = torch.randn(8, 5, dtype=torch.float64)
    cfg = _cfg("kfac", kfac={"fisher": "mc", "ema_decay": 0.5})
    models = [nn.Sequential(nn.Linear(5, 4)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    pres = [Preconditioner(m, cfg) for m in models]
    # One batch of 8 ...
    logits = models[0](x)
    pres[0].mc_fisher_backward(logits, generator=torch.Generator().manual_seed(3))
    logits.sum().backward()
    pres[0].step()
    # ... and two micro-batches of 4, whose training loss would get 1/2 each; labels drawn identically.
    draws = torch.multinomial(torch.softmax(models[0](x).detach(), -1), 1,
                              generator=torch.Generator().manual_seed(3)).squeeze(1)  # fmt: skip
    for half in (slice(0, 4), slice(4, 8)):
        lg = models[1](x[half])
        pre = pres[1]
        original = torch.multinomial
        torch.multinomial = lambda probs, n, generator=None, h=half: draws[h].unsqueeze(1)
        try:
            pre.mc_fisher_backward(lg, loss_scale=0.5)
        finally:
            torch.multinomial = original
        (lg.sum() * 0.5).backward()
    pres[1].step()
    _close64(pres[1].states["0"].g, pres[0].states["0"].g)
