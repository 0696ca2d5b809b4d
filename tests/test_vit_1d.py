"""vit_1d and simple_vit_1d: rank-1 geometry, patchify order, the token protocol, masking, parity
with vit-pytorch, and the masked objectives on generated signals."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones.convert import from_vit_pytorch

FAMILIES = ["vit_1d", "simple_vit_1d"]


def make(name: str, **over) -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create(name, **{**backbones.example_config(name), **over})


@pytest.mark.parametrize("name", FAMILIES)
def test_geometry_and_flags(name):
    model = make(name, in_chans=3, seq_len=96, patch_size=8)
    assert model.image_size == (96,) and model.input_shape == (3, 96)
    assert model.grid_size == (12,) and model.num_patches == 12 and model.patch_pixels == 24
    assert (model.supports_token_access, model.supports_token_drop, model.supports_mask_token, model.attention_maps,
            model.supports_any_size, model.has_distill_token) == (True, True, True, True, False, False)
    x = torch.randn(2, 3, 96)
    p = model.num_prefix_tokens
    assert p == (1 if name == "vit_1d" else 0)
    assert model(x).shape == (2, 64) and model.forward_features(x).shape == (2, p + 12, 64)
    assert sum(q.numel() for q in make(name).parameters()) < 300_000


def test_patchify_order_and_inverse():
    model = make("vit_1d", in_chans=3, seq_len=32, patch_size=4)
    x = torch.randn(2, 3, 32)
    t = model.patchify(x)  # (B, N, p*C), values (p c)
    assert t.shape == (2, 8, 12)
    n, j, c = 5, 2, 1
    assert t[1, n, j * 3 + c] == x[1, c, n * 4 + j]
    assert torch.equal(model.unpatchify(t), x)


@pytest.mark.parametrize("name", FAMILIES)
def test_token_protocol_and_token_drop(name):
    model = make(name).eval()
    x = torch.randn(2, 1, 128)
    tokens = model.embed_patches(x)  # (B, N, D)
    full = model.forward_tokens(tokens + model.pos_embed_for(None))
    assert torch.allclose(model.pool(full), model(x), atol=1e-6)
    # a permuted subset with its own positions: outputs are those of the same tokens in patch order,
    # the positions travel with the tokens
    ids = torch.stack([torch.randperm(16)[:6] for _ in range(2)])  # (B, 6)
    sub = torch.gather(tokens, 1, ids[..., None].expand(-1, -1, 64)) + model.pos_embed_for(ids)
    out = model.forward_tokens(sub)
    assert out.shape == (2, model.num_prefix_tokens + 6, 64)
    order = ids.argsort(dim=1)
    sorted_ids = torch.gather(ids, 1, order)
    ref = model.forward_tokens(torch.gather(tokens, 1, sorted_ids[..., None].expand(-1, -1, 64))
                               + model.pos_embed_for(sorted_ids))
    p = model.num_prefix_tokens
    assert torch.allclose(torch.gather(out[:, p:], 1, order[..., None].expand(-1, -1, 64)), ref[:, p:], atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_masked(name):
    model = make(name).eval()
    x = torch.randn(2, 1, 128)
    mask = torch.zeros(2, 16)
    mask[0, [1, 2, 9]] = 1
    mask[1, [15]] = 1
    token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 16, 64)
    noise = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels) * torch.randn(2, 16, 8))
    assert torch.allclose(model.forward_masked(x + noise, mask, token), out, atol=1e-6)  # masked values unseen
    poke = x.clone()
    poke[1, :, 0:8] += torch.randn(1, 8)  # patch 0 of the second sample is visible (a constant would be normed away)
    assert not torch.allclose(model.forward_masked(poke, mask, token)[1], out[1], atol=1e-4)
    out.sum().backward()
    assert token.grad.abs().sum() > 0
    p = model.num_prefix_tokens
    assert torch.allclose(model.forward_masked(x, torch.zeros(2, 16), token), model.forward_features(x)[:, p:], atol=1e-6)


def test_attention_maps():
    model = make("vit_1d").eval()
    tokens = model.forward_features(torch.randn(2, 1, 128))
    probs = model.blocks[0].attn.attention_probs(model.blocks[0].norm1(tokens))
    assert probs.shape == (2, 4, 17, 17) and torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)


def test_simple_positions_are_vit_pytorchs():
    from vit_pytorch.simple_vit_1d import posemb_sincos_1d

    model = make("simple_vit_1d")
    assert torch.allclose(model.pos_embed_for(None)[0], posemb_sincos_1d(torch.zeros(1, 16, 64)), atol=1e-6)
    assert "pos_embed" not in model.state_dict()


@pytest.mark.parametrize("name, heads, dim_head", [
    ("vit_1d", 3, 16), ("vit_1d", 1, 48), ("simple_vit_1d", 3, 16), ("simple_vit_1d", 1, 48),
])
def test_parity_with_vit_pytorch(name, heads, dim_head):
    from vit_pytorch.simple_vit_1d import SimpleViT
    from vit_pytorch.vit_1d import ViT

    torch.manual_seed(0)
    kw = dict(seq_len=64, patch_size=8, num_classes=10, dim=48, depth=2, heads=heads, mlp_dim=96, dim_head=dim_head,
              channels=2)
    vp = (ViT if name == "vit_1d" else SimpleViT)(**kw).eval()
    with torch.no_grad():
        for m in vp.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
    ours = from_vit_pytorch(name, vp.state_dict(), **kw).eval()
    x = torch.randn(3, 2, 64)
    with torch.no_grad():
        assert (ours(x) - vp(x)).abs().max() < 1e-5


@pytest.mark.parametrize("name, kwargs, match", [
    ("vit_1d", dict(seq_len=100), "seq_len=100"),
    ("vit_1d", dict(pool="max"), "pool='max'"),
    ("vit_1d", dict(heads=5), "heads=5"),
    ("simple_vit_1d", dict(pool="cls"), "no option 'pool'"),
    ("vit_1d", dict(image_size=128), "no option 'image_size'"),
])
def test_bad_options_are_refused(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(name, **kwargs)


def test_wrong_input_is_refused():
    with pytest.raises(ValueError, match="C, L"):
        make("vit_1d")(torch.randn(2, 1, 120))


def test_save_load_round_trip(tmp_path):
    model = make("vit_1d").eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 128)
    assert torch.equal(model(x), again(x)) and again.image_size == (128,)


@pytest.mark.parametrize("objective, hparams", [
    ("mae", dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)),
    ("simmim", {}),
    ("mpp", {}),
])
def test_masked_objectives_on_signals(objective, hparams):
    model = make("vit_1d", in_chans=2)
    obj = objectives.create(objective, model, **hparams)
    signals = torch.sin(torch.linspace(0, 12, 128))[None, None] * torch.randn(4, 2, 1) + 0.1 * torch.randn(4, 2, 128)
    out = obj({"views": [signals]})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.patch_embed.proj.weight.grad is not None
    if objective in ("mae", "simmim"):
        recon, mask = obj.reconstruct(signals)
        assert recon.shape == mask.shape == signals.shape
