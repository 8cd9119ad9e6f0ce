"""Owner-based curvature placement at scale, from layer shapes alone (no processes, no timing).

For ViT-S/16, ViT-B/16 and GPT-2 small, builds the K-FAC blocks (factors in+1 and out per linear
layer) and the Shampoo blocks (each weight viewed as (rows, rest) and tiled to <= max_dim, as the
preconditioner does), assigns them with ds_soo's LPT at 8 ... 1024 ranks, and prints a markdown
table: the max/mean inverse compute (LPT, its lower bound, and round-robin), the largest per-rank
curvature memory against what every rank holds when curvature is replicated (KAISA's all-reduce),
and how many ranks own nothing.

Curvature bytes count an fp32 factor plus its inverse (or inverse root) per factor dim: 8 * d^2.

    python bench/dist_memory.py [--max-dim 1024] [--ranks 8 16 32 64 128 256 512 1024]
"""

from __future__ import annotations

import argparse

from ds_soo.dist.assignment import BlockCost, assign_blocks

BYTES_PER_ELEM = 8  # fp32 factor + fp32 inverse/root of the same size


def vit_layers(dim: int, depth: int, mlp: int, patch: int = 16, channels: int = 3, classes: int = 1000):
    """(name, out, in) of every Linear of a timm/HF ViT; the patch conv counts as a Linear."""
    layers = [("patch_embed", dim, channels * patch * patch)]
    for i in range(depth):
        layers += [
            (f"blocks.{i}.attn.qkv", 3 * dim, dim),
            (f"blocks.{i}.attn.proj", dim, dim),
            (f"blocks.{i}.mlp.fc1", mlp, dim),
            (f"blocks.{i}.mlp.fc2", dim, mlp),
        ]
    return layers + [("head", classes, dim)]


def gpt2_layers(dim: int = 768, depth: int = 12):
    """(name, out, in) of GPT-2's Conv1D layers; the tied wte/lm_head is an embedding (see params)."""
    layers = []
    for i in range(depth):
        layers += [
            (f"h.{i}.attn.c_attn", 3 * dim, dim),
            (f"h.{i}.attn.c_proj", dim, dim),
            (f"h.{i}.mlp.c_fc", 4 * dim, dim),
            (f"h.{i}.mlp.c_proj", dim, 4 * dim),
        ]
    return layers


def gpt2_extra_params(dim: int = 768, vocab: int = 50257, ctx: int = 1024):
    """Embeddings Shampoo preconditions but K-FAC leaves out (its vocab-side factor is diagonal)."""
    return [("wte", (vocab, dim)), ("wpe", (ctx, dim))]


MODELS = {
    "ViT-S/16": (vit_layers(384, 12, 1536), []),
    "ViT-B/16": (vit_layers(768, 12, 3072), []),
    "GPT-2 small": (gpt2_layers(), gpt2_extra_params()),
}


def kfac_blocks(layers) -> dict[str, list[int]]:
    return {name: [fan_in + 1, out] for name, out, fan_in in layers}


def shampoo_blocks(layers, extra, max_dim: int) -> dict[str, list[int]]:
    params = []
    for name, out, fan_in in layers:
        params += [(f"{name}.weight", (out, fan_in)), (f"{name}.bias", (out,))]
    blocks = {}
    for name, shape in params + list(extra):
        rows = shape[0]
        cols = 1
        for s in shape[1:]:
            cols *= s
        for r0 in range(0, rows, max_dim):
            for c0 in range(0, cols, max_dim):
                r1, c1 = min(r0 + max_dim, rows), min(c0 + max_dim, cols)
                blocks[f"{name}[{r0}:{r1},{c0}:{c1}]"] = [r1 - r0, c1 - c0]
    return blocks


def mib(elems: int) -> str:
    return f"{elems * BYTES_PER_ELEM / 2**20:,.1f}"


def table(ranks: list[int], max_dim: int) -> str:
    head = (
        "| model | method | ranks | blocks | LPT max/mean | bound | round-robin max/mean | max MiB/rank | "
        "replicated MiB | saving | idle ranks |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [head]
    for model, (layers, extra) in MODELS.items():
        for method, blocks in (("K-FAC", kfac_blocks(layers)), ("Shampoo", shampoo_blocks(layers, extra, max_dim))):
            for n in ranks:
                lpt = assign_blocks(blocks, n)
                rr = assign_blocks(blocks, n, strategy="round_robin")
                worst = max(lpt.memory)
                mean = sum(lpt.compute) / n
                bound = max(max(BlockCost(tuple(d)).compute for d in blocks.values()), mean) / mean
                rows.append(
                    f"| {model} | {method} | {n} | {len(blocks)} | {lpt.imbalance:.2f} | {bound:.2f} | "
                    f"{rr.imbalance:.2f} | "
                    f"{mib(worst)} | {mib(lpt.total_memory)} | {lpt.total_memory / worst:.1f}x | "
                    f"{len(lpt.idle_ranks)} |"
                )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-dim", type=int, default=1024, help="Shampoo block size limit")
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    args = p.parse_args()
    print(table(args.ranks, args.max_dim))
    print(
        "\nmax/mean: the busiest rank's inverse compute over the mean (1.00 = perfect). bound: the best"
        " any packing can do, max(largest block, mean)/mean: past ~#blocks ranks the largest block sets it."
    )


if __name__ == "__main__":
    main()
