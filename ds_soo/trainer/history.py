"""What the loop records per optimizer step; it is part of every checkpoint (plain lists and numbers,
so a checkpoint stores it in a form ``torch.load(weights_only=True)`` reads)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class History:
    """Per optimizer step (and per evaluation) values of one run, continued across resumes."""

    train_loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    eval_history: list[dict[str, float]] = field(default_factory=list)
    quality: list[dict[str, float]] = field(default_factory=list)
    changed_steps: int = 0
    diverged: bool = False
    # Why the run stopped early: "" (it did not), "non-finite loss", "loss grew ..."; see loop.divergence.
    diverged_reason: str = ""
