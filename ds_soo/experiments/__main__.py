import sys

from ds_soo.experiments.cli import main

# Guarded: the runner's spawned workers import this module again as __mp_main__.
if __name__ == "__main__":
    sys.exit(main())
