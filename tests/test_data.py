"""Tests of the data layer: IDX reader, shard writer, streaming loader, CLI and device augmentation.

Real tar shards in tmp folders, real DataLoader workers, real Kornia; no mocks. Images are tiny
and encode their sample index (label == index) so that order, coverage and content can be checked.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.augment import DeviceAugment, ViewSpec, eval_transform
from data.builtin import (
    FASHION_MNIST_CLASSES,
    DatasetNotFoundError,
    builtin_shards,
    fashion_mnist_root,
    load_fashion_mnist,
)
from data.shards import read_manifest, shard_urls, write_shards
from data.stream import Batch, ShardLoader

REPO = Path(__file__).resolve().parents[1]
N, SHARD, SIZE = 240, 30, 8  # 8 shards of 30 samples, 8x8 grey images


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def index_image(index: int, size: int = SIZE) -> np.ndarray:
    """A (size, size) uint8 image whose first two pixels spell ``index`` (low byte, high byte)."""
    image = np.full((size, size), 128, dtype=np.uint8)
    image[0, 0], image[0, 1] = index % 256, index // 256
    return image


def image_index(images: torch.Tensor) -> torch.Tensor:
    """The index each image of a (B, C, H, W) uint8 batch spells (inverse of index_image)."""
    return images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()


def index_samples(n: int, prefix: str = "s"):
    return [(f"{prefix}_{i:08d}", index_image(i), i) for i in range(n)]


def labels_of(batches) -> list[int]:
    return [int(x) for b in batches for x in b.labels]


def loader(urls, **kw) -> ShardLoader:
    args = dict(batch_size=16, image_size=SIZE, channels=1, num_workers=2, shuffle_buffer=50)
    args.update(kw)
    return ShardLoader(urls, **args)


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool) -> None:
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def fake_fashion_mnist(folder: Path, n_train: int = 40, n_test: int = 20, compress: bool = False) -> Path:
    """A tiny Fashion-MNIST-shaped IDX set (uncompressed by default) for fast tests."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), 0x803, compress)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10, 0x801, compress)
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_shards(index_samples(N), out, shard_size=SHARD, classes=[f"c{i}" for i in range(N)])
    return out


# --------------------------------------------------------------------------------------------
# built-in dataset
# --------------------------------------------------------------------------------------------


