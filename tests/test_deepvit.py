"""DeepViT: shapes, flags, re-attention, token drop, the mask token, parity with vit-pytorch."""
from __future__ import annotations

import pytest
import torch

import backbones
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch
from backbones.deepvit import ReAttention


def example(**over):
    torch.manual_seed(0)
    return backbones.create("deepvit", **{**backbones.example_config("deepvit"), **over})


def test_example_is_small_and_shapes_hold():
    bb = example()
    assert sum(p.numel() for p in bb.parameters()) < 300_000
    x = torch.randn(4, *bb.input_shape)
    n = bb.num_patches
    assert bb.forward_features(x).shape == (4, 1 + n, bb.embed_dim)
    assert bb(x).shape == (4, bb.embed_dim)
    torch.testing.assert_close(bb(x), bb.forward_features(x)[:, 0])
    mean = example(pool="mean")
    torch.testing.assert_close(mean(x), mean.forward_features(x)[:, 1:].mean(1))


def test_flags_and_blocks():
    bb = example()
    assert bb.supports_token_access and bb.supports_token_drop and bb.supports_mask_token
    assert bb.attention_maps and bb.supports_any_size and not bb.has_distill_token
    assert all(isinstance(b.attn, ReAttention) for b in bb.blocks)
    assert bb(torch.randn(2, 1, 16, 24)).shape == (2, bb.embed_dim)  # any multiple of the patch size


def test_re_attention_is_normalised_over_heads():
    """At init (identity mixing, unit LayerNorm) every (i, j) entry has mean 0 over the heads and a
    variance v / (v + eps) <= 1 (v: the variance of the heads' softmax probabilities)."""
    bb = example().eval()
    attn = bb.attention_probs(torch.randn(2, *bb.input_shape))
    assert attn.shape == (2, 4, 1 + bb.num_patches, 1 + bb.num_patches)
    torch.testing.assert_close(attn.mean(1), torch.zeros_like(attn[:, 0]), atol=1e-5, rtol=0)
    var = attn.var(1, unbiased=False)
    assert torch.all(var <= 1 + 1e-4) and var.mean() > 0.05


def test_re_attention_mixes_heads():
    """The mixing matrix acts across heads: swapping two of its columns swaps those output heads' maps."""
    torch.manual_seed(0)
    ra = ReAttention(16, 4, norm_eps=1e-5)
    with torch.no_grad():
        ra.reattn.copy_(torch.randn(4, 4))
    x = torch.randn(2, 5, 16)
    a = ra.attention_probs(x)
    with torch.no_grad():
        ra.reattn.copy_(ra.reattn[:, [1, 0, 2, 3]])
    torch.testing.assert_close(ra.attention_probs(x), a[:, [1, 0, 2, 3]])


def test_token_drop_on_a_subset():
    bb = example().eval()
    x = torch.randn(2, *bb.input_shape)
    ids = torch.stack([torch.randperm(bb.num_patches)[:12] for _ in range(2)])
    tokens = backbones.layers.gather_tokens(bb.embed_patches(x), ids) + bb.pos_embed_for(ids)
    out = bb.forward_tokens(tokens)
    assert out.shape == (2, 13, bb.embed_dim)
    perm = torch.randperm(12)
    torch.testing.assert_close(bb.forward_tokens(tokens[:, perm])[:, 1:], out[:, 1:][:, perm], atol=1e-5, rtol=1e-5)


def test_forward_masked_replaces_masked_patches():
    bb = example().eval()
    x = torch.randn(2, *bb.input_shape)
    mask = torch.zeros(2, bb.num_patches, dtype=torch.bool)
    mask[:, 1::2] = True
    token = torch.randn(1, 1, bb.mask_token_dim, requires_grad=True)
    out = bb.forward_masked(x, mask, token)
    assert out.shape == (2, bb.num_patches, bb.embed_dim)
    under = bb.unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, bb.patch_pixels)).bool()
    torch.testing.assert_close(bb.forward_masked(torch.where(under, torch.randn_like(x), x), mask, token), out)
    assert not torch.allclose(bb.forward_masked(torch.where(under, x, torch.randn_like(x)), mask, token), out)
    out.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_patchify_unpatchify_invert():
    bb = example(in_chans=3)
    x = torch.randn(2, *bb.input_shape)
    torch.testing.assert_close(bb.unpatchify(bb.patchify(x)), x)


def test_every_parameter_trains():
    bb = example()
    bb(torch.randn(2, *bb.input_shape)).square().mean().backward()
    assert [n for n, p in bb.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []


@pytest.mark.parametrize("kwargs, match", [
    (dict(heads=1), "heads >= 2"),
    (dict(size="huge"), "size='huge'"),
    (dict(pool="max"), "pool='max'"),
    (dict(dim=30, heads=4), "heads=4 must divide dim=30"),
    (dict(distill_token=True), "no option 'distill_token'"),
])
def test_bad_kwargs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        example(**kwargs)


# --------------------------------------------------------------------------- vit-pytorch

VP = dict(image_size=32, patch_size=8, num_classes=7, dim=32, depth=2, heads=4, mlp_dim=48, dim_head=12, channels=2)


def vit_pytorch_deepvit(**over):
    from vit_pytorch.deepvit import DeepViT

    torch.manual_seed(0)
    model = DeepViT(**{**VP, **over}).eval()
    with torch.no_grad():  # norms start at 1 / 0: perturb them so a swapped weight or bias would show
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith(("to_patch_embedding.1", "to_patch_embedding.3", "mlp_head.0")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("over", [{}, dict(channels=3, heads=2, dim_head=32)])
def test_parity_with_vit_pytorch(over):
    vp = vit_pytorch_deepvit(**over)
    kw = {**VP, **over}
    ours = from_vit_pytorch("deepvit", vp.state_dict(), **kw).eval()
    x = torch.randn(3, kw["channels"], 32, 32)
    with torch.no_grad():
        expected, got = vp(x), ours(x)
    assert got.shape == (3, 7)
    assert (expected - got).abs().max().item() < 1e-5
    assert expected.std() > 0.1


def test_converter_refuses_mean_pool_and_unknown_keys():
    state = vit_pytorch_deepvit().state_dict()
    with pytest.raises(ValueError, match="pool='mean'"):
        from_vit_pytorch("deepvit", state, **{**VP, "pool": "mean"})
    with pytest.raises(ValueError, match="does not know"):
        from_vit_pytorch("deepvit", {**state, "extra.weight": torch.zeros(1)}, **VP)


def test_reference_configs_are_the_same_network():
    refs = [r for r in REFERENCES if r.family == "deepvit"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    for ref in refs:
        with torch.device("meta"):
            vp, ours = build_vit_pytorch(ref), backbones.create("deepvit", **ref.ours)
        head = ref.vp_kwargs["dim"] * 1000 + 1000
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in vp.parameters()) - head
