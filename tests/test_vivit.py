"""vivit (both factorised variants): output token layout, what each token can see (the factorised
encoder's tubelet tokens see their own time step only, so it refuses masked objectives), honest
flags (no token drop: MAE is refused, a subset is refused clearly), the mask token, logits equal
to vit-pytorch's, reference configurations, SimMIM / MPP (self-attention variant) and DINO on
clips, clear errors."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones import CapabilityError
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch

VARIANTS = ["factorized_encoder", "factorized_self_attention"]
# (C, T, H, W) = (1, 4, 16, 16), tubelets 2 x 4 x 4: 2 time steps of 16 tubelets
CLIP = dict(image_size=16, frames=4, patch_size=4, frame_patch_size=2, in_chans=1, dim=24, spatial_depth=1,
            temporal_depth=1, heads=2)


def make(variant="factorized_encoder", **over):
    torch.manual_seed(0)
    return backbones.create("vivit", **{**CLIP, "variant": variant, **over}).eval()


def clips(model, b=2, seed=1):
    return torch.randn(b, *model.input_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_shapes_and_prefix_tokens(variant, pool):
    model = make(variant, pool=pool)
    assert model.input_shape == (1, 4, 16, 16) and model.grid_size == (2, 4, 4) and model.patch_pixels == 32
    # encoder: [temporal class token] + one token per time step; self-attention: one class token per time step
    expected = {("factorized_encoder", "cls"): 3, ("factorized_encoder", "mean"): 2,
                ("factorized_self_attention", "cls"): 2, ("factorized_self_attention", "mean"): 0}
    assert model.num_prefix_tokens == expected[variant, pool]
    x = clips(model)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, model.num_prefix_tokens + 32, 24)
    assert torch.allclose(model(x), model.pool(tokens)) and model(x).shape == (2, 24)
    patches = model.embed_patches(x) + model.pos_embed_for(None)
    assert torch.allclose(model.pool(model.forward_tokens(patches)), model(x), atol=1e-6)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize("variant", VARIANTS)
def test_flags_and_no_token_drop(variant):
    model = make(variant)
    fsa = variant == "factorized_self_attention"
    assert model.attention_maps and not model.supports_token_drop and not model.supports_any_size
    # the encoder's tubelet tokens never reach its temporal transformer: no masked-prediction objective
    assert model.supports_token_access == model.supports_mask_token == fsa
    with pytest.raises(CapabilityError, match="supports_token_drop"):
        objectives.create("mae", model, decoder_dim=24, decoder_depth=1, decoder_heads=2)
    if not fsa:
        for name in ("simmim", "mpp"):
            with pytest.raises(CapabilityError, match="dino, distill"):
                objectives.create(name, model)
    x = clips(model)
    subset = (model.embed_patches(x) + model.pos_embed_for(None))[:, :8]
    with pytest.raises(ValueError, match="runs on all 32 tubelet tokens, got 8"):
        model.forward_tokens(subset)


def test_encoder_tubelet_tokens_see_their_own_time_step_only():
    """Factorised encoder: the spatial transformer sees one time step at a time, so new pixels in the
    second time step leave the first's tubelet tokens as they were; the pooled embedding changes.
    Factorised self-attention mixes time in every block: everything changes."""
    x = clips(make())
    y = x.clone()
    y[:, :, 2:] = torch.randn_like(y[:, :, 2:])  # frames 2-3: the second time step
    enc = make()
    a, b = enc.forward_features(x)[:, 3:], enc.forward_features(y)[:, 3:]
    assert torch.allclose(a[:, :16], b[:, :16], atol=1e-6) and not torch.allclose(a[:, 16:], b[:, 16:])
    assert not torch.allclose(enc(x), enc(y))
    fsa = make("factorized_self_attention")
    a, b = fsa.forward_features(x)[:, 2:], fsa.forward_features(y)[:, 2:]
    assert not torch.allclose(a[:, :16], b[:, :16])


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_masked_hides_the_masked_tubelets(variant):
    model = make(variant)
    x = clips(model)
    mask_token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    none = torch.zeros(2, 32)
    assert torch.allclose(model.forward_masked(x, none, mask_token),
                          model.forward_features(x)[:, model.num_prefix_tokens:], atol=1e-6)
    mask = (torch.rand(2, 32, generator=torch.Generator().manual_seed(3)) < 0.5).float()
    out = model.forward_masked(x, mask, mask_token)
    assert out.shape == (2, 32, 24)
    pixels = model.patchify(x)
    noisy = model.unpatchify(torch.where(mask.bool()[..., None], torch.randn_like(pixels), pixels))
    assert torch.allclose(model.forward_masked(noisy, mask, mask_token), out, atol=1e-6)
    out.sum().backward()
    assert mask_token.grad is not None and mask_token.grad.abs().sum() > 0


# --------------------------------------------------------------------------- vit-pytorch parity

VP = dict(image_size=16, image_patch_size=4, frames=4, frame_patch_size=2, num_classes=7, dim=32, spatial_depth=2,
          temporal_depth=2, heads=2, mlp_dim=48, dim_head=16, channels=3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("heads,dim_head", [(2, 16), (1, 32)])  # heads=1, dim_head=dim: no output projection there
def test_logits_equal_vit_pytorch(variant, pool, heads, dim_head):
    from vit_pytorch.vivit import ViT

    torch.manual_seed(0)
    kw = {**VP, "variant": variant, "pool": pool, "heads": heads, "dim_head": dim_head}
    theirs = ViT(**kw).eval()
    ours = from_vit_pytorch("vivit", theirs.state_dict(), **kw).eval()
    x = torch.randn(3, 3, 4, 16, 16)
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() < 1e-5
    assert ours.backbone.build_config["kwargs"]["variant"] == variant


def test_reference_configs_count_like_vit_pytorch():
    refs = [r for r in REFERENCES if r.family == "vivit"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    for ref in refs:
        with torch.device("meta"):
            theirs = build_vit_pytorch(ref)
            ours = backbones.create("vivit", **ref.ours)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert count(ours) == count(theirs) - count(theirs.mlp_head)


# --------------------------------------------------------------------------- objectives on clips

@pytest.mark.parametrize("objective", ["simmim", "mpp"])
def test_masked_objectives_train_factorised_self_attention_on_clips(objective):
    model = make("factorized_self_attention").train()
    obj = objectives.create(objective, model)
    out = obj({"views": [clips(model, b=3)]})
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_dino_on_clips():
    model = make().train()
    dino = objectives.create("dino", model, num_local=0, out_dim=32, head_hidden_dim=32, head_bottleneck_dim=16)
    dino.set_total_steps(10)
    out = dino({"views": [clips(model, seed=1), clips(model, seed=2)]})
    out["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.temporal_blocks.parameters())


def test_save_load_and_attention(tmp_path):
    model = make()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = clips(model)
    assert torch.equal(model(x), again(x))
    for variant in VARIANTS:
        probs = make(variant).attention_probs(x)  # spatial attention per time step, class token first
        assert probs.shape == (2, 2, 2, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(2, 2, 2, 17))


def test_example_config_is_small():
    model = backbones.create("vivit", **backbones.example_config("vivit"))
    assert sum(p.numel() for p in model.parameters()) < 300_000


# --------------------------------------------------------------------------- clear errors

@pytest.mark.parametrize("over,match", [
    (dict(variant="joint"), "variant='joint'"),
    (dict(variant="factorized_self_attention", temporal_depth=2), "depths must be equal"),
    (dict(pool="max"), "pool='max'"),
    (dict(frames=3), "frames=3 is not divisible by frame_patch_size=2"),
    (dict(size="tiny"), "size='tiny'"),
    (dict(depth=2), "has no option 'depth'"),
])
def test_bad_options_raise_clearly(over, match):
    with pytest.raises(ValueError, match=match):
        backbones.create("vivit", **{**CLIP, **over})
