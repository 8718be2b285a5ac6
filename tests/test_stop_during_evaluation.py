"""SIGTERM/SIGINT during the training program's evaluation: the evaluation ends before its next batch, the run
saves latest.pt, records no partial evaluation, and exits with 128 + the signal number."""

from __future__ import annotations

import importlib
import json
import os
import signal

import pytest

from vdvae_fast.checkpoint import load_checkpoint
from vdvae_fast.training import cli

evaluate = importlib.import_module("vdvae_fast.training.evaluate")  # the module; the package exports the function

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_final_evaluation_saves_and_exits_128_plus_the_signal(tmp_path, monkeypatch, signum):
    batches = []
    original = evaluate._batch_sums

    def batch_sums(*args, **kwargs):
        batches.append(1)
        if len(batches) == 1:
            os.kill(os.getpid(), signum)  # arrives while the first evaluation batch runs
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_batch_sums", batch_sums)
    argv = ["--hps", "tiny", "--save_dir", str(tmp_path), "--desc", "run", "--max_iters", "2",
            "--eval_max_images", "64", "--device", "cpu", "--iters_per_print", "1"]  # fmt: skip
    assert cli.main(argv) == 128 + signum
    assert len(batches) == 1  # the other 15 batches of 4 were not evaluated
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert not [r for r in records if r.get("type") == "eval_loss"]
    assert any(f"stopped by {signal.Signals(signum).name} at step 2" in r.get("message", "") for r in records)
    assert load_checkpoint(run / "latest.pt")["step"] == 2
