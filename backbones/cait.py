"""CaiT: Going deeper with Image Transformers (Touvron et al., 2021).

What makes CaiT different from a ViT:
- LayerScale: every residual branch is multiplied by a learned per-channel factor, initialised
  small (0.1 / 1e-5 / 1e-6 by depth), so deep stacks train.
- Talking-heads attention in the self-attention stage: the attention logits are mixed across
  heads before the softmax and the probabilities again after it (two learned heads x heads
  matrices), so no fused SDPA kernel applies there.
- Two stages: the patch tokens (with positions, no class token) go through the self-attention
  stage; then a short class-attention stage updates only the class token, which attends to
  [itself, patch tokens]. The patch tokens never see the class token.

Both stages take any number of patch tokens, so MAE can run the encoder on the visible 25 %.
forward_features returns [class token, patch tokens] after the final norm; the pooled embedding
is the class token. The defaults follow the paper (timm's layout: norm of [cls, patches] in
class attention, no talking heads there, qkv bias, LayerNorm eps 1e-6); `class_talking_heads`,
`class_norm_patches=False`, `patch_norm`, `qkv_bias=False`, `norm_eps=1e-5` express vit-pytorch's
CaiT exactly (see the converter at the end).
"""
from __future__ import annotations

import re

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import (Block, DropPath, Mlp, NormPatchEmbed, PatchEmbed, init_patch_embed, init_weights, resize_pos_embed,
                     trunc_normal_)

# name -> (dim, depth, heads), as in the CaiT paper (head width 48 throughout); cls_depth 2
SIZES = {
    "xxs24": (192, 24, 4),
    "xxs36": (192, 36, 4),
    "xs24": (288, 24, 6),
    "xs36": (288, 36, 6),
    "s24": (384, 24, 8),
    "s36": (384, 36, 8),
    "s48": (384, 48, 8),
    "m24": (768, 24, 16),
    "m36": (768, 36, 16),
    "m48": (768, 48, 16),
}


def layer_scale_init(depth: int) -> float:
    """The paper's LayerScale initialisation (section 2): 0.1 up to depth 18, 1e-5 up to 24, 1e-6 beyond."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


def mixed_attention(q: torch.Tensor, k: torch.Tensor, mix_pre: torch.Tensor | None,
                    mix_post: torch.Tensor | None) -> torch.Tensor:
    """Softmax attention (B, H, Nq, Nk) of q (B, H, Nq, d) over k (B, H, Nk, d), with talking heads
    when mixing matrices (H, H) are given: logits and probabilities of new head g are
    sum_h W[h, g] * (those of head h)."""
    dots = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5  # (B, H, Nq, Nk)
    if mix_pre is not None:
        dots = torch.einsum("bhij,hg->bgij", dots, mix_pre)
    attn = dots.softmax(dim=-1)
    if mix_post is not None:
        attn = torch.einsum("bhij,hg->bgij", attn, mix_post)
    return attn


class TalkingHeadsAttention(nn.Module):
    """Self-attention with talking heads (Shazeer et al., 2020): the logits are mixed across heads
    before the softmax and the probabilities after it. The mixing matrices start as the identity,
    so a fresh layer is plain multi-head attention."""

    records_attention = True  # eval.attention records it (ClassAttention, one query, is not recorded)

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 proj_drop: float = 0.0):
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim, or set head_dim")
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias)
        self.mix_pre = nn.Parameter(torch.eye(heads))  # (H, H) logits mixing
        self.mix_post = nn.Parameter(torch.eye(heads))  # (H, H) probabilities mixing
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return mixed_attention(q, k, self.mix_pre, self.mix_post), v  # (B, H, N, N), (B, H, N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn, v = self._attend(x)
        return self.proj_drop(self.proj(rearrange(attn @ v, "b h n d -> b n (h d)")))  # (B, N, D)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The attention (B, H, N, N) applied to the values, after the post-softmax mixing (its rows
        need not sum to 1 once the mixing is trained); x is the normalised block input."""
        return self._attend(x)[0]


