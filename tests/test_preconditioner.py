"""The Preconditioner end to end on one process: it really ran, non-finite handling, gradient
accumulation, checkpoints, bf16 autocast, the MC Fisher and the optimizer wrapper."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from ds_soo.config import ConfigError
from ds_soo.distributed.layout import LocalGradientAccess
from ds_soo.optim import SecondOrderOptimizer
from ds_soo.preconditioner import Preconditioner

F64 = torch.float64
# The KL-clip is off unless a test asks for it: most of these have no base optimizer to resolve "auto" from.
KFAC = {"method": "kfac", "kfac": {"ema_decay": 0.8, "kl_clip": None}, "damping": {"value": 0.01},
        "schedule": {"warm_steps": 100}}


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(seed: int, n: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def _backward(model, x, y, scale: float = 1.0):
    (nn.functional.mse_loss(model(x), y) * scale).backward()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _factors(pre) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {b: (s.a.clone(), s.g.clone()) for b, s in pre.states.items()}


# ----------------------------------------------------------------------------- 8: it really ran


def test_preconditioning_ran_and_changed_the_gradient():
    model = _mlp()
    pre = Preconditioner(model, {**KFAC, "schedule": {"warm_steps": 100, "warm_interval": 2}})
    for step in range(3):
        model.zero_grad()
        _backward(model, *_data(step))
        raw = _grads(model)
        assert pre.step() is True
        new = _grads(model)
        for name in raw:
            assert not torch.allclose(new[name], raw[name], rtol=1e-3, atol=0), name
    c = pre.counters
    assert c["optimizer_steps"] == 3 and c["preconditioned_steps"] == 3 and c["stats_updates"] == 3
    assert c["curvature_refreshes"] == 2  # steps 0 and 2 with warm_interval 2
    assert pre.block_refreshes == {"0": 2, "2": 2} and pre.block_preconditioned == {"0": 3, "2": 3}
    assert c["inverse_failures"] == 0 and c["skipped_nonfinite"] == 0
    m = pre.metrics()
    assert m["preconditioned_steps"] == 3.0 and m["damping"] == 0.01 and m["steps_since_refresh"] == 1.0
    assert m["curvature_bytes"] > 0


def test_method_none_leaves_gradients_alone():
    model = _mlp()
    pre = Preconditioner(model, {"method": "none"})
    _backward(model, *_data(0))
    raw = _grads(model)
    assert pre.step() is False
    assert all(torch.equal(raw[n], g) for n, g in _grads(model).items())
    assert pre.counters["preconditioned_steps"] == 0
    assert "method is 'none'" in pre.describe()


def _tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=13,
        n_positions=8,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    return model


def test_describe_gpt2_tied_embedding_falls_through_conv1d_preconditioned():
    model = _tiny_gpt2()
    pre = Preconditioner(model, KFAC)
    text = pre.describe()
    pre_lines = [ln for ln in text.splitlines() if ln.strip().startswith("preconditioned")]
    fall_lines = [ln for ln in text.splitlines() if ln.strip().startswith("base optimizer")]
    conv1d = [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert sorted(b.block_id for b in pre.blocks) == sorted(conv1d)
    for name in conv1d:
        assert any(f" {name} " in ln for ln in pre_lines), name
    # lm_head is an nn.Linear but its weight is wte's: it must fall through, named as tied.
    tied = [ln for ln in fall_lines if "transformer.wte.weight" in ln]
    assert len(tied) == 1 and "tied" in tied[0] and "lm_head.weight" in tied[0]
    assert not any("lm_head" in ln or "wte" in ln for ln in pre_lines)
    for name in (
        "transformer.wpe.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.h.0.ln_1.bias",
        "transformer.ln_f.weight",
    ):
        assert any(name in ln for ln in fall_lines), name

    # One real step: Conv1D grads change, fall-through grads are bitwise untouched.
    ids = torch.randint(0, 13, (3, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    raw = _grads(model)
    assert pre.step()
    new = _grads(model)
    assert pre.counters["preconditioned_steps"] == 1
    assert pre.block_preconditioned == dict.fromkeys(conv1d, 1)
    for name in raw:
        if any(name.startswith(c + ".") for c in conv1d):
            assert not torch.allclose(new[name], raw[name], rtol=1e-3, atol=0), name
        else:
            assert torch.equal(new[name], raw[name]), name


# ----------------------------------------------------------------------------- 6: non-finite


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_skips_step_and_base_update(bad):
    model = _mlp()
    pre = Preconditioner(model, {**KFAC, "schedule": {"warm_steps": 100, "warm_interval": 1}})
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    opt = SecondOrderOptimizer(base, pre)
    _backward(model, *_data(0))
    opt.step()
    opt.zero_grad()
    factors = _factors(pre)
    inverses = {b: (s.a_inv.clone(), s.g_inv.clone()) for b, s in pre.states.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {id(p): base.state[p]["momentum_buffer"].clone() for p in model.parameters()}

    _backward(model, *_data(1))
    model[2].weight.grad[1, 2] = bad
    opt.step()
    assert pre.last_step_skipped
    assert pre.counters["skipped_nonfinite"] == 1
    assert pre.counters["stats_updates"] == 1 and pre.counters["preconditioned_steps"] == 1
    assert pre.counters["optimizer_steps"] == 2
    for p in model.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0
        assert torch.equal(base.state[p]["momentum_buffer"], momentum[id(p)])
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    for b, (a, g) in factors.items():
        assert torch.equal(pre.states[b].a, a) and torch.equal(pre.states[b].g, g)
        assert torch.equal(pre.states[b].a_inv, inverses[b][0]) and torch.equal(pre.states[b].g_inv, inverses[b][1])

    # The next finite step proceeds normally.
    opt.zero_grad()
    _backward(model, *_data(2))
    opt.step()
    assert not pre.last_step_skipped and pre.counters["preconditioned_steps"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_activation_statistics_are_dropped():
    model = _mlp()
    pre = Preconditioner(model, KFAC)
    _backward(model, *_data(0))
    pre.step()
    factors = _factors(pre)

    model.zero_grad()
    # A stray training-mode forward on corrupt data (never backpropagated) pollutes A only...
    x_bad = torch.full((2, 6), float("inf"))
    model(x_bad)
    # ... while the real forward/backward is finite.
    _backward(model, *_data(1))
    raw = _grads(model)
    assert all(torch.isfinite(g).all() for g in raw.values())
    assert pre.step()
    assert pre.counters["stats_updates"] == 1  # the step's statistics were dropped, not folded in
    assert pre.counters["skipped_nonfinite"] == 0
    for b, (a, g) in factors.items():
        assert torch.equal(pre.states[b].a, a) and torch.equal(pre.states[b].g, g)
    assert all(torch.isfinite(g).all() for g in _grads(model).values())


# ----------------------------------------------------------------------------- 7: accumulation


def test_gradient_accumulation_updates_curvature_once_and_matches_full_batch():
    """float64 models and data (float64 factors): only the summation order differs between the two
    paths, ~1e-16 relative on every CPU, so 1e-10 of each tensor's largest entry is a tight bound."""
    x, y = (t.to(F64) for t in _data(5, n=16))
    acc_model, full_model = _mlp(1).to(F64), _mlp(1).to(F64)
    acc_pre, full_pre = Preconditioner(acc_model, KFAC), Preconditioner(full_model, KFAC)
    for k in range(4):
        _backward(acc_model, x[4 * k : 4 * k + 4], y[4 * k : 4 * k + 4], scale=0.25)
    assert acc_pre.counters["stats_updates"] == 0  # nothing folded in per micro-batch
    _backward(full_model, x, y)
    acc_pre.step()
    full_pre.step()
    assert acc_pre.counters["stats_updates"] == 1 == full_pre.counters["stats_updates"]
    assert acc_pre.counters["preconditioned_steps"] == 1

    def close(got, ref, msg):
        assert got.dtype == F64 and ref.dtype == F64, msg
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item(), msg=msg)

    for b in full_pre.states:
        sa, sf = acc_pre.states[b], full_pre.states[b]
        close(sa.a, sf.a, f"{b}/a")
        close(sa.g, sf.g, f"{b}/g")
    ga, gf = _grads(acc_model), _grads(full_model)
    for n in gf:
        close(ga[n], gf[n], n)


