"""The backbone protocol every family implements, the registry, and save / load.

Objectives never reach into a backbone's attributes beyond what is declared here: they ask the
capability flags, read the geometry (`embed_dim`, `patch_size`, `grid_size`, ...) and call the
token-level methods.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from einops import rearrange

from .layers import gather_tokens, to_2tuple


class CapabilityError(ValueError):
    """An objective was given a backbone that cannot serve it."""


class Backbone(nn.Module):
    """Base class: geometry, capability flags and the token-level interface.

    forward(x)            -> (B, D)    pooled embedding, what evaluators score
    forward_features(x)   -> (B, P+N, D) tokens after the final norm (P prefix tokens first)
    embed_patches(x)      -> (B, N, D)  patch tokens, no positions
    pos_embed_for(ids)    -> (B, n, D)  positions of the patches `ids` (B, n); ids=None: (1, N, D)
    forward_tokens(t)     -> (B, P+n, D) prefix tokens added, blocks + final norm over t (B, n, D)
    pool(tokens)          -> (B, D)
    forward_masked(x, mask, mask_token) -> (B, N, D) patch tokens, masked inputs replaced (SimMIM)
    patchify(x)           -> (B, N, patch_pixels) the input's values under each output token
    unpatchify(t)         -> x

    Geometry: `input_shape` is what one sample looks like ((C, H, W) for images, (C, T, H, W) for
    video, (C, L) for signals); `grid_size` is the token grid of any rank, `num_patches` its size,
    `patch_pixels` the number of input values under one token. A hierarchical backbone's
    `patch_size` is its total stride: its output tokens are `patch_size` pixels apart.
    """

    # capability flags, answered honestly by each family
    supports_token_access: bool = False  # embed_patches / pos_embed_for / forward_tokens work (MPP)
    supports_token_drop: bool = False  # encoder can run on a subset of patches (MAE)
    supports_mask_token: bool = False  # forward_masked: masked inputs replaced by a learned token (SimMIM)
    attention_maps: bool = False  # attention can be recorded (pictures)
    supports_any_size: bool = False  # forward / forward_features take other sizes (multiples of patch_size)
    has_distill_token: bool = False  # a DeiT distillation token among the prefix tokens (distill_embedding)

    embed_dim: int
    patch_size: int
    in_chans: int
    image_size: tuple[int, int]
    num_prefix_tokens: int = 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: (C, H, W) for an image backbone."""
        return (self.in_chans, *self.image_size)

    @property
    def grid_size(self) -> tuple[int, ...]:
        h, w = self.image_size
        return h // self.patch_size, w // self.patch_size

    @property
    def num_patches(self) -> int:
        n = 1
        for g in self.grid_size:
            n *= g
        return n

    @property
    def patch_pixels(self) -> int:
        """Input values under one output token: patch_size**2 * in_chans for images."""
        return self.patch_size * self.patch_size * self.in_chans

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, p*p*C), patches in token order, values (p1 p2 c)."""
        p = self.patch_size
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)

    def unpatchify(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W), the inverse of patchify."""
        p, (gh, gw) = self.patch_size, self.grid_size
        return rearrange(t, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p)

    def hide_masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The input with the pixels of the tokens where mask (B, N) is set made invisible to every
        other token, before embedding. A non-overlapping patch embedding shows each token only its
        own pixels, so the default returns x; a family whose embedding reaches into neighbouring
        patches (shifted patch tokens, convolutional stems) zeroes the masked pixels. MAE, SimMIM
        and MPP call it, so masked content never leaks into visible tokens."""
        return x

    @property
    def mask_token_dim(self) -> int:
        """Width of the tokens a mask token replaces in forward_masked (the first stage's width)."""
        return self.embed_dim

    def forward_masked(self, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
        """Patch tokens (B, N, D) after the final norm, with the patches where mask (B, N) is set
        replaced by `mask_token` (1, 1, mask_token_dim) before positions are added. This default
        serves every backbone with token access; hierarchical ones override it and replace at the
        input of their first stage."""
        tokens = self.embed_patches(self.hide_masked(x, mask))  # (B, N, D)
        token = mask_token.to(tokens.dtype).expand_as(tokens)
        tokens = torch.where(mask.bool().unsqueeze(-1), token, tokens) + self.pos_embed_for(None)
        return self.forward_tokens(tokens)[:, self.num_prefix_tokens:]  # (B, N, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed_patches(x) + self.pos_embed_for(None)  # (B, N, D)
        return self.forward_tokens(tokens)

    def embed_patches(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pos_embed_for(self, ids: torch.Tensor | None) -> torch.Tensor:
        pos = self.patch_positions()  # (1, N, D)
        if ids is None:
            return pos
        return gather_tokens(pos.expand(ids.shape[0], -1, -1), ids)

    def patch_positions(self) -> torch.Tensor:
        raise NotImplementedError

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def distill_embedding(self, tokens: torch.Tensor) -> torch.Tensor:
        """The distillation token's output (B, D) from forward_features' tokens (has_distill_token)."""
        raise ValueError(f"{type(self).__name__} has no distillation token")

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in named_parameters) that take no weight decay besides norms and biases."""
        return set()

    def pool_only_parameters(self) -> list[nn.Parameter]:
        """Parameters no output token depends on, only the pooled embedding: e.g. NaViT's attention
        pool, a norm applied after pooling. Objectives that read tokens cannot train them (see
        Objective.reads), so they freeze them."""
        return []

    def prefix_only_parameters(self) -> list[nn.Parameter]:
        """Parameters only the prefix (class) tokens depend on, not the patch tokens: e.g. CaiT's
        class-attention stage, CrossViT's last cross-attention. MAE's decoder reads the prefix
        tokens and trains them; SimMIM and MPP read patch tokens only and freeze them."""
        return []

    def check_input(self, x: torch.Tensor, any_size: bool = False) -> None:
        """Refuse input of another shape; `any_size`: any height and width divisible by the patch size."""
        if any_size and x.ndim == 4 and x.shape[1] == self.in_chans:
            h, w = x.shape[-2:]
            if h % self.patch_size == 0 and w % self.patch_size == 0 and h > 0 and w > 0:
                return
            raise ValueError(
                f"input of shape {tuple(x.shape)}: height and width must be multiples of the patch size "
                f"{self.patch_size}; resize or crop the input to such a size"
            )
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            names = {3: "C, H, W", 4: "C, T, H, W", 2: "C, L"}.get(len(self.input_shape), "...")
            raise ValueError(
                f"input of shape {tuple(x.shape)} does not fit this backbone, built for "
                f"(B, {', '.join(map(str, self.input_shape))}) = (B, {names}): resize the input, "
                f"or build the backbone with the image_size / in_chans that match it"
            )


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., Backbone]] = {}
_EXAMPLES: dict[str, dict[str, Any]] = {}


def register(name: str, example: dict[str, Any] | None = None) -> Callable:
    """Register a builder (a Backbone subclass or a function returning one) under `name`.
    `example`: keyword arguments of a small, fast configuration of the family (what the
    objective x backbone matrix, the tests and the benchmarks build)."""

    def deco(builder: Callable[..., Backbone]) -> Callable[..., Backbone]:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = builder
        _EXAMPLES[name] = dict(example or {})
        return builder

    return deco


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def example_config(name: str) -> dict[str, Any]:
    """The small configuration a family registered for tests and benchmarks."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones are: {', '.join(list_backbones())}")
    return dict(_EXAMPLES[name])


def _bind(name: str, builder: Callable, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The builder's full keyword arguments, defaults filled in; unknown names are refused."""
    sig = inspect.signature(builder)
    unknown = [k for k in kwargs if k not in sig.parameters]
    if unknown:
        allowed = ", ".join(p for p in sig.parameters if p != "self")
        raise ValueError(f"backbone {name!r} has no option {unknown[0]!r}; its options are: {allowed}")
    bound = sig.bind_partial(**kwargs)
    bound.apply_defaults()
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in bound.arguments.items()}


# Options that are sizes or counts, by how their names end: 0 builds a model with no width, no
# layers or no input (it trains on nothing, or fails deep inside torch), so it is refused here for
# every family. A negative number is refused for every numeric option.
_SIZE_SUFFIXES = ("dim", "dims", "depth", "depths", "heads", "head_dim", "dim_head", "dim_key", "dim_value",
                  "patch_size", "patch_sizes", "image_size", "in_chans", "mlp_ratio", "mlp_ratios", "mlp_dim",
                  "seq_len", "frames", "window_size", "windows", "channels", "expansion", "ff_mult", "kernel_size",
                  "unfold_size", "dim_conv_stem", "reduction_factor", "global_k")
_MAY_BE_ZERO = ("cross_depth",)  # CrossViT: stages without cross-attention


def _numbers(value: Any) -> list[float]:
    """The numbers in an option's value: itself, or the entries of a list / tuple (None entries skipped)."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return []


def _check_sizes(name: str, resolved: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse a size or count <= 0 and any negative number, naming the option, its value and an example."""
    for key, value in resolved.items():
        numbers = _numbers(value)
        size = key.endswith(_SIZE_SUFFIXES) and key not in _MAY_BE_ZERO
        bad = [n for n in numbers if n < 0 or (size and n == 0)]
        if not bad:
            continue
        example = _EXAMPLES.get(name, {}).get(key, defaults.get(key))
        hint = f", e.g. {key}={example!r}" if example is not None else ""
        if isinstance(value, (list, tuple)):
            raise ValueError(f"{key}={list(value)!r}: every entry must be {'>= 1' if size else '>= 0'}{hint}")
        integer = isinstance(value, int) and not isinstance(example, float)
        kind = ("an integer >= 1" if integer else "> 0") if size else ">= 0"
        raise ValueError(f"{key}={value!r} must be {kind}{hint}")


def create(name: str, **kwargs: Any) -> Backbone:
    """Build a registered backbone: `create("vit", size="small", image_size=224)`; any timm model
    as `create("timm:NAME", **timm_kwargs)` (pretrained=False; `weights=FILE` for local weights)."""
    if name.startswith("timm:"):
        from .timm_backbone import build

        return build(name, kwargs)
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; registered backbones are: {', '.join(list_backbones())}, "
                         "or timm:NAME for any timm model")
    builder = _REGISTRY[name]
    resolved = _bind(name, builder, kwargs)
    defaults = {k: p.default for k, p in inspect.signature(builder).parameters.items() if p.default is not p.empty}
    _check_sizes(name, {k: v for k, v in resolved.items() if k in kwargs}, defaults)
    model = builder(**resolved)
    model.build_config = {"name": name, "kwargs": resolved}
    return model


