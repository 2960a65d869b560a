#!/usr/bin/env bash
# The GPU checks, as one prepared script (run from the repo root on a CUDA machine):
#   bash bench/gpu_check.sh [OUT_DIR]
# Writes every log to OUT_DIR (default $OUT, else ./gpu_out). Missing pure-Python dependencies can be carried as
# wheels in .whl/ (installed into /tmp/site first). Not yet run on a GPU: record its results in docs/ when it is.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 - <<'PY'
import importlib
for name in ["torch", "transformers", "peft", "lightning", "torchmetrics", "vllm", "flash_attn"]:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as error:  # noqa: BLE001 - report what is missing
        print(f"{name} NOT AVAILABLE ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-",
      "bf16", torch.cuda.is_bf16_supported() if torch.cuda.is_available() else "-")
PY
} 2>&1 | tee "$out/env.txt"
echo "== GPU tests (pytest -m gpu)" | tee "$out/pytest_gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee -a "$out/pytest_gpu.txt"
echo "== chunked vs naive vocabulary math on CUDA (Qwen3-4B hidden 2560)" | tee "$out/bench_losses_cuda.txt"
timeout 240 python3 bench/losses.py --device cuda --hidden 2560 --repeats 3 2>&1 | tee -a "$out/bench_losses_cuda.txt"
echo "== HF generate on a Qwen3-0.6B-shaped random model, bf16" | tee "$out/bench_rollout_cuda.txt"
timeout 200 python3 bench/rollout.py --model qwen3-0.6b-random --device cuda --dtype bfloat16 --engines hf vllm \
  --prompts 32 --max-new-tokens 256 --repeats 2 --work-dir /tmp/egrsd-bench 2>&1 | tee -a "$out/bench_rollout_cuda.txt"
