"""``python -m ds_soo.train --config configs/NAME.yaml [section.key=value ...] --out DIR``

Distributed (the global batch ``train.batch_size`` is the same at every world size)::

    torchrun --nproc_per_node N -m ds_soo.train --config C train.engine=ddp|fsdp2|deepspeed --out DIR
    deepspeed --num_gpus N --module ds_soo.train --config C --deepspeed_config configs/ds/X.json --out DIR

``--deepspeed_config`` implies ``train.engine=deepspeed``; the ``--local_rank=K`` the deepspeed launcher
adds is accepted and ignored (ranks come from the environment). Only rank 0 writes ``metrics.json``.
``train.checkpoint_every=N`` writes resumable checkpoints to ``DIR/checkpoints``; ``train.resume=true``
continues from the newest one.

``--out DIR`` that already holds a run (metrics.json, checkpoints/, tb/, or a --compare's results) is
refused unless ``train.resume`` continues it or ``--overwrite`` deletes that run first; an existing
``train.log`` is only ever appended to. ``--compare`` into its own earlier comparison continues it:
entries that finished with the same command are reused, the rest run.

SIGTERM (Slurm's preemption warning) or SIGINT stops after the current step, writes a checkpoint and
a partial metrics.json (``"interrupted": true``) and exits 143 / 130; rerun with ``train.resume=true``.

With ``--compare`` it runs every entry of the config's ``compare.runs`` (AdamW, SGD, K-FAC, Shampoo with
their own tuned learning rates) and prints a table. Without ``--config`` it uses
``configs/digits_vit.yaml`` when run from a checkout, else the built-in defaults (digits, small ViT).
Exit status: 0 done; 2 the configuration, data, output folder or checkpoint was rejected (the message
names the field or file; nothing was trained); 3 the run diverged (see ``train.divergence_factor``);
128 + N stopped by signal N (a checkpoint was written).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from ds_soo.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "digits_vit.yaml"
EXIT_CONFIG, EXIT_DIVERGED = 2, 3
# What makes a folder hold a run (train.log alone does not: a rejected start leaves only that).
RUN_MARKERS = ("metrics.json", "checkpoints", "tb", "compare.json")


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
        "--overwrite", action="store_true",
        help="--out holds an earlier run: delete it (metrics, checkpoints, TensorBoard, logs) and start over",
    )  # fmt: skip
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


def _resuming(config: str | None, overrides: list[str]) -> bool:
    """Whether train.resume is set (command line first, else the YAML); a broken YAML counts as no."""
    for key, _, value in reversed([o.partition("=") for o in overrides]):
        if key == "train.resume":
            return value.strip() not in ("false", "False", "")
    from ds_soo.trainer.overrides import load_raw

    try:
        train = load_raw(config).get("train") or {}
    except (ConfigError, AttributeError):
        return False
    return isinstance(train, dict) and train.get("resume") not in (None, False, "")


def held_run(out: Path, compare: bool) -> list[str]:
    """What in ``out`` belongs to an earlier run that this invocation would not continue (empty: none).

    A ``--compare`` into a folder that holds only an earlier comparison continues it: entries that
    finished with the same command are reused and only the others run (``ds_soo.experiments.runner``).
    A single run's files there (or a comparison's, for a single run) are refused.
    """
    if not out.is_dir():
        return []
    found = [m for m in RUN_MARKERS if (out / m).exists()]
    if compare:
        return [m for m in found if m != "compare.json"]
    return found


def _clear_run(out: Path, rank: int, compare: bool = False) -> None:
    """``--overwrite``: remove the earlier run's files (only those this trainer writes). Rank 0 removes
    the shared ones; every rank its own log (so none deletes a log another rank has just opened). With
    ``--compare`` also the entries' run folders (those holding the runner's spec.json), so all rerun."""
    if rank == 0 and compare:
        for spec in out.glob("*/spec.json"):
            shutil.rmtree(spec.parent)
    if rank == 0:
        for name in RUN_MARKERS:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    (out / ("train.log" if rank == 0 else f"train.rank{rank}.log")).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    stem = Path(config).stem if config else "default"
    out = Path(args.out or f"runs/{stem}{'-compare' if args.compare else ''}")
    rank = int(os.environ.get("RANK", "0"))
    held = held_run(out, args.compare)
    if held and not args.overwrite and not (not args.compare and _resuming(config, args.overrides)):
        # Before any logging: the earlier run's train.log is not touched.
        print(
            f"ds_soo.train: error: --out {out} already holds a run ({', '.join(held)}); continue it with "
            "train.resume=true, pass --overwrite to replace it, or choose another --out",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if held and args.overwrite:
        _clear_run(out, rank, args.compare)

    from ds_soo.trainer.report import setup_logging

    log = setup_logging(out, rank=rank)
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

        metrics = run(cfg, out, log, started)
    except ConfigError as e:
        log.error("config error: %s", e)
        return EXIT_CONFIG
    if metrics.get("interrupted_by_signal"):
        from ds_soo.trainer.signals import exit_code

        return exit_code(metrics["interrupted_by_signal"])
    if metrics.get("diverged"):
        log.error("the run diverged (%s); exit status %d", metrics.get("diverged_reason"), EXIT_DIVERGED)
        return EXIT_DIVERGED
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
