"""Data pipeline: every dataset format on small synthetic files, VDVAE's splits and preprocessing, loaders, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from vdvae_fast import data


class Hparams(dict):
    """The attribute dict the trainer passes around (hparams.py's object behaves the same)."""

    def __getattr__(self, key):
        return self.get(key)


def make_h(dataset: str, root: Path | None = None, **extra) -> Hparams:
    h = Hparams(dataset=dataset, data_root=str(root) if root else None, image_channels=3, n_batch=4, seed=0)
    h.update(extra)
    return h


def indexed_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Random uint8 images whose first two bytes spell out their index, so splits can be traced."""
    images = np.random.RandomState(seed).randint(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) % 256
    images[:, 0, 0, 1] = np.arange(n) // 256
    return images


def index_of(image: torch.Tensor) -> int:
    return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def run_batches(splits: data.DataSplits, h: Hparams, n_batches: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = data.make_loader(splits.train, h.n_batch, shuffle=True, seed=h.seed, drop_last=True)
    data.set_epoch(loader, 0)
    out = []
    for i, batch in enumerate(loader):
        if i == n_batches:
            break
        s = splits.image_size
        assert batch.dtype == torch.uint8 and batch.shape == (h.n_batch, s, s, 3)
        x_input, x_target = data.preprocess(batch, h, device="cpu")
        assert x_input.dtype == x_target.dtype == torch.float32
        assert x_input.shape == x_target.shape == batch.shape
        assert torch.isfinite(x_input).all()
        assert x_target.min() >= -1.0 and x_target.max() <= 1.0
        out.append((batch, x_target))
    assert out
    return out


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


# --------------------------------------------------------------------------------------------
# VDVAE's formats
# --------------------------------------------------------------------------------------------


def test_imagenet32_vdvae_split_memmap_and_batches(tmp_path):
    n = 5006  # just above VDVAE's 5000 held-out images, so the real split runs
    np.save(tmp_path / "imagenet32-train.npy", indexed_images(n, 32))
    np.save(tmp_path / "imagenet32-valid.npy", indexed_images(7, 32, seed=1))
    h = make_h("imagenet32", tmp_path)
    splits = data.load_dataset(h)

    assert (len(splits.train), len(splits.valid), len(splits.test)) == (n - 5000, 5000, 7)
    assert splits.image_size == 32 and splits.preprocessing.num_bits == 8
    for split in (splits.train, splits.valid, splits.test):
        assert isinstance(split.array, np.memmap)
    perm = np.random.RandomState(42).permutation(n)  # VDVAE: np.random.seed(42); np.random.permutation(N)
    assert [index_of(splits.train[i]) for i in range(len(splits.train))] == list(perm[:-5000])
    assert [index_of(splits.valid[i]) for i in (0, 1, 4999)] == list(perm[-5000:][[0, 1, 4999]])

    (batch, x_target), *_ = run_batches(splits, h)
    x_input, _ = data.preprocess(batch, h)
    expected = (batch.double() - 116.2373) / 69.37404
    torch.testing.assert_close(x_input.double(), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_target.double(), (batch.double() - 127.5) / 127.5, rtol=0, atol=1e-6)


def test_imagenet64_small_holdout_and_pickles_as_a_path(tmp_path):
    np.save(tmp_path / "imagenet64-train.npy", indexed_images(10, 64))
    np.save(tmp_path / "imagenet64-valid.npy", indexed_images(4, 64, seed=1))
    h = make_h("imagenet64", tmp_path, valid_holdout=3)
    splits = data.load_dataset(h)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (7, 3, 4)
    assert splits.image_size == 64
    run_batches(splits, h, n_batches=1)

    blob = pickle.dumps(splits.train)  # what a spawn-started DataLoader worker receives
    assert len(blob) < 10_000  # the path and indices, not the pixels
    clone = pickle.loads(blob)
    assert isinstance(clone.array, np.memmap)
    assert torch.equal(clone[3], splits.train[3])

    x_input, _ = data.preprocess(splits.train[0][None], h)
    torch.testing.assert_close(x_input, (splits.train[0][None].float() - 115.92961967) / 69.37404)


def write_cifar(root: Path, images_per_batch: int = 4, n_test: int = 6) -> np.ndarray:
    """CIFAR-10 python batches: pickled dicts of bytes keys, rows of 3072 uint8 in channel-major order."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train = indexed_images(5 * images_per_batch, 32)
    for i in range(5):
        part = train[i * images_per_batch : (i + 1) * images_per_batch]
        rows = part.transpose(0, 3, 1, 2).reshape(len(part), -1)
        batch = {b"batch_label": b"batch", b"labels": [0] * len(part), b"data": rows, b"filenames": []}
        with open(folder / f"data_batch_{i + 1}", "wb") as f:
            pickle.dump(batch, f)
    test = indexed_images(n_test, 32, seed=1)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"labels": [0] * n_test, b"data": test.transpose(0, 3, 1, 2).reshape(n_test, -1)}, f)
    return train


