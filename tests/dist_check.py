"""Launched by test_distributed.py under `accelerate launch` with 2 processes (gloo): reads id
shards on every rank, trains a few steps, and writes what each rank saw to OUT/report.json."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import gather, gather_object  # noqa: E402

from data.stream import ShardLoader  # noqa: E402
from pretrain.config import build_config  # noqa: E402
from pretrain.train import train  # noqa: E402


def main(out: Path, id_shards: str, overrides: list[str]) -> None:
    result = train(build_config(None, "tiny", overrides))  # the Accelerator in here sets up the process group
    state = PartialState()
    loader = ShardLoader(id_shards, batch_size=5, image_size=28, channels=1, seed=0, rank=state.process_index,
                         world_size=state.num_processes, num_workers=2)
    ids = [i for batch in loader.iter_epoch(0) for i in batch.labels.tolist()]
    ids_per_rank = gather_object([ids])
    flat = torch.cat([p.detach().flatten() for p in result["objective"].parameters()])
    every_rank = gather(flat[None])  # (world, P)
    if state.is_main_process:
        report = {
            "world_size": state.num_processes,
            "result_world_size": result["world_size"],
            "ids_per_rank": ids_per_rank,
            "params_identical": bool(all(torch.equal(every_rank[0], r) for r in every_rank[1:])),
            "run_dir": result["run_dir"],
        }
        (out / "report.json").write_text(json.dumps(report))
    state.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
