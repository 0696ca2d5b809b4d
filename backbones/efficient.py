"""Efficient ViT: a ViT shell whose token mixer is chosen by name (vit_pytorch.efficient.ViT).

vit-pytorch's efficient ViT takes any transformer object (Linformer, Nystromformer, ...) from an
outside package. A backbone here must be rebuilt from JSON-serialisable settings, so the mixer is a
name, `mixer="linformer"`, with its own settings in `mixer_options={"k": 64}`, resolved through a
small registry of mixers. Everything else is our ViT: patch embedding, class token, learned
positions, pre-norm blocks (norm, mixer, residual; norm, MLP, residual), final norm, pooling.

Mixers built in:
- "attention": full softmax attention (layers.Attention); the shell is then exactly our `vit`.
- "linformer" (Wang et al., 2020): keys and values are projected along the sequence from N to `k`
  tokens by learned (N, k) matrices, shared by the heads (`share_kv`: one matrix for both). Cost
  O(N k); the sequence length is fixed at construction, so it can neither drop tokens (no MAE)
  nor take another image size.
- "nystrom" (Xiong et al., 2021): softmax attention approximated through `num_landmarks` landmarks
  (segment means of queries and keys), the Moore-Penrose inverse of the landmark kernel by
  `pinv_iterations` Newton-Schulz steps, plus a depthwise convolution of the values along the
  sequence (`conv_kernel`, 0 for none). Cost O(N m); any sequence length (segments may be uneven,
  and with m >= n the landmarks are the tokens themselves), so token drop works (MAE) and so do
  other image sizes. On a subset of tokens the convolution mixes neighbours in sequence order,
  which is then not spatial order.

Your own mixer: decorate a factory (a function or an nn.Module class) taking the keyword arguments
dim, heads, seq_len, head_dim, qkv_bias plus its own options, and returning a module that maps
(B, n, dim) -> (B, n, dim):

    @register_mixer("my_mixer", any_length=True)
    def my_mixer(dim, heads, seq_len, head_dim, qkv_bias, window=7): ...

    backbones.create("efficient", mixer="my_mixer", mixer_options={"window": 5})

The registration must run (be imported) before a saved backbone that uses it is loaded.
Capability flags are per instance, from the mixer: `supports_token_drop` and `supports_any_size`
follow `any_length`, `attention_maps` follows the registration (the module must then offer
`attention_probs(x)` like layers.Attention).

vit-pytorch's efficient ViT takes its transformer from the `nystrom-attention` / `linformer` packages
(test and benchmark dependencies only, imported lazily): `vit_pytorch_efficient` builds it from
plain keyword arguments, so the reference configurations at the end of this file (the family
benchmark's rows: "small"/"base" with Nystromformer, "small-linformer"/"base-linformer" with
Linformer) can be built on both sides. There is no weight converter: the two implementations are
the same idea, not the same network (see the references' notes).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from einops import rearrange
from torch import nn

from .base import register
from .convert import register_reference
from .layers import Attention, Mlp, init_weights
from .layers import SIZES
from .vit import ViT

# --------------------------------------------------------------------------- the mixer registry

#: keyword arguments every mixer factory is called with (its own options come on top)
MIXER_ARGS = ("dim", "heads", "seq_len", "head_dim", "qkv_bias")


@dataclass(frozen=True)
class MixerSpec:
    name: str
    factory: Callable[..., nn.Module]
    any_length: bool  # runs on a sequence of any length (token drop, other image sizes)
    attention_maps: bool  # the module has attention_probs(x) -> (B, H, n, n)
    options: tuple[str, ...]  # the factory's own keyword options (mixer_options)


_MIXERS: dict[str, MixerSpec] = {}


def register_mixer(name: str, *, any_length: bool, attention_maps: bool = False) -> Callable:
    """Register a token-mixer factory under `name` (see the module docstring for its signature)."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice")
        params = inspect.signature(factory).parameters
        missing = [a for a in MIXER_ARGS if a not in params]
        if missing:
            raise ValueError(f"mixer {name!r}: its factory must take the keyword arguments {', '.join(MIXER_ARGS)} "
                             f"(it lacks {', '.join(missing)})")
        options = tuple(p for p, v in params.items() if p not in MIXER_ARGS and p != "self"
                        and v.kind not in (v.VAR_KEYWORD, v.VAR_POSITIONAL))
        _MIXERS[name] = MixerSpec(name, factory, any_length, attention_maps, options)
        return factory

    return deco


