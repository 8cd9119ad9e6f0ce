"""One-shot CUDA check: correctness against float64 CPU references, the DeepSpeed adapter at world 1,
and step time/memory of each method against AdamW (bench/single_device.py) on the GPU.

    python bench/gpu_check.py            # prints markdown tables; exits non-zero on a failed check
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch
from torch import nn

from ds_soo import Preconditioner

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str) -> None:
    print(f"| {name} | {'ok' if ok else 'FAIL'} | {detail} |", flush=True)
    if not ok:
        FAILED.append(name)


def dense_kfac_reference(x: torch.Tensor, model: nn.Linear, y: torch.Tensor, damping: float) -> torch.Tensor:
    """K-FAC step for one Linear by the dense Kronecker solve in float64 on CPU (independent of ds_soo)."""
    xd = x.double().cpu()
    w, b = model.weight.detach().double().cpu(), model.bias.detach().double().cpu()
    w.requires_grad_(True)
    b.requires_grad_(True)
    out = xd @ w.T + b
    out.retain_grad()
    loss = nn.functional.mse_loss(out, y.double().cpu())
    loss.backward()
    n = xd.shape[0]
    h = torch.cat([xd, torch.ones(n, 1, dtype=torch.float64)], 1)
    a = h.T @ h / n
    d = out.grad
    g = n * (d.T @ d)
    pi = ((torch.trace(a) / a.shape[0]) / (torch.trace(g) / g.shape[0])).sqrt()
    ra, rg = pi * damping**0.5, damping**0.5 / pi
    eye_g, eye_a = torch.eye(g.shape[0], dtype=torch.float64), torch.eye(a.shape[0], dtype=torch.float64)
    curv = torch.kron(g + rg * eye_g, a + ra * eye_a)
    grad = torch.cat([w.grad, b.grad[:, None]], 1)
    return torch.linalg.solve(curv, grad.reshape(-1)).view_as(grad)


def correctness(device: torch.device) -> None:
    torch.manual_seed(0)
    model = nn.Linear(48, 24).to(device)
    x, y = torch.randn(256, 48, device=device), torch.randn(256, 24, device=device)
    want = dense_kfac_reference(x, model, y, 1e-3)
    # Exact fp32 statistics: the check is of the math; TF32 (the CUDA default) is reported by gpu_bench.
    pre = Preconditioner(model, {"method": "kfac", "damping": {"value": 1e-3}, "kfac": {"kl_clip": None},
                                "numerics": {"stats_matmul": "float32"}})
    nn.functional.mse_loss(model(x), y).backward()
    pre.step()
    got = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1).double().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    check("K-FAC step = dense float64 solve", err < 1e-4 and pre.counters["preconditioned_steps"] == 1,
          f"max rel err {err:.1e} on {device}")

    torch.manual_seed(0)
    model = nn.Linear(40, 20, bias=False).to(device)
    pre = Preconditioner(model, {"method": "shampoo", "damping": {"value": 1e-4}, "shampoo": {"grafting": "none"}})
    nn.functional.mse_loss(model(x[:, :40]), y[:, :20]).backward()
    gr = model.weight.grad.double().cpu().clone()
    pre.step()
    el, vl = torch.linalg.eigh(gr @ gr.T)
    er, vr = torch.linalg.eigh(gr.T @ gr)
    lroot = (vl * (el.clamp_min(0) + 1e-4).pow(-0.25)) @ vl.T
    rroot = (vr * (er.clamp_min(0) + 1e-4).pow(-0.25)) @ vr.T
    want = lroot @ gr @ rroot
    err = ((model.weight.grad.double().cpu() - want).abs().max() / want.abs().max()).item()
    check("Shampoo step = dense float64 eigh roots", err < 1e-3, f"max rel err {err:.1e} on {device}")


def deepspeed_world1(device: torch.device) -> None:
    try:
        import deepspeed
    except Exception as e:  # noqa: BLE001
        check("DeepSpeed import", False, repr(e))
        return
    from ds_soo.integrations.deepspeed import attach

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    for stage in (0, 2, 3):
        torch.manual_seed(0)
        ref_model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(device)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10))
        cfg = {"method": "kfac", "schedule": {"warm_steps": 100, "warm_interval": 2}, "damping": {"value": 1e-2}}
        ds_config = {
            "train_batch_size": 64, "train_micro_batch_size_per_gpu": 32, "gradient_accumulation_steps": 2,
            "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "zero_optimization": {"stage": stage},
            "ds_soo": cfg,
        }  # fmt: skip
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        pre = attach(engine)
        ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.1)
        ref_pre = Preconditioner(ref_model, cfg, optimizer=ref_opt)  # as attach() is told the engine's SGD
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            x, y = torch.randn(64, 32, generator=g).to(device), torch.randn(64, 10, generator=g).to(device)
            for k in range(2):
                engine.backward(nn.functional.mse_loss(engine(x[32 * k : 32 * k + 32]), y[32 * k : 32 * k + 32]))
                engine.step()
                (nn.functional.mse_loss(ref_model(x[32 * k : 32 * k + 32]), y[32 * k : 32 * k + 32]) / 2).backward()
            ref_pre.step()
            ref_opt.step()
            ref_opt.zero_grad()
        if stage == 3:
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                got = [p.detach().float().cpu().clone() for p in engine.module.parameters()]
        else:
            got = [p.detach().float().cpu() for p in engine.module.parameters()]
        want = [p.detach().float().cpu() for p in ref_model.parameters()]
        err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want, strict=True))
        ok = err < 1e-4 and pre.counters["preconditioned_steps"] == 3 and pre.counters["stats_updates"] == 3
        check(f"DeepSpeed ZeRO-{stage} + attach() = single process (gas 2)", ok,
              f"max rel err {err:.1e}, counters {pre.counters['preconditioned_steps']}/3 on {device}")


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"## ds_soo GPU check on {name}, torch {torch.__version__}\n")
    print("| check | result | detail |\n|---|---|---|")
    t0 = time.time()
    correctness(device)
    deepspeed_world1(device)
    print(f"\nchecks took {time.time() - t0:.0f} s", flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    for workload, batch in (("vit", 256), ("gpt", 64)):
        cmd = [sys.executable, os.path.join(here, "single_device.py"), "--workload", workload, "--size", "base",
               "--device", device.type, "--batch", str(batch), "--steps", "10", "--warmup", "2"]
        subprocess.run(cmd, check=False)
    if FAILED:
        sys.exit(f"failed: {FAILED}")


if __name__ == "__main__":
    main()
