"""SimMIM: block masking, the mask token at the encoder input, the L1 loss against a plain
formula, gradients, the capability check, the CLI."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones import CapabilityError
from conftest import PooledOnlyBackbone, tiny_vit_kwargs
from helpers import only_run_dir, run_pretrain, without_gradient
from objectives.simmim import auto_mask_patch_size


def make(patch_size=4, image_size=28, name="vit", **hp):
    torch.manual_seed(0)
    backbone = backbones.create(name, **tiny_vit_kwargs(patch_size=patch_size, image_size=image_size))
    return objectives.create("simmim", backbone, **hp)


@pytest.mark.parametrize("image_size, patch, mask_patch, blocks, masked", [
    (28, 4, 4, 49, 30),  # one patch per block, the paper's 7 x 7 block grid, ceil(0.6 * 49)
    (32, 4, 8, 16, 10),  # the recipe: 2 x 2 patches per block
    (48, 4, 16, 9, 6),  # 4 x 4 patches per block
])
def test_block_mask_counts_structure_and_per_sample(image_size, patch, mask_patch, blocks, masked):
    sim = make(patch_size=patch, image_size=image_size, mask_patch_size=mask_patch)
    B, g, s = 64, image_size // patch, mask_patch // patch
    mask = sim.random_block_mask(B, torch.device("cpu"))
    assert mask.shape == (B, g * g) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    grid = mask.view(B, g // s, s, g // s, s)  # (B, block row, row in block, block col, col in block)
    per_block = grid.sum(dim=(2, 4))  # (B, bh, bw): masked patches in each block
    assert ((per_block == 0) | (per_block == s * s)).all()  # every block fully masked or not at all
    assert ((per_block == s * s).flatten(1).sum(1) == masked).all()  # exactly ceil(0.6 * blocks) blocks
    assert (mask.sum(1) == masked * s * s).all()
    assert per_block[0].numel() == blocks
    assert len({tuple(m.tolist()) for m in mask}) > B // 2  # each sample draws its own blocks


def test_block_mask_is_uniform_over_blocks():
    sim = make()
    torch.manual_seed(0)
    freq = sim.random_block_mask(4000, torch.device("cpu")).mean(0)  # (N,)
    assert (freq - 30 / 49).abs().max() < 0.04


def test_auto_mask_patch_size_follows_the_paper_geometry():
    assert auto_mask_patch_size((224, 224), 16) == 32  # the paper's ViT-B setting
    assert auto_mask_patch_size((224, 224), 4) == 32  # the paper's Swin setting
    assert auto_mask_patch_size((192, 192), 16) == 32
    assert auto_mask_patch_size((28, 28), 4) == 4
    assert auto_mask_patch_size((28, 28), 7) == 7
    assert make().mask_patch_size == 4


def test_mask_token_replaces_exactly_the_masked_embeddings():
    sim = make()
    with torch.no_grad():
        sim.mask_token.normal_()
    x = torch.randn(3, 1, 28, 28)
    mask = sim.random_block_mask(3, x.device)
    seen = {}
    hook = sim.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    out = sim.forward_encoder(x, mask)
    hook.remove()
    bb = sim.backbone
    assert out.shape == (3, 49, 32)  # patch tokens only, the class token dropped
    assert seen["x"].shape == (3, 1 + 49, 32)  # the encoder sees the whole sequence
    emb = bb.embed_patches(x)  # (B, N, D)
    expected = emb.clone()
    for b in range(3):
        for n in range(49):
            if mask[b, n] == 1:
                expected[b, n] = sim.mask_token[0, 0]
    expected = expected + bb.pos_embed_for(None)
    assert torch.allclose(seen["x"][:, 1:], expected, atol=1e-6)
    assert torch.allclose(seen["x"][:, :1], (bb.cls_token + bb.pos_embed[:, :1]).expand(3, -1, -1))
    # and the visible patches really are their own embeddings (the token is not everywhere)
    keep = mask == 0
    assert torch.allclose(seen["x"][:, 1:][keep], (emb + bb.pos_embed_for(None))[keep], atol=1e-6)


def reference_loss(imgs, pred, mask, p):
    """Plain loops: sum of |pred - pixel| over every value of every masked patch, divided by how
    many values that is."""
    B, C, H, W = imgs.shape
    gw = W // p
    total, count = 0.0, 0
    for b in range(B):
        for n in range(pred.shape[1]):
            if mask[b, n] == 0:
                continue
            i, j = divmod(n, gw)
            for y in range(p):
                for x in range(p):
                    for c in range(C):
                        total += abs(pred[b, n, (y * p + x) * C + c] - imgs[b, c, i * p + y, j * p + x])
                        count += 1
    return total / count


@pytest.mark.parametrize("channels", [1, 3])
def test_loss_matches_plain_formula(channels):
    torch.manual_seed(0)
    sim = objectives.create("simmim", backbones.create("vit", **tiny_vit_kwargs(patch_size=4, in_chans=channels)))
    imgs = torch.randn(2, channels, 28, 28)
    pred = torch.randn(2, 49, 16 * channels)
    mask = sim.random_block_mask(2, imgs.device)
    assert torch.allclose(sim.forward_loss(imgs, pred, mask), reference_loss(imgs, pred, mask, 4), atol=1e-5)


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
def test_forward_and_backward_reach_every_parameter(name):
    sim = make(name=name)
    out = sim({"views": [torch.randn(4, 1, 28, 28)], "labels": torch.zeros(4, dtype=torch.long)})
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = without_gradient(sim)
    assert not missing, missing


def test_views_parameter_groups_and_export():
    sim = make()
    (view,) = sim.views
    assert view.size == 28 and view.scale == (0.67, 1.0) and view.ratio == (3 / 4, 4 / 3) and view.hflip == 0.5
    decay, no_decay = sim.parameter_groups(0.05)
    names = {id(p): n for n, p in sim.named_parameters()}
    assert {"mask_token", "backbone.pos_embed", "backbone.cls_token", "head.bias"} <= {names[id(p)] for p in no_decay["params"]}
    assert "head.weight" in {names[id(p)] for p in decay["params"]}
    assert sim.export_backbone() is sim.backbone



def test_refuses_backbone_without_mask_token():
    with pytest.raises(CapabilityError, match="needs a backbone with supports_mask_token"):
        objectives.create("simmim", PooledOnlyBackbone())


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match=r"mask_patch_size=6 .*allowed: \[4, 28\]"):
        make(mask_patch_size=6)
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        make(mask_ratio=1.0)


def test_cli_trains_three_steps(tmp_path):
    run_pretrain("--objective", "simmim", "backbone.patch_size=8", "backbone.dim=32", "backbone.depth=2",
                 "backbone.heads=2", "objective.mask_patch_size=null", "train.batch_size=16",
                 "train.total_steps=3", "train.log_every=1", "train.ckpt_every=3", "train.progress=false",
                 "optim.warmup_steps=1", "data.num_workers=1", "eval.knn=false", f"train.out_dir={tmp_path}")
    assert (only_run_dir(tmp_path) / "checkpoints" / "step-000003" / "backbone.safetensors").is_file()


@pytest.mark.slow
def test_loss_falls_on_real_images():
    """25 small steps on real Fashion-MNIST views: the reconstruction error drops clearly (~10 s)."""
    from data.augment import DeviceAugment
    from data.builtin import load_fashion_mnist

    sim = make(patch_size=4)
    images, _ = load_fashion_mnist("train")
    augment = DeviceAugment(sim.views, [0.286], [0.353])
    opt = torch.optim.AdamW(sim.parameter_groups(0.05), lr=2e-3)
    losses = []
    for _ in range(25):
        loss = sim({"views": augment(images[torch.randint(0, len(images), (32,))])})["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses
