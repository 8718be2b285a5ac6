"""Presets (released values, inheritance), the attribute dict, the layer-string grammar and the CLI."""

from __future__ import annotations

import argparse
import pickle
import re

import pytest

from vdvae_fast import data, model, ops
from vdvae_fast.hparams import (
    DEFAULTS,
    FIELDS,
    GRAD_CHECKPOINT_MODES,
    HELP,
    PRECISIONS,
    PRESETS,
    Hyperparams,
    add_arguments,
    changed_since,
    check_layer_strings,
    parse_args,
    parse_channel_string,
    parse_layer_string,
    preset,
    reference_table,
    resolution_widths,
    validate,
)

# shared/vdvae-presets.md: what each released preset must hold (inherited values included).
RELEASED = {
    "cifar10": dict(
        width=384, zdim=16, bottleneck_multiple=0.25, lr=0.0002, wd=0.01, warmup_iters=100, n_batch=16,
        ema_rate=0.9999, grad_clip=200.0, skip_threshold=400.0, num_mixtures=10, no_bias_above=64,
        adam_beta1=0.9, adam_beta2=0.9, image_size=32, num_bits=8, dataset="cifar10",
        enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
        dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21",
    ),
    "imagenet32": dict(
        width=512, lr=0.00015, n_batch=8, ema_rate=0.999, grad_clip=200.0, skip_threshold=300.0, wd=0.01,
        warmup_iters=100, image_size=32, dataset="imagenet32",
        enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
        dec_blocks="1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40",
    ),
    "imagenet64": dict(
        width=512, n_batch=4, grad_clip=220.0, skip_threshold=380.0, wd=0.01, image_size=64, dataset="imagenet64",
        enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
        dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
    ),
    "ffhq256": dict(
        n_batch=1, grad_clip=130.0, skip_threshold=180.0, no_bias_above=64, image_size=256, num_bits=5,
        dataset="ffhq_256",
        enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
    ),
    "ffhq1024": dict(
        num_mixtures=2, width=16, lr=0.00007, grad_clip=360.0, skip_threshold=500.0, image_size=1024, num_bits=8,
        n_batch=1, dataset="ffhq_1024",
        custom_width_str="512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512",
        enc_blocks="1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,8x5,8d2,"
        "4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,512m256,1024m512",
    ),
}  # fmt: skip

TRAINING_KEYS = (
    "lr", "wd", "n_batch", "ema_rate", "skip_threshold", "grad_clip", "warmup_iters", "dataset", "image_size",
    "image_channels", "num_epochs", "iters_per_print", "iters_per_save", "iters_per_ckpt", "iters_per_images",
    "epochs_per_eval", "adam_beta1", "adam_beta2", "seed", "backend", "grad_checkpoint", "channels_last",
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_hold_the_released_values(name):
    H = preset(name)
    for key, value in RELEASED[name].items():
        assert H[key] == value, f"{name}.{key}"


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_has_the_training_keys_and_a_consistent_network(name):
    H = preset(name)
    missing = [key for key in TRAINING_KEYS if key not in H]
    assert not missing
    check_layer_strings(H)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="unknown preset 'imagenet128'") as info:
        preset("imagenet128")
    for name in ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024", "demo", "tiny"):
        assert name in str(info.value)


def test_presets_are_fresh_copies():
    H = preset("cifar10")
    H.width = 1
    assert preset("cifar10").width == 384


def test_hyperparams_attribute_dict():
    H = Hyperparams(width=3)
    H.zdim = 4
    assert H["zdim"] == 4 and H.width == 3
    assert H.get("missing", 7) == 7
    with pytest.raises(AttributeError, match="'missing'"):
        H.missing  # noqa: B018
    del H.zdim
    assert "zdim" not in H
    assert isinstance(H.copy(), Hyperparams)
    assert pickle.loads(pickle.dumps(H)) == H


