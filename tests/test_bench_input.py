"""bench.input_path: the script runs end to end on real shards and workers and prints its tables;
the classic per-sample transforms make the views the objective asks for; bad options fail in one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import input_path
from data.augment import ViewSpec
from data.shards import read_manifest

ROOT = Path(__file__).resolve().parents[1]


def _rows(text: str, heading: str) -> list[list[str]]:
    """Data rows of the markdown table under the line starting with ``heading``."""
    block = text.split(heading, 1)[1].split("\n### ", 1)[0]
    lines = [line for line in block.splitlines() if line.startswith("| ") and not line.startswith("| views")
             and not line.startswith("| recipe")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_runs_end_to_end_and_prints_tables(tmp_path):
    jpeg_dir, out = tmp_path / "jpeg", tmp_path / "bench.md"
    args = ["--sizes", "28", "40", "--workers", "1", "--views", "mae", "dino", "--recipes", "mae",
            "--batches", "1", "--warmup", "1", "--rounds", "1", "--steps", "1", "--batch-size", "8",
            "--jpeg-images", "32", "--jpeg-shard-size", "8", "--jpeg-dir", str(jpeg_dir), "--out", str(out), "--quiet"]
    proc = subprocess.run([sys.executable, "-m", "bench.input_path", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "`python -m bench.input_path --sizes 28 40" in text  # headed by the exact command
    assert re.search(r"\d+ cores, torch \S+, device cpu", text)
    assert out.read_text() == text.strip("\n") + "\n"

    # the JPEG shards: RGB, at the asked size, four shards of 8, JPEG bytes
    folder = jpeg_dir / "fashion-mnist-rgb40-q90-n32-s8"
    manifest = read_manifest(folder)
    assert (manifest["channels"], manifest["image_size"], len(manifest["shards"])) == (3, [40, 40], 4)
    assert json.dumps(manifest)  # a complete manifest: the folder is reused by the next run
    assert not list(jpeg_dir.glob(".tmp-*"))

    for size, sizes in ((28, {"mae": "1 × 28", "dino": "2 × 28 + 2 × 12"}), (40, {"mae": "1 × 40", "dino": "2 × 40 + 6 × 16"})):
        rows = _rows(text, f"### {size} px")
        assert [(r[0], r[3]) for r in rows] == [("mae", "1"), ("dino", "1")]
        for views, view_sizes, batch, _, ours, classic, ratio in rows:
            assert view_sizes == sizes[views] and batch == "8"
            assert float(ours) > 0 and float(classic) > 0
            assert float(ratio) == pytest.approx(float(ours) / float(classic), rel=0.02)  # cells have 3 figures

    (recipe,) = _rows(text, "### Recipes")
    name, views, batch, train, inp, workers, ratio, goal = recipe
    assert (name, views, batch, workers) == ("mae", "1 × 28", "8", "1")
    assert float(ratio) == pytest.approx(float(inp) / float(train), rel=0.02)
    assert goal == ("ok" if float(ratio) >= 3 else "LIMITS")


def test_classic_views_match_the_objective_views():
    """The per-sample path makes, per sample, each ViewSpec's view `count` times at its size, with
    the channel count of the data (grey input stays grey: no greyscale / saturation / hue steps)."""
    views = (ViewSpec(28, blur_p=1.0, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=1.0, grayscale_p=1.0),
             ViewSpec(12, count=3, solarize_p=1.0))
    case = input_path.InputCase(("unused.tar",), 28, 1, views, (0.5,), (0.25,), 4)
    out = input_path.MultiView(case)(Image.new("L", (28, 28), 200))
    assert [tuple(v.shape) for v in out] == [(1, 28, 28)] + [(1, 12, 12)] * 3
    names = [type(t).__name__ for t in input_path.classic_transform(views[0], 1, (0.5,), (0.25,)).transforms]
    assert "RandomGrayscale" not in names and "PilGaussianBlur" in names
    jitter = input_path.classic_transform(views[0], 1, (0.5,), (0.25,)).transforms[2].transforms[0]
    assert jitter.saturation is None and jitter.hue is None
    # solarize always on: the constant 200 grey (>= 128) becomes 55, normalised (55/255 - 0.5) / 0.25
    assert torch.allclose(out[1], torch.full_like(out[1], (55 / 255 - 0.5) / 0.25), atol=1e-5)
    assert case.describe_views() == "1 × 28 + 3 × 12"


@pytest.mark.parametrize("argv, says", [
    (["--sizes", "20"], "--sizes 20"),
    (["--batches", "0"], "--batches 0"),
    (["--workers", "3", "4"], "--workers 3 4"),
    (["--recipes", "mae,byol"], "byol"),
])
def test_bad_options_fail_in_one_line_naming_the_option(argv, says, capsys):
    with pytest.raises(SystemExit) as exc:
        input_path.main(argv)
    assert exc.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert says in error
