"""Prompt-to-prompt: edit a picture by editing its prompt (Hertz et al. 2022, "Prompt-to-Prompt Image
Editing with Cross Attention Control").

The source and the edited prompt are denoised as one batch of 2 from the same noise. The cross-
attention decides which latent positions read which words, and so the picture's layout: for the first
`cross_steps` of the sampling steps the edited prompt's conditional pass uses the source's cross-
attention probabilities instead of its own (sec. 3.2), so the words change but where they are drawn
does not. Its variants:

- word swap ("red" -> "blue", the same token count): the source's maps as they are;
- refinement (words added, `refine`): the tokens the two prompts share are aligned (a global alignment,
  as the paper's code aligns them), those read the source's maps, the new ones their own;
- re-weighting (`reweight`): one word's attention scaled by a factor (sec. 3.2, "attention re-weighting");
- self-attention injection (`self_steps`): the source's self-attention in the edit's low-resolution
  layers (at most 16 x 16 positions, as in the paper's code) keeps the objects' shapes too;
- local blending (`blend`): outside where the blend words are read the edit stays the source, exactly.

Only the conditional half of classifier-free guidance is edited, as in the paper's code. The edit is an
attention hook (models/attention.py) on the pipelines' shared run (pipelines/run.generate).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import InputError
from ..fast.modes import as_fast_modes
from ..models.attention import AttentionSite, attention_hooks, map_shape
from ..pipelines.checks import check_batch_size, size_or_default
from ..pipelines.options import read_options
from ..pipelines.pipeline import GenerationResult, Pipeline
from ..pipelines.run import generate
from ..pipelines.seeds import NoiseDraws, resolve_seed
from ..prompts import tokenize_weighted
from ..samplers import resolve_sampler
from ..tokenizer import END_ID, get_tokenizer
from .attention_maps import word_positions

SELF_ATTENTION_MAX_POSITIONS = 16 ** 2  # the paper's code injects self-attention only at maps this small
BLEND_THRESHOLD = 0.3  # a position belongs to the blend words where their map reaches 0.3 of its maximum
CONTEXT_TOKENS = 77


@dataclass
class EditOptions:
    """What `pipe.edit` takes besides the generation options (options.GenerationOptions)."""

    target: Optional[str] = None  # the edited prompt; None: the source again (re-weighting alone)
    reweight: dict = field(default_factory=dict)  # word -> factor on its attention in the edit
    cross_steps: float = 0.8  # fraction of the steps that use the source's cross-attention
    self_steps: float = 0.4  # fraction of the steps that use the source's self-attention
    blend: tuple = ()  # words whose attention mask bounds the edit (local blending)
    refine: bool = False  # the target adds words: align the shared tokens instead of swapping one for one


def prompt_tokens(prompt: str) -> list[int]:
    """The ids the text encoder reads for `prompt`, past its start token and before its end token."""
    chunks = tokenize_weighted(prompt, get_tokenizer())
    if len(chunks) > 1:
        raise InputError(f"prompt-to-prompt edits one 75-token prompt; '{prompt[:40]}...' is longer: shorten it")
    ids = chunks[0].ids[1:]
    return ids[:ids.index(END_ID)] if END_ID in ids else ids


def aligned_tokens(source: list[int], target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the 77 context positions of the target, the source position it reads (mapper) and
    whether it has one (alphas, 1.0 or 0.0): a global alignment of the two token sequences scoring a
    match 1, a mismatch -1 and a gap 0, as the paper's code scores them, so the shared tokens align in order
    and the added ones have no source. The start token maps to itself, the end and padding tokens to the
    source's end and padding."""
    n, m = len(source), len(target)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            diagonal = score[i - 1][j - 1] + (1 if source[i - 1] == target[j - 1] else -1)
            score[i][j] = max(diagonal, score[i - 1][j], score[i][j - 1])
    mapper = torch.zeros(CONTEXT_TOKENS, dtype=torch.long)
    alphas = torch.zeros(CONTEXT_TOKENS)
    i, j = n, m
    while i > 0 and j > 0:
        if source[i - 1] == target[j - 1] and score[i][j] == score[i - 1][j - 1] + 1:
            mapper[j], alphas[j] = i, 1.0
            i, j = i - 1, j - 1
        elif score[i][j] == score[i - 1][j]:
            i -= 1
        else:
            j -= 1
    alphas[0] = 1.0
    tail = torch.arange(m + 1, CONTEXT_TOKENS)
    mapper[m + 1:] = (n + 1 + tail - (m + 1)).clamp(max=CONTEXT_TOKENS - 1)
    alphas[m + 1:] = 1.0
    return mapper, alphas


