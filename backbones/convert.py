"""Bring weights from vit-pytorch (lucidrains) into our backbones.

vit-pytorch saves bare state dicts and no config, so a converter takes the state dict and the
keyword arguments the vit-pytorch model was built with, builds the matching backbone of ours
(with the options that reproduce that package's layout: LayerNorm'd patch embedding, no qkv bias,
LayerNorm eps 1e-5, ...) and returns a `Classifier`: our backbone plus a linear head that gives
the same logits as the vit-pytorch model (tested within 1e-5).

    from backbones.convert import from_vit_pytorch
    model = from_vit_pytorch("vit", torch.load("vit.pt", weights_only=True), image_size=224, patch_size=16,
                             num_classes=1000, dim=768, depth=12, heads=12, mlp_dim=3072)
    backbones.save(model.backbone, "out/"); backbones.save_head(model.head, "out/")

Every key of the given state dict must be used and every parameter of ours filled: a leftover or
a gap is an error naming the keys, never a silent partial load.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .base import Classifier, create

Converter = Callable[..., Classifier]
_CONVERTERS: dict[str, Converter] = {}


def register_vit_pytorch(family: str) -> Callable[[Converter], Converter]:
    """Register `fn(state_dict, **vit_pytorch_kwargs) -> Classifier` for one family."""

    def deco(fn: Converter) -> Converter:
        if family in _CONVERTERS:
            raise ValueError(f"a vit-pytorch converter for {family!r} is registered twice")
        _CONVERTERS[family] = fn
        return fn

    return deco


def vit_pytorch_families() -> list[str]:
    return sorted(_CONVERTERS)


def from_vit_pytorch(family: str, state_dict: dict[str, torch.Tensor] | nn.Module, **kwargs: Any) -> Classifier:
    """Our backbone + head from a vit-pytorch model's state dict (or the model itself) and the
    keyword arguments it was built with."""
    if family not in _CONVERTERS:
        raise ValueError(f"no vit-pytorch converter for {family!r}; families with one: {', '.join(vit_pytorch_families())}")
    if isinstance(state_dict, nn.Module):
        state_dict = state_dict.state_dict()
    return _CONVERTERS[family](dict(state_dict), **kwargs)


def rename(state: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Rename every key by the first rule (regex, replacement) whose regex matches it in full; a
    key no rule matches is an error (nothing is dropped silently). A replacement of "" drops
    the key on purpose (an empty parameter, for example)."""
    out, unmatched = {}, []
    for key, value in state.items():
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                if repl:
                    out[re.sub(pattern, repl, key)] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(f"vit-pytorch keys this converter does not know: {unmatched[:8]}"
                         f"{' ...' if len(unmatched) > 8 else ''}; was the model built with other options?")
    return out


