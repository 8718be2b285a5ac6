"""Hyperparameters of VDVAE: the released presets as data, the layer-string grammar and a small CLI.

A preset is a flat attribute dict read by the model (architecture keys), the data pipeline (dataset,
image_size, num_bits) and the training program (lr, EMA rate, skip threshold, ...). Each preset starts
from its parent, as in openai/vdvae's hps.py, so the released values stay easy to compare line by line.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any


class Hyperparams(dict):
    """A dict whose keys read and write as attributes (``H.width``), like VDVAE's ``H``.

    A missing key raises AttributeError rather than returning None, so a typo fails loudly; use
    ``H.get(key, default)`` for optional keys.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"hyperparameter {name!r} is not set") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

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

DEFAULTS: dict[str, Any] = {
    # architecture
    "enc_blocks": None,
    "dec_blocks": None,
    "zdim": 16,
    "width": 512,
    "custom_width_str": "",
    "bottleneck_multiple": 0.25,
    "no_bias_above": 64,
    "num_mixtures": 10,
    # data
    "dataset": None,
    "data_root": "./",
    "image_size": None,
    "image_channels": 3,
    "num_bits": 8,
    # optimization: AdamW, linear warmup, gradient skipping above the skip threshold, EMA of the weights
    "lr": 0.00015,
    "wd": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.9,
    "warmup_iters": 0,
    "grad_clip": 200.0,
    "skip_threshold": 400.0,
    "ema_rate": 0.999,
    "n_batch": 32,
    "num_epochs": 10000,
    "seed": 0,
    # bookkeeping of the training program
    "desc": "test",
    "save_dir": "./saved_models",
    "restore_path": None,
    "restore_ema_path": None,
    "restore_log_path": None,
    "restore_optimizer_path": None,
    "test_eval": False,
    "temperature": 1.0,
    "iters_per_ckpt": 25000,
    "iters_per_print": 1000,
    "iters_per_save": 10000,
    "iters_per_images": 10000,
    "epochs_per_eval": 10,
    "epochs_per_probe": None,
    "epochs_per_eval_save": 20,
    "num_images_visualize": 8,
    "num_variables_visualize": 6,
    "num_temperatures_visualize": 3,
    # vdvae_fast: ops backend, numerics and memory
    "backend": "auto",  # ops backend: auto, cpu, cuda, triton, reference, original
    "precision": "fp32",  # fp32, bf16, fp16 (torch.autocast in the trainer)
    "grad_checkpoint": "none",  # none, decoder, all
    "channels_last": False,
    "check_inputs": True,  # dmol_nll checks targets lie in [-1, 1] (synchronizes a GPU)
    # vdvae_fast: the training program
    "device": "auto",
    "compile": False,
    "max_iters": None,
    "num_workers": None,
    "num_threads": None,
    "valid_holdout": None,
}

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
    # Not released: 8x8 RGB images for unit tests. Resolution 8 sits above no_bias_above, so the decoder
    # path that starts from zeros instead of a learned bias is exercised too. Its data are 8x8 patches of the
    # built-in photographs, so `python train.py --hps tiny --max_iters 20` runs anywhere in seconds.
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
            "enc_blocks": "8x2,8d2,4x2,4d4,1x1",
            "dec_blocks": "1x1,4m1,4x2,8m4,8x2",
        },
    ),
}

PRESETS: tuple[str, ...] = tuple(_PRESETS)


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


def parse_channel_string(s: str) -> dict[int, int]:
    """Parse custom_width_str ``"32:64,16:128"`` into {resolution: width}; "" means every resolution
    uses `width`."""
    widths: dict[int, int] = {}
    if not s:
        return widths
    for position, offset, token in _tokens(s):
        match = re.fullmatch(r"(\d+):(\d+)", token.strip())
        if match is None or int(match[1]) < 1 or int(match[2]) < 1:
            raise _bad_token(s, position, offset, token, "expected R:W with a resolution R and a width W, both >= 1")
        if int(match[1]) in widths:
            raise _bad_token(s, position, offset, token, f"resolution {match[1]} already has a width")
        widths[int(match[1])] = int(match[2])
    return widths


