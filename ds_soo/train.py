"""``python -m ds_soo.train --config configs/NAME.yaml [section.key=value ...] --out DIR``

With ``--compare`` it runs every entry of the config's ``compare.runs`` (AdamW, SGD, K-FAC, Shampoo with
their own tuned learning rates) and prints a table. Without ``--config`` it uses
``configs/digits_vit.yaml`` when run from a checkout, else the built-in defaults (digits, small ViT).
Exit status 2 means the configuration was rejected; the message names the field.
"""

from __future__ import annotations

import argparse
import logging
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
    p.add_argument("--quiet", action="store_true", help="log warnings only on stderr (the log file keeps all)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides (YAML values)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    config = args.config or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    stem = Path(config).stem if config else "default"
    out = Path(args.out or f"runs/{stem}{'-compare' if args.compare else ''}")

    from ds_soo.trainer.report import setup_logging

    log = setup_logging(out)
    if args.quiet:
        for h in log.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                h.setLevel(logging.WARNING)
    try:
        if args.compare:
            from ds_soo.trainer.compare import run_compare

            only = [s for s in args.only.split(",") if s] if args.only else None
            return run_compare(config, args.overrides, out, log, only, args.seeds)
        from ds_soo.trainer.config import load_config

        cfg = load_config(config, args.overrides)
        log.info("config: %s%s", config or "(defaults)", "".join(f" {o}" for o in args.overrides))
        from ds_soo.trainer.loop import run

        run(cfg, out, log, started)
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
