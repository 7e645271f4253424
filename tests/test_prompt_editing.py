"""Prompt editing as the SD web UI reads it: [from:to:when], [to:when], [from::when], [a|b], and the
conditioning each sampling step gets."""

import pytest
import torch
from torch import nn

from sdlab.config import ScheduleConfig, TextConfig
from sdlab.denoisers import Denoiser
from sdlab.errors import InputError
from sdlab.guidance import CFGDenoiser, step_index
from sdlab.prompts import (
    ScheduledConditioning, encode_conditioning, encode_prompt_schedules, encode_prompts, prompt_schedule,
)
from sdlab.samplers import sample, sampler_sigmas

from test_prompts import TinyTextEncoder


def webui(prompt, steps=10, **kwargs):
    """The schedule in the web UI's printed form, [[until_step, text], ...]."""
    return [[until, text] for until, text in prompt_schedule(prompt, steps, **kwargs)]


# -- schedules: the web UI's own examples (the doctests of its prompt_parser) -------------------------------


@pytest.mark.parametrize("prompt, expected", [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[1, "a"], [2, "(b:1.1)"], [3, "a"], [4, "(b:1.1)"], [5, "a"], [6, "(b:1.1)"], [7, "a"],
                     [8, "(b:1.1)"], [9, "a"], [10, "(b:1.1)"]]),
    ("[fe|]male", [[1, "female"], [2, "male"], [3, "female"], [4, "male"], [5, "female"], [6, "male"],
                   [7, "female"], [8, "male"], [9, "female"], [10, "male"]]),
    ("[fe|||]male", [[1, "female"], [2, "male"], [3, "male"], [4, "male"], [5, "female"], [6, "male"],
                     [7, "male"], [8, "male"], [9, "female"], [10, "male"]]),
])
def test_web_ui_parser_examples(prompt, expected):
    assert webui(prompt) == expected


def test_from_to_switches_after_the_given_step():
    expected = [[16, "a fantasy landscape"], [20, "a cyberpunk landscape"]]
    assert webui("a [fantasy:cyberpunk:16] landscape", 20) == expected


def test_alternation_switches_every_step():
    assert webui("[a|b]", 4) == [[1, "a"], [2, "b"], [3, "a"], [4, "b"]]


def test_the_web_ui_header_example_with_100_steps():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert webui(prompt, 100) == [
        [25, "fantasy landscape with a mountain and an oak in foreground shoddy"],
        [50, "fantasy landscape with a lake and an oak in foreground in background shoddy"],
        [60, "fantasy landscape with a lake and an oak in foreground in background masterful"],
        [75, "fantasy landscape with a lake and an oak in background masterful"],
        [100, "fantasy landscape with a lake and a christmas tree in background masterful"],
    ]


def test_add_after_and_remove_after():
    assert webui("a cat[ with a hat:4]", 8) == [[4, "a cat"], [8, "a cat with a hat"]]
    assert webui("a cat[ with a hat::4]", 8) == [[4, "a cat with a hat"], [8, "a cat"]]


@pytest.mark.parametrize("when, switch", [("0.5", 10), ("0.25", 5), ("5", 5), ("1.0", None), ("0", 0), ("25", None),
                                          ("-3", 0)])
def test_a_decimal_point_makes_when_a_fraction(when, switch):
    schedule = webui(f"[a:b:{when}]", 20)
    if switch is None:  # at or beyond the last step: `from` throughout
        assert schedule == [[20, "a"]]
    elif switch == 0:  # before the first step: `to` throughout
        assert schedule == [[20, "b"]]
    else:
        assert schedule == [[switch, "a"], [20, "b"]]


def test_old_scheduling_takes_values_below_one_as_fractions():
    assert webui("[a:b:1.0]", 20, old_scheduling=True) == [[1, "a"], [20, "b"]]
    assert webui("[a:b:0.5]", 20, old_scheduling=True) == [[10, "a"], [20, "b"]]


def test_nesting_and_emphasis_inside_edits():
    assert webui("[(red:1.2)|[blue:green:2]] car", 3) == [[1, "(red:1.2) car"], [2, "blue car"], [3, "(red:1.2) car"]]
    assert webui("a ([cat:dog:2]:1.3)", 4) == [[2, "a (cat:1.3)"], [4, "a (dog:1.3)"]]


@pytest.mark.parametrize("prompt", ["a | b [c:d:2]", "trailing backslash [c:d:2] \\", "(" * 3000])
def test_prompts_outside_the_grammar_are_used_unchanged(prompt):
    assert webui(prompt) == [[10, prompt]]


def test_escaped_brackets_are_text():
    assert webui("a \\[b:c:2\\] d") == [[10, "a \\[b:c:2\\] d"]]


def test_steps_must_be_positive():
    with pytest.raises(InputError, match="steps"):
        prompt_schedule("a [b:c:2]", 0)


# -- conditioning per step ------------------------------------------------------------------------------------


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return TinyTextEncoder(TextConfig(width=8, layers=2, heads=2)).eval()


