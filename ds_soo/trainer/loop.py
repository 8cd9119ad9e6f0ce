"""One training run: build everything from a validated config, train, evaluate, write metrics.json."""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ds_soo.config import ConfigError, PreconditionerConfig
from ds_soo.data import DataBundle, build_data
from ds_soo.data.base import Batch
from ds_soo.models import build_model, count_parameters
from ds_soo.trainer import report, resume, signals
from ds_soo.trainer.config import TrainConfig
from ds_soo.trainer.engine import ENGINES, EngineLoop, EngineOptions, launcher_world
from ds_soo.trainer.history import History
from ds_soo.trainer.optim import (
    base_name,
    build_optimizer,
    build_preconditioner,
    build_scheduler,
    resolved_precond,
)


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


def loss_after_step(engine: EngineLoop, data: DataBundle, micros: list[Batch]) -> float:
    """This rank's mean loss on the step's micro-batches at the new weights (``damping.kind: adaptive``):
    same mode, no gradient, no curvature statistics."""
    total = 0.0
    with torch.no_grad(), engine.preconditioner.paused_capture():
        for micro in micros:
            with engine.autocast():
                logits = engine.model(micro)
            total += float(data.loss(logits, micro))
    return total / len(micros)


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
    num_params: int = 0
    # Set by train(): the stop signal every rank agreed on (SIGTERM/SIGINT), None when not interrupted.
    interrupted_by: int | None = None


@dataclass
class Plan:
    """A run fully validated and its data loaded, before any process group, engine or model exists."""

    cfg: TrainConfig
    data: DataBundle
    n_steps: int
    steps_per_epoch: int
    precond: dict[str, Any]
    precond_cfg: PreconditionerConfig
    ds: dict[str, Any] | None
    ds_final: dict[str, Any] | None
    world_size: int = 1


def _finalize_ds(cfg: TrainConfig, ds: dict[str, Any], world_size: int, precond: dict[str, Any]) -> dict[str, Any]:
    from ds_soo.trainer import ds_config

    final = ds_config.finalize(cfg, ds, world_size, precond)
    if precond.get("method", "none") != "none":
        from ds_soo.integrations.deepspeed import validate_ds_config

        validate_ds_config(final)
    return final


def _check_world(t: Any, world_size: int) -> None:
    if t.batch_size % (t.grad_accum * world_size):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be divisible by train.grad_accum ({t.grad_accum}) x world "
            f"size ({world_size}): the global batch is the same at every world size"
        )


def plan(cfg: TrainConfig, log: logging.Logger) -> Plan:
    """Everything that can be wrong with the input, checked in seconds: the ds_config (JSON, its
    "ds_soo" block, batch fields), the data (files, keys, sizes) and the derived preconditioner config.

    Nothing here starts a process group or imports DeepSpeed, so a typo never waits for either.
    """
    t = cfg.train
    ds: dict[str, Any] | None = None
    if t.engine == "deepspeed":
        from ds_soo.trainer import ds_config

        if t.ds_config is None:
            raise ConfigError("train.engine=deepspeed needs train.ds_config (or --deepspeed_config) naming its JSON")
        ds = ds_config.load_ds_config(t.ds_config)
        block = ds.get("ds_soo")
        if isinstance(block, dict):
            try:  # named as the user wrote it (ds_soo.X in that file), not as the trainer's precond.X
                PreconditionerConfig.from_dict(block, prefix="ds_soo")
            except ConfigError as e:
                raise ConfigError(f"train.ds_config {t.ds_config}: {e}") from None
        cfg = ds_config.merge_into_trainer(cfg, ds, log)
        t = cfg.train
    _, world_size, _ = launcher_world()
    _check_world(t, world_size)
    torch.manual_seed(t.seed)
    data = build_data(cfg)
    steps_per_epoch = data.steps_per_epoch(t.batch_size)
    if data.task == "classification" and steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size ({t.batch_size}) exceeds the {data.num_train} training examples")
    n_steps = total_steps(cfg, steps_per_epoch)
    precond = resolved_precond(cfg, n_steps, steps_per_epoch)
    precond_cfg = PreconditionerConfig.from_dict(precond, prefix="precond")
    ds_final = _finalize_ds(cfg, ds, world_size, precond) if ds is not None else None
    return Plan(cfg, data, n_steps, steps_per_epoch, precond, precond_cfg, ds, ds_final, world_size)


