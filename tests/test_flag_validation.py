"""Every numeric hyperparameter has a valid range in the field table, and validate refuses values outside it
with the flag's name and the range, before the training program makes its run folder."""

from __future__ import annotations

import math
import re

import pytest

from vdvae_fast.hparams import FIELDS, PRESETS, Range, preset, validate
from vdvae_fast.runtime import resolve_device, setup_runtime
from vdvae_fast.training import main

NAN, INF = math.nan, math.inf

# (flag, bad value, what the message must say is valid): the values that were accepted and ruined runs or
# crashed at the first step, then one bad value for every other numeric field.
REFUSED = [
    ("grad_clip", -1.0, "a finite number above 0"),
    ("grad_clip", NAN, "a finite number above 0"),
    ("ema_rate", 2.0, "a number in [0, 1)"),
    ("ema_rate", -1.0, "a number in [0, 1)"),
    ("lr", INF, "a finite number above 0"),
    ("warmup_iters", NAN, "a finite number at least 0"),
    ("max_iters", -5, "an integer at least 0"),
    ("num_threads", -1, "an integer at least 1"),
    ("zdim", 0, "an integer at least 1"),
    ("width", 0, "an integer at least 1"),
    ("num_mixtures", 0, "an integer at least 1"),
    ("dmol_log_scale_min", 0.5, "a number in [-1000, 0], or -inf"),
    ("bottleneck_multiple", 0.0, "a finite number above 0"),
    ("num_images_visualize", -1, "an integer at least 0"),
    ("skip_threshold", -2.0, "a finite number above 0, or -1"),
    ("skip_threshold", NAN, "a finite number above 0, or -1"),
    ("image_size", 0, "an integer at least 1"),
    ("valid_holdout", 0, "an integer at least 1"),
    ("num_bits", 9, "an integer in [1, 8]"),
    ("wd", -0.1, "a finite number at least 0"),
    ("adam_beta1", 1.0, "a number in [0, 1)"),
    ("adam_beta2", NAN, "a number in [0, 1)"),
    ("n_batch", 2.5, "an integer at least 1"),
    ("num_epochs", 0, "an integer at least 1"),
    ("seed", -1, "an integer in [0, 4294967295]"),
    ("temperature", INF, "a finite number at least 0"),
    ("iters_per_ckpt", 0, "an integer at least 1"),
    ("iters_per_print", -3, "an integer at least 1"),
    ("iters_per_images", 0, "an integer at least 1"),
    ("iters_per_save", 0, "an integer at least 1"),
    ("epochs_per_eval", 0, "an integer at least 1"),
    ("epochs_per_probe", 0, "an integer at least 1"),
    ("epochs_per_eval_save", 0, "an integer at least 1"),
    ("num_variables_visualize", -1, "an integer at least 0"),
    ("num_temperatures_visualize", 5, "an integer in [0, 4]"),
    ("num_workers", -1, "an integer at least 0"),
    ("eval_max_images", -1, "an integer at least 0"),
    ("iw_samples", -1, "an integer at least 0"),
    ("no_bias_above", -1, "an integer at least 0"),
    ("gradient_smoothing_beta", 0.0, "a finite number above 0"),
    # the training switches
    ("lr_decay_start", -1, "an integer at least 0"),
    ("lr_decay_steps", 0, "an integer at least 1"),
    ("lr_decay_rate", 1.0, "a number in (0, 1)"),
    ("lr_min", -1e-4, "a finite number at least 0"),
    ("kl_warmup_iters", 2.5, "an integer at least 0"),
    ("kl_warmup_start", 1.5, "a number in [0, 1]"),
    ("spectral_reg", INF, "a finite number at least 0"),
    ("spectral_power_iters", 0, "an integer at least 1"),
    ("skip_watchdog_iters", -1, "an integer at least 0"),
    ("skip_watchdog_threshold_factor", 1.0, "a finite number above 1"),
    ("skip_watchdog_lr_factor", 0.0, "a number in (0, 1)"),
]


def test_every_numeric_field_has_a_valid_range_and_a_refused_value_here():
    numeric = {
        key
        for key, field in FIELDS.items()
        if field.choices is None and not isinstance(field.default, (bool, str)) and field.parser() in (int, float)
    }
    assert numeric == {key for key, field in FIELDS.items() if field.valid is not None}
    assert numeric == {flag for flag, _, _ in REFUSED}


@pytest.mark.parametrize("flag, value, valid", REFUSED, ids=[f"{f}={v}" for f, v, _ in REFUSED])
def test_validate_refuses_a_value_outside_the_range_and_says_what_is_valid(flag, value, valid):
    H = preset("tiny")
    H[flag] = value
    with pytest.raises(ValueError, match=re.escape(f"--{flag} must be {valid}, got {value!r}")):
        validate(H)


def test_range_membership_at_its_ends():
    fraction = Range(0.0, 1.0, high_open=True)
    assert 0.0 in fraction and 0.999 in fraction and 1.0 not in fraction and NAN not in fraction
    skip = Range(0.0, low_open=True, high_open=True, also=(-1,))
    assert -1 in skip and 1e-9 in skip and 0.0 not in skip and INF not in skip and -0.5 not in skip
    integers = Range(1, integer=True)
    assert 1 in integers and 2.0 not in integers and True not in integers and "3" not in integers


def test_unset_optional_fields_and_every_preset_pass():
    for name in PRESETS:
        H = preset(name)
        assert H.max_iters is None or H.max_iters >= 0
        validate(H)


def test_a_bottleneck_that_leaves_no_channel_is_refused():
    H = preset("tiny")  # width 16
    H.bottleneck_multiple = 0.05
    with pytest.raises(ValueError, match=re.escape("--bottleneck_multiple 0.05 leaves no channel") + ".*0.0625"):
        validate(H)
    H.custom_width_str = "8:16,4:2,1:16"
    H.bottleneck_multiple = 0.25
    with pytest.raises(ValueError, match="blocks of width 2"):
        validate(H)


@pytest.mark.parametrize("name", ["bogus", "cuda:x", "gpu", "", "cpu:0 "])
def test_a_bogus_device_is_refused_with_the_valid_names(name):
    H = preset("tiny")
    H.device = name
    message = re.escape(f"--device must be auto, cpu, cuda or cuda:N (N a GPU index), got {name!r}")
    with pytest.raises(ValueError, match=message):
        validate(H)
    if name:
        with pytest.raises(ValueError, match=message):
            resolve_device(name)


def test_setup_runtime_refuses_a_bad_thread_count():
    with pytest.raises(ValueError, match=re.escape("--num_threads must be an integer at least 1, got -1")):
        setup_runtime("cpu", -1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--grad_clip", "-1"], "--grad_clip must be a finite number above 0, got -1.0"),
        (["--ema_rate", "2"], "--ema_rate must be a number in [0, 1), got 2.0"),
        (["--max_iters", "-5"], "--max_iters must be an integer at least 0, got -5"),
        (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
        (["--num_threads", "-1"], "--num_threads must be an integer at least 1, got -1"),
    ],
)
def test_the_training_program_exits_2_with_one_line_before_making_its_run_folder(tmp_path, capsys, argv, message):
    status = main(["--hps", "tiny", "--save_dir", str(tmp_path / "runs"), *argv])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "runs").exists()
