"""Hard negatives (`shapes.hard_negatives`): the text trainer on the shapes data, NegCLIP's mirrored captions."""

import torch
import torch.nn.functional as F

from sdlab.shapes import text as shapes_text
from sdlab.tokenizer import get_tokenizer
from test_training_loop import one_thread, tiny_config  # noqa: F401
from test_training_text import a_batch


def test_hard_negatives_add_each_relation_captions_mirror_as_a_caption_no_image_matches(tmp_path):
    captions = ["a blue square above a yellow triangle", "a large red circle on the left",
                "a green ball left of a red box", "a small green triangle at the bottom"]
    torch.manual_seed(0)
    trainer = shapes_text.build(tiny_config("text", tmp_path, **{"shapes.hard_negatives": True}), torch.device("cpu"))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    loss, _ = trainer.loss(a_batch(images, captions))

    model, tokenizer = trainer.model, get_tokenizer()
    image_features = F.normalize(model.image_encoder(images), dim=-1)
    text_features = F.normalize(model.text_encoder.pooled(tokenizer.tokenize(captions, pad_token_id=49407)), dim=-1)
    mirrors = ["a blue square below a yellow triangle", "a green ball right of a red box"]
    mirror_features = F.normalize(model.text_encoder.pooled(tokenizer.tokenize(mirrors, pad_token_id=49407)), dim=-1)
    scale = 1 / 0.07
    per_image = scale * image_features @ torch.cat([text_features, mirror_features]).T  # (4, 6): 2 mirrors only
    labels = torch.arange(4)
    expected = (F.cross_entropy(per_image, labels) + F.cross_entropy(scale * text_features @ image_features.T, labels)) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
