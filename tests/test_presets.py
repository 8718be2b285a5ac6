"""Efficient-VDVAE's architecture switches and presets: parameter counts against the papers and a closed-form
count of its layer structure, the switches' layers, and VDVAE's model unchanged while they are off."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys

import pytest
import torch

from vdvae_fast.hparams import (
    _PRESETS,
    ARCHITECTURE_KEYS,
    FIELDS,
    Hyperparams,
    middle_widths,
    parameter_count,
    parse_bottleneck_string,
    preset,
    validate,
)
from vdvae_fast.model import VAE, skip_sources

# VDVAE paper (shared/papers/vdvae-very-deep-vaes.md), Table 2 "Params", quoted in whole millions.
VDVAE_PAPER_PARAMS_M = {"cifar10": 39, "imagenet32": 119, "imagenet64": 125, "ffhq256": 115}

# Efficient-VDVAE's layer structure per resolution (finest first), transcribed from Rayhane-mamah/Efficient-VDVAE
# egs/<dataset>_C1.cfg and egs/<dataset>_baseline.cfg: encoder blocks (up_strides; the pooling block counted at
# the finer resolution), decoder blocks (down_strides + down_n_blocks_per_res; paper Table 6), widths
# (up_filters/down_filters), bottleneck ratios (*_mid_filters_ratio) and latents (down_latent_variates).
# "paper": Table 3 "Parameters" of the Efficient-VDVAE paper (shared/papers/efficient-vdvae.md) for C1, and for
# imagenet64_baseline its C2 (C2 is C1 at constant width; the released cifar10 and imagenet32 baselines also
# change the latents, 32 instead of 16 and 48, so Table 3 holds no count for them).
EFFICIENT_VDVAE = {
    "effvdvae_cifar10": dict(
        res=(32, 16, 8, 4, 1), enc=(12, 7, 7, 4, 3), dec=(22, 11, 7, 4, 3), width=(48, 96, 192, 384, 384),
        ratio=(1.0, 0.5, 0.25, 0.25, 0.25), zdim=16, paper=18e6,
    ),
    "effvdvae_imagenet32": dict(
        res=(32, 16, 8, 4, 1), enc=(16, 10, 9, 7, 6), dec=(16, 25, 19, 7, 6), width=(64, 128, 256, 512, 512),
        ratio=(1.0, 0.5, 0.25, 0.25, 0.25), zdim=48, paper=52e6,
    ),
    "effvdvae_imagenet64": dict(
        res=(64, 32, 16, 8, 4, 1), enc=(5, 16, 10, 9, 7, 6), dec=(11, 16, 25, 19, 7, 6),
        width=(64, 64, 256, 256, 512, 512), ratio=(1.0, 0.5, 0.25, 0.25, 0.25, 0.25), zdim=64, paper=57e6,
    ),
    "effvdvae_cifar10_baseline": dict(
        res=(32, 16, 8, 4, 1), enc=(12, 7, 7, 4, 3), dec=(22, 11, 7, 4, 3), width=(384,) * 5, ratio=(0.25,) * 5,
        zdim=32, paper=None,
    ),
    "effvdvae_imagenet32_baseline": dict(
        res=(32, 16, 8, 4, 1), enc=(16, 10, 9, 7, 6), dec=(16, 25, 19, 7, 6), width=(512,) * 5, ratio=(0.25,) * 5,
        zdim=32, paper=None,
    ),
    "effvdvae_imagenet64_baseline": dict(
        res=(64, 32, 16, 8, 4, 1), enc=(5, 16, 10, 9, 7, 6), dec=(11, 16, 25, 19, 7, 6), width=(512,) * 6,
        ratio=(0.25,) * 6, zdim=32, paper=168e6,
    ),
}  # fmt: skip
NUM_MIXTURES = 10


def _conv(c_in: int, c_out: int, kernel: int = 1) -> int:
    return c_in * c_out * kernel * kernel + c_out


def _cell(c_in: int, ratio: float, kernel: int, out_ratio: float = 1.0) -> int:
    """Efficient-VDVAE's residual bottleneck cell: 1x1, two KxK, 1x1 (layers.py ResidualConvCell)."""
    middle, out = int(c_in * ratio), int(c_in * out_ratio)
    return _conv(c_in, middle) + 2 * _conv(middle, middle, kernel) + _conv(middle, out)


