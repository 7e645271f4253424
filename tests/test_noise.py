"""Seeds reproduce each tool's noise: diffusers, the AUTOMATIC1111 web UI (CPU and NV sources), ComfyUI."""

import math

import numpy as np
import pytest
import torch

from sdlab.errors import InputError
from sdlab.noise import NOISE_MODES, cuda_randn, noise_source, philox4x32_10

# -- Philox4x32-10 known answers ------------------------------------------------------------------

# Random123 `tests/kat_vectors` (github.com/DEShawResearch/random123), the "philox4x32 10" lines:
# counter words 0-3, key words 0-1, expected output words 0-3. The third is the digits of pi.
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_matches_random123_known_answers(counter, key, expected):
    words = philox4x32_10(counter, key)
    assert words.dtype == np.uint32
    assert tuple(int(w) for w in words[:, 0]) == expected


def test_philox_is_vectorised_over_counters():
    counters = [np.array([kat[0][i] for kat in PHILOX_KAT], dtype=np.uint64) for i in range(4)]
    keys = [np.array([kat[1][i] for kat in PHILOX_KAT], dtype=np.uint64) for i in range(2)]
    words = philox4x32_10(counters, keys)
    assert words.shape == (4, 3)
    for column, (_, _, expected) in enumerate(PHILOX_KAT):
        assert tuple(int(w) for w in words[:, column]) == expected


# -- torch's CUDA randn, reproduced on the CPU ----------------------------------------------------

# Output of `torch.manual_seed(0)` then two CUDA randn calls, (8, 10) and (10,), printed by a
# libtorch program as CUDAFloatType{8,10} and CUDAFloatType{10} in Kapil Sharma's post "CUDA Mode -
# Fusing Kernels Talk" (2024-05-30, repository github.com/kapilsh/cuda-mode-lecture). The same post
# prints the first 64 from Python, where `get_inputs` in kernels/triton_fused_add_mul_relu.py calls
# `torch.manual_seed(0)` before `torch.randn((8, 8), device='cuda')`. Four decimals.
SEED0_FIRST_DRAW = [
    -0.9247, -0.4253, -2.6438, 0.1452, -0.1209, -0.5797, -0.6229, -0.3284, -1.0745, -0.3631,
    -1.6711, 2.2655, 0.3117, -0.1842, 1.2866, 1.1820, -0.1271, 1.2169, 1.4353, 1.0605,
    -0.4941, -1.4244, -0.7244, -1.2973, 0.0697, -0.0074, 1.8969, 0.6878, -0.0779, -0.8373,
    1.3506, -0.2879, -0.5965, -0.3283, -0.9086, -0.8059, -0.7407, -0.0504, 0.5435, 1.5150,
    0.0141, 0.4532, 1.6349, 0.7124, -0.1806, 1.0252, -1.4622, -0.7554, -0.1836, 0.3824,
    0.3918, -0.0830, 0.8971, -1.1123, 0.1116, 0.4863, -0.5499, -0.3231, -0.5469, 0.9049,
    0.2837, 0.1210, 0.4730, -1.0823, -0.0334, -0.9734, 0.9559, -1.1795, -1.0064, 0.1160,
    0.6852, -0.4124, -0.6738, -0.5404, 0.6898, -1.5517, 0.3805, -0.0436, 0.3597, -0.5043,
]
SEED0_SECOND_DRAW = [0.1808, -0.5523, 0.9238, -0.7350, 1.3800, 0.8676, 0.1297, -0.9406, 0.8109, 0.8821]

# First elements of single CUDA randn calls quoted in PyTorch issues (four decimals). Element i of
# any size of tensor comes from thread i's first Philox block, so even the issues' large tensors
# fix these leading values.
ISSUE_VALUES = [
    # pytorch#79496: torch.manual_seed(10); torch.randn(3, device=cuda)
    (10, (3,), [-0.1029, 1.6810, -0.2708]),
    # pytorch#143086: Generator('cuda').manual_seed(1); randn(1, 49*12*112*144), same on A100 and H100
    (1, (3,), [-0.2963, 2.6764, -0.1408]),
    # pytorch#158398: Generator('cuda').manual_seed(42); randn([1, 64, 2048])
    (42, (3,), [0.1940, 2.1614, -0.1721]),
]

# Four printed decimals put the true value within 5e-5; our normals are within 1e-6 of CUDA's.
PRINTED_ATOL = 5e-5 + 1e-6


def test_cuda_randn_matches_published_seed0_draws():
    first = cuda_randn(0, (8, 10))
    second = cuda_randn(0, (10,), draw=1)
    assert first.dtype == torch.float32 and first.shape == (8, 10)
    torch.testing.assert_close(first.flatten(), torch.tensor(SEED0_FIRST_DRAW), rtol=0, atol=PRINTED_ATOL)
    torch.testing.assert_close(second, torch.tensor(SEED0_SECOND_DRAW), rtol=0, atol=PRINTED_ATOL)


