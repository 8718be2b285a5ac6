"""VDVAE (Child, ICLR 2021, Figure 3): a bottom-up encoder and a top-down decoder of stochastic layers.

The classes map one to one onto openai/vdvae's vae.py and keep its parameter names and shapes, so the
released ``*-model.th`` and ``*-model-ema.th`` checkpoints load unchanged. What changes is underneath:
the stochastic layers and the likelihood call the fused ops of vdvae_fast.ops, blocks can be recomputed
in backward (gradient checkpointing), and the model runs under torch.autocast and in channels_last.

Images enter as (B, H, W, C), VDVAE's data convention; everything inside is (B, C, H, W).
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import ops, reference
from .hparams import (
    GRAD_CHECKPOINT_MODES,
    Hyperparams,
    check_layer_strings,
    middle_widths,
    parse_layer_string,
    resolution_widths,
)

Temperature = float | Sequence[float] | None


def _conv(in_width: int, out_width: int, kernel_size: int, zero_weights: bool = False) -> nn.Conv2d:
    """PyTorch's default init with a zero bias (the paper's choice over weight norm and data-dependent init)."""
    conv = nn.Conv2d(in_width, out_width, kernel_size, padding=kernel_size // 2)
    with torch.no_grad():
        conv.bias.zero_()
        if zero_weights:
            conv.weight.zero_()
    return conv


def _scale_by_depth(conv: nn.Conv2d, n_blocks: int) -> None:
    """The paper's residual scaling: the last conv of each residual path starts scaled by sqrt(1/N)."""
    with torch.no_grad():
        conv.weight.mul_(math.sqrt(1.0 / n_blocks))


def _run(block: nn.Module, use_checkpoint: bool, *args: Any) -> Any:
    """Call `block`, recomputing it in backward instead of keeping its activations if asked.

    Non-reentrant checkpointing restores torch's CPU RNG state before recomputing, so the seed that
    the ops draw from the default generator is drawn again identically: z is replayed, not redrawn.
    """
    if use_checkpoint and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


def _upsample_nearest(x: Tensor, factor: int) -> Tensor:
    """F.interpolate(x, scale_factor=factor) as a broadcast: its backward sums each block where interpolate's
    scatter-adds, which Inductor's CPU code generation rejected under bf16 autocast (torch 2.13)."""
    batch, channels, height, width = x.shape
    blocks = x[:, :, :, None, :, None].expand(batch, channels, height, factor, width, factor)
    return blocks.reshape(batch, channels, height * factor, width * factor)


def _same_dtype(*tensors: Tensor) -> list[Tensor]:
    """The Gaussian parameters in one dtype (the ops require it; under autocast they already agree)."""
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t.to(dtype) for t in tensors]


# Negative slope of the leaky ReLU after Efficient-VDVAE's pooling and unpooling convolutions (width_change conv).
LEAKY_SLOPE = 0.1
# The nonlinearity before each convolution of a Block (hyperparameter activation): VDVAE's, Efficient-VDVAE's.
ACTIVATIONS = {"gelu": F.gelu, "silu": F.silu}