def classifier_from(backbone: nn.Module, state: dict[str, torch.Tensor], head_prefix: str = "head.") -> Classifier:
    """Split the renamed state into backbone and head (`head.weight`, `head.bias`) and load both
    strictly."""
    head_state = {k[len(head_prefix):]: v for k, v in state.items() if k.startswith(head_prefix)}
    body = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    try:
        backbone.load_state_dict(body, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise ValueError(f"converted weights do not fit the backbone ({' '.join(lines[1:3])[:400]}): "
                         "were the vit-pytorch keyword arguments the ones the model was built with?") from None
    if "weight" not in head_state:
        raise ValueError("the vit-pytorch state dict has no classifier head: pass the whole model's state dict")
    k, d = head_state["weight"].shape
    head = nn.Linear(d, k, bias="bias" in head_state)
    head.load_state_dict(head_state, strict=True)
    return Classifier(backbone, head)


def identity_projection(state: dict[str, torch.Tensor], names: list[str], dim: int) -> None:
    """vit-pytorch drops the attention output projection when heads == 1 and dim_head == dim;
    ours always has one: fill it with the identity (and zero bias) so the outputs agree."""
    for name in names:
        state.setdefault(f"{name}.weight", torch.eye(dim))
        state.setdefault(f"{name}.bias", torch.zeros(dim))


# --------------------------------------------------------------------------- reference configurations

@dataclass(frozen=True)
class Reference:
    """One family at one size, as vit-pytorch builds it and as we build it (the same network):
    what the parameter-count table and the family benchmark compare."""

    family: str  # our registry name
    size: str  # "small" or "base"
    vp_class: str  # "vit_pytorch.cait:CaiT"
    vp_kwargs: dict[str, Any]
    ours: dict[str, Any]  # kwargs of backbones.create(family, ...)
    input_shape: tuple[int, ...]  # one sample, (C, H, W) / (C, T, H, W) / (C, L)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


REFERENCES: list[Reference] = []


def register_reference(family: str, size: str, vp_class: str, vp_kwargs: dict[str, Any], ours: dict[str, Any],
                       input_shape: tuple[int, ...], note: str = "") -> None:
    REFERENCES.append(Reference(family, size, vp_class, dict(vp_kwargs), dict(ours), tuple(input_shape), note))


def build_vit_pytorch(ref: Reference) -> nn.Module:
    """The vit-pytorch model of a reference (needs the package: pip install --no-deps vit-pytorch==1.16.0)."""
    import importlib

    module, cls = ref.vp_class.split(":")
    return getattr(importlib.import_module(module), cls)(**ref.vp_kwargs)


# --------------------------------------------------------------------------- ViT and SimpleViT

_VIT_BLOCK_RULES = [
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.to_qkv\.weight", r"blocks.\1.attn.qkv.weight"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.0\.to_out\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.0\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.1\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.net\.[34]\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"transformer\.norm\.(weight|bias)", r"norm.\1"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.norm_in.\1"),
    (r"to_patch_embedding\.2\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"to_patch_embedding\.3\.(weight|bias)", r"patch_embed.norm_out.\1"),
]


@register_vit_pytorch("vit")
def _vit(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
         pool: str = "cls", channels: int = 3, dim_head: int = 64, dropout: float = 0.0, emb_dropout: float = 0.0) -> Classifier:
    """vit_pytorch.ViT (1.16.0)."""
    rules = _VIT_BLOCK_RULES + [
        (r"cls_token", "cls_token" if pool == "cls" else ""),  # (1, 0, D) when pool='mean'
        (r"pos_embedding", "pos_embed"),
        (r"mlp_head\.(weight|bias)", r"head.\1"),
    ]
    state = rename(state, rules)
    if heads == 1 and dim_head == dim:
        identity_projection(state, [f"blocks.{i}.attn.proj" for i in range(depth)], dim)
    backbone = create("vit", image_size=image_size, patch_size=patch_size, in_chans=channels, dim=dim, depth=depth,
                      heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, pool=pool,
                      class_token=pool == "cls", patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


@register_vit_pytorch("simple_vit")
def _simple_vit(state: dict[str, torch.Tensor], *, image_size, patch_size, num_classes, dim, depth, heads, mlp_dim,
                channels: int = 3, dim_head: int = 64) -> Classifier:
    """vit_pytorch.SimpleViT (1.16.0)."""
    state = rename(state, _VIT_BLOCK_RULES + [(r"linear_head\.(weight|bias)", r"head.\1")])
    backbone = create("simple_vit", image_size=image_size, patch_size=patch_size, in_chans=channels, dim=dim,
                      depth=depth, heads=heads, head_dim=dim_head, mlp_dim=mlp_dim, qkv_bias=False, proj_bias=False,
                      patch_norm=True, norm_eps=1e-5)
    return classifier_from(backbone, state)


for _size, (_dim, _depth, _heads) in {"small": (384, 12, 6), "base": (768, 12, 12)}.items():
    _vp = dict(image_size=224, patch_size=16, num_classes=1000, dim=_dim, depth=_depth, heads=_heads,
               mlp_dim=4 * _dim, dim_head=64)
    _ours = dict(image_size=224, patch_size=16, in_chans=3, dim=_dim, depth=_depth, heads=_heads, head_dim=64,
                 mlp_dim=4 * _dim, qkv_bias=False, patch_norm=True, norm_eps=1e-5)
    register_reference("vit", _size, "vit_pytorch.vit:ViT", _vp, _ours, (3, 224, 224))
    register_reference("simple_vit", _size, "vit_pytorch.simple_vit:SimpleViT", _vp, {**_ours, "proj_bias": False},
                       (3, 224, 224))
