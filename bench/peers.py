"""ds_soo (K-FAC, Shampoo, PSGD) against the public second-order peers, in one process, as ratios to AdamW.

Peers: Meta's Distributed Shampoo and kfac-pytorch (KAISA), extracted at run time from their source
archives (``--peers-src``, default ``$DS_SOO_PEERS`` or ``../shared/peers``) into the git-ignored
``.peers/`` folder, and HeavyBall SOAP and PSGD-Kron (``pip install heavyball==3.2.1 --no-deps``), run eager.
A peer that cannot be found or imported is listed as missing in the table; the rest still run.

Every method trains the same model on the same batches (Tiny Shakespeare windows for char-GPT,
CIFAR-10 images resized to the model's size for ViT, from ``$DS_SOO_DATA``). Each repetition builds a
fresh model and optimizer per method, and step i of every method runs back to back (in an order
rotated per step), so that drift and load spikes of a shared machine hit all methods alike. Every
method refreshes its curvature every ``--interval`` steps (statistics every step; the PSGDs fit
their factors every ``--interval`` steps); the timed window starts after ``--warmup`` steps and
spans whole refresh cycles, so:

- warm mean: the mean step over the timed cycles (one refresh per cycle, amortised);
- sparse median: the median step, i.e. a step with no refresh due;
- p99: the 99th percentile step (the refresh spike shows here);
- peak: CUDA max allocated during the method's steps (n/a on CPU);
- state: bytes of every tensor reachable from the optimizer (and preconditioner) that is not a
  parameter, gradient or buffer of the model: moments, factors, roots, inverses, index tensors
  (the JSON also has ds_soo's own ``curvature_bytes()``: factors, roots and inverses only).

Settings follow ``peers/README.md``: GPT-2's ``Conv1D`` is swapped for ``nn.Linear`` in every model
(kfac-pytorch handles Linear and Conv2d only); kfac-pytorch with ``compute_method="inverse"`` and its
KL-clip; Meta Shampoo with ``precondition_frequency``, ``max_preconditioner_dim=1024``, Adam grafting,
factor beta2, grafting beta2 and epsilon matched to ds_soo's defaults, and its default distributed config.

    python bench/peers.py --preset cpu --workload gpt vit --json out/peers_cpu.json
    python bench/peers.py --preset gpu --device cuda --amp bf16 --json out/peers_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
DS_SOO = ("kfac", "shampoo", "psgd")
PEERS = ("kfac-pytorch", "meta-shampoo", "hb-soap", "hb-psgd-kron")
METHODS = ("adamw", *DS_SOO, *PEERS)
# ds_soo with one option changed, run on request only (``--methods``): name -> (method, its options).
VARIANTS = {"shampoo-dense": ("shampoo", {"pack_statistics": False})}
ARCHIVES = {"meta-shampoo": "meta_distributed_shampoo_*.tar.gz", "kfac-pytorch": "kfac_pytorch_*.tar.gz"}


@dataclass(frozen=True)
class Workload:
    kind: str  # "gpt" or "vit"
    layers: int
    hidden: int
    batch: int
    seq: int = 0  # gpt: context length T
    image: int = 0  # vit: image side
    patch: int = 0


PRESETS: dict[str, dict[str, Workload]] = {
    # Issue anchors: char-GPT 6 x 384, T=256, batch 512; ViT-S/16 (12 x 384) at 224 px, batch 256.
    "gpu": {"gpt": Workload("gpt", 6, 384, 512, seq=256), "vit": Workload("vit", 12, 384, 256, image=224, patch=16)},
    # The peers README's CPU comparison: 4 x 192, batch 32.
    "cpu": {"gpt": Workload("gpt", 4, 192, 32, seq=64), "vit": Workload("vit", 4, 192, 32, image=32, patch=4)},
    # Seconds per method: what the test suite runs so that the script cannot rot.
    "tiny": {"gpt": Workload("gpt", 2, 64, 4, seq=32), "vit": Workload("vit", 2, 64, 4, image=16, patch=4)},
}


# ----------------------------------------------------------------------------- peers on disk
def default_peers_src() -> Path:
    return Path(os.environ.get("DS_SOO_PEERS", ROOT.parent / "shared" / "peers"))


def extract_peers(src: Path, dest: Path = ROOT / ".peers") -> dict[str, str]:
    """Unpack the peer archives into ``dest`` (once per archive version) and put them on sys.path.

    Returns ``{peer: "ok" or why it is missing}``. kfac-pytorch reads its version from installed
    package metadata, which a source tree lacks, so that one line is patched (peers/README.md).
    """
    status = {}
    for peer, pattern in ARCHIVES.items():
        found = sorted(Path(src).glob(pattern)) if Path(src).is_dir() else []
        if not found:
            status[peer] = f"missing: no {pattern} in {src}"
            continue
        archive = found[-1]
        root = dest / peer
        stamp = dest / f".{peer}.stamp"
        key = f"{archive.name}:{archive.stat().st_size}"
        if not (root.is_dir() and stamp.is_file() and stamp.read_text() == key):
            dest.mkdir(parents=True, exist_ok=True)
            with tarfile.open(archive) as tar:
                tar.extractall(dest, filter="data")
            if not root.is_dir():
                status[peer] = f"missing: {archive.name} has no top-level {peer}/ folder"
                continue
            if peer == "kfac-pytorch":
                init = root / "kfac" / "__init__.py"
                text = init.read_text().replace(
                    "__version__ = importlib_metadata.version('kfac-pytorch')", "__version__ = '0.4.2'"
                )
                init.write_text(text)
            stamp.write_text(key)
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        status[peer] = "ok"
    return status


def import_peers(status: dict[str, str]) -> dict[str, str]:
    """Import each peer once; a failure marks it missing with the reason instead of stopping the run."""
    checks = {
        "kfac-pytorch": "kfac.preconditioner",
        "meta-shampoo": "distributed_shampoo",
        "hb-soap": "heavyball",
        "hb-psgd-kron": "heavyball",
    }
    out = dict(status)
    for peer, module in checks.items():
        if out.get(peer, "ok") != "ok":
            continue
        try:
            __import__(module)
            out[peer] = "ok"
        except Exception as e:  # noqa: BLE001 - any import failure makes the peer "missing", with the reason
            hint = " (pip install heavyball==3.2.1 --no-deps)" if module == "heavyball" else ""
            out[peer] = f"missing: import {module} failed: {type(e).__name__}: {e}{hint}"
    if out.get("hb-soap") == "ok":
        import heavyball.utils

        # Eager: no torch.compile anywhere in HeavyBall.
        heavyball.utils.compile_mode = None
        heavyball.utils.compile_mode_recommended_to_none = None
    return out


# ----------------------------------------------------------------------------- models and data
def conv1d_to_linear(model: nn.Module) -> nn.Module:
    """Replace transformers' Conv1D (weight (in, out)) by the equivalent nn.Linear, in place."""
    from transformers.pytorch_utils import Conv1D

    for name, child in list(model.named_children()):
        if isinstance(child, Conv1D):
            lin = nn.Linear(child.weight.shape[0], child.weight.shape[1])
            with torch.no_grad():
                lin.weight.copy_(child.weight.T)
                lin.bias.copy_(child.bias)
            setattr(model, name, lin)
        else:
            conv1d_to_linear(child)
    return model


