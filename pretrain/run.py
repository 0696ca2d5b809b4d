"""Pretrain a ViT with a self-supervised objective.

    accelerate launch pretrain/run.py --objective mae [--recipe R] [section.key=value ...]

With no data setting it trains on the built-in dataset (Fashion-MNIST) and ends by printing the
run directory, the MLflow run and the kNN top-1 of the final checkpoint next to the random
initialisation's. Relaunching the same command resumes from the newest complete checkpoint.
SIGTERM or SIGUSR1 ends the launch after the current step with a checkpoint (exit code 75).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch pretrain/run.py): find the project
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.builtin import DatasetNotFoundError  # noqa: E402
from data.stream import DataError  # noqa: E402
from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, build_config, list_recipes  # noqa: E402
from pretrain.guard import EXIT_NONFINITE, EXIT_PREEMPTED, NonFiniteError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="pretrain/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: any setting as section.key=value, e.g. optim.lr=1e-3 train.total_steps=2000 "
               f"backbone.depth=8 data.train=/data/shards. Recipes: {', '.join(list_recipes())}.",
    )
    p.add_argument("--objective", help="objective to train (default: the recipe's, else mae)")
    p.add_argument("--recipe", help="recipe name (pretrain/recipes/NAME.yaml) or YAML path; default: the objective's own")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input, 3 non-finite steps, 75 / 76 stopped by a signal (pretrain/guard.py)."""
    args = parse_args(argv)
    try:
        cfg = build_config(args.objective, args.recipe, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return 0
        from pretrain.train import build_objective, train

        build_objective(cfg)  # every setting checked before any data is read
        result = train(cfg)
        from accelerate import PartialState

        PartialState().destroy_process_group()
    except (ConfigError, CheckpointError, DatasetNotFoundError, DataError) as e:
        return fail(str(e), 2)
    except NonFiniteError as e:
        return fail(str(e), EXIT_NONFINITE)
    return EXIT_PREEMPTED if result["stopped_by"] else 0


def fail(message: str, code: int) -> int:
    """Print the one-line error; the code reaches the launcher through eval.features.leave."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    from eval.features import leave  # noqa: E402

    leave(main())