def test_cifar10_batches_split_and_layout(tmp_path):
    train_images = write_cifar(tmp_path)
    h = make_h("cifar10", tmp_path, valid_holdout=5)
    splits = data.load_dataset(h)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (15, 5, 6)

    # sklearn's train_test_split(test_size=5, random_state=11172018): test part = permutation[:5]
    perm = np.random.RandomState(11172018).permutation(20)
    assert [index_of(splits.valid[i]) for i in range(5)] == list(perm[:5])
    assert [index_of(splits.train[i]) for i in range(15)] == list(perm[5:])
    # rows of 3x32x32 come back as the original HWC images
    assert np.array_equal(splits.train[0].numpy(), train_images[perm[5]])

    (batch, _), *_ = run_batches(splits, h)
    x_input, _ = data.preprocess(batch, h)
    torch.testing.assert_close(x_input, (batch.float() - 120.63838) / 64.16736)


def test_cifar10_split_matches_sklearn(tmp_path):
    sklearn_split = pytest.importorskip("sklearn.model_selection")
    write_cifar(tmp_path)
    splits = data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=5))
    train, valid = sklearn_split.train_test_split(np.arange(20), test_size=5, random_state=11172018)
    assert [index_of(splits.train[i]) for i in range(15)] == list(train)
    assert [index_of(splits.valid[i]) for i in range(5)] == list(valid)


