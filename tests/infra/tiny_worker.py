"""Stand-in for ``python -m ds_soo.train`` in launcher tests: a tiny MLP trained on fixed data.

Why: the launcher tests check rendezvous and rank placement, not the optimizer, so they need a
program that starts in ~2 s, speaks the trainer's CLI shape (``--config C train.key=value ... --out D``)
and writes the same metrics.json keys. Each rank trains on its slice of one fixed global batch, so
any world size must reproduce the single-process run (up to float32 summation order).

Runs single-process when RANK is unset; otherwise joins the process group from the launcher's env
(torchrun or deepspeed). ``engine=ddp`` uses DistributedDataParallel, ``engine=deepspeed`` uses
``deepspeed.initialize`` with the ZeRO stage from ``ds_config=`` (default 0) and no clipping.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist

IN, HIDDEN, OUT_DIM = 8, 16, 4


def parse(argv: list[str]) -> tuple[dict[str, str], str]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", default=None)  # tolerated if a launcher adds it
    known, rest = parser.parse_known_args(argv)
    opts = {"engine": "ddp", "steps": "5", "batch": "8", "seed": "0", "lr": "0.1"}
    for item in rest:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"expected key=value, got {item!r}")
        opts[key.removeprefix("train.")] = value  # ds_soo.train spells them train.engine=...
    return opts, known.out


def build_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT_DIM))


def batch(step: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(size, IN, generator=gen), torch.randn(size, OUT_DIM, generator=gen)


def rank_info() -> dict[str, object]:
    """Where this rank ran: lets tests assert node placement (net namespace, node rank)."""
    try:
        netns = os.readlink("/proc/self/ns/net")
    except OSError:
        netns = "?"
    return {
        "rank": int(os.environ.get("RANK", "0")),
        "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("CROSS_RANK", "0"))),
        "hostname": socket.gethostname(),
        "netns": netns,
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_procid": os.environ.get("SLURM_PROCID"),
    }


def main(argv: list[str]) -> None:
    opts, out = parse(argv)
    engine, steps, global_batch = opts["engine"], int(opts["steps"]), int(opts["batch"])
    seed, lr = int(opts["seed"]), float(opts["lr"])
    torch.set_num_threads(1)
    distributed = "RANK" in os.environ
    if distributed and engine != "deepspeed":
        dist.init_process_group("gloo")
    model = build_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    if engine == "deepspeed":
        import deepspeed

        if not distributed:
            raise SystemExit("tiny_worker: engine=deepspeed needs a launcher (RANK unset)")
        deepspeed.init_distributed("gloo")
        world = dist.get_world_size()
        ds_cfg: dict = {}
        if opts.get("ds_config"):
            with open(opts["ds_config"], encoding="utf-8") as fh:
                ds_cfg = json.load(fh)
        ds_cfg.update(
            train_batch_size=global_batch,
            train_micro_batch_size_per_gpu=global_batch // world,
            gradient_accumulation_steps=1,
            gradient_clipping=0.0,  # deepspeed 0.19.8 defaults to 1.0, which breaks equivalence
            zero_allow_untested_optimizer=True,
        )
        runner, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_cfg)
    elif engine == "ddp":
        world = dist.get_world_size() if distributed else 1
        runner = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    else:
        raise SystemExit(f"tiny_worker: engine={engine} not supported")

    rank = dist.get_rank() if distributed else 0
    if global_batch % world:
        raise SystemExit(f"batch={global_batch} not divisible by world size {world}")
    local = global_batch // world
    losses = []
    for step in range(steps):
        x, y = batch(step, global_batch, seed)
        x, y = x[rank * local : (rank + 1) * local], y[rank * local : (rank + 1) * local]
        loss = torch.nn.functional.mse_loss(runner(x), y)
        if engine == "deepspeed":
            runner.backward(loss)
            runner.step()
        else:
            opt.zero_grad()
            loss.backward()
            opt.step()
        mean_loss = loss.detach().clone()
        if distributed:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        losses.append(float(mean_loss))

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    infos = [rank_info()]
    if distributed:
        infos = [None] * world
        dist.all_gather_object(infos, rank_info())
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        metrics = {
            "engine": engine,
            "world_size": world,
            "train_loss": losses[-1],
            "losses": losses,
            "param_sq_sum": float((flat.double() ** 2).sum()),
            "params": flat.tolist(),
            "preconditioned_steps": 0,
            "ranks": infos,
        }
        tmp = os.path.join(out, "metrics.json.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(metrics, fh)
        os.replace(tmp, os.path.join(out, "metrics.json"))
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    # torch/gloo sometimes aborts during interpreter teardown (ENGINES.md); results are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
