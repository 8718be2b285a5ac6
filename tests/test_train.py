"""The training program end to end on CPU: every dataset format through the trainer, the demo preset learning,
DDP equivalence, exact resume, gradient skipping, SIGTERM, precision flags and the errors a user can meet.

Models are the `tiny` preset's (or the same shape scaled to a dataset's resolution), data are small files
written in each real format. Tiny models run fastest on one thread, so the tests pin torch to one.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vdvae_fast import checkpoint, data, ops, sample, train
from vdvae_fast.checkpoint import load_checkpoint
from vdvae_fast.hparams import DEFAULTS, HELP
from vdvae_fast.training.cli import resume_command

ROOT = Path(__file__).resolve().parents[1]

# Each resolution's network: the tiny preset's widths with pooling and mixins reaching that resolution fast.
ARCHITECTURES = {
    32: ("32x1,32d4,8x1,8d2,4x1,4d4,1x1", "1x1,4m1,4x1,8m4,8x1,32m8"),
    64: ("64x1,64d8,8x1,8d2,4x1,4d4,1x1", "1x1,4m1,8m4,64m8"),
    256: ("256x1,256d8,32d8,4x1,4d4,1x1", "1x1,4m1,32m4,256m32"),
    1024: ("1024x1,1024d16,64d16,4d4,1x1", "1x1,4m1,64m4,1024m64"),
}
QUIET = ["--iters_per_print", "1", "--iters_per_images", "100000", "--iters_per_save", "100000"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_network(size: int) -> list[str]:
    enc, dec = ARCHITECTURES[size]
    return ["--enc_blocks", enc, "--dec_blocks", dec, "--width", "8", "--zdim", "2", "--bottleneck_multiple", "0.5",
            "--num_mixtures", "2", "--custom_width_str", "", "--no_bias_above", "4"]  # fmt: skip


def run(argv: list[str]) -> dict:
    return train.run(train.parse_args(argv))


def records(run_dir: Path, kind: str | None = None) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in lines if kind is None or r.get("type") == kind]


def write_png_folder(root: Path, count: int = 40, size: int = 8, seed: int = 0) -> Path:
    """Smooth random images (a colour ramp plus noise), like photographs in having structure to learn."""
    rng = np.random.RandomState(seed)
    root.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 1, size)[None, :, None]
    for i in range(count):
        base = rng.randint(0, 200, size=(1, 1, 3)) + 55 * ramp
        image = np.clip(base + rng.randint(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return root


def folder_run(tmp_path: Path, desc: str, *extra: str) -> list[str]:
    """The tiny preset on a folder of 8x8 PNGs: 36 training images (9 batches of 4), 4 validation images."""
    data_root = tmp_path / "pngs"
    if not data_root.exists():
        write_png_folder(data_root)
    return ["--hps", "tiny", "--dataset", "folder", "--image_size", "8", "--data_root", str(data_root),
            "--save_dir", str(tmp_path / "runs"), "--desc", desc, "--device", "cpu", "--num_epochs", "10", *QUIET, *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Every preset's data path
# --------------------------------------------------------------------------------------------


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def _write_cifar(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for seed, name in enumerate(names):
        rows = _images(4, 32, seed).transpose(0, 3, 1, 2).reshape(4, -1)  # CIFAR's channel-major rows
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [0] * 4}, f)


def _write_ffhq1024(root: Path) -> None:
    ramp = np.linspace(0, 255, 1024, dtype=np.float32)
    for split, count in (("train", 2), ("valid", 1)):
        for i in range(count):
            image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.float32(40 * i)), -1)
            path = root / "ffhq1024" / split / "0" / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.astype(np.uint8)).save(path, compress_level=1)


def _write_npy(root: Path, names: tuple[str, ...], size: int, count: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(names):
        np.save(root / name, _images(count, size, seed))


# preset -> (writer of files in the real format, image size, extra flags)
DATA_PATHS = {
    "cifar10": (_write_cifar, 32, ["--valid_holdout", "4"]),
    "imagenet32": (lambda r: _write_npy(r, ("imagenet32-train.npy", "imagenet32-valid.npy"), 32, 8), 32,
                   ["--valid_holdout", "2"]),
    "imagenet64": (lambda r: _write_npy(r, ("imagenet64-train.npy", "imagenet64-valid.npy"), 64, 6), 64,
                   ["--valid_holdout", "2"]),
    "ffhq256": (lambda r: _write_npy(r, ("ffhq-256.npy",), 256, 5), 256, ["--valid_holdout", "2"]),
    "ffhq1024": (_write_ffhq1024, 1024, ["--n_batch", "1", "--num_temperatures_visualize", "0"]),  # seconds a step
    "folder": (lambda r: write_png_folder(r, count=12, size=20), 8, ["--dataset", "folder", "--image_size", "8"]),
}  # fmt: skip


@pytest.mark.parametrize("preset", list(DATA_PATHS))
def test_every_dataset_format_trains_evaluates_and_saves(tmp_path, preset):
    writer, size, extra = DATA_PATHS[preset]
    writer(tmp_path / "data")
    network = tiny_network(size) if size in ARCHITECTURES else []
    hps = "tiny" if preset == "folder" else preset
    steps = 1 if size == 1024 else 2
    summary = run(["--hps", hps, "--data_root", str(tmp_path / "data"), "--save_dir", str(tmp_path), "--desc", "r",
                   "--n_batch", "2", "--max_iters", str(steps), "--device", "cpu", *QUIET, *network, *extra])  # fmt: skip

    run_dir = tmp_path / "r"
    assert summary["step"] == steps and summary["interrupted"] is None
    losses = records(run_dir, "train_loss")
    assert [r["step"] for r in losses] == list(range(1, steps + 1)) and all(np.isfinite(r["elbo"]) for r in losses)
    evaluation = records(run_dir, "eval_loss")[-1]
    assert evaluation["step"] == steps
    assert evaluation["nonfinite_batches"] == 0 and np.isfinite(evaluation["elbo_bpd"])
    assert load_checkpoint(run_dir / "latest.pt")["step"] == steps
    with Image.open(summary["images"]) as grid:
        pitch = size * math.ceil(sample.CELL_PIXELS / size) + sample.GAP_PIXELS  # an upscaled image and its gap
        assert (grid.size[0] + sample.GAP_PIXELS) % pitch == 0 and (grid.size[1] + sample.GAP_PIXELS) % pitch == 0
    if preset == "ffhq256":  # 5-bit targets: the loss's bin width follows the data
        assert load_checkpoint(run_dir / "latest.pt")["hparams"]["num_bits"] == 5


def test_builtin_photographs_tiny_preset(tmp_path, small_builtin):
    summary = run(["--hps", "tiny", "--save_dir", str(tmp_path), "--max_iters", "2", "--device", "cpu", *QUIET])
    assert summary["step"] == 2 and np.isfinite(summary["eval"]["elbo_bpd"])


@pytest.fixture
def small_builtin(monkeypatch):
    """The built-in photographs with fewer patches, so a test's evaluation takes a second."""
    full = data.builtin_patches

    def fewer(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        train_patches, valid_patches = full(size)
        step_train, step_valid = max(1, len(train_patches) // 2048), max(1, len(valid_patches) // 512)
        return train_patches[::step_train], valid_patches[::step_valid]  # spread over every photograph

    monkeypatch.setattr(data, "builtin_patches", fewer)


# --------------------------------------------------------------------------------------------
# The demo preset learns
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_preset_learns(tmp_path, small_builtin):
    """With the backend a user gets (the fused cpu kernels where built, else the reference formulas); the other
    backend computes the same losses and gradients (tests/test_model.py::test_fused_and_reference_backends_agree)."""
    backend = "cpu" if ops.extension_built() else "reference"
    H = train.parse_args(["--hps", "demo", "--save_dir", str(tmp_path), "--backend", backend, "--device", "cpu",
                          "--max_iters", "150", "--num_epochs", "2", "--iters_per_images", "100000"])  # fmt: skip
    runtime = train.setup_runtime(H.device, H.num_threads)
    with train.prepare_run_directory(H, runtime) as folder:
        trainer = train.Trainer(H, runtime, train.RunLog(folder.path), folder.path)
        before = trainer.evaluate("valid")["elbo_bpd"]
        summary = trainer.train()
    after = summary["eval"]["elbo_bpd"]
    assert summary["step"] == 150
    assert 8.0 < before < 10.0, before
    assert after < before - 1.5, f"validation bits/dim went from {before:.3f} to {after:.3f} only"


# --------------------------------------------------------------------------------------------
# Resume, DDP, skipping, signals
# --------------------------------------------------------------------------------------------


def _losses(run_dir: Path) -> dict[int, tuple[float, float, float, float]]:
    return {r["step"]: (r["elbo"], r["rate"], r["distortion"], r["grad_norm"]) for r in records(run_dir, "train_loss")}


def test_resume_continues_the_same_loss_curve(tmp_path):
    """Stopped mid-epoch and resumed, a run reproduces the uninterrupted run step by step, bit for bit,
    across the epoch boundary (9 batches per epoch) and its evaluation."""
    whole = run(folder_run(tmp_path, "whole", "--max_iters", "14"))
    run(folder_run(tmp_path, "parts", "--max_iters", "5"))
    resumed = run(folder_run(tmp_path, "parts", "--max_iters", "14",
                             "--restore_path", str(tmp_path / "runs" / "parts" / "latest.pt")))  # fmt: skip

    expected, got = _losses(tmp_path / "runs" / "whole"), _losses(tmp_path / "runs" / "parts")
    assert sorted(expected) == sorted(got) == list(range(1, 15))
    assert got == expected
    assert resumed["step"] == whole["step"] == 14 and resumed["epoch"] == whole["epoch"] == 1
    a, b = (load_checkpoint(tmp_path / "runs" / d / "latest.pt") for d in ("whole", "parts"))
    for key in ("model", "ema"):
        assert all(torch.equal(a[key][name], b[key][name]) for name in a[key])
    assert resumed["eval"]["elbo"] == whole["eval"]["elbo"]


def _noise_free_sample_and_kl(
    mu_q, logsigma_q, mu_p, logsigma_p, *, seed=None, backend="auto", kl_estimator="analytic", **parametrization
):
    """z = mu_q: the same computation for any batch split, so one process and two can be compared exactly."""
    kl = ops.gaussian_kl(mu_q, logsigma_q, mu_p, logsigma_p, **parametrization, backend=backend)
    return mu_q, kl.flatten(1).sum(1)


def _ddp_worker(rank: int, world_size: int, port: int, argv: list[str]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    ops.sample_and_kl = _noise_free_sample_and_kl
    train.run(train.parse_args(argv))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_on_the_doubled_batch(tmp_path, monkeypatch):
    """gloo DDP: rank r takes every other image of the same shuffled order, gradients are averaged, the skip
    decision and the metrics are reduced: the run equals one process with twice the batch."""
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), folder_run(tmp_path, "ddp", "--n_batch", "2", "--max_iters", "6")), nprocs=2
    )
    monkeypatch.setattr(ops, "sample_and_kl", _noise_free_sample_and_kl)
    run(folder_run(tmp_path, "single", "--n_batch", "4", "--max_iters", "6"))

    two, one = _losses(tmp_path / "runs" / "ddp"), _losses(tmp_path / "runs" / "single")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        np.testing.assert_allclose(two[step], one[step], rtol=1e-4, err_msg=f"step {step}")
    a, b = (load_checkpoint(tmp_path / "runs" / d / "latest.pt") for d in ("ddp", "single"))
    assert a["world_size"] == 2 and len(a["rng"]) == 2
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-4, atol=1e-6)
    ddp_eval, single_eval = (
        records(tmp_path / "runs" / "ddp", "eval_loss"),
        records(tmp_path / "runs" / "single", "eval_loss"),
    )
    assert ddp_eval[-1]["n_images"] == single_eval[-1]["n_images"] == 4
    np.testing.assert_allclose(ddp_eval[-1]["elbo"], single_eval[-1]["elbo"], rtol=1e-4)