class AttentionEdit:
    """The attention hook of one edit of `count` images. Rows of every attention call: [the unconditional
    sources, the unconditional edits,] the conditional sources, the conditional edits, `count` each; only
    the conditional ones are read and edited.

    `step` is the sampling step the sampler is on (the run's callback advances it)."""

    def __init__(self, count: int, steps: int, options: EditOptions, mapper: Optional[torch.Tensor], alphas: Optional[torch.Tensor],
                 equalizer: torch.Tensor, blend_positions: Optional[tuple[list[int], list[int]]]):
        self.cross_until = int(options.cross_steps * steps)
        self.self_until = int(options.self_steps * steps)
        self.mapper, self.alphas, self.equalizer = mapper, alphas, equalizer
        self.count, self.blend_positions = count, blend_positions
        self.blend_maps: list[torch.Tensor] = []  # this UNet call's (2, count, positions) maps of the blend words
        self.step = 0

    def advance(self, info: dict) -> None:
        self.step = info["i"] + 1

    def __call__(self, site: AttentionSite, probabilities: torch.Tensor) -> Optional[torch.Tensor]:
        rows = probabilities.shape[0]
        source, edit = slice(rows - 2 * self.count, rows - self.count), slice(rows - self.count, rows)
        if site.cross:
            if self.blend_positions is not None:
                maps = [probabilities[half][..., positions].sum(-1).mean(1)  # (count, positions)
                        for half, positions in zip((source, edit), self.blend_positions)]
                self.blend_maps.append(torch.stack(maps))
            if self.step >= self.cross_until:
                return None
            base = probabilities[source]  # (count, heads, positions, 77)
            if self.mapper is not None:
                mapper, alphas = self.mapper.to(base.device), self.alphas.to(base.dtype).to(base.device)
                base = base[..., mapper] * alphas + probabilities[edit] * (1 - alphas)
            replaced = probabilities.clone()
            replaced[edit] = base * self.equalizer.to(base.dtype).to(base.device)
            return replaced
        if self.step >= self.self_until or probabilities.shape[2] > SELF_ATTENTION_MAX_POSITIONS:
            return None
        replaced = probabilities.clone()
        replaced[edit] = probabilities[source]
        return replaced

    def blend_mask(self, height: int, width: int) -> torch.Tensor:
        """(count, 1, height, width) latent mask, 1 where the source or its edit reads the blend words in the
        UNet call just made: each layer's map at the latent size, averaged, widened by a 3 x 3 max filter
        and cut at BLEND_THRESHOLD of its maximum, as the paper's code cuts it."""
        maps = []
        for both in self.blend_maps:
            h, w = map_shape(both.shape[-1], height, width)
            maps.append(F.interpolate(both.float().reshape(-1, 1, h, w), size=(height, width), mode="bilinear",
                                      align_corners=False))
        self.blend_maps = []
        mean = F.max_pool2d(torch.stack(maps).mean(0), 3, stride=1, padding=1)
        mask = mean / mean.flatten(1).amax(1).clamp_min(1e-12)[:, None, None, None] > BLEND_THRESHOLD
        return mask.view(2, self.count, 1, height, width).any(0).float()


class LocalBlend(nn.Module):
    """The UNet, its edit rows' output replaced by the source rows' outside the blend mask. The denoiser,
    guidance and samplers are affine in the UNet's output at each position with the same latents there,
    so the edit's latents stay the source's wherever the mask has never been set."""

    def __init__(self, unet: nn.Module, edit: AttentionEdit):
        super().__init__()
        self.unet, self.edit = unet, edit

    def forward(self, x: torch.Tensor, timesteps, **conditioning) -> torch.Tensor:
        out = self.unet(x, timesteps, **conditioning)
        mask = self.edit.blend_mask(*x.shape[-2:]).to(out.dtype).to(out.device)
        pairs = out.view(-1, 2, self.edit.count, *out.shape[1:])  # (uncond | cond, source | edit, count, C, h, w)
        blended = pairs[:, 0] + mask * (pairs[:, 1] - pairs[:, 0])
        return torch.stack([pairs[:, 0], blended], dim=1).reshape(out.shape)


def check_fraction(value: float, name: str) -> None:
    if not 0 <= value <= 1:
        raise InputError(f"{name} must be a fraction of the steps from 0 to 1, got {value}")


def edit_params(source: str, options: EditOptions) -> dict:
    """The edit as fields of the images' parameters."""
    params = {"Edit source": source, "Edit cross steps": options.cross_steps, "Edit self steps": options.self_steps}
    if options.reweight:
        params["Edit reweight"] = " ".join(f"{word}={factor:g}" for word, factor in options.reweight.items())
    if options.blend:
        params["Edit blend"] = " ".join(options.blend)
    if options.refine:
        params["Edit refine"] = True
    return params


