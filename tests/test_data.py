"""Tests for lemmse_core.data: real files where they resolve, small synthetic files otherwise."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lemmse_core import data

SHARED = Path(data.__file__).resolve().parents[2] / "shared" / "data"


def _resolves(name: str, split: str = "train", root: Path | None = None) -> bool:
    """True if one image of ``name`` loads from local files (never downloads)."""
    try:
        data.load(name, split, n=1, root=root, download=False)
    except FileNotFoundError:
        return False
    return True


def needs(name: str, root: Path | None = None) -> pytest.MarkDecorator:
    where = root or "data_root() candidates ($LEMMSE_DATA, <repo>/data, <repo>/../shared/data)"
    return pytest.mark.skipif(
        not _resolves(name, root=root), reason=f"{name} files not found in {where}"
    )


SHARED_OK = SHARED.is_dir()
needs_shared = pytest.mark.skipif(not SHARED_OK, reason=f"shared data copy absent: {SHARED}")
LABELLED = ["fashionmnist", "mnist", "cifar10"]


@pytest.fixture
def no_network(monkeypatch):
    """Make every pooch download fail as if offline; return the list of attempted URLs."""
    import pooch

    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise ConnectionError("network disabled in tests")

    monkeypatch.setattr(pooch, "retrieve", offline)
    return calls


# ----------------------------------------------------------------------------- real data


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        pytest.param("fashionmnist", (1, 28, 28), marks=needs("fashionmnist")),
        pytest.param("mnist", (1, 28, 28), marks=needs("mnist")),
        pytest.param("cifar10", (3, 32, 32), marks=needs("cifar10")),
        pytest.param("ffhq", (3, 64, 64), marks=needs("ffhq")),
    ],
)
def test_shape_dtype_range_and_first_n(name, shape):
    size = 64 if name == "ffhq" else None
    x10 = data.load(name, "test", n=10 if name != "ffhq" else 5, size=size)
    x5 = data.load(name, "test", n=5 if name != "ffhq" else 3, size=size)
    assert x10.dtype == torch.float32
    assert x10.shape[1:] == shape
    assert 0 <= x10.min() and x10.max() <= 1 and x10.max() > 0.5
    assert torch.equal(x5, x10[: len(x5)])


@pytest.mark.parametrize("name", [pytest.param(n, marks=needs(n)) for n in LABELLED])
def test_labels_first_n(name):
    y = data.load_labels(name, "train", n=10)
    assert y.dtype == torch.int64 and y.shape == (10,)
    assert torch.equal(data.load_labels(name, "train", n=5), y[:5])
    assert 0 <= y.min() and y.max() <= 9


@needs("fashionmnist")
def test_fashionmnist_train_mean():
    x = data.load("FashionMNIST")
    assert x.shape == (60000, 1, 28, 28)
    assert abs(x.double().mean().item() - 0.2860) < 1e-3


@needs("mnist")
def test_mnist_train_mean_and_labels():
    x = data.load("mnist")
    assert x.shape == (60000, 1, 28, 28)
    assert abs(x.double().mean().item() - 0.1307) < 1e-3
    assert data.load_labels("mnist", n=5).tolist() == [5, 0, 4, 1, 9]


@needs("cifar10")
def test_cifar10_known_values():
    assert data.load_labels("cifar10", "train", n=5).tolist() == [6, 9, 9, 4, 1]
    assert data.load_labels("cifar10", "test", n=5).tolist() == [3, 8, 8, 0, 6]
    x = data.load("cifar10", n=1)
    assert x.shape == (1, 3, 32, 32)
    assert (x[0, 0, 0, :3] * 255).round().tolist() == [59, 43, 50]


@needs_shared
@needs("cifar10", root=SHARED)
def test_cifar10_too_many_images_raises():
    assert len(data.load("cifar10", "test", root=SHARED)) == 1000
    with pytest.raises(ValueError, match=r"n=1001 but only 1000 CIFAR-10 test images"):
        data.load("cifar10", "test", n=1001, root=SHARED)
    with pytest.raises(ValueError, match=r"n=50001 exceeds"):
        data.load("cifar10", "train", n=50001)


@needs("fashionmnist")
def test_pad_28_to_32():
    x = data.load("fashionmnist", "test", n=8)
    y = data.load("fashionmnist", "test", n=8, size=32)
    assert y.shape == (8, 1, 32, 32)
    assert torch.equal(y[..., 2:30, 2:30], x)
    border = y.clone()
    border[..., 2:30, 2:30] = 0
    assert border.abs().max() == 0


@needs("mnist")
def test_interp_resize():
    y = data.load("mnist", "test", n=4, size=32, resize="interp")
    assert y.shape == (4, 1, 32, 32)
    assert 0 <= y.min() and y.max() <= 1
    z = data.load("mnist", "test", n=4, size=14, resize="interp")
    x = data.load("mnist", "test", n=4)
    assert torch.allclose(z, x.reshape(4, 1, 14, 2, 14, 2).mean((3, 5)), atol=1e-6)


@needs("cifar10")
def test_color_conversion():
    rgb = data.load("cifar10", "test", n=3)
    gray = data.load("cifar10", "test", n=3, color=False)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    assert gray.shape == (3, 1, 32, 32)
    assert torch.allclose(gray[:, 0], luma, atol=1e-6)
    assert torch.equal(data.load("cifar10", "test", n=3, color=True), rgb)


@needs("mnist")
def test_gray_to_rgb():
    x = data.load("mnist", "test", n=3)
    y = data.load("mnist", "test", n=3, color=True, size=32)
    assert y.shape == (3, 3, 32, 32)
    assert all(torch.equal(y[:, c : c + 1, 2:30, 2:30], x) for c in range(3))
    assert torch.equal(data.load("mnist", "test", n=3, color=False), x)


@needs("ffhq")
def test_ffhq_64_from_256_matches_stored_64(tmp_path):
    stored = data.load("ffhq", size=64)
    src = data.data_root("ffhq") / "ffhq" / "256x256"
    if not src.is_dir():
        pytest.skip(f"no 256x256 FFHQ folder in {src.parent}")
    (tmp_path / "ffhq").mkdir()
    (tmp_path / "ffhq" / "256x256").symlink_to(src, target_is_directory=True)
    derived = data.load("ffhq", size=64, root=tmp_path)
    assert derived.shape == stored.shape
    assert (derived - stored).abs().max() * 255 <= 0.5 + 1e-3
    assert data.load("ffhq", size=48, n=2, root=tmp_path).shape == (2, 3, 48, 48)
    with pytest.raises(ValueError, match="size=512"):
        data.load("ffhq", size=512, root=tmp_path)


@needs_shared
@needs("ffhq", root=SHARED)
def test_ffhq_split_sizes_and_gray():
    assert data.load("ffhq", "train", size=32, root=SHARED).shape == (12, 3, 32, 32)
    test = data.load("ffhq", "test", size=32, root=SHARED)
    assert test.shape == (5, 3, 32, 32)
    gray = data.load("ffhq", "test", size=32, color=False, root=SHARED)
    luma = (test * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(gray, luma, atol=1e-6)
    assert data.load("ffhq", root=SHARED, n=1).shape == (1, 3, 256, 256)  # native = largest
    with pytest.raises(ValueError, match="only 5 FFHQ test images"):
        data.load("ffhq", "test", n=6, root=SHARED)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "imagenet"}, ValueError, "name"),
        ({"name": 3}, TypeError, "name"),
        ({"split": "val"}, ValueError, "split"),
        ({"n": 0}, ValueError, "n must"),
        ({"n": -3}, ValueError, "n must"),
        ({"n": 2.5}, TypeError, "n must"),
        ({"n": True}, TypeError, "n must"),
        ({"n": 60001}, ValueError, "n=60001 exceeds"),
        ({"size": 0}, ValueError, "size must"),
        ({"size": "32"}, TypeError, "size must"),
        ({"resize": "nearest"}, ValueError, "resize must"),
        ({"color": "rgb"}, TypeError, "color must"),
        ({"color": 1}, TypeError, "color must"),
    ],
)
def test_bad_arguments(kwargs, error, match, no_network):
    kwargs = {"name": "mnist", "n": 2} | kwargs
    with pytest.raises(error, match=match):
        data.load(**kwargs)
    assert no_network == []


@needs("mnist")
def test_pad_cannot_shrink():
    with pytest.raises(ValueError, match="size=20.*resize='interp'"):
        data.load("mnist", n=2, size=20)


def test_ffhq_has_no_labels():
    with pytest.raises(ValueError, match="name='ffhq'"):
        data.load_labels("ffhq")


# ----------------------------------------------------------------------------- locations


def test_missing_files_offline(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("LEMMSE_DATA", str(tmp_path))
    assert data.data_root() == tmp_path
    assert data.data_root("mnist") == tmp_path
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz") as info:
        data.load("fashionmnist", "test", n=3)
    message = str(info.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message and "LEMMSE_DATA" in message
    assert "Download failed" in message and "<folder>" not in message
    assert no_network == [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz"
    ]
    with pytest.raises(FileNotFoundError, match="data_batch_1, .*data_batch_2"):
        data.load("cifar10", n=15000)
    with pytest.raises(FileNotFoundError, match="ffhq/<S>x<S>") as info:
        data.load("ffhq")
    assert f"{tmp_path / 'ffhq'}/<S>x<S>" in str(info.value)
    assert "<folder>" not in str(info.value)


def test_download_disabled(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="train-labels-idx1-ubyte.gz.*disabled"):
        data.load_labels("mnist", root=tmp_path, download=False)
    assert no_network == []


def _write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x800 + array.ndim if magic is None else magic
    header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_download_success_is_used(tmp_path, monkeypatch):
    import pooch

    images = np.arange(4 * 28 * 28).reshape(4, 28, 28) % 256
    source = tmp_path / "src" / "t10k-images-idx3-ubyte.gz"
    _write_idx(source, images)
    _register(monkeypatch, "mnist", source)

    def fake_retrieve(url, known_hash, fname, path, **kwargs):
        assert known_hash == data.REGISTRY["mnist"]["files"][fname]
        (Path(path) / fname).write_bytes(source.read_bytes())
        return str(Path(path) / fname)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    x = data.load("mnist", "test", root=tmp_path)
    assert (tmp_path / "MNIST/raw/t10k-images-idx3-ubyte.gz").is_file()
    assert torch.equal((x[:, 0] * 255).round().to(torch.int64), torch.from_numpy(images))


@pytest.mark.parametrize(
    ("shape", "magic", "n", "match"),
    [((2, 28, 28), 0x801, None, "magic"), ((2, 27, 28), None, None, "shape")]
    + [((2, 28, 28), None, 3, "n=3 but only 2")],
)
def test_idx_header_is_validated(tmp_path, monkeypatch, shape, magic, n, match):
    path = tmp_path / "MNIST/raw/train-images-idx3-ubyte.gz"
    _write_idx(path, np.zeros(shape), magic=magic)
    _register(monkeypatch, "mnist", path)
    with pytest.raises(ValueError, match=match):
        data.load("mnist", root=tmp_path, n=n)


def _cifar_batch(count: int, first_label: int = 0) -> dict:
    rng = np.random.default_rng(count)
    return {
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"labels": [(first_label + i) % 10 for i in range(count)],
    }


def test_cifar_synthetic_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = [_cifar_batch(10000), _cifar_batch(3, first_label=7)]
    for i, batch in enumerate(batches, start=1):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    x = data.load("cifar10", root=tmp_path)
    assert x.shape == (10003, 3, 32, 32)
    expected = torch.from_numpy(batches[1][b"data"].reshape(3, 3, 32, 32)).float() / 255
    assert torch.equal(x[10000:], expected)
    assert data.load_labels("cifar10", root=tmp_path)[-3:].tolist() == [7, 8, 9]
    with pytest.raises(ValueError, match="n=10004 but only 10003"):
        data.load("cifar10", n=10004, root=tmp_path, download=False)


def test_cifar_download_via_archive(tmp_path, monkeypatch):
    import pooch

    batch = _cifar_batch(4)
    source = tmp_path / "src" / "cifar-10-batches-py"
    source.mkdir(parents=True)
    (source / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))

    def fake_retrieve(url, known_hash, fname, path, processor=None, **kwargs):
        assert url == data.REGISTRY["cifar10"]["url"]
        archive = Path(path) / fname
        with tarfile.open(archive, "w:gz") as tar:
            tar.add(source, arcname="cifar-10-batches-py")
        return processor(str(archive), "download", None)

    monkeypatch.setattr(pooch, "retrieve", fake_retrieve)
    root = tmp_path / "root"
    assert data.load_labels("cifar10", "test", root=root).tolist() == [0, 1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]  # temp removed


def test_ffhq_synthetic_png_modes(tmp_path):
    folder = tmp_path / "ffhq" / "8x8"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "00010.png")
    Image.fromarray(grey, "L").save(folder / "00002.png")
    Image.fromarray(rgba[..., :3], "RGB").save(folder / "60000.png")
    x = data.load("ffhq", root=tmp_path)
    assert x.shape == (2, 3, 8, 8)
    assert torch.equal(x[0], torch.from_numpy(grey).float().div(255).expand(3, 8, 8))
    assert torch.equal(x[1], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)
    assert data.load("ffhq", "test", root=tmp_path).shape == (1, 3, 8, 8)
    box = data.load("ffhq", size=4, n=1, root=tmp_path)
    assert torch.allclose(box[0], x[0].reshape(3, 4, 2, 4, 2).mean((2, 4)), atol=1e-6)
    assert data.load("ffhq", size=3, root=tmp_path).shape == (2, 3, 3, 3)


# ----------------------------------------------------------------------------- integrity

FAULTS = ["truncate", "flip", "append", "empty"]


def _corrupt(path: Path, fault: str) -> None:
    """Damage ``path`` in place: cut it in half, flip a middle (or the first) byte, append
    garbage, or empty it; then move its mtime on (a rewrite within one clock tick may not)."""
    raw, mtime = path.read_bytes(), path.stat().st_mtime_ns
    at = 0 if fault == "magic" else len(raw) // 2
    flipped = raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    faulty = {"truncate": raw[: len(raw) // 2], "flip": flipped, "magic": flipped}
    faulty |= {"append": raw + b"garbage", "empty": b""}
    path.write_bytes(faulty[fault])
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _register(monkeypatch, key: str, path: Path) -> str:
    """Make ``path`` the registry's official file of its name; return its sha256."""
    digest = _sha(path)
    monkeypatch.setitem(data.REGISTRY[key]["files"], path.name, f"sha256:{digest}")
    return digest


