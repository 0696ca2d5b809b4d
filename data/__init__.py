"""vit-ssl data layer: webdataset shards (data.shards), the built-in Fashion-MNIST (data.builtin),
a deterministic, resumable shard loader (data.stream) and Kornia augmentation on the accelerator
(data.augment).

Names are imported lazily (PEP 562), so ``python -m data.shards`` does not pay for Kornia.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FASHION_MNIST_CLASSES": "data.builtin",
    "DatasetNotFoundError": "data.builtin",
    "fashion_mnist_root": "data.builtin",
    "load_fashion_mnist": "data.builtin",
    "builtin_shards": "data.builtin",
    "write_shards": "data.shards",
    "read_manifest": "data.shards",
    "shard_urls": "data.shards",
    "Batch": "data.stream",
    "DataError": "data.stream",
    "ShardLoader": "data.stream",
    "ViewSpec": "data.augment",
    "DeviceAugment": "data.augment",
    "MixUp": "data.augment",
    "RandAugment": "data.augment",
    "eval_transform": "data.augment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
