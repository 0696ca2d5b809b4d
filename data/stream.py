"""Streaming uint8 batches from webdataset shards: split by rank and worker, seeded shuffles,
corrupt samples skipped and counted, and a two-integer position for exact resume.

Two modes:

- epochs (default): each epoch reads every shard once, so every sample is seen exactly once per
  epoch across all ranks; the order is a pure function of (seed, epoch).
- resampled (``resampled=True``): endless, for sets too big for epochs. "Virtual epoch" e reads
  ``shards_per_epoch`` shards drawn WITH replacement by an RNG seeded from (seed, e), split by rank
  and worker exactly like an epoch, so the position stays {epoch, batch} and resuming stays exact.

Order of work in a worker: its shards (after the per-epoch shard order and the rank / worker
split) are read as tar streams, samples grouped by key, shuffled in a seeded buffer, decoded to
``channels`` at ``image_size`` (shorter side resized, centre crop) and batched. The only
randomness is the shard order and the sample shuffle; random augmentation belongs on the
accelerator (data.augment).

Shard URLs are what webdataset accepts: local paths (``file://`` too), ``pipe:CMD`` (a shell
command writing the tar to stdout), ``http(s)://`` (curl), ``s3://`` (the AWS CLI, which
webdataset 1.0.2 does not know), ``gs://`` (gsutil) and webdataset's other schemes. The command
behind a scheme is a template with ``{url}``: override it with ``url_commands={"s3": "..."}`` or
the environment variable ``VIT_SSL_S3_COMMAND`` (``VIT_SSL_<SCHEME>_COMMAND`` in general). A
shard whose command fails is skipped and counted like a corrupt sample; the message names the
URL, the command, its exit status and the end of its stderr, credentials in them masked (data.redact).
"""

from __future__ import annotations

import gzip
import io
import logging
import os
import random
import re
import shlex
import signal
import struct
import subprocess
import tarfile
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple

import numpy as np
import torch
import webdataset as wds
from webdataset.gopen import gopen_schemes
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.redact import redact
from data.shards import shard_urls

log = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
_MAX_WARNINGS_PER_WORKER = 5
_SHARDS_FIX = "write smaller shards with `python -m data.shards write SRC OUT --shard-size N`"

DEFAULT_URL_COMMANDS: dict[str, str] = {
    "http": "curl --fail --silent --show-error --location --connect-timeout 30 --retry 3 {url}",
    "https": "curl --fail --silent --show-error --location --connect-timeout 30 --retry 3 {url}",
    "s3": "aws s3 cp {url} -",
    "gs": "gsutil cat {url}",
}


class DataError(RuntimeError):
    """The shards cannot feed the run: too many corrupt samples, no readable sample in an epoch, or
    fewer samples than a batch. The message names the shards and the setting to change."""


class Batch(NamedTuple):
    """A batch: uint8 images (B, C, H, W), int64 labels (B,) (-1 where a sample has no label and
    labels=False), and the corrupt samples the producing worker skipped since its previous batch."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int


class _Piece(NamedTuple):
    """What a worker sends: a full batch, or (tail=True) its last, possibly empty, partial batch.

    ``bad`` maps shard URL -> corrupt samples met there since the previous piece, ``errors`` shard
    URL -> the first reason. A ``discarded`` piece is a full batch the main process is certain to
    drop while resuming: its samples were checked to decode but its images are empty (0, C, H, W).
    """

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int
    bad: dict[str, int]
    errors: dict[str, str]
    tail: bool
    discarded: bool


@dataclass(frozen=True)
class _StreamConfig:
    urls: tuple[str, ...]
    batch_size: int
    image_size: int
    channels: int
    seed: int
    rank: int
    world_size: int
    shuffle: bool
    shuffle_buffer: int
    labels: bool = True
    resampled: bool = False
    shards_per_epoch: int = 0  # resampled mode: shards drawn per virtual epoch
    commands: tuple[tuple[str, str], ...] = ()  # URL scheme -> command template


# --------------------------------------------------------------------------------------------
# Which shards, in which order (pure functions of the arguments)
# --------------------------------------------------------------------------------------------


def epoch_shards(urls: tuple[str, ...], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """All shards in this epoch's order: shuffled by an RNG seeded from (seed, epoch)."""
    order = list(urls)
    if shuffle:
        random.Random(f"vit-ssl/shards/{seed}/{epoch}").shuffle(order)
    return order


