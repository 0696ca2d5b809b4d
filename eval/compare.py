"""Compare pretraining runs: one table of objective, backbone, steps, minutes and scores.

    python -m eval.compare [--runs-root DIR | --tracking-uri URI] [--experiment vit-ssl]
                           [--metrics knn/top1@20 linear/top1 finetune/top1 ...] [--sort METRIC]
                           [--csv FILE] [--log]

One row per pretraining run of the experiment (newest first unless --sort), one column per score,
in percent. A score is the run's value at its latest step for that metric (the last scored
checkpoint, not the last value written), looked up in the run itself and in the evaluation runs
linked to it (any run tagged `mlflow.parentRunId` = the pretraining run's id, in the pretraining
experiment or in `vit-ssl-eval`); when both have one, the later step wins, then the later write.
`--log` records the table in a new run of experiment `vit-ssl-compare` as the artifacts
compare.md and compare.csv (no per-run metrics: the scores stay in the runs they belong to).
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from . import tracking

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

PRETRAIN_EXPERIMENT, EVAL_EXPERIMENT = tracking.PRETRAIN_EXPERIMENT, tracking.EVAL_EXPERIMENT
COMPARE_EXPERIMENT = "vit-ssl-compare"
PARENT_TAG = tracking.PARENT_TAG  # "mlflow.parentRunId": an evaluation run names its pretraining run
DEFAULT_METRICS = ("knn/top1@20", "linear/top1", "finetune/top1")
FIXED_COLUMNS = ("run", "id", "objective", "backbone", "status", "steps", "minutes")
SORTABLE = {"steps": True, "minutes": False, "run": False}  # column -> descending?


class CompareError(ValueError):
    """No store, no experiment, or a bad option: reported as one line, exit status 2."""


@dataclass(frozen=True)
class Score:
    """One score of a run: its value at its latest step, and where it came from."""

    value: float
    step: int
    timestamp: int
    run_id: str  # the pretraining run or a linked evaluation run

    @property
    def order(self) -> tuple[int, int]:
        return self.step, self.timestamp


@dataclass
class Row:
    """A pretraining run as one line of the table."""

    run_id: str
    name: str
    objective: str
    backbone: str
    status: str
    steps: int | None
    minutes: float | None
    scores: dict[str, Score] = field(default_factory=dict)  # score name as asked -> Score


# --------------------------------------------------------------------------- the store


def resolve_store(runs_root: str | None, tracking_uri: str | None) -> tuple[str, Path]:
    """(tracking URI, the runs folder for local artifacts) from the options, never creating a store.

    --tracking-uri wins, then --runs-root, then $MLFLOW_TRACKING_URI, then runs/mlflow.db; a
    sqlite store that does not exist yet is an error (MLflow would create an empty one).
    """
    if tracking_uri:
        uri, where = tracking_uri, "--tracking-uri"
    elif runs_root is None and os.environ.get(tracking.ENV_URI):
        uri, where = os.environ[tracking.ENV_URI], f"${tracking.ENV_URI}"
    else:
        root = Path(runs_root or "runs").expanduser().resolve()
        uri, where = f"sqlite:///{root / tracking.DB_NAME}", "--runs-root" if runs_root else "the default --runs-root runs"
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(unquote(uri[len("sqlite:///"):]))
        if not db.is_file():
            raise CompareError(
                f"no MLflow store at {db} ({where}): pass --runs-root DIR (the train.out_dir of your runs) "
                f"or --tracking-uri URI"
            )
        return uri, db.parent
    if parsed.scheme in ("http", "https"):
        _check_server(uri)
    return uri, Path(runs_root or "runs").expanduser().resolve()


def _check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing answers at a server URI (MLflow's own client retries for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something answers (a proxy, an auth layer): let the MLflow client talk to it
    except (urllib.error.URLError, OSError) as exn:
        reason = getattr(exn, "reason", exn)
        raise CompareError(
            f"no MLflow server answers at {uri} ({reason}): start it (mlflow server --host 127.0.0.1 ...) "
            f"or pass --runs-root DIR for a local store"
        ) from exn


def _experiment_id(client: "MlflowClient", name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise CompareError(
            f"no experiment {name!r} in {uri} (experiments there: {', '.join(names) or 'none'}): "
            f"pass --experiment NAME"
        )
    return exp.experiment_id


def _search(client: "MlflowClient", experiment_ids: list[str]) -> list["Run"]:
    """Every active run of the experiments, newest first, all pages."""
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(experiment_ids, max_results=1000, order_by=["attributes.start_time DESC"],
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def latest_metrics(run: "Run") -> dict[str, Score]:
    """MLflow name -> the run's value at that metric's latest step (ties: the later write).

    The store keeps this 'latest' entry per metric (ordered by step, then timestamp), so no
    metric history needs to be fetched.
    """
    from mlflow.entities import Metric

    out: dict[str, Score] = {}
    for proto in run.data.to_proto().metrics:
        m = Metric.from_proto(proto)
        if math.isnan(m.value):
            continue
        s = Score(float(m.value), int(m.step), int(m.timestamp), run.info.run_id)
        if m.key not in out or s.order > out[m.key].order:
            out[m.key] = s
    return out


def collect_rows(client: "MlflowClient", uri: str, experiment: str, metrics: Sequence[str]) -> list[Row]:
    """The table's rows: pretraining runs of `experiment` with their scores and their linked runs' scores."""
    runs = _search(client, [_experiment_id(client, experiment, uri)])
    eval_exp = client.get_experiment_by_name(EVAL_EXPERIMENT)
    linked = [r for r in runs if r.data.tags.get(PARENT_TAG)]
    if eval_exp is not None and experiment != EVAL_EXPERIMENT:
        linked += [r for r in _search(client, [eval_exp.experiment_id]) if r.data.tags.get(PARENT_TAG)]
    children: dict[str, list[dict[str, Score]]] = {}
    for r in linked:
        children.setdefault(r.data.tags[PARENT_TAG], []).append(latest_metrics(r))
    return [_row(r, children.get(r.info.run_id, []), metrics) for r in runs if not r.data.tags.get(PARENT_TAG)]


def _row(run: "Run", children: list[dict[str, Score]], metrics: Sequence[str]) -> Row:
    own = latest_metrics(run)
    scores: dict[str, Score] = {}
    for name in metrics:
        key = tracking.mlflow_metric_name(name)
        found = [m[key] for m in (own, *children) if key in m]
        if found:
            scores[name] = max(found, key=lambda s: s.order)
    tags = run.data.tags
    return Row(
        run_id=run.info.run_id, name=run.info.run_name or "-", objective=tags.get("objective", "-"),
        backbone=tags.get("backbone", "-"), status=run.info.status,
        steps=max((s.step for s in own.values()), default=None),
        minutes=own["minutes"].value if "minutes" in own else None, scores=scores,
    )


# --------------------------------------------------------------------------- the table


def sort_rows(rows: list[Row], key: str | None, metrics: Sequence[str]) -> list[Row]:
    """Rows by a score (high first), 'steps' (most first), 'minutes' (fastest first) or 'run' (name);
    rows without the value last. None keeps the store's order (newest first)."""
    if key is None:
        return rows
    score = _score_column(key, metrics)
    if score is not None:
        have = [r for r in rows if score in r.scores]
        return sorted(have, key=lambda r: -r.scores[score].value) + [r for r in rows if score not in r.scores]
    value = {"steps": lambda r: r.steps, "minutes": lambda r: r.minutes, "run": lambda r: r.name}[key]
    have = [r for r in rows if value(r) is not None]
    return sorted(have, key=value, reverse=SORTABLE[key]) + [r for r in rows if value(r) is None]