def test_parse_layer_string_expands_blocks():
    assert parse_layer_string("32x2,32d2,16,16d4,1x1", "encoder") == [
        (32, None), (32, None), (32, 2), (16, None), (16, 4), (1, None)
    ]  # fmt: skip
    assert parse_layer_string("1x1,4m1,4x2,8m4", "decoder") == [(1, None), (4, 1), (4, None), (4, None), (8, 4)]
    assert len(parse_layer_string(preset("cifar10").enc_blocks)) == 33
    assert len(parse_layer_string(preset("imagenet64").dec_blocks)) == 75


@pytest.mark.parametrize(
    "text, kind, token, position",
    [
        ("32x11,32y2,16x6", None, "32y2", 2),
        ("32x11,,16x6", None, "", 2),
        ("32x11,16x6,", None, "", 3),
        ("32x0", None, "32x0", 1),
        ("32x2,32d3", "encoder", "32d3", 2),
        ("1x1,4m8", "decoder", "4m8", 2),
        ("1x1,4m4", "decoder", "4m4", 2),
        ("32x2,16m8", "encoder", "16m8", 2),
        ("1x1,4d2", "decoder", "4d2", 2),
        ("0x3", None, "0x3", 1),
        ("x3", None, "x3", 1),
        ("32x2.5", None, "32x2.5", 1),
    ],
)
def test_malformed_layer_strings_point_at_the_token(text, kind, token, position):
    with pytest.raises(ValueError, match=f"bad token '{token}' at position {position} ") as info:
        parse_layer_string(text, kind)
    assert repr(text) in str(info.value)


def test_layer_string_must_be_a_nonempty_string():
    with pytest.raises(ValueError, match="empty"):
        parse_layer_string("", "encoder")
    with pytest.raises(ValueError, match="kind"):
        parse_layer_string("1x1", "middle")


def test_parse_channel_string():
    assert parse_channel_string("") == {}
    assert parse_channel_string("32:64,16:128") == {32: 64, 16: 128}
    for text, token, position in [("32:64,16", "16", 2), ("32:64,16:0", "16:0", 2), ("a:1", "a:1", 1)]:
        with pytest.raises(ValueError, match=f"bad token '{token}' at position {position} "):
            parse_channel_string(text)
    with pytest.raises(ValueError, match="already has a width"):
        parse_channel_string("32:64,32:128")


def test_resolution_widths_follow_custom_width_str():
    widths = resolution_widths(preset("ffhq1024"))
    assert widths[1024] == 16 and widths[512] == 32 and widths[256] == 64 and widths[128] == 512 and widths[1] == 512
    assert set(resolution_widths(preset("cifar10")).values()) == {384}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"enc_blocks": "16x2,16d2,8x2,8d8,1x1"}, "encoder block 0 .* resolution 16, .*image_size 32"),
        ({"enc_blocks": "32x2,32d2,8x2,8d8,1x1"}, "encoder block 3 .* runs at resolution 8.* activation there has"),
        ({"dec_blocks": "1x1,4m1,4x2,8m4,8x5,16m8,16x10"}, "ends at resolution 16, not image_size 32"),
        ({"dec_blocks": "1x1,8m4,32m16"}, "mixes in resolution 4 before any block ran there"),
        ({"dec_blocks": "1x1,2m1,32m2"}, "resolution 2, which the encoder never produces"),
    ],
)
def test_inconsistent_layer_strings(changes, message):
    H = preset("cifar10")
    H.update(changes)
    with pytest.raises(ValueError, match=message):
        check_layer_strings(H)


def test_command_line_overrides_are_typed():
    H = parse_args(
        ["--hps", "cifar10", "--lr", "0.001", "--channels_last", "true", "--zdim", "8", "--image_size", "16"]
    )
    assert H.lr == 0.001 and H.channels_last is True and H.zdim == 8 and H.image_size == 16
    assert H.width == 384 and H.grad_checkpoint == "none"
    with pytest.raises(SystemExit):
        parse_args(["--hps", "nope"])


# ----------------------------------------------------------------------------------------------------
# The field table, writes, validate
# ----------------------------------------------------------------------------------------------------


