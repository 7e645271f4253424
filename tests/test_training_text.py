"""`sdlab train text`: CLIP's symmetric contrastive loss over sdlab's text encoder and a small image
tower, a learned temperature, and a saved file whose text encoder the pipelines load."""

import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdlab.checkpoint.load import load_components
from sdlab.errors import ConfigError
from sdlab.tokenizer import get_tokenizer
from sdlab.training import text as text_trainer
from sdlab.training.data import Batch
from sdlab.training.image_tower import ImageTower
from test_training_loop import one_thread, run, shapes_folder, tiny_config, trained_state  # noqa: F401

CAPTIONS = ["a large red circle on the left", "a blue square above a yellow triangle",
            "a small green triangle at the top", "a large yellow circle in the center"]


def a_batch(images: torch.Tensor, captions: list[str]) -> Batch:
    size = images.shape[0]
    return Batch(images, captions, 0, 0, size, 0, size, 0, 1, torch.Generator().manual_seed(0))


def test_the_towers_learn_to_match_a_fixed_batch_of_pairs(tmp_path):
    config = tiny_config("text", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=30, batch_size=4)
    logs = run(config)
    assert logs[0]["loss"] > 0.5 and sum(entry["loss"] for entry in logs[-5:]) / 5 < 0.1
    assert logs[-1]["accuracy"] == 1.0


def test_the_loss_is_clips_symmetric_cross_entropy_over_the_similarity_matrix(tmp_path):
    torch.manual_seed(0)
    trainer = text_trainer.build(tiny_config("text", tmp_path), torch.device("cpu"))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, logs = trainer.loss(a_batch(images, CAPTIONS))

    model = trainer.model
    ids = get_tokenizer().tokenize(CAPTIONS, pad_token_id=49407)
    image_features = F.normalize(model.image_encoder(images), dim=-1)
    text_features = F.normalize(model.text_encoder.pooled(ids), dim=-1)
    logits = math.exp(math.log(1 / 0.07)) * image_features @ text_features.T  # (images, captions)
    labels = torch.arange(4)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert logs["scale"].item() == pytest.approx(1 / 0.07)


def test_the_temperature_starts_at_clips_value_and_is_capped_at_100(tmp_path):
    torch.manual_seed(0)
    model = text_trainer.build(tiny_config("text", tmp_path), torch.device("cpu")).model
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(300))
    scale = model.scale()
    assert scale.item() == pytest.approx(100.0)
    scale.backward()
    assert model.logit_scale.grad.item() == 0.0  # past the cap the temperature stops moving


def test_the_text_encoder_gets_a_projection_for_the_joint_space(tmp_path, capsys):
    trainer = text_trainer.build(tiny_config("text", tmp_path), torch.device("cpu"))
    assert trainer.model_config.text.projection_dim == 64  # unset in the recipe: the width
    assert "projection_dim unset" in capsys.readouterr().err
    assert trainer.model.text_encoder.pooled(get_tokenizer().tokenize(CAPTIONS[:2])).shape == (2, 64)


def test_the_image_tower_keeps_positions_and_checks_the_resolution():
    tower = ImageTower(32, projection_dim=16, channels=8, stages=3)
    assert tower(torch.zeros(5, 3, 32, 32)).shape == (5, 16)
    with pytest.raises(ConfigError, match="multiple of 16"):
        ImageTower(40, projection_dim=16, stages=4)


def test_the_saved_file_holds_the_trained_text_encoder_and_a_head_file_the_rest(tmp_path):
    config = tiny_config("text", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=2, batch_size=4)
    run(config)
    loaded = load_components(tmp_path / "run" / "last.safetensors")
    trained = trained_state(tmp_path / "run")
    weights = loaded.text_encoder.state_dict()
    assert all(torch.equal(weights[k], trained[f"clip.text_encoder.{k}"]) for k in weights)
    # SD1's text-encoder layout has no projection: it travels in the head file with the image tower
    assert loaded.config.text.projection_dim is None
    head = load_file(tmp_path / "run" / "image_tower.safetensors")
    assert torch.equal(head["text_projection.weight"], trained["clip.text_encoder.text_projection.weight"])
    assert torch.equal(head["logit_scale"], trained["clip.logit_scale"])
    assert any(key.startswith("image_encoder.") for key in head)


def test_an_openclip_text_encoder_keeps_its_projection_and_temperature_in_the_sd2_layout(tmp_path):
    open_clip = {"kind": "open_clip", "activation": "gelu", "layer": "penultimate", "pad_token_id": 0,
                 "projection_dim": 32}
    config = tiny_config("text", tmp_path / "run", data=str(shapes_folder(tmp_path / "data")), steps=2, batch_size=4,
                         **{"model.text": {"width": 64, "layers": 2, "heads": 2, **open_clip}})
    run(config)
    loaded = load_components(tmp_path / "run" / "last.safetensors")
    trained = trained_state(tmp_path / "run")
    assert loaded.config.text.kind == "open_clip" and loaded.config.text.projection_dim == 32
    assert torch.equal(loaded.text_encoder.text_projection, trained["clip.text_encoder.text_projection"])
    assert torch.equal(loaded.text_encoder.logit_scale, trained["clip.logit_scale"])
    assert loaded.text_encoder.logit_scale.item() != pytest.approx(math.log(1 / 0.07))  # it was trained
