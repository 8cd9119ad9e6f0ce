"""One configuration gives one update on every entry point.

``kfac.kl_clip: auto`` and the lr used by the KL-clip and the damping rule depend on the base optimizer.
Each way in (a bare ``Preconditioner(..., optimizer=)``, ``for_engine`` under no engine, DDP, FSDP2 and
a DeepSpeed engine, DeepSpeed's ``attach``, ``SecondOrderOptimizer``, the HF Trainer, accelerate and
the ds_soo trainer) must resolve the same config to the same effective options; the single-process
paths must also give the same weights, in float64 to 1e-12. A bare preconditioner that was never told
its optimizer refuses ``auto`` with a message naming the field, instead of silently turning the
KL-clip off as it once did (so the same config trained differently under ``deepspeed`` than in a
hand-written loop).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_harness import assert_no_failures, launch
from torch import nn

from ds_soo import Preconditioner, SecondOrderOptimizer
from ds_soo.config import ConfigError

LR, MOMENTUM, STEPS, BATCH = 0.3, 0.9, 3, 16
CONFIG = {"method": "kfac", "schedule": {"warm_steps": 100, "warm_interval": 1}, "damping": {"value": 1e-3}}
# What CONFIG means over SGD: KAISA's KL-clip 0.001, the lr from the optimizer, the given damping.
EXPECTED = {
    "method": "kfac",
    "base_optimizer": "SGD",
    "kl_clip": 1e-3,
    "kl_clip_reason": "auto: base optimizer is SGD",
    "lr_source": "the base optimizer's param groups, read every step",
    "damping": "constant 0.001",
}


class Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def batch(step: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g, dtype=dtype), torch.randn(BATCH, 3, generator=g, dtype=dtype)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def effective(pre: Preconditioner) -> dict:
    return dataclasses.asdict(pre.effective_options())


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_manual(pre: Preconditioner, model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
    """backward, pre.step(), opt.step(): the hand-written loop; returns the KL-clip factor of each step."""
    scales = []
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        pre.step()
        scales.append(pre.last_kl_scale)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return scales


def run_bare() -> tuple[dict, dict, list[float], Preconditioner]:
    model = Net()
    opt = sgd(model)
    pre = Preconditioner(model, CONFIG, optimizer=opt)
    scales = train_manual(pre, model, opt)
    return effective(pre), weights(model), scales, pre


def run_for_engine_plain() -> tuple[dict, dict]:
    model = Net()
    opt = sgd(model)
    pre = Preconditioner.for_engine(model, CONFIG, optimizer=opt)
    train_manual(pre, model, opt)
    return effective(pre), weights(model)


def run_second_order_optimizer() -> tuple[dict, dict]:
    model = Net()
    pre = Preconditioner(model, CONFIG)
    opt = SecondOrderOptimizer(sgd(model), pre)
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return effective(pre), weights(model)


def run_ds_soo_trainer() -> tuple[dict, dict]:
    """The ds_soo trainer's engine, built as ``ds_soo.train`` builds it (its optimizer and preconditioner)."""
    from ds_soo.trainer.config import OptimConfig
    from ds_soo.trainer.engine import EngineLoop
    from ds_soo.trainer.optim import build_optimizer, build_preconditioner

    optim = OptimConfig(name="kfac", base="sgd", lr=LR, momentum=MOMENTUM)
    precond = {**CONFIG, "damping": {**CONFIG["damping"], "lr": LR}}  # as resolved_precond fills it in
    engine = EngineLoop(Net(), lambda m: build_optimizer(m, optim), lambda w: build_preconditioner(w, precond),
                        torch.device("cpu"))  # fmt: skip
    for step in range(STEPS):
        x, y = batch(step)
        engine.zero_grad()
        with engine.micro_step(last=True):
            engine.backward(nn.functional.mse_loss(engine.model(x), y))
        engine.step()
    return effective(engine.preconditioner), weights(engine.module)


