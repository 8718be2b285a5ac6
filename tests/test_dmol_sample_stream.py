"""dmol_sample's stream (version 3): stream j of pixel p is word j % 4 of Philox counter (p, j // 4), four
streams per call, checked against a Philox written here on Python integers, and the streams' independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from tests.op_cases import DEVICE
from vdvae_fast import philox, reference
from vdvae_fast.kernels.philox import open_uniforms, philox_key


def _philox_words(key: int, counter: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Philox4x32-10 (Salmon et al. 2011) on Python integers."""
    mask = 0xFFFFFFFF
    c0, c1, c2, c3 = counter
    k0, k1 = key & mask, key >> 32
    for _ in range(10):
        product_a, product_b = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (product_b >> 32) ^ c1 ^ k0, product_b & mask, (product_a >> 32) ^ c3 ^ k1, product_a & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


def _open_uniform(word: int) -> np.float32:
    """A word as tl.random.uint_to_uniform_float in float32, then squeezed into [1e-5, 1 - 1e-5]."""
    signed = word - 2**32 if word >= 2**31 else word
    signed = -signed - 1 if signed < 0 else signed
    uniform = np.float32(signed) * np.float32(4.6566127342e-10)
    return uniform * np.float32(0.99998) + np.float32(1.0e-5)


def test_python_philox_matches_the_random123_known_answer() -> None:
    assert _philox_words(0, (0, 0, 0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)


@pytest.mark.parametrize("num_mix", [1, 2, 3, 5, 10])
def test_stream_j_is_word_j_mod_4_of_counter_pixel_j_div_4(num_mix: int) -> None:
    seed = (7 << 32) + 123456789  # both key words non-zero
    pixels = torch.Size([2, 3, 4])
    uniforms = reference._open_uniforms(seed, pixels, num_mix + 3, torch.device("cpu"), "reference")
    assert uniforms.shape == (*pixels, num_mix + 3) and uniforms.dtype == torch.float32
    flat = uniforms.reshape(-1, num_mix + 3).numpy()
    for p in range(pixels.numel()):
        for j in range(num_mix + 3):
            word = _philox_words(seed, (p, j // 4, 0, 0))[j % 4]
            assert flat[p, j] == _open_uniform(word), (p, j)


def test_streams_of_a_pixel_are_uniform_and_uncorrelated() -> None:
    streams = 13  # M = 10: four Philox calls, the last word unused
    uniforms = philox.open_uniforms(2024, torch.arange(1 << 14), streams).double()
    n = uniforms.shape[0]
    torch.testing.assert_close(uniforms.mean(0), torch.full((streams,), 0.5, dtype=torch.float64), atol=0.02, rtol=0)
    torch.testing.assert_close(uniforms.var(0), torch.full((streams,), 1 / 12, dtype=torch.float64), atol=0.004, rtol=0)
    correlation = torch.corrcoef(uniforms.T) - torch.eye(streams, dtype=torch.float64)
    assert correlation.abs().max() < 5 / n**0.5  # words of one call, and of neighbouring calls, look independent
    equal = uniforms.unsqueeze(2) == uniforms.unsqueeze(1)
    equal_pairs = equal.sum(0) - torch.eye(streams, dtype=torch.int64) * n
    assert equal_pairs.max() <= 2  # a float32 collision now and then, never a repeated word


@triton.jit
def _triton_open_uniforms(out, seed, pixels, GROUPS: tl.constexpr, BLOCK: tl.constexpr):
    k0, k1 = philox_key(seed)
    pixel = tl.arange(0, BLOCK)
    keep = pixel < pixels
    for group in tl.static_range(GROUPS):
        u = open_uniforms(k0, k1, pixel.to(tl.uint32), group)
        for lane in tl.static_range(4):
            tl.store(out + pixel * 4 * GROUPS + 4 * group + lane, u[lane], mask=keep)


def test_triton_open_uniforms_equal_the_reference_bit_for_bit() -> None:
    seed, pixels, groups = (3 << 32) + 99, 50, 4
    out = torch.empty(pixels, 4 * groups, device=DEVICE)
    _triton_open_uniforms[(1,)](out, seed, pixels, GROUPS=groups, BLOCK=64)
    expected = philox.open_uniforms(seed, torch.arange(pixels, device=DEVICE), 4 * groups)
    assert torch.equal(out, expected)
