"""Datasets, splits and preprocessing of vdvae_fast, compatible with openai/vdvae's data pipeline.

The trainer uses four things::

    splits = load_dataset(H)                       # DataSplits(train, valid, test, ...)
    loader = make_loader(splits.train, H.n_batch, shuffle=True, distributed=ddp, seed=H.seed, drop_last=True)
    set_epoch(loader, epoch, start_batch)          # before each epoch: a new, reproducible order (from a batch)
    for batch in loader:                           # uint8 tensor (N, H, W, C)
        x_input, x_target = preprocess(batch, H, device)   # float32 NHWC on `device`

Every split is a ``torch.utils.data.Dataset`` whose items are uint8 tensors of shape (H, W, C). Large ``.npy``
files are memory-mapped (``np.load(mmap_mode='r')``) and indexed through a split's index array, so ImageNet-64
(1.2M images) is never read into RAM; such a dataset pickles as its path, so DataLoader workers started with
``spawn`` reopen the map instead of copying the data.

Datasets (``H.dataset``; names as in openai/vdvae, files under ``H.data_root``):

=============  ==================================================  ===========================================
name           files                                               train / valid / test
=============  ==================================================  ===========================================
imagenet32     imagenet32-train.npy, imagenet32-valid.npy          train.npy minus its last 5000 of a
imagenet64     imagenet64-train.npy, imagenet64-valid.npy          permutation (seed 42) / those 5000 / valid.npy
cifar10        cifar-10-batches-py/data_batch_1..5, test_batch     45000 / 5000 (sklearn train_test_split,
                                                                   random_state 11172018) / test_batch
ffhq_256       ffhq-256.npy                                        all minus last 7000 of a permutation (seed 5)
                                                                   / those 7000 / the same 7000
ffhq_1024      ffhq1024/train/**.png, ffhq1024/valid/**.png         train folder / valid folder / valid folder
               (or train/, valid/ directly under data_root)
folder         any PNG/JPEG under data_root (recursively)           center crop, resize to H.image_size; 10% of
                                                                   a fixed permutation held out / same as valid
builtin        none: photographs bundled with scikit-image          32x32 patches (H.image_size); train and valid
                                                                   cut from different photographs / valid
=============  ==================================================  ===========================================

The optional key ``H.valid_holdout`` overrides the number of training images held out for validation
(5000 or 7000 above, 10% for folder); VDVAE's numbers are the default, so only tests and small experiments set
it. It must be at least 1 and less than the number of images, and it is refused for ffhq_1024 and builtin, whose
validation images are fixed. ``H.image_size``, when given, must be positive; for fixed-size datasets it must be
their size.

Every file is checked when the dataset is loaded, before training starts, and a file that cannot be used is
refused with a ``DataError`` (a ``ValueError``) naming it and the problem:

- ``.npy`` files: a directory, a header that does not parse, a dtype other than uint8 (object arrays are never
  unpickled), a shape other than N x S x S x 3, or fewer bytes than the header promises (a truncated file).
- CIFAR-10 batches are read with a restricted unpickler that builds only plain containers, strings, numbers
  and numpy arrays and dtypes; any other object a pickle asks for (a function to call, a class to build) is
  refused before it is created, so a crafted batch runs nothing.
- Image files (folder, ffhq_1024): every file is opened, without decoding it, and must be a PNG or JPEG of a
  supported mode (and 1024x1024 for ffhq_1024) whose end marker (PNG's IEND chunk, JPEG's EOI after the start
  of its scan data) lies in its last 4 KiB: text files named .png and truncated files are found here in a few
  reads per file. Unusable files are refused, all named at once, rather than skipped: the train/valid split is
  drawn from the whole file list, so skipping a file would silently move images between the splits of runs
  that see the folder in different states. A file whose pixel data is damaged past these checks fails when it
  is decoded, with a ``DataError`` naming it.

Images are converted to 8-bit RGB as a viewer shows them: 16-bit PNGs are scaled to 8 bits (value * 255 /
65535, rounded; Pillow itself takes the high byte of 16-bit colour PNGs), grayscale and palette images are
expanded to RGB, and images with transparency (RGBA, LA, palette with a transparent colour) are composited
over white.

Preprocessing follows VDVAE exactly: ``x_input = (x + shift) * scale`` with per-dataset constants, and
``x_target = (x + shift_loss) * scale_loss`` in [-1, 1]; ffhq_256 targets are first reduced to 5 bits
(``floor(x / 8) * 8``) and ffhq_1024 pixels are first scaled to [0, 1] (as torchvision's ToTensor did there).
``splits.preprocessing.num_bits`` tells the loss which DMoL bin width to use (8, or 5 for ffhq_256).
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "DATASETS",
    "ArrayImages",
    "DataError",
    "DataSplits",
    "ImageFiles",
    "Preprocessing",
    "builtin_patches",
    "canonical_dataset",
    "load_dataset",
    "make_loader",
    "preprocess",
    "preprocessing_for",
    "set_epoch",
]

# Preset-style spellings accepted for convenience; the canonical names are VDVAE's.
_ALIASES = {"ffhq256": "ffhq_256", "ffhq1024": "ffhq_1024", "cifar-10": "cifar10"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DataError(ValueError):
    """A dataset file that cannot be used; the message names the file and what is wrong with it."""


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def _f32(value: float) -> float:
    """Round a constant to float32 so that arithmetic matches VDVAE's float32 constant tensors bit for bit."""
    return float(np.float32(value))


