"""The run folder: one run at a time (a lock naming its holder), only dead writers' temporaries cleaned, a plain
--desc under --save_dir, real bytes written at start-up, and nothing left behind by a set-up that fails."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vdvae_fast import train
from vdvae_fast.hparams import preset
from vdvae_fast.runtime import Runtime
from vdvae_fast.training import run_folder
from vdvae_fast.training.errors import SetupError

ROOT = Path(__file__).resolve().parents[1]
ONE_PROCESS = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def hparams(save_dir: Path, desc: str = "r"):
    H = preset("tiny")
    H.update(save_dir=str(save_dir), desc=desc)
    return H


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    H = hparams(tmp_path)
    with run_folder.prepare_run_directory(H, ONE_PROCESS) as first:
        assert (first.path / run_folder.LOCK).exists()
        with pytest.raises(SetupError, match=rf"{tmp_path / 'r'}.*in use by process {os.getpid()} on "):
            run_folder.prepare_run_directory(H, ONE_PROCESS)
        assert (first.path / run_folder.LOCK).exists()  # the refused run took nothing from the first
    assert not (tmp_path / "r" / run_folder.LOCK).exists()  # the lock exists only while a run holds it
    run_folder.prepare_run_directory(H, ONE_PROCESS).close()  # free again


def test_only_the_temporaries_of_dead_writers_are_removed(tmp_path):
    """A writer that takes no lock (an older version, another tool) is stuck writing iter-1.pt: starting a run
    in that folder keeps its temporary and other hidden .tmp files; once the writer is dead, its temporary goes."""
    folder = tmp_path / "r"
    folder.mkdir()
    notes = folder / ".notes.tmp"
    notes.write_text("someone else's")
    script = textwrap.dedent(f"""
        import os, time, torch
        from vdvae_fast import checkpoint
        def stuck(fd):
            print("writing", flush=True)
            time.sleep(600)
        os.fsync = stuck
        checkpoint.save_checkpoint({{"value": torch.zeros(1000)}}, {str(folder / "iter-1.pt")!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert writer.stdout.readline().strip() == "writing"
        (temporary,) = folder.glob(".iter-1.pt.*.tmp")
        run_folder.prepare_run_directory(hparams(tmp_path), ONE_PROCESS).close()
        assert temporary.exists() and notes.exists()  # a live writer's file
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=60)
    run_folder.prepare_run_directory(hparams(tmp_path), ONE_PROCESS).close()
    assert not temporary.exists() and notes.exists()


@pytest.mark.parametrize("desc", ["../../x", "a/b", "..", ".", "", "ABSOLUTE"])
def test_desc_must_be_a_plain_folder_name(tmp_path, capsys, desc):
    desc = str(tmp_path / "elsewhere") if desc == "ABSOLUTE" else desc
    save_dir = tmp_path / "deep" / "runs"
    status = train.main(["--hps", "tiny", "--save_dir", str(save_dir), "--desc", desc, "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 2 and "--desc must be a plain folder name" in err and repr(desc) in err
    assert not any(tmp_path.iterdir())  # nothing written, inside --save_dir or outside


def test_the_start_up_write_test_writes_real_bytes_and_reports_a_full_disk(tmp_path, monkeypatch):
    synced = []

    def full_disk(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(SetupError) as err:
        run_folder.prepare_run_directory(hparams(tmp_path / "runs"), ONE_PROCESS)
    assert synced and synced[0] >= 1 << 20  # a megabyte reached the file before it was synced
    message = str(err.value)
    assert str(tmp_path / "runs" / "r") in message and "No space left on device" in message and "\n" not in message
    assert not (tmp_path / "runs").exists()  # the folders it made are gone again


def test_a_set_up_that_fails_leaves_nothing_it_created(tmp_path, capsys):
    """A new folder (and its parents) disappear again; a resumed run's folder keeps its files byte for byte."""
    empty = tmp_path / "no-images"
    empty.mkdir()
    argv = ["--hps", "tiny", "--dataset", "folder", "--data_root", str(empty), "--device", "cpu"]
    assert train.main([*argv, "--save_dir", str(tmp_path / "a" / "runs")]) == 2
    assert "no-images" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-images"]

    folder = tmp_path / "old"
    folder.mkdir()
    for name, text in (("log.jsonl", '{"step": 1}\n'), ("log.txt", "step: 1\n")):
        (folder / name).write_text(text)
    H = hparams(tmp_path, "old")
    with run_folder.prepare_run_directory(H, ONE_PROCESS, resuming_from=folder) as prepared:
        with open(folder / "log.jsonl", "a") as f:
            f.write('{"type": "hparam"}\n')
        (folder / "log.txt").unlink()
        prepared.discard()
    assert (folder / "log.jsonl").read_text() == '{"step": 1}\n'
    assert sorted(p.name for p in folder.iterdir()) == ["log.jsonl"]  # log.txt was gone: not restored, not made