# ----------------------------------------------------------------------------- 9: checkpoints


@pytest.mark.parametrize(
    "cfg",
    [
        KFAC,
        {
            "method": "shampoo",
            "shampoo": {"grafting": "adam", "max_preconditioner_dim": 4},
            "damping": {"value": 0.01},
            "schedule": {"warm_steps": 100, "warm_interval": 2},
        },
        {"method": "psgd", "schedule": {"warm_steps": 100}},
    ],
    ids=["kfac", "shampoo", "psgd"],
)
def test_state_dict_round_trip_gives_identical_next_gradient(cfg):
    model = _mlp(2)
    pre = Preconditioner(model, cfg)
    for s in range(3):
        model.zero_grad()
        _backward(model, *_data(10 + s))
        torch.manual_seed(100 + s)
        pre.step()
    buf = io.BytesIO()
    torch.save(pre.state_dict(), buf)
    buf.seek(0)
    clone_model = copy.deepcopy(model)
    fresh = Preconditioner(clone_model, cfg)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.counters == pre.counters

    for m in (model, clone_model):
        m.zero_grad()
        _backward(m, *_data(20))
    torch.manual_seed(7)
    pre.step()
    torch.manual_seed(7)
    fresh.step()
    g1, g2 = _grads(model), _grads(clone_model)
    raw = copy.deepcopy(clone_model)
    raw.zero_grad()
    _backward(raw, *_data(20))
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
        assert not torch.equal(g1[n], _grads(raw)[n]), n
    assert fresh.counters == pre.counters