def build_model(w: Workload, vocab: int, classes: int) -> nn.Module:
    torch.manual_seed(0)
    if w.kind == "gpt":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=vocab, n_positions=w.seq, n_embd=w.hidden, n_layer=w.layers,
                         n_head=max(1, w.hidden // 64), bos_token_id=None, eos_token_id=None)  # fmt: skip
        return conv1d_to_linear(GPT2LMHeadModel(cfg))
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=w.image, patch_size=w.patch, num_channels=3, hidden_size=w.hidden,
                    num_hidden_layers=w.layers, num_attention_heads=max(1, w.hidden // 64),
                    intermediate_size=4 * w.hidden, num_labels=classes)  # fmt: skip
    return ViTForImageClassification(cfg)


def data_dir(path: str | None) -> Path:
    d = Path(path or os.environ.get("DS_SOO_DATA", ROOT.parent / "shared" / "data"))
    if not d.is_dir():
        raise SystemExit(f"--data: {d} is not a directory (set DS_SOO_DATA or pass --data)")
    return d


def char_data(w: Workload, data: Path, eval_windows: int = 1):
    """Tiny Shakespeare as next-character windows of length T: first 90% training, last 10% evaluation."""
    from ds_soo.data.base import CharData
    from ds_soo.data.text import SHAKESPEARE, read_text

    return CharData("shakespeare", read_text(data / SHAKESPEARE, "--data"), 0.1, w.seq, eval_windows, None)


def load_batches(w: Workload, n: int, device: torch.device, data: Path) -> tuple[list[dict], int, int]:
    """``n`` fixed batches of real data on ``device``, plus (vocab size, classes)."""
    g = torch.Generator().manual_seed(0)
    if w.kind == "gpt":
        chars = char_data(w, data)
        high = chars.num_train - w.seq - 1
        out = []
        for _ in range(n):
            b = chars._windows(chars.train_tokens, torch.randint(0, high + 1, (w.batch,), generator=g))
            out.append({"input_ids": b["input_ids"].to(device), "labels": b["labels"].to(device)})
        return out, chars.vocab_size, 0
    from ds_soo.data.cifar10 import FILE, load_split

    images, labels = load_split(data / FILE, "train", n * w.batch, seed=0)
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float().div_(255.0)
    x = (x - 0.5) / 0.5
    out = []
    for i in range(n):
        xb = x[i * w.batch : (i + 1) * w.batch].to(device)
        if w.image != 32:
            xb = nn.functional.interpolate(xb, size=(w.image, w.image), mode="bilinear", align_corners=False)
        out.append({"pixel_values": xb, "labels": torch.from_numpy(labels[i * w.batch : (i + 1) * w.batch]).to(device)})
    return out, 0, 10


def model_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Next-character cross entropy for char-GPT, the model's own loss for the ViT.

    The char windows already pair each input with the character after it (``labels`` is ``input_ids``
    shifted by one), so HF's causal-LM loss, which shifts ``labels`` again, would train the model to
    predict two characters ahead. The loss is the trainer's instead: logits against ``labels`` as they are."""
    if "input_ids" not in batch:
        return model(**batch).loss
    from ds_soo.data.base import CharData

    return CharData.loss(model(input_ids=batch["input_ids"]).logits, batch)


# ----------------------------------------------------------------------------- methods
@dataclass
class Runner:
    """One method on one model: ``step()`` applies the update after backward; ``check()`` proves it ran."""

    step: Callable[[], None]
    holders: list  # objects whose tensors are optimizer/curvature state
    check: Callable[[], str | None] = lambda: None  # None when fine, else what went wrong
    curvature_bytes: Callable[[], int | None] = lambda: None  # ds_soo's own count of factors and roots


LR = 1e-4  # timing only: small enough that no method diverges in a few dozen steps


def ds_soo_config(method: str, interval: int, schedule: dict | None = None, options: dict | None = None) -> dict:
    """ds_soo in the warm phase for the whole run: refresh every ``interval`` steps, statistics every step;
    PSGD fits its factors every ``interval`` steps (its 'refresh'). ``options`` are the method's own
    (e.g. ``{"pack_statistics": False}`` for Shampoo)."""
    sched = schedule or {"warm_steps": 10**9, "warm_interval": interval}
    if method == "psgd" and schedule is None:
        sched = {**sched, "stats_warm_interval": interval}
    return {"method": method, "schedule": sched} | ({method: options} if options else {})


def make_runner(method: str, model: nn.Module, interval: int, device: torch.device,
                schedule: dict | None = None, lr: float = LR, options: dict | None = None) -> Runner:  # fmt: skip
    """``schedule`` replaces ds_soo's refresh schedule (e.g. its default one); ``lr`` is every method's rate;
    ``options`` go to a ds_soo method's own config section."""
    if method in VARIANTS:
        base, variant = VARIANTS[method]
        return make_runner(base, model, interval, device, schedule, lr, {**variant, **(options or {})})
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, fused=device.type == "cuda")
        return Runner(opt.step, [opt])
    if method in DS_SOO:
        from ds_soo import Preconditioner

        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        pre = Preconditioner(model, ds_soo_config(method, interval, schedule, options), optimizer=opt)

        def step():
            pre.step()
            opt.step()

        def check():
            c = pre.counters
            if c["preconditioned_steps"] < c["optimizer_steps"] - interval:
                return f"preconditioned {c['preconditioned_steps']} of {c['optimizer_steps']} steps"
            return None

        return Runner(step, [opt, pre], check, pre.curvature_bytes)
    if method == "kfac-pytorch":
        from kfac.preconditioner import KFACPreconditioner

        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        from ds_soo.config import KFACConfig

        pre = KFACPreconditioner(model, factor_update_steps=1, inv_update_steps=interval,
                                 damping=KFACConfig().default_damping,
                                 factor_decay=0.95, lr=lr, compute_method="inverse")  # fmt: skip

        def step():
            pre.step()
            opt.step()

        def check():
            if not pre._layers:
                return "kfac-pytorch registered no layers"
            return None if pre.steps > 0 else "kfac-pytorch never stepped"

        return Runner(step, [opt, pre], check)
    if method == "meta-shampoo":
        from distributed_shampoo import AdamPreconditionerConfig, DistributedShampoo

        from ds_soo.config import ShampooConfig

        d = ShampooConfig()
        opt = DistributedShampoo(
            params, lr=lr, betas=(0.9, d.beta2), epsilon=d.default_damping, max_preconditioner_dim=1024,
            precondition_frequency=interval,
            grafting_config=AdamPreconditionerConfig(beta2=d.graft_beta2, epsilon=d.graft_epsilon),
        )  # fmt: skip
        return Runner(opt.step, [opt])
    if method == "hb-soap":
        import heavyball

        opt = heavyball.SOAP(params, lr=lr, precondition_frequency=interval, use_precond_schedule=False,
                             compile_step=False)  # fmt: skip
        return Runner(opt.step, [opt])
    if method == "hb-psgd-kron":
        import heavyball

        opt = heavyball.PSGDKron(params, lr=lr, preconditioner_update_probability=1.0 / interval,
                                 compile_step=False)  # fmt: skip
        return Runner(opt.step, [opt])
    raise ValueError(f"method must be one of {METHODS + tuple(VARIANTS)}, got {method!r}")


