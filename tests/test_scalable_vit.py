"""ScalableViT: geometry and flags, parity with vit-pytorch (its layer order and pooled norm), the
SimMIM forward_masked (no masked pixel reaches a visible token through the overlapping stem),
other input sizes, and clear errors."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch
from backbones.layers import zero_masked_pixels


def example(**over):
    return backbones.create("scalable_vit", **{**backbones.example_config("scalable_vit"), **over})


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight moved off its initialisation (LayerNorm gains and biases included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_example_geometry_and_flags():
    model = example()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model.patch_size == 8 and model.grid_size == (4, 4) and model.num_patches == 16
    assert model.embed_dim == 32 and model.mask_token_dim == 16 and model.input_shape == (1, 32, 32)
    assert model.supports_mask_token and model.supports_any_size
    assert not (model.supports_token_access or model.supports_token_drop or model.attention_maps)
    # the PEG convolutions are the positional encoding: exempt from weight decay
    skip = model.no_weight_decay()
    assert len(skip) == 2 * 2 and all(".peg." in s for s in skip) and skip <= dict(model.named_parameters()).keys()
    x = torch.randn(3, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 16, 32)
    assert torch.allclose(model(x), feats.mean(1))
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_patchify_unpatchify_invert():
    model = example()
    x = torch.randn(2, 1, 32, 32)
    assert model.patchify(x).shape == (2, 16, 64)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)


@pytest.mark.parametrize("vk, size", [
    # per-stage widths, a window that tiles, a global one (None), a reduction of 1
    (dict(dim=16, depth=(1, 2, 1), heads=(1, 2, 2), reduction_factor=(4, 2, 1), window_size=(4, None, 2),
          ssa_dim_key=(8, 12, 8), ssa_dim_value=6, iwsa_dim_key=(8, 4, 4), iwsa_dim_value=(4, 6, 8),
          ff_expansion_factor=2), 64),
    # vit-pytorch's defaults for the optional arguments, two channels
    (dict(dim=8, depth=(2, 1), heads=2, reduction_factor=2, channels=2), 32),
])
def test_parity_with_vit_pytorch(vk, size):
    from vit_pytorch.scalable_vit import ScalableViT

    torch.manual_seed(0)
    vp = ScalableViT(num_classes=7, **vk).eval()
    randomise(vp)
    ours = from_vit_pytorch("scalable_vit", vp, num_classes=7, image_size=size, **vk).eval()
    x = torch.randn(2, vk.get("channels", 3), size, size)
    with torch.no_grad():
        assert (ours(x) - vp(x)).abs().max() < 1e-5


def test_layer_order_and_final_norm_change_the_network_not_its_parameters():
    torch.manual_seed(0)
    vp_like = example(layer_order="ssa_ff_ff_iwsa", final_norm="pooled").eval()
    ours = example().eval()
    ours.load_state_dict(vp_like.state_dict(), strict=True)
    x = torch.randn(2, 1, 32, 32)
    assert not torch.allclose(ours.forward_features(x), vp_like.forward_features(x), atol=1e-3)
    tokens = vp_like.forward_features(x)  # no norm on the tokens; the norm comes after the mean
    assert torch.allclose(vp_like(x), vp_like.norm(tokens.mean(1)), atol=1e-6)


def test_references_are_vit_pytorch_networks():
    """Parameter counts of the registered small / base twins (built on the meta device): ours
    equals vit-pytorch's less its 1000-way head."""
    refs = [r for r in REFERENCES if r.family == "scalable_vit"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    with torch.device("meta"):
        for r in refs:
            vp = sum(p.numel() for p in build_vit_pytorch(r).parameters())
            model = backbones.create("scalable_vit", **r.ours)
            assert vp - sum(p.numel() for p in model.parameters()) == 1000 * (model.embed_dim + 1)


def test_forward_masked_hides_masked_pixels_from_every_token():
    torch.manual_seed(0)
    model = example().eval()
    x = torch.randn(2, 1, 32, 32)
    token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    assert torch.allclose(model.forward_masked(x, torch.zeros(2, 16), token), model.forward_features(x), atol=1e-6)

    mask = torch.zeros(2, 16)
    mask[0, [0, 5, 6]] = 1
    mask[1, [10]] = 1
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 16, 32)
    # the stem's 7x7 kernels overlap neighbouring patches: still no masked pixel may leak
    pix = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels)).bool()
    y = torch.where(pix, torch.randn_like(x) * 5, x)
    assert torch.allclose(model.forward_masked(y, mask, token), out, atol=1e-6)
    assert not torch.allclose(model.forward_masked(torch.where(pix, x, x + 1), mask, token), out)
    out.square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_zero_masked_pixels_zeroes_exactly_the_blocks_of_masked_tokens():
    x = torch.randn(2, 3, 8, 12) + 10.0  # no pixel is 0 by chance
    mask = torch.zeros(2, 6)  # a 2 x 3 grid of 4 x 4 blocks
    mask[0, [1, 5]] = 1
    mask[1, 3] = 1
    out = zero_masked_pixels(x, mask, (2, 3))
    expect = x.clone()
    expect[0, :, 0:4, 4:8] = 0
    expect[0, :, 4:8, 8:12] = 0
    expect[1, :, 4:8, 0:4] = 0
    assert torch.equal(out, expect)
    with pytest.raises(ValueError, match="2x3 grid"):
        zero_masked_pixels(x, torch.zeros(2, 5), (2, 3))


@pytest.mark.parametrize("final_norm", ["tokens", "pooled"])
def test_simmim_step_leaves_no_trainable_parameter_without_gradient(final_norm):
    """final_norm='pooled': the LayerNorm acts on the mean only, no patch token depends on it: it is
    declared pool-only and SimMIM (which reads patches) freezes it; every other parameter learns."""
    torch.manual_seed(0)
    model = example(final_norm=final_norm)
    pool_only = {id(p) for p in model.pool_only_parameters()}
    assert pool_only == ({id(p) for p in model.norm.parameters()} if final_norm == "pooled" else set())
    obj = objectives.create("simmim", model)
    obj.train()
    out = obj({"views": [torch.randn(4, 1, 32, 32)]})
    out["loss"].backward()
    missing = [n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert torch.isfinite(out["loss"]) and not missing, missing
    assert all(p.requires_grad == (id(p) not in pool_only) for p in model.parameters())


def test_forward_masked_rejects_a_mask_of_the_wrong_grid():
    with pytest.raises(ValueError, match="4x4 grid"):
        example().forward_masked(torch.randn(2, 1, 32, 32), torch.zeros(2, 15), torch.zeros(1, 1, 16))


def test_other_sizes_run():
    model = example().eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 32)  # DINO's local crops
    assert model.forward_features(torch.randn(2, 1, 24, 40)).shape == (2, 3 * 5, 32)  # windows of 4 over 6 x 10
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(torch.randn(2, 1, 32, 20))


def test_save_load_round_trip(tmp_path):
    model = example().eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("over, match", [
    (dict(image_size=28), "image_size=\\[28, 28\\] is not divisible by the total stride 8"),
    (dict(heads=(1, 2, 4)), "heads=\\[1, 2, 4\\] has 3 entries but the model has 2 stages"),
    (dict(window_size=(0, None)), "window_size=\\[0, None\\]"),
    (dict(layer_order="iwsa_first"), "layer_order='iwsa_first'"),
    (dict(final_norm=False), "final_norm=False"),
    (dict(depth=(1, 1)), "has no option 'depth'"),
])
def test_bad_options_say_what_to_fix(over, match):
    with pytest.raises(ValueError, match=match):
        example(**over)