def build_config(model: Backbone) -> dict[str, Any]:
    cfg = getattr(model, "build_config", None)
    if cfg is None:
        raise ValueError("this backbone was not built by backbones.create(), so it cannot be saved with its config")
    return cfg


# --------------------------------------------------------------------------- save / load

WEIGHTS, META = "backbone.safetensors", "backbone.json"


def save(model: Backbone, directory: str | Path, extra: dict[str, Any] | None = None,
         state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `backbone.safetensors` + `backbone.json` (registry name, resolved kwargs, `extra`).
    `state` replaces model.state_dict() where the module holds shards only (FSDP)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in (model.state_dict() if state is None else state).items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {**build_config(model), **(extra or {})}
    (directory / META).write_text(json.dumps(meta, indent=2))
    return directory


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a user's file: .safetensors, or a torch file read with weights_only=True (so
    nothing in it is executed), unwrapped from DeiT's {"model": ...} or Lightning's
    {"state_dict": ...}."""
    import pickle

    if str(path).endswith(".safetensors"):
        return read_safetensors(Path(path))
    if not Path(path).is_file():
        raise FileNotFoundError(f"weights file {path} does not exist: give the path of a .safetensors, .pt or .pth file")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} was refused unread: it holds objects other than tensors and plain values "
                         f"({_first_line(e)}), which could run code if unpickled; convert the weights to "
                         "safetensors where they were made (safetensors.torch.save_file(model.state_dict(), ...))") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # truncated zip, not a torch file at all
        raise ValueError(f"{path} is not a readable torch weights file ({_first_line(e)}): give a .safetensors, .pt "
                         "or .pth file of weights (a state dict)") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


# An export folder (python -m pretrain.export): config.json + model.safetensors, "format" says whose
# layout the weights are in: "vit-ssl" (ours, what backbones.save writes) or timm's (config.json with
# "architecture" / "model_args", as timm and the Hugging Face hub write it).
EXPORT_WEIGHTS, EXPORT_CONFIG = "model.safetensors", "config.json"
EXPORT_FORMAT, EXPORT_FORMAT_VERSION = "vit-ssl", 1


def is_backbone_folder(path: str | Path) -> bool:
    """Whether `path` is a folder backbones.load reads: a checkpoint / backbones.save() folder
    (backbone.json) or an export folder (config.json). For TARGET arguments of commands."""
    path = Path(path)
    return path.is_dir() and ((path / META).is_file() or (path / EXPORT_CONFIG).is_file())


def _folder_kind(directory: Path) -> str:
    """'checkpoint' (backbone.json), 'export' (config.json of format vit-ssl) or 'timm' (timm-style config.json)."""
    if (directory / META).is_file():
        return "checkpoint"
    if (directory / EXPORT_CONFIG).is_file():
        return "timm" if "architecture" in _read_json(directory / EXPORT_CONFIG) else "export"
    raise FileNotFoundError(
        f"no {META} or {EXPORT_CONFIG} in {directory}: pass a checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN), "
        f"a folder written by backbones.save() or an export folder (python -m pretrain.export)"
    )


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e}): re-export or re-save the backbone") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a {type(data).__name__}, not a JSON object: re-export or re-save the backbone")
    return data


def _export_meta(config: dict[str, Any], file: Path) -> dict[str, Any]:
    """The meta of an export folder's config.json: the vit-ssl one as written (name, kwargs,
    preprocess, step, ...); a timm one as a `timm:ARCHITECTURE` backbone (what load rebuilds)."""
    if "architecture" in config:
        if config.get("num_classes", 0) not in (0, None):
            raise ValueError(f"{file}: num_classes={config['num_classes']}: backbones.load reads timm backbones "
                             "without a classifier (num_classes 0); build this one with timm.create_model")
        cfg = config.get("pretrained_cfg") or {}
        provenance = dict(config.get("vit_ssl") or {})
        preprocess = provenance.pop("preprocess", None)
        if preprocess is None and "mean" in cfg and "input_size" in cfg:
            preprocess = {"image_size": list(cfg["input_size"][1:]), "channels": cfg["input_size"][0],
                          "mean": list(cfg["mean"]), "std": list(cfg["std"])}
        return {**provenance, "format": "timm", "name": f"timm:{config['architecture']}",
                "kwargs": dict(config.get("model_args") or {}), "preprocess": preprocess}
    fmt, version = config.get("format"), config.get("format_version")
    if fmt != EXPORT_FORMAT or not isinstance(version, int):
        raise ValueError(f"{file} has format={fmt!r}, format_version={version!r}: expected format {EXPORT_FORMAT!r} "
                         "(python -m pretrain.export) or a timm config with 'architecture'")
    if version > EXPORT_FORMAT_VERSION:
        raise ValueError(f"{file} has format_version={version}, newer than this vit-ssl reads "
                         f"({EXPORT_FORMAT_VERSION}): update vit-ssl")
    for key in ("name", "kwargs"):
        if key not in config:
            raise ValueError(f"{file} has no {key!r} entry: re-export the checkpoint with python -m pretrain.export")
    return config


def load_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a saved backbone: backbone.json of a checkpoint or backbones.save() folder,
    or config.json of an export folder (vit-ssl format as written; timm format as name
    `timm:ARCHITECTURE`, kwargs = model_args, preprocess from its pretrained_cfg)."""
    path = Path(path)
    if path.is_dir():
        file = path / (META if _folder_kind(path) == "checkpoint" else EXPORT_CONFIG)
    elif path.is_file():
        file = path
    else:
        raise FileNotFoundError(
            f"{path} does not exist: pass a checkpoint folder (RUN_DIR/checkpoints/step-NNNNNN), a folder written "
            f"by backbones.save() or an export folder (python -m pretrain.export)"
        )
    meta = _read_json(file)
    return _export_meta(meta, file) if file.name == EXPORT_CONFIG else meta


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _not_safetensors(file: Path, e: BaseException) -> ValueError:
    return ValueError(f"{file} is truncated or not a safetensors file ({_first_line(e)}); weights are only read from "
                      "safetensors, never unpickled: use another checkpoint of the run (an earlier step) or "
                      "re-export the backbone with python -m pretrain.export")


