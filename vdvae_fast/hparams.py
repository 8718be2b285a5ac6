"""Hyperparameters of VDVAE: one field table, the released presets as data, the layer-string grammar, the CLI.

Every hyperparameter is one row of ``FIELDS`` (default, type, choices, help); the defaults, the command line
and the reference table in the docs are derived from it. A preset is a flat attribute dict read by the model
(architecture keys), the data pipeline (dataset, image_size, num_bits) and the training program (lr, EMA rate,
skip threshold, ...). Each preset starts from its parent, as in openai/vdvae's hps.py, so the released values
stay easy to compare line by line. Cross-flag rules live in one place: ``validate``.
"""

from __future__ import annotations

import argparse
import math
import numbers
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import DATASETS, canonical_dataset
from .ops import BACKENDS
from .reference import POSTERIORS, SOFTPLUS_BETA
from .runtime import check_device_name

# Autocast dtype of each --precision (None: plain fp32). fp16 also gets a gradient scaler in the trainer.
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What gradient checkpointing recomputes in backward: nothing, every decoder block, every block.
GRAD_CHECKPOINT_MODES = ("none", "decoder", "all")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclass(frozen=True)
class Range:
    """The numbers a field may take: an interval whose ends may be open or infinite, plus `also` (e.g. -1 for
    'never'). NaN lies in no range; an integer field takes integers only."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if value in self.also:
            return True
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)

    def __str__(self) -> str:
        def number(x: float) -> str:
            return str(int(x)) if math.isfinite(x) and float(x).is_integer() else f"{x:g}"

        kind = "an integer" if self.integer else "a finite number" if self.high == math.inf else "a number"
        if self.high == math.inf:
            text = f"{kind} {'above' if self.low_open else 'at least'} {number(self.low)}"
        else:
            left, right = "(["[not self.low_open], ")]"[not self.high_open]
            text = f"{kind} in {left}{number(self.low)}, {number(self.high)}{right}"
        return text + "".join(f", or {number(value)}" for value in self.also)


def _at_least(low: float) -> Range:
    return Range(low, integer=True)


_POSITIVE = Range(0.0, low_open=True, high_open=True)  # finite and above 0
_NON_NEGATIVE = Range(0.0, high_open=True)  # finite and at least 0
_FRACTION = Range(0.0, 1.0, high_open=True)  # [0, 1)


@dataclass(frozen=True)
class Field:
    """One hyperparameter: its default, how the command line parses it (None: the default's type; bool defaults
    take _parse_bool), the values it may take (choices; or valid, a Range of numbers; None: any) and what it
    means (--help and the docs print it). A field whose default is None may also be left unset."""

    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: tuple[Any, ...] | None = None
    valid: Range | None = None

    def parser(self) -> Callable[[str], Any]:
        if self.type is not None:
            return self.type
        if isinstance(self.default, bool):
            return _parse_bool
        return type(self.default)


_UNUSED = "accepted for openai/vdvae compatibility; unused"

FIELDS: dict[str, Field] = {
    # architecture
    "enc_blocks": Field(None, "encoder layer string: RxN = N residual blocks at resolution R, RdK = a block then "
                        "average pooling by K (e.g. 32x11,32d2,16x6,...)", str),
    "dec_blocks": Field(None, "decoder layer string: RxN = N stochastic layers at resolution R, RmS = a layer that "
                        "adds the upsampled state of resolution S (e.g. 1x1,4m1,4x2,...)", str),
    "zdim": Field(16, "channels of each stochastic layer's latent z", valid=_at_least(1)),
    "width": Field(512, "channels of the residual stream", valid=_at_least(1)),
    "custom_width_str": Field("", "per-resolution widths, e.g. 32:64,16:128 (empty: width everywhere)"),
    "width_change": Field("pad", "how the stream changes resolution: pad (VDVAE: average pooling, channels a wider "
                          "resolution adds start at zero; the decoder upsamples the first channels of the coarser "
                          "state) or conv (Efficient-VDVAE: a KxK convolution of stride K and a leaky ReLU pool by "
                          "K; a 1x1 convolution and a leaky ReLU come before the nearest upsampling)",
                          choices=("pad", "conv")),
    "custom_bottleneck_str": Field("", "per-resolution bottleneck_multiple, e.g. 32:1.0,16:0.5 (empty: "
                                   "bottleneck_multiple everywhere; Efficient-VDVAE widens the blocks at the "
                                   "narrow high resolutions)"),
    "skip_projection": Field(False, "a 1x1 convolution projects the encoder's activation at each resolution before "
                             "the posteriors read it (Efficient-VDVAE's bottom-up skip)"),
    "skip_wiring": Field("resolution", "which encoder activation each stochastic layer reads: resolution (VDVAE: "
                         "the last one at its resolution, shared by all its layers) or block (Efficient-VDVAE's "
                         "released configs: each encoder block's own output, with its own projection if "
                         "skip_projection; with n blocks and m layers at a resolution, the first m-n+1 layers read "
                         "the last block and each later layer the block before, down to the first)",
                         choices=("resolution", "block")),
    "gaussian_heads": Field(False, "the posterior and prior blocks end in stream-width features and a 1x1 "
                            "convolution maps them to the mean and scale of z (Efficient-VDVAE); off: the blocks "
                            "emit them directly (VDVAE)"),
    "activation": Field("gelu", "the nonlinearity before each convolution of the residual blocks: gelu (VDVAE) or "
                        "silu (Efficient-VDVAE)", choices=("gelu", "silu")),
    "bottleneck_multiple": Field(0.25, "width inside each residual block, as a fraction of the stream's width",
                                 valid=_POSITIVE),
    "no_bias_above": Field(64, "learned initial decoder states at resolutions up to this one; zeros above",
                           valid=_at_least(0)),
    # the stochastic layers' Gaussians (Efficient-VDVAE, NVAE, Ladder VAE); the defaults are VDVAE's
    "gradient_smoothing": Field(False, "Efficient-VDVAE's gradient smoothing of the latent scales: sigma = "
                                "softplus_beta(raw) instead of exp(raw)"),
    "gradient_smoothing_beta": Field(SOFTPLUS_BETA, "the softplus sharpness beta of gradient smoothing, latent "
                                     "and DMoL scales (ln 2: a raw value of 0 gives sigma = 1, as exp does)", valid=_POSITIVE),
    "posterior": Field("direct", "the posterior's form: direct (VDVAE), residual (NVAE's residual normal: "
                       "mu_q = mu_p + delta_mu, sigma_q = sigma_p * delta_sigma) or precision_weighted (the Ladder "
                       "VAE's precision-weighted merge of the bottom-up and prior Gaussians)", choices=POSTERIORS),
    "num_mixtures": Field(10, "components of the discretized mixture of logistics (DMoL) output layer",
                          valid=_at_least(1)),
    "dmol_gradient_smoothing": Field(False, "DMoL scales softplus_beta(raw) = log(1 + exp(beta raw)) / beta with "
                                     "beta = gradient_smoothing_beta (Efficient-VDVAE's gradient smoothing) "
                                     "instead of VDVAE's exp(raw)"),
    "dmol_log_scale_min": Field(-7.0, "floor of the DMoL log-scales: VDVAE's -7, -inf for none (write "
                                "--dmol_log_scale_min=-inf); Efficient-VDVAE uses -250, no floor in effect", float,
                                valid=Range(-1000.0, 0.0, also=(-math.inf,))),
    # data
    "dataset": Field(None, "cifar10, imagenet32, imagenet64, ffhq_256, ffhq_1024 (VDVAE's files), folder (any "
                     "PNG/JPEG images under data_root) or builtin (photographs shipped with scikit-image: no "
                     "download)", canonical_dataset, DATASETS),
    "data_root": Field("./", "folder holding the dataset's files (README: Train lists them)"),
    "image_size": Field(None, "image side in pixels: fixed by the fixed-size datasets, chosen for folder and "
                        "builtin", int, valid=_at_least(1)),
    "image_channels": Field(3, "3: the DMoL output layer models RGB images", choices=(3,)),
    "num_bits": Field(8, "bit depth of the loss targets (8; ffhq_256 uses 5, taken from the data)",
                      valid=Range(1, 8, integer=True)),
    "valid_holdout": Field(None, "training images held out for validation (default VDVAE's 5000, or 7000 for "
                           "ffhq_256); for small files", int, valid=_at_least(1)),
    "eval_max_images": Field(0, "evaluate on at most this many validation images, spread evenly over the split "
                             "(0: all of them); the test split of --test_eval is always read whole",
                             valid=_at_least(0)),
    "iw_samples": Field(0, "also estimate -log p(x) at each evaluation (and --test_eval) by importance weighting "
                        "with this many posterior samples per image (NVAE's and the Ladder VAE's likelihood; each "
                        "costs about one decoder pass): nats/dim and bits/dim next to the ELBO (0: off)",
                        valid=_at_least(0)),
    # optimization: AdamW, linear warmup, gradient skipping above the skip threshold, EMA of the weights
    "lr": Field(0.00015, "peak learning rate of AdamW", valid=_POSITIVE),
    "wd": Field(0.0, "AdamW's decoupled weight decay", valid=_NON_NEGATIVE),
    "adam_beta1": Field(0.9, "AdamW's beta1 (VDVAE: 0.9)", valid=_FRACTION),
    "adam_beta2": Field(0.9, "AdamW's beta2 (VDVAE: 0.9)", valid=_FRACTION),
    "warmup_iters": Field(0, "updates over which the learning rate grows linearly from 0 to lr", float,
                          valid=_NON_NEGATIVE),
    "grad_clip": Field(200.0, "clip the gradient norm to this value", valid=_POSITIVE),
    "skip_threshold": Field(400.0, "skip an update whose gradient norm (before clipping) is at or above this; -1 "
                            "never skips a finite gradient (a NaN or infinite one is always skipped)",
                            valid=Range(0.0, low_open=True, high_open=True, also=(-1,))),
    "ema_rate": Field(0.999, "decay of the exponential moving average (EMA) of the weights that evaluation and "
                      "samples use", valid=_FRACTION),
    # training switches of Efficient-VDVAE, NVAE and the Ladder VAE, and the skip watchdog (off by default)
    "optimizer": Field("adamw", "adamw (VDVAE's) or adamax (Efficient-VDVAE's: torch's Adamax with the same betas, "
                       "eps 1e-8 and wd decoupled as in AdamW; Efficient-VDVAE uses beta2 0.999); a resume needs the "
                       "checkpoint's", choices=("adamw", "adamax")),
    "lr_schedule": Field("linear_warmup", "linear_warmup (VDVAE's: warm-up over warmup_iters, then lr), cosine "
                         "(Efficient-VDVAE's: warm-up, lr until lr_decay_start, cosine decay to lr_min over "
                         "lr_decay_steps), exponential (warm-up, then lr * lr_decay_rate ** ((step - lr_decay_start) "
                         "/ lr_decay_steps), at least lr_min) or noam (lr * sqrt(W) * min(step ** -0.5, step * "
                         "W ** -1.5), W = warmup_iters)", choices=("linear_warmup", "cosine", "exponential", "noam")),
    "lr_decay_start": Field(0, "cosine and exponential: the update at which the decay starts (Efficient-VDVAE: "
                            "50000; at least warmup_iters)", valid=_at_least(0)),
    "lr_decay_steps": Field(750000, "cosine: updates from lr to lr_min (Efficient-VDVAE: 750000); exponential: "
                            "updates per factor lr_decay_rate", valid=_at_least(1)),
    "lr_decay_rate": Field(0.5, "exponential: the factor of the learning rate every lr_decay_steps updates",
                           valid=Range(0.0, 1.0, low_open=True, high_open=True)),
    "lr_min": Field(0.0, "cosine and exponential: the floor of the decay, at most lr (Efficient-VDVAE: 2e-4 for "
                    "lr 1e-3)", valid=_NON_NEGATIVE),
    "kl_warmup_iters": Field(0, "KL warm-up (NVAE, Ladder VAE): the training loss is distortion + beta * rate with "
                             "beta rising linearly from kl_warmup_start to 1 over this many updates (0: off); "
                             "evaluation reports the true ELBO", valid=_at_least(0)),
    "kl_warmup_start": Field(0.0, "KL warm-up: beta at the first update (Ladder VAE: 0; NVAE: 1e-4)",
                             valid=Range(0.0, 1.0)),
    "spectral_reg": Field(0.0, "NVAE's spectral regularization: the training loss (nats per dimension) adds this "
                          "times the sum of the largest singular value of every conv weight (0: off); NVAE's "
                          "lambda, on a loss per image, is this times H*W*3", valid=_NON_NEGATIVE),
    "spectral_power_iters": Field(4, "spectral_reg: power iterations per update (NVAE: 4; the first update does "
                                  "10 times as many)", valid=_at_least(1)),
    "skip_watchdog_iters": Field(0, "after this many consecutive skipped updates (and every as many more) warn and "
                                 "take skip_watchdog_action (0: off)", valid=_at_least(0)),
    "skip_watchdog_action": Field("warn", "warn only; raise_threshold (skip_threshold times "
                                  "skip_watchdog_threshold_factor); lower_lr (the learning rate times "
                                  "skip_watchdog_lr_factor); or stop (save latest.pt and stop with a message)",
                                  choices=("warn", "raise_threshold", "lower_lr", "stop")),
    "skip_watchdog_threshold_factor": Field(2.0, "raise_threshold: the factor of skip_threshold",
                                            valid=Range(1.0, low_open=True, high_open=True)),
    "skip_watchdog_lr_factor": Field(0.5, "lower_lr: the factor of the learning rate",
                                     valid=Range(0.0, 1.0, low_open=True, high_open=True)),
    "n_batch": Field(32, "images per update in each process (the global batch is n_batch times the number of "
                     "processes)", valid=_at_least(1)),
    "num_epochs": Field(10000, "passes over the training split", valid=_at_least(1)),
    "seed": Field(0, "random seed of the initial weights, the data order and the noise",
                  valid=Range(0, 2**32 - 1, integer=True)),
    # bookkeeping of the training program
    "desc": Field("test", "name of the run: its outputs go to save_dir/desc/"),
    "save_dir": Field("./saved_models", "folder of the runs"),
    "restore_path": Field(None, "resume from a vdvae_fast checkpoint (latest.pt, iter-N.pt, or a run folder "
                          "meaning its latest.pt): weights, EMA, optimizer, schedule, position in the data and "
                          "random streams. An official openai/vdvae *-model.th file only initializes the weights",
                          str),
    "restore_ema_path": Field(None, "EMA weights: a vdvae_fast checkpoint or an official openai/vdvae "
                              "*-model-ema.th file; with --test_eval, the weights evaluated", str),
    "restore_log_path": Field(None, "openai/vdvae's separate log file; not needed: --restore_path holds the "
                              "position", str),
    "restore_optimizer_path": Field(None, "openai/vdvae's separate optimizer file; not needed: --restore_path "
                                    "holds it", str),
    "test_eval": Field(False, "evaluate the restored EMA weights on the test split once, write a sample grid, "
                       "and exit"),
    "temperature": Field(1.0, f"prior temperature ({_UNUSED} by training; see python -m vdvae_fast.sample "
                         "--temperature)", valid=_NON_NEGATIVE),
    "iters_per_ckpt": Field(25000, "write a checkpoint iter-N.pt every this many updates", valid=_at_least(1)),
    "iters_per_print": Field(1000, "log a train_loss record and print a progress line every this many updates",
                             valid=_at_least(1)),
    "iters_per_save": Field(10000, "rewrite latest.pt every this many updates", valid=_at_least(1)),
    "iters_per_images": Field(10000, "write the sample grid samples-N.png every this many updates",
                              valid=_at_least(1)),
    "epochs_per_eval": Field(10, "evaluate the EMA weights on the validation split every this many epochs (and "
                             "at the end)", valid=_at_least(1)),
    "epochs_per_probe": Field(None, _UNUSED, int, valid=_at_least(1)),
    "epochs_per_eval_save": Field(20, _UNUSED, valid=_at_least(1)),
    "num_images_visualize": Field(8, "images per row of the sample grid (0: no grid)", valid=_at_least(0)),
    "num_variables_visualize": Field(6, "rows of partial reconstructions (the first k latents kept, t = 0.1) in "
                                     "the grid", valid=_at_least(0)),
    "num_temperatures_visualize": Field(3, "rows of unconditional samples in the grid (at t = 1.0, 0.9, 0.8, 0.7)",
                                        valid=Range(0, 4, integer=True)),
    # vdvae_fast: ops backend, numerics and memory
    "backend": Field("auto", "kernels of the fused ops: auto (the fastest built for the device), cpu, cuda, "
                     "triton, reference (eager PyTorch, seeded like the kernels) or original (eager PyTorch with "
                     "torch's sampler, as openai/vdvae)", choices=BACKENDS),
    "precision": Field("fp32", "fp32; bf16 (autocast); or fp16 (autocast with a gradient scaler)",
                       choices=tuple(PRECISIONS)),
    "grad_checkpoint": Field("none", "recompute blocks in backward instead of storing activations: none, decoder "
                             "or all", choices=GRAD_CHECKPOINT_MODES),
    "channels_last": Field(False, "keep weights and activations channels_last (faster convolutions on recent "
                           "GPUs)"),
    "check_inputs": Field(True, "let the loss check that targets lie in [-1, 1]; the trainer checks the first "
                          "batch, then turns it off"),
    # vdvae_fast: the training program
    "device": Field("auto", "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes "
                    "cuda:LOCAL_RANK"),
    "compile": Field(False, "torch.compile the training forward pass"),
    "max_iters": Field(None, "stop after this many updates in all, those before a resume included (0: no limit "
                       "but num_epochs)", int, valid=_at_least(0)),
    "num_workers": Field(None, "DataLoader worker processes per training process (default: 4 on CUDA, 0 on CPU)",
                         int, valid=_at_least(0)),
    "num_threads": Field(None, "CPU threads of each process's tensor operations (default: torch's, one per core); "
                         "1 is often fastest for small models and on machines shared with other jobs", int,
                         valid=_at_least(1)),
}  # fmt: skip

DEFAULTS: dict[str, Any] = {key: field.default for key, field in FIELDS.items()}
HELP: dict[str, str] = {key: field.help for key, field in FIELDS.items()}


def _check_known(keys: Iterable[str]) -> None:
    unknown = [key for key in keys if key not in FIELDS]
    if unknown:
        raise AttributeError(
            f"unknown hyperparameter {unknown[0]!r}; the known ones are listed by `python train.py --help`"
        )


class Hyperparams(dict):
    """A dict whose keys read and write as attributes (``H.width``), like VDVAE's ``H``.

    Only the keys of FIELDS may be set, so a typo fails loudly on write as on read (a missing key raises
    AttributeError rather than returning None); use ``H.get(key, default)`` for optional keys.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.update(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"hyperparameter {name!r} is not set") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __setitem__(self, name: str, value: Any) -> None:
        _check_known([name])
        super().__setitem__(name, value)

    def update(self, *args: Any, **kwargs: Any) -> None:
        changes = dict(*args, **kwargs)
        _check_known(changes)
        super().update(changes)

    def setdefault(self, name: str, default: Any = None) -> Any:
        _check_known([name])
        return super().setdefault(name, default)

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(f"hyperparameter {name!r} is not set") from None

    def copy(self) -> Hyperparams:
        return Hyperparams(self)


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------

