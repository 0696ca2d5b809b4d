"""Tests of reading shards at scale (data.stream): remote URLs (pipe:, http, s3), the shard count
check, epochs and resampled modes, exact resume, per-shard bad-sample counts, optional labels,
and the plain-PNG fast path.

Everything is real: tar shards written by data.shards into tmp folders, DataLoader worker
processes, a real HTTP server on 127.0.0.1 read with the real curl, real subprocesses. Images
spell their own index (test_data.index_image) and label == index, so order and coverage show.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import stat
import struct
import tarfile
import threading
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from data.shards import encode_png, shard_urls, write_shards
from data.stream import ShardLoader, _png_pixels, load_pixels, resampled_shards, worker_shards
from test_data import corrupt_shards, image_index, index_image, index_samples, labels_of

N, SHARD, SIZE = 240, 30, 8  # 8 shards of 30 samples, 8x8 grey images


def make_loader(urls, **kw) -> ShardLoader:
    args = dict(batch_size=16, image_size=SIZE, channels=1, num_workers=2, shuffle_buffer=50)
    args.update(kw)
    return ShardLoader(urls, **args)


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels) for x, y in zip(a, b))


def write_index_shards(out: Path, n: int = N, shard_size: int = SHARD) -> Path:
    write_shards(index_samples(n), out, shard_size=shard_size, classes=[f"c{i}" for i in range(n)])
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_index_shards(tmp_path_factory.mktemp("stream-shards"))


# --------------------------------------------------------------------------------------------
# epochs mode: every sample once per epoch across ranks x workers
# --------------------------------------------------------------------------------------------


def test_epoch_is_every_sample_once_across_2_ranks_x_2_workers(shards):
    outputs = {}
    for rank in (0, 1):
        run = make_loader(shards, rank=rank, world_size=2, num_workers=2, drop_last=False, seed=5)
        outputs[rank] = labels_of(run.iter_epoch(0))
        # what the rank read is exactly the samples of its two workers' shards
        mine = [u for w in (0, 1) for u in worker_shards(run.cfg, 0, w, 2)]
        assert len(mine) == 4 and sorted(outputs[rank]) == sorted(i for u in mine for i in shard_ids(u))
    assert sorted(outputs[0] + outputs[1]) == list(range(N))  # the union: every sample, once
    per_reader = [worker_shards(make_loader(shards, rank=r, world_size=2).cfg, 0, w, 2) for r in (0, 1) for w in (0, 1)]
    assert sorted(u for shards_of in per_reader for u in shards_of) == shard_urls(shards)  # a partition

    dropped = {r: labels_of(make_loader(shards, rank=r, world_size=2, seed=5).iter_epoch(0)) for r in (0, 1)}
    assert not set(dropped[0]) & set(dropped[1])
    for rank in (0, 1):  # drop_last: no sample twice, at most one partial batch (< 16) left out per rank
        assert len(set(dropped[rank])) == len(dropped[rank]) and len(dropped[rank]) % 16 == 0
        assert set(dropped[rank]) <= set(outputs[rank]) and len(outputs[rank]) - len(dropped[rank]) < 16

    later = make_loader(shards, rank=0, world_size=2, num_workers=2, drop_last=False, seed=5)
    epoch1 = labels_of(later.iter_epoch(1))
    assert epoch1 != outputs[0]  # another epoch, another order (and other shards for this rank)
    assert sorted(epoch1 + labels_of(make_loader(shards, rank=1, world_size=2, drop_last=False, seed=5).iter_epoch(1))) == list(range(N))


def shard_ids(url: str) -> range:
    index = int(Path(url).stem.split("-")[-1])
    return range(index * SHARD, (index + 1) * SHARD)


def test_too_few_shards_error_says_how_many_before_reading(tmp_path):
    marker = tmp_path / "read"
    urls = [f"pipe:touch {marker}; cat /nonexistent-{i}.tar" for i in range(12)]
    with pytest.raises(ValueError) as info:
        make_loader(urls, world_size=4, rank=1, num_workers=4)
    message = str(info.value)
    assert message.startswith("12 shards for 4 ranks x 4 workers: need >= 16")
    assert "python -m data.shards write SRC OUT --shard-size N" in message
    assert "data.num_workers=3" in message and "data.resampled=true" in message
    with pytest.raises(ValueError, match=r"2 shards for 1 rank x 3 workers: need >= 3.*data.num_workers=2"):
        make_loader(urls[:2], num_workers=3)
    with pytest.raises(ValueError, match=r"3 shard\(s\) for world_size=4"):
        make_loader(urls[:3], world_size=4, num_workers=0)
    assert not marker.exists()  # raised at construction: no shard was opened
    make_loader(urls[:12], world_size=4, num_workers=3)  # the suggested fix is accepted
    make_loader(urls[:4], world_size=4, num_workers=0)  # no workers: one reader per rank


# --------------------------------------------------------------------------------------------
# resampled mode
# --------------------------------------------------------------------------------------------


def test_resampled_draws_shards_with_replacement_per_virtual_epoch(shards):
    urls = shard_urls(shards)[:3]  # fewer shards than 2 ranks x 2 workers: fine when resampled
    runs = [make_loader(urls, rank=r, world_size=2, resampled=True, shards_per_epoch=8, drop_last=False, seed=1)
            for r in (0, 1)]
    for epoch in (0, 1):
        drawn = resampled_shards(tuple(urls), 1, epoch, 8)
        assert len(drawn) == 8 and set(drawn) <= set(urls)
        read = Counter(x for run in runs for x in labels_of(run.iter_epoch(epoch)))
        want = Counter(i for url in drawn for i in shard_ids(url))
        assert read == want  # exactly the drawn shards, a shard drawn k times read k times
    assert max(want.values()) > 1  # with replacement: 8 draws of 3 shards repeat some
    again = make_loader(urls, rank=0, world_size=2, resampled=True, shards_per_epoch=8, drop_last=False, seed=1)
    assert labels_of(again.iter_epoch(1)) == labels_of(runs[0].iter_epoch(1))  # a pure function of (seed, epoch)
    assert labels_of(runs[0].iter_epoch(0)) != labels_of(runs[0].iter_epoch(1))
    assert make_loader(urls, world_size=2, num_workers=2, resampled=True).cfg.shards_per_epoch == 4  # max(3, 2 x 2)
    assert make_loader(shard_urls(shards), resampled=True).cfg.shards_per_epoch == 8
    with pytest.raises(ValueError, match=r"shards_per_epoch=3 .*2 ranks x 2 workers.*>= 4"):
        make_loader(urls, world_size=2, resampled=True, shards_per_epoch=3)
    with pytest.raises(ValueError, match="shards_per_epoch=5 applies to resampled mode only"):
        make_loader(shards, shards_per_epoch=5)


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_is_exact_across_an_epoch_boundary_with_2_workers(shards, resampled):
    kw = dict(seed=7, resampled=resampled, num_workers=2)
    reference = make_loader(shards, **kw)
    stream = iter(reference)
    expected = [next(stream) for _ in range(19)]  # 15 batches per (virtual) epoch: crosses into the next
    assert reference.state_dict() == {"epoch": 1, "batch": 4}
    del stream
    for stop in (6, 15, 17):
        first = make_loader(shards, **kw)
        it = iter(first)
        for _ in range(stop):
            next(it)
        resumed = make_loader(shards, **kw)
        resumed.load_state_dict(first.state_dict())
        again = iter(resumed)
        assert same_batches([next(again) for _ in range(2)], expected[stop : stop + 2])


def test_resume_at_many_positions_with_uneven_workers_and_corrupt_samples(shards, tmp_path):
    """Resuming skips batches by checking, not decoding, the samples of batches it is sure to drop
    (data.stream._discarded). Workers that run out at different times and corrupt samples in the
    dropped stretch (which shift batch boundaries) must not change a single batch."""
    folder = tmp_path / "uneven"
    write_index_shards(folder, n=250, shard_size=30)  # 9 shards, the last of 10: workers get 5 and 4
    urls = shard_urls(folder) + corrupt_shards(tmp_path / "corrupt", shards)
    kw = dict(seed=3, batch_size=8, drop_last=False, num_workers=2, max_corrupt_fraction=0.5)
    full = list(make_loader(urls, **kw).iter_epoch(0))
    assert sum(b.skipped for b in full) == 3  # the corrupt samples are in this epoch
    last = len(full)
    stops = [1, 3, 8, last // 2, last - 3, last - 2, last - 1, last]  # the end: workers run out unevenly
    for stop in stops:
        tail = list(make_loader(urls, **kw).iter_epoch(0, skip=stop))
        assert same_batches(tail, full[stop:]), f"resume at batch {stop} of {len(full)} differs"
    in_process = list(make_loader(urls, **{**kw, "num_workers": 0}).iter_epoch(0, skip=5))
    assert same_batches(in_process, list(make_loader(urls, **{**kw, "num_workers": 0}).iter_epoch(0))[5:])


# --------------------------------------------------------------------------------------------
# bad samples and labels
# --------------------------------------------------------------------------------------------


def test_bad_samples_are_counted_per_shard_cumulatively(shards, tmp_path):
    urls = corrupt_shards(tmp_path / "corrupt", shards)
    cut, bad = urls[2], urls[3]
    run = make_loader(urls, drop_last=False, shuffle=False, num_workers=2)
    assert run.bad_samples == {}
    list(run.iter_epoch(0))
    assert run.bad_samples == {cut: 1, bad: 2}  # truncation counts once; garbage image + missing .cls
    assert "truncated" in run.bad_reasons[cut] and "b_1" in run.bad_reasons[bad]
    list(run.iter_epoch(1))
    assert run.bad_samples == {cut: 2, bad: 4}  # cumulative
    run.bad_samples[cut] = 0  # a copy: the loader's counts stay
    assert run.bad_samples[cut] == 2


def test_labels_false_reads_unlabelled_samples_as_minus_one(tmp_path):
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    with tarfile.open(folder / "u.tar", "w") as tar:
        for i in range(5):
            members = {"png": encode_png(index_image(i))}
            if i == 3:
                members["cls"] = b"3"  # one labelled sample among unlabelled ones
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"u_{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    free = make_loader(folder, labels=False, num_workers=0, shuffle=False, drop_last=False)
    (batch,) = list(free.iter_epoch(0))
    assert image_index(batch.images).tolist() == [0, 1, 2, 3, 4]
    assert batch.labels.tolist() == [-1, -1, -1, 3, -1] and free.bad_samples == {}
    strict = make_loader(folder, num_workers=0, shuffle=False, drop_last=False, max_corrupt_fraction=1.0)
    (only,) = list(strict.iter_epoch(0))
    assert only.labels.tolist() == [3] and strict.bad_samples == {str(folder / "u.tar"): 4}
    assert "labels=False" in strict.bad_reasons[str(folder / "u.tar")]


# --------------------------------------------------------------------------------------------
# remote URLs: pipe:, http(s), s3
# --------------------------------------------------------------------------------------------


def test_pipe_urls_read_like_local_files_and_a_failing_command_is_named(shards):
    local = shard_urls(shards)
    reference = list(make_loader(local, seed=2, drop_last=False).iter_epoch(0))
    piped = list(make_loader([f"pipe:cat {u}" for u in local], seed=2, drop_last=False).iter_epoch(0))
    assert same_batches(piped, reference)
    file_urls = list(make_loader([f"file://{u}" for u in local], seed=2, drop_last=False).iter_epoch(0))
    assert same_batches(file_urls, reference)
    broken = "pipe:cat /nonexistent/shard.tar"
    run = make_loader([*local[:3], broken], drop_last=False, max_corrupt_fraction=1.0)
    assert sorted(labels_of(run.iter_epoch(0))) == list(range(90))
    assert run.bad_samples == {broken: 1}
    reason = run.bad_reasons[broken]
    assert "`cat /nonexistent/shard.tar` exited with status 1" in reason and "No such file" in reason


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture
def http_root(shards, monkeypatch):
    """A real HTTP server on 127.0.0.1 (a thread) serving the shard folder; yields its base URL."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(shards)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_shards_read_with_curl_and_a_404_is_named(shards, http_root):
    reference = list(make_loader(shards, seed=4, drop_last=False).iter_epoch(0))
    pattern = f"{http_root}/shard-{{000000..000007}}.tar"
    remote = list(make_loader(pattern, seed=4, drop_last=False).iter_epoch(0))
    assert same_batches(remote, reference)  # same order: it depends on the URL count, not names
    missing = f"{http_root}/shard-000099.tar"
    run = make_loader([f"{http_root}/shard-000000.tar", missing], num_workers=1, drop_last=False, max_corrupt_fraction=1.0)
    assert sorted(labels_of(run.iter_epoch(0))) == list(range(SHARD))
    assert run.bad_samples == {missing: 1} and "404" in run.bad_reasons[missing]
    with pytest.raises(RuntimeError, match=rf"read no sample; shards involved: {missing} .*404"):
        list(make_loader([missing], num_workers=0).iter_epoch(0))


