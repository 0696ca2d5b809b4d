"""Raw-pixel baseline under the recipes' scoring protocol: the normalised 28 x 28 pixels as the
feature, the seeded 20,000-image memory bank, the 10,000 test images; kNN (k = 20, T = 0.07) and
the linear probe.

    python -m bench.pixels
"""
from __future__ import annotations

import torch
from torch import nn

from eval.run import _builtin_data, score_backbone

PREPROCESS = {"image_size": [28, 28], "channels": 1, "mean": [0.286], "std": [0.353]}


class Pixels(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # (B, C*H*W)


def main(train_samples: int = 20000) -> dict[str, float]:
    data = _builtin_data(train_samples, None)
    scores = score_backbone(Pixels(), PREPROCESS, data.load_train(), data.load_test(), knn=True, linear=True,
                            device="cpu")
    for name, value in scores.items():
        print(f"{name:14s} {100 * value:6.2f} %")
    return scores


if __name__ == "__main__":
    main()