# name -> (parent, changes). Released values from openai/vdvae (see shared/vdvae-presets.md).
_PRESETS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "cifar10": (
        None,
        {
            "dataset": "cifar10",
            "image_size": 32,
            "width": 384,
            "lr": 0.0002,
            "wd": 0.01,
            "warmup_iters": 100,
            "n_batch": 16,
            "ema_rate": 0.9999,
            "enc_blocks": "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
            "dec_blocks": "1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
        },
    ),
    "imagenet32": (
        "cifar10",
        {
            "dataset": "imagenet32",
            "width": 512,
            "lr": 0.00015,
            "n_batch": 8,
            "ema_rate": 0.999,
            "grad_clip": 200.0,
            "skip_threshold": 300.0,
            "epochs_per_eval": 1,
            "epochs_per_eval_save": 1,
            "enc_blocks": "32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
            "dec_blocks": "1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40",
        },
    ),
    "imagenet64": (
        "imagenet32",
        {
            "dataset": "imagenet64",
            "image_size": 64,
            "n_batch": 4,
            "grad_clip": 220.0,
            "skip_threshold": 380.0,
            "enc_blocks": "64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
            "dec_blocks": "1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
        },
    ),
    "ffhq256": (
        "imagenet64",
        {
            "dataset": "ffhq_256",
            "image_size": 256,
            "num_bits": 5,
            "n_batch": 1,
            "grad_clip": 130.0,
            "skip_threshold": 180.0,
            "no_bias_above": 64,
            "num_images_visualize": 2,
            "num_variables_visualize": 3,
            "num_temperatures_visualize": 1,
            "enc_blocks": "256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
            "dec_blocks": "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
        },
    ),
    "ffhq1024": (
        "ffhq256",
        {
            "dataset": "ffhq_1024",
            "data_root": "./ffhq_images1024x1024",
            "image_size": 1024,
            "num_bits": 8,
            "num_mixtures": 2,
            "width": 16,
            "lr": 0.00007,
            "grad_clip": 360.0,
            "skip_threshold": 500.0,
            "iters_per_images": 25000,
            "num_images_visualize": 1,
            "num_variables_visualize": 0,
            "num_temperatures_visualize": 4,
            "custom_width_str": "512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512",
            "enc_blocks": (
                "1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4"
            ),
            "dec_blocks": (
                "1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,512m256,1024m512"
            ),
        },
    ),
    # Not released: the first run on a new machine. A 154k-parameter VDVAE on 16x16 patches of the photographs
    # that ship with scikit-image (dataset 'builtin': no download) that visibly learns on a 2-core CPU in a few
    # minutes: validation bits/dim from about 9.1 at initialization to below 6 in 800 updates (README: Train).
    # Compared with the released presets: a larger learning rate and a short EMA horizon, both because the run
    # is short; latents at 1x1 and 4x4 carry most of what a 16x16 patch holds.
    "demo": (
        None,
        {
            "dataset": "builtin",
            "image_size": 16,
            "width": 48,
            "zdim": 16,
            "num_mixtures": 5,
            "lr": 0.003,
            "wd": 0.01,
            "warmup_iters": 20,
            "n_batch": 16,
            "ema_rate": 0.98,
            "num_epochs": 1,
            "max_iters": 800,
            "num_threads": 1,  # small convolutions gain little from threads; a busy 2-core CPU lost 10x to them
            "desc": "demo",
            "iters_per_ckpt": 400,
            "iters_per_print": 50,
            "iters_per_save": 200,
            "iters_per_images": 400,
            "epochs_per_eval": 1,
            "epochs_per_eval_save": 1,
            "num_variables_visualize": 3,
            "num_temperatures_visualize": 4,
            "enc_blocks": "16x1,16d2,8x1,8d2,4x2,4d4,1x2",
            "dec_blocks": "1x2,4m1,4x2,8m4,8x1,16m8,16x1",
        },
    ),
    # Not released: 8x8 RGB images for unit tests and smoke runs. Resolution 8 sits above no_bias_above, so the
    # decoder path that starts from zeros instead of a learned bias is exercised too. Its data are 8x8 patches of
    # the built-in photographs (no download), evaluated on 512 of them. See PRESET_NOTES for its duration.
    "tiny": (
        None,
        {
            "dataset": "builtin",
            "image_size": 8,
            "width": 16,
            "zdim": 4,
            "bottleneck_multiple": 0.5,
            "no_bias_above": 4,
            "num_mixtures": 3,
            "n_batch": 4,
            "num_epochs": 1,
            "eval_max_images": 512,  # of 29,894 validation patches: evaluating them all took minutes
            "num_threads": 1,  # as demo's: on a busy 2-core CPU, threads made 8x8 convolutions 10-40x slower
            "enc_blocks": "8x2,8d2,4x2,4d4,1x1",
            "dec_blocks": "1x1,4m1,4x2,8m4,8x2",
        },
    ),
    # Efficient-VDVAE (Hazami et al. 2022), from Rayhane-mamah/Efficient-VDVAE's egs/<dataset>_C1.cfg and
    # egs/<dataset>_baseline.cfg: its layer distribution (paper Table 6), widths, bottlenecks, latent sizes, batch
    # sizes and optimization. n_batch is its global batch (1, 2 and 4 GPUs shared it: divide by the processes).
    # As in its configs, every encoder block projects its own skip for the decoder (skip_wiring block). Its imagenet
    # configs wire them as skip_wiring block does. Its cifar10 configs differ at 16x16 and 32x32: there the first
    # decoder layer reads the last encoder block and the next m-n+1 layers the block before; here 4 and 10 of those
    # layers read the last block instead (same layers and parameters; its C.2 found no difference in NLL between
    # such wirings). Its gradient norms are never clipped: grad_clip = skip_threshold clips no
    # update that is applied. Its KL warm-up, (step - 21) / 5021 clamped to [1e-4, 1], is nearly linear over 5042
    # updates; its per-layer KL balancing (NVAE's gamma) is not reproduced.
    "effvdvae_cifar10": (
        None,
        {
            "dataset": "cifar10",
            "image_size": 32,
            "width": 48,
            "custom_width_str": "16:96,8:192,4:384,1:384",
            "custom_bottleneck_str": "32:1.0,16:0.5",
            "width_change": "conv",
            "skip_projection": True,
            "skip_wiring": "block",
            "gaussian_heads": True,
            "activation": "silu",
            "zdim": 16,
            "enc_blocks": "32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
            "dec_blocks": "1x3,4m1,4x3,8m4,8x6,16m8,16x10,32m16,32x21",
            "n_batch": 32,
            "optimizer": "adamax",
            "lr": 0.001,
            "adam_beta2": 0.999,
            "wd": 0.01,
            "warmup_iters": 100,
            "lr_schedule": "cosine",
            "lr_decay_start": 50000,
            "lr_decay_steps": 750000,
            "lr_min": 0.0002,
            "grad_clip": 800.0,
            "skip_threshold": 800.0,
            "ema_rate": 0.9999,
            "max_iters": 800000,
            "gradient_smoothing": True,
            "gradient_smoothing_beta": SOFTPLUS_BETA,
            "dmol_gradient_smoothing": True,
            "dmol_log_scale_min": -250.0,
            "kl_warmup_start": 0.0001,
            "kl_warmup_iters": 5042,
        },
    ),
    "effvdvae_imagenet32": (
        "effvdvae_cifar10",
        {
            "dataset": "imagenet32",
            "width": 64,
            "custom_width_str": "16:128,8:256,4:512,1:512",
            "zdim": 48,
            "enc_blocks": "32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
            "dec_blocks": "1x6,4m1,4x6,8m4,8x18,16m8,16x24,32m16,32x15",
            "n_batch": 64,
            "wd": 0.0,
            "dmol_gradient_smoothing": False,  # its output layer keeps exp scales (logstd, beta 1)
            "epochs_per_eval": 1,
        },
    ),
    "effvdvae_imagenet64": (
        "effvdvae_imagenet32",
        {
            "dataset": "imagenet64",
            "image_size": 64,
            "custom_width_str": "16:256,8:256,4:512,1:512",
            "custom_bottleneck_str": "64:1.0,32:0.5",
            "zdim": 64,
            "enc_blocks": "64x4,64d2,32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
            "dec_blocks": "1x6,4m1,4x6,8m4,8x18,16m8,16x24,32m16,32x15,64m32,64x10",
            "n_batch": 32,
        },
    ),
    "effvdvae_cifar10_baseline": (
        "effvdvae_cifar10",
        {"width": 384, "custom_width_str": "", "custom_bottleneck_str": "", "zdim": 32},
    ),
    "effvdvae_imagenet32_baseline": (
        "effvdvae_imagenet32",
        {
            "width": 512,
            "custom_width_str": "",
            "custom_bottleneck_str": "",
            "zdim": 32,
            "dmol_gradient_smoothing": True,
        },
    ),
    "effvdvae_imagenet64_baseline": (
        "effvdvae_imagenet64",
        {
            "width": 512,
            "custom_width_str": "",
            "custom_bottleneck_str": "",
            "zdim": 32,
            "dmol_gradient_smoothing": True,
        },
    ),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)
