"""Learning on real data (slow): DINO's teacher beats its random init on kNN; a supervised model
learns the labels and teaches a distilled student. (MAE, SimMIM and MPP have theirs beside their
other tests.) Each runs the objective's own steps in-process: views from DeviceAugment, AdamW on
its parameter groups, the frozen parameters dropped, on_step after every step, as the trainer does."""
from __future__ import annotations

import math

import pytest
import torch

import backbones
import objectives
from data.augment import DeviceAugment
from data.builtin import load_fashion_mnist
from eval.features import extract_features
from eval.knn import knn_accuracy

MEAN, STD = [0.286], [0.353]
PRE = {"image_size": [28, 28], "channels": 1, "mean": MEAN, "std": STD}


def small_vit(**over):
    kw = dict(image_size=28, patch_size=4, in_chans=1, dim=64, depth=3, heads=4, mlp_ratio=2.0)
    kw.update(over)
    return backbones.create("vit", **kw)


def train_steps(objective, images, labels, steps, batch_size, lr, seed=0):
    """Returns the per-step outputs (floats) of `objective` trained for `steps` steps."""
    g = torch.Generator().manual_seed(seed)
    objective.set_total_steps(steps)
    objective.set_normalisation(MEAN, STD)
    augment = DeviceAugment(objective.views, MEAN, STD)
    opt = torch.optim.AdamW(objective.parameter_groups(0.04), lr=lr)
    history = []
    objective.train()
    for step in range(steps):
        for group in opt.param_groups:  # short linear warm-up, then constant
            group["lr"] = lr * min(1.0, (step + 1) / 10)
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        out = objective({"views": augment(images[idx]), "labels": labels[idx]})
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(objective.parameters(), 3.0)
        for p in objective.frozen_parameters():
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        objective.on_step(step + 1, steps)
        history.append({k: float(v.detach()) for k, v in out.items()})
    return history


def knn_top1(backbone, train, test):
    (xtr, ytr), (xte, yte) = train, test
    ftr, _ = extract_features(backbone, xtr, ytr, PRE)
    fte, _ = extract_features(backbone, xte, yte, PRE)
    return knn_accuracy(ftr, ytr, fte, yte, num_classes=10, ks=(20,))["top1@20"]


@pytest.fixture(scope="module")
def fashion():
    images, labels = load_fashion_mnist("train")
    test_images, test_labels = load_fashion_mnist("test")
    g = torch.Generator().manual_seed(0)
    bank = torch.randperm(len(images), generator=g)[:3000]
    return {"images": images, "labels": labels, "bank": (images[bank], labels[bank]),
            "test": (test_images[:1000], test_labels[:1000])}


@pytest.mark.slow
def test_dino_teacher_beats_its_random_init_on_knn(fashion):
    """About a minute of DINO on a small ViT: the loss falls from its start (before the centring's
    spread of the teacher pushes it back up, as it does at this scale: measured 4.75 -> 3.6 by step
    30, then ~4.8), never collapses to the uniform ln(K), and the teacher's kNN top-1 rises above
    its random init (measured 55.2 % -> 58.9 %, bank of 3,000, 1,000 test images)."""
    torch.manual_seed(0)
    K = 256
    dino = objectives.create("dino", small_vit(pool="cls"), out_dim=K, head_hidden_dim=256,
                             head_bottleneck_dim=64, num_local=2, local_size=12, momentum_teacher=0.99,
                             teacher_temp=0.04, teacher_temp_warmup_steps=0, freeze_last_layer_steps=5,
                             blur_sigma=(0.1, 1.0))
    before = knn_top1(dino.export_backbone(), fashion["bank"], fashion["test"])
    history = train_steps(dino, fashion["images"], fashion["labels"], steps=120, batch_size=64, lr=5e-4)
    after = knn_top1(dino.export_backbone(), fashion["bank"], fashion["test"])
    loss = [h["loss"] for h in history]
    assert sum(loss[20:40]) / 20 < sum(loss[:5]) / 5 - 0.5, loss
    assert max(loss[-10:]) < math.log(K) - 0.3, loss  # not collapsed to a uniform teacher
    assert after > before + 0.02, f"kNN top-1 {before:.3f} at random init -> {after:.3f} after DINO"


@pytest.mark.slow
def test_supervised_learns_and_teaches_a_distilled_student(fashion, tmp_path):
    """A supervised model learns the labels; a smaller student distilled from it (hard labels)
    learns to agree with it, and its loss falls."""
    torch.manual_seed(0)
    sup = objectives.create("supervised", small_vit(), num_classes=10, crop_scale=(0.6, 1.0))
    history = train_steps(sup, fashion["images"], fashion["labels"], steps=80, batch_size=128, lr=2e-3)
    loss = [h["loss"] for h in history]
    assert sum(loss[-10:]) / 10 < 0.75 * sum(loss[:10]) / 10, loss  # measured 2.21 -> 1.45 (label smoothing 0.1)
    assert sum(h["train_top1"] for h in history[-10:]) / 10 > 0.5

    backbones.save(sup.export_backbone(), tmp_path / "teacher", extra={"preprocess": PRE})
    backbones.save_head(sup.export_heads()["head"], tmp_path / "teacher")
    dist = objectives.create("distill", small_vit(dim=32, depth=2, heads=2, distill_token=True), num_classes=10,
                             teacher=str(tmp_path / "teacher"), kind="hard", crop_scale=(0.6, 1.0))
    history = train_steps(dist, fashion["images"], fashion["labels"], steps=80, batch_size=128, lr=2e-3, seed=1)
    loss = [h["loss"] for h in history]
    agree = [h["teacher_agreement"] for h in history]
    assert sum(loss[-10:]) / 10 < 0.7 * sum(loss[:10]) / 10, loss
    assert sum(agree[-10:]) / 10 > sum(agree[:10]) / 10 + 0.3, agree
