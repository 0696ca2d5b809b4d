"""Record the attention maps of any backbone that has them (`attention_maps`), for pictures.

The recorder hooks the backbone's self-attention modules (those whose class sets
`records_attention = True`: layers.Attention and its subclasses, CaiT's talking-heads attention,
DeepViT's re-attention) and, on each call, asks the module for its `attention_probs` on the very
inputs it was given. The forward pass itself is untouched: the hooks return nothing, so the output
is what an unhooked forward gives; the fused SDPA kernels still compute it, and the (B, H, N, N)
matrices are computed once more on the side, in eval mode under no_grad.

Which layers are returned: every recorded call that attends over whole samples (its batch is the
input's batch) with the longest sequence. That is every block of the plain token families (vit,
simple_vit, deepvit, small_data_vit, navit, efficient with mixer='attention', vit_1d, vit_3d and
their simple_ variants). Families whose layers differ:

- CaiT: its self-attention stage over the patch tokens (N = num_patches, no class token); the
  class-attention stage (one query, the class token) is not recorded; `backbone.attention_probs(x)`
  gives its last layer's (B, H, 1, 1+N).
- CrossViT: the self-attention layers of the branch with more tokens, the small-patch branch
  (N = 1 + its patches), whose grid is the output grid; the other branch and the cross-attention
  between class tokens are not recorded.
- ViViT factorised encoder: its temporal transformer (N = 1 + time steps): the spatial transformer
  attends per time step, not over a whole sample. The factorised self-attention variant has no
  layer over a whole sample and is refused; `backbone.attention_probs(x)` gives its per-time-step
  spatial maps.

DeepViT's re-attention and trained CaiT talking heads mix the heads after the softmax, so their
rows need not sum to 1; every other family's rows do.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from einops import rearrange
from torch import nn


def _name(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "build_config", None)
    return cfg["name"] if isinstance(cfg, dict) and "name" in cfg else type(backbone).__name__


@lru_cache(maxsize=1)
def attention_families() -> tuple[str, ...]:
    """Registered backbones whose example configuration has attention maps (built once, tiny)."""
    import backbones

    return tuple(n for n in backbones.list_backbones()
                 if backbones.create(n, **backbones.example_config(n)).attention_maps)


def check_attention_maps(backbone: nn.Module) -> None:
    """Refuse a backbone without the attention capability, naming the families that have it."""
    if not getattr(backbone, "attention_maps", False):
        raise ValueError(
            f"backbone {_name(backbone)!r} has no attention maps to record (attention_maps is False); the families "
            f"that have them: {', '.join(attention_families())} (efficient with mixer='attention')"
        )


def recorded_modules(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """The backbone's self-attention modules that can be recorded, in module order."""
    return [(n, m) for n, m in backbone.named_modules() if getattr(m, "records_attention", False)]


class AttentionRecorder:
    """Context manager: while active, every call of a recorded attention module appends its
    attention (B', H, n, n) to `calls` as (module name, float32 tensor). `maps()` selects and
    stacks them (see the module docstring). The backbone is put in eval mode inside and its
    training flag restored on exit; run the forward under no_grad (record_attention does)."""

    def __init__(self, backbone: nn.Module):
        check_attention_maps(backbone)
        self.backbone = backbone
        self.modules = recorded_modules(backbone)
        if not self.modules:
            raise ValueError(f"backbone {_name(backbone)!r} says attention_maps=True but has no recordable "
                             "attention module (records_attention = True on its attention class)")
        self.calls: list[tuple[str, torch.Tensor]] = []
        self._handles: list = []
        self._was_training = backbone.training

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            self.calls.append((name, module.attention_probs(*args, **kwargs).detach().float()))

        return hook

    def __enter__(self) -> "AttentionRecorder":
        self._was_training = self.backbone.training
        self.backbone.eval()
        self.calls = []
        self._handles = [m.register_forward_hook(self._hook(n), with_kwargs=True) for n, m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.backbone.train(self._was_training)

    def maps(self, batch: int, layers: int | Sequence[int] | None = None) -> torch.Tensor:
        """(B, L, H, N, N): the recorded whole-sample layers with the longest sequence, `layers`
        (indices into them, negative from the end) or all."""
        whole = [(n, a) for n, a in self.calls if a.ndim == 4 and a.shape[0] == batch]
        if not whole:
            raise ValueError(
                f"backbone {_name(self.backbone)!r} has no self-attention layer over a whole sample (its attention "
                "is factorised, e.g. per time step): use backbone.attention_probs(x) for its own maps"
            )
        longest = max(a.shape[-1] for _, a in whole)
        kept = [a for _, a in whole if a.shape[-1] == longest]
        heads = kept[0].shape[1]
        kept = [a for a in kept if a.shape[1] == heads]
        return torch.stack([kept[i] for i in _layer_indices(layers, len(kept))], dim=1)  # (B, L, H, N, N)


def _layer_indices(layers: int | Sequence[int] | None, count: int) -> list[int]:
    if layers is None:
        return list(range(count))
    chosen = [layers] if isinstance(layers, int) else list(layers)
    bad = [i for i in chosen if not isinstance(i, int) or not -count <= i < count]
    if bad or not chosen:
        raise ValueError(f"layers={layers!r}: this backbone records {count} self-attention layers, pick indices in "
                         f"0..{count - 1} (or -{count}..-1 from the last)")
    return [i % count for i in chosen]


def record_attention(backbone: nn.Module, x: torch.Tensor, layers: int | Sequence[int] | None = None) -> torch.Tensor:
    """The attention (B, L, H, N, N) float32 of every (or the chosen) self-attention layer,
    recorded during one ordinary forward of `x` in eval mode under no_grad (the backbone's
    training flag is restored). A backbone without `attention_maps` is refused (ValueError)."""
    recorder = AttentionRecorder(backbone)
    with recorder, torch.no_grad():
        backbone(x)
    return recorder.maps(x.shape[0], layers)


def class_attention_maps(attn: torch.Tensor, num_prefix_tokens: int, grid: Sequence[int]) -> torch.Tensor:
    """One layer's attention (B, H, N, N) -> (B, H, gh, gw) over the patch grid: the first (class)
    token's attention to the patches (DINO's picture) when there are prefix tokens, else the mean
    attention each patch receives from all the tokens."""
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn of shape {tuple(attn.shape)}: expected one layer's (B, H, N, N); "
                         "take one layer of record_attention's (B, L, H, N, N), e.g. attn[:, -1]")
    gh, gw = grid
    if attn.shape[-1] - num_prefix_tokens != gh * gw:
        raise ValueError(f"attn over {attn.shape[-1]} tokens does not hold num_prefix_tokens={num_prefix_tokens} "
                         f"plus a {gh}x{gw} grid of patches ({num_prefix_tokens + gh * gw} tokens)")
    if num_prefix_tokens > 0:
        received = attn[:, :, 0, num_prefix_tokens:]  # (B, H, gh*gw)
    else:
        received = attn.mean(dim=2)  # (B, H, N): the mean over queries of each key's attention
    return rearrange(received, "b h (gh gw) -> b h gh gw", gh=gh, gw=gw)


__all__ = ["AttentionRecorder", "attention_families", "check_attention_maps", "class_attention_maps",
           "record_attention", "recorded_modules"]
