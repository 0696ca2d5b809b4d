"""DINO: the loss against a plain formula, the centre, the EMA teacher and its schedules, which
views the student and the teacher see, the frozen last layer, export, and the CLI."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.nn.functional as F

import backbones
import objectives
from conftest import tiny_vit_kwargs
from helpers import only_run_dir, run_pretrain, without_gradient
from objectives.dino import DINOLoss, teacher_momentum, teacher_temperature

K = 64


def make(num_local=2, in_chans=1, backbone=None, name="vit", **hp):
    torch.manual_seed(0)
    backbone = backbone or backbones.create(name, **tiny_vit_kwargs(in_chans=in_chans))
    kw = dict(out_dim=K, head_hidden_dim=48, head_bottleneck_dim=16, num_local=num_local)
    kw.update(hp)
    dino = objectives.create("dino", backbone, **kw)
    dino.set_total_steps(100)
    return dino


def batch_for(dino, B=3):
    c = dino.backbone.in_chans
    views = [torch.randn(B, c, v.size, v.size) for v in dino.views for _ in range(v.count)]
    return {"views": views, "labels": torch.zeros(B, dtype=torch.long)}


class AnySize(backbones.Backbone):
    """A backbone that only offers a pooled embedding and takes any input size (like a CNN)."""

    embed_dim, patch_size, in_chans, image_size = 8, 4, 1, (28, 28)

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4 * 4, 8)

    def forward(self, x):
        return self.net(F.adaptive_avg_pool2d(x, 4).flatten(1))


# --------------------------------------------------------------------------- the loss and the centre


def reference_loss(student, teacher, center, student_temp, teacher_temp):
    """Plain loops: for every teacher view iq and every other view iv, the cross-entropy between
    the centred, sharpened teacher softmax and the student softmax, averaged over the batch; then
    averaged over the pairs."""
    total, pairs = 0.0, 0
    for iq, t in enumerate(teacher):
        for iv, s in enumerate(student):
            if iv == iq:
                continue
            pair = 0.0
            for b in range(t.shape[0]):
                q = torch.exp((t[b] - center) / teacher_temp)
                q = q / q.sum()
                p = torch.exp(s[b] / student_temp)
                p = p / p.sum()
                pair += -(q * torch.log(p)).sum()
            total += pair / t.shape[0]
            pairs += 1
    return total / pairs


@pytest.mark.parametrize("n_views", [2, 3, 6])
def test_loss_matches_plain_formula(n_views):
    torch.manual_seed(0)
    crit = DINOLoss(K, student_temp=0.1)
    crit.center.copy_(torch.randn(1, K) * 0.1)
    student = [torch.randn(4, K) for _ in range(n_views)]
    teacher = [torch.randn(4, K) for _ in range(2)]
    got = crit(student, teacher, teacher_temp=0.05)
    want = reference_loss(student, teacher, crit.center[0], 0.1, 0.05)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_center_update_is_an_ema_of_the_teacher_batch_mean():
    crit = DINOLoss(K, center_momentum=0.9)
    c0 = torch.randn(1, K)
    crit.center.copy_(c0)
    t = torch.randn(10, K)
    crit.update_center(t.sum(0), t.shape[0])
    assert torch.allclose(crit.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True), atol=1e-6)


def test_objective_updates_the_centre_once_per_step_from_all_micro_batches():
    dino = make()
    c0 = dino.criterion.center.clone()
    seen = []
    dino.teacher_head.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    for _ in range(2):  # two micro-batches (gradient accumulation), then one optimizer step
        dino(batch_for(dino))
    assert torch.equal(dino.criterion.center, c0)  # forward leaves the centre alone
    dino.on_step(1, 10)
    mean = torch.cat(seen).mean(0, keepdim=True)  # (1, K) over 2 micro-batches x 2 global views
    assert torch.allclose(dino.criterion.center, 0.9 * c0 + 0.1 * mean, atol=1e-6)


# --------------------------------------------------------------------------- schedules


def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert teacher_temperature(15, 0.04, 0.07, 30) == pytest.approx(0.055)
    assert teacher_temperature(30, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(1000, 0.04, 0.07, 30) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.07, 0) == pytest.approx(0.07)


def test_teacher_temperature_warms_up_over_30_percent_of_the_run_by_default():
    dino = make(teacher_temp_start=0.04, teacher_temp=0.07)
    dino.set_total_steps(200)
    assert dino.teacher_temp_at(0) == pytest.approx(0.04)
    assert dino.teacher_temp_at(30) == pytest.approx(0.055)
    assert dino.teacher_temp_at(60) == pytest.approx(0.07)
    with pytest.raises(ValueError, match="teacher_temp_warmup_steps=-1"):
        make(teacher_temp_warmup_steps=-1)


def test_teacher_momentum_follows_a_cosine_to_one():
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)


def test_schedules_are_recomputed_from_the_step_after_a_resume():
    dino = make(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=10)
    assert dino(batch_for(dino))["teacher_temp"].item() == pytest.approx(0.04)
    dino.on_step(4, 100)
    out = dino(batch_for(dino))
    assert out["teacher_temp"].item() == pytest.approx(0.052)
    assert out["momentum"].item() == pytest.approx(teacher_momentum(4, 100, 0.996))
    resumed = make(teacher_temp_start=0.04, teacher_temp=0.07, teacher_temp_warmup_steps=10)
    resumed.load_state_dict(dino.state_dict())  # the step and the centre are in the model state
    assert int(resumed.step) == 4 and torch.equal(resumed.criterion.center, dino.criterion.center)
    assert resumed(batch_for(resumed))["teacher_temp"].item() == pytest.approx(0.052)


# --------------------------------------------------------------------------- the teacher


def test_teacher_gets_no_gradient_and_follows_the_ema_formula():
    dino = make()
    assert all(not p.requires_grad for p in dino.teacher_parameters())
    opt = torch.optim.AdamW(dino.parameter_groups(0.05), lr=1e-2)
    dino(batch_for(dino))["loss"].backward()
    assert all(p.grad is None for p in dino.teacher_parameters())
    opt.step()
    teacher = [p.clone() for p in dino.teacher_parameters()]
    student = [p.detach().clone() for p in dino.student_parameters()]
    assert any(not torch.equal(t, s) for t, s in zip(teacher, student))  # the step moved the student
    dino.on_step(7, 20)
    m = 1 - (1 - 0.996) * (math.cos(math.pi * 6 / 20) + 1) / 2  # the momentum of step index 6
    for t0, s, t in zip(teacher, student, dino.teacher_parameters()):
        assert torch.allclose(t, m * t0 + (1 - m) * s, atol=1e-7)


def test_student_sees_every_view_and_the_teacher_only_the_global_ones():
    dino = make(num_local=3)
    student_sizes, teacher_sizes = [], []
    dino.backbone.register_forward_hook(lambda m, a, o: student_sizes.append(tuple(a[0].shape)))
    dino.teacher_backbone.register_forward_hook(lambda m, a, o: teacher_sizes.append(tuple(a[0].shape)))
    dino(batch_for(dino, B=3))
    assert student_sizes == [(15, 1, 28, 28)]  # 2 global + 3 local views of the same size: one call
    assert teacher_sizes == [(6, 1, 28, 28)]  # the 2 global views


def test_views_of_another_resolution_go_through_as_one_batch_each():
    dino = make(num_local=4, backbone=AnySize(), local_size=12)
    assert [(v.size, v.count) for v in dino.views] == [(28, 1), (28, 1), (12, 4)]
    student_sizes, teacher_sizes = [], []
    dino.backbone.register_forward_hook(lambda m, a, o: student_sizes.append(tuple(a[0].shape)))
    dino.teacher_backbone.register_forward_hook(lambda m, a, o: teacher_sizes.append(tuple(a[0].shape)))
    out = dino(batch_for(dino, B=2))
    assert student_sizes == [(4, 1, 28, 28), (8, 1, 12, 12)]
    assert teacher_sizes == [(4, 1, 28, 28)]
    assert torch.isfinite(out["loss"])


def test_local_crops_run_at_their_own_resolution_on_a_vit():
    dino = make(num_local=2, local_size=14)  # patch 7: a 2 x 2 grid, positions interpolated
    sizes = []
    dino.backbone.register_forward_hook(lambda m, a, o: sizes.append(tuple(a[0].shape)))
    out = dino(batch_for(dino, B=2))
    out["loss"].backward()
    assert sizes == [(4, 1, 28, 28), (4, 1, 14, 14)]
    assert dino.backbone.pos_embed.grad.abs().sum() > 0


def test_a_local_size_the_backbone_refuses_is_named_at_construction():
    with pytest.raises(ValueError, match="local_size=12"):
        make(local_size=12)  # not a multiple of the patch size 7
    with pytest.raises(ValueError, match="num_local=-1"):
        make(num_local=-1)


def test_export_backbone_is_the_teacher():
    dino = make()
    assert dino.export_backbone() is dino.teacher_backbone
    assert dino.export_backbone() is not dino.backbone
    assert backbones.build_config(dino.export_backbone())["name"] == "vit"


# --------------------------------------------------------------------------- training


def trainable(dino):
    return {n: p for n, p in dino.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, in_chans, num_local", [("vit", 1, 2), ("vit", 3, 2), ("vit", 1, 0),
                                                      ("simple_vit", 1, 2)])
def test_forward_and_backward_reach_every_student_parameter(name, in_chans, num_local):
    dino = make(num_local=num_local, in_chans=in_chans, name=name, local_size=14)
    out = dino(batch_for(dino))
    assert {"loss", "teacher_temp", "momentum"} <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    params = trainable(dino)
    assert params and all(not n.startswith("teacher_") for n in params)
    missing = without_gradient(dino)
    assert not missing, missing
    # the prototypes' norm gain is fixed to 1 and not trained
    assert not dino.head.last_layer.parametrizations.weight.original0.requires_grad


def test_last_layer_is_frozen_for_the_first_steps_then_trains():
    dino = make(freeze_last_layer_steps=2)
    opt = torch.optim.AdamW(dino.parameter_groups(0.1), lr=1e-2)
    last = dino.head.prototypes
    for step in range(3):
        before, other = last.detach().clone(), dino.head.mlp[0].weight.detach().clone()
        dino(batch_for(dino))["loss"].backward()
        for p in dino.frozen_parameters():  # what the trainer does before every optimizer step
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        dino.on_step(step + 1, 10)
        assert not torch.equal(dino.head.mlp[0].weight, other)  # the rest of the student trains
        if step < 2:
            assert torch.equal(last, before), f"the last layer moved at step {step}"
            assert not opt.state[last], "AdamW counted a frozen step (its bias correction would be off)"
        else:
            assert not torch.equal(last, before), "the last layer did not train after the freeze"
            assert int(opt.state[last]["step"]) == 1  # the first real step: Adam's usual step size


def test_parameter_groups_skip_the_teacher():
    dino = make()
    decay, no_decay = dino.parameter_groups(0.04)
    ids = {id(p) for g in (decay, no_decay) for p in g["params"]}
    assert ids == {id(p) for p in trainable(dino).values()}
    assert id(dino.head.mlp[0].weight) in {id(p) for p in decay["params"]}


def test_the_cli_trains_three_steps(tmp_path):
    run_pretrain("--objective", "dino", "train.total_steps=3", "optim.warmup_steps=1", "train.batch_size=16",
                 "backbone.dim=32", "backbone.depth=2", "backbone.heads=2", "objective.out_dim=256",
                 "objective.head_hidden_dim=64", "data.num_workers=0", "train.log_every=1", "train.progress=false",
                 f"train.out_dir={tmp_path}", "eval.knn=false", timeout=300)
    ckpt = only_run_dir(tmp_path) / "checkpoints" / "step-000003"
    assert (ckpt / "backbone.safetensors").is_file()
    assert backbones.load(ckpt).embed_dim == 32


# --------------------------------------------------------------------------- two processes


def _centre_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dino = make()  # the same weights on both ranks
    torch.manual_seed(100 + rank)  # different data on each rank
    dino(batch_for(dino, B=2 + rank))  # and a different batch size
    dino.on_step(1, 10)
    torch.save(dino.criterion.center, os.path.join(out, f"center{rank}.pt"))
    dist.destroy_process_group()


def test_the_centre_is_reduced_over_processes(tmp_path):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_centre_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    c0, c1 = (torch.load(tmp_path / f"center{r}.pt") for r in (0, 1))
    assert torch.equal(c0, c1)
    # the same as one process seeing both ranks' teacher outputs
    seen = []
    for rank in (0, 1):
        dino = make()
        dino.teacher_head.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
        torch.manual_seed(100 + rank)
        dino(batch_for(dino, B=2 + rank))
    assert torch.allclose(c0, 0.1 * torch.cat(seen).mean(0, keepdim=True), atol=1e-6)


def test_teacher_stays_in_eval_mode_and_prototypes_take_weight_decay():
    dino = make()
    dino.train()
    assert dino.backbone.training and not dino.teacher_backbone.training and not dino.teacher_head.training
    decay, _ = dino.parameter_groups(0.04)
    assert any(p is dino.head.prototypes for p in decay["params"])  # DINO decays the prototypes


def test_a_skipped_step_moves_neither_teacher_nor_centre_but_keeps_the_schedule():
    """The trainer calls skip_step instead of on_step when a step's loss or gradient is not finite:
    the teacher outputs stashed for the centre are dropped, the teacher stays, the step counter moves."""
    dino = make()
    dino(batch_for(dino))
    dino.on_step(1, 10)  # a normal step first: a non-zero centre
    centre, teacher = dino.criterion.center.clone(), [p.clone() for p in dino.teacher_parameters()]
    with torch.no_grad():
        for p in dino.student_parameters():
            p.add_(1.0)  # a student the EMA would pull the teacher towards
    dino(batch_for(dino))
    dino.skip_step(2, 10)
    assert torch.equal(dino.criterion.center, centre)
    assert all(torch.equal(a, b) for a, b in zip(teacher, dino.teacher_parameters()))
    assert int(dino.step) == 2
    dino.on_step(3, 10)  # the next applied step updates the centre from its own forward only: nothing stashed
    assert torch.equal(dino.criterion.center, centre)
