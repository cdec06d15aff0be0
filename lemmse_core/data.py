"""Image datasets read straight from their official files (no torchvision).

Supported: ``fashionmnist`` and ``mnist`` (IDX ``.gz``), ``cifar10`` (python pickle batches)
and ``ffhq`` (a folder of PNG files ``ffhq/<S>x<S>/<index>.png``; index < 60000 is train).

:func:`load` returns float32 images ``(N, C, H, W)`` in ``[0, 1]``; :func:`load_labels` returns
int64 labels. Files are looked up with :func:`data_root`'s rules. Missing IDX / CIFAR-10 files
are downloaded (checked against :data:`REGISTRY` hashes) with ``pooch``; FFHQ is never
downloaded. Only the files needed for the first ``n`` images are read. Local files with a
registry hash are checked once per process and file version; a damaged or unreadable file
raises :class:`DataFileError`, which names it.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Official files, download sources and split sizes of every supported dataset.
REGISTRY: dict[str, dict] = {
    "fashionmnist": {
        "title": "FashionMNIST",
        "folder": "FashionMNIST/raw",
        "url": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "files": {
            "train-images-idx3-ubyte.gz": (
                "sha256:3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"
            ),
            "train-labels-idx1-ubyte.gz": (
                "sha256:a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "sha256:346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "sha256:67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"
            ),
        },
        "sizes": {"train": 60000, "test": 10000},
        "shape": (1, 28, 28),
    },
    "mnist": {
        "title": "MNIST",
        "folder": "MNIST/raw",
        "url": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "files": {
            "train-images-idx3-ubyte.gz": (
                "sha256:440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
            ),
            "train-labels-idx1-ubyte.gz": (
                "sha256:3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
            ),
            "t10k-images-idx3-ubyte.gz": (
                "sha256:8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
            ),
            "t10k-labels-idx1-ubyte.gz": (
                "sha256:f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
            ),
        },
        "sizes": {"train": 60000, "test": 10000},
        "shape": (1, 28, 28),
    },
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive_hash": "md5:c58f30108f718f92721af3b95e74349a",
        "files": {f"data_batch_{i}": None for i in range(1, 6)} | {"test_batch": None},
        "batch_size": 10000,
        "sizes": {"train": 50000, "test": 10000},
        "shape": (3, 32, 32),
    },
    "ffhq": {
        "title": "FFHQ",
        "folder": "ffhq",
        "train_below": 60000,
        "sizes": {"train": 60000, "test": 10000},
    },
}

DATASETS: tuple[str, ...] = tuple(REGISTRY)
SPLITS: tuple[str, ...] = ("train", "test")
RESIZE_MODES: tuple[str, ...] = ("pad", "interp")
_LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601
_REPO = Path(__file__).resolve().parents[1]
_SHA256: dict[tuple[str, int, int], str] = {}  # (resolved path, size, mtime_ns) -> sha256
_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, struct.error)


class DataFileError(ValueError):
    """A local dataset file is damaged or not the official one; the message names it."""


# ----------------------------------------------------------------------------- arguments


def _check_name(name: object) -> str:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, one of {DATASETS}; got {type(name).__name__}")
    key = name.lower().replace("-", "").replace("_", "")
    if key not in REGISTRY:
        raise ValueError(f"name must be one of {DATASETS} (case-insensitive); got {name!r}")
    return key


def _check_split(split: object) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    return split  # type: ignore[return-value]


def _check_positive_int(value: object, arg: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{arg} must be a positive int or None; got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{arg} must be a positive int or None; got {value}")
    return int(value)


def _check_n(n: object, key: str, split: str) -> int | None:
    n = _check_positive_int(n, "n")
    total = REGISTRY[key]["sizes"][split]
    if n is not None and n > total:
        raise ValueError(f"n={n} exceeds the {total} images of the official {key} {split} split")
    return n


def _check_color(color: object) -> bool | None:
    if color is not None and not isinstance(color, bool):
        raise TypeError(
            f"color must be None (native), True (3 channels) or False (1 channel); got {color!r}"
        )
    return color


def _check_resize(resize: object) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}; got {resize!r}")
    return resize  # type: ignore[return-value]


# ----------------------------------------------------------------------------- locations


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    """Folders searched, in order: ``root``, else ``$LEMMSE_DATA``, else repo/shared data."""
    if root is not None:
        return [Path(root)]
    if os.environ.get("LEMMSE_DATA"):
        return [Path(os.environ["LEMMSE_DATA"])]
    shared = _REPO.parent / "shared" / "data"
    return [_REPO / "data"] + ([shared] if shared.is_dir() else [])


def _download_dir(root: str | os.PathLike | None) -> Path:
    """Folder that receives downloads: ``root``, else ``$LEMMSE_DATA``, else repo ``data/``."""
    return _candidates(root)[0]


def _first_holding(roots: list[Path], relpaths: list[str]) -> Path | None:
    for base in roots:
        if all((base / rel).is_file() for rel in relpaths):
            return base
    return None


def _locate(key: str, relpaths: list[str], root, download: bool) -> Path:
    """Return the first candidate folder holding all ``relpaths``, downloading if needed."""
    roots = _candidates(root)
    found = _first_holding(roots, relpaths)
    if found is not None:
        return found
    target = _download_dir(root)
    missing = [rel for rel in relpaths if not (target / rel).is_file()]
    if not download:
        raise _missing_error(key, missing, roots, target, "Downloading is disabled")
    try:
        _download(key, missing, target)
    except Exception as err:  # offline, HTTP error, hash mismatch, ...
        raise _missing_error(key, missing, roots, target, f"Download failed: {err!r}") from err
    return target


def _missing_error(key, missing, roots, target, why: str) -> FileNotFoundError:
    spec = REGISTRY[key]
    where = spec["url"] if "url" in spec else "no official single-file download"
    return FileNotFoundError(
        f"{spec['title']} files not found: {', '.join(missing)}. "
        f"Searched: {', '.join(str(r / spec['folder']) for r in roots)}. {why}. "
        f"Put the official files ({where}) in {target / spec['folder']}, "
        f"or set LEMMSE_DATA to a folder that holds {spec['folder']}/."
    )


def _download(key: str, relpaths: list[str], target: Path) -> None:
    """Fetch the official files for ``relpaths`` into ``target`` (hash-checked, atomic).

    If it fails, the folders it created are removed again (when empty).
    """
    spec = REGISTRY[key]
    folder = target / spec["folder"]
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if key == "cifar10":
            _download_cifar(relpaths, target)
        else:
            for rel in relpaths:
                name = Path(rel).name
                _fetch(spec["url"] + name, target / rel, spec["files"][name])
    except BaseException:
        _remove_empty(made)
        raise


def _fetch(url: str, dest: Path, known_hash: str) -> None:
    """Download ``url`` into a temporary folder beside ``dest``, verify it, then rename it."""
    import pooch

    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        got = Path(pooch.retrieve(url, known_hash=known_hash, fname=dest.name, path=tmp))
        _verify(got, known_hash, _sha256(got), f"The download from {url} was damaged.")
        os.replace(got, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): keep it
            pass


def _download_cifar(relpaths: list[str], target: Path) -> None:
    """Download and untar the CIFAR-10 archive, then move the missing batches into place."""
    import pooch

    spec = REGISTRY["cifar10"]
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-", dir=target))
    try:
        pooch.retrieve(
            spec["url"],
            known_hash=spec["archive_hash"],
            fname="cifar-10-python.tar.gz",
            path=tmp,
            processor=pooch.Untar(extract_dir="untar"),
        )
        src = tmp / "untar" / spec["folder"]
        dest = target / spec["folder"]
        dest.mkdir(exist_ok=True)
        for item in sorted(src.iterdir()):
            if not (dest / item.name).exists():
                os.replace(item, dest / item.name)
        still = [rel for rel in relpaths if not (target / rel).is_file()]
        if still:
            raise FileNotFoundError(f"the archive did not contain {still}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def data_root(name: str | None = None, split: str = "train") -> Path:
    """Return the folder that ``load(name, split)`` reads, or the download folder.

    Candidates: ``$LEMMSE_DATA`` if set (and then only it); otherwise the repository's
    ``data/`` folder, then ``<repo>/../shared/data`` if present. With ``name``, the first
    candidate holding that dataset's ``split`` files is returned; without ``name``, or if no
    candidate holds them, the download folder (``$LEMMSE_DATA`` or ``<repo>/data``).
    """
    roots = _candidates(None)
    if name is None:
        return roots[0]
    key, split = _check_name(name), _check_split(split)
    for base in roots:
        if _holds(key, split, base):
            return base
    return roots[0]


def _holds(key: str, split: str, base: Path) -> bool:
    if key == "ffhq":
        return any(_ffhq_files(folder, split) for folder in _ffhq_folders(base).values())
    return _first_holding([base], _relpaths(key, split, None, "images")) is not None


def _relpaths(key: str, split: str, n: int | None, kind: str) -> list[str]:
    """Files (relative to a data folder) needed for the first ``n`` items of a split."""
    folder = REGISTRY[key]["folder"]
    if key == "cifar10":
        if split == "test":
            return [f"{folder}/test_batch"]
        count = 1 if n is None else math.ceil(n / REGISTRY[key]["batch_size"])
        return [f"{folder}/data_batch_{i}" for i in range(1, count + 1)]
    prefix = "train" if split == "train" else "t10k"
    suffix = "images-idx3-ubyte.gz" if kind == "images" else "labels-idx1-ubyte.gz"
    return [f"{folder}/{prefix}-{suffix}"]


# ----------------------------------------------------------------------------- integrity

_REFETCH = "Delete it to download it again, or replace it with the official file."


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _cached_sha256(path: Path) -> str:
    """sha256 of ``path``, hashed once per (resolved path, size, mtime_ns) and process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        _SHA256[key] = _sha256(path)
    return _SHA256[key]


