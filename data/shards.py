"""Webdataset shards: write them (from arrays, encoded images, an image folder, a CSV/JSONL list
or the built-in dataset), describe them in a manifest, check them, and turn a user's shard spec
into a list of URLs.

Shard format: tar files ``{prefix}-{i:06d}.tar``; each sample is ``{key}.png`` (8-bit grey "L" or
"RGB") or ``{key}.jpg``, plus ``{key}.cls`` (ASCII integer label) when the set is labelled.
``manifest.json`` beside the tars lists them with their counts, bytes and sha256, the classes and
the dataset's pixel statistics.

CLI (``python -m data.shards --help`` and ``... write --help`` say more)::

    python -m data.shards write SRC OUT [--shard-size N] [--shard-bytes 500MB] [--encode keep|png|jpeg]
        [--quality Q] [--resize N] [--workers N] [--holdout F --seed S] [--classes FILE] [--quiet]
        # SRC: fashion-mnist | an image folder SRC/<class>/* | a .csv (path[,label]) | a .jsonl list
    python -m data.shards inspect OUT     # the manifest summary; checks every shard's presence, size, sha256
    python -m data.shards verify OUT      # decodes every sample; lists each bad one
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import struct
import sys
import tarfile
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from data.builtin import DatasetNotFoundError
from data.sources import (
    BUILTIN,
    IMAGE_SUFFIXES,
    Listing,
    SourceError,
    builtin_listing,
    check_fraction,
    holdout_split,
    image_folder_classes,
    image_folder_files,
    image_folder_samples,
    open_listing,
    parse_size,
    read_classes_file,
)

__all__ = [  # image_folder_* and IMAGE_SUFFIXES live in data.sources and stay importable from here
    "MANIFEST", "MANIFEST_FORMAT", "IMAGE_SUFFIXES", "EncodeOptions", "encode_png", "encode_jpeg", "decode_image",
    "sniff_format", "to_pixels", "shrink", "prepare_image", "write_shards", "read_manifest", "shard_urls",
    "check_shard_files", "verify_shard", "verify_shards", "shard_sets", "ordered_map", "image_folder_classes",
    "image_folder_files", "image_folder_samples", "main",
]

MANIFEST = "manifest.json"
# Format 1 throughout: later fields (per-shard "bytes"/"sha256", "labelled", writer options) are
# additions that older readers ignore, and manifests written before them still read.
MANIFEST_FORMAT = 1
ENCODINGS = ("keep", "png", "jpeg")
DEFAULT_SHARD_SIZE = 2500
CHUNK = 64  # samples per task sent to a worker process at most: large enough to hide the pickling cost
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_OBJECT_REPR = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")

# An image given to write_shards: pixels, an already encoded file, or the path of one.
ImageLike = Any  # np.ndarray (H,W)|(H,W,C) · torch.Tensor (H,W)|(C,H,W) · bytes (PNG, JPEG, ...) · Path
OnError = Callable[[str, Exception], None]


# --------------------------------------------------------------------------------------------
# Encoding and decoding of single images
# --------------------------------------------------------------------------------------------


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) grey or (H, W, 3) RGB array.

    A minimal encoder (filter 0 + zlib) because Pillow's PNG writer costs ~0.3 ms per tiny image,
    which alone would make converting Fashion-MNIST take ~25 s on this CPU.
    """
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError(f"encode_png needs uint8 (H, W) or (H, W, 3) pixels, got {pixels.dtype} {pixels.shape}")
    height, width = pixels.shape[:2]
    rows = np.ascontiguousarray(pixels).reshape(height, -1)
    raw = np.zeros((height, rows.shape[1] + 1), dtype=np.uint8)  # first byte of each row: filter 0
    raw[:, 1:] = rows
    colour_type = 0 if pixels.ndim == 2 else 2
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"".join(
        (_PNG_MAGIC, _png_chunk(b"IHDR", header), _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)), _png_chunk(b"IEND", b""))
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def encode_jpeg(pixels: np.ndarray, quality: int = 95) -> bytes:
    """JPEG bytes (Pillow, baseline, default chroma subsampling) of uint8 (H, W) or (H, W, 3) pixels."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def sniff_format(data: bytes) -> str | None:
    """"png" or "jpg" from the magic number of encoded image bytes, else None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpg"
    return None