def list_mixers() -> list[str]:
    return sorted(_MIXERS)


def mixer_spec(name: str) -> MixerSpec:
    if name not in _MIXERS:
        raise ValueError(f"mixer={name!r} is not registered; registered mixers are: {', '.join(list_mixers())} "
                         "(add your own with backbones.efficient.register_mixer)")
    return _MIXERS[name]


def build_mixer(name: str, options: dict[str, Any] | None, **args: Any) -> nn.Module:
    """The mixer `name` built with the standard arguments `args` and its own `options`."""
    spec = mixer_spec(name)
    options = dict(options or {})
    unknown = [k for k in options if k not in spec.options]
    if unknown:
        raise ValueError(f"mixer_options: mixer {name!r} has no option {unknown[0]!r}; its options are: "
                         f"{', '.join(spec.options) or 'none'}")
    return spec.factory(**args, **options)


# --------------------------------------------------------------------------- built-in mixers

@register_mixer("attention", any_length=True, attention_maps=True)
def full_attention(dim: int, heads: int, seq_len: int, head_dim: int | None, qkv_bias: bool) -> nn.Module:
    """Exact softmax attention over all tokens (the reference point for the approximations)."""
    return Attention(dim, heads, qkv_bias=qkv_bias, head_dim=head_dim)