def _score_column(key: str, metrics: Sequence[str]) -> str | None:
    """The --metrics entry that `key` names (as written or as MLflow writes it), None for a fixed column."""
    if key in SORTABLE:
        return None
    for name in metrics:
        if tracking.mlflow_metric_name(name) == tracking.mlflow_metric_name(key):
            return name
    raise CompareError(
        f"--sort {key!r} is not a column: use one of {', '.join([*metrics, *SORTABLE])} "
        f"(or add it to --metrics)"
    )


def table_cells(rows: list[Row], metrics: Sequence[str]) -> list[list[str]]:
    """Header + one list of display strings per row; scores in percent, '-' where missing."""
    body = [
        [_cell(r.name), r.run_id[:8], _cell(r.objective), _cell(r.backbone), r.status,
         "-" if r.steps is None else str(r.steps), "-" if r.minutes is None else f"{r.minutes:.1f}",
         *(f"{100 * r.scores[m].value:.2f}" if m in r.scores else "-" for m in metrics)]
        for r in rows
    ]
    return [[*FIXED_COLUMNS, *metrics], *body]


def _cell(text: str) -> str:
    """A free-text value safe inside a Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def to_markdown(cells: list[list[str]]) -> str:
    """A Markdown table whose columns are also aligned as plain text (text left, numbers right)."""
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    numeric = [i >= FIXED_COLUMNS.index("steps") for i in range(len(widths))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def to_csv(rows: list[Row], metrics: Sequence[str]) -> str:
    """CSV: full run id, the fixed columns, each score in percent (4 decimals) and the step it comes from."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["run_id", *FIXED_COLUMNS[:1], *FIXED_COLUMNS[2:], *(c for m in metrics for c in (m, f"{m} step"))])
    for r in rows:
        scores = []
        for m in metrics:
            s = r.scores.get(m)
            scores += ["", ""] if s is None else [f"{100 * s.value:.4f}", str(s.step)]
        writer.writerow([r.run_id, r.name, r.objective, r.backbone, r.status,
                         "" if r.steps is None else r.steps, "" if r.minutes is None else f"{r.minutes:.3f}", *scores])
    return buf.getvalue()


