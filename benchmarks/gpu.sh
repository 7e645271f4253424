#!/usr/bin/env bash
# sdlab vs diffusers on a CUDA GPU: images/s at 512 px, 20 steps, fp16, batch 1 and 4, eager and with
# torch.compile (benchmarks/gpu_bench.py; its options pass through, e.g. --compile-mode max-autotune).
# Run from anywhere on a machine with an NVIDIA GPU and network access to PyPI; about 6-8 minutes:
# installs (1-2 min, cached in the virtual environment for the next run), random SD 1.5-size weights
# (about 1 min), then the runs (torch.compile's warm-ups take most of the rest).
#
#   benchmarks/gpu.sh                              # VENV=... to choose the environment (default .venv-gpu)
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 benchmarks/gpu.sh    # a specific CUDA build
#   benchmarks/gpu.sh --device cpu --tiny          # the same code on the CPU with a tiny model (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
# PyPI's Linux torch wheels are CUDA builds; TORCH_INDEX picks another CUDA version's index.
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch
# the reference versions of pyproject.toml's dev extra
"$VENV/bin/pip" install --quiet -e . "diffusers==0.42.1" "transformers==5.23.0" accelerate

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
exec "$VENV/bin/python" benchmarks/gpu_bench.py "$@"
