"""Config: recipes, overrides, validation with one-line errors naming field, value and fix."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.config import ConfigError, build_config, differences, load, save
from pretrain.train import build_objective, lr_at


def test_default_recipe_and_overrides():
    cfg = build_config("mae", None, ["optim.lr=3e-4", "backbone.depth=3", "train.batch_size=8", "data.mean=[0.5]",
                                     "data.std=[0.25]", "objective.norm_pix_loss=true"])
    assert cfg.recipe == "mae" and cfg.objective["name"] == "mae"
    assert cfg.optim.lr == 3e-4 and cfg.backbone["depth"] == 3 and cfg.train.batch_size == 8
    assert cfg.data.mean == [0.5] and cfg.objective["norm_pix_loss"] is True
    assert build_objective(cfg).backbone.embed_dim == 128


def test_ints_become_floats_where_floats_are_wanted():
    assert build_config("mae", None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "train.batch_size=0 must be > 0"),
    ("train.batch_size=-4", "train.batch_size=-4 must be > 0"),
    ("train.batch_size=abc", "train.batch_size='abc' must be of type int"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8': allowed are no, fp16, bf16"),
    ("train.nope=1", "unknown setting train.nope; train has: batch_size"),
    ("optim.warmup_steps=100000", "optim.warmup_steps=100000 must be below train.total_steps"),
    ("lr=1", "must look like section.key=value"),
])
def test_invalid_settings_fail_before_work(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build_config("mae", None, [override])


@pytest.mark.parametrize("override, message", [
    ("backbone.image_size=30", "backbone.image_size=30 is not divisible by patch_size=4"),
    ("backbone.name=resnet", "unknown backbone 'resnet'; registered backbones are: .*simple_vit, .*vit_3d, .*or timm:NAME"),
    ("objective.mask_ratio=1.5", "objective.mask_ratio=1.5 must be strictly between 0 and 1"),
])
def test_component_errors_name_the_config_field(override, message):
    cfg = build_config("mae", None, [override])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_objective(cfg)


def test_unknown_objective_and_recipe():
    with pytest.raises(ConfigError, match="recipe='byol' not found"):
        build_config("byol")
    cfg = build_config(None, "tiny", ["objective.name=byol"])
    with pytest.raises(ConfigError, match="unknown objective .byol.; registered objectives are: .*mae"):
        build_objective(cfg)


def test_cli_prints_one_line_error_and_exit_code_2(root):
    proc = subprocess.run([sys.executable, "pretrain/run.py", "--objective", "mae", "backbone.image_size=30"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: backbone.image_size=30 is not divisible by patch_size=4: use an image size that is a multiple "
        "of 4 or a patch size that divides it"]


def test_save_load_round_trip_and_differences(tmp_path):
    cfg = build_config("mae", None, ["train.total_steps=77"])
    save(cfg, tmp_path / "c.yaml")
    again = load(tmp_path / "c.yaml")
    assert again.to_dict() == cfg.to_dict()
    other = build_config("mae", None, ["train.total_steps=78", "optim.lr=1e-2"])
    assert differences(cfg, other) == ["optim.lr", "train.total_steps"]
    assert differences(cfg, other, ignore=("train.total_steps",)) == ["optim.lr"]


def test_run_dir_is_stable_for_the_same_command_and_changes_with_the_recipe():
    a, b = build_config("mae"), build_config("mae")
    assert a.run_dir == b.run_dir
    assert build_config("mae", None, ["optim.lr=1e-2"]).run_dir != a.run_dir
    assert build_config("mae", None, ["train.log_every=5"]).run_dir == a.run_dir  # logging is not training


def test_lr_schedule_warms_up_then_follows_a_cosine():
    cfg = build_config("mae", None, ["optim.lr=1.0", "optim.min_lr=0.0", "optim.warmup_steps=10", "train.total_steps=110"])
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.5)
    assert lr_at(110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 110))


def test_missing_built_in_dataset_names_the_fix(root, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")}
    env.update(VIT_SSL_FASHION_MNIST=str(tmp_path / "nowhere"), VIT_SSL_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "pretrain/run.py", "--recipe", "tiny", f"train.out_dir={tmp_path}"],
                          cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert "apt-get install dataset-fashion-mnist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("per_param", [False, True])
def test_gradient_clipping_global_or_per_parameter(per_param):
    import torch
    from accelerate import Accelerator

    from pretrain.train import clip_gradients

    model = torch.nn.Linear(2, 1)
    model.weight.grad = torch.tensor([[6.0, 8.0]])  # norm 10
    model.bias.grad = torch.tensor([1.0])  # norm 1
    clip_gradients(Accelerator(cpu=True), model, 3.0, per_param)
    if per_param:  # DINO: each parameter on its own
        assert torch.allclose(model.weight.grad.norm(), torch.tensor(3.0), atol=1e-5)
        assert torch.allclose(model.bias.grad, torch.tensor([1.0]))
    else:  # one global norm sqrt(101) scaled down to 3
        scale = 3.0 / 101 ** 0.5
        assert torch.allclose(model.weight.grad, torch.tensor([[6.0, 8.0]]) * scale, atol=1e-5)
        assert torch.allclose(model.bias.grad, torch.tensor([1.0]) * scale, atol=1e-5)