@pytest.mark.parametrize("seed, shape, expected", ISSUE_VALUES)
def test_cuda_randn_matches_values_quoted_in_pytorch_issues(seed, shape, expected):
    torch.testing.assert_close(cuda_randn(seed, shape), torch.tensor(expected), rtol=0, atol=PRINTED_ATOL)


def test_cuda_randn_places_elements_by_flat_index():
    # pytorch#62467: Generator(device='cuda:0').manual_seed(43); normal_ of (1, 3, 128, 128) on an
    # RTX A6000 printed noise[..., 0, 0] = [1.9983, 0.8704, 2.1127]: flat indices 0, 16384, 32768.
    noise = cuda_randn(43, (1, 3, 128, 128))
    torch.testing.assert_close(noise[..., 0, 0].flatten(), torch.tensor([1.9983, 0.8704, 2.1127]),
                               rtol=0, atol=PRINTED_ATOL)


def test_cuda_randn_feeds_normal_with_mean_and_std():
    # pytorch#97097: torch.manual_seed(14); torch.cuda.FloatTensor(1000, 100).normal_(5, 5 ** .5)
    # begins 2.8731, 5.2727, 2.9889 on both an RTX A4000 and an RTX 2070 Super.
    values = 5 + math.sqrt(5) * cuda_randn(14, (3,))
    torch.testing.assert_close(values, torch.tensor([2.8731, 5.2727, 2.9889]), rtol=0, atol=PRINTED_ATOL)


def test_cuda_randn_agrees_with_float32_printed_cuda_values_to_1e6():
    # The first 16 seed-0 CUDA values at float32 precision, as the `y_grad` fixture of
    # zenu-matrix/src/nn/batch_norm.rs (github.com/bokutotu/zenu). The file does not say how they
    # were made; they agree with the four-decimal CUDA output above. They bound what no CPU code
    # can close: CUDA's Box-Muller takes sin/cos from the approximate __sincosf intrinsic, so
    # exact Philox words still give normals that differ in the last few float32 bits (5.4e-7 here).
    cuda_values = torch.tensor([
        -0.9246624, -0.42534423, -2.6438458, 0.14518386, -0.1208664, -0.57972574, -0.622851,
        -0.3283869, -1.0745419, -0.36314395, -1.6710504, 2.2655048, 0.3116848, -0.1841891,
        1.2866427, 1.1819527,
    ])
    torch.testing.assert_close(cuda_randn(0, (2, 2, 2, 2)).flatten(), cuda_values, rtol=0, atol=1e-6)


def test_cuda_randn_statistics_and_independence():
    a = cuda_randn(1234, (4, 64, 64)).double()
    assert abs(a.mean().item()) < 0.02 and abs(a.std().item() - 1) < 0.02
    assert torch.equal(a, cuda_randn(1234, (4, 64, 64)).double())
    for other in (cuda_randn(1235, (4, 64, 64)), cuda_randn(1234, (4, 64, 64), draw=1)):
        correlation = torch.corrcoef(torch.stack([a.flatten(), other.double().flatten()]))[0, 1]
        assert abs(correlation.item()) < 0.02


def test_cuda_randn_uses_both_halves_of_a_64_bit_seed():
    low = cuda_randn(5, (64,))
    high = cuda_randn(5 + 2**32, (64,))
    assert not torch.allclose(low, high)


def cuda_reference_draws():
    """(seed, shape, [draw 0, draw 1, ...], atol): torch's own CUDA generator on a machine with a GPU
    (shapes that fit one pass of torch's grid on any current GPU, see sdlab.noise); elsewhere the
    published seed-0 values above, the best CUDA reference a CPU-only machine has."""
    if not torch.cuda.is_available():
        return [(0, (8, 10), [torch.tensor(SEED0_FIRST_DRAW).reshape(8, 10)], PRINTED_ATOL)]
    cases = []
    for seed, shape in [(0, (4, 64, 64)), (3_000_000_123, (4, 96, 80)), (2**40 + 7, (3, 5, 7))]:
        torch.manual_seed(seed)
        cases.append((seed, shape, [torch.randn(shape, device="cuda").cpu() for _ in range(3)], 2e-6))
    return cases


def test_cuda_randn_matches_the_cuda_generator():
    for seed, shape, draws, atol in cuda_reference_draws():
        for draw, want in enumerate(draws):
            torch.testing.assert_close(cuda_randn(seed, shape, draw=draw), want, rtol=0, atol=atol)


# -- the four tools' noise ------------------------------------------------------------------------

SHAPE = (4, 6, 5)  # (C, h, w): a tiny non-square latent


def test_diffusers_mode_is_one_cpu_generator_for_the_whole_batch():
    source = noise_source("diffusers", 1234, 3, SHAPE)
    generator = torch.Generator("cpu").manual_seed(1234)
    assert torch.equal(source.initial(), torch.randn((3, *SHAPE), generator=generator))
    for _ in range(3):  # step noise continues the same generator, one full-batch draw per step
        assert torch.equal(source.step_noise(), torch.randn((3, *SHAPE), generator=generator))


