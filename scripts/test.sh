#!/usr/bin/env bash
# Installs what the tests need (the dev extra's oracles, Playwright, Debian's Chromium for the web
# page's tests) into .venv and the system, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# The web page's tests drive Debian's Chromium through Playwright (never a browser download); they
# fail, not skip, without it.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the web page's tests need Debian's Chromium: run 'sudo apt-get install -y chromium', then this again" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium
fi
./scripts/install.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# open_clip is only needed for its tokenizer module (the oracle); its other imports need torchvision.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps open_clip_torch==3.3.0
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
exec .venv/bin/python -m pytest -q "$@"
