"""`sdlab train dpo`: fine-tune a UNet on preferences between its own pictures (Diffusion-DPO, Wallace et
al. 2023, "Diffusion Model Alignment Using Direct Preference Optimization"), on the shapes data, where
sdlab's checker says from the pixels which pictures show their caption.

Before training, --base draws `samples_per_caption` pictures of each of `pair_captions` two-object
captions of the shapes set (canonical wording, the background named half the time; the held-out
colour-shape pairs never appear), with the sampler, steps and CFG users get. `sdlab.shapes.check`
judges every picture; a caption with right and wrong pictures gives up to `pairs_per_caption` pairs
(right, wrong). Everything is kept in OUT/pairs.npz, written once complete; a resumed or repeated run
with the same settings reuses it.

Each step noises both pictures of a pair with the same noise at the same timestep. The UNet being
trained and a frozen copy of --base's UNet (the reference) predict the noise under the caption; with
e_w, e_l the trained UNet's mean squared errors on the right and the wrong picture and r_w, r_l the
reference's,

    loss = -log sigmoid(-(beta / 2) * ((e_w - r_w) - (e_l - r_l)))

(the paper's eq. 14, its timestep weighting constant folded into beta). The loss is log 2 at the start,
where the two UNets agree; it falls as the right picture becomes easier to denoise than the wrong one,
relative to what the reference found, and stops pulling once that margin is a few 1 / beta. The
wrong pictures are the model's own failures (an object drawn twice, colours exchanged, an object in
the wrong place), which pictures rendered from captions never show it.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError, InputError
from ..training import components, distributed
from ..training.config import TrainConfig
from ..training.data import Batch
from ..training.diffusion import draw_noise, encode_text, noised, prediction_errors
from ..training.loop import atomic_write
from ..training.unet import UNetFamilyTrainer, UNetTrainer
from . import dataset
from .check import check
from .options import DPOOptions

PAIRS_FILE = "pairs.npz"
CAPTION_STREAM = 2_000_003  # the captions' random stream, apart from the training scenes' seeds


def pair_captions(count: int, seed: int) -> list[str]:
    """`count` two-object captions as the shapes set draws them, canonical wording, the background named
    half the time; deterministic per seed."""
    rng = np.random.default_rng([seed, CAPTION_STREAM])
    captions = []
    for _ in range(count):
        scene = dataset.sample_scene(rng, single_object_fraction=0.0)
        captions.append(dataset.canonical_caption(scene, bool(rng.random() < 0.5)))
    return captions


def preference_pairs(verdicts: np.ndarray, per_caption: int) -> np.ndarray:
    """(P, 2) indices (right, wrong) into the flattened pictures, from verdicts (captions, samples): for each
    caption up to `per_caption` pairs, taken so that they share as few pictures as they can."""
    pairs = []
    samples = verdicts.shape[1]
    for row, judged in enumerate(verdicts):
        right = [row * samples + j for j in np.flatnonzero(judged)]
        wrong = [row * samples + j for j in np.flatnonzero(~judged)]
        order = sorted(itertools.product(range(len(right)), range(len(wrong))), key=lambda p: (p[0] + p[1], p[0]))
        pairs += [(right[i], wrong[j]) for i, j in order[:per_caption]]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


@torch.no_grad()
def draw_and_judge(pipe, captions: list[str], samples: int, seed: int, steps: int, guidance_scale: float,
                   sampler: str, batch_size: int = 16,
                   progress: Optional[Callable[[int], None]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Pictures (captions * samples, H, W, 3) uint8, caption i's sample j at index i * samples + j, drawn with
    seed + that index (the web UI's per-image noise, so the set does not depend on batch_size), and the
    checker's verdicts (captions, samples)."""
    prompts = [caption for caption in captions for _ in range(samples)]
    images, verdicts = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        result = pipe.txt2img(chunk, steps=steps, guidance_scale=guidance_scale, sampler=sampler, seed=seed + start,
                              batch_size=len(chunk), noise="a1111-cpu")
        for image, caption in zip(result.images, chunk):
            images.append(np.asarray(image.convert("RGB"), dtype=np.uint8))
            verdicts.append(check(image, caption)["all"])
        if progress is not None:
            progress(len(chunk))
    return np.stack(images), np.array(verdicts, dtype=bool).reshape(len(captions), samples)


