"""NaViT: packing images of different sizes, the block-diagonal mask, token dropping, factorised
positions, the token-level protocol, and parity with vit-pytorch's NaViT."""
from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch

import backbones
from backbones.convert import REFERENCES, from_vit_pytorch

EXAMPLE = backbones.example_config("navit")  # 32 px, patch 4, 1 channel: grids up to 8 x 8


def model(**over) -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create("navit", **{**EXAMPLE, **over}).eval()


def sizes_images(*sizes, c=1):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(c, h, w, generator=g) for h, w in sizes]


def test_shapes_flags_and_any_size_up_to_the_largest():
    m = model()
    assert (m.supports_token_access, m.supports_token_drop, m.supports_mask_token, m.attention_maps,
            m.supports_any_size, m.has_distill_token) == (True, True, True, True, True, False)
    assert m.num_prefix_tokens == 0 and m.grid_size == (8, 8) and m.input_shape == (1, 32, 32)
    x = torch.randn(2, 1, 32, 32)
    assert m(x).shape == (2, 32) and m.forward_features(x).shape == (2, 64, 32)
    # a smaller, rectangular batch reads the first rows / columns of the tables: no interpolation
    small = torch.randn(2, 1, 12, 20)
    with torch.no_grad():
        pos = (m.pos_embed_h[:3, None] + m.pos_embed_w[None, :5]).reshape(1, 15, -1)  # rows 0-2, columns 0-4
        want = m.forward_tokens(m.patch_embed(small) + pos)
        assert torch.allclose(m.forward_features(small), want, atol=1e-6)
    with pytest.raises(ValueError, match=r"at most image_size=32 x 32"):
        m(torch.randn(1, 1, 36, 32))
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        m(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="does not fit"):  # token-level access stays at the built size
        m.embed_patches(small)


def test_packed_images_get_the_embedding_they_get_alone():
    m = model()
    images = sizes_images((32, 16), (8, 28), (20, 20))
    with torch.no_grad():
        alone = torch.cat([m(img[None]) for img in images])
        packed = m.forward_packed(images)
    assert m.pack(images).groups == [[0, 1, 2]]  # 32 + 14 + 25 tokens: one sequence
    assert packed.shape == (3, 32) and (packed - alone).abs().max() < 1e-5
    # split over several sequences (with padding in the shorter ones): the same, in input order
    m.max_seq_len = 40
    assert m.pack(images).groups == [[0], [1, 2]]
    with torch.no_grad():
        assert (m.forward_packed(images) - alone).abs().max() < 1e-5


def test_packing_is_greedy_in_order_within_max_seq_len():
    m = model(max_seq_len=64)
    images = sizes_images((32, 32), (16, 16), (16, 32), (8, 8), (32, 16))  # 64, 16, 32, 4, 32 tokens
    p = m.pack(images)
    assert p.lengths == [64, 16, 32, 4, 32] and p.groups == [[0], [1, 2, 3], [4]]
    assert p.patches.shape == (3, 64, 16) and p.image_ids.shape == (3, 64)
    assert p.image_ids[1].tolist() == [0] * 16 + [1] * 32 + [2] * 4 + [-1] * 12  # padding is -1
    # the tokens are the images' patches in patchify order, with their rows and columns
    assert torch.equal(p.patches[1, 16:48], m.patchify(images[2][None])[0])
    assert p.rows[1, 16:48].tolist() == [r for r in range(4) for _ in range(8)]
    assert p.cols[1, 16:48].tolist() == list(range(8)) * 4
    m.max_seq_len = 10
    with pytest.raises(ValueError, match=r"images\[0\] \(32 x 32\) keeps 64 tokens, more than max_seq_len=10"):
        m.pack(images)


def test_token_dropping_drops_the_stated_share_per_image():
    m = model()
    images = sizes_images((32, 32), (16, 24), (4, 4))  # 64, 24, 1 patches
    g = torch.Generator().manual_seed(0)
    p = m.pack(images, token_drop=0.25, generator=g)
    assert p.num_patches == [64, 24, 1] and p.lengths == [48, 18, 1]  # max(1, int(n * 0.75))
    kept = p.rows[0, :48] * 8 + p.cols[0, :48]
    assert kept.unique().numel() == 48 and kept.max() < 64  # distinct patches of image 0
    ids = p.rows[0, 48:66] * 6 + p.cols[0, 48:66]
    assert torch.equal(p.patches[0, 48:66], m.patchify(images[1][None])[0, ids])  # values follow their patch
    # a function of (height, width), as NaViT's resolution-dependent schedule
    p = m.pack(images, token_drop=lambda h, w: 0.5 if h * w >= 1024 else 0.0)
    assert p.lengths == [32, 24, 1]
    with pytest.raises(ValueError, match=r"token_drop=1.0 .* must be in \[0, 1\)"):
        m.pack(images, token_drop=1.0)


