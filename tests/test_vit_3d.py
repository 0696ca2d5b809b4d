"""vit_3d and simple_vit_3d: clip geometry, patchify order, the tubelet embedding's token order,
the token-level protocol (subsets for MAE, mask token for SimMIM), logits equal to vit-pytorch's,
the reference configurations, the masked objectives on clips, clear errors."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

import backbones
import objectives
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch

FAMILIES = ["vit_3d", "simple_vit_3d"]
# (C, T, H, W) = (1, 4, 16, 16), tubelets 2 x 4 x 4: a (2, 4, 4) grid of 32 tokens
CLIP = dict(image_size=16, frames=4, patch_size=4, frame_patch_size=2, in_chans=1, dim=24, depth=2, heads=2)


def make(name="vit_3d", **over):
    torch.manual_seed(0)
    return backbones.create(name, **{**CLIP, **over}).eval()


def clips(model, b=2, seed=1):
    return torch.randn(b, *model.input_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", FAMILIES)
def test_geometry_and_shapes(name):
    model = make(name, image_size=(16, 24), in_chans=3)
    assert model.input_shape == (3, 4, 16, 24) and model.frames == 4 and model.image_size == (16, 24)
    assert model.grid_size == (2, 4, 6) and model.num_patches == 48 and model.patch_pixels == 2 * 4 * 4 * 3
    x = clips(model)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_prefix_tokens + 48, 24)
    assert model(x).shape == (2, 24)
    assert model.num_prefix_tokens == (1 if name == "vit_3d" else 0)


@pytest.mark.parametrize("name", FAMILIES)
def test_flags(name):
    model = make(name)
    assert model.supports_token_access and model.supports_token_drop and model.supports_mask_token
    assert model.attention_maps and not model.supports_any_size and not model.has_distill_token


def test_patchify_order_and_inverse():
    model = make(in_chans=3)
    x = clips(model)
    t = model.patchify(x)
    assert t.shape == (2, 32, 2 * 4 * 4 * 3)
    assert torch.equal(model.unpatchify(t), x)
    # token (t=1, h=2, w=3) holds frames 2-3, rows 8-11, columns 12-15, values in (pf p1 p2 c) order
    k = 1 * 16 + 2 * 4 + 3
    expected = x[0, :, 2:4, 8:12, 12:16].permute(1, 2, 3, 0).reshape(-1)
    assert torch.equal(t[0, k], expected)


def test_conv_tubelets_follow_the_patchify_order():
    """The Conv3d embedding is a linear map of each patchify row: token k = W @ patchify(x)[k] + b."""
    model = make(in_chans=3)
    x = clips(model)
    w = rearrange(model.patch_embed.proj.weight, "d c pf p1 p2 -> d (pf p1 p2 c)")
    expected = model.patchify(x) @ w.T + model.patch_embed.proj.bias
    assert torch.allclose(model.embed_patches(x), expected, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_protocol_and_subsets(name):
    model = make(name)
    x = clips(model)
    tokens = model.embed_patches(x) + model.pos_embed_for(None)
    assert torch.allclose(model.pool(model.forward_tokens(tokens)), model(x), atol=1e-6)
    # a subset (MAE's visible tubelets) runs, and the encoder treats it as a set: permuting it permutes the output
    ids = torch.tensor([[0, 5, 31, 17], [9, 2, 3, 30]])
    sub = torch.gather(model.embed_patches(x), 1, ids[..., None].expand(-1, -1, 24)) + model.pos_embed_for(ids)
    out = model.forward_tokens(sub)
    assert out.shape == (2, model.num_prefix_tokens + 4, 24)
    perm = torch.tensor([2, 0, 3, 1])
    p = model.num_prefix_tokens
    assert torch.allclose(model.forward_tokens(sub[:, perm])[:, p:], out[:, p:][:, perm], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_masked_hides_the_masked_tubelets(name):
    model = make(name)
    x = clips(model)
    mask_token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    none = torch.zeros(2, model.num_patches)
    assert torch.allclose(model.forward_masked(x, none, mask_token),
                          model.forward_features(x)[:, model.num_prefix_tokens:], atol=1e-6)
    mask = (torch.rand(2, model.num_patches, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    out = model.forward_masked(x, mask, mask_token)
    assert out.shape == (2, 32, 24)
    # new values in the masked tubelets change nothing: the encoder never sees them
    pixels = model.patchify(x)
    noisy = model.unpatchify(torch.where(mask.bool()[..., None], torch.randn_like(pixels), pixels))
    assert torch.allclose(model.forward_masked(noisy, mask, mask_token), out, atol=1e-6)
    assert not torch.allclose(model.forward_features(noisy), model.forward_features(x))
    out.sum().backward()
    assert mask_token.grad is not None and mask_token.grad.abs().sum() > 0


def test_simple_vit_3d_positions_are_vit_pytorchs():
    from vit_pytorch.simple_vit_3d import posemb_sincos_3d

    for dim in (24, 32):  # a multiple of 6, and one that vit-pytorch pads with zeros
        model = make("simple_vit_3d", dim=dim)
        grid = torch.zeros(1, *model.grid_size, dim)
        assert torch.allclose(model.pos_embed_for(None)[0], posemb_sincos_3d(grid), atol=1e-6)
        assert not model.pos_embed.requires_grad and "pos_embed" not in model.state_dict()


def test_pools():
    x = clips(make())
    cls = make(pool="cls")
    assert torch.equal(cls(x), cls.forward_features(x)[:, 0])
    mean = make(pool="mean")
    assert torch.allclose(mean(x), mean.forward_features(x)[:, 1:].mean(1), atol=1e-6)
    every = make(pool="mean_all", fc_norm=True)  # vit-pytorch's ViT-3D 'mean': every token, then the norm
    tokens = every.forward_features(x)
    assert torch.allclose(every(x), every.norm(tokens.mean(1)), atol=1e-6)


# --------------------------------------------------------------------------- vit-pytorch parity

VP = dict(image_size=16, image_patch_size=4, frames=4, frame_patch_size=2, num_classes=7, dim=32, depth=2, heads=2,
          mlp_dim=48, dim_head=16, channels=3)


@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("heads,dim_head", [(2, 16), (1, 32)])  # heads=1, dim_head=dim: no output projection there
def test_vit_3d_logits_equal_vit_pytorch(pool, heads, dim_head):
    from vit_pytorch.vit_3d import ViT

    torch.manual_seed(0)
    kw = {**VP, "pool": pool, "heads": heads, "dim_head": dim_head}
    theirs = ViT(**kw).eval()
    ours = from_vit_pytorch("vit_3d", theirs.state_dict(), **kw).eval()
    x = torch.randn(3, 3, 4, 16, 16)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    assert ours.backbone.build_config["name"] == "vit_3d"


@pytest.mark.parametrize("dim", [36, 32])  # 32: vit-pytorch zero-pads the sin-cos channels
def test_simple_vit_3d_logits_equal_vit_pytorch(dim):
    from vit_pytorch.simple_vit_3d import SimpleViT

    torch.manual_seed(0)
    kw = {**VP, "dim": dim}
    theirs = SimpleViT(**kw).eval()
    ours = from_vit_pytorch("simple_vit_3d", theirs, **kw).eval()
    x = torch.randn(3, 3, 4, 16, 16)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5


def test_converter_refuses_unknown_keys_and_odd_patches():
    from vit_pytorch.vit_3d import ViT

    state = ViT(**VP).state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.weight"):
        from_vit_pytorch("vit_3d", state, **VP)
    with pytest.raises(ValueError, match="square"):
        from_vit_pytorch("vit_3d", ViT(**{**VP, "image_patch_size": (4, 2)}), **{**VP, "image_patch_size": (4, 2)})


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_configs_count_like_vit_pytorch(family):
    refs = [r for r in REFERENCES if r.family == family]
    assert sorted(r.size for r in refs) == ["base", "small"]
    for ref in refs:
        with torch.device("meta"):  # no memory, no initialisation
            theirs = build_vit_pytorch(ref)
            ours = backbones.create(family, **ref.ours)
        head = theirs.mlp_head[1] if family == "vit_3d" else theirs.linear_head
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(ours) == count(theirs) - count(head)
        assert ours.input_shape == ref.input_shape


# --------------------------------------------------------------------------- objectives on clips

@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("objective,hp", [
    ("mae", dict(decoder_dim=24, decoder_depth=1, decoder_heads=2)),  # 3-D decoder positions: a multiple of 6
    ("simmim", {}),
    ("mpp", {}),
])
def test_masked_objectives_train_on_clips(name, objective, hp):
    model = make(name).train()
    obj = objectives.create(objective, model, **hp)
    out = obj({"views": [clips(model, b=3)]})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"
    if objective != "mpp":
        recon, mask = obj.reconstruct(clips(model, b=2))
        assert recon.shape == mask.shape == (2, *model.input_shape)


@pytest.mark.parametrize("objective", ["simmim", "mpp"])
def test_fc_norm_is_pool_only_and_patch_objectives_leave_no_parameter_without_gradient(objective):
    """With fc_norm the final LayerNorm acts on the pooled vector only: no patch token depends on
    it, so it is declared pool-only, and an objective reading patches freezes it."""
    assert make().pool_only_parameters() == []  # the norm on every token: patch tokens use it
    model = make(pool="mean_all", fc_norm=True).train()
    assert {id(p) for p in model.pool_only_parameters()} == {id(p) for p in model.norm.parameters()}
    obj = objectives.create(objective, model)
    out = obj({"views": [clips(model, b=3)]})
    out["loss"].backward()
    missing = [n for n, p in obj.named_parameters() if p.requires_grad and p.grad is None]
    assert torch.isfinite(out["loss"]) and not missing, f"no gradient reaches {missing}"
    assert not any(p.requires_grad for p in model.norm.parameters())


def test_save_load_and_attention(tmp_path):
    model = make()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = clips(model)
    assert torch.equal(model(x), again(x))
    probs = model.attention_probs(x)
    assert probs.shape == (2, 2, 33, 33) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 33))


def test_example_config_is_small():
    for name in FAMILIES:
        model = backbones.create(name, **backbones.example_config(name))
        assert sum(p.numel() for p in model.parameters()) < 300_000


# --------------------------------------------------------------------------- clear errors

@pytest.mark.parametrize("over,match", [
    (dict(frames=5), "frames=5 is not divisible by frame_patch_size=2"),
    (dict(image_size=18), "image_size=18 is not divisible by patch_size=4"),
    (dict(pool="max"), "pool='max'"),
    (dict(class_token=False), "needs class_token=True"),
    (dict(size="huge"), "size='huge'"),
    (dict(tubelet=2), "has no option 'tubelet'"),
])
def test_bad_options_raise_clearly(over, match):
    with pytest.raises(ValueError, match=match):
        backbones.create("vit_3d", **{**CLIP, **over})


def test_wrong_input_shape_is_refused():
    model = make()
    with pytest.raises(ValueError, match=r"\(B, 1, 4, 16, 16\) = \(B, C, T, H, W\)"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(2, 1, 6, 16, 16))
