"""MAE: masked autoencoders (He et al., 2021).

The encoder (the backbone) sees only the visible patches; a light decoder with its own fixed
positions and a learned mask token reconstructs the pixels of the masked ones; the loss is the
mean squared error on masked patches only, optionally against per-patch normalised pixels.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from backbones import Backbone
from backbones.layers import gather_tokens, init_weights, sincos_padded, transformer
from data.augment import ViewSpec

from .base import Objective, register


def _check_decoder(dim: int, depth: int, heads: int, mlp_ratio: float, rank: int) -> None:
    """The decoder's sizes, named as the objective's options (the shared blocks would say dim / heads)."""
    for name, value in (("decoder_dim", dim), ("decoder_depth", depth), ("decoder_heads", heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an integer >= 1 (MAE's small decoder: 512 wide, 8 deep, 16 heads)")
    if dim % heads:
        raise ValueError(f"decoder_heads={heads} must divide decoder_dim={dim}: pick decoder_heads from the divisors of "
                         f"{dim}, e.g. {max(h for h in range(1, min(dim, 16) + 1) if dim % h == 0)}")
    if dim < 2 * rank:
        raise ValueError(f"decoder_dim={dim} is too small for the decoder's {rank}-D sin-cos positions: use "
                         f"decoder_dim >= {2 * rank}, e.g. 128")
    if not mlp_ratio > 0:
        raise ValueError(f"decoder_mlp_ratio={mlp_ratio} must be > 0, e.g. 4.0")


@register("mae")
class MAE(Objective):
    requires = ("supports_token_drop",)
    reads = "tokens"

    def __init__(
        self,
        backbone: Backbone,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        hflip: float = 0.5,
    ):
        super().__init__(backbone)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio={mask_ratio} must be strictly between 0 and 1 (MAE uses 0.75)")
        n = backbone.num_patches
        if max(1, int(round(n * (1 - mask_ratio)))) >= n:  # the number kept visible, as random_masking draws it
            raise ValueError(f"mask_ratio={mask_ratio} masks none of the {n} patches, so there is nothing to reconstruct: "
                             f"raise it to at least {1 / n:.3g} (MAE uses 0.75)")
        _check_decoder(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio, len(backbone.grid_size))
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.crop_scale = tuple(crop_scale)
        self.hflip = hflip
        self.decoder_embed = nn.Linear(backbone.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = sincos_padded(backbone.grid_size, decoder_dim)  # (1, N, Dd), any rank of token grid
        self.register_buffer("decoder_pos", pos, persistent=False)
        self.decoder_blocks = transformer(decoder_dim, decoder_depth, decoder_heads, decoder_mlp_ratio)
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, backbone.patch_pixels)

        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    @property
    def views(self) -> list[ViewSpec]:
        return [ViewSpec(size=self.square_view_size(), scale=self.crop_scale, hflip=self.hflip)]

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_token"}

    # -- the MAE steps --------------------------------------------------------------------
    def random_masking(self, batch: int, n: int, device: torch.device,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A fresh random permutation per sample; the first `keep` of it stay visible.

        Returns ids_keep (B, keep), mask (B, N) with 1 = masked, ids_restore (B, N) that undoes
        the shuffle. `generator` (pictures): the noise drawn from it, on its device."""
        keep = max(1, int(round(n * (1 - self.mask_ratio))))
        if generator is None:
            noise = torch.rand(batch, n, device=device)  # (B, N)
        else:
            noise = torch.rand(batch, n, device=generator.device, generator=generator).to(device)
        ids_shuffle = noise.argsort(dim=1)
        ids_restore = ids_shuffle.argsort(dim=1)
        ids_keep = ids_shuffle[:, :keep]
        mask = torch.ones(batch, n, device=device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back in patch order
        return ids_keep, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bb = self.backbone
        ids_keep, mask, ids_restore = self.random_masking(imgs.shape[0], bb.num_patches, imgs.device, generator)
        x = bb.embed_patches(bb.hide_masked(imgs, mask))  # (B, N, D); masked pixels hidden where embeddings overlap
        x = gather_tokens(x, ids_keep) + bb.pos_embed_for(ids_keep)  # (B, keep, D)
        latent = bb.forward_tokens(x)  # (B, P+keep, D)
        return latent, mask, ids_restore

    def unshuffle(self, visible: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Append mask tokens to the visible tokens (B, keep, Dd) and put all N back in patch order."""
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N - visible.shape[1], -1).to(visible.dtype)
        return gather_tokens(torch.cat([visible, masked], dim=1), ids_restore)  # (B, N, Dd)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        prefix = self.backbone.num_prefix_tokens
        x = self.decoder_embed(latent)  # (B, P+keep, Dd)
        patches = self.unshuffle(x[:, prefix:], ids_restore)  # (B, N, Dd)
        x = torch.cat([x[:, :prefix], patches + self.decoder_pos], dim=1)  # (B, P+N, Dd)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, prefix:]  # (B, N, p*p*C)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)  # (B, N, p*p*C)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        imgs = batch["views"][0]  # (B, C, H, W), or the backbone's input_shape
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore)
        return {"loss": self.forward_loss(imgs, pred, mask)}

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction, mask image) in the input's pixel space, for pictures. With
        norm_pix_loss the prediction is de-normalised with each patch's own statistics."""
        latent, mask, ids_restore = self.forward_encoder(imgs)
        pred = self.forward_decoder(latent, ids_restore).float()
        if self.norm_pix_loss:
            target = self.patchify(imgs)
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        mask_img = self.unpatchify(mask.unsqueeze(-1).expand_as(pred))
        return self.unpatchify(pred), mask_img

    @torch.no_grad()
    def reconstruct_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """For pictures: {"original", "masked", "reconstruction", "mask"}, each shaped like `images`
        (B, C, H, W) (or the backbone's input shape) and in the input's space (the normalised space
        the model sees). "masked": the masked patches set to 0 (the normalisation's mean colour);
        "reconstruction": the decoder's prediction pasted into the masked patches, the visible ones
        original; "mask": 1 under masked patches. With norm_pix_loss the prediction is
        un-normalised with each original patch's mean and variance (MAE's demo). `generator`
        draws the mask (a fixed seed gives the same picture every time). Call in eval mode."""
        latent, mask, ids_restore = self.forward_encoder(images, generator)  # mask (B, N), 1 = masked
        pred = self.forward_decoder(latent, ids_restore).float()  # (B, N, patch_pixels)
        target = self.patchify(images.float())  # (B, N, patch_pixels)
        if self.norm_pix_loss:
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        return self.pictures_of(images, pred, mask)
