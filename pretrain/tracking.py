"""The pretraining run's record, kept by the main process only.

Every logged metric goes to RUN_DIR/metrics.jsonl (one JSON line per log call, always written) and
to MLflow. RUN_DIR/run.json names the MLflow run, so a relaunched (resumed) run keeps logging into
the same MLflow run, and `python -m eval.run RUN_DIR` logs its scores there too.

MLflow never stops a run: a tracking server that does not answer at start is replaced by the local
store (<out_dir>/mlflow.db) with a message saying so; one that fails later is dropped for the rest
of the launch, and metrics.jsonl keeps everything.
"""
from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from data.redact import redact
from eval import tracking

from .config import Config

EXPERIMENT = tracking.PRETRAIN_EXPERIMENT


def unreachable(uri: str, timeout: float = 5.0) -> str | None:
    """Why an http(s) tracking server does not answer (None when it answers at all)."""
    if not uri.lower().startswith(("http://", "https://")):
        return None
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # it answered, if not with 200 (a proxy asking for auth, say)
        return None
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))
    return None


def warn(message: str) -> None:
    print(f"[vit-ssl] warning: {message}", file=sys.stderr, flush=True)


class RunLog:
    def __init__(self, run_dir: Path, cfg: Config):
        self.run_dir = Path(run_dir)
        self.local_log = self.run_dir / "metrics.jsonl"
        self.info_file = self.run_dir / "run.json"
        self.uri = tracking.tracking_uri(cfg.train.out_dir)
        self.run_id: str | None = None
        self._local_log_failed = False
        if tracking.is_server(self.uri):  # a server that stops answering holds the step for seconds, not minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        why = unreachable(self.uri)
        if why is None:
            try:
                self._open_mlflow_run(cfg)
            except Exception as e:  # noqa: BLE001 - any MLflow failure: go on with the local store
                why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if why is not None:
            local = tracking.local_uri(cfg.train.out_dir)
            warn(f"MLflow tracking server {redact(self.uri)} is unreachable ({why}): the run goes on and logs to the local "
                 f"store {local} and to {self.local_log}; browse it with mlflow ui --backend-store-uri {local}")
            self.uri = local
            self._open_mlflow_run(cfg, remember=not self._names_a_server_run())

    def _names_a_server_run(self) -> bool:
        """run.json names a run on a tracking server: keep it, so a relaunch with the server back logs there."""
        info = json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}
        return tracking.is_server(info.get("tracking_uri") or "")

    def _open_mlflow_run(self, cfg: Config, remember: bool = True) -> None:
        self.client = tracking.client(self.uri)
        info = json.loads(self.info_file.read_text()) if self.info_file.is_file() else {}
        if info.get("tracking_uri") == self.uri and self._exists(info.get("mlflow_run_id")):
            self.run_id = info["mlflow_run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment_id = tracking.get_experiment_id(EXPERIMENT, cfg.train.out_dir, uri=self.uri)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name, tags={
            "objective": cfg.objective["name"], "backbone": cfg.backbone["name"],
            "run_dir": str(self.run_dir.resolve()), "recipe": str(cfg.recipe)})
        self.run_id = run.info.run_id
        tracking.log_params(self.run_id, {k: (json.dumps(v) if isinstance(v, list) else v)
                                          for k, v in tracking.flatten(cfg.to_dict()).items()}, self.uri)
        if remember:
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
        """To metrics.jsonl, then to MLflow; neither failure stops the run (each is said once)."""
        try:
            with self.local_log.open("a") as f:
                f.write(json.dumps({"step": step, **metrics}) + "\n")
        except OSError as e:
            if not self._local_log_failed:
                warn(f"could not append to {self.local_log} ({e}); metrics go on to MLflow only")
            self._local_log_failed = True
        if self.run_id is None:
            return
        try:
            tracking.log_metrics(self.run_id, metrics, step, self.uri)
        except Exception as e:  # noqa: BLE001 - a server gone, a full disk under the store
            warn(f"MLflow logging to {redact(self.uri)} failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                 f"the rest of this launch logs to {self.local_log} only")
            self.run_id = None

    def finish(self, result: dict[str, Any]) -> None:
        self.log({"minutes": result["minutes"]}, result["step"])
        if result["finished"] and self.run_id is not None:  # a launch stopped early (stop_at, a signal) stays RUNNING
            try:
                self.client.set_terminated(self.run_id, "FINISHED")
            except Exception as e:  # noqa: BLE001
                warn(f"could not mark MLflow run {self.run_id} finished ({e})")