class ClassAttention(nn.Module):
    """Attention of the class token (the only query) over [class token, patch tokens]; with
    `talking_heads` (vit-pytorch's CaiT) the heads are mixed as in TalkingHeadsAttention,
    otherwise (the paper) it is plain attention through the fused SDPA kernel."""

    def __init__(self, dim: int, heads: int, head_dim: int | None = None, qkv_bias: bool = True, proj_bias: bool = True,
                 talking_heads: bool = False, proj_drop: float = 0.0):
        super().__init__()
        if head_dim is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim, or set head_dim")
        self.heads = heads
        self.head_dim = head_dim or dim // heads
        inner = heads * self.head_dim
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, inner * 2, bias=qkv_bias)
        self.mix_pre = nn.Parameter(torch.eye(heads)) if talking_heads else None
        self.mix_post = nn.Parameter(torch.eye(heads)) if talking_heads else None
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, query: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        q = rearrange(self.q(query), "b n (h d) -> b h n d", h=self.heads)  # (B, H, 1, d)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)  # (B, H, 1+N, d)
        return q, k, v

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """query (B, 1, D) the class token, context (B, 1+N, D) -> (B, 1, D)."""
        q, k, v = self._qkv(query, context)
        if self.mix_pre is None:
            out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, 1, d)
        else:
            out = mixed_attention(q, k, self.mix_pre, self.mix_post) @ v
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))

    def attention_probs(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The class token's attention (B, H, 1, 1+N) over [class token, patches] (post-mixing)."""
        q, k, _ = self._qkv(query, context)
        return mixed_attention(q, k, self.mix_pre, self.mix_post)


class LayerScaleBlock(Block):
    """A pre-norm block of the self-attention stage: x + g1 * attn(norm(x)), x + g2 * mlp(norm(x)),
    with talking-heads attention and per-channel LayerScale factors g1, g2."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, init_scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, head_dim: int | None = None, drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6):
        super().__init__(dim, heads, qkv_bias=qkv_bias, drop=drop, head_dim=head_dim, proj_bias=proj_bias,
                         mlp_dim=mlp_dim, norm_eps=norm_eps)
        self.attn = TalkingHeadsAttention(dim, heads, head_dim, qkv_bias, proj_bias, proj_drop=drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_scale))
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_scale))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.gamma_1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x)))

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) of this block's attention, from the block's input x (B, N, D)."""
        return self.attn.attention_probs(self.norm1(x))


class ClassAttentionBlock(nn.Module):
    """A block of the class-attention stage: only the class token is updated,
    cls + g1 * CA(cls | [cls, patches]), cls + g2 * mlp(norm(cls)). `norm_patches` (the paper)
    normalises [cls, patches] with norm1 before the keys and values; vit-pytorch normalises the
    class token only and takes the patch tokens as they come out of the self-attention stage."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, init_scale: float, qkv_bias: bool = True,
                 proj_bias: bool = True, head_dim: int | None = None, talking_heads: bool = False,
                 norm_patches: bool = True, drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        self.norm_patches = norm_patches
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = ClassAttention(dim, heads, head_dim, qkv_bias, proj_bias, talking_heads, proj_drop=drop)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_scale))
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_scale))
        self.drop_path = DropPath(drop_path)

    def _inputs(self, cls: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        query = self.norm1(cls)  # (B, 1, D)
        patches = self.norm1(patches) if self.norm_patches else patches
        return query, torch.cat([query, patches], dim=1)  # (B, 1, D), (B, 1+N, D)

    def forward(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """cls (B, 1, D), patches (B, N, D) -> the updated class token (B, 1, D)."""
        cls = cls + self.drop_path(self.gamma_1 * self.attn(*self._inputs(cls, patches)))
        return cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(cls)))

    def attention_probs(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """(B, H, 1, 1+N): the class token's attention over [class token, patches]."""
        return self.attn.attention_probs(*self._inputs(cls, patches))


class CaiT(Backbone):
    supports_token_access = True
    supports_token_drop = True  # both stages take any subset of the patch tokens
    supports_mask_token = True  # the base class's forward_masked, from token access
    attention_maps = True  # attention_probs(x): the last class-attention layer's map
    supports_any_size = True  # forward at other sizes interpolates the patch positions

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        size: str = "s24",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        cls_depth: int = 2,
        head_dim: int | None = None,
        mlp_ratio: float = 4.0,
        mlp_dim: int | None = None,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        init_scale: float | None = None,
        class_talking_heads: bool = False,
        class_norm_patches: bool = True,
        patch_norm: bool = False,
        norm_eps: float = 1e-6,
        drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, depth and heads")
        d, L, h = SIZES[size]
        dim, depth, heads = dim or d, depth or L, heads or h
        for name, value in (("in_chans", in_chans), ("patch_size", patch_size), ("depth", depth),
                            ("cls_depth", cls_depth), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path={drop_path} must be in [0, 1) (the paper uses 0.05-0.4 by size)")

        self.image_size = image_size_2d(image_size)
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, dim
        self.num_prefix_tokens = 1  # the class token, added before the class-attention stage
        mlp_dim = mlp_dim or int(dim * mlp_ratio)
        scale = layer_scale_init(depth) if init_scale is None else init_scale

        if patch_norm:  # vit-pytorch's layout: LayerNorm, Linear, LayerNorm over (p1 p2 c) patches
            self.patch_embed = NormPatchEmbed(self.image_size, patch_size, in_chans, dim, norm_eps)
        else:
            self.patch_embed = PatchEmbed(self.image_size, patch_size, in_chans, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, dim))  # patches only; the class token has none
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        common = dict(qkv_bias=qkv_bias, proj_bias=proj_bias, head_dim=head_dim, drop=drop, norm_eps=norm_eps)
        self.blocks = nn.ModuleList(
            LayerScaleBlock(dim, heads, mlp_dim, scale, drop_path=drop_path, **common) for _ in range(depth)
        )
        self.blocks_token_only = nn.ModuleList(
            ClassAttentionBlock(dim, heads, mlp_dim, scale, talking_heads=class_talking_heads,
                                norm_patches=class_norm_patches, **common)
            for _ in range(cls_depth)
        )
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self._init()

    def _init(self) -> None:
        self.apply(init_weights)  # linears and norms; LayerScale and head-mixing parameters keep their values
        if isinstance(self.patch_embed, PatchEmbed):
            init_patch_embed(self.patch_embed)
        trunc_normal_(self.pos_embed)
        trunc_normal_(self.cls_token)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[class token, patch tokens] (B, 1+N, D) after the final norm, at the built size or any
        other multiple of the patch size (the positions are resampled to the input's grid)."""
        self.check_input(x, any_size=True)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos = resize_pos_embed(self.pos_embed, self.grid_size, grid)  # (1, gh*gw, D)
        return self.forward_tokens(self.patch_embed(x) + pos)

    # -- token-level protocol ------------------------------------------------------------
    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        return self.pos_embed  # (1, N, D)

    def _stages(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention stage over the patches, then the class-attention stage except its last
        block: (patch tokens (B, n, D), class token (B, 1, D) entering the last class block)."""
        for block in self.blocks:
            tokens = block(tokens)  # (B, n, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        for block in self.blocks_token_only[:-1]:
            cls = block(cls, tokens)
        return tokens, cls

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens, cls = self._stages(tokens)
        cls = self.blocks_token_only[-1](cls, tokens)
        return self.norm(torch.cat([cls, tokens], dim=1))  # (B, 1+n, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]  # the class token

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """The class token's attention in the last class-attention block (B, H, 1, 1+N) over
        [class token, patches]: what an attention picture shows (drop column 0 and reshape the
        rest to the grid). Every block also has attention_probs(block input) of its own."""
        self.check_input(x)
        tokens, cls = self._stages(self.patch_embed(x) + self.pos_embed)
        return self.blocks_token_only[-1].attention_probs(cls, tokens)

    def prefix_only_parameters(self) -> list[nn.Parameter]:
        """The parameters only the pooled embedding depends on: the class token and the
        class-attention stage (the patch tokens never see them). Objectives that read patch
        tokens alone (SimMIM, MPP) cannot train them; they are trained by those that pool
        (DINO, supervised, distillation, fine-tuning) and by MAE, whose decoder takes the class token."""
        return [self.cls_token, *self.blocks_token_only.parameters()]

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}


@register("cait", example=dict(image_size=28, patch_size=4, in_chans=1, dim=32, depth=2, cls_depth=1, heads=4))
def cait(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "s24",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    cls_depth: int = 2,
    head_dim: int | None = None,
    mlp_ratio: float = 4.0,
    mlp_dim: int | None = None,
    qkv_bias: bool = True,
    proj_bias: bool = True,
    init_scale: float | None = None,
    class_talking_heads: bool = False,
    class_norm_patches: bool = True,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
    drop: float = 0.0,
    drop_path: float = 0.0,
) -> CaiT:
    """CaiT: `size` one of xxs24 ... m48 (the paper's models; dim, depth, heads override it),
    `cls_depth` class-attention blocks, `init_scale` LayerScale's initial value (None: the paper's
    rule by depth), `drop_path` the stochastic-depth rate of every self-attention block (constant,
    as the paper; none in the class-attention stage). `class_talking_heads=True`,
    `class_norm_patches=False`, `patch_norm=True`, `qkv_bias=False`, `norm_eps=1e-5` give vit-pytorch's CaiT."""
    return CaiT(image_size, patch_size, in_chans, size, dim, depth, heads, cls_depth, head_dim, mlp_ratio, mlp_dim,
                qkv_bias, proj_bias, init_scale, class_talking_heads, class_norm_patches, patch_norm, norm_eps, drop,
                drop_path)


# --------------------------------------------------------------------------- vit-pytorch

def _stage_rules(vp_stage: str, ours: str) -> list[tuple[str, str]]:
    s = rf"{vp_stage}\.layers\.(\d+)"
    return [
        (rf"{s}\.0\.scale", rf"{ours}.\1.gamma_1"),
        (rf"{s}\.0\.fn\.norm\.(weight|bias)", rf"{ours}.\1.norm1.\2"),
        (rf"{s}\.0\.fn\.to_q\.weight", rf"{ours}.\1.attn.q.weight"),
        (rf"{s}\.0\.fn\.to_kv\.weight", rf"{ours}.\1.attn.kv.weight"),
        (rf"{s}\.0\.fn\.mix_heads_pre_attn", rf"{ours}.\1.attn.mix_pre"),
        (rf"{s}\.0\.fn\.mix_heads_post_attn", rf"{ours}.\1.attn.mix_post"),
        (rf"{s}\.0\.fn\.to_out\.0\.(weight|bias)", rf"{ours}.\1.attn.proj.\2"),
        (rf"{s}\.1\.scale", rf"{ours}.\1.gamma_2"),
        (rf"{s}\.1\.fn\.net\.0\.(weight|bias)", rf"{ours}.\1.norm2.\2"),
        (rf"{s}\.1\.fn\.net\.1\.(weight|bias)", rf"{ours}.\1.mlp.fc1.\2"),
        (rf"{s}\.1\.fn\.net\.4\.(weight|bias)", rf"{ours}.\1.mlp.fc2.\2"),
    ]


_CAIT_RULES = _stage_rules("patch_transformer", "blocks") + _stage_rules("cls_transformer", "blocks_token_only") + [
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
    (r"pos_embedding", "pos_embed"),
    (r"cls_token", "cls_token"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
]


@register_vit_pytorch("cait")
def _cait(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, cls_depth, heads, mlp_dim,
          dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0, layer_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.cait.CaiT (1.16.0): 3-channel input, LayerNorm'd patch embedding, no class
    position, talking heads in both stages, class attention over [norm(cls), raw patches], the
    final norm on the class token only (ours normalises every token; the class token's value is
    the same). Training-only regularisers differ: `dropout` maps to `drop`, vit-pytorch's
    `layer_dropout` (whole layers skipped for the whole batch) to per-sample stochastic depth
    `drop_path`, `emb_dropout` has no counterpart; in eval mode the logits agree."""
    state = rename(state, _CAIT_RULES)
    for key in [k for k in state if re.fullmatch(r"blocks\.\d+\.attn\.q\.weight", k)]:  # fuse q and kv into qkv
        prefix = key[: -len("q.weight")]
        state[prefix + "qkv.weight"] = torch.cat([state.pop(key), state.pop(prefix + "kv.weight")], dim=0)
    for key in [k for k in state if k.endswith(("gamma_1", "gamma_2"))]:
        state[key] = state[key].reshape(-1)  # (1, 1, D) -> (D,)
    backbone = create("cait", image_size=image_size, patch_size=patch_size, in_chans=3, dim=dim, depth=depth,
                      heads=heads, cls_depth=cls_depth, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False,
                      class_talking_heads=True, class_norm_patches=False, patch_norm=True, norm_eps=1e-5,
                      drop=dropout, drop_path=layer_dropout)
    return classifier_from(backbone, state)


def _vp_and_ours(dim: int, depth: int, heads: int) -> tuple[dict, dict]:
    vp = dict(image_size=224, patch_size=16, num_classes=1000, dim=dim, depth=depth, cls_depth=2, heads=heads,
              mlp_dim=4 * dim, dim_head=48)
    ours = dict(image_size=224, patch_size=16, in_chans=3, dim=dim, depth=depth, heads=heads, cls_depth=2, head_dim=48,
                mlp_dim=4 * dim, qkv_bias=False, class_talking_heads=True, class_norm_patches=False, patch_norm=True,
                norm_eps=1e-5)
    return vp, ours


# small: CaiT-S24 (ViT-S width); base: CaiT-M24 (the paper's M width, ViT-B's, at depth 24)
register_reference("cait", "small", "vit_pytorch.cait:CaiT", *_vp_and_ours(*SIZES["s24"]), (3, 224, 224))
register_reference("cait", "base", "vit_pytorch.cait:CaiT", *_vp_and_ours(*SIZES["m24"]), (3, 224, 224))