FAKE_AWS = """#!/bin/sh
# Stands in for the AWS CLI in tests: `aws [OPTIONS] s3 cp s3://BUCKET/KEY -` streams
# $FAKE_S3_ROOT/BUCKET/KEY to stdout, or fails like the real CLI when the key does not exist.
echo "$*" >> "$FAKE_S3_LOG"
for arg; do url=$previous; previous=$arg; done
path="$FAKE_S3_ROOT/${url#s3://}"
if [ ! -f "$path" ]; then
    echo "fatal error: An error occurred (404) when calling the HeadObject operation: Key \\"${url#s3://*/}\\" does not exist" >&2
    exit 1
fi
exec cat "$path"
"""


@pytest.fixture
def fake_s3(shards, tmp_path, monkeypatch):
    """A bucket folder and an executable named `aws` first on PATH. It stands in for the AWS CLI
    (not installed in tests, and no network): it serves `aws s3 cp s3://b/KEY -` from the folder."""
    bucket = tmp_path / "s3" / "b"
    shutil.copytree(shards, bucket)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(FAKE_AWS)
    (bin_dir / "aws").chmod((bin_dir / "aws").stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_S3_ROOT", str(tmp_path / "s3"))
    monkeypatch.setenv("FAKE_S3_LOG", str(tmp_path / "aws.log"))
    monkeypatch.delenv("VIT_SSL_S3_COMMAND", raising=False)
    return tmp_path / "aws.log"


def test_s3_shards_read_through_the_aws_cli(shards, fake_s3, monkeypatch):
    reference = list(make_loader(shards, seed=6, drop_last=False).iter_epoch(0))
    pattern = "s3://b/shard-{000000..000007}.tar"
    remote = list(make_loader(pattern, seed=6, drop_last=False).iter_epoch(0))
    assert same_batches(remote, reference)
    assert "s3 cp s3://b/shard-000003.tar -" in fake_s3.read_text().splitlines()
    missing = "s3://b/nothing-here.tar"
    run = make_loader(["s3://b/shard-000001.tar", missing], num_workers=1, drop_last=False, max_corrupt_fraction=1.0)
    assert sorted(labels_of(run.iter_epoch(0))) == list(range(SHARD, 2 * SHARD))
    reason = run.bad_reasons[missing]
    assert "`aws s3 cp s3://b/nothing-here.tar -` exited with status 1" in reason and "(404)" in reason
    # the command is configurable: environment variable, then constructor argument
    monkeypatch.setenv("VIT_SSL_S3_COMMAND", "aws --endpoint-url http://127.0.0.1:9 s3 cp {url} -")
    assert labels_of(make_loader("s3://b/shard-000002.tar", num_workers=0, shuffle=False).iter_epoch(0)) == list(range(60, 76))
    assert fake_s3.read_text().splitlines()[-1] == "--endpoint-url http://127.0.0.1:9 s3 cp s3://b/shard-000002.tar -"
    absent = make_loader("s3://b/shard-000002.tar", num_workers=0, url_commands={"s3": "no-such-cli cp {url} -"})
    with pytest.raises(RuntimeError, match=r"s3://b/shard-000002.tar .*cannot run `no-such-cli cp s3://b/shard-000002.tar -`"):
        list(absent.iter_epoch(0))


def test_unknown_schemes_and_bad_commands_fail_at_construction():
    with pytest.raises(ValueError, match=r"'foo://x/a.tar': no reader for foo://.*url_commands=\{'foo'"):
        make_loader("foo://x/a.tar", num_workers=0)
    make_loader("foo://x/a.tar", num_workers=0, url_commands={"foo": "fetch {url}"})
    with pytest.raises(ValueError, match=r"url command for s3:// is 'aws s3 cp -' \(url_commands\['s3'\]\), which has no \{url\}"):
        make_loader("s3://b/a.tar", num_workers=0, url_commands={"s3": "aws s3 cp -"})


# --------------------------------------------------------------------------------------------
# the plain-PNG fast path gives Pillow's pixels
# --------------------------------------------------------------------------------------------


def pillow_png(pixels: np.ndarray) -> bytes:
    """A PNG that only Pillow decodes here: written by Pillow, with a text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("note", "not plain")
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


@pytest.mark.parametrize("shape", [(9, 7), (9, 7, 3)])
def test_plain_png_fast_path_matches_pillow(shape):
    rng = np.random.default_rng(sum(shape))
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    plain, other = encode_png(pixels), pillow_png(pixels)
    assert np.array_equal(_png_pixels(plain), pixels) and _png_pixels(other) is None
    for channels in (1, 3):
        for size in (7, 5, 12):  # no resize on the short side, shrink, enlarge
            fast, slow = load_pixels(plain, channels, size), load_pixels(other, channels, size)
            assert fast.shape == slow.shape and np.array_equal(fast, slow), (channels, size)
    square = rng.integers(0, 256, shape[:1] * 2 + shape[2:], dtype=np.uint8)
    for channels in (1, 3):
        assert np.array_equal(load_pixels(encode_png(square), channels, 9), load_pixels(pillow_png(square), channels, 9))
    broken = bytearray(plain)
    broken[45] ^= 0xFF  # inside the compressed data: the CRC no longer matches, so Pillow decides
    assert _png_pixels(bytes(broken)) is None
    assert _png_pixels(plain[:-5]) is None  # truncated


def test_png_with_row_filters_goes_to_pillow():
    """A structurally plain PNG whose rows use the Sub filter is not the fast path's to decode."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 5), dtype=np.uint8)
    sub = np.concatenate([pixels[:, :1], (pixels[:, 1:].astype(int) - pixels[:, :-1]) % 256], axis=1).astype(np.uint8)
    raw = np.concatenate([np.ones((6, 1), np.uint8), sub], axis=1).tobytes()  # filter byte 1 = Sub

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 6, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    assert _png_pixels(png) is None
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), pixels)  # the file is right
    assert np.array_equal(load_pixels(png, 1, 5), load_pixels(encode_png(pixels), 1, 5))