def _failing_save_worker(rank: int, world_size: int, port: int, argv: list[str], outcome: str) -> None:
    """A DDP rank whose rank 0 finds the disk full at its first checkpoint; each rank writes how it ended."""
    from vdvae_fast.training import trainer

    def full_disk(state, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if rank == 0:
        trainer.save_checkpoint = full_disk
    try:
        _ddp_worker(rank, world_size, port, argv)
        ended = "finished"
    except Exception as err:  # noqa: BLE001  (the test reads how each rank ended)
        ended = f"{type(err).__name__}: {err}"
    Path(outcome.format(rank=rank)).write_text(ended)


def test_a_checkpoint_rank_0_cannot_write_ends_every_rank(tmp_path):
    """Rank 0 alone writes checkpoints: when that fails, the other ranks must end with the same error, not train
    on into a collective that rank 0 never joins."""
    outcome = str(tmp_path / "rank{rank}.txt")
    argv = folder_run(tmp_path, "full", "--n_batch", "2", "--max_iters", "6", "--iters_per_ckpt", "2")
    context = torch.multiprocessing.spawn(
        _failing_save_worker, args=(2, _free_port(), argv, outcome), nprocs=2, join=False
    )
    deadline = time.monotonic() + 300
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("a rank was still running 300 s after rank 0 failed to write its checkpoint")
    ends = [Path(outcome.format(rank=r)).read_text() for r in range(2)]
    assert ends[0].startswith("OutputError: cannot write") and "iter-2.pt" in ends[0], ends[0]
    assert ends[1] == f"OutputError: rank 0 {ends[0].removeprefix('OutputError: ')}", ends[1]
    assert "no checkpoint of this run was written yet" in ends[0]


def test_nan_step_is_skipped_counted_and_training_goes_on(tmp_path, monkeypatch):
    from vdvae_fast.model import VAE

    forward = VAE.forward
    calls = {"train": 0}

    def poisoned(self, x, x_target, backend=None):
        if torch.is_grad_enabled():
            calls["train"] += 1
            if calls["train"] == 3:
                x = x * float("nan")
        return forward(self, x, x_target, backend)

    monkeypatch.setattr(VAE, "forward", poisoned)
    summary = run(folder_run(tmp_path, "nan", "--max_iters", "6", "--iters_per_ckpt", "1"))

    assert summary["step"] == 6 and summary["skipped_updates"] == 1
    losses = {r["step"]: r for r in records(tmp_path / "runs" / "nan", "train_loss")}
    assert losses[3]["skipped_updates"] == 1 and losses[3]["distortion_nans"] == 1
    assert not np.isfinite(losses[3]["elbo"]) and losses[3]["skipped_total"] == 1
    assert all(np.isfinite(losses[s]["elbo"]) and losses[s]["skipped_updates"] == 0 for s in (1, 2, 4, 5, 6))
    before, skipped, after = (load_checkpoint(tmp_path / "runs" / "nan" / f"iter-{s}.pt") for s in (2, 3, 4))
    for key in ("model", "ema"):
        assert all(torch.equal(before[key][n], skipped[key][n]) for n in before[key])  # the NaN update never landed
        assert all(torch.isfinite(t).all() for t in after[key].values())
    assert any(not torch.equal(skipped["model"][n], after["model"][n]) for n in after["model"])
    assert after["skipped_updates"] == 1


def test_updates_above_the_skip_threshold_are_skipped(tmp_path):
    summary = run(folder_run(tmp_path, "skip", "--max_iters", "3", "--skip_threshold", "1e-9", "--warmup_iters", "0"))
    assert summary["skipped_updates"] == 3
    state = load_checkpoint(tmp_path / "runs" / "skip" / "latest.pt")
    assert all(torch.equal(state["model"][n], state["ema"][n]) for n in state["model"])  # nothing ever moved


def test_sigterm_saves_a_resumable_checkpoint(tmp_path):
    argv = folder_run(tmp_path, "term", "--max_iters", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), *argv], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    log = tmp_path / "runs" / "term" / "log.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (log.exists() and '"step": 3' in log.read_text()):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "the run did not reach step 3 in time"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM" in output
    stopped = load_checkpoint(tmp_path / "runs" / "term" / "latest.pt")["step"]
    assert stopped >= 3

    # the printed command, pasted as it is (with a nearer end): it continues the run in its own folder
    command = shlex.split(output.split("continue with: ")[1].splitlines()[0])
    assert command[:2] == ["python", str(ROOT / "train.py")] and command[-2:] == ["--restore_path", str(log.parent)]
    resumed = run([*command[2:], "--max_iters", str(stopped + 2)])
    assert resumed["step"] == stopped + 2
    assert [r["step"] for r in records(tmp_path / "runs" / "term", "train_loss")][-2:] == [stopped + 1, stopped + 2]


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------


