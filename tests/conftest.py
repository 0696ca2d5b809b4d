"""Shared test set-up: the project root on sys.path, a small thread count, tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")


def tiny_vit_kwargs(**over):
    kw = dict(image_size=28, patch_size=7, in_chans=1, dim=32, depth=2, heads=2, mlp_ratio=2.0)
    kw.update(over)
    return kw


@pytest.fixture
def root() -> Path:
    return ROOT
