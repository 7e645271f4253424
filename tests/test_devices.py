import pytest
import torch

from sdlab import devices
from sdlab.errors import InputError


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