def test_help_documents_every_flag():
    text = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout  # fmt: skip
    for key in DEFAULTS:
        assert f"--{key}" in text and HELP[key].split()[0] in text
    for flag in ("--hps", "--hparam_sets", "torchrun", "--restore_path", "--test_eval", "--precision", "--max_iters"):
        assert flag in text


def test_command_line_overrides_the_preset():
    H = train.parse_args(["--hps", "cifar10", "--lr", "0.001", "--n_batch", "3", "--test_eval", "--compile"])
    assert H.lr == 0.001 and H.n_batch == 3 and H.test_eval is True and H.compile is True
    assert H.width == 384 and H.ema_rate == 0.9999  # the rest stays the preset's


@pytest.mark.parametrize(
    "flags", [["--precision", "bf16", "--grad_checkpoint", "all", "--channels_last"], ["--precision", "fp16"]]
)
def test_precision_checkpointing_and_memory_format(tmp_path, flags):
    summary = run(folder_run(tmp_path, "flags", "--max_iters", "2", *flags))
    losses = records(tmp_path / "runs" / "flags", "train_loss")
    assert summary["step"] == 2
    assert all(np.isfinite(r["elbo"]) for r in losses)
    if "fp16" in flags:
        assert "loss_scale" in losses[-1]
        assert load_checkpoint(tmp_path / "runs" / "flags" / "latest.pt")["scaler"]["scale"] > 0