def resampled_shards(urls: tuple[str, ...], seed: int, epoch: int, draws: int) -> list[str]:
    """The shards of virtual epoch ``epoch``: ``draws`` of them, drawn with replacement by an RNG
    seeded from (seed, epoch), so any position is recomputed from two integers."""
    return random.Random(f"vit-ssl/resampled/{seed}/{epoch}").choices(urls, k=draws)


def worker_shards(cfg: _StreamConfig, epoch: int, worker: int, num_workers: int) -> list[str]:
    """Shards of one worker: every world_size-th of the epoch's list from ``rank``, then every
    num_workers-th of those from ``worker``."""
    if cfg.resampled:
        order = resampled_shards(cfg.urls, cfg.seed, epoch, cfg.shards_per_epoch)
    else:
        order = epoch_shards(cfg.urls, cfg.seed, epoch, cfg.shuffle)
    return order[cfg.rank :: cfg.world_size][worker::num_workers]


# --------------------------------------------------------------------------------------------
# Opening a shard URL
# --------------------------------------------------------------------------------------------

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_STDERR_TAIL = 600


def resolve_url_commands(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """URL scheme -> command template (``{url}`` marks the URL): the defaults, then any
    ``VIT_SSL_<SCHEME>_COMMAND`` environment variable, then ``overrides``."""
    commands, origin = dict(DEFAULT_URL_COMMANDS), {}
    for name, value in os.environ.items():
        match = re.fullmatch(r"VIT_SSL_([A-Z0-9]+)_COMMAND", name)
        if match and value.strip():
            commands[match.group(1).lower()], origin[match.group(1).lower()] = value, f"${name}"
    for scheme, template in (overrides or {}).items():
        commands[scheme.lower()], origin[scheme.lower()] = template, f"url_commands[{scheme!r}]"
    for scheme, template in commands.items():
        if "{url}" not in template:
            raise ValueError(
                f"url command for {scheme}:// is {template!r} ({origin.get(scheme, 'default')}), which has no "
                f"{{url}}; write the command with {{url}} where the shard URL goes, e.g. 'aws s3 cp {{url}} -'"
            )
    return commands


def url_scheme(url: str) -> str | None:
    """'pipe', the lower-cased scheme of ``scheme://...``, or None for a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    match = _URL_SCHEME.match(url)
    return match.group(1).lower() if match else None


def _check_schemes(urls: list[str], commands: Mapping[str, str]) -> None:
    """Fail at construction on a URL no reader knows (rather than skipping every shard later)."""
    known = set(commands) | {"pipe", "file"} | (set(gopen_schemes) - {"__default__"})
    for url in urls:
        scheme = url_scheme(url)
        if scheme is not None and scheme not in known:
            raise ValueError(
                f"shard URL {redact(url)!r}: no reader for {scheme}://; known schemes: {', '.join(sorted(known))}. "
                f"Give the command that streams it with ShardLoader(url_commands={{'{scheme}': 'CMD {{url}}'}}) "
                f"or VIT_SSL_{scheme.upper()}_COMMAND, or write the URL as pipe:CMD"
            )


class _CommandSource:
    """The stdout of a command that streams one shard. Its stderr goes to a temporary file so that
    a failure can be reported with the command, the exit status and what the command said."""

    def __init__(self, command: list[str] | str, url: str):
        self.command = command if isinstance(command, str) else shlex.join(command)
        self.url = url
        self.stderr = tempfile.TemporaryFile()
        self.eof = False
        try:
            self.proc = subprocess.Popen(
                command, shell=isinstance(command, str), stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=self.stderr, bufsize=1 << 20,
            )
        except OSError as exn:  # the program is not installed
            self.stderr.close()
            raise OSError(
                f"cannot run `{redact(self.command)}` for {redact(url)}: {exn}; install it, or set the command for this "
                f"scheme with ShardLoader(url_commands=...) or VIT_SSL_<SCHEME>_COMMAND"
            ) from None

    def read(self, size: int) -> bytes:
        data = self.proc.stdout.read(size)
        if size and not data:
            self.eof = True
        return data

    def finish(self) -> None:
        """After the end-of-archive block: drain the rest, then fail if the command failed."""
        while self.proc.stdout.read(1 << 16):
            pass
        self.eof = True
        failure = self._wait()
        if failure:
            raise OSError(failure)

    def abort(self) -> str | None:
        """Stop early (a read error, or the consumer stopped): the command's failure if it failed."""
        if not self.eof:
            self.proc.kill()  # still running: it has more to say, but nobody listens
            self.proc.wait()
            self._close()
            return None
        try:
            return self._wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._close()
            return None

    def _wait(self, timeout: float | None = None) -> str | None:
        status = self.proc.wait(timeout)
        said = ""
        if status != 0:
            self.stderr.seek(0)
            said = self.stderr.read().decode("utf-8", "replace").strip()[-_STDERR_TAIL:]
        self._close()
        if status == 0:
            return None
        return redact(f"`{self.command}` exited with status {status}" + (f": {said}" if said else " (no stderr)"))

    def _close(self) -> None:
        self.proc.stdout.close()
        self.stderr.close()


class _FileSource:
    """A local file (or any object with read/close, such as webdataset's gopen result)."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.read = stream.read

    def finish(self) -> None:
        self.stream.close()  # webdataset's pipes report a failed command here

    def abort(self) -> str | None:
        try:
            self.stream.close()
        except Exception as exn:  # already failing: report it with the first error
            return str(exn)
        return None


def _open_source(url: str, commands: Mapping[str, str]) -> _CommandSource | _FileSource:
    scheme = url_scheme(url)
    if scheme is None:
        return _FileSource(open(url, "rb", buffering=1 << 20))
    if scheme == "file":
        return _FileSource(open(url[len("file://") :], "rb", buffering=1 << 20))
    if scheme == "pipe":
        return _CommandSource(url[len("pipe:") :], url)
    if scheme in commands:
        return _CommandSource([part.replace("{url}", url) for part in shlex.split(commands[scheme])], url)
    return _FileSource(wds.gopen(url, "rb"))


# --------------------------------------------------------------------------------------------
# Reading tar streams
# --------------------------------------------------------------------------------------------

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (old and new spelling), contiguous file


def _read_exact(stream: Any, size: int) -> bytes:
    """``size`` bytes, or fewer only at the end of the stream (pipes may return short reads)."""
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _octal(field: bytes, what: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid tar header: {what} field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """Records ``"<len> key=value\n"`` of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "replace")
        pos += length
    return records


