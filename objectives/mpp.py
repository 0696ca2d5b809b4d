"""MPP: masked patch prediction (Dosovitskiy et al., 2020, appendix B.1.2), BERT-style.

Half of the patch embeddings of each image are corrupted: each corrupted one is replaced by a
learned mask token with probability 0.8, by the embedding of a random other patch with
probability 0.1, or kept as it is with probability 0.1; positions are added after the corruption
and the encoder sees the whole sequence. A linear head on each patch token predicts its patch's
mean colour quantised to `bits` bits per channel (2**(bits*C) classes: 512 for RGB, 8 for grey);
the loss is the cross-entropy on the corrupted patches only.

Choices the paper leaves open, made here:
- exactly round(corrupt_ratio * N) patches are corrupted per image, a fresh random set per image;
  the 80 / 10 / 10 split is drawn independently for each corrupted patch (as BERT does), so the
  proportions are exact in expectation rather than rounded per image;
- the "random other patch" is drawn uniformly from all B*N patch embeddings of the batch except
  the patch itself (BERT's random token comes from the whole vocabulary, not the same sentence);
- a colour's class is sum_c q_c * (2**bits)**(C-1-c) with q_c = min(floor(m_c * 2**bits), 2**bits - 1)
  and m_c the patch mean of channel c in [0, 1] (channel 0 is the most significant digit).

The target needs pixels in [0, 1], but the objective receives normalised views. `mean` / `std`
give the normalisation the data stage applied (the trainer's data.mean / data.std or the shards'
manifest); a trainer can also hand it over with `set_normalisation(mean, std)`. With neither, it is
inferred from each batch: per channel, the smallest value is taken as pixel 0 and the largest as
pixel 1 (exact whenever the batch holds a black and a white pixel in every channel, as batches of
Fashion-MNIST or of photographs do: on augmented Fashion-MNIST batches of 32 or more every target
matched the exact one; wrong for e.g. a batch of uniformly grey images).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from backbones import Backbone
from backbones.layers import init_weights, trunc_normal_
from data.augment import ViewSpec

from .base import Objective, register


@register("mpp")
class MPP(Objective):
    requires = ("supports_token_access",)
    reads = "patches"

    def __init__(
        self,
        backbone: Backbone,
        corrupt_ratio: float = 0.5,
        mask_prob: float = 0.8,
        random_prob: float = 0.1,
        bits: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
    ):
        super().__init__(backbone)
        n, c = backbone.num_patches, backbone.in_chans
        self.num_corrupt = int(round(corrupt_ratio * n))
        if not 0.0 < corrupt_ratio <= 1.0 or self.num_corrupt < 1:
            raise ValueError(f"corrupt_ratio={corrupt_ratio} must be in (0, 1] and corrupt at least one of the {n} patches (the paper uses 0.5)")
        if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
            raise ValueError(f"mask_prob={mask_prob} and random_prob={random_prob} must be >= 0 with a sum <= 1 (the paper uses 0.8 and 0.1)")
        if not 1 <= bits <= 8:
            raise ValueError(f"bits={bits} must be an integer from 1 to 8 (the paper uses 3)")
        self.corrupt_ratio, self.mask_prob, self.random_prob, self.bits = corrupt_ratio, mask_prob, random_prob, bits
        self.num_classes = 2 ** (bits * c)
        self.crop_scale, self.hflip = tuple(crop_scale), hflip

        self.register_buffer("pix_mean", torch.zeros(c), persistent=False)
        self.register_buffer("pix_std", torch.ones(c), persistent=False)
        self.normalisation_known = False
        if (mean is None) != (std is None):
            raise ValueError(f"mean={mean} and std={std}: give both or neither")
        if mean is not None:
            self.set_normalisation(mean, std)

        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.head = nn.Linear(backbone.embed_dim, self.num_classes)
        trunc_normal_(self.mask_token, std=0.02)
        self.head.apply(init_weights)

    def set_normalisation(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """The per-channel mean / std the views were normalised with (pixel/255 - mean) / std."""
        c = self.backbone.in_chans
        mean, std = [float(m) for m in mean], [float(s) for s in std]
        if len(mean) == 1:
            mean, std = mean * c, std * c
        if len(mean) != c or len(std) != c or min(std) <= 0:
            raise ValueError(f"mean={mean} / std={std} must give {c} value(s), one per channel, with std > 0")
        self.pix_mean.copy_(torch.tensor(mean))
        self.pix_std.copy_(torch.tensor(std))
        self.normalisation_known = True

    @property
    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.square_view_size(), scale=self.crop_scale, hflip=self.hflip)]

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    # -- the MPP steps --------------------------------------------------------------------
    def corruption_plan(self, B: int, N: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Which of the (B, N) patches are corrupted (`num_corrupt` per sample), and how: the mask
        token (p=0.8), a random other patch of the batch (p=0.1), unchanged (p=0.1)."""
        ranks = torch.rand(B, N, device=device).argsort(dim=1).argsort(dim=1)
        corrupted = ranks < self.num_corrupt  # (B, N)
        u = torch.rand(B, N, device=device)
        to_mask = corrupted & (u < self.mask_prob)
        to_random = corrupted & (u >= self.mask_prob) & (u < self.mask_prob + self.random_prob)
        own = torch.arange(B * N, device=device).view(B, N)
        other = torch.randint(0, max(1, B * N - 1), (B, N), device=device)
        other = other + (other >= own).long()  # uniform over every patch but its own
        other = other.clamp(max=B * N - 1)  # (only matters for a batch of one single patch)
        return {"corrupted": corrupted, "to_mask": to_mask, "to_random": to_random, "other": other}

    def corrupt(self, tokens: torch.Tensor, plan: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply a corruption plan (a fresh one by default) to patch embeddings (B, N, D). Returns
        the corrupted tokens and the (B, N) bool mask of corrupted patches."""
        B, N, D = tokens.shape
        plan = plan or self.corruption_plan(B, N, tokens.device)
        random_tokens = tokens.reshape(B * N, D)[plan["other"]]  # (B, N, D)
        token = self.mask_token.to(tokens.dtype).expand_as(tokens)
        out = torch.where(plan["to_random"].unsqueeze(-1), random_tokens, tokens)
        out = torch.where(plan["to_mask"].unsqueeze(-1), token, out)  # (B, N, D)
        return out, plan["corrupted"]

    def pixels(self, imgs: torch.Tensor) -> torch.Tensor:
        """Normalised views (B, C, ...) back to pixels in [0, 1]."""
        stats = (1, -1) + (1,) * (imgs.ndim - 2)
        if self.normalisation_known:
            x = imgs.float() * self.pix_std.view(stats) + self.pix_mean.view(stats)
        else:
            dims = (0, *range(2, imgs.ndim))
            lo = imgs.float().amin(dim=dims, keepdim=True)  # (1, C, 1, ...): pixel 0
            hi = imgs.float().amax(dim=dims, keepdim=True)  # pixel 1
            x = (imgs.float() - lo) / (hi - lo).clamp_min(1e-6)
        return x.clamp(0.0, 1.0)

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor) -> torch.Tensor:
        """Each patch's mean colour quantised to `bits` bits per channel, as one class (B, N)."""
        levels, c = 2 ** self.bits, self.backbone.in_chans
        patches = rearrange(self.patchify(self.pixels(imgs)), "b n (q c) -> b n q c", c=c)  # (B, N, pixels, C)
        q = (patches.mean(dim=2) * levels).floor().long().clamp(0, levels - 1)  # (B, N, C)
        weights = levels ** torch.arange(c - 1, -1, -1, device=q.device)  # (C,)
        return (q * weights).sum(dim=-1)  # (B, N)

    def forward_encoder(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.backbone
        plan = self.corruption_plan(imgs.shape[0], bb.num_patches, imgs.device)
        hidden = plan["to_mask"] | plan["to_random"]  # their pixels must not reach other tokens either
        x, corrupted = self.corrupt(bb.embed_patches(bb.hide_masked(imgs, hidden.float())), plan)  # (B, N, D), (B, N)
        x = x + bb.pos_embed_for(None)
        return bb.forward_tokens(x)[:, bb.num_prefix_tokens :], corrupted  # (B, N, D)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs = batch["views"][0]  # (B, C, H, W), or the backbone's input_shape
        tokens, corrupted = self.forward_encoder(imgs)
        logits = self.head(tokens[corrupted]).float()  # (M, classes)
        target = self.targets(imgs)[corrupted]  # (M,)
        loss = F.cross_entropy(logits, target)
        accuracy = (logits.detach().argmax(-1) == target).float().mean()
        return {"loss": loss, "accuracy": accuracy}