@pytest.fixture
def tiny_idx(tmp_path, monkeypatch):
    """A valid 50-label MNIST test file in ``$LEMMSE_DATA`` = ``tmp_path``, made official."""
    monkeypatch.setenv("LEMMSE_DATA", str(tmp_path))
    path = tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz"
    _write_idx(path, np.arange(50) % 10)
    _register(monkeypatch, "mnist", path)
    return path


@pytest.mark.parametrize("fault", FAULTS)
def test_damaged_file_fails_its_checksum(tiny_idx, fault, no_network):
    expected = _sha(tiny_idx)
    _corrupt(tiny_idx, fault)
    with pytest.raises(ValueError, match="sha256") as info:
        data.load_labels("mnist", "test")
    message = str(info.value)
    assert isinstance(info.value, data.DataFileError)
    assert str(tiny_idx) in message and expected in message and _sha(tiny_idx) in message
    assert "delete" in message.lower() and "official" in message
    assert no_network == []


@needs_shared
@pytest.mark.parametrize("fault", ["flip", "append"])
def test_official_copy_is_verified(tmp_path, monkeypatch, fault):
    rel = "FashionMNIST/raw/t10k-labels-idx1-ubyte.gz"
    (tmp_path / rel).parent.mkdir(parents=True)
    (tmp_path / rel).write_bytes((SHARED / rel).read_bytes())
    monkeypatch.setenv("LEMMSE_DATA", str(tmp_path))
    good = data.load_labels("fashionmnist", "test", n=20)
    assert torch.equal(good, data.load_labels("fashionmnist", "test", n=20, root=SHARED))
    _corrupt(tmp_path / rel, fault)
    official = data.REGISTRY["fashionmnist"]["files"][Path(rel).name].removeprefix("sha256:")
    with pytest.raises(data.DataFileError, match=official):
        data.load_labels("fashionmnist", "test", n=20, download=False)