class Block(nn.Module):
    """Bottleneck residual block: GELU (or another of ACTIVATIONS) before each of 1x1 -> 3x3 -> 3x3 -> 1x1
    (the 3x3s are 1x1 at resolutions <= 2), optionally residual, optionally followed by average pooling.

    head (n_in, n_out): a 1x1 convolution maps the last n_in output channels to n_out channels that come
    first, before the remaining ones (Efficient-VDVAE's Gaussian layer: z's mean and scale, then any features
    the block also emits).
    """

    def __init__(
        self,
        in_width: int,
        middle_width: int,
        out_width: int,
        down_rate: int | None = None,
        residual: bool = False,
        use_3x3: bool = True,
        zero_last: bool = False,
        head: tuple[int, int] | None = None,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        self.activation = ACTIVATIONS[activation]
        kernel = 3 if use_3x3 else 1
        self.c1 = _conv(in_width, middle_width, 1)
        self.c2 = _conv(middle_width, middle_width, kernel)
        self.c3 = _conv(middle_width, middle_width, kernel)
        self.c4 = _conv(middle_width, out_width, 1, zero_weights=zero_last)
        self.head = None if head is None else _conv(*head, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(self.activation(x))
        h = self.c2(self.activation(h))
        h = self.c3(self.activation(h))
        h = self.c4(self.activation(h))
        out = x + h if self.residual else h
        if self.head is not None:
            kept = out.shape[1] - self.head.in_channels
            out = torch.cat([self.head(out[:, kept:]), out[:, :kept]], dim=1)
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


# The encoder activation a decoder layer's posterior reads: a resolution (skip_wiring resolution) or the k-th encoder
# block output at a resolution, (res, k) (skip_wiring block).
SkipSource = int | tuple[int, int]


def skip_sources(H: Hyperparams) -> list[SkipSource]:
    """The encoder activation each stochastic layer reads, in decoder order (the wiring of skip_wiring).

    resolution (VDVAE): the encoder's last activation at the layer's resolution, shared by all its layers.
    block (Efficient-VDVAE's released configs): one encoder block's own output, (res, k) for the k-th block output
    at res (a block that average-pools, width_change pad, outputs at the pooled resolution). With n outputs and m
    layers at a resolution, the first m - n + 1 layers read the last output and each later layer the output before
    its predecessor's, so that the last layer reads the first (with m < n the first n - m outputs are not read).
    """
    layers = parse_layer_string(H.dec_blocks, "decoder")
    if H.get("skip_wiring", "resolution") == "resolution":
        return [res for res, _ in layers]
    pool_by_conv = H.get("width_change", "pad") == "conv"
    outputs = Counter(
        res // rate if rate and not pool_by_conv else res for res, rate in parse_layer_string(H.enc_blocks, "encoder")
    )
    layer_counts, seen, sources = Counter(res for res, _ in layers), Counter(), []
    for res, _ in layers:
        n, m, j = outputs[res], layer_counts[res], seen[res]
        if n == 0:
            raise ValueError(
                f"skip_wiring 'block' links each decoder layer to an encoder block output at its resolution, but no "
                f"encoder block of {H.enc_blocks!r} outputs at resolution {res} (blocks output at "
                f"{sorted(outputs)}): add one there, or use skip_wiring 'resolution'"
            )
        sources.append((res, n - 1 - max(0, j - max(m - n, 0))))
        seen[res] += 1
    return sources


def _resolution(source: SkipSource) -> int:
    return source if isinstance(source, int) else source[0]


def _skip_name(source: SkipSource) -> str:
    """The key of a skip projection in Encoder.skip_projections: "R" for a resolution, "R_K" for a block output."""
    return str(source) if isinstance(source, int) else f"{source[0]}_{source[1]}"


class Encoder(nn.Module):
    """The bottom-up pass: a 3x3 input conv, then residual Blocks with pooling between resolutions. Returns
    the activations the decoder's posteriors read (skip_sources), each through its own 1x1 projection if
    skip_projection: with skip_wiring resolution the last activation at each resolution, keyed by resolution;
    with block each encoder block's own output, keyed (res, k).

    width_change pad (VDVAE): a block that pools ("RdK") averages its output, and the activation read at its
    resolution is the previous block's. conv (Efficient-VDVAE): that block's output is read, then pooled by a
    KxK convolution of stride K to the next resolution's width (pools, keyed by the block's index) and a
    leaky ReLU.
    """

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.widths = resolution_widths(H)
        middles = middle_widths(H)
        pool_by_conv = H.get("width_change", "pad") == "conv"
        block = functools.partial(Block, residual=True, activation=H.get("activation", "gelu"))
        self.in_conv = _conv(H.image_channels, H.width, 3)
        layers = parse_layer_string(H.enc_blocks, "encoder")
        blocks, pools = [], {}
        for index, (res, down_rate) in enumerate(layers):
            width = self.widths[res]
            blocks.append(block(width, middles[res], width, None if pool_by_conv else down_rate, use_3x3=res > 2))
            _scale_by_depth(blocks[-1].c4, len(layers))
            if pool_by_conv and down_rate:
                pools[str(index)] = nn.Conv2d(width, self.widths[res // down_rate], down_rate, stride=down_rate)
                with torch.no_grad():
                    pools[str(index)].bias.zero_()
        self.enc_blocks = nn.ModuleList(blocks)
        self.pools = nn.ModuleDict(pools) if pool_by_conv else None
        self.by_block = H.get("skip_wiring", "resolution") == "block"
        self.read: list[SkipSource] = sorted(set(skip_sources(H)))
        self.skip_projections = None
        if H.get("skip_projection", False):
            widths = {_skip_name(source): self.widths[_resolution(source)] for source in self.read}
            self.skip_projections = nn.ModuleDict({name: _conv(width, width, 1) for name, width in widths.items()})
        self.grad_checkpoint = False
        self.memory_format = torch.channels_last if H.get("channels_last", False) else torch.contiguous_format

    def forward(self, x: Tensor) -> dict[SkipSource, Tensor]:
        """x: preprocessed images (B, H, W, C), as openai/vdvae's Encoder.forward takes them; computed (B, C, H, W)
        in the model's memory format."""
        x = self.in_conv(x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format))
        activations: dict[SkipSource, Tensor] = {x.shape[2]: x}
        outputs: dict[int, list[Tensor]] = {}  # each block's output at the resolution it outputs at
        for index, block in enumerate(self.enc_blocks):
            x = _run(block, self.grad_checkpoint, x)
            res = x.shape[2]
            if x.shape[1] < self.widths[res]:  # widths grow after pooling (custom_width_str): zero channels
                x = F.pad(x, (0, 0, 0, 0, 0, self.widths[res] - x.shape[1]))
            activations[res] = x
            outputs.setdefault(res, []).append(x)
            if self.pools is not None and str(index) in self.pools:
                x = F.leaky_relu(self.pools[str(index)](x), LEAKY_SLOPE)
                activations[x.shape[2]] = x
        if self.by_block:
            activations = {(res, k): outputs[res][k] for res, k in self.read}
        if self.skip_projections is not None:
            activations = {
                source: self.skip_projections[_skip_name(source)](activations[source]) for source in self.read
            }
        return activations


class DecBlock(nn.Module):
    """One stochastic layer of the top-down path (Figure 3's top-down block).

    The posterior q(z | x, encoder activation) and the prior p(z | x) are diagonal Gaussians from two
    Blocks; the prior Block also emits residual features (its last conv starts at zero, so a fresh
    layer starts as the identity). z enters the state through a 1x1 projection, then a residual Block.
    """

    def __init__(
        self,
        H: Hyperparams,
        res: int,
        mixin: int | None,
        n_blocks: int,
        widths: dict[int, int],
        middle: int,
        source: SkipSource | None = None,
    ) -> None:
        super().__init__()
        self.base = res
        self.source = res if source is None else source  # the encoder activation the posterior reads (skip_sources)
        self.mixin = mixin
        self.width = width = widths[res]
        self.zdim = H.zdim
        # How raw outputs become Gaussians: gradient smoothing (Efficient-VDVAE) and the posterior form.
        self.parametrization = {
            "scale": "softplus" if H.get("gradient_smoothing", False) else "exp",
            "beta": H.get("gradient_smoothing_beta", reference.SOFTPLUS_BETA),
        }
        self.posterior = H.get("posterior", "direct")
        block = functools.partial(Block, use_3x3=res > 2, activation=H.get("activation", "gelu"))
        if H.get("gaussian_heads", False):  # stream-width features, then a 1x1 conv to z's mean and scale
            self.enc = block(width * 2, middle, width, head=(width, H.zdim * 2))
            self.prior = block(width, middle, width * 2, zero_last=True, head=(width, H.zdim * 2))
        else:
            self.enc = block(width * 2, middle, H.zdim * 2)
            self.prior = block(width, middle, H.zdim * 2 + width, zero_last=True)
        self.z_proj = _conv(H.zdim, width, 1)
        self.resnet = block(width, middle, width, residual=True)
        self.unpool = None
        if mixin is not None and H.get("width_change", "pad") == "conv":
            self.unpool = _conv(widths[mixin], width, 1)
        _scale_by_depth(self.z_proj, n_blocks)
        _scale_by_depth(self.resnet.c4, n_blocks)

    def _mix(self, x: Tensor, upper: Tensor | None) -> Tensor:
        """Add the nearest-upsampled state of the mixin resolution ("m" in the layer string): its first
        channels (width_change pad), or a 1x1 conv of it and a leaky ReLU (conv)."""
        if upper is None:
            return x
        if self.unpool is not None:
            return x + _upsample_nearest(F.leaky_relu(self.unpool(upper), LEAKY_SLOPE), self.base // self.mixin)
        return x + _upsample_nearest(upper[:, : x.shape[1]], self.base // self.mixin)

    def _prior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.prior(x)
        return features[:, : self.zdim], features[:, self.zdim : 2 * self.zdim], features[:, 2 * self.zdim :]

    def _gaussians(self, x: Tensor | None, acts: Tensor, upper: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """The state with the prior's features added, and the raw Gaussian parameters: the posterior network's
        pair, then the prior's (mu_p, raw sigma_p), in one dtype."""
        if x is None:
            x = torch.zeros_like(acts)
        elif x.shape[0] != acts.shape[0]:
            x = x.expand_as(acts)
        x = self._mix(x, upper)
        posterior = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        mu_p, logsigma_p, features = self._prior(x)
        return x + features, _same_dtype(*posterior, mu_p, logsigma_p)

    def forward(
        self,
        x: Tensor | None,
        acts: Tensor,
        upper: Tensor | None,
        backend: str,
        kl_estimator: str = "analytic",
        keep: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Posterior pass. x: the state at this resolution (None above no_bias_above: zeros; a learned
        bias of batch 1 is broadcast). Returns the new state, z, KL(q||p) per image (float32) — or
        log q(z) - log p(z) at z with kl_estimator="sampled" — and the raw Gaussian parameters.

        keep (bool, broadcastable to z): the latent dimensions that keep their posterior; the others take a
        draw from the prior and add nothing to the KL (latent pruning)."""
        x, params = self._gaussians(x, acts, upper)
        options = {**self.parametrization, "posterior": self.posterior, "kl_estimator": kl_estimator}
        z, kl = ops.sample_and_kl(*params, **options, backend=backend)
        if keep is not None:
            z, kl = self._prune(z, params, keep, backend, kl_estimator)
        x = x + self.z_proj(z)
        return self.resnet(x), z, kl, params

    def _prune(
        self, z: Tensor, params: list[Tensor], keep: Tensor, backend: str, kl_estimator: str
    ) -> tuple[Tensor, Tensor]:
        """z with the dimensions outside `keep` drawn from the prior, and the KL of the kept dimensions."""
        if kl_estimator != "analytic":
            raise ValueError("latent pruning sums the analytic KL of the kept dimensions; use kl_estimator='analytic'")
        keep = keep.to(device=z.device, dtype=torch.bool)
        prior_z = ops.sample_gaussian(params[2], params[3], **self.parametrization, backend=backend)
        kl = ops.gaussian_kl(*params, **self.parametrization, posterior=self.posterior, backend=backend)
        kl = torch.where(keep, kl, torch.zeros_like(kl))
        return torch.where(keep, z, prior_z.to(z.dtype)), kl.flatten(1).sum(1)

    def gaussians(self, params: list[Tensor]) -> dict[str, Tensor]:
        """The layer's posterior and prior as means and standard deviations (float32), from its raw parameters."""
        mu_q, sigma_q, _, mu_p, sigma_p, _ = reference.posterior_and_prior(
            *params, **self.parametrization, posterior=self.posterior
        )
        return {"mu_q": mu_q, "sigma_q": sigma_q, "mu_p": mu_p, "sigma_p": sigma_p}

    def forward_uncond(
        self, x: Tensor, upper: Tensor | None, t: float | None, z: Tensor | None, backend: str
    ) -> Tensor:
        """Prior pass: z drawn from p(z | x) at temperature t (sigma scaled by t), or the given z."""
        x = self._mix(x, upper)
        mu_p, logsigma_p, features = self._prior(x)
        x = x + features
        if z is None:
            temperature = 1.0 if t is None else float(t)
            z = ops.sample_gaussian(
                *_same_dtype(mu_p, logsigma_p), temperature=temperature, **self.parametrization, backend=backend
            )
        x = x + self.z_proj(z)
        return self.resnet(x)


class DmolNet(nn.Module):
    """The output layer p(x | z): a 1x1 conv to the 10*M logits of a discretized mixture of logistics."""

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.num_bits = H.num_bits
        # How the raw log-scale channels become scales: VDVAE's exp or Efficient-VDVAE's softplus, and the floor
        # (hyperparameters saved before these options existed lack them: VDVAE's then).
        self.scale_options = {
            "scale": "softplus" if H.get("dmol_gradient_smoothing", False) else "exp",
            "beta": H.get("gradient_smoothing_beta", reference.SOFTPLUS_BETA),
            "log_scale_min": H.get("dmol_log_scale_min", reference.LOG_SCALE_MIN),
        }
        self.out_conv = _conv(H.width, H.num_mixtures * 10, 1)

    def forward(self, px_z: Tensor) -> Tensor:
        """The DMoL logits, (B, 10*M, H, W) as the ops take them."""
        return self.out_conv(px_z)

    def nll(self, px_z: Tensor, x: Tensor, backend: str, check_inputs: bool = True) -> Tensor:
        """The distortion: -log p(x | z) in nats per dimension, one float32 value per image."""
        return ops.dmol_nll(
            self(px_z), x, num_bits=self.num_bits, **self.scale_options, backend=backend, check_inputs=check_inputs
        )

    def sample(self, px_z: Tensor, backend: str = "auto") -> Tensor:
        """Images drawn from the DMoL as uint8 (B, H, W, 3), the way VDVAE writes them."""
        image = ops.dmol_sample(self(px_z), **self.scale_options, backend=backend)
        return ((image + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class Decoder(nn.Module):
    """The top-down path: DecBlocks from 1x1 up to the image, learned initial states at resolutions
    <= no_bias_above, a final per-channel gain and bias, and the DMoL output layer."""

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.image_size = H.image_size
        widths, middles = resolution_widths(H), middle_widths(H)
        layers = parse_layer_string(H.dec_blocks, "decoder")
        self.dec_blocks = nn.ModuleList(
            DecBlock(H, res, mixin, len(layers), widths, middles[res], source)
            for (res, mixin), source in zip(layers, skip_sources(H), strict=True)
        )
        resolutions = sorted({res for res, _ in layers})
        self.bias_xs = nn.ParameterList(
            nn.Parameter(torch.zeros(1, widths[res], res, res)) for res in resolutions if res <= H.no_bias_above
        )
        self.out_net = DmolNet(H)
        self.gain = nn.Parameter(torch.ones(1, H.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, H.width, 1, 1))
        self.grad_checkpoint = False

    def final_fn(self, x: Tensor) -> Tensor:
        return x * self.gain + self.bias

    def forward(
        self,
        activations: dict[int, Tensor],
        backend: str = "auto",
        get_latents: bool = False,
        kl_estimator: str = "analytic",
        keep: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Posterior pass over all layers: the features px_z for the output layer and, per layer, the
        KL per image (with get_latents also z and the posterior and prior means and standard deviations,
        detached). kl_estimator and keep (one mask or None per layer) as for DecBlock.forward."""
        if keep is not None and len(keep) != len(self.dec_blocks):
            raise ValueError(f"got {len(keep)} keep masks for {len(self.dec_blocks)} stochastic layers")
        xs: dict[int, Tensor] = {bias.shape[2]: bias for bias in self.bias_xs}
        stats = []
        for index, block in enumerate(self.dec_blocks):
            upper = None if block.mixin is None else xs[block.mixin]
            layer_keep = None if keep is None else keep[index]
            x, z, kl, params = _run(
                block, self.grad_checkpoint, xs.get(block.base), activations[block.source], upper, backend,
                kl_estimator, layer_keep,
            )  # fmt: skip
            xs[block.base] = x
            if get_latents:
                gaussians = {name: t.detach() for name, t in block.gaussians([p.detach() for p in params]).items()}
                stats.append({"z": z.detach(), "kl": kl, **gaussians})
            else:
                stats.append({"kl": kl})
        return self.final_fn(xs[self.image_size]), stats

    def forward_uncond(
        self,
        n: int,
        t: Temperature = None,
        y: None = None,
        latents: Sequence[Tensor | None] | None = None,
        backend: str = "auto",
    ) -> Tensor:
        """openai/vdvae's prior pass for n images: the features px_z for the output layer. Layer i takes
        latents[i] when given and not None, else samples at temperature t: one value for every layer, or one
        per layer (None: 1). y is openai/vdvae's unused class-label argument and must stay None."""
        if y is not None:
            raise ValueError("y (a class label) is not used by VDVAE's unconditional decoder; leave it None")
        if isinstance(t, Sequence) and len(t) != len(self.dec_blocks):
            raise ValueError(f"got {len(t)} temperatures for {len(self.dec_blocks)} stochastic layers")
        latents = self._check_latents(n, latents or [])
        xs: dict[int, Tensor] = {bias.shape[2]: bias.expand(n, -1, -1, -1) for bias in self.bias_xs}
        for index, block in enumerate(self.dec_blocks):
            x = xs.get(block.base)
            if x is None:
                x = self.gain.new_zeros(n, block.width, block.base, block.base)
            upper = None if block.mixin is None else xs[block.mixin]
            temperature = t[index] if isinstance(t, Sequence) else t
            z = latents[index] if index < len(latents) else None
            xs[block.base] = block.forward_uncond(x, upper, temperature, z, backend)
        return self.final_fn(xs[self.image_size])

    def forward_manual_latents(
        self, n: int, latents: Sequence[Tensor | None], t: Temperature = None, backend: str = "auto"
    ) -> Tensor:
        """openai/vdvae's decoding of given latents: the first len(latents) layers take them (a None entry
        is sampled), the later layers sample at temperature t (one value, or one per layer: an extension of
        openai/vdvae's single value). Returns px_z for the output layer, like forward_uncond."""
        return self.forward_uncond(n, t, latents=latents, backend=backend)

    def _check_latents(self, n: int, latents: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The given latents as tensors on the decoder's device and dtype, each (n, zdim, res, res) for its layer."""
        if len(latents) > len(self.dec_blocks):
            raise ValueError(f"got {len(latents)} latents for {len(self.dec_blocks)} stochastic layers")
        checked: list[Tensor | None] = []
        for index, (z, block) in enumerate(zip(latents, self.dec_blocks, strict=False)):
            if z is not None:
                z = torch.as_tensor(z, device=self.gain.device)
                expected = (n, block.zdim, block.base, block.base)
                if tuple(z.shape) != expected or not z.is_floating_point():
                    raise ValueError(
                        f"latent {index} is {z.dtype} of shape {tuple(z.shape)}, but layer {index} of this decoder "
                        f"takes floating-point z of shape {expected} (n, zdim, resolution, resolution)"
                    )
                z = z.to(self.gain.dtype)
            checked.append(z)
        return checked


class VAE(nn.Module):
    """The very deep VAE. ``vae(x, x_target)`` returns the negative ELBO and its two terms in nats per
    dimension (batch means): distortion -log p(x|z) and rate sum_i KL(q(z_i|.) || p(z_i|.)).

    Configuration is fixed at construction and kept in attributes: `backend` (default H.backend) picks the ops
    backend, a call's backend argument overrides it; `check_inputs` (default H.check_inputs) lets the loss check
    that targets lie in [-1, 1]; H.grad_checkpoint ("none", "decoder", "all") recomputes blocks in backward;
    H.channels_last keeps weights and activations channels_last. The model keeps its own copy of H.

    Under torch.autocast the convs run in bf16/fp16 and the ops take their outputs as they are: they
    compute in float32 and return float32 KL and NLL. The residual states follow type promotion: the
    decoder's, seeded by the float32 learned biases, stays float32; the encoder's is low precision.
    """

    def __init__(self, H: Hyperparams, *, backend: str | None = None, check_inputs: bool | None = None) -> None:
        super().__init__()
        check_layer_strings(H)
        if H.image_channels != 3:
            raise ValueError(f"the DMoL output layer models RGB images, but image_channels is {H.image_channels}")
        self.H = H.copy()
        self.backend: str = H.get("backend", "auto") if backend is None else backend
        self.check_inputs: bool = bool(H.get("check_inputs", True) if check_inputs is None else check_inputs)
        self.encoder = Encoder(H)
        self.decoder = Decoder(H)
        self.set_grad_checkpoint(H.get("grad_checkpoint", "none"))
        if H.get("channels_last", False):
            self.to(memory_format=torch.channels_last)

    def set_grad_checkpoint(self, mode: str) -> None:
        """Recompute every decoder block ("decoder"), every block ("all") or none in backward."""
        if mode not in GRAD_CHECKPOINT_MODES:
            raise ValueError(f"grad_checkpoint must be one of {', '.join(GRAD_CHECKPOINT_MODES)}, got {mode!r}")
        self.grad_checkpoint = mode
        self.encoder.grad_checkpoint = mode == "all"
        self.decoder.grad_checkpoint = mode in ("decoder", "all")

    def _backend(self, backend: str | None) -> str:
        return backend if backend is not None else self.backend

    def _check_images(self, **images: Tensor) -> None:
        size, channels = self.H.image_size, self.H.image_channels
        for name, x in images.items():
            if not torch.is_tensor(x) or not x.is_floating_point():
                got = x.dtype if torch.is_tensor(x) else type(x).__name__
                raise ValueError(
                    f"{name} is {got}, but the VAE takes preprocessed floating-point images (the input normalized, "
                    "the target in [-1, 1]): turn a uint8 batch into (x, x_target) with "
                    "vdvae_fast.data.preprocessing_for(dataset)(batch)"
                )
            if x.dim() != 4 or tuple(x.shape[1:]) != (size, size, channels):
                got = f"shape {tuple(x.shape)}"
                if x.dim() == 4:
                    got = f"{x.shape[1]}x{x.shape[2]} images with {x.shape[3]} channels ({got})"
                raise ValueError(
                    f"{name} has {got}, but this VAE (dataset {self.H.get('dataset')}) takes {size}x{size} images "
                    f"with {channels} channels, as (B, H, W, C) = (B, {size}, {size}, {channels})"
                )

    def distortion_and_layers(
        self,
        x: Tensor,
        x_target: Tensor,
        backend: str | None = None,
        *,
        get_latents: bool = False,
        keep: Sequence[Tensor | None] | None = None,
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """The distortion of each image (nats per dimension, float32 (B,)) and the decoder's per-layer
        statistics (KL per image in nats; with get_latents z and the Gaussians; keep prunes latents to the
        prior: Decoder.forward)."""
        backend = self._backend(backend)
        self._check_images(x=x, x_target=x_target)
        px_z, stats = self.decoder(self.encoder(x), backend, get_latents=get_latents, keep=keep)
        return self.decoder.out_net.nll(px_z, x_target.permute(0, 3, 1, 2), backend, self.check_inputs), stats

    def forward(self, x: Tensor, x_target: Tensor, backend: str | None = None) -> dict[str, Tensor]:
        """x: the preprocessed input, x_target: the loss target in [-1, 1], both (B, H, W, C).

        Returns elbo (the loss to minimize), distortion and rate in nats per dimension, batch means, and
        kl_per_layer: each layer's share of the rate (L,), nats per dimension, batch mean.
        """
        distortion, stats = self.distortion_and_layers(x, x_target, backend)
        kl = torch.stack([layer["kl"] for layer in stats], dim=1) / x[0].numel()
        rate = kl.sum(dim=1)
        return {
            "elbo": (distortion + rate).mean(),
            "distortion": distortion.mean(),
            "rate": rate.mean(),
            "kl_per_layer": kl.mean(dim=0),
        }

    @torch.no_grad()
    def iw_log_likelihood(
        self,
        x: Tensor,
        x_target: Tensor,
        n_samples: int,
        samples_per_pass: int = 1,
        backend: str | None = None,
    ) -> Tensor:
        """The importance-weighted estimate of log p(x) (Burda et al.), nats per image, float64 (B,): the log of
        the mean over n_samples posterior draws z_k of p(x|z_k) p(z_k) / q(z_k|x). Its expectation lies between
        the ELBO (n_samples = 1) and log p(x), and rises towards log p(x) as n_samples grows.

        log q - log p of each draw is the fused sample_and_kl's sampled estimate; log p(x|z) is the DMoL's
        distortion times the image's dimensions. The encoder runs once; each decoder pass draws samples_per_pass
        samples for the whole batch (a batch of samples_per_pass * B), and a running logsumexp over the passes
        keeps memory independent of n_samples.
        """
        for name, value in (("n_samples", n_samples), ("samples_per_pass", samples_per_pass)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer at least 1, got {value!r}")
        backend = self._backend(backend)
        self._check_images(x=x, x_target=x_target)
        activations = self.encoder(x)
        target = x_target.permute(0, 3, 1, 2)
        batch, dims = x.shape[0], x[0].numel()
        log_sum = None
        for start in range(0, n_samples, samples_per_pass):
            k = min(samples_per_pass, n_samples - start)
            copies = {res: torch.cat([a] * k) for res, a in activations.items()}  # sample j of image b: j*B + b
            px_z, stats = self.decoder(copies, backend, kl_estimator="sampled")
            nll = self.decoder.out_net.nll(px_z, torch.cat([target] * k), backend, self.check_inputs)
            log_q_minus_log_p = torch.stack([layer["kl"] for layer in stats]).double().sum(0)
            log_weights = (-nll.double() * dims - log_q_minus_log_p).view(k, batch)
            pass_sum = torch.logsumexp(log_weights, dim=0)
            log_sum = pass_sum if log_sum is None else torch.logaddexp(log_sum, pass_sum)
        return log_sum - math.log(n_samples)

    def forward_get_latents(self, x: Tensor, backend: str | None = None) -> list[dict[str, Tensor]]:
        """openai/vdvae's encoding: for the preprocessed input x (B, H, W, C), one dict per stochastic layer, top
        (1x1) first, holding z (B, zdim, res, res), drawn from the posterior with seeds from torch's default
        generator, and kl. Unlike openai/vdvae, kl is per image (B,) in nats, not elementwise: openai/vdvae's
        kl.sum(dim=(1, 2, 3)). Each dict also holds the layer's posterior and prior means and standard deviations
        mu_q, sigma_q, mu_p, sigma_p, shaped like z. Everything but kl is detached."""
        self._check_images(x=x)
        return self.decoder(self.encoder(x), self._backend(backend), get_latents=True)[1]

    @torch.no_grad()
    def forward_uncond_samples(self, n_batch: int, t: Temperature = None, backend: str | None = None) -> Tensor:
        """openai/vdvae's n_batch unconditional samples at temperature t (one value, or one per layer: an
        extension), as uint8 (B, H, W, 3) on the model's device. openai/vdvae returns a numpy array; ours is a
        tensor (``.cpu().numpy()`` gives theirs)."""
        backend = self._backend(backend)
        return self.decoder.out_net.sample(self.decoder.forward_uncond(n_batch, t, backend=backend), backend)

    @torch.no_grad()
    def forward_samples_set_latents(
        self, n_batch: int, latents: Sequence[Tensor | None], t: Temperature = None, backend: str | None = None
    ) -> Tensor:
        """openai/vdvae's samples whose first len(latents) layers take the given z (e.g. from
        forward_get_latents: a reconstruction from partial latents); later layers sample at temperature t.
        uint8 (B, H, W, 3) tensor, as forward_uncond_samples returns."""
        backend = self._backend(backend)
        px_z = self.decoder.forward_manual_latents(n_batch, latents, t=t, backend=backend)
        return self.decoder.out_net.sample(px_z, backend)


def load_official_state_dict(model: VAE, state: Mapping[str, Tensor] | str | os.PathLike) -> VAE:
    """Load an openai/vdvae checkpoint (``*-model.th`` or ``*-model-ema.th``) strictly into `model`.

    `state` is a state dict or a path to one; the ``module.`` prefix that DistributedDataParallel adds
    is stripped. A mismatch raises ValueError naming the first missing, unexpected or misshapen key.
    """
    if isinstance(state, (str, os.PathLike)):
        state = torch.load(state, map_location="cpu", weights_only=True)
    state = {key.removeprefix("module."): value for key, value in state.items()}
    expected = model.state_dict()
    problems = []
    missing = [key for key in expected if key not in state]
    if missing:
        shape = tuple(expected[missing[0]].shape)
        problems.append(f"{len(missing)} missing, first {missing[0]!r} (model shape {shape})")
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        shape = tuple(state[unexpected[0]].shape)
        problems.append(f"{len(unexpected)} unexpected, first {unexpected[0]!r} (checkpoint shape {shape})")
    misshapen = [key for key in expected if key in state and state[key].shape != expected[key].shape]
    if misshapen:
        key = misshapen[0]
        problems.append(
            f"{len(misshapen)} with other shapes, first {key!r}: checkpoint {tuple(state[key].shape)}, "
            f"model {tuple(expected[key].shape)}"
        )
    if problems:
        raise ValueError(
            "the state dict does not fit this VAE (was it trained with this preset?): " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return model
