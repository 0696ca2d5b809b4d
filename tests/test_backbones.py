"""Every registered backbone: forward finite, backward reaches every parameter, the token-level
protocol agrees with forward, save/load round-trips strictly."""
from __future__ import annotations

import pytest
import torch

import backbones
from backbones.layers import resize_pos_embed
from conftest import tiny_vit_kwargs

SMALL = {name: backbones.example_config(name) for name in backbones.list_backbones()}


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = backbones.create(name, **SMALL[name])
    x = torch.randn(3, *model.input_shape)
    out = model(x)
    assert out.shape == (3, model.embed_dim) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape[0] == 3 and feats.shape[-1] == model.embed_dim and torch.isfinite(feats).all()
    if model.supports_token_access:
        assert feats.shape[1] == model.num_prefix_tokens + model.num_patches
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", [n for n in backbones.list_backbones()
                                  if backbones.create(n, **SMALL[n]).supports_token_access])
def test_token_protocol_matches_forward(name):
    model = backbones.create(name, **SMALL[name]).eval()
    x = torch.randn(2, *model.input_shape)
    tokens = model.embed_patches(x) + model.pos_embed_for(None)
    assert torch.allclose(model.pool(model.forward_tokens(tokens)), model(x), atol=1e-6)
    # positions of a subset = the same rows of all positions
    ids = torch.tensor([[3, 0, 5], [1, 2, model.num_patches - 1]])
    sub = model.pos_embed_for(ids)
    full = model.pos_embed_for(None).expand(2, -1, -1)
    assert torch.equal(sub[1, 2], full[1, model.num_patches - 1]) and torch.equal(sub[0, 0], full[0, 3])


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_save_load_round_trip(name, tmp_path):
    model = backbones.create(name, **SMALL[name]).eval()
    backbones.save(model, tmp_path, extra={"step": 7})
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, *model.input_shape)
    assert torch.equal(model(x), again(x))
    assert backbones.load_meta(tmp_path)["step"] == 7


def test_load_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file

    backbones.save(backbones.create("vit", **tiny_vit_kwargs()), tmp_path)
    state = load_file(str(tmp_path / "backbone.safetensors"))
    state.pop("norm.weight")
    save_file(state, str(tmp_path / "backbone.safetensors"))
    with pytest.raises(RuntimeError, match="norm.weight"):
        backbones.load(tmp_path)


def test_any_channel_count_and_rectangular_images():
    model = backbones.create("vit", image_size=(32, 48), patch_size=8, in_chans=5, dim=32, depth=1, heads=4)
    assert model.grid_size == (4, 6)
    assert model(torch.randn(2, 5, 32, 48)).shape == (2, 32)


def test_vit_pools_by_class_token_or_mean():
    cls = backbones.create("vit", **tiny_vit_kwargs(pool="cls")).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(cls(x), cls.forward_features(x)[:, 0])
    mean = backbones.create("vit", **tiny_vit_kwargs(pool="mean")).eval()
    assert torch.allclose(mean(x), mean.forward_features(x)[:, 1:].mean(1))