def setup(cfg: TrainConfig, log: logging.Logger) -> Session:
    """Validate and load data (:func:`plan`), then the process group, model, engine (which builds
    optimizer and preconditioner) and the lr schedule."""
    t = cfg.train
    if t.num_threads is not None:
        torch.set_num_threads(t.num_threads)
    p = plan(cfg, log)
    cfg, data, ds, t = p.cfg, p.data, p.ds, p.cfg.train
    n_steps, steps_per_epoch, precond, precond_cfg = p.n_steps, p.steps_per_epoch, p.precond, p.precond_cfg
    engine_cls = ENGINES[t.engine]
    info = engine_cls.init_process(t.device, t.backend)
    if info.world_size != p.world_size:  # a launcher without WORLD_SIZE (e.g. MPI): redo what depends on it
        _check_world(t, info.world_size)
        if ds is not None:
            p.ds_final = _finalize_ds(cfg, ds, info.world_size, precond)
    options = EngineOptions(find_unused_parameters=t.find_unused_parameters, ds_config=p.ds_final)
    resolved = cfg.to_dict()
    # Recorded before training: the preconditioner's own config tracks the lr schedule as it runs.
    resolved["precond"] = precond_cfg.to_dict()
    if options.ds_config is not None:
        resolved["ds_config"] = options.ds_config
    model = build_model(cfg.model, data)
    num_params = count_parameters(model)  # before wrapping: ZeRO-3 and FSDP2 shard the parameters
    engine = engine_cls(
        model,
        lambda m: build_optimizer(m, cfg.optim),
        lambda m: build_preconditioner(m, precond),
        info,
        grad_accum=t.grad_accum,
        bf16=t.bf16,
        grad_clip=cfg.optim.grad_clip,
        options=options,
    )
    scheduler = build_scheduler(engine.schedulable_optimizer, n_steps, cfg.optim)
    log.info(
        "data=%s (%d train) model=%s (%d params) optim=%s (base %s, lr %g) batch=%d x accum %d, "
        "%d steps (%d/epoch) on %s, %d threads, engine %s, world size %d",
        data.name, data.num_train, cfg.model.kind, num_params, cfg.optim.name,
        "deepspeed:" + str(ds["optimizer"].get("type")) if ds and "optimizer" in ds else base_name(cfg.optim),
        cfg.optim.lr, t.batch_size, t.grad_accum, n_steps, steps_per_epoch, info.device, torch.get_num_threads(),
        engine.name, engine.world_size,
    )  # fmt: skip
    pre = engine.preconditioner
    if pre is None:
        log.info("preconditioner: none (first-order optimizer)")
    else:
        # The per-block list is long (one line per layer): train.log keeps it, the console gets one line.
        log.info("preconditioner: %s", pre.describe(), extra={report.FILE_ONLY: True})
        summary = pre.describe().splitlines()[0]
        rest = len(getattr(pre, "fall_through", {}))
        log.info("preconditioner: %s; %d more on the base optimizer (list in %s)", summary, rest, report.LOG_NAME,
                 extra={report.CONSOLE_ONLY: True})  # fmt: skip
        if not pre.blocks:
            log.warning(
                "optim.name=%s but the model has no layer ds_soo preconditions (only embeddings/norms?): "
                "0 blocks, so every step is a plain %s step", cfg.optim.name, base_name(cfg.optim),
            )  # fmt: skip
    return Session(cfg, data, engine, scheduler, n_steps, steps_per_epoch, resolved, precond_cfg, num_params)


