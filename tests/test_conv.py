"""models/conv.py: small CPU 3x3 convolutions as one matrix product give F.conv2d's numbers."""

import pytest
import torch
import torch.nn.functional as F

from sdlab.models import conv
from sdlab.models.conv import Conv2d, conv3x3_as_gemm, gemm_suits


@pytest.mark.parametrize("batch,channels,out_channels,side", [(1, 8, 16, 4), (2, 64, 32, 8), (3, 5, 7, 3), (2, 16, 16, 1)])
@pytest.mark.parametrize("bias", [True, False])
def test_the_matrix_product_equals_the_convolution(batch, channels, out_channels, side, bias):
    torch.manual_seed(0)
    x = torch.randn(batch, channels, side, side)
    weight = torch.randn(out_channels, channels, 3, 3) / (9 * channels) ** 0.5  # outputs of size 1
    b = torch.randn(out_channels) if bias else None
    want = F.conv2d(x, weight, b, padding=1)
    got = conv3x3_as_gemm(x, weight, b)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_non_square_maps_and_gradients_match():
    torch.manual_seed(1)
    layer = Conv2d(6, 10, 3, padding=1)
    reference = torch.nn.Conv2d(6, 10, 3, padding=1)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 4, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    assert gemm_suits(layer, x)
    out, want = layer(x), reference(x_ref)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)


def test_only_small_fp32_cpu_3x3_convolutions_take_the_product(monkeypatch):
    small, large = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 16, 16)
    assert gemm_suits(Conv2d(4, 4, 3, padding=1), small)
    assert not gemm_suits(Conv2d(4, 4, 3, padding=1), large)  # 256 positions: oneDNN's direct convolution
    assert not gemm_suits(Conv2d(4, 4, 3, padding=1), small.bfloat16())
    assert not gemm_suits(Conv2d(4, 4, 3, stride=2, padding=1), small)
    assert not gemm_suits(Conv2d(4, 4, 1), small)
    assert not gemm_suits(Conv2d(4, 4, 3, padding=1, padding_mode="circular"), small)
    monkeypatch.setattr(conv, "GEMM_MAX_POSITIONS", 256)
    assert gemm_suits(Conv2d(4, 4, 3, padding=1), large)


def test_the_layer_calls_the_product_only_where_it_suits(monkeypatch):
    calls = []
    monkeypatch.setattr(conv, "conv3x3_as_gemm", lambda *a: calls.append(a[0].shape) or F.conv2d(*a, padding=1))
    layer = Conv2d(4, 4, 3, padding=1)
    layer(torch.zeros(1, 4, 8, 8))
    layer(torch.zeros(1, 4, 32, 32))
    assert calls == [torch.Size([1, 4, 8, 8])]


def test_the_unet_keeps_its_state_dict_keys_and_uses_the_layer():
    from sdlab.bundled import DEMO
    from sdlab.models import build_unet

    unet = build_unet(DEMO.unet)
    threes = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)]
    assert threes and all(isinstance(m, Conv2d) for m in threes)
    assert "input_blocks.0.0.weight" in unet.state_dict() and "out.2.weight" in unet.state_dict()