@dataclass(frozen=True)
class Preprocessing:
    """VDVAE's per-dataset normalisation of uint8 NHWC batches into model inputs and loss targets."""

    shift: float
    scale: float
    shift_loss: float = -127.5
    scale_loss: float = 1.0 / 127.5
    num_bits: int = 8
    unit_range: bool = False  # pixels are divided by 255 first (VDVAE's ffhq_1024 went through ToTensor)

    def __call__(
        self, batch: torch.Tensor | np.ndarray, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.as_tensor(batch)
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(
                f"preprocess expects a uint8 batch of shape (N, H, W, C); got dtype {x.dtype}, shape {tuple(x.shape)}"
            )
        if device is not None:
            x = x.to(device, non_blocking=True)  # move uint8 (4x fewer bytes), convert on the device
        x = x.float()
        if self.unit_range:
            x = x / 255.0
        x_input = (x + _f32(self.shift)) * _f32(self.scale)
        target = x
        if self.num_bits < 8:
            step = float(2 ** (8 - self.num_bits))
            target = torch.floor(target * (1.0 / step)) * step
        x_target = (target + _f32(self.shift_loss)) * _f32(self.scale_loss)
        return x_input, x_target


def canonical_dataset(name: str) -> str:
    """VDVAE's name of a dataset given in any accepted spelling (lower case, preset-style aliases); a name
    that is no dataset comes back lower-cased, for the caller to refuse."""
    lowered = str(name).lower()
    return _ALIASES.get(lowered, lowered)


def _dataset_entry(name: str) -> DatasetEntry:
    canonical = canonical_dataset(name)
    if canonical not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return _REGISTRY[canonical]


def preprocessing_for(dataset: str) -> Preprocessing:
    """The preprocessing constants of a dataset (by VDVAE name)."""
    return _dataset_entry(dataset).preprocessing


def preprocess(
    batch: torch.Tensor | np.ndarray, H: Any, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC batch -> (x_input, x_target), float32 NHWC on `device` (default: the batch's device)."""
    return preprocessing_for(H.dataset)(batch, device)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


class ArrayImages(Dataset):
    """Images of a uint8 (N, H, W, C) array, in RAM or memory-mapped from a .npy file, seen through `indices`."""

    def __init__(
        self, array: np.ndarray | None = None, indices: np.ndarray | None = None, path: str | os.PathLike | None = None
    ) -> None:
        if array is None and path is None:
            raise ValueError("ArrayImages needs an array or the path of a .npy file (or both: the file's open map)")
        self.path = None if path is None else str(path)
        self._array = array
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def array(self) -> np.ndarray:
        """The whole underlying array (a np.memmap for .npy files), opened on first use."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __len__(self) -> int:
        return len(self.array) if self.indices is None else len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        j = i if self.indices is None else self.indices[i]
        return torch.from_numpy(np.array(self.array[j]))  # copy: one image leaves the map, writable

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.path is not None:
            state["_array"] = None  # pickle the path, not 13 GB of pixels
        return state


# Pillow's modes of the PNG and JPEG files it opens. 16-bit grayscale PNGs open as I;16 (older Pillow: I);
# 16-bit colour PNGs already open as 8-bit RGB(A), their high bytes.
_SIXTEEN_BIT_GRAY = ("I;16", "I;16B", "I;16L", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_OPAQUE_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "RGBX")
IMAGE_MODES = _SIXTEEN_BIT_GRAY + _ALPHA_MODES + _OPAQUE_MODES
_IMAGE_FORMATS = ("PNG", "JPEG", "MPO")  # MPO: a camera's multi-picture JPEG, read as its first picture
_TAIL_BYTES = 4096


def _as_rgb8(img: Any) -> Any:
    """An opened PIL image as 8-bit RGB, as a viewer shows it: 16-bit gray scaled (not clipped) to 8 bits,
    transparency composited over white."""
    from PIL import Image

    if img.mode in _SIXTEEN_BIT_GRAY:
        gray = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / 65535.0))
        return Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


class ImageFiles(Dataset):
    """Images decoded from PNG/JPEG files as 8-bit RGB, either required to be `size`x`size` or center-cropped
    and resized."""

    def __init__(self, files: Sequence[str | os.PathLike], size: int, resize: bool) -> None:
        self.files = [str(f) for f in files]
        self.size = int(size)
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._load(self.files[i]))

    def _load(self, file: str) -> np.ndarray:
        from PIL import Image, ImageOps

        try:
            with Image.open(file) as img:
                if self.resize:
                    img = _as_rgb8(ImageOps.exif_transpose(img))
                    width, height = img.size
                    side = min(width, height)
                    left, top = (width - side) // 2, (height - side) // 2
                    img = img.crop((left, top, left + side, top + side))
                    img = img.resize((self.size, self.size), Image.Resampling.LANCZOS)
                elif img.size != (self.size, self.size):
                    raise DataError(
                        f"{file} is {img.size[0]}x{img.size[1]} but this dataset needs {self.size}x{self.size} images"
                    )
                else:
                    img = _as_rgb8(img)
                return np.asarray(img, dtype=np.uint8).copy()
        except DataError:
            raise
        except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"cannot decode image {file}: {err}; replace or remove the file") from err


def _end_marker_problem(file: str, image_format: str, scan_start: int) -> str | None:
    """Why the file's last bytes show it truncated (no end marker where the format puts it), or None."""
    with open(file, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_start = max(0, size - _TAIL_BYTES)
        f.seek(tail_start)
        tail = f.read()
    if image_format == "PNG":
        if b"\x00\x00\x00\x00IEND\xaeB`\x82" not in tail:
            return f"truncated: no PNG end chunk (IEND) in its last {_TAIL_BYTES} bytes"
        return None
    # JPEG: inside the scan data every 0xFF byte is followed by 0x00 or a restart marker, so an FF D9 after
    # the scan's start is the end-of-image marker (one before it may be an embedded thumbnail's).
    end = tail.rfind(b"\xff\xd9")
    if end < 0 or tail_start + end < scan_start:
        return f"truncated: no JPEG end-of-image marker after its scan data in its last {_TAIL_BYTES} bytes"
    return None


def _image_problem(file: str, size: int | None) -> str | None:
    """What makes an image file unusable, found from its header and last bytes without decoding its pixels;
    None if nothing. `size`: the side every image must have (None: any, the images are resized)."""
    from PIL import Image

    try:
        with Image.open(file) as img:
            image_format, mode, (width, height) = img.format, img.mode, img.size
            if image_format not in _IMAGE_FORMATS:
                return f"a {image_format} image; PNG and JPEG are read"
            scan_start = img.fp.tell()  # just past the headers: the pixel data starts here
        if mode not in IMAGE_MODES:
            return f"an image of mode {mode!r}, which is not converted to RGB; modes read: {', '.join(IMAGE_MODES)}"
        if size is not None and (width, height) != (size, size):
            return f"{width}x{height} but this dataset needs {size}x{size} images"
        return _end_marker_problem(file, image_format, scan_start)
    except (OSError, SyntaxError, EOFError, ValueError, Image.DecompressionBombError) as err:
        return f"not a readable image ({err})"


def _check_image_files(files: Sequence[Path], size: int | None, folder: Path) -> None:
    """Refuse, naming every one, the files of `folder` that cannot be used (see _image_problem)."""
    problems = [(file, problem) for file in files if (problem := _image_problem(str(file), size)) is not None]
    if problems:
        shown = "; ".join(f"{file}: {problem}" for file, problem in problems[:10])
        more = f"; and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(
            f"{len(problems)} of {len(files)} image files under {str(folder)!r} cannot be used: {shown}{more}. "
            "Replace or remove them (they are not skipped: the train/valid split is drawn from every file)"
        )


@dataclass
class DataSplits:
    """The three splits of a dataset plus what the trainer needs to know about its images."""

    train: Dataset
    valid: Dataset
    test: Dataset
    image_size: int
    image_channels: int
    preprocessing: Preprocessing
    dataset: str


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_SOURCES = {
    "imagenet32": "ImageNet 32x32 (the 'downsampled ImageNet' train_32x32 / valid_32x32 images from image-net.org), "
    "each set of PNGs packed into one uint8 N x 32 x 32 x 3 array by openai/vdvae's setup_imagenet.sh "
    "(files_to_npy.py)",
    "imagenet64": "ImageNet 64x64 (the 'downsampled ImageNet' train_64x64 / valid_64x64 images from image-net.org), "
    "each set of PNGs packed into one uint8 N x 64 x 64 x 3 array by openai/vdvae's setup_imagenet.sh "
    "(files_to_npy.py)",
    "cifar10": "the CIFAR-10 python version (cifar-10-python.tar.gz from Alex Krizhevsky's CIFAR page at "
    "cs.toronto.edu), unpacked under data_root as openai/vdvae's setup_cifar10.sh does",
    "ffhq_256": "FFHQ (NVIDIA's Flickr-Faces-HQ, github NVlabs/ffhq-dataset) downsampled to 256x256 as one uint8 "
    "70000 x 256 x 256 x 3 array: the copy openai/vdvae's setup_ffhq256.sh downloads",
    "ffhq_1024": "the images1024x1024 PNGs of NVIDIA's FFHQ (github NVlabs/ffhq-dataset), split by openai/vdvae's "
    "setup_ffhq1024.sh into train/0 (00000-64999) and valid/0 (65000-69999)",
}


def _missing(dataset: str, root: Path, expected: Sequence[str]) -> None:
    """Raise FileNotFoundError naming every expected file and where the data comes from, if any is absent."""
    absent = [name for name in expected if not (root / name).exists()]
    if absent:
        raise FileNotFoundError(
            f"dataset {dataset!r} needs {', '.join(expected)} under data_root {str(root)!r}; "
            f"missing: {', '.join(absent)}. The data is {_SOURCES[dataset]}."
        )


def _regular_file(path: Path) -> None:
    """Refuse a path that exists but is no file (a directory given where a .npy or batch file belongs)."""
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file"
        raise DataError(f"{path} is {kind}; the dataset needs a file there")


_NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _open_npy(path: Path, size: int) -> np.ndarray:
    """Memory-map a .npy file of uint8 N x size x size x 3 images, after checking from its header and length
    that it is one (never unpickling anything)."""
    _regular_file(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in _NPY_HEADER_READERS:
                raise ValueError(f"format version {version[0]}.{version[1]} is not one np.save writes for images")
            shape, _, dtype = _NPY_HEADER_READERS[version](f)
            data_start = f.tell()
    except Exception as err:  # numpy's header parser fails in several ways (ValueError, SyntaxError, TokenError)
        raise DataError(f"{path} is not a readable .npy file (corrupt or not .npy): {err}") from err
    if dtype.hasobject:
        raise DataError(f"{path} holds Python objects (dtype {dtype}), not uint8 pixels; object arrays are not read")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise DataError(f"{path} must hold uint8 images of shape N x H x W x 3; found {dtype} {shape}")
    if shape[1:3] != (size, size):
        raise DataError(f"{path} holds {shape[1]}x{shape[2]} images but this dataset needs {size}x{size} images")
    if shape[0] == 0:
        raise DataError(f"{path} holds no images")
    expected, actual = data_start + int(np.prod(shape)), path.stat().st_size
    if actual < expected:
        raise DataError(
            f"{path} is truncated: its header promises {shape[0]} images ({expected} bytes in all) but the file "
            f"has {actual} bytes"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class DataRequest:
    """What every dataset loader is given: the folder of its files, the image side, and how many training
    images to hold out for validation (None: the dataset's VDVAE number)."""

    root: Path
    size: int
    valid_holdout: int | None = None


Splits = tuple[Dataset, Dataset, Dataset]


def _holdout(request: DataRequest, default: int, n: int, source: str) -> int:
    count = default if request.valid_holdout is None else request.valid_holdout
    if not 0 < count < n:
        raise ValueError(
            f"{source} has {n} images, too few to hold out {count} for validation and train on the rest; "
            f"use the full dataset, or set --valid_holdout to a number from 1 to {n - 1}"
        )
    return count


def _permutation_split(n: int, seed: int, holdout: int) -> tuple[np.ndarray, np.ndarray]:
    """VDVAE's split: permute with np.random.seed(seed) (legacy RandomState) and hold out the last `holdout`."""
    perm = np.random.RandomState(seed).permutation(n)
    return perm[:-holdout], perm[-holdout:]


def _npy_split(request: DataRequest, path: Path, seed: int, default_holdout: int) -> tuple[ArrayImages, ArrayImages]:
    array = _open_npy(path, request.size)
    holdout = _holdout(request, default_holdout, len(array), str(path))
    train, valid = _permutation_split(len(array), seed, holdout)
    return ArrayImages(array, train, path=path), ArrayImages(array, valid, path=path)


def _load_imagenet(dataset: str, request: DataRequest) -> Splits:
    names = [f"{dataset}-train.npy", f"{dataset}-valid.npy"]
    _missing(dataset, request.root, names)
    train, valid = _npy_split(request, request.root / names[0], seed=42, default_holdout=5000)
    test_path = request.root / names[1]
    return train, valid, ArrayImages(_open_npy(test_path, request.size), path=test_path)


def _load_ffhq256(request: DataRequest) -> Splits:
    _missing("ffhq_256", request.root, ["ffhq-256.npy"])
    train, valid = _npy_split(request, request.root / "ffhq-256.npy", seed=5, default_holdout=7000)
    return train, valid, valid  # VDVAE evaluates FFHQ-256 on its held-out images


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """What pickle protocols 0-2 written by Python 3 call (as _codecs.encode) to rebuild a bytes object."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}; pickles of bytes use 'latin1'")
    return text.encode("latin1")


def _numpy_pickle_globals() -> dict[tuple[str, str], Any]:
    """The callables numpy pickles arrays and dtypes with, under the module names numpy 1 and 2 write."""
    reconstruct = np.zeros(1).__reduce__()[0]  # _reconstruct, whichever module this numpy keeps it in
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # _frombuffer: protocol 5 pickles of contiguous arrays
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for function, module in ((reconstruct, "multiarray"), (frombuffer, "numeric")):
        for package in ("numpy.core", "numpy._core"):
            allowed[(f"{package}.{module}", function.__name__)] = function
    allowed[("_codecs", "encode")] = _latin1_bytes
    return allowed


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: plain containers, strings, numbers, numpy arrays and dtypes.
    Every other global a pickle names (the way it would call a function) is refused before it is looked up."""

    allowed = _numpy_pickle_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}; a CIFAR-10 batch holds only dicts, lists, strings, numbers and "
                "numpy arrays"
            )
        return self.allowed[(module, name)]


def _read_cifar_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 python batch (a pickle, read with _BatchUnpickler) as uint8 (N, 32, 32, 3)."""
    _regular_file(path)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except Exception as err:  # a malformed pickle fails in many ways; each one means: not a batch
        raise DataError(f"{path} is refused as a CIFAR-10 python batch: {err}") from err
    data = batch.get(b"data", batch.get("data")) if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray):
        raise DataError(f"{path} is not a CIFAR-10 python batch (no 'data' array)")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(
            f"{path} must hold uint8 rows of 3 x 32 x 32 pixels (3072 values); found {data.dtype} {data.shape}"
        )
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _load_cifar10(request: DataRequest) -> Splits:
    root = request.root
    names = [f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)] + ["cifar-10-batches-py/test_batch"]
    _missing("cifar10", root, names)
    train_all = np.concatenate([_read_cifar_batch(root / name) for name in names[:5]])
    test = _read_cifar_batch(root / names[5])
    # sklearn's train_test_split(test_size=k, random_state=s) takes permutation[:k] as the held-out part.
    holdout = _holdout(request, 5000, len(train_all), str(root / "cifar-10-batches-py"))
    perm = np.random.RandomState(11172018).permutation(len(train_all))
    return ArrayImages(train_all, perm[holdout:]), ArrayImages(train_all, perm[:holdout]), ArrayImages(test)


def _image_files(folder: Path) -> list[Path]:
    """Every PNG/JPEG under `folder`, recursively, in a stable (sorted relative path) order."""
    files = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    files = [p for p in files if not any(part.startswith(".") for part in p.relative_to(folder).parts)]
    if not files:
        raise FileNotFoundError(f"no PNG or JPEG images found under {str(folder)!r} (searched recursively)")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _load_ffhq1024(request: DataRequest) -> Splits:
    # VDVAE's data.py reads data_root/ffhq1024/{train,valid}; its setup script builds {train,valid} in place,
    # so data_root/{train,valid} is accepted too.
    root = request.root
    in_place = (root / "train").is_dir() and not (root / "ffhq1024").exists()
    names = ["train", "valid"] if in_place else ["ffhq1024/train", "ffhq1024/valid"]
    _missing("ffhq_1024", root, names)
    splits = []
    for name in names:
        files = _image_files(root / name)
        _check_image_files(files, 1024, root / name)  # now, not an hour into training
        splits.append(ImageFiles(files, 1024, resize=False))
    train, valid = splits
    return train, valid, valid


def _load_folder(request: DataRequest) -> Splits:
    root, size = request.root, request.size
    if not root.is_dir():
        raise FileNotFoundError(
            f"dataset 'folder' needs a folder of PNG/JPEG images as data_root; {str(root)!r} is not one"
        )
    files = _image_files(root)
    if len(files) < 2:
        raise ValueError(f"{str(root)!r} holds {len(files)} image; a train/valid split needs at least 2")
    _check_image_files(files, None, root)
    n_valid = _holdout(request, max(1, round(0.1 * len(files))), len(files), repr(str(root)))
    perm = np.random.RandomState(0).permutation(len(files))
    valid = ImageFiles([files[i] for i in sorted(perm[:n_valid])], size, resize=True)
    train = ImageFiles([files[i] for i in sorted(perm[n_valid:])], size, resize=True)
    return train, valid, valid


# Everyday colour photographs that ship inside the scikit-image wheel (no download); split by photograph.
BUILTIN_TRAIN_IMAGES = ("astronaut", "motorcycle_left", "rocket")
BUILTIN_VALID_IMAGES = ("chelsea", "coffee")
_BUILTIN_SCALES = (1, 2, 4)


def _builtin_photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError("the 'builtin' dataset needs scikit-image: pip install scikit-image") from err
    if name == "motorcycle_left":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


def _patches(image: np.ndarray, size: int) -> np.ndarray:
    """Overlapping size x size patches (stride size/2) of the photo at full, half and quarter resolution."""
    out = []
    stride = max(1, size // 2)
    for factor in _BUILTIN_SCALES:
        h, w = image.shape[0] // factor, image.shape[1] // factor
        if min(h, w) < size:
            continue
        # Box-filter downsampling in numpy: identical on every platform and library version.
        small = image[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
        small = np.rint(small).astype(np.uint8)
        windows = np.lib.stride_tricks.sliding_window_view(small, (size, size, 3))[::stride, ::stride, 0]
        out.append(windows.reshape(-1, size, size, 3))
    return np.concatenate(out) if out else np.empty((0, size, size, 3), np.uint8)


@functools.lru_cache(maxsize=4)
def builtin_patches(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) uint8 patch arrays of the built-in photographs; deterministic, cached in memory."""
    train = np.concatenate([_patches(_builtin_photo(n), size) for n in BUILTIN_TRAIN_IMAGES])
    valid = np.concatenate([_patches(_builtin_photo(n), size) for n in BUILTIN_VALID_IMAGES])
    if len(train) == 0 or len(valid) == 0:
        raise ValueError(f"image_size {size} is too large for the built-in photographs (at most 300 pixels)")
    for array in (train, valid):
        array.setflags(write=False)  # shared by every caller through the cache
    return train, valid


def _load_builtin(request: DataRequest) -> Splits:
    train_patches, valid_patches = builtin_patches(request.size)
    valid = ArrayImages(valid_patches)
    return ArrayImages(train_patches), valid, valid


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset of the registry: its loader, its preprocessing, its native image side (None: any size,
    chosen with image_size), and whether its validation images are held out of its training images (so that
    valid_holdout applies) rather than fixed."""

    load: Callable[[DataRequest], Splits]
    preprocessing: Preprocessing
    native_size: int | None = None
    holds_out: bool = True


# ImageNet-32's statistics serve the generic photo datasets (folder, builtin), which have no published constants.
_IMAGENET32 = Preprocessing(shift=-116.2373, scale=1.0 / 69.37404)
_REGISTRY: dict[str, DatasetEntry] = {
    "cifar10": DatasetEntry(_load_cifar10, Preprocessing(shift=-120.63838, scale=1.0 / 64.16736), 32),
    "imagenet32": DatasetEntry(functools.partial(_load_imagenet, "imagenet32"), _IMAGENET32, 32),
    "imagenet64": DatasetEntry(
        functools.partial(_load_imagenet, "imagenet64"), Preprocessing(shift=-115.92961967, scale=1.0 / 69.37404), 64
    ),
    "ffhq_256": DatasetEntry(
        _load_ffhq256, Preprocessing(shift=-112.8666757481, scale=1.0 / 69.84780273, num_bits=5), 256
    ),
    "ffhq_1024": DatasetEntry(
        _load_ffhq1024,
        Preprocessing(shift=-0.4387, scale=1.0 / 0.2743, shift_loss=-0.5, scale_loss=2.0, unit_range=True),
        1024,
        holds_out=False,
    ),
    "folder": DatasetEntry(_load_folder, _IMAGENET32),
    "builtin": DatasetEntry(_load_builtin, _IMAGENET32, holds_out=False),
}
DATASETS: tuple[str, ...] = tuple(_REGISTRY)


def _positive_int(H: Any, key: str) -> int | None:
    """H's value for `key` as an int, None if unset; a value that is not a whole number >= 1 is refused."""
    value = H.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(
            f"--{key} must be a whole number of at least 1 (or unset for the dataset's own); got {value!r}"
        )
    return int(value)


def _image_size(H: Any, dataset: str) -> int:
    requested = _positive_int(H, "image_size")
    native = _REGISTRY[dataset].native_size
    if native is not None:
        if requested is not None and requested != native:
            raise ValueError(f"dataset {dataset!r} has {native}x{native} images but image_size is {requested}")
        return native
    if requested is None:
        if dataset == "folder":
            raise ValueError("dataset 'folder' needs --image_size S (images are center-cropped and resized to S x S)")
        return 32
    return requested


def _valid_holdout(H: Any, dataset: str) -> int | None:
    count = _positive_int(H, "valid_holdout")
    if count is not None and not _REGISTRY[dataset].holds_out:
        holding = ", ".join(name for name, entry in _REGISTRY.items() if entry.holds_out)
        raise ValueError(
            f"dataset {dataset!r} has fixed validation images, so --valid_holdout {count} does not apply; "
            f"it applies to {holding}"
        )
    return count


def load_dataset(H: Any) -> DataSplits:
    """Open H.dataset under H.data_root with VDVAE's train/valid/test splits (memory-mapped where possible),
    after checking every file (see the module's docstring)."""
    entry = _dataset_entry(H.dataset)
    dataset = canonical_dataset(H.dataset)
    channels = H.get("image_channels")
    if channels is not None and channels != 3:
        raise ValueError(f"all datasets are RGB (3 channels); image_channels is {channels}")
    root = Path(H.get("data_root") or ".").expanduser()
    request = DataRequest(root, _image_size(H, dataset), _valid_holdout(H, dataset))
    train, valid, test = entry.load(request)
    return DataSplits(train, valid, test, request.size, 3, entry.preprocessing, dataset)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


class _ShardSampler(DistributedSampler):
    """torch's DistributedSampler (one replica when not distributed) with two additions: uneven shards
    (even=False: each example on exactly one rank, shards may differ by one, for exact evaluation) and an
    epoch that starts part-way (`start` examples of this rank's order already consumed before a resume)."""

    def __init__(self, dataset: Dataset, even: bool, **kwargs: Any) -> None:
        super().__init__(dataset, **kwargs)
        self.even = even
        self.start = 0

    def _order(self) -> list[int]:
        if self.even:
            return list(super().__iter__())
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.dataset), generator=g).tolist()
        else:
            order = list(range(len(self.dataset)))
        return order[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self._order()[self.start :])

    def __len__(self) -> int:
        full = super().__len__() if self.even else len(range(self.rank, len(self.dataset), self.num_replicas))
        return max(0, full - self.start)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    distributed: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
    even_shards: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """The DataLoader of uint8 NHWC batches whose order depends only on (seed, epoch): see set_epoch.

    Distributed, each rank gets batch_size examples per batch; with even_shards (training) the sampler
    repeats a few examples so every rank runs the same number of steps, without it (evaluation) every
    example is seen exactly once and ranks may differ by one batch. rank/world_size default to the
    initialised process group. The loader has a generator of its own, so that starting an epoch never
    draws from torch's default generator, which the training noise uses.
    """
    if distributed:
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
    else:
        world_size, rank = 1, 0
    sampler = _ShardSampler(
        dataset, even_shards, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
    )


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Give the loader's sampler the epoch number, which (with the seed) fixes that epoch's order, and the
    number of its batches to pass over (those a resumed run had already trained on)."""
    if isinstance(loader.sampler, _ShardSampler):
        loader.sampler.set_epoch(epoch)
        loader.sampler.start = start_batch * int(loader.batch_size)
