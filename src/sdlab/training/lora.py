"""`sdlab train lora`: low-rank adapters on a frozen model (Hu et al. 2021, "LoRA", eq. 3 and section 4.2).

Each adapted weight W (out, in[, kh, kw]) of the UNet's attention projections (to_q/to_k/to_v/to_out.0,
optionally proj_in/proj_out and the feed-forward layers) and, optionally, of the text encoder's
q/k/v/out projections is read as

    W' = W + (alpha / rank) * up @ down          down (rank, in[, kh, kw]), up (out, rank[, 1, 1])

with `down` drawn like a layer's weight and `up` zero, so training starts at the base model; only
`down` and `up` learn. The loss is the UNet trainer's noise-prediction MSE (unet.py). OpenCLIP's
packed q/k/v weight (SD 2.x) has one (3W, W) tensor; a q, k or v adapter changes its third of the rows.

The network's state dict *is* the kohya / web UI file: `lora_unet_<diffusers path, '.' -> '_'>.lora_down.weight`,
`.lora_up.weight`, `.alpha`, and `lora_te_text_model_<...>` for the text encoder (adapters/lora_keys.py
maps sdlab's module paths to diffusers'). OUT/pytorch_lora_weights.safetensors holds the same factors in
diffusers' PEFT layout (`unet.<path>.lora_A.weight` = down, `lora_B.weight` = up) with rank and alpha in
its `lora_adapter_metadata`, as diffusers' `save_lora_weights` writes them.

The shared pieces of the fine-tuners (the latents of a batch, the text embeddings, the noised
prediction loss) live here too; dreambooth.py, inpaint.py and upscale.py use them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize

from ..config import ModelConfig
from ..errors import ConfigError
from ..schedules import alphas_cumprod
from ..tokenizer import get_tokenizer
from .config import LoraOptions, TrainConfig
from .data import Batch
from .loop import atomic_write
from .plots import image_grid

LORA_FILE = "last.safetensors"
PEFT_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for in a folder
TEXT_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")


# -- shared by the fine-tuners ----------------------------------------------------------------------


@torch.no_grad()
def encode_latents(vae: nn.Module, images: torch.Tensor, batch: Batch, scaling_factor: float) -> torch.Tensor:
    """A sample of the VAE posterior, scaled: z0 (b, C, h, w). Draws one batch.randn."""
    posterior = vae.encode(images)
    eps = batch.randn(*posterior.mean.shape[1:]).to(posterior.mean.dtype)
    return (posterior.mean + posterior.std * eps).float() * scaling_factor


def encode_text(text_encoder: nn.Module, model: ModelConfig, captions: list[str], device: torch.device) -> torch.Tensor:
    """(b, 77, width) text embeddings; gradients flow when the encoder (or an adapter on it) trains."""
    text = model.text
    ids = get_tokenizer().tokenize(captions, text.context_length, pad_token_id=text.pad_token_id)
    return text_encoder(ids.to(device))


def drop_captions(captions: list[str], batch: Batch, dropout: float) -> list[str]:
    """The empty caption for a `dropout` fraction, for classifier-free guidance. Draws one batch.rand."""
    keep = batch.rand() >= dropout
    return [caption if k else "" for caption, k in zip(captions, keep.tolist())]


def noised(latents: torch.Tensor, noise: torch.Tensor, a: torch.Tensor, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, the UNet's target) for clean latents, noise and alphas_cumprod `a` (b, 1, 1, 1):
    z_t = sqrt(a) z0 + sqrt(1 - a) eps (Ho et al. 2020, eq. 4); the target is eps, or
    v = sqrt(a) eps - sqrt(1 - a) z0 for v-prediction (Salimans & Ho 2022)."""
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    return noisy, (a.sqrt() * noise - (1 - a).sqrt() * latents if prediction == "v" else noise)


def noised_prediction_loss(unet: nn.Module, latents: torch.Tensor, text_embeddings: torch.Tensor, batch: Batch,
                           schedule: torch.Tensor, prediction: str, min_snr_gamma: Optional[float] = None,
                           **conditioning) -> torch.Tensor:
    """Per-sample MSE (b,) of the UNet's eps (or v) prediction on z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
    (Ho et al. 2020, eq. 4; v: Salimans & Ho 2022), optionally Min-SNR-gamma weighted (Hang et al. 2023).
    `conditioning`: the UNet's `y` and `concat`. Draws batch.randn (noise), then batch.randint (t)."""
    noise = batch.randn(*latents.shape[1:])
    timesteps = batch.randint(len(schedule))
    a = schedule[timesteps].view(-1, 1, 1, 1)
    noisy_latents, target = noised(latents, noise, a, prediction)
    model_output = unet(noisy_latents, timesteps, text_embeddings, **conditioning).float()
    per_sample = (model_output - target).pow(2).mean(dim=(1, 2, 3))
    weights = loss_weights(a.view(-1), prediction, min_snr_gamma)
    return per_sample if weights is None else per_sample * weights