def _verify(path: Path, known_hash: str, actual: str, advice: str) -> None:
    expected = known_hash.removeprefix("sha256:")
    if actual != expected:
        raise DataFileError(
            f"{path} is not the official file: its sha256 is {actual}, expected {expected}. "
            + advice
        )


def _check_official(path: Path, key: str) -> None:
    """Raise :class:`DataFileError` unless ``path`` has its :data:`REGISTRY` hash (if any)."""
    known = REGISTRY[key]["files"].get(path.name)
    if known is not None:
        _verify(path, known, _cached_sha256(path), "It is damaged or altered. " + _REFETCH)


def _damaged(path: Path, err: BaseException, advice: str = _REFETCH) -> DataFileError:
    return DataFileError(
        f"Cannot read {path} ({type(err).__name__}: {err}); the file is damaged or not in "
        f"the expected format. {advice}"
    )


# ----------------------------------------------------------------------------- readers


def _read_idx(path: Path, n: int | None, item_shape: tuple[int, ...]) -> torch.Tensor:
    """Read the first ``n`` items of a uint8 IDX ``.gz`` file with items of ``item_shape``.

    The header is a big-endian magic ``0x0800 + ndim`` (``0x08`` = uint8) then ``ndim`` sizes.
    """
    ndim = 1 + len(item_shape)
    try:
        with gzip.open(path, "rb") as f:
            magic = struct.unpack(">I", f.read(4))[0]
            if magic != 0x800 + ndim:
                raise DataFileError(
                    f"{path}: bad IDX magic {magic:#x}, expected {0x800 + ndim:#x}. {_REFETCH}"
                )
            dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            if dims[1:] != item_shape:
                raise DataFileError(
                    f"{path}: IDX item shape {dims[1:]}, expected {item_shape}. {_REFETCH}"
                )
            count = dims[0] if n is None else n
            if count > dims[0]:
                raise ValueError(f"n={n} but only {dims[0]} items are available in {path}")
            item = math.prod(item_shape)
            buf = f.read(count * item)
    except _GZIP_ERRORS as err:
        raise _damaged(path, err) from err
    if len(buf) != count * item:
        raise DataFileError(
            f"{path}: truncated IDX file ({len(buf)} bytes for {count} items). {_REFETCH}"
        )
    return torch.frombuffer(bytearray(buf), dtype=torch.uint8).reshape(count, *item_shape)