def test_defaults_help_and_cli_come_from_the_field_table():
    assert list(DEFAULTS) == list(FIELDS) and list(HELP) == list(FIELDS)
    assert all(DEFAULTS[key] == field.default and HELP[key] == field.help for key, field in FIELDS.items())
    actions = {action.dest: action for action in add_arguments(argparse.ArgumentParser())._actions}
    for key, field in FIELDS.items():
        assert actions[key].help == field.help and actions[key].default is None, key
        assert actions[key].choices == field.choices, key
    table = reference_table()
    assert all(f"`--{key}`" in table for key in FIELDS)


def test_every_enumeration_is_the_one_its_owner_defines():
    assert FIELDS["backend"].choices == ops.BACKENDS
    assert FIELDS["dataset"].choices == data.DATASETS
    assert FIELDS["grad_checkpoint"].choices == GRAD_CHECKPOINT_MODES == model.GRAD_CHECKPOINT_MODES
    assert FIELDS["precision"].choices == tuple(PRECISIONS) == ("fp32", "bf16", "fp16")


def test_command_line_choices_are_checked_and_dataset_aliases_accepted(capsys):
    assert parse_args(["--hps", "tiny", "--dataset", "FFHQ256"]).dataset == "ffhq_256"
    for flag, value in (("--dataset", "mnist"), ("--backend", "fast"), ("--precision", "fp8")):
        with pytest.raises(SystemExit) as info:
            parse_args(["--hps", "tiny", flag, value])
        assert info.value.code == 2 and f"invalid choice: '{value}'" in capsys.readouterr().err


def test_unknown_keys_are_refused_on_write():
    H = preset("tiny")
    with pytest.raises(AttributeError, match="unknown hyperparameter 'widht'"):
        H.widht = 3
    with pytest.raises(AttributeError, match="unknown hyperparameter 'lr_'"):
        H["lr_"] = 0.1
    with pytest.raises(AttributeError, match="unknown hyperparameter 'zdims'"):
        H.update(zdims=2)
    with pytest.raises(AttributeError, match="unknown hyperparameter 'x'"):
        Hyperparams(width=3, x=1)
    assert "widht" not in H and "lr_" not in H and "zdims" not in H


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"precision": "fp8"}, "--precision must be one of fp32, bf16, fp16, got 'fp8'"),
        ({"backend": "fast"}, "--backend must be one of reference, original, triton, cuda, cpu, auto"),
        ({"grad_checkpoint": "some"}, "--grad_checkpoint must be one of none, decoder, all"),
        ({"dataset": "mnist"}, "--dataset must be one of cifar10"),
        ({"iters_per_save": 0}, "--iters_per_save must be an integer at least 1, got 0"),
        ({"n_batch": 0}, "--n_batch must be an integer at least 1, got 0"),
        ({"test_eval": True}, "--test_eval evaluates trained weights: give --restore_ema_path or --restore_path"),
    ],
)
def test_validate_names_the_flag_and_what_is_valid(changes, message):
    H = preset("tiny")
    H.update(changes)
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(H)


def test_validate_accepts_every_preset_and_dataset_aliases():
    for name in PRESETS:
        validate(preset(name))
    H = preset("tiny")
    H.dataset = "ffhq256"
    validate(H)


def test_changed_since_separates_architecture_from_the_rest():
    saved, now = preset("tiny"), preset("tiny")
    now.update(width=32, lr=0.1, max_iters=5, device="cpu")
    architecture, others = changed_since(saved, now)
    assert architecture == {"width": (16, 32)}
    assert others == {"lr": (saved.lr, 0.1)}  # max_iters and device say where this invocation runs


def test_a_key_a_checkpoint_predates_counts_as_its_default():
    current = preset("tiny")
    saved = {key: value for key, value in current.items() if key not in ("width_change", "gradient_smoothing")}
    assert changed_since(saved, current) == ({}, {})
    current["width_change"] = "conv"
    assert changed_since(saved, current)[0] == {"width_change": ("pad", "conv")}
