import pytest
import torch

from sdlab import devices
from sdlab.config import VAEConfig
from sdlab.errors import InputError

SD_SHAPED = VAEConfig(ch=32, ch_mult=(1, 2, 4, 4), num_res_blocks=2)  # SD's VAE at a quarter of its width


def test_cpu_default_is_fp32():
    assert devices.resolve("cpu", None) == (torch.device("cpu"), torch.float32)


def test_cpu_fp16_refused_with_advice():
    with pytest.raises(InputError, match="fp16"):
        devices.resolve("cpu", "fp16")


def test_bf16_follows_detection(monkeypatch):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(InputError, match="bf16"):
        devices.resolve("cpu", "bf16")
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: True)
    assert devices.resolve("cpu", "bf16")[1] == torch.bfloat16


def test_unknown_dtype_and_missing_cuda():
    with pytest.raises(InputError, match="unknown dtype"):
        devices.resolve("cpu", "fp8")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            devices.resolve("cuda", None)


def test_cpu_description_names_bf16_capability():
    text = devices.cpu_description()
    assert "bf16" in text and "threads" in text


# -- memory -------------------------------------------------------------------------------------------


def test_tiling_is_chosen_by_size_or_by_the_free_memory(monkeypatch):
    config, cpu = SD_SHAPED, torch.device("cpu")
    choose = lambda h, w, tiled: devices.wants_tiled_vae(config, h, w, 1, torch.float32, cpu, tiled)  # noqa: E731
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 10 * 2**30)
    assert not choose(1024, 1024, None) and choose(1024, 1032, None)  # above a megapixel
    assert choose(64, 64, True) and not choose(2048, 2048, False)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 2**20)
    assert choose(64, 128, None)  # an untiled pass would not fit: tile even a small image
    with pytest.raises(InputError, match="would need about .* GiB for 128x64 images .* use the tiled VAE"):
        choose(64, 128, False)
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: None)  # unknown (e.g. MPS): by size only
    assert not choose(1024, 1024, None)


def test_the_cpu_reports_its_free_memory():
    free = devices.available_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0


# -- the default dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "avx512f", "avx512_vnni"}])
def test_the_default_dtype_on_a_cpu_without_native_bf16_is_fp32(monkeypatch, flags):
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    assert not devices.cpu_has_native_bf16()
    assert devices.resolve("cpu", None) == (torch.device("cpu"), torch.float32)
    assert devices.resolve("cpu", "auto")[1] == torch.float32


def test_native_bf16_is_detected_but_stays_opt_in(monkeypatch):
    """bf16 is the default only where measured faster than fp32 (devices.py); until then it is asked for."""
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    assert devices.cpu_has_native_bf16()
    assert devices.resolve("cpu", None)[1] == torch.float32
    assert devices.resolve("cpu", "bf16")[1] == torch.bfloat16