def _read_cifar(paths: list[Path], n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 pickle batches in order: uint8 ``(N, 3, 32, 32)`` and int64 labels."""
    images, labels, total = [], [], 0
    for path in paths:
        data, batch_labels = _read_batch(path)
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(torch.from_numpy(batch_labels))
        total += len(data)
        if n is not None and total >= n:
            break
    return torch.cat(images)[:n], torch.cat(labels)[:n]


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: uint8 data ``(N, 3072)`` and int64 labels ``(N,)`` in 0..9."""
    with open(path, "rb") as f:
        try:
            batch = pickle.load(f, encoding="bytes")  # trusted local files only
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels = np.asarray(batch[b"labels"], dtype=np.int64)
        except Exception as err:  # a damaged pickle can raise almost any error
            raise _damaged(path, err) from err
        trailing = f.read(1)
    problem = _batch_problem(data, labels, trailing)
    if problem:
        raise DataFileError(f"{path}: {problem}. {_REFETCH}")
    return data, labels


def _batch_problem(data: np.ndarray, labels: np.ndarray, trailing: bytes) -> str | None:
    if trailing:
        return "unexpected bytes after the pickled batch"
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        return f"expected data of shape (N, 3072), got {data.shape}"
    if labels.shape != (len(data),):
        return f"{len(data)} images but labels of shape {labels.shape}"
    if len(labels) and not (labels.min() >= 0 and labels.max() <= 9):
        return f"labels outside 0..9 (min {labels.min()}, max {labels.max()})"
    return None


def _cifar_paths(base: Path, split: str, n: int | None) -> list[Path]:
    """Batches to read: those needed for ``n``, or (``n=None``) all consecutive ones present."""
    wanted = n if n is not None else REGISTRY["cifar10"]["sizes"][split]
    paths = [base / rel for rel in _relpaths("cifar10", split, wanted, "images")]
    present = [p.is_file() for p in paths] + [False]
    return paths[: present.index(False)]


def _check_available(key: str, split: str, n: int | None, got: int, where: Path) -> None:
    if n is not None and got < n:
        raise ValueError(
            f"n={n} but only {got} {REGISTRY[key]['title']} {split} images are available in "
            f"{where}; use n <= {got} or add the official files (see data_root())"
        )


def _load_cifar(split: str, n: int | None, root, download: bool):
    rels = _relpaths("cifar10", split, n, "images")
    base = _locate("cifar10", rels, root, download)
    paths = _cifar_paths(base, split, n)
    for path in paths:
        _check_official(path, "cifar10")
    images, labels = _read_cifar(paths, n)
    _check_available("cifar10", split, n, len(images), base / REGISTRY["cifar10"]["folder"])
    return images, labels


def _load_idx(key: str, split: str, n: int | None, root, download: bool, kind: str):
    rel = _relpaths(key, split, n, kind)
    base = _locate(key, rel, root, download)
    item_shape = REGISTRY[key]["shape"][1:] if kind == "images" else ()
    _check_official(base / rel[0], key)
    return _read_idx(base / rel[0], n, item_shape)


# ----------------------------------------------------------------------------- FFHQ


def _ffhq_folders(base: Path) -> dict[int, Path]:
    """Stored FFHQ resolutions under ``base/ffhq``: ``{side: folder}`` for ``<S>x<S>`` dirs."""
    top = base / REGISTRY["ffhq"]["folder"]
    if not top.is_dir():
        return {}
    out = {}
    for sub in top.iterdir():
        side, _, other = sub.name.partition("x")
        if sub.is_dir() and side.isdigit() and side == other:
            out[int(side)] = sub
    return out


def _ffhq_files(folder: Path, split: str) -> list[Path]:
    """PNG files of a split, sorted by FFHQ index (index < 60000 is train)."""
    below = REGISTRY["ffhq"]["train_below"]
    files = [p for p in folder.glob("*.png") if p.stem.isdigit()]
    files = [p for p in files if (int(p.stem) < below) == (split == "train")]
    return sorted(files, key=lambda p: int(p.stem))


def _ffhq_pick(sides: list[int], size: int | None) -> int | None:
    """Stored side to read: ``size`` itself, else the smallest larger one (None if none)."""
    if size is None:
        return max(sides)
    larger = [s for s in sides if s >= size]
    return min(larger) if larger else None


def _ffhq_source(split: str, size: int | None, n: int | None, root) -> tuple[int, list[Path]]:
    """Pick the first folder (candidate order) with a usable resolution and enough files."""
    roots, counts, too_small = _candidates(root), [], []
    for base in roots:
        folders = _ffhq_folders(base)
        side = _ffhq_pick(sorted(folders), size) if folders else None
        if folders and side is None:
            too_small.append(f"{base}: {sorted(folders)}")
            continue
        files = _ffhq_files(folders[side], split) if folders else []
        if files and (n is None or len(files) >= n):
            return side, files[:n]
        if files:
            counts.append((len(files), folders[side]))
    if counts:
        _check_available("ffhq", split, n, *max(counts))
    if too_small:
        raise ValueError(
            f"size={size} is larger than every stored FFHQ resolution ({'; '.join(too_small)}); "
            "upsampling is not supported"
        )
    tops = [base / REGISTRY["ffhq"]["folder"] for base in roots]
    raise FileNotFoundError(
        f"No FFHQ {split} images found (FFHQ is not downloaded automatically). "
        f"Searched: {', '.join(str(t) for t in tops)}. Put PNG files named <index>.png "
        f"(index < 60000 is train) in {tops[0]}/<S>x<S>/ (S = side in pixels), "
        "or set LEMMSE_DATA to a folder that holds ffhq/<S>x<S>/."
    )


_REPLACE_PNG = "Delete it, or replace it with a valid PNG (FFHQ is not downloaded)."


def _read_png(path: Path, side: int) -> torch.Tensor:
    """Read one PNG as uint8 ``(3, side, side)``; grey is replicated and alpha dropped."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise _damaged(path, err, _REPLACE_PNG) from err
    if arr.shape != (side, side, 3):
        raise DataFileError(
            f"{path}: expected {side}x{side} pixels, got {arr.shape[1]}x{arr.shape[0]}. "
            + _REPLACE_PNG
        )
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _area_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """Area-downsample uint8 ``(..., S, S)`` to float32 ``(..., size, size)`` in ``[0, 1]``."""
    lead, side = x.shape[:-2], x.shape[-1]
    x = x.double()
    if side % size == 0:  # exact box average (factor 1 = no-op)
        f = side // size
        x = x.reshape(*lead, size, f, size, f).mean(dim=(-3, -1))
    else:
        x = F.interpolate(x.reshape(-1, 1, side, side), size=(size, size), mode="area")
        x = x.reshape(*lead, size, size)
    return (x / 255).float()


def _load_ffhq(split: str, n: int | None, size: int | None, root) -> torch.Tensor:
    side, files = _ffhq_source(split, size, n, root)
    out = size or side
    return torch.stack([_area_down(_read_png(p, side), out) for p in files])


# ----------------------------------------------------------------------------- transforms


def _convert_color(x: torch.Tensor, color: bool | None) -> torch.Tensor:
    """``True``: 3 channels (grey replicated); ``False``: 1 channel (BT.601 luma)."""
    channels = x.shape[1]
    if color is True and channels == 1:
        return x.expand(-1, 3, -1, -1).contiguous()
    if color is False and channels == 3:
        weights = torch.tensor(_LUMA, dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True).clamp_(0, 1)
    return x


def _resize(x: torch.Tensor, size: int | None, resize: str) -> torch.Tensor:
    """Centre zero-pad (``"pad"``) or interpolate (``"interp"``) square images to ``size``."""
    side = x.shape[-1]
    if size is None or size == side:
        return x
    if resize == "pad":
        if size < side:
            raise ValueError(
                f"size={size} is smaller than the native {side}; resize='pad' can only "
                "enlarge, use resize='interp'"
            )
        lo = (size - side) // 2
        hi = size - side - lo
        return F.pad(x, (lo, hi, lo, hi))
    if size > side:
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return F.interpolate(x, size=(size, size), mode="area")


# ----------------------------------------------------------------------------- public API


def load(
    name: str,
    split: str = "train",
    n: int | None = None,
    size: int | None = None,
    color: bool | None = None,
    root: str | os.PathLike | None = None,
    resize: str = "pad",
    download: bool = True,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Load the first ``n`` images of a dataset split as float32 ``(N, C, H, W)`` in ``[0, 1]``.

    Args:
        name: ``"fashionmnist"``, ``"mnist"``, ``"cifar10"`` or ``"ffhq"`` (case-insensitive).
        split: ``"train"`` or ``"test"`` (FFHQ: file index < 60000 is train).
        n: number of images, first ones in file order; ``None`` = all available.
        size: output side; ``None`` = native (FFHQ: largest stored resolution). FFHQ uses the
            stored resolution ``size`` if present, else area-downsamples the smallest larger one.
        color: ``None`` native channels, ``True`` 3 channels, ``False`` 1 channel (BT.601 luma).
        root: data folder to use instead of :func:`data_root`'s candidates (also the download
            folder).
        resize: for non-FFHQ data, ``"pad"`` (centred zeros, e.g. 28 -> 32 adds 2 pixels per
            side) or ``"interp"`` (bilinear to enlarge, area to shrink). Ignored for FFHQ.
        download: fetch missing official files with ``pooch`` into ``root``,
            ``$LEMMSE_DATA`` or ``<repo>/data``; if False raise instead. FFHQ is never
            downloaded.
        shard: ``(rank, world_size)``: only that rank's contiguous block of the ``n`` images
            (:func:`shard_range`; blocks in rank order, sizes differing by at most 1, possibly
            empty), for :mod:`lemmse_core.distributed`. Reads the images up to the block's end.

    Raises:
        FileNotFoundError: files missing and not downloadable (message says where to put them).
        DataFileError: a local file is damaged, unreadable or not the official one (a
            ValueError; the message names the file and says what to do).
        ValueError: bad argument, or ``n`` larger than the images available.
        TypeError: argument of the wrong type.
    """
    key, split = _check_name(name), _check_split(split)
    n = _check_n(n, key, split)
    size = _check_positive_int(size, "size")
    color, resize = _check_color(color), _check_resize(resize)
    if shard is not None:
        check_shard(shard)
        if n is None and key == "ffhq":  # the number available is only known once read
            x = load(name, split, None, size, color, root, resize, download)
            return x[slice(*shard_range(len(x), shard))]
        start, stop = shard_range(REGISTRY[key]["sizes"][split] if n is None else n, shard)
        x = load(name, split, max(stop, 1), size, color, root, resize, download)
        return x[start:stop]
    if key == "ffhq":
        return _convert_color(_load_ffhq(split, n, size, root), color)
    if key == "cifar10":
        raw = _load_cifar(split, n, root, download)[0]
    else:
        raw = _load_idx(key, split, n, root, download, "images").unsqueeze(1)
    x = _convert_color(raw.float().div_(255), color)
    return _resize(x, size, resize)


def check_shard(shard) -> tuple[int, int]:
    """A ``(rank, world_size)`` pair of ints with ``0 <= rank < world_size``."""
    if not isinstance(shard, tuple) or len(shard) != 2:
        raise TypeError(f"shard must be a tuple (rank, world_size), got {shard!r}")
    for value, arg in zip(shard, ("rank", "world_size"), strict=True):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"shard {arg} must be an int, got {type(value).__name__}")
    rank, world = int(shard[0]), int(shard[1])
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must satisfy 0 <= rank < world_size, got {shard!r}")
    return rank, world


