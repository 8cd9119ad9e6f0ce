"""How each supported module type turns (h, d) into rows and its parameters into a gradient matrix.

The gradient matrix of a layer is ``[dW | db]`` with shape (out, in [+1]); the bias is folded in as
an augmented constant-one input column. Supported: ``nn.Linear``, ``nn.Conv2d`` (groups=1, zero
padding; patches via ``unfold``) and transformers' ``Conv1D`` (GPT-2's transposed linear layer).
Everything else (Embedding, LayerNorm, tied weights, ...) is reported as falling through, and so is
``nn.MultiheadAttention.out_proj``: MHA applies its weight through ``F.multi_head_attention_forward``,
so no forward hook ever sees that layer's input.

Weight sharing (``kfac.weight_sharing``, see :class:`ds_soo.config.KFACConfig`): a layer applied at
several positions per example (conv patches, tokens) gives A and G as sums over examples and, per
example, over positions, normalised so that tr(A) tr(G) matches the empirical Fisher's trace:

- ``expand``: every row is an example (A, G = row means of h h^T and (R d)(R d)^T, R rows);
- ``kfc`` (``auto``): (Grosse & Martens 2016; K-FAC-expand under a per-example loss) A as expand,
  G = per-example mean of the sum over positions of (N d)(N d)^T, N examples;
- ``reduce``: (Eschenhagen et al. 2023) h averaged and d summed over an example's positions.

Each statistic is returned with its normaliser: the A count and the number of examples G is scaled by.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ds_soo.curvature.precision import as_state
from ds_soo.distributed.exchange import full_range


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers missing or moved: Conv1D simply is not recognised
        return None
    return Conv1D


@dataclass
class LayerHandler:
    """One supported layer: names of its parameters and the maps between rows, vectors and matrices."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv2d" | "conv1d"
    weight_name: str
    bias_name: str | None
    weight_shape: tuple[int, ...]

    @property
    def out_dim(self) -> int:
        return self.weight_shape[1] if self.kind == "conv1d" else self.weight_shape[0]

    @property
    def in_dim(self) -> int:
        if self.kind == "conv1d":
            base = self.weight_shape[0]
        else:
            base = 1
            for s in self.weight_shape[1:]:
                base *= s
        return base + (1 if self.bias_name else 0)

    def input_rows(self, h: torch.Tensor) -> torch.Tensor:
        """Layer inputs as rows (n, in [+1]) in their state dtype, with the bias column appended."""
        h = as_state(h.detach())
        if self.kind == "conv2d":
            m = self.module
            h = F.unfold(h, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            h = h.transpose(1, 2).reshape(-1, h.shape[1])
        else:
            h = h.reshape(-1, h.shape[-1])
        if self.bias_name:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        return h

    def output_rows(self, d: torch.Tensor) -> torch.Tensor:
        """Gradients w.r.t. the layer output as rows (n, out) in their state dtype."""
        d = as_state(d.detach())
        if self.kind == "conv2d":
            d = d.flatten(2).transpose(1, 2)
        return d.reshape(-1, d.shape[-1])

    def sharing(self, setting: str, ndim: int) -> str:
        """The factor convention for an input of ``ndim`` dims under ``kfac.weight_sharing``."""
        shared = self.kind == "conv2d" or ndim > 2
        if not shared:
            return "expand"  # one row per example: every convention is the same
        if setting == "auto":
            return "kfc"  # per-example loss: positions expanded, G scaled by the number of examples
        return setting

    def a_stats(self, h: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
        """This micro-batch's rows for A under ``mode`` and A's normaliser (rows or examples)."""
        rows = self.input_rows(h)
        if mode != "reduce":
            return rows, rows.shape[0]
        n = h.shape[0]
        return rows.view(n, -1, rows.shape[-1]).mean(dim=1), n

    def g_stats(self, d: torch.Tensor, mode: str) -> tuple[torch.Tensor, int]:
        """This micro-batch's rows for G under ``mode`` and the number of examples G is scaled by."""
        rows = self.output_rows(d)
        if mode == "expand":
            return rows, rows.shape[0]
        n = d.shape[0]
        if mode == "reduce":
            return rows.view(n, -1, rows.shape[-1]).sum(dim=1), n
        return rows, n  # kfc: the sum over positions, an example count of N

    def pieces(self) -> list[tuple[str, torch.Tensor]]:
        """(param name, flat indices) whose concatenation is this layer's gradient vector."""
        numel = 1
        for s in self.weight_shape:
            numel *= s
        out = [(self.weight_name, full_range(numel))]
        if self.bias_name:
            out.append((self.bias_name, full_range(self.out_dim)))
        return out

    def to_matrix(self, vec: torch.Tensor) -> torch.Tensor:
        n_w = self.out_dim * (self.in_dim - (1 if self.bias_name else 0))
        w = vec[:n_w]
        if self.kind == "conv1d":
            w = w.view(self.weight_shape[0], self.weight_shape[1]).T
        else:
            w = w.view(self.out_dim, -1)
        if self.bias_name:
            return torch.cat([w, vec[n_w:].view(-1, 1)], dim=1)
        return w.contiguous()

    def from_matrix(self, mat: torch.Tensor) -> torch.Tensor:
        w = mat[:, :-1] if self.bias_name else mat
        if self.kind == "conv1d":
            w = w.T
        parts = [w.reshape(-1)]
        if self.bias_name:
            parts.append(mat[:, -1].reshape(-1))
        return torch.cat(parts)


def _kind(module: nn.Module) -> str | None:
    conv1d = _conv1d_type()
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        if isinstance(module.padding, str):
            return None
        return "conv2d"
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    return None


def find_kfac_layers(
    model: nn.Module, shapes: dict[str, tuple[int, ...]], exclude: list[str]
) -> tuple[list[LayerHandler], dict[str, str]]:
    """Supported layers, plus every other trainable parameter mapped to the reason it falls through.

    ``shapes`` holds each trainable parameter's true shape (ZeRO-3 empties ``p.shape``).
    """
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    canonical = {id(p): n for n, p in model.named_parameters()}
    functional = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    layers: list[LayerHandler] = []
    covered: set[str] = set()
    reasons: dict[str, str] = {}
    for mname, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        w = module.weight
        weight_name = canonical.get(id(w))
        if weight_name is None or weight_name not in shapes:
            continue
        if any(fnmatch.fnmatch(mname, pat) for pat in exclude):
            reasons[weight_name] = f"excluded by pattern ({mname})"
            continue
        if id(module) in functional:
            reasons[weight_name] = (
                f"{mname} is applied functionally by nn.MultiheadAttention, so no forward hook sees its input"
            )
            bias = getattr(module, "bias", None)
            if isinstance(bias, nn.Parameter) and canonical.get(id(bias)) in shapes:
                reasons[canonical[id(bias)]] = reasons[weight_name]
            continue
        if len(owners[id(w)]) > 1:
            reasons[weight_name] = f"tied weight shared by {owners[id(w)]}"
            continue
        bias = getattr(module, "bias", None)
        bias_name = canonical.get(id(bias)) if isinstance(bias, nn.Parameter) else None
        if bias_name is not None and bias_name not in shapes:
            bias_name = None  # frozen bias: folding it in would precondition a gradient nobody has
        layers.append(LayerHandler(mname, module, kind, weight_name, bias_name, tuple(shapes[weight_name])))
        covered.add(weight_name)
        if bias_name:
            covered.add(bias_name)
    for pname in shapes:
        if pname not in covered and pname not in reasons:
            reasons[pname] = "no K-FAC handler for its module type"
    return layers, reasons
