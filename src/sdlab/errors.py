"""Errors a user can cause. Each message says what went wrong and what to do.

The CLI prints `str(error)` on one line and exits non-zero; the API raises these typed exceptions.
"""


class SdlabError(Exception):
    """Base class of every error a user can cause (bad input, bad files, bad options)."""


class ConfigError(SdlabError):
    """A model or training config is malformed (unknown keys, wrong types)."""


class CheckpointError(SdlabError):
    """A checkpoint file is missing, truncated, corrupt, unsafe or of an unknown architecture."""


class InputError(SdlabError):
    """A generation parameter is invalid (size, steps, prompt, sampler, image, mask ...)."""


class UnknownSamplerError(InputError):
    """The sampler name is not one sdlab knows; the message lists the known names."""


class TooLargeError(InputError):
    """A request needs more memory than the device has free, or is beyond the configured limits
    (memory.Limits); the message gives the estimate and what to change."""
