"""DINO: self-distillation with no labels (Caron et al., 2021).

A student (the backbone + a projection head) learns to match, on every view, the output of a
teacher (an EMA of the student) on the *other* global views. The teacher's output is centred (an
EMA of its batch mean, reduced over all processes) and sharpened (a low, warmed-up temperature);
centring and sharpening together avoid collapse without negatives or a predictor.

Built from small parts: `DINOHead` (MLP -> L2 norm -> weight-normalised prototypes), `DINOLoss`
(cross-entropy over view pairs + the centre) and the `DINO` objective (multi-crop views, teacher,
schedules). It needs only the backbone's pooled embedding, so it serves any backbone.

Schedules are pure functions of the global step (`teacher_temperature`, `teacher_momentum`); the
step itself is a buffer, saved with the model, so a resumed run carries on where it stopped.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from backbones import Backbone
from backbones.layers import trunc_normal_
from data.augment import ViewSpec

from .base import Objective, register

# --------------------------------------------------------------------------- schedules


def teacher_temperature(step: int, start: float, end: float, warmup_steps: int) -> float:
    """Linear warm-up from `start` (step 0) to `end` (step `warmup_steps`), then constant."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """Cosine from `base` (step 0) to 1 (step `total_steps`): the EMA momentum used after the
    optimizer step with 0-based index `step`."""
    progress = min(max(step, 0), total_steps) / max(1, total_steps)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1) / 2


# --------------------------------------------------------------------------- parts


class DINOHead(nn.Module):
    """MLP (Linear-GELU x (num_layers - 1), then Linear to `bottleneck_dim`) -> L2 normalise ->
    weight-normalised linear layer to `out_dim` prototypes, its norm gain fixed to 1 (the paper's
    `norm_last_layer`): each prototype is a unit vector, so the logits are cosine similarities."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False), dim=0)
        gain = self.last_layer.parametrizations.weight.original0  # (K, 1), the norm of each prototype
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(False)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def prototypes(self) -> nn.Parameter:
        """The trained direction of the prototypes (weight_norm's `v`, (K, bottleneck))."""
        return self.last_layer.parametrizations.weight.original1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (B, K)


