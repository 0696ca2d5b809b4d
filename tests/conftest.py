"""Shared test set-up: the project root on sys.path, a small thread count, tiny configs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "2")

import backbones  # noqa: E402  (after the path is set)


def tiny_vit_kwargs(**over):
    kw = dict(image_size=28, patch_size=7, in_chans=1, dim=32, depth=2, heads=2, mlp_ratio=2.0)
    kw.update(over)
    return kw


@pytest.fixture
def root() -> Path:
    return ROOT



class PooledOnlyBackbone(backbones.Backbone):
    """A backbone that offers only a pooled embedding (like a CNN or a hierarchical model), so it
    has no token-level capability."""

    embed_dim, patch_size, in_chans, image_size = 8, 4, 1, (28, 28)

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(28 * 28, 8)

    def forward(self, x):
        return self.net(x.flatten(1))