def test_test_eval_of_an_official_checkpoint(tmp_path):
    from vdvae_fast.hparams import preset
    from vdvae_fast.model import VAE

    torch.manual_seed(3)
    official = tmp_path / "tiny-iter-100-model-ema.th"
    model = VAE(preset("tiny"))
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, official)  # as DDP saved them
    torch.save(VAE(preset("tiny")).state_dict(), tmp_path / "tiny-iter-100-model.th")
    # openai/vdvae's README command, flag for flag (the log and optimizer files are not needed to evaluate)
    flags = ["--restore_path", str(tmp_path / "tiny-iter-100-model.th"), "--restore_ema_path", str(official),
             "--restore_log_path", "tiny-iter-100-log.jsonl", "--restore_optimizer_path", "tiny-iter-100-opt.th",
             "--test_eval"]  # fmt: skip
    summary = run(folder_run(tmp_path, "eval", *flags))
    (result,) = records(tmp_path / "runs" / "eval", "test_loss")
    assert result["n_images"] == 4 and result["nonfinite_batches"] == 0
    assert abs(result["elbo_bpd"] - result["filtered_elbo"] / np.log(2)) < 1e-9
    assert summary["images"].endswith("samples-test.png") and Path(summary["images"]).exists()
    assert not (tmp_path / "runs" / "eval" / "latest.pt").exists()  # evaluation trains nothing

    H = preset("tiny")
    H.width = 32
    wrong = VAE(H)
    torch.save(wrong.state_dict(), official)
    with pytest.raises(train.CheckpointError, match=r"tiny-iter-100-model-ema\.th.*shape"):
        run(folder_run(tmp_path, "eval-wrong", *flags))  # a new folder: "eval" holds the first evaluation
    assert not (tmp_path / "runs" / "eval-wrong").exists()  # the failed set-up left nothing behind