def test_simple_vit_positions_are_big_vision_sincos():
    """SimpleViT's fixed positions, against big_vision's formula written out here: channels
    [sin(x w), cos(x w), sin(y w), cos(y w)] with w_i = 1 / 10000 ** (i / (D/4 - 1))."""
    model = backbones.create("simple_vit", **tiny_vit_kwargs())
    assert model.num_prefix_tokens == 0
    assert "pos_embed" not in dict(model.named_parameters())
    pos = model.pos_embed_for(None)[0]  # (N, D)
    gh, gw = model.grid_size
    d4 = model.embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(d4).float() / (d4 - 1))
    y = torch.arange(gh).repeat_interleave(gw).float()[:, None] * omega
    x = torch.arange(gw).repeat(gh).float()[:, None] * omega
    assert torch.allclose(pos, torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1), atol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=30, patch_size=4), "image_size=30 is not divisible by patch_size=4"),
    (dict(dim=30, heads=4), "heads=4 must divide dim=30"),
    (dict(pool="max"), "pool='max'"),
    (dict(colour=3), "no option 'colour'"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        backbones.create("vit", **kwargs)


def test_wrong_input_shape_says_what_fits():
    model = backbones.create("vit", **tiny_vit_kwargs())
    with pytest.raises(ValueError, match=r"built for \(B, 1, 28, 28\)"):
        model(torch.randn(1, 3, 28, 28))


@pytest.mark.parametrize("name", ["vit", "simple_vit"])
def test_forward_at_another_size_interpolates_the_positions(name):
    torch.manual_seed(0)
    model = backbones.create(name, **tiny_vit_kwargs(patch_size=4)).eval()
    x = torch.randn(2, 1, 28, 28)
    # at the built size nothing is resampled
    assert torch.equal(resize_pos_embed(model.patch_positions(), (7, 7), (7, 7)), model.patch_positions())
    small = model(torch.randn(2, 1, 12, 12))
    assert small.shape == (2, model.embed_dim) and torch.isfinite(small).all()
    # a 2x upsampled image at 56 px sees positions resampled to 14 x 14: close to the 7 x 7 ones
    pos14 = resize_pos_embed(model.patch_positions(), (7, 7), (14, 14))
    pos7 = resize_pos_embed(pos14, (14, 14), (7, 7))
    assert pos14.shape == (1, 196, model.embed_dim)
    if name == "simple_vit":  # smooth sin-cos positions survive the round trip
        assert (pos7 - model.patch_positions()).abs().max() < 0.15
    assert model(torch.randn(2, 1, 20, 36)).shape == (2, model.embed_dim)
    # the 12-px input's tokens see the 7 x 7 positions resampled (bicubic, antialiased) to 3 x 3
    x12 = torch.randn(2, 1, 12, 12)
    grid = model.patch_positions().reshape(1, 7, 7, -1).permute(0, 3, 1, 2)  # (1, D, 7, 7)
    pos3 = torch.nn.functional.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True)
    pos3 = pos3.permute(0, 2, 3, 1).reshape(1, 9, -1)
    with torch.no_grad():
        want = model.forward_tokens(model.patch_embed(x12) + pos3)
        assert torch.allclose(model.forward_features(x12), want, atol=1e-5)
        unpositioned = model.forward_tokens(model.patch_embed(x12))
        assert not torch.allclose(model.forward_features(x12), unpositioned, atol=1e-3)
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(torch.randn(2, 1, 30, 30))
    with pytest.raises(ValueError, match="does not fit"):  # token-level access stays at the built size
        model.embed_patches(torch.randn(2, 1, 12, 12))
    assert model(x).shape == (2, model.embed_dim)


def test_a_vit_with_a_distillation_token_matches_timms_distilled_vit():
    """DeiT's layout: prefix tokens [cls, dist] with positions for both; our weights load into
    timm's VisionTransformerDistilled with strict=True and give the same tokens."""
    from timm.models.deit import VisionTransformerDistilled

    torch.manual_seed(0)
    ours = backbones.create("vit", **tiny_vit_kwargs(patch_size=4), distill_token=True).eval()
    assert ours.num_prefix_tokens == 2 and ours.pos_embed.shape == (1, 49 + 2, 32)
    ref = VisionTransformerDistilled(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                     mlp_ratio=2.0, num_classes=0).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        tokens = ours.forward_features(x)
        assert torch.allclose(tokens, ref.forward_features(x), atol=1e-5)
    assert torch.equal(ours.distill_embedding(tokens), tokens[:, 1])
    assert torch.equal(ours(x), tokens[:, 0])  # pool='cls' reads the class token
    with pytest.raises(ValueError, match="distill_token=True needs a class token"):
        backbones.create("vit", **tiny_vit_kwargs()).__class__(class_token=False, pool="mean", distill_token=True)
    with pytest.raises(ValueError, match="no distillation token"):
        backbones.create("vit", **tiny_vit_kwargs()).distill_embedding(tokens)
