"""ViViT (Arnab et al., 2021): video transformers that factorise space and time.

Two of the paper's models, as vit-pytorch builds them (variant=...):

- 'factorized_encoder' (Model 2, the default): a spatial transformer runs over the tubelets of each
  time step on its own (with a spatial class token per time step), then a temporal transformer
  runs over the per-time-step summaries (their class tokens, or the mean of their tokens) and a
  temporal class token. Output tokens: [temporal tokens (class + one per time step), then the
  N tubelet tokens of the spatial transformer]; pooled: the temporal class token (or the mean of
  the time-step tokens).
- 'factorized_self_attention' (Model 3): every block attends over space within each time step,
  then over time at each spatial position, then an MLP. Output tokens: [one class token per time
  step, then the N tubelet tokens]; pooled: the first time step's class token (or the mean).

Capabilities. Neither can run on a random subset of tubelets (no token drop, so no MAE): the
spatial attention needs to know which time step each token belongs to, and a random subset leaves
time steps with different numbers of visible tokens (factorised self-attention needs the full grid
besides). The factorised self-attention model takes a mask token (SimMIM) and gives token access
over the full sequence (MPP): its tubelet tokens see the whole clip. The factorised encoder's
tubelet tokens come out of the spatial transformer, which sees one time step at a time, so a
masked-prediction objective on them would never train the temporal transformer: it says no to
both flags (its token-level methods still work over the full sequence, forward_features uses
them). Both serve DINO, supervised training and distillation through the pooled embedding.
"""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .base import Classifier, create, register
from .convert import classifier_from, identity_projection, register_reference, register_vit_pytorch, rename
from .layers import Attention, Mlp, block_rules, init_patch_embed, init_weights, transformer, trunc_normal_
from .video import TUBELET_RULES, TubeletEmbed, VideoBackbone, square_patch

# name -> (dim, spatial_depth, temporal_depth, heads): ViT sizes for the spatial encoder, the
# paper's factorised-encoder temporal depth of 4
SIZES = {
    "small": (384, 12, 4, 6),
    "base": (768, 12, 4, 12),
    "large": (1024, 24, 4, 16),
}
VARIANTS = ("factorized_encoder", "factorized_self_attention")


class FactorisedBlock(nn.Module):
    """ViViT's factorised self-attention block on (B, T, L, D): x + attn over L (space, per time
    step), x + attn over T (time, per spatial position), x + MLP; each sub-layer pre-normed."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, qkv_bias: bool = True, drop: float = 0.0,
                 head_dim: int | None = None, proj_bias: bool = True, norm_eps: float = 1e-6):
        super().__init__()
        attn = dict(qkv_bias=qkv_bias, proj_drop=drop, head_dim=head_dim, proj_bias=proj_bias)
        self.norm_s = nn.LayerNorm(dim, eps=norm_eps)
        self.attn_s = Attention(dim, heads, **attn)
        self.norm_t = nn.LayerNorm(dim, eps=norm_eps)
        self.attn_t = Attention(dim, heads, **attn)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        x = rearrange(x, "b t l d -> (b t) l d")
        x = x + self.attn_s(self.norm_s(x))
        x = rearrange(x, "(b t) l d -> (b l) t d", b=b, t=t)
        x = x + self.attn_t(self.norm_t(x))
        x = x + self.mlp(self.norm2(x))
        return rearrange(x, "(b l) t d -> b t l d", b=b)  # (B, T, L, D)


class _ViViTBase(VideoBackbone):
    """What both variants share: geometry, tubelet embedding, learned positions over the tubelets."""

    supports_token_access = True  # over the full sequence of tubelets only (factorised self-attention)
    supports_token_drop = False
    supports_mask_token = True
    attention_maps = True

    def _common(self, image_size, frames, patch_size, frame_patch_size, in_chans, dim, pool, patch_norm, norm_eps):
        self.set_geometry(image_size, frames, patch_size, frame_patch_size, in_chans)
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool={pool!r}: allowed are 'cls' (class tokens) and 'mean' (mean pooling)")
        self.embed_dim, self.pool_type = dim, pool
        self.patch_embed = TubeletEmbed(patch_size, frame_patch_size, in_chans, dim, norm=patch_norm, norm_eps=norm_eps)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))  # tubelets only; class tokens have none

    def _init(self) -> None:
        self.apply(init_weights)
        if not self.patch_embed.norm:
            init_patch_embed(self.patch_embed)
        trunc_normal_(self.pos_embed)
        for name, p in self.named_parameters():
            if name.endswith("cls_token"):
                nn.init.normal_(p, std=0.02)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        return self.pos_embed  # (1, N, D)

    def _by_time(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, T', n, D): the tubelets of each time step; refuses a subset."""
        if tokens.shape[1] != self.num_patches:
            raise ValueError(
                f"ViViT runs on all {self.num_patches} tubelet tokens, got {tokens.shape[1]}: its attention is "
                "factorised per time step, so it cannot take a random subset (supports_token_drop is False; "
                "vit_3d and simple_vit_3d take one, for MAE)"
            )
        return rearrange(tokens, "b (t n) d -> b t n d", t=self.grid_size[0])

    def _spatial_cls(self, x: torch.Tensor, token: nn.Parameter | None) -> torch.Tensor:
        """Prepend a class token to every time step: (B, T', n, D) -> (B, T', Ps+n, D)."""
        if token is None:
            return x
        b, t = x.shape[:2]
        return torch.cat([token.expand(b, t, 1, -1), x], dim=2)

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n == "pos_embed" or n.endswith("cls_token")}


