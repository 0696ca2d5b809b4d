"""Launched by test_eval_distributed.py under `accelerate launch` with 2 processes (gloo): extracts
features with distributed=True and writes what every rank got to OUT/rank{r}.pt."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import backbones  # noqa: E402
from data.stream import ShardLoader  # noqa: E402
from eval.features import cached_features, extract_features, launch_state  # noqa: E402

PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}


def main(out: Path, shards: str) -> None:
    state = launch_state()  # joins the process group (gloo on the CPU)
    torch.manual_seed(0)
    model = backbones.create("vit", image_size=28, patch_size=7, in_chans=1, dim=32, depth=1, heads=2)
    images = torch.randint(0, 256, (37, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ids = torch.arange(37)
    # 37 images in batches of 8: 5 batches, 3 for rank 0 and 2 (the last one short) for rank 1
    feats, labels = extract_features(model, images, ids, PREPROCESS, batch_size=8, distributed=True)
    # shards: every rank reads the stream, each computes every other batch
    loader = ShardLoader(shards, batch_size=16, image_size=28, channels=1, shuffle=False, drop_last=False, num_workers=1)
    s_feats, s_labels = extract_features(model, loader.iter_epoch(0), None, PREPROCESS, distributed=True)
    cached = cached_features(out / "ckpt", "ids", lambda: (feats, labels), distributed=True)
    again = cached_features(out / "ckpt", "ids", lambda: (feats, labels), distributed=True)
    torch.save({"feats": feats, "labels": labels, "s_feats": s_feats, "s_labels": s_labels,
                "world": state.num_processes, "cached_none": cached is None, "again_none": again is None},
               out / f"rank{state.process_index}.pt")
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
