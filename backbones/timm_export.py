"""Our ViT-family backbones as timm models: the timm architecture, its keyword arguments and the
state dict in timm's key layout, so that

    model = timm.create_model(architecture, pretrained=False, num_classes=0, **model_args)
    model.load_state_dict(state, strict=True)

rebuilds the backbone with the same tokens (`forward_features`) and the same pooled embedding
(`forward_head(..., pre_logits=True)`).

Which backbones map:
- `vit` / `simple_vit` (and any plain `ViT` instance): timm's VisionTransformer. Parameter names
  already match (see backbones.layers); fixed sin-cos positions, a non-persistent buffer of ours,
  become timm's `pos_embed` parameter over the patches only (`no_embed_class=True`, as ours adds
  no position to the class token).
- `vit` with a distillation token: timm's VisionTransformerDistilled (DeiT). Its tokens equal ours;
  its pre-logits embedding is the mean of the class and distillation tokens (DeiT's prediction
  rule) where ours is the class token: take `forward_features(x)[:, 0]` for ours.
- `timm:NAME` backbones: their inner timm model, keys without our `model.` prefix.
Nothing else maps (patch_norm=True, proj_bias=False, head_dim other than dim / heads, LayerNorm eps
other than timm's 1e-6, the other families): `timm_spec` raises TimmUnsupported naming why.

This module imports nothing heavy (no timm) so the export path stays light.
"""
from __future__ import annotations

from typing import Any

import torch

from .base import Backbone

TIMM_PREFIX = "timm:"
TIMM_EPS = 1e-6  # timm's VisionTransformer LayerNorm eps (norm_layer is not a JSON kwarg, so it must match)
SUPPORTED = "vit, simple_vit and timm:NAME backbones"
VIT_ARCH, DEIT_ARCH = "vit_base_patch16_224", "deit_base_distilled_patch16_224"  # model_args override every size


class TimmUnsupported(ValueError):
    """The backbone (or one of its options) has no timm equivalent."""


def _backbone_name(model: Backbone) -> str:
    return getattr(model, "build_config", {}).get("name", type(model).__name__)


def _plain_vit(model: Backbone) -> bool:
    """Our ViT class itself, not a subclass (EfficientViT, SmallDataViT change the token path)."""
    from .vit import ViT

    return type(model) is ViT


def _is_timm(model: Backbone) -> bool:
    from .timm_backbone import TimmBackbone

    return isinstance(model, TimmBackbone)


def _vit_refusals(model: Backbone) -> list[str]:
    """Why this ViT has no timm equivalent (empty when it has one)."""
    from .layers import PatchEmbed

    block, dim = model.blocks[0], model.embed_dim
    why = []
    if not isinstance(model.patch_embed, PatchEmbed):
        why.append("patch_norm=True (timm's patch embedding is one convolution, without LayerNorms)")
    if block.attn.heads * block.attn.head_dim != dim:
        why.append(f"head_dim={block.attn.head_dim} with heads={block.attn.heads} is not dim={dim} wide "
                   "(timm's attention heads are dim / heads wide)")
    hidden = block.mlp.fc1.out_features
    if int(dim * (hidden / dim)) != hidden:
        why.append(f"mlp_dim={hidden} is not int(dim * mlp_ratio) for any ratio timm can rebuild")
    if block.attn.proj.bias is None:
        why.append("proj_bias=False (timm's proj_bias=False also drops the MLP biases, which ours keeps)")
    if model.norm.eps != TIMM_EPS:
        why.append(f"norm_eps={model.norm.eps:g} (timm's ViT LayerNorms use {TIMM_EPS:g})")
    if model.has_distill_token and model.pool_type != "cls":
        why.append("distill_token=True with pool='mean' (timm's distilled ViT pools its two prefix tokens)")
    return why