def state_bytes(holders: list, model: nn.Module) -> int:
    """Bytes of the distinct storages reachable from ``holders`` that the model does not own."""
    exclude = set()
    for t in [*model.parameters(), *model.buffers()]:
        exclude.add(t.untyped_storage().data_ptr())
        if t.grad is not None:
            exclude.add(t.grad.untyped_storage().data_ptr())
    seen_obj: set[int] = set()
    storages: dict[int, int] = {}

    def visit(obj, depth: int) -> None:
        if depth > 12 or id(obj) in seen_obj:
            return
        seen_obj.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "meta":
                return
            s = obj.untyped_storage()
            if s.data_ptr() not in exclude and s.nbytes() > 0:
                storages[s.data_ptr()] = s.nbytes()
            return
        if (
            isinstance(obj, (nn.Module, type, str, bytes, int, float, bool))
            or callable(obj)
            and not hasattr(obj, "__dict__")
        ):
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                visit(k, depth + 1)
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                visit(v, depth + 1)
        else:
            for v in getattr(obj, "__dict__", {}).values():
                visit(v, depth + 1)
            for slot in getattr(type(obj), "__slots__", ()):
                if isinstance(slot, str) and hasattr(obj, slot):
                    visit(getattr(obj, slot), depth + 1)

    for h in holders:
        visit(h, 0)
    return sum(storages.values())


