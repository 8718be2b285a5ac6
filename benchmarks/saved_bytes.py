"""Bytes a VDVAE training step keeps for backward, per image: the eager fp32 original against a leaner setup.

    python benchmarks/saved_bytes.py --hps imagenet64 --precision bf16 --grad_checkpoint all --batch 1

Device-agnostic (DESIGN.md, Measuring): torch.autograd.graph.saved_tensors_hooks sees every tensor
autograd saves, and each distinct storage is counted once. Parameters are left out (they are held
whatever the step does); what autocast casts them to is counted. Non-reentrant checkpointing hides the
tensors saved inside a block behind its own hooks, which is the point, but it keeps the block's inputs
alive until backward without saving them, so the inputs of every checkpointed block are counted too.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

if __package__ in (None, ""):  # run as a file: import this checkout's vdvae_fast, installed or not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vdvae_fast import model as vdvae_model  # noqa: E402
from vdvae_fast import ops  # noqa: E402
from vdvae_fast.hparams import GRAD_CHECKPOINT_MODES, PRECISIONS, PRESETS, preset  # noqa: E402


class SavedBytes:
    """Counts the distinct storages held for backward while active (see the module docstring)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
        self._storages: dict[int, torch.UntypedStorage] = {}

    @property
    def nbytes(self) -> int:
        return sum(storage.nbytes() for storage in self._storages.values())

    def _keep(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._parameters and storage.nbytes() > 0:
            # Holding the storage also keeps its address from being reused by a later tensor.
            self._storages[storage.data_ptr()] = storage

    def _pack(self, tensor: Tensor) -> Tensor:
        self._keep(tensor)
        return tensor

    def _checkpoint(self, function, *args, **kwargs):  # noqa: ANN001, ANN202 - torch's signature
        for arg in args:
            if isinstance(arg, Tensor):
                self._keep(arg)
        return self._real_checkpoint(function, *args, **kwargs)

    @contextlib.contextmanager
    def __call__(self) -> Iterator[SavedBytes]:
        self._real_checkpoint = vdvae_model.checkpoint
        with (
            torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor),
            mock.patch.object(vdvae_model, "checkpoint", self._checkpoint),
        ):
            yield self


def measure(
    name: str, precision: str, grad_checkpoint: str, batch: int, backend: str = "original", backward: bool = True
) -> tuple[int, float]:
    """Saved-for-backward bytes per image of one training step, and its wall time in seconds."""
    H = preset(name)
    H.update(grad_checkpoint=grad_checkpoint)
    torch.manual_seed(0)
    vae = vdvae_model.VAE(H, backend=backend, check_inputs=False)
    size = H.image_size
    x = torch.randn(batch, size, size, H.image_channels)
    x_target = torch.randint(0, 256, (batch, size, size, H.image_channels)).float() / 127.5 - 1.0
    dtype = PRECISIONS[precision]
    counter = SavedBytes(vae)
    start = time.perf_counter()
    with counter(), torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = vae(x, x_target)["elbo"]
    if backward:
        loss.backward()
    return counter.nbytes // batch, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hps", default="imagenet64", choices=PRESETS)
    parser.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS))
    parser.add_argument("--grad_checkpoint", default="all", choices=GRAD_CHECKPOINT_MODES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--backend",
        default="auto",
        choices=ops.BACKENDS,
        help="ops backend of the lean run (the baseline's is original)",
    )
    parser.add_argument("--no-backward", dest="backward", action="store_false", help="count after forward only")
    args = parser.parse_args()

    print(f"{args.hps}, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    original, seconds = measure(args.hps, "fp32", "none", args.batch, backward=args.backward)
    print(
        f"eager fp32 original (original ops, no checkpointing): {original / 1e6:9.1f} MB per image  ({seconds:.1f} s)"
    )
    lean, seconds = measure(args.hps, args.precision, args.grad_checkpoint, args.batch, args.backend, args.backward)
    label = f"{args.precision}, grad_checkpoint={args.grad_checkpoint}, {args.backend}"
    print(f"{label}: {lean / 1e6:9.1f} MB per image  ({seconds:.1f} s)")
    print(f"ratio lean / original: {lean / original:.4f}  (1/{original / lean:.1f})")


if __name__ == "__main__":
    main()