def test_without_editing_the_conditioning_is_exactly_encode_prompts(encoder):
    prompts, negatives = ["a cat", "a dog"], ["blurry", ""]
    cond, uncond = encode_conditioning(encoder, prompts, negatives, steps=20)
    expected = encode_prompts(encoder, negatives + prompts)
    assert not cond.changes and not uncond.changes
    for step in (0, 19):
        assert torch.equal(torch.cat([uncond.at_step(step), cond.at_step(step)]), expected)


def test_each_distinct_text_is_encoded_once(encoder):
    encoder.calls.clear()
    scheduled = encode_prompt_schedules(encoder, ["[cat|dog]", "[cat|dog]", "cat"], steps=10)
    assert scheduled.text_embeddings.shape[0] == 2 and encoder.calls == [2]


def test_a_step_gets_the_text_the_schedule_gives_it(encoder):
    scheduled = encode_prompt_schedules(encoder, ["a [cat:dog:2] on a mat", "a bird"], steps=4)
    cat, dog, bird = encode_prompts(encoder, ["a cat on a mat", "a dog on a mat", "a bird"]).unbind()
    for step, expected in [(0, cat), (1, cat), (2, dog), (3, dog)]:  # 0-based: steps 1-2 cat, 3-4 dog
        torch.testing.assert_close(scheduled.at_step(step)[0], expected, rtol=0, atol=0)
        torch.testing.assert_close(scheduled.at_step(step)[1], bird, rtol=0, atol=0)


def test_cond_and_uncond_share_one_chunk_count(encoder):
    cond, uncond = encode_conditioning(encoder, ["[cat:" + "dog " * 90 + ":1]"], ["blurry"], steps=3)
    assert cond.at_step(0).shape == uncond.at_step(0).shape == (1, 154, 8)


class RecordingUNet(nn.Module):
    """Predicts no noise and remembers which conditioning row each call saw (its embeddings are row ids)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, crossattn):
        self.seen.append(crossattn[:, 0, 0].tolist())
        return torch.zeros_like(x)


def row_ids(n):
    return torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, 77, 4).clone()


def scheduled_rows(prompt, steps):
    """A ScheduledConditioning for one prompt whose row r is filled with the number r."""
    schedule = prompt_schedule(prompt, steps)
    texts = list(dict.fromkeys(text for _, text in schedule))
    return ScheduledConditioning(row_ids(len(texts)), [[(until, texts.index(t)) for until, t in schedule]]), texts


@pytest.mark.parametrize("sampler, steps, expected_steps", [
    ("Euler", 4, [0, 1, 2, 3]),
    ("Heun", 3, [0, 1, 1, 2, 2]),  # the corrector at sigmas[i + 1] sees step i + 1
    ("DPM++ SDE", 3, [0, 0, 1, 1, 2]),  # the midpoint between sigmas[i] and sigmas[i + 1] is step i
    ("DDIM", 4, [0, 1, 2, 3]),
])
def test_the_denoiser_conditions_every_model_call_on_its_steps_text(sampler, steps, expected_steps):
    schedule = ScheduleConfig()
    cond, texts = scheduled_rows("[a|b|c|d]", steps)
    uncond = ScheduledConditioning(row_ids(1) + 100, [[(steps, 0)]])
    unet = RecordingUNet()
    sigmas = sampler_sigmas(sampler, schedule, steps)
    model = CFGDenoiser(Denoiser(unet, schedule), cond, uncond, 7.5, sigmas=sigmas)
    sample(sampler, model, torch.zeros(1, 4, 8, 8), schedule, steps)
    assert [call[0] for call in unet.seen] == [100.0] * len(expected_steps)  # uncond first, unchanged
    seen_texts = [texts[int(call[1])] for call in unet.seen]
    assert seen_texts == ["abcd"[step % 4] for step in expected_steps]


def test_guidance_scale_one_runs_the_scheduled_cond_alone():
    schedule = ScheduleConfig()
    cond, texts = scheduled_rows("[x:y:1]", 2)
    unet = RecordingUNet()
    model = CFGDenoiser(Denoiser(unet, schedule), cond, cond, 1.0, sigmas=sampler_sigmas("Euler", schedule, 2))
    sample("Euler", model, torch.zeros(1, 4, 8, 8), schedule, 2)
    assert [texts[int(c[0])] for c in unet.seen] == ["x", "y"]


def test_editing_without_the_sigmas_is_refused():
    cond, _ = scheduled_rows("[a|b]", 4)
    with pytest.raises(InputError, match="sigmas"):
        CFGDenoiser(nn.Identity(), cond, cond, 7.5)


def test_fixed_conditioning_needs_no_sigmas():
    cond, _ = scheduled_rows("plain", 4)
    model = CFGDenoiser(nn.Identity(), cond, cond, 7.5)
    assert torch.equal(model.conditioning(14.6)[0]["crossattn"], cond.text_embeddings)


def test_step_index_reads_the_sigma_schedule():
    sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    assert [step_index(s, sigmas) for s in (10.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.0)] == [0, 0, 1, 1, 2, 2, 2]
    assert step_index(torch.full((2,), 5.0), sigmas) == 1