def _vit_spec(model: Backbone) -> dict[str, Any]:
    """timm VisionTransformer(-Distilled) architecture and keyword arguments of our ViT."""
    block, dim = model.blocks[0], model.embed_dim
    h, w = model.image_size
    args: dict[str, Any] = dict(
        img_size=h if h == w else [h, w], patch_size=model.patch_size, in_chans=model.in_chans, embed_dim=dim,
        depth=len(model.blocks), num_heads=block.attn.heads, mlp_ratio=block.mlp.fc1.out_features / dim,
        qkv_bias=block.attn.qkv.bias is not None, class_token=model.cls_token is not None,
        global_pool="token" if model.pool_type == "cls" else "avg", fc_norm=False,
        no_embed_class=not isinstance(model.pos_embed, torch.nn.Parameter),
    )
    if block.mlp.drop.p:
        args["proj_drop_rate"] = block.mlp.drop.p
    return {"architecture": DEIT_ARCH if model.has_distill_token else VIT_ARCH, "model_args": args}


def timm_spec(model: Backbone) -> dict[str, Any]:
    """{"architecture", "model_args"} of the timm model this backbone's weights load into strictly
    (with pretrained=False, num_classes=0). Raises TimmUnsupported naming the backbone or option."""
    if _is_timm(model):
        cfg = model.build_config
        return {"architecture": cfg["name"][len(TIMM_PREFIX):], "model_args": dict(cfg["kwargs"])}
    if not _plain_vit(model):
        raise TimmUnsupported(f"backbone {_backbone_name(model)!r} has no timm equivalent; --format timm supports "
                              f"{SUPPORTED}: export it with --format vit-ssl and load it with backbones.load")
    why = _vit_refusals(model)
    if why:
        raise TimmUnsupported(f"backbone {_backbone_name(model)!r} with {why[0]} has no timm equivalent: export it "
                              "with --format vit-ssl and load it with backbones.load")
    return _vit_spec(model)


def maps_to_timm(model: Backbone) -> bool:
    try:
        timm_spec(model)
    except TimmUnsupported:
        return False
    return True


def timm_state_dict(model: Backbone) -> dict[str, torch.Tensor]:
    """The weights in timm's key layout (contiguous CPU tensors, ready for safetensors)."""
    spec = timm_spec(model)  # refuses what does not map
    state = dict(model.state_dict())
    if _is_timm(model):
        state = {k[len("model."):]: v for k, v in state.items()}
    elif spec["model_args"]["no_embed_class"]:  # fixed positions: a buffer of ours, a parameter of timm's
        state["pos_embed"] = model.patch_positions()  # (1, N, D), patches only
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def pretrained_cfg(model: Backbone, preprocess: dict[str, Any] | None) -> dict[str, Any]:
    """timm's pretrained_cfg for the exported weights: the input the backbone was trained on and the
    normalisation it expects (mean / std only where the checkpoint records them); the whole image
    resized (bilinear, crop_pct 1), as our evaluation feeds it."""
    cfg: dict[str, Any] = {"input_size": [model.in_chans, *model.image_size], "num_classes": 0,
                           "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "fixed_input_size": True}
    if preprocess and "mean" in preprocess and "std" in preprocess:
        cfg["mean"], cfg["std"] = list(preprocess["mean"]), list(preprocess["std"])
    return cfg


def timm_config(model: Backbone, preprocess: dict[str, Any] | None, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """A timm-style config.json: what timm.create_model("local-dir:DIR") and
    `create_model(architecture, pretrained=False, num_classes=0, **model_args)` read. `provenance`
    (step, objective, source, our name and kwargs) is kept under "vit_ssl"; timm ignores it."""
    spec = timm_spec(model)
    cfg = {"architecture": spec["architecture"], "num_classes": 0, "num_features": model.embed_dim,
           "model_args": spec["model_args"], "pretrained_cfg": pretrained_cfg(model, preprocess)}
    if provenance:
        cfg["vit_ssl"] = provenance
    return cfg
