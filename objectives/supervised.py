"""Supervised training: a linear head on the pooled embedding, cross-entropy on the shards' labels.

The baseline every self-supervised score is read against, and the simplest way to get a teacher
for distillation: its checkpoints hold the backbone and the head (`head.safetensors`), which
`--objective distill objective.teacher=CHECKPOINT` loads.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from backbones import Backbone
from backbones.layers import trunc_normal_
from data.augment import ViewSpec

from .base import Objective, register


def check_num_classes(num_classes: int | None) -> int:
    if num_classes is None:
        raise ValueError("num_classes is not set: set objective.num_classes=N (the trainer takes it from the "
                         "shards' manifest when it names the classes)")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    return num_classes


def linear_head(dim: int, num_classes: int) -> nn.Linear:
    """A classifier head initialised small (DeiT / timm: trunc-normal 0.02, zero bias)."""
    head = nn.Linear(dim, num_classes)
    trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


@register("supervised")
class Supervised(Objective):
    uses_labels = True

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int | None = None,
        label_smoothing: float = 0.1,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
    ):
        super().__init__(backbone)
        self.num_classes = check_num_classes(num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        if self.takes_images:
            self.views  # noqa: B018 -- validate the view settings now
        self.head = linear_head(backbone.embed_dim, self.num_classes)

    @property
    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.square_view_size(), scale=self.crop_scale, hflip=self.hflip)]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs, labels = batch["views"][0], batch["labels"]  # (B, C, H, W), (B,)
        logits = self.head(self.backbone(imgs))  # (B, K)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        return {"loss": loss, "train_top1": (logits.argmax(-1) == labels).float().mean()}

    def export_heads(self) -> dict[str, nn.Linear]:
        return {"head": self.head}
