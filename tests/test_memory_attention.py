"""Large sizes: the fused attention never holds the (tokens x tokens) matrix, a hooked attention does and is
counted before the run, and the VAE goes to tiles by itself when the free memory is short."""

import subprocess
import sys
import textwrap

import pytest
import torch

import sdlab
from sdlab import devices, memory
from sdlab.config import SD1
from sdlab.errors import TooLargeError
from sdlab.memory import check_generation_fits, generation_memory, hooked_attention
from sdlab.models import tiling
from sdlab.models.attention import attention_hooks

MiB = 2**20


def test_fused_attention_on_the_cpu_never_holds_the_score_matrix():
    """6,144 tokens, 2 heads: the (1, 2, 6144, 6144) fp32 scores would be 288 MiB; the flash kernel holds
    a few blocks. Measured in a fresh process, as the growth of its peak RSS: 2 MiB."""
    script = textwrap.dedent("""
        import torch
        from sdlab.models.attention import attention

        def peak_rss():
            return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

        tokens, heads = 6144, 2
        q, k, v = (torch.randn(1, tokens, heads * 32) for _ in range(3))
        attention(q[:, :64], k[:, :64], v[:, :64], heads)  # the kernel's own set-up, before measuring
        before = peak_rss()
        attention(q, k, v, heads)
        print(peak_rss() - before)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[-1]) < 32 * MiB  # vs 288 MiB for the scores alone


def test_a_hooked_self_attention_counts_its_probabilities():
    plain = generation_memory(SD1, 512, 512)
    hooked = generation_memory(SD1, 512, 512, hooked=frozenset({"self"}))
    scores = 3 * 2 * 8 * 4096 * 4096 * 4  # three copies of (CFG batch 2, 8 heads, 64x64 latent pixels squared) fp32
    assert hooked.sampling - plain.sampling == pytest.approx(memory.ALLOCATOR_SLACK * scores, rel=0.01)
    cross = generation_memory(SD1, 512, 512, hooked=frozenset({"cross"}))
    text_scores = 3 * 2 * 8 * 4096 * 77 * 4  # 77 text tokens: 60 MB beside the self-attention's 3.2 GB
    assert cross.sampling - plain.sampling == pytest.approx(memory.ALLOCATOR_SLACK * text_scores, rel=0.01)


def test_a_generation_with_self_attention_maps_that_cannot_fit_is_refused(monkeypatch):
    needed = generation_memory(SD1, 768, 768).work
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: needed + MiB)
    check_generation_fits(SD1, 768, 768, 1, torch.device("cpu"), torch.float32, weights_loaded=True)
    with pytest.raises(TooLargeError, match="self-attention maps"):
        check_generation_fits(SD1, 768, 768, 1, torch.device("cpu"), torch.float32, weights_loaded=True,
                              hooked=frozenset({"self"}))


def test_the_pipeline_sees_the_hooks_set_on_its_unet(monkeypatch):
    pipe = sdlab.load("demo")
    assert hooked_attention(pipe.unet) == frozenset()
    with attention_hooks(pipe.unet, lambda site, p: None, self_attention=True):
        assert hooked_attention(pipe.unet) == {"self", "cross"}
        plain = generation_memory(pipe.config, 768, 768).work  # refused before sampling: the size costs nothing
        assert generation_memory(pipe.config, 768, 768, hooked=frozenset({"self"})).work > plain
        monkeypatch.setattr(memory, "available_memory_bytes", lambda device: plain + 1)
        with pytest.raises(TooLargeError):
            pipe.txt2img("a red circle", steps=1, width=768, height=768)
    with attention_hooks(pipe.unet, lambda site, p: None):
        assert hooked_attention(pipe.unet) == {"cross"}


def test_the_vae_decodes_in_tiles_when_the_free_memory_is_short(monkeypatch):
    pipe = sdlab.load("demo")
    tiled_calls = []
    decode_tiled = tiling.decode_tiled
    monkeypatch.setattr(tiling, "decode_tiled", lambda *a, **k: tiled_calls.append(1) or decode_tiled(*a, **k))
    pipe.txt2img("a red circle", steps=1, seed=1, width=64, height=64)
    assert not tiled_calls  # plenty free: the whole image at once
    monkeypatch.setattr(memory, "available_memory_bytes", lambda device: None)  # no refusal by the estimate
    monkeypatch.setattr(devices, "available_memory_bytes", lambda device: 1000)  # an untiled decode cannot fit
    pipe.txt2img("a red circle", steps=1, seed=1, width=64, height=64)
    assert tiled_calls
