#!/usr/bin/env bash
# Creates .venv beside this repo and installs sdlab with its few runtime dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# A pinned CPU build of torch first: an unpinned torch may pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
