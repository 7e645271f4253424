"""The OpenVINO peer: the same random-weight model converted to OpenVINO and run on its CPU plugin.

`convert(folder)` converts diffusers' UNet, text encoder and VAE decoder (holding the single file's
tensors) with `openvino.convert_model` from the PyTorch modules, checks that each gives the PyTorch
module's output within `TOLERANCE`, and saves them as OpenVINO IR (fp32 weights: `save_model` would
otherwise compress them to fp16) in `folder/openvino/`. `load` reads and compiles them for the CPU at
one image size (static shapes, as the tools built on OpenVINO do), and `txt2img` is the denoising loop
around them: diffusers' tokenizer and DPM++ 2M Karras scheduler (plain tensor arithmetic), so the
seeded noise and the steps are diffusers' and the image can be compared with diffusers'.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

TOLERANCE = 1e-4  # largest |OpenVINO - PyTorch| per output, relative to the output's largest magnitude
PARTS = ("unet", "text_encoder", "vae_decoder")


class UNetStep(nn.Module):
    """diffusers' UNet as a function of plain tensors (no dataclass output), for tracing."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class TextEncoder(nn.Module):
    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids):
        return self.text_encoder(input_ids, return_dict=False)[0]


class VAEDecoder(nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(latents, return_dict=False)[0]


def example_inputs(pipe, latent_side: int) -> dict[str, tuple]:
    """One input of each part: the UNet's is a CFG batch of 2, as a denoising step runs it."""
    generator = torch.Generator().manual_seed(1)
    channels = pipe.unet.config.in_channels
    width = pipe.text_encoder.config.hidden_size
    return {
        "unet": (torch.randn(2, channels, latent_side, latent_side, generator=generator), torch.tensor(500.0),
                 torch.randn(2, 77, width, generator=generator)),
        "text_encoder": (torch.randint(0, pipe.tokenizer.vocab_size, (1, 77), generator=generator),),
        "vae_decoder": (torch.randn(1, pipe.vae.config.latent_channels, latent_side, latent_side,
                                    generator=generator),),
    }


def convert(folder: Path, latent_side: int = 8) -> dict[str, float]:
    """Convert the three parts, check each against PyTorch on an example input and save them;
    -> {part: largest relative difference}. Raises if a part differs by more than TOLERANCE."""
    import warnings

    import openvino as ov

    from random_weights import load_diffusers

    # tracing warns of every Python branch on a tensor; the outputs are checked below instead
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

    pipe = load_diffusers(folder)
    modules = {"unet": UNetStep(pipe.unet), "text_encoder": TextEncoder(pipe.text_encoder),
               "vae_decoder": VAEDecoder(pipe.vae)}
    inputs = example_inputs(pipe, latent_side)
    core = ov.Core()
    out = folder / "openvino"
    out.mkdir(exist_ok=True)
    differences = {}
    for name in PARTS:
        module = modules[name].eval()
        with torch.no_grad():
            expected = module(*inputs[name])
            model = ov.convert_model(module, example_input=inputs[name])
        path = out / f"{name}.xml"
        ov.save_model(model, str(path), compress_to_fp16=False)
        del model  # checked from the saved file: one copy of the weights in memory at a time, not two
        compiled = core.compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        got = torch.from_numpy(compiled([x.numpy() for x in inputs[name]])[0])
        del compiled
        differences[name] = ((got - expected).abs().max() / expected.abs().max()).item()
        if differences[name] > TOLERANCE:
            path.unlink()
            path.with_suffix(".bin").unlink()
            raise RuntimeError(f"OpenVINO's {name} differs from PyTorch's by {differences[name]:.2e} (relative), "
                               f"above {TOLERANCE:g}")
    return differences


class OpenVINOModels:
    """The three parts compiled for one image size, with diffusers' tokenizer and scheduler."""

    def __init__(self, folder: Path, size: int, precision: str = "f32"):
        import openvino as ov
        from diffusers import DPMSolverMultistepScheduler
        from transformers import CLIPTokenizer

        configs = folder / "configs"
        self.tokenizer = CLIPTokenizer.from_pretrained(str(configs / "tokenizer"))
        self.scheduler = DPMSolverMultistepScheduler.from_pretrained(
            str(configs), subfolder="scheduler", use_karras_sigmas=True, algorithm_type="dpmsolver++")
        vae_config = _read_json(configs / "vae" / "config.json")
        self.scaling_factor = vae_config["scaling_factor"]
        self.latent_channels = vae_config["latent_channels"]
        self.latent_side = size // 2 ** (len(vae_config["block_out_channels"]) - 1)
        width = _read_json(configs / "text_encoder" / "config.json")["hidden_size"]
        side, channels = self.latent_side, _read_json(configs / "unet" / "config.json")["in_channels"]
        shapes = {"unet": [[2, channels, side, side], [], [2, 77, width]], "text_encoder": [[1, 77]],
                  "vae_decoder": [[1, self.latent_channels, side, side]]}
        core = ov.Core()
        self.parts = {}
        for name in PARTS:
            model = core.read_model(str(folder / "openvino" / f"{name}.xml"))
            model.reshape({port.get_any_name(): shape for port, shape in zip(model.inputs, shapes[name])})
            self.parts[name] = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        return self.parts["text_encoder"]([ids.input_ids.astype(np.int64)])[0]

    def txt2img(self, prompt: str, negative: str, steps: int, guidance_scale: float, seed: int,
                callback=None) -> np.ndarray:
        """(H, W, 3) uint8: the image diffusers makes with the same settings (CFG, DPM++ 2M Karras)."""
        context = torch.from_numpy(np.concatenate([self.encode(negative), self.encode(prompt)]))
        shape = (1, self.latent_channels, self.latent_side, self.latent_side)
        latents = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
        self.scheduler.set_timesteps(steps)
        latents = latents * self.scheduler.init_noise_sigma
        for index, t in enumerate(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = torch.from_numpy(self.parts["unet"]([model_input.numpy(), t.float().numpy(),
                                                              context.numpy()])[0])
            uncond, cond = noise_pred.chunk(2)
            latents = self.scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
            if callback is not None:
                callback(index)
        image = torch.from_numpy(self.parts["vae_decoder"]([(latents / self.scaling_factor).numpy()])[0])
        return ((image[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def _read_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
