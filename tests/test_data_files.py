"""Dataset files that are damaged, hostile or unusual: every one refused before training with its name and the
problem, or read correctly (16-bit and transparent images). Oracles: the files' own contents and closed forms."""

from __future__ import annotations

import codecs
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vdvae_fast import data
from vdvae_fast.training import cli


class Hparams(dict):
    """The attribute dict the trainer passes around."""

    def __getattr__(self, key):
        return self.get(key)


def make_h(dataset: str, root: Path | None = None, **extra) -> Hparams:
    h = Hparams(dataset=dataset, data_root=str(root) if root else None, image_channels=3, n_batch=2, seed=0)
    h.update(extra)
    return h


def noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# CIFAR-10 batches: a restricted unpickler
# --------------------------------------------------------------------------------------------


def cifar_rows(images: np.ndarray) -> np.ndarray:
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CIFAR's channel-major rows


def write_cifar(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL, payloads: dict | None = None) -> np.ndarray:
    """Five training batches of 2 images and a test batch; payloads: {file name: an extra value in its dict}."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images = noise((12, 32, 32, 3))
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        batch = {b"batch_label": b"batch", b"labels": [1, 2], b"data": cifar_rows(images[2 * i : 2 * i + 2])}
        if payloads and name in payloads:
            batch[b"extra"] = payloads[name]
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return images


class CreatesAFile:
    """A pickled value whose unpickling opens (so creates) a file: what a crafted batch would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_are_read(tmp_path, protocol):
    """Protocol 2 is the real files' (Python 2); Python 3's protocols 2-5 spell bytes and arrays differently."""
    images = write_cifar(tmp_path, protocol)
    splits = data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=2))
    train_and_valid = {bytes(splits.train[i].numpy()) for i in range(8)} | {
        bytes(splits.valid[i].numpy()) for i in (0, 1)
    }
    assert train_and_valid == {bytes(image) for image in images[:10]}
    assert np.array_equal(splits.test[1].numpy(), images[11])


class Python2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for the real CIFAR-10 batches: every string (dict keys, numpy's
    dtype codes) as a Python 2 str (BINSTRING: no _codecs.encode, no unicode) and numpy's functions under
    numpy 1's module names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_python2_str(self, obj: bytes | str) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = dispatch[str] = save_python2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", "")
        if not module.startswith("numpy._core"):
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{module.replace('numpy._core', 'numpy.core')}\n{obj.__name__}\n".encode())
        self.memoize(obj)


def test_cifar_batches_as_python_2_wrote_them_are_read(tmp_path):
    images = write_cifar(tmp_path)
    for path in (tmp_path / "cifar-10-batches-py").iterdir():
        with open(path, "rb") as f:
            batch = pickle.load(f)
        with open(path, "wb") as f:
            Python2Pickler(f, protocol=2).dump(batch)
        assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes() and b"_codecs" not in path.read_bytes()
    splits = data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=2))
    assert np.array_equal(splits.test[0].numpy(), images[10])


def test_a_cifar_batch_that_would_create_a_file_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "created-by-the-batch"
    # The payload is live: plain pickle, as the loader used, creates the file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({b"x": CreatesAFile(probe)}))
    assert probe.exists()

    write_cifar(tmp_path / "data", payloads={"data_batch_3": CreatesAFile(marker)})
    with pytest.raises(data.DataError) as err:
        data.load_dataset(make_h("cifar10", tmp_path / "data", valid_holdout=2))
    message = str(err.value)
    assert str(tmp_path / "data" / "cifar-10-batches-py" / "data_batch_3") in message
    assert "io.open" in message and "numpy arrays" in message
    assert not marker.exists()


class CallsCodecs:
    """_codecs.encode is allowed only as pickle's way of spelling bytes (latin1), not as any codec call."""

    def __reduce__(self):
        return (codecs.encode, ("x", "rot13"))


def test_cifar_batch_refuses_codecs_other_than_latin1_bytes(tmp_path):
    write_cifar(tmp_path, protocol=2, payloads={"test_batch": CallsCodecs()})
    with pytest.raises(data.DataError, match=r"test_batch is refused .*'rot13'"):
        data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=2))


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "refused as a CIFAR-10 python batch"),
        (b"not a pickle at all", "refused as a CIFAR-10 python batch"),
        (pickle.dumps([1, 2, 3]), "no 'data' array"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.float32)}), "float32"),
        (pickle.dumps({b"data": np.zeros((2, 3000), np.uint8)}), "3072 values"),
    ],
)
def test_malformed_cifar_batches_name_the_file(tmp_path, content, problem):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(content)
    with pytest.raises(data.DataError, match=problem) as err:
        data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=2))
    assert "data_batch_2" in str(err.value)