def test_ffhq256_split_and_5bit_targets(tmp_path):
    np.save(tmp_path / "ffhq-256.npy", indexed_images(12, 256))
    h = make_h("ffhq_256", tmp_path, valid_holdout=4, n_batch=2)
    splits = data.load_dataset(h)
    assert (len(splits.train), len(splits.valid)) == (8, 4)
    assert splits.test is splits.valid  # VDVAE evaluates FFHQ-256 on its held-out images
    assert isinstance(splits.train.array, np.memmap)
    assert splits.preprocessing.num_bits == 5
    perm = np.random.RandomState(5).permutation(12)
    assert [index_of(splits.valid[i]) for i in range(4)] == list(perm[-4:])

    (batch, x_target), *_ = run_batches(splits, h, n_batches=1)
    pixels = x_target * 127.5 + 127.5
    levels = torch.round(pixels).long()
    assert (pixels - levels).abs().max() < 1e-4
    assert torch.equal(levels, batch.long() // 8 * 8)  # floor(x / 8) * 8: 32 levels, multiples of 8
    x_input, _ = data.preprocess(batch, h)
    torch.testing.assert_close(x_input, (batch.float() - 112.8666757481) / 69.84780273)  # inputs keep 8 bits


def gradient_image(size: int, seed: int) -> np.ndarray:
    """A smooth image (fast to encode as PNG) with a seed-dependent colour."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.float32(seed * 40 % 256)), -1)
    return image.astype(np.uint8)


def test_ffhq1024_image_folders(tmp_path):
    for split, count in (("train", 2), ("valid", 1)):
        for i in range(count):
            save_png(tmp_path / "ffhq1024" / split / "0" / f"{split}{i:05d}.png", gradient_image(1024, i))
    h = make_h("ffhq_1024", tmp_path, n_batch=1)
    splits = data.load_dataset(h)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (2, 1, 1)
    assert splits.image_size == 1024
    (batch, x_target), *_ = run_batches(splits, h, n_batches=1)
    x_input, _ = data.preprocess(batch, h)
    unit = batch.float() / 255.0  # VDVAE read FFHQ-1024 through ToTensor: pixels in [0, 1]
    assert (x_input - (unit - 0.4387) / 0.2743).abs().max() < 1e-5
    assert (x_target - (unit - 0.5) * 2.0).abs().max() < 1e-6


def test_ffhq1024_wrong_size_names_both_sizes(tmp_path):
    for split in ("train", "valid"):  # the layout setup_ffhq1024.sh leaves: train/ and valid/ in data_root
        save_png(tmp_path / split / "0" / "00000.png", gradient_image(512, 0))
    with pytest.raises(ValueError, match=r"512x512.*1024x1024"):
        data.load_dataset(make_h("ffhq_1024", tmp_path))


# --------------------------------------------------------------------------------------------
# Any folder of images
# --------------------------------------------------------------------------------------------


def test_folder_of_png_and_jpeg(tmp_path):
    rng = np.random.RandomState(0)
    save_png(tmp_path / "a" / "rgba.png", rng.randint(0, 256, (37, 50, 4), dtype=np.uint8))
    save_png(tmp_path / "a" / "b" / "gray.PNG", rng.randint(0, 256, (41, 29), dtype=np.uint8))
    Image.fromarray(rng.randint(0, 256, (45, 80, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg", quality=90)
    Image.fromarray(rng.randint(0, 256, (33, 33, 3), dtype=np.uint8)).save(tmp_path / "x.jpeg")
    # center crop: a red square between blue strips stays red
    framed = np.zeros((40, 100, 3), np.uint8)
    framed[:, :30, 2] = framed[:, 70:, 2] = 255
    framed[:, 30:70, 0] = 255
    save_png(tmp_path / "framed.png", framed)
    for i in range(5):
        save_png(tmp_path / "more" / f"{i}.png", rng.randint(0, 256, (20 + i, 30, 3), dtype=np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    save_png(tmp_path / ".hidden" / "skip.png", np.zeros((8, 8, 3), np.uint8))

    h = make_h("folder", tmp_path, image_size=16, n_batch=3)
    splits = data.load_dataset(h)
    assert (len(splits.train), len(splits.valid)) == (9, 1) and splits.test is splits.valid
    assert not set(splits.train.files) & set(splits.valid.files)
    assert not any(".hidden" in f or f.endswith(".txt") for f in splits.train.files + splits.valid.files)
    again = data.load_dataset(h)
    assert again.train.files == splits.train.files and again.valid.files == splits.valid.files
    for split in (splits.train, splits.valid):
        for i in range(len(split)):
            assert split[i].shape == (16, 16, 3) and split[i].dtype == torch.uint8
    run_batches(splits, h)

    crop = data.ImageFiles([tmp_path / "framed.png"], 16, resize=True)[0].int()
    assert (crop[..., 0] > 200).all() and (crop[..., 2] < 50).all()


def test_folder_needs_images_and_a_size(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty"):
        data.load_dataset(make_h("folder", tmp_path / "empty", image_size=16))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_dataset(make_h("folder", tmp_path / "nowhere", image_size=16))
    with pytest.raises(ValueError, match="image_size"):
        data.load_dataset(make_h("folder", tmp_path / "empty"))


# --------------------------------------------------------------------------------------------
# Built-in photographs
# --------------------------------------------------------------------------------------------


def test_builtin_patches_are_real_photos_split_by_source():
    h = make_h("builtin", image_size=32, n_batch=8)
    splits = data.load_dataset(h)
    train, valid = data.builtin_patches(32)
    assert len(train) >= 3000 and len(valid) >= 1000
    assert train.dtype == np.uint8 and train.shape[1:] == (32, 32, 3)

    # deterministic: a fresh build (bypassing the cache) gives the same bytes
    fresh_train, fresh_valid = data.builtin_patches.__wrapped__(32)
    assert np.array_equal(fresh_train, train) and np.array_equal(fresh_valid, valid)

    # train and valid come from different photographs: no textured patch appears in both
    assert not set(data.BUILTIN_TRAIN_IMAGES) & set(data.BUILTIN_VALID_IMAGES)
    textured = [a[a.reshape(len(a), -1).std(axis=1) > 2] for a in (train, valid)]
    assert not {p.tobytes() for p in textured[0]} & {p.tobytes() for p in textured[1]}

    # real photographs: almost every patch has texture, and the pixels use the whole range
    for array, kept in zip((train, valid), textured, strict=True):
        assert len(kept) >= 0.95 * len(array)
        assert array.min() <= 5 and array.max() >= 250

    assert len(splits.train) == len(train) and splits.test is splits.valid
    run_batches(splits, h)


def test_builtin_other_patch_size():
    train, valid = data.builtin_patches(16)
    assert train.shape[1:] == (16, 16, 3) and len(train) > len(data.builtin_patches(32)[0])


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def order_of(loader) -> list[int]:
    return [index_of(image) for batch in loader for image in batch]


def test_loader_order_depends_on_seed_and_epoch_only():
    dataset = data.ArrayImages(indexed_images(23, 4))
    first = order_of(data.make_loader(dataset, 5, shuffle=True, seed=3))
    assert sorted(first) == list(range(23))
    assert order_of(data.make_loader(dataset, 5, shuffle=True, seed=3)) == first
    loader = data.make_loader(dataset, 5, shuffle=True, seed=3, drop_last=True)
    data.set_epoch(loader, 1)
    second = order_of(loader)
    assert len(second) == 20 and second != first[:20]
    assert order_of(data.make_loader(dataset, 5, shuffle=False)) == list(range(23))


def test_distributed_loader_shards():
    dataset = data.ArrayImages(indexed_images(11, 4))
    loaders = [
        data.make_loader(dataset, 2, shuffle=True, distributed=True, seed=1, rank=r, world_size=2) for r in (0, 1)
    ]
    assert all(isinstance(loader.sampler, DistributedSampler) for loader in loaders)
    train_orders = [order_of(loader) for loader in loaders]
    assert len(train_orders[0]) == len(train_orders[1]) == 6  # padded: same number of steps on every rank
    assert set(train_orders[0]) | set(train_orders[1]) == set(range(11))

    evals = [
        order_of(data.make_loader(dataset, 2, shuffle=False, distributed=True, even_shards=False, rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert sorted(evals[0] + evals[1]) == list(range(11))  # each example exactly once


@pytest.mark.parametrize("dataset", data.DATASETS)
def test_preprocess_is_bit_identical_to_vdvae(dataset):
    """VDVAE: float32 constant tensors, inp.add_(shift).mul_(scale); out.add_(shift_loss).mul_(scale_loss)."""
    constants = {
        "cifar10": (-120.63838, 1.0 / 64.16736, -127.5, 1.0 / 127.5),
        "imagenet32": (-116.2373, 1.0 / 69.37404, -127.5, 1.0 / 127.5),
        "imagenet64": (-115.92961967, 1.0 / 69.37404, -127.5, 1.0 / 127.5),
        "ffhq_256": (-112.8666757481, 1.0 / 69.84780273, -127.5, 1.0 / 127.5),
        "ffhq_1024": (-0.4387, 1.0 / 0.2743, -0.5, 2.0),
    }.get(dataset, (-116.2373, 1.0 / 69.37404, -127.5, 1.0 / 127.5))  # folder/builtin: ImageNet-32's
    shift, scale, shift_loss, scale_loss = (torch.tensor([c]).view(1, 1, 1, 1) for c in constants)
    batch = torch.randint(0, 256, (2, 8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    batch.view(-1)[:2] = torch.tensor([0, 255], dtype=torch.uint8)
    inp = batch.float() / 255.0 if dataset == "ffhq_1024" else batch.float()
    out = inp.clone()
    inp.add_(shift).mul_(scale)
    if dataset == "ffhq_256":
        out.mul_(1.0 / 8.0).floor_().mul_(8.0)
    out.add_(shift_loss).mul_(scale_loss)

    x_input, x_target = data.preprocess(batch, make_h(dataset))
    assert torch.equal(x_input, inp) and torch.equal(x_target, out)


def test_preprocess_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        data.preprocess(torch.zeros(1, 4, 4, 3), make_h("cifar10"))


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset, names, source",
    [
        ("imagenet32", ["imagenet32-train.npy", "imagenet32-valid.npy"], "image-net.org"),
        ("imagenet64", ["imagenet64-train.npy", "imagenet64-valid.npy"], "image-net.org"),
        ("cifar10", ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"], "cs.toronto.edu"),
        ("ffhq_256", ["ffhq-256.npy"], "FFHQ"),
        ("ffhq_1024", ["ffhq1024/train", "ffhq1024/valid"], "NVlabs/ffhq-dataset"),
    ],
)
def test_missing_files_are_named(tmp_path, dataset, names, source):
    with pytest.raises(FileNotFoundError) as err:
        data.load_dataset(make_h(dataset, tmp_path))
    message = str(err.value)
    assert all(name in message for name in names) and source in message and str(tmp_path) in message


def test_missing_valid_file_is_named(tmp_path):
    np.save(tmp_path / "imagenet32-train.npy", indexed_images(4, 32))
    with pytest.raises(FileNotFoundError, match="missing: imagenet32-valid.npy"):
        data.load_dataset(make_h("imagenet32", tmp_path))


def test_wrong_image_size_names_both_sizes(tmp_path):
    np.save(tmp_path / "imagenet32-train.npy", indexed_images(8, 16))
    np.save(tmp_path / "imagenet32-valid.npy", indexed_images(2, 16))
    with pytest.raises(ValueError, match=r"16x16.*32x32"):
        data.load_dataset(make_h("imagenet32", tmp_path, valid_holdout=2))
    with pytest.raises(ValueError, match=r"32x32.*64"):
        data.load_dataset(make_h("imagenet32", tmp_path, image_size=64))


def test_too_few_images_for_vdvae_holdout(tmp_path):
    np.save(tmp_path / "ffhq-256.npy", indexed_images(3, 256))
    with pytest.raises(ValueError, match="valid_holdout"):
        data.load_dataset(make_h("ffhq_256", tmp_path))


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset(make_h("mnist"))


def test_an_epoch_can_start_part_way_with_the_same_order():
    """A resumed run passes over the batches it trained on: the rest of the epoch, in the same order."""
    dataset = data.ArrayImages(indexed_images(23, 4))
    loader = data.make_loader(dataset, 5, shuffle=True, seed=3, drop_last=True)
    data.set_epoch(loader, 2)
    whole = order_of(loader)
    data.set_epoch(loader, 2, start_batch=2)
    assert order_of(loader) == whole[10:] and len(loader) == 2
    data.set_epoch(loader, 3)
    assert len(loader) == 4 and sorted(order_of(loader)) != sorted(whole)  # the next epoch starts from its first


def test_starting_an_epoch_leaves_torchs_default_generator_alone():
    """The training noise draws from torch's default generator: iterating a loader must not move it."""
    loader = data.make_loader(data.ArrayImages(indexed_images(8, 4)), 4, shuffle=True, seed=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    for start in (0, 1):
        data.set_epoch(loader, 0, start_batch=start)
        order_of(loader)
    assert torch.equal(torch.rand(3), expected)


def test_dataset_names_aliases_and_preprocessing():
    assert data.canonical_dataset("FFHQ256") == "ffhq_256" and data.canonical_dataset("cifar-10") == "cifar10"
    assert data.canonical_dataset("mnist") == "mnist"  # left for the caller to refuse
    assert data.preprocessing_for("ffhq256").num_bits == 5
    assert data.preprocessing_for("folder") == data.preprocessing_for("imagenet32")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of cifar10, imagenet32"):
        data.preprocessing_for("mnist")
