"""Low-VRAM mode: each network is on the device only while it works, and the images do not change.

On a CPU the mode has nothing to move, so where the networks live at each stage is read from an
Offloader that records its moves instead of making them (the device: cpu; the offload device: meta),
through forward hooks that look at the placement while each network runs.
"""

import numpy as np
import torch
from PIL import Image

import sdlab
from sdlab.pipelines.lowvram import Offloader, PARTS, enable_lowvram

DEVICE, AWAY = torch.device("cpu"), torch.device("meta")


class RecordingOffloader(Offloader):
    """Moves nothing: only `placement` says where each network would be."""

    def __init__(self, *args):
        super().__init__(*args)
        self.moves = []  # the devices networks were sent to, in order

    def move(self, module, device):
        self.moves.append(device)


def watched_pipeline():
    """The demo pipeline with a recording offloader, and a log of the placement seen by each network as it ran."""
    pipe = sdlab.load("demo")
    offloader = RecordingOffloader({name: getattr(pipe, name) for name in PARTS}, DEVICE, AWAY)
    offloader.install()
    seen = []
    for stage, module in (("text", pipe.text_encoder), ("unet", pipe.unet), ("encode", pipe.vae.encoder),
                          ("decode", pipe.vae.decoder)):
        module.register_forward_hook(lambda m, args, out, stage=stage: seen.append((stage, dict(offloader.placement))))
    return pipe, offloader, seen


def on_device(placement):
    return {name for name, device in placement.items() if device == DEVICE}


def test_txt2img_has_one_network_on_the_device_at_each_stage():
    pipe, offloader, seen = watched_pipeline()
    pipe.txt2img("a red circle", steps=2, seed=1, width=64, height=64)
    stages = [stage for stage, _ in seen]
    assert stages[0] == "text" and stages[-1] == "decode" and "unet" in stages
    expected = {"text": {"text_encoder"}, "unet": {"unet"}, "decode": {"vae"}}
    for stage, placement in seen:
        assert on_device(placement) == expected[stage], (stage, placement)
    assert offloader.moves.count(DEVICE) == 3  # each network brought in once: text encoder, UNet, VAE


def test_img2img_brings_the_vae_in_to_encode_and_again_to_decode():
    pipe, offloader, seen = watched_pipeline()
    init = Image.fromarray(np.full((64, 64, 3), 200, np.uint8))
    pipe.img2img("a red circle", init, strength=0.5, steps=2, seed=1)
    for stage, placement in seen:
        assert on_device(placement) == ({"vae"} if stage in ("encode", "decode") else
                                        {"text_encoder"} if stage == "text" else {"unet"}), (stage, placement)
    assert [s for s, _ in seen if s != "unet"][-1] == "decode"


def test_the_tiled_decode_brings_the_vae_in_too():
    pipe, offloader, _ = watched_pipeline()
    pipe.txt2img("a red circle", steps=1, seed=1, width=64, height=64, tiled_vae=True)
    assert offloader.active == "vae"  # the tiled decode drives the decoder's blocks, never decoder.forward


def test_on_the_cpu_the_mode_changes_nothing():
    plain = sdlab.load("demo").txt2img("a red circle", steps=2, seed=3, width=64, height=64)
    pipe = sdlab.load("demo", lowvram=True)
    assert enable_lowvram(pipe) is None  # cpu to cpu: no hooks
    low = pipe.txt2img("a red circle", steps=2, seed=3, width=64, height=64)
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(low.images[0]))



def test_the_server_loads_its_models_in_the_mode(monkeypatch):
    """`sdlab serve --lowvram` reaches every load the server makes."""
    from sdlab.cli import build_parser
    from sdlab.cli.serve import settings_from_args
    from sdlab.server.engine import Engine
    from sdlab.server.model_folder import ModelFolder

    settings = settings_from_args(build_parser("serve").parse_args(["serve", "--lowvram"]))
    assert settings.lowvram and not settings_from_args(build_parser("serve").parse_args(["serve"])).lowvram
    calls, real_load = [], sdlab.load
    monkeypatch.setattr(sdlab, "load", lambda *args, **kwargs: calls.append(kwargs) or real_load(*args, **kwargs))
    engine = Engine(settings, ModelFolder(None))
    engine._load(None)
    engine.upscaler()
    assert len(calls) == 2 and all(call["lowvram"] for call in calls)
