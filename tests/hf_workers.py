"""Models, data and worker functions shared by the HF Trainer and accelerate tests.

Run in-process (single-process Trainer), by ``dist_harness.launch`` (DDP and DeepSpeed under the
Trainer; ranks get torchrun's environment and a gloo group), or as a script under ``accelerate launch``
(``python tests/hf_workers.py accelerate OUTDIR``). Every run returns the preconditioner's counters
and, on rank 0, the final weights, so the tests can check both that preconditioning ran at every
optimizer step and that the distributed run equals a single-process one on the same global batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the accelerate-launched script imports ds_soo from the checkout
    sys.path.insert(0, str(ROOT))

GPT2_VOCAB, SEQ = 64, 16


class DictDataset(torch.utils.data.Dataset):
    """A list of equal-shape tensors per key; the Trainer's default collator stacks them."""

    def __init__(self, **columns: torch.Tensor):
        self.columns = columns
        self.n = len(next(iter(columns.values())))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.columns.items()}


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    """``dtype`` float64 gives path-against-path comparisons float64 round-off (and float64 curvature state)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=GPT2_VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg).to(dtype)


def gpt2_data(n: int, seed: int = 1) -> DictDataset:
    """Counting sequences (t, t+1, ...) mod vocab from random starts, plus a little noise: learnable."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, GPT2_VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(SEQ)) % GPT2_VOCAB
    noise = torch.rand(n, SEQ, generator=g) < 0.1
    ids = torch.where(noise, torch.randint(0, GPT2_VOCAB, (n, SEQ), generator=g), ids)
    return DictDataset(input_ids=ids, labels=ids.clone())


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=64, num_labels=4,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return ViTForImageClassification(cfg).to(dtype)


