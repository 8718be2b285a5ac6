"""Counter-based randomness inside Triton kernels: the stream of vdvae_fast/philox.py, bit for bit.

The Philox rounds are written out here (rather than calling tl.randint4x) because tl.random's
counter and key handling has changed between Triton releases; the contract fixes the arithmetic
(docs/kernel-contract.md), so every backend must reproduce it whatever Triton version is installed.
"""

import triton
import triton.language as tl

PHILOX_ROUND_A = tl.constexpr(0xD2511F53)
PHILOX_ROUND_B = tl.constexpr(0xCD9E8D57)
PHILOX_KEY_A = tl.constexpr(0x9E3779B9)
PHILOX_KEY_B = tl.constexpr(0xBB67AE85)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)


@triton.jit
def philox_key(seed):
    """Key (low word, high word) of a seed passed as a plain int kernel argument (Triton types it int32,
    uint32 or int64 by value; inside the kernel it is a scalar tensor, so .to works on every Triton version)."""
    seed = seed.to(tl.uint64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def philox(k0, k1, c0, c1, c2, c3):
    """Philox4x32-10 of uint32 counters (c0, c1, c2, c3) under key (k0, k1)."""
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(prev_c2, PHILOX_ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(prev_c0, PHILOX_ROUND_A) ^ c3 ^ k1
        c1 = prev_c2 * PHILOX_ROUND_B
        c3 = prev_c0 * PHILOX_ROUND_A
        k0 = k0 + PHILOX_KEY_A
        k1 = k1 + PHILOX_KEY_B
    return c0, c1, c2, c3


@triton.jit
def uint_to_uniform(word):
    """A uint32 word to float32 in [0, 1), as tl.random's uint_to_uniform_float (never reaches 1)."""
    signed = word.to(tl.int32, bitcast=True)
    signed = tl.where(signed < 0, ~signed, signed)
    return signed.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def cos_two_pi(u):
    """cos(2 pi u) for u in [0, 1), branch-free, within 2e-7 of the exact value.

    tl.cos carries a slow path for huge arguments (Payne-Hanek reduction, local memory on triton 3.6) that
    can never run here: folding u onto b in [0, 1/4] by the symmetries of cos leaves a Taylor polynomial in
    b**2 (truncation error 6e-9).
    """
    a = tl.abs(u - 0.5)  # cos(2 pi u) = -cos(2 pi a)
    far = a > 0.25  # cos(2 pi a) = -cos(2 pi (1/2 - a))
    b = tl.where(far, 0.5 - a, a)
    z = b * b
    p = z * 7.903536371318465 - 26.426256783374388
    p = p * z + 60.24464137187664
    p = p * z - 85.45681720669371
    p = p * z + 64.93939402266828
    p = p * z - 19.739208802178716
    p = p * z + 1.0
    return tl.where(far, p, -p)


@triton.jit
def normal(k0, k1, index):
    """tl.randn(seed, index) for uint32 indices: Box-Muller on the first two words of counter (index, 0, 0, 0)."""
    zero = index * 0
    w0, w1, _, _ = philox(k0, k1, index, zero, zero, zero)
    u1 = uint_to_uniform(w0)
    u1 = tl.where(u1 < 1.0e-7, 1.0e-7, u1)
    u2 = uint_to_uniform(w1)
    return tl.sqrt(-2.0 * tl.log(u1)) * cos_two_pi(u2)


@triton.jit
def open_uniform(k0, k1, pixel, stream):
    """Uniform in [1e-5, 1 - 1e-5] from counter (pixel, stream, 0, 0): dmol_sample's draws (finite logs).

    pixel and stream are uint32 tensors that broadcast against each other.
    """
    zero = pixel * 0 + stream * 0
    w0, _, _, _ = philox(k0, k1, pixel + zero, stream + zero, zero, zero)
    return uint_to_uniform(w0) * 0.99998 + 1.0e-5


@triton.jit
def logical_index(offset, C, H, W, CHANNELS_LAST: tl.constexpr):
    """Row-major (NCHW) index of the element at memory offset `offset`, so random draws ignore the layout."""
    if CHANNELS_LAST:
        c = offset % C
        rest = offset // C
        w = rest % W
        rest = rest // W
        h = rest % H
        b = rest // H
        return ((b * C + c) * H + h) * W + w
    else:
        return offset
