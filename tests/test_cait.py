"""CaiT: shapes, flags, the two stages on subsets of patches, the mask token, parity with vit-pytorch."""
from __future__ import annotations

import pytest
import torch

import backbones
from backbones.cait import ClassAttentionBlock, layer_scale_init
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch
from backbones.layers import DropPath


def example(**over):
    torch.manual_seed(0)
    return backbones.create("cait", **{**backbones.example_config("cait"), **over})


def test_example_is_small_and_shapes_hold():
    bb = example()
    assert sum(p.numel() for p in bb.parameters()) < 300_000
    x = torch.randn(4, *bb.input_shape)
    n = bb.num_patches
    assert bb.forward_features(x).shape == (4, 1 + n, bb.embed_dim)
    assert bb(x).shape == (4, bb.embed_dim)
    assert bb.embed_patches(x).shape == (4, n, bb.embed_dim)
    assert bb.pos_embed_for(None).shape == (1, n, bb.embed_dim)
    assert bb.num_prefix_tokens == 1
    # the pooled embedding is the class token of forward_features
    torch.testing.assert_close(bb(x), bb.forward_features(x)[:, 0])


def test_flags():
    bb = example()
    assert bb.supports_token_access and bb.supports_token_drop and bb.supports_mask_token
    assert bb.attention_maps and bb.supports_any_size and not bb.has_distill_token


def test_any_size_input():
    bb = example().eval()
    assert bb(torch.randn(2, 1, 16, 20)).shape == (2, bb.embed_dim)
    with pytest.raises(ValueError, match="multiples of the patch size"):
        bb(torch.randn(2, 1, 15, 16))


def test_token_drop_subset_is_permutation_equivariant():
    """Both stages run on any subset of patches: shuffling the visible patches shuffles the patch
    outputs the same way and leaves the class token unchanged (positions travel with the tokens)."""
    bb = example().eval()
    x = torch.randn(2, *bb.input_shape)
    ids = torch.stack([torch.randperm(bb.num_patches)[:12] for _ in range(2)])  # (B, 12)
    tokens = backbones.layers.gather_tokens(bb.embed_patches(x), ids) + bb.pos_embed_for(ids)
    out = bb.forward_tokens(tokens)
    assert out.shape == (2, 13, bb.embed_dim)
    perm = torch.randperm(12)
    out_perm = bb.forward_tokens(tokens[:, perm])
    torch.testing.assert_close(out_perm[:, 1:], out[:, 1:][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_perm[:, 0], out[:, 0], atol=1e-5, rtol=1e-5)


def test_forward_masked_replaces_masked_patches():
    bb = example().eval()
    x = torch.randn(2, *bb.input_shape)
    mask = torch.zeros(2, bb.num_patches, dtype=torch.bool)
    mask[:, ::3] = True
    token = torch.randn(1, 1, bb.mask_token_dim, requires_grad=True)
    out = bb.forward_masked(x, mask, token)
    assert out.shape == (2, bb.num_patches, bb.embed_dim)
    # nothing masked: the patch tokens of forward_features
    torch.testing.assert_close(bb.forward_masked(x, torch.zeros_like(mask), token), bb.forward_features(x)[:, 1:])
    # the pixels under masked patches no longer matter, the others do
    under = bb.unpatchify(mask.unsqueeze(-1).float().expand(-1, -1, bb.patch_pixels)).bool()
    x2 = torch.where(under, torch.randn_like(x), x)
    torch.testing.assert_close(bb.forward_masked(x2, mask, token), out)
    assert not torch.allclose(bb.forward_masked(torch.where(under, x, torch.randn_like(x)), mask, token), out)
    out.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_prefix_only_parameters_are_the_class_stage():
    """SimMIM / MPP read patch tokens only: exactly the class token and class-attention stage get no gradient."""
    bb = example()
    x = torch.randn(2, *bb.input_shape)
    mask = torch.rand(2, bb.num_patches) < 0.5
    bb.forward_masked(x, mask, torch.zeros(1, 1, bb.embed_dim)).square().mean().backward()
    no_grad = {id(p) for p in bb.parameters() if p.grad is None or p.grad.abs().sum() == 0}
    assert no_grad == {id(p) for p in bb.prefix_only_parameters()}


def test_patchify_unpatchify_invert():
    bb = example(in_chans=3)
    x = torch.randn(2, *bb.input_shape)
    p = bb.patchify(x)
    assert p.shape == (2, bb.num_patches, bb.patch_pixels)
    torch.testing.assert_close(bb.unpatchify(p), x)


def test_attention_maps():
    bb = example().eval()
    x = torch.randn(2, *bb.input_shape)
    attn = bb.attention_probs(x)  # the last class-attention block: class token over [cls, patches]
    assert attn.shape == (2, 4, 1, 1 + bb.num_patches)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 1))  # the paper's class attention: plain softmax
    blk = bb.blocks[0].attention_probs(bb.embed_patches(x) + bb.pos_embed_for(None))
    assert blk.shape == (2, 4, bb.num_patches, bb.num_patches)