def edit(pipe: Pipeline, prompt: str, target: Optional[str] = None, negative_prompt: str = "",
         **settings) -> GenerationResult:
    """Denoise `prompt` and its edit `target` from the same seed and noise, the edit reading the source's
    attention (see the module docstring); returns the `batch_size` sources (seeds as txt2img's), then their
    edits.

    `settings`: EditOptions' fields (reweight, cross_steps, self_steps, blend, refine) and those of
    options.GenerationOptions. A stochastic sampler would draw different noise for a source and its edit,
    so it is refused."""
    options, edit_options = read_options("edit", prompt, negative_prompt, settings, EditOptions)
    edit_options = dataclasses.replace(edit_options, target=prompt if target is None else target,
                                       blend=tuple(edit_options.blend), reweight=dict(edit_options.reweight))
    if not isinstance(prompt, str) or not isinstance(edit_options.target, str):
        raise InputError("edit takes one source prompt and one target prompt (strings)")
    check_fraction(edit_options.cross_steps, "cross_steps (--cross-steps)")
    check_fraction(edit_options.self_steps, "self_steps (--self-steps)")
    if resolve_sampler(options.sampler).stochastic:
        raise InputError(f"the sampler {options.sampler} draws fresh noise for each image every step; prompt-to-prompt "
                         "needs both from the same noise: use a deterministic one such as DPM++ 2M, Euler or DDIM")
    check_batch_size(options.batch_size)
    if not as_fast_modes(options.fast).exact:  # they skip or merge the attention rows the edit pairs up
        raise InputError("prompt-to-prompt edits need the exact network: leave out the fast modes (--fast)")
    count = options.batch_size
    hook = build_edit(prompt, edit_options, count, options.steps)

    width, height = size_or_default(pipe, options.width, options.height)
    seed = resolve_seed(options.seed)
    shape = (pipe.config.latent_channels, height // pipe.latent_factor, width // pipe.latent_factor)
    noise = NoiseDraws(options.noise, seed, count, shape, options.latents).initial()
    user_callback = options.callback

    def step(info: dict) -> None:
        hook.advance(info)
        if user_callback is not None:
            user_callback(info)

    run_options = dataclasses.replace(options, prompt=[prompt] * count + [edit_options.target] * count,
                                      negative_prompt=[negative_prompt] * 2 * count, batch_size=2 * count,
                                      seed=seed, callback=step, latents=torch.cat([noise, noise]))
    run_pipe = dataclasses.replace(pipe, unet=LocalBlend(pipe.unet, hook)) if edit_options.blend else pipe
    with attention_hooks(pipe.unet, hook, self_attention=edit_options.self_steps > 0):
        return generate(run_pipe, run_options, params=edit_params(prompt, edit_options))


def build_edit(source: str, options: EditOptions, count: int, steps: int) -> AttentionEdit:
    """The hook for an edit of `source`, its words checked: InputError names what to change."""
    source_ids, target_ids = prompt_tokens(source), prompt_tokens(options.target)
    mapper = alphas = None
    if options.refine:
        mapper, alphas = aligned_tokens(source_ids, target_ids)
    elif len(source_ids) != len(target_ids):
        raise InputError(f"a word swap needs prompts of the same token count ({len(source_ids)} vs {len(target_ids)} "
                         "tokens); to add or remove words pass refine (--refine)")
    equalizer = torch.ones(CONTEXT_TOKENS)
    for word, factor in options.reweight.items():
        equalizer[word_positions(word, target_ids, "reweight (--reweight)")] = float(factor)
    blend = None
    if options.blend:
        blend = ([], [])
        for word in options.blend:
            found = [positions_or_none(word, ids) for ids in (source_ids, target_ids)]
            if found == [None, None]:
                word_positions(word, target_ids, "blend (--blend)")  # raises, naming the words
            for positions, into in zip(found, blend):
                into.extend(positions or [])
    return AttentionEdit(count, steps, options, mapper, alphas, equalizer, blend)


def positions_or_none(word: str, ids: list[int]) -> Optional[list[int]]:
    try:
        return word_positions(word, ids, "")
    except InputError:
        return None


def side_by_side(images: list[Image.Image], gap: int = 4) -> Image.Image:
    """The images in a row on white, `gap` pixels apart."""
    width = sum(image.width for image in images) + gap * (len(images) - 1)
    sheet = Image.new("RGB", (width, max(image.height for image in images)), (255, 255, 255))
    x = 0
    for image in images:
        sheet.paste(image.convert("RGB"), (x, 0))
        x += image.width + gap
    return sheet
