"""Streaming uint8 batches from webdataset shards: split by rank and worker, seeded shuffles,
corrupt samples skipped and counted, and a two-integer position for exact resume.

Order of work in a worker: its shards (after the per-epoch shard shuffle and the rank / worker
split) are read as tar streams, samples grouped by key, shuffled in a seeded buffer, decoded to
``channels`` at ``image_size`` (shorter side resized, centre crop) and batched. The only
randomness is the two shuffles; random augmentation belongs on the accelerator (data.augment).
"""

from __future__ import annotations

import gzip
import io
import logging
import random
import tarfile
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import webdataset as wds
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.shards import shard_urls

log = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
_MAX_WARNINGS_PER_WORKER = 5


class Batch(NamedTuple):
    """A batch: uint8 images (B, C, H, W), int64 labels (B,), and the corrupt samples the producing
    worker skipped since its previous batch."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int


class _Piece(NamedTuple):
    """What a worker sends: a full batch, or (tail=True) its last, possibly empty, partial batch;
    ``bad`` maps shard URL -> corrupt samples met there since the previous piece."""

    images: torch.Tensor
    labels: torch.Tensor
    skipped: int
    bad: dict[str, int]
    tail: bool


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


# --------------------------------------------------------------------------------------------
# Which shards, in which order (pure functions of the arguments)
# --------------------------------------------------------------------------------------------


def epoch_shards(urls: tuple[str, ...], seed: int, epoch: int, shuffle: bool) -> list[str]:
    """All shards in this epoch's order: shuffled by an RNG seeded from (seed, epoch)."""
    order = list(urls)
    if shuffle:
        random.Random(f"vit-ssl/shards/{seed}/{epoch}").shuffle(order)
    return order


def worker_shards(cfg: _StreamConfig, epoch: int, worker: int, num_workers: int) -> list[str]:
    """Shards of one worker: every world_size-th of the epoch's list from ``rank``, then every
    num_workers-th of those from ``worker``."""
    ranked = epoch_shards(cfg.urls, cfg.seed, epoch, cfg.shuffle)[cfg.rank :: cfg.world_size]
    return ranked[worker::num_workers]


# --------------------------------------------------------------------------------------------
# Reading and decoding inside a worker
# --------------------------------------------------------------------------------------------


class _Tally:
    """Corrupt samples a worker met since its last piece, per shard (plus capped log warnings)."""

    def __init__(self) -> None:
        self.bad: Counter[str] = Counter()
        self.warned = 0

    def skip(self, url: str, what: str, exn: BaseException | str) -> None:
        self.bad[url] += 1
        if self.warned < _MAX_WARNINGS_PER_WORKER:
            self.warned += 1
            log.warning("skipping %s in %s: %s", what, url, exn)

    def piece(self, images: torch.Tensor, labels: list[int], tail: bool) -> _Piece:
        """A piece carrying the corrupt counts since the previous one (and resetting them)."""
        bad, self.bad = dict(self.bad), Counter()
        return _Piece(images, torch.tensor(labels, dtype=torch.int64), sum(bad.values()), bad, tail)


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
        if _octal(header[148:156], "checksum") != sum(header[:148]) + 256 + sum(header[156:]):
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


def _tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of the tar at ``url`` (a path or any webdataset URL:
    pipe:, http(s), s3, ...); ``.tar.gz`` / ``.tgz`` are decompressed on the fly."""
    stream = wds.gopen(url, "rb")
    try:
        if url.endswith((".gz", ".tgz")):
            with gzip.GzipFile(fileobj=stream) as unzipped:
                yield from _tar_entries(unzipped)
        else:
            yield from _tar_entries(stream)
    except BaseException:  # includes the consumer stopping early (GeneratorExit)
        _close_quietly(stream)
        raise
    stream.close()  # a pipe: command that failed reports its exit status here


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception as exn:  # already failing or abandoned: the first error is the one to report
        log.debug("closing a shard stream failed: %s", exn)


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key rule: the key is the path up to the first '.' of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def _shard_samples(url: str, tally: _Tally) -> Iterator[dict[str, Any]]:
    """Samples (dicts of extension -> bytes, with __key__ and __url__) of one shard; a shard that
    cannot be opened or read to its end is counted once and the rest of it skipped."""
    current: dict[str, Any] | None = None
    try:
        for name, data in _tar_members(url):
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
    except Exception as exn:  # truncated or unreadable shard: count it, skip the rest
        tally.skip(url, "the rest of the shard", exn)


def _samples(urls: list[str], tally: _Tally) -> Iterator[dict[str, Any]]:
    for url in urls:
        yield from _shard_samples(url, tally)


def _shuffled(samples: Iterator[dict[str, Any]], buffer: int, seed: str) -> Iterator[dict[str, Any]]:
    """webdataset's buffer shuffle with our own seeded RNG (never the global one)."""
    return wds.filters.shuffle(buffer, initial=buffer, rng=random.Random(seed))(samples)