# --------------------------------------------------------------------------------------------
# Errors before training
# --------------------------------------------------------------------------------------------


def _main(argv: list[str], capsys) -> tuple[int, str]:
    status = train.main(argv)
    return status, capsys.readouterr().err


def test_unwritable_save_dir_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, err = _main(["--hps", "tiny", "--save_dir", str(blocker / "runs"), "--data_root", "/nonexistent"], capsys)
    assert status == 2 and "cannot write" in err and str(blocker) in err
    if os.geteuid() != 0:  # root writes through permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status, err = _main(["--hps", "tiny", "--save_dir", str(locked)], capsys)
        assert status == 2 and "cannot write" in err


def test_missing_dataset_names_the_files(tmp_path, capsys):
    status, err = _main(["--hps", "imagenet64", "--data_root", str(tmp_path), "--save_dir", str(tmp_path)], capsys)
    assert status == 2
    assert "imagenet64-train.npy" in err and "imagenet64-valid.npy" in err and str(tmp_path) in err


def test_images_of_the_wrong_size_name_both_sizes(tmp_path, capsys):
    _write_npy(tmp_path, ("imagenet32-train.npy", "imagenet32-valid.npy"), 16, 4)
    status, err = _main(["--hps", "imagenet32", "--data_root", str(tmp_path), "--save_dir", str(tmp_path)], capsys)
    assert status == 2 and "16x16" in err and "32x32" in err


