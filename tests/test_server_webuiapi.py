"""The web UI's own Python client, `webuiapi`, against `sdlab serve` on loopback, used as its README
shows: nothing in the client is changed or patched."""

import threading

import numpy as np
import pytest
from PIL import Image

from sdlab.server.settings import ServerSettings
from server_fixtures import LiveServer, wait_until

import webuiapi


@pytest.fixture(scope="module")
def api():
    with LiveServer(ServerSettings()) as live:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=live.port, sampler="Euler a", steps=4)


def test_txt2img(api):
    result = api.txt2img(prompt="a red circle", seed=3, width=64, height=64, cfg_scale=7)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 3 and result.info["sampler_name"] == "Euler a"
    assert "Seed: 3" in result.info["infotexts"][0]


def test_img2img_and_inpaint(api):
    init = Image.new("RGB", (64, 64), (30, 160, 60))
    result = api.img2img(images=[init], prompt="a red circle", denoising_strength=0.6, width=64, height=64, seed=1)
    assert result.image.size == (64, 64) and "Denoising strength: 0.6" in result.info["infotexts"][0]

    rng = np.random.default_rng(1)
    init = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 0, 64, 64))
    result = api.img2img(images=[init], mask_image=mask, prompt="a red circle", inpainting_fill=1,
                         inpaint_full_res=False, mask_blur=0, denoising_strength=1.0, width=64, height=64, seed=2)
    painted = np.array(result.image.convert("RGB"))
    assert np.array_equal(painted[:, :32], np.array(init)[:, :32])
    assert not np.array_equal(painted[:, 48:], np.array(init)[:, 48:])


def test_png_info(api):
    generated = api.txt2img(prompt="a blue square", seed=8, width=64, height=64).image
    info = api.png_info(generated)
    assert "a blue square" in info.info and info.parameters["Seed"] == "8"


def test_listings(api):
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    assert api.util_get_current_model().startswith("sdlab-shapes.safetensors")
    assert api.util_get_model_names()
    assert api.get_scripts() == {"txt2img": [], "img2img": []}


def test_progress_and_interrupt(api):
    results = []
    worker = threading.Thread(target=lambda: results.append(
        api.txt2img(prompt="a red circle", steps=150, width=64, height=64, seed=4)))
    worker.start()
    progress = wait_until(lambda: (lambda p: p if p["state"]["sampling_step"] >= 2 else None)(api.get_progress()),
                          60, "the job to report steps")
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    api.interrupt()
    worker.join(60)
    assert results and results[0].info["interrupted"] and results[0].image.size == (64, 64)
    wait_until(lambda: api.get_progress()["state"]["job_count"] == 0, 20, "the server to be idle")
