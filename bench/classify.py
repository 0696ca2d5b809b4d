"""Top-1 of a checkpoint's classifier (a supervised or distilled run: backbone + head.safetensors)
on the Fashion-MNIST test split; a distilled student predicts with the mean of its two heads.

    python -m bench.classify RUN_DIR/checkpoints/step-NNNNNN [...]
"""
from __future__ import annotations

import sys

import torch

import backbones
from data.augment import eval_transform
from data.builtin import load_fashion_mnist


@torch.inference_mode()
def top1(checkpoint: str, batch_size: int = 256) -> float:
    model = backbones.load_classifier(checkpoint).eval()
    pre = backbones.load_meta(checkpoint)["preprocess"]
    images, labels = load_fashion_mnist("test")
    correct = 0
    for i in range(0, len(labels), batch_size):
        x = eval_transform(images[i : i + batch_size], size=pre["image_size"][0], mean=pre["mean"], std=pre["std"])
        correct += (model(x).argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(labels)


if __name__ == "__main__":
    for ckpt in sys.argv[1:]:
        print(f"{ckpt}: classifier top-1 {100 * top1(ckpt):.2f} %")
