"""Three engine features as a user reaches them: a schedule type (`schedule_type`, `--schedule`), seamless
tiling (`tiling`, `--tiling`) and a VAE file in place of the model's own (`sdlab.load(vae=...)`, `--vae`).

Each reaches every pipeline (txt2img, img2img's part-way schedule, the hires pass), the command line,
and the image's parameters in the web UI's words: `Sampler: DPM++ 2M, Schedule type: Karras`,
`Tiling: True`, and `VAE hash`, `VAE` right after `Model`.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import sdlab
from sdlab import hashes
from sdlab.cli import main
from sdlab.cli.common import SCHEDULE_NAMES
from sdlab.errors import CheckpointError, InputError
from sdlab.infotext import parse_infotext
from sdlab.models.seamless import seamless
from sdlab.pipelines.hires import second_pass_steps
from sdlab.pipelines.options import GenerationOptions
from sdlab.pipelines.run import vae_tiling
from sdlab.samplers import sampler_sigmas
from sdlab.schedules import list_schedules
from test_cli import TINY, assert_one_line_error, assert_one_line_pointing_at_help
from test_seamless import layers_untouched

SMALL = dict(steps=3, seed=1, width=32, height=32)


@pytest.fixture(scope="module")
def demo():
    return sdlab.load("demo")


@pytest.fixture(scope="module")
def bundled():
    return sdlab.load()


@pytest.fixture(autouse=True)
def hash_cache(tmp_path, monkeypatch):
    """VAE hashes are cached in a file of the test's own, not in ~/.cache."""
    monkeypatch.setattr(hashes, "CACHE_FILE", str(tmp_path / "cache" / "hashes.json"))


def sigmas_walked(run) -> list[float]:
    """The sigma of every step a pipeline run takes, from its step callback."""
    walked = []
    run(lambda info: walked.append(float(info["sigma"])))
    return walked


def assert_walks(walked, sigmas):
    assert walked == pytest.approx(sigmas[:-1].tolist(), rel=1e-6)


# -- schedule type ---------------------------------------------------------------------------------------


def test_the_schedule_type_is_the_one_the_sampler_walks(demo):
    schedule = demo.config.schedule
    walked = sigmas_walked(lambda step: demo.txt2img("a cat", sampler="Euler", schedule_type="exponential",
                                                     callback=step, **SMALL))
    assert_walks(walked, sampler_sigmas("Euler", schedule, 3, schedule_type="exponential"))
    assert walked != pytest.approx(sampler_sigmas("Euler", schedule, 3)[:-1].tolist(), rel=1e-6)


def test_img2img_walks_the_end_of_the_schedule_type(demo):
    image = Image.new("RGB", (32, 32), "red")
    walked = sigmas_walked(lambda step: demo.img2img("a cat", image, strength=0.5, sampler="Euler",
                                                     schedule_type="karras", callback=step, **{**SMALL, "steps": 8}))
    assert_walks(walked, sampler_sigmas("Euler", demo.config.schedule, 8, schedule_type="karras")[4:])


def test_the_hires_pass_walks_the_schedule_type_too(demo):
    passes = {1: [], 2: []}
    demo.hires_fix("a cat", sampler="Euler", schedule_type="beta", hires_scale=2, hires_strength=0.5,
                   callback=lambda info: passes[info["pass"]].append(float(info["sigma"])), **SMALL)
    schedule = demo.config.schedule
    assert_walks(passes[1], sampler_sigmas("Euler", schedule, 3, schedule_type="beta"))
    total, strength = second_pass_steps(3, 0.5, schedule.num_train_timesteps)
    assert_walks(passes[2], sampler_sigmas("Euler", schedule, total, schedule_type="beta")[total - int(total * strength):])


def test_a_legacy_name_and_a_schedule_type_make_the_same_image_and_parameters(demo):
    legacy = demo.txt2img("a cat", sampler="DPM++ 2M Karras", **SMALL)
    split = demo.txt2img("a cat", sampler="DPM++ 2M", schedule_type="Karras", **SMALL)
    assert torch.equal(legacy.latents, split.latents)
    assert legacy.infotexts == split.infotexts
    assert "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1" in split.infotexts[0]
    automatic = demo.txt2img("a cat", sampler="Euler a", **SMALL).infotexts[0]
    assert "Sampler: Euler a, Schedule type: Automatic, CFG scale" in automatic


