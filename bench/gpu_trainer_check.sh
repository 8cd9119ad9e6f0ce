#!/bin/bash
# CUDA check of the trainer engines at world 1 (one GPU), each resumed from a checkpoint.
# On a machine without deepspeed/datasets, put their wheels in .whl/dist_check (with a site/ copy of
# deepspeed) and .whl/trainer_gpu, as for bench/gpu_check.py; run from the repo root: bash bench/gpu_trainer_check.sh
OUT=${OUT:-/tmp/ds_soo_gpu_logs}; mkdir -p "$OUT"
T=/tmp/site; mkdir -p $T
ls .whl/trainer_gpu/*.whl .whl/dist_check/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target $T .whl/trainer_gpu/*.whl .whl/dist_check/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD:$T:$PWD/.whl/dist_check/site OMP_NUM_THREADS=4 HF_HUB_OFFLINE=1 PYTHONWARNINGS=ignore
nvidia-smi -L
python3 -c "import torch, deepspeed, datasets; print('versions', torch.__version__, deepspeed.__version__, datasets.__version__, torch.cuda.is_available())" 2>&1 | grep versions
TR="python3 -m torch.distributed.run --nproc_per_node 1 --master_addr 127.0.0.1 --master_port 29511 -m ds_soo.train --config configs/tiny.yaml --quiet"
DS="train.engine=deepspeed train.ds_config=tests/infra/ds_trainer.json"
run() { local name=$1; shift; local t0=$(date +%s.%N); "$@" > $OUT/$name.log 2>&1; echo "$name rc=$? $(python3 -c "print(round($(date +%s.%N)-$t0,1))")s"; }
rm -rf /tmp/r  # a fresh output folder per check (the trainer refuses one holding a run)
run single python3 -m ds_soo.train --config configs/tiny.yaml --quiet --out /tmp/r/single
run ddp $TR train.engine=ddp train.checkpoint_every=2 --out /tmp/r/ddp
run ddp_res $TR train.engine=ddp train.resume=/tmp/r/ddp/checkpoints/step_2 --out /tmp/r/ddp_res
run fsdp2 $TR train.engine=fsdp2 train.checkpoint_every=2 --out /tmp/r/fsdp2
run fsdp2_res $TR train.engine=fsdp2 train.resume=/tmp/r/fsdp2/checkpoints/step_2 --out /tmp/r/fsdp2_res
run ds $TR $DS train.checkpoint_every=2 --out /tmp/r/ds
run ds_res $TR $DS train.resume=/tmp/r/ds/checkpoints/step_2 --out /tmp/r/ds_res
python3 - <<'PY'
import json, os
for n in ["single", "ddp", "ddp_res", "fsdp2", "fsdp2_res", "ds", "ds_res"]:
    p = f"/tmp/r/{n}/metrics.json"
    if not os.path.exists(p):
        print(n, "NO METRICS"); continue
    m = json.load(open(p))
    print(n, m["device"], m["backend"], m["engine"], m["world_size"], [round(x, 6) for x in m["train_loss"]],
          repr(m["param_sq_sum"]), m["preconditioned_steps"], m["resumed_from_step"], m["peak_memory_bytes"])
PY
for f in $OUT/*.log; do if grep -q "Error\|error" $f; then echo "== $f"; grep -v Warning $f | tail -15; fi; done