def test_a_mismatched_checkpoint_names_the_file_and_the_key(tmp_path, capsys):
    run(folder_run(tmp_path, "small", "--max_iters", "1"))
    path = tmp_path / "runs" / "small" / "latest.pt"
    status, err = _main(folder_run(tmp_path, "wide", "--width", "32", "--restore_path", str(path)), capsys)
    assert status == 2 and str(path) in err and "shape" in err and "weight" in err
    assert not (tmp_path / "runs" / "wide").exists()  # the failed set-up left no folder behind


def test_the_logged_hyperparameters_are_the_checkpoints_with_the_datas_properties(tmp_path):
    """The data's properties (FFHQ-256's 5-bit targets) are adopted before the hparam records are written, and
    nothing changes H after: log.jsonl and the checkpoint agree key for key."""
    _write_npy(tmp_path / "data", ("ffhq-256.npy",), 256, 4)
    run(["--hps", "ffhq256", "--data_root", str(tmp_path / "data"), "--save_dir", str(tmp_path), "--desc", "r",
         "--n_batch", "2", "--max_iters", "1", "--device", "cpu", "--valid_holdout", "2", "--num_bits", "8",
         *QUIET, *tiny_network(256)])  # fmt: skip
    logged = {r["key"]: r["value"] for r in records(tmp_path / "r", "hparam")}
    saved = load_checkpoint(tmp_path / "r" / "latest.pt")["hparams"]
    assert logged == saved and logged["num_bits"] == 5 and logged["image_size"] == 256
    lines = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    note = next(i for i, line in enumerate(lines) if "5-bit targets" in line)
    assert note < min(i for i, line in enumerate(lines) if '"type": "hparam"' in line)


def test_a_bad_flag_combination_exits_2_before_any_work(tmp_path, capsys):
    status, err = _main(["--hps", "tiny", "--save_dir", str(tmp_path), "--test_eval"], capsys)
    assert status == 2 and "--test_eval" in err and "--restore_ema_path" in err
    assert not any(tmp_path.iterdir())  # nothing was created


# --------------------------------------------------------------------------------------------
# Run folders: an existing run is never overwritten, a resume continues in place, writes that fail
# --------------------------------------------------------------------------------------------