def test_load_state_dict_rejects_other_method():
    model = _mlp()
    sd = Preconditioner(model, KFAC).state_dict()
    other = Preconditioner(_mlp(), {"method": "shampoo"})
    with pytest.raises(Exception, match="kfac"):
        other.load_state_dict(sd)


def test_optimizer_wrapper_state_dict_round_trip():
    model = _mlp(3)
    opt = SecondOrderOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), Preconditioner(model, KFAC))
    for s in range(2):
        opt.zero_grad()
        _backward(model, *_data(s))
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = SecondOrderOptimizer(torch.optim.AdamW(model2.parameters(), lr=1e-2), Preconditioner(model2, KFAC))
    opt2.load_state_dict(sd)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        _backward(m, *_data(9))
        o.step()
    for (n, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), n


def test_optimizer_wrapper_applies_preconditioned_gradient():
    model = _mlp(4)
    twin = copy.deepcopy(model)
    cfg = {**KFAC, "kfac": {"ema_decay": 0.8, "kl_clip": "auto"}}
    opt = SecondOrderOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), Preconditioner(model, cfg))
    pre_twin = Preconditioner(twin, cfg)
    pre_twin.set_base_optimizer(torch.optim.SGD(twin.parameters(), lr=0.5))  # the same KL-clip ("auto": on)
    pre_twin.set_hyperparams(lr=0.5)
    x, y = _data(3)
    _backward(model, x, y)
    _backward(twin, x, y)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    pre_twin.step()
    assert opt.preconditioner.cfg.damping.lr == 0.5  # the base lr reaches the damping rule
    for (n, p), pt in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * pt.grad, rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------- 12: bf16 autocast


