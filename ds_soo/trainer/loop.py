"""One training run: build everything from a validated config, train, evaluate, write metrics.json."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.data import DataBundle, build_data
from ds_soo.data.base import Batch
from ds_soo.models import build_model, count_parameters
from ds_soo.trainer import report
from ds_soo.trainer.config import TrainConfig
from ds_soo.trainer.engine import ENGINES, EngineLoop
from ds_soo.trainer.optim import (
    base_name,
    build_optimizer,
    build_preconditioner,
    build_scheduler,
    resolved_precond,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    return max(1, math.ceil(cfg.train.epochs * steps_per_epoch))


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """Equal micro-batches for gradient accumulation (the batch size divides by construction)."""
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(parts)]


@torch.no_grad()
def evaluate(engine: EngineLoop, data: DataBundle, batch_size: int) -> dict[str, float]:
    """Mean loss over the evaluation set (weighted by targets), plus accuracy for classification."""
    model = engine.model
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in data.eval_batches(batch_size):
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        with engine.autocast():
            logits = model(batch)
        n = data.count(batch)
        loss_sum += float(data.loss(logits, batch)) * n
        correct += data.correct(logits, batch)
        count += n
    model.train(was_training)
    out = {"loss": engine.reduce_mean(loss_sum / max(count, 1))}
    if data.task == "classification":
        out["accuracy"] = engine.reduce_mean(correct / max(count, 1))
    return out


def quality_index(engine: EngineLoop, data: DataBundle, batch: Batch, probes: int) -> float | None:
    """The research's curvature-quality index c(P) on one batch, when the library provides it."""
    pre = engine.preconditioner
    fn = getattr(pre, "quality_index", None)
    if fn is None:
        try:
            from ds_soo.diagnostics import quality_index as library_fn
        except ImportError:
            return None

        def fn(loss_fn, n):
            return library_fn(pre, loss_fn, n)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = engine.model
    # eval() keeps the probe's forward passes out of K-FAC's statistics, whose hooks capture in training
    # only; the math attention kernel is the one with a double backward (Hessian-vector products).
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH):
            return fn(lambda: data.loss(model(batch), batch), probes)
    finally:
        model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Session:
    """Everything a run builds before its first step."""

    cfg: TrainConfig
    data: DataBundle
    engine: EngineLoop
    scheduler: torch.optim.lr_scheduler.LRScheduler
    n_steps: int
    steps_per_epoch: int
    resolved: dict[str, Any]
    precond_cfg: PreconditionerConfig


@dataclass
class History:
    """What the loop records per optimizer step (and per evaluation)."""

    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    quality: list[dict[str, float]] = field(default_factory=list)
    changed_steps: int = 0
    diverged: bool = False


def setup(cfg: TrainConfig, log: logging.Logger) -> Session:
    """Data, model, engine (which builds optimizer and preconditioner) and the lr schedule."""
    t = cfg.train
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    torch.manual_seed(t.seed)
    device = resolve_device(t.device)
    data = build_data(cfg)
    steps_per_epoch = data.steps_per_epoch(t.batch_size)
    if data.task == "classification" and steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size ({t.batch_size}) exceeds the {data.num_train} training examples")
    n_steps = total_steps(cfg, steps_per_epoch)
    precond = resolved_precond(cfg, n_steps, steps_per_epoch)
    precond_cfg = PreconditionerConfig.from_dict(precond, prefix="precond")
    resolved = cfg.to_dict()
    # Recorded before training: the preconditioner's own config tracks the lr schedule as it runs.
    resolved["precond"] = precond_cfg.to_dict()
    model = build_model(cfg.model, data)
    engine = ENGINES[t.engine](
        model,
        lambda m: build_optimizer(m, cfg.optim),
        lambda m: build_preconditioner(m, precond),
        device,
        grad_accum=t.grad_accum,
        bf16=t.bf16,
        grad_clip=cfg.optim.grad_clip,
    )
    scheduler = build_scheduler(engine.optimizer, n_steps, cfg.optim)
    log.info(
        "data=%s (%d train) model=%s (%d params) optim=%s (base %s, lr %g) batch=%d x accum %d, "
        "%d steps (%d/epoch) on %s, %d threads",
        data.name, data.num_train, cfg.model.kind, count_parameters(model), cfg.optim.name,
        base_name(cfg.optim), cfg.optim.lr, t.batch_size, t.grad_accum, n_steps, steps_per_epoch,
        device, torch.get_num_threads(),
    )  # fmt: skip
    pre = engine.preconditioner
    log.info("preconditioner: %s", pre.describe() if pre is not None else "none (first-order optimizer)")
    return Session(cfg, data, engine, scheduler, n_steps, steps_per_epoch, resolved, precond_cfg)


