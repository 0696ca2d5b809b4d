"""small_data_vit: shifted patch tokens, locality self-attention, the token protocol on shortened
sequences, SimMIM masking that hides the masked pixels, parity with vit-pytorch."""
from __future__ import annotations

import pytest
import torch
from einops import rearrange

import backbones
import objectives
from backbones.convert import from_vit_pytorch

EXAMPLE = backbones.example_config("small_data_vit")


def make(**over) -> backbones.Backbone:
    torch.manual_seed(0)
    return backbones.create("small_data_vit", **{**EXAMPLE, **over})


def test_example_geometry_and_flags():
    model = make()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert model.input_shape == (1, 28, 28) and model.grid_size == (7, 7) and model.num_prefix_tokens == 1
    assert (model.supports_token_access, model.supports_token_drop, model.supports_mask_token, model.attention_maps,
            model.supports_any_size, model.has_distill_token) == (True, True, True, True, True, False)
    x = torch.randn(2, 1, 28, 28)
    assert model(x).shape == (2, 64) and model.forward_features(x).shape == (2, 50, 64)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 64)  # positions resampled (DINO's local crops)


@pytest.mark.parametrize("directions, moves", [
    ("diagonal", [(-2, -2), (2, -2), (-2, 2), (2, 2)]),
    ("cardinal", [(2, 0), (-2, 0), (0, 2), (0, -2)]),
])
def test_shifted_copies_move_the_content(directions, moves):
    spt = make(patch_size=4, shift=2, shift_directions=directions).patch_embed
    x = torch.zeros(1, 1, 28, 28)
    x[0, 0, 10, 13] = 1.0  # one bright pixel at row 10, column 13
    stack = spt.stack(x)  # (1, 5, 28, 28)
    assert stack.shape == (1, 5, 28, 28) and torch.equal(stack[:, :1], x)
    for k, (dx, dy) in enumerate(moves, start=1):
        assert stack[0, k].sum() == 1 and stack[0, k, 10 + dy, 13 + dx] == 1, (k, dx, dy)


def test_default_shift_is_half_a_patch():
    assert make(patch_size=4).patch_embed.offsets[-1] == (2, 2)
    assert make(image_size=32, patch_size=8).patch_embed.offsets[0] == (-4, -4)


def reference_forward_tokens(model, tokens):
    """Blocks written out with the explicit softmax matrix (attention_probs) instead of SDPA."""
    x = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    for blk in model.blocks:
        h, attn = blk.norm1(x), blk.attn
        probs = attn.attention_probs(h)  # (B, H, n, n)
        v = rearrange(attn.qkv(h), "b n (three h d) -> three b h n d", three=3, h=attn.heads)[2]
        x = x + attn.proj(rearrange(probs @ v, "b h n d -> b n (h d)"))
        x = x + blk.mlp(blk.norm2(x))
    return model.norm(x)


def test_lsa_masks_the_diagonal_on_full_and_shortened_sequences():
    model = make().eval()
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.temperature.fill_(0.3 * i - 1.0)  # a learned temperature away from its start
    x = torch.randn(2, 1, 28, 28)
    probs = model.blocks[0].attn.attention_probs(model.forward_features(x))  # (B, H, 50, 50)
    assert torch.all(probs.diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-6)
    tokens = model.embed_patches(x)
    for ids in (None, torch.tensor([[0, 7, 48, 20, 3], [5, 1, 2, 30, 44]]), torch.tensor([[9], [4]])):
        if ids is None:
            t = tokens + model.pos_embed_for(None)
        else:
            t = torch.gather(tokens, 1, ids[..., None].expand(-1, -1, 64)) + model.pos_embed_for(ids)
        out = model.forward_tokens(t)  # (B, 1+n, D)
        assert out.shape == (2, 1 + t.shape[1], 64)
        assert torch.allclose(out, reference_forward_tokens(model, t), atol=1e-5)


def test_temperature_learns():
    model = make()
    model(torch.randn(2, 1, 28, 28)).square().sum().backward()
    assert all(blk.attn.temperature.grad is not None and blk.attn.temperature.grad != 0 for blk in model.blocks)


def test_forward_masked_hides_the_masked_pixels():
    model = make().eval()
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49)
    mask[0, [0, 8, 24]] = 1
    mask[1, [48, 10]] = 1
    token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 49, 64)
    # nothing of a masked patch gets in, not even through its neighbours' shifted copies
    noise = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels) * torch.randn(2, 49, 16))
    assert torch.allclose(model.forward_masked(x + noise, mask, token), out, atol=1e-6)
    # pixels of an unmasked patch do matter
    poke = x.clone()
    poke[:, :, 4:8, 4:8] += torch.randn(4, 4)  # patch 8 of the second sample is unmasked
    assert not torch.allclose(model.forward_masked(poke, mask, token)[1], out[1], atol=1e-4)
    out.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    # no mask: the patch tokens of forward_features
    assert torch.allclose(model.forward_masked(x, torch.zeros(2, 49), token), model.forward_features(x)[:, 1:], atol=1e-6)


