"""The objective protocol and registry.

An objective wraps a backbone and turns a batch of augmented views into a loss. The trainer knows
only this interface: `views`, `forward(batch) -> dict`, `on_step`, `parameter_groups`,
`export_backbone`.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn

from backbones import Backbone, CapabilityError
from data.augment import ViewSpec

_REGISTRY: dict[str, type["Objective"]] = {}


def register(name: str) -> Callable:
    def deco(cls: type[Objective]) -> type[Objective]:
        if name in _REGISTRY:
            raise ValueError(f"objective {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_objectives() -> list[str]:
    return sorted(_REGISTRY)


def objective_class(name: str) -> type["Objective"]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; registered objectives are: {', '.join(list_objectives())}")
    return _REGISTRY[name]


def create(name: str, backbone: Backbone, **hparams: Any) -> "Objective":
    """Build a registered objective around `backbone`; unknown hyper-parameters are refused."""
    cls = objective_class(name)
    params = inspect.signature(cls.__init__).parameters
    unknown = [k for k in hparams if k not in params or k in ("self", "backbone")]
    if unknown:
        allowed = ", ".join(p for p in params if p not in ("self", "backbone"))
        raise ValueError(f"objective {name!r} has no option {unknown[0]!r}; its options are: {allowed}")
    return cls(backbone, **hparams)


class Objective(nn.Module):
    name: str = ""
    #: capability flags of the backbone this objective needs (see backbones.base.Backbone)
    requires: tuple[str, ...] = ()
    #: trains on the shards' labels; takes `num_classes` (the trainer fills it from the manifest)
    uses_labels: bool = False
    #: what of the backbone's output the loss reads: "pooled" (the embedding), "tokens" (patch and
    #: prefix tokens, MAE's decoder) or "patches" (patch tokens only, SimMIM, MPP)
    reads: str = "pooled"

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.check_backbone(backbone)
        self.backbone = backbone
        if self.reads != "pooled":
            # the loss cannot reach the backbone's pooling-only (and, reading patches only, its
            # prefix-only) parameters: freeze them at their initialisation rather than leave them
            # without a gradient, which DDP refuses; evaluation and fine-tuning train them
            unread = backbone.pool_only_parameters()
            if self.reads == "patches":
                unread += backbone.prefix_only_parameters()
            for p in unread:
                p.requires_grad_(False)

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        missing = [flag for flag in cls.requires if not getattr(backbone, flag, False)]
        if missing:
            raise CapabilityError(
                f"objective {cls.name!r} needs a backbone with {' and '.join(missing)}, which "
                f"{type(backbone).__name__} does not have; objectives that work with it are: "
                f"{', '.join(o for o in list_objectives() if _REGISTRY[o].serves(backbone)) or 'none yet'}"
            )

    @classmethod
    def serves(cls, backbone: Backbone) -> bool:
        return all(getattr(backbone, flag, False) for flag in cls.requires)

    # -- helpers for objectives that work on pixels and patches -----------------------------
    @property
    def takes_images(self) -> bool:
        """The backbone takes (B, C, H, W) images (not clips or signals): the data stage can make its views."""
        return len(self.backbone.input_shape) == 3

    def square_view_size(self) -> int:
        if not self.takes_images:
            raise ValueError(
                f"the backbone takes input of shape {tuple(self.backbone.input_shape)}, not images: the data stage "
                "makes image views only; call the objective with batch['views'] of that shape yourself"
            )
        h, w = self.backbone.image_size
        if h != w:
            raise ValueError(f"image_size={self.backbone.image_size}: the augmentation makes square views only")
        return h

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.backbone.patchify(imgs)  # (B, N, patch_pixels)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.unpatchify(x)  # (B, C, ...) the input's shape

    def pictures_of(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """For reconstruction pictures (MAE, SimMIM): {"original", "masked", "reconstruction", "mask"},
        each shaped like `images`: the masked patches set to 0 (the normalisation's mean colour), the
        prediction pred (B, N, patch_pixels) pasted into them, and 1 under the masked patches of mask (B, N)."""
        target = self.patchify(images.float())  # (B, N, patch_pixels)
        m = mask.unsqueeze(-1).to(target.dtype)  # (B, N, 1)
        return {
            "original": images.float(),
            "masked": self.unpatchify(target * (1 - m)),
            "reconstruction": self.unpatchify(target * (1 - m) + pred * m),
            "mask": self.unpatchify(m.expand_as(pred).contiguous()),
        }

    @property
    def views(self) -> list[ViewSpec]:
        """What the data stage must deliver (the device augmentation is built from this)."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """batch = {"views": [float (B, C, H, W), ...], "labels": (B,)} -> {"loss": scalar, ...}."""
        raise NotImplementedError

    def set_normalisation(self, mean: list[float], std: list[float]) -> None:
        """The data stage says how the views were normalised (MPP needs raw colours back)."""

    def frozen_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer must leave alone this step: the trainer drops their gradient
        (None, not zero, so AdamW neither moves them nor counts the step in their state)."""
        return []

    def set_total_steps(self, total_steps: int) -> None:
        """Told by the trainer before the first step (fresh or resumed): the run's length, for
        schedules set as a share of it."""

    def on_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step; schedules are pure functions of the global step."""

    def skip_step(self, step: int, total_steps: int) -> None:
        """Called instead of on_step when the trainer skipped optimizer step `step` (a non-finite loss
        or gradient): drop what the forward passes collected for on_step, move no weights."""

    def export_backbone(self) -> Backbone:
        """The weights a user takes away."""
        return self.backbone

    def export_heads(self) -> dict[str, nn.Linear]:
        """The classifier heads on the exported backbone, when the objective trains them: "head" on
        the pooled embedding and, for DeiT, "head_dist" on the distillation token. Saved beside the
        backbone (`head.safetensors`), so a checkpoint classifies and can teach a distillation run."""
        return {}

    def no_weight_decay(self) -> set[str]:
        """Names (as in named_parameters of this module) exempt from weight decay besides norms and biases."""
        return {f"backbone.{n}" for n in self.backbone.no_weight_decay()}

    def parameter_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two AdamW groups: weight decay on weight matrices only; none on norms, biases,
        positions and tokens."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