def resolution_widths(H: Hyperparams) -> dict[int, int]:
    """The channel width at every resolution the layer strings use: custom_width_str, else `width`."""
    custom = parse_channel_string(H.custom_width_str)
    encoder = parse_layer_string(H.enc_blocks, "encoder")
    resolutions = {res for res, _ in encoder} | {res // rate for res, rate in encoder if rate}
    resolutions |= {res for res, _ in parse_layer_string(H.dec_blocks, "decoder")}
    return {res: custom.get(res, H.width) for res in sorted(resolutions)}


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


# Keys whose default (None, or an int where fractions are allowed) does not tell their type.
_CLI_TYPES: dict[str, Any] = {
    "image_size": int,
    "epochs_per_probe": int,
    "warmup_iters": float,
    "max_iters": int,
    "num_workers": int,
    "num_threads": int,
    "valid_holdout": int,
}
_CLI_CHOICES: dict[str, tuple[str, ...]] = {
    "backend": ("auto", "cpu", "cuda", "triton", "reference", "original"),
    "precision": ("fp32", "bf16", "fp16"),
    "grad_checkpoint": ("none", "decoder", "all"),
}
_UNUSED = "accepted for openai/vdvae compatibility; unused"

# What each flag means; --help prints these, so every key of DEFAULTS has one.
HELP: dict[str, str] = {
    "enc_blocks": "encoder layer string: RxN = N residual blocks at resolution R, RdK = a block then average "
    "pooling by K (e.g. 32x11,32d2,16x6,...)",
    "dec_blocks": "decoder layer string: RxN = N stochastic layers at resolution R, RmS = a layer that adds the "
    "upsampled state of resolution S (e.g. 1x1,4m1,4x2,...)",
    "zdim": "channels of each stochastic layer's latent z",
    "width": "channels of the residual stream",
    "custom_width_str": "per-resolution widths, e.g. 32:64,16:128 (empty: width everywhere)",
    "bottleneck_multiple": "width inside each residual block, as a fraction of the stream's width",
    "no_bias_above": "learned initial decoder states at resolutions up to this one; zeros above",
    "num_mixtures": "components of the discretized mixture of logistics (DMoL) output layer",
    "dataset": "cifar10, imagenet32, imagenet64, ffhq_256, ffhq_1024, folder (any PNG/JPEG images under "
    "data_root) or builtin (photographs shipped with scikit-image: no download)",
    "data_root": "folder holding the dataset's files (README: Train lists them)",
    "image_size": "image side in pixels: fixed by the fixed-size datasets, chosen for folder and builtin",
    "image_channels": "3: the DMoL output layer models RGB images",
    "num_bits": "bit depth of the loss targets (8; ffhq_256 uses 5, taken from the data)",
    "valid_holdout": "training images held out for validation (default VDVAE's 5000, or 7000 for ffhq_256); "
    "for small files",
    "lr": "peak learning rate of AdamW",
    "wd": "AdamW's decoupled weight decay",
    "adam_beta1": "AdamW's beta1 (VDVAE: 0.9)",
    "adam_beta2": "AdamW's beta2 (VDVAE: 0.9)",
    "warmup_iters": "updates over which the learning rate grows linearly from 0 to lr",
    "grad_clip": "clip the gradient norm to this value",
    "skip_threshold": "skip an update whose gradient norm (before clipping) is at or above this; -1 never skips",
    "ema_rate": "decay of the exponential moving average (EMA) of the weights that evaluation and samples use",
    "n_batch": "images per update in each process (the global batch is n_batch times the number of processes)",
    "num_epochs": "passes over the training split",
    "seed": "random seed of the initial weights, the data order and the noise",
    "desc": "name of the run: its outputs go to save_dir/desc/",
    "save_dir": "folder of the runs",
    "restore_path": "resume from a vdvae_fast checkpoint (latest.pt, iter-N.pt, or a run folder meaning its "
    "latest.pt): weights, EMA, optimizer, schedule, position in the data and random streams. An official "
    "openai/vdvae *-model.th file only initializes the weights",
    "restore_ema_path": "EMA weights: a vdvae_fast checkpoint or an official openai/vdvae *-model-ema.th file; "
    "with --test_eval, the weights evaluated",
    "restore_log_path": "openai/vdvae's separate log file; not needed: --restore_path holds the position",
    "restore_optimizer_path": "openai/vdvae's separate optimizer file; not needed: --restore_path holds it",
    "test_eval": "evaluate the restored EMA weights on the test split once, write a sample grid, and exit",
    "temperature": f"prior temperature ({_UNUSED} by training; see python -m vdvae_fast.sample --temperature)",
    "iters_per_ckpt": "write a checkpoint iter-N.pt every this many updates",
    "iters_per_print": "log a train_loss record and print a progress line every this many updates",
    "iters_per_save": "rewrite latest.pt every this many updates",
    "iters_per_images": "write the sample grid samples-N.png every this many updates",
    "epochs_per_eval": "evaluate the EMA weights on the validation split every this many epochs (and at the end)",
    "epochs_per_probe": _UNUSED,
    "epochs_per_eval_save": _UNUSED,
    "num_images_visualize": "images per row of the sample grid",
    "num_variables_visualize": "rows of partial reconstructions (the first k latents kept, t = 0.1) in the grid",
    "num_temperatures_visualize": "rows of unconditional samples in the grid (at t = 1.0, 0.9, 0.8, 0.7)",
    "backend": "kernels of the fused ops: auto (the fastest built for the device), cpu, cuda, triton, "
    "reference (eager PyTorch, seeded like the kernels) or original (eager PyTorch with torch's sampler, as openai/vdvae)",
    "precision": "fp32; bf16 (autocast); or fp16 (autocast with a gradient scaler)",
    "grad_checkpoint": "recompute blocks in backward instead of storing activations: none, decoder or all",
    "channels_last": "keep weights and activations channels_last (faster convolutions on recent GPUs)",
    "check_inputs": "let the loss check that targets lie in [-1, 1]; the trainer checks the first batch, then "
    "turns it off",
    "device": "auto (CUDA when available), cpu, cuda or cuda:N; under torchrun each process takes cuda:LOCAL_RANK",
    "compile": "torch.compile the training forward pass",
    "max_iters": "stop after this many updates in all, those before a resume included (0: no limit but num_epochs)",
    "num_workers": "DataLoader worker processes per training process (default: 4 on CUDA, 0 on CPU)",
    "num_threads": "CPU threads of each process's tensor operations (default: torch's, one per core); 1 is often "
    "fastest for small models and on machines shared with other jobs",
}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--hps NAME`` and one documented ``--key value`` override per hyperparameter (typed by its
    default). Booleans also work as bare switches: ``--test_eval`` means ``--test_eval true``."""
    parser.add_argument(
        "--hps",
        "--hparam_sets",
        dest="hps",
        required=True,
        choices=PRESETS,
        help="preset to start from; every other flag overrides one of its values",
    )
    for key, default in DEFAULTS.items():
        extra: dict[str, Any] = {"help": HELP[key], "default": None}
        if key in _CLI_CHOICES:
            extra.update(choices=_CLI_CHOICES[key])
        elif key in _CLI_TYPES:
            extra.update(type=_CLI_TYPES[key])
        elif isinstance(default, bool):
            extra.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        elif isinstance(default, (int, float)):
            extra.update(type=type(default))
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
