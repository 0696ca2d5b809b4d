"""Tests of shard writing tooling (``python -m data.shards write|inspect|verify``).

Real image files and real tar shards in tmp folders, real worker processes, one real subprocess;
read back with tarfile and Pillow. Images are tiny and their pixels encode their index so that
content and labels can be compared sample by sample.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.shards import main, read_manifest, write_shards
from data.sources import parse_size

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def picture(index: int, height: int = 6, width: int = 8, rgb: bool = False) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3): a smooth ramp plus the index in the first pixel."""
    ramp = (np.add.outer(np.arange(height), np.arange(width)) * 7 + 3 * index) % 200
    image = ramp.astype(np.uint8)
    image[0, 0] = index
    return np.stack([image, image // 2, 255 - image], axis=-1) if rgb else image


def save(path: Path, pixels: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def read_back(folder: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} over every shard the manifest lists, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    for entry in read_manifest(folder)["shards"]:
        with tarfile.open(folder / entry["file"]) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def pixels_of(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def folder_source(root: Path, per_class: dict[str, int]) -> dict[str, tuple[np.ndarray, str]]:
    """root/<class>/<i>.png; returns {file name: (pixels, class)} in the writer's file order."""
    made, index = {}, 0
    for name, count in sorted(per_class.items()):
        for i in range(count):
            pixels = picture(index)
            save(root / name / f"{i:03d}.png", pixels)
            made[f"{name}/{i:03d}.png"] = (pixels, name)
            index += 1
    return made


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(folder: Path, n_train: int = 30, n_test: int = 10) -> tuple[Path, np.ndarray, np.ndarray]:
    """A tiny Fashion-MNIST-shaped IDX set (as tests/test_data.py builds it); its train arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images, labels = rng.integers(0, 256, (n, 28, 28)), np.arange(n) % 10
        write_idx(folder / f"{stem}-images-idx3-ubyte", images, 0x803)
        write_idx(folder / f"{stem}-labels-idx1-ubyte", labels, 0x801)
        arrays[stem] = (images.astype(np.uint8), labels)
    return folder, *arrays["train"]


# --------------------------------------------------------------------------------------------
# sources: round trips
# --------------------------------------------------------------------------------------------


def test_folder_round_trip_manifest_bytes_and_checksums(tmp_path, capsys):
    made = folder_source(tmp_path / "src", {"cats": 7, "dogs": 5})
    code, out, _ = cli(capsys, "write", tmp_path / "src", tmp_path / "out", "--shard-size", "5", "--quiet")
    assert code == 0 and "wrote 12 samples in 3 shards" in out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["labelled"] is True and manifest["classes"] == ["cats", "dogs"] and manifest["class_counts"] == [7, 5]
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 2]
    for entry in manifest["shards"]:
        data = (tmp_path / "out" / entry["file"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
    samples = read_back(tmp_path / "out")
    assert list(samples) == [f"sample_{i:08d}" for i in range(12)]  # keys follow the sorted file order
    for (name, (pixels, label)), files in zip(made.items(), samples.values()):
        assert files["png"] == (tmp_path / "src" / name).read_bytes()  # keep: PNG copied as is
        assert np.array_equal(pixels_of(files["png"]), pixels)
        assert manifest["classes"][int(files["cls"])] == label


def test_csv_labelled_with_names_relative_and_absolute_paths(tmp_path, capsys):
    images = [save(tmp_path / "imgs" / f"{i}.png", picture(i, rgb=True)) for i in range(6)]
    names = ["zebra", "ant", "zebra", "moth", "ant", "zebra"]
    rows = [("imgs/" + p.name if i % 2 else str(p), label) for i, (p, label) in enumerate(zip(images, names))]
    with open(tmp_path / "list.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("label", "path"), *[(label, path) for path, label in rows]])  # column order free
    assert cli(capsys, "write", tmp_path / "list.csv", tmp_path / "out", "--quiet")[0] == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["classes"] == ["ant", "moth", "zebra"] and manifest["class_counts"] == [2, 1, 3]
    assert manifest["channels"] == 3 and manifest["image_size"] == [6, 8]
    for i, files in enumerate(read_back(tmp_path / "out").values()):
        assert np.array_equal(pixels_of(files["png"]), picture(i, rgb=True))
        assert manifest["classes"][int(files["cls"])] == names[i]


def test_csv_integer_labels_and_a_classes_file(tmp_path, capsys):
    for i in range(4):
        save(tmp_path / f"{i}.png", picture(i))
    (tmp_path / "ints.csv").write_text("path,label\n0.png,2\n1.png,0\n2.png,2\n3.png,0\n")
    assert cli(capsys, "write", tmp_path / "ints.csv", tmp_path / "a", "--quiet")[0] == 0
    manifest = read_manifest(tmp_path / "a")
    assert manifest["classes"] == ["0", "1", "2"] and manifest["class_counts"] == [2, 0, 2]  # ints used as they are
    (tmp_path / "names.csv").write_text("path,label\n0.png,b\n1.png,b\n2.png,a\n3.png,b\n")
    (tmp_path / "classes.txt").write_text("b\nc\na\n")
    assert cli(capsys, "write", tmp_path / "names.csv", tmp_path / "b", "--classes", tmp_path / "classes.txt", "--quiet")[0] == 0
    manifest = read_manifest(tmp_path / "b")
    assert manifest["classes"] == ["b", "c", "a"] and manifest["class_counts"] == [3, 0, 1]
    assert [files["cls"] for files in read_back(tmp_path / "b").values()] == [b"0", b"0", b"2", b"0"]
    (tmp_path / "other.csv").write_text("path,label\n0.png,zebra\n")
    code, _, err = cli(capsys, "write", tmp_path / "other.csv", tmp_path / "c", "--classes", tmp_path / "classes.txt")
    assert code == 2 and "'zebra' is not in the --classes file" in err


def test_csv_unlabelled_has_no_cls_and_verifies(tmp_path, capsys):
    for i in range(5):
        save(tmp_path / "x" / f"{i}.png", picture(i))
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"x/{i}.png\n" for i in range(5)))
    code, out, _ = cli(capsys, "write", tmp_path / "list.csv", tmp_path / "out", "--shard-size", "2", "--quiet")
    assert code == 0 and "unlabelled" in out
    manifest = read_manifest(tmp_path / "out")
    assert manifest["labelled"] is False and manifest["classes"] == [] and manifest["class_counts"] == []
    samples = read_back(tmp_path / "out")
    assert [set(files) for files in samples.values()] == [{"png"}] * 5
    assert all(np.array_equal(pixels_of(f["png"]), picture(i)) for i, f in enumerate(samples.values()))
    code, out, _ = cli(capsys, "verify", tmp_path / "out")
    assert code == 0 and "5 samples read, 0 problem(s)" in out
    code, out, _ = cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "classes: none (unlabelled)" in out


def test_flat_folder_and_empty_label_column_are_unlabelled(tmp_path, capsys):
    for i in range(3):
        save(tmp_path / "flat" / f"{i}.png", picture(i))
    assert cli(capsys, "write", tmp_path / "flat", tmp_path / "a", "--quiet")[0] == 0
    assert read_manifest(tmp_path / "a")["labelled"] is False
    assert [set(f) for f in read_back(tmp_path / "a").values()] == [{"png"}] * 3
    (tmp_path / "flat" / "list.csv").write_text("path,label\n0.png,\n1.png,\n")
    assert cli(capsys, "write", tmp_path / "flat" / "list.csv", tmp_path / "b", "--quiet")[0] == 0
    assert read_manifest(tmp_path / "b")["classes"] == [] and read_manifest(tmp_path / "b")["num_samples"] == 2
    (tmp_path / "flat" / "half.csv").write_text("path,label\n0.png,cat\n1.png,\n")
    code, _, err = cli(capsys, "write", tmp_path / "flat" / "half.csv", tmp_path / "c")
    assert code == 2 and "half.csv line 3: no label, but other rows have one" in err


def test_jsonl_list_labels_and_label_errors(tmp_path, capsys):
    for i in range(4):
        save(tmp_path / f"{i}.jpg", picture(i, rgb=True), "JPEG")
    lines = [{"path": f"{i}.jpg", "label": ["dog", "cat"][i % 2]} for i in range(4)]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert cli(capsys, "write", tmp_path / "list.jsonl", tmp_path / "out", "--quiet")[0] == 0
    manifest = read_manifest(tmp_path / "out")
    assert manifest["classes"] == ["cat", "dog"] and manifest["class_counts"] == [2, 2]
    for i, files in enumerate(read_back(tmp_path / "out").values()):
        assert files["jpg"] == (tmp_path / f"{i}.jpg").read_bytes() and files["cls"] == str(1 - i % 2).encode()
    (tmp_path / "mixed.jsonl").write_text('{"path": "0.jpg", "label": 3}\n{"path": "1.jpg", "label": "cat"}\n')
    code, _, err = cli(capsys, "write", tmp_path / "mixed.jsonl", tmp_path / "m")
    assert code == 2 and "mixed.jsonl line 1" in err and "integers throughout" in err
    (tmp_path / "partial.jsonl").write_text('{"path": "0.jpg", "label": "cat"}\n{"path": "1.jpg"}\n')
    code, _, err = cli(capsys, "write", tmp_path / "partial.jsonl", tmp_path / "p")
    assert code == 2 and "partial.jsonl line 2: no label" in err


def test_builtin_from_fake_idx_files_and_its_holdout(tmp_path, capsys):
    root, images, labels = fake_fashion_mnist(tmp_path / "fm")
    code, out, _ = cli(capsys, "write", "fashion-mnist", tmp_path / "out", "--fashion-mnist-dir", root,
                       "--shard-size", "8", "--quiet")
    assert code == 0 and "wrote 30 samples in 4 shards" in out and "wrote 10 samples in 2 shards" in out
    samples = read_back(tmp_path / "out" / "train")
    assert list(samples) == [f"train_{i:08d}" for i in range(30)]
    for i, files in enumerate(samples.values()):
        assert np.array_equal(pixels_of(files["png"]), images[i]) and int(files["cls"]) == labels[i]
    assert cli(capsys, "write", "fashion-mnist", tmp_path / "h", "--fashion-mnist-dir", root,
               "--holdout", "0.2", "--quiet")[0] == 0
    sizes = {split: read_manifest(tmp_path / "h" / split)["num_samples"] for split in ("train", "val", "test")}
    assert sizes == {"train": 20, "val": 10, "test": 10}  # 3 per class, round(0.6) = 1 held out per class
    assert read_manifest(tmp_path / "h" / "val")["class_counts"] == [1] * 10


# --------------------------------------------------------------------------------------------
# inspect and verify
# --------------------------------------------------------------------------------------------


def test_inspect_detects_a_modified_and_a_missing_shard(tmp_path, capsys):
    folder_source(tmp_path / "src", {"a": 6, "b": 6})
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "out", "--shard-size", "3", "--quiet")[0] == 0
    code, out, err = cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and err == "" and "shard-000001.tar  3" in out and "checked: sha256" in out
    shard = tmp_path / "out" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, one byte of image data changed
    shard.write_bytes(bytes(data))
    (tmp_path / "out" / "shard-000003.tar").unlink()
    code, out, err = cli(capsys, "inspect", tmp_path / "out")
    assert code == 1 and err.count("\n") == 1
    assert "shard-000001.tar (sha256 differs" in err and "shard-000003.tar (missing)" in err
    assert "shard-000000.tar" not in err and "shard-000002.tar" not in err
    (tmp_path / "out" / "shard-000002.tar").write_bytes(b"short")
    assert "shard-000002.tar (size 5 bytes" in cli(capsys, "inspect", tmp_path / "out")[2]


def test_inspect_reads_an_old_manifest_without_checksums(tmp_path, capsys):
    folder_source(tmp_path / "src", {"a": 4})
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "out", "--shard-size", "2", "--quiet")[0] == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    for key in ("labelled", "shard_bytes", "encode", "quality", "resize", "skipped"):
        del manifest[key]
    manifest["shards"] = [{"file": s["file"], "count": s["count"]} for s in manifest["shards"]]
    (tmp_path / "out" / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path / "out")["labelled"] is True  # filled in from the classes
    code, out, _ = cli(capsys, "inspect", tmp_path / "out")
    assert code == 0 and "presence only" in out
    (tmp_path / "out" / "shard-000001.tar").unlink()
    code, _, err = cli(capsys, "inspect", tmp_path / "out")
    assert code == 1 and "shard-000001.tar (missing)" in err


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_verify_lists_a_corrupt_image_a_missing_label_a_bad_label_and_truncated_tars(tmp_path, capsys):
    folder_source(tmp_path / "src", {"a": 8, "b": 8})
    out = tmp_path / "out"
    assert cli(capsys, "write", tmp_path / "src", out, "--shard-size", "4", "--quiet")[0] == 0
    png = read_back(out)["sample_00000000"]["png"]
    _tar(out / "shard-000001.tar", [
        ("sample_00000004.png", b"\x89PNG\r\n\x1a\n but no image"), ("sample_00000004.cls", b"0"),
        ("sample_00000005.png", png),
        ("sample_00000006.png", png), ("sample_00000006.cls", b"7"),
        ("sample_00000007.png", png), ("sample_00000007.cls", b"1"),
    ])
    data = (out / "shard-000002.tar").read_bytes()
    (out / "shard-000002.tar").write_bytes(data[: len(data) // 2])  # cut inside a member
    data = (out / "shard-000003.tar").read_bytes()
    (out / "shard-000003.tar").write_bytes(data[:-1024])  # every member whole, the end marker cut off
    for workers in ("1", "2"):
        code, printed, err = cli(capsys, "verify", out, "--workers", workers)
        assert code == 1 and "error: verify found 6 bad" in err
        assert [line for line in printed.splitlines() if line.startswith("BAD")] == [
            "BAD shard-000001.tar sample_00000004: image does not decode (UnidentifiedImageError: cannot identify image file)",
            "BAD shard-000001.tar sample_00000005: no .cls label, but the manifest says the set is labelled",
            "BAD shard-000001.tar sample_00000006: label '7' is not an integer in 0..1",
            "BAD shard-000002.tar -: truncated or corrupt tar after 2 sample(s) (ReadError: unexpected end of data)",
            "BAD shard-000002.tar -: 2 samples, the manifest lists 4",
            f"BAD shard-000003.tar -: no end-of-archive marker after byte {len(data) - 1024}: the file is cut short or has trailing data",
        ]
        assert "14 samples read, 6 problem(s)" in printed  # 4 + 4 + 2 + 4


# --------------------------------------------------------------------------------------------
# shard limits, workers, resize, encoding
# --------------------------------------------------------------------------------------------


def test_parse_size_units():
    assert parse_size("500MB") == 500_000_000 and parse_size("2G") == 2_000_000_000
    assert parse_size("64KiB") == 65_536 and parse_size("1048576") == 1_048_576 and parse_size("1.5k") == 1500
    for bad in ("12XB", "", "MB", "-3K", "5iB"):
        with pytest.raises(ValueError, match="--shard-bytes"):
            parse_size(bad)


def test_shard_bytes_is_an_upper_bound_and_the_first_limit_wins(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(20):  # noise does not compress: ~600-byte PNGs
        save(tmp_path / "src" / "c" / f"{i:02d}.png", rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "bytes", "--shard-bytes", "4KB", "--quiet")[0] == 0
    manifest = read_manifest(tmp_path / "bytes")
    sizes = [(tmp_path / "bytes" / s["file"]).stat().st_size for s in manifest["shards"]]
    assert len(sizes) >= 4 and max(sizes) <= 4000 and sum(s["count"] for s in manifest["shards"]) == 20
    assert manifest["shard_size"] is None and manifest["shard_bytes"] == 4000
    # each shard is full: the next sample would not have fitted
    member = max(len(f["png"]) for f in read_back(tmp_path / "bytes").values())
    assert all(size + 1024 + member + 1024 > 4000 for size in sizes[:-1])
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "both", "--shard-bytes", "1MB", "--shard-size", "6", "--quiet")[0] == 0
    assert [s["count"] for s in read_manifest(tmp_path / "both")["shards"]] == [6, 6, 6, 2]


def test_two_workers_write_byte_identical_output(tmp_path, capsys):
    folder_source(tmp_path / "src", {"a": 25, "b": 20})
    save(tmp_path / "src" / "a" / "big.png", picture(3, 30, 40, rgb=True))
    (tmp_path / "src" / "b" / "broken.png").write_bytes(b"not a png")
    runs = {}
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}"
        code, printed, _ = cli(capsys, "write", tmp_path / "src", out, "--workers", workers, "--shard-size", "7",
                               "--resize", "5", "--holdout", "0.3", "--quiet")
        assert code == 0 and "broken.png" in printed
        runs[workers] = (files_of(out), printed.replace(str(out), "OUT"))
    assert runs["1"] == runs["2"]
    assert len(runs["1"][0]) > 6


def test_resize_shrinks_the_shorter_side_and_never_upscales(tmp_path, capsys):
    save(tmp_path / "src" / "c" / "tall.png", np.full((20, 12), 90, np.uint8))
    save(tmp_path / "src" / "c" / "wide.jpg", np.full((12, 30, 3), 160, np.uint8), "JPEG")
    small = save(tmp_path / "src" / "c" / "small.png", picture(1, 4, 5))
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "out", "--resize", "6", "--quiet")[0] == 0
    samples = list(read_back(tmp_path / "out").values())  # sorted: small, tall, wide
    assert samples[0]["png"] == small.read_bytes()  # already small: copied, not upscaled
    tall = pixels_of(samples[1]["png"])
    assert tall.shape == (10, 6) and np.all(tall == 90)  # aspect kept, constant stays constant
    wide = pixels_of(samples[2]["jpg"])  # keep: a resized JPEG stays a JPEG
    assert wide.shape == (6, 15, 3) and np.abs(wide.astype(int) - 160).max() <= 3
    assert read_manifest(tmp_path / "out")["image_size"] is None and read_manifest(tmp_path / "out")["resize"] == 6


def smooth(index: int) -> np.ndarray:
    """(32, 32, 3) gradient without edges, which JPEG keeps closely at high quality."""
    ramp = np.add.outer(np.arange(32), np.arange(32)) * 3 + index
    return np.stack([ramp, 255 - ramp, np.full_like(ramp, 128)], axis=-1).astype(np.uint8)


def test_encode_jpeg_and_png_and_quality(tmp_path, capsys):
    for i in range(3):
        save(tmp_path / "src" / "c" / f"{i}.png", smooth(i))
    save(tmp_path / "src" / "c" / "z.jpg", picture(9, 32, 32, rgb=True), "JPEG")
    sizes = {}
    for quality in ("95", "20"):
        out = tmp_path / f"q{quality}"
        assert cli(capsys, "write", tmp_path / "src", out, "--encode", "jpeg", "--quality", quality, "--quiet")[0] == 0
        samples = list(read_back(out).values())
        assert all(set(files) == {"jpg", "cls"} for files in samples)
        sizes[quality] = sum(len(files["jpg"]) for files in samples)
        if quality == "95":
            for i, files in enumerate(samples[:3]):
                assert np.abs(pixels_of(files["jpg"]).astype(int) - smooth(i)).mean() < 2
    assert sizes["20"] < sizes["95"]
    assert cli(capsys, "write", tmp_path / "src", tmp_path / "png", "--encode", "png", "--quiet")[0] == 0
    last = list(read_back(tmp_path / "png").values())[-1]
    assert set(last) == {"png", "cls"}
    assert np.array_equal(pixels_of(last["png"]), pixels_of((tmp_path / "src" / "c" / "z.jpg").read_bytes()))


def test_write_shards_library_call_unlabelled_with_workers(tmp_path):
    samples = [(f"k{i}", picture(i), None) for i in range(10)]
    manifest = write_shards(samples, tmp_path / "out", shard_size=4, classes=[], workers=2)
    assert manifest["labelled"] is False and [s["count"] for s in manifest["shards"]] == [4, 4, 2]
    with pytest.raises(ValueError, match="label 3 but classes is empty"):
        write_shards([("k", picture(0), 3)], tmp_path / "bad", shard_size=2, classes=[])
    with pytest.raises(ValueError, match="'k' has no label"):
        write_shards([("k", picture(0), None)], tmp_path / "bad", shard_size=2, classes=["x"])
    twice = [(f"k{i % 30}", picture(i), None) for i in range(40)]  # the repeat comes after shards were written
    with pytest.raises(ValueError, match="'k0' appears twice"):
        write_shards(twice, tmp_path / "twice", shard_size=8, classes=[], workers=2)
    assert [p.name for p in (tmp_path / "twice").iterdir() if p.name.startswith(".") or p.name == "manifest.json"] == []


# --------------------------------------------------------------------------------------------
# held-out split
# --------------------------------------------------------------------------------------------


def test_holdout_is_stratified_disjoint_and_seeded(tmp_path, capsys):
    folder_source(tmp_path / "src", {"a": 10, "b": 10, "c": 5})

    def split(out: Path, seed: str) -> dict[str, set[str]]:
        assert cli(capsys, "write", tmp_path / "src", out, "--holdout", "0.2", "--seed", seed, "--quiet")[0] == 0
        return {part: set(read_back(out / part)) for part in ("train", "val")}

    first = split(tmp_path / "s0", "0")
    assert read_manifest(tmp_path / "s0" / "val")["class_counts"] == [2, 2, 1]
    assert read_manifest(tmp_path / "s0" / "train")["class_counts"] == [8, 8, 4]
    assert not first["train"] & first["val"] and len(first["train"] | first["val"]) == 25
    assert (tmp_path / "s0" / "val" / "val-000000.tar").is_file()
    assert files_of(tmp_path / "s0") == files_of(tmp_path / "s0") and split(tmp_path / "again", "0") == first
    assert files_of(tmp_path / "s0") == files_of(tmp_path / "again")
    assert split(tmp_path / "s1", "1")["val"] != first["val"]
    lines = "path\n" + "".join(f"src/a/{i:03d}.png\n" for i in range(10)) + "".join(f"src/b/{i:03d}.png\n" for i in range(10))
    (tmp_path / "list.csv").write_text(lines)
    assert cli(capsys, "write", tmp_path / "list.csv", tmp_path / "u", "--holdout", "0.25", "--quiet")[0] == 0
    assert read_manifest(tmp_path / "u" / "val")["num_samples"] == 5 and read_manifest(tmp_path / "u" / "train")["num_samples"] == 15
    code, out, _ = cli(capsys, "verify", tmp_path / "u")  # a folder of shard folders: each is verified
    assert code == 0 and "u/train: 15 samples read" in out and "u/val: 5 samples read" in out


# --------------------------------------------------------------------------------------------
# errors and the real command
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, argv, expected", [
    ("missing", ["write", "{t}/nowhere", "{t}/o"], "SRC {t}/nowhere does not exist"),
    ("missing", ["write", "{t}/nowhere.csv", "{t}/o"], "image folder"),
    ("nopath", ["write", "{t}/nopath.csv", "{t}/o"], "no 'path' column (found: file, label)"),
    ("lost", ["write", "{t}/lost.csv", "{t}/o"], "lost.csv line 3: image 'gone.png' not found"),
    ("ok", ["write", "{t}/ok.csv", "{t}/o", "--shard-bytes", "5XB"], "--shard-bytes '5XB' is not a size"),
    ("ok", ["write", "{t}/ok.csv", "{t}/o", "--holdout", "1.5"], "--holdout 1.5 is outside (0, 1)"),
    ("ok", ["write", "{t}/ok.csv", "{t}/o", "--holdout", "0"], "--holdout 0.0 is outside (0, 1)"),
    ("ok", ["write", "{t}/ok.csv", "{t}/o", "--workers", "0"], "--workers 0 must be at least 1"),
    ("ok", ["write", "{t}/ok.csv", "{t}/o", "--encode", "webp"], "argument --encode: invalid choice: 'webp'"),
    ("ok", ["inspect", "{t}/nothing"], "no manifest.json"),
])
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path, capsys, case, argv, expected):
    save(tmp_path / "a.png", picture(0))
    (tmp_path / "ok.csv").write_text("path\na.png\n")
    (tmp_path / "nopath.csv").write_text("file,label\na.png,x\n")
    (tmp_path / "lost.csv").write_text("path\na.png\ngone.png\n")
    code, _, err = cli(capsys, *[arg.format(t=tmp_path) for arg in argv])
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert expected.format(t=tmp_path) in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_real_command_writes_with_a_progress_bar_and_verifies(tmp_path):
    folder_source(tmp_path / "src", {"a": 6, "b": 6})
    run = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(tmp_path / "src"), str(tmp_path / "out"),
         "--workers", "2", "--shard-size", "5", "--encode", "jpeg"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "wrote 12 samples in 3 shards" in run.stdout and "samples/s" in run.stderr
    check = subprocess.run([sys.executable, "-m", "data.shards", "verify", str(tmp_path / "out")],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "12 samples read, 0 problem(s)" in check.stdout
    quiet = subprocess.run(
        [sys.executable, "-m", "data.shards", "write", str(tmp_path / "src"), str(tmp_path / "q"), "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
