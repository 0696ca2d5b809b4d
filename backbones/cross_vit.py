"""CrossViT (Chen, Fan & Panda, 2021): two ViT branches at two patch sizes, fused by cross-attention.

The small-patch branch ("sm": fine patches, usually the narrower and shallower branch) and the
large-patch branch ("lg": coarse patches) each embed the image with their own patch size, class
token and positions. A multi-scale stage runs each branch's own blocks, then `cross_depth` layers
in which each branch's class token attends to [itself, the other branch's patch tokens] (the
class token is projected to the other branch's width and back). Patch tokens never cross; only
the class tokens carry information between the branches.

What comes out, in this protocol:
- the pooled embedding (B, sm_dim + lg_dim) is the two class tokens after their final norms,
  concatenated; a linear head on it is the sum of one head per branch (vit-pytorch sums the two
  branches' logits; the paper averages them, which is the same up to a factor of 2);
- the output token grid is the small-patch grid (`patch_size` = sm_patch_size): each output
  token is its small patch's token with the token of the large patch under its centre
  concatenated, (B, 1 + N_sm, sm_dim + lg_dim), prefix token = the pooled embedding.

Capabilities. There is no single sequence of patch tokens (two grids, two widths), so no token
access and no token drop (MAE, MPP). A mask token does fit (`forward_masked`): the mask is given on
the small-patch grid; the small branch replaces those patches with the first sm_dim channels of
the mask token, and the large branch replaces every large patch that overlaps a masked pixel with
its last lg_dim channels, so neither branch sees a masked pixel (a large patch only partly masked
is hidden whole). With SimMIM's blocks aligned to the large patches (e.g. 32-px blocks, 16-px
large patches) nothing more than the masked area is hidden. A loss on the patch tokens (SimMIM)
never reaches the last stage's cross-attention, which only updates the class tokens that no patch
token sees after it: `prefix_only_parameters()` names those layers (trained by DINO, supervised,
distillation and fine-tuning). At other input sizes (multiples of sm_patch_size, DINO's local
crops) the positions are resampled; when the size is not a multiple of lg_patch_size the large
branch sees the image resized to the nearest multiple (the paper itself feeds each branch its own
image size, 240 and 224 px).

vit-pytorch's layout (`vit_pytorch.cross_vit.CrossViT`, converter below) is `patch_norm=True`
(LayerNorm'd patch embedding), `stage_norm=True` (a LayerNorm closes each branch's encoder in every
stage, and cross-attention then normalises only its query), `qkv_bias=False`, `norm_eps=1e-5` and
one `cross_heads` / `cross_head_dim` for both directions. The defaults follow the paper's
CrossViT-S instead (conv patch embedding, no per-stage norm: cross-attention normalises query and
context together, qkv bias), except that the class-token projections are plain linear layers
(the paper's are LayerNorm + GELU + Linear, with the residual taken in the other branch's width).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import (Block, NormPatchEmbed, PatchEmbed, init_patch_embed, init_weights, resize_pos_embed,
                     trunc_normal_)


def _heads_fit(field: str, dim: int, heads: int, head_dim: int | None) -> None:
    if heads < 1:
        raise ValueError(f"{field}={heads} must be >= 1")
    if head_dim is None and dim % heads:
        raise ValueError(f"{field}={heads} must divide the width {dim}: pick a divisor of {dim}, or set the head_dim")


class Branch(nn.Module):
    """One branch's input: patch embedding, class token and learned positions (1, 1+N, D)."""

    def __init__(self, image_size: tuple[int, int], patch_size: int, in_chans: int, dim: int, patch_norm: bool,
                 norm_eps: float):
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = (image_size[0] // patch_size, image_size[1] // patch_size)
        embed = NormPatchEmbed if patch_norm else PatchEmbed
        self.patch_embed = embed(image_size, patch_size, in_chans, dim, **({"norm_eps": norm_eps} if patch_norm else {}))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], dim))

    def grid_of(self, x: torch.Tensor) -> tuple[int, int]:
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def add_prefix(self, patches: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Patch tokens (B, N, D) -> (B, 1+N, D): positions (resampled to `grid`) and the class token."""
        pos = resize_pos_embed(self.pos_embed[:, 1:], self.grid_size, grid)  # (1, N, D)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)  # (B, 1, D)
        return torch.cat([cls, patches + pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_prefix(self.patch_embed(x), self.grid_of(x))  # (B, 1+N, D)


class CrossAttention(nn.Module):
    """A class token (B, 1, d_in) attends to [itself, the other branch's patch tokens (B, n, dim)]:
    projected to `dim` first and back to d_in after (identities when the widths agree).
    `norm_context`: the context is normalised with the query's norm (the paper's fusion block);
    without it, the context arrives normalised (vit-pytorch's per-stage norm)."""

    def __init__(self, d_in: int, dim: int, heads: int, head_dim: int | None, qkv_bias: bool, norm_context: bool,
                 norm_eps: float):
        super().__init__()
        self.heads = heads
        inner = heads * (head_dim or dim // heads)
        self.proj_in = nn.Linear(d_in, dim) if d_in != dim else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.proj_out = nn.Linear(dim, d_in) if d_in != dim else nn.Identity()
        self.norm_context = norm_context

    def forward(self, cls: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.proj_in(cls))  # (B, 1, dim)
        context = self.norm(context) if self.norm_context else context  # (B, n, dim)
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(torch.cat([x, context], dim=1)), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d)
        return self.proj_out(self.proj(rearrange(out, "b h n d -> b n (h d)")))  # (B, 1, d_in)


class CrossLayer(nn.Module):
    def __init__(self, sm_attends_lg: CrossAttention, lg_attends_sm: CrossAttention):
        super().__init__()
        self.sm_attends_lg, self.lg_attends_sm = sm_attends_lg, lg_attends_sm


class Stage(nn.Module):
    """One multi-scale encoder: each branch's blocks (and per-stage norm), then cross-attention
    between the class tokens. Patch tokens are left as the branch blocks made them."""

    def __init__(self, sm_blocks: nn.ModuleList, lg_blocks: nn.ModuleList, cross: nn.ModuleList, stage_norm: bool,
                 sm_dim: int, lg_dim: int, norm_eps: float):
        super().__init__()
        self.sm_blocks, self.lg_blocks, self.cross = sm_blocks, lg_blocks, cross
        self.sm_norm = nn.LayerNorm(sm_dim, eps=norm_eps) if stage_norm else nn.Identity()
        self.lg_norm = nn.LayerNorm(lg_dim, eps=norm_eps) if stage_norm else nn.Identity()

    def forward(self, sm: torch.Tensor, lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for block in self.sm_blocks:
            sm = block(sm)  # (B, 1+Ns, Ds)
        for block in self.lg_blocks:
            lg = block(lg)  # (B, 1+Nl, Dl)
        sm, lg = self.sm_norm(sm), self.lg_norm(lg)
        sm_cls, sm_patches, lg_cls, lg_patches = sm[:, :1], sm[:, 1:], lg[:, :1], lg[:, 1:]
        for layer in self.cross:
            sm_cls = sm_cls + layer.sm_attends_lg(sm_cls, lg_patches)  # (B, 1, Ds)
            lg_cls = lg_cls + layer.lg_attends_sm(lg_cls, sm_patches)  # (B, 1, Dl)
        return torch.cat([sm_cls, sm_patches], dim=1), torch.cat([lg_cls, lg_patches], dim=1)


def _centre_index(fine: tuple[int, int], coarse: tuple[int, int]) -> torch.Tensor:
    """For each cell of the fine grid (row-major), the coarse cell under its centre: (Nf,) long."""
    rows = ((torch.arange(fine[0]) + 0.5) * coarse[0] / fine[0]).floor().long().clamp(max=coarse[0] - 1)
    cols = ((torch.arange(fine[1]) + 0.5) * coarse[1] / fine[1]).floor().long().clamp(max=coarse[1] - 1)
    return (rows[:, None] * coarse[1] + cols[None, :]).flatten()


class CrossViT(Backbone):
    supports_token_access = False  # two token sequences of two widths: no single one to hand out (MPP)
    supports_token_drop = False  # likewise (MAE)
    supports_mask_token = True  # forward_masked masks both branches (module docstring); see prefix_only_parameters
    attention_maps = True  # attention_probs(x): the small branch's last self-attention, over the output grid
    supports_any_size = True  # multiples of sm_patch_size; the large branch's input is resized if needed
    num_prefix_tokens = 1

    def __init__(self, image_size: int | tuple[int, int], in_chans: int, sm_patch_size: int, lg_patch_size: int,
                 sm_dim: int, lg_dim: int, sm_depth: int, lg_depth: int, sm_heads: int, lg_heads: int,
                 sm_head_dim: int | None, lg_head_dim: int | None, sm_mlp_dim: int | None, lg_mlp_dim: int | None,
                 mlp_ratio: float, depth: int, cross_depth: int, cross_heads: int | None, cross_head_dim: int | None,
                 qkv_bias: bool, drop: float, patch_norm: bool, stage_norm: bool, norm_eps: float):
        super().__init__()
        for field, value in (("in_chans", in_chans), ("sm_patch_size", sm_patch_size), ("lg_patch_size", lg_patch_size),
                             ("sm_dim", sm_dim), ("lg_dim", lg_dim), ("sm_depth", sm_depth), ("lg_depth", lg_depth),
                             ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field}={value!r} must be an integer >= 1")
        if not isinstance(cross_depth, int) or cross_depth < 0:
            raise ValueError(f"cross_depth={cross_depth!r} must be an integer >= 0 (cross-attention layers per stage)")
        self.image_size = image_size_2d(image_size)
        for field, p in (("sm_patch_size", sm_patch_size), ("lg_patch_size", lg_patch_size)):
            if self.image_size[0] % p or self.image_size[1] % p:
                raise ValueError(f"image_size={image_size} is not divisible by {field}={p}: both branches tile the "
                                 f"image, so use an image size that is a multiple of {sm_patch_size} and {lg_patch_size} "
                                 f"(e.g. {math.lcm(sm_patch_size, lg_patch_size)} * k)")
        _heads_fit("sm_heads", sm_dim, sm_heads, sm_head_dim)
        _heads_fit("lg_heads", lg_dim, lg_heads, lg_head_dim)
        if cross_heads is not None:
            _heads_fit("cross_heads", math.gcd(sm_dim, lg_dim), cross_heads, cross_head_dim)

        self.in_chans, self.patch_size = in_chans, sm_patch_size
        self.sm_dim, self.lg_dim = sm_dim, lg_dim
        self.embed_dim = sm_dim + lg_dim
        self.sm = Branch(self.image_size, sm_patch_size, in_chans, sm_dim, patch_norm, norm_eps)
        self.lg = Branch(self.image_size, lg_patch_size, in_chans, lg_dim, patch_norm, norm_eps)

        def blocks(dim: int, n: int, heads: int, head_dim: int | None, mlp_dim: int | None) -> nn.ModuleList:
            return nn.ModuleList(Block(dim, heads, mlp_ratio, qkv_bias, drop, head_dim=head_dim, mlp_dim=mlp_dim,
                                       norm_eps=norm_eps) for _ in range(n))

        def cross(d_in: int, dim: int, branch_heads: int) -> CrossAttention:
            return CrossAttention(d_in, dim, cross_heads or branch_heads, cross_head_dim, qkv_bias,
                                  norm_context=not stage_norm, norm_eps=norm_eps)

        self.stages = nn.ModuleList(
            Stage(blocks(sm_dim, sm_depth, sm_heads, sm_head_dim, sm_mlp_dim),
                  blocks(lg_dim, lg_depth, lg_heads, lg_head_dim, lg_mlp_dim),
                  nn.ModuleList(CrossLayer(cross(sm_dim, lg_dim, lg_heads), cross(lg_dim, sm_dim, sm_heads))
                                for _ in range(cross_depth)),
                  stage_norm, sm_dim, lg_dim, norm_eps)
            for _ in range(depth))
        self.sm_norm = nn.LayerNorm(sm_dim, eps=norm_eps)
        self.lg_norm = nn.LayerNorm(lg_dim, eps=norm_eps)
        self.register_buffer("lg_under_sm", _centre_index(self.sm.grid_size, self.lg.grid_size), persistent=False)
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)
        for branch in (self.sm, self.lg):
            if isinstance(branch.patch_embed, PatchEmbed):
                init_patch_embed(branch.patch_embed)
            trunc_normal_(branch.pos_embed)
            trunc_normal_(branch.cls_token)

    # -- the two branches -----------------------------------------------------------------
    def encode(self, sm: torch.Tensor, lg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both branches' tokens (B, 1+Ns, Ds), (B, 1+Nl, Dl) through every stage and the final norms."""
        for stage in self.stages:
            sm, lg = stage(sm, lg)
        return self.sm_norm(sm), self.lg_norm(lg)

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image each branch sees: the input itself, or for the large branch at a size that is
        not a multiple of its patch the input resized to the nearest multiple."""
        if tuple(x.shape[1:]) == tuple(self.input_shape):
            return x, x
        self.check_input(x, any_size=True)
        p = self.lg.patch_size
        size = tuple(max(1, round(s / p)) * p for s in x.shape[-2:])
        if size == tuple(x.shape[-2:]):
            return x, x
        return x, F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _output_tokens(self, sm: torch.Tensor, lg: torch.Tensor, sm_grid: tuple[int, int],
                       lg_grid: tuple[int, int]) -> torch.Tensor:
        """(B, 1+Ns, Ds), (B, 1+Nl, Dl) -> (B, 1+Ns, Ds+Dl): each small patch's token with the token
        of the large patch under its centre; the prefix token is the two class tokens."""
        index = self.lg_under_sm if (sm_grid, lg_grid) == (self.sm.grid_size, self.lg.grid_size) else \
            _centre_index(sm_grid, lg_grid).to(sm.device)
        lg_patches = lg[:, 1:].index_select(1, index)  # (B, Ns, Dl)
        return torch.cat([sm, torch.cat([lg[:, :1], lg_patches], dim=1)], dim=-1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N_sm, sm_dim + lg_dim) at the built size or any multiple of sm_patch_size."""
        x_sm, x_lg = self._inputs(x)
        sm, lg = self.encode(self.sm(x_sm), self.lg(x_lg))
        return self._output_tokens(sm, lg, self.sm.grid_of(x_sm), self.lg.grid_of(x_lg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The two class tokens after their final norms, concatenated: (B, sm_dim + lg_dim)."""
        x_sm, x_lg = self._inputs(x)
        sm, lg = self.encode(self.sm(x_sm), self.lg(x_lg))
        return torch.cat([sm[:, 0], lg[:, 0]], dim=-1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # (B, Ds+Dl)

    # -- SimMIM ---------------------------------------------------------------------------
    def lg_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A mask on the small-patch grid (B, Ns) -> the large patches holding any masked pixel (B, Nl)."""
        (gh, gw), p = self.sm.grid_size, self.sm.patch_size
        pixels = mask.float().view(-1, 1, gh, gw).repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (B,1,H,W)
        return F.max_pool2d(pixels, self.lg.patch_size).flatten(1) > 0  # (B, Nl)

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """mask (B, N_sm) on the output grid; mask_token (1, 1, sm_dim + lg_dim): its first sm_dim
        channels replace the masked small patches, its last lg_dim channels every large patch that
        overlaps a masked one. Returns the output patch tokens (B, N_sm, sm_dim + lg_dim)."""
        self.check_input(x)
        if mask.shape != (x.shape[0], self.num_patches):
            raise ValueError(f"mask of shape {tuple(mask.shape)}: expected (B, {self.num_patches}), one value per "
                             f"{self.patch_size}-px patch of the small-patch grid {self.grid_size}")
        if mask_token.shape[-1] != self.mask_token_dim:
            raise ValueError(f"mask_token of width {mask_token.shape[-1]}: this CrossViT takes sm_dim + lg_dim = "
                             f"{self.mask_token_dim} (first sm_dim channels for the small branch, the rest for the large)")
        token = mask_token.to(x.dtype)
        masked = []
        for branch, m, t in ((self.sm, mask.bool(), token[..., : self.sm_dim]),
                             (self.lg, self.lg_mask(mask), token[..., self.sm_dim :])):
            patches = branch.patch_embed(x)  # (B, N, D)
            patches = torch.where(m.unsqueeze(-1), t.expand_as(patches), patches)
            masked.append(branch.add_prefix(patches, branch.grid_size))
        sm, lg = self.encode(*masked)
        return self._output_tokens(sm, lg, self.sm.grid_size, self.lg.grid_size)[:, 1:]  # (B, Ns, Ds+Dl)

    # -- what a picture or a patch-level objective needs to know ------------------------------
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The small branch's last self-attention (B, H, 1+N_sm, 1+N_sm) over [class token, small
        patches]: row 0 without column 0, reshaped to `grid_size`, is the class token's attention
        picture. Every block also has attn.attention_probs(norm1(block input)) of its own."""
        self.check_input(x)
        sm, lg = self.sm(x), self.lg(x)
        for stage in self.stages[:-1]:
            sm, lg = stage(sm, lg)
        blocks = self.stages[-1].sm_blocks
        for block in blocks[:-1]:
            sm = block(sm)
        return blocks[-1].attn.attention_probs(blocks[-1].norm1(sm))

    def prefix_only_parameters(self) -> list[nn.Parameter]:
        """The parameters only the pooled embedding depends on: the last stage's cross-attention
        (it updates the class tokens after every patch token is final). An objective that reads
        patch tokens alone (SimMIM) cannot train them; those that pool do."""
        return list(self.stages[-1].cross.parameters())

    def no_weight_decay(self) -> set[str]:
        return {f"{b}.{n}" for b in ("sm", "lg") for n in ("pos_embed", "cls_token")}


@register("cross_vit", example=dict(image_size=32, in_chans=1, sm_patch_size=4, lg_patch_size=8, sm_dim=32, lg_dim=64,
                                    sm_depth=1, lg_depth=1, sm_heads=2, lg_heads=4, depth=2, cross_depth=1))
def cross_vit(
    image_size: int | tuple[int, int] = 240,
    in_chans: int = 3,
    sm_patch_size: int = 12,
    lg_patch_size: int = 16,
    sm_dim: int = 192,
    lg_dim: int = 384,
    sm_depth: int = 1,
    lg_depth: int = 4,
    sm_heads: int = 6,
    lg_heads: int = 6,
    sm_head_dim: int | None = None,
    lg_head_dim: int | None = None,
    sm_mlp_dim: int | None = None,
    lg_mlp_dim: int | None = None,
    mlp_ratio: float = 4.0,
    depth: int = 3,
    cross_depth: int = 1,
    cross_heads: int | None = None,
    cross_head_dim: int | None = None,
    qkv_bias: bool = True,
    drop: float = 0.0,
    patch_norm: bool = False,
    stage_norm: bool = False,
    norm_eps: float = 1e-6,
) -> CrossViT:
    """CrossViT. Defaults: the paper's CrossViT-S (sm: 12-px patches, width 192, 1 block; lg: 16-px
    patches, width 384, 4 blocks; 6 heads; 3 multi-scale stages with 1 cross-attention layer), both
    branches at 240 px. `depth`: multi-scale stages; `sm_depth` / `lg_depth`: each branch's blocks per
    stage; `cross_heads` None: each cross-attention uses the heads of the branch whose width it runs
    at. patch_norm / stage_norm / qkv_bias / norm_eps / *_head_dim / *_mlp_dim express vit-pytorch's
    CrossViT (see the module docstring and the converter)."""
    return CrossViT(image_size, in_chans, sm_patch_size, lg_patch_size, sm_dim, lg_dim, sm_depth, lg_depth, sm_heads,
                    lg_heads, sm_head_dim, lg_head_dim, sm_mlp_dim, lg_mlp_dim, mlp_ratio, depth, cross_depth,
                    cross_heads, cross_head_dim, qkv_bias, drop, patch_norm, stage_norm, norm_eps)


# --------------------------------------------------------------------------- vit-pytorch

def _rules() -> list[tuple[str, str]]:
    """vit-pytorch key -> ours. Self-attention's to_q / to_kv land on q / kv and are fused into qkv after."""
    enc = r"multi_scale_encoder\.layers\.(\d+)"
    rules: list[tuple[str, str]] = []
    for b, i in (("sm", 0), ("lg", 1)):
        layer, dst = rf"{enc}\.{i}\.layers\.(\d+)", rf"stages.\1.{b}_blocks.\2"
        rules += [
            (rf"{layer}\.0\.norm\.(weight|bias)", rf"{dst}.norm1.\3"),
            (rf"{layer}\.0\.to_q\.weight", rf"{dst}.attn.q.weight"),
            (rf"{layer}\.0\.to_kv\.weight", rf"{dst}.attn.kv.weight"),
            (rf"{layer}\.0\.to_out\.0\.(weight|bias)", rf"{dst}.attn.proj.\3"),
            (rf"{layer}\.1\.net\.0\.(weight|bias)", rf"{dst}.norm2.\3"),
            (rf"{layer}\.1\.net\.1\.(weight|bias)", rf"{dst}.mlp.fc1.\3"),
            (rf"{layer}\.1\.net\.4\.(weight|bias)", rf"{dst}.mlp.fc2.\3"),
            (rf"{enc}\.{i}\.norm\.(weight|bias)", rf"stages.\1.{b}_norm.\2"),
            (rf"{b}_image_embedder\.to_patch_embedding\.1\.(weight|bias)", rf"{b}.patch_embed.norm_in.\1"),
            (rf"{b}_image_embedder\.to_patch_embedding\.2\.(weight|bias)", rf"{b}.patch_embed.proj.\1"),
            (rf"{b}_image_embedder\.to_patch_embedding\.3\.(weight|bias)", rf"{b}.patch_embed.norm_out.\1"),
            (rf"{b}_image_embedder\.pos_embedding", rf"{b}.pos_embed"),
            (rf"{b}_image_embedder\.cls_token", rf"{b}.cls_token"),
            (rf"{b}_mlp_head\.0\.(weight|bias)", rf"{b}_norm.\1"),
            (rf"{b}_mlp_head\.1\.(weight|bias)", rf"{b}_head.\1"),
        ]
    for name, i in (("sm_attends_lg", 0), ("lg_attends_sm", 1)):
        src, dst = rf"{enc}\.2\.layers\.(\d+)\.{i}", rf"stages.\1.cross.\2.{name}"
        rules += [
            (rf"{src}\.project_in\.(weight|bias)", rf"{dst}.proj_in.\3"),
            (rf"{src}\.project_out\.(weight|bias)", rf"{dst}.proj_out.\3"),
            (rf"{src}\.fn\.norm\.(weight|bias)", rf"{dst}.norm.\3"),
            (rf"{src}\.fn\.to_q\.weight", rf"{dst}.q.weight"),
            (rf"{src}\.fn\.to_kv\.weight", rf"{dst}.kv.weight"),
            (rf"{src}\.fn\.to_out\.0\.(weight|bias)", rf"{dst}.proj.\3"),
        ]
    return rules


@register_vit_pytorch("cross_vit")
def _cross_vit(state: dict[str, torch.Tensor], *, image_size, num_classes, sm_dim, lg_dim, sm_patch_size: int = 12,
               sm_enc_depth: int = 1, sm_enc_heads: int = 8, sm_enc_mlp_dim: int = 2048, sm_enc_dim_head: int = 64,
               lg_patch_size: int = 16, lg_enc_depth: int = 4, lg_enc_heads: int = 8, lg_enc_mlp_dim: int = 2048,
               lg_enc_dim_head: int = 64, cross_attn_depth: int = 2, cross_attn_heads: int = 8,
               cross_attn_dim_head: int = 64, depth: int = 3, dropout: float = 0.1, emb_dropout: float = 0.1,
               channels: int = 3) -> Classifier:
    """vit_pytorch.cross_vit.CrossViT (1.16.0). Its two heads (LayerNorm + Linear per branch, logits
    summed) become our two final norms and one linear head on the concatenated class tokens
    (weights side by side, biases summed)."""
    state = rename(state, _rules())
    for key in [k for k in state if k.endswith(".q.weight") and "_blocks." in k]:  # self-attention: fuse q and kv
        stem = key[: -len(".q.weight")]
        state[f"{stem}.qkv.weight"] = torch.cat([state.pop(key), state.pop(f"{stem}.kv.weight")], dim=0)
    state["head.weight"] = torch.cat([state.pop("sm_head.weight"), state.pop("lg_head.weight")], dim=1)
    state["head.bias"] = state.pop("sm_head.bias") + state.pop("lg_head.bias")
    backbone = create("cross_vit", **_ours_from_vit_pytorch(
        image_size=image_size, sm_dim=sm_dim, lg_dim=lg_dim, sm_patch_size=sm_patch_size, sm_enc_depth=sm_enc_depth,
        sm_enc_heads=sm_enc_heads, sm_enc_mlp_dim=sm_enc_mlp_dim, sm_enc_dim_head=sm_enc_dim_head,
        lg_patch_size=lg_patch_size, lg_enc_depth=lg_enc_depth, lg_enc_heads=lg_enc_heads,
        lg_enc_mlp_dim=lg_enc_mlp_dim, lg_enc_dim_head=lg_enc_dim_head, cross_attn_depth=cross_attn_depth,
        cross_attn_heads=cross_attn_heads, cross_attn_dim_head=cross_attn_dim_head, depth=depth, channels=channels))
    return classifier_from(backbone, state)


def _ours_from_vit_pytorch(*, image_size, sm_dim, lg_dim, sm_patch_size, sm_enc_depth, sm_enc_heads, sm_enc_mlp_dim,
                           sm_enc_dim_head, lg_patch_size, lg_enc_depth, lg_enc_heads, lg_enc_mlp_dim, lg_enc_dim_head,
                           cross_attn_depth, cross_attn_heads, cross_attn_dim_head, depth, channels=3, **_) -> dict:
    """Our cross_vit kwargs for the network a vit-pytorch CrossViT's kwargs describe."""
    return dict(image_size=image_size, in_chans=channels, sm_patch_size=sm_patch_size, lg_patch_size=lg_patch_size,
                sm_dim=sm_dim, lg_dim=lg_dim, sm_depth=sm_enc_depth, lg_depth=lg_enc_depth, sm_heads=sm_enc_heads,
                lg_heads=lg_enc_heads, sm_head_dim=sm_enc_dim_head, lg_head_dim=lg_enc_dim_head,
                sm_mlp_dim=sm_enc_mlp_dim, lg_mlp_dim=lg_enc_mlp_dim, depth=depth, cross_depth=cross_attn_depth,
                cross_heads=cross_attn_heads, cross_head_dim=cross_attn_dim_head, qkv_bias=False, patch_norm=True,
                stage_norm=True, norm_eps=1e-5)


# the paper's CrossViT-S and CrossViT-B widths, heads and depths, in vit-pytorch's layout (the same network in
# both libraries); head widths 32 (small branch) and 64 (large branch) as the paper's dim / heads
for _size, (_sm, _lg, _heads) in {"small": (192, 384, 6), "base": (384, 768, 12)}.items():
    _vp = dict(image_size=240, num_classes=1000, sm_dim=_sm, lg_dim=_lg, sm_patch_size=12, sm_enc_depth=1,
               sm_enc_heads=_heads, sm_enc_mlp_dim=4 * _sm, sm_enc_dim_head=_sm // _heads, lg_patch_size=16,
               lg_enc_depth=4, lg_enc_heads=_heads, lg_enc_mlp_dim=4 * _lg, lg_enc_dim_head=_lg // _heads,
               cross_attn_depth=1, cross_attn_heads=_heads, cross_attn_dim_head=_lg // _heads, depth=3, dropout=0.0,
               emb_dropout=0.0)
    register_reference("cross_vit", _size, "vit_pytorch.cross_vit:CrossViT", _vp, _ours_from_vit_pytorch(**_vp),
                       (3, 240, 240),
                       note="the same network in both (vit-pytorch's layout); versus the paper's CrossViT-"
                            f"{_size[0].upper()}: one 240-px input for both branches (the paper gives the large branch "
                            "224 px), plain linear class-token projections (paper: LayerNorm + GELU + Linear), a "
                            "LayerNorm closing each branch in every stage, no qkv bias, and both cross-attentions "
                            f"with {_heads} heads of {_lg // _heads} (paper: the small-width one has heads of "
                            f"{_sm // _heads})")