def efficient_vdvae_count(config: dict, skips: str) -> int:
    """Parameters of Efficient-VDVAE's torch model for `config`, counted from its layers' shapes. skips: "every
    block" (its released configs: each encoder block projects a skip for one decoder block) or "per resolution"
    (encoder and decoder linked once per resolution, as VDVAE)."""
    res, widths, ratios, z = config["res"], config["width"], config["ratio"], config["zdim"]
    total = _conv(3, widths[0])  # its 1x1 input convolution
    for i, (r, w, ratio, n_enc) in enumerate(zip(res, widths, ratios, config["enc"], strict=True)):
        kernel = 3 if r > 2 else 1
        total += n_enc * _cell(w, ratio, kernel)
        total += (n_enc if skips == "every block" else 1) * _conv(w, w)  # skip projections
        if i + 1 < len(res):  # the pooling convolution: kernel = stride
            total += _conv(w, widths[i + 1], r // res[i + 1])
    for i, (r, w, ratio, n_dec) in enumerate(zip(res, widths, ratios, config["dec"], strict=True)):
        kernel = 3 if r > 2 else 1
        total += w * r * r  # trainable_h at the coarsest resolution, the unpooling's scale_bias elsewhere
        if i + 1 < len(res):
            total += _conv(widths[i + 1], w)  # the unpooling's 1x1 convolution
        per_layer = _cell(w, ratio, kernel) + _cell(2 * w, ratio * 0.5, kernel, 0.5) + _cell(w, ratio, kernel, 2.0)
        per_layer += 2 * _conv(w, 2 * z) + _conv(z, w)  # posterior and prior Gaussian layers, z projection
        total += n_dec * per_layer
    return total + _conv(widths[0], 10 * NUM_MIXTURES)


def _architecture(name: str) -> Hyperparams:
    """The preset's architecture keys, the rest defaults: builds the model whatever other fields exist."""
    H = preset(name)
    return Hyperparams({**preset("tiny"), **{key: H[key] for key in ARCHITECTURE_KEYS}, "dataset": H.dataset})


# ----------------------------------------------------------------------------------------------------
# Parameter counts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VDVAE_PAPER_PARAMS_M))
def test_vdvae_presets_keep_the_paper_parameter_counts(name):
    assert round(parameter_count(preset(name)) / 1e6) == VDVAE_PAPER_PARAMS_M[name]


@pytest.mark.parametrize("name", [name for name, config in EFFICIENT_VDVAE.items() if config["paper"]])
def test_the_closed_form_count_of_efficient_vdvae_matches_its_paper(name):
    """The oracle below counts Efficient-VDVAE's own model: within 5% of the paper's Table 3 (all within 1%)."""
    config = EFFICIENT_VDVAE[name]
    assert efficient_vdvae_count(config, "every block") == pytest.approx(config["paper"], rel=0.05)


@pytest.mark.parametrize("name", sorted(EFFICIENT_VDVAE))
def test_effvdvae_presets_build_its_layers_with_a_skip_per_encoder_block(name):
    """The preset's model is Efficient-VDVAE's, every encoder block projecting its own skip, plus VDVAE's 3x3 (not
    1x1) input convolution and its final per-channel gain and bias; linked once per resolution (skip_wiring
    resolution), it loses exactly the projections of all but one block at each resolution."""
    config = EFFICIENT_VDVAE[name]
    width = config["width"][0]
    vdvae_parts = 3 * width * (9 - 1) + 2 * width
    assert parameter_count(_architecture(name)) == efficient_vdvae_count(config, "every block") + vdvae_parts
    per_resolution = Hyperparams({**_architecture(name), "skip_wiring": "resolution"})
    assert parameter_count(per_resolution) == efficient_vdvae_count(config, "per resolution") + vdvae_parts


def test_parameter_counts_print_on_the_command_line_within_5_percent_of_the_papers():
    """The counts `python -m vdvae_fast.hparams --params` prints are the models', and those of Efficient-VDVAE's C1
    presets (and of the imagenet64 baseline, its C2) lie within 5% of its paper's Table 3; VDVAE's cifar10 rounds
    to its paper's Table 2."""
    names = [
        "cifar10",
        *(f"effvdvae_{data}" for data in ("cifar10", "imagenet32", "imagenet64", "imagenet64_baseline")),
    ]
    result = subprocess.run(
        [sys.executable, "-m", "vdvae_fast.hparams", "--params", *names], capture_output=True, text=True, check=True
    )
    lines = result.stdout.splitlines()
    assert len(lines) == len(names)
    for name, line in zip(names, lines, strict=True):
        printed = int(line.split()[1].replace(",", ""))
        assert line.split()[0] == name and printed == parameter_count(_architecture(name))
        if name in EFFICIENT_VDVAE:
            assert printed == pytest.approx(EFFICIENT_VDVAE[name]["paper"], rel=0.05), name
        else:
            assert round(printed / 1e6) == VDVAE_PAPER_PARAMS_M[name]
    bad = subprocess.run(
        [sys.executable, "-m", "vdvae_fast.hparams", "--params", "nope"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


# Where Efficient-VDVAE's configs put the decoder layers beyond one per encoder block, transcribed from
# egs/<dataset>_C1.cfg (its _baseline configs hold the same lists): {resolution: (entry, extra layers)} from
# down_n_blocks_per_res, the entry counted from the first at that resolution (down_strides). Entry e at a resolution
# with n encoder blocks reads the skip of block n - 1 - e there (its reversed skip_list), and so do its extra layers.
RELEASED_EXTRA_LAYERS = {
    "effvdvae_cifar10": {16: (1, 4), 32: (1, 10)},
    "effvdvae_imagenet32": {8: (0, 10), 16: (0, 15)},
    "effvdvae_imagenet64": {8: (0, 10), 16: (0, 15), 64: (0, 6)},
}


def _released_wiring(name: str) -> list[tuple[int, int]]:
    """(resolution, encoder block at that resolution) read by each decoder layer of the released config, top first."""
    config, extra = EFFICIENT_VDVAE[name], RELEASED_EXTRA_LAYERS[name]
    wiring = []
    for res, n, m in reversed(list(zip(config["res"], config["enc"], config["dec"], strict=True))):
        entry, count = extra.get(res, (0, 0))
        assert n + count == m  # one entry per encoder block, plus the extra layers: Table 6's layers
        for e in range(n):
            wiring += [(res, n - 1 - e)] * (1 + (count if e == entry else 0))
    return wiring


@pytest.mark.parametrize("name", ["effvdvae_imagenet32", "effvdvae_imagenet64"])
def test_imagenet_presets_are_wired_as_the_released_configs(name):
    assert skip_sources(preset(name)) == _released_wiring(name)


def test_cifar10_preset_differs_from_the_released_wiring_only_where_its_extra_layers_sit():
    """The released cifar10 configs give the extra layers to the second entry at 16x16 and 32x32, skip_wiring block
    to the first: 4 and 10 layers there read the last encoder block instead of the one before it."""
    ours, released = skip_sources(preset("effvdvae_cifar10")), _released_wiring("effvdvae_cifar10")
    assert len(ours) == len(released) == 47 and set(ours) == set(released)
    first = {res: ours.index((res, n - 1)) for res, n in ((16, 7), (32, 12))}
    differing = {index for index, (a, b) in enumerate(zip(ours, released, strict=True)) if a != b}
    assert differing == {first[16] + j for j in range(1, 5)} | {first[32] + j for j in range(1, 11)}
    assert all(ours[i] == (ours[i][0], released[i][1] + 1) for i in differing)


# ----------------------------------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EFFICIENT_VDVAE))
def test_effvdvae_presets_hold_its_layer_counts_widths_and_latents(name):
    config, H = EFFICIENT_VDVAE[name], preset(name)
    vae_depth = sum(config["dec"])
    with torch.device("meta"):
        vae = VAE(_architecture(name))
    assert len(vae.decoder.dec_blocks) == vae_depth and len(vae.encoder.enc_blocks) == sum(config["enc"])
    for r, w, n_dec in zip(config["res"], config["width"], config["dec"], strict=True):
        blocks = [block for block in vae.decoder.dec_blocks if block.base == r]
        assert len(blocks) == n_dec and {block.width for block in blocks} == {w}
    assert H.zdim == config["zdim"] and H.image_size == config["res"][0]
    assert (H.width_change, H.skip_projection, H.skip_wiring) == ("conv", True, "block")
    assert (H.gaussian_heads, H.activation) == (True, "silu")
    middles = middle_widths(H)
    assert [middles[r] for r in config["res"]] == [
        int(w * q) for w, q in zip(config["width"], config["ratio"], strict=True)
    ]
    validate(_architecture(name))


# Efficient-VDVAE's optimization in its configs ([optimizer], [loss], [model] gradient smoothing, [train]).
EFFICIENT_TRAINING = {
    "optimizer": "adamax", "lr": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "warmup_iters": 100,
    "lr_schedule": "cosine", "lr_decay_start": 50000, "lr_decay_steps": 750000, "lr_min": 2e-4,
    "skip_threshold": 800.0, "ema_rate": 0.9999, "max_iters": 800000, "gradient_smoothing": True,
    "gradient_smoothing_beta": math.log(2.0), "dmol_log_scale_min": -250.0, "kl_warmup_start": 1e-4,
    "kl_warmup_iters": 5042,
}  # fmt: skip
# Its batch sizes ([train] batch_size), weight decay and output-layer scales per config.
EFFICIENT_PER_CONFIG = {
    "effvdvae_cifar10": {"n_batch": 32, "wd": 0.01, "dmol_gradient_smoothing": True},
    "effvdvae_imagenet32": {"n_batch": 64, "wd": 0.0, "dmol_gradient_smoothing": False},
    "effvdvae_imagenet64": {"n_batch": 32, "wd": 0.0, "dmol_gradient_smoothing": False},
    "effvdvae_cifar10_baseline": {"n_batch": 32, "wd": 0.01, "dmol_gradient_smoothing": True},
    "effvdvae_imagenet32_baseline": {"n_batch": 64, "wd": 0.0, "dmol_gradient_smoothing": True},
    "effvdvae_imagenet64_baseline": {"n_batch": 32, "wd": 0.0, "dmol_gradient_smoothing": True},
}


def _preset_data(name: str) -> dict:
    """Every value the preset names, its parents' first, including fields this build may not have yet."""
    parent, changes = _PRESETS[name]
    return {**(_preset_data(parent) if parent else {}), **changes}


@pytest.mark.parametrize("name", sorted(EFFICIENT_PER_CONFIG))
def test_effvdvae_presets_hold_its_optimization(name):
    data, H = _preset_data(name), preset(name)
    for key, value in {**EFFICIENT_TRAINING, **EFFICIENT_PER_CONFIG[name]}.items():
        assert (data[key] if key in data else FIELDS[key].default) == value, key
        assert H[key] == value, key
    assert all(key in FIELDS for key in data)  # no misspelt key


# ----------------------------------------------------------------------------------------------------
# The switches
# ----------------------------------------------------------------------------------------------------


def _tiny(**changes) -> Hyperparams:
    H = preset("tiny")
    H.update({"backend": "reference", **changes})
    return H


def _batch(size=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, size, size, 3, generator=gen)
    x_target = torch.randint(0, 256, (2, size, size, 3), generator=gen).float() / 127.5 - 1.0
    return x, x_target


EFFICIENT_SWITCHES = {
    "width_change": "conv",
    "skip_projection": True,
    "gaussian_heads": True,
    "custom_width_str": "4:24,1:32",
    "custom_bottleneck_str": "8:1.0,4:0.5",
    "activation": "silu",
}


def test_conv_width_change_pools_and_unpools_with_convolutions():
    with torch.device("meta"):
        vae = VAE(_tiny(**EFFICIENT_SWITCHES))
    shapes = {key: tuple(value.shape) for key, value in vae.state_dict().items()}
    # tiny: encoder 8x2,8d2,4x2,4d4,1x1 (widths 16, 24, 32), decoder 1x1,4m1,4x2,8m4,8x2
    assert shapes["encoder.pools.2.weight"] == (24, 16, 2, 2)
    assert shapes["encoder.pools.5.weight"] == (32, 24, 4, 4)
    assert shapes["decoder.dec_blocks.1.unpool.weight"] == (24, 32, 1, 1)
    assert shapes["decoder.dec_blocks.4.unpool.weight"] == (16, 24, 1, 1)
    assert {key for key in shapes if "pool" in key and "unpool" not in key} == {
        f"encoder.pools.{i}.{p}" for i in (2, 5) for p in ("weight", "bias")
    }
    assert {key for key in shapes if "skip_projections" in key} == {
        f"encoder.skip_projections.{r}.{p}" for r in (1, 4, 8) for p in ("weight", "bias")
    }
    assert shapes["decoder.dec_blocks.3.enc.c4.weight"] == (24, 12, 1, 1)  # posterior: stream-width features
    assert shapes["decoder.dec_blocks.3.enc.head.weight"] == (8, 24, 1, 1)  # then mean and scale of 4 latents
    assert shapes["decoder.dec_blocks.3.prior.c4.weight"] == (48, 12, 1, 1)  # prior: features and head input
    assert shapes["decoder.dec_blocks.3.prior.head.weight"] == (8, 24, 1, 1)
    assert shapes["decoder.dec_blocks.5.enc.c1.weight"] == (16, 32, 1, 1)  # bottleneck multiple 1.0 at 8x8


def _convs_after_silu(block, x):
    """c4(silu(c3(silu(c2(silu(c1(silu(x)))))))): the block's convolutions with activation silu."""
    for conv in (block.c1, block.c2, block.c3, block.c4):
        x = conv(torch.nn.functional.silu(x))
    return x


def test_conv_pooling_and_unpooling_compute_what_they_say():
    torch.manual_seed(0)
    vae = VAE(_tiny(**EFFICIENT_SWITCHES))
    encoder, seen = vae.encoder, {}
    encoder.enc_blocks[2].register_forward_hook(lambda module, args, out: seen.update(block_2=(args[0], out)))
    encoder.enc_blocks[3].register_forward_pre_hook(lambda module, args: seen.update(block_3=args[0]))
    activations = encoder(_batch()[0])
    x, out = seen["block_2"]  # 8d2: the last block at 8x8, then the pooling to 4x4
    torch.testing.assert_close(out, x + _convs_after_silu(encoder.enc_blocks[2], x))
    # The pooling convolution by hand: each output pixel sums its 2x2 patch against the weights.
    pool = encoder.pools["2"]
    patches = out.unfold(2, 2, 2).unfold(3, 2, 2)  # (B, C, 4, 4, 2, 2)
    pooled = torch.einsum("bchwij,ocij->bohw", patches, pool.weight) + pool.bias[:, None, None]
    torch.testing.assert_close(seen["block_3"], torch.where(pooled > 0, pooled, 0.1 * pooled))
    # The posteriors at 8x8 read the pooling block's own output (before pooling), projected.
    projection = encoder.skip_projections["8"]
    expected = torch.einsum("bchw,oc->bohw", out, projection.weight[:, :, 0, 0]) + projection.bias[:, None, None]
    torch.testing.assert_close(activations[8], expected)

    dec = vae.decoder.dec_blocks[4]  # 8m4
    state, upper = torch.randn(2, 16, 8, 8), torch.randn(2, 24, 4, 4)
    projected = torch.einsum("bchw,oc->bohw", upper, dec.unpool.weight[:, :, 0, 0]) + dec.unpool.bias[:, None, None]
    projected = torch.where(projected > 0, projected, 0.1 * projected)
    expected = state + projected.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(dec._mix(state, upper), expected)


def test_gaussian_heads_put_the_mean_and_scale_first():
    torch.manual_seed(0)
    vae = VAE(_tiny(**EFFICIENT_SWITCHES))
    prior = vae.decoder.dec_blocks[3].prior
    torch.nn.init.normal_(prior.c4.weight)  # undo the zero start, so that both halves carry values
    x = torch.randn(2, 24, 4, 4)
    h = _convs_after_silu(prior, x)
    out = prior(x)
    assert out.shape == (2, 8 + 24, 4, 4)
    torch.testing.assert_close(out[:, :8], prior.head(h[:, 24:]))
    torch.testing.assert_close(out[:, 8:], h[:, :24])


def test_every_switch_trains_and_samples():
    torch.manual_seed(0)
    vae = VAE(_tiny(**EFFICIENT_SWITCHES))
    out = vae(*_batch())
    out["elbo"].backward()
    assert torch.isfinite(out["elbo"])
    grads = {name: p.grad for name, p in vae.named_parameters()}
    for name in ("encoder.pools.2.weight", "encoder.skip_projections.8.weight",
                 "decoder.dec_blocks.4.unpool.weight", "decoder.dec_blocks.3.enc.head.weight"):  # fmt: skip
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert vae.forward_uncond_samples(2, t=0.5).shape == (2, 8, 8, 3)


# tiny's encoder 8x2,8d2,4x2,4d4,1x1 (blocks 0-6) and decoder 1x1,4m1,4x2,8m4,8x2 (layers 0-6) wired block by block:
# the encoder block whose output each decoder layer reads, by hand from skip_wiring's rule. conv: the blocks output
# at their own resolution (8: 0-2, 4: 3-5, 1: 6), one layer each, mirrored. pad: a pooling block outputs at the pooled
# resolution (8: 0-1, 4: 2-4, 1: 5-6): the first two layers at 8 share block 1, and at 1 block 5 is not read.
TINY_BLOCK_WIRING = {"conv": [6, 5, 4, 3, 2, 1, 0], "pad": [6, 4, 3, 2, 1, 1, 0]}
TINY_BLOCK_PROJECTIONS = {
    "conv": {"1_0", "4_0", "4_1", "4_2", "8_0", "8_1", "8_2"},
    "pad": {"1_1", "4_0", "4_1", "4_2", "8_0", "8_1"},
}


def _block_wired(width_change: str, projection: bool) -> Hyperparams:
    switches = EFFICIENT_SWITCHES if width_change == "conv" else {}
    return _tiny(**{**switches, "skip_projection": projection, "skip_wiring": "block"})


@pytest.mark.parametrize("width_change, projection", [("conv", True), ("pad", False), ("pad", True)])
def test_block_wiring_feeds_each_posterior_the_output_of_its_encoder_block(width_change, projection):
    torch.manual_seed(0)
    vae = VAE(_block_wired(width_change, projection))
    projections = vae.encoder.skip_projections
    assert set(projections or {}) == (TINY_BLOCK_PROJECTIONS[width_change] if projection else set())
    outputs, reads = [], []
    for block in vae.encoder.enc_blocks:
        block.register_forward_hook(lambda module, args, out: outputs.append(out))
    for layer in vae.decoder.dec_blocks:  # the posterior block reads [state, encoder activation]
        layer.enc.register_forward_pre_hook(lambda module, args, width=layer.width: reads.append(args[0][:, width:]))
    vae(*_batch())
    assert len(outputs) == len(reads) == 7
    for layer, block in enumerate(TINY_BLOCK_WIRING[width_change]):
        expected = outputs[block]
        if projection:
            res, k = vae.decoder.dec_blocks[layer].source
            conv = projections[f"{res}_{k}"]
            expected = torch.einsum("bchw,oc->bohw", expected, conv.weight[:, :, 0, 0]) + conv.bias[:, None, None]
        torch.testing.assert_close(reads[layer], expected, msg=f"decoder layer {layer}")


def test_block_wiring_trains_encodes_and_prunes():
    torch.manual_seed(0)
    vae = VAE(_block_wired("conv", True))
    x, x_target = _batch()
    torch.manual_seed(3)
    out = vae(x, x_target)
    out["elbo"].backward()
    for name, parameter in vae.encoder.skip_projections.named_parameters():  # none unused: DDP needs that
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    torch.manual_seed(3)  # the same seeds draw the same z: forward_get_latents holds forward's KL
    latents = vae.forward_get_latents(x)
    assert [tuple(layer["z"].shape[1:]) for layer in latents] == [(4, r, r) for r in (1, 4, 4, 4, 8, 8, 8)]
    kl = torch.stack([layer["kl"] for layer in latents], dim=1) / x[0].numel()
    torch.testing.assert_close(kl.mean(dim=0), out["kl_per_layer"])
    activations = vae.encoder(x)
    for kept in (False, True):  # latent pruning: keep no dimension (no KL) or every one (forward's KL)
        torch.manual_seed(3)
        _, stats = vae.decoder(activations, "reference", keep=[torch.tensor([kept])] * len(latents))
        pruned = torch.stack([layer["kl"] for layer in stats], dim=1) / x[0].numel()
        torch.testing.assert_close(pruned.mean(dim=0), out["kl_per_layer"] if kept else torch.zeros(7))


def test_block_wiring_needs_an_encoder_block_at_each_decoder_resolution():
    H = _tiny(skip_wiring="block", enc_blocks="8d2,4x2,4d4,1x1")  # pad: the only block at 8 outputs at 4
    with pytest.raises(ValueError, match=r"no encoder block of '8d2,4x2,4d4,1x1' outputs at resolution 8 \(blocks "
                       r"output at \[1, 4\]\): add one there, or use skip_wiring 'resolution'"):  # fmt: skip
        VAE(H)
    VAE(_tiny(skip_wiring="resolution", enc_blocks="8d2,4x2,4d4,1x1"))  # resolution wiring reads the input conv


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"custom_bottleneck_str": "8:0.01"}, "resolution 8 have width 16 and bottleneck multiple 0.01"),
        ({"custom_bottleneck_str": "8:1,x"}, "bad token 'x' at position 2"),
        ({"custom_bottleneck_str": "8:1,8:2"}, "resolution 8 already has a bottleneck multiple"),
        ({"width_change": "slice"}, "--width_change must be one of pad, conv"),
    ],
)
def test_bad_architecture_values_are_refused_clearly(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(_tiny(**changes))
        VAE(_tiny(**changes))


def test_parse_bottleneck_string():
    assert parse_bottleneck_string("") == {}
    assert parse_bottleneck_string("32:1.0,16:.5,8:2e-1") == {32: 1.0, 16: 0.5, 8: 0.2}
    for text in ("32:0", "32:-1", "0:1", "32"):
        with pytest.raises(ValueError, match="expected R:B with a resolution R >= 1 and a bottleneck multiple B"):
            parse_bottleneck_string(text)


def test_the_switches_are_architecture_keys_and_off_by_default():
    for key, default in [("width_change", "pad"), ("custom_bottleneck_str", ""), ("skip_projection", False),
                         ("skip_wiring", "resolution"), ("gaussian_heads", False), ("activation", "gelu")]:  # fmt: skip
        assert key in ARCHITECTURE_KEYS and FIELDS[key].default == default
    keys = list(FIELDS)
    assert keys.index("skip_wiring") == keys.index("skip_projection") + 1
    assert FIELDS["skip_wiring"].choices == ("resolution", "block")


# ----------------------------------------------------------------------------------------------------
# VDVAE unchanged
# ----------------------------------------------------------------------------------------------------

# Computed by the model before these switches existed (commit cf67460) on this repository's development CPU:
# the SHA-256 of the initial state dict (keys and float32 bytes) at torch.manual_seed(0), and, with one thread,
# the ELBO, distortion and rate (float.hex) and the SHA-256 of kl_per_layer's bytes (first 16 hex digits) of a
# forward pass on the fixed batch of _batch() after torch.manual_seed(2), reference backend. The same code as
# _fingerprint, run on that commit.
BEFORE_THE_SWITCHES = {
    "tiny": ("0cc88a67b9b6151570843d9ef3d13483eb9020e22784a29b5a2f15fe0426ac06",
             ("0x1.91d3600000000p+2", "0x1.91d2420000000p+2", "0x1.1d3d400000000p-14"), "e0ab97c757d7352d"),
    "demo": ("c130dde9447dae4c799da81ed7fef4b5675cf91a7267c5e05faf0f23033254ef",
             ("0x1.9367a80000000p+2", "0x1.9362500000000p+2", "0x1.55ffe60000000p-12"), "434c188e765d7e83"),
}  # fmt: skip


def _fingerprint(name: str):
    H = preset(name)
    H.backend = "reference"
    torch.manual_seed(0)
    vae = VAE(H)
    digest = hashlib.sha256()
    for key, value in vae.state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(2)
        out = vae(*_batch(H.image_size))
    finally:
        torch.set_num_threads(threads)
    losses = tuple(out[key].item().hex() for key in ("elbo", "distortion", "rate"))
    kl = hashlib.sha256(out["kl_per_layer"].detach().numpy().tobytes()).hexdigest()[:16]
    return digest.hexdigest(), losses, kl


@pytest.mark.parametrize("name", sorted(BEFORE_THE_SWITCHES))
def test_with_the_switches_off_the_model_is_bit_identical_to_before(name):
    assert _fingerprint(name) == BEFORE_THE_SWITCHES[name]


def test_hyperparameters_saved_before_the_switches_build_vdvae():
    """Checkpoints written before these fields existed carry no value for them: the model reads the defaults."""
    new = ("width_change", "custom_bottleneck_str", "skip_projection", "skip_wiring", "gaussian_heads", "activation")
    saved = Hyperparams({key: value for key, value in _tiny().items() if key not in new})
    with torch.device("meta"):
        before, now = VAE(saved), VAE(_tiny())
    assert {k: v.shape for k, v in before.state_dict().items()} == {k: v.shape for k, v in now.state_dict().items()}