# What the presets that are not VDVAE's releases are for, for --hps's help; the parameter counts are printed by
# `python -m vdvae_fast.hparams --params NAME` (tests/test_presets.py checks them). Durations: `time python train.py
# --hps tiny --max_iters 20` took 15-17 s (4.5 s of CPU time) on a 2-core CPU shared with other jobs (load 16),
# once the trainer evaluates eval_max_images; README: Train measures demo.
PRESET_NOTES: dict[str, str] = {
    "demo": "a 154k-parameter VAE on 16x16 patches of built-in photographs that visibly learns on a CPU in "
    "minutes (README: Train)",
    "tiny": "an 8x8 model for tests and smoke runs: --max_iters 20 takes about 15 s on a busy 2-core CPU",
    "effvdvae_cifar10": "Efficient-VDVAE's C1 for CIFAR-10 (egs/cifar10_C1.cfg): widths 48 to 384, 47 stochastic "
    "layers, Adamax with cosine decay; 18.1M parameters",
    "effvdvae_imagenet32": "Efficient-VDVAE's C1 for ImageNet 32x32 (egs/imagenet32_C1.cfg): widths 64 to 512, 73 "
    "layers; 52.3M parameters",
    "effvdvae_imagenet64": "Efficient-VDVAE's C1 for ImageNet 64x64 (egs/imagenet64_C1.cfg): widths 64 to 512, 84 "
    "layers; 57.0M parameters",
    "effvdvae_cifar10_baseline": "effvdvae_cifar10 at width 384 everywhere, 32 latents per layer "
    "(egs/cifar10_baseline.cfg); 56.6M parameters",
    "effvdvae_imagenet32_baseline": "effvdvae_imagenet32 at width 512 everywhere, 32 latents per layer "
    "(egs/imagenet32_baseline.cfg); 145.1M parameters",
    "effvdvae_imagenet64_baseline": "effvdvae_imagenet64 at width 512 everywhere, 32 latents per layer "
    "(egs/imagenet64_baseline.cfg); 168.4M parameters",
}


