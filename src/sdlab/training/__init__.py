"""Training Stable Diffusion's three networks from scratch: `sdlab train vae|text|unet`.

- config.py: the recipe (TOML) as dataclasses, checked before a step runs
- data.py: captioned image folders (or a registered set); samples as a pure function of (seed, step)
- loop.py: the shared loop (AMP, accumulation, DDP-style gradient averaging, EMA, checkpoints)
- diffusion.py: what every diffusion trainer does with a batch (latents, text, noising, loss, validation)
- vae.py, text.py, unet.py, lora.py, ...: one small file per trainer (models, loss, validation, what to save)
- components.py: which parts come from --base and what the single-file result holds
- __main__.py: `python -m sdlab.training` and `torchrun -m sdlab.training` (the command line itself is sdlab/cli/train.py)

    import sdlab.shapes  # the bundled model's data, [shapes] options and trainers (it registers them here)
    from sdlab.training import load_config, train
    train(load_config("unet", "recipes/shapes-unet.toml", {"base": "runs/shapes-text/last.safetensors"}))
"""

from .config import TrainConfig, load_config


def train(config: TrainConfig, **kwargs):
    """Run a recipe; see loop.train (imported here on first use, so the CLI starts without torch)."""
    from .loop import train as run

    return run(config, **kwargs)


__all__ = ["TrainConfig", "load_config", "train"]
