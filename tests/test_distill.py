"""Supervised training and DeiT distillation: both losses against plain formulas, the distillation
token, the teacher (frozen, from our checkpoints or timm with a local weights file, in its own
preprocessing), and the CLI from a supervised teacher to a distilled student."""
from __future__ import annotations

import math

import pytest
import torch

import backbones
import objectives
from conftest import PooledOnlyBackbone, tiny_vit_kwargs
from helpers import only_run_dir, run_pretrain, without_gradient
from objectives.distill import distillation_loss

K = 10


def make_vit(name="vit", **over):
    torch.manual_seed(0)
    return backbones.create(name, **tiny_vit_kwargs(**over))


def save_teacher(directory, num_classes=K, **over):
    """An exported backbone with a head, as a supervised checkpoint holds them."""
    torch.manual_seed(1)
    teacher = objectives.create("supervised", make_vit(**over), num_classes=num_classes)
    backbones.save(teacher.export_backbone(), directory,
                   extra={"preprocess": {"image_size": list(teacher.backbone.image_size), "channels": 1,
                                         "mean": [0.5], "std": [0.25]}})
    backbones.save_head(teacher.export_heads()["head"], directory)
    return teacher


def make_student(name="vit"):
    """A vit student carries DeiT's distillation token; simple_vit has none (two heads on its pooling)."""
    return make_vit(name, distill_token=True) if name == "vit" else make_vit(name)


def make_distill(tmp_path, name="vit", **hp):
    if "teacher" not in hp and hp.get("kind") != "none":
        save_teacher(tmp_path / "teacher")
        hp["teacher"] = str(tmp_path / "teacher")
    return objectives.create("distill", make_student(name), num_classes=K, **hp)


def batch(B=4, size=28):
    torch.manual_seed(2)
    return {"views": [torch.randn(B, 1, size, size)], "labels": torch.randint(0, K, (B,))}


# --------------------------------------------------------------------------- the losses


def plain_distillation_loss(cls_logits, dist_logits, labels, teacher_logits, kind, alpha, tau):
    """Per sample with explicit sums: CE = -log softmax[label]; KL(q || p) = sum q (log q - log p)."""
    total = 0.0
    B = cls_logits.shape[0]
    for b in range(B):
        p_cls = torch.exp(cls_logits[b]) / torch.exp(cls_logits[b]).sum()
        ce = -torch.log(p_cls[labels[b]])
        if kind == "soft":
            q = torch.exp(teacher_logits[b] / tau) / torch.exp(teacher_logits[b] / tau).sum()
            p = torch.exp(dist_logits[b] / tau) / torch.exp(dist_logits[b] / tau).sum()
            term = (q * (torch.log(q) - torch.log(p))).sum() * tau * tau
        else:
            p = torch.exp(dist_logits[b]) / torch.exp(dist_logits[b]).sum()
            term = -torch.log(p[int(torch.argmax(teacher_logits[b]))])
        total += (1 - alpha) * ce + alpha * term
    return total / B


@pytest.mark.parametrize("kind, alpha, tau", [("hard", 0.5, 1.0), ("soft", 0.5, 1.0), ("soft", 0.3, 3.0),
                                              ("hard", 1.0, 1.0)])
def test_distillation_loss_matches_plain_formula(kind, alpha, tau):
    torch.manual_seed(0)
    cls_logits, dist_logits, teacher = (torch.randn(6, K, dtype=torch.float64) * 2 for _ in range(3))
    labels = torch.randint(0, K, (6,))
    got = distillation_loss(cls_logits, dist_logits, labels, teacher, kind, alpha, tau)
    want = plain_distillation_loss(cls_logits, dist_logits, labels, teacher, kind, alpha, tau)
    assert torch.allclose(got.double(), want, atol=1e-6), (got, want)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_objective_loss_matches_plain_formula_with_its_teacher(tmp_path, kind):
    dist = make_distill(tmp_path, kind=kind, alpha=0.4, tau=2.0, label_smoothing=0.0)
    dist.set_normalisation([0.5], [0.25])
    b = batch()
    out = dist(b)
    with torch.no_grad():
        cls_logits, dist_logits = dist.forward_student(b["views"][0])
        teacher = dist.teacher_model(b["views"][0])
    want = plain_distillation_loss(cls_logits.double(), dist_logits.double(), b["labels"], teacher.double(), kind, 0.4, 2.0)
    assert torch.allclose(out["loss"].double(), want, atol=1e-5)
    agree = (dist_logits.argmax(-1) == teacher.argmax(-1)).float().mean()
    assert out["teacher_agreement"] == agree


def test_soft_loss_is_zero_kl_when_student_copies_the_teacher():
    teacher = torch.randn(5, K)
    labels = torch.zeros(5, dtype=torch.long)
    only_kd = distillation_loss(teacher, teacher, labels, teacher, "soft", alpha=1.0, tau=2.0)
    assert only_kd.abs() < 1e-6


