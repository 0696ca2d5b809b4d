"""Typed configuration: dataclasses with defaults, named YAML recipes, `key=value` overrides.

Everything is validated before any work starts; an invalid value fails with one line naming the
field, the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).parent / "recipes"


class ConfigError(ValueError):
    """A setting is invalid; the message names the field, the value and what is allowed."""


@dataclass
class DataConfig:
    train: str | None = None  # shards: a folder, a brace pattern or URL; None = built-in Fashion-MNIST
    test: str | None = None  # labelled held-out shards to score kNN on when data.train is set
    fashion_mnist_dir: str | None = None  # where the built-in dataset's IDX files are (default: Debian's folder)
    load_size: int | None = None  # size the CPU workers decode to; None = the backbone's image size
    num_workers: int = 2  # CPU decoding processes per rank; epochs mode needs >= ranks x workers shards
    shuffle_buffer: int = 2000
    resampled: bool = False  # endless sampling of shards with replacement (huge sets) instead of epochs
    shards_per_epoch: int | None = None  # resampled mode: shard draws per virtual epoch; None = max(shards, ranks x workers)
    max_corrupt_fraction: float = 0.01  # stop the run when more of the samples read are corrupt
    mean: list[float] | None = None  # normalisation; None = the shards' manifest
    std: list[float] | None = None


@dataclass
class OptimConfig:
    lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    clip_grad: float | None = 1.0  # max gradient norm; null = no clipping
    clip_per_param: bool = False  # clip each parameter's gradient norm on its own (DINO) instead of the global norm


@dataclass
class TrainConfig:
    batch_size: int = 64  # per process; global batch = batch_size x processes x grad_accum
    grad_accum: int = 1
    total_steps: int = 1000
    mixed_precision: str | None = None  # no | fp16 | bf16; None = the launcher's (--mixed_precision, its config file), else no
    seed: int = 0
    out_dir: str = "runs"
    run_name: str | None = None  # None = derived from the config, so the same command resumes
    log_every: int = 20
    ckpt_every: int = 500
    keep_last: int = 3
    progress: bool = True
    cpu_threads: int | None = None  # torch threads per process on a CPU; None = the cores shared among local processes
    stop_at: int | None = None  # end this launch after this step, checkpointed (job time limits); relaunch to go on
    grace_seconds: float = 90.0  # on SIGTERM/SIGUSR1: finish the step, checkpoint and exit (code 75) within this time
    max_nonfinite_steps: int = 10  # stop (code 3) after this many steps in a row with a non-finite loss or gradient


@dataclass
class EvalConfig:
    knn: bool = True  # score the final checkpoint (and the random initialisation) with kNN
    knn_k: int = 20
    knn_train_samples: int | None = None  # size of the kNN memory bank; None = the whole train split
    knn_every: int = 0  # kNN on a fixed subset every N steps while training (metric knn_subset/top1@K); 0 = off
    knn_every_train_samples: int = 2000  # the subset's memory bank
    knn_every_test_samples: int = 1000  # the subset's queries


@dataclass
class Config:
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "vit"})
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "mae"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    recipe: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def digest(self) -> str:
        """A short hash of everything that changes what is trained (not logging or eval)."""
        d = self.to_dict()
        for k in ("log_every", "ckpt_every", "keep_last", "progress", "run_name", "out_dir", "stop_at", "cpu_threads",
                  "grace_seconds", "max_nonfinite_steps"):
            d["train"].pop(k)
        d.pop("eval")
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def run_dir(self) -> Path:
        backbone = str(self.backbone["name"]).replace(":", "-")  # timm:NAME -> timm-NAME, a portable folder name
        name = self.train.run_name or f"{self.objective['name']}-{backbone}-{self.digest()}"
        return Path(self.train.out_dir) / name


SECTIONS = {f.name: f for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------- recipes

def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPES / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"recipe={name_or_path!r} not found: use a YAML file path or one of {', '.join(list_recipes())}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of sections (backbone, objective, data, optim, train, eval)")
    return data


# --------------------------------------------------------------------------- building

def _check_type(where: str, value: Any, annotation: Any) -> Any:
    """Coerce ints to floats where a float is wanted; refuse anything else of the wrong type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(where, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list, written [a,b]")
        return [_check_type(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, bool):
        raise ConfigError(f"{where}={value!r} must be of type str: YAML reads unquoted no / yes / on / off as booleans, "
                          f"so quote the value in the recipe, e.g. {where.split('.')[-1]}: 'no'")
    if annotation in (int, float, str, bool) and not (
        isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
    ):
        raise ConfigError(f"{where}={value!r} must be of type {annotation.__name__}")
    return value


def _apply(cfg: Config, section: str, key: str, value: Any) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} (in {section}.{key}): sections are {', '.join(SECTIONS)}")
    target = getattr(cfg, section)
    if isinstance(target, dict):
        target[key] = value
        return
    fields = {f.name: f for f in dataclasses.fields(target)}
    if key not in fields:
        raise ConfigError(f"unknown setting {section}.{key}; {section} has: {', '.join(fields)}")
    hints = typing.get_type_hints(type(target))
    try:
        setattr(target, key, _check_type(f"{section}.{key}", value, hints[key]))
    except ConfigError as e:
        raise ConfigError(f"{e}{'' if 'e.g.' in str(e) else _example(f'{section}.{key}')}") from None


def default_of(where: str) -> Any:
    """The default of a typed setting ('train.batch_size' -> 64); None for backbone / objective options."""
    section, _, key = where.partition(".")
    spec = SECTIONS.get(section)
    if spec is None or not dataclasses.is_dataclass(spec.default_factory()):
        return None
    for f in dataclasses.fields(spec.default_factory()):
        if f.name == key:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    return None


def _example(where: str) -> str:
    """', e.g. train.batch_size=64 (the default)' for a setting with a default that is set."""
    default = default_of(where)
    if default is None:
        return ""
    shown = json.dumps(default) if isinstance(default, (list, bool)) else default
    return f", e.g. {where}={shown} (the default)"


def merge(cfg: Config, tree: dict[str, Any]) -> Config:
    for section, values in tree.items():
        if section == "recipe":
            cfg.recipe = values
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section {section!r} must be a mapping, got {values!r}")
        for key, value in values.items():
            _apply(cfg, section, key, value)
    return cfg


def parse_override(text: str) -> tuple[str, str, Any]:
    m = re.fullmatch(r"([a-z_]+)\.([A-Za-z0-9_]+)=(.*)", text)
    if not m:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. optim.lr=1e-3 or backbone.depth=6")
    section, key, raw = m.groups()
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string
    return section, key, value


def _takes_text(section: str, key: str) -> bool:
    """Whether a typed setting is a string (data.train, train.mixed_precision, ...)."""
    spec = SECTIONS.get(section)
    if spec is None or not dataclasses.is_dataclass(spec.default_factory()):
        return False
    hint = typing.get_type_hints(type(spec.default_factory())).get(key)
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


def apply_override(cfg: Config, text: str) -> None:
    """One section.key=value. A string setting takes the text as written (without surrounding
    quotes; null, ~ or nothing: None), because YAML would read train.mixed_precision=no as a
    boolean, a pipe: command with a header ("Authorization: Bearer ...") as a mapping and drop
    what follows a " #". Other settings take YAML's reading."""
    section, key, value = parse_override(text)
    raw = text.split("=", 1)[1]
    if value is not None and _takes_text(section, key):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        value = value if quoted and isinstance(value, str) else raw
    _apply(cfg, section, key, value)


def _check_objective_name(objective: str) -> None:
    """--objective NAME without a recipe of that name: refuse an objective that does not exist by
    saying so (rather than "recipe not found"); a registered one goes on to the recipe's message."""
    from objectives import list_objectives  # here: it imports torch, and only a missing recipe needs it

    if objective not in list_objectives():
        raise ConfigError(f"--objective {objective!r} is not a registered objective (and recipe={objective!r} not found "
                          f"either): use one of {', '.join(list_objectives())}, or name a recipe with --recipe NAME_OR_YAML")


def build_config(objective: str | None = None, recipe: str | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- recipe (default: the objective's own recipe) <- key=value overrides."""
    cfg = Config()
    if recipe is None and objective is not None and objective not in list_recipes():
        _check_objective_name(objective)
    recipe = recipe or objective or "mae"
    merge(cfg, load_recipe(recipe))
    cfg.recipe = recipe
    if objective is not None:
        if cfg.objective.get("name", objective) != objective:
            raise ConfigError(
                f"--objective {objective} conflicts with recipe {recipe!r}, which trains "
                f"objective.name={cfg.objective['name']!r}: drop one of the two"
            )
        cfg.objective["name"] = objective
    for text in overrides:
        apply_override(cfg, text)
    validate(cfg)
    return cfg


def _positive(where: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        fix = _example(where) or f", or leave {where} unset (null)"
        raise ConfigError(f"{where}={value!r} must be {'>= 0' if allow_zero else '> 0'}{fix}")


def validate(cfg: Config) -> None:
    """Checks that need no model; building the backbone and objective (see pretrain.train)
    checks the rest, before any data is read."""
    t, o = cfg.train, cfg.optim
    for name in ("batch_size", "grad_accum", "total_steps", "log_every", "ckpt_every", "keep_last"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("optim.lr", o.lr)
    _positive("optim.warmup_steps", o.warmup_steps, allow_zero=True)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("data.num_workers", cfg.data.num_workers, allow_zero=True)
    _positive("data.shuffle_buffer", cfg.data.shuffle_buffer)
    if cfg.data.load_size is not None:
        _positive("data.load_size", cfg.data.load_size)
    if cfg.data.shards_per_epoch is not None:
        _positive("data.shards_per_epoch", cfg.data.shards_per_epoch)
        if not cfg.data.resampled:
            raise ConfigError(f"data.shards_per_epoch={cfg.data.shards_per_epoch} applies to resampled mode only: "
                              "set data.resampled=true or drop it")
    if not 0 <= cfg.data.max_corrupt_fraction < 1:
        raise ConfigError(f"data.max_corrupt_fraction={cfg.data.max_corrupt_fraction} must be in [0, 1), e.g. 0.01")
    _positive("eval.knn_k", cfg.eval.knn_k)
    if t.cpu_threads is not None:
        _positive("train.cpu_threads", t.cpu_threads)
    if t.stop_at is not None:
        _positive("train.stop_at", t.stop_at)
    _positive("train.grace_seconds", t.grace_seconds)
    _positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    if cfg.eval.knn_train_samples is not None:
        _positive("eval.knn_train_samples", cfg.eval.knn_train_samples)
    if cfg.eval.knn_every < 0:
        raise ConfigError(f"eval.knn_every={cfg.eval.knn_every} must be >= 0 (0 = no kNN while training), e.g. 100")
    _positive("eval.knn_every_train_samples", cfg.eval.knn_every_train_samples)
    _positive("eval.knn_every_test_samples", cfg.eval.knn_every_test_samples)
    if cfg.eval.knn_every and cfg.eval.knn_k > cfg.eval.knn_every_train_samples:
        raise ConfigError(f"eval.knn_k={cfg.eval.knn_k} exceeds eval.knn_every_train_samples="
                          f"{cfg.eval.knn_every_train_samples}: raise the subset or lower k")
    if o.clip_grad is not None:
        _positive("optim.clip_grad", o.clip_grad)
    if o.warmup_steps >= t.total_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be below train.total_steps={t.total_steps}: lower "
                          f"optim.warmup_steps (e.g. {max(1, t.total_steps // 10) if t.total_steps > 1 else 0}) or raise train.total_steps")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if t.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision={t.mixed_precision!r}: allowed are no, fp16, bf16 (or null: the launcher's)")
    for section in ("backbone", "objective"):
        if not isinstance(getattr(cfg, section).get("name"), str):
            raise ConfigError(f"{section}.name is missing: set e.g. {section}.name={'vit' if section == 'backbone' else 'mae'}")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError(f"data.mean={cfg.data.mean} and data.std={cfg.data.std}: set both or neither")
    _validate_more(cfg)


def _validate_more(cfg: Config) -> None:
    """Values that pass the checks above and still fail later, or silently train something else."""
    t, o, d, e = cfg.train, cfg.optim, cfg.data, cfg.eval
    if not 0 <= o.min_lr <= o.lr:
        raise ConfigError(f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}] (where the cosine schedule ends), "
                          f"e.g. optim.min_lr=0 or {o.lr / 100:g}")
    if not 0 <= t.seed < 2**31:
        raise ConfigError(f"train.seed={t.seed} must be in [0, 2**31) (NumPy takes seeds below 2**32, one per "
                          "process), e.g. train.seed=0")
    if d.mean is not None and d.std is not None:
        if len(d.mean) != len(d.std) or not d.mean:
            raise ConfigError(f"data.mean={d.mean} and data.std={d.std} must have the same length, one value per "
                              "channel (or one for all), e.g. data.mean=[0.5] data.std=[0.25]")
        if min(d.std) <= 0:
            raise ConfigError(f"data.std={d.std} must be > 0 for every channel (pixels are divided by it), "
                              "e.g. data.std=[0.25]")
    if e.knn and e.knn_train_samples is not None and e.knn_k > e.knn_train_samples:
        raise ConfigError(f"eval.knn_k={e.knn_k} exceeds eval.knn_train_samples={e.knn_train_samples}, the memory bank "
                          "it votes from: lower eval.knn_k (e.g. 20) or raise eval.knn_train_samples")
    out = Path(t.out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.out_dir={t.out_dir} is a file: give a folder for the runs (created if missing), "
                          "e.g. train.out_dir=runs")


def component_error(section: str, err: Exception) -> ConfigError:
    """Turn a builder's ValueError ("image_size=30 is not ...") into one naming the config field."""
    msg = re.sub(r"\be\.g\. ([A-Za-z_]+=)", rf"e.g. {section}.\1", str(err))  # "e.g. dim=64" -> "e.g. backbone.dim=64"
    if re.match(r"[A-Za-z_]+=", msg):
        return ConfigError(f"{section}.{msg}")
    return ConfigError(f"{section}: {msg}")


def save(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load(path: Path) -> Config:
    return merge(Config(), yaml.safe_load(Path(path).read_text()))


def differences(a: Config, b: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted names of the settings that differ between two configs."""
    out = []
    da, db = a.to_dict(), b.to_dict()
    for section in SECTIONS:
        va, vb = da.get(section), db.get(section)
        if not isinstance(va, dict):
            if va != vb and section not in ignore:
                out.append(section)
            continue
        for key in sorted(set(va) | set(vb)):
            name = f"{section}.{key}"
            if va.get(key) != vb.get(key) and name not in ignore and section not in ignore:
                out.append(name)
    return out
