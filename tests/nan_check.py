"""Launched by test_faults.py under `accelerate launch` with 2 processes (gloo): trains with rank 1's
loss made NaN at the given steps (its value only: the gradient stays finite, so only the trainer's
reduced decision keeps rank 0 from stepping alone), then writes OUT/report.json: the error that
stopped the run and whether the ranks' parameters are still identical.

    nan_check.py OUT STEPS(comma-separated, 1-based) [pretrain/run.py arguments]
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import gather  # noqa: E402

import pretrain.train as train_mod  # noqa: E402
from pretrain.config import build_config  # noqa: E402
from pretrain.guard import NonFiniteError  # noqa: E402
from pretrain.run import parse_args  # noqa: E402


BUILT = []  # the objective the trainer trains (its parameters are the ones DDP updates)


def with_nan_loss(build, bad_steps: set[int]):
    def build_objective(cfg):
        objective = build(cfg)
        BUILT.append(objective)
        forward, calls = objective.forward, [0]

        def forward_with_nan(batch):
            out = forward(batch)
            if objective.training:
                calls[0] += 1
                if PartialState().process_index == 1 and calls[0] in bad_steps:
                    out["loss"] = out["loss"] + torch.tensor(float("nan"))
            return out

        objective.forward = forward_with_nan
        return objective

    return build_objective


def main(out: Path, steps: str, argv: list[str]) -> int:
    args = parse_args(argv)
    train_mod.build_objective = with_nan_loss(train_mod.build_objective, {int(s) for s in steps.split(",")})
    error, code = "", 0
    try:
        train_mod.train(build_config(args.objective, args.recipe, args.overrides))
    except NonFiniteError as e:
        error, code = str(e), 3
    state = PartialState()
    flat = torch.cat([p.detach().flatten() for p in BUILT[-1].parameters()])
    every_rank = gather(flat[None])  # (world, P)
    if state.is_main_process:
        (out / "report.json").write_text(json.dumps({
            "error": error, "params_identical": bool(all(torch.equal(every_rank[0], r) for r in every_rank[1:]))}))
    state.wait_for_everyone()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # as pretrain/run.py's error exit: no process-group teardown once a peer may have left


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:]))
