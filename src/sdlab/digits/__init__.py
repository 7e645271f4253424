"""The digits demo (lecture 3's "digit drawing"): a small class-conditioned diffusion model in pixel
space, trained from scratch on scikit-learn's 1,797 real 8x8 handwritten digits with the noise-
prediction MSE, and drawn with sdlab's own schedules, samplers and classifier-free guidance.

model.py: the noise-predicting network and its file · data.py: the real digits (scikit-learn) ·
train.py: the training loop · draw.py: sampling through denoisers.Denoiser and guidance.CFGDenoiser,
and the pictures · judge.py: a classifier trained on the real digits that grades the drawings.
Drawing needs only torch and the shipped weights (sdlab/weights/sdlab-digits.safetensors);
training and judging need scikit-learn (`pip install sdlab[digits]`).
"""

# the defaults of drawing and training, here so the CLI names them without loading torch
DEFAULT_SAMPLER = "DPM++ 2M"
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 3.0
DEFAULT_TRAINING_STEPS = 2000