def run_accelerate() -> tuple[dict, dict]:
    from accelerate import Accelerator

    from ds_soo.integrations.accelerate import attach, detach

    accelerator = Accelerator(cpu=True)
    model = Net()
    optimizer = sgd(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    pre = attach(accelerator, model, CONFIG, optimizer=optimizer)
    for step in range(STEPS):
        x, y = batch(step)
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        optimizer.step()
        optimizer.zero_grad()
    result = effective(pre), weights(accelerator.unwrap_model(model))
    detach(accelerator)
    return result


def test_single_process_entry_points_resolve_alike_and_give_one_update(fresh_accelerate_state):
    got, want, scales, _ = run_bare()
    assert got == EXPECTED
    # The KL-clip bit on every step: a path that dropped it would move the weights further.
    assert all(s is not None and s < 0.99 for s in scales), scales
    runs = {
        "for_engine": run_for_engine_plain(),
        "SecondOrderOptimizer": run_second_order_optimizer(),
        "ds_soo trainer": run_ds_soo_trainer(),
        "accelerate": run_accelerate(),
    }
    for path, (options, w) in runs.items():
        assert options == EXPECTED, path
        for n, ref in want.items():
            err = float((w[n] - ref).abs().max() / ref.abs().max())
            assert err < 1e-12, f"{path}: {n} differs from the bare preconditioner by {err:.2e}"
    # ... and the KL-clip is what made the difference: without it the weights move elsewhere.
    model = Net()
    opt = sgd(model)
    off = Preconditioner(model, {**CONFIG, "kfac": {"kl_clip": None}}, optimizer=opt)
    train_manual(off, model, opt)
    assert max(float((p - want[n]).abs().max()) for n, p in weights(model).items()) > 1e-3


def test_hf_trainer_resolves_the_same_options(tmp_path, monkeypatch):
    import hf_workers as w

    from ds_soo.integrations.hf import SecondOrderTrainer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data = w.build("gpt2")
    args = w.training_args(str(tmp_path), max_steps=2, learning_rate=LR, max_grad_norm=0.0)
    trainer = SecondOrderTrainer(model=model, args=args, train_dataset=data, ds_soo=CONFIG)
    trainer.train()
    pre = trainer.preconditioner
    assert effective(pre) == EXPECTED
    assert pre.counters["preconditioned_steps"] == 2
    assert pre.cfg.damping.lr == pytest.approx(LR)  # the lr the KL-clip used: the optimizer's


def test_unknown_optimizer_refuses_auto_and_names_the_field():
    model = Net()
    pre = Preconditioner(model, CONFIG)
    assert "unresolved until a base optimizer is given" in pre.describe()
    x, y = batch(0)
    nn.functional.mse_loss(model(x), y).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=r"kfac\.kl_clip.*optimizer="):
        pre.step()
    for n, p in model.named_parameters():  # nothing was touched
        assert torch.equal(p.grad, before[n]), n
    assert pre.counters["optimizer_steps"] == 0
    # Told later, it resolves; an explicit number or null needs no optimizer at all.
    pre.set_base_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert pre.effective_options().kl_clip is None
    assert "not SGD" in pre.effective_options().kl_clip_reason
    pre.step()
    assert pre.counters["preconditioned_steps"] == 1
    for value in (None, 5e-3):
        explicit = Preconditioner(Net(), {**CONFIG, "kfac": {"kl_clip": value}})
        assert explicit.effective_options().kl_clip == value
    # Shampoo and PSGD have no KL-clip to resolve.
    assert Preconditioner(Net(), {"method": "shampoo"}).effective_options().kl_clip is None


def test_lr_comes_from_the_optimizer_every_step():
    """A scheduled lr reaches the KL-clip without set_hyperparams: same weights as telling it by hand."""
    def run(told: bool) -> dict:
        model = Net()
        opt = sgd(model)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
        if told:
            pre = Preconditioner(model, {**CONFIG, "kfac": {"kl_clip": 1e-3}})
        else:
            pre = Preconditioner(model, CONFIG, optimizer=opt)
        for step in range(STEPS):
            x, y = batch(step)
            nn.functional.mse_loss(model(x), y).backward()
            if told:
                pre.set_hyperparams(lr=sched.get_last_lr()[0])
            pre.step()
            opt.step()
            opt.zero_grad()
            sched.step()
        return weights(model)

    auto, manual = run(False), run(True)
    for n, ref in manual.items():
        assert float((auto[n] - ref).abs().max() / ref.abs().max()) < 1e-12, n


