#!/usr/bin/env bash
# The GPU figures of issues 15 and 27, for a session with one CUDA GPU (about 10 minutes on one H200).
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
#   4. the JAX step times of celo2 / celo2_base against optax adamw and optax muon at 124M;
#   5. CUDA graphs (issue 27): Celo2Base and Celo2 (both Newton-Schulz dtypes) at the GPT-2 124M and GPT-3 XL
#      parameter sets, float32 and bfloat16 state, the optimizer step captured with torch.cuda.graphs (static
#      gradients, lr a device tensor): whether the capture succeeds, Triton launches per eager step, eager step
#      time and replay time.
# Every part writes its log (*.log) and, where it has figures, its JSON beside it; the tables are at the end of
# the logs. Targets (issue 27): Celo2Base <= 3x fused AdamW; Celo2 <= 1.2x Muon with the same Newton-Schulz
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

part cuda_graphs 150 "$PY" - "$OUT_DIR/cuda_graphs.json" <<'EOF'
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import step_time
from celo2.rule.theta import Theta
from celo2.torch import Celo2, Celo2Base

def launches_of(fn):
    import triton.runtime.jit as jit
    count, real = [0], jit.JITFunction.run
    def run(self, *a, **k):
        count[0] += 1
        return real(self, *a, **k)
    jit.JITFunction.run = run
    try:
        fn()
    finally:
        jit.JITFunction.run = real
    return count[0]

def timed(fn, repeats=10):
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats

theta, rows = Theta.init(seed=0), []
for size in ("gpt2-124m", "gpt3-xl"):
    shapes = [s for _, s in step_time.model_shapes(size)]
    for name, ns_dtype in (("Celo2Base", None), ("Celo2", torch.bfloat16), ("Celo2", torch.float32)):
        for state_dtype in (torch.float32, torch.bfloat16):
            row = {"size": size, "optimizer": name, "ns_dtype": str(ns_dtype), "state_dtype": str(state_dtype)}
            torch.manual_seed(0)
            params = [torch.nn.Parameter(torch.randn(s, device="cuda") * 0.02) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3  # static gradients: the graph reads these tensors
            lr = torch.tensor(1e-3, device="cuda")  # a schedule would write it in place between replays
            kw = dict(lr=lr, weight_decay=0.1, theta=theta, backend="triton")
            if state_dtype != torch.float32:
                kw["state_dtype"] = state_dtype
            try:
                opt = Celo2(params, ns_dtype=ns_dtype, **kw) if name == "Celo2" else Celo2Base(params, **kw)
            except TypeError as e:  # a front end without state_dtype=
                rows.append({**row, "error": str(e)[:200]})
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # state, compilation, device tables
                    opt.step()
            torch.cuda.current_stream().wait_stream(side)
            row["launches_per_eager_step"] = launches_of(opt.step)
            row["eager_ms"] = timed(opt.step)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    opt.step()
                row["captured"] = True
                row["replay_ms"] = timed(graph.replay)
            except Exception as e:  # noqa: BLE001
                row.update(captured=False, error=repr(e)[:300])
            rows.append(row)
            print(row, flush=True)
            del opt, params, graph
            torch.cuda.empty_cache()
json.dump(rows, open(sys.argv[1], "w"), indent=1)
print(f"{'size':10s} {'optimizer':10s} {'ns':16s} {'state':16s} {'launches':>8s} {'eager ms':>9s} {'replay ms':>9s}")
for r in rows:
    print(f"{r['size']:10s} {r['optimizer']:10s} {r['ns_dtype']:16s} {r['state_dtype']:16s} "
          f"{r.get('launches_per_eager_step', 0):8d} {r.get('eager_ms', 0):9.2f} {r.get('replay_ms', 0):9.2f} "
          f"{'' if r.get('captured') else r.get('error', '')}")
EOF

echo "logs and figures in $OUT_DIR (exit $status)"
exit $status
