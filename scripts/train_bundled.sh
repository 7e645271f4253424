#!/usr/bin/env bash
# Trains sdlab's bundled shapes model from nothing: VAE, then text encoder, then UNet (recipes/shapes-*.toml).
# Each stage resumes from its last checkpoint when run again; finished stages are skipped.
#   ./scripts/train_bundled.sh [RUNS_DIR]          (default: runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
sdlab=".venv/bin/python -m sdlab"
stage() {  # stage NAME RECIPE [--base FILE]
  local name=$1 recipe=$2; shift 2
  local out="$runs/shapes-$name"
  if [ -f "$out/last.safetensors" ]; then echo "shapes-$name: done"; return; fi
  local resume=""; [ -f "$out/train_state.pt" ] && resume="--resume"
  $sdlab train "$name" --config "$recipe" --out "$out" $resume "$@"
}
stage vae recipes/shapes-vae.toml
stage text recipes/shapes-text.toml --base "$runs/shapes-vae/last.safetensors"
stage unet recipes/shapes-unet.toml --base "$runs/shapes-text/last.safetensors"
echo "model: $runs/shapes-unet/last.safetensors"
