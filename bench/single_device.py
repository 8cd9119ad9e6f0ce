"""Step time and memory of each method against AdamW, in one process, on CPU and (if present) CUDA.

Each method trains the same model on the same random batch; times are medians over timed steps
after warm-up. "warm" times steps in the frequent phase (refresh every ``--warm-interval`` steps,
amortised over the interval); "sparse" times steps after the warm phase with no refresh due.
Prints a markdown table of absolute times and ratios against AdamW measured in the same process.

    python bench/single_device.py --workload vit --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from ds_soo import Preconditioner

METHODS = ("adamw", "sgd", "kfac", "shampoo", "psgd")


def build(workload: str, size: str, device: torch.device):
    torch.manual_seed(0)
    if workload == "vit":
        hidden, layers = (192, 4) if size == "small" else (384, 6)
        cfg = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=hidden // 64, intermediate_size=4 * hidden, num_labels=10)
        model = ViTForImageClassification(cfg).to(device)
        x = torch.randn(args.batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (args.batch,), device=device)

        def loss_fn():
            return model(pixel_values=x, labels=y).loss
    else:
        hidden, layers = (192, 4) if size == "small" else (384, 6)
        cfg = GPT2Config(vocab_size=65, n_positions=128, n_embd=hidden, n_layer=layers, n_head=hidden // 64)
        model = GPT2LMHeadModel(cfg).to(device)
        ids = torch.randint(0, 65, (args.batch, 128), device=device)

        def loss_fn():
            return model(input_ids=ids, labels=ids).loss
    return model, loss_fn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_method(method: str, phase: str, device: torch.device) -> tuple[float, int]:
    model, loss_fn = build(args.workload, args.size, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    pre = None
    if method == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    if method in ("kfac", "shampoo", "psgd"):
        warm = 10**9 if phase == "warm" else 1
        schedule = {"warm_steps": warm, "warm_interval": args.warm_interval, "sparse_interval": 0}
        if method == "psgd" and phase == "sparse":
            schedule["sparse_interval"] = 10**9
        pre = Preconditioner(model, {"method": method, "schedule": schedule}, optimizer=opt)
    times = []
    for i in range(args.warmup + args.steps):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        if pre is not None:
            pre.step()
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if pre is not None and pre.counters["preconditioned_steps"] == 0:
        raise RuntimeError(f"{method}: preconditioning never ran; the timing would be of plain SGD")
    # Warm phase: the mean over a full refresh interval is the amortised cost; sparse: the median.
    step = statistics.fmean(times) if phase == "warm" else statistics.median(times)
    state = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    state += pre.curvature_bytes() if pre is not None else 0
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return step, state, peak


def main() -> None:
    devices = [torch.device(args.device)] if args.device != "all" else [torch.device("cpu")]
    if args.device == "all" and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
        print(f"\n### {args.workload} ({args.size}), batch {args.batch}, device {name}")
        print("| method | warm step (s) | warm / AdamW | sparse step (s) | sparse / AdamW "
              "| optimizer+curvature state (MiB) | state / AdamW | peak CUDA alloc (MiB) |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        base = None
        for method in args.methods:
            warm, state, peak = time_method(method, "warm", device)
            sparse, _, _ = time_method(method, "sparse", device)
            if base is None:
                base = (warm, sparse, state)
            peak_txt = f"{peak / 2**20:.0f}" if peak is not None else "n/a"
            print(f"| {method} | {warm:.4f} | {warm / base[0]:.2f} | {sparse:.4f} | {sparse / base[1]:.2f} "
                  f"| {state / 2**20:.1f} | {state / base[2]:.2f} | {peak_txt} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["vit", "gpt"], default="vit")
    parser.add_argument("--size", choices=["small", "base"], default="small")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or all")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--warm-interval", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = parser.parse_args()
    if args.methods[0] != "adamw":
        sys.exit("--methods must start with adamw (the ratio baseline)")
    main()