def test_fashion_mnist_idx_reader_on_real_files():
    images, labels = load_fashion_mnist("train")
    assert images.shape == (60_000, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60_000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    assert len(FASHION_MNIST_CLASSES) == 10 and FASHION_MNIST_CLASSES[9] == "Ankle boot"
    test_images, test_labels = load_fashion_mnist("test")
    assert test_images.shape == (10_000, 1, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    images[0] = 0  # callers get their own copy: the cache must not change
    assert load_fashion_mnist("train")[0][0].sum() > 0
    with pytest.raises(ValueError, match="'val'.*train.*test"):
        load_fashion_mnist("val")


def test_fashion_mnist_not_found_names_the_fix(tmp_path, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        fashion_mnist_root(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message and "./setup.sh" in message
    assert "VIT_SSL_FASHION_MNIST" in message and "--fashion-mnist-dir" in message
    assert isinstance(info.value, FileNotFoundError)
    monkeypatch.setenv("VIT_SSL_FASHION_MNIST", str(tmp_path / "elsewhere"))
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        fashion_mnist_root()


def test_idx_reader_accepts_uncompressed_and_rejects_bad_files(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm")
    images, labels = load_fashion_mnist("test", root)
    assert images.shape == (20, 1, 28, 28) and labels.tolist() == [i % 10 for i in range(20)]
    bad = fake_fashion_mnist(tmp_path / "bad")
    write_idx(bad / "t10k-images-idx3-ubyte", np.zeros((20, 28, 28)), 0x801, compress=False)  # wrong magic
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("test", bad)
    cut = fake_fashion_mnist(tmp_path / "cut")
    data = (cut / "t10k-labels-idx1-ubyte").read_bytes()
    (cut / "t10k-labels-idx1-ubyte").write_bytes(data[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_fashion_mnist("test", cut)


def test_builtin_shards_convert_once_and_reuse(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm", n_train=45, n_test=20, compress=True)
    dirs = builtin_shards(cache_dir=tmp_path / "cache", shard_size=10, root=root)
    assert set(dirs) == {"train", "test"}
    train = read_manifest(dirs["train"])
    assert train["num_samples"] == 45 and [s["count"] for s in train["shards"]] == [10, 10, 10, 10, 5]
    assert train["classes"] == FASHION_MNIST_CLASSES and train["image_size"] == [28, 28]
    assert read_manifest(dirs["test"])["num_samples"] == 20
    stamp = (dirs["train"] / "manifest.json").stat().st_mtime_ns
    assert builtin_shards(cache_dir=tmp_path / "cache", shard_size=10, root=root) == dirs
    assert (dirs["train"] / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert not [p for p in dirs["train"].parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_builtin_shards_race_loser_uses_the_winners_folder(tmp_path):
    from data.builtin import _convert_split

    root = fake_fashion_mnist(tmp_path / "fm")
    dirs = builtin_shards(cache_dir=tmp_path / "cache", shard_size=10, root=root)
    before = (dirs["test"] / "manifest.json").read_bytes()
    _convert_split("test", dirs["test"], 7, root)  # a second converter finishing after the first one
    assert (dirs["test"] / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in dirs["test"].parent.iterdir()) == ["test", "train"]  # its temp folder is gone


def test_builtin_shards_real_fashion_mnist(tmp_path):
    start = time.perf_counter()
    dirs = builtin_shards(cache_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert dirs == {"train": tmp_path / "fashion-mnist" / "train", "test": tmp_path / "fashion-mnist" / "test"}
    train, test = read_manifest(dirs["train"]), read_manifest(dirs["test"])
    assert len(train["shards"]) == 24 and len(test["shards"]) == 4
    assert train["num_samples"] == 60_000 and train["class_counts"] == [6000] * 10
    assert train["mean"][0] == pytest.approx(0.2860, abs=1e-3) and train["std"][0] == pytest.approx(0.3530, abs=1e-3)
    assert elapsed < 60, f"converting Fashion-MNIST took {elapsed:.1f} s"
    # Read back one shard and compare with the IDX reader: same pixels, same labels.
    batch = next(ShardLoader(dirs["test"], batch_size=2500, image_size=28, channels=1, num_workers=0, shuffle=False).iter_epoch(0))
    images, labels = load_fashion_mnist("test")
    assert torch.equal(batch.images, images[:2500]) and torch.equal(batch.labels, labels[:2500])


# --------------------------------------------------------------------------------------------
# shards: writing, manifest, URLs
# --------------------------------------------------------------------------------------------


def test_write_shards_manifest(shards):
    manifest = read_manifest(shards)
    assert manifest["format"] == 1 and manifest["num_samples"] == N
    assert [s["count"] for s in manifest["shards"]] == [SHARD] * (N // SHARD)
    assert manifest["shards"][0]["file"] == "shard-000000.tar"
    assert manifest["class_counts"] == [1] * N and manifest["image_size"] == [SIZE, SIZE]
    assert manifest["channels"] == 1
    pixels = np.stack([index_image(i) for i in range(N)]).astype(np.float64) / 255
    assert manifest["mean"][0] == pytest.approx(pixels.mean()) and manifest["std"][0] == pytest.approx(pixels.std())
    with tarfile.open(shards / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["s_00000030.png", "s_00000030.cls"] and len(names) == 2 * SHARD
        assert tar.extractfile("s_00000030.cls").read() == b"30"
        assert np.array_equal(np.array(Image.open(tar.extractfile("s_00000030.png"))), index_image(30))


def test_write_shards_rgb_tensors_jpeg_bytes_and_errors(tmp_path):
    rgb = torch.randint(0, 256, (3, 6, 5), dtype=torch.uint8)  # torch: (C, H, W)
    jpeg = io.BytesIO()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(jpeg, format="JPEG")
    samples = [("a", rgb, 0), ("b", jpeg.getvalue(), 1), ("c", np.zeros((6, 5, 3), np.uint8), 1)]
    manifest = write_shards(samples, tmp_path / "rgb", shard_size=10, classes=["x", "y"])
    assert manifest["channels"] == 3 and manifest["image_size"] is None and manifest["class_counts"] == [1, 2]
    with tarfile.open(tmp_path / "rgb" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["a.png", "a.cls", "b.jpg", "b.cls", "c.png", "c.cls"]
        assert tar.extractfile("b.jpg").read() == jpeg.getvalue()  # JPEG copied as is
        decoded = np.array(Image.open(tar.extractfile("a.png")))
    assert np.array_equal(decoded, rgb.permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="'bad'.*decode"):
        write_shards([("bad", b"not an image", 0)], tmp_path / "bad", shard_size=2, classes=["x"])
    with pytest.raises(ValueError, match="label 5"):
        write_shards([("k", index_image(0), 5)], tmp_path / "lbl", shard_size=2, classes=["x"])
    with pytest.raises(ValueError, match="twice"):
        write_shards([("k", index_image(0), 0)] * 2, tmp_path / "dup", shard_size=2, classes=["x"])
    skipped = []
    write_shards([("ok", index_image(0), 0), ("bad", b"junk", 0)], tmp_path / "skip", shard_size=2,
                 classes=["x"], on_error=lambda key, exn: skipped.append(key))
    assert skipped == ["bad"] and read_manifest(tmp_path / "skip")["num_samples"] == 1


def test_shard_urls_forms(shards, tmp_path):
    files = [str(shards / f"shard-{i:06d}.tar") for i in range(N // SHARD)]
    assert shard_urls(shards) == files
    assert shard_urls(str(shards / "shard-{000002..000004}.tar")) == files[2:5]
    assert shard_urls(files[3]) == [files[3]]
    assert shard_urls([files[0], str(shards / "shard-{000006..000007}.tar")]) == [files[0], *files[6:]]
    assert shard_urls("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]
    assert shard_urls("https://host/d-{00..02}.tar") == [f"https://host/d-{i:02d}.tar" for i in range(3)]
    assert shard_urls("s3://bucket/x.tar") == ["s3://bucket/x.tar"]
    no_manifest = tmp_path / "plain"
    no_manifest.mkdir()
    for name in ("b.tar", "a.tar"):
        shutil.copy(files[0], no_manifest / name)
    assert shard_urls(no_manifest) == [str(no_manifest / "a.tar"), str(no_manifest / "b.tar")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shard_urls(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        shard_urls(str(shards / "shard-{000006..000009}.tar"))
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------


def test_loader_every_sample_once_and_seeded_order(shards):
    rng_before = torch.get_rng_state()
    first = loader(shards, drop_last=False, seed=3, batch_size=14)
    epoch0 = list(first.iter_epoch(0))
    assert all(isinstance(b, Batch) and b.images.dtype == torch.uint8 and b.labels.dtype == torch.int64 for b in epoch0)
    assert epoch0[0].images.shape == (14, 1, SIZE, SIZE)
    order0 = labels_of(epoch0)
    assert sorted(order0) == list(range(N))  # every sample exactly once
    assert all(torch.equal(image_index(b.images), b.labels) for b in epoch0)  # image matches its label
    # Each worker ends with a partial batch (120 = 8 x 14 + 8); they are merged: one partial left.
    assert [len(b.labels) for b in epoch0].count(14) == N // 14 and len(epoch0) == N // 14 + 1
    order1 = labels_of(first.iter_epoch(1))
    assert sorted(order1) == list(range(N)) and order1 != order0
    assert labels_of(loader(shards, drop_last=False, seed=3, batch_size=14).iter_epoch(0)) == order0  # pure function
    assert labels_of(loader(shards, drop_last=False, seed=4, batch_size=14).iter_epoch(0)) != order0
    dropped = labels_of(loader(shards, seed=3, batch_size=14).iter_epoch(0))
    assert len(dropped) == (N // 14) * 14 and len(set(dropped)) == len(dropped)
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched


def test_loader_converts_channels_and_resizes(shards):
    batch = next(loader(shards, channels=3, image_size=12, num_workers=0).iter_epoch(0))
    assert batch.images.shape == (16, 3, 12, 12)
    assert torch.equal(batch.images[:, 0], batch.images[:, 1])  # grey -> RGB repeats the channel


def test_two_ranks_are_disjoint_and_complete(shards):
    ranks = [labels_of(loader(shards, rank=r, world_size=2, drop_last=False).iter_epoch(5)) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(N))


def test_too_few_shards_for_ranks_and_workers_fail_at_construction(shards):
    files = shard_urls(shards)[:3]
    with pytest.raises(ValueError, match=r"3 shards for 2 ranks x 2 workers: need >= 4.*data.num_workers=1.*resampled"):
        loader(files, rank=1, world_size=2, num_workers=2)
    small = loader(files, rank=1, world_size=2, num_workers=1, drop_last=False)  # the fix the message names
    got = sorted(labels_of(small.iter_epoch(0)))
    assert len(got) == SHARD and got == list(range(got[0], got[0] + SHARD))  # exactly one whole shard
    with pytest.raises(ValueError, match=r"3 shard\(s\) for world_size=4.*--shard-size"):
        loader(files, world_size=4)
    with pytest.raises(ValueError, match="channels=2"):
        loader(files, channels=2)


def corrupt_shards(folder: Path, good: Path) -> list[str]:
    """Two intact shards, a shard cut in half, and a shard with a garbage image and a missing label."""
    folder.mkdir()
    for i in range(2):
        shutil.copy(good / f"shard-{i:06d}.tar", folder / f"ok-{i}.tar")
    data = (good / "shard-000002.tar").read_bytes()
    (folder / "cut.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(folder / "bad.tar", "w") as tar:
        for key, files in (
            ("b_1", {"png": b"garbage bytes", "cls": b"1"}),
            ("b_2", {"png": _png(index_image(300))}),  # no .cls
            ("b_3", {"png": _png(index_image(301)), "cls": b"301"}),
        ):
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return [str(folder / name) for name in ("ok-0.tar", "ok-1.tar", "cut.tar", "bad.tar")]


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_corrupt_samples_and_truncated_shard_are_skipped_and_counted(shards, tmp_path):
    urls = corrupt_shards(tmp_path / "corrupt", shards)
    run = loader(urls, drop_last=False, shuffle=False)
    start = time.perf_counter()
    batches = list(run.iter_epoch(0))
    assert time.perf_counter() - start < 20  # never sleeps per error
    labels = labels_of(batches)
    assert set(range(60)) <= set(labels) and 301 in labels  # intact shards and the good sample survive
    assert 0 < len([x for x in labels if 60 <= x < 90]) < SHARD  # the first part of the cut shard
    assert run.skipped == 3 == sum(b.skipped for b in batches)  # garbage image, missing .cls, truncation
    strict = loader(urls, drop_last=False, shuffle=False, max_corrupt_fraction=0.001, min_samples_for_check=10)
    with pytest.raises(RuntimeError, match=r"(bad|cut)\.tar.*max_corrupt_fraction"):
        list(strict.iter_epoch(0))


def test_resume_gives_identical_batches_across_epoch_boundary(shards):
    rng_before = torch.get_rng_state()
    reference = loader(shards, seed=7)
    stream = iter(reference)
    expected = [next(stream) for _ in range(19)]  # 15 batches per epoch: crosses into epoch 1
    assert reference.state_dict() == {"epoch": 1, "batch": 4}
    del stream
    for stop in (5, 13, 15):
        first = loader(shards, seed=7)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = first.state_dict()
        assert state == ({"epoch": 1, "batch": 0} if stop == 15 else {"epoch": 0, "batch": stop})
        resumed = loader(shards, seed=7)
        resumed.load_state_dict(json.loads(json.dumps(state)))
        again = iter(resumed)
        for want in expected[stop : stop + 4]:
            got = next(again)
            assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_iter_epoch_skip_matches_tail(shards):
    full = list(loader(shards, seed=1).iter_epoch(2))
    tail = list(loader(shards, seed=1).iter_epoch(2, skip=10))
    assert len(tail) == len(full) - 10
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(tail, full[10:]))


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_writes_and_inspects_an_image_folder(tmp_path):
    src = tmp_path / "images"
    for label, name in enumerate(("cats", "dogs")):
        (src / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 12), 40 * i + label, np.uint8)).save(src / name / f"{i}.png")
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(src / "dogs" / "x.jpg")
    (src / "dogs" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(src), str(out), "--shard-size", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "broken.png" in run.stdout and "wrote 7 samples in 3 shards" in run.stdout
    manifest = read_manifest(out)
    assert manifest["classes"] == ["cats", "dogs"] and manifest["class_counts"] == [3, 4]
    assert manifest["channels"] == 3 and manifest["image_size"] == [10, 12]
    with tarfile.open(out / "shard-000002.tar") as tar:
        assert any(name.endswith(".jpg") for name in tar.getnames())
    shown = subprocess.run([sys.executable, "-m", "data.shards", "inspect", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "7 samples" in shown.stdout and "dogs" in shown.stdout
    assert "shard-000001.tar  3" in shown.stdout


def test_cli_writes_builtin_split_from_a_named_folder(tmp_path):
    root = fake_fashion_mnist(tmp_path / "fm")
    run = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", "fashion-mnist", str(tmp_path / "out"),
         "--fashion-mnist-dir", str(root), "--shard-size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert read_manifest(tmp_path / "out" / "train")["num_samples"] == 40
    assert shard_urls(tmp_path / "out" / "test")[0].endswith("test-000000.tar")
    missing = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", "fashion-mnist", str(tmp_path / "o2"),
         "--fashion-mnist-dir", str(tmp_path / "empty")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert missing.returncode == 2 and "apt-get install dataset-fashion-mnist" in missing.stderr


# --------------------------------------------------------------------------------------------
# device augmentation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_device_augment_shapes_and_dtypes(channels):
    stats = [0.5] * channels
    augment = DeviceAugment([ViewSpec(16), ViewSpec(8, scale=(0.05, 0.4), count=3)], stats, stats)
    views = augment(torch.randint(0, 256, (5, channels, 20, 20), dtype=torch.uint8))
    assert [tuple(v.shape) for v in views] == [(5, channels, 16, 16)] + [(5, channels, 8, 8)] * 3
    assert all(v.dtype == torch.float32 for v in views)


def test_device_augment_per_sample_and_reproducible():
    augment = DeviceAugment([ViewSpec(12, scale=(0.1, 0.5))], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    image = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
    twins = image.repeat(2, 1, 1, 1)
    (view,) = augment(twins)
    assert not torch.equal(view[0], view[1])  # each image its own crop/flip
    torch.manual_seed(11)
    first = augment(twins)[0]
    torch.manual_seed(11)
    assert torch.equal(augment(twins)[0], first)


def test_device_augment_normalises_and_checks_channels():
    augment = DeviceAugment([ViewSpec(10, scale=(1.0, 1.0), hflip=0.0)], [0.2, 0.4, 0.6], [0.5, 0.25, 0.1])
    constant = torch.full((2, 3, 14, 14), 51, dtype=torch.uint8)
    (view,) = augment(constant)
    want = (torch.tensor([51 / 255] * 3) - torch.tensor([0.2, 0.4, 0.6])) / torch.tensor([0.5, 0.25, 0.1])
    assert torch.allclose(view, want.view(1, 3, 1, 1).expand_as(view), atol=1e-5)
    with pytest.raises(ValueError, match=r"C=1.*mean=\[0.2, 0.4, 0.6\]"):
        augment(torch.zeros((2, 1, 14, 14), dtype=torch.uint8))
    with pytest.raises(ValueError, match="count=0"):
        ViewSpec(10, count=0)


def test_eval_transform_is_deterministic():
    images = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    out = eval_transform(images, 32, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    assert out.shape == (2, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))
    same = eval_transform(images, 28, [0.0], [1.0])
    assert same.shape == (2, 1, 28, 28) and torch.equal(same, torch.ones_like(same))