@pytest.mark.parametrize("fault", ["truncate", "magic", "empty"])
def test_unchecked_idx_decode_error_names_the_file(tiny_idx, monkeypatch, fault):
    monkeypatch.setitem(data.REGISTRY["mnist"]["files"], tiny_idx.name, None)
    _corrupt(tiny_idx, fault)
    with pytest.raises(ValueError, match="(?i)delete it") as info:
        data.load_labels("mnist", "test", download=False)
    assert isinstance(info.value, data.DataFileError) and str(tiny_idx) in str(info.value)


def test_checksum_once_per_file_version(tiny_idx, monkeypatch, tmp_path):
    calls = []
    real = data._sha256
    monkeypatch.setattr(data, "_sha256", lambda path: calls.append(path) or real(path))
    labels = data.load_labels("mnist", "test")
    assert torch.equal(data.load_labels("mnist", "test", n=5), labels[:5])
    (tmp_path / "x").mkdir()
    data.load_labels("mnist", "test", root=tmp_path / "x" / "..")  # same file, other spelling
    assert len(calls) == 1
    stat = tiny_idx.stat()
    os.utime(tiny_idx, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert torch.equal(data.load_labels("mnist", "test"), labels)
    assert len(calls) == 2
    _corrupt(tiny_idx, "append")
    with pytest.raises(data.DataFileError):
        data.load_labels("mnist", "test")
    assert len(calls) == 3


@pytest.mark.parametrize("fault", ["truncate", "magic", "append", "empty", "labels", "shape"])
def test_damaged_cifar_batch_names_the_file(tmp_path, fault):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir()
    batch = _cifar_batch(5)
    if fault == "labels":
        batch[b"labels"][2] = 10
    if fault == "shape":
        batch = {b"images": batch[b"data"]}
    path.write_bytes(pickle.dumps(batch, protocol=2))
    if fault not in ("labels", "shape"):
        _corrupt(path, fault)
    with pytest.raises(ValueError, match="(?i)delete it") as info:
        data.load("cifar10", "test", root=tmp_path, download=False)
    assert isinstance(info.value, data.DataFileError) and str(path) in str(info.value)


@pytest.mark.parametrize("fault", ["truncate", "magic", "flip", "empty"])
def test_damaged_png_names_the_file(tmp_path, fault):
    path = tmp_path / "ffhq" / "8x8" / "00003.png"
    path.parent.mkdir(parents=True)
    rgb = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb, "RGB").save(path)
    _corrupt(path, fault)
    with pytest.raises(ValueError, match="(?i)replace it") as info:
        data.load("ffhq", root=tmp_path)
    assert isinstance(info.value, data.DataFileError) and str(path) in str(info.value)


