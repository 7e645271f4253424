#!/usr/bin/env bash
# Installs the test oracles (the dev extra) into .venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# open_clip is only needed for its tokenizer module (the oracle); its other imports need torchvision.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open_clip_torch==3.3.0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -q "$@"
