#!/usr/bin/env bash
# Per-node launcher for ds_soo under Slurm: run ONCE PER NODE (the sbatch templates do
# `srun --ntasks-per-node=1 launch/ds_soo_launch.sh`). It derives the rendezvous from SLURM_*
# (see ds_soo/integrations/slurm.py) and execs torchrun (ENGINE=ddp|fsdp2) or deepspeed's launcher
# in --no_ssh mode (ENGINE=deepspeed), which then start GPUS_PER_NODE ranks on this node.
#
# Usage:  launch/ds_soo_launch.sh                 # program built from env (default -m ds_soo.train)
#         launch/ds_soo_launch.sh PROG ARGS...    # explicit program: `-m pkg.mod ...` or `script.py ...`
#
# Environment (all optional):
#   ENGINE        ddp | fsdp2 | deepspeed, passed as `train.engine=$ENGINE` (key: ENGINE_KEY; default ddp)
#   LAUNCHER      torchrun | deepspeed                       (default: deepspeed iff ENGINE=deepspeed)
#   CONFIG        passed as `--config $CONFIG`
#   DS_CONFIG     passed as `train.ds_config=$DS_CONFIG`   (key: DS_CONFIG_KEY)
#   EXTRA         extra trainer args, shell-split            (e.g. EXTRA="train.steps=100 optim.lr=0.1")
#   OUT           output dir, passed as `--out $OUT`         (default runs/$SLURM_JOB_NAME-$SLURM_JOB_ID)
#   PROGRAM       training program                           (default "-m ds_soo.train")
#   GPUS_PER_NODE processes per node (default SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES, else nproc)
#   TORCHRUN_RDZV static | c10d                              (default static: rank order = node order)
#   DS_SOO_ROOT   repo checkout                              (default: the directory above this script)
#   VENV          virtualenv to activate                     (default: keep PATH/VIRTUAL_ENV as exported)
#   PYTHON        interpreter                                (default: python from PATH)
#   DS_SOO_DRY_RUN=1  print the command instead of running it
set -euo pipefail

ROOT="${DS_SOO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [[ -n "${VENV:-}" ]]; then
    # shellcheck disable=SC1091
    source "${VENV}/bin/activate"
fi
PYTHON="${PYTHON:-python}"

# ds_soo is run from its checkout (not necessarily pip-installed); every rank must import it.
export PYTHONPATH="${ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
cd "${ROOT}"

dry=()
if [[ "${DS_SOO_DRY_RUN:-0}" == "1" ]]; then
    dry=(--dry-run)
fi
if (($# > 0)); then
    exec "${PYTHON}" -m ds_soo.integrations.slurm launch "${dry[@]}" -- "$@"
fi
exec "${PYTHON}" -m ds_soo.integrations.slurm launch "${dry[@]}"
