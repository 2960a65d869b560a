#!/usr/bin/env bash
# The first-GPU acceptance check of the real training path (run from the repo root on a CUDA machine):
#   bash bench/gpu_check.sh [OUT_DIR] [MODEL]
# In about 11 minutes on one GPU (5 more with 2 GPUs), plus up to 10 for stage 8 (each stage has its own time limit and the script goes on when one fails):
#   1. the environment (GPU, versions; flash-attn or, if it is missing, sdpa);
#   2. builds MODEL (default testbed:qwen3-shape?like=qwen3-4b: random weights at Qwen3-4B's exact shape);
#   3. a 3-step `fit` of configs/egrsd.yaml on it: bf16-mixed, gradient checkpointing, LoRA r 64, vLLM with
#      merged sync and sleep mode; per step time/step_s, time/rollout_s, peak allocated and device-wide memory,
#      the current device of each rank, vLLM greedy vs the HF student after step 2 (bench/gpu_check.py);
#   4. the same with 2 processes (DDP, one vLLM engine per GPU) when 2 GPUs are visible;
#   5. the FSDP2 path: the same 3-step fit under configs/qwen3_14b/egrsd.yaml's strategy (fsdp2, on every visible
#      GPU up to 2) at MODEL's shape, recorded as fit_fsdp2_<n>gpu; with 2 GPUs also under configs/qwen3_32b/egrsd.yaml
#      (fsdp2 and one vLLM engine at tensor parallel 2 over both GPUs), recorded as fit_fsdp2_tp2_2gpu;
#   6. the engine's start-up at the evaluation's 32,768-token cap (as `validate` starts it);
#   7. the table of every figure: printed and written to OUT_DIR/gpu_check.md (copy it into docs/ when reviewed);
#   8. bench/server.py: steps/s of the tiny testbed with colocated vLLM vs a vLLM server (adapter and merged sync,
#      with and without --data.async_steps 1) on 127.0.0.1, vLLM on the GPU, the tiny trainer on the CPU.
# Missing pure-Python dependencies can be carried as wheels in .whl/ (installed into /tmp/site first).
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
model=${2:-"testbed:qwen3-shape?like=qwen3-4b"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/bench
stage() {  # stage NAME SECONDS COMMAND...: runs one stage with a time limit, logs it, reports its status
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)" | tee "$out/$name.log"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$out/$name.log" 2>&1
  local status=$?
  tail -5 "$out/$name.log"
  echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/stages.txt"
}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'PY'
import importlib
for name in ["torch", "transformers", "peft", "lightning", "vllm", "flash_attn"]:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001 - report what is missing
        print(f"{name} NOT AVAILABLE ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
import torch
print("cuda", torch.cuda.is_available(), "devices", torch.cuda.device_count())
PY
} 2>&1 | tee "$out/env.txt"
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
: >"$out/stages.txt"
stage build 180 python3 -c "import sys; from egrsd_pl.testbed import resolve_model_path; print(resolve_model_path(sys.argv[1]))" "$model"
stage fit_1gpu 240 python3 bench/gpu_check.py fit --out "$out" --devices 1 --steps 3 --model "$model"
if [ "$gpus" -ge 2 ]; then
  stage fit_2gpu 240 python3 bench/gpu_check.py fit --out "$out" --devices 2 --steps 3 --model "$model"
else
  echo "== fit_2gpu: skipped ($gpus GPU visible)" | tee -a "$out/stages.txt"
fi
fsdp2_devices=$(( gpus >= 2 ? 2 : 1 ))
stage fit_fsdp2 300 python3 bench/gpu_check.py fit --out "$out" --devices "$fsdp2_devices" --steps 3 --model "$model" \
  --config configs/qwen3_14b/egrsd.yaml --tag fsdp2
if [ "$gpus" -ge 2 ]; then
  stage fit_fsdp2_tp2 300 python3 bench/gpu_check.py fit --out "$out" --devices 2 --steps 3 --model "$model" \
    --config configs/qwen3_32b/egrsd.yaml --tag fsdp2_tp2
else
  echo "== fit_fsdp2_tp2: skipped ($gpus GPU visible; vLLM tensor parallel 2 needs 2)" | tee -a "$out/stages.txt"
fi
stage startup 150 python3 bench/gpu_check.py startup --out "$out" --model "$model"
python3 bench/gpu_check.py table --out "$out" --write "$out/gpu_check.md"
stage server_bench 600 python3 bench/server.py --steps 8
cat "$out/stages.txt"
