"""DeepViT: Towards Deeper Vision Transformer (Zhou et al., 2021).

A ViT whose attention is replaced by re-attention: the softmax attention maps of the heads are
mixed by a learned heads x heads matrix and normalised across heads (a LayerNorm over the head
axis, as vit-pytorch; the paper uses a BatchNorm), which keeps the maps of deep layers from
collapsing onto one another. Everything else (patch embedding, class token, learned positions,
pooling, any-size input, the token-level protocol) is the ViT's, so this file subclasses it and
swaps the blocks. The mixed maps are materialised, so no fused SDPA kernel applies.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import Classifier, create, register
from .convert import _VIT_BLOCK_RULES, classifier_from, register_reference, register_vit_pytorch, rename
from .layers import Block, init_weights
from .vit import ViT


class ReAttention(nn.Module):
    """Re-attention: softmax(q k^T / sqrt(d)) per head, mixed across heads by a learned matrix
    (H, H) (new head g = sum_h A_h * W[h, g]), then a LayerNorm over the heads of every (i, j)
    entry, then applied to the values. The mixing starts as the identity."""

    records_attention = True  # eval.attention records it (the mixed maps: rows need not sum to 1)

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 proj_drop: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        if heads < 2:
            raise ValueError(f"heads={heads}: re-attention mixes and normalises across heads, so it needs heads >= 2 "
                             "(with one head the normalised map is constant); use the vit backbone for one head")
        if head_dim is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim, or set head_dim")
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.reattn = nn.Parameter(torch.eye(heads))  # (H, H) the paper's Theta
        self.reattn_norm = nn.LayerNorm(heads, eps=norm_eps)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        dots = q @ k.transpose(-2, -1) * self.head_dim ** -0.5  # (B, H, N, N)
        if attn_mask is not None:
            dots = dots.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else dots + attn_mask
        attn = torch.einsum("bhij,hg->bijg", dots.softmax(dim=-1), self.reattn)  # (B, N, N, H), heads last
        return rearrange(self.reattn_norm(attn), "b i j h -> b h i j"), v

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        attn, v = self._attend(x, attn_mask)
        return self.proj_drop(self.proj(rearrange(attn @ v, "b h n d -> b n (h d)")))  # (B, N, D)

    def attention_probs(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The re-attention matrix (B, H, N, N) applied to the values (x: the normalised block
        input). After the norm over heads it is not a probability distribution: entries can be
        negative and rows need not sum to 1."""
        return self._attend(x, attn_mask)[0]


class ReAttentionBlock(Block):
    """The pre-norm transformer block with re-attention in place of attention."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool = True, drop: float = 0.0,
                 head_dim: int | None = None, proj_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__(dim, heads, qkv_bias=qkv_bias, drop=drop, head_dim=head_dim, proj_bias=proj_bias,
                         mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.attn = ReAttention(dim, heads, head_dim, qkv_bias, proj_bias, proj_drop=drop, norm_eps=norm_eps)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) re-attention of this block, from the block's input x (B, N, D)."""
        return self.attn.attention_probs(self.norm1(x))


class DeepViT(ViT):
    """ViT with re-attention blocks; flags as the ViT's (token access, token drop, mask token,
    attention maps, any size); no distillation token."""

    def __init__(self, image_size, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, qkv_bias, pool, drop,
                 head_dim, mlp_dim, proj_bias, patch_norm, norm_eps):
        super().__init__(image_size, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, qkv_bias,
                         class_token=True, pos_embed="learned", pool=pool, drop=drop, head_dim=head_dim,
                         mlp_dim=mlp_dim, proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)
        dim, heads = self.embed_dim, self.blocks[0].attn.heads
        mlp_dim = self.blocks[0].mlp.fc1.out_features
        self.blocks = nn.ModuleList(
            ReAttentionBlock(dim, heads, mlp_dim, qkv_bias, drop, head_dim, proj_bias, norm_eps)
            for _ in range(len(self.blocks))
        )
        self.blocks.apply(init_weights)  # the re-attention's mixing keeps its identity start

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's re-attention (B, H, 1+N, 1+N) over [class token, patches]; row 0,
        columns 1: are the class token's map for pictures. Every block also has
        attention_probs(block input) of its own."""
        self.check_input(x)
        tokens = self.patch_embed(x) + self.patch_positions()
        prefix = self.cls_token + self.pos_embed[:, :1]  # (1, 1, D)
        tokens = torch.cat([prefix.expand(tokens.shape[0], -1, -1), tokens], dim=1)  # (B, 1+N, D)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        return self.blocks[-1].attention_probs(tokens)


@register("deepvit", example=dict(image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, heads=4))
def deepvit(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    pool: str = "cls",
    drop: float = 0.0,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    proj_bias: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> DeepViT:
    """DeepViT: the ViT's options (`size` tiny / small / base / large: ViT geometry; the paper's
    DeepViT models are deeper, set `depth`). head_dim=64, mlp_dim, qkv_bias=False, patch_norm=True,
    norm_eps=1e-5 give vit-pytorch's DeepViT."""
    return DeepViT(image_size, patch_size, in_chans, size, dim, depth, heads, mlp_ratio, qkv_bias, pool, drop, head_dim,
                   mlp_dim, proj_bias, patch_norm, norm_eps)


# --------------------------------------------------------------------------- vit-pytorch

_DEEPVIT_RULES = [
    (r"transformer\.layers\.(\d+)\.0\.reattn_weights", r"blocks.\1.attn.reattn"),
    (r"transformer\.layers\.(\d+)\.0\.reattn_norm\.1\.(weight|bias)", r"blocks.\1.attn.reattn_norm.\2"),
    *_VIT_BLOCK_RULES,
    (r"cls_token", "cls_token"),
    (r"pos_embedding", "pos_embed"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]


@register_vit_pytorch("deepvit")
def _deepvit(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
             pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0,
             emb_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.deepvit.DeepViT (1.16.0): no final transformer norm; its head's LayerNorm is our
    final norm. `dropout` maps to `drop`; `emb_dropout` is training-only and has no counterpart."""
    if pool != "cls":
        raise ValueError(
            f"pool={pool!r}: vit-pytorch's DeepViT then normalises the mean of all tokens, class token included, "
            "while our backbones pool tokens after the final norm, so the logits cannot agree; only pool='cls' "
            "converts (build deepvit with pool='mean' and fine-tune instead)"
        )
    state = rename(state, _DEEPVIT_RULES)
    backbone = create("deepvit", image_size=image_size, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth,
                      heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, pool=pool, drop=dropout,
                      patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


for _size, (_dim, _depth, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12)}.items():
    _vp = dict(image_size=224, patch_size=16, num_classes=1000, dim=_dim, depth=_depth, heads=_heads,
               mlp_dim=4 * _dim, dim_head=64)
    _ours = dict(image_size=224, patch_size=16, in_chans=3, dim=_dim, depth=_depth, heads=_heads, head_dim=64,
                 mlp_dim=4 * _dim, qkv_bias=False, patch_norm=True, norm_eps=1e-5)
    register_reference("deepvit", _size, "vit_pytorch.deepvit:DeepViT", _vp, _ours, (3, 224, 224))
