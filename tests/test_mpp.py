"""MPP: corruption counts and the 80 / 10 / 10 split, the 3-bit colour targets against a plain
formula, the loss against F.cross_entropy, gradients, the capability check, the CLI."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import backbones
import objectives
from backbones import CapabilityError
from conftest import PooledOnlyBackbone, tiny_vit_kwargs
from helpers import only_run_dir, run_pretrain, without_gradient

MEAN, STD = [0.2860], [0.3530]


def make(in_chans=1, name="vit", mean=MEAN, std=STD, **hp):
    torch.manual_seed(0)
    backbone = backbones.create(name, **tiny_vit_kwargs(patch_size=4, in_chans=in_chans))
    if mean is not None and in_chans == 3:
        mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    return objectives.create("mpp", backbone, mean=mean, std=std, **hp)


def normalise(pixels, mean, std):
    return (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def test_corruption_counts_and_split():
    mpp = make()
    torch.manual_seed(1)
    B, N, D = 2000, 49, 32
    codes = torch.arange(B * N, dtype=torch.float32).view(B, N, 1).expand(B, N, D)  # token k carries k
    with torch.no_grad():
        mpp.mask_token.fill_(-1.0)
    out, corrupted = mpp.corrupt(codes.clone())
    assert corrupted.dtype == torch.bool and corrupted.shape == (B, N)
    assert (corrupted.sum(1) == round(0.5 * N)).all()  # exactly 24 of 49 per sample
    assert len({tuple(c.nonzero().flatten().tolist()) for c in corrupted[:50]}) == 50  # own set per sample
    v = out[..., 0]
    assert (out == v.unsqueeze(-1)).all()  # whole tokens are swapped, never mixed
    masked = v == -1
    kept = v == codes[..., 0]
    swapped = ~masked & ~kept
    assert not (~corrupted & ~kept).any()  # clean patches are untouched
    assert not (swapped & ~corrupted).any()
    assert (v[swapped] >= 0).all() and (v[swapped] < B * N).all()  # another patch of the batch
    n = corrupted.sum().item()
    props = [(m & corrupted).sum().item() / n for m in (masked, swapped, kept)]
    assert props[0] == pytest.approx(0.8, abs=0.01)
    assert props[1] == pytest.approx(0.1, abs=0.01)
    assert props[2] == pytest.approx(0.1, abs=0.01)
    # the random patches come from other images too, not only from the same one
    src_image = (v[swapped] // N).long()
    own_image = torch.arange(B).view(B, 1).expand(B, N)[swapped]
    assert (src_image != own_image).float().mean() > 0.9


@pytest.mark.parametrize("grey, cls", [(0.0, 0), (0.124, 0), (0.126, 1), (0.51, 4), (0.74, 5), (0.99, 7), (1.0, 7)])
def test_targets_of_constant_grey_images(grey, cls):
    mpp = make()
    imgs = normalise(torch.full((2, 1, 28, 28), grey), MEAN, STD)
    t = mpp.targets(imgs)
    assert t.shape == (2, 49) and t.dtype == torch.long
    assert (t == cls).all()


def test_targets_of_constant_rgb_images():
    mpp = make(in_chans=3)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    colour = torch.tensor([0.9, 0.3, 0.05])  # 3-bit levels 7, 2, 0 -> 7 * 64 + 2 * 8 + 0
    imgs = normalise(colour.view(1, 3, 1, 1).expand(2, 3, 28, 28), mean, std)
    assert mpp.num_classes == 512
    assert (mpp.targets(imgs) == 7 * 64 + 2 * 8).all()


def reference_targets(pixels, p, bits):
    """Plain loops: mean of each channel over each patch, floor(mean * 2**bits) capped, base-2**bits digits."""
    B, C, H, W = pixels.shape
    levels = 2 ** bits
    out = torch.zeros(B, (H // p) * (W // p), dtype=torch.long)
    for b in range(B):
        for i in range(H // p):
            for j in range(W // p):
                cls = 0
                for c in range(C):
                    m = pixels[b, c, i * p:(i + 1) * p, j * p:(j + 1) * p].double().mean().item()
                    cls = cls * levels + min(int(m * levels), levels - 1)
                out[b, i * (W // p) + j] = cls
    return out


@pytest.mark.parametrize("in_chans", [1, 3])
def test_targets_match_plain_formula_on_random_images(in_chans):
    mpp = make(in_chans=in_chans)
    torch.manual_seed(2)
    pixels = torch.randint(0, 256, (3, in_chans, 28, 28)).float() / 255
    imgs = normalise(pixels, mpp.pix_mean.tolist(), mpp.pix_std.tolist())
    assert torch.equal(mpp.targets(imgs), reference_targets(pixels, 4, 3))


def test_inferred_normalisation_matches_given_one_when_black_and_white_present():
    given, inferred = make(), make(mean=None, std=None)
    torch.manual_seed(3)
    pixels = torch.rand(4, 1, 28, 28)
    pixels[0, 0, 0, 0], pixels[1, 0, 5, 5] = 0.0, 1.0
    imgs = normalise(pixels, MEAN, STD)
    assert torch.equal(inferred.targets(imgs), given.targets(imgs))
    inferred.set_normalisation(MEAN, STD)  # what a trainer can hand over
    assert inferred.normalisation_known and torch.equal(inferred.targets(imgs * 0.5), given.targets(imgs * 0.5))


def test_loss_is_cross_entropy_on_corrupted_patches():
    mpp = make()
    imgs = torch.randn(4, 1, 28, 28)
    torch.manual_seed(5)
    out = mpp({"views": [imgs]})
    torch.manual_seed(5)  # the same corruption again, step by step
    tokens, corrupted = mpp.forward_encoder(imgs)
    logits = mpp.head(tokens)  # (B, N, classes)
    targets = mpp.targets(imgs)
    expected = F.cross_entropy(logits[corrupted], targets[corrupted])
    assert torch.allclose(out["loss"], expected, atol=1e-6)
    # and by hand: mean over corrupted positions of -log softmax at the target class
    logp = logits.log_softmax(-1)
    by_hand = [-logp[b, n, targets[b, n]] for b in range(4) for n in range(49) if corrupted[b, n]]
    assert len(by_hand) == 4 * 24
    assert torch.allclose(out["loss"], torch.stack(by_hand).mean(), atol=1e-6)
    assert 0 <= out["accuracy"] <= 1


def test_positions_are_added_after_corruption():
    mpp = make()
    with torch.no_grad():
        mpp.mask_token.normal_()
    x = torch.randn(2, 1, 28, 28)
    seen = {}
    hook = mpp.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    torch.manual_seed(7)
    mpp.forward_encoder(x)
    hook.remove()
    torch.manual_seed(7)
    corrupted_tokens, _ = mpp.corrupt(mpp.backbone.embed_patches(x))
    assert torch.allclose(seen["x"][:, 1:], corrupted_tokens + mpp.backbone.pos_embed_for(None), atol=1e-6)


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
def test_forward_and_backward_reach_every_parameter(name):
    mpp = make(name=name)
    out = mpp({"views": [torch.randn(4, 1, 28, 28)], "labels": torch.zeros(4, dtype=torch.long)})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = without_gradient(mpp)
    assert not missing, missing


def test_views_and_parameter_groups():
    mpp = make()
    (view,) = mpp.views
    assert view.size == 28 and view.count == 1
    decay, no_decay = mpp.parameter_groups(0.05)
    names = {id(p): n for n, p in mpp.named_parameters()}
    assert "mask_token" in {names[id(p)] for p in no_decay["params"]}
    assert "head.weight" in {names[id(p)] for p in decay["params"]}



def test_refuses_backbone_without_token_access():
    with pytest.raises(CapabilityError, match="needs a backbone with supports_token_access"):
        objectives.create("mpp", PooledOnlyBackbone())


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="corrupt_ratio=0"):
        make(corrupt_ratio=0)
    with pytest.raises(ValueError, match="mean=.*std=None"):
        make(std=None)


def test_cli_trains_three_steps(tmp_path):
    run_pretrain("--objective", "mpp", "backbone.patch_size=7", "backbone.dim=32", "backbone.depth=2",
                 "backbone.heads=2", "train.batch_size=16", "train.total_steps=3", "train.log_every=1",
                 "train.ckpt_every=3", "train.progress=false", "optim.warmup_steps=1", "data.num_workers=1",
                 "eval.knn=false", f"train.out_dir={tmp_path}")
    assert (only_run_dir(tmp_path) / "checkpoints" / "step-000003" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_loss_falls_on_real_images():
    """25 small steps on real Fashion-MNIST views: the loss drops clearly, and below the entropy of
    the colour classes, which is the best a predictor blind to the context can do (~10 s)."""
    from data.augment import DeviceAugment
    from data.builtin import load_fashion_mnist

    mpp = make(mean=[0.286], std=[0.353])
    images, _ = load_fashion_mnist("train")
    augment = DeviceAugment(mpp.views, [0.286], [0.353])
    opt = torch.optim.AdamW(mpp.parameter_groups(0.05), lr=2e-3)
    losses, counts = [], torch.zeros(mpp.num_classes)
    for _ in range(25):
        views = augment(images[torch.randint(0, len(images), (32,))])
        counts += torch.bincount(mpp.targets(views[0]).flatten(), minlength=mpp.num_classes)
        loss = mpp({"views": views})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    p = counts[counts > 0] / counts.sum()
    blind = -(p * p.log()).sum().item()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first and last < blind - 0.1, (losses, blind)
