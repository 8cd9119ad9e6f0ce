"""A float64 model trains under every method, on every single-process entry point, with float64 state.

Curvature state follows the model's dtype (``ds_soo.curvature.precision.state_dtype``): a float64
model must get float64 factors, roots, inverses and PSGD Q (PSGD once raised on a dtype mismatch).
Each run must precondition every step, move every parameter that got a gradient, stay finite, and
differ from plain SGD (so a silent first-order fallback cannot pass).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ds_soo import Preconditioner, SecondOrderOptimizer

METHODS = ["kfac", "shampoo", "psgd"]
STEPS, LR = 4, 0.05


class Net(nn.Module):
    """Linear layers, a LayerNorm (1-d gains: diagonal blocks) and a bias-free layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.mid = nn.Linear(7, 6, bias=False)
        self.out = nn.Linear(6, 2)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mid(self.norm(torch.tanh(self.inp(x))))))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randn(12, 2, generator=g, dtype=torch.float64)


def config(method: str) -> dict:
    return {"method": method, "schedule": {"warm_steps": 100, "warm_interval": 1}}


def state_tensors(pre: Preconditioner) -> list[tuple[str, torch.Tensor]]:
    out = []
    for bid, state in pre.states.items():
        for key, value in state.state_dict().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                out.append((f"{bid}/{key}", value))
    return out


def run(method: str, path: str) -> tuple[nn.Module, Preconditioner]:
    model = Net()
    if path == "trainer":
        from ds_soo.trainer.config import OptimConfig
        from ds_soo.trainer.engine import EngineLoop
        from ds_soo.trainer.optim import build_optimizer, build_preconditioner

        optim = OptimConfig(name=method, base="sgd", lr=LR, momentum=0.0)
        engine = EngineLoop(model, lambda m: build_optimizer(m, optim),
                            lambda w: build_preconditioner(w, config(method)), torch.device("cpu"))  # fmt: skip
        for step in range(STEPS):
            x, y = batch(step)
            engine.zero_grad()
            with engine.micro_step(last=True):
                engine.backward(nn.functional.mse_loss(engine.model(x), y))
            engine.step()
        return engine.module, engine.preconditioner
    base = torch.optim.SGD(model.parameters(), lr=LR)
    if path == "bare":
        pre = Preconditioner(model, config(method), optimizer=base)
        opt = base
    else:
        pre = Preconditioner(model, config(method))
        opt = SecondOrderOptimizer(base, pre)
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        if path == "bare":
            pre.step()
        opt.step()
        opt.zero_grad()
    return model, pre


def plain_sgd() -> nn.Module:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for step in range(STEPS):
        x, y = batch(step)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return model


@pytest.mark.parametrize("path", ["bare", "SecondOrderOptimizer", "trainer"])
@pytest.mark.parametrize("method", METHODS)
def test_float64_model_trains_with_float64_state(method, path):
    start = {n: p.detach().clone() for n, p in Net().named_parameters()}
    model, pre = run(method, path)
    c = pre.counters
    assert c["optimizer_steps"] == c["preconditioned_steps"] == STEPS, c
    assert c["inverse_failures"] == 0 and c["skipped_nonfinite"] == 0, c
    states = state_tensors(pre)
    assert states, "no curvature state was built"
    wrong = [(k, v.dtype) for k, v in states if v.dtype != torch.float64]
    assert not wrong, f"state not float64: {wrong}"
    sgd = {n: p.detach() for n, p in plain_sgd().named_parameters()}
    for n, p in model.named_parameters():
        assert p.dtype == torch.float64 and torch.isfinite(p).all(), n
        assert not torch.equal(p.detach(), start[n]), f"{n} did not move"
    # The preconditioned blocks moved differently from plain SGD.
    preconditioned = {name for b in pre.blocks for name, _ in b.pieces}
    assert preconditioned
    final = {n: p.detach() for n, p in model.named_parameters()}
    for n in preconditioned:
        assert float((final[n] - sgd[n]).abs().max()) > 1e-8, f"{n} moved as plain SGD"