def train(
    s: Session,
    scalars: report.Scalars,
    log: logging.Logger,
    out_dir: Path | None = None,
    h: History | None = None,
    start: int = 0,
) -> History:
    """The optimizer-step loop: micro-batches through the engine, then one preconditioned step.

    ``h``/``start`` continue a resumed run: the seeded batch stream is fast-forwarded by ``start``
    batches, so step k sees the same batch as in an uninterrupted run. With ``train.checkpoint_every``
    a checkpoint is written to ``out_dir`` after every N-th step (see :mod:`ds_soo.trainer.resume`).
    """
    t, data, engine = s.cfg.train, s.data, s.engine
    pre, device = engine.preconditioner, engine.device
    h = h if h is not None else History()
    last_lr: float | None = None
    diag = s.precond_cfg.diagnostics
    quality_every = diag.quality_interval if pre is not None else 0
    if quality_every and engine.distributed:
        # Its double backward bypasses the engine's gradient hooks (DDP would then expect a reduction).
        log.warning("precond.diagnostics.quality_interval needs train.engine=single; turning it off")
        quality_every = 0
    batches = data.train_batches(t.batch_size, seed=t.seed)
    for _ in range(start):
        next(batches)
    engine.model.train()
    # disable=None: a bar on terminals only, so logs and CI output stay readable.
    disable = None if t.progress and engine.is_main else True
    bar = tqdm(range(start, s.n_steps), desc=s.cfg.optim.name, disable=disable, dynamic_ncols=True,
               initial=start, total=s.n_steps)  # fmt: skip
    for step in bar:
        _sync(device)
        t0 = time.perf_counter()
        batch = engine.shard(next(batches))
        engine.zero_grad()
        loss_sum = 0.0
        micros = [{key: v.to(device, non_blocking=True) for key, v in m.items()}
                  for m in split_batch(batch, t.grad_accum)]  # fmt: skip
        for k, micro in enumerate(micros):
            with engine.micro_step(last=k == len(micros) - 1):
                with engine.autocast():
                    logits = engine.model(micro)
                loss = data.loss(logits, micro)
                if pre is not None:  # kfac.fisher: mc feeds G from sampled labels (a no-op otherwise)
                    pre.mc_fisher_backward(logits, loss_scale=1.0 / t.grad_accum)
                engine.backward(loss)
            loss_sum += float(loss.detach())
        lr = s.scheduler.get_last_lr()[0]
        if pre is not None and lr != last_lr:
            pre.set_hyperparams(lr=lr)
            last_lr = lr
        h.changed_steps += int(engine.step())
        if pre is not None and pre.wants_damping_feedback:
            pre.damping_feedback(loss_sum / t.grad_accum, loss_after_step(engine, data, micros))
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
        reason = divergence(h.train_loss, t.divergence_factor)
        if reason:
            log.warning("diverged at step %d: %s; stopping", done, reason)
            h.diverged, h.diverged_reason = True, reason
            break
        if t.eval_interval and done % t.eval_interval == 0 and done < s.n_steps:
            ev = evaluate(engine, data, t.batch_size)
            h.eval_history.append({"step": done, **ev})
            scalars.add({f"eval/{k}": v for k, v in ev.items()}, done)
            log.info("step %d eval %s", done, _fmt(ev))
        saved = out_dir is not None and t.checkpoint_every and done % t.checkpoint_every == 0 and done < s.n_steps
        if saved:
            resume.save(s, h, done, out_dir, log)
        stop = signals.agree(engine, signals.requested())
        if stop is not None and done < s.n_steps:
            log.warning("received signal %d: stopping after step %d of %d", stop, done, s.n_steps)
            s.interrupted_by = stop
            if out_dir is not None and not saved:
                resume.save(s, h, done, out_dir, log)
            break
    bar.close()
    return h


def divergence(losses: list[float], factor: float) -> str:
    """Why the run diverged ("" if it did not). The rule: a non-finite loss, or (``factor`` > 0) a loss
    above ``factor`` times the run's first loss. The first loss is the untrained model's, so no healthy
    run gets near 100x it, while an exploding one (lr 1e6: 2.3 -> 1e10) passes it within steps."""
    last = losses[-1]
    if not math.isfinite(last):
        return f"non-finite training loss {last}"
    if factor > 0 and math.isfinite(losses[0]) and losses[0] > 0 and last > factor * losses[0]:
        return f"training loss {last:.4g} exceeds train.divergence_factor={factor:g} x the first loss {losses[0]:.4g}"
    return ""


def collect_metrics(
    s: Session, h: History, final: dict[str, float], started: float, resumed_from: int | None = None
) -> dict[str, Any]:
    """Collective: every rank contributes its curvature bytes, counters and memory; rank 0 writes them."""
    engine, pre = s.engine, s.engine.preconditioner
    per_rank = engine.gather({
        "curvature_bytes": pre.curvature_bytes() if pre is not None else 0,
        "counters": report.counters(pre),
        "peak_memory_bytes": report.peak_memory_bytes(engine.device),
    })  # fmt: skip
    counters = dict(per_rank[0]["counters"])
    # Owners count their own inverse failures; every other counter is the same on every rank.
    counters["inverse_failures"] = sum(r["counters"]["inverse_failures"] for r in per_rank)
    metrics: dict[str, Any] = {
        "config": s.resolved,
        "task": s.data.task,
        "data": {"name": s.data.name, "num_train": s.data.num_train, "steps_per_epoch": s.steps_per_epoch},
        "num_params": s.num_params,
        "steps": len(h.train_loss),
        "planned_steps": s.n_steps,
        "epochs": len(h.train_loss) / s.steps_per_epoch,
        "diverged": h.diverged,
        "train_loss": h.train_loss,
        "lr": h.lr,
        "eval_history": h.eval_history,
        "final_eval": final,
        "diverged_reason": h.diverged_reason,
        "interrupted": s.interrupted_by is not None,
        "interrupted_by_signal": s.interrupted_by,
        "step_time_median_s": statistics.median(h.step_times) if h.step_times else 0.0,
        "step_time_mean_s": statistics.fmean(h.step_times) if h.step_times else 0.0,
        # Every step's wall time: refresh steps (inverse roots) stand out against the cheap ones.
        "step_times_s": h.step_times,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": per_rank[0]["peak_memory_bytes"],
        "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in per_rank],
        "param_sq_sum": engine.param_sq_sum(),
        "param_fingerprints": engine.param_fingerprints(),
        "device": str(engine.device),
        "num_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "engine": engine.name,
        "world_size": engine.world_size,
        "backend": engine.info.backend,
        "resumed_from_step": resumed_from,
        "preconditioner_changed_steps": h.changed_steps,
        "quality_index": h.quality,
        "curvature_bytes_per_rank": [r["curvature_bytes"] for r in per_rank],
        "owner_load": owner_load(pre),
        **counters,
    }
    if pre is not None:
        metrics["precond_metrics"] = {k: float(v) for k, v in pre.metrics().items()}
        # Per-block refresh counts (this rank's blocks) and, with schedule.sparse_interval=auto, each
        # block's final interval and whether it froze.
        metrics["block_refreshes"] = dict(getattr(pre, "block_refreshes", {}))
        auto = getattr(getattr(pre, "schedule", None), "auto", None)
        if auto is not None:
            metrics["schedule_auto"] = auto.summary()
    return metrics


