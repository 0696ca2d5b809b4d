"""Distillation through attention (Touvron et al., 2021, DeiT).

The student has a distillation token beside its class token (a backbone capability: `vit` with
`distill_token=True`): a learned token with its own position that goes through every block and
feeds a second head. The class head learns from the labels, the distillation head from a frozen
teacher:

    loss = (1 - alpha) * CE(class_head, labels) + alpha * distillation term
    soft:  tau^2 * KL(softmax(teacher / tau) || softmax(dist_head / tau)), averaged over the batch
    hard:  CE(dist_head, argmax teacher)              (DeiT's choice: alpha = 0.5, no temperature)

At inference the student's prediction is the mean of its two heads' logits (`predict`, and
`backbones.load_classifier` on a checkpoint, which holds both heads).

Parts: `DistillationHeads` (the two heads; on a backbone without a distillation token both read the
pooled embedding, DeiT's "no distillation token" variant, exported as their average), the
`distillation_loss`, `load_teacher` (one of our checkpoints or exported backbones with a head, or a
timm model with a local weights file), and the `Distill` objective.

The soft term is the paper's per-sample KL averaged over the batch (the reference code divides its
sum by batch x classes instead).

DeiT's data recipe (RandAugment, MixUp / CutMix; the same options as `supervised`, off by default):
with mixing, the student and the teacher both see the mixed images, the class head learns from
the mixed soft targets (soft-target cross-entropy) and the hard distillation target is the
teacher's argmax on the mixed images, as in DeiT's training loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import backbones
from backbones import Backbone
from data.augment import ViewSpec

from .base import Objective, register
from .supervised import augment_view, build_mix, check_num_classes, classification_loss, linear_head, mix_batch

KINDS = ("hard", "soft", "none")

# --------------------------------------------------------------------------- the loss


def distillation_loss(cls_logits: torch.Tensor, dist_logits: torch.Tensor, labels: torch.Tensor,
                      teacher_logits: torch.Tensor, kind: str = "hard", alpha: float = 0.5, tau: float = 1.0,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """DeiT's loss: logits (B, K); labels (B,), or soft targets (B, K) from MixUp / CutMix (label
    smoothing already in them). `kind='none'` is the label loss alone."""
    base = classification_loss(cls_logits, labels, label_smoothing)
    if kind == "none":
        return base
    teacher_logits = teacher_logits.detach().float()
    if kind == "soft":
        log_p_student = F.log_softmax(dist_logits.float() / tau, dim=-1)  # (B, K)
        log_p_teacher = F.log_softmax(teacher_logits / tau, dim=-1)  # (B, K)
        distill = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * tau**2
    else:
        distill = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(dim=-1))
    return (1 - alpha) * base + alpha * distill


# --------------------------------------------------------------------------- the student


class DistillationHeads(nn.Module):
    """The class head and, unless there is no teacher, the distillation head: (class embedding,
    distillation embedding) -> (class logits, distillation logits or None)."""

    def __init__(self, dim: int, num_classes: int, distill: bool):
        super().__init__()
        self.head = linear_head(dim, num_classes)
        self.head_dist = linear_head(dim, num_classes) if distill else None

    def forward(self, cls_emb: torch.Tensor, dist_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        dist = self.head_dist(dist_emb) if self.head_dist is not None else None
        return self.head(cls_emb), dist  # (B, K), (B, K) or None


# --------------------------------------------------------------------------- the teacher


def resolve_checkpoint(path: Path) -> Path:
    """A run folder means its newest checkpoint; the step-0 one (the random init) never teaches."""
    ckpts = path / "checkpoints"
    if ckpts.is_dir() and not (path / backbones.base.META).is_file():
        steps = {int(p.name[5:]): p for p in ckpts.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()}
        if not steps:
            raise FileNotFoundError(f"teacher={str(path)!r}: the run folder has no complete checkpoint yet")
        path = steps[max(steps)]
    if path.name == "step-000000":
        raise ValueError(f"teacher={str(path)!r} is the random initialisation (step 0): wait for the teacher's run "
                         "to write a trained checkpoint")
    return path


def load_teacher(teacher: str, weights: str | None, num_classes: int, in_chans: int) -> tuple[nn.Module, dict]:
    """(frozen model: images -> logits (B, K), its preprocess {image_size, channels, mean, std}; {}
    for a timm teacher, which sees the student's views as they are)."""
    if teacher.startswith("timm:"):
        import timm

        name = teacher[len("timm:"):]
        if not weights:
            raise ValueError(f"teacher={teacher!r} needs teacher_weights=FILE (its trained weights, a local "
                             ".safetensors or .pth file): nothing is downloaded")
        if not Path(weights).is_file():
            raise FileNotFoundError(f"teacher_weights={weights!r} is not a file: give the teacher's local weights file")
        try:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ValueError(f"teacher={teacher!r}: {e}; see timm.list_models()") from None
        try:
            model.load_state_dict(backbones.read_state_dict(weights), strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(
                f"teacher_weights={weights!r} do not fit {name} with num_classes={num_classes} and in_chans={in_chans} "
                f"({' '.join(first[:2])[:300]}): give weights trained on this data's classes and channels"
            ) from None
        return model, {}
    path = Path(teacher)
    if not path.exists():
        raise FileNotFoundError(f"teacher={teacher!r} does not exist: give a checkpoint or run folder of a "
                                "supervised run, an exported backbone with a head, or timm:NAME")
    path = resolve_checkpoint(path)
    model = backbones.load_classifier(path)
    if model.num_classes != num_classes:
        raise ValueError(f"teacher={teacher!r} predicts {model.num_classes} classes but the student has "
                         f"num_classes={num_classes}: use a teacher trained on the same labels")
    channels = model.backbone.in_chans
    if channels != in_chans and not (in_chans == 1 and channels == 3):
        raise ValueError(f"teacher={teacher!r} takes {channels}-channel images but the student's have {in_chans}: "
                         "use a teacher trained on images with as many channels (grey students may have RGB teachers)")
    return model, backbones.load_meta(path).get("preprocess", {})


# --------------------------------------------------------------------------- the objective


@register("distill")
class Distill(Objective):
    uses_labels = True

    def __init__(
        self,
        backbone: Backbone,
        teacher: str | None = None,
        teacher_weights: str | None = None,
        num_classes: int | None = None,
        kind: str = "hard",
        alpha: float = 0.5,
        tau: float = 1.0,
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
        num_classes = check_num_classes(num_classes)
        checks = [
            ("kind", kind, kind in KINDS, f"one of {', '.join(KINDS)}"),
            ("alpha", alpha, 0.0 <= alpha <= 1.0, "in [0, 1]"),
            ("tau", tau, tau > 0, "> 0"),
            ("label_smoothing", label_smoothing, 0.0 <= label_smoothing < 1.0, "in [0, 1)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid; it must be {allowed}")
        if teacher is None and kind != "none":
            raise ValueError("teacher=None: no teacher is set; train one first (accelerate launch pretrain/run.py --objective "
                             "supervised) and pass objective.teacher=ITS_RUN_DIR (or a checkpoint, or timm:NAME "
                             "with objective.teacher_weights=FILE)")
        self.kind, self.alpha, self.tau, self.label_smoothing = kind, alpha, tau, label_smoothing
        self.crop_scale, self.hflip = tuple(crop_scale), hflip
        self.randaugment = dict(randaugment_ops=randaugment_ops, randaugment_magnitude=randaugment_magnitude,
                                randaugment_mstd=randaugment_mstd)
        self.mix = build_mix(num_classes, mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing)
        if self.takes_images:
            self.views  # noqa: B018 -- validate the view settings now
        self.token = bool(getattr(backbone, "has_distill_token", False))
        self.heads = DistillationHeads(backbone.embed_dim, num_classes, distill=kind != "none")
        self.teacher_model: nn.Module | None = None
        self._teacher_pre: dict = {}
        if kind != "none":
            self.teacher_model, self._teacher_pre = load_teacher(teacher, teacher_weights, num_classes, backbone.in_chans)
            self.teacher_model.requires_grad_(False).eval()
        self._norm: tuple[list[float], list[float]] | None = None

    @property
    def views(self) -> list[ViewSpec]:
        return [augment_view(self.square_view_size(), self.crop_scale, self.hflip, self.randaugment)]

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self._norm = (list(mean), list(std))

    def train(self, mode: bool = True) -> "Distill":
        """The teacher always runs in eval mode."""
        super().train(mode)
        if self.teacher_model is not None:
            self.teacher_model.eval()
        return self

    # -- the teacher's view of the batch -----------------------------------------------------
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The student's view in the teacher's preprocessing: its normalisation, channels and size
        (for our checkpoints; a timm teacher gets the view as it is)."""
        pre = self._teacher_pre
        if self._norm is not None and pre.get("mean"):
            (ms, ss), (mt, st) = self._norm, (list(pre["mean"]), list(pre["std"]))
            shape = (1, -1, 1, 1)
            pixels = x * torch.tensor(ss, device=x.device).view(shape) + torch.tensor(ms, device=x.device).view(shape)
            if pre.get("channels", x.shape[1]) != x.shape[1]:  # a grey view for an RGB teacher
                pixels = pixels.expand(-1, pre["channels"], -1, -1)
            x = (pixels - torch.tensor(mt, device=x.device).view(shape)) / torch.tensor(st, device=x.device).view(shape)
        size = pre.get("image_size")
        if size is not None:
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x

    # -- the DeiT step --------------------------------------------------------------------------
    def forward_student(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(class logits, distillation logits or None with kind='none'), each (B, K). With a
        distillation token the class head reads the pooled embedding and the distillation head the
        token's output; without, both read the pooled embedding."""
        bb = self.backbone
        if not self.token:
            e = bb(imgs)  # (B, D)
            return self.heads(e, e)
        tokens = bb.forward_features(imgs)  # (B, P+N, D)
        return self.heads(bb.pool(tokens), bb.distill_embedding(tokens))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs, labels = batch["views"][0], batch["labels"]  # (B, C, H, W), (B,)
        imgs, targets = mix_batch(self.mix, imgs, labels, self.training)  # teacher and student see the mix
        cls_logits, dist_logits = self.forward_student(imgs)  # (B, K), (B, K) or None
        out: dict[str, torch.Tensor] = {}
        teacher_logits = None
        if self.teacher_model is not None:
            with torch.no_grad():
                teacher_logits = self.teacher_model(self.teacher_input(imgs)).float()  # (B, K)
            out["teacher_agreement"] = (dist_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        out["loss"] = distillation_loss(cls_logits, dist_logits, targets, teacher_logits, self.kind, self.alpha,
                                        self.tau, self.label_smoothing)
        out["train_top1"] = (self.combine(cls_logits, dist_logits).argmax(-1) == labels).float().mean()
        return out

    @staticmethod
    def combine(cls_logits: torch.Tensor, dist_logits: torch.Tensor | None) -> torch.Tensor:
        return cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2

    @torch.no_grad()
    def predict(self, imgs: torch.Tensor) -> torch.Tensor:
        """Inference: the mean of the two heads' logits (B, K)."""
        return self.combine(*self.forward_student(imgs))

    def export_heads(self) -> dict[str, nn.Linear]:
        """Both heads with a distillation token; without one, their average (both read the pooled
        embedding, so one linear layer gives the same prediction)."""
        head, head_dist = self.heads.head, self.heads.head_dist
        if head_dist is None:
            return {"head": head}
        if self.token:
            return {"head": head, "head_dist": head_dist}
        merged = nn.Linear(head.in_features, head.out_features)
        with torch.no_grad():
            merged.weight.copy_((head.weight + head_dist.weight) / 2)
            merged.bias.copy_((head.bias + head_dist.bias) / 2)
        return {"head": merged}