def test_dropped_tokens_equal_the_token_protocol_on_the_same_subset():
    """forward_packed with token dropping = embed_patches + pos_embed_for(kept ids) + forward_tokens + pool
    (what MAE's encoder does on its visible patches)."""
    m = model()
    img = sizes_images((32, 32))
    with torch.no_grad():
        out = m.forward_packed(img, token_drop=0.75, generator=torch.Generator().manual_seed(3))
        p = m.pack(img, token_drop=0.75, generator=torch.Generator().manual_seed(3))
        ids = (p.rows * 8 + p.cols)  # (1, 16)
        patches = torch.gather(m.embed_patches(img[0][None]), 1, ids[..., None].expand(-1, -1, 32))  # (1, 16, D)
        tokens = patches + m.pos_embed_for(ids)
        assert (m.pool(m.forward_tokens(tokens)) - out).abs().max() < 1e-5
        assert not torch.allclose(out, m.forward_packed(img), atol=1e-3)


def test_the_mask_blocks_attention_across_images():
    m = model()
    images = [img.requires_grad_() for img in sizes_images((16, 32), (24, 8), (12, 12))]
    out = m.forward_packed(images)
    assert m.pack(images).groups == [[0, 1, 2]]
    out[0].square().sum().backward()  # image A's output
    assert images[0].grad.abs().sum() > 0
    assert images[1].grad.abs().max() == 0 and images[2].grad.abs().max() == 0  # exactly zero
    # and the attention probabilities of a packed sequence are block-diagonal
    p = m.pack([i.detach() for i in images])
    ids = p.image_ids
    mask = ids[:, None, :, None] == ids[:, None, None, :]
    x = m.patch_embed.norm_out(m.patch_embed.proj(m.patch_embed.norm_in(p.patches)))
    probs = m.blocks[0].attn.attention_probs(m.blocks[0].norm1(x), mask)  # (S, H, L, L)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert probs[0, :, :32, 32:].abs().max() == 0 and probs[0, :, 32:38, :32].abs().max() == 0


def test_forward_masked_replaces_exactly_the_masked_patches():
    m = model()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 64)
    mask[:, :20] = 1
    token = torch.randn(1, 1, m.mask_token_dim, requires_grad=True)
    out = m.forward_masked(x, mask, token)
    assert out.shape == (2, 64, 32)
    # the pixels under masked patches no longer matter; those under visible ones do
    x2 = x.clone()
    x2[:, :, :8, :] += torch.randn(2, 1, 8, 32)  # rows 0-1 of the grid: patches 0-15, all masked
    assert torch.allclose(m.forward_masked(x2, mask, token), out, atol=1e-6)
    x3 = x.clone()
    x3[:, :, 28:, :] += torch.randn(2, 1, 4, 32)  # last grid row: visible
    assert not torch.allclose(m.forward_masked(x3, mask, token), out, atol=1e-3)
    out.sum().backward()
    assert token.grad.abs().sum() > 0


def test_patchify_inverts_and_matches_the_patch_embedding_order():
    m = model(in_chans=3)
    x = torch.randn(2, 3, 32, 32)
    t = m.patchify(x)
    assert t.shape == (2, 64, 48) and torch.equal(m.unpatchify(t), x)
    pe = m.patch_embed
    assert torch.allclose(pe(x), pe.norm_out(pe.proj(pe.norm_in(t))), atol=1e-6)


def test_pool_attention_and_weight_decay_exemptions():
    m = model()
    tokens = m.forward_features(torch.randn(2, 1, 32, 32))
    att = m.pool_attention(tokens)
    assert att.shape == (2, 2, 64) and torch.allclose(att.sum(-1), torch.ones(()), atol=1e-5)
    skip = m.no_weight_decay()
    assert {"pos_embed_h", "pos_embed_w", "attn_pool.query", "blocks.0.attn.q_norm.weight"} <= skip
    assert "bias" not in "".join(n for n, _ in m.named_parameters() if "norm" in n)  # LayerNorms without bias


