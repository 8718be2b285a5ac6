"""Counter-based random numbers in plain PyTorch: the same stream as every kernel.

Philox4x32-10 with Triton's constants (tl.random), so a draw is a pure function of
(seed, counter). The reference backend uses these functions; the C++/CUDA kernels
(csrc/philox.h) and the Triton kernels (vdvae_fast/kernels/philox.py) implement the
identical arithmetic, which is what makes every backend sample the same z.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_UNIFORM_SCALE = 4.6566127342e-10
MAX_COUNTER = 2**32
SEED_BITS = 62


def draw_seed() -> torch.Tensor:
    """A fresh seed from torch's default CPU generator, as a 0-d int64 tensor.

    Kept as a tensor (not a Python int) so torch.compile traces it; checkpoint recomputation
    restores the CPU RNG state and therefore redraws the same seed.
    """
    return torch.randint(0, 2**SEED_BITS, (), dtype=torch.int64)


def _mulhi_lo(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64 (no overflow)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    prod_hi = a * b_hi  # < 2**48
    prod_lo = a * b_lo  # < 2**48
    high = (prod_hi + (prod_lo >> 16)) >> 16
    low = (((prod_hi & 0xFFFF) << 16) + prod_lo) & _MASK32
    return high, low


def philox(seed: int | torch.Tensor, c0: torch.Tensor, c1: torch.Tensor | int = 0) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1, 0, 0) under key (seed low word, seed high word).

    The seed may be a 0-d int64 tensor (as ops draws it), which keeps the draw traceable by torch.compile.
    """
    c0 = c0.to(torch.int64) & _MASK32
    c1 = torch.as_tensor(c1, dtype=torch.int64, device=c0.device).expand_as(c0) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mulhi_lo(c2, _ROUND_B)
        hi_a, lo_a = _mulhi_lo(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint_to_uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 words (in int64) to float32 in [0, 1), as tl.random.uint_to_uniform_float."""
    signed = torch.where(x >= 2**31, x - 2**32, x)
    signed = torch.where(signed < 0, -signed - 1, signed)
    return signed.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


def normal_uniforms(seed: int | torch.Tensor, numel: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Box-Muller inputs of logical elements 0..numel-1: (u1 clamped to >= 1e-7, u2, sine).

    Element i takes lane i % 4 of counter (i // 4, 0, 0, 0), as tl.randn4x(seed, i // 4)[i % 4]: lanes 0 and 1
    share words (out0, out1), lanes 2 and 3 words (out2, out3); even lanes take the cosine branch, odd lanes
    the sine. One Philox call thus serves four consecutive elements.
    """
    groups = torch.arange((numel + 3) // 4, device=device, dtype=torch.int64)
    v0, v1, v2, v3 = philox(seed, groups)
    radius_words = torch.stack([v0, v0, v2, v2], dim=-1).reshape(-1)[:numel]
    angle_words = torch.stack([v1, v1, v3, v3], dim=-1).reshape(-1)[:numel]
    u1 = torch.clamp_min(uint_to_uniform(radius_words), 1.0e-7)
    sine = (torch.arange(numel, device=device) % 2) == 1
    return u1, uint_to_uniform(angle_words), sine


def normal(seed: int | torch.Tensor, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Standard normal draws for the elements of a tensor of `shape`, by row-major (logical) index.

    Element i is tl.randn4x(seed, i // 4)[i % 4] in Triton (see normal_uniforms).
    """
    u1, u2, sine = normal_uniforms(seed, _check_counter_range(shape), device)
    angle = torch.tensor(6.283185307179586, dtype=torch.float32) * u2
    branch = torch.where(sine, torch.sin(angle), torch.cos(angle))
    return (torch.sqrt(-2.0 * torch.log(u1)) * branch).reshape(shape)


def open_uniforms(seed: int | torch.Tensor, pixel: torch.Tensor, streams: int) -> torch.Tensor:
    """Uniforms in [1e-5, 1 - 1e-5] of streams 0..streams-1 of each pixel, stacked last: dmol_sample's draws.

    Stream j is word j % 4 of counter (pixel, j // 4, 0, 0), so all four words of each Philox call are used.
    """
    groups = [torch.stack(philox(seed, pixel, group), dim=-1) for group in range((streams + 3) // 4)]
    words = torch.cat(groups, dim=-1)[..., :streams]
    scale, offset = torch.tensor(0.99998, dtype=torch.float32), torch.tensor(1.0e-5, dtype=torch.float32)
    return uint_to_uniform(words) * scale + offset


def _check_counter_range(shape: torch.Size) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    if numel >= MAX_COUNTER:
        raise ValueError(
            f"a random draw over {numel} elements exceeds the 2**32 counters of one seed; split the tensor"
        )
    return numel
