#!/usr/bin/env bash
# Trains sdlab's bundled shapes models from nothing and installs them in src/sdlab/weights/:
# VAE, text encoder, UNet, the UNet and text encoder together, the relation contrast runs, their
# repair and the mirrored-caption denoising runs, the VAE's decoder fine-tuned on its frozen encoder,
# preference fine-tuning (DPO) on the model's own pictures judged by the shapes checker, then the
# inpainting (fine-tuned three times more with object masks) and x4-upscaling UNets grown from that
# UNet, on its text encoder and VAE, and last the UNet fine-tuned on aspect-ratio buckets from 64 to
# 128 px (text encoder and VAE frozen, so the other two stay valid) (recipes/shapes-*.toml). Each stage resumes from its last
# checkpoint when run again; finished stages are skipped.
#   ./scripts/train_bundled.sh [RUNS_DIR]          (default: runs/)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-runs}
python=${PYTHON:-.venv/bin/python}
stage() {  # stage NAME TRAINER RECIPE [--base FILE]
  local name=$1 trainer=$2 recipe=$3; shift 3
  local out="$runs/shapes-$name"
  if [ -f "$out/last.safetensors" ]; then echo "shapes-$name: done"; return; fi
  local resume=""; [ -f "$out/train_state.pt" ] && resume="--resume"
  $python -m sdlab train "$trainer" --config "$recipe" --out "$out" $resume "$@"
}
stage vae vae recipes/shapes-vae.toml
stage text text recipes/shapes-text.toml --base "$runs/shapes-vae/last.safetensors"
stage unet unet recipes/shapes-unet.toml --base "$runs/shapes-text/last.safetensors"
stage unet-text unet recipes/shapes-unet-text.toml --base "$runs/shapes-unet/last.safetensors"
# step 5 in three runs of one recipe (see its comments), then step 6
stage relation-a unet recipes/shapes-relation.toml --base "$runs/shapes-unet-text/last.safetensors" \
  --set steps=750 --set lr_schedule_steps=2000 --set ema_decay=0 --set shapes.relation_contrast_min_timestep=0
stage relation-b unet recipes/shapes-relation.toml --base "$runs/shapes-relation-a/last.safetensors" \
  --set steps=1500 --set ema_decay=0.998
stage relation-c unet recipes/shapes-relation.toml --base "$runs/shapes-relation-b/last.safetensors" \
  --set shapes.relation_contrast_min_timestep=850
stage relation-repair unet recipes/shapes-relation-repair.toml --base "$runs/shapes-relation-c/last.safetensors"
stage relation-mirror unet recipes/shapes-relation-mirror.toml --base "$runs/shapes-relation-repair/last.safetensors"
stage relation-mirror-2 unet recipes/shapes-relation-mirror.toml --base "$runs/shapes-relation-mirror/last.safetensors"
stage vae-decoder vae recipes/shapes-vae-decoder.toml --base "$runs/shapes-relation-mirror-2/last.safetensors"
stage dpo dpo recipes/shapes-dpo.toml --base "$runs/shapes-vae-decoder/last.safetensors"
stage dpo-2 dpo recipes/shapes-dpo.toml --base "$runs/shapes-dpo/last.safetensors" --set seed=6
final="$runs/shapes-dpo-2/last.safetensors"
stage inpaint inpaint recipes/shapes-inpaint.toml --base "$final"
stage inpaint-objects inpaint recipes/shapes-inpaint-objects.toml --base "$runs/shapes-inpaint/last.safetensors"
stage inpaint-objects-2 inpaint recipes/shapes-inpaint-objects.toml --base "$runs/shapes-inpaint-objects/last.safetensors" \
  --set shapes.object_masks=0.7
stage inpaint-objects-3 inpaint recipes/shapes-inpaint-objects.toml --base "$runs/shapes-inpaint-objects-2/last.safetensors" \
  --set shapes.object_masks=0.7
stage upscale upscale recipes/shapes-upscale.toml --base "$final"
stage buckets-2 unet recipes/shapes-buckets-2.toml --base "$final"
$python -c "import sys, sdlab.bundled as b; print(*b.package(*sys.argv[1:]), sep='\n')" \
  "$runs/shapes-buckets-2/last.safetensors" "$runs/shapes-inpaint-objects-3/last.safetensors" \
  "$runs/shapes-upscale/last.safetensors"