def load_pixels(data: bytes, channels: int, size: int) -> np.ndarray:
    """Decode image bytes to uint8 pixels (size, size) for 1 channel or (size, size, 3) for 3:
    convert grey/RGB, resize the shorter side to ``size`` (bilinear; Pillow antialiases when
    shrinking) and centre-crop. Nothing is resized when the image already has that size."""
    mode = "L" if channels == 1 else "RGB"
    with Image.open(io.BytesIO(data)) as image:
        image.draft(mode, (size, size))  # JPEG: decode at a reduced scale when much larger
        image = image.convert(mode) if image.mode != mode else image
        width, height = image.size
        if (width, height) != (size, size):
            scale = size / min(width, height)
            new = (max(size, round(width * scale)), max(size, round(height * scale)))
            image = image.resize(new, Image.Resampling.BILINEAR)
            left, top = (new[0] - size) // 2, (new[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.uint8)


def _to_batch(pixels: list[np.ndarray], channels: int, size: int) -> torch.Tensor:
    """Stack per-sample pixels into uint8 (B, C, H, W); one conversion per batch, not per image."""
    if not pixels:
        return torch.empty((0, channels, size, size), dtype=torch.uint8)
    stacked = torch.from_numpy(np.stack(pixels))
    if channels == 1:
        return rearrange(stacked, "b h w -> b 1 h w")
    return rearrange(stacked, "b h w c -> b c h w").contiguous()