def test_supervised_loss_is_label_smoothed_cross_entropy():
    sup = objectives.create("supervised", make_vit(), num_classes=K, label_smoothing=0.1)
    b = batch()
    out = sup(b)
    logits = sup.head(sup.backbone(b["views"][0])).double()
    logp = logits.log_softmax(-1)
    want = -(0.9 * logp.gather(1, b["labels"][:, None]).squeeze(1) + 0.1 * logp.mean(-1)).mean()
    assert torch.allclose(out["loss"].double(), want, atol=1e-6)
    assert 0 <= out["train_top1"] <= 1


# --------------------------------------------------------------------------- the student


def trainable(obj):
    return {n: p for n, p in obj.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_a_step_reaches_every_student_parameter_and_never_the_teacher(tmp_path, name, kind):
    dist = make_distill(tmp_path, name=name, kind=kind)
    assert dist.token == (name == "vit")  # simple_vit: two heads on the pooled embedding
    out = dist(batch())
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = without_gradient(dist)
    assert not missing, missing
    assert all(not p.requires_grad and p.grad is None for p in dist.teacher_model.parameters())
    assert not any(n.startswith("teacher_model.") for n in trainable(dist))


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
def test_supervised_step_reaches_every_parameter(name):
    sup = objectives.create("supervised", make_vit(name), num_classes=K)
    sup(batch())["loss"].backward()
    missing = without_gradient(sup)
    assert not missing, missing


def test_the_distillation_token_feeds_its_own_head_and_a_checkpoint_predicts_with_both(tmp_path):
    dist = make_distill(tmp_path)
    bb = dist.backbone
    assert bb.has_distill_token and bb.num_prefix_tokens == 2
    x = batch()["views"][0]
    with torch.no_grad():
        tokens = bb.forward_features(x)  # (B, 2+N, D): [cls, dist, patches]
        cls_logits, dist_logits = dist.forward_student(x)
    assert torch.allclose(dist_logits, dist.heads.head_dist(tokens[:, 1]), atol=1e-6)
    assert torch.allclose(cls_logits, dist.heads.head(tokens[:, 0]), atol=1e-6)
    with torch.no_grad():  # moving the distillation token moves the distillation logits
        bb.dist_token.add_(1.0)
        moved = dist.forward_student(x)[1]
    assert not torch.allclose(moved, dist_logits)
    # inference: the mean of the two heads, from the live objective and from a saved checkpoint
    pred = dist.predict(x)
    with torch.no_grad():
        c, d = dist.forward_student(x)
    assert torch.allclose(pred, (c + d) / 2, atol=1e-6)
    heads = dist.export_heads()
    backbones.save(dist.export_backbone(), tmp_path / "student")
    backbones.save_head(heads["head"], tmp_path / "student", heads["head_dist"])
    clf = backbones.load_classifier(tmp_path / "student").eval()
    with torch.no_grad():
        assert torch.allclose(clf(x), pred, atol=1e-5)
    assert "backbone.dist_token" in dist.no_weight_decay()


def test_a_backbone_without_a_distillation_token_gets_two_heads_on_the_pooled_embedding(tmp_path):
    save_teacher(tmp_path / "t")
    dist = objectives.create("distill", PooledOnlyBackbone(), num_classes=K, teacher=str(tmp_path / "t"))
    assert not dist.token
    b = {"views": [torch.randn(4, 1, *PooledOnlyBackbone().image_size)], "labels": torch.randint(0, K, (4,))}
    assert torch.isfinite(dist(b)["loss"])
    # exported as one head, the average of the two: the same prediction
    (merged,) = dist.export_heads().values()
    with torch.no_grad():
        assert torch.allclose(merged(dist.backbone(b["views"][0])), dist.predict(b["views"][0]), atol=1e-6)


# --------------------------------------------------------------------------- the teacher


def test_the_teacher_is_frozen_in_eval_mode_and_gives_the_saved_predictions(tmp_path):
    saved = save_teacher(tmp_path / "teacher").eval()
    dist = make_distill(tmp_path, teacher=str(tmp_path / "teacher"))
    dist.train()
    assert not dist.teacher_model.training
    dist.set_normalisation([0.5], [0.25])  # the teacher's own normalisation: its input is the view as is
    x = batch()["views"][0]
    with torch.no_grad():
        assert torch.allclose(dist.teacher_model(dist.teacher_input(x)), saved.head(saved.backbone(x)), atol=1e-6)


def test_teacher_input_is_converted_to_the_teachers_normalisation_and_size(tmp_path):
    save_teacher(tmp_path / "teacher", image_size=14)  # the teacher was trained at 14 px
    dist = make_distill(tmp_path, teacher=str(tmp_path / "teacher"))
    dist.set_normalisation([0.2], [0.5])
    pixels = torch.rand(2, 1, 28, 28)
    view = (pixels - 0.2) / 0.5
    got = dist.teacher_input(view)
    assert got.shape == (2, 1, 14, 14)
    want = torch.nn.functional.interpolate((pixels - 0.5) / 0.25, size=(14, 14), mode="bilinear",
                                           align_corners=False, antialias=True)
    assert torch.allclose(got, want, atol=1e-5)


def test_teacher_errors_name_the_setting_and_the_fix(tmp_path):
    save_teacher(tmp_path / "five", num_classes=5)
    with pytest.raises(ValueError, match="predicts 5 classes but the student has num_classes=10"):
        make_distill(tmp_path, teacher=str(tmp_path / "five"))
    backbones.save(make_vit(), tmp_path / "headless")
    with pytest.raises(FileNotFoundError, match="no classifier head"):
        make_distill(tmp_path, teacher=str(tmp_path / "headless"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_distill(tmp_path, teacher=str(tmp_path / "nowhere"))
    (tmp_path / "run" / "checkpoints" / "step-000000").mkdir(parents=True)
    with pytest.raises(ValueError, match="random initialisation"):
        make_distill(tmp_path, teacher=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="teacher=None: no teacher is set"):
        objectives.create("distill", make_vit(), num_classes=K)
    with pytest.raises(ValueError, match="teacher_weights=FILE"):
        make_distill(tmp_path, teacher="timm:resnet18")
    with pytest.raises(FileNotFoundError, match="teacher_weights='nope.pth' is not a file"):
        make_distill(tmp_path, teacher="timm:resnet18", teacher_weights="nope.pth")
    with pytest.raises(ValueError, match="kind='medium'"):
        make_distill(tmp_path, kind="medium")
    with pytest.raises(ValueError, match="num_classes is not set"):
        objectives.create("supervised", make_vit())


def test_a_timm_teacher_loads_from_a_local_weights_file(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=K, in_chans=1).eval()
    save_file(model.state_dict(), str(tmp_path / "resnet.safetensors"))
    dist = make_distill(tmp_path, teacher="timm:resnet10t", teacher_weights=str(tmp_path / "resnet.safetensors"))
    x = batch()["views"][0]
    with torch.no_grad():
        assert torch.allclose(dist.teacher_model(dist.teacher_input(x)), model(x), atol=1e-5)
    assert torch.isfinite(dist(batch())["loss"])
    torch.save({"model": model.state_dict()}, tmp_path / "wrapped.pth")  # DeiT's checkpoint layout
    make_distill(tmp_path, teacher="timm:resnet10t", teacher_weights=str(tmp_path / "wrapped.pth"))
    wrong = timm.create_model("resnet10t", pretrained=False, num_classes=5, in_chans=1)
    save_file(wrong.state_dict(), str(tmp_path / "five.safetensors"))
    with pytest.raises(ValueError, match="teacher_weights=.*do not fit resnet10t with num_classes=10"):
        make_distill(tmp_path, teacher="timm:resnet10t", teacher_weights=str(tmp_path / "five.safetensors"))


def test_an_rgb_teacher_teaches_a_grey_student(tmp_path):
    torch.manual_seed(1)
    rgb = objectives.create("supervised", make_vit(in_chans=3), num_classes=K)
    backbones.save(rgb.export_backbone(), tmp_path / "rgb", extra={"preprocess": {
        "image_size": [28, 28], "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2]}})
    backbones.save_head(rgb.head, tmp_path / "rgb")
    dist = make_distill(tmp_path, teacher=str(tmp_path / "rgb"))
    dist.set_normalisation([0.25], [0.5])
    pixels = torch.rand(2, 1, 28, 28)
    got = dist.teacher_input((pixels - 0.25) / 0.5)
    want = (pixels.expand(-1, 3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.2
    assert torch.allclose(got, want, atol=1e-5)


def test_without_a_teacher_kind_none_is_the_label_loss():
    dist = objectives.create("distill", make_student(), num_classes=K, kind="none", label_smoothing=0.0)
    assert dist.heads.head_dist is None  # no head left without a gradient (DDP would stall on it)
    b = batch()
    out = dist(b)
    out["loss"].backward()
    assert all(p.grad is not None for p in dist.parameters() if p.requires_grad)
    cls_logits, dist_logits = dist.forward_student(b["views"][0])
    assert dist_logits is None
    assert torch.allclose(out["loss"], torch.nn.functional.cross_entropy(cls_logits, b["labels"]), atol=1e-6)
    assert math.isfinite(out["loss"].item())


# --------------------------------------------------------------------------- DeiT's MixUp / CutMix


MIX = dict(mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, mix_switch_prob=0.5)


def replay_mix(obj, b, seed):
    """The mixed images and soft targets the objective drew with `seed`, drawn again."""
    torch.manual_seed(seed)
    return obj.mix(b["views"][0], b["labels"])


def plain_soft_ce(logits, targets):
    logp = logits.double().log_softmax(-1)
    return -(targets.double() * logp).sum(-1).mean()


@pytest.mark.parametrize("seed", [0, 1, 5])
def test_supervised_with_mixing_trains_on_soft_targets(seed):
    sup = objectives.create("supervised", make_vit(), num_classes=K, label_smoothing=0.1, **MIX).train()
    b = batch(B=6)
    torch.manual_seed(seed)
    out = sup(b)
    mixed, targets = replay_mix(sup, b, seed)
    assert not torch.equal(mixed, b["views"][0]) and targets.shape == (6, K)
    with torch.no_grad():
        want = plain_soft_ce(sup.head(sup.backbone(mixed)), targets)
    assert torch.allclose(out["loss"].double(), want, atol=1e-5)
    out["loss"].backward()
    assert not without_gradient(sup)


def test_supervised_does_not_mix_in_eval_mode_and_mixing_is_off_by_default():
    b = batch()
    mixing = objectives.create("supervised", make_vit(), num_classes=K, **MIX).eval()
    plain = objectives.create("supervised", make_vit(), num_classes=K)
    assert plain.mix is None
    with torch.no_grad():
        assert torch.allclose(mixing(b)["loss"], plain(b)["loss"], atol=1e-6)  # same weights (make_vit seeds)


@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_distill_teacher_and_student_see_the_mixed_images(tmp_path, kind):
    """DeiT: the class head on the mixed soft targets; the distillation target from the teacher on
    the mixed images (hard: its argmax)."""
    dist = make_distill(tmp_path, kind=kind, alpha=0.5, tau=1.0, label_smoothing=0.1, **MIX).train()
    dist.set_normalisation([0.5], [0.25])
    b = batch(B=6)
    torch.manual_seed(3)
    out = dist(b)
    mixed, targets = replay_mix(dist, b, 3)
    with torch.no_grad():
        cls_logits, dist_logits = (t.double() for t in dist.forward_student(mixed))
        teacher = dist.teacher_model(dist.teacher_input(mixed)).double()
    base = plain_soft_ce(cls_logits, targets)
    if kind == "hard":
        term = torch.nn.functional.cross_entropy(dist_logits, teacher.argmax(-1))
    else:
        q, logp = teacher.softmax(-1), dist_logits.log_softmax(-1)
        term = (q * (q.log() - logp)).sum(-1).mean()
    assert torch.allclose(out["loss"].double(), 0.5 * base + 0.5 * term, atol=1e-5)
    assert out["teacher_agreement"] == (dist_logits.argmax(-1) == teacher.argmax(-1)).float().mean()


def test_mix_settings_are_checked_by_name(tmp_path):
    with pytest.raises(ValueError, match="mix_prob=1.5"):
        objectives.create("supervised", make_vit(), num_classes=K, mix_prob=1.5)
    with pytest.raises(ValueError, match="cutmix_alpha=-1"):
        make_distill(tmp_path, kind="none", cutmix_alpha=-1)
    with pytest.raises(ValueError, match="ViewSpec randaugment_ops=-2"):
        make_distill(tmp_path, kind="none", randaugment_ops=-2)


# --------------------------------------------------------------------------- the CLI


def test_cli_trains_a_teacher_then_distils_a_student_from_its_run(tmp_path):
    small = ["backbone.patch_size=7", "backbone.dim=32", "backbone.depth=2", "backbone.heads=2",
             "train.batch_size=16", "train.total_steps=3", "train.log_every=1", "train.ckpt_every=3",
             "train.progress=false", "optim.warmup_steps=1", "data.num_workers=1", "eval.knn=false"]
    run_pretrain("--objective", "supervised", *small, f"train.out_dir={tmp_path / 'teacher'}")
    teacher_run = only_run_dir(tmp_path / "teacher")
    ckpt = teacher_run / "checkpoints" / "step-000003"
    assert (ckpt / "head.safetensors").is_file()  # the number of classes came from the shards' manifest
    assert backbones.load_classifier(ckpt).num_classes == 10
    run_pretrain("--objective", "distill", *small, f"objective.teacher={teacher_run}",
                 f"train.out_dir={tmp_path / 'student'}")
    student = only_run_dir(tmp_path / "student") / "checkpoints" / "step-000003"
    clf = backbones.load_classifier(student)  # the recipe's student carries the distillation token
    assert clf.backbone.has_distill_token and clf.head_dist is not None
    assert clf(torch.randn(2, 1, 28, 28)).shape == (2, 10)
