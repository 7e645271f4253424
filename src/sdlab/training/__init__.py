"""Training Stable Diffusion's three networks from scratch: `sdlab train vae|text|unet`.

- config.py: the recipe (TOML) as dataclasses, checked before a step runs
- data.py: captioned image folders and the shapes set; samples as a pure function of (seed, step)
- loop.py: the shared loop (AMP, accumulation, DDP-style gradient averaging, EMA, checkpoints)
- vae.py, text.py, unet.py: one small file per trainer (models, loss, validation, what to save)
- components.py: which parts come from --base and what the single-file result holds
"""

from .config import TrainConfig, load_config
from .loop import train

__all__ = ["TrainConfig", "load_config", "train"]
