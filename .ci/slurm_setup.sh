#!/usr/bin/env bash
# Install a single-host Slurm (+ munge) for tests/test_slurm.py. Idempotent; needs root and apt.
# Starting the daemons is tests/infra/slurm_up.sh's job (the test fixture calls it).
set -euo pipefail
need=()
for bin in slurmctld slurmd sbatch munged; do
    command -v "${bin}" >/dev/null 2>&1 || need+=("${bin}")
done
if ((${#need[@]} == 0)); then
    exit 0
fi
echo "[slurm_setup] missing: ${need[*]}; installing slurm-wlm munge" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge
