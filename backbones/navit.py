"""NaViT (Dehghani et al., 2023, "Patch n' Pack"): a ViT at native resolution.

What makes it different from ViT:
- images of different sizes (and aspect ratios) are packed into one sequence; attention is masked
  block-diagonally, so each image attends only to its own tokens (`forward_packed`, `pack`);
- factorised learned positions: a row embedding plus a column embedding, so any grid up to the
  largest one (`image_size`) has positions without interpolation;
- token dropping per image (a share of each image's patches is left out of the sequence);
- attention pooling per image: a learned query attends to that image's tokens (then a LayerNorm);
- query-key normalisation (each head's q and k scaled to norm sqrt(head_dim) times a learned gain;
  the logits are not divided by sqrt(head_dim) again) and LayerNorms without bias, as vit-pytorch.

`forward(x)` takes an ordinary batch (B, C, H, W) of one size (any multiple of the patch size up to
`image_size`): each image is then its own sequence and no mask is needed. The token-level protocol
(MAE, SimMIM, MPP) works at the built size, where every image has the full grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from .base import Backbone, Classifier, create, image_size_2d, register
from .convert import classifier_from, register_reference, register_vit_pytorch, rename
from .layers import SIZES, Attention, Block, NormPatchEmbed, init_weights, trunc_normal_

TokenDrop = float | Callable[[int, int], float]


def layer_norm(dim: int, eps: float, bias: bool) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps, bias=bias)


class QKNorm(nn.Module):
    """Per-head RMS normalisation of queries or keys (ViT-22B, vit-pytorch's NaViT): unit L2 norm
    times sqrt(head_dim) times a learned gain. (B, H, N, d) -> (B, H, N, d)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.scale = head_dim ** 0.5
        self.weight = nn.Parameter(torch.ones(heads, 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * self.weight


class QKNormAttention(Attention):
    """layers.Attention with q and k normalised per head; the logits are q . k (no 1/sqrt(d): the
    norms already fix their scale, the gains learn the temperature)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None, qkv_bias: bool, proj_bias: bool, drop: float):
        super().__init__(dim, heads, qkv_bias=qkv_bias, proj_drop=drop, head_dim=head_dim, proj_bias=proj_bias)
        self.q_norm = QKNorm(heads, self.head_dim)
        self.k_norm = QKNorm(heads, self.head_dim)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v  # (B, H, N, d) each

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        drop = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=1.0)  # (B, H, N, d)
        return self.proj_drop(self.proj(rearrange(x, "b h n d -> b n (h d)")))

    def attention_probs(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, _ = self._qkv(x)
        return _softmax(q @ k.transpose(-2, -1), attn_mask)  # (B, H, N, N)


def _softmax(dots: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
    if attn_mask is not None:
        dots = dots.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else dots + attn_mask
    return dots.softmax(dim=-1)


class NaBlock(Block):
    """layers.Block with LayerNorms without bias (`norm_bias=False`) and q/k normalisation (`qk_norm`)."""

    def __init__(self, dim: int, heads: int, head_dim: int | None, mlp_dim: int, qk_norm: bool, norm_bias: bool,
                 norm_eps: float, qkv_bias: bool, proj_bias: bool, drop: float):
        super().__init__(dim, heads, qkv_bias=qkv_bias, drop=drop, head_dim=head_dim, proj_bias=proj_bias,
                         mlp_dim=mlp_dim, norm_eps=norm_eps)
        if not norm_bias:
            self.norm1, self.norm2 = layer_norm(dim, norm_eps, False), layer_norm(dim, norm_eps, False)
        if qk_norm:
            self.attn = QKNormAttention(dim, heads, head_dim, qkv_bias, proj_bias, drop)


class AttentionPool(nn.Module):
    """Multi-head attention pooling: `queries` copies of one learned query (LayerNorm'd) attend to
    the tokens, plus the query itself (residual). tokens (B, N, D) -> (B, M, D); `attn_mask`
    (B, 1, M, N) says which tokens each query reads (NaViT: query m reads image m's tokens)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, norm_bias: bool, norm_eps: float,
                 qkv_bias: bool, proj_bias: bool):
        super().__init__()
        self.heads, inner = heads, heads * head_dim
        self.query = nn.Parameter(torch.zeros(dim))
        self.norm = layer_norm(dim, norm_eps, norm_bias)
        self.q = nn.Linear(dim, inner, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.q_norm = QKNorm(heads, head_dim) if qk_norm else nn.Identity()
        self.k_norm = QKNorm(heads, head_dim) if qk_norm else nn.Identity()
        self.scale = 1.0 if qk_norm else None

    def _qkv(self, tokens: torch.Tensor, queries: int) -> tuple[torch.Tensor, ...]:
        query = self.query.expand(tokens.shape[0], queries, -1)  # (B, M, D)
        q = rearrange(self.q(self.norm(query)), "b m (h d) -> b h m d", h=self.heads)
        k, v = rearrange(self.kv(tokens), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return query, self.q_norm(q), self.k_norm(k), v

    def forward(self, tokens: torch.Tensor, queries: int = 1, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        query, q, k, v = self._qkv(tokens, queries)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=self.scale)  # (B, H, M, d)
        return self.proj(rearrange(out, "b h m d -> b m (h d)")) + query  # (B, M, D)

    def attention_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooling query's attention over the tokens (B, H, N)."""
        _, q, k, _ = self._qkv(tokens, 1)
        scale = 1.0 if self.scale is not None else q.shape[-1] ** -0.5
        return _softmax(q @ k.transpose(-2, -1) * scale, None)[:, :, 0]  # (B, H, N)


@dataclass
class Packed:
    """Images packed into sequences (what `NaViT.pack` returns). S sequences of L tokens (the
    longest; shorter ones zero-padded), tokens in the order of `groups`."""

    patches: torch.Tensor  # (S, L, p*p*C) patch values (p1 p2 c), zeros at padding
    rows: torch.Tensor  # (S, L) long, the row of each token's patch (0 at padding)
    cols: torch.Tensor  # (S, L) long, the column
    image_ids: torch.Tensor  # (S, L) long, the image's place in its sequence; -1 at padding
    groups: list[list[int]]  # indices (into the input list) of the images of each sequence
    lengths: list[int]  # tokens kept of each input image (after token dropping), input order
    num_patches: list[int]  # patches of each input image before dropping


class NaViT(Backbone):
    supports_token_access = True  # at the built size: factorised positions for every patch
    supports_token_drop = True  # tokens carry their own positions and attention pooling reads any subset
    supports_mask_token = True  # the default forward_masked over token access
    attention_maps = True
    supports_any_size = True  # any grid up to image_size has positions (no interpolation)

    def __init__(
        self,
        image_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        size: str = "base",
        dim: int | None = None,
        depth: int | None = None,
        heads: int | None = None,
        head_dim: int | None = None,
        mlp_dim: int | None = None,
        mlp_ratio: float = 4.0,
        max_seq_len: int = 2048,
        qk_norm: bool = True,
        norm_bias: bool = False,
        qkv_bias: bool = False,
        proj_bias: bool = False,
        norm_eps: float = 1e-5,
        drop: float = 0.0,
    ):
        super().__init__()
        if size not in SIZES:
            raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}; or set dim, depth and heads")
        d, L, h = SIZES[size]
        dim, depth, heads = dim or d, depth or L, heads or h
        if in_chans < 1 or patch_size < 1 or depth < 1:
            raise ValueError(f"in_chans={in_chans}, patch_size={patch_size}, depth={depth} must all be >= 1")
        if head_dim is None and dim % heads:
            raise ValueError(f"heads={heads} must divide dim={dim}: pick heads from the divisors of dim, "
                             "or set head_dim")
        self.image_size = image_size_2d(image_size)
        self.patch_size, self.in_chans, self.embed_dim = patch_size, in_chans, dim
        self.num_prefix_tokens = 0
        self.patch_embed = NormPatchEmbed(self.image_size, patch_size, in_chans, dim, norm_eps)  # checks divisibility
        if max_seq_len < self.num_patches:
            raise ValueError(f"max_seq_len={max_seq_len} is shorter than one image of image_size={self.image_size} "
                             f"({self.num_patches} patches): set max_seq_len >= {self.num_patches}")
        self.max_seq_len = max_seq_len
        if not norm_bias:  # vit-pytorch's NaViT: LayerNorms without bias
            self.patch_embed.norm_in = layer_norm(self.patch_pixels, norm_eps, False)
            self.patch_embed.norm_out = layer_norm(dim, norm_eps, False)
        gh, gw = self.grid_size
        self.pos_embed_h = nn.Parameter(torch.zeros(gh, dim))  # one per row
        self.pos_embed_w = nn.Parameter(torch.zeros(gw, dim))  # one per column
        head_dim = head_dim or dim // heads
        mlp_dim = mlp_dim or int(dim * mlp_ratio)
        self.blocks = nn.ModuleList(
            NaBlock(dim, heads, head_dim, mlp_dim, qk_norm, norm_bias, norm_eps, qkv_bias, proj_bias, drop)
            for _ in range(depth)
        )
        self.norm = layer_norm(dim, norm_eps, norm_bias)
        self.attn_pool = AttentionPool(dim, heads, head_dim, qk_norm, norm_bias, norm_eps, qkv_bias, proj_bias)
        self.fc_norm = layer_norm(dim, norm_eps, norm_bias)  # vit-pytorch: the first layer of mlp_head
        self._init()

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_weights(m)
        for p in (self.pos_embed_h, self.pos_embed_w, self.attn_pool.query):
            trunc_normal_(p)

    # -- positions ------------------------------------------------------------------------
    def _grid(self, h: int, w: int) -> tuple[int, int]:
        p, (H, W) = self.patch_size, self.image_size
        if h % p or w % p or h < p or w < p or h > H or w > W:
            raise ValueError(
                f"an image of {h} x {w} px does not fit: height and width must be multiples of the patch size {p} "
                f"and at most image_size={H} x {W} (the largest grid with positions); resize the image, or build "
                f"the backbone with a larger image_size"
            )
        return h // p, w // p

    def patch_positions(self, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Row + column embeddings of a (gh, gw) grid (default: the built one) -> (1, gh*gw, D)."""
        gh, gw = grid or self.grid_size
        pos = self.pos_embed_h[:gh, None, :] + self.pos_embed_w[None, :gw, :]  # (gh, gw, D)
        return rearrange(pos, "h w d -> 1 (h w) d")

    # -- fixed-size batches ---------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the final norm (B, gh*gw, D) for a batch of one size up to image_size."""
        self.check_input(x, any_size=True)
        grid = self._grid(*x.shape[-2:])
        return self.forward_tokens(self.patch_embed(x) + self.patch_positions(grid))

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.patch_embed(x)  # (B, N, D)

    def forward_tokens(self, tokens: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Blocks + final norm over tokens (B, n, D) that already carry their positions; `attn_mask`
        (B, 1, n, n) boolean, True where a query may read a key (packed sequences)."""
        for block in self.blocks:
            tokens = block(tokens, attn_mask=attn_mask)
        return self.norm(tokens)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Attention pooling of all the tokens of each row: (B, n, D) -> (B, D)."""
        return self.fc_norm(self.attn_pool(tokens)[:, 0])

    def pool_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Where the pooling query looks, per head: tokens (B, N, D) -> (B, H, N) (pictures)."""
        return self.attn_pool.attention_probs(tokens)

    # -- packed batches of different sizes ------------------------------------------------
    def pack(self, images: list[torch.Tensor], token_drop: TokenDrop = 0.0,
             generator: torch.Generator | None = None) -> Packed:
        """Patchify images (C, H_i, W_i) of any sizes the backbone takes, drop a share of each
        one's patches (`token_drop`: a float in [0, 1), or a function (height, width) -> float;
        at least one patch is kept: max(1, int(n * (1 - drop)))), and pack them greedily, in
        order, into sequences of at most `max_seq_len` tokens."""
        if not isinstance(images, (list, tuple)) or not images:
            raise ValueError("pack / forward_packed take a non-empty list of (C, H, W) tensors")
        p = self.patch_size
        seqs, rows, cols, lengths, counts = [], [], [], [], []
        for i, img in enumerate(images):
            if not torch.is_tensor(img) or img.ndim != 3 or img.shape[0] != self.in_chans:
                shape = tuple(img.shape) if torch.is_tensor(img) else type(img).__name__
                raise ValueError(f"images[{i}] is {shape}: each image must be a ({self.in_chans}, H, W) tensor")
            h, w = img.shape[-2:]
            gh, gw = self._grid(h, w)
            seq = rearrange(img, "c (h p1) (w p2) -> (h w) (p1 p2 c)", p1=p, p2=p)  # (n, p*p*C)
            r = torch.arange(gh, device=img.device).repeat_interleave(gw)  # (n,)
            c = torch.arange(gw, device=img.device).repeat(gh)
            n = seq.shape[0]
            share = token_drop(h, w) if callable(token_drop) else token_drop
            if not 0.0 <= share < 1.0:
                raise ValueError(f"token_drop={share} (image {i}, {h} x {w}): the share of patches dropped must be "
                                 "in [0, 1) (NaViT trains with 0 to 0.5)")
            keep = max(1, int(n * (1.0 - share)))
            if keep < n:
                ids = torch.rand(n, generator=generator).argsort()[:keep].sort().values.to(img.device)
                seq, r, c = seq[ids], r[ids], c[ids]
            if keep > self.max_seq_len:
                raise ValueError(f"images[{i}] ({h} x {w}) keeps {keep} tokens, more than max_seq_len="
                                 f"{self.max_seq_len}: raise max_seq_len or drop more tokens")
            seqs.append(seq), rows.append(r), cols.append(c), lengths.append(keep), counts.append(n)

        groups, used = [], self.max_seq_len + 1  # greedy: a new sequence when the next image does not fit
        for i, n in enumerate(lengths):
            if used + n > self.max_seq_len:
                groups.append([])
                used = 0
            groups[-1].append(i)
            used += n

        def cat(parts: list[torch.Tensor], group: list[int]) -> torch.Tensor:
            return torch.cat([parts[i] for i in group])

        ids = [torch.cat([torch.full((lengths[i],), m, dtype=torch.long, device=seqs[i].device)
                          for m, i in enumerate(g)]) for g in groups]
        return Packed(
            patches=pad_sequence([cat(seqs, g) for g in groups], batch_first=True),  # (S, L, p*p*C)
            rows=pad_sequence([cat(rows, g) for g in groups], batch_first=True),  # (S, L)
            cols=pad_sequence([cat(cols, g) for g in groups], batch_first=True),
            image_ids=pad_sequence(ids, batch_first=True, padding_value=-1),
            groups=groups, lengths=lengths, num_patches=counts,
        )

    def forward_packed(self, images: list[torch.Tensor], token_drop: TokenDrop = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Pooled embeddings (num_images, D), in input order, of images of different sizes run
        packed (see `pack`): each image attends to its own tokens only and is pooled by its own
        query. Token dropping is applied whenever `token_drop` > 0 (pass 0 to evaluate)."""
        packed = self.pack(images, token_drop, generator)
        pe = self.patch_embed
        x = pe.norm_out(pe.proj(pe.norm_in(packed.patches)))  # (S, L, D)
        x = x + self.pos_embed_h[packed.rows] + self.pos_embed_w[packed.cols]
        ids = packed.image_ids  # (S, L); padding (-1) attends to padding only, real tokens never see it
        x = self.forward_tokens(x, attn_mask=rearrange(ids, "s i -> s 1 i 1") == rearrange(ids, "s j -> s 1 1 j"))
        m = max(len(g) for g in packed.groups)
        queries = torch.arange(m, device=ids.device)
        read = rearrange(queries, "m -> 1 m 1") == rearrange(ids, "s j -> s 1 j")  # (S, M, L): query m reads image m
        read = read | ~read.any(dim=-1, keepdim=True)  # queries without an image (discarded) read everything: no NaN
        pooled = self.fc_norm(self.attn_pool(x, queries=m, attn_mask=read.unsqueeze(1)))  # (S, M, D)
        where = torch.empty(len(images), 2, dtype=torch.long)
        for s, g in enumerate(packed.groups):
            for j, i in enumerate(g):
                where[i] = torch.tensor([s, j])
        where = where.to(pooled.device)
        return pooled[where[:, 0], where[:, 1]]  # (num_images, D)

    def pool_only_parameters(self) -> list[nn.Parameter]:
        """The parameters only the pooled embedding depends on: the attention pooling and its norm
        (the tokens never see them). Objectives that read tokens alone (MAE, SimMIM, MPP) cannot
        train them; DINO, supervised, distillation and fine-tuning do."""
        return [*self.attn_pool.parameters(), *self.fc_norm.parameters()]

    def no_weight_decay(self) -> set[str]:
        gains = {n for n, _ in self.named_parameters() if n.endswith(("q_norm.weight", "k_norm.weight"))}
        return {"pos_embed_h", "pos_embed_w", "attn_pool.query"} | gains


@register("navit", example=dict(image_size=32, patch_size=4, in_chans=1, dim=32, depth=2, heads=2, max_seq_len=256))
def navit(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    mlp_ratio: float = 4.0,
    max_seq_len: int = 2048,
    qk_norm: bool = True,
    norm_bias: bool = False,
    qkv_bias: bool = False,
    proj_bias: bool = False,
    norm_eps: float = 1e-5,
    drop: float = 0.0,
) -> NaViT:
    """NaViT: `image_size` is the largest size it takes (its row / column position tables);
    `max_seq_len` the longest packed sequence of forward_packed. The defaults are the paper's and
    vit-pytorch's layout (q/k normalisation, no biases in LayerNorms, qkv and output projection,
    eps 1e-5); head_dim / mlp_dim as vit-pytorch's dim_head / mlp_dim."""
    return NaViT(image_size, patch_size, in_chans, size, dim, depth, heads, head_dim, mlp_dim, mlp_ratio, max_seq_len,
                 qk_norm, norm_bias, qkv_bias, proj_bias, norm_eps, drop)


# --------------------------------------------------------------------------- vit-pytorch

_L = r"transformer\.layers\.(\d+)"


@register_vit_pytorch("navit")
def _navit(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
           channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0,
           token_dropout_prob=None) -> Classifier:
    """vit_pytorch.na_vit.NaViT (1.16.0). Its LayerNorms keep a zero `beta` buffer (dropped here after
    checking it is zero); its patches are flattened (c p1 p2), ours (p1 p2 c): the first LayerNorm's
    gain and the projection's columns are permuted to match. `token_dropout_prob` is a training
    setting: pass it to forward_packed(token_drop=...)."""
    nonzero = [k for k, v in state.items() if k.endswith(".beta") and v.abs().max() > 0]
    if nonzero:
        raise ValueError(f"LayerNorm biases {nonzero[:4]} are not zero: vit-pytorch's NaViT keeps them at zero; "
                         "this converter builds LayerNorms without bias")
    rules = [
        (r".*\.beta", ""),
        (r"to_patch_embedding\.0\.gamma", "patch_embed.norm_in.weight"),
        (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.proj.\1"),
        (r"to_patch_embedding\.2\.gamma", "patch_embed.norm_out.weight"),
        (r"pos_embed_height", "pos_embed_h"),
        (r"pos_embed_width", "pos_embed_w"),
        (_L + r"\.0\.norm\.gamma", r"blocks.\1.norm1.weight"),
        (_L + r"\.0\.(q|k)_norm\.gamma", r"blocks.\1.attn.\2_norm.weight"),
        (_L + r"\.0\.to_q\.weight", r"blocks.\1.attn.qkv.q"),  # merged below
        (_L + r"\.0\.to_kv\.weight", r"blocks.\1.attn.qkv.kv"),
        (_L + r"\.0\.to_out\.0\.weight", r"blocks.\1.attn.proj.weight"),
        (_L + r"\.1\.0\.gamma", r"blocks.\1.norm2.weight"),
        (_L + r"\.1\.1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
        (_L + r"\.1\.4\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
        (r"transformer\.norm\.gamma", "norm.weight"),
        (r"attn_pool_queries", "attn_pool.query"),
        (r"attn_pool\.norm\.gamma", "attn_pool.norm.weight"),
        (r"attn_pool\.(q|k)_norm\.gamma", r"attn_pool.\1_norm.weight"),
        (r"attn_pool\.to_q\.weight", "attn_pool.q.weight"),
        (r"attn_pool\.to_kv\.weight", "attn_pool.kv.weight"),
        (r"attn_pool\.to_out\.0\.weight", "attn_pool.proj.weight"),
        (r"mlp_head\.0\.gamma", "fc_norm.weight"),
        (r"mlp_head\.1\.weight", "head.weight"),
    ]
    state = rename(state, rules)
    for i in range(depth):
        q, kv = state.pop(f"blocks.{i}.attn.qkv.q"), state.pop(f"blocks.{i}.attn.qkv.kv")
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, kv])  # rows (q, k, v) = "(three h d)"
    p = patch_size
    order = torch.arange(channels * p * p).view(channels, p, p).permute(1, 2, 0).flatten()  # ours -> theirs
    state["patch_embed.norm_in.weight"] = state["patch_embed.norm_in.weight"][order]
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"][:, order]
    backbone = create("navit", image_size=image_size if isinstance(image_size, int) else list(image_size),
                      patch_size=patch_size, in_chans=channels, dim=dim, depth=depth, heads=heads, head_dim=dim_head,
                      mlp_dim=mlp_dim, drop=dropout)
    return classifier_from(backbone, state)


for _size, (_dim, _depth, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12)}.items():
    register_reference(
        "navit", _size, "vit_pytorch.na_vit:NaViT",
        dict(image_size=224, patch_size=16, num_classes=1000, dim=_dim, depth=_depth, heads=_heads, mlp_dim=4 * _dim,
             dim_head=64),
        dict(image_size=224, patch_size=16, in_chans=3, dim=_dim, depth=_depth, heads=_heads, head_dim=64,
             mlp_dim=4 * _dim),
        (3, 224, 224),
        note="vit-pytorch's NaViT takes a list of images: a (B, C, H, W) tensor is packed into ONE sequence of "
             "B*196 tokens with a block-diagonal mask; ours runs a batch as B sequences (forward_packed packs)",
    )