def test_layer_scale_init_follows_the_paper():
    assert (layer_scale_init(12), layer_scale_init(24), layer_scale_init(36)) == (0.1, 1e-5, 1e-6)
    bb = example()
    assert torch.all(bb.blocks[0].gamma_1 == 0.1) and torch.all(bb.blocks_token_only[0].gamma_2 == 0.1)
    assert torch.all(example(init_scale=0.5).blocks[1].gamma_2 == 0.5)


def test_class_attention_norm_modes_differ():
    """The paper normalises [cls, patches] before the keys/values; vit-pytorch only the class token."""
    torch.manual_seed(0)
    paper = ClassAttentionBlock(16, 2, 32, 1.0, norm_patches=True)
    vp = ClassAttentionBlock(16, 2, 32, 1.0, norm_patches=False)
    vp.load_state_dict(paper.state_dict())
    cls, patches = torch.randn(2, 1, 16), 5 * torch.randn(2, 6, 16) + 3
    assert not torch.allclose(paper(cls, patches), vp(cls, patches))
    torch.testing.assert_close(paper(cls, patches), vp(cls, paper.norm1(patches)))


def test_save_load_roundtrip(tmp_path):
    bb = example().eval()
    backbones.save(bb, tmp_path)
    x = torch.randn(2, *bb.input_shape)
    torch.testing.assert_close(backbones.load(tmp_path).eval()(x), bb(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(size="huge"), "size='huge'"),
    (dict(cls_depth=0), "cls_depth=0"),
    (dict(dim=30, heads=4), "heads=4 must divide dim=30"),
    (dict(image_size=30), "not divisible by patch_size"),
    (dict(drop_path=1.0), "drop_path=1.0"),
    (dict(depthh=2), "no option 'depthh'"),
])
def test_bad_kwargs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        example(**kwargs)


def test_drop_path_drops_whole_samples_in_training_only():
    drop = DropPath(0.5)
    x = torch.randn(64, 5, 8) + 3.0
    assert torch.equal(drop.eval()(x), x)
    torch.manual_seed(0)
    y = drop.train()(x)
    kept = (y != 0).flatten(1).all(1)
    assert ((y == 0).flatten(1).all(1) | kept).all()  # each sample kept or dropped as a whole
    assert 0 < kept.sum() < 64 and torch.allclose(y[kept], x[kept] * 2)  # the kept ones scaled by 1 / (1 - p)
    assert example(drop_path=0.3).blocks[0].drop_path.p == 0.3


def test_wrong_input_shape_is_refused():
    bb = example()
    with pytest.raises(ValueError, match="does not fit this backbone"):
        bb.embed_patches(torch.randn(2, 3, 28, 28))


# --------------------------------------------------------------------------- vit-pytorch

VP = dict(image_size=32, patch_size=8, num_classes=7, dim=32, depth=2, cls_depth=2, heads=4, mlp_dim=48, dim_head=12)


def vit_pytorch_cait(**over):
    from vit_pytorch.cait import CaiT

    torch.manual_seed(0)
    model = CaiT(**{**VP, **over}).eval()
    with torch.no_grad():  # LayerScale starts at 0.1: make every branch count
        for name, p in model.named_parameters():
            if name.endswith("scale") or "norm" in name or name.startswith(("to_patch_embedding.1", "mlp_head.0")):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("over", [{}, dict(heads=1, dim_head=32, cls_depth=1)])
def test_parity_with_vit_pytorch(over):
    vp = vit_pytorch_cait(**over)
    ours = from_vit_pytorch("cait", vp.state_dict(), **{**VP, **over}).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected, got = vp(x), ours(x)
    assert got.shape == (3, 7)
    assert (expected - got).abs().max().item() < 1e-5
    assert expected.std() > 0.1  # a real signal, not a degenerate constant


def test_converter_refuses_unknown_keys_and_wrong_config():
    state = vit_pytorch_cait().state_dict()
    with pytest.raises(ValueError, match="does not know"):
        from_vit_pytorch("cait", {**state, "extra.weight": torch.zeros(1)}, **VP)
    with pytest.raises((ValueError, RuntimeError)):
        from_vit_pytorch("cait", state, **{**VP, "cls_depth": 1})  # a class block is left over


def test_reference_configs_are_the_same_network():
    """Small and base: our parameter count equals vit-pytorch's minus its linear head (its head's
    LayerNorm is our final norm). Built on the meta device, so nothing is allocated."""
    refs = [r for r in REFERENCES if r.family == "cait"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    for ref in refs:
        with torch.device("meta"):
            vp, ours = build_vit_pytorch(ref), backbones.create("cait", **ref.ours)
        head = ref.vp_kwargs["dim"] * 1000 + 1000
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in vp.parameters()) - head