def shard_range(n: int, shard: tuple[int, int]) -> tuple[int, int]:
    """``(start, stop)`` of rank ``r`` of ``world`` among ``n`` items: the contiguous block
    ``[⌊r n / world⌋, ⌊(r + 1) n / world⌋)`` (rank order is index order; sizes differ by at
    most 1)."""
    rank, world = check_shard(shard)
    return rank * n // world, (rank + 1) * n // world


def centre_crop(x: torch.Tensor, size) -> torch.Tensor:
    """The centred ``size`` (an int or ``(height, width)``) crop of images ``(..., H, W)``;
    an odd margin leaves its extra pixel at the bottom and right."""
    h, w = (size, size) if isinstance(size, int) else size
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    if top < 0 or left < 0:
        raise ValueError(f"size={size} is larger than the images {tuple(x.shape[-2:])}")
    return x[..., top : top + h, left : left + w].contiguous()


def load_labels(
    name: str,
    split: str = "train",
    n: int | None = None,
    root: str | os.PathLike | None = None,
    download: bool = True,
) -> torch.Tensor:
    """Return the int64 class labels ``(N,)`` matching ``load(name, split, n)``.

    Only for ``fashionmnist``, ``mnist`` and ``cifar10``; FFHQ has no labels (ValueError).
    """
    key, split = _check_name(name), _check_split(split)
    if key == "ffhq":
        raise ValueError(
            "name='ffhq' has no labels; load_labels supports fashionmnist, mnist, cifar10"
        )
    n = _check_n(n, key, split)
    if key == "cifar10":
        return _load_cifar(split, n, root, download)[1]
    return _load_idx(key, split, n, root, download, "labels").long()


__all__ = [
    "DATASETS",
    "REGISTRY",
    "DataFileError",
    "centre_crop",
    "data_root",
    "load",
    "load_labels",
    "shard_range",
]