def train(s: Session, scalars: report.Scalars, log: logging.Logger) -> History:
    """The optimizer-step loop: micro-batches through the engine, then one preconditioned step."""
    t, data, engine = s.cfg.train, s.data, s.engine
    pre, device = engine.preconditioner, engine.device
    h = History()
    last_lr: float | None = None
    diag = s.precond_cfg.diagnostics
    quality_every = diag.quality_interval if pre is not None else 0
    batches = data.train_batches(t.batch_size, seed=t.seed)
    engine.model.train()
    # disable=None: a bar on terminals only, so logs and CI output stay readable.
    bar = tqdm(range(s.n_steps), desc=s.cfg.optim.name, disable=None if t.progress else True, dynamic_ncols=True)
    for step in bar:
        _sync(device)
        t0 = time.perf_counter()
        batch = engine.shard(next(batches))
        engine.zero_grad()
        loss_sum = 0.0
        for micro in split_batch(batch, t.grad_accum):
            micro = {k: v.to(device, non_blocking=True) for k, v in micro.items()}
            with engine.autocast():
                logits = engine.model(micro)
            loss = data.loss(logits, micro)
            engine.backward(loss)
            loss_sum += float(loss.detach())
        lr = s.scheduler.get_last_lr()[0]
        if pre is not None and lr != last_lr:
            pre.set_hyperparams(lr=lr)
            last_lr = lr
        h.changed_steps += int(engine.step())
        s.scheduler.step()
        _sync(device)
        h.step_times.append(time.perf_counter() - t0)
        step_loss = engine.reduce_mean(loss_sum / t.grad_accum)
        h.train_loss.append(step_loss)
        h.lr.append(lr)
        done = step + 1
        if quality_every and done % quality_every == 0:
            try:
                q = quality_index(engine, data, micro, diag.quality_probes)
            except RuntimeError as e:
                log.warning("quality index unavailable (%s); turning it off", e)
                quality_every, q = 0, None
            if q is not None:
                h.quality.append({"step": done, "quality_index": q})
        if done % t.log_interval == 0 or done == s.n_steps:
            values = {"train/loss": step_loss, "train/lr": lr, "train/step_time_s": h.step_times[-1]}
            if pre is not None:
                values.update({f"precond/{k}": v for k, v in pre.metrics().items()})
            scalars.add(values, done)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.3g}")
        if not math.isfinite(step_loss):
            log.warning("non-finite training loss at step %d; stopping", done)
            h.diverged = True
            break
        if t.eval_interval and done % t.eval_interval == 0 and done < s.n_steps:
            ev = evaluate(engine, data, t.batch_size)
            h.eval_history.append({"step": done, **ev})
            scalars.add({f"eval/{k}": v for k, v in ev.items()}, done)
            log.info("step %d eval %s", done, _fmt(ev))
    bar.close()
    return h


def collect_metrics(s: Session, h: History, final: dict[str, float], started: float) -> dict[str, Any]:
    engine, pre = s.engine, s.engine.preconditioner
    metrics: dict[str, Any] = {
        "config": s.resolved,
        "task": s.data.task,
        "data": {"name": s.data.name, "num_train": s.data.num_train, "steps_per_epoch": s.steps_per_epoch},
        "num_params": count_parameters(engine.module),
        "steps": len(h.train_loss),
        "planned_steps": s.n_steps,
        "epochs": len(h.train_loss) / s.steps_per_epoch,
        "diverged": h.diverged,
        "train_loss": h.train_loss,
        "lr": h.lr,
        "eval_history": h.eval_history,
        "final_eval": final,
        "step_time_median_s": statistics.median(h.step_times) if h.step_times else 0.0,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": report.peak_memory_bytes(engine.device),
        "param_sq_sum": report.param_sq_sum(engine.module),
        "device": str(engine.device),
        "num_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "engine": engine.name,
        "preconditioner_changed_steps": h.changed_steps,
        "quality_index": h.quality,
        **report.counters(pre),
    }
    if pre is not None:
        metrics["precond_metrics"] = {k: float(v) for k, v in pre.metrics().items()}
    return metrics


def run(cfg: TrainConfig, out_dir: Path, log: logging.Logger, started: float | None = None) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns (and writes) the metrics dict."""
    started = time.perf_counter() if started is None else started
    s = setup(cfg, log)
    scalars = report.Scalars(out_dir, enabled=s.engine.is_main)
    try:
        h = train(s, scalars, log)
        final = evaluate(s.engine, s.data, cfg.train.batch_size)
        h.eval_history.append({"step": len(h.train_loss), **final})
        scalars.add({f"eval/{k}": v for k, v in final.items()}, len(h.train_loss))
    finally:
        scalars.close()
    metrics = collect_metrics(s, h, final, started)
    if s.engine.is_main:
        report.write_json(out_dir / "metrics.json", metrics)
    log.info(
        "done: %d steps, final eval %s, median step %.1f ms, wall %.1f s, preconditioned %d, refreshes %d",
        metrics["steps"], _fmt(final), 1e3 * metrics["step_time_median_s"], metrics["wall_time_s"],
        metrics["preconditioned_steps"], metrics["curvature_refreshes"],
    )  # fmt: skip
    return metrics


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())
