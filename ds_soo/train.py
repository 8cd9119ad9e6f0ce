"""``python -m ds_soo.train --config configs/NAME.yaml [section.key=value ...] --out DIR``

Distributed (the global batch ``train.batch_size`` is the same at every world size)::

    torchrun --nproc_per_node N -m ds_soo.train --config C train.engine=ddp|fsdp2|deepspeed --out DIR
    deepspeed --num_gpus N --module ds_soo.train --config C --deepspeed_config configs/ds/X.json --out DIR

``--deepspeed_config`` implies ``train.engine=deepspeed``; the ``--local_rank=K`` the deepspeed launcher
adds is accepted and ignored (ranks come from the environment). Only rank 0 writes ``metrics.json``.
``train.checkpoint_every=N`` writes resumable checkpoints to ``DIR/checkpoints``; ``train.resume=true``
continues from the newest one.

With ``--compare`` it runs every entry of the config's ``compare.runs`` (AdamW, SGD, K-FAC, Shampoo with
their own tuned learning rates) and prints a table. Without ``--config`` it uses
``configs/digits_vit.yaml`` when run from a checkout, else the built-in defaults (digits, small ViT).
Exit status 2 means the configuration was rejected; the message names the field.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ds_soo.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_vit.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ds_soo.train",
        description="Train a small ViT or char-GPT with AdamW, SGD, K-FAC, Shampoo or PSGD-Kron.",
        epilog="example: python -m ds_soo.train --config configs/digits_vit.yaml --compare --out runs/quickstart",
    )
    p.add_argument("--config", help="YAML config (default: configs/digits_vit.yaml in a checkout)")
    p.add_argument("--out", help="output directory (default: runs/<config name>[-compare])")
    p.add_argument("--compare", action="store_true", help="run every entry of compare.runs and tabulate")
    p.add_argument("--only", help="with --compare: comma-separated run names to keep")
    p.add_argument("--seeds", type=int, help="with --compare: seeds per run (default: compare.seeds)")
    p.add_argument("--jobs", type=int, default=1, help="with --compare: runs at a time (finished runs are reused)")
    p.add_argument("--quiet", action="store_true", help="log warnings only on stderr (the log file keeps all)")
    p.add_argument(
        "--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
        help="DeepSpeed JSON; same as train.engine=deepspeed train.ds_config=PATH",
    )  # fmt: skip
    # Added by DeepSpeed's launcher (and by deepspeed.add_config_arguments users); ranks come from env.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)")
    return p.parse_args(argv)


def _with_deepspeed_config(overrides: list[str], path: str | None) -> list[str]:
    """``--deepspeed_config P`` as overrides; a conflicting ``train.engine=...`` is an error."""
    if path is None:
        return overrides
    for item in overrides:
        key, _, value = item.partition("=")
        if key == "train.engine" and value.strip() not in ("deepspeed", "'deepspeed'", '"deepspeed"'):
            raise ConfigError(f"--deepspeed_config implies train.engine=deepspeed, but {item} was given")
    return [*overrides, "train.engine=deepspeed", f"train.ds_config={path}"]


def _distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    stem = Path(config).stem if config else "default"
    out = Path(args.out or f"runs/{stem}{'-compare' if args.compare else ''}")
    rank = int(os.environ.get("RANK", "0"))
    # A resumed run appends to the log of the run it continues.
    resuming = any(key == "train.resume" and value.strip() not in ("false", "False", "")
                   for key, _, value in (o.partition("=") for o in args.overrides))  # fmt: skip

    from ds_soo.trainer.report import setup_logging

    log = setup_logging(out, rank=rank, append=resuming)
    if args.quiet:
        for h in log.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    try:
        overrides = _with_deepspeed_config(list(args.overrides), args.deepspeed_config)
        if args.compare:
            if _distributed():
                raise ConfigError("--compare runs its entries one after another in one process; drop the launcher")
            from ds_soo.trainer.compare import run_compare

            only = [s for s in args.only.split(",") if s] if args.only else None
            return run_compare(config, overrides, out, log, only, args.seeds, args.jobs)
        from ds_soo.trainer.config import load_config
        from ds_soo.trainer.overrides import swept_keys

        if swept_keys(overrides):
            raise ConfigError(f"{', '.join(swept_keys(overrides))}: a list of values is a sweep; add --compare")

        cfg = load_config(config, overrides)
        log.info("config: %s%s", config or "(defaults)", "".join(f" {o}" for o in overrides))
        from ds_soo.trainer.loop import run

        run(cfg, out, log, started)
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2
    return 0


def _exit(code: int) -> None:
    """End a launched rank without interpreter teardown: torch/gloo's shutdown sometimes aborts with
    ``terminate called without an active exception`` after all results are written (ENGINES.md)."""
    for handler in logging.getLogger("ds_soo.train").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _launched() -> bool:
    """Started by torchrun/deepspeed/Slurm, or a process group was created (a distributed engine)."""
    if "RANK" in os.environ:
        return True
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    code = main()
    if _launched():
        _exit(code)
    sys.exit(code)