# ----------------------------------------------------------------------------- timing
@dataclass
class Result:
    method: str
    status: str = "ok"
    times: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)
    state_bytes: int = 0
    curvature_bytes: int | None = None
    final_loss: float = float("nan")

    def stats(self) -> dict[str, float]:
        if not self.times:
            return {}
        ts = sorted(self.times)
        p99 = ts[min(len(ts) - 1, math.ceil(0.99 * len(ts)) - 1)]
        return {"warm_mean": statistics.fmean(ts), "sparse_median": statistics.median(ts), "p99": p99,
                "peak": max(self.peak_bytes) if self.peak_bytes else float("nan")}  # fmt: skip


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Live:
    """One method's model and optimizer, ready to take timed steps."""

    def __init__(self, method: str, w: Workload, meta: tuple[int, int], args, device,
                 schedule: dict | None = None) -> None:  # fmt: skip
        self.method, self.device = method, device
        self.model = build_model(w, *meta).to(device)
        self.runner = make_runner(method, self.model, args.interval, device, schedule)
        self.amp = args.amp == "bf16"
        self.loss: torch.Tensor | None = None

    def step(self, batch: dict) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for p in self.model.parameters():
            p.grad = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            self.loss = model_loss(self.model, batch)
        self.loss.backward()
        self.runner.step()
        sync(self.device)
        return time.perf_counter() - t0

    def finish(self, res: Result) -> Result:
        """Check that the method really ran, then record its loss and state."""
        problem = self.runner.check()
        if problem:
            raise RuntimeError(f"{self.method}: {problem}")
        res.final_loss = float(self.loss.detach().float())
        res.state_bytes = state_bytes(self.runner.holders, self.model)
        res.curvature_bytes = self.runner.curvature_bytes()
        return res