def owner_load(pre: Any) -> dict[str, float | int] | None:
    """How evenly the curvature blocks' inverse work is spread over ranks (``Assignment.summary()``)."""
    if pre is None:
        return None
    assignment = getattr(pre, "assignment", None)
    if assignment is None:  # one process: the preconditioner skips the assignment; every block is local
        from ds_soo.distributed.assignment import assign_blocks

        assignment = assign_blocks({b.block_id: b.dims for b in pre.blocks}, 1)
    return {k: (float(v) if isinstance(v, float) else int(v)) for k, v in assignment.summary().items()}


def run(cfg: TrainConfig, out_dir: Path, log: logging.Logger, started: float | None = None) -> dict[str, Any]:
    """Train per ``cfg`` into ``out_dir``; returns the metrics dict (written by rank 0 only).

    With ``train.resume`` the run continues from the newest complete checkpoint under ``out_dir``
    (or the one named), so ``train_loss`` still has exactly one value per step.
    """
    started = time.perf_counter() if started is None else started
    s = setup(cfg, log)
    engine = s.engine
    h, start, resumed_from = None, 0, None
    point = resume.find_resume_point(out_dir, s.cfg.train.resume, engine, log)
    if engine.is_main:
        resume.clean_stale(out_dir)
    if point is not None:
        h, start = resume.load(s, point, log)
        resumed_from = start
    elif s.cfg.train.resume is True:
        log.info("train.resume=true but %s holds no checkpoint yet: starting from step 0",
                 resume.checkpoint_root(out_dir))  # fmt: skip
    # purge_step: TensorBoard drops what an earlier attempt logged after the checkpoint, so the steps
    # recomputed now appear once.
    scalars = report.Scalars(out_dir, enabled=engine.is_main, purge_step=start + 1 if start else None)
    try:
        with signals.installed():
            h = train(s, scalars, log, out_dir, h, start)
        if s.interrupted_by is None:
            final = evaluate(engine, s.data, s.cfg.train.batch_size)
            h.eval_history.append({"step": len(h.train_loss), **final})
            scalars.add({f"eval/{k}": v for k, v in final.items()}, len(h.train_loss))
        else:
            final = {}  # interrupted: no final evaluation, the resumed run does it
    finally:
        scalars.close()
    metrics = collect_metrics(s, h, final, started, resumed_from)
    if engine.is_main:
        report.write_json(out_dir / "metrics.json", metrics)
    log.info(
        "%s: %d steps, final eval %s, step median %.1f ms / mean %.1f ms, wall %.1f s, preconditioned %d, "
        "refreshes %d",
        "interrupted" if s.interrupted_by is not None else "diverged" if h.diverged else "done",
        metrics["steps"], _fmt(final) or "-", 1e3 * metrics["step_time_median_s"],
        1e3 * metrics["step_time_mean_s"], metrics["wall_time_s"],
        metrics["preconditioned_steps"], metrics["curvature_refreshes"],
    )  # fmt: skip
    if s.interrupted_by is not None:
        log.warning("interrupted by signal %d after step %d: checkpoint written; continue with train.resume=true",
                    s.interrupted_by, metrics["steps"])  # fmt: skip
    engine.barrier()  # no rank leaves (and tears the group down) while rank 0 still writes
    return metrics


def _fmt(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in values.items())