def _tar_entries(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the regular files of a tar stream (ustar, pax and GNU long names).

    A small reader rather than tarfile, whose stream mode costs ~70 us per member (about half of
    a worker's time on small images) and silently stops at a truncated header. Raises
    tarfile.ReadError when the stream ends before the end-of-archive block or a header is bad.
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        header = _read_exact(stream, _BLOCK)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("archive ends without its end-of-archive block (truncated)")
        if header == _ZERO_BLOCK:
            return
        if _octal(header[148:156], "checksum") != sum(header) - sum(header[148:156]) + 256:
            raise tarfile.ReadError("tar header checksum mismatch (corrupt or not a tar)")
        size = int(pax["size"]) if "size" in pax else _octal(header[124:136], "size")
        data = _read_exact(stream, size + (-size % _BLOCK))
        if len(data) < size:
            raise tarfile.ReadError("unexpected end of data (truncated)")
        kind = header[156:157]
        if kind in (b"x", b"L"):
            if kind == b"x":
                pax = _pax_records(data[:size])
            else:
                long_name = data[:size].rstrip(b"\0").decode("utf-8")
            continue
        if kind in _FILE_TYPES:
            yield pax.get("path") or long_name or _ustar_name(header), data[:size]
        long_name, pax = None, {}


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8")
        if prefix:
            return f"{prefix}/{name}"
    return name


def _tar_members(url: str, commands: Mapping[str, str]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar at ``url``; ``.tar.gz`` / ``.tgz`` are
    decompressed on the fly. A failed command is reported in place of the read error it caused."""
    source = _open_source(url, commands)
    try:
        if url.endswith((".gz", ".tgz")):
            with gzip.GzipFile(fileobj=source) as unzipped:
                yield from _tar_entries(unzipped)
        else:
            yield from _tar_entries(source)
    except Exception as exn:
        failure = source.abort()
        if failure:
            raise OSError(f"{failure} (reading stopped: {exn})") from exn
        raise
    except BaseException:  # the consumer stopped early (GeneratorExit): just stop the command
        source.abort()
        raise
    source.finish()


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key rule: the key is the path up to the first '.' of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


class _Tally:
    """Corrupt samples a worker met since its last piece, per shard, with the first reason per
    shard (plus capped log warnings)."""

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()
        self.errors: dict[str, str] = {}
        self.warned = 0

    def skip(self, url: str, what: str, exn: BaseException | str) -> None:
        self.bad[url] += 1
        self.errors.setdefault(url, f"{what}: {exn}")
        if self.warned < _MAX_WARNINGS_PER_WORKER:
            self.warned += 1
            log.warning("skipping %s in %s: %s", what, url, exn)

    def piece(self, images: torch.Tensor, labels: list[int], tail: bool, discarded: bool = False) -> _Piece:
        """A piece carrying the corrupt counts since the previous one (and resetting them)."""
        bad, self.bad = dict(self.bad), Counter()
        errors, self.errors = self.errors, {}
        labels_t = torch.tensor(labels, dtype=torch.int64)
        return _Piece(images, labels_t, sum(bad.values()), bad, errors, tail, discarded)


def _shard_samples(url: str, commands: Mapping[str, str], tally: _Tally) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension -> bytes, with __key__ and __url__) of one shard; a shard that
    cannot be opened or read to its end is counted once and the rest of it skipped."""
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(url, commands):
            key, ext = _split_name(name)
            if key is None or key.startswith("__"):
                continue
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
    except Exception as exn:  # truncated or unreadable shard, failed command: count it, skip the rest
        tally.skip(url, "the rest of the shard", exn)


def _samples(urls: list[str], commands: Mapping[str, str], tally: _Tally) -> Iterator[dict[str, Any]]:
    for url in urls:
        yield from _shard_samples(url, commands, tally)


def _shuffled(samples: Iterator[dict[str, Any]], buffer: int, seed: str) -> Iterator[dict[str, Any]]:
    """webdataset's buffer shuffle with our own seeded RNG (never the global one)."""
    return wds.filters.shuffle(buffer, initial=buffer, rng=random.Random(seed))(samples)


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3}  # colour type -> channels: grey, RGB


def _png_chunks(data: bytes) -> Iterator[tuple[bytes, memoryview]]:
    """(type, body) of each chunk, up to and including IEND, with lengths and CRCs checked;
    raises ValueError on anything doubtful."""
    view, pos = memoryview(data), len(_PNG_MAGIC)
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 8 + length
        if end + 4 > len(data) or zlib.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            raise ValueError("bad chunk")
        yield kind, view[pos + 8 : end]
        if kind == b"IEND":
            if end + 4 != len(data):
                raise ValueError("data after IEND")
            return
        pos = end + 4
    raise ValueError("no IEND")


def _png_pixels(data: bytes) -> np.ndarray | None:
    """Pixels (H, W) or (H, W, 3) of a plain PNG, decoded with zlib alone, else None.

    Plain = what data.shards writes: 8-bit grey or RGB, not interlaced, only IHDR / IDAT / IEND
    chunks with valid CRCs, a complete zlib stream of the exact size, filter 0 on every row. Such
    a file has exactly one decoding, the one Pillow gives, at ~1/10 of Pillow's cost on tiny
    images; anything else (other PNGs, broken files) returns None and goes to Pillow.
    """
    if not data.startswith(_PNG_MAGIC):
        return None
    try:
        chunks = list(_png_chunks(data))
        kind, ihdr = chunks[0]
        width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", ihdr)
        channels = _PNG_CHANNELS.get(colour)
        plain = kind == b"IHDR" and (depth, compression, filtering, interlace) == (8, 0, 0, 0)
        if not plain or channels is None or not 0 < width * height <= Image.MAX_IMAGE_PIXELS:
            return None
        if len(chunks) < 3 or any(name != b"IDAT" for name, _ in chunks[1:-1]):
            return None
        inflate = zlib.decompressobj()
        raw = inflate.decompress(b"".join(body for _, body in chunks[1:-1]))
    except (ValueError, IndexError, struct.error, zlib.error):
        return None
    if not inflate.eof or inflate.unused_data or len(raw) != height * (1 + width * channels):
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, 1 + width * channels)
    if rows[:, 0].any():  # a row with another filter: Pillow's job
        return None
    return rows[:, 1:].reshape((height, width) if channels == 1 else (height, width, 3))


def _fit(image: Image.Image, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bilinear; Pillow antialiases when shrinking) and
    centre-crop; nothing is resized when the image already has that size."""
    width, height = image.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        image = image.resize(new, Image.Resampling.BILINEAR)
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8)


def _loaded(image: Image.Image, channels: int, size: int) -> Image.Image:
    """Decode (JPEG: at a reduced scale when much larger than ``size``) and convert to L / RGB.
    Every decoding error surfaces here; resizing a loaded L / RGB image does not fail."""
    mode = "L" if channels == 1 else "RGB"
    image.draft(mode, (size, size))
    image.load()
    return image.convert(mode) if image.mode != mode else image


def load_pixels(data: bytes, channels: int, size: int) -> np.ndarray:
    """Decode image bytes to uint8 pixels (size, size) for 1 channel or (size, size, 3) for 3:
    convert grey/RGB, resize the shorter side to ``size`` (bilinear; Pillow antialiases when
    shrinking) and centre-crop. Nothing is resized when the image already has that size."""
    pixels = _png_pixels(data)
    if pixels is not None and pixels.shape[:2] == (size, size):
        if pixels.ndim == 2 and channels == 3:
            return np.repeat(pixels[:, :, None], 3, axis=2)  # (H, W, 3); Pillow's L -> RGB copies the value
        if (pixels.ndim == 2) == (channels == 1):
            return pixels
    if pixels is not None:  # a plain PNG needing RGB -> L or a resize: Pillow, from the same pixels
        return _fit(_loaded(Image.fromarray(pixels), channels, size), size)
    with Image.open(io.BytesIO(data)) as image:
        return _fit(_loaded(image, channels, size), size)


def _check_decodes(data: bytes, channels: int, size: int) -> None:
    """Raise exactly when load_pixels would, at the cost of the decode alone (no resize)."""
    if _png_pixels(data) is not None:
        return
    with Image.open(io.BytesIO(data)) as image:
        _loaded(image, channels, size)


def _to_batch(pixels: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """Stack per-sample pixels into uint8 (B, C, H, W); one conversion per batch, not per image."""
    if not pixels:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    stacked = torch.from_numpy(np.stack(pixels))
    if channels == 1:
        return rearrange(stacked, "b h w -> b 1 h w")
    return rearrange(stacked, "b h w c -> b c h w").contiguous()


def _label(sample: dict[str, Any], required: bool) -> int:
    """The sample's .cls; -1 when labels are not required and it is missing or unreadable."""
    try:
        return int(sample["cls"].decode("ascii").strip())
    except (KeyError, UnicodeDecodeError, ValueError) as exn:
        if required:
            raise ValueError(f"missing or invalid .cls ({exn!r}); pass labels=False for unlabelled shards") from None
        return -1


def _image_ext(sample: dict[str, Any]) -> str | None:
    return next((e for e in _IMAGE_EXTENSIONS if e in sample), None)


def _decode(sample: dict[str, Any], cfg: _StreamConfig, tally: _Tally, pixels: bool = True) -> tuple[Any, int] | None:
    """(pixels, label) of a sample, or None after counting it as corrupt. With pixels=False the
    image is only checked to decode, and the sample itself is returned in place of its pixels."""
    url = sample["__url__"]
    what = f"sample {sample['__key__']!r}"
    ext = _image_ext(sample)
    if ext is None:
        found = sorted(k for k in sample if not k.startswith("__"))
        tally.skip(url, what, f"no image ({'/'.join(_IMAGE_EXTENSIONS)}) among {found}")
        return None
    try:
        label = _label(sample, cfg.labels)
    except ValueError as exn:
        tally.skip(url, what, exn)
        return None
    try:
        if not pixels:
            _check_decodes(sample[ext], cfg.channels, cfg.image_size)
            return sample, label
        return load_pixels(sample[ext], cfg.channels, cfg.image_size), label
    except Exception as exn:  # Pillow raises many types for broken files
        tally.skip(url, what, f"undecodable .{ext} ({exn!r})")
        return None


# --------------------------------------------------------------------------------------------
# A worker's epoch
# --------------------------------------------------------------------------------------------


def _discarded(piece: int, worker: int, num_workers: int, skip: int) -> bool:
    """Whether full piece number ``piece`` of ``worker`` is certain to fall among the first
    ``skip`` batches the main process drops when resuming.

    The DataLoader hands out pieces round-robin over the workers still running, and every piece
    (a full batch, or a tail merged with earlier leftovers) makes at most one batch; so at most
    ``piece * num_workers + worker`` batches come before this one, whatever the other workers do.
    """
    return piece * num_workers + worker < skip


def _worker_pieces(cfg: _StreamConfig, epoch: int, worker: int, num_workers: int, skip: int = 0) -> Iterator[_Piece]:
    """One worker's epoch: full batches, then one tail piece (possibly empty). Full batches that
    the main process will drop (``skip``, see _discarded) are only checked, not decoded to pixels."""
    tally = _Tally()
    samples = _samples(worker_shards(cfg, epoch, worker, num_workers), dict(cfg.commands), tally)
    if cfg.shuffle:
        samples = _shuffled(samples, cfg.shuffle_buffer, f"vit-ssl/samples/{cfg.seed}/{epoch}/{cfg.rank}/{worker}")
    full, discard = 0, _discarded(0, worker, num_workers, skip)
    held: list[Any] = []  # pixels, or (discard) the checked samples themselves
    labels: list[int] = []
    for sample in samples:
        decoded = _decode(sample, cfg, tally, pixels=not discard)
        if decoded is None:
            continue
        held.append(decoded[0])
        labels.append(decoded[1])
        if len(labels) == cfg.batch_size:
            images = _to_batch([] if discard else held, cfg.channels, cfg.image_size)
            yield tally.piece(images, labels, tail=False, discarded=discard)
            held, labels = [], []
            full += 1
            discard = _discarded(full, worker, num_workers, skip)
    if discard:  # the samples were only checked, and they turn out to be the tail: decode them
        held = [load_pixels(s[_image_ext(s)], cfg.channels, cfg.image_size) for s in held]
    yield tally.piece(_to_batch(held, cfg.channels, cfg.image_size), labels, tail=True)


class _EpochStream(IterableDataset):
    """The pieces of one (epoch, rank), each DataLoader worker producing its own shards'."""

    def __init__(self, cfg: _StreamConfig, epoch: int, skip: int = 0):
        super().__init__()
        self.cfg = cfg
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[_Piece]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _worker_pieces(self.cfg, self.epoch, worker, num_workers, self.skip)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the trainer owns the rest
    # A SIGTERM / SIGUSR1 to the whole process group (a scheduler's preemption) is the trainer's to
    # handle: it finishes its step and checkpoints while the workers keep serving; they end when the
    # trainer shuts the loader down or exits (PyTorch's workers watch their parent).
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _identity(piece: _Piece) -> _Piece:
    return piece


# --------------------------------------------------------------------------------------------
# Main process: merging tails, counting, resuming
# --------------------------------------------------------------------------------------------


class _TailMerger:
    """Turns worker pieces into batches: full batches pass through; the workers' tails are joined
    so that at most one partial batch per epoch remains (dropped if drop_last)."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.skipped = 0

    def add(self, piece: _Piece) -> list[Batch]:
        if not piece.tail:
            return [Batch(piece.images, piece.labels, piece.skipped)]
        self.skipped += piece.skipped
        if len(piece.labels):
            self.images.append(piece.images)
            self.labels.append(piece.labels)
        out = []
        while sum(len(x) for x in self.labels) >= self.batch_size:
            out.append(self._take(self.batch_size))
        return out

    def finish(self, drop_last: bool) -> tuple[Batch | None, int]:
        """The last partial batch (None if none or dropped) and the skips not reported in a batch."""
        count = sum(len(x) for x in self.labels)
        if count and not drop_last:
            return self._take(count), 0
        return None, self.skipped

    def _take(self, n: int) -> Batch:
        images, labels = torch.cat(self.images), torch.cat(self.labels)
        self.images, self.labels = [images[n:]], [labels[n:]]
        batch = Batch(images[:n], labels[:n], self.skipped)
        self.skipped = 0
        return batch


class ShardLoader:
    """Deterministic, resumable stream of uint8 batches from webdataset shards.

    The batch order is a pure function of (urls, seed, epoch, rank, world_size, num_workers,
    batch_size) (and the shuffle / mode settings); ``state_dict()`` = {"epoch", "batch"} is enough
    to continue exactly where a run stopped. Creating or reading an iterator never touches the
    global torch / random / numpy RNGs.

    ``resampled=True``: endless sampling with replacement in virtual epochs of
    ``shards_per_epoch`` shard draws (default: max(shards, world_size x workers)); no minimum
    shard count. ``labels=False``: a sample without a readable .cls gets label -1 instead of
    being skipped as corrupt (unlabelled shard sets). ``url_commands``: scheme -> command
    template for remote shards (see the module docstring). ``bad_samples``: corrupt samples met
    so far, per shard URL.
    """

    def __init__(
        self,
        urls: Any,
        *,
        batch_size: int,
        image_size: int,
        channels: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 2,
        shuffle: bool = True,
        shuffle_buffer: int = 1000,
        drop_last: bool = True,
        max_corrupt_fraction: float = 0.01,
        min_samples_for_check: int = 1000,
        pin_memory: bool = False,
        labels: bool = True,
        resampled: bool = False,
        shards_per_epoch: int | None = None,
        url_commands: Mapping[str, str] | None = None,
    ):
        _check_args(batch_size, image_size, channels, rank, world_size, num_workers, shuffle_buffer)
        found = shard_urls(urls)
        commands = resolve_url_commands(url_commands)
        _check_schemes(found, commands)
        draws = _check_shard_count(len(found), world_size, num_workers, resampled, shards_per_epoch)
        self.cfg = _StreamConfig(
            tuple(found), batch_size, image_size, channels, seed, rank, world_size, shuffle, shuffle_buffer,
            labels=labels, resampled=resampled, shards_per_epoch=draws, commands=tuple(sorted(commands.items())),
        )
        self.urls = list(found)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.max_corrupt_fraction = max_corrupt_fraction
        self.min_samples_for_check = min_samples_for_check
        self.num_workers = num_workers
        self.epoch = 0
        self.batch = 0
        self.skipped = 0
        self._seen = 0
        self._corrupt = 0
        self._bad_shards: Counter[str] = Counter()
        self._errors: dict[str, str] = {}

    # -- position and counts --------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The position: epoch (virtual epoch in resampled mode), and batches already yielded in it."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by state_dict (on a loader built with the same arguments)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"state {state!r}: epoch and batch must be >= 0")
        self.epoch, self.batch = epoch, batch

    @property
    def bad_samples(self) -> dict[str, int]:
        """Corrupt samples skipped so far by this loader, per shard URL (cumulative over epochs; an
        unreadable shard or the unread rest of a truncated one counts once). Samples re-read while
        resuming count again."""
        return dict(self._bad_shards)

    @property
    def bad_reasons(self) -> dict[str, str]:
        """The first reason a sample of each shard in bad_samples was skipped."""
        return dict(self._errors)

    # -- iteration ----------------------------------------------------------------------------

    def iter_epoch(self, epoch: int, skip: int = 0) -> Iterator[Batch]:
        """One pass over this rank's shards, after discarding the first ``skip`` batches."""
        for batch in self._epoch_batches(epoch, skip):
            self.skipped += batch.skipped
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        """Endless: epoch after epoch from the current position, keeping it up to date.

        One batch is read ahead so that the position after an epoch's last batch is already
        (epoch + 1, 0): a resume there starts the next epoch without replaying this one.
        """
        while True:
            epoch, skip = self.epoch, self.batch
            batches = self._epoch_batches(epoch, skip)
            current = next(batches, None)
            if current is None and skip == 0:
                raise DataError(
                    f"epoch {epoch} of rank {self.cfg.rank} yielded no batch: fewer than batch_size="
                    f"{self.cfg.batch_size} samples in its shards; lower batch_size or set drop_last=False"
                )
            while current is not None:
                following = next(batches, None)
                if following is None:
                    self.epoch, self.batch = epoch + 1, 0
                else:
                    self.batch += 1
                self.skipped += current.skipped
                yield current
                current = following
            self.epoch, self.batch = epoch + 1, 0

    def _pieces(self, epoch: int, skip: int) -> Iterator[_Piece]:
        dataset = _EpochStream(self.cfg, epoch, skip)
        if self.num_workers == 0:
            return iter(dataset)
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=_identity,
            worker_init_fn=_init_worker,
            persistent_workers=False,
            pin_memory=self.pin_memory,
            # Only seeds the workers' own torch RNGs; passing it keeps the global RNG untouched.
            generator=torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + epoch) % 2**63),
        )
        return iter(loader)

    def _epoch_batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        merger = _TailMerger(self.cfg.batch_size)
        produced, good, failed = 0, 0, False
        for piece in self._pieces(epoch, skip):
            self._account(piece)
            good += len(piece.labels)
            failed = failed or bool(piece.bad)
            for batch in merger.add(piece):
                produced += 1
                if produced > skip:
                    if piece.discarded:  # cannot happen (see _discarded); never hand out empty images
                        raise RuntimeError(f"internal error: batch {produced - 1} of epoch {epoch} was discarded")
                    yield batch
        if good == 0 and failed:
            raise DataError(
                f"epoch {epoch} of rank {self.cfg.rank} read no sample; {self._shard_report()}. "
                "Check the URLs, the network and the commands (url_commands / VIT_SSL_<SCHEME>_COMMAND)"
            )
        last, unreported = merger.finish(self.drop_last)
        self.skipped += unreported
        if last is not None and produced + 1 > skip:
            yield last

    def _account(self, piece: _Piece) -> None:
        """Count seen and corrupt samples; fail once the corrupt fraction passes the limit."""
        self._seen += len(piece.labels) + piece.skipped
        self._corrupt += piece.skipped
        self._bad_shards.update(piece.bad)
        for url, reason in piece.errors.items():
            self._errors.setdefault(url, reason)
        if self._seen >= self.min_samples_for_check and self._corrupt > self.max_corrupt_fraction * self._seen:
            raise DataError(
                f"{self._corrupt} of {self._seen} samples read were corrupt "
                f"({self._corrupt / self._seen:.2%} > max_corrupt_fraction={self.max_corrupt_fraction}); "
                f"{self._shard_report()}. Rewrite those shards (python -m data.shards verify lists the bad samples), or raise "
                "data.max_corrupt_fraction (ShardLoader(max_corrupt_fraction=...))"
            )

    def _shard_report(self, most: int = 10) -> str:
        """'shards involved: URL (n bad: first reason), ...' for the worst ``most`` shards."""
        parts = [redact(f"{url} ({n} bad: {self._errors.get(url, '?')[:300]})") for url, n in self._bad_shards.most_common(most)]
        more = len(self._bad_shards) - most
        return "shards involved: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _check_args(
    batch_size: int, image_size: int, channels: int, rank: int, world_size: int, num_workers: int, shuffle_buffer: int
) -> None:
    checks = [
        ("batch_size", batch_size, batch_size >= 1, "an integer >= 1"),
        ("image_size", image_size, isinstance(image_size, int) and image_size >= 1, "an integer >= 1"),
        ("channels", channels, channels in (1, 3), "1 (grey) or 3 (RGB)"),
        ("world_size", world_size, world_size >= 1, "an integer >= 1"),
        ("rank", rank, 0 <= rank < max(world_size, 1), f"in 0..{world_size - 1}"),
        ("num_workers", num_workers, num_workers >= 0, "an integer >= 0"),
        ("shuffle_buffer", shuffle_buffer, shuffle_buffer >= 1, "an integer >= 1"),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"ShardLoader {name}={value!r} is invalid; it must be {allowed}")