def vit_data(n: int, seed: int = 2, dtype: torch.dtype = torch.float32) -> DictDataset:
    """Label = the brightest quadrant of a noisy image."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    for q in range(4):
        r, c = divmod(q, 2)
        x[labels == q, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] += 1.0
    return DictDataset(pixel_values=x.to(dtype), labels=labels)


def training_args(out: str, **overrides: Any):
    """Deterministic, quiet, CPU TrainingArguments: sequential order, constant LR, no saving, no reporting."""
    from transformers import TrainingArguments

    kw: dict[str, Any] = dict(
        output_dir=out, per_device_train_batch_size=8, max_steps=4, learning_rate=0.05, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, train_sampling_strategy="sequential",
        dataloader_drop_last=True, save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
        use_cpu=True, seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    kw.update(overrides)
    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    return TrainingArguments(**{k: v for k, v in kw.items() if k in known})  # older transformers lack a few


def flat_weights(model: torch.nn.Module) -> list[float]:
    """All parameters (ZeRO-3 partitions gathered), flattened in name order (as float64: exact for fp32,
    and a float64 model keeps its last bits)."""
    params = [p for _, p in sorted(model.named_parameters())]
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().reshape(-1).double() for p in params]).tolist()
    return torch.cat([p.detach().reshape(-1).double() for p in params]).tolist()


def named_weights(model: torch.nn.Module) -> dict[str, list[float]]:
    """Every parameter tensor by name (ZeRO-3 partitions gathered), for per-tensor comparisons."""
    params = sorted(model.named_parameters())
    ctx = None
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in params])
    if ctx is not None:
        with ctx:
            return {n: p.detach().reshape(-1).double().tolist() for n, p in params}
    return {n: p.detach().reshape(-1).double().tolist() for n, p in params}


def summary(trainer, pre, weights: bool) -> dict[str, Any]:
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    grad_norms = [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]
    out = {
        "counters": dict(pre.counters),
        "global_step": trainer.state.global_step,
        "rank": pre.rank,
        "world_size": pre.world_size,
        "blocks": len(pre.blocks),
        "owned": len(pre.states),
        "losses": losses,
        "grad_norms": grad_norms,
        "damping_rule": pre.adaptive.rule.state_dict() if pre.adaptive is not None else None,
    }
    if weights:
        out["tensors"] = named_weights(trainer.model)  # one gather: sorted by name, as flat_weights
        out["weights"] = [v for n in sorted(out["tensors"]) for v in out["tensors"][n]]
    return out


def build(kind: str, dtype: torch.dtype = torch.float32):
    if kind == "gpt2":
        return tiny_gpt2(dtype=dtype), gpt2_data(64)
    if kind == "vit":
        return tiny_vit(dtype=dtype), vit_data(64, dtype=dtype)
    raise ValueError(kind)


def trainer_run(
    kind: str, ds_soo: dict | None, out: str, deepspeed: str | dict | None = None, weights: bool = True,
    dtype: torch.dtype = torch.float32, **args: Any,
) -> dict[str, Any]:
    """One SecondOrderTrainer run; works in-process and on every rank of a harness launch."""
    from ds_soo.integrations.hf import SecondOrderTrainer

    model, data = build(kind, dtype)
    targs = training_args(out, deepspeed=deepspeed, **args)
    trainer = SecondOrderTrainer(model=model, args=targs, train_dataset=data, ds_soo=ds_soo)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    result = summary(trainer, trainer.preconditioner, weights and rank == 0)
    result["kind"] = kind
    engine = trainer.model_wrapped
    result["engine"] = type(engine).__name__
    result["zero_stage"] = int(engine.zero_optimization_stage()) if trainer.is_deepspeed_enabled else -1
    result["partitioned"] = any(hasattr(p, "ds_id") for p in trainer.model.parameters())
    result["max_grad_norm_after"] = trainer.args.max_grad_norm  # restored after train()
    result["dtypes"] = sorted({str(p.dtype) for p in trainer.model.parameters()})
    result["state_dtypes"] = sorted({str(t.dtype) for s in trainer.preconditioner.states.values()
                                     for t in s.state_dict().values() if isinstance(t, torch.Tensor)})  # fmt: skip
    return result


def trainer_runs(runs: list[dict]) -> dict[str, Any]:
    """Several Trainer runs in one launch (each run is ``trainer_run``'s keyword arguments)."""
    return {str(i): trainer_run(**run) for i, run in enumerate(runs)}


def manual_run(
    kind: str, ds_soo: dict, steps: int, batch: int = 8, lr: float = 0.05, clip: float = 1.0,
    clip_after: bool = False, trainer_loss: bool = True, dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The reference loop: backward on the global batch, clip the raw gradient, precondition, SGD.

    ``clip_after`` swaps the middle two (the old, wrong order that clipped the preconditioned direction);
    ``clip=0`` clips nothing. Under ``damping.kind: adaptive`` the loss on the same batch after the step
    is reported to the preconditioner.

    ``trainer_loss`` normalises GPT-2's loss as the Trainer does; False takes the model's plain mean.
    """
    from torch.utils.data import default_collate

    from ds_soo.preconditioner import Preconditioner

    model, data = build(kind, dtype)
    model.train()
    pre = Preconditioner(model, ds_soo)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    pre.set_base_optimizer(opt)  # kfac.kl_clip "auto" is on over SGD, as in the Trainer
    pre.set_hyperparams(lr=lr)
    losses = []
    for step in range(steps):
        inputs = default_collate([data[i] for i in range(step * batch, (step + 1) * batch)])
        # As the Trainer does for GPT2LMHeadModel (whose loss_type is None, so transformers 5.24 counts the
        # labels before the causal shift): sum over T-1 positions divided by T. K-FAC under damping is not
        # scale-invariant, so a plain mean would differ by ~1e-4.
        extra = {"num_items_in_batch": inputs["labels"].ne(-100).sum()} if trainer_loss else {}
        loss = model(**inputs, **extra).loss
        loss.backward()
        if clip_after:
            pre.step()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        else:
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            pre.step()
        opt.step()
        opt.zero_grad()
        if pre.wants_damping_feedback:
            with torch.no_grad(), pre.paused_capture():
                pre.damping_feedback(loss.detach(), model(**inputs, **extra).loss)
        losses.append(float(loss.detach()))
    pre.remove_hooks()
    rule = pre.adaptive.rule.state_dict() if pre.adaptive is not None else None
    return {"counters": dict(pre.counters), "losses": losses, "weights": flat_weights(model), "damping_rule": rule}


# ---------------------------------------------------------------------------- accelerate launch
def accelerate_loop(
    accelerator, config: dict | None = None, steps: int = 4, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """The README's accelerate loop: tiny GPT-2, micro-batches of 4, SGD, accumulation as configured.

    This is the code the accelerate section of the README quotes; ``config=None`` takes the DeepSpeed
    config's "ds_soo" block. Clipping is the config's: ``grad_clip`` (or DeepSpeed's ``gradient_clipping``),
    applied to the raw gradient before preconditioning.
    """
    from ds_soo.integrations.accelerate import attach, detach

    model, data = tiny_gpt2(dtype=dtype), gpt2_data(64)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    pre = attach(accelerator, model, config, optimizer=optimizer)
    done, losses = 0, []
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)  # clips and preconditions after the last micro-batch's backward
            optimizer.step()  # under DeepSpeed a no-op: engine.step() ran inside backward
            optimizer.zero_grad()
        losses.append(float(loss.detach()))
        done += int(accelerator.sync_gradients)
        if done == steps:
            break
    detach(accelerator)
    return {
        "counters": dict(pre.counters),
        "optimizer_steps_seen": done,
        "distributed_type": str(accelerator.distributed_type),
        "engine": type(model).__name__,
        "zero_stage": int(model.zero_optimization_stage()) if hasattr(model, "zero_optimization_stage") else -1,
        "world_size": accelerator.num_processes,
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "losses": losses,
        "gas": accelerator.gradient_accumulation_steps,
        "hooks_left": len(pre._hooks),
        "backward_restored": "backward" not in vars(accelerator),
        "engine_step_restored": "step" not in vars(model),
        "weights": flat_weights(accelerator.unwrap_model(model)) if accelerator.is_main_process else None,
        "dtypes": sorted({str(p.dtype) for p in accelerator.unwrap_model(model).parameters()}),
        "state_dtypes": sorted({str(t.dtype) for s in pre.states.values() for t in s.state_dict().values()
                                if isinstance(t, torch.Tensor)}),  # fmt: skip
    }


def accelerate_main(out: str) -> None:
    """Entry point under ``accelerate launch --config_file configs/accelerate/deepspeed_zero2_cpu.yaml``.

    On CPU accelerate would not use gloo for DeepSpeed by itself: the gloo PartialState must exist
    before ``Accelerator()``.
    """
    from accelerate import Accelerator, PartialState

    PartialState(backend="gloo")
    accelerator = Accelerator(gradient_accumulation_steps=2)  # as in configs/ds/hf_accelerate_zero2.json
    result = accelerate_loop(accelerator)
    Path(out, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


def gpu_mixed_precision_check(out: str) -> dict[str, Any]:
    """On one CUDA GPU: the Trainer's fp16 (GradScaler) and bf16 paths, K-FAC and Shampoo, against fp32.

    Not part of the CPU suite; run by hand on a GPU machine: ``python tests/hf_workers.py gpu OUTDIR``.
    """
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    for method in ("kfac", "shampoo"):
        cfg = {"method": method}
        for precision in ("fp32", "fp16", "bf16"):
            flags = {"fp16": precision == "fp16", "bf16": precision == "bf16"}
            r = trainer_run("gpt2", cfg, out, use_cpu=False, max_steps=12, **flags)
            weights = torch.tensor(r.pop("weights"))
            r["weights_finite"] = bool(torch.isfinite(weights).all())
            r["weights_norm"] = float(weights.norm())
            results[f"{method}_{precision}"] = r
    Path(out, "gpu.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    code = 0
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "accelerate":
            accelerate_main(sys.argv[2])
        elif len(sys.argv) == 3 and sys.argv[1] == "gpu":
            gpu_mixed_precision_check(sys.argv[2])
        else:
            raise SystemExit("usage: hf_workers.py accelerate OUTDIR (under accelerate launch)")
    except BaseException:  # noqa: BLE001 - the test reads the traceback from the log
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # avoids torch/gloo's sporadic shutdown abort (see ENGINES.md)
