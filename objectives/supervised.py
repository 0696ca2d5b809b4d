"""Supervised training: a linear head on the pooled embedding, cross-entropy on the shards' labels.

DeiT's data recipe is available and off by default: RandAugment per image in the view
(`randaugment_ops`, `randaugment_magnitude`, `randaugment_mstd`, see data.augment.RandAugment) and
MixUp / CutMix of the normalised batch (`mixup_alpha`, `cutmix_alpha`, `mix_prob`,
`mix_switch_prob`, see data.augment.MixUp), trained with soft-target cross-entropy (the label
smoothing folded into the mixed targets). Mixing happens in training mode only.

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
from data.augment import MixUp, ViewSpec, soft_target_cross_entropy

from .base import Objective, register


def check_num_classes(num_classes: int | None) -> int:
    if num_classes is None:
        raise ValueError("num_classes is not set: set objective.num_classes=N (the trainer takes it from the "
                         "shards' manifest when it names the classes)")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 2")
    return num_classes


def build_mix(num_classes: int, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, mix_switch_prob: float,
              label_smoothing: float) -> MixUp | None:
    """The objective's MixUp / CutMix; None (no mixing) when both alphas are 0, the default."""
    for name, value in (("mix_prob", mix_prob), ("mix_switch_prob", mix_switch_prob)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}={value!r} is invalid; it must be a probability in [0, 1]")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None
    return MixUp(num_classes, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing)


def mix_batch(mix: MixUp | None, imgs: torch.Tensor, labels: torch.Tensor, training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels (B,)) unmixed, or in training with a mix (mixed images, soft targets (B, K))."""
    if mix is None or not training:
        return imgs, labels
    return mix(imgs, labels)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy of logits (B, K) on labels (B,) with label smoothing, or on soft targets (B, K)
    from MixUp / CutMix (which already hold the smoothing)."""
    if targets.ndim == 2:
        return soft_target_cross_entropy(logits, targets)
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def augment_view(size: int, crop_scale: tuple[float, float], hflip: float, randaugment: dict[str, Any]) -> ViewSpec:
    """The one view of a classifier: a random resized crop, a flip and, if asked, RandAugment."""
    return ViewSpec(size=size, scale=crop_scale, hflip=hflip, **randaugment)


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
        randaugment_ops: int = 0,
        randaugment_magnitude: float = 9.0,
        randaugment_mstd: float = 0.5,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
    ):
        super().__init__(backbone)
        self.num_classes = check_num_classes(num_classes)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
        self.label_smoothing = label_smoothing
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        self.randaugment = dict(randaugment_ops=randaugment_ops, randaugment_magnitude=randaugment_magnitude,
                                randaugment_mstd=randaugment_mstd)
        self.mix = build_mix(self.num_classes, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing)
        if self.takes_images:
            self.views  # noqa: B018 -- validate the view settings now
        self.head = linear_head(backbone.embed_dim, self.num_classes)

    @property
    def views(self) -> list[ViewSpec]:
        return [augment_view(self.square_view_size(), self.crop_scale, self.hflip, self.randaugment)]

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs, labels = batch["views"][0], batch["labels"]  # (B, C, H, W), (B,)
        imgs, targets = mix_batch(self.mix, imgs, labels, self.training)  # targets (B,) or soft (B, K)
        logits = self.head(self.backbone(imgs))  # (B, K)
        loss = classification_loss(logits, targets, self.label_smoothing)
        return {"loss": loss, "train_top1": (logits.argmax(-1) == labels).float().mean()}

    def export_heads(self) -> dict[str, nn.Linear]:
        return {"head": self.head}
