"""Levenberg-Marquardt damping adaptation (Martens & Grosse 2015, section 6.5; kfac-jax's rule).

The damped quadratic model of the loss around the current weights is

    M(delta) - M(0) = g^T delta + 1/2 delta^T (C + lambda I) delta,

with ``g`` the step's gradient, ``C`` the curvature (K-FAC's A (x) G per layer) and ``lambda`` the
damping. After a step ``delta`` the reduction ratio ``rho = (L(theta + delta) - L(theta)) / (M(delta) - M(0))``,
both measured on the same batch, says how far the model can be trusted: near 1 it predicted the loss
change well, so less damping lets the curvature act more; near 0 (or negative) it was too optimistic,
so more damping shortens the step. Pure host arithmetic on scalars: it knows nothing of ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ds_soo.config import DampingConfig


def model_change(grad_dot_delta: float, curvature: float, delta_sq: float, damping: float) -> float:
    """M(delta) - M(0) = g^T delta + 1/2 (delta^T C delta + damping |delta|^2)."""
    return grad_dot_delta + 0.5 * (curvature + damping * delta_sq)


def reduction_ratio(observed: float, predicted: float) -> float | None:
    """rho = observed / predicted loss change; None where it says nothing (a value not finite, or no step).

    The step is the base optimizer's (momentum included), not the model's minimiser, so the model can
    predict an *increase*. Then the sign decides: the loss fell anyway (the model is too pessimistic:
    +inf, less damping), or it rose as predicted (the step is too long: -inf, more damping)."""
    if not (math.isfinite(observed) and math.isfinite(predicted)) or predicted == 0.0:
        return None
    if predicted > 0.0:
        return math.inf if observed < 0.0 else -math.inf
    return observed / predicted


@dataclass
class LevenbergMarquardt:
    """The current damping and the rule that moves it; the same floats on every rank."""

    value: float
    interval: int = 5
    decay: float = 0.95
    low: float = 0.25
    high: float = 0.75
    min_value: float = 1e-8
    max_value: float = 100.0
    last_ratio: float | None = None
    adaptations: int = 0

    @classmethod
    def from_config(cls, d: DampingConfig, initial: float) -> LevenbergMarquardt:
        start = min(max(initial, d.min_value), d.max_value)
        return cls(start, d.adapt_interval, d.adapt_decay, d.adapt_low, d.adapt_high, d.min_value, d.max_value)

    @property
    def factor(self) -> float:
        """omega = decay^interval: one adaptation's multiplier (M&G's (19/20)^T1)."""
        return self.decay**self.interval

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (0-based) is followed by an adaptation: every ``interval``-th step."""
        return (step + 1) % self.interval == 0

    def update(self, ratio: float | None) -> float:
        """Move the damping by one adaptation given the step's reduction ratio; returns the new value."""
        self.last_ratio = ratio
        if ratio is None:
            return self.value
        self.adaptations += 1
        if ratio > self.high:
            self.value = max(self.value * self.factor, self.min_value)
        elif ratio < self.low:
            self.value = min(self.value / self.factor, self.max_value)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "last_ratio": self.last_ratio, "adaptations": self.adaptations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
        self.last_ratio = None if state.get("last_ratio") is None else float(state["last_ratio"])
        self.adaptations = int(state.get("adaptations", 0))
