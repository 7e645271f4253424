#!/usr/bin/env bash
# Regenerates every picture (and quoted text) of docs/how-it-works.md from the bundled shapes model
# and the shipped digits model, so the document never goes stale: run it after retraining either.
# Small step counts at the bundled model's 64 px keep it to a few minutes on a laptop CPU.
#   scripts/make_docs.sh            (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT=docs/how-it-works
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$OUT"

sdlab() { "$PYTHON" -m sdlab "$@"; }
# Text a command prints, written whole or not at all (the pictures' commands write atomically).
save_text() { "$@" > "$SCRATCH/text"; mv "$SCRATCH/text" "$TEXT_OUT"; }

PROMPT="a large red circle on the left"
SEED=1
STEPS=20

# 1. The pipeline: one picture, with its denoising trajectory and attention maps on the side.
sdlab generate "$PROMPT" --seed $SEED --steps $STEPS --quiet -o "$OUT/generated.png" \
    --trajectory "$OUT/trajectory.png" --every 4

# 2. Tokens and embeddings.
TEXT_OUT="$OUT/tokens.txt" save_text sdlab tokenize "$PROMPT"
TEXT_OUT="$OUT/nearest-red.txt" save_text sdlab embeddings nearest red -k 8
sdlab embeddings map red green blue yellow circle square triangle large small left right top bottom \
    -o "$OUT/embeddings-map.png"
sdlab embeddings map --contextual "a small red square above a large blue circle" -o "$OUT/contextual-map.png"

# 3. Latents: what the UNet works on.
sdlab latents "$OUT/generated.png" -o "$OUT/latents.png"

# 4. Forward noise and the schedule.
sdlab noise "$OUT/generated.png" --at 0,100,250,500,750,999 -o "$OUT/forward-noise.png"
sdlab schedule --steps $STEPS -o "$OUT/schedule.png"

# 5. One training step: image -> latent -> noise at t -> noised latent -> UNet's noise prediction -> MSE.
"$PYTHON" - "$OUT/generated.png" "$OUT/training-step.png" "$PROMPT" <<'PY'
import sys, torch, sdlab
from sdlab.inside.sheets import channel_picture, labelled_grid
from sdlab.outputs import save_image
from sdlab.pipelines.images import load_image, to_pixels
from sdlab.pipelines.latents import decode_latents, encode_posterior
from sdlab.pipelines.text import encode_text
from sdlab.schedules import alphas_cumprod
from sdlab.training.diffusion import noised
image_path, out_path, prompt = sys.argv[1:]
pipe = sdlab.load()
schedule = alphas_cumprod(pipe.config.schedule)
torch.manual_seed(0)
with torch.no_grad():
    z0 = encode_posterior(pipe, to_pixels(load_image(image_path, "image"))).mean.float() * pipe.config.vae.scaling_factor
    cond, _ = encode_text(pipe, [prompt], [""], 1)
    row, labels = [], []
    for t in (100, 500, 900):
        a = schedule[t].view(1, 1, 1, 1).float()
        noise = torch.randn_like(z0)
        zt, target = noised(z0, noise, a, "epsilon")
        predicted = pipe.unet(zt, torch.tensor([t]), cond.float()).float()
        mse = (predicted - target).pow(2).mean().item()
        row.append([decode_latents(pipe, zt)[0], channel_picture(noise[0, 0]), channel_picture(predicted[0, 0]),
                    channel_picture((predicted - target)[0, 0], limit=float(noise[0, 0].abs().max()))])
        labels.append(f"t = {t}\nMSE {mse:.3f}")
sheet = labelled_grid(row, column_labels=["noised latent,\ndecoded", "noise eps\n(channel 0)",
                                          "UNet's predicted\neps (channel 0)", "error\n(same scale)"],
                      row_labels=labels, title="A training step: predict the noise that was added")
save_image(sheet, out_path)
PY

# 6. Denoising frames are $OUT/trajectory.png above. Attention: where each word is read.
sdlab attention "$PROMPT" --seed $SEED --sampling-steps $STEPS --words red,circle,left --overlay --quiet \
    -o "$OUT/attention.png"

# 7. Classifier-free guidance: one seed at scales 1, 3, 5, 7, 9, tiled into one strip.
for cfg in 1 3 5 7 9; do
    sdlab generate "a small blue triangle at the top" --seed 3 --steps $STEPS --cfg $cfg --quiet \
        -o "$SCRATCH/cfg-$cfg.png"
done
"$PYTHON" - "$SCRATCH" "$OUT/cfg-sweep.png" <<'PY'
import sys
from PIL import Image
from sdlab.inside.sheets import labelled_grid
from sdlab.outputs import save_image
scales = (1, 3, 5, 7, 9)
images = [Image.open(f"{sys.argv[1]}/cfg-{s}.png") for s in scales]
save_image(labelled_grid([images], column_labels=[f"cfg {s}" for s in scales],
                         title="a small blue triangle at the top, seed 3"), sys.argv[2])
PY

# 8. Prompt-to-prompt: the same picture with one word of its prompt changed.
sdlab edit "$PROMPT" --to "a large green circle on the left" --seed $SEED --steps $STEPS --quiet \
    -o "$OUT/edit.png"

# 9. Latent walks.
sdlab interpolate --seeds 1,2 --prompt "$PROMPT" --frames 6 --steps $STEPS -o "$OUT/interpolate.png"

# 10. The digits demo: the whole story on 8x8 pictures.
sdlab digits draw 0 1 2 3 4 5 6 7 8 9 --count 4 -o "$OUT/digits.png"
# The trajectory of one digit only: all ten make a 2 MB animation.
sdlab digits draw 3 --count 4 -o "$SCRATCH/threes.png" --trajectory "$OUT/digits-trajectory.gif"

echo "pictures written to $OUT/"