class DINOLoss(nn.Module):
    """Cross-entropy H(teacher, student) summed over (teacher view, student view) pairs with
    different views and averaged over those pairs; the teacher's distribution is
    softmax((t - centre) / teacher_temp), the student's log_softmax(s / student_temp).

    The centre is an EMA of the teacher's batch mean: `update_center(sum, count)` takes the sum of
    teacher outputs and their number, reduces both over all processes, then
    centre <- m * centre + (1 - m) * sum / count."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)

    def forward(self, student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], teacher_temp: float) -> torch.Tensor:
        """student: one (B, K) tensor per view, the global views first, in the teacher's order;
        teacher: one (B, K) tensor per global view."""
        log_p = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        q = [F.softmax((t.float() - self.center) / teacher_temp, dim=-1).detach() for t in teacher]
        total, pairs = 0.0, 0
        for iq, q_view in enumerate(q):
            for iv, log_p_view in enumerate(log_p):
                if iv == iq:  # the same view for teacher and student
                    continue
                total = total + torch.sum(-q_view * log_p_view, dim=-1).mean()
                pairs += 1
        if pairs == 0:
            raise ValueError("DINO needs at least two views (a teacher view and a different student view)")
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_sum: torch.Tensor, count: int | torch.Tensor) -> None:
        """teacher_sum: (K,) sum of teacher outputs over `count` rows on this process."""
        stats = torch.cat([teacher_sum.float().reshape(-1), torch.as_tensor([count], dtype=torch.float32,
                                                                           device=teacher_sum.device)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stats)  # sums and counts of every process: one call
        batch_center = (stats[:-1] / stats[-1]).view_as(self.center)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)


def multicrop_forward(backbone: nn.Module, head: nn.Module, views: Sequence[torch.Tensor]) -> torch.Tensor:
    """Head outputs of all views, (V*B, K) in view order. Consecutive views of the same resolution
    go through the backbone as one batch; the head runs once on all embeddings."""
    groups: list[list[torch.Tensor]] = []
    for v in views:
        if groups and groups[-1][0].shape[1:] == v.shape[1:]:
            groups[-1].append(v)
        else:
            groups.append([v])
    emb = torch.cat([backbone(torch.cat(g)) for g in groups])  # (V*B, D)
    return head(emb)  # (V*B, K)


# --------------------------------------------------------------------------- the objective


@register("dino")
class DINO(Objective):
    requires = ()  # only the pooled embedding

    def __init__(
        self,
        backbone: Backbone,
        out_dim: int = 65536,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        num_local: int = 6,
        global_size: int | None = None,
        local_size: int | None = None,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        teacher_temp_start: float = 0.04,
        teacher_temp_warmup_steps: int | None = None,
        center_momentum: float = 0.9,
        momentum_teacher: float = 0.996,
        freeze_last_layer_steps: int = 0,
        hflip: float = 0.5,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0),
    ):
        super().__init__(backbone)
        checks = [
            ("num_local", num_local, isinstance(num_local, int) and num_local >= 0, "an integer >= 0"),
            ("out_dim", out_dim, isinstance(out_dim, int) and out_dim >= 1, "an integer >= 1"),
            ("student_temp", student_temp, student_temp > 0, "> 0"),
            ("teacher_temp", teacher_temp, teacher_temp > 0, "> 0"),
            ("teacher_temp_start", teacher_temp_start, teacher_temp_start > 0, "> 0"),
            ("teacher_temp_warmup_steps", teacher_temp_warmup_steps,
             teacher_temp_warmup_steps is None or teacher_temp_warmup_steps >= 0,
             ">= 0, or None for the first 30 % of the run (the paper's 30 of 100 epochs)"),
            ("center_momentum", center_momentum, 0 <= center_momentum < 1, "in [0, 1)"),
            ("momentum_teacher", momentum_teacher, 0 <= momentum_teacher <= 1, "in [0, 1]"),
            ("freeze_last_layer_steps", freeze_last_layer_steps, freeze_last_layer_steps >= 0, ">= 0"),
            ("blur_p", blur_p, len(blur_p) == 3, "three probabilities: (first global, second global, local)"),
            ("solarize_p", solarize_p, len(solarize_p) == 3, "three probabilities: (first global, second global, local)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={value!r} is invalid; it must be {allowed}")
        self.num_local = num_local
        if self.takes_images:
            self.global_size = int(global_size or self.square_view_size())
            self.local_size = int(local_size or self.global_size)
        elif num_local or global_size or local_size:
            raise ValueError(f"num_local={num_local}, global_size={global_size}, local_size={local_size}: crops of other "
                             f"sizes are for images; a backbone taking input of shape {tuple(backbone.input_shape)} gets "
                             "two views of its own shape (set num_local=0 and leave the sizes unset)")
        else:
            self.global_size = self.local_size = None
        self.teacher_temp_start, self.teacher_temp_end = teacher_temp_start, teacher_temp
        self.teacher_temp_warmup_steps = teacher_temp_warmup_steps  # None: 30 % of the run (set_total_steps)
        self.momentum_teacher = momentum_teacher
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self._aug = dict(hflip=hflip, color_jitter=tuple(color_jitter), color_jitter_p=color_jitter_p,
                         grayscale_p=grayscale_p, blur_sigma=tuple(blur_sigma))
        self._blur_p, self._solarize_p = tuple(blur_p), tuple(solarize_p)
        self._global_scale, self._local_scale = tuple(global_scale), tuple(local_scale)
        if self.takes_images:
            self.views  # noqa: B018 -- validate the view settings now, not when the data starts
            self._check_sizes(backbone)

        self.head = DINOHead(backbone.embed_dim, out_dim, head_hidden_dim, head_bottleneck_dim, head_layers)
        self.criterion = DINOLoss(out_dim, student_temp, center_momentum)
        # the teacher: a copy of the student at the start, then only ever its EMA
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in self.teacher_parameters():
            p.requires_grad_(False)
        # optimizer steps done (saved with the model, so a resumed run knows where its schedules are)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._center_sum: torch.Tensor | None = None  # teacher outputs since the last on_step
        self._center_count = 0
        self._total_steps: int | None = None  # set_total_steps (the warm-up share and the momentum schedule)

    # -- setup ----------------------------------------------------------------------------
    def _check_sizes(self, backbone: Backbone) -> None:
        """A crop size other than the backbone's image_size must run through the backbone: probe it
        once, so that a misfit fails at construction naming the setting."""
        for name, size in (("global_size", self.global_size), ("local_size", self.local_size)):
            if size == backbone.image_size[0] or (name == "local_size" and self.num_local == 0):
                continue
            was_training = backbone.training
            try:
                with torch.no_grad():
                    backbone.eval()(torch.zeros(1, backbone.in_chans, size, size))
            except (ValueError, RuntimeError) as e:
                raise ValueError(
                    f"{name}={size}: the backbone (image_size={backbone.image_size[0]}) does not take "
                    f"{size}-px input ({e}); set {name} to a size it takes ({backbone.image_size[0]}, or on a "
                    "backbone with supports_any_size such as vit any multiple of its patch size)"
                ) from None
            finally:
                backbone.train(was_training)

    @property
    def views(self) -> list[ViewSpec]:
        """Two global views (they differ in blur / solarize probabilities) and `num_local` local ones."""
        g1, g2, loc = zip(self._blur_p, self._solarize_p)
        views = [
            ViewSpec(self.global_size, scale=self._global_scale, blur_p=g1[0], solarize_p=g1[1], **self._aug),
            ViewSpec(self.global_size, scale=self._global_scale, blur_p=g2[0], solarize_p=g2[1], **self._aug),
        ]
        if self.num_local:
            views.append(ViewSpec(self.local_size, scale=self._local_scale, blur_p=loc[0], solarize_p=loc[1],
                                  count=self.num_local, **self._aug))
        return views

    def teacher_parameters(self) -> list[nn.Parameter]:
        return list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters())

    def student_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters()) + list(self.head.parameters())

    def frozen_parameters(self) -> list[nn.Parameter]:
        """The last layer (the prototypes) for the first `freeze_last_layer_steps` steps: the
        trainer drops its gradient, so AdamW skips it entirely, as DINO's `cancel_gradients_last_layer`."""
        return [self.head.prototypes] if int(self.step) < self.freeze_last_layer_steps else []

    def train(self, mode: bool = True) -> "DINO":
        """The teacher always runs in eval mode (no dropout), whatever the student does."""
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self

    # -- schedules --------------------------------------------------------------------------
    def set_total_steps(self, total_steps: int) -> None:
        self._total_steps = total_steps

    def warmup_steps(self) -> int:
        if self.teacher_temp_warmup_steps is not None:
            return self.teacher_temp_warmup_steps
        if self._total_steps is None:
            raise RuntimeError("teacher_temp_warmup_steps=None is 30 % of the run: call set_total_steps(total) first")
        return round(0.3 * self._total_steps)

    def teacher_temp_at(self, step: int) -> float:
        return teacher_temperature(step, self.teacher_temp_start, self.teacher_temp_end, self.warmup_steps())

    def momentum_at(self, step: int, total_steps: int) -> float:
        return teacher_momentum(step, total_steps, self.momentum_teacher)

    # -- the DINO step ------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        views = batch["views"]  # [(B, C, Hg, Wg)] * 2 + [(B, C, Hl, Wl)] * num_local
        n_views = 2 + self.num_local
        if len(views) != n_views:
            raise ValueError(f"DINO expects {n_views} views (2 global + {self.num_local} local), got {len(views)}")
        step = int(self.step)
        temp = self.teacher_temp_at(step)
        with torch.no_grad():
            teacher_out = multicrop_forward(self.teacher_backbone, self.teacher_head, views[:2])  # (2B, K)
        student_out = multicrop_forward(self.backbone, self.head, views)  # (V*B, K)
        loss = self.criterion(student_out.chunk(n_views), teacher_out.chunk(2), temp)
        if self.training:
            self._stash_center(teacher_out)
        momentum = self.momentum_at(step, self._total_steps) if self._total_steps else self.momentum_teacher
        return {"loss": loss, "teacher_temp": torch.tensor(temp), "momentum": torch.tensor(momentum)}

    @torch.no_grad()
    def _stash_center(self, teacher_out: torch.Tensor) -> None:
        """Sum the teacher outputs of every forward until the next on_step (so gradient
        accumulation updates the centre once per optimizer step, from all its micro-batches)."""
        s = teacher_out.detach().float().sum(0)  # (K,)
        self._center_sum = s if self._center_sum is None else self._center_sum + s
        self._center_count += teacher_out.shape[0]

    @torch.no_grad()
    def on_step(self, step: int, total_steps: int) -> None:
        """After optimizer step number `step` (1-based): teacher EMA with the momentum of that
        step, centre update from the teacher outputs of the step, then the step counter."""
        self._total_steps = total_steps
        m = self.momentum_at(step - 1, total_steps)
        teacher, student = self.teacher_parameters(), self.student_parameters()
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [p.detach() for p in student], alpha=1 - m)
        if self._center_sum is not None:
            self.criterion.update_center(self._center_sum, self._center_count)
            self._center_sum, self._center_count = None, 0
        self.step.fill_(step)

    def skip_step(self, step: int, total_steps: int) -> None:
        """A skipped step: no teacher EMA, no centre update from its (possibly non-finite) outputs."""
        self._center_sum, self._center_count = None, 0
        self.step.fill_(step)

    def export_backbone(self) -> Backbone:
        """The teacher's backbone: what DINO evaluates and hands over."""
        return self.teacher_backbone