def test_bf16_autocast_keeps_factors_fp32():
    model = _mlp(5)
    pre = Preconditioner(model, KFAC)
    x, y = _data(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        assert out.dtype == torch.bfloat16
        loss = nn.functional.mse_loss(out.float(), y)
    loss.backward()
    raw = _grads(model)
    assert pre.step()
    for s in pre.states.values():
        for t in (s.a, s.g, s.a_inv, s.g_inv):
            assert t.dtype == torch.float32 and torch.isfinite(t).all()
    # The first layer's input is the fp32 batch: A is exactly its definition.
    h = torch.cat([x.double(), torch.ones(16, 1, dtype=F64)], dim=1)
    torch.testing.assert_close(pre.states["0"].a.double(), h.T @ h / 16, rtol=1e-5, atol=1e-6)
    new = _grads(model)
    for n in raw:
        assert new[n].dtype == torch.float32 and torch.isfinite(new[n]).all()
        assert not torch.allclose(new[n], raw[n], rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------- 13: MC Fisher


@pytest.mark.parametrize("loss_scale", [1.0, 256.0])
def test_mc_fisher_g_comes_only_from_mc_backward(loss_scale):
    # Call order: mc_fisher_backward(logits) before the training backward frees the graph.
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(5, 4))
    twin = copy.deepcopy(model)
    cfg = {**KFAC, "kfac": {"ema_decay": 0.5, "fisher": "mc", "kl_clip": None}}
    # The MC loss is never loss-scaled, so G must not be unscaled either.
    access = _ScaledAccess(dict(model.named_parameters()), loss_scale)
    pre = Preconditioner(model, cfg, access=access)
    gen = torch.Generator().manual_seed(1)
    x, labels = torch.randn(12, 5, generator=gen), torch.randint(0, 4, (12,), generator=gen)

    logits = model(x)
    pre.mc_fisher_backward(logits, generator=torch.Generator().manual_seed(42))
    assert all(p.grad is None for p in model.parameters())  # the MC backward writes no .grad
    (loss_scale * nn.functional.cross_entropy(logits, labels)).backward()
    (loss_scale * nn.functional.cross_entropy(twin(x), labels)).backward()
    for p, pt in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, pt.grad)  # .grad is the training gradient only
    pre.step()

    # Independent reference: the sampled targets' softmax cross-entropy gradient, d = (p - onehot)/n.
    with torch.no_grad():
        probs = torch.softmax(logits.detach().double(), dim=-1)
        sampled = torch.multinomial(probs.float(), 1, generator=torch.Generator().manual_seed(42)).squeeze(1)
        d = (probs - nn.functional.one_hot(sampled, 4).double()) / 12
    g_ref = 12 * d.T @ d
    g_emp = (lambda e: 12 * e.T @ e)((probs - nn.functional.one_hot(labels, 4).double()) / 12)
    st = pre.states["0"]
    torch.testing.assert_close(st.g.double(), g_ref, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(st.g.double(), g_emp, rtol=1e-2)
    g_after_mc = st.g.clone()
    a_before = st.a.clone()

    # A statistics step with only the training backward fails loudly, naming the field (it used to
    # leave G empty and count every refresh as an inverse failure), and changes nothing.
    model.zero_grad()
    x2 = torch.randn(12, 5, generator=gen)
    (loss_scale * nn.functional.cross_entropy(model(x2), labels)).backward()
    with pytest.raises(ConfigError, match=r"kfac\.fisher.*mc_fisher_backward"):
        pre.step()
    assert torch.equal(st.g, g_after_mc) and torch.equal(st.a, a_before)
    assert pre.counters["inverse_failures"] == 0 and pre.counters["preconditioned_steps"] == 1


# ----------------------------------------------------------------------------- fp16-style loss scaling


class _ScaledAccess(LocalGradientAccess):
    """Single process with a loss scale still applied to the gradients (as GradScaler / DeepSpeed fp16)."""

    def __init__(self, named, scale: float):
        super().__init__(named)
        self.scale = scale

    def grad_scale(self) -> float:
        return self.scale


@pytest.mark.parametrize("method", ["kfac", "shampoo"])
def test_loss_scale_is_removed_from_statistics_and_kept_on_gradients(method):
    # Backward of S * loss with grad_scale() == S must give exactly S times the unscaled result,
    # so the engine's own unscaling afterwards sees the same update: factors must not carry S^2.
    s = 1024.0
    cfg = {**KFAC, "method": method, "schedule": {"warm_steps": 100, "warm_interval": 1}}
    plain, scaled = _mlp(6), _mlp(6)
    pre_plain = Preconditioner(plain, cfg)
    pre_scaled = Preconditioner(scaled, cfg, access=_ScaledAccess({n: p for n, p in scaled.named_parameters()}, s))
    for step in range(2):
        for m in (plain, scaled):
            m.zero_grad()
        x, y = _data(30 + step)
        _backward(plain, x, y)
        _backward(scaled, x, y, scale=s)
        pre_plain.step()
        pre_scaled.step()
        gp, gs = _grads(plain), _grads(scaled)
        for n in gp:
            torch.testing.assert_close(gs[n] / s, gp[n], rtol=1e-4, atol=1e-6 * gp[n].abs().max().item())
    if method == "kfac":
        for b in pre_plain.states:
            torch.testing.assert_close(pre_scaled.states[b].g, pre_plain.states[b].g, rtol=1e-4, atol=1e-9)
