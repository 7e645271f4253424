"""`sdlab train textual-inversion`: only the pseudo-word's vectors learn, the loss falls on a fixed batch,
the frozen networks stay as they were, and the saved web UI files give the in-training conditioning
through sdlab's embeddings adapter and through diffusers' load_textual_inversion."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from sdlab.adapters.embeddings import load_embeddings, read_embeddings
from sdlab.checkpoint.load import load_components
from sdlab.prompts import encode_prompts
from sdlab.training import textual_inversion as ti_trainer
from sdlab.training.data import Batch, open_data
from sdlab.training.loop import STATE_FILE
from test_pipeline_parity import tiny_diffusers_sd
from test_training_loop import run, shapes_folder, tiny_config  # noqa: F401

PROMPT = "a painting of my-concept on a table"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1")
    tiny_diffusers_sd(folder, "sd1", "epsilon")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data")))


def ti_config(out, base, data, **overrides):
    values = {"base": str(base), "resolution": 16, "batch_size": 2, "lr": 5e-2,
              "textual_inversion.token": "my-concept", "textual_inversion.init_word": "red circle",
              "textual_inversion.vectors": 3}
    values.update(overrides)
    if data is not None:
        values["data"] = data
    return tiny_config("textual-inversion", out, **values)


def fixed_batch(images, captions):
    """The same images, noise and timesteps at every step: a fixed batch to overfit."""
    return Batch(images, captions, 0, 0, len(captions), 0, len(captions), 0, 1, torch.Generator().manual_seed(3))


def test_the_vectors_start_as_the_init_word_and_only_they_learn(tmp_path, base, data):
    config = ti_config(tmp_path / "run", base, data, steps=3)
    trainer = ti_trainer.build(config, torch.device("cpu"))
    table = trainer.text_encoder.token_embedding.weight
    red, circle = 736, 7117  # CLIP's ids of "red</w>" and "circle</w>"
    torch.testing.assert_close(trainer.model.vectors.detach(), table[[red, circle, red]], rtol=0, atol=0)
    assert [n for n, p in trainer.named_parameters() if p.requires_grad] == ["model.vectors"]

    run(config)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["trained"]
    assert list(state) == ["embedding.vectors"] and state["embedding.vectors"].shape == (3, 32)
    assert not torch.equal(state["embedding.vectors"], trainer.model.vectors.detach())


def test_the_loss_falls_on_a_fixed_batch(tmp_path):
    # a random UNet barely reads the text; a louder cross-attention output gives the vectors something to fit
    folder = tmp_path / "loud"
    pipe = tiny_diffusers_sd(folder, "sd1", "epsilon")
    with torch.no_grad():
        for name, module in pipe.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.mul_(20)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    trainer = ti_trainer.build(ti_config(tmp_path / "run", folder, None), torch.device("cpu"))
    optimizer = torch.optim.AdamW(trainer.trained.parameters(), lr=5e-2, weight_decay=0)
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    losses = []
    for _ in range(30):
        loss = trainer.loss(fixed_batch(images, [""] * 4))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.97 * losses[0] and all(b < a for a, b in zip(losses[::5], losses[5::5])), losses


def test_frozen_networks_are_unchanged_by_training(tmp_path, base, data):
    config = ti_config(tmp_path / "run", base, data, steps=2)
    trainer = ti_trainer.build(config, torch.device("cpu"))
    before = {k: v.clone() for k, v in trainer.state_dict().items() if not k.startswith(("model.", "trained."))}
    initial = trainer.model.vectors.detach().clone()
    optimizer = torch.optim.AdamW(trainer.trained.parameters(), lr=0.1)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for step in range(2):
        trainer.loss(fixed_batch(images, ["", ""]))[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    after = trainer.state_dict()
    assert not torch.equal(after["model.vectors"], initial)
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []


def test_the_saved_embedding_gives_the_in_training_conditioning_in_sdlab_and_diffusers(tmp_path, base, data):
    config = ti_config(tmp_path / "run", base, data, steps=3)
    run(config)
    trainer = ti_trainer.build(config, torch.device("cpu"))
    trainer.trained.load_state_dict(torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["trained"])
    with torch.no_grad():
        expected = encode_prompts(trainer.text_encoder, [PROMPT])  # (1, 77, 32)
        initial = encode_prompts(ti_trainer.build(config, torch.device("cpu")).text_encoder, [PROMPT])
    assert (expected - initial).abs().max() > 1e-3  # three steps at lr 5e-2 moved the vectors visibly

    out = tmp_path / "run"
    assert set(load_file(out / "last.safetensors")) == {"emb_params"}
    pt = torch.load(out / "my-concept.pt", weights_only=True)
    assert pt["name"] == "my-concept" and pt["string_to_param"]["*"].shape == (3, 32)
    for path, name in ((out / "last.safetensors", "my-concept"), (out / "my-concept.safetensors", None),
                       (out / "my-concept.pt", None)):
        text_encoder = load_components(base).text_encoder
        load_embeddings(text_encoder, path, name=name)
        with torch.no_grad():
            torch.testing.assert_close(encode_prompts(text_encoder, [PROMPT]), expected, rtol=0, atol=1e-6)
    (embedding,) = read_embeddings(out / "my-concept.pt")
    torch.testing.assert_close(embedding.vectors, trainer.model.vectors.detach(), rtol=0, atol=0)

    pipe = StableDiffusionPipeline.from_pretrained(str(base))
    pipe.load_textual_inversion(str(out / "my-concept.pt"), token="my-concept")
    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)  # "my-concept my-concept_1 my-concept_2"
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        theirs = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(theirs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("caption, prompt", [
    ("my-concept on a beach", "my-concept on a beach"),  # kohya's: the caption names the pseudo-word
    ("a close-up of My-Concept", "a close-up of My-Concept"),  # the tokenizer lowercases
    ("a photo of {} at night", "a photo of my-concept at night"),  # {} as in the template
    ("a red circle", "my-concept, a red circle"),  # neither: the pseudo-word in front
    ("two my-concepts", "my-concept, two my-concepts"),  # another word
])
def test_a_caption_gets_the_pseudo_word_as_kohyas_trainer_reads_it(caption, prompt):
    assert ti_trainer.caption_prompt(caption, "my-concept") == prompt


def test_the_folders_captions_are_the_prompts_and_the_template_serves_images_without_one(tmp_path, base, data):
    trainer = ti_trainer.build(ti_config(tmp_path / "run", base, data), torch.device("cpu"))
    assert trainer.prompts(["a photo of {} on a table", "a red circle", ""]) == [
        "a photo of my-concept on a table", "my-concept, a red circle", "a photo of my-concept"]
    captions = [caption for _, caption in open_data(data, 16).validation_examples(2)]
    assert all(captions) and trainer.prompts(captions) == [f"my-concept, {caption}" for caption in captions]
    config = ti_config(tmp_path / "run", base, data, **{"textual_inversion.template": "{} seen as {caption}"})
    trainer = ti_trainer.build(config, torch.device("cpu"))
    assert trainer.prompts(["a red circle", ""]) == ["my-concept seen as a red circle", "my-concept seen as "]
