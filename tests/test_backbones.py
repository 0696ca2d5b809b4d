"""Every registered backbone: forward finite, backward reaches every parameter, the token-level
protocol agrees with forward, save/load round-trips strictly."""
from __future__ import annotations

import pytest
import torch

import backbones
from conftest import tiny_vit_kwargs

SMALL = {name: tiny_vit_kwargs() for name in backbones.list_backbones()}


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_forward_backward_reaches_every_parameter(name):
    torch.manual_seed(0)
    model = backbones.create(name, **SMALL[name])
    x = torch.randn(3, model.in_chans, *model.image_size)
    out = model(x)
    assert out.shape == (3, model.embed_dim) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape == (3, model.num_prefix_tokens + model.num_patches, model.embed_dim)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_token_protocol_matches_forward(name):
    model = backbones.create(name, **SMALL[name]).eval()
    x = torch.randn(2, model.in_chans, *model.image_size)
    tokens = model.embed_patches(x) + model.pos_embed_for(None)
    assert torch.allclose(model.pool(model.forward_tokens(tokens)), model(x), atol=1e-6)
    # positions of a subset = the same rows of all positions
    ids = torch.tensor([[3, 0, 5], [1, 2, 15]])
    sub = model.pos_embed_for(ids)
    full = model.pos_embed_for(None).expand(2, -1, -1)
    assert torch.equal(sub[1, 2], full[1, 15]) and torch.equal(sub[0, 0], full[0, 3])


@pytest.mark.parametrize("name", backbones.list_backbones())
def test_save_load_round_trip(name, tmp_path):
    model = backbones.create(name, **SMALL[name]).eval()
    backbones.save(model, tmp_path, extra={"step": 7})
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, model.in_chans, *model.image_size)
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


def test_simple_vit_positions_are_fixed_sincos():
    model = backbones.create("simple_vit", **tiny_vit_kwargs())
    assert model.num_prefix_tokens == 0
    assert "pos_embed" not in dict(model.named_parameters())
    pos = model.pos_embed_for(None)[0]  # (N, D): first quarter is sin(y * omega_0) with omega_0 = 1
    gh, gw = model.grid_size
    y = torch.arange(gh).repeat_interleave(gw).float()
    assert torch.allclose(pos[:, 0], torch.sin(y))


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
