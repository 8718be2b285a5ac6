"""Counter-based randomness inside Triton kernels: the stream of vdvae_fast/philox.py, bit for bit.

The Philox rounds are written out here (rather than calling tl.randint4x) because tl.random's
counter and key handling has changed between Triton releases; the contract fixes the arithmetic
(docs/kernel-contract.md), so every backend must reproduce it whatever Triton version is installed.
Where four elements of one Philox group can be drawn together (normal_groups, channels_last_groups), one
call serves all four with the per-element arithmetic of normal(), so every path gives the same eps.
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
def cos_or_sin_two_pi(u, sine):
    """cos(2 pi u), or sin(2 pi u) where `sine`, for u in [0, 1), branch-free, within 2e-7 of the exact value.

    tl.cos carries a slow path for huge arguments (Payne-Hanek reduction, local memory on triton 3.6) that
    can never run here. By the symmetries of cos and sin, u folds exactly onto b in [0, 1/4] with
    cos(2 pi u) = ±cos(2 pi b) and sin(2 pi u) = ±sin(2 pi b), each then a Taylor polynomial in b**2
    (truncation error below 1e-8; the sine's is relative, so tiny sines stay accurate).
    """
    # cosine: a = |u - 1/2|, cos(2 pi u) = -cos(2 pi a); a > 1/4 folds to 1/2 - a with the sign flipped back.
    # sine: a = u - 1/2 for u >= 1/2 (sign -), else u; a > 1/4 folds to 1/2 - a with the same sine.
    upper = u >= 0.5
    a = tl.where(sine, tl.where(upper, u - 0.5, u), tl.abs(u - 0.5))
    far = a > 0.25
    b = tl.where(far, 0.5 - a, a)
    z = b * b
    c = z * 7.903536371318465 - 26.426256783374388
    c = c * z + 60.24464137187664
    c = c * z - 85.45681720669371
    c = c * z + 64.93939402266828
    c = c * z - 19.739208802178716
    c = c * z + 1.0
    s = z * 3.8199525848482803 - 15.094642576822984
    s = s * z + 42.058693944897634
    s = s * z - 76.70585975306136
    s = s * z + 81.60524927607504
    s = s * z - 41.341702240399755
    s = (s * z + 6.283185307179586) * b
    cosine = tl.where(far, c, -c)
    return tl.where(sine, tl.where(upper, -s, s), cosine)


@triton.jit
def _box_muller(radius_word, angle_word, sine):
    """One Box-Muller normal of the stream: u1 = max(U(radius_word), 1e-7), u2 = U(angle_word),
    sqrt(-2 ln u1) times cos(2 pi u2), or sin(2 pi u2) where `sine`."""
    u1 = uint_to_uniform(radius_word)
    u1 = tl.where(u1 < 1.0e-7, 1.0e-7, u1)
    u2 = uint_to_uniform(angle_word)
    return tl.sqrt(-2.0 * tl.log(u1)) * cos_or_sin_two_pi(u2, sine)


@triton.jit
def normal(k0, k1, index):
    """tl.randn4x(seed, index // 4)[index % 4] for uint32 logical indices (the stream of vdvae_fast/philox.py):
    lanes 0, 1 of counter (index // 4, 0, 0, 0) use words (out0, out1), lanes 2, 3 words (out2, out3); even
    lanes take the cosine, odd lanes the sine branch of Box-Muller. One Philox call per element: for elements
    whose memory order is not logical order; normal_groups serves four at a time."""
    zero = index * 0
    w0, w1, w2, w3 = philox(k0, k1, index >> 2, zero, zero, zero)
    high_pair = (index & 2) != 0
    return _box_muller(tl.where(high_pair, w2, w0), tl.where(high_pair, w3, w1), (index & 1) != 0)


@triton.jit
def _normals_of_groups(k0, k1, group):
    """The normals of lanes 0, 1, 2, 3 of each uint32 group counter, one Philox call per group; the same values
    as normal() bit for bit (the same words, per-lane arithmetic)."""
    zero = group * 0
    w0, w1, w2, w3 = philox(k0, k1, group, zero, zero, zero)
    return _box_muller(w0, w1, False), _box_muller(w0, w1, True), _box_muller(w2, w3, False), _box_muller(w2, w3, True)


@triton.jit
def normal_groups(k0, k1, first_group, GROUPS: tl.constexpr):
    """normal() of the 4 * GROUPS consecutive logical elements from 4 * first_group, in order, with one Philox
    call per four."""
    lane0, lane1, lane2, lane3 = _normals_of_groups(k0, k1, (first_group + tl.arange(0, GROUPS)).to(tl.uint32))
    # (lane 0, lane 2, ...) and (lane 1, lane 3, ...) interleaved: lane k of group s lands at 4 s + k
    return tl.interleave(tl.interleave(lane0, lane2), tl.interleave(lane1, lane3))


@triton.jit
def channels_last_groups(k0, k1, base, block_start, C, H, W, GROUPS: tl.constexpr, ACROSS_IMAGES: tl.constexpr):
    """(memory offsets from base of lane 0, then the eps of lanes 0, 1, 2, 3) of GROUPS slots of a channels_last
    tensor with W % 4 == 0, each slot four w-neighbours that are one Philox group: slot block_start / 4 + s is
    channel slot % C of pixels 4 (slot // C) + k counted from base, lane k at offsets + k C.

    The lanes come back as four tensors of the slots' shape, for the caller to load and store one lane at a time:
    a (slots, 4) tensor would leave the slots-to-threads layout to Triton's memory-access analysis, which can
    spread a slot's lanes over warps and recompute its Philox call in each, while four 1-D tensors share one
    layout, and consecutive slots are consecutive channels, so each lane's accesses still vectorize.

    base is the first offset of an image (a multiple of 4 C); the slots lie in that image or, ACROSS_IMAGES, in
    it and the images after it (each group's image is then found by a division). The slots of 4 C consecutive
    positions cover the 4 C offsets from 4 C (slot // C), so a slot lies in the tensor (or the image) exactly
    where its lane-0 offset is below the tensor's (or image's) size: the caller's mask for all four lanes."""
    slot = block_start // 4 + tl.arange(0, GROUPS)
    first_pixel = (slot // C) * 4
    channel = slot % C
    plane = H * W
    logical = channel * plane + first_pixel  # (image C + channel) plane + (first_pixel - image plane)
    if ACROSS_IMAGES:
        logical += (first_pixel // plane) * (C - 1) * plane
    lane0, lane1, lane2, lane3 = _normals_of_groups(k0, k1, ((base + logical) >> 2).to(tl.uint32))
    return first_pixel * C + channel, lane0, lane1, lane2, lane3


@triton.jit
def open_uniforms(k0, k1, pixel, group):
    """dmol_sample's uniforms in [1e-5, 1 - 1e-5] (finite logs) of streams 4 group .. 4 group + 3 of each
    pixel: the four words of counter (pixel, group, 0, 0), stream j being word j % 4 of group j // 4.

    pixel is a uint32 tensor, group a scalar.
    """
    zero = pixel * 0
    w0, w1, w2, w3 = philox(k0, k1, pixel, zero + group, zero, zero)
    return (
        uint_to_uniform(w0) * 0.99998 + 1.0e-5,
        uint_to_uniform(w1) * 0.99998 + 1.0e-5,
        uint_to_uniform(w2) * 0.99998 + 1.0e-5,
        uint_to_uniform(w3) * 0.99998 + 1.0e-5,
    )


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


@triton.jit
def block_normals(
    k0, k1, base, block_start, C, H, W, CHANNELS_LAST: tl.constexpr, GROUPED: tl.constexpr, BLOCK: tl.constexpr
):
    """eps of the BLOCK elements at memory offsets base + block_start + arange(BLOCK) of a dense tensor (base:
    an image's first offset, both layouts keeping images whole). GROUPED, for contiguous tensors with base +
    block_start a multiple of 4: one Philox call per four elements; else one per element, at its logical index
    (channels_last tensors with W % 4 == 0 draw by channels_last_groups instead)."""
    if GROUPED:
        eps = normal_groups(k0, k1, (base + block_start) >> 2, BLOCK // 4)
    else:
        offsets = block_start + tl.arange(0, BLOCK)
        eps = normal(k0, k1, (base + logical_index(offsets, C, H, W, CHANNELS_LAST)).to(tl.uint32))
    return eps
