"""Any timm model as a backbone: `backbones.create("timm:vit_small_patch16_224", img_size=96)`.

The model is built with `pretrained=False` and no classifier (`num_classes=0`), so nothing is ever
downloaded; `weights=FILE` loads a local .safetensors / .pth file strictly (a classifier head in
the file is dropped by name, since the backbone has none; any other mismatch is an error).

Every timm model gives the pooled embedding (`forward`), so DINO, supervised training and
distillation train it. A timm VisionTransformer (patch embedding, absolute positions, blocks)
also gives token access, so MAE, SimMIM and MPP train it too: tokens are embedded with timm's
own patch embedding, positions are timm's `pos_embed`, and `forward_tokens` runs timm's prefix
tokens, blocks and norm; `pool` is timm's `forward_head(pre_logits=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from .base import Backbone, read_state_dict

PREFIX = "timm:"


def _plain_vit(model: nn.Module) -> bool:
    """timm's own VisionTransformer class (not a subclass such as DeiT-distilled, not EVA or CaiT,
    whose token paths differ) with absolute positions at a fixed size: the models whose token path
    forward_tokens reproduces exactly (tested against timm's forward_features)."""
    from timm.models.vision_transformer import VisionTransformer

    return (type(model) is VisionTransformer and model.pos_embed is not None and not model.dynamic_img_size
            and not getattr(model, "attn_pool", None))


class TimmBackbone(Backbone):
    """A timm model behind our protocol (see the module docstring)."""

    def __init__(self, model_name: str, weights: str | None = None, **timm_kwargs: Any):
        super().__init__()
        import timm

        if "pretrained" in timm_kwargs or "num_classes" in timm_kwargs:
            raise ValueError("timm backbones are built with pretrained=False and num_classes=0: pass weights=FILE for "
                             "trained weights, and put a head on the backbone's embedding yourself")
        try:
            self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **timm_kwargs)
        except RuntimeError as e:  # timm's "Unknown model"
            raise ValueError(f"backbone {PREFIX}{model_name}: {e}; see timm.list_models()") from None
        if weights:
            self._load(weights)
        m = self.model
        cfg = getattr(m, "pretrained_cfg", {}) or {}
        self.embed_dim = m.num_features
        self.in_chans = int(timm_kwargs.get("in_chans", cfg.get("input_size", (3,))[0]))
        size = timm_kwargs.get("img_size", cfg.get("input_size", (3, 224, 224))[1:])
        self.image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.vit = _plain_vit(m)
        if self.vit:
            self.patch_size = int(m.patch_embed.patch_size[0])
            self.num_prefix_tokens = int(m.num_prefix_tokens)
            # token access on timm's ViT: MAE, SimMIM and MPP train it
            self.supports_token_access = self.supports_token_drop = self.supports_mask_token = True
        else:
            info = getattr(m, "feature_info", None)
            self.patch_size = int(info[-1]["reduction"]) if info else 32
            self.num_prefix_tokens = 0

    def _load(self, weights: str) -> None:
        if not Path(weights).is_file():
            raise FileNotFoundError(f"weights={weights!r} is not a file: give a local .safetensors or .pth file "
                                    "(nothing is downloaded)")
        state = read_state_dict(weights)
        head = set(k for k in state if k.split(".")[0] in ("head", "fc", "classifier", "head_dist"))
        own = set(self.model.state_dict())
        dropped = head - own
        state = {k: v for k, v in state.items() if k not in dropped}
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise ValueError(f"weights={weights!r} do not fit this timm model ({' '.join(lines[:2])[:300]}): give "
                             "weights of the same architecture and options") from None

    # -- pooled embedding and tokens -------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # (B, D): timm with num_classes=0 returns the pooled features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.model.forward_features(x)
        if feats.ndim == 4:  # a CNN's (B, C, h, w) map: its positions as tokens
            feats = rearrange(feats, "b c h w -> b (h w) c")
        return feats  # (B, P+N, D)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.vit:
            return tokens.mean(dim=1)
        return self.model.forward_head(tokens, pre_logits=True)  # (B, D)

    # -- token-level protocol (timm VisionTransformer) --------------------------------------
    def _need_vit(self) -> None:
        if not self.vit:
            raise ValueError(f"{type(self.model).__name__} has no patch tokens with absolute positions: token access "
                             "needs a timm VisionTransformer")

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        self._need_vit()
        self.check_input(x)
        return self.model.patch_embed(x)  # (B, N, D)

    def patch_positions(self) -> torch.Tensor:
        self._need_vit()
        m = self.model
        return m.pos_embed if m.no_embed_class else m.pos_embed[:, m.num_prefix_tokens:]  # (1, N, D)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        self._need_vit()
        m, B = self.model, tokens.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, dim=1)  # (B, P, D)
            if not m.no_embed_class:
                prefix = prefix + m.pos_embed[:, : m.num_prefix_tokens]
            tokens = torch.cat([prefix, tokens], dim=1)  # (B, P+n, D)
        x = m.norm_pre(m.pos_drop(tokens))
        for block in m.blocks:
            x = block(x)
        return m.norm(x)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.model, "no_weight_decay", lambda: set())()
        return {f"model.{n}" for n in names}


def build(name: str, kwargs: dict[str, Any]) -> TimmBackbone:
    """`timm:NAME` with timm's keyword arguments (img_size, in_chans, embed_dim, ...) and `weights`.
    The saved config leaves `weights` out: a saved backbone carries its own weights."""
    model = TimmBackbone(name[len(PREFIX):], **kwargs)
    model.build_config = {"name": name, "kwargs": {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in kwargs.items() if k != "weights"}}
    return model
