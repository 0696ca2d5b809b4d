"""SimMIM: a simple framework for masked image modeling (Xie et al., 2021).

Random blocks of patches are masked; a learned mask token replaces their embeddings at the encoder
input (before positions are added) and the encoder sees the whole sequence. One linear layer per
patch token predicts the raw pixels of its patch (the paper's 1x1 convolution + pixel shuffle), and
the loss is the L1 distance on the masked pixels only, averaged once over them.

Mask geometry. The paper masks 32 x 32 px blocks of a 224 px image, i.e. a 7 x 7 grid of mask
blocks. `mask_patch_size=None` keeps that geometry at any resolution: it takes the multiple of the
patch size that divides the image and is closest to image_size / 7 (ties: the smaller). At 224 px
with 16 or 4 px patches that is 32 px; at 28 px with 4 px patches it is 4 px, one patch per block,
which again makes 7 x 7 = 49 blocks of which ceil(0.6 * 49) = 30 are masked (the reference code
rounds up). A single-patch block is vit-pytorch's shortcut, not the paper's 2 x 2-patch blocks of a
ViT: the built-in recipe therefore loads the 28-px images at 32 px and masks 8-px blocks (a 4 x 4
grid of blocks of 2 x 2 patches).
"""
from __future__ import annotations

from typing import Any

import math

import torch
from einops import repeat
from torch import nn

from backbones import Backbone
from backbones.layers import init_weights, trunc_normal_
from data.augment import ViewSpec

from .base import Objective, register


def auto_mask_patch_size(image_size: tuple[int, int], patch_size: int) -> int:
    """The multiple of `patch_size` dividing both image sides closest to min(image_size) / 7
    (the paper's 32 px at 224 px); ties go to the smaller block."""
    h, w = image_size
    candidates = [m for m in range(patch_size, min(h, w) + 1, patch_size) if h % m == 0 and w % m == 0]
    target = min(h, w) / 7
    return min(candidates, key=lambda m: (abs(m - target), m))


@register("simmim")
class SimMIM(Objective):
    requires = ("supports_mask_token",)
    reads = "patches"

    def __init__(
        self,
        backbone: Backbone,
        mask_ratio: float = 0.6,
        mask_patch_size: int | None = None,
        crop_scale: tuple[float, float] = (0.67, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        super().__init__(backbone)
        if len(backbone.grid_size) == 2:
            p, (h, w) = backbone.patch_size, backbone.image_size
            if mask_patch_size is None:
                mask_patch_size = auto_mask_patch_size((h, w), p)
            if mask_patch_size < p or mask_patch_size % p or h % mask_patch_size or w % mask_patch_size:
                raise ValueError(
                    f"mask_patch_size={mask_patch_size} must be a multiple of the patch size {p} that divides the "
                    f"image size {h}x{w}; allowed: "
                    f"{[m for m in range(p, min(h, w) + 1, p) if h % m == 0 and w % m == 0]}"
                )
            self.block_grid = (h // mask_patch_size, w // mask_patch_size)
            self.block_side = mask_patch_size // p  # patches per block side
        else:  # clips and signals: every token is its own mask block
            if mask_patch_size is not None:
                raise ValueError(f"mask_patch_size={mask_patch_size}: blocks are for 2-D images; leave it unset for a "
                                 f"{len(backbone.grid_size)}-D token grid (each token is masked on its own)")
            self.block_grid, self.block_side = tuple(backbone.grid_size), 1
        self.mask_patch_size = mask_patch_size
        n_blocks = math.prod(self.block_grid)
        self.num_masked = math.ceil(mask_ratio * n_blocks - 1e-9)  # the reference code's ceil
        if not 0.0 < mask_ratio < 1.0 or not 0 < self.num_masked < n_blocks:
            raise ValueError(
                f"mask_ratio={mask_ratio} must be strictly between 0 and 1 and mask between 1 and "
                f"{n_blocks - 1} of the {n_blocks} mask blocks (SimMIM uses 0.6)"
            )
        self.mask_ratio = mask_ratio
        self.crop_scale, self.crop_ratio, self.hflip = tuple(crop_scale), tuple(crop_ratio), hflip

        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.mask_token_dim))
        self.head = nn.Linear(backbone.embed_dim, backbone.patch_pixels)
        trunc_normal_(self.mask_token, std=0.02)
        self.head.apply(init_weights)

    @property
    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.square_view_size(), scale=self.crop_scale, ratio=self.crop_ratio, hflip=self.hflip)]

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    # -- the SimMIM steps -----------------------------------------------------------------
    def random_block_mask(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """Each sample masks its own `num_masked` random mask blocks, upsampled to the patch grid.
        Returns (B, N) float, 1 = masked, in patch order. `generator` (pictures): the draw from it."""
        n_blocks, s = math.prod(self.block_grid), self.block_side
        if generator is None:
            noise = torch.rand(batch, n_blocks, device=device)
        else:
            noise = torch.rand(batch, n_blocks, device=generator.device, generator=generator).to(device)
        ranks = noise.argsort(dim=1).argsort(dim=1)  # (B, blocks)
        blocks = (ranks < self.num_masked).float()  # (B, blocks)
        if len(self.block_grid) != 2:
            return blocks  # (B, N): one token per block
        bh, bw = self.block_grid
        return repeat(blocks.view(batch, bh, bw), "b h w -> b (h s1 w s2)", s1=s, s2=s)  # (B, N)

    def forward_encoder(self, imgs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mask tokens in place of the masked patch embeddings (before positions; at the first
        stage's input for hierarchical backbones), then the encoder over everything. Returns the
        patch tokens after the final norm (B, N, D)."""
        return self.backbone.forward_masked(imgs, mask, self.mask_token)  # (B, N, D)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """L1 over the masked patches' pixel values, divided once by how many there are."""
        target = self.patchify(imgs)  # (B, N, patch_pixels)
        per_patch = (pred.float() - target).abs().sum(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / (mask.sum() * target.shape[-1])

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs = batch["views"][0]  # (B, C, H, W)
        mask = self.random_block_mask(imgs.shape[0], imgs.device)  # (B, N)
        pred = self.head(self.forward_encoder(imgs, mask))  # (B, N, patch_pixels)
        return {"loss": self.forward_loss(imgs, pred, mask)}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mask image) in the input's pixel space, for pictures."""
        mask = self.random_block_mask(imgs.shape[0], imgs.device)
        pred = self.head(self.forward_encoder(imgs, mask)).float()  # (B, N, p*p*C)
        return self.unpatchify(pred), self.unpatchify(mask.unsqueeze(-1).expand_as(pred))

    @torch.no_grad()
    def reconstruct_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """For pictures: {"original", "masked", "reconstruction", "mask"}, each shaped like `images`
        and in the input's space (the normalised space the model sees). "masked": the masked
        patches set to 0 (the normalisation's mean colour); "reconstruction": the head's prediction
        pasted into the masked patches, the visible ones original; "mask": 1 under masked patches.
        `generator` draws the mask blocks. Call in eval mode."""
        mask = self.random_block_mask(images.shape[0], images.device, generator)  # (B, N), 1 = masked
        pred = self.head(self.forward_encoder(images, mask)).float()  # (B, N, patch_pixels)
        return self.pictures_of(images, pred, mask)