@pytest.mark.parametrize("sampler, schedule_type, message", [
    ("Euler", "cosine", "unknown schedule type 'cosine'.*align-your-steps"),
    ("DDIM", "karras", "DDIM walks SD's own timesteps and has no Karras schedule"),
])
def test_a_schedule_type_that_cannot_run_is_refused_before_anything_runs(demo, sampler, schedule_type, message):
    calls = []
    with pytest.raises(InputError, match=message):
        demo.txt2img("a cat", sampler=sampler, schedule_type=schedule_type, callback=calls.append, **SMALL)
    assert calls == []


# -- seamless tiling ---------------------------------------------------------------------------------------


def test_tiling_draws_a_torus_with_the_bundled_model_and_writes_tiling_true(bundled):
    """The option is the seamless context around the whole run: the same image, rolled noise gives the
    rolled image (no column is an edge), and the networks are left as they were."""
    f = bundled.config.vae.downsample_factor
    shift = 2 ** (len(bundled.config.unet.channel_mult) - 1)  # latent pixels: the UNet's downsampling
    noise = torch.randn(1, 4, 64 // f, 64 // f, generator=torch.Generator().manual_seed(0))
    options = dict(steps=12, sampler="Euler", width=64, height=64, seed=0)

    def generate(latents, **extra):
        return bundled.txt2img("a large red circle on the left", latents=latents, **options, **extra)

    tiled, rolled = generate(noise, tiling=True), generate(noise.roll(shift, -1), tiling=True)
    assert layers_untouched(bundled.unet, bundled.vae)
    with seamless(bundled.unet, bundled.vae):
        by_hand = generate(noise)
    plain = generate(noise)
    assert torch.equal(tiled.latents, by_hand.latents)
    assert not torch.equal(tiled.latents, plain.latents)
    image, image_rolled = (np.asarray(r.images[0], dtype=np.float32) for r in (tiled, rolled))
    assert np.abs(image_rolled - np.roll(image, f * shift, axis=1)).max() <= 1  # uint8 rounding

    assert parse_infotext(tiled.infotexts[0])["Tiling"] == "True"
    assert "Tiling" not in parse_infotext(plain.infotexts[0])


def test_tiling_runs_the_vae_whole_and_refuses_the_tiled_vae(demo):
    assert vae_tiling(GenerationOptions(tiling=True)) is False
    assert vae_tiling(GenerationOptions()) is None
    assert vae_tiling(GenerationOptions(tiled_vae=True)) is True
    with pytest.raises(InputError, match="needs the whole VAE: leave out tiled_vae"):
        demo.txt2img("a cat", tiling=True, tiled_vae=True, **SMALL)
    with pytest.raises(InputError, match="needs the whole VAE"):
        demo.hires_fix("a cat", tiling=True, tiled_vae=True, hires_scale=2, **SMALL)
    assert layers_untouched(demo.unet, demo.vae)


def test_img2img_encodes_and_repaints_seamlessly(demo):
    """An init image is encoded inside the seamless run too: rolling it rolls the result's latents."""
    pixels = np.asarray(Image.effect_noise((64, 64), 60).convert("RGB"))
    options = dict(steps=4, seed=2, sampler="Euler", strength=0.5, tiling=True, noise="a1111-cpu")
    shift = 8 * 2 ** (len(demo.config.unet.channel_mult) - 1)  # pixels: the VAE's and UNet's downsampling
    same_noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    results = [demo.img2img("a cat", Image.fromarray(np.roll(pixels, roll, axis=1)), latents=same_noise.roll(r, -1),
                            **options) for roll, r in ((0, 0), (shift, shift // 8))]
    assert (results[1].latents - results[0].latents.roll(shift // 8, -1)).abs().max() < 1e-3


# -- VAE file ------------------------------------------------------------------------------------------------


def brighter_vae_file(pipe, path, offset: float = 0.1):
    """The model's VAE saved as a VAE file (original keys) whose decoder adds `offset` to every pixel in
    [-1, 1]: its last conv's bias moved, so the image is offset * 127.5 levels brighter where unclipped."""
    state = {key: value.float().clone().contiguous() for key, value in pipe.vae.state_dict().items()}
    state["decoder.conv_out.bias"] += offset
    save_file(state, str(path))
    return path


def test_a_vae_file_decodes_the_same_latents_into_its_own_image(bundled, tmp_path):
    path = brighter_vae_file(bundled, tmp_path / "brighter-vae.safetensors")
    with_file = sdlab.load(vae=path)
    assert with_file.vae_file.name == "brighter-vae.safetensors"
    options = dict(steps=4, seed=5, sampler="Euler", width=64, height=64)
    own = bundled.txt2img("a blue square", **options)
    other = with_file.txt2img("a blue square", **options)
    assert torch.equal(own.latents, other.latents)
    before, after = (np.asarray(r.images[0], dtype=np.float32) for r in (own, other))
    unclipped = (before > 20) & (before < 220)
    assert unclipped.mean() > 0.5
    assert np.abs(after - before - 12.75)[unclipped].max() <= 1.0

    fields = parse_infotext(other.infotexts[0])
    names = list(fields)
    assert names[names.index("Model") + 1: names.index("Model") + 3] == ["VAE hash", "VAE"]
    assert fields["VAE"] == "brighter-vae.safetensors"
    assert fields["VAE hash"] == hashes.short_hash(path)
    assert "VAE" not in parse_infotext(own.infotexts[0])


def test_the_demo_model_takes_a_vae_file_too(demo, tmp_path):
    path = brighter_vae_file(demo, tmp_path / "demo-vae.safetensors", offset=0.5)
    with_file = sdlab.load("demo", vae=path)
    assert torch.equal(with_file.vae.decoder.conv_out.bias, demo.vae.decoder.conv_out.bias + 0.5)
    assert "VAE: demo-vae.safetensors" in with_file.txt2img("a cat", **SMALL).infotexts[0]


def test_a_file_that_is_not_a_vae_is_refused(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, str(path))
    with pytest.raises(CheckpointError, match="is not a VAE"):
        sdlab.load("demo", vae=path)


# -- the command line ----------------------------------------------------------------------------------------


def parameters(path) -> dict:
    with Image.open(path) as image:
        return parse_infotext(image.text["parameters"])


def test_the_help_lists_every_schedule_type():
    assert SCHEDULE_NAMES == tuple(key for key, _ in list_schedules())


def test_schedule_and_tiling_reach_the_image_written(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", *TINY, "--seed", "4", "--sampler", "DPM++ 2M", "--schedule", "Karras",
                 "--tiling", "-o", str(out)]) == 0
    fields = parameters(out)
    assert (fields["Sampler"], fields["Schedule type"], fields["Tiling"]) == ("DPM++ 2M", "Karras", "True")

    edited = tmp_path / "edited.png"
    assert main(["img2img", "a cat", "--init", str(out), *TINY, "--schedule", "exponential", "-o", str(edited)]) == 0
    fields = parameters(edited)
    assert fields["Schedule type"] == "Exponential" and "Tiling" not in fields


def test_the_vae_file_reaches_the_image_written(demo, tmp_path, capsys):
    vae = brighter_vae_file(demo, tmp_path / "vae.safetensors")
    out = tmp_path / "x.png"
    assert main(["generate", "a cat", *TINY, "--vae", str(vae), "-o", str(out)]) == 0
    fields = parameters(out)
    assert fields["VAE"] == "vae.safetensors" and fields["VAE hash"] == hashes.short_hash(vae)


@pytest.mark.parametrize("args, fragment", [
    (["generate", "x", "--schedule", "cosine"], "argument --schedule: unknown schedule type 'cosine'"),
    (["inpaint", "x", "--init", "a.png", "--mask", "m.png", "--vae", "{tmp}/nope.safetensors"],
     "argument --vae: VAE file not found: {tmp}/nope.safetensors"),
])
def test_a_bad_schedule_or_a_missing_vae_file_is_one_line(capsys, tmp_path, args, fragment):
    args = [a.format(tmp=tmp_path) for a in args]
    assert_one_line_pointing_at_help(capsys, lambda: main(args), fragment.format(tmp=tmp_path), f"sdlab {args[0]}")


def test_a_bad_vae_file_and_tiling_with_the_tiled_vae_are_one_line(tmp_path, capsys):
    text = tmp_path / "notes.safetensors"
    text.write_text("not a VAE")
    out = str(tmp_path / "x.png")
    code = main(["generate", "a cat", *TINY, "--vae", str(text), "-o", out])
    assert_one_line_error(code, capsys.readouterr().err, "notes.safetensors")
    code = main(["generate", "a cat", *TINY, "--tiling", "--tiled-vae", "-o", out])
    assert_one_line_error(code, capsys.readouterr().err, "leave out tiled_vae (--tiled-vae)")


def test_samplers_lists_the_schedule_types(capsys):
    assert main(["samplers"]) == 0
    stdout = capsys.readouterr().out
    assert "schedule types" in stdout
    assert all(key in stdout and label in stdout for key, label in list_schedules())
