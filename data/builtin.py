"""Built-in dataset: Fashion-MNIST read from its IDX files and converted to shards once.

The files come from the Debian package ``dataset-fashion-mnist`` (installed by ``./setup.sh``) or
from any folder the user names, so that a pretraining run needs no download and no argument.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import struct
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_CACHE_DIR = Path("~/.cache/vit-ssl")
DEFAULT_SHARD_SIZE = 2500
SPLITS = ("train", "test")

# Split -> (file stem of the images, file stem of the labels, count in the official release).
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60_000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10_000),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not where the settings point (the built-in dataset's IDX files, or
    shards: data.shards.ShardsNotFoundError); the message says where we looked and how to fix it."""


def _stems() -> list[str]:
    return [stem for images, labels, _ in _FILES.values() for stem in (images, labels)]


def _find_file(directory: Path, stem: str) -> Path | None:
    """The IDX file ``stem`` in ``directory``: gzipped (as Debian ships it) or uncompressed."""
    for name in (f"{stem}.gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_root(root: str | os.PathLike | None = None) -> Path:
    """Directory holding the four Fashion-MNIST IDX files.

    Looks at ``root``, else ``$VIT_SSL_FASHION_MNIST``, else the Debian package's folder, and
    raises DatasetNotFoundError (naming the folder and the fix) when a file is missing there.
    """
    if root is None:
        root = os.environ.get("VIT_SSL_FASHION_MNIST") or DEFAULT_FASHION_MNIST_DIR
    directory = Path(root).expanduser()
    missing = [stem for stem in _stems() if _find_file(directory, stem) is None]
    if missing:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found in {directory}: missing "
            f"{', '.join(s + '[.gz]' for s in missing)}. Fix: `sudo apt-get install "
            f"dataset-fashion-mnist` (or run ./setup.sh), or point data.fashion_mnist_dir=/path/to/dir "
            f"(--fashion-mnist-dir /path/to/dir for eval, or VIT_SSL_FASHION_MNIST) at a folder "
            f"holding the four IDX files ({', '.join(s + '.gz' for s in _stems())}; "
            f"uncompressed files without .gz work too)."
        )
    return directory


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as exn:
        raise ValueError(f"cannot read IDX file {path}: {exn}; re-install it (see ./setup.sh)") from exn


def _parse_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one IDX file (big-endian magic, big-endian uint32 dims, then unsigned bytes)."""
    raw = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is {len(raw)} bytes, shorter than its {header}-byte header")
    (found,) = struct.unpack(">I", raw[:4])
    if found != magic:
        raise ValueError(f"IDX file {path}: magic number 0x{found:08x}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims)) + header
    if len(raw) != expected:
        raise ValueError(
            f"IDX file {path}: {len(raw)} bytes but its header {dims} needs {expected}; "
            "the file is truncated or corrupt, re-install it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=2)
def _load_arrays(split: str, directory: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read-only (N, 28, 28) uint8 images and (N,) uint8 labels of one split, checked."""
    image_stem, label_stem, _ = _FILES[split]
    image_path = _find_file(directory, image_stem)
    label_path = _find_file(directory, label_stem)
    images = _parse_idx(image_path, _IDX_IMAGES_MAGIC)
    labels = _parse_idx(label_path, _IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split} in {directory}: images {images.shape} and labels {labels.shape} do not "
            "match (expected (N, 28, 28) and (N,)); re-install the files (see ./setup.sh)"
        )
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{label_path}: label {labels.max()} found, Fashion-MNIST labels are 0..9")
    return images, labels  # np.frombuffer over bytes: read-only, so the cache cannot be modified


def _check_split(split: str) -> None:
    if split not in _FILES:
        raise ValueError(f"split={split!r} is not a Fashion-MNIST split; use one of {list(_FILES)}")


def load_fashion_mnist(split: str, root: str | os.PathLike | None = None) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Fashion-MNIST ``split`` ("train" or "test") as uint8 images (N, 1, 28, 28) and int64 labels (N,).

    ``root`` as in fashion_mnist_root. Each call returns new tensors (the parsed files are cached).
    """
    import torch  # here, so that `python -m data.shards write fashion-mnist` does not load torch

    _check_split(split)
    images, labels = _load_arrays(split, fashion_mnist_root(root).resolve())
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache folder: ``cache_dir``, else ``$VIT_SSL_CACHE``, else ``~/.cache/vit-ssl``."""
    if cache_dir is None:
        cache_dir = os.environ.get("VIT_SSL_CACHE") or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def fashion_mnist_samples(split: str, root: str | os.PathLike | None = None) -> Iterator[tuple[str, np.ndarray, int]]:
    """``(key, image (28, 28) uint8, label)`` for each image of ``split``, keys ``{split}_{index:08d}``."""
    _check_split(split)
    images, labels = _load_arrays(split, fashion_mnist_root(root).resolve())
    for index, label in enumerate(labels.tolist()):
        yield f"{split}_{index:08d}", images[index], label


def _is_complete(directory: Path) -> bool:
    return (directory / "manifest.json").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished ``tmp`` folder to ``final``; if another process won the race, use theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
        log.info("%s was written by another process meanwhile; using it", final)
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_split(split: str, final: Path, shard_size: int, root: str | os.PathLike | None) -> None:
    from data.shards import write_shards  # shards imports nothing from here at import time

    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not _is_complete(final):
        # A folder without a manifest is never produced by a rename (the manifest is written
        # before it); someone made it by hand or a tool broke it: set it aside, do not delete.
        aside = final.with_name(f".incomplete-{final.name}-{uuid.uuid4().hex[:8]}")
        log.warning("%s has no manifest.json; moving it to %s and converting again", final, aside)
        os.rename(final, aside)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        write_shards(
            fashion_mnist_samples(split, root),
            tmp,
            shard_size=shard_size,
            classes=FASHION_MNIST_CLASSES,
            prefix=split,
        )
        _publish(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def builtin_shards(
    name: str = "fashion-mnist",
    cache_dir: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    root: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Shard folders ``{"train": dir, "test": dir}`` of a built-in dataset, converted once.

    The shards live in ``<cache>/fashion-mnist/{train,test}/`` (for a shard size other than the
    default: ``<cache>/fashion-mnist/shard-size-<N>/{train,test}/``, so a different size never
    silently reuses the default set). Each split is written to a temporary folder and renamed
    when complete; a folder with a manifest.json is complete and is reused as is.
    """
    if name != "fashion-mnist":
        raise ValueError(f"name={name!r} is not a built-in dataset; the built-in one is 'fashion-mnist'")
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    base = cache_root(cache_dir) / name
    if shard_size != DEFAULT_SHARD_SIZE:
        base = base / f"shard-size-{shard_size}"
    out = {split: base / split for split in SPLITS}
    if root is not None or not all(_is_complete(directory) for directory in out.values()):
        # fail before any work when the source files are missing; a folder the user named must hold
        # them even when the shards are cached, or a wrong path would go unnoticed until scoring
        fashion_mnist_root(root)
    for split, directory in out.items():
        if not _is_complete(directory):
            log.info("converting Fashion-MNIST %s to shards in %s (once)", split, directory)
            _convert_split(split, directory, shard_size, root)
    return out
