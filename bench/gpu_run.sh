#!/bin/bash
# One prepared run on a CUDA machine: the device checks, then the targets and per-method tables of
# bench/gpu_bench.py (ds_soo, Meta's Shampoo, kfac-pytorch, HeavyBall; ratios to AdamW).
# It reads everything from the folder .gl of the checkout (git-ignored), prepared beforehand:
#   .gl/data   tinyshakespeare.txt and cifar10_jpeg_q75.npz (copies of the shared data folder)
#   .gl/peers  the peer archives (meta_distributed_shampoo_*.tar.gz, kfac_pytorch_*.tar.gz)
#   .gl/whl    wheels the machine lacks: heavyball 3.2.1, and deepspeed with its dependencies
# Usage, from the repo root: bash bench/gpu_run.sh [gpu_bench.py options]; logs and JSON go to $OUT.
set -o pipefail
OUT=${OUT:-/tmp/ds_soo_gpu}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gl/whl/*.whl ||
    exit 1
export PYTHONPATH=$PWD:/tmp/site DS_SOO_DATA=$PWD/.gl/data DS_SOO_PEERS=$PWD/.gl/peers
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi -L
python3 -c "import torch, deepspeed, heavyball; print('versions', torch.__version__, deepspeed.__version__, torch.cuda.get_device_name())"
if [ -n "$DS_CHECK" ]; then  # DeepSpeed ZeRO-0/2/3 + attach() against one process, at most 120 s
    timeout 120 python3 -c "import sys, torch; sys.path.insert(0, 'bench'); import gpu_check
print('| check | result | detail |'); gpu_check.deepspeed_world1(torch.device('cuda'))" 2>&1 | grep '^|' | tee "$OUT/ds_check.log"
fi
python3 bench/gpu_bench.py --json "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
