"""`sdlab train inpaint`: a 9-channel UNet grown from the base with zero new input weights (so it starts
as the base model), random box and stroke masks repeatable per sample, the loss falls on a fixed set,
and the saved file loads as an inpainting model the inpaint pipeline runs."""

import numpy as np
import pytest
import torch
from PIL import Image

import sdlab
from sdlab.checkpoint.load import load_components
from sdlab.training import inpaint as inpaint_trainer
from sdlab.training.config import InpaintOptions
from sdlab.training.data import Batch
from test_training_loop import one_thread, run, shapes_folder, tiny_base, tiny_config  # noqa: F401


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return str(tiny_base(tmp_path_factory.mktemp("base") / "base.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return str(shapes_folder(tmp_path_factory.mktemp("data")))


def test_the_grown_unet_starts_as_the_base_whatever_the_mask(tmp_path, base):
    trainer = inpaint_trainer.build(tiny_config("inpaint", tmp_path, base=base), torch.device("cpu"))
    original = load_components(base)
    assert trainer.model.config.in_channels == 9 and trainer.model_config.name.endswith("-inpainting")
    first = trainer.model.input_blocks[0][0].weight
    assert torch.equal(first[:, :4], original.unet.input_blocks[0][0].weight) and not first[:, 4:].any()
    with torch.no_grad():  # the zero-initialised output layer would make every prediction 0
        for unet in (trainer.model, original.unet):
            unet.out[2].weight.copy_(torch.linspace(-0.1, 0.1, unet.out[2].weight.numel()).view_as(unet.out[2].weight))
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 77, 64, generator=generator)
    concat = torch.randn(2, 5, 4, 4, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(trainer.model(latents, 500, context, concat=concat), original.unet(latents, 500, context),
                                   rtol=0, atol=0)


def test_masks_are_boxes_and_strokes_or_everything_and_repeat_per_sample():
    options = InpaintOptions(full_mask=0.25)
    masks = [inpaint_trainer.random_mask(64, np.random.default_rng([0, n, 2]), options) for n in range(200)]
    assert all(set(m.unique().tolist()) <= {0.0, 1.0} and m.shape == (1, 64, 64) for m in masks)
    full = sum(bool(m.all()) for m in masks)
    assert 30 <= full <= 70  # about a quarter
    partial = [m.mean().item() for m in masks if not m.all()]
    assert min(partial) > 0 and np.mean(partial) < 0.7
    again = inpaint_trainer.random_mask(64, np.random.default_rng([0, 7, 2]), options)
    assert torch.equal(again, masks[7])
    assert torch.equal(inpaint_trainer.random_mask((64, 64), np.random.default_rng([0, 7, 2]), options), masks[7])


def test_masks_fit_a_canvas_that_is_not_square():
    """An aspect-ratio bucket's (width, height): the mask has its shape and reaches across all of it."""
    options = InpaintOptions(full_mask=0.0)
    masks = [inpaint_trainer.random_mask((96, 32), np.random.default_rng([0, n, 2]), options) for n in range(100)]
    assert all(m.shape == (1, 32, 96) for m in masks)
    covered = torch.stack(masks).amax(0)[0]
    assert covered[:, :32].any() and covered[:, 64:].any()  # boxes and strokes over the whole width
    assert inpaint_trainer.random_mask((96, 32), np.random.default_rng(1), InpaintOptions(full_mask=1.0)).shape == (1, 32, 96)


def test_edge_masks_are_outpainting_margins_and_leave_the_other_masks_as_they_were():
    """`edge_masks`: that share of the masks is a strip along one edge, 20-50% across, on every side over
    the draws; with 0 (the default) every mask is the one drawn before the option existed."""
    edges = InpaintOptions(full_mask=0.0, edge_masks=1.0)
    masks = [inpaint_trainer.random_mask((96, 64), np.random.default_rng([0, n, 2]), edges) for n in range(80)]
    sides = set()
    for m in masks:
        columns, rows = m[0].any(0), m[0].any(1)
        if rows.all():  # a left or right strip: whole columns from one edge
            width = int(columns.sum())
            assert m[0, :, :width].all() or m[0, :, -width:].all()
            assert 0.2 * 96 - 1 <= width <= 0.5 * 96 + 1 and m.sum() == width * 64
            sides.add("left" if m[0, 0, 0] else "right")
        else:  # top or bottom: whole rows
            assert columns.all()
            depth = int(rows.sum())
            assert m[0, :depth].all() or m[0, -depth:].all()
            assert 0.2 * 64 - 1 <= depth <= 0.5 * 64 + 1 and m.sum() == depth * 96
            sides.add("top" if m[0, 0, 0] else "bottom")
    assert sides == {"left", "right", "top", "bottom"}
    mixed = InpaintOptions(full_mask=0.0, edge_masks=0.3)
    share = np.mean([_is_edge_strip(inpaint_trainer.random_mask(64, np.random.default_rng([1, n, 2]), mixed))
                     for n in range(300)])
    assert 0.2 <= share <= 0.4
    plain, zero = InpaintOptions(full_mask=0.25), InpaintOptions(full_mask=0.25, edge_masks=0.0)
    for n in range(50):
        assert torch.equal(inpaint_trainer.random_mask(64, np.random.default_rng([0, n, 2]), plain),
                           inpaint_trainer.random_mask(64, np.random.default_rng([0, n, 2]), zero))


def _is_edge_strip(mask: torch.Tensor) -> bool:
    rows, columns = mask[0].any(1), mask[0].any(0)
    box = mask[0][rows][:, columns]
    touches = bool(columns[0] or columns[-1]) if rows.all() else bool(rows[0] or rows[-1]) and bool(columns.all())
    return bool(box.all()) and (bool(rows.all()) or bool(columns.all())) and touches and not bool(mask.all())


def test_a_mask_share_outside_zero_to_one_is_refused(tmp_path, base):
    with pytest.raises(sdlab.errors.ConfigError, match="edge_masks"):
        inpaint_trainer.build(tiny_config("inpaint", tmp_path, base=base, **{"inpaint.edge_masks": 1.5}),
                              torch.device("cpu"))


def test_the_concatenated_input_is_latents_mask_then_masked_image_latents(tmp_path, base, monkeypatch):
    trainer = inpaint_trainer.build(tiny_config("inpaint", tmp_path, base=base, **{"inpaint.full_mask": 0.0}),
                                    torch.device("cpu"))
    seen = {}
    forward = trainer.model.forward
    monkeypatch.setattr(trainer.model, "forward", lambda x, t, c, **k: seen.update(k) or forward(x, t, c, **k))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    batch = Batch(images, ["a", "b"], 0, 0, 2, 0, 2, 0, 1, torch.Generator().manual_seed(1))
    trainer.loss(batch)
    masks = trainer.masks(batch)
    concat = seen["concat"]
    assert concat.shape == (2, 5, 16, 16)  # the tiny VAE halves the side
    torch.testing.assert_close(concat[:, :1], torch.nn.functional.interpolate(masks, size=(16, 16)))
    generator = torch.Generator().manual_seed(1)
    torch.randn(2, 4, 16, 16, generator=generator)  # the image latents' posterior draw comes first
    posterior = trainer.vae.encode(images * (masks < 0.5))
    expected = (posterior.mean + posterior.std * torch.randn(2, 4, 16, 16, generator=generator)) * 0.18215
    torch.testing.assert_close(concat[:, 1:], expected)


def test_the_loss_falls_and_the_file_is_an_inpainting_model(tmp_path, base, data):
    config = tiny_config("inpaint", tmp_path / "run", base=base, data=data, steps=40, batch_size=4, lr=2e-3, resolution=16,
                         validate_every=40)
    losses = [logs["loss"] for logs in run(config)]
    assert np.mean(losses[-8:]) < 0.7 * np.mean(losses[:4]), losses
    path = tmp_path / "run" / "last.safetensors"
    loaded = load_components(path)
    assert loaded.config.unet.in_channels == 9 and loaded.config.name.endswith("-inpainting")
    original = load_components(base)
    for part in ("vae", "text_encoder"):
        mine = getattr(loaded, part).state_dict()
        assert all(torch.equal(mine[k], v) for k, v in getattr(original, part).state_dict().items())
    assert (tmp_path / "run" / "validation" / "step-000040.png").exists()

    image = Image.new("RGB", (32, 32), (200, 40, 40))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    result = sdlab.load(str(path)).inpaint("a blue square", image, mask, steps=3, seed=1, width=32, height=32)
    assert np.asarray(result.images[0]).shape == (32, 32, 3)

    # an inpainting model as --base is fine-tuned as it is, not grown again
    again = inpaint_trainer.build(tiny_config("inpaint", tmp_path / "again", base=str(path)), torch.device("cpu"))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in loaded.unet.state_dict().items())