def loss_weights(alphas_cumprod: torch.Tensor, prediction: str, min_snr_gamma: Optional[float] = None,
                 clean_error_weight_cap: Optional[float] = None) -> Optional[torch.Tensor]:
    """Each sample's loss weight at its noise level, or None for the plain MSE.

    The MSE of an eps (v) prediction carries the error in the clean latents with a factor SNR (SNR + 1).
    Min-SNR-gamma caps that factor at gamma (Hang et al. 2023, eq. 8); `clean_error_weight_cap` raises it
    to at least min(1, cap * SNR), so the noisiest steps train on where things go."""
    if min_snr_gamma is None and clean_error_weight_cap is None:
        return None
    snr = alphas_cumprod / (1 - alphas_cumprod)
    factor = snr + 1 if prediction == "v" else snr  # output MSE per clean-latent MSE
    clean_weight = factor if min_snr_gamma is None else snr.clamp(max=min_snr_gamma)
    if clean_error_weight_cap is not None:
        clean_weight = torch.maximum(clean_weight, (clean_error_weight_cap * snr).clamp(max=1))
    return clean_weight / factor


@torch.no_grad()
def validation_grid(model_config: ModelConfig, unet, vae, text_encoder, prompts: list[str], size: int, steps: int,
                    seed: int, path: Path, guidance_scale: float = 5.0) -> None:
    """txt2img of `prompts` with the model as it trains, one row, saved to `path`."""
    from ..pipelines.api import StableDiffusion as Pipeline

    device = next(unet.parameters()).device
    pipe = Pipeline(model_config, unet, vae, text_encoder, device, torch.float32)
    result = pipe.txt2img(prompts, steps=steps, guidance_scale=guidance_scale, seed=seed, width=size, height=size,
                          batch_size=len(prompts), noise="diffusers")
    image_grid(result.images, columns=len(prompts), labels=prompts).save(path)


# -- the adapters -----------------------------------------------------------------------------------


class LoraLayer(nn.Module):
    """down, up and alpha of one adapted weight; as a parametrization it returns W + scale * up @ down
    (rows [start, stop) only, for a packed q/k/v weight)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, rows: Optional[tuple[int, int]] = None):
        super().__init__()
        out_features = weight.shape[0] if rows is None else rows[1] - rows[0]
        kernel = tuple(weight.shape[2:])
        self.rows = rows
        self.lora_down = nn.Module()
        self.lora_up = nn.Module()
        # down like nn.Linear's own init (kaiming uniform, a = sqrt(5)), up zero: W' = W at step 0 (LoRA, 4.1)
        self.lora_down.weight = nn.Parameter(torch.empty(rank, weight.shape[1], *kernel))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        self.lora_up.weight = nn.Parameter(torch.zeros(out_features, rank, *(1,) * len(kernel)))
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    def delta(self, shape: torch.Size) -> torch.Tensor:
        down, up = self.lora_down.weight, self.lora_up.weight.flatten(1)
        delta = (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])
        return (self.alpha / down.shape[0]) * delta

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return weight + self.delta(weight.shape).to(weight.dtype)
        start, stop = self.rows
        delta = self.delta(weight[start:stop].shape).to(weight.dtype)
        return torch.cat([weight[:start], weight[start:stop] + delta, weight[stop:]])


def _wanted(path: str, suffixes: tuple[str, ...]) -> bool:
    return any(path == s or path.endswith("." + s) for s in suffixes)


def lora_targets(unet: nn.Module, text_encoder: nn.Module, options: LoraOptions) -> dict[str, tuple[str, str, object]]:
    """kohya layer name -> (component, diffusers path, lora_keys.Target) for the layers the options adapt."""
    from ..adapters.lora_keys import text_encoder_targets, unet_targets

    found = {f"lora_unet_{path.replace('.', '_')}": ("unet", path, target) for path, target in unet_targets(unet).items()
             if ".attentions." in path and _wanted(path, options.unet_modules)}
    if not found:
        raise ConfigError(f"lora.unet_modules {list(options.unet_modules)} match no UNet layer; use names such as "
                          "to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2")
    if options.text_encoder:
        text = text_encoder.config
        # SD 2.x reads the penultimate layer: the last one never affects the conditioning (and the
        # 23-layer CLIPTextModel that kohya and diffusers build for SD 2.x does not have it)
        used = text.layers - 1 if text.layer == "penultimate" else text.layers
        found.update({f"lora_te_{path.replace('.', '_')}": ("text_encoder", path, target)
                      for path, target in text_encoder_targets(text_encoder).items()
                      if ".self_attn." in path and _wanted(path, TEXT_MODULES)
                      and int(path.split("encoder.layers.")[1].split(".")[0]) < used})
    return found


class LoraNetwork(nn.Module):
    """Every LoraLayer, keyed by kohya layer name: `state_dict()` is the kohya file's tensors."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, options: LoraOptions):
        super().__init__()
        self.paths: dict[str, tuple[str, str]] = {}  # kohya name -> (component, diffusers path)
        self.targets: dict[str, tuple[str, str]] = {}  # kohya name -> (component, sdlab module path)
        self.params: dict[str, str] = {}
        self.layers = nn.ModuleDict()
        modules = {"unet": unet, "text_encoder": text_encoder}
        for name, (component, path, target) in lora_targets(unet, text_encoder, options).items():
            weight = getattr(modules[component].get_submodule(target.module), target.param)
            self.layers[name] = LoraLayer(weight, options.rank, options.alpha, target.rows)
            self.paths[name] = (component, path)
            self.targets[name] = (component, target.module)
            self.params[name] = target.param

    def attach(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        """Make every adapted weight read W + delta (torch parametrizations: gradients reach down and up)."""
        modules = {"unet": unet, "text_encoder": text_encoder}
        for name, (component, module_path) in self.targets.items():
            module = modules[component].get_submodule(module_path)
            parametrize.register_parametrization(module, self.params[name], self.layers[name], unsafe=True)

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("layers."): v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}


