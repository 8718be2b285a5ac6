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
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .hparams import GRAD_CHECKPOINT_MODES, Hyperparams, check_layer_strings, parse_layer_string, resolution_widths

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


class Block(nn.Module):
    """Bottleneck residual block: GELU before each of 1x1 -> 3x3 -> 3x3 -> 1x1 (the 3x3s are 1x1 at
    resolutions <= 2), optionally residual, optionally followed by average pooling."""

    def __init__(
        self,
        in_width: int,
        middle_width: int,
        out_width: int,
        down_rate: int | None = None,
        residual: bool = False,
        use_3x3: bool = True,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        kernel = 3 if use_3x3 else 1
        self.c1 = _conv(in_width, middle_width, 1)
        self.c2 = _conv(middle_width, middle_width, kernel)
        self.c3 = _conv(middle_width, middle_width, kernel)
        self.c4 = _conv(middle_width, out_width, 1, zero_weights=zero_last)

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h if self.residual else h
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


class Encoder(nn.Module):
    """The bottom-up pass: a 3x3 input conv, then residual Blocks with average pooling between
    resolutions. Returns the last activation at each resolution, which the decoder's posteriors read."""

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.widths = resolution_widths(H)
        self.in_conv = _conv(H.image_channels, H.width, 3)
        layers = parse_layer_string(H.enc_blocks, "encoder")
        blocks = []
        for res, down_rate in layers:
            width = self.widths[res]
            middle = int(width * H.bottleneck_multiple)
            blocks.append(Block(width, middle, width, down_rate=down_rate, residual=True, use_3x3=res > 2))
            _scale_by_depth(blocks[-1].c4, len(layers))
        self.enc_blocks = nn.ModuleList(blocks)
        self.grad_checkpoint = False

    def forward(self, x: Tensor) -> dict[int, Tensor]:
        x = self.in_conv(x)
        activations = {x.shape[2]: x}
        for block in self.enc_blocks:
            x = _run(block, self.grad_checkpoint, x)
            res = x.shape[2]
            if x.shape[1] < self.widths[res]:  # widths grow after pooling (custom_width_str): zero channels
                x = F.pad(x, (0, 0, 0, 0, 0, self.widths[res] - x.shape[1]))
            activations[res] = x
        return activations


class DecBlock(nn.Module):
    """One stochastic layer of the top-down path (Figure 3's top-down block).

    The posterior q(z | x, encoder activation) and the prior p(z | x) are diagonal Gaussians from two
    Blocks; the prior Block also emits residual features (its last conv starts at zero, so a fresh
    layer starts as the identity). z enters the state through a 1x1 projection, then a residual Block.
    """

    def __init__(self, H: Hyperparams, res: int, mixin: int | None, n_blocks: int, width: int) -> None:
        super().__init__()
        self.base = res
        self.mixin = mixin
        self.width = width
        self.zdim = H.zdim
        middle = int(width * H.bottleneck_multiple)
        use_3x3 = res > 2
        self.enc = Block(width * 2, middle, H.zdim * 2, use_3x3=use_3x3)
        self.prior = Block(width, middle, H.zdim * 2 + width, use_3x3=use_3x3, zero_last=True)
        self.z_proj = _conv(H.zdim, width, 1)
        self.resnet = Block(width, middle, width, residual=True, use_3x3=use_3x3)
        _scale_by_depth(self.z_proj, n_blocks)
        _scale_by_depth(self.resnet.c4, n_blocks)

    def _mix(self, x: Tensor, upper: Tensor | None) -> Tensor:
        """Add the nearest-upsampled state of the mixin resolution ("m" in the layer string)."""
        if upper is None:
            return x
        return x + _upsample_nearest(upper[:, : x.shape[1]], self.base // self.mixin)

    def _prior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        features = self.prior(x)
        return features[:, : self.zdim], features[:, self.zdim : 2 * self.zdim], features[:, 2 * self.zdim :]

    def forward(
        self, x: Tensor | None, acts: Tensor, upper: Tensor | None, backend: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Posterior pass. x: the state at this resolution (None above no_bias_above: zeros; a learned
        bias of batch 1 is broadcast). Returns the new state, z and KL(q||p) per image (float32)."""
        if x is None:
            x = torch.zeros_like(acts)
        elif x.shape[0] != acts.shape[0]:
            x = x.expand_as(acts)
        x = self._mix(x, upper)
        mu_q, logsigma_q = self.enc(torch.cat([x, acts], dim=1)).chunk(2, dim=1)
        mu_p, logsigma_p, features = self._prior(x)
        x = x + features
        z, kl = ops.sample_and_kl(*_same_dtype(mu_q, logsigma_q, mu_p, logsigma_p), backend=backend)
        x = x + self.z_proj(z)
        return self.resnet(x), z, kl

    def forward_uncond(
        self, x: Tensor, upper: Tensor | None, t: float | None, z: Tensor | None, backend: str
    ) -> Tensor:
        """Prior pass: z drawn from p(z | x) at temperature t (sigma scaled by t), or the given z."""
        x = self._mix(x, upper)
        mu_p, logsigma_p, features = self._prior(x)
        x = x + features
        if z is None:
            temperature = 1.0 if t is None else float(t)
            z = ops.sample_gaussian(*_same_dtype(mu_p, logsigma_p), temperature=temperature, backend=backend)
        x = x + self.z_proj(z)
        return self.resnet(x)


class DmolNet(nn.Module):
    """The output layer p(x | z): a 1x1 conv to the 10*M logits of a discretized mixture of logistics."""

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.num_bits = H.num_bits
        # How the raw log-scale channels become scales: VDVAE's exp or Efficient-VDVAE's softplus, and the floor.
        # Hyperparameters saved before these options existed lack them: the ops' defaults are VDVAE's.
        self.scale_options = {"scale": "softplus" if H.get("dmol_gradient_smoothing", False) else "exp"}
        for option, key in (("beta", "gradient_smoothing_beta"), ("log_scale_min", "dmol_log_scale_min")):
            if key in H:
                self.scale_options[option] = H[key]
        self.out_conv = _conv(H.width, H.num_mixtures * 10, 1)

    def forward(self, px_z: Tensor) -> Tensor:
        """The DMoL logits, (B, 10*M, H, W) as the ops take them."""
        return self.out_conv(px_z)

    def nll(self, px_z: Tensor, x: Tensor, backend: str, check_inputs: bool = True) -> Tensor:
        """The distortion: -log p(x | z) in nats per dimension, one float32 value per image."""
        return ops.dmol_nll(
            self(px_z), x, num_bits=self.num_bits, **self.scale_options, backend=backend, check_inputs=check_inputs
        )

    def sample(self, px_z: Tensor, backend: str) -> Tensor:
        """Images drawn from the DMoL as uint8 (B, H, W, 3), the way VDVAE writes them."""
        image = ops.dmol_sample(self(px_z), **self.scale_options, backend=backend)
        return ((image + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class Decoder(nn.Module):
    """The top-down path: DecBlocks from 1x1 up to the image, learned initial states at resolutions
    <= no_bias_above, a final per-channel gain and bias, and the DMoL output layer."""

    def __init__(self, H: Hyperparams) -> None:
        super().__init__()
        self.image_size = H.image_size
        widths = resolution_widths(H)
        layers = parse_layer_string(H.dec_blocks, "decoder")
        self.dec_blocks = nn.ModuleList(DecBlock(H, res, mixin, len(layers), widths[res]) for res, mixin in layers)
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
        self, activations: dict[int, Tensor], backend: str, get_latents: bool = False
    ) -> tuple[Tensor, list[dict[str, Tensor]]]:
        """Posterior pass over all layers: the features px_z for the output layer and, per layer, the
        KL per image (and z if get_latents)."""
        xs: dict[int, Tensor] = {bias.shape[2]: bias for bias in self.bias_xs}
        stats = []
        for block in self.dec_blocks:
            upper = None if block.mixin is None else xs[block.mixin]
            x, z, kl = _run(block, self.grad_checkpoint, xs.get(block.base), activations[block.base], upper, backend)
            xs[block.base] = x
            stats.append({"z": z.detach(), "kl": kl} if get_latents else {"kl": kl})
        return self.final_fn(xs[self.image_size]), stats

    def forward_uncond(
        self, n: int, t: Temperature = None, latents: Sequence[Tensor] | None = None, backend: str = "auto"
    ) -> Tensor:
        """Prior pass for n images: layer i takes latents[i] when given, else samples at temperature t
        (one value, or one per layer)."""
        if isinstance(t, Sequence) and len(t) != len(self.dec_blocks):
            raise ValueError(f"got {len(t)} temperatures for {len(self.dec_blocks)} stochastic layers")
        latents = list(latents or [])
        if len(latents) > len(self.dec_blocks):
            raise ValueError(f"got {len(latents)} latents for {len(self.dec_blocks)} stochastic layers")
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
        self.memory_format = torch.channels_last if H.get("channels_last", False) else torch.contiguous_format
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

    def forward(self, x: Tensor, x_target: Tensor, backend: str | None = None) -> dict[str, Tensor]:
        """x: the preprocessed input, x_target: the loss target in [-1, 1], both (B, H, W, C).

        Returns elbo (the loss to minimize), distortion and rate in nats per dimension, batch means, and
        kl_per_layer: each layer's share of the rate (L,), nats per dimension, batch mean.
        """
        backend = self._backend(backend)
        self._check_images(x=x, x_target=x_target)
        activations = self.encoder(x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format))
        px_z, stats = self.decoder(activations, backend)
        distortion = self.decoder.out_net.nll(px_z, x_target.permute(0, 3, 1, 2), backend, self.check_inputs)
        kl = torch.stack([layer["kl"] for layer in stats], dim=1) / x[0].numel()
        rate = kl.sum(dim=1)
        return {
            "elbo": (distortion + rate).mean(),
            "distortion": distortion.mean(),
            "rate": rate.mean(),
            "kl_per_layer": kl.mean(dim=0),
        }

    def forward_get_latents(self, x: Tensor, backend: str | None = None) -> list[dict[str, Tensor]]:
        """The posterior latents of a batch: per layer, z (detached) and the KL per image."""
        self._check_images(x=x)
        activations = self.encoder(x.permute(0, 3, 1, 2).contiguous(memory_format=self.memory_format))
        return self.decoder(activations, self._backend(backend), get_latents=True)[1]

    @torch.no_grad()
    def forward_uncond_samples(self, n_batch: int, t: Temperature = None, backend: str | None = None) -> Tensor:
        """n_batch unconditional samples at temperature t (one value or one per layer), uint8 (B, H, W, 3)."""
        backend = self._backend(backend)
        return self.decoder.out_net.sample(self.decoder.forward_uncond(n_batch, t, backend=backend), backend)

    @torch.no_grad()
    def forward_samples_set_latents(
        self, n_batch: int, latents: Sequence[Tensor], t: Temperature = None, backend: str | None = None
    ) -> Tensor:
        """Samples whose first len(latents) layers take the given z (e.g. from forward_get_latents: a
        reconstruction from partial latents); later layers sample at temperature t. uint8 (B, H, W, 3)."""
        backend = self._backend(backend)
        px_z = self.decoder.forward_uncond(n_batch, t, latents=latents, backend=backend)
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