@register_mixer("linformer", any_length=False)
class LinformerAttention(nn.Module):
    """Softmax attention whose keys and values are first projected along the sequence, N -> k."""

    def __init__(self, dim: int, heads: int, seq_len: int, head_dim: int | None, qkv_bias: bool, k: int = 256,
                 share_kv: bool = False):
        super().__init__()
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"mixer_options: k={k!r} (the projected sequence length) must be an integer >= 1")
        self.heads, self.seq_len = heads, seq_len
        inner = heads * (head_dim or dim // heads)
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        bound = 1 / math.sqrt(k)
        self.proj_k = nn.Parameter(torch.empty(seq_len, k).uniform_(-bound, bound))
        self.proj_v = None if share_kv else nn.Parameter(torch.empty(seq_len, k).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.seq_len:
            raise ValueError(
                f"the linformer mixer projects a fixed sequence of {self.seq_len} tokens, got {x.shape[1]}: it cannot "
                "run on a subset of the patches (no token drop, so no MAE) nor at another image size; "
                "use mixer='nystrom' (any length) for that"
            )
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        proj_v = self.proj_k if self.proj_v is None else self.proj_v
        k = torch.einsum("bhnd,nk->bhkd", k, self.proj_k.to(k.dtype))  # (B, H, k, d)
        v = torch.einsum("bhnd,nk->bhkd", v, proj_v.to(v.dtype))
        out = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


def segment_means(n: int, m: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(m, n) averaging matrix: row j is the mean over tokens i with floor(i * m / n) == j, the m
    contiguous segments of a sequence of n (m <= n: every segment holds at least one token)."""
    seg = torch.arange(n, device=device) * m // n  # (n,)
    onehot = (seg[None, :] == torch.arange(m, device=device)[:, None]).to(dtype)  # (m, n)
    return onehot / onehot.sum(dim=1, keepdim=True)


def iterative_pinv(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """Moore-Penrose inverse of each (m, m) matrix by Newton-Schulz iterations (Nystromformer):
    Z0 = A^T / (||A||_1 ||A||_inf), Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4."""
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    norm = a.abs().sum(dim=-1).amax(dim=-1) * a.abs().sum(dim=-2).amax(dim=-1)  # (...)
    z = a.transpose(-1, -2) / norm[..., None, None]
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


@register_mixer("nystrom", any_length=True)
class NystromAttention(nn.Module):
    """Softmax attention approximated through landmarks: softmax(Q Kl^T) pinv(softmax(Ql Kl^T)) softmax(Ql K^T) V."""

    def __init__(self, dim: int, heads: int, seq_len: int, head_dim: int | None, qkv_bias: bool,
                 num_landmarks: int = 64, pinv_iterations: int = 6, conv_kernel: int = 33):
        super().__init__()
        for field, value, low in (("num_landmarks", num_landmarks, 1), ("pinv_iterations", pinv_iterations, 1),
                                  ("conv_kernel", conv_kernel, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"mixer_options: {field}={value!r} must be an integer >= {low}")
        if conv_kernel and conv_kernel % 2 == 0:
            raise ValueError(f"mixer_options: conv_kernel={conv_kernel} must be odd (or 0 for no convolution)")
        self.heads, self.num_landmarks, self.pinv_iterations = heads, num_landmarks, pinv_iterations
        self.head_dim = head_dim or dim // heads
        inner = heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.proj = nn.Linear(inner, dim)
        self.conv = (nn.Conv2d(heads, heads, (conv_kernel, 1), padding=(conv_kernel // 2, 0), groups=heads, bias=False)
                     if conv_kernel else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[1]
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q = q * self.head_dim ** -0.5
        seg = segment_means(n, min(self.num_landmarks, n), x.device, q.dtype)  # (m, n)
        q_l, k_l = seg @ q, seg @ k  # (B, H, m, d)
        a1 = (q @ k_l.transpose(-1, -2)).softmax(dim=-1)  # (B, H, n, m)
        a3 = (q_l @ k.transpose(-1, -2)).softmax(dim=-1)  # (B, H, m, n)
        with torch.autocast(x.device.type, enabled=False):  # the inverse in float32, also under mixed precision
            a2 = (q_l.float() @ k_l.float().transpose(-1, -2)).softmax(dim=-1)  # (B, H, m, m)
            pinv = iterative_pinv(a2, self.pinv_iterations)
        out = a1 @ (pinv.to(v.dtype) @ (a3 @ v))  # (B, H, n, d)
        if self.conv is not None:
            out = out + self.conv(v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


# --------------------------------------------------------------------------- the shell

class MixerBlock(nn.Module):
    """Pre-norm block around any token mixer: x + mixer(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, mixer: nn.Module, mlp_dim: int, drop: float, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = mixer
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class EfficientViT(ViT):
    """Our ViT with every block's attention replaced by the chosen mixer; the capability flags
    are set per instance from the mixer (see the module docstring)."""

    def __init__(self, image_size: int | tuple[int, int], patch_size: int, in_chans: int, size: str, dim: int | None,
                 depth: int | None, heads: int | None, mixer: str, mixer_options: dict[str, Any] | None,
                 mlp_ratio: float, qkv_bias: bool, pool: str, class_token: bool, drop: float, head_dim: int | None,
                 mlp_dim: int | None, patch_norm: bool, norm_eps: float):
        spec = mixer_spec(mixer)
        if mixer_options is not None and not isinstance(mixer_options, dict):
            raise ValueError(f"mixer_options={mixer_options!r} must be a dict of the mixer's options, e.g. "
                             f"{{'num_landmarks': 32}}; mixer {mixer!r} takes: {', '.join(spec.options) or 'none'}")
        depth = depth if depth is not None else SIZES.get(size, (0, 1, 0))[1]
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth={depth!r} must be an integer >= 1")
        # the shell: our ViT with one block (it checks every setting), whose blocks are then replaced
        super().__init__(image_size, patch_size, in_chans, size, dim, 1, heads, mlp_ratio, qkv_bias,
                         class_token=class_token, pos_embed="learned", pool=pool, drop=drop, head_dim=head_dim,
                         mlp_dim=mlp_dim, patch_norm=patch_norm, norm_eps=norm_eps)
        dim, heads = self.embed_dim, self.blocks[0].attn.heads
        seq_len = self.num_prefix_tokens + self.num_patches
        self.blocks = nn.ModuleList(
            MixerBlock(dim, build_mixer(mixer, mixer_options, dim=dim, heads=heads, seq_len=seq_len, head_dim=head_dim,
                                        qkv_bias=qkv_bias),
                       mlp_dim or int(dim * mlp_ratio), drop, norm_eps)
            for _ in range(depth))
        self.blocks.apply(init_weights)  # linears and norms; a mixer's own parameters keep their own init
        self.mixer = mixer
        self.supports_token_drop = spec.any_length
        self.supports_any_size = spec.any_length
        self.attention_maps = spec.attention_maps

    def attention_probs(self, x: torch.Tensor, block: int = -1) -> torch.Tensor:
        """Softmax attention (B, H, P+N, P+N) of one block (default the last), for a mixer that
        has attention maps ("attention")."""
        if not self.attention_maps:
            raise ValueError(f"mixer={self.mixer!r} has no attention maps of its own (its attention is not over the "
                             "patches, or only approximated): build with mixer='attention' for pictures")
        self.check_input(x)
        tokens = self.embed_patches(x) + self.pos_embed_for(None)
        index = range(len(self.blocks))[block]
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
            tokens = torch.cat([cls, tokens], dim=1)  # (B, P+N, D)
        for blk in self.blocks[:index]:
            tokens = blk(tokens)
        blk = self.blocks[index]
        return blk.attn.attention_probs(blk.norm1(tokens))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.supports_any_size:  # a fixed-length mixer: the built size only
            self.check_input(x)
        return super().forward_features(x)


@register("efficient", example=dict(image_size=28, patch_size=4, in_chans=1, dim=64, depth=2, heads=4, mixer="nystrom",
                                    mixer_options={"num_landmarks": 8, "conv_kernel": 9}))
def efficient(
    image_size: int | tuple[int, int] = 224,
    patch_size: int = 16,
    in_chans: int = 3,
    size: str = "base",
    dim: int | None = None,
    depth: int | None = None,
    heads: int | None = None,
    mixer: str = "nystrom",
    mixer_options: dict[str, Any] | None = None,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    pool: str = "cls",
    class_token: bool = True,
    drop: float = 0.0,
    head_dim: int | None = None,
    mlp_dim: int | None = None,
    patch_norm: bool = False,
    norm_eps: float = 1e-6,
) -> EfficientViT:
    """A ViT (sizes as `vit`) whose attention is the token mixer `mixer` ("nystrom", "linformer",
    "attention", or one registered with register_mixer), set up by `mixer_options` (linformer: k,
    share_kv; nystrom: num_landmarks, pinv_iterations, conv_kernel)."""
    return EfficientViT(image_size, patch_size, in_chans, size, dim, depth, heads, mixer, mixer_options, mlp_ratio,
                        qkv_bias, pool, class_token, drop, head_dim, mlp_dim, patch_norm, norm_eps)


# --------------------------------------------------------------------------- vit-pytorch's efficient ViT (reference)

def vit_pytorch_efficient(mixer: str, image_size: int, patch_size: int, num_classes: int, dim: int, depth: int,
                          heads: int, channels: int = 3, **mixer_kwargs: Any) -> nn.Module:
    """vit_pytorch.efficient.ViT (1.16.0) with the transformer of the outside package named by `mixer`:
    "nystrom" -> nystrom_attention.Nystromformer(dim, depth, heads, **mixer_kwargs) (0.0.14: dim_head,
    num_landmarks, pinv_iterations, attn_values_residual, attn_values_residual_conv_kernel, ...),
    "linformer" -> linformer.Linformer(dim, seq_len, depth, heads, **mixer_kwargs) (0.2.3: k, dim_head,
    share_kv, one_kv_head, ...; seq_len is the patches + the class token). The packages are needed
    only here: pip install nystrom-attention==0.0.14 linformer==0.2.3."""
    from vit_pytorch.efficient import ViT as VpEfficientViT

    if mixer == "nystrom":
        from nystrom_attention import Nystromformer

        transformer = Nystromformer(dim=dim, depth=depth, heads=heads, **mixer_kwargs)
    elif mixer == "linformer":
        from linformer import Linformer

        h, w = image_size if isinstance(image_size, tuple) else (image_size, image_size)
        seq_len = (h // patch_size) * (w // patch_size) + 1  # + the class token
        transformer = Linformer(dim=dim, seq_len=seq_len, depth=depth, heads=heads, **mixer_kwargs)
    else:
        raise ValueError(f"mixer={mixer!r}: vit-pytorch's efficient ViT is built here with 'nystrom' "
                         "(nystrom-attention) or 'linformer' (linformer)")
    return VpEfficientViT(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=dim,
                          transformer=transformer, channels=channels)


def ours_like_vit_pytorch_efficient(mixer: str, image_size: int, patch_size: int, num_classes: int, dim: int,
                                    depth: int, heads: int, channels: int = 3, **mixer_kwargs: Any) -> dict[str, Any]:
    """Our `efficient` keyword arguments closest to vit_pytorch_efficient(same arguments): vit-pytorch's
    layout (LayerNorm'd patch embedding, no qkv bias, LayerNorm eps 1e-5), the package's head width
    and MLP width (4 dim), and its mixer settings."""
    kw = dict(image_size=image_size, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth, heads=heads,
              mlp_dim=4 * dim, qkv_bias=False, patch_norm=True, norm_eps=1e-5, mixer=mixer)
    if mixer == "nystrom":  # Nystromformer's defaults where not given
        kw["head_dim"] = mixer_kwargs.get("dim_head", 64)
        residual = mixer_kwargs.get("attn_values_residual", True)
        kw["mixer_options"] = dict(num_landmarks=mixer_kwargs.get("num_landmarks", 256),
                                   pinv_iterations=mixer_kwargs.get("pinv_iterations", 6),
                                   conv_kernel=mixer_kwargs.get("attn_values_residual_conv_kernel", 33) if residual else 0)
    elif mixer == "linformer":  # Linformer's defaults where not given
        if mixer_kwargs.get("one_kv_head") or mixer_kwargs.get("reversible"):
            raise ValueError("our linformer mixer has no one_kv_head / reversible option")
        kw["head_dim"] = mixer_kwargs.get("dim_head") or dim // heads
        kw["mixer_options"] = dict(k=mixer_kwargs.get("k", 256), share_kv=mixer_kwargs.get("share_kv", False))
    else:
        raise ValueError(f"mixer={mixer!r}: only 'nystrom' and 'linformer' have a vit-pytorch counterpart")
    return kw


_NYSTROM_NOTE = (
    "nystrom-attention 0.0.14 Nystromformer (64 landmarks, 6 pinv steps, value conv 33, heads of 64): the same "
    "tensors; the forward differs: it front-pads the 197 tokens with 59 zeros to 256 (4 per landmark), and the "
    "zeros enter the landmark means and softmaxes (ours: 64 uneven segments of the real tokens); its pinv scale is "
    "one max over the batch (ours per matrix, fp32)")
_LINFORMER_NOTE = (
    "linformer 0.2.3 Linformer (k=64 of 197 tokens, separate E and F, heads of 64): the same count (its "
    "to_q/to_k/to_v, our fused qkv) and the same forward given the same weights; it slices E, F for "
    "shorter sequences, ours refuses other lengths")

for _size, (_dim, _depth, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12)}.items():
    _base = dict(image_size=224, patch_size=16, num_classes=1000, dim=_dim, depth=_depth, heads=_heads)
    for _mixer, _mk, _suffix, _note in (
            ("nystrom", dict(dim_head=64, num_landmarks=64, pinv_iterations=6, attn_values_residual=True,
                             attn_values_residual_conv_kernel=33), "", _NYSTROM_NOTE),
            ("linformer", dict(k=64, dim_head=64, share_kv=False), "-linformer", _LINFORMER_NOTE)):
        _vp = dict(mixer=_mixer, **_base, **_mk)
        # one row per (family, size) for bench.families: Nystromformer at "small"/"base", Linformer beside it
        register_reference("efficient", _size + _suffix, "backbones.efficient:vit_pytorch_efficient", _vp,
                           ours_like_vit_pytorch_efficient(**_vp), (3, 224, 224), note=_note)