def decode_image(data: bytes) -> tuple[np.ndarray, str]:
    """Decode image bytes with Pillow to uint8 pixels (H, W) or (H, W, 3), and the source mode.

    Grey-like modes (1, L, LA, I, I;16, F) become "L", everything else "RGB".
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        image.load()
        mode = image.mode
        target = "L" if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F") else "RGB"
        pixels = np.array(image if mode == target else image.convert(target))
    return pixels, mode


def to_pixels(image: Any) -> np.ndarray:
    """uint8 pixels (H, W) or (H, W, 3) from a numpy array (H, W)/(H, W, C) or a torch tensor (H, W)/(C, H, W).

    The layout follows each library's convention: numpy arrays are channels-last (as Pillow),
    torch tensors channels-first (as torchvision). One channel is squeezed to (H, W).
    """
    if hasattr(image, "detach"):  # torch.Tensor without importing torch here
        array = image.detach().cpu().numpy()
        if array.ndim == 3:
            array = np.moveaxis(array, 0, -1)
    else:
        array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"image dtype {array.dtype}: write_shards needs uint8 pixels (0-255)")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim != 2 and not (array.ndim == 3 and array.shape[2] == 3):
        raise ValueError(
            f"image shape {tuple(array.shape)}: expected (H, W), (H, W, 1|3) for numpy or (H, W), (1|3, H, W) for torch"
        )
    return array


def shrink(pixels: np.ndarray, short_side: int | None) -> np.ndarray | None:
    """``pixels`` resized so the shorter side is ``short_side`` (aspect ratio kept, bilinear with
    Pillow's antialiasing), or None when it is already that small: never upscaled, since that
    adds bytes but no detail, and the loader resizes to the training size anyway."""
    height, width = pixels.shape[:2]
    if short_side is None or min(height, width) <= short_side:
        return None
    from PIL import Image

    if width <= height:
        size = (short_side, max(1, round(height * short_side / width)))  # Pillow sizes are (W, H)
    else:
        size = (max(1, round(width * short_side / height)), short_side)
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored.

    encode: "keep" copies PNG and JPEG bytes (grey or RGB) as they are and stores anything else
            (pixels, other formats) as PNG; an image that --resize shrinks keeps its format
            (a JPEG source is re-encoded as JPEG at ``quality``). "png" / "jpeg" store every
            image in that format.
    quality: JPEG quality (1-100) of every JPEG this writer encodes.
    resize: shorter side in pixels for images larger than that (see ``shrink``), or None.
    """

    encode: str = "keep"
    quality: int = 95
    resize: int | None = None

    def check(self) -> None:
        if self.encode not in ENCODINGS:
            raise ValueError(f"encode={self.encode!r} is not one of {list(ENCODINGS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality} is outside 1..100; JPEG quality 90-95 keeps detail")
        if self.resize is not None and self.resize < 1:
            raise ValueError(f"resize={self.resize} must be a positive shorter side in pixels (or None)")


class Moments(NamedTuple):
    """Exact integer pixel sums of one stored image, for the manifest's mean and std."""

    channels: int
    pixels: int
    total: np.ndarray  # (C,) int64
    squares: np.ndarray  # (C,) int64
    size: tuple[int, int]  # (H, W)


def moments(pixels: np.ndarray) -> Moments:
    channels = 1 if pixels.ndim == 2 else 3
    flat = pixels.reshape(-1, channels)  # (H*W, C)
    return Moments(
        channels,
        flat.shape[0],
        flat.sum(axis=0, dtype=np.int64),
        np.einsum("pc,pc->c", flat, flat, dtype=np.int64),
        tuple(pixels.shape[:2]),
    )


class Prepared(NamedTuple):
    data: bytes
    ext: str  # "png" | "jpg"
    moments: Moments


def prepare_image(image: ImageLike, options: EncodeOptions = EncodeOptions()) -> Prepared:
    """The bytes to store for one image, their extension and the stored pixels' moments.

    The statistics describe what a reader decodes, except after a JPEG re-encode, where they are
    those of the pixels before compression (differences are far below what normalisation needs).
    """
    if isinstance(image, os.PathLike):
        image = Path(image).read_bytes()
    original, kind = None, None
    if isinstance(image, (bytes, bytearray, memoryview)):
        original = bytes(image)
        pixels, mode = decode_image(original)
        kind = sniff_format(original) if mode in ("L", "RGB") else None
    else:
        pixels = to_pixels(image)
    smaller = shrink(pixels, options.resize)
    if smaller is not None:
        pixels, original = smaller, None
    if options.encode == "keep" and original is not None and kind is not None:
        return Prepared(original, kind, moments(pixels))
    target = {"keep": kind or "png", "png": "png", "jpeg": "jpg"}[options.encode]
    data = encode_png(pixels) if target == "png" else encode_jpeg(pixels, options.quality)
    return Prepared(data, target, moments(pixels))


def _error_text(exn: BaseException) -> str:
    """``Type: message`` without object addresses (Pillow names a BytesIO by its address), so the
    same failure reads the same in every run and every worker."""
    return f"{type(exn).__name__}: {_OBJECT_REPR.sub('', str(exn))}"


class ImageError(ValueError):
    """An image could not be read, decoded or encoded. Built in the worker from the original
    exception's type and message, so the error text is the same whatever the worker count."""


def _prepare_chunk(chunk: Sequence[ImageLike], options: EncodeOptions) -> list[Prepared | ImageError]:
    """Worker task: prepare each image of a chunk; an unreadable one becomes an ImageError."""
    results: list[Prepared | ImageError] = []
    for image in chunk:
        try:
            results.append(prepare_image(image, options))
        except Exception as exn:  # noqa: BLE001  any failure of one image is that image's problem
            results.append(ImageError(_error_text(exn)))
    return results


# --------------------------------------------------------------------------------------------
# Worker processes
# --------------------------------------------------------------------------------------------


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where the OS has it: workers then need no importable __main__ (a notebook, stdin and
    an unguarded script work, where spawn fails and respawns workers forever) and start in
    milliseconds. They run only numpy/Pillow code, never torch or its thread pools (torch's own
    DataLoader forks its workers the same way)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def ordered_map(fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int) -> Iterator[Any]:
    """``map(fn, tasks)`` over ``workers`` processes, results in task order.

    At most 2 x workers tasks are in flight, so a long input is never read (or held) all at once.
    With workers <= 1 it runs in this process. Close the iterator to stop early.
    """
    if workers <= 1:
        yield from map(fn, tasks)
        return
    with _pool_context().Pool(workers) as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(fn, (task,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --------------------------------------------------------------------------------------------
# Writing shards and the manifest
# --------------------------------------------------------------------------------------------


@dataclass
class _Stats:
    """Exact integer pixel sums, kept apart for grey and RGB images so a mixed set can be merged."""

    count: dict[int, int] = field(default_factory=lambda: {1: 0, 3: 0})
    total: dict[int, np.ndarray] = field(default_factory=lambda: {1: np.zeros(1, np.int64), 3: np.zeros(3, np.int64)})
    squares: dict[int, np.ndarray] = field(default_factory=lambda: {1: np.zeros(1, np.int64), 3: np.zeros(3, np.int64)})
    sizes: set[tuple[int, int]] = field(default_factory=set)

    def add(self, pixels: np.ndarray) -> None:
        self.add_moments(moments(pixels))

    def add_moments(self, m: Moments) -> None:
        self.count[m.channels] += m.pixels
        self.total[m.channels] += m.total
        self.squares[m.channels] += m.squares
        self.sizes.add(tuple(m.size))

    def summary(self) -> dict[str, Any]:
        """channels (3 if any image is RGB), per-channel mean/std of pixel/255, image size or None."""
        channels = 3 if self.count[3] else 1
        # A grey pixel counts as the same value in each of R, G and B.
        count = self.count[1] + self.count[3]
        total = self.total[1] + (self.total[3] if channels == 3 else 0)
        squares = self.squares[1] + (self.squares[3] if channels == 3 else 0)
        mean = total / max(count, 1) / 255.0
        var = np.maximum(squares / max(count, 1) / 255.0**2 - mean**2, 0.0)
        size = list(next(iter(self.sizes))) if len(self.sizes) == 1 else None
        return {"image_size": size, "channels": channels, "mean": mean.tolist(), "std": np.sqrt(var).tolist()}


def _tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header block for a regular file (tarfile's own costs ~0.1 ms per member)."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is {len(raw)} bytes; keys must keep it within 100")
    header = bytearray(_TAR_TEMPLATE)
    header[0 : len(raw)] = raw
    header[124:136] = b"%011o\0" % size
    header[148:156] = b"%06o\0 " % sum(header)  # checksum counts its own field as spaces
    return bytes(header)


def _tar_template() -> bytes:
    header = bytearray(512)
    header[100:108] = b"0000444\0"  # mode r--r--r--
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[136:148] = b"00000000000\0"  # mtime 0: identical inputs give identical shards
    header[148:156] = b" " * 8  # checksum placeholder
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header)


_TAR_TEMPLATE = _tar_template()
_TAR_BLOCK = 512
# A tar ends with two zero blocks. Padding the file to a 10 KiB record is a tape-era habit no
# reader needs (tarfile, GNU tar and webdataset read the file without it); leaving it out makes
# --shard-bytes an exact bound instead of one rounded up to 10 KiB.


def _member_bytes(size: int) -> int:
    """Bytes a member of ``size`` data bytes takes in the tar: header + data padded to a block."""
    return _TAR_BLOCK + size + (-size % _TAR_BLOCK)


class _TarShard:
    """One shard being written: a tar under a temporary name, renamed to its final name on close.
    Its sha256 is computed on the bytes as they are written, so checksums cost no second read."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.sha256 = hashlib.sha256()
        self.count = 0
        self.offset = 0

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)

    def add(self, name: str, data: bytes) -> None:
        self._write(_tar_header(name, len(data)) + data + b"\0" * (-len(data) % _TAR_BLOCK))
        self.offset += _member_bytes(len(data))

    def size_with(self, member_sizes: Sequence[int]) -> int:
        """The file size this shard would close at after adding members of these data sizes."""
        return self.offset + sum(_member_bytes(size) for size in member_sizes) + 2 * _TAR_BLOCK

    def close(self) -> dict[str, Any]:
        """Finish the tar (end-of-archive: two zero blocks); its manifest entry."""
        self._write(b"\0" * (self.size_with([]) - self.offset))
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "count": self.count, "bytes": self.path.stat().st_size, "sha256": self.sha256.hexdigest()}

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def _check_key(key: str, seen: set[str]) -> None:
    if not key or "." in key or key.startswith("/") or key.startswith("__") or len(key.encode()) > 90:
        raise ValueError(
            f"sample key {key!r}: keys must be 1-90 bytes, contain no '.', and not start with '/' or '__'"
        )
    if key in seen:
        raise ValueError(f"sample key {key!r} appears twice; keys must be unique")
    seen.add(key)


def _check_label(key: str, label: Any, classes: Sequence[str]) -> int | None:
    """The label as an int index (None for an unlabelled set, where ``classes`` is empty)."""
    if not classes:
        if label is not None:
            raise ValueError(
                f"sample {key!r} has label {label!r} but classes is empty (an unlabelled set): "
                "give the class names, or None as every label"
            )
        return None
    if label is None:
        raise ValueError(f"sample {key!r} has no label but {len(classes)} classes were given; label every sample")
    label = int(label)
    if not 0 <= label < len(classes):
        raise ValueError(f"sample {key!r}: label {label} is outside 0..{len(classes) - 1} ({len(classes)} classes)")
    return label


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_stale(out: Path, prefix: str, keep: set[str]) -> None:
    """Delete ``{prefix}-NNNNNN.tar`` files of an earlier write that the new manifest does not list."""
    for old in out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink()


def _chunk_size(total: int | None, workers: int) -> int:
    """Samples per worker task: CHUNK, or fewer for a small set so every worker gets some."""
    if total is None or workers <= 1:
        return CHUNK
    return max(1, min(CHUNK, total // (4 * workers)))


def _portable(image: ImageLike) -> ImageLike:
    """A torch tensor as numpy pixels (cheap to send to a worker); a bad one is left for the
    worker to reject, so that it is skipped like any unreadable image."""
    if not hasattr(image, "detach"):
        return image
    try:
        return to_pixels(image)
    except ValueError:
        return image


def _prepared_samples(
    samples: Iterable[tuple[str, ImageLike, Any]], classes: Sequence[str], options: EncodeOptions, workers: int,
    total: int | None = None,
) -> Iterator[tuple[str, int | None, Prepared | ImageError]]:
    """``(key, label, prepared image or its error)`` in input order. Keys and labels are checked
    here, as samples are read, so a bad one stops the write before its image is even decoded."""
    keys: set[str] = set()
    pending: deque = deque()  # (key, label) of the samples sent out, in order

    def checked() -> Iterator[ImageLike]:
        for key, image, label in samples:
            _check_key(key, keys)
            pending.append((key, _check_label(key, label, classes)))
            yield _portable(image)

    work = functools.partial(_prepare_chunk, options=options)
    chunks = _chunks(checked(), _chunk_size(total, workers))
    with contextlib.closing(ordered_map(work, chunks, workers)) as results:
        for chunk in results:
            for prepared in chunk:
                key, label = pending.popleft()
                yield key, label, prepared


def _progress(enabled: bool | str, total: int | None):
    """A tqdm bar on stderr counting samples (read, written or skipped), or None."""
    if not enabled:
        return None
    from tqdm import tqdm

    desc = enabled if isinstance(enabled, str) else None
    return tqdm(total=total, desc=desc, unit=" samples", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


class _ShardSequence:
    """The shards of one set as samples arrive: opens, fills and closes tars at the limits, and
    tallies what the manifest reports (entries, pixel statistics, class counts)."""

    def __init__(self, out: Path, prefix: str, shard_size: int | None, shard_bytes: int | None, num_classes: int):
        self.out, self.prefix, self.shard_size, self.shard_bytes = out, prefix, shard_size, shard_bytes
        self.entries: list[dict[str, Any]] = []
        self.stats = _Stats()
        self.class_counts = [0] * num_classes
        self.shard: _TarShard | None = None

    def add(self, key: str, label: int | None, prepared: Prepared) -> None:
        members = [(f"{key}.{prepared.ext}", prepared.data)]
        if label is not None:
            members.append((f"{key}.cls", str(label).encode("ascii")))
        if self.shard is not None and self.shard_bytes is not None:
            if self.shard.size_with([len(data) for _, data in members]) > self.shard_bytes:
                self._close()
        if self.shard is None:
            self.shard = _TarShard(self.out / f"{self.prefix}-{len(self.entries):06d}.tar")
        for name, data in members:
            self.shard.add(name, data)
        self.shard.count += 1
        self.stats.add_moments(prepared.moments)
        if label is not None:
            self.class_counts[label] += 1
        if self.shard.count == self.shard_size:
            self._close()

    def _close(self) -> None:
        self.entries.append(self.shard.close())
        self.shard = None

    def finish(self) -> list[dict[str, Any]]:
        if self.shard is not None:
            self._close()
        return self.entries

    def abort(self) -> None:
        if self.shard is not None:
            self.shard.abort()


def _check_limits(shard_size: int | None, shard_bytes: int | None, workers: int) -> None:
    if shard_size is None and shard_bytes is None:
        raise ValueError("give shard_size (samples per shard) or shard_bytes (bytes per shard), or both")
    if shard_size is not None and shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes={shard_bytes} must be at least 1")
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")


def write_shards(
    samples: Iterable[tuple[str, ImageLike, Any]],
    out_dir: str | os.PathLike,
    *,
    shard_size: int | None = None,
    classes: Sequence[str],
    prefix: str = "shard",
    on_error: OnError | None = None,
    shard_bytes: int | None = None,
    encode: str = "keep",
    quality: int = 95,
    resize: int | None = None,
    workers: int = 1,
    progress: bool | str = False,
    total: int | None = None,
) -> dict:
    """Write ``(key, image, label)`` samples as webdataset tars plus ``manifest.json``; return the manifest.

    ``image`` is uint8 pixels (numpy (H, W) / (H, W, C), torch (H, W) / (C, H, W); C = 1 or 3),
    encoded image bytes, or the path of an image file (read in the worker). How it is stored:
    ``encode``, ``quality``, ``resize`` (see EncodeOptions; the default copies PNG/JPEG bytes).
    ``label`` indexes ``classes``; an empty ``classes`` makes an unlabelled set: every label is
    None, samples get no ``.cls`` and the manifest says ``"labelled": false``.

    A shard closes at ``shard_size`` samples or before it would pass ``shard_bytes`` bytes
    (a sample larger than that alone gets a shard of its own), whichever comes first.
    ``workers`` > 1 decodes/resizes/encodes in that many processes; the files written are
    byte-identical whatever the count. ``progress`` shows a tqdm bar on stderr (a string names it);
    ``total`` (else ``len(samples)`` when it has one) sizes it.

    An image that cannot be decoded raises ValueError naming its key, unless ``on_error(key, exn)``
    is given: then it is called and the sample skipped. Each tar is written under a temporary name
    and renamed when complete; the manifest is written last.
    """
    _check_limits(shard_size, shard_bytes, workers)
    options = EncodeOptions(encode, quality, resize)
    options.check()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-rewritten folder must not look complete
    total = total if total is not None else getattr(samples, "__len__", lambda: None)()
    shards, skipped = _ShardSequence(out, prefix, shard_size, shard_bytes, len(classes)), 0
    bar = _progress(progress, total)
    try:
        for key, label, prepared in _prepared_samples(samples, classes, options, workers, total):
            if bar is not None:
                bar.update(1)
            if not isinstance(prepared, ImageError):
                shards.add(key, label, prepared)
            elif on_error is None:
                raise ValueError(f"sample {key!r}: cannot encode or decode its image: {prepared}")
            else:
                on_error(key, prepared)
                skipped += 1
        entries = shards.finish()
    finally:
        shards.abort()
        if bar is not None:
            bar.close()
    if not entries:
        raise ValueError(f"no samples to write to {out}: the input was empty or every image was unreadable")
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_samples": sum(s["count"] for s in entries),
        "labelled": bool(classes),
        "classes": list(classes),
        "class_counts": shards.class_counts,
        "shards": entries,
        **shards.stats.summary(),
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "encode": encode,
        "quality": quality,
        "resize": resize,
        "skipped": skipped,
    }
    _remove_stale(out, prefix, {s["file"] for s in entries})
    _write_json(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Reading: manifest and shard specs
# --------------------------------------------------------------------------------------------


def find_manifest(spec: Any) -> dict | None:
    """The manifest of a shard set given as its folder, or as a pattern / list of local shards (the
    folder of the first one); None when there is none (remote shards): callers then need the
    class count, mean and std from elsewhere."""
    candidates: list[Any] = [spec] if isinstance(spec, (str, os.PathLike)) else []
    try:
        candidates.append(Path(shard_urls(spec)[0]).parent)
    except (ValueError, FileNotFoundError, OSError, IndexError):
        pass
    for where in candidates:
        try:
            return read_manifest(where)
        except (FileNotFoundError, ValueError, OSError, TypeError):
            continue
    return None


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard folder (``path`` = the folder or its manifest.json).

    ``labelled`` is filled in for manifests written before it existed (labelled = has classes).
    """
    path = Path(path).expanduser()
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} at {file}; write the shards with `python -m data.shards write SRC {path}` "
            "(it writes the manifest) or pass the folder that holds them"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exn:
        raise ValueError(f"{file} is not a readable JSON manifest: {exn}; rewrite the shards") from exn
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or "shards" not in manifest:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{file}: format {found!r}, expected {MANIFEST_FORMAT} with a 'shards' list")
    manifest.setdefault("labelled", bool(manifest.get("classes")))
    return manifest


def _brace_expand(pattern: str) -> list[str]:
    import braceexpand  # a webdataset dependency; the same expansion webdataset applies

    return list(braceexpand.braceexpand(pattern))


def _folder_urls(folder: Path) -> list[str]:
    if (folder / MANIFEST).is_file():
        return [str(folder / entry["file"]) for entry in read_manifest(folder)["shards"]]
    return [str(p) for p in sorted(folder.glob("*.tar"))]


def _expand_spec(spec: str | os.PathLike) -> list[str]:
    text = os.fspath(spec)
    if text.startswith("pipe:"):
        return _brace_expand(text)  # one shell command per shard, as webdataset expands them
    if _URL_SCHEME.match(text):
        return _brace_expand(text)  # http(s)://, s3://, gs://, ...: remote, cannot be checked here
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_urls(path)
    if path.is_file():
        return [str(path)]
    if "{" in text:
        expanded = _brace_expand(str(path))
        missing = [p for p in expanded if not Path(p).is_file()]
        if missing:
            raise ShardsNotFoundError(
                f"shard pattern {text!r}: {len(missing)} of {len(expanded)} files do not exist "
                f"(first: {missing[0]}); check the pattern's range and folder"
            )
        return expanded
    if any(ch in text for ch in "*?["):
        return sorted(glob.glob(str(path)))
    return []


class ShardsNotFoundError(DatasetNotFoundError):
    """A shard spec (data.train, data.test, --train-shards, ...) matches no shard file. A
    DatasetNotFoundError, so the commands report it as one line with exit status 2."""


def _why_nothing(text: str) -> str:
    """How a local spec came to match nothing: no such path, an empty folder, or a glob without a hit."""
    path = Path(text).expanduser()
    if path.is_dir():
        return "is a folder with no *.tar and no manifest.json"
    if any(ch in text for ch in "*?["):
        return "is a pattern that matches no file"
    if not path.exists():
        return "does not exist"
    return "matches no shards"


def shard_urls(spec: Any) -> list[str]:
    """Shard URLs from a folder (its manifest's files, else sorted ``*.tar``), a ``.tar`` path, a
    brace pattern (``train-{000000..000009}.tar``), a glob, a URL (``pipe:`` commands brace-expanded into one per shard;
    ``http(s)://``, ``s3://``, ... brace-expanded) or a list of these. Raises naming the spec
    when nothing matches.
    """
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError("shard spec is an empty list; pass a shard folder, a .tar file, a pattern or a URL")
    urls: list[str] = []
    for one in specs:
        found = _expand_spec(one)
        if not found:
            raise ShardsNotFoundError(
                f"shard spec {os.fspath(one)!r} {_why_nothing(os.fspath(one))}: pass a folder holding *.tar (or a "
                "manifest.json), a .tar file, a brace pattern like train-{000000..000009}.tar, or a URL "
                "(pipe:..., http(s)://..., s3://...); build shards with `python -m data.shards write SRC OUT`"
            )
        urls.extend(found)
    return urls


# --------------------------------------------------------------------------------------------
# Checking written shards: files against the manifest (inspect), every sample (verify)
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_shard_files(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """``(file, problem)`` for each shard of a manifest that is missing, has another size, or
    another sha256 than the manifest records. Manifests written before checksums existed get
    the presence check only."""
    folder = Path(folder)
    problems = []
    for entry in read_manifest(folder)["shards"]:
        path = folder / entry["file"]
        if not path.is_file():
            problems.append((entry["file"], "missing"))
        elif "bytes" in entry and path.stat().st_size != entry["bytes"]:
            problems.append((entry["file"], f"size {path.stat().st_size} bytes, manifest says {entry['bytes']}"))
        elif "sha256" in entry and _sha256_file(path) != entry["sha256"]:
            problems.append((entry["file"], "sha256 differs from the manifest's (the file was modified)"))
    return problems


def _split_name(name: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits a member name: at the first dot of its base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _check_sample(files: dict[str, bytes], labelled: bool, num_classes: int) -> str | None:
    """Why one sample is bad, or None."""
    from PIL import Image

    images = [ext for ext in files if ext in ("png", "jpg", "jpeg")]
    if len(images) != 1:
        return f"{len(images)} image members ({', '.join(sorted(files)) or 'none'}); expected one .png or .jpg"
    try:
        with Image.open(io.BytesIO(files[images[0]])) as image:
            image.load()
    except Exception as exn:  # noqa: BLE001  any decoder failure is this sample's problem
        return f"image does not decode ({_error_text(exn)})"
    if not labelled:
        return None
    if "cls" not in files:
        return "no .cls label, but the manifest says the set is labelled"
    text = files["cls"].decode("ascii", "replace").strip()
    if not re.fullmatch(r"\d+", text) or int(text) >= num_classes:
        return f"label {text!r} is not an integer in 0..{num_classes - 1}"
    return None


def _read_members(tar: tarfile.TarFile) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, extension, data) of each regular member; data None when the file ends inside it."""
    for member in tar:
        if not member.isfile():
            continue
        data = tar.extractfile(member).read()
        key, ext = _split_name(member.name)
        yield key, ext, data if len(data) == member.size else None


def verify_shard(task: tuple[str, bool, int, int | None]) -> tuple[int, list[tuple[str, str]]]:
    """``(samples read, [(key, problem)])`` of one shard ``(path, labelled, num classes, count)``:
    tar structure (members whole, end-of-archive marker present), each image decodes, each label
    present (when labelled) and in range, and the sample count the manifest records."""
    path, labelled, num_classes, expected = task
    if not Path(path).is_file():
        return 0, [("-", "shard file is missing")]
    samples: dict[str, dict[str, bytes]] = {}
    problems: list[tuple[str, str]] = []
    end = None
    try:
        with tarfile.open(path, "r:") as tar:
            for key, ext, data in _read_members(tar):
                if data is None:
                    raise tarfile.ReadError(f"the file ends inside member {key}.{ext}")
                samples.setdefault(key, {})[ext] = data
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as exn:
        problems.append(("-", f"truncated or corrupt tar after {len(samples)} sample(s) ({_error_text(exn)})"))
    for key, files in samples.items():
        reason = _check_sample(files, labelled, num_classes)
        if reason:
            problems.append((key, reason))
    if end is not None and not _ends_with_marker(path, end):
        problems.append(("-", f"no end-of-archive marker after byte {end}: the file is cut short or has trailing data"))
    if expected is not None and len(samples) != expected:
        problems.append(("-", f"{len(samples)} samples, the manifest lists {expected}"))
    return len(samples), problems


def _ends_with_marker(path: str, offset: int) -> bool:
    """Whether two zero blocks follow the last member, as a complete tar has them."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        return handle.read(2 * _TAR_BLOCK) == b"\0" * (2 * _TAR_BLOCK)


def verify_shards(folder: str | os.PathLike, workers: int = 1) -> tuple[int, list[tuple[str, str, str]]]:
    """``(samples read, [(shard file, key, problem)])`` over every shard of a manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    labelled, num_classes = manifest["labelled"], len(manifest.get("classes", []))
    entries = manifest["shards"]
    tasks = [(str(folder / e["file"]), labelled, num_classes, e.get("count")) for e in entries]
    total, problems = 0, []
    with contextlib.closing(ordered_map(verify_shard, tasks, min(workers, len(tasks)))) as results:
        for entry, (count, found) in zip(entries, results):
            total += count
            problems.extend((entry["file"], key, reason) for key, reason in found)
    return total, problems


def shard_sets(path: str | os.PathLike) -> list[Path]:
    """The shard folders under ``path``: itself if it holds a manifest, else its subfolders that
    do (OUT/train, OUT/val, OUT/test as ``write`` makes them)."""
    path = Path(path).expanduser()
    if path.is_file() or (path / MANIFEST).is_file():
        return [path.parent if path.is_file() else path]
    found = sorted(p for p in path.iterdir() if (p / MANIFEST).is_file()) if path.is_dir() else []
    if not found:
        read_manifest(path)  # raises the usual "no manifest.json" error
    return found


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _human_bytes(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def _describe(manifest: dict, out: Path) -> str:
    size = manifest["image_size"]
    size_text = f"{size[0]}x{size[1]}" if size else "mixed sizes"
    mean = ", ".join(f"{m:.4f}" for m in manifest["mean"])
    std = ", ".join(f"{s:.4f}" for s in manifest["std"])
    labels = f"{len(manifest['classes'])} classes" if manifest.get("labelled", True) else "unlabelled"
    stored = sum(s.get("bytes", 0) for s in manifest["shards"])
    return (
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards ({_human_bytes(stored)}) to {out} "
        f"({labels}, {size_text}, {manifest['channels']} channel(s), mean [{mean}], std [{std}])"
    )


@dataclass
class _Target:
    """One shard set to write: its samples, folder and file prefix."""

    listing: Listing
    folder: Path
    prefix: str


def _write_options(args: argparse.Namespace) -> dict[str, Any]:
    """write_shards keyword arguments from the CLI, checked (SourceError names the option)."""
    if args.shard_size is not None and args.shard_size < 1:
        raise SourceError(f"--shard-size {args.shard_size} must be at least 1 (samples per shard)")
    shard_bytes = parse_size(args.shard_bytes) if args.shard_bytes is not None else None
    shard_size = args.shard_size if args.shard_size or shard_bytes else DEFAULT_SHARD_SIZE
    if not 1 <= args.quality <= 100:
        raise SourceError(f"--quality {args.quality} is outside 1..100; 90-95 keeps detail, 75 is smaller")
    if args.resize is not None and args.resize < 1:
        raise SourceError(f"--resize {args.resize} must be a positive shorter side in pixels, e.g. 256")
    if args.workers < 1:
        raise SourceError(f"--workers {args.workers} must be at least 1 (processes that decode and encode)")
    if args.holdout is not None:
        check_fraction(args.holdout)
    return dict(shard_size=shard_size, shard_bytes=shard_bytes, encode=args.encode, quality=args.quality,
                resize=args.resize, workers=args.workers)


def _builtin_targets(args: argparse.Namespace) -> list[_Target]:
    if args.classes is not None:
        raise SourceError(f"--classes applies to image folders and lists; {BUILTIN} has its own 10 classes")
    split, out = args.split or "all", Path(args.out)
    if split == "test" and args.holdout is not None:
        raise SourceError("--holdout splits the train split of fashion-mnist; use --split train or all (its test split is already held out)")
    names = ["train", "test"] if split == "all" else [split]
    nested = len(names) > 1 or args.holdout is not None
    targets = [_Target(builtin_listing(n, args.fashion_mnist_dir), out / n if nested else out, args.prefix or n) for n in names]
    if args.holdout is not None:
        train, val = holdout_split(targets[0].listing, args.holdout, args.seed)
        targets[:1] = [_Target(train, out / "train", args.prefix or "train"), _Target(val, out / "val", args.prefix or "val")]
    return targets


def _source_targets(args: argparse.Namespace) -> list[_Target]:
    if args.split is not None:
        raise SourceError(f"--split applies to the built-in dataset only (SRC = {BUILTIN}); drop it for {args.src}")
    classes = read_classes_file(args.classes) if args.classes is not None else None
    listing, out = open_listing(args.src, classes), Path(args.out)
    if args.holdout is None:
        return [_Target(listing, out, args.prefix or "shard")]
    train, val = holdout_split(listing, args.holdout, args.seed)
    return [_Target(train, out / "train", args.prefix or "train"), _Target(val, out / "val", args.prefix or "val")]


def _write(args: argparse.Namespace) -> int:
    options = _write_options(args)
    targets = _builtin_targets(args) if args.src == BUILTIN else _source_targets(args)
    for target in targets:
        failed: list[str] = []

        def report(key: str, exn: Exception, origins: dict = target.listing.origins) -> None:
            failed.append(f"{origins.get(key, key)}: {exn}")

        manifest = write_shards(
            target.listing.items, target.folder, classes=target.listing.classes, prefix=target.prefix,
            on_error=report, progress=False if args.quiet else target.folder.name, **options,
        )
        for line in failed:
            print(f"skipped unreadable image {line}")
        print(_describe(manifest, target.folder) + (f"; skipped {len(failed)} unreadable file(s)" if failed else ""))
    return 0


def _print_summary(folder: Path, manifest: dict) -> None:
    print(f"{folder}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards")
    size = manifest.get("image_size")
    print(f"images: {'x'.join(map(str, size)) if size else 'mixed sizes'}, {manifest.get('channels')} channel(s)")
    print(f"mean: {manifest.get('mean')}  std: {manifest.get('std')}")
    if "encode" in manifest:
        print(f"written with: encode {manifest['encode']}, quality {manifest.get('quality')}, resize "
              f"{manifest.get('resize')}, shard size {manifest.get('shard_size')}, shard bytes "
              f"{manifest.get('shard_bytes')}; {manifest.get('skipped', 0)} unreadable image(s) skipped")
    if manifest["labelled"]:
        print("classes:")
        for index, (name, count) in enumerate(zip(manifest["classes"], manifest["class_counts"])):
            print(f"  {index:4d}  {name:<24} {count}")
    else:
        print("classes: none (unlabelled)")


def _inspect(args: argparse.Namespace) -> int:
    bad_total = 0
    for folder in shard_sets(args.out):
        manifest = read_manifest(folder)
        _print_summary(folder, manifest)
        problems = dict(check_shard_files(folder))
        checked = "sha256" if all("sha256" in s for s in manifest["shards"]) else "presence only (no checksums recorded)"
        print(f"shards (checked: {checked}):")
        for entry in manifest["shards"]:
            status = f"BAD: {problems[entry['file']]}" if entry["file"] in problems else "ok"
            print(f"  {entry['file']}  {entry['count']}  {entry.get('bytes', '?')} bytes  {status}")
        if problems:
            names = ", ".join(f"{name} ({why})" for name, why in problems.items())
            print(f"error: {len(problems)} of {len(manifest['shards'])} shard(s) in {folder} are bad: {names}", file=sys.stderr)
        bad_total += len(problems)
    return 1 if bad_total else 0


def _verify(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise SourceError(f"--workers {args.workers} must be at least 1")
    bad_total = 0
    for folder in shard_sets(args.out):
        count, problems = verify_shards(folder, args.workers)
        for shard, key, reason in problems:
            print(f"BAD {shard} {key}: {reason}")
        print(f"{folder}: {count} samples read, {len(problems)} problem(s)")
        bad_total += len(problems)
    if bad_total:
        print(f"error: verify found {bad_total} bad sample(s) or shard(s), listed above", file=sys.stderr)
    return 1 if bad_total else 0


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m data.shards", description="Write, inspect and verify webdataset shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write shards from the built-in dataset, an image folder or a CSV/JSONL list")
    write.add_argument("src", help=f"'{BUILTIN}' (built-in), an image folder SRC/<class>/*.png|jpg|jpeg (SRC/*.png: "
                                   "unlabelled), a .csv with a header path[,label] or a .jsonl of {\"path\": ..., "
                                   "\"label\": ...} (paths relative to the list's folder or absolute)")
    write.add_argument("out", help="output folder (with --holdout: OUT/train and OUT/val; fashion-mnist: OUT/train, OUT/test)")
    write.add_argument("--shard-size", type=int, default=None,
                       help=f"samples per shard (default {DEFAULT_SHARD_SIZE}; none when only --shard-bytes is given)")
    write.add_argument("--shard-bytes", default=None, help="bytes per shard at most, e.g. 500MB, 2G, 64MiB; "
                                                            "a shard closes at whichever limit comes first")
    write.add_argument("--encode", choices=ENCODINGS, default="keep",
                       help="keep: copy PNG/JPEG bytes, others to PNG (default); png / jpeg: store every image so")
    write.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 for images this writer encodes (default 95)")
    write.add_argument("--resize", type=int, default=None, metavar="N",
                       help="shrink images so the shorter side is N (aspect kept, bilinear, antialiased); never upscales")
    write.add_argument("--workers", type=int, default=1, help="processes that read, resize and encode (default 1); "
                                                               "output is byte-identical for any count")
    write.add_argument("--holdout", type=float, default=None, metavar="FRACTION",
                       help="also write a held-out split: OUT/train and OUT/val (stratified per class when labelled)")
    write.add_argument("--seed", type=int, default=0, help="seed of the --holdout draw (default 0)")
    write.add_argument("--classes", default=None, metavar="FILE",
                       help="class names, one a line, in label order (keeps indices equal across separately written sets)")
    write.add_argument("--split", choices=["train", "test", "all"], default=None, help="built-in dataset split (default all)")
    write.add_argument("--fashion-mnist-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    write.add_argument("--prefix", default=None, help="shard file prefix (default: the split, or 'shard')")
    write.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect = commands.add_parser("inspect", help="print a manifest summary and check every shard's presence, size and sha256")
    inspect.add_argument("out", help="shard folder (or its manifest.json, or a folder of such folders)")
    verify = commands.add_parser("verify", help="decode every sample of every shard and list the bad ones")
    verify.add_argument("out", help="shard folder (or a folder of such folders)")
    verify.add_argument("--workers", type=int, default=1, help="processes, one shard each at a time (default 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m data.shards``: 0 done, 1 bad shards found, 2 bad input."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as stop:  # --help, or a one-line usage error: a status, for in-process callers too
        return int(stop.code or 0)
    run = {"write": _write, "inspect": _inspect, "verify": _verify}[args.command]
    try:
        return run(args)
    except BrokenPipeError:  # the reader went away (`... inspect OUT | head`): stop quietly, as Unix tools do
        sys.stderr.close()
        return 0
    except (OSError, ValueError) as exn:  # bad source, option, folder or manifest: say so, no traceback
        print(f"error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