def test_a1111_cpu_mode_gives_image_i_its_own_generator_seeded_seed_plus_i():
    source = noise_source("a1111-cpu", 77, 3, SHAPE)
    generators = [torch.Generator("cpu").manual_seed(77 + i) for i in range(3)]
    assert torch.equal(source.initial(), torch.stack([torch.randn(SHAPE, generator=g) for g in generators]))
    for _ in range(2):
        expected = torch.stack([torch.randn(SHAPE, generator=g) for g in generators])
        assert torch.equal(source.step_noise(), expected)


@pytest.mark.parametrize("mode", ["a1111-cpu", "a1111-gpu"])
def test_a1111_images_do_not_depend_on_their_batch(mode):
    batch = noise_source(mode, 500, 3, SHAPE)
    alone = noise_source(mode, 502, 1, SHAPE)
    assert torch.equal(batch.initial()[2], alone.initial()[0])
    assert torch.equal(batch.step_noise()[2], alone.step_noise()[0])


def test_a1111_gpu_mode_reproduces_published_cuda_noise():
    # One image of shape (1, 8, 10) at seed 0: its initial noise is the first CUDA draw above and
    # its first step noise the second draw (element i depends only on the seed, draw and i).
    source = noise_source("a1111-gpu", 0, 1, (1, 8, 10))
    initial = source.initial().flatten()
    torch.testing.assert_close(initial, torch.tensor(SEED0_FIRST_DRAW), rtol=0, atol=PRINTED_ATOL)
    step = source.step_noise().flatten()
    torch.testing.assert_close(step[:10], torch.tensor(SEED0_SECOND_DRAW), rtol=0, atol=PRINTED_ATOL)
    # Image 1 of a batch at seed 9 is made with seed 10 (pytorch#79496).
    batch = noise_source("a1111-gpu", 9, 2, (1, 1, 3))
    image_1 = batch.initial()[1].flatten()
    torch.testing.assert_close(image_1, torch.tensor(ISSUE_VALUES[0][2]), rtol=0, atol=PRINTED_ATOL)


def test_a1111_gpu_mode_steps_are_later_draws_of_each_images_generator():
    source = noise_source("a1111-gpu", 41, 2, SHAPE)
    assert torch.equal(source.initial(), torch.stack([cuda_randn(41, SHAPE), cuda_randn(42, SHAPE)]))
    for draw in (1, 2):
        expected = torch.stack([cuda_randn(41, SHAPE, draw=draw), cuda_randn(42, SHAPE, draw=draw)])
        assert torch.equal(source.step_noise(), expected)


def test_comfy_mode_initial_is_cpu_randn_and_steps_are_cuda_randn_of_the_batch():
    source = noise_source("comfy", 2**40 + 3, 2, SHAPE)
    generator = torch.Generator("cpu").manual_seed(2**40 + 3)
    assert torch.equal(source.initial(), torch.randn((2, *SHAPE), generator=generator))
    for draw in range(3):
        assert torch.equal(source.step_noise(), cuda_randn(2**40 + 3, (2, *SHAPE), draw=draw))


@pytest.mark.parametrize("mode", NOISE_MODES)
def test_every_mode_gives_float32_cpu_batches_and_repeats_its_initial_noise(mode):
    source = noise_source(mode, 3, 2, SHAPE)
    initial = source.initial()
    assert initial.dtype == torch.float32 and initial.device.type == "cpu" and initial.shape == (2, *SHAPE)
    assert torch.equal(initial, source.initial())
    step = source.step_noise()
    assert step.dtype == torch.float32 and step.shape == (2, *SHAPE)
    assert not torch.equal(step, source.step_noise())


def test_unknown_mode_names_the_known_ones():
    with pytest.raises(InputError) as error:
        noise_source("webui", 1, 1, SHAPE)
    for mode in NOISE_MODES:
        assert mode in str(error.value)


@pytest.mark.parametrize("mode, seed, batch_size, shape", [
    ("a1111-cpu", 2**32, 1, SHAPE),  # the web UI's seeds are 32-bit ...
    ("a1111-gpu", 2**32 - 1, 2, SHAPE),  # ... including seed + i for the batch
    ("diffusers", 2**64, 1, SHAPE),
    ("comfy", -1, 1, SHAPE),
    ("diffusers", 1.5, 1, SHAPE),
    ("diffusers", 1, 0, SHAPE),
    ("diffusers", 1, 1, (4, 8)),
    ("diffusers", 1, 1, (4, 0, 8)),
])
def test_invalid_seeds_and_shapes_are_input_errors(mode, seed, batch_size, shape):
    with pytest.raises(InputError):
        noise_source(mode, seed, batch_size, shape)


def test_largest_seeds_are_accepted():
    assert noise_source("a1111-gpu", 2**32 - 2, 2, SHAPE).initial().shape == (2, *SHAPE)
    assert noise_source("diffusers", 2**64 - 1, 1, SHAPE).initial().shape == (1, *SHAPE)