def test_a_fresh_run_never_overwrites_an_existing_run(tmp_path, capsys):
    run(folder_run(tmp_path, "kept", "--max_iters", "2"))
    folder = tmp_path / "runs" / "kept"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    status, err = _main(folder_run(tmp_path, "kept", "--max_iters", "2"), capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert f"{folder}' already holds a run" in err and f"--restore_path {folder}" in err and "--desc" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_resume_continues_in_the_folder_its_checkpoint_came_from(tmp_path, monkeypatch):
    """Without --desc and --save_dir, --restore_path <run>/latest.pt writes into <run>, not save_dir/desc of
    the preset (./saved_models/test) where another finished run may live."""
    monkeypatch.chdir(tmp_path)
    run(folder_run(tmp_path, "ctrlc", "--max_iters", "2"))
    argv = folder_run(tmp_path, "unused", "--max_iters", "4")
    argv = [a for a in argv if a not in ("--desc", "unused", "--save_dir", str(tmp_path / "runs"))]
    summary = run([*argv, "--restore_path", str(tmp_path / "runs" / "ctrlc" / "latest.pt")])
    assert summary["step"] == 4 and summary["folder"] == str(tmp_path / "runs" / "ctrlc")
    assert [r["step"] for r in records(tmp_path / "runs" / "ctrlc", "train_loss")] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "runs"]  # no ./saved_models
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ctrlc"]


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tmp_path, capsys):
    run(folder_run(tmp_path, "nan", "--max_iters", "1"))
    path = tmp_path / "runs" / "nan" / "latest.pt"
    state = torch.load(path, weights_only=True)
    state["model"]["decoder.out_net.out_conv.bias"][0] = float("nan")
    state["checksums"] = checkpoint.tensor_checksums(state)  # the NaN was saved, not flipped on disk
    torch.save(state, path)
    status, err = _main(folder_run(tmp_path, "nan", "--max_iters", "3", "--restore_path", str(path)), capsys)
    assert status == 2 and str(path) in err and "decoder.out_net.out_conv.bias" in err and "NaN" in err
    assert load_checkpoint(path)["step"] == 1


def test_a_hand_edited_checkpoint_field_is_named(tmp_path, capsys):
    run(folder_run(tmp_path, "edit", "--max_iters", "1"))
    path = tmp_path / "runs" / "edit" / "latest.pt"
    state = torch.load(path, weights_only=True)
    state["rng"] = []  # was an IndexError at the rank's entry
    torch.save(state, path)
    status, err = _main(folder_run(tmp_path, "edit", "--max_iters", "2", "--restore_path", str(path)), capsys)
    assert status == 2 and str(path) in err and "field 'rng'" in err and len(err.splitlines()) == 1


def test_a_full_disk_ends_the_run_in_one_line_naming_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    saves = []
    real_save = torch.save

    def full_after_two(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) > 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_two)
    argv = folder_run(tmp_path, "full", "--max_iters", "5", "--iters_per_save", "1")
    status, err = _main(argv, capsys)
    latest = tmp_path / "runs" / "full" / "latest.pt"
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write {latest}: No space left on device" in err
    assert f"the last good checkpoint is {latest} (step 2)" in err
    monkeypatch.undo()
    assert load_checkpoint(latest)["step"] == 2 and not list(latest.parent.glob(".*.tmp"))

    def full_png(image, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("vdvae_fast.training.trainer.save_png", full_png)
    argv = folder_run(tmp_path, "png", "--max_iters", "5")
    status, err = _main([*argv, "--iters_per_images", "1"], capsys)
    png = tmp_path / "runs" / "png" / "samples-1.png"
    assert status == 2 and len(err.splitlines()) == 1, err
    assert f"cannot write {png}: No space left on device; no checkpoint of this run was written yet" in err


def test_the_resume_command_replaces_restore_path_and_keeps_the_other_flags(monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(ROOT / "vdvae_fast" / "train.py")])  # python -m vdvae_fast.train
    argv = ["--hps", "demo", "--restore_path", "other/latest.pt", "--lr", "1e-3", "--restore_path=x"]
    command = resume_command(argv, "saved_models/my run")
    assert command == "python -m vdvae_fast.train --hps demo --lr 1e-3 --restore_path 'saved_models/my run'"
