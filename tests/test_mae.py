"""MAE: masking, the encoder sees only visible patches, unshuffling, the loss against a plain
formula, capability checks."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones import CapabilityError
from conftest import PooledOnlyBackbone, tiny_vit_kwargs
from helpers import without_gradient


def make(mask_ratio=0.75, norm_pix_loss=False, name="vit", **bb):
    torch.manual_seed(0)
    backbone = backbones.create(name, **tiny_vit_kwargs(patch_size=4, **bb))
    return objectives.create("mae", backbone, mask_ratio=mask_ratio, decoder_dim=16, decoder_depth=1,
                             decoder_heads=2, norm_pix_loss=norm_pix_loss)


@pytest.mark.parametrize("ratio, keep", [(0.75, 12), (0.5, 24), (0.9, 5)])
def test_random_masking_counts_and_restore(ratio, keep):
    mae = make(mask_ratio=ratio)
    ids_keep, mask, ids_restore = mae.random_masking(4, 49, torch.device("cpu"))
    assert ids_keep.shape == (4, keep)
    assert (mask.sum(1) == 49 - keep).all()
    # the kept ids are exactly the unmasked patches, and differ between samples
    for b in range(4):
        assert set(ids_keep[b].tolist()) == set(torch.nonzero(mask[b] == 0).flatten().tolist())
    assert not all(torch.equal(ids_keep[0].sort().values, ids_keep[b].sort().values) for b in range(1, 4))


def test_unshuffle_restores_patch_order():
    mae = make()
    ids_keep, mask, ids_restore = mae.random_masking(3, 49, torch.device("cpu"))
    codes = torch.arange(49, dtype=torch.float32).expand(3, 49)  # token n carries the value n
    visible = torch.gather(codes, 1, ids_keep).unsqueeze(-1).expand(-1, -1, 16)
    with torch.no_grad():
        mae.mask_token.fill_(-1.0)
    out = mae.unshuffle(visible, ids_restore)[..., 0]  # (B, N)
    expected = torch.where(mask.bool(), torch.full_like(codes, -1.0), codes)
    assert torch.equal(out, expected)


def test_encoder_sees_only_visible_patches():
    mae = make()
    x = torch.randn(2, 1, 28, 28)
    seen = {}
    hook = mae.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    torch.manual_seed(1)
    latent, mask, _ = mae.forward_encoder(x)
    hook.remove()
    assert seen["x"].shape == (2, 1 + 12, 32)  # class token + the 25 % visible patches
    assert latent.shape == (2, 1 + 12, 32)
    # the visible tokens are the embeddings of exactly the unmasked patches, with their positions
    torch.manual_seed(1)
    ids_keep, _, _ = mae.random_masking(2, 49, x.device)
    bb = mae.backbone
    expected = torch.gather(bb.embed_patches(x) + bb.pos_embed_for(None), 1, ids_keep[..., None].expand(-1, -1, 32))
    cls = bb.cls_token + bb.pos_embed[:, :1]
    assert torch.allclose(seen["x"][:, 1:], expected, atol=1e-6)
    assert torch.allclose(seen["x"][:, :1], cls.expand(2, -1, -1))


def reference_loss(imgs, pred, mask, p, norm_pix):
    """Plain loops: mean over masked patches of the mean squared error of each patch's pixels."""
    B, C, H, W = imgs.shape
    gw = W // p
    total, count = 0.0, 0
    for b in range(B):
        for n in range(pred.shape[1]):
            if mask[b, n] == 0:
                continue
            i, j = divmod(n, gw)
            patch = imgs[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)  # (p1 p2 c)
            if norm_pix:
                patch = (patch - patch.mean()) / (patch.var() + 1e-6).sqrt()
            total += ((pred[b, n] - patch) ** 2).mean()
            count += 1
    return total / count


@pytest.mark.parametrize("norm_pix", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_loss_matches_plain_formula(norm_pix, channels):
    mae = make(norm_pix_loss=norm_pix, in_chans=channels)
    imgs = torch.randn(2, channels, 28, 28)
    pred = torch.randn(2, 49, 16 * channels)
    mask = (torch.rand(2, 49) < 0.75).float()
    mask[:, 0] = 1
    assert torch.allclose(mae.forward_loss(imgs, pred, mask), reference_loss(imgs, pred, mask, 4, norm_pix), atol=1e-5)


def test_patchify_unpatchify_round_trip():
    mae = make(in_chans=3)
    imgs = torch.randn(2, 3, 28, 28)
    patches = mae.patchify(imgs)
    assert patches.shape == (2, 49, 48)
    assert torch.equal(patches[0, 8], imgs[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1))  # row 1, column 1
    assert torch.equal(mae.unpatchify(patches), imgs)


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
def test_forward_and_backward_reach_every_parameter(name):
    mae = make(name=name)
    out = mae({"views": [torch.randn(4, 1, 28, 28)], "labels": torch.zeros(4, dtype=torch.long)})
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = without_gradient(mae)
    assert not missing, missing


def test_views_declare_one_view_at_the_backbone_size():
    (view,) = make().views
    assert view.size == 28 and view.count == 1


def test_parameter_groups_exempt_norms_biases_positions_tokens():
    mae = make()
    decay, no_decay = mae.parameter_groups(0.05)
    names = {id(p): n for n, p in mae.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.pos_embed", "backbone.cls_token", "mask_token", "backbone.norm.weight",
            "backbone.blocks.0.attn.qkv.bias"} <= no_decay_names
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {names[id(p)] for p in decay["params"]} >= {"backbone.blocks.0.attn.qkv.weight", "decoder_pred.weight"}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(mae.parameters()))



def test_refuses_backbone_without_token_drop():
    with pytest.raises(CapabilityError, match="needs a backbone with supports_token_drop"):
        objectives.create("mae", PooledOnlyBackbone())


def test_bad_hyperparameters_are_named():
    bb = backbones.create("vit", **tiny_vit_kwargs())
    with pytest.raises(ValueError, match="mask_ratio=1.0"):
        objectives.create("mae", bb, mask_ratio=1.0)
    with pytest.raises(ValueError, match="no option 'ratio'"):
        objectives.create("mae", bb, ratio=0.5)