def pair_settings(config: TrainConfig) -> dict:
    """What decides the pairs: a pairs file made with other settings is made again."""
    options: DPOOptions = config.options
    return {"base": os.path.abspath(config.base), "seed": config.seed, "pair_captions": options.pair_captions,
            "samples_per_caption": options.samples_per_caption, "pairs_per_caption": options.pairs_per_caption,
            "sampler": options.sampler, "sample_steps": options.sample_steps,
            "sample_guidance": options.sample_guidance}


def read_pairs(path: Path, keys: Optional[tuple[str, ...]] = None) -> dict:
    """The arrays of a pairs file (all, or only `keys`; no pickled objects are read), its settings decoded."""
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in (keys or stored.files)}
    if "settings" in arrays:
        arrays["settings"] = json.loads(str(arrays["settings"]))
    return arrays


def make_pairs(path: Path, config: TrainConfig, model_config: ModelConfig, unet: nn.Module, vae: nn.Module,
               text_encoder: nn.Module) -> Path:
    """OUT/pairs.npz: --base's pictures of the pair captions, their verdicts and the pairs; kept if it
    exists with the same settings. Rank 0 draws, the other ranks wait."""
    from ..pipelines.api import StableDiffusion as Pipeline
    from ..progress import ProgressBar

    settings = pair_settings(config)
    if path.exists() and read_pairs(path, keys=("settings",))["settings"] == settings:
        return path
    if int(os.environ.get("RANK", "0")) == 0:
        options: DPOOptions = config.options
        captions = pair_captions(options.pair_captions, config.seed)
        total = len(captions) * options.samples_per_caption
        distributed.note(f"drawing {total} pictures of {len(captions)} two-object captions with --base for the "
                         f"preference pairs ({path})")
        device = next(unet.parameters()).device
        pipe = Pipeline(model_config, unet.eval(), vae.eval(), text_encoder.eval(), device, torch.float32)
        bar = ProgressBar(total, "pairs ")
        try:
            images, verdicts = draw_and_judge(pipe, captions, options.samples_per_caption, config.seed,
                                              options.sample_steps, options.sample_guidance, options.sampler,
                                              progress=bar.update)
        finally:
            bar.close()
        pairs = preference_pairs(verdicts, options.pairs_per_caption)
        if len(pairs) == 0:
            raise InputError(f"--base drew no caption both right and wrong in {total} pictures ({verdicts.mean():.0%} "
                             "right): there is nothing to prefer; raise dpo.pair_captions or samples_per_caption")
        distributed.note(f"{verdicts.mean():.1%} of the pictures right; {len(pairs)} pairs from "
                         f"{int((verdicts.any(1) & ~verdicts.all(1)).sum())} captions")
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
                np.savez_compressed(f, images=images, verdicts=verdicts, pairs=pairs,
                                    captions=np.array(captions), settings=np.array(json.dumps(settings)))

        atomic_write(path, write)
    distributed.barrier()
    return path


