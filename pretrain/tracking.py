"""The pretraining run's MLflow record, kept by the main process only.

RUN_DIR/run.json names the MLflow run, so a relaunched (resumed) run keeps logging into the same
MLflow run, and `python -m eval.run RUN_DIR` logs its scores there too.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from eval import tracking

from .config import Config

EXPERIMENT = tracking.PRETRAIN_EXPERIMENT


class RunLog:
    def __init__(self, run_dir: Path, cfg: Config):
        self.info_file = Path(run_dir) / "run.json"
        self.uri = tracking.tracking_uri(cfg.train.out_dir)
        self.client = tracking.client(self.uri)
        info = json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}
        if info.get("tracking_uri") == self.uri and self._exists(info.get("mlflow_run_id")):
            self.run_id = info["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = tracking.get_experiment_id(EXPERIMENT, cfg.train.out_dir, uri=self.uri)
        run = self.client.create_run(experiment_id, run_name=Path(run_dir).name, tags={
            "objective": cfg.objective["name"], "backbone": cfg.backbone["name"],
            "run_dir": str(Path(run_dir).resolve()), "recipe": str(cfg.recipe)})
        self.run_id = run.info.run_id
        tracking.log_params(self.run_id, {k: (json.dumps(v) if isinstance(v, list) else v)
                                          for k, v in tracking.flatten(cfg.to_dict()).items()}, self.uri)
        self.info_file.write_text(json.dumps({"mlflow_run_id": self.run_id, "tracking_uri": self.uri,
                                              "experiment": EXPERIMENT}, indent=2))

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            self.client.get_run(run_id)
            return True
        except Exception:  # noqa: BLE001 - a missing or deleted run: start a new one
            return False

    def log(self, metrics: dict[str, float], step: int) -> None:
        tracking.log_metrics(self.run_id, metrics, step, self.uri)

    def finish(self, result: dict[str, Any]) -> None:
        self.log({"minutes": result["minutes"]}, result["step"])
        if result["finished"]:  # a launch stopped early (train.stop_at) leaves the run RUNNING
            self.client.set_terminated(self.run_id, "FINISHED")