def run_method(method: str, w: Workload, batches: list[dict], meta: tuple[int, int], args, device,
               schedule: dict | None = None) -> Result:  # fmt: skip
    """One method alone: fresh model and optimizer, warm-up steps, then timed steps; CUDA peak memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    live = Live(method, w, meta, args, device, schedule)
    res = Result(method)
    for i in range(args.warmup + args.steps):
        t = live.step(batches[i % len(batches)])
        if i >= args.warmup:
            res.times.append(t)
    live.finish(res)
    if device.type == "cuda":
        res.peak_bytes.append(torch.cuda.max_memory_allocated(device))
    return res


def _peer_failed(results: dict[str, Result], m: str, e: Exception) -> None:
    if m in DS_SOO or m in VARIANTS or m == "adamw":
        raise e
    results[m].status = f"failed: {type(e).__name__}: {e}"


def bench_workload(w: Workload, methods: list[str], status: dict[str, str], args, device) -> dict[str, Result]:
    """Step-interleaved timing: every method's model lives at once and step i of each method runs back to
    back (in an order rotated per step), so a load spike of a shared machine hits all methods alike.
    Peak CUDA memory comes from a separate untimed run of each method alone."""
    batches, vocab, classes = load_batches(w, args.batches, device, data_dir(args.data))
    meta = (vocab, classes)
    results = {m: Result(m, status=status.get(m, "ok")) for m in methods}
    for _ in range(args.reps):
        live: dict[str, Live] = {}
        for m in methods:
            if results[m].status == "ok":
                try:
                    live[m] = Live(m, w, meta, args, device)
                except Exception as e:  # noqa: BLE001 - a peer that breaks is reported, not fatal
                    _peer_failed(results, m, e)
        for i in range(args.warmup + args.steps):
            order = list(live)
            k = i % max(1, len(order))
            for m in order[k:] + order[:k]:
                if m not in live:
                    continue
                try:
                    t = live[m].step(batches[i % len(batches)])
                except Exception as e:  # noqa: BLE001
                    _peer_failed(results, m, e)
                    del live[m]
                    continue
                if i >= args.warmup:
                    results[m].times.append(t)
        for m, lv in live.items():
            try:
                lv.finish(results[m])
            except Exception as e:  # noqa: BLE001
                _peer_failed(results, m, e)
        del live
        gc.collect()
    if device.type == "cuda":
        peak_args = argparse.Namespace(**{**vars(args), "warmup": 0, "steps": 2 * args.interval})
        for m in methods:
            if results[m].status == "ok":
                results[m].peak_bytes.append(run_method(m, w, batches, meta, peak_args, device).peak_bytes[0])
    return results


def table(w: Workload, results: dict[str, Result], device_name: str) -> str:
    base = results["adamw"].stats()
    what = (f"char-GPT {w.layers}x{w.hidden}, T={w.seq}" if w.kind == "gpt"
            else f"ViT {w.layers}x{w.hidden}, {w.image} px, patch {w.patch}")  # fmt: skip
    lines = [
        f"### {what}, batch {w.batch}, {device_name}\n",
        "| method | warm mean (ms) | warm / AdamW | sparse median / AdamW | p99 / AdamW | peak / AdamW "
        "| state (MiB) | state / AdamW | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_state = results["adamw"].state_bytes
    for m, r in results.items():
        s = r.stats()
        if r.status != "ok" or not s:
            lines.append(f"| {m} | {r.status} | | | | | | | |")
            continue
        peak = f"{s['peak'] / base['peak']:.2f}" if not math.isnan(s["peak"]) else "n/a (CPU)"
        lines.append(
            f"| {m} | {1e3 * s['warm_mean']:.1f} | {s['warm_mean'] / base['warm_mean']:.2f} "
            f"| {s['sparse_median'] / base['sparse_median']:.2f} | {s['p99'] / base['p99']:.2f} | {peak} "
            f"| {r.state_bytes / 2**20:.1f} | {r.state_bytes / base_state:.2f} | {r.final_loss:.3f} |"
        )
    return "\n".join(lines)


def to_json(w: Workload, results: dict[str, Result]) -> dict:
    base = results["adamw"].stats()
    out = {"workload": asdict(w), "methods": {}}
    for m, r in results.items():
        s = r.stats()
        entry = {"status": r.status, "final_loss": r.final_loss, "state_bytes": r.state_bytes, "steps": len(r.times),
                 "curvature_bytes": r.curvature_bytes}  # fmt: skip
        if s:
            entry.update({k: v for k, v in s.items() if not (isinstance(v, float) and math.isnan(v))})
            entry["ratio"] = {k: s[k] / base[k] for k in ("warm_mean", "sparse_median", "p99")}
            if not math.isnan(s["peak"]):
                entry["ratio"]["peak"] = s["peak"] / base["peak"]
            entry["ratio"]["state"] = r.state_bytes / results["adamw"].state_bytes
        out["methods"][m] = entry
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def add_peer_args(p: argparse.ArgumentParser) -> None:
    """Where the peers' archives are and where they are extracted (read by ``load_peers``)."""
    p.add_argument("--peers-src", type=Path, default=None,
                   help="folder of peer archives (default $DS_SOO_PEERS or ../shared/peers)")  # fmt: skip
    p.add_argument("--peers-dir", type=Path, default=ROOT / ".peers", help="where archives are extracted")


