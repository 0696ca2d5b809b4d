"""The objective x backbone matrix: which objective trains which backbone.

Every registered objective is built around every registered backbone's example configuration
(plus a few timm models) and, when the backbone has the capabilities the objective needs, takes
one training step on generated input of the backbone's own shape (images, clips or signals): the
loss must be finite and every trainable parameter must receive a gradient. When a capability is
missing, construction must raise CapabilityError naming it. Nothing else is allowed.

    python -m objectives.matrix                    # the whole matrix
    python -m objectives.matrix --backbone cait    # one row, with each cell's loss or error
    python -m objectives.matrix --markdown         # the README's table
"""
from __future__ import annotations

import argparse
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import backbones
from backbones import CapabilityError

from .base import create, list_objectives, objective_class

# small settings of each objective, so a cell runs in well under a second
OBJECTIVE_EXAMPLES: dict[str, dict] = {
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "simmim": {},
    "mpp": dict(bits=2),
    "dino": dict(out_dim=64, head_hidden_dim=64, head_bottleneck_dim=32),
    "supervised": dict(num_classes=5),
    "distill": dict(num_classes=5, kind="soft"),
}

# rows beyond each family's example: variants whose capabilities differ, and timm models
# (label -> registry name, create kwargs; nothing is downloaded)
VARIANTS: dict[str, tuple[str, dict]] = {
    "vit distill_token": ("vit", {**backbones.example_config("vit"), "distill_token": True}),
    "vit_3d fc_norm": ("vit_3d", {**backbones.example_config("vit_3d"), "pool": "mean_all", "fc_norm": True}),
    "vivit factorized_self_attention": ("vivit", {**backbones.example_config("vivit"),
                                                  "variant": "factorized_self_attention"}),
    "efficient linformer": ("efficient", {**backbones.example_config("efficient"), "mixer": "linformer",
                                          "mixer_options": {"k": 16}}),
    "scalable_vit final_norm=pooled": ("scalable_vit", {**backbones.example_config("scalable_vit"), "final_norm": "pooled"}),
    "timm:vit_tiny_patch16_224": ("timm:vit_tiny_patch16_224",
                                  dict(img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2)),
    # zero-initialised residual BatchNorms would block every gradient into the blocks at step 0
    "timm:resnet18": ("timm:resnet18", dict(in_chans=1, zero_init_last=False)),
}


def matrix_backbones() -> list[str]:
    """Row labels: every registered family's example, then the variants."""
    return backbones.list_backbones() + list(VARIANTS)


def build_row(label: str) -> backbones.Backbone:
    name, kwargs = VARIANTS.get(label) or (label, backbones.example_config(label))
    return backbones.create(name, **kwargs)


@dataclass
class Cell:
    backbone: str
    objective: str
    status: str  # "ok" | "n/a" (the capability error) | "fail"
    detail: str  # the loss, the missing capability, or the failure

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "n/a")


def _teacher_dir(label: str, num_classes: int, root: Path) -> Path:
    """A classifier of the same row (random weights) saved as a distillation teacher."""
    out = root / label.replace(":", "_").replace(" ", "_").replace("=", "_")
    if not (out / backbones.base.HEAD).is_file():
        teacher = build_row(label)
        backbones.save(teacher, out)
        backbones.save_head(nn.Linear(teacher.embed_dim, num_classes), out)
    return out


def _hparams(objective: str, backbone: backbones.Backbone, name: str, teachers: Path) -> dict:
    hp = dict(OBJECTIVE_EXAMPLES.get(objective, {}))
    images = len(backbone.input_shape) == 3
    if objective == "dino":
        if not images:
            hp["num_local"] = 0  # clips and signals: two views of their own shape
        else:
            hp["num_local"] = 2
            if backbone.supports_any_size:
                h = backbone.image_size[0]
                hp["local_size"] = max(backbone.patch_size, (h // 2) // backbone.patch_size * backbone.patch_size)
    if objective == "distill" and objective_class("distill").serves(backbone):
        hp["teacher"] = str(_teacher_dir(name, hp["num_classes"], teachers))
    return hp


def _views(obj, backbone: backbones.Backbone, batch: int) -> list[torch.Tensor]:
    if len(backbone.input_shape) == 3:
        shapes = [(backbone.in_chans, v.size, v.size) for v in obj.views for _ in range(v.count)]
    else:
        shapes = [tuple(backbone.input_shape)] * (2 if obj.name == "dino" else 1)
    return [torch.randn(batch, *s) for s in shapes]


def run_cell(name: str, objective: str, teachers: Path, batch: int = 4, seed: int = 0) -> Cell:
    """Build the pair and take one training step; see the module docstring for what counts."""
    torch.manual_seed(seed)
    backbone = build_row(name)
    try:
        obj = create(objective, backbone, **_hparams(objective, backbone, name, teachers))
    except CapabilityError as e:
        missing = [f for f in objective_class(objective).requires if not getattr(backbone, f, False)]
        return Cell(name, objective, "n/a", f"{', '.join(missing)} ({str(e)[:80]})")
    except Exception as e:  # noqa: BLE001 -- the matrix reports every failure, it does not stop at one
        return Cell(name, objective, "fail", f"construction: {type(e).__name__}: {e}")
    try:
        obj.set_total_steps(10)
        obj.train()
        views = _views(obj, backbone, batch)
        out = obj({"views": views, "labels": torch.randint(0, 5, (batch,))})
        loss = out["loss"]
        loss.backward()
        obj.on_step(1, 10)
    except Exception as e:  # noqa: BLE001
        return Cell(name, objective, "fail", f"step: {type(e).__name__}: {e}")
    if not math.isfinite(loss.item()):
        return Cell(name, objective, "fail", f"loss {loss.item()}")
    frozen = {id(p) for p in obj.frozen_parameters()}
    no_grad = [n for n, p in obj.named_parameters()
               if p.requires_grad and id(p) not in frozen and (p.grad is None or not p.grad.abs().sum() > 0)]
    if no_grad:
        return Cell(name, objective, "fail", f"no gradient reaches {len(no_grad)} parameter(s): {no_grad[:4]}")
    return Cell(name, objective, "ok", f"loss {loss.item():.4f}")


def run_matrix(names: list[str] | None = None, objectives: list[str] | None = None) -> list[Cell]:
    with tempfile.TemporaryDirectory() as tmp:
        return [run_cell(b, o, Path(tmp)) for b in (names or matrix_backbones()) for o in (objectives or list_objectives())]


def markdown(cells: list[Cell]) -> str:
    objs = list(dict.fromkeys(c.objective for c in cells))
    rows = list(dict.fromkeys(c.backbone for c in cells))
    mark = {"ok": "✓", "n/a": "–", "fail": "✗"}
    by = {(c.backbone, c.objective): c for c in cells}
    lines = ["| backbone | " + " | ".join(objs) + " |", "|---" * (len(objs) + 1) + "|"]
    for b in rows:
        lines.append(f"| `{b}` | " + " | ".join(mark[by[b, o].status] for o in objs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", action="append", help="only these backbones (repeatable)")
    ap.add_argument("--objective", action="append", help="only these objectives (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print the README table (✓ trains, – capability missing)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    cells = run_matrix(args.backbone, args.objective)
    if args.markdown:
        print(markdown(cells))
    else:
        for c in cells:
            print(f"{c.backbone:28s} {c.objective:11s} {c.status:5s} {c.detail}")
    failed = [c for c in cells if not c.ok]
    if failed:
        print(f"{len(failed)} cell(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