def read_safetensors(file: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a truncated file, a pickle renamed
    .safetensors) is refused unread, never unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the folder holds a config but no weights; re-export or re-save it")
    try:
        return load_file(str(file), device=str(map_location))
    except (SafetensorError, OSError) as e:
        raise _not_safetensors(file, e) from None


def weights_files(path: str | Path) -> list[Path]:
    """The safetensors files `load` / `load_classifier` read from a backbone folder (weights, and
    the head when there is one)."""
    directory = Path(path)
    kind = _folder_kind(directory)
    files = [directory / (WEIGHTS if kind == "checkpoint" else EXPORT_WEIGHTS)]
    return files + ([directory / HEAD] if (directory / HEAD).is_file() else [])


def verify_weights(path: str | Path) -> None:
    """Check, without reading the tensors, that a backbone folder's metadata parses and its weights
    files are complete safetensors files (header and sizes): for commands that should refuse a
    truncated or foreign checkpoint before doing any work. Raises ValueError / FileNotFoundError
    naming the file."""
    from safetensors import SafetensorError, safe_open

    load_meta(path)
    for file in weights_files(path):
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: the folder holds a config but no weights; re-export or re-save it")
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise _not_safetensors(file, e) from None


def load(path: str | Path, map_location: str | torch.device = "cpu") -> Backbone:
    """Rebuild a saved backbone and load its weights strictly (a mismatch is an error, never
    ignored): a checkpoint / backbones.save() folder, or an export folder of either format (a timm
    one comes back as a `timm:ARCHITECTURE` backbone)."""
    path = Path(path)
    if path.is_file() and path.name not in (WEIGHTS, META, EXPORT_WEIGHTS, EXPORT_CONFIG):
        raise ValueError(
            f"{path} is a file; backbones.load reads a folder (a checkpoint, a backbones.save() folder or an export). "
            f"For a weights file: model = backbones.create(NAME, ...); model.load_state_dict(backbones.read_state_dict"
            f"({str(path)!r})) (tensors only, nothing unpickled), then backbones.save(model, DIR)"
        )
    directory = path if path.is_dir() else path.parent
    kind = _folder_kind(directory)
    meta = load_meta(directory)
    model = create(meta["name"], **meta["kwargs"])
    state = read_safetensors(directory / (WEIGHTS if kind == "checkpoint" else EXPORT_WEIGHTS), map_location)
    if kind == "timm":  # timm's keys are our TimmBackbone's without its "model." prefix
        state = {f"model.{k}": v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------------------- a backbone with a classifier head

HEAD = "head.safetensors"


class Classifier(nn.Module):
    """A backbone and a linear head on its pooled embedding: (B, C, H, W) -> logits (B, K). With a
    distillation head too (DeiT), the prediction is the mean of the class head on the pooled
    embedding and the distillation head on the distillation token."""

    def __init__(self, backbone: Backbone, head: nn.Linear, head_dist: nn.Linear | None = None):
        super().__init__()
        for h in (head, head_dist):
            if h is not None and h.in_features != backbone.embed_dim:
                raise ValueError(f"a head takes {h.in_features} features but the backbone gives {backbone.embed_dim}: "
                                 "save the head with the backbone it was trained on")
        if head_dist is not None and not backbone.has_distill_token:
            raise ValueError("a distillation head needs a backbone with a distillation token (vit distill_token=True)")
        self.backbone, self.head, self.head_dist = backbone, head, head_dist

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_dist is None:
            return self.head(self.backbone(x))  # (B, K)
        tokens = self.backbone.forward_features(x)  # (B, P+N, D)
        cls_logits = self.head(self.backbone.pool(tokens))
        return (cls_logits + self.head_dist(self.backbone.distill_embedding(tokens))) / 2  # (B, K)


def save_head(head: dict[str, torch.Tensor] | nn.Linear, directory: str | Path,
              head_dist: dict[str, torch.Tensor] | nn.Linear | None = None) -> Path:
    """Write a linear classifier head (and a DeiT distillation head, keys `dist.*`) beside a saved
    backbone: `head.safetensors`. Each head is a module or its state dict."""
    from safetensors.torch import save_file

    def weights(h):
        return h.state_dict() if isinstance(h, nn.Module) else h

    state = dict(weights(head))
    if head_dist is not None:
        state.update({f"dist.{k}": v for k, v in weights(head_dist).items()})
    path = Path(directory) / HEAD
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    return path


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> Classifier:
    """A saved backbone with its head (a checkpoint of a supervised run, or an export with a head)."""
    directory = Path(path)
    if not (directory / HEAD).is_file():
        raise FileNotFoundError(
            f"{directory} has a backbone but no classifier head ({HEAD}): use a checkpoint of a run with "
            "labels (--objective supervised) or save a head beside the backbone with backbones.save_head()"
        )
    backbone = load(directory, map_location)
    state = read_safetensors(directory / HEAD, map_location)
    if "weight" not in state or state["weight"].ndim != 2:
        raise ValueError(f"{directory / HEAD} is not a linear head (expected 'weight' (K, D) and 'bias' (K,))")

    def linear(prefix: str) -> nn.Linear:
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        k, d = part["weight"].shape
        layer = nn.Linear(d, k, bias="bias" in part)
        layer.load_state_dict(part, strict=True)
        return layer

    head_dist = linear("dist.") if "dist.weight" in state else None
    return Classifier(backbone, linear(""), head_dist)


def image_size_2d(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return to_2tuple(image_size if isinstance(image_size, int) else tuple(image_size))