def _serve(monkeypatch, body: bytes, fail: bool = False) -> list[str]:
    """Answer every pooch HTTP download with ``body`` (``fail``: then drop the connection)."""
    import pooch

    urls = []

    def fake(self, url, output_file, pooch_obj, check_only=False):
        urls.append(url)
        Path(output_file).write_bytes(body)
        if fail:
            raise ConnectionError("connection reset after a partial download")

    monkeypatch.setattr(pooch.HTTPDownloader, "__call__", fake)
    return urls


@pytest.fixture
def official_labels(tmp_path, monkeypatch) -> bytes:
    """Bytes of a small labels file registered as the official MNIST test labels."""
    path = tmp_path / "official" / "t10k-labels-idx1-ubyte.gz"
    _write_idx(path, np.arange(30) % 10)
    _register(monkeypatch, "mnist", path)
    return path.read_bytes()


@pytest.mark.parametrize("case", ["partial", "wrong", "pooch-unchecked"])
@pytest.mark.parametrize("fresh", [True, False])
def test_failed_download_leaves_nothing(tmp_path, monkeypatch, official_labels, case, fresh):
    import pooch

    root = tmp_path / "new" / "data" if fresh else tmp_path / "root"
    if not fresh:
        root.mkdir()
    if case == "pooch-unchecked":  # a retrieve that skips its own hash check

        def unchecked(url, known_hash, fname, path, **kwargs):
            Path(path).mkdir(parents=True, exist_ok=True)
            Path(path, fname).write_bytes(official_labels[:-3])
            return str(Path(path, fname))

        monkeypatch.setattr(pooch, "retrieve", unchecked)
    else:
        _serve(monkeypatch, official_labels[: len(official_labels) // 2], fail=case == "partial")
    with pytest.raises(FileNotFoundError, match="Download failed"):
        data.load_labels("mnist", "test", root=root)
    left = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert left == ["official", "official/t10k-labels-idx1-ubyte.gz"] + ([] if fresh else ["root"])


def test_download_verified_then_renamed(tmp_path, monkeypatch, official_labels):
    urls = _serve(monkeypatch, official_labels)
    labels = data.load_labels("mnist", "test", root=tmp_path / "root")
    assert urls == [data.REGISTRY["mnist"]["url"] + "t10k-labels-idx1-ubyte.gz"]
    folder = tmp_path / "root" / "MNIST" / "raw"
    assert [p.name for p in folder.iterdir()] == ["t10k-labels-idx1-ubyte.gz"]
    assert (folder / "t10k-labels-idx1-ubyte.gz").read_bytes() == official_labels
    assert labels.tolist() == (np.arange(30) % 10).tolist()


def test_failed_cifar_download_removes_its_folders(tmp_path, no_network):
    with pytest.raises(FileNotFoundError, match="Download failed"):
        data.load("cifar10", root=tmp_path / "new")
    assert not (tmp_path / "new").exists() and no_network


def test_centre_crop():
    x = torch.arange(2 * 3 * 14 * 14, dtype=torch.float64).reshape(2, 3, 14, 14)
    assert torch.equal(data.centre_crop(x, 4), x[..., 5:9, 5:9])
    assert torch.equal(data.centre_crop(x, (4, 5)), x[..., 5:9, 4:9])
    assert torch.equal(data.centre_crop(x, 14), x)
    with pytest.raises(ValueError, match="larger"):
        data.centre_crop(x, 15)


@pytest.mark.parametrize("n, world", [(10, 3), (2, 3), (7, 1), (0, 2)])
def test_shards_partition_the_first_n_images_in_order(n, world):
    blocks = [data.shard_range(n, (rank, world)) for rank in range(world)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    assert max(b - a for a, b in blocks) - min(b - a for a, b in blocks) <= 1
    if n:
        full = data.load("fashionmnist", "train", n)
        parts = [data.load("fashionmnist", "train", n, shard=(r, world)) for r in range(world)]
        assert torch.equal(torch.cat(parts), full)


@pytest.mark.parametrize(
    "shard, error, match",
    [
        ((2, 2), ValueError, "rank < world_size"),
        ([0, 1], TypeError, "tuple"),
        ((0.0, 1), TypeError, "rank must be an int"),
        ((0, True), TypeError, "world_size"),
    ],
)
def test_bad_shard_is_named(shard, error, match):
    with pytest.raises(error, match=match):
        data.load("fashionmnist", "train", 4, shard=shard)