def _check_shard_count(shards: int, world_size: int, num_workers: int, resampled: bool, draws: int | None) -> int:
    """Epochs mode: every (rank, worker) needs a shard, so >= world_size x workers shards (a worker
    without one would idle, and ranks would read unequal amounts). Resampled mode: the shard
    draws per virtual epoch (default max(shards, world_size x workers)), which must cover as many."""
    readers = world_size * max(num_workers, 1)
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''} x {max(num_workers, 1)} worker{'s' if num_workers > 1 else ''}"
    if resampled:
        draws = max(shards, readers) if draws is None else draws
        if draws < readers:
            raise ValueError(
                f"ShardLoader shards_per_epoch={draws} is too small for {ranks}: it must be >= {readers} "
                "so that every worker draws a shard; leave it unset for max(shards, ranks x workers)"
            )
        return draws
    if draws is not None:
        raise ValueError(f"ShardLoader shards_per_epoch={draws} applies to resampled mode only; set resampled=True or drop it")
    if shards < world_size:
        raise ValueError(
            f"{shards} shard(s) for world_size={world_size}: every rank needs at least one shard, so at least "
            f"{world_size} are needed; {_SHARDS_FIX} so that it makes >= {world_size} shards, or set data.resampled=true"
        )
    if shards < readers:
        raise ValueError(
            f"{shards} shards for {ranks}: need >= {readers} (one per rank and worker); {_SHARDS_FIX}, "
            f"or set data.num_workers={shards // world_size}, or use resampled mode (data.resampled=true)"
        )
    return 0