def test_pool_only_parameters_are_what_token_objectives_cannot_reach():
    """MAE's encoder runs forward_tokens on the visible patches: exactly the pooling gets no gradient."""
    m = model().train()
    x = torch.randn(2, 1, 32, 32)
    keep = torch.rand(2, 64).argsort(1)[:, :16]  # (B, 16) visible patches
    tokens = torch.gather(m.embed_patches(x), 1, keep[..., None].expand(-1, -1, 32)) + m.pos_embed_for(keep)
    m.forward_tokens(tokens).square().mean().backward()
    no_grad = {id(p) for p in m.parameters() if p.grad is None or p.grad.abs().sum() == 0}
    pooling = {id(p) for n, p in m.named_parameters() if n.startswith(("attn_pool", "fc_norm"))}
    assert no_grad == pooling == {id(p) for p in m.pool_only_parameters()}


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=30, heads=4), "heads=4 must divide dim=30"),
    (dict(image_size=30), "image_size=30 is not divisible by patch_size=4"),
    (dict(max_seq_len=10), "max_seq_len=10 is shorter than one image"),
    (dict(size="huge"), "size='huge'"),
    (dict(token_dropout=0.5), "no option 'token_dropout'"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.create("navit", **{**EXAMPLE, **kwargs})


def test_bad_packed_input_says_what_fits():
    m = model()
    with pytest.raises(ValueError, match=r"images\[1\] is \(3, 8, 8\): each image must be a \(1, H, W\) tensor"):
        m.pack([torch.randn(1, 8, 8), torch.randn(3, 8, 8)])
    with pytest.raises(ValueError, match="non-empty list"):
        m.forward_packed([])


# --------------------------------------------------------------------------- vit-pytorch

def na_vit():
    """vit_pytorch/na_vit.py loaded on its own: the package's __init__ imports torchvision (seconds)."""
    path = importlib.metadata.distribution("vit-pytorch").locate_file("vit_pytorch/na_vit.py")
    spec = importlib.util.spec_from_file_location("_vit_pytorch_na_vit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VP = dict(image_size=32, patch_size=4, num_classes=7, dim=32, depth=2, heads=2, mlp_dim=48, channels=3, dim_head=16)


def vit_pytorch_navit():
    torch.manual_seed(0)
    vp = na_vit().NaViT(**VP).eval()
    with torch.no_grad():  # move the gains off 1 so a mis-mapped one shows
        for n, p in vp.named_parameters():
            if n.endswith("gamma"):
                p.add_(0.3 * torch.randn_like(p))
    return vp


def test_parity_with_vit_pytorch_batched_and_packed():
    vp = vit_pytorch_navit()
    ours = from_vit_pytorch("navit", vp, **VP).eval()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in vp.parameters())
    x = torch.randn(3, 3, 32, 32)
    images = sizes_images((32, 16), (8, 32), (12, 12), (32, 32), (4, 8), c=3)
    ours.backbone.max_seq_len = 80
    with torch.no_grad():
        assert (vp([[img] for img in x]) - ours(x)).abs().max() < 1e-5  # one image per sequence
        theirs = vp(images, group_images=True, group_max_seq_len=80)
        assert (theirs - ours.head(ours.backbone.forward_packed(images))).abs().max() < 1e-5
    groups = na_vit().group_images_by_max_seq_len(images, patch_size=4, max_seq_len=80)
    assert [len(g) for g in groups] == [len(g) for g in ours.backbone.pack(images).groups] == [3, 2]


def test_converter_refuses_what_it_cannot_load():
    vp = vit_pytorch_navit()
    state = vp.state_dict()
    with pytest.raises(ValueError, match="does not know"):
        from_vit_pytorch("navit", {**state, "extra.weight": torch.zeros(1)}, **VP)
    state["transformer.norm.beta"] = torch.ones(32)
    with pytest.raises(ValueError, match="are not zero"):
        from_vit_pytorch("navit", state, **VP)


def test_reference_configs_are_the_same_network():
    refs = [r for r in REFERENCES if r.family == "navit"]
    assert sorted(r.size for r in refs) == ["base", "small"]
    NaViT = na_vit().NaViT
    for ref in refs:
        assert ref.vp_class == "vit_pytorch.na_vit:NaViT"
        with torch.device("meta"):
            vp, ours = NaViT(**ref.vp_kwargs), backbones.create("navit", **ref.ours)
        vp_body = sum(p.numel() for n, p in vp.named_parameters() if not n.startswith("mlp_head.1"))
        assert sum(p.numel() for p in ours.parameters()) == vp_body