def _decode(sample: dict[str, Any], cfg: _StreamConfig, tally: _Tally) -> tuple[np.ndarray, int] | None:
    """(image, label) of a sample, or None after counting it as corrupt."""
    url = sample["__url__"]
    what = f"sample {sample['__key__']!r}"
    ext = next((e for e in _IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        tally.skip(url, what, f"no image ({'/'.join(_IMAGE_EXTENSIONS)}) among {sorted(k for k in sample if not k.startswith('__'))}")
        return None
    try:
        label = int(sample["cls"].decode("ascii").strip())
    except (KeyError, UnicodeDecodeError, ValueError) as exn:
        tally.skip(url, what, f"missing or invalid .cls ({exn!r})")
        return None
    try:
        image = load_pixels(sample[ext], cfg.channels, cfg.image_size)
    except Exception as exn:  # Pillow raises many types for broken files
        tally.skip(url, what, f"undecodable .{ext} ({exn!r})")
        return None
    return image, label


def _worker_pieces(cfg: _StreamConfig, epoch: int, worker: int, num_workers: int) -> Iterator[_Piece]:
    """One worker's epoch: full batches, then one tail piece (possibly empty)."""
    tally = _Tally()
    samples = _samples(worker_shards(cfg, epoch, worker, num_workers), tally)
    if cfg.shuffle:
        seed = f"vit-ssl/samples/{cfg.seed}/{epoch}/{cfg.rank}/{worker}"
        samples = _shuffled(samples, cfg.shuffle_buffer, seed)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for sample in samples:
        decoded = _decode(sample, cfg, tally)
        if decoded is None:
            continue
        images.append(decoded[0])
        labels.append(decoded[1])
        if len(images) == cfg.batch_size:
            yield tally.piece(_to_batch(images, cfg.channels, cfg.image_size), labels, tail=False)
            images, labels = [], []
    yield tally.piece(_to_batch(images, cfg.channels, cfg.image_size), labels, tail=True)


class _EpochStream(IterableDataset):
    """The pieces of one (epoch, rank), each DataLoader worker producing its own shards'."""

    def __init__(self, cfg: _StreamConfig, epoch: int):
        super().__init__()
        self.cfg = cfg
        self.epoch = epoch

    def __iter__(self) -> Iterator[_Piece]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return _worker_pieces(self.cfg, self.epoch, worker, num_workers)


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # one core per worker; the trainer owns the rest


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
    batch_size) (and the shuffle settings); ``state_dict()`` = {"epoch", "batch"} is enough to
    continue exactly where a run stopped. Creating or reading an iterator never touches the
    global torch / random / numpy RNGs.
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
    ):
        _check_args(batch_size, image_size, channels, rank, world_size, num_workers, shuffle_buffer)
        found = shard_urls(urls)
        if len(found) < world_size:
            raise ValueError(
                f"{len(found)} shard(s) for world_size={world_size}: every rank needs at least one shard, so "
                f"at least {world_size} are needed; rewrite the data with a smaller --shard-size "
                f"(python -m data.shards write SRC OUT --shard-size N) so that it makes >= {world_size} shards"
            )
        self.cfg = _StreamConfig(
            tuple(found), batch_size, image_size, channels, seed, rank, world_size, shuffle, shuffle_buffer
        )
        self.urls = list(found)
        self.drop_last = drop_last
        self.pin_memory = pin_memory
        self.max_corrupt_fraction = max_corrupt_fraction
        self.min_samples_for_check = min_samples_for_check
        self.num_workers = _fit_workers(num_workers, len(found[rank::world_size]), rank)
        self.epoch = 0
        self.batch = 0
        self.skipped = 0
        self._seen = 0
        self._corrupt = 0
        self._bad_shards: Counter[str] = Counter()

    # -- position -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        """The position: epoch, and batches already yielded in it."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position saved by state_dict (on a loader built with the same arguments)."""
        epoch, batch = int(state["epoch"]), int(state["batch"])
        if epoch < 0 or batch < 0:
            raise ValueError(f"state {state!r}: epoch and batch must be >= 0")
        self.epoch, self.batch = epoch, batch

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
                raise RuntimeError(
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

    def _pieces(self, epoch: int) -> Iterator[_Piece]:
        dataset = _EpochStream(self.cfg, epoch)
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
        produced = 0
        for piece in self._pieces(epoch):
            self._account(piece)
            for batch in merger.add(piece):
                produced += 1
                if produced > skip:
                    yield batch
        last, unreported = merger.finish(self.drop_last)
        self.skipped += unreported
        if last is not None and produced + 1 > skip:
            yield last

    def _account(self, piece: _Piece) -> None:
        """Count seen and corrupt samples; fail once the corrupt fraction passes the limit."""
        self._seen += len(piece.labels) + piece.skipped
        self._corrupt += piece.skipped
        self._bad_shards.update(piece.bad)
        if self._seen >= self.min_samples_for_check and self._corrupt > self.max_corrupt_fraction * self._seen:
            shards = ", ".join(f"{url} ({n})" for url, n in self._bad_shards.most_common(10))
            raise RuntimeError(
                f"{self._corrupt} of {self._seen} samples read were corrupt "
                f"({self._corrupt / self._seen:.2%} > max_corrupt_fraction={self.max_corrupt_fraction}); "
                f"shards involved: {shards}. Rewrite those shards, or raise ShardLoader(max_corrupt_fraction=...)"
            )


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


def _fit_workers(num_workers: int, rank_shards: int, rank: int) -> int:
    """Workers for this rank: no more than its shards, since a worker without a shard idles."""
    if num_workers <= rank_shards:
        return num_workers
    warnings.warn(
        f"rank {rank} has {rank_shards} shard(s) for num_workers={num_workers}; using {rank_shards} worker(s) "
        "(write smaller shards with --shard-size for more parallel reading)",
        stacklevel=3,
    )
    return rank_shards