def add_common_args(p: argparse.ArgumentParser) -> None:
    """Options shared with bench/gpu_bench.py: workload, device, timing and where peers and data live."""
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--workload", nargs="+", choices=["gpt", "vit"], default=["gpt", "vit"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["none", "bf16"], default=None, help="default: bf16 on CUDA, none on CPU")
    p.add_argument("--interval", type=int, default=10, help="refresh interval of every method")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default: one interval)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: two intervals)")
    p.add_argument("--reps", type=int, default=3, help="repetitions, methods interleaved")
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    p.add_argument("--data", default=None, help="data folder (default $DS_SOO_DATA or ../shared/data)")
    add_peer_args(p)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--json", type=Path, default=None, help="write the results here")


def finish_common_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    args.amp = args.amp or ("bf16" if str(args.device).startswith("cuda") else "none")
    args.warmup = args.interval if args.warmup is None else args.warmup
    args.steps = 2 * args.interval if args.steps is None else args.steps
    if args.steps % args.interval:
        p.error(f"--steps ({args.steps}) must be a multiple of --interval ({args.interval}): whole refresh cycles")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def load_peers(args: argparse.Namespace) -> dict[str, str]:
    return import_peers(extract_peers(args.peers_src or default_peers_src(), args.peers_dir))


def write_json(path: Path | None, obj: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))


def with_baseline(methods: list[str]) -> list[str]:
    """``methods`` with AdamW, the baseline of every ratio, first if it is not there."""
    return methods if "adamw" in methods else ["adamw", *methods]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--methods", nargs="+", choices=METHODS + tuple(VARIANTS), default=list(METHODS),
                   help="adamw (the ratio baseline) is always run; shampoo-dense: ds_soo's Shampoo with "
                        "pack_statistics false (on request only)")  # fmt: skip
    args = finish_common_args(p, p.parse_args(argv))
    args.methods = with_baseline(args.methods)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    status = load_peers(args)
    for peer in PEERS:
        if peer in args.methods and status.get(peer) != "ok":
            print(f"{peer}: {status.get(peer)}", file=sys.stderr)
    report = {"device": device_name(device), "preset": args.preset, "amp": args.amp, "interval": args.interval,
              "warmup": args.warmup, "steps": args.steps, "reps": args.reps, "peers": status,
              "workloads": []}  # fmt: skip
    for kind in args.workload:
        w = PRESETS[args.preset][kind]
        results = bench_workload(w, args.methods, status, args, device)
        print(table(w, results, report["device"]) + "\n", flush=True)
        report["workloads"].append(to_json(w, results))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
