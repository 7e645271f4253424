"""The web UI's API (/sdapi/v1) served by sdlab: requests as its clients send them, answers as they
read them, and every refusal a 4xx with a message, never a 500.

Generation runs the bundled model at 64 px for a few steps; one app serves the whole module.
"""

import json
import os
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import sdlab
from sdlab import bundled
from sdlab.server.app import create_app
from sdlab.server.settings import ServerSettings
from server_fixtures import from_base64, to_base64

SMALL = {"width": 64, "height": 64, "steps": 4}


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(ServerSettings())) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def pipe():
    return sdlab.load()


def txt2img(client, **fields):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", **SMALL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response, status: int, *words: str):
    """A web UI error answer: the status, the four fields, and a message naming what went wrong."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    for word in words:
        assert word in body["detail"], body["detail"]
    return body


# -- generation ---------------------------------------------------------------------------------------


def test_txt2img_png_carries_the_parameters_the_info_reports(client):
    answer = txt2img(client, seed=7, sampler_name="Euler", batch_size=2)
    info = json.loads(answer["info"])  # a JSON *string*, as in the web UI
    assert len(answer["images"]) == 2 and len(info["infotexts"]) == 2
    assert info["seed"] == 7 and info["all_seeds"] == [7, 8]  # per-image seeds, as the web UI's
    assert info["sampler_name"] == "Euler"
    assert (info["width"], info["height"], info["steps"], info["batch_size"]) == (64, 64, 4, 2)
    assert info["sd_model_name"] == "sdlab-shapes" and info["prompt"] == "a red circle"
    for encoded, infotext in zip(answer["images"], info["infotexts"]):
        image = from_base64(encoded)
        assert image.format == "PNG" and image.size == (64, 64)
        assert image.info["parameters"] == infotext
    assert "Seed: 7" in info["infotexts"][0] and "Sampler: Euler" in info["infotexts"][0]
    assert answer["parameters"]["prompt"] == "a red circle"


def test_same_seed_gives_the_python_api_pixels(client, pipe):
    answer = txt2img(client, seed=11, sampler_name="DPM++ 2M", cfg_scale=5, negative_prompt="blue")
    served = np.array(from_base64(answer["images"][0]).convert("RGB"))
    local = pipe.txt2img("a red circle", "blue", steps=4, seed=11, width=64, height=64, sampler="DPM++ 2M",
                         guidance_scale=5.0).images[0]
    assert np.array_equal(served, np.array(local))


def test_seed_minus_one_is_random_and_reported(client):
    info = json.loads(txt2img(client, seed=-1)["info"])
    assert 0 <= info["seed"] < 2**32 and f"Seed: {info['seed']}" in info["infotexts"][0]


def test_sampler_index_and_scheduler(client):
    info = json.loads(txt2img(client, sampler_index="DPM++ 2M", scheduler="karras", seed=3)["info"])
    assert "DPM++ 2M" in info["sampler_name"]
    assert "Karras" in info["infotexts"][0]


def test_scheduler_is_the_schedule_type_and_tiling_is_passed_on(client, pipe):
    info = json.loads(txt2img(client, sampler_name="Euler", scheduler="karras", tiling=True, seed=5)["info"])
    assert info["sampler_name"] == "Euler"
    assert "Schedule type: Karras" in info["infotexts"][0] and "Tiling: True" in info["infotexts"][0]
    answer = txt2img(client, sampler_name="Euler", scheduler="karras", tiling=True, seed=5)
    expected = pipe.txt2img("a red circle", sampler="Euler", schedule_type="karras", tiling=True, seed=5,
                            **{"width": 64, "height": 64, "steps": 4}).images[0]
    assert np.array_equal(np.asarray(from_base64(answer["images"][0]).convert("RGB")), np.asarray(expected))


def test_n_iter_runs_batches_with_the_next_seeds(client):
    info = json.loads(txt2img(client, seed=100, n_iter=2, batch_size=1)["info"])
    assert info["all_seeds"] == [100, 101] and len(info["infotexts"]) == 2


def test_hires_fix(client):
    info = json.loads(txt2img(client, enable_hr=True, hr_scale=1.5, hr_second_pass_steps=2,
                              denoising_strength=0.5, hr_upscaler="Latent", width=32, height=32, seed=1)["info"])
    assert (info["width"], info["height"]) == (48, 48)
    assert "Hires upscale: 1.5" in info["infotexts"][0]


def test_unknown_fields_are_ignored_and_send_images_false(client):
    answer = txt2img(client, send_images=False, alwayson_scripts={"ControlNet": {"args": []}}, no_such_field=1)
    assert answer["images"] == []


def test_infotext_fills_the_fields_left_out(client):
    infotext = "a blue square\nSteps: 3, Sampler: Euler, CFG scale: 4, Seed: 42, Size: 32x32"
    response = client.post("/sdapi/v1/txt2img", json={"infotext": infotext, "steps": 2})
    info = json.loads(response.json()["info"])
    assert (info["prompt"], info["seed"], info["steps"], info["cfg_scale"]) == ("a blue square", 42, 2, 4.0)
    assert (info["width"], info["height"]) == (32, 32)


def test_save_images_writes_numbered_files(tmp_path):
    with TestClient(create_app(ServerSettings(outputs_dir=str(tmp_path)))) as local:
        txt2img(local, save_images=True, seed=5)
    saved = list(tmp_path.glob("txt2img/*/*.png"))
    assert len(saved) == 1 and saved[0].name.endswith("-5.png")
    assert "Seed: 5" in Image.open(saved[0]).info["parameters"]


def test_img2img_keeps_the_size_and_inpaint_keeps_what_is_not_masked(client):
    init = Image.new("RGB", (64, 64), (20, 200, 40))
    answer = client.post("/sdapi/v1/img2img", json={
        "prompt": "a red circle", "init_images": [to_base64(init, data_url=True)], "denoising_strength": 0.6,
        **SMALL})
    assert answer.status_code == 200, answer.text
    assert from_base64(answer.json()["images"][0]).size == (64, 64)
    assert answer.json()["parameters"]["init_images"] is None

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 24, 64))  # repaint the left part only
    answer = client.post("/sdapi/v1/img2img", json={
        "prompt": "a red circle", "init_images": [to_base64(init)], "mask": to_base64(mask), "mask_blur": 0,
        "inpaint_full_res": False, "inpainting_fill": 1, "denoising_strength": 1.0, "seed": 2, **SMALL})
    assert answer.status_code == 200, answer.text
    result = np.array(from_base64(answer.json()["images"][0]).convert("RGB"))
    assert np.array_equal(result[:, 32:], np.array(init)[:, 32:])  # far from the mask: untouched
    assert not np.array_equal(result[:, :16], np.array(init)[:, :16])  # inside it: repainted
    assert "Mask blur: 0" in json.loads(answer.json()["info"])["infotexts"][0]


def test_extra_single_image_enlarges(client):
    image = Image.new("RGB", (16, 16), (200, 30, 30))
    answer = client.post("/sdapi/v1/extra-single-image", json={"image": to_base64(image), "upscaler_1": "Lanczos",
                                                               "upscaling_resize": 2})
    assert answer.status_code == 200, answer.text
    assert from_base64(answer.json()["image"]).size == (32, 32)
    if os.path.isfile(bundled.BUNDLED_UPSCALER):
        answer = client.post("/sdapi/v1/extra-single-image", json={"image": to_base64(image), "upscaler_1": "SD x4",
                                                                   "upscaling_resize": 4})
        assert answer.status_code == 200, answer.text
        assert from_base64(answer.json()["image"]).size == (64, 64)


def test_png_info_reads_the_parameters(client):
    answer = txt2img(client, seed=9)
    info = client.post("/sdapi/v1/png-info", json={"image": "data:image/png;base64," + answer["images"][0]}).json()
    assert info["info"] == json.loads(answer["info"])["infotexts"][0]
    assert info["parameters"]["Seed"] == "9" and info["parameters"]["Size-1"] == "64"


# -- the listing routes clients call at start-up --------------------------------------------------------


def test_listings_have_the_web_uis_fields(client):
    models = client.get("/sdapi/v1/sd-models").json()
    assert {"title", "model_name", "hash", "sha256", "filename", "config"} <= set(models[0])
    assert models[0]["title"].startswith("sdlab-shapes.safetensors [")
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_a", "euler_ancestral"], "options": {}} in samplers
    schedulers = {s["name"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["karras"] == {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0,
                                    "need_inner_model": False}
    assert schedulers["sgm_uniform"]["aliases"] and schedulers["automatic"]["label"] == "Automatic"
    assert {"name": "Latent"} in client.get("/sdapi/v1/latent-upscale-modes").json()
    assert "Lanczos" in [u["name"] for u in client.get("/sdapi/v1/upscalers").json()]
    for route in ("hypernetworks", "face-restorers", "realesrgan-models", "loras", "sd-vae", "script-info"):
        assert client.get(f"/sdapi/v1/{route}").json() == [], route
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    assert client.get("/sdapi/v1/embeddings").json() == {"loaded": {}, "skipped": {}}
    assert client.get("/sdapi/v1/memory").json()["ram"]["total"] > 0
    flags = client.get("/sdapi/v1/cmd-flags").json()
    assert flags["api_auth"] is None and flags["lowvram"] is False
    assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200


def test_progress_when_idle(client):
    progress = client.get("/sdapi/v1/progress").json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0 and progress["current_image"] is None


def test_options_round_trip(client):
    assert client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "some_extension_setting": [1, 2]}
                       ).status_code == 200
    options = client.get("/sdapi/v1/options").json()
    assert options["CLIP_stop_at_last_layers"] == 2 and options["some_extension_setting"] == [1, 2]
    info = json.loads(txt2img(client)["info"])
    assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1})
    assert_error(client.post("/sdapi/v1/options", json={"samples_format": "tiff"}), 400, "samples_format")


def test_options_switch_the_model_by_name(tmp_path):
    for name in ("first.safetensors", "second.safetensors"):
        shutil.copy(bundled.BUNDLED_MODEL, tmp_path / name)
    with TestClient(create_app(ServerSettings(models_dir=str(tmp_path), model="first.safetensors"))) as local:
        names = [m["model_name"] for m in local.get("/sdapi/v1/sd-models").json()]
        assert {"first", "second"} <= set(names)
        assert local.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("first.safetensors")
        assert json.loads(txt2img(local)["info"])["sd_model_name"] == "first"
        assert local.post("/sdapi/v1/options", json={"sd_model_checkpoint": "second.safetensors"}).status_code == 200
        assert local.get("/sdapi/v1/options").json()["sd_model_checkpoint"].startswith("second.safetensors")
        assert json.loads(txt2img(local)["info"])["sd_model_name"] == "second"
        # a model for one request, then back to the current one
        info = json.loads(txt2img(local, override_settings={"sd_model_checkpoint": "first"})["info"])
        assert info["sd_model_name"] == "first"
        assert json.loads(txt2img(local)["info"])["sd_model_name"] == "second"
        models = {m["name"]: m["current"] for m in local.get("/api/v1/models").json()}
        assert models["second.safetensors"] and not models["first.safetensors"]


def shifted_vae_file(pipe, path):
    """The bundled model's VAE with its decoder's last bias moved: a VAE file that decodes visibly otherwise."""
    from safetensors.torch import save_file

    weights = {key: value.detach().clone().contiguous() for key, value in pipe.vae.state_dict().items()}
    weights["decoder.conv_out.bias"] += 0.5
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path))


def test_options_switch_the_vae(tmp_path, pipe):
    shutil.copy(bundled.BUNDLED_MODEL, tmp_path / "model.safetensors")
    shifted_vae_file(pipe, tmp_path / "VAE" / "shifted.safetensors")
    shifted_vae_file(pipe, tmp_path / "model.vae.safetensors")
    with TestClient(create_app(ServerSettings(models_dir=str(tmp_path), model="model.safetensors"))) as local:
        assert [v["model_name"] for v in local.get("/sdapi/v1/sd-vae").json()] == ["model.vae.safetensors",
                                                                                  "shifted.safetensors"]
        assert "model.vae" not in [m["model_name"] for m in local.get("/sdapi/v1/sd-models").json()]

        def picture(**fields):
            answer = txt2img(local, seed=9, **fields)
            return np.asarray(from_base64(answer["images"][0]), dtype=np.float32), json.loads(answer["info"])

        # "Automatic" takes model.vae.safetensors, the file beside the checkpoint with its name
        automatic, info = picture()
        assert info["sd_vae_name"] == "model.vae.safetensors"
        assert local.post("/sdapi/v1/options", json={"sd_vae": "None"}).status_code == 200
        own, info = picture()
        assert info["sd_vae_name"] is None and local.get("/sdapi/v1/options").json()["sd_vae"] == "None"
        assert np.abs(automatic - own).mean() > 5
        assert local.post("/sdapi/v1/options", json={"sd_vae": "shifted.safetensors"}).status_code == 200
        shifted, info = picture()
        assert info["sd_vae_name"] == "shifted.safetensors" and info["sd_vae_hash"]
        assert np.array_equal(shifted, automatic)
        assert_error(local.post("/sdapi/v1/options", json={"sd_vae": "../model.safetensors"}), 404, "not found")
        assert local.get("/sdapi/v1/options").json()["sd_vae"] == "shifted.safetensors"


# -- refusals -------------------------------------------------------------------------------------------


def test_validation_errors_are_fastapis_422(client):
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": "many"})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "steps"]


def test_user_errors_are_4xx_with_a_message(client):
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"}), 404,
                 "unknown sampler", "Euler a")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 66, "height": 64, "steps": 2}), 400,
                 "not a multiple of 4")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 4096, "height": 64}), 400,
                 "--max-size")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 10_000}), 400, "--max-steps")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "batch_size": 99}), 400, "--max-batch")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "cfg_scale": 1e9}), 400, "CFG scale")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "n_iter": 1000}), 400, "batch count")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "scheduler": "wobbly"}), 400, "schedule type")
    assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "hr_upscaler": "ESRGAN"}),
                 400, "hires upscaler")
    assert_error(client.post("/sdapi/v1/img2img", json={"prompt": "x"}), 400, "init_images")
    assert_error(client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [to_base64(Image.new("RGB", (8, 8)))],
                                                        "resize_mode": 7}), 400, "resize_mode")
    assert client.get("/sdapi/v1/no-such-route").status_code == 404


def test_odd_values_are_4xx_never_500(client):
    image = to_base64(Image.new("RGB", (16, 16)))
    odd = [
        ("/sdapi/v1/txt2img", {"prompt": "x", "steps": None}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "width": None}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_scale": 1e308, "width": 64, "height": 64}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True, "hr_resize_x": 10**9, "width": 64, "height": 64}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "styles": ["nope"]}),
        ("/sdapi/v1/txt2img", {"prompt": "x", "subseed_strength": 7, "steps": 2, "width": 64, "height": 64}),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [image], "mask": image, "mask_blur": None,
                               "mask_blur_x": None, "inpainting_fill": None}),
        ("/sdapi/v1/img2img", {"prompt": "x", "init_images": [image], "denoising_strength": 7, "steps": 2}),
        ("/sdapi/v1/extra-single-image", {"image": image, "resize_mode": 1, "upscaling_resize_w": None}),
        ("/sdapi/v1/extra-single-image", {"image": image, "upscaling_resize": 1e9}),
        ("/sdapi/v1/extra-single-image", {"image": image, "upscaler_1": "ESRGAN_4x"}),
        ("/api/v1/jobs", {"hires": {"scale": 1e308}, "width": 64, "height": 64}),
        ("/api/v1/jobs", {"kind": "inpaint", "init_image": image, "mask": image, "mask_blur": -1}),
        ("/api/v1/jobs", {"kind": "upscale", "init_image": image, "width": 64}),
        ("/api/v1/jobs", {"clip_skip": 99}),
    ]
    for route, body in odd:
        response = client.post(route, json=body)
        assert 400 <= response.status_code < 500, (route, body, response.text)
    response = client.post("/sdapi/v1/txt2img", content=b'{"prompt": "x", "cfg_scale": NaN}',
                           headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500


def test_unreadable_images_are_400(client):
    for data, words in (("not base64 at all!", "not valid base64"),
                        ("aGVsbG8gd29ybGQ=", "cannot be read as an image"),  # base64 of "hello world"
                        ("https://example.com/cat.png", "URL"),
                        ("", "empty")):
        assert_error(client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [data]}), 400, words)
        assert_error(client.post("/sdapi/v1/png-info", json={"image": data}), 400, words)
    truncated = to_base64(Image.new("RGB", (64, 64), "red"))[:60]
    assert client.post("/sdapi/v1/png-info", json={"image": truncated}).status_code == 400
    assert txt2img(client)["images"]  # and the server still serves


def test_decompression_bombs_are_refused_before_decoding(client):
    bomb = Image.new("L", (5000, 5000))  # 25 megapixels in a few kilobytes of PNG
    encoded = to_base64(bomb)
    assert len(encoded) < 200_000
    assert_error(client.post("/sdapi/v1/png-info", json={"image": encoded}), 400, "5000x5000", "limit")


def test_model_names_are_names_not_paths(client):
    for name in ("../../etc/passwd", "/etc/passwd", "..\\x.safetensors", "C:\\models\\x.ckpt"):
        assert_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": name}), 404, "refused")
        assert_error(client.post("/sdapi/v1/txt2img", json={"prompt": "x", "override_settings": {
            "sd_model_checkpoint": name}}), 404, "refused")
    assert_error(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "missing.safetensors"}), 404,
                 "not found", "sdlab-shapes.safetensors")


def test_symlinks_out_of_the_models_folder_are_not_listed(tmp_path):
    models, outside = tmp_path / "models", tmp_path / "outside"
    models.mkdir()
    outside.mkdir()
    shutil.copy(bundled.BUNDLED_MODEL, outside / "secret.safetensors")
    os.symlink(outside / "secret.safetensors", models / "link.safetensors")
    os.symlink(outside, models / "linked-folder")
    with TestClient(create_app(ServerSettings(models_dir=str(models), load_model_at_start=False))) as local:
        names = [m["title"] for m in local.get("/sdapi/v1/sd-models").json()]
        assert not any("link" in name or "secret" in name for name in names)
        assert_error(local.post("/sdapi/v1/options", json={"sd_model_checkpoint": "link.safetensors"}), 404)


def test_body_size_cap_is_413():
    with TestClient(create_app(ServerSettings(max_body_bytes=2000, load_model_at_start=False))) as local:
        response = local.post("/sdapi/v1/png-info", json={"image": "A" * 5000})
        assert response.status_code == 413 and "limit" in response.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"A" * 500

        response = local.post("/sdapi/v1/png-info", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413


# -- authentication and CORS ------------------------------------------------------------------------------


def test_api_auth_guards_every_route_and_the_page():
    settings = ServerSettings(api_auth=(("ada", "secret"), ("bob", "pw2")), load_model_at_start=False)
    with TestClient(create_app(settings)) as local:
        for route in ("/sdapi/v1/samplers", "/api/v1/samplers", "/", "/docs", "/openapi.json"):
            response = local.get(route)
            assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic"), route
        assert local.get("/sdapi/v1/samplers", auth=("ada", "wrong")).status_code == 401
        assert local.get("/sdapi/v1/samplers", headers={"Authorization": "Basic "}).status_code == 401
        assert local.get("/sdapi/v1/samplers", auth=("ada", "secret")).status_code == 200
        assert local.get("/api/v1/samplers", auth=("bob", "pw2")).status_code == 200


def test_an_empty_basic_header_is_fine_without_auth(client):
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Basic "}).status_code == 200


def test_cors_is_closed_unless_origins_are_allowed(client):
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    response = client.options("/sdapi/v1/txt2img", headers=preflight)
    assert "access-control-allow-origin" not in response.headers
    settings = ServerSettings(cors_allow_origins=("http://good.example",), load_model_at_start=False)
    with TestClient(create_app(settings)) as local:
        allowed = local.options("/sdapi/v1/txt2img", headers={**preflight, "Origin": "http://good.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://good.example"
        refused = local.options("/sdapi/v1/txt2img", headers=preflight)
        assert "access-control-allow-origin" not in refused.headers