def log_table(uri: str, runs_root: Path, markdown: str, csv_text: str, params: dict[str, Any]) -> str:
    """A new run of `vit-ssl-compare` holding compare.md and compare.csv as artifacts; returns its id."""
    run_id, _ = tracking.start_run(COMPARE_EXPERIMENT, runs_root, run_name=f"compare-{params['experiment']}",
                                   tags={"compared_experiment": params["experiment"]}, uri=uri)
    status = "FAILED"
    try:
        tracking.log_params(run_id, params, uri)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in (("compare.md", markdown + "\n"), ("compare.csv", csv_text)):
                (Path(tmp) / name).write_text(text)
                tracking.log_artifact(run_id, Path(tmp) / name, uri)
        status = "FINISHED"
    finally:
        tracking.end_run(run_id, uri, status)
    return run_id


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--runs-root", metavar="DIR", help="folder holding mlflow.db (the runs' train.out_dir; default: "
                                           "$MLFLOW_TRACKING_URI, else runs)")
    where.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (sqlite:///..., http://127.0.0.1:5000)")
    p.add_argument("--experiment", default=PRETRAIN_EXPERIMENT, help=f"experiment of the pretraining runs "
                                                                       f"(default {PRETRAIN_EXPERIMENT})")
    p.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS),
                   help=f"score columns, as we name them (default: {' '.join(DEFAULT_METRICS)})")
    p.add_argument("--sort", metavar="METRIC", help="sort by a score (high first), steps, minutes (fastest first) or run")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV (scores in percent, with their steps)")
    p.add_argument("--log", action="store_true", help=f"log the table as artifacts of a new '{COMPARE_EXPERIMENT}' run")
    return p


def run(args: argparse.Namespace) -> str:
    """Build, print and optionally write / log the table; returns its Markdown."""
    metrics = list(dict.fromkeys(args.metrics))
    if args.sort is not None:
        _score_column(args.sort, metrics)  # a bad --sort fails before the store is read
    uri, runs_root = resolve_store(args.runs_root, args.tracking_uri)
    rows = sort_rows(collect_rows(tracking.client(uri), uri, args.experiment, metrics), args.sort, metrics)
    markdown = to_markdown(table_cells(rows, metrics))
    print(markdown)
    if not rows:
        print(f"(no runs in experiment {args.experiment!r} of {uri})", file=sys.stderr)
    csv_text = to_csv(rows, metrics)
    if args.csv:
        Path(args.csv).expanduser().write_text(csv_text)
    if args.log:
        params = {"experiment": args.experiment, "metrics": " ".join(metrics), "sort": args.sort or "start_time",
                  "runs": len(rows)}
        run_id = log_table(uri, runs_root, markdown, csv_text, params)
        print(f"logged compare.md and compare.csv to MLflow run {run_id} (experiment {COMPARE_EXPERIMENT}, {uri})",
              file=sys.stderr)
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from mlflow.exceptions import MlflowException

    try:
        run(args)
    except CompareError as exn:
        print(f"eval.compare: error: {exn}", file=sys.stderr)
        return 2
    except (MlflowException, OSError) as exn:
        message = " ".join(str(getattr(exn, "message", exn)).split())
        print(f"eval.compare: error: {type(exn).__name__}: {message[:500]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