def preset(name: str) -> Hyperparams:
    """A fresh copy of the hyperparameters of preset `name` (defaults, then each parent's changes)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    chain = []
    while name is not None:
        parent, changes = _PRESETS[name]
        chain.append(changes)
        name = parent
    H = Hyperparams(DEFAULTS)
    for changes in reversed(chain):
        H.update(changes)
    return H


# ----------------------------------------------------------------------------------------------------
# Layer strings
# ----------------------------------------------------------------------------------------------------

_LAYER_TOKEN = re.compile(r"(\d+)(?:([xdm])(\d+))?")
_LAYER_FORMS = {
    None: "RxN (N blocks at resolution R), RdK (a block, then average pooling by K), RmS (a block mixing in "
    "resolution S) or R",
    "encoder": "RxN (N blocks at resolution R), RdK (a block, then average pooling by K) or R",
    "decoder": "RxN (N blocks at resolution R), RmS (a block mixing in the upsampled state of resolution S) or R",
}
_ALLOWED_OPS = {None: "xdm", "encoder": "xd", "decoder": "xm"}


def _tokens(s: str) -> list[tuple[int, int, str]]:
    """(1-based position, character offset, token) of each comma-separated token of `s`."""
    tokens, offset = [], 0
    for position, token in enumerate(s.split(","), start=1):
        tokens.append((position, offset, token))
        offset += len(token) + 1
    return tokens


def _bad_token(s: str, position: int, offset: int, token: str, why: str) -> ValueError:
    return ValueError(f"bad token {token!r} at position {position} (character {offset}) of {s!r}: {why}")


def parse_layer_string(s: str, kind: str | None = None) -> list[tuple[int, int | None]]:
    """Parse a VDVAE layer string into one (resolution, down_rate or mixin) pair per block.

    ``32x11,32d2,...`` (encoder) and ``1x1,4m1,4x2,...`` (decoder): ``RxN`` gives N pairs (R, None),
    ``RdK`` gives (R, K), ``RmS`` gives (R, S) and a bare ``R`` gives (R, None). `kind` ("encoder" or
    "decoder") rejects the operator that belongs to the other half of the network.
    """
    if kind not in _ALLOWED_OPS:
        raise ValueError(f"kind must be 'encoder', 'decoder' or None, got {kind!r}")
    if not isinstance(s, str) or not s:
        raise ValueError(f"the {kind or 'layer'} string is empty or not a string: {s!r}")
    layers: list[tuple[int, int | None]] = []
    for position, offset, token in _tokens(s):
        match = _LAYER_TOKEN.fullmatch(token.strip())
        if match is None:
            raise _bad_token(s, position, offset, token, f"expected {_LAYER_FORMS[kind]}")
        res, op, num = int(match[1]), match[2], None if match[3] is None else int(match[3])
        if res < 1:
            raise _bad_token(s, position, offset, token, "the resolution must be at least 1")
        if op is not None and op not in _ALLOWED_OPS[kind]:
            raise _bad_token(
                s, position, offset, token, f"{op!r} has no place in the {kind}; expected {_LAYER_FORMS[kind]}"
            )
        if op == "x":
            if num < 1:
                raise _bad_token(s, position, offset, token, "the block count must be at least 1")
            layers += [(res, None)] * num
        elif op == "d":
            if num < 2 or res % num:
                raise _bad_token(s, position, offset, token, f"the pooling rate must be >= 2 and divide {res}")
            layers.append((res, num))
        elif op == "m":
            if not 1 <= num < res or res % num:
                raise _bad_token(s, position, offset, token, f"the mixin resolution must be below {res} and divide it")
            layers.append((res, num))
        else:
            layers.append((res, None))
    return layers


def _parse_per_resolution(
    s: str, pattern: str, parse: Callable[[str], Any], letter: str, name: str, bound: str
) -> dict[int, Any]:
    """{resolution: parse(V)} of a string ``"R:V,R:V"``, V matching `pattern` and above 0; errors call V
    `letter`, a `name` that must be `bound` (e.g. W, width, ">= 1")."""
    values: dict[int, Any] = {}
    if not s:
        return values
    for position, offset, token in _tokens(s):
        match = re.fullmatch(rf"(\d+):({pattern})", token.strip())
        if match is None or int(match[1]) < 1 or not parse(match[2]) > 0:
            expected = f"expected R:{letter} with a resolution R >= 1 and a {name} {letter} {bound}"
            raise _bad_token(s, position, offset, token, expected)
        if int(match[1]) in values:
            raise _bad_token(s, position, offset, token, f"resolution {match[1]} already has a {name}")
        values[int(match[1])] = parse(match[2])
    return values


def parse_channel_string(s: str) -> dict[int, int]:
    """Parse custom_width_str ``"32:64,16:128"`` into {resolution: width}; "" means every resolution
    uses `width`."""
    return _parse_per_resolution(s, r"\d+", int, "W", "width", ">= 1")


def parse_bottleneck_string(s: str) -> dict[int, float]:
    """Parse custom_bottleneck_str ``"32:1.0,16:0.5"`` into {resolution: bottleneck multiple}; "" means every
    resolution uses `bottleneck_multiple`."""
    pattern = r"\d*\.?\d+(?:[eE][-+]?\d+)?"
    return _parse_per_resolution(s, pattern, float, "B", "bottleneck multiple", "above 0")


def _resolutions(H: Hyperparams) -> list[int]:
    """Every resolution the layer strings use, ascending."""
    encoder = parse_layer_string(H.enc_blocks, "encoder")
    resolutions = {res for res, _ in encoder} | {res // rate for res, rate in encoder if rate}
    resolutions |= {res for res, _ in parse_layer_string(H.dec_blocks, "decoder")}
    return sorted(resolutions)


def resolution_widths(H: Hyperparams) -> dict[int, int]:
    """The channel width at every resolution the layer strings use: custom_width_str, else `width`."""
    custom = parse_channel_string(H.custom_width_str)
    return {res: custom.get(res, H.width) for res in _resolutions(H)}


def middle_widths(H: Hyperparams) -> dict[int, int]:
    """The width inside the residual blocks at every resolution: int(width * multiple), the multiple from
    custom_bottleneck_str, else bottleneck_multiple. Raises ValueError where that leaves no channel."""
    custom = parse_bottleneck_string(H.get("custom_bottleneck_str", ""))
    middles = {}
    for res, width in resolution_widths(H).items():
        multiple = custom.get(res, H.bottleneck_multiple)
        if int(width * multiple) < 1:
            raise ValueError(
                f"the blocks at resolution {res} have width {width} and bottleneck multiple {multiple:g}, which "
                f"leaves no channel inside them (int(width * multiple) is 0): use a multiple of at least "
                f"{1 / width:g} there (custom_bottleneck_str, bottleneck_multiple)"
            )
        middles[res] = int(width * multiple)
    return middles


def check_layer_strings(H: Hyperparams) -> None:
    """Raise ValueError unless the encoder and decoder strings describe one consistent network for
    image_size x image_size images: the encoder starts at image_size and only changes resolution by
    pooling, every decoder resolution has an encoder activation, mixins refer to resolutions already
    decoded, and the decoder ends at image_size."""
    enc = parse_layer_string(H.enc_blocks, "encoder")
    dec = parse_layer_string(H.dec_blocks, "decoder")
    current, seen = H.image_size, {H.image_size}
    for index, (res, rate) in enumerate(enc):
        if res != current:
            raise ValueError(
                f"encoder block {index} of {H.enc_blocks!r} runs at resolution {res}, but the activation there has "
                f"resolution {current} (the encoder starts at image_size {H.image_size} and changes it only by 'd')"
            )
        if rate:
            current = res // rate
            seen.add(current)
    decoded: set[int] = set()
    for index, (res, mixin) in enumerate(dec):
        if res not in seen:
            raise ValueError(
                f"decoder block {index} of {H.dec_blocks!r} runs at resolution {res}, which the encoder never "
                f"produces (it produces {sorted(seen)})"
            )
        if mixin is not None and mixin not in decoded:
            raise ValueError(
                f"decoder block {index} of {H.dec_blocks!r} mixes in resolution {mixin} before any block ran there"
            )
        decoded.add(res)
    if dec[-1][0] != H.image_size:
        raise ValueError(f"the decoder {H.dec_blocks!r} ends at resolution {dec[-1][0]}, not image_size {H.image_size}")


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--hps NAME`` and one documented ``--key value`` override per field of FIELDS. Booleans also work
    as bare switches: ``--test_eval`` means ``--test_eval true``."""
    parser.add_argument(
        "--hps",
        "--hparam_sets",
        dest="hps",
        required=True,
        choices=PRESETS,
        help="preset to start from; every other flag overrides one of its values. Released: cifar10, imagenet32, "
        "imagenet64, ffhq256, ffhq1024. " + ". ".join(f"{name}: {note}" for name, note in PRESET_NOTES.items()),
    )
    for key, field in FIELDS.items():
        extra: dict[str, Any] = {"help": field.help, "default": None, "type": field.parser()}
        if field.choices is not None:
            extra["choices"] = field.choices
        if isinstance(field.default, bool):
            extra.update(nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{key}", **extra)
    return parser


def parse_args(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None) -> Hyperparams:
    """Hyperparameters from the command line: the preset named by --hps, then any --key overrides. `parser`,
    if given, already holds add_arguments' flags (the trainer's adds its description)."""
    parser = parser or add_arguments(argparse.ArgumentParser(description="VDVAE hyperparameters"))
    args = parser.parse_args(argv)
    H = preset(args.hps)
    H.update({key: value for key, value in vars(args).items() if key != "hps" and value is not None})
    return H


def _check_choices(H: Hyperparams) -> None:
    """Each value of a field with choices, read as the command line would read it, is one of them."""
    for key, field in FIELDS.items():
        value = H.get(key)
        if field.choices is None or value is None:
            continue
        if (field.parser()(value) if isinstance(value, str) else value) not in field.choices:
            raise ValueError(f"--{key} must be one of {', '.join(map(str, field.choices))}, got {H[key]!r}")


def _check_ranges(H: Hyperparams) -> None:
    """Each number lies in its field's valid range (None allowed where the field's default is None)."""
    for key, field in FIELDS.items():
        value = H.get(key)
        if field.valid is None or (value is None and field.default is None):
            continue
        if value not in field.valid:
            raise ValueError(f"--{key} must be {field.valid}, got {value!r}")


def _check_block_widths(H: Hyperparams) -> None:
    """Every residual block keeps at least one channel inside: int(width * bottleneck_multiple) >= 1."""
    widths = parse_channel_string(H.custom_width_str).values() if H.custom_width_str else ()
    narrowest = min([int(H.width), *widths])
    if int(narrowest * H.bottleneck_multiple) < 1:
        raise ValueError(
            f"--bottleneck_multiple {H.bottleneck_multiple} leaves no channel inside the blocks of width {narrowest} "
            f"(int(width * bottleneck_multiple) is 0): use at least {1 / narrowest:g}"
        )
    if H.get("custom_bottleneck_str") and H.enc_blocks and H.dec_blocks:
        middle_widths(H)  # the per-resolution multiples


def _check_training_switches(H: Hyperparams) -> None:
    """The learning-rate schedule's fields agree: noam needs a warm-up, a decay starts after the warm-up and
    ends above its floor."""
    schedule = H.get("lr_schedule", "linear_warmup")
    if schedule == "noam" and H.warmup_iters <= 0:
        raise ValueError("--lr_schedule noam peaks at update warmup_iters: give --warmup_iters above 0")
    if schedule not in ("cosine", "exponential"):
        return
    if H.warmup_iters > H.lr_decay_start:
        raise ValueError(
            f"--lr_schedule {schedule} decays from --lr_decay_start {H.lr_decay_start}, which must not come before "
            f"the end of the warm-up: use --lr_decay_start {math.ceil(H.warmup_iters)} or more, or a shorter "
            "--warmup_iters"
        )
    if H.lr_min > H.lr:
        raise ValueError(
            f"--lr_min {H.lr_min:g} is the floor the learning rate decays to: it must be at most --lr {H.lr:g}"
        )


def validate(H: Hyperparams) -> None:
    """Every check of values and across flags, before any work starts: raise ValueError naming the flag and
    what would be valid."""
    _check_choices(H)
    _check_ranges(H)
    _check_block_widths(H)
    _check_training_switches(H)
    check_device_name(H.device)
    if H.restore_path is None and H.restore_ema_path is None and H.test_eval:
        raise ValueError("--test_eval evaluates trained weights: give --restore_ema_path or --restore_path")


# Keys that shape the network: a checkpoint trained with other values cannot be loaded.
ARCHITECTURE_KEYS = (
    "enc_blocks", "dec_blocks", "width", "zdim", "custom_width_str", "bottleneck_multiple", "no_bias_above",
    "num_mixtures", "image_size", "image_channels", "width_change", "custom_bottleneck_str", "skip_projection",
    "skip_wiring", "gaussian_heads", "activation",
)  # fmt: skip
# Keys that only say where an invocation runs or what it restores: never reported as changed on resume.
INVOCATION_KEYS = (
    "restore_path", "restore_ema_path", "test_eval", "max_iters", "device", "num_workers", "num_threads",
)  # fmt: skip


def changed_since(
    saved: dict[str, Any], current: dict[str, Any]
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
    """What differs between a checkpoint's hyperparameters and this run's, as {key: (saved, now)}: the
    architecture keys, then the others (invocation keys left out)."""
    # A key a checkpoint predates held its default then.
    saved = {**{key: DEFAULTS[key] for key in current if key in DEFAULTS}, **saved}
    changed = {
        key: (saved.get(key), current.get(key))
        for key in sorted(set(saved) | set(current))
        if key not in INVOCATION_KEYS and saved.get(key) != current.get(key)
    }
    architecture = {key: values for key, values in changed.items() if key in ARCHITECTURE_KEYS}
    others = {key: values for key, values in changed.items() if key not in ARCHITECTURE_KEYS}
    return architecture, others


def reference_table() -> str:
    """The hyperparameters as a Markdown table (flag, default, valid values, meaning), for the docs."""
    lines = ["| flag | default | valid values | meaning |", "| --- | --- | --- | --- |"]
    for key, field in FIELDS.items():
        valid = ", ".join(map(str, field.choices)) if field.choices else str(field.valid or "")
        lines.append(f"| `--{key}` | `{field.default!r}` | {valid} | {field.help} |")
    return "\n".join(lines)


def parameter_count(H: Hyperparams) -> int:
    """The number of parameters of the VAE that H describes (built on the meta device: no memory, no time)."""
    from .model import VAE  # the model reads this module: import it only when counting

    with torch.device("meta"):
        vae = VAE(H)
    return sum(parameter.numel() for parameter in vae.parameters())


def main(argv: Sequence[str] | None = None, prog: str = "python -m vdvae_fast.hparams") -> int:
    """Print the hyperparameter table, or with --params the parameter count of each named preset; returns the
    exit status (argparse exits with 2 for a bad flag)."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Print every hyperparameter (flag, default, valid values, meaning) as a Markdown table."
    )
    parser.add_argument("--params", nargs="+", choices=PRESETS, metavar="PRESET",
                        help=f"print the parameter count of each preset instead ({', '.join(PRESETS)})")  # fmt: skip
    args = parser.parse_args(argv)
    if not args.params:
        print(reference_table())
        return 0
    for name in args.params:
        count = parameter_count(preset(name))
        print(f"{name:<{max(map(len, args.params))}}  {count:>13,} parameters ({count / 1e6:.1f}M)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