def test_a_directory_in_place_of_a_cifar_batch_is_named(tmp_path):
    write_cifar(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.unlink()
    batch.mkdir()
    with pytest.raises(data.DataError, match=r"test_batch is a directory"):
        data.load_dataset(make_h("cifar10", tmp_path, valid_holdout=2))


# --------------------------------------------------------------------------------------------
# .npy files
# --------------------------------------------------------------------------------------------


def write_imagenet32(root: Path, n: int = 6) -> Path:
    np.save(root / "imagenet32-train.npy", noise((n, 32, 32, 3)))
    np.save(root / "imagenet32-valid.npy", noise((2, 32, 32, 3), seed=1))
    return root / "imagenet32-train.npy"


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def corrupt_header(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[20:40] = b"#" * 20  # inside the header's dict literal
    path.write_bytes(bytes(content))


def object_array(path: Path) -> None:
    np.save(path, np.array([None, "x", 3], dtype=object), allow_pickle=True)


def directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def text_file(path: Path) -> None:
    path.write_text("images go here")


@pytest.mark.parametrize(
    "damage, problem",
    [
        (truncate, r"is truncated: its header promises 6 images \(18560 bytes in all\) but the file has 18460 bytes"),
        (corrupt_header, "is not a readable .npy file"),
        (object_array, r"holds Python objects \(dtype object\)"),
        (directory, "is a directory"),
        (text_file, "is not a readable .npy file"),
    ],
)
def test_damaged_npy_files_are_named_with_the_problem(tmp_path, damage, problem):
    path = write_imagenet32(tmp_path)
    damage(path)
    with pytest.raises(data.DataError, match=problem) as err:
        data.load_dataset(make_h("imagenet32", tmp_path, valid_holdout=2))
    assert str(path) in str(err.value)


def test_damaged_test_npy_is_named(tmp_path):
    write_imagenet32(tmp_path)
    truncate(tmp_path / "imagenet32-valid.npy")
    with pytest.raises(data.DataError, match=r"imagenet32-valid.npy is truncated"):
        data.load_dataset(make_h("imagenet32", tmp_path, valid_holdout=2))


def test_npy_of_no_images_is_named(tmp_path):
    np.save(tmp_path / "ffhq-256.npy", np.zeros((0, 256, 256, 3), np.uint8))
    with pytest.raises(data.DataError, match=r"ffhq-256.npy holds no images"):
        data.load_dataset(make_h("ffhq_256", tmp_path, valid_holdout=2))


# --------------------------------------------------------------------------------------------
# image_size and valid_holdout: 0 is not "unset"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["builtin", "cifar10", "folder"])
@pytest.mark.parametrize("size", [0, -32])
def test_image_size_zero_or_negative_is_refused(tmp_path, dataset, size):
    with pytest.raises(ValueError, match=rf"--image_size must be a whole number of at least 1 .*got {size}"):
        data.load_dataset(make_h(dataset, tmp_path, image_size=size))


@pytest.mark.parametrize("count", [0, -1])
def test_valid_holdout_zero_or_negative_is_refused(tmp_path, count):
    write_imagenet32(tmp_path, n=6000)  # enough for VDVAE's 5000, which 0 used to stand for
    with pytest.raises(ValueError, match=rf"--valid_holdout must be a whole number of at least 1 .*got {count}"):
        data.load_dataset(make_h("imagenet32", tmp_path, valid_holdout=count))


@pytest.mark.parametrize("dataset", ["builtin", "ffhq_1024"])
def test_valid_holdout_is_refused_where_validation_images_are_fixed(tmp_path, dataset):
    with pytest.raises(ValueError, match=rf"dataset '{dataset}' has fixed validation images.*applies to cifar10"):
        data.load_dataset(make_h(dataset, tmp_path, valid_holdout=3))


def test_folder_holds_out_valid_holdout_images(tmp_path):
    for i in range(6):
        Image.fromarray(noise((10, 10, 3), seed=i)).save(tmp_path / f"{i}.png")
    splits = data.load_dataset(make_h("folder", tmp_path, image_size=8, valid_holdout=2))
    assert (len(splits.train), len(splits.valid)) == (4, 2)
    assert len(data.load_dataset(make_h("folder", tmp_path, image_size=8)).valid) == 1  # 10%, at least 1
    with pytest.raises(ValueError, match=r"has 6 images, too few to hold out 6 .* from 1 to 5"):
        data.load_dataset(make_h("folder", tmp_path, image_size=8, valid_holdout=6))


# --------------------------------------------------------------------------------------------
# Image modes: 8-bit RGB as a viewer shows the image
# --------------------------------------------------------------------------------------------


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def write_png16_rgb(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (colour type 2, bit depth 16), which Pillow cannot write."""
    height, width, _ = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def decoded(path: Path, size: int) -> np.ndarray:
    """The image as the folder dataset (center crop, resize to its own size: no resampling) reads it."""
    return data.ImageFiles([path], size, resize=True)[0].numpy()


def test_16_bit_gray_png_is_scaled_not_clipped(tmp_path):
    gray = np.random.RandomState(0).randint(0, 65536, size=(6, 6), dtype=np.uint16)
    gray[0, :3] = (0, 257 * 128, 65535)
    Image.fromarray(gray).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode in ("I;16", "I")  # really read as 16 bits
    expected = np.repeat(np.rint(gray * (255 / 65535)).astype(np.uint8)[..., None], 3, axis=-1)
    assert expected[0, :3, 0].tolist() == [0, 128, 255]
    assert np.array_equal(decoded(tmp_path / "gray16.png", 6), expected)  # folder: crop and resize
    assert np.array_equal(data.ImageFiles([tmp_path / "gray16.png"], 6, resize=False)[0].numpy(), expected)


def test_16_bit_rgb_png_is_scaled(tmp_path):
    levels = np.random.RandomState(1).randint(0, 256, size=(5, 5, 3))
    levels[0, 0] = (0, 128, 255)
    write_png16_rgb(tmp_path / "rgb16.png", (levels * 257).astype(np.uint16))  # k * 257 is k in 8 bits exactly
    assert np.array_equal(decoded(tmp_path / "rgb16.png", 5), levels)


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[..., None] / 255.0
    return rgb.astype(np.float64) * a + 255.0 * (1.0 - a)


def test_transparent_images_are_composited_over_white(tmp_path):
    rgba = noise((6, 6, 4), seed=2)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    got = decoded(tmp_path / "rgba.png", 6).astype(np.float64)
    assert np.abs(got - over_white(rgba[..., :3], rgba[..., 3])).max() <= 1
    assert got[0, 0].tolist() == [255, 255, 255] and got[0, 1].tolist() == rgba[0, 1, :3].tolist()

    la = noise((6, 6, 2), seed=3)
    Image.fromarray(la).save(tmp_path / "la.png")
    got = decoded(tmp_path / "la.png", 6).astype(np.float64)
    gray = np.repeat(la[..., :1], 3, axis=-1)
    assert np.abs(got - over_white(gray, la[..., 1])).max() <= 1

    palette = Image.fromarray(np.arange(36, dtype=np.uint8).reshape(6, 6)).convert("P")
    colours = np.asarray(palette.convert("RGB")).copy()
    palette.info["transparency"] = int(np.asarray(palette)[2, 3])
    palette.save(tmp_path / "palette.png")
    got = decoded(tmp_path / "palette.png", 6)
    colours[2, 3] = 255
    assert np.array_equal(got, colours)


def test_gray_and_bilevel_images_become_gray_rgb(tmp_path):
    gray = noise((6, 6), seed=4)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    assert np.array_equal(decoded(tmp_path / "gray.png", 6), np.repeat(gray[..., None], 3, axis=-1))
    bits = noise((6, 6), seed=5) > 127
    Image.fromarray(bits).save(tmp_path / "bits.png")
    assert np.array_equal(decoded(tmp_path / "bits.png", 6), np.repeat(bits[..., None] * 255, 3, axis=-1))


# --------------------------------------------------------------------------------------------
# Unreadable image files: found before training, all named
# --------------------------------------------------------------------------------------------


def write_good_pngs(folder: Path, count: int, size: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(noise((size, size, 3), seed=i)).save(folder / f"good{i}.png")


def test_unreadable_images_are_all_named_before_training(tmp_path):
    write_good_pngs(tmp_path, 5, size=40)
    good = (tmp_path / "good0.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "notes.png").write_text("this is text, not a picture")
    Image.fromarray(noise((64, 64, 3))).save(tmp_path / "photo.jpg", quality=95)
    photo = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(photo[: int(len(photo) * 0.7)])
    Image.fromarray(noise((8, 8, 3))).save(tmp_path / "animation.png", format="GIF")

    with pytest.raises(data.DataError) as err:
        data.load_dataset(make_h("folder", tmp_path, image_size=8))
    message = str(err.value)
    assert message.startswith(f"4 of 10 image files under {str(tmp_path)!r} cannot be used")
    assert f"{tmp_path / 'truncated.png'}: truncated: no PNG end chunk" in message
    assert f"{tmp_path / 'notes.png'}: not a readable image" in message
    assert f"{tmp_path / 'cut.jpg'}: truncated: no JPEG end-of-image marker" in message
    assert f"{tmp_path / 'animation.png'}: a GIF image" in message
    assert "good" not in message and "photo.jpg" not in message


def test_many_unreadable_images_are_counted(tmp_path):
    write_good_pngs(tmp_path, 2)
    for i in range(13):
        (tmp_path / f"bad{i:02d}.png").write_text("text")
    with pytest.raises(data.DataError, match=r"^13 of 15 image files .*bad09.png: .*; and 3 more\. Replace or remove"):
        data.load_dataset(make_h("folder", tmp_path, image_size=8))


def test_every_ffhq1024_image_is_checked_not_only_the_first(tmp_path):
    ramp = np.linspace(0, 255, 1024).astype(np.uint8)
    big = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], ramp[None, :]), -1)
    for split in ("train", "valid"):
        (tmp_path / split).mkdir()
        Image.fromarray(big).save(tmp_path / split / "00000.png", compress_level=1)
    Image.fromarray(noise((512, 512, 3))).save(tmp_path / "train" / "00001.png", compress_level=1)
    (tmp_path / "valid" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # a PNG signature and nothing else
    with pytest.raises(data.DataError, match=r"1 of 2 image files .*00001.png: 512x512 but .* 1024x1024"):
        data.load_dataset(make_h("ffhq_1024", tmp_path))
    (tmp_path / "train" / "00001.png").unlink()
    with pytest.raises(data.DataError, match=r"1 of 2 image files .*valid.*00001.png: not a readable image"):
        data.load_dataset(make_h("ffhq_1024", tmp_path))


def test_an_image_damaged_inside_its_pixel_data_is_named_when_decoded(tmp_path):
    """Past the start-up checks (header and end marker intact), decoding the image names it."""
    write_good_pngs(tmp_path, 2, size=32)
    damaged = bytearray((tmp_path / "good1.png").read_bytes())
    damaged[200:260] = b"\x07" * 60  # inside the compressed pixel data
    (tmp_path / "good1.png").write_bytes(bytes(damaged))
    splits = data.load_dataset(make_h("folder", tmp_path, image_size=8, valid_holdout=1))
    with pytest.raises(data.DataError, match=rf"cannot decode image {tmp_path / 'good1.png'}: "):
        for split in (splits.train, splits.valid):
            for i in range(len(split)):
                split[i]


# --------------------------------------------------------------------------------------------
# Through the training program: one line, exit status 2, nothing trained
# --------------------------------------------------------------------------------------------


def truncated_npy_dataset(root: Path) -> tuple[list[str], Path]:
    path = write_imagenet32(root)
    truncate(path)
    return ["--dataset", "imagenet32", "--image_size", "32", "--valid_holdout", "2"], path


def hostile_cifar_dataset(root: Path) -> tuple[list[str], Path]:
    write_cifar(root, payloads={"data_batch_1": CreatesAFile(root / "created")})
    return [
        "--dataset",
        "cifar10",
        "--image_size",
        "32",
        "--valid_holdout",
        "2",
    ], root / "cifar-10-batches-py" / "data_batch_1"


def text_png_dataset(root: Path) -> tuple[list[str], Path]:
    write_good_pngs(root, 3)
    (root / "readme.png").write_text("text")
    return ["--dataset", "folder", "--image_size", "8"], root / "readme.png"


@pytest.mark.parametrize("dataset", [truncated_npy_dataset, hostile_cifar_dataset, text_png_dataset])
def test_train_refuses_bad_data_in_one_line_with_status_2(tmp_path, capsys, dataset):
    root = tmp_path / "data"
    root.mkdir()
    flags, bad_file = dataset(root)
    argv = ["--hps", "tiny", "--data_root", str(root), "--save_dir", str(tmp_path / "runs"), "--device", "cpu"]
    assert cli.main(argv + flags) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and str(bad_file) in err
    assert "Traceback" not in err and not (root / "created").exists()
    assert not list((tmp_path / "runs").rglob("*.pt"))


def test_an_image_that_fails_to_decode_mid_run_saves_and_ends_in_one_line(tmp_path, capsys):
    """Damage past the start-up checks surfaces only when the image is read: the run saves, then exits 2."""
    root = tmp_path / "data"
    root.mkdir()
    write_good_pngs(root, 12, size=32)
    damaged = bytearray((root / "good5.png").read_bytes())
    damaged[200:260] = b"\x07" * 60  # inside the compressed pixel data: header and end marker intact
    (root / "good5.png").write_bytes(bytes(damaged))
    argv = ["--hps", "tiny", "--dataset", "folder", "--image_size", "8", "--valid_holdout", "1", "--n_batch", "1",
            "--data_root", str(root), "--save_dir", str(tmp_path / "runs"), "--desc", "r", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == cli.USAGE_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(root / "good5.png") in err and "Traceback" not in err
    assert "saved" in err and (tmp_path / "runs" / "r" / "latest.pt").exists()
