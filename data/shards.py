"""Webdataset shards: write them (from arrays, encoded images, an image folder or the built-in
dataset), describe them in a manifest, and turn a user's shard spec into a list of URLs.

Shard format: tar files ``{prefix}-{i:06d}.tar``; each sample is ``{key}.png`` (8-bit grey "L" or
"RGB"; a JPEG source is copied as ``{key}.jpg``) plus ``{key}.cls`` (ASCII integer label).
``manifest.json`` beside the tars lists them with their counts and the dataset's statistics.

CLI::

    python -m data.shards write fashion-mnist OUT [--split train|test|all] [--shard-size N]
    python -m data.shards write IMAGE_FOLDER OUT [--shard-size N]     # IMAGE_FOLDER/<class>/*.png|jpg
    python -m data.shards inspect OUT
"""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"

# An image given to write_shards: pixels or an already encoded file.
ImageLike = Any  # np.ndarray (H,W)|(H,W,C) · torch.Tensor (H,W)|(C,H,W) · bytes (PNG, JPEG, ...)
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


def _encode_sample(image: ImageLike) -> tuple[bytes, str, np.ndarray]:
    """(stored bytes, extension, pixels) for one image given as pixels or as encoded bytes.

    Encoded PNG (grey or RGB) and JPEG bytes are stored unchanged; other formats and modes are
    decoded and re-encoded as PNG so that every shard holds only L/RGB PNGs or JPEGs.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        pixels, mode = decode_image(data)
        kind = sniff_format(data)
        if kind == "jpg" and mode in ("L", "RGB"):
            return data, "jpg", pixels
        if kind == "png" and mode in ("L", "RGB"):
            return data, "png", pixels
        return encode_png(pixels), "png", pixels
    pixels = to_pixels(image)
    return encode_png(pixels), "png", pixels


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
        channels = 1 if pixels.ndim == 2 else 3
        flat = pixels.reshape(-1, channels)
        self.count[channels] += flat.shape[0]
        self.total[channels] += flat.sum(axis=0, dtype=np.int64)
        self.squares[channels] += np.einsum("pc,pc->c", flat, flat, dtype=np.int64)
        self.sizes.add(pixels.shape[:2])

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
_TAR_RECORD = 20 * _TAR_BLOCK


class _TarShard:
    """One shard being written: a tar under a temporary name, renamed to its final name on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.file = open(self.tmp, "wb")
        self.count = 0
        self.offset = 0

    def add(self, name: str, data: bytes) -> None:
        padding = -len(data) % _TAR_BLOCK
        self.file.write(_tar_header(name, len(data)) + data + b"\0" * padding)
        self.offset += _TAR_BLOCK + len(data) + padding

    def close(self) -> None:
        end = self.offset + 2 * _TAR_BLOCK  # end-of-archive: two zero blocks, padded to a record
        self.file.write(b"\0" * (2 * _TAR_BLOCK + (-end % _TAR_RECORD)))
        self.file.close()
        os.replace(self.tmp, self.path)

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


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _remove_stale(out: Path, prefix: str, keep: set[str]) -> None:
    """Delete ``{prefix}-NNNNNN.tar`` files of an earlier write that the new manifest does not list."""
    for old in out.glob(f"{glob.escape(prefix)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if old.name not in keep:
            old.unlink()


def write_shards(
    samples: Iterable[tuple[str, ImageLike, int]],
    out_dir: str | os.PathLike,
    *,
    shard_size: int,
    classes: Sequence[str],
    prefix: str = "shard",
    on_error: OnError | None = None,
) -> dict:
    """Write ``(key, image, label)`` samples as webdataset tars plus ``manifest.json``; return the manifest.

    ``image`` is uint8 pixels (numpy (H, W) / (H, W, C), torch (H, W) / (C, H, W); C = 1 or 3),
    stored as PNG, or encoded image bytes: PNG and JPEG (grey or RGB) are copied as they are,
    anything else Pillow reads is re-encoded as PNG. ``label`` indexes ``classes``.
    An image that cannot be decoded raises ValueError naming its key, unless ``on_error(key, exn)``
    is given: then it is called and the sample skipped. Each tar is written under a temporary name
    and renamed when complete; the manifest is written last.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be at least 1")
    if not classes:
        raise ValueError("classes is empty; give the class names that labels index")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # a half-rewritten folder must not look complete
    stats, keys = _Stats(), set()
    class_counts = [0] * len(classes)
    shards: list[dict[str, Any]] = []
    shard: _TarShard | None = None
    try:
        for key, image, label in samples:
            _check_key(key, keys)
            label = int(label)
            if not 0 <= label < len(classes):
                raise ValueError(f"sample {key!r}: label {label} is outside 0..{len(classes) - 1} ({len(classes)} classes)")
            try:
                data, ext, pixels = _encode_sample(image)
            except Exception as exn:
                if on_error is None:
                    raise ValueError(f"sample {key!r}: cannot encode or decode its image: {exn}") from exn
                on_error(key, exn)
                continue
            if shard is None:
                shard = _TarShard(out / f"{prefix}-{len(shards):06d}.tar")
            shard.add(f"{key}.{ext}", data)
            shard.add(f"{key}.cls", str(label).encode("ascii"))
            shard.count += 1
            stats.add(pixels)
            class_counts[label] += 1
            if shard.count == shard_size:
                shard.close()
                shards.append({"file": shard.path.name, "count": shard.count})
                shard = None
        if shard is not None:
            shard.close()
            shards.append({"file": shard.path.name, "count": shard.count})
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    if not shards:
        raise ValueError(f"no samples to write to {out}: the input was empty or every image was unreadable")
    manifest = {
        "format": MANIFEST_FORMAT,
        "num_samples": sum(s["count"] for s in shards),
        "classes": list(classes),
        "class_counts": class_counts,
        "shards": shards,
        **stats.summary(),
        "shard_size": shard_size,
    }
    _remove_stale(out, prefix, {s["file"] for s in shards})
    _write_json(out / MANIFEST, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Reading: manifest and shard specs
# --------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a shard folder (``path`` = the folder or its manifest.json)."""
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
    if manifest.get("format") != MANIFEST_FORMAT or "shards" not in manifest:
        raise ValueError(f"{file}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT} with a 'shards' list")
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
        return [text]  # a shell command: passed through untouched
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
            raise FileNotFoundError(
                f"shard pattern {text!r}: {len(missing)} of {len(expanded)} files do not exist "
                f"(first: {missing[0]}); check the pattern's range and folder"
            )
        return expanded
    if any(ch in text for ch in "*?["):
        return sorted(glob.glob(str(path)))
    return []


def shard_urls(spec: Any) -> list[str]:
    """Shard URLs from a folder (its manifest's files, else sorted ``*.tar``), a ``.tar`` path, a
    brace pattern (``train-{000000..000009}.tar``), a glob, a URL (``pipe:`` passed through;
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
            raise FileNotFoundError(
                f"shard spec {os.fspath(one)!r} matches no shards: pass a folder holding *.tar (or a "
                "manifest.json), a .tar file, a brace pattern like train-{000000..000009}.tar, or a URL "
                "(pipe:..., http(s)://..., s3://...); build shards with `python -m data.shards write SRC OUT`"
            )
        urls.extend(found)
    return urls


# --------------------------------------------------------------------------------------------
# Sources for the CLI
# --------------------------------------------------------------------------------------------


def image_folder_classes(root: Path) -> list[str]:
    """Sorted names of the class subfolders of an image folder ``root/<class>/*.png|jpg|jpeg``."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected {root}/<class>/*.png|jpg|jpeg")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class subfolders; expected {root}/<class>/*.png|jpg|jpeg")
    return classes


def image_folder_files(root: Path, classes: Sequence[str]) -> list[tuple[Path, int]]:
    """``(file, label)`` for every image under each class folder, in a stable sorted order."""
    files = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                files.append((path, label))
    return files


def image_folder_samples(files: Sequence[tuple[Path, int]], on_error: OnError) -> Iterable[tuple[str, bytes, int]]:
    """``(key, file bytes, label)``; keys ``sample_{index:08d}`` follow the file order, so they are stable."""
    for index, (path, label) in enumerate(files):
        key = f"sample_{index:08d}"
        try:
            data = path.read_bytes()
        except OSError as exn:
            on_error(key, exn)
            continue
        yield key, data, label


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def _describe(manifest: dict, out: Path) -> str:
    size = manifest["image_size"]
    size_text = f"{size[0]}x{size[1]}" if size else "mixed sizes"
    mean = ", ".join(f"{m:.4f}" for m in manifest["mean"])
    std = ", ".join(f"{s:.4f}" for s in manifest["std"])
    return (
        f"wrote {manifest['num_samples']} samples in {len(manifest['shards'])} shards to {out} "
        f"({len(manifest['classes'])} classes, {size_text}, {manifest['channels']} channel(s), "
        f"mean [{mean}], std [{std}])"
    )


def _write_builtin(args: argparse.Namespace) -> int:
    from data.builtin import FASHION_MNIST_CLASSES, fashion_mnist_samples

    split = args.split or "all"
    out = Path(args.out)
    targets = {"train": out / "train", "test": out / "test"} if split == "all" else {split: out}
    for name, folder in targets.items():
        samples = fashion_mnist_samples(name, args.fashion_mnist_dir)
        manifest = write_shards(
            samples, folder, shard_size=args.shard_size, classes=FASHION_MNIST_CLASSES, prefix=args.prefix or name
        )
        print(_describe(manifest, folder))
    return 0


def _write_folder(args: argparse.Namespace) -> int:
    if args.split is not None:
        print("error: --split applies to the built-in dataset only (SRC = fashion-mnist)", file=sys.stderr)
        return 2
    root = Path(args.src)
    classes = image_folder_classes(root)
    files = image_folder_files(root, classes)
    paths = {f"sample_{i:08d}": path for i, (path, _) in enumerate(files)}
    failed: list[str] = []

    def report(key: str, exn: Exception) -> None:
        failed.append(f"{paths[key]}: {exn}")

    manifest = write_shards(
        image_folder_samples(files, report),
        args.out,
        shard_size=args.shard_size,
        classes=classes,
        prefix=args.prefix or "shard",
        on_error=report,
    )
    for line in failed:
        print(f"skipped unreadable image {line}")
    print(_describe(manifest, Path(args.out)) + (f"; skipped {len(failed)} unreadable file(s)" if failed else ""))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    manifest = read_manifest(args.out)
    print(f"{args.out}: {manifest['num_samples']} samples, {len(manifest['shards'])} shards")
    size = manifest.get("image_size")
    print(f"images: {'x'.join(map(str, size)) if size else 'mixed sizes'}, {manifest.get('channels')} channel(s)")
    print(f"mean: {manifest.get('mean')}  std: {manifest.get('std')}")
    print("classes:")
    for index, (name, count) in enumerate(zip(manifest["classes"], manifest["class_counts"])):
        print(f"  {index:4d}  {name:<24} {count}")
    print("shards:")
    for entry in manifest["shards"]:
        print(f"  {entry['file']}  {entry['count']}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data.shards", description="Write and inspect webdataset shards.")
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write shards from the built-in dataset or an image folder")
    write.add_argument("src", help="'fashion-mnist' (built-in) or an image folder laid out SRC/<class>/*.png|jpg|jpeg")
    write.add_argument("out", help="output folder (fashion-mnist with --split all: OUT/train and OUT/test)")
    write.add_argument("--shard-size", type=int, default=2500, help="samples per shard (default 2500)")
    write.add_argument("--split", choices=["train", "test", "all"], default=None, help="built-in dataset split (default all)")
    write.add_argument("--fashion-mnist-dir", default=None, help="folder holding the Fashion-MNIST IDX files")
    write.add_argument("--prefix", default=None, help="shard file prefix (default: the split, or 'shard')")
    inspect = commands.add_parser("inspect", help="print a shard folder's manifest summary")
    inspect.add_argument("out", help="shard folder (or its manifest.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m data.shards``."""
    args = _parser().parse_args(argv)
    if args.command == "inspect":
        return _inspect(args)
    if args.shard_size < 1:
        print(f"error: --shard-size {args.shard_size} must be at least 1", file=sys.stderr)
        return 2
    try:
        if args.src == "fashion-mnist":
            return _write_builtin(args)
        return _write_folder(args)
    except (OSError, ValueError) as exn:  # bad folder, no images, bad dataset files: say so, no traceback
        print(f"error: {exn}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