def test_config_lr_that_disagrees_with_the_optimizer_is_refused():
    model = Net()
    cfg = {**CONFIG, "damping": {"value": 1e-3, "lr": 0.01}}
    with pytest.raises(ConfigError, match=r"damping\.lr=0\.01 disagrees"):
        Preconditioner(model, cfg, optimizer=sgd(model))
    # Equal to the optimizer's lr (or its initial lr under a scheduler) is fine.
    Preconditioner(model, {**CONFIG, "damping": {"value": 1e-3, "lr": LR}}, optimizer=sgd(model))
    groups = [{"params": [model.hidden.weight], "lr": 0.1}, {"params": [model.out.weight], "lr": 0.2}]
    with pytest.raises(ConfigError, match="different lrs"):
        Preconditioner(model, CONFIG, optimizer=torch.optim.SGD(groups)).step()


def test_describe_states_the_resolved_options_once(caplog):
    model = Net()
    opt = sgd(model)
    pre = Preconditioner(model, CONFIG, optimizer=opt)
    text = pre.describe()
    assert "K-FAC KL-clip: 0.001 (auto: base optimizer is SGD)" in text
    assert "lr for damping and KL-clip: the base optimizer's param groups" in text
    with caplog.at_level("INFO", logger="ds_soo.preconditioner"):
        train_manual(pre, model, opt)
    assert sum("resolved" in r.getMessage() for r in caplog.records) == 1


# ---------------------------------------------------------------------------- distributed entry points
def dist_worker() -> dict:
    """for_engine under DDP and FSDP2 (float64, weights against one process), a DeepSpeed engine's
    for_engine and attach (its optimizer comes from the engine): all must resolve as EXPECTED."""
    import deepspeed
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ds_soo.integrations.deepspeed import attach

    rank, world = dist.get_rank(), dist.get_world_size()
    failures: list[str] = []
    _, want, _, _ = run_bare()  # a plain model's preconditioner is single-process, whatever the group
    n = BATCH // world

    def train_dist(wrapped, pre, opt, model) -> None:
        for step in range(STEPS):
            x, y = batch(step)
            nn.functional.mse_loss(wrapped(x[rank * n : (rank + 1) * n]), y[rank * n : (rank + 1) * n]).backward()
            pre.step()
            opt.step()
            opt.zero_grad(set_to_none=True)

    for engine in ("ddp", "fsdp2"):
        model = Net()
        if engine == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
            wrapped = model
        opt = sgd(model)
        pre = Preconditioner.for_engine(wrapped, CONFIG, optimizer=opt)
        if effective(pre) != EXPECTED:
            failures.append(f"{engine}: {effective(pre)}")
        train_dist(wrapped, pre, opt, model)
        for name, p in model.named_parameters():
            full = p.full_tensor() if engine == "fsdp2" else p
            err = float((full.detach() - want[name]).abs().max() / want[name].abs().max())
            if err > 1e-10:
                failures.append(f"{engine}: {name} differs from one process by {err:.2e}")
    ds_config = {"train_batch_size": BATCH, "train_micro_batch_size_per_gpu": BATCH // world,
                 "optimizer": {"type": "SGD", "params": {"lr": LR, "momentum": MOMENTUM}},
                 "zero_optimization": {"stage": 1}, "gradient_clipping": 0.0,
                 "zero_allow_untested_optimizer": True}  # fmt: skip
    for how in ("for_engine", "attach"):
        model = Net(torch.float32)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        pre = Preconditioner.for_engine(engine, CONFIG) if how == "for_engine" else attach(engine, CONFIG)
        if effective(pre) != EXPECTED:
            failures.append(f"DeepSpeed {how}: {effective(pre)}")
        pre.remove_hooks()
    return {"failures": failures}


@pytest.mark.dist
def test_distributed_entry_points_resolve_alike():
    assert_no_failures(launch("tests/test_entry_points.py:dist_worker", nproc=2, timeout=240))