def kohya_to_peft(kohya: dict[str, torch.Tensor], paths: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """The same factors under diffusers' PEFT names; text encoder paths without `text_model.`, as
    transformers >= 5 names CLIPTextModel's modules."""
    peft = {}
    for name, (component, path) in paths.items():
        path = path.removeprefix("text_model.") if component == "text_encoder" else path
        peft[f"{component}.{path}.lora_A.weight"] = kohya[f"{name}.lora_down.weight"]
        peft[f"{component}.{path}.lora_B.weight"] = kohya[f"{name}.lora_up.weight"]
    return peft


class LoraTrainer(nn.Module):
    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.config, self.options, self.model_config = config, config.options, model
        self.resolution = model.resolution
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.network = LoraNetwork(unet, text_encoder, config.options)
        self.network.attach(self.unet, self.text_encoder)
        self.unet.gradient_checkpointing = config.gradient_checkpointing
        self.model = self.network
        self.trained = nn.ModuleDict({"lora": self.network})
        self.register_buffer("alphas_cumprod", alphas_cumprod(model.schedule), persistent=False)

    def loss(self, batch: Batch):
        options: LoraOptions = self.options
        latents = encode_latents(self.vae, batch.images, batch, self.model_config.vae.scaling_factor)
        captions = drop_captions(batch.captions, batch, options.caption_dropout)
        with torch.set_grad_enabled(options.text_encoder and torch.is_grad_enabled()):
            text_embeddings = encode_text(self.text_encoder, self.model_config, captions, batch.images.device)
        per_sample = noised_prediction_loss(self.unet, latents, text_embeddings, batch, self.alphas_cumprod,
                                            self.model_config.prediction, options.min_snr_gamma)
        return per_sample.mean(), {}

    @torch.no_grad()
    def validate(self, model: nn.Module, examples, step: int, out_dir: Path) -> None:
        prompts = list(self.options.validation_prompts) or [caption or "a picture" for _, caption in examples]
        validation_grid(self.model_config, self.unet, self.vae, self.text_encoder, prompts,
                        self.config.resolution or self.resolution, self.options.validation_steps, self.config.seed,
                        Path(out_dir) / f"step-{step:06d}.png")

    def save(self, out_dir: Path, model: LoraNetwork, data) -> Path:
        """OUT/last.safetensors (kohya / web UI) and OUT/pytorch_lora_weights.safetensors (diffusers/PEFT)."""
        options: LoraOptions = self.options
        kohya = model.kohya_state_dict()
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(options.rank),
                    "ss_network_alpha": str(options.alpha), "ss_base_model_version": self.model_config.name,
                    "sdlab_training": json.dumps(self.config.to_dict(), sort_keys=True, default=str)}
        path = Path(out_dir) / LORA_FILE
        atomic_write(path, lambda tmp: save_file(kohya, str(tmp), metadata=metadata))
        components = sorted({component for component, _ in model.paths.values()})
        peft_metadata = {}
        for component in components:
            peft_metadata[f"{component}.r"] = options.rank
            peft_metadata[f"{component}.lora_alpha"] = options.alpha
        atomic_write(Path(out_dir) / PEFT_FILE, lambda tmp: save_file(
            kohya_to_peft(kohya, model.paths), str(tmp),
            metadata={"format": "pt", "lora_adapter_metadata": json.dumps(peft_metadata, sort_keys=True)}))
        return path


def load_base(config: TrainConfig, what: str):
    """--base's networks in fp32 (every fine-tuner needs one)."""
    from ..checkpoint.load import load_components

    if config.base is None:
        raise ConfigError(f"`sdlab train {what}` needs --base: the model to fine-tune (a .safetensors/.ckpt "
                          "file or a diffusers folder)")
    return load_components(config.base, dtype=torch.float32)


def build(config: TrainConfig, device: torch.device) -> LoraTrainer:
    options: LoraOptions = config.options
    if options.rank < 1 or options.alpha <= 0:
        raise ConfigError(f"lora.rank must be at least 1 and lora.alpha positive, got {options.rank}, {options.alpha}")
    base = load_base(config, "lora")
    return LoraTrainer(config, base.config, base.unet, base.vae, base.text_encoder).to(device)
