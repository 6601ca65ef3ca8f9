#!/usr/bin/env bash
# The GPU figures of issue 15, for a session with one CUDA GPU (about 8 minutes on one H200).
#
#   bash benchmarks/gpu_figures.sh [OUT_DIR]      (default: $OUT, else benchmarks/results/step-time-gpu)
#
# Runs, each under its own time limit so that a slow part cannot take the others' results with it:
#   1. the environment (torch, CUDA device, Triton, JAX devices) into environment.txt;
#   2. the PyTorch front end's GPU tests (Triton backend) and the JAX smoke test (tests/optax/test_transform.py)
#      on the GPU;
#   3. benchmarks/step_time.py --device cuda at the GPT-2 124M and GPT-3 XL 1.3B parameter sets: step time and
#      peak extra memory of fused AdamW, Muon (bfloat16 and float32 Newton-Schulz), Celo2Base and Celo2 with
#      both Newton-Schulz dtypes, then the optimizers' share of a GPT-2 small training step (batch 8 x 1024);
#   4. the JAX step times of celo2 / celo2_base against optax adamw and optax muon at 124M.
# Every part writes its log (*.log) and, where it has figures, its JSON beside it; the tables are at the end of
# the logs. Targets (issue 15): Celo2Base <= 3.5x fused AdamW; Celo2 <= 1.3x Muon with the same Newton-Schulz
# dtype; peak extra memory <= state + 25% of the largest tensor + Newton-Schulz workspace ("peak/bud." <= 1).
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-benchmarks/results/step-time-gpu}}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
status=0

part() {  # part NAME SECONDS COMMAND...: run with a limit, log to NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*" | tee "$OUT_DIR/$name.log"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0))s" | tee -a "$OUT_DIR/$name.log"
    [ $rc -eq 0 ] || status=1
}

part environment 30 "$PY" - <<'EOF'
import json, platform
info = {"platform": platform.platform()}
import torch
info.update(torch=torch.__version__, cuda=torch.version.cuda, device=torch.cuda.get_device_name(0),
            capability=torch.cuda.get_device_capability(0))
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
try:
    import jax
    info.update(jax=jax.__version__, jax_devices=[str(d) for d in jax.devices()])
except ImportError:
    info["jax"] = None
from celo2.torch.ns import resolve_ns_dtype
info["celo2_ns_dtype_auto"] = str(resolve_ns_dtype("auto", "cuda"))
print(json.dumps(info, indent=1))
EOF
cp "$OUT_DIR/environment.log" "$OUT_DIR/environment.txt"

part tests_torch_gpu 80 "$PY" -m pytest -q -p no:cacheprovider tests/torch -k "cuda or triton"
part tests_jax_gpu 50 "$PY" -m pytest -q -p no:cacheprovider tests/optax/test_transform.py -x

part step_time_gpt2 100 "$PY" benchmarks/step_time.py --device cuda --frameworks torch --sizes gpt2-124m \
    --repeats 10 --warmup 3 --train-share gpt2-124m --train-batch 8 --out "$OUT_DIR/step_time_gpt2_124m.json"
part step_time_gpt3_xl 140 "$PY" benchmarks/step_time.py --device cuda --frameworks torch --sizes gpt3-xl \
    --repeats 5 --warmup 2 --out "$OUT_DIR/step_time_gpt3_xl.json"
part step_time_jax_gpt2 80 "$PY" benchmarks/step_time.py --frameworks jax --no-memory --sizes gpt2-124m \
    --repeats 10 --warmup 2 --out "$OUT_DIR/step_time_jax_gpt2_124m.json"

echo "logs and figures in $OUT_DIR (exit $status)"
exit $status
