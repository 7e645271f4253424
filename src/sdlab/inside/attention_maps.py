"""Where each word of a prompt was read: the UNet's text cross-attention, as a picture.

At every denoising step, every cross-attention layer gives each latent position a probability over
the prompt's 77 tokens (averaged over heads here). `WordMaps` averages those of one image's
conditional pass over steps and layers, each map resized to one size first; `StepMaps` keeps them per
sampling step and for chosen steps and layers, as DAAM does (Tang et al. 2023, "What the DAAM:
Interpreting Stable Diffusion Using Cross Attention"); `attention_sheet` lays out the image beside one
heat map per word, as in prompt-to-prompt's figures (Hertz et al. 2022, fig. 4).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..adapters.lora import parse_lora_tags
from ..errors import InputError
from ..models.attention import AttentionSite, map_shape
from ..prompts import prompt_schedule, tokenize_weighted
from ..tokenizer import END_ID, get_tokenizer


def prompt_words(prompt: str, steps: int = 1) -> list[str]:
    """The tokens of the prompt's first 77-token window as text, past its start token and up to its end
    token, as the text encoder reads them: LoRA tags and emphasis syntax removed ("(red:1.3)" reads
    "red"), cut at BREAK or where the web UI's chunking starts the next window. A prompt whose words
    change during the `steps` sampling steps (prompt editing) has no one set of words: InputError."""
    text, _ = parse_lora_tags(prompt)
    schedule = prompt_schedule(text, steps)
    if len(schedule) > 1:
        raise InputError("attention maps need one prompt for every step; this one edits itself "
                         f"([from:to:when] or [a|b]): map {schedule[0][1]!r} and {schedule[-1][1]!r} apart")
    tokenizer = get_tokenizer()
    ids = tokenize_weighted(schedule[0][1], tokenizer)[0].ids[1:]
    ids = ids[:ids.index(END_ID)] if END_ID in ids else ids
    return [word.replace("</w>", "") for word in tokenizer.token_strings(ids)]


def word_positions(word: str, ids: list[int], what: str) -> list[int]:
    """The context positions (1 = the first token after the start token) of every occurrence of `word`'s
    tokens in a prompt's `ids` (past its start token); a word the prompt lacks is the user's mistake,
    named with the prompt's words."""
    tokenizer = get_tokenizer()
    wanted = tokenizer.encode(word)
    found = [start + 1 + i for start in range(len(ids) - len(wanted) + 1)
             if wanted and ids[start:start + len(wanted)] == wanted for i in range(len(wanted))]
    if not found:
        words = " ".join(w.replace("</w>", "") for w in tokenizer.token_strings(ids))
        raise InputError(f"{what}: '{word}' is not a word of the prompt ({words}); name one of its words")
    return found


class WordMaps:
    """Running mean of the attention of tokens 1..count (past the start token) in image `image`'s
    conditional pass, over every recorded call, each map resized to height x width first. Give it to
    `recorded_cross_attention(unet, sink=...)` (an attention hook): nothing but the sum is kept, so long runs at full SD
    sizes cost no memory.

    Each call runs either the conditional batch alone (rows = batch_size, guidance scale 1) or the
    unconditional batch then the conditional one (2 x batch_size rows), so the conditional rows are last.
    """

    def __init__(self, batch_size: int, count: int, height: int = 64, width: int = 64, image: int = 0):
        self.batch_size, self.count, self.image = batch_size, count, image
        self.total = torch.zeros(count, height, width)
        self.calls = 0

    def append(self, probabilities: torch.Tensor) -> None:
        rows, positions, _ = probabilities.shape
        height, width = self.total.shape[1:]
        h, w = map_shape(positions, height, width)
        row = probabilities[rows - self.batch_size + self.image, :, 1:1 + self.count].detach().float().cpu()
        self.total += F.interpolate(row.T.reshape(1, self.count, h, w), size=(height, width),
                                    mode="bilinear", align_corners=False)[0]
        self.calls += 1

    def mean(self) -> torch.Tensor:
        """(count, height, width)."""
        if not self.calls:
            raise ValueError("no cross-attention was recorded: was the UNet called inside recorded_cross_attention?")
        return self.total / self.calls


class StepMaps:
    """An attention hook (models.attention.attention_hooks) keeping a WordMaps per sampling step, for the
    steps in `steps` (0-based); the run's step callback calls `advance`."""

    def __init__(self, batch_size: int, count: int, steps: range, height: int = 64, width: int = 64):
        self.batch_size, self.count, self.steps = batch_size, count, steps
        self.height, self.width = height, width
        self.per_step: dict[int, WordMaps] = {}
        self.step = 0

    def advance(self, info: dict) -> None:
        self.step = info["i"] + 1

    def __call__(self, site: AttentionSite, probabilities: torch.Tensor) -> None:
        if self.step in self.steps:
            if self.step not in self.per_step:
                self.per_step[self.step] = WordMaps(self.batch_size, self.count, self.height, self.width)
            self.per_step[self.step].append(probabilities.mean(dim=1))

    def mean(self) -> torch.Tensor:
        """(count, height, width) over every recorded step and layer."""
        if not self.per_step:
            raise ValueError("no cross-attention was recorded in the chosen steps")
        return (sum(maps.total for maps in self.per_step.values())
                / sum(maps.calls for maps in self.per_step.values()))


def _heat(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB, dark blue through red to yellow."""
    stops = np.array([[20, 20, 90], [60, 60, 200], [220, 40, 40], [250, 230, 60]], dtype=np.float32)
    position = values * (len(stops) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(stops) - 2)
    fraction = (position - low)[..., None]
    return stops[low] * (1 - fraction) + stops[low + 1] * fraction


def attention_sheet(image: Image.Image, maps: torch.Tensor, words: list[str], tile: int = 128,
                    overlay: bool = True) -> Image.Image:
    """The image, then each word's map (scaled to its own maximum) over a faded copy of it (`overlay`) or
    alone, labelled."""
    label = 14
    columns = 1 + len(words)
    sheet = Image.new("RGB", (columns * (tile + 4) + 4, tile + label + 8), (245, 245, 245))
    draw = ImageDraw.Draw(sheet)
    picture = image.convert("RGB").resize((tile, tile), Image.NEAREST)
    faded = np.asarray(picture, dtype=np.float32) * 0.3 if overlay else 0.0
    sheet.paste(picture, (4, 4))
    draw.text((4, tile + 6), "image", fill=(0, 0, 0))
    for i, (word, values) in enumerate(zip(words, maps)):
        values = F.interpolate(values[None, None], size=(tile, tile), mode="bilinear", align_corners=False)[0, 0]
        values = (values / values.max().clamp_min(1e-12)).numpy()
        blended = faded + _heat(values) * (0.7 if overlay else 1.0)
        x = 4 + (i + 1) * (tile + 4)
        sheet.paste(Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)), (x, 4))
        draw.text((x, tile + 6), word[:tile // 6], fill=(0, 0, 0))
    return sheet
