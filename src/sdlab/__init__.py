"""sdlab: Stable Diffusion from scratch in PyTorch."""

from .errors import CheckpointError, ConfigError, InputError, SdlabError, UnknownSamplerError

__version__ = "0.1.0"

__all__ = ["SdlabError", "ConfigError", "CheckpointError", "InputError", "UnknownSamplerError", "load"]


def load(path=None, **kwargs):
    """Load a pipeline from a checkpoint file or diffusers folder (the bundled model when None)."""
    from .pipelines.common import load_pipeline

    return load_pipeline(path, **kwargs)