class ViViTFactorisedEncoder(_ViViTBase):
    """Model 2: spatial transformer per time step, temporal transformer over the time steps."""

    # the tubelet tokens never pass through the temporal transformer: a masked-prediction
    # objective on them (SimMIM, MPP) would leave it untrained (see the module docstring)
    supports_token_access = False
    supports_mask_token = False

    def __init__(self, image_size, frames, patch_size, frame_patch_size, in_chans, dim, spatial_depth, temporal_depth,
                 heads, mlp_ratio=4.0, qkv_bias=True, pool="cls", drop=0.0, head_dim=None, mlp_dim=None, proj_bias=True,
                 patch_norm=False, norm_eps=1e-6):
        super().__init__()
        self._common(image_size, frames, patch_size, frame_patch_size, in_chans, dim, pool, patch_norm, norm_eps)
        cls = pool == "cls"
        # prefix tokens of the output: the temporal class token, then one token per time step
        self.num_prefix_tokens = int(cls) + self.grid_size[0]
        self.spatial_cls_token = nn.Parameter(torch.zeros(1, 1, 1, dim)) if cls else None
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cls else None
        blocks = dict(head_dim=head_dim, proj_bias=proj_bias, mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.spatial_blocks = transformer(dim, spatial_depth, heads, mlp_ratio, qkv_bias, drop, **blocks)
        self.spatial_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_blocks = transformer(dim, temporal_depth, heads, mlp_ratio, qkv_bias, drop, **blocks)
        self.temporal_norm = nn.LayerNorm(dim, eps=norm_eps)
        self._init()

    def spatial(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tubelet tokens with positions (B, N, D) -> spatial outputs (B, T', Ps+n, D) after the spatial norm."""
        x = self._spatial_cls(self._by_time(tokens), self.spatial_cls_token)
        b = x.shape[0]
        x = rearrange(x, "b t l d -> (b t) l d")
        for block in self.spatial_blocks:
            x = block(x)
        return rearrange(self.spatial_norm(x), "(b t) l d -> b t l d", b=b)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, P+N, D): [temporal class token, one token per time step] after the
        temporal norm, then the N tubelet tokens after the spatial norm."""
        x = self.spatial(tokens)  # (B, T', Ps+n, D)
        ps = int(self.spatial_cls_token is not None)
        steps = x[:, :, 0] if ps else x.mean(dim=2)  # (B, T', D)
        if self.temporal_cls_token is not None:
            steps = torch.cat([self.temporal_cls_token.expand(x.shape[0], -1, -1), steps], dim=1)  # (B, 1+T', D)
        for block in self.temporal_blocks:
            steps = block(steps)
        patches = rearrange(x[:, :, ps:], "b t n d -> b (t n) d")  # (B, N, D)
        return torch.cat([self.temporal_norm(steps), patches], dim=1)  # (B, P+N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.pool_type == "cls":
            return tokens[:, 0]
        return tokens[:, : self.num_prefix_tokens].mean(dim=1)  # mean of the time-step tokens

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Softmax attention of one spatial block (default the last) on clips x: (B, T', heads, L, L)
        with L = Ps + n, the spatial class token first (the picture of what each time step attends to)."""
        t = self.spatial_blocks
        h = self._spatial_cls(self._by_time(self.embed_patches(x) + self.pos_embed), self.spatial_cls_token)
        b = h.shape[0]
        h = rearrange(h, "b t l d -> (b t) l d")
        index = range(len(t))[block]
        for blk in t[:index]:
            h = blk(h)
        probs = t[index].attn.attention_probs(t[index].norm1(h))
        return rearrange(probs, "(b t) h i j -> b t h i j", b=b)


class ViViTFactorisedSelfAttention(_ViViTBase):
    """Model 3: every block attends over space, then over time, then an MLP."""

    def __init__(self, image_size, frames, patch_size, frame_patch_size, in_chans, dim, depth, heads, mlp_ratio=4.0,
                 qkv_bias=True, pool="cls", drop=0.0, head_dim=None, mlp_dim=None, proj_bias=True, patch_norm=False,
                 norm_eps=1e-6):
        super().__init__()
        self._common(image_size, frames, patch_size, frame_patch_size, in_chans, dim, pool, patch_norm, norm_eps)
        cls = pool == "cls"
        self.num_prefix_tokens = self.grid_size[0] if cls else 0  # one class token per time step
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 1, dim)) if cls else None
        self.blocks = nn.ModuleList(
            FactorisedBlock(dim, heads, mlp_dim or int(dim * mlp_ratio), qkv_bias, drop, head_dim, proj_bias, norm_eps)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self._init()

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, P+N, D): the per-time-step class tokens, then the N tubelet tokens."""
        x = self._spatial_cls(self._by_time(tokens), self.cls_token)  # (B, T', Ps+n, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        p = int(self.cls_token is not None)
        patches = rearrange(x[:, :, p:], "b t n d -> b (t n) d")
        return torch.cat([x[:, :, 0], patches], dim=1) if p else patches  # (B, P+N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool_type == "cls" else tokens.mean(dim=1)

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Softmax spatial attention of one block (default the last): (B, T', heads, L, L), L = Ps + n."""
        h = self._spatial_cls(self._by_time(self.embed_patches(x) + self.pos_embed), self.cls_token)
        index = range(len(self.blocks))[block]
        for blk in self.blocks[:index]:
            h = blk(h)
        b = h.shape[0]
        blk = self.blocks[index]
        probs = blk.attn_s.attention_probs(blk.norm_s(rearrange(h, "b t l d -> (b t) l d")))
        return rearrange(probs, "(b t) h i j -> b t h i j", b=b)


