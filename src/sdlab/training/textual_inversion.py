"""`sdlab train textual-inversion`: a new word for a concept, learned as token vectors while every
network stays frozen (Gal et al. 2022, "An Image is Worth One Word", section 3).

The pseudo-word (`token`, e.g. "my-concept") stands for n vectors v_1..v_n in the text encoder's
token-embedding space, initialised from the embedding(s) of `init_word` (section 4.1: "a single-word
coarse descriptor of the object"). Each training image's prompt is its caption (the .txt beside it)
with the pseudo-word in it, as kohya's train_textual_inversion.py reads captions: a caption that names
the pseudo-word ("my-concept on a beach") is used as it is, `{}` in a caption stands for it ("a photo of
{} at night"), and a caption with neither gets it in front ("my-concept, a dog on grass"). An image
without a caption gets the template ("a photo of my-concept"); a template with `{caption}` puts every
caption there instead ("{}, {caption}"). The loss is the UNet trainer's noise-prediction MSE, and its
gradient reaches only the vectors, through the frozen UNet and text encoder.

The vectors are registered with the embeddings adapter (adapters/embeddings.py) under the
pseudo-word's name, so prompts are tokenized exactly as at generation time; the adapter's lookup
reads the trained parameter itself. Saved as web UI files: OUT/last.safetensors and
OUT/<token>.safetensors ({"emb_params": (n, D)}; the web UI names an embedding by its file stem) and
OUT/<token>.pt ({"string_to_param": {"*": (n, D)}, ...}, the original textual_inversion layout).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..adapters.embeddings import Embedding, embedding_lookup, load_embeddings
from ..config import ModelConfig
from ..errors import ConfigError
from ..prompts import encode_prompts
from ..schedules import alphas_cumprod
from ..tokenizer import get_tokenizer
from .config import TextualInversionOptions, TrainConfig
from .data import Batch
from .diffusion import encode_latents, noised_prediction_loss, validation_grid
from .lora import load_base
from .loop import atomic_write


def caption_prompt(caption: str, token: str) -> str:
    """A caption as a training prompt with the pseudo-word `token` in it (the conventions in the module doc)."""
    if "{}" in caption:
        return caption.replace("{}", token)
    # the tokenizer lowercases, so "My-Concept" names it too; "my-concepts" is another word
    if re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", caption, flags=re.IGNORECASE):
        return caption
    return f"{token}, {caption}"


class PseudoWordVectors(nn.Module):
    """The n learned vectors (n, D) of the pseudo-word: all that trains."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())


def initial_vectors(text_encoder: nn.Module, init_word: str, n: int) -> torch.Tensor:
    """The init word's token embeddings, repeated in turn to fill n vectors."""
    ids = get_tokenizer().encode(init_word)
    if not ids:
        raise ConfigError(f"textual_inversion.init_word {init_word!r} has no tokens; give a word such as 'dog'")
    table = text_encoder.token_embedding.weight.detach()
    return torch.stack([table[ids[i % len(ids)]] for i in range(n)])


class TextualInversionTrainer(nn.Module):
    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module, text_encoder: nn.Module):
        super().__init__()
        options: TextualInversionOptions = config.options
        self.config, self.options, self.model_config = config, options, model
        self.resolution = model.resolution
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.model = PseudoWordVectors(initial_vectors(text_encoder, options.init_word, options.vectors))
        self.trained = nn.ModuleDict({"embedding": self.model})
        self.register_buffer("alphas_cumprod", alphas_cumprod(model.schedule), persistent=False)

    def attach(self) -> None:
        """Register the pseudo-word with the adapter, its lookup reading the trained parameter (gradients
        flow into it, and every optimizer step is seen at once)."""
        load_embeddings(self.text_encoder, Embedding(self.options.token, self.model.vectors.detach()))
        embedding_lookup(self.text_encoder).rows = self.model.vectors

    def prompts(self, captions: list[str]) -> list[str]:
        """Each image's training prompt: its caption with the pseudo-word, else the template."""
        template, token = self.options.template, self.options.token
        return [caption_prompt(caption, token) if caption and "{caption}" not in template
                else template.format(token, caption=caption) for caption in captions]

    def loss(self, batch: Batch):
        latents = encode_latents(self.vae, batch.images, batch, self.model_config.vae.scaling_factor)
        text_embeddings = encode_prompts(self.text_encoder, self.prompts(batch.captions))
        per_sample = noised_prediction_loss(self.unet, latents, text_embeddings, batch, self.alphas_cumprod,
                                            self.model_config.prediction)
        return per_sample.mean(), {"norm": self.model.vectors.detach().norm(dim=-1).mean()}

    @torch.no_grad()
    def validate(self, model: PseudoWordVectors, examples, step: int, out_dir: Path) -> None:
        prompts = list(self.options.validation_prompts) or self.prompts([caption for _, caption in examples[:2]])
        validation_grid(self.model_config, self.unet, self.vae, self.text_encoder, prompts,
                        self.config.resolution or self.resolution, self.options.validation_steps, self.config.seed,
                        Path(out_dir) / f"step-{step:06d}.png")

    def save(self, out_dir: Path, model: PseudoWordVectors, data) -> Path:
        token = self.options.token
        vectors = model.vectors.detach().float().cpu().contiguous()  # (n, D)
        metadata = {"sdlab_training": json.dumps(self.config.to_dict(), sort_keys=True, default=str)}
        out_dir = Path(out_dir)
        for name in ("last", token):
            atomic_write(out_dir / f"{name}.safetensors",
                         lambda tmp: save_file({"emb_params": vectors}, str(tmp), metadata=metadata))
        ids = get_tokenizer().encode(token)
        pt = {"string_to_param": {"*": vectors}, "string_to_token": {"*": torch.tensor(ids[0])},
              "name": token, "step": self.config.steps, "sd_checkpoint_name": Path(self.config.base).stem}
        atomic_write(out_dir / f"{token}.pt", lambda tmp: torch.save(pt, tmp))
        return out_dir / "last.safetensors"


def build(config: TrainConfig, device: torch.device) -> TextualInversionTrainer:
    options: TextualInversionOptions = config.options
    if options.vectors < 1:
        raise ConfigError(f"textual_inversion.vectors must be at least 1, got {options.vectors}")
    if "{}" not in options.template:
        raise ConfigError(f"textual_inversion.template {options.template!r} must contain {{}} where the pseudo-word "
                          "goes, e.g. 'a photo of {}' or '{}, {caption}'")
    base = load_base(config, "textual-inversion")
    trainer = TextualInversionTrainer(config, base.config, base.unet, base.vae, base.text_encoder).to(device)
    trainer.attach()
    return trainer
