"""Images/s of one objective's training step (forward, backward, AdamW) on random views, with a
recipe's backbone and objective: the step-speed figures quoted in the recipes' comments.

    python -m bench.step_speed simmim [BATCH]

Distill is timed without its teacher (kind=none): the student's step alone.
"""
from __future__ import annotations

import sys
import time

import torch

import backbones
import objectives
from pretrain.config import load_recipe


def images_per_s(recipe: str, batch_size: int | None = None, steps: int = 3, warmup: int = 2) -> float:
    r = load_recipe(recipe)
    bb_kw = dict(r["backbone"])
    backbone = backbones.create(bb_kw.pop("name"), **bb_kw)
    hp = {k: v for k, v in r["objective"].items() if k != "name"}
    cls = objectives.objective_class(r["objective"]["name"])
    if cls.uses_labels:
        hp["num_classes"] = 10
    if r["objective"]["name"] == "distill":
        hp["kind"] = "none"
    objective = objectives.create(r["objective"]["name"], backbone, **hp)
    objective.set_total_steps(100)
    objective.set_normalisation([0.286], [0.353])
    batch_size = batch_size or r["train"]["batch_size"]
    opt = torch.optim.AdamW(objective.parameter_groups(0.05), lr=1e-4)
    views = [torch.randn(batch_size, backbone.in_chans, v.size, v.size) for v in objective.views for _ in range(v.count)]
    batch = {"views": views, "labels": torch.randint(0, 10, (batch_size,))}
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        objective(batch)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.on_step(i + 1, 100)
    return steps * batch_size / (time.perf_counter() - start)


if __name__ == "__main__":
    name = sys.argv[1]
    batch = int(sys.argv[2]) if len(sys.argv) > 2 else None
    print(f"{name}: {images_per_s(name, batch):.0f} images/s ({torch.get_num_threads()} threads)")
