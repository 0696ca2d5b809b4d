"""Twins-SVT: geometry and flags, parity with vit-pytorch, SimMIM's forward_masked, padded windows
at sizes the windows do not tile, and clear errors."""
from __future__ import annotations

import pytest
import torch

import backbones
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch
from backbones.layers import Attention
from backbones.twins_svt import WindowAttention


def example(**over):
    return backbones.create("twins_svt", **{**backbones.example_config("twins_svt"), **over})


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight moved off its initialisation (LayerNorm gains and biases included), so a wrong
    mapping cannot hide behind ones and zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_example_geometry_and_flags():
    model = example()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model.patch_size == 8 and model.grid_size == (4, 4) and model.num_patches == 16
    assert model.embed_dim == 64 and model.mask_token_dim == 16 and model.input_shape == (1, 32, 32)
    assert model.supports_mask_token and model.supports_any_size
    assert not (model.supports_token_access or model.supports_token_drop or model.attention_maps)
    # the PEG convolutions are the positional encoding: exempt from weight decay
    skip = model.no_weight_decay()
    assert len(skip) == 2 * 3 and all(".peg." in s for s in skip) and skip <= dict(model.named_parameters()).keys()
    x = torch.randn(3, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (3, 16, 64)
    assert torch.allclose(model(x), feats.mean(1))
    model(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_patchify_unpatchify_invert():
    model = example()
    x = torch.randn(2, 1, 32, 32)
    t = model.patchify(x)
    assert t.shape == (2, 16, 64)
    assert torch.equal(model.unpatchify(t), x)


@pytest.mark.parametrize("vk, size", [
    # every stage's windows and key strides different; a stage of one layer (s2_depth=0)
    (dict(s1_emb_dim=16, s1_patch_size=4, s1_local_patch_size=4, s1_global_k=4, s1_depth=1, s2_emb_dim=24,
          s2_local_patch_size=4, s2_global_k=2, s2_depth=0, s3_emb_dim=32, s3_local_patch_size=2, s3_global_k=2,
          s3_depth=2, s4_emb_dim=40, s4_global_k=1, s4_depth=1), 64),
    (dict(s1_emb_dim=8, s1_patch_size=2, s1_local_patch_size=3, s1_global_k=3, s2_emb_dim=16, s2_local_patch_size=3,
          s2_global_k=3, s3_emb_dim=16, s3_local_patch_size=3, s3_global_k=1, s3_depth=0, s4_emb_dim=24,
          s4_patch_size=3, s4_global_k=1, s4_depth=0, peg_kernel_size=5), 48),
])
def test_parity_with_vit_pytorch(vk, size):
    from vit_pytorch.twins_svt import TwinsSVT

    torch.manual_seed(0)
    vp = TwinsSVT(num_classes=7, **vk).eval()
    randomise(vp)
    ours = from_vit_pytorch("twins_svt", vp, num_classes=7, image_size=size, **vk).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert (ours(x) - vp(x)).abs().max() < 1e-5


def test_converter_refuses_unknown_arguments():
    with pytest.raises(ValueError, match="s5_emb_dim"):
        from_vit_pytorch("twins_svt", {}, num_classes=10, s5_emb_dim=3)


def test_references_are_vit_pytorch_networks():
    """Parameter counts of the registered small / base twins (built on the meta device): ours
    equals vit-pytorch's less its 1000-way head."""
    refs = [r for r in REFERENCES if r.family == "twins_svt"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    with torch.device("meta"):
        for r in refs:
            vp = sum(p.numel() for p in build_vit_pytorch(r).parameters())
            model = backbones.create("twins_svt", **r.ours)
            assert vp - sum(p.numel() for p in model.parameters()) == 1000 * (model.embed_dim + 1)


def test_forward_masked_replaces_only_masked_inputs():
    torch.manual_seed(0)
    model = example().eval()
    x = torch.randn(2, 1, 32, 32)
    token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    none = torch.zeros(2, 16)
    assert torch.allclose(model.forward_masked(x, none, token), model.forward_features(x), atol=1e-6)

    mask = torch.zeros(2, 16)
    mask[0, [0, 5, 6]] = 1
    mask[1, [15]] = 1
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 16, 64)
    # the pixels under masked tokens no longer matter ...
    pix = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels)).bool()
    y = torch.where(pix, torch.randn_like(x) * 5, x)
    assert torch.allclose(model.forward_masked(y, mask, token), out, atol=1e-6)
    # ... the others do, and so does the mask token, which receives a gradient
    assert not torch.allclose(model.forward_masked(torch.where(pix, x, x + 1), mask, token), out)
    out.square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_forward_masked_rejects_a_mask_of_the_wrong_grid():
    model = example()
    with pytest.raises(ValueError, match="4x4 grid"):
        model.forward_masked(torch.randn(2, 1, 32, 32), torch.zeros(2, 64), torch.zeros(1, 1, 16))


def test_other_sizes_run_and_padded_windows_are_exact():
    model = example().eval()
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 64)  # DINO's local crops
    assert model.forward_features(torch.randn(2, 1, 24, 40)).shape == (2, 3 * 5, 64)
    with pytest.raises(ValueError, match="multiples of the patch size 8"):
        model(torch.randn(2, 1, 30, 32))
    # windows of 3 over a 5 x 4 map: each token attends within its (clipped) window only
    torch.manual_seed(0)
    attn = WindowAttention(8, heads=2, head_dim=4, window=3).eval()
    x = torch.randn(2, 5, 4, 8)
    out = attn(x)
    plain = Attention(8, 2, qkv_bias=False, head_dim=4)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items()})
    for r0 in (0, 3):
        for c0 in (0, 3):
            win = x[:, r0:r0 + 3, c0:c0 + 3]
            expect = plain(win.flatten(1, 2)).view_as(win)
            assert torch.allclose(out[:, r0:r0 + 3, c0:c0 + 3], expect, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = example().eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("over, match", [
    (dict(image_size=36), "image_size=\\[36, 36\\] is not divisible by the total stride 8"),
    (dict(depths=(1, 1)), "depths=\\[1, 1\\] has 2 entries but the model has 3 stages"),
    (dict(windows=(4, 0, 4)), "windows=\\[4, 0, 4\\]"),
    (dict(peg_kernel=4), "peg_kernel=4"),
    (dict(window=4), "has no option 'window'"),
])
def test_bad_options_say_what_to_fix(over, match):
    with pytest.raises(ValueError, match=match):
        example(**over)
