"""A UNet that predicts noise (epsilon) or velocity (v), seen as a denoiser D(x; sigma) ~ E[x0 | x].

Samplers work in sigma space (Karras et al. 2022, Sec. 2): `x = x0 + sigma * eps`. SD's UNet was
trained on VP inputs `sqrt(a_t) x0 + sqrt(1 - a_t) eps = x / sqrt(sigma^2 + 1)` and a timestep t, so
the wrapper scales the input by c_in = 1 / sqrt(sigma^2 + 1), turns sigma into t, and reads the
output back as D = c_skip x + c_out F (Karras et al. 2022, Table 1, with sigma_data = 1):

- epsilon (SD 1.x, SD 2 base): c_skip = 1, c_out = -sigma (k-diffusion's CompVisDenoiser);
- v (SD 2 768-v; Salimans & Ho 2022, "Progressive Distillation", Sec. 4): v = sqrt(a) eps - sqrt(1-a) x0,
  so c_skip = 1 / (sigma^2 + 1), c_out = -sigma / sqrt(sigma^2 + 1) (k-diffusion's CompVisVDenoiser).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ScheduleConfig
from .errors import ConfigError
from .schedules import sigma_to_t

PREDICTIONS = {"epsilon": "epsilon", "eps": "epsilon", "v": "v", "v_prediction": "v"}


class Denoiser(nn.Module):
    """`model(x, sigma, **cond) -> denoised` around `unet(x_in, t, **cond) -> epsilon or v`.

    `sigma` is a float, a 0-d tensor or one per batch item (B,). The UNet gets the continuous timestep
    of sigma (log-sigma interpolation, integer at the table's sigmas), as diffusers' k-style schedulers
    give it; `quantize=True` rounds it as diffusers' DPMSolverMultistepScheduler does for Karras sigmas.
    The UNet runs in its own dtype (fp16 on GPUs); inputs and outputs stay in the sampler's dtype.
    """

    def __init__(self, unet: nn.Module, schedule: ScheduleConfig, prediction: str = "epsilon", quantize: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction type '{prediction}'; use 'epsilon' or 'v'")
        self.unet = unet
        self.schedule = schedule
        self.prediction = PREDICTIONS[prediction]
        self.quantize = quantize

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        s = sigma.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))
        c_in = (s**2 + 1) ** -0.5
        t = sigma_to_t(sigma, self.schedule, self.quantize)
        parameter = next(self.unet.parameters(), None)
        dtype = x.dtype if parameter is None else parameter.dtype
        out = self.unet((x * c_in).to(dtype), t, **cond).to(x.dtype)
        if self.prediction == "epsilon":
            return x - s * out
        return x * c_in**2 - out * s * c_in