def test_parity_with_vit_pytorch():
    from vit_pytorch.vit_for_small_dataset import ViT

    torch.manual_seed(0)
    kw = dict(image_size=(24, 32), patch_size=4, num_classes=10, dim=48, depth=2, heads=3, mlp_dim=96, dim_head=16,
              channels=3)
    vp = ViT(**kw).eval()
    with torch.no_grad():  # move every LayerNorm and temperature off its initial value
        for m in vp.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.2)
                m.bias.normal_(0.0, 0.2)
        for attn, _ in vp.transformer.layers:
            attn.temperature.add_(torch.randn(()) * 0.3)
    ours = from_vit_pytorch("small_data_vit", vp.state_dict(), **kw).eval()
    x = torch.randn(3, 3, 24, 32)
    with torch.no_grad():
        assert (ours(x) - vp(x)).abs().max() < 1e-5
    head = ours.head.weight.numel() + ours.head.bias.numel()
    assert sum(p.numel() for p in ours.backbone.parameters()) == sum(p.numel() for p in vp.parameters()) - head
    with pytest.raises(ValueError, match="pool='mean'"):
        from_vit_pytorch("small_data_vit", vp.state_dict(), **{**kw, "pool": "mean"})


@pytest.mark.parametrize("kwargs, match", [
    (dict(shift_directions="up"), "shift_directions='up'"),
    (dict(shift=0), "shift=0"),
    (dict(image_size=30), "image_size=30"),
    (dict(heads=5, head_dim=None), "heads=5"),
    (dict(pool="max"), "pool='max'"),
    (dict(window=3), "no option 'window'"),
])
def test_bad_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_wrong_input_size_is_refused():
    with pytest.raises(ValueError, match="multiples of the patch size"):
        make()(torch.randn(1, 1, 30, 30))


def test_save_load_round_trip(tmp_path):
    model = make().eval()
    with torch.no_grad():
        model.blocks[1].attn.temperature.fill_(-0.5)
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("name, hparams", [
    ("mae", dict(decoder_dim=32, decoder_depth=1, decoder_heads=4)),
    ("simmim", {}),
    ("mpp", {}),
])
def test_masked_objectives_train(name, hparams):
    model = make()
    obj = objectives.create(name, model, **hparams)
    out = obj({"views": [torch.randn(4, 1, 28, 28)]})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.patch_embed.proj.weight.grad is not None


@pytest.mark.parametrize("objective", ["mae", "mpp"])
def test_masked_patches_do_not_leak_into_visible_tokens_under_mae_and_mpp(objective):
    """Shifted patch tokens see half a patch of their neighbours: the objectives hide what they mask
    (Backbone.hide_masked) before embedding, so the encoder's output cannot depend on it."""
    import objectives
    from einops import repeat

    bb = backbones.create("small_data_vit", **backbones.example_config("small_data_vit")).eval()
    hp = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2) if objective == "mae" else {}
    obj = objectives.create(objective, bb, **hp).eval()
    x = torch.randn(2, *bb.input_shape)
    (gh, gw), p = bb.grid_size, bb.patch_size

    def encode(imgs):
        torch.manual_seed(0)
        if objective == "mae":
            latent, mask, _ = obj.forward_encoder(imgs)
            return latent, mask
        plan = obj.corruption_plan(imgs.shape[0], bb.num_patches, imgs.device)
        torch.manual_seed(0)
        tokens, _ = obj.forward_encoder(imgs)
        return tokens, (plan["to_mask"] | plan["to_random"]).float()

    with torch.no_grad():
        out, mask = encode(x)
        pixels = repeat(mask, "b (h w) -> b 1 (h p1) (w p2)", h=gh, w=gw, p1=p, p2=p)
        assert 0 < mask.sum() < mask.numel()
        out2, _ = encode(x + 5 * torch.randn_like(x) * pixels)  # every masked pixel changed
        assert torch.allclose(out, out2, atol=1e-5)  # MPP: hidden patches enter as mask tokens or other patches
        # and the same change on visible pixels does reach the output
        out3, _ = encode(x + 5 * torch.randn_like(x) * (1 - pixels))
        assert not torch.allclose(out, out3, atol=1e-3)
