"""Math and launch helpers shared by the Gaussian kernels (gaussian_kl, sample_gaussian, sample_and_kl)."""

import torch
import triton
import triton.language as tl

# Elements per program of the elementwise Gaussian kernels: 8 per thread at 4 warps, two 16-byte fp32 loads.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p):
    """KL(q||p) of diagonal Gaussians and its derivatives in (mu_q, logsigma_q, logsigma_p); d/dmu_p = -d/dmu_q.

    reference.gaussian_kl's formula, with exp(2 logsigma) for exp(logsigma)^2 and a product by 1 / var_p.
    """
    var_q = tl.exp(2.0 * logsigma_q)
    inv_var_p = tl.exp(-2.0 * logsigma_p)
    diff = mu_q - mu_p
    ratio = (var_q + diff * diff) * inv_var_p
    kl = -0.5 + logsigma_p - logsigma_q + 0.5 * ratio
    return kl, diff * inv_var_p, var_q * inv_var_p - 1.0, 1.0 - ratio


@triton.jit
def block_offsets(numel, BLOCK: tl.constexpr, INT64: tl.constexpr):
    """Memory offsets of this program's elements and their mask; int64 only for tensors past int32."""
    pid = tl.program_id(0)
    if INT64:
        pid = pid.to(tl.int64)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    return offsets, offsets < numel


def layout_args(t: torch.Tensor) -> tuple[int, int, int, bool]:
    """(C, H, W, channels_last) for the logical-index computation; contiguous tensors need no sizes."""
    if t.is_contiguous():
        return 1, 1, 1, False
    _, channels, height, width = t.shape
    return channels, height, width, True


def needs_int64(numel: int) -> bool:
    """Offsets past int32 need 64-bit index math (slower divisions), so it is used only when required."""
    return numel >= 2**31 - BLOCK