@register("vivit", example=dict(image_size=16, frames=4, patch_size=4, frame_patch_size=2, in_chans=1, dim=48,
                                spatial_depth=1, temporal_depth=1, heads=4))
def vivit(
    image_size: int | tuple[int, int] = 224,
    frames: int = 16,
    patch_size: int = 16,
    frame_patch_size: int = 2,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    spatial_depth: int | None = None,
    temporal_depth: int | None = None,
    heads: int | None = None,
    variant: str = "factorized_encoder",
    pool: str = "cls",
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop: float = 0.0,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    proj_bias: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> _ViViTBase:
    """ViViT over clips (B, C, T, H, W), tubelets frame_patch_size x patch_size x patch_size.
    variant 'factorized_encoder' (spatial then temporal transformer; size sets the spatial ViT and a
    temporal depth of 4) or 'factorized_self_attention' (space-then-time attention in every block;
    spatial_depth = temporal_depth = the number of blocks, as vit-pytorch asks). pool 'cls' or 'mean'.
    head_dim / mlp_dim / proj_bias / patch_norm / norm_eps express vit-pytorch's layout (see the
    converter); the defaults follow timm (Conv3d tubelets, qkv bias, LayerNorm eps 1e-6)."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, spatial_depth, temporal_depth "
                         "and heads")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: allowed are {', '.join(map(repr, VARIANTS))}")
    d, ls, lt, h = SIZES[size]
    dim, heads = dim or d, heads or h
    spatial_depth = spatial_depth or ls
    for name, value in (("spatial_depth", spatial_depth), ("temporal_depth", temporal_depth), ("heads", heads)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, pool=pool, drop=drop, head_dim=head_dim, mlp_dim=mlp_dim,
                  proj_bias=proj_bias, patch_norm=patch_norm, norm_eps=norm_eps)
    if variant == "factorized_self_attention":
        if temporal_depth is not None and temporal_depth != spatial_depth:
            raise ValueError(f"spatial_depth={spatial_depth} and temporal_depth={temporal_depth}: with "
                             "variant='factorized_self_attention' every block attends over space and time, so the two "
                             "depths must be equal (or leave temporal_depth unset)")
        return ViViTFactorisedSelfAttention(image_size, frames, patch_size, frame_patch_size, in_chans, dim,
                                            spatial_depth, heads, **common)
    return ViViTFactorisedEncoder(image_size, frames, patch_size, frame_patch_size, in_chans, dim, spatial_depth,
                                  temporal_depth or lt, heads, **common)


# --------------------------------------------------------------------------- vit-pytorch converter

def _fsa_rules() -> list[tuple[str, str]]:
    src, dst = r"factorized_transformer\.layers", "blocks"
    rules = []
    for index, (norm, attn) in enumerate((("norm_s", "attn_s"), ("norm_t", "attn_t"))):
        rules += [
            (rf"{src}\.(\d+)\.{index}\.norm\.(weight|bias)", rf"{dst}.\1.{norm}.\2"),
            (rf"{src}\.(\d+)\.{index}\.to_qkv\.weight", rf"{dst}.\1.{attn}.qkv.weight"),
            (rf"{src}\.(\d+)\.{index}\.to_out\.0\.(weight|bias)", rf"{dst}.\1.{attn}.proj.\2"),
        ]
    return rules + [
        (rf"{src}\.(\d+)\.2\.net\.0\.(weight|bias)", rf"{dst}.\1.norm2.\2"),
        (rf"{src}\.(\d+)\.2\.net\.1\.(weight|bias)", rf"{dst}.\1.mlp.fc1.\2"),
        (rf"{src}\.(\d+)\.2\.net\.4\.(weight|bias)", rf"{dst}.\1.mlp.fc2.\2"),
        (r"factorized_transformer\.norm\.(weight|bias)", r"norm.\1"),
        (r"spatial_cls_token", "cls_token"),
    ]


@register_vit_pytorch("vivit")
def _vivit(state: dict[str, torch.Tensor], *, image_size, image_patch_size, frames, frame_patch_size, num_classes, dim,
           spatial_depth, temporal_depth, heads, mlp_dim, pool: str = "cls", channels: int = 3, dim_head: int = 64,
           dropout: float = 0.0, emb_dropout: float = 0.0, variant: str = "factorized_encoder") -> Classifier:
    """vit_pytorch.vivit.ViT (1.16.0), both variants."""
    patch = square_patch(image_patch_size)
    encoder = variant == "factorized_encoder"
    if encoder:
        rules = block_rules(r"spatial_transformer\.layers", "spatial_blocks") + block_rules(
            r"temporal_transformer\.layers", "temporal_blocks") + [
            (r"spatial_transformer\.norm\.(weight|bias)", r"spatial_norm.\1"),
            (r"temporal_transformer\.norm\.(weight|bias)", r"temporal_norm.\1"),
            (r"spatial_cls_token", "spatial_cls_token"),
            (r"temporal_cls_token", "temporal_cls_token"),
        ]
    else:
        rules = _fsa_rules()
    state = rename(state, rules + TUBELET_RULES + [
        (r"pos_embedding", "pos_embed"),
        (r"mlp_head\.(weight|bias)", r"head.\1"),
    ])
    state["pos_embed"] = rearrange(state["pos_embed"], "1 t n d -> 1 (t n) d")
    for name in ("spatial_cls_token", "cls_token"):  # (1, 1, D) there, (1, 1, 1, D) here: one per time step
        if name in state:
            state[name] = state[name].unsqueeze(1)
    if heads == 1 and dim_head == dim:
        if encoder:
            names = [f"spatial_blocks.{i}.attn.proj" for i in range(spatial_depth)]
            names += [f"temporal_blocks.{i}.attn.proj" for i in range(temporal_depth)]
        else:
            names = [f"blocks.{i}.{a}.proj" for i in range(spatial_depth) for a in ("attn_s", "attn_t")]
        identity_projection(state, names, dim)
    backbone = create("vivit", image_size=image_size, frames=frames, patch_size=patch, frame_patch_size=frame_patch_size,
                      in_chans=channels, dim=dim, spatial_depth=spatial_depth, temporal_depth=temporal_depth,
                      heads=heads, variant=variant, pool=pool, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False,
                      patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


# --------------------------------------------------------------------------- reference configurations

for _size in ("small", "base"):
    _dim, _ls, _lt, _heads = SIZES[_size]
    _vp = dict(image_size=224, image_patch_size=16, frames=16, frame_patch_size=2, num_classes=1000, dim=_dim,
               spatial_depth=_ls, temporal_depth=_lt, heads=_heads, mlp_dim=4 * _dim, dim_head=64)
    _ours = dict(image_size=224, frames=16, patch_size=16, frame_patch_size=2, in_chans=3, dim=_dim, spatial_depth=_ls,
                 temporal_depth=_lt, heads=_heads, head_dim=64, mlp_dim=4 * _dim, qkv_bias=False, patch_norm=True,
                 norm_eps=1e-5)
    register_reference("vivit", _size, "vit_pytorch.vivit:ViT", _vp, _ours, (3, 16, 224, 224))