class PreferencePairs:
    """Sample n is a pair (right and wrong picture stacked, (2, 3, H, W) in [-1, 1]) with its caption; each
    epoch visits the pairs in a new seeded order."""

    def __init__(self, path: Path, seed: int = 0):
        stored = read_pairs(path)
        self.images, self.pairs, self.seed = stored["images"], stored["pairs"], seed
        self.captions = [str(c) for c in stored["captions"]]
        self.samples = stored["verdicts"].shape[1]

    def __len__(self) -> int:
        return len(self.pairs)

    def pair(self, index: int) -> tuple[torch.Tensor, str]:
        right, wrong = self.pairs[index]
        images = torch.from_numpy(self.images[[right, wrong]].copy()).permute(0, 3, 1, 2).float() / 127.5 - 1
        return images, self.captions[right // self.samples]

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.pairs))

    def __getitem__(self, n: int) -> tuple[torch.Tensor, str]:
        return self.pair(int(self._order(n // len(self.pairs))[n % len(self.pairs)]))

    def validation_examples(self, count: int) -> list[tuple[torch.Tensor, str]]:
        return [self.pair(i % len(self.pairs)) for i in range(count)]


def dpo_loss(errors: torch.Tensor, reference_errors: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict]:
    """Diffusion-DPO's loss from per-picture errors (b, 2) (column 0 the right picture, 1 the wrong one) of
    the trained and the reference UNet; logs how often the pair is ranked right and how far each error moved."""
    shift = errors - reference_errors  # (b, 2)
    margin = -0.5 * beta * (shift[:, 0] - shift[:, 1])
    loss = -nn.functional.logsigmoid(margin).mean()
    return loss, {"dpo": loss.detach(), "ranked": (margin > 0).float().mean().detach(),
                  "right_shift": shift[:, 0].mean().detach(), "wrong_shift": shift[:, 1].mean().detach()}


class DPOTrainer(UNetFamilyTrainer):
    """The UNet trains; the reference (--base's UNet), the VAE and the text encoder stay frozen."""

    default_ema_decay = 0.0

    def __init__(self, config: TrainConfig, model: ModelConfig, unet: nn.Module, vae: nn.Module,
                 text_encoder: nn.Module, pairs_path: Path):
        super().__init__(config, model, unet, vae, text_encoder)
        self.reference = copy.deepcopy(unet).eval().requires_grad_(False)
        self.pairs_path = pairs_path

    def training_data(self, size: int) -> PreferencePairs:
        return PreferencePairs(self.pairs_path, self.config.seed)

    def errors(self, unet: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
        return prediction_errors(unet(noisy, timesteps, text), target)

    def loss(self, batch: Batch):
        options: DPOOptions = self.options
        b = batch.size
        with torch.no_grad():
            latents = self.vae.encode(batch.images.flatten(0, 1)).mean.float() * self.model_config.vae.scaling_factor
            text = encode_text(self.text_encoder, self.model_config, batch.captions,
                               batch.images.device).repeat_interleave(2, dim=0)
        noise, timesteps, a = draw_noise(latents, batch, self.alphas_cumprod)  # one noise and timestep per pair
        noise, timesteps, a = (x.repeat_interleave(2, dim=0) for x in (noise, timesteps, a))
        noisy, target = noised(latents, noise, a, self.model_config.prediction)
        errors = self.errors(self.unet, noisy, timesteps, text, target).view(b, 2)
        with torch.no_grad():
            reference = self.errors(self.reference, noisy, timesteps, text, target).view(b, 2)
        return dpo_loss(errors, reference, options.beta)

    validate = UNetTrainer.validate


def build(config: TrainConfig, device: torch.device) -> DPOTrainer:
    from ..checkpoint.load import load_components
    from ..samplers import resolve_sampler

    options: DPOOptions = config.options
    resolve_sampler(options.sampler)
    resolve_sampler(options.validation_sampler)
    if config.base is None:  # no --base and no bundled model installed (training.config.resolve_base)
        raise ConfigError("`sdlab train dpo` needs --base: the model whose pictures are judged, and the reference "
                          "(no bundled model is installed)")
    if not config.init_from_base:
        raise ConfigError("`sdlab train dpo` fine-tunes --base's UNet against itself: set init_from_base = true")
    base = load_components(config.base, dtype=torch.float32)
    model = components.model_config(config, "unet", base.config)
    unet = components.starting_part(config, "unet", model, base.unet).to(device)
    vae, text_encoder = base.vae.to(device), base.text_encoder.to(device)
    pairs = make_pairs(Path(config.out_dir) / PAIRS_FILE, config, model, unet, vae, text_encoder)
    return DPOTrainer(config, model, unet.train(), vae, text_encoder, pairs).to(device)
