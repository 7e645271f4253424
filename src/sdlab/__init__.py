"""sdlab: Stable Diffusion from scratch in PyTorch."""

from .errors import CheckpointError, ConfigError, InputError, SdlabError, UnknownSamplerError

__version__ = "0.1.0"

__all__ = ["SdlabError", "ConfigError", "CheckpointError", "InputError", "UnknownSamplerError", "load"]


def load(path=None, **kwargs):
    """Load a pipeline from a checkpoint file or diffusers folder (the bundled model when None): a
    pipelines.api.StableDiffusion, with txt2img, img2img, inpaint, outpaint, hires_fix and upscale."""
    from .pipelines.api import StableDiffusion
    from .pipelines.pipeline import load_pipeline

    return load_pipeline(path, pipeline_type=StableDiffusion, **kwargs)
