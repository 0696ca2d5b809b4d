"""CrossViT: parity with vit-pytorch, the output token grid, masking that hides masked pixels from
both branches, other input sizes, flags and settings."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones import CapabilityError
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch


def small(**over):
    kw = backbones.example_config("cross_vit")
    kw.update(over)
    return backbones.create("cross_vit", **kw)


@pytest.mark.parametrize("dims", [(32, 48), (40, 40)])  # different widths (projections) and equal (identities)
def test_converted_vit_pytorch_crossvit_gives_the_same_logits(dims):
    from vit_pytorch.cross_vit import CrossViT

    torch.manual_seed(0)
    kw = dict(image_size=32, num_classes=7, sm_dim=dims[0], lg_dim=dims[1], sm_patch_size=4, sm_enc_depth=1,
              sm_enc_heads=2, sm_enc_mlp_dim=40, sm_enc_dim_head=8, lg_patch_size=8, lg_enc_depth=2, lg_enc_heads=3,
              lg_enc_mlp_dim=50, lg_enc_dim_head=16, cross_attn_depth=2, cross_attn_heads=2, cross_attn_dim_head=12,
              depth=2, channels=2)
    ref = CrossViT(**kw).eval()
    with torch.no_grad():  # move every weight off its init (LayerNorms at 1/0 would hide a mix-up)
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = from_vit_pytorch("cross_vit", ref, **kw).eval()
    assert ours.backbone.embed_dim == sum(dims) and ours.num_classes == 7
    x = torch.randn(3, 2, 32, 32)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max() < 1e-5
    # the converted backbone saves and loads like a created one
    assert backbones.build_config(ours.backbone)["name"] == "cross_vit"


def test_converter_refuses_unknown_keys():
    from vit_pytorch.cross_vit import CrossViT

    kw = dict(image_size=32, num_classes=3, sm_dim=16, lg_dim=32, sm_patch_size=4, lg_patch_size=8, depth=1,
              sm_enc_heads=2, lg_enc_heads=2, cross_attn_heads=2, sm_enc_mlp_dim=16, lg_enc_mlp_dim=16)
    state = CrossViT(**kw).state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="extra.weight"):
        from_vit_pytorch("cross_vit", state, **kw)


def test_reference_configs_describe_the_same_network():
    refs = {r.size: r for r in REFERENCES if r.family == "cross_vit"}
    assert set(refs) == {"small", "base"}
    for ref in refs.values():
        with torch.device("meta"):  # counts only: no memory, no init time
            vp = build_vit_pytorch(ref)
            ours = backbones.create("cross_vit", **ref.ours)
        heads = ("sm_mlp_head.1", "lg_mlp_head.1")  # the linear heads (their LayerNorms are our final norms)
        n_vp = sum(p.numel() for n, p in vp.named_parameters() if not n.startswith(heads))
        assert n_vp == sum(p.numel() for p in ours.parameters())
        assert ours.input_shape == ref.input_shape


def test_example_is_small_and_pools_the_two_class_tokens():
    torch.manual_seed(0)
    model = small().eval()
    assert sum(p.numel() for p in model.parameters()) < 300_000
    assert (model.embed_dim, model.patch_size, model.grid_size, model.num_prefix_tokens) == (96, 4, (8, 8), 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)  # (B, 1 + 64, 32 + 64)
        assert tokens.shape == (2, 65, 96)
        assert torch.allclose(model(x), model.pool(tokens), atol=1e-6)
        sm, lg = model.encode(model.sm(x), model.lg(x))
    assert torch.equal(model(x), torch.cat([sm[:, 0], lg[:, 0]], dim=-1))
    # output token (r, c) of the 8 x 8 grid = [small patch (r, c), large patch (r // 2, c // 2)]
    grid = tokens[:, 1:].view(2, 8, 8, 96)
    assert torch.equal(grid[..., :32].reshape(2, 64, 32), sm[:, 1:])
    assert torch.equal(grid[:, 5, 3, 32:], lg[:, 1 + 2 * 4 + 1])
    assert torch.equal(grid[:, 4, 2, 32:], grid[:, 5, 3, 32:])


def test_flags_and_objectives():
    model = small()
    assert not (model.supports_token_access or model.supports_token_drop) and model.supports_mask_token
    assert model.supports_any_size and model.attention_maps and not model.has_distill_token
    assert model.mask_token_dim == model.embed_dim == 96
    for name in ("mae", "mpp"):
        with pytest.raises(CapabilityError):
            objectives.create(name, model)
    obj = objectives.create("supervised", model, num_classes=5)
    out = obj({"views": [torch.randn(4, 1, 32, 32)], "labels": torch.randint(0, 5, (4,))})
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


def test_simmim_trains_all_but_the_prefix_only_parameters():
    """A patch-level loss reaches every parameter but the last stage's cross-attention, which
    only updates the class tokens after the patch tokens are final."""
    torch.manual_seed(0)
    model = small()
    obj = objectives.create("simmim", model)
    obj({"views": [torch.randn(4, 1, 32, 32)]})["loss"].backward()
    no_grad = {id(p) for p in model.parameters() if p.grad is None or not p.grad.abs().sum() > 0}
    assert no_grad == {id(p) for p in model.prefix_only_parameters()} != set()
    assert obj.mask_token.grad.abs().sum() > 0


def test_attention_probs_are_the_small_branch_last_attention():
    torch.manual_seed(0)
    model = small().eval()
    probs = model.attention_probs(torch.randn(2, 1, 32, 32))
    assert probs.shape == (2, 2, 65, 65)  # sm_heads, [class token, 8 x 8 small patches]
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, 65), atol=1e-5)


@pytest.mark.parametrize("lg_patch", [8, 6])  # aligned with the 4-px grid, and straddling it
def test_forward_masked_hides_masked_pixels_from_both_branches(lg_patch):
    torch.manual_seed(0)
    model = small(image_size=24, lg_patch_size=lg_patch).eval()
    gh, gw = model.grid_size  # 6 x 6 small patches
    mask = torch.zeros(2, gh * gw)
    mask[:, [0, 7, 20]] = 1
    token = torch.randn(1, 1, model.mask_token_dim, requires_grad=True)
    x = torch.randn(2, 1, 24, 24)
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, gh * gw, model.embed_dim)
    # whatever the masked pixels hold, the output is the same: no branch sees them
    pixel_mask = mask.view(2, 1, gh, 1, gw, 1).expand(2, 1, gh, 4, gw, 4).reshape(2, 1, 24, 24).bool()
    noisy = torch.where(pixel_mask, torch.randn_like(x) * 5, x)
    assert torch.allclose(model.forward_masked(noisy, mask, token), out, atol=1e-5)
    # ... while a change of an unmasked pixel does show
    y = x.clone()
    y[:, :, 4, 12] += 3.0  # small patch (1, 3), not masked; its large patch holds no masked pixel
    assert not pixel_mask[0, 0, 4, 12]
    assert not torch.allclose(model.forward_masked(y, mask, token), out, atol=1e-4)
    # no mask: the plain forward's patch tokens
    with torch.no_grad():
        assert torch.allclose(model.forward_masked(x, torch.zeros_like(mask), token), model.forward_features(x)[:, 1:],
                              atol=1e-6)
    # both halves of the mask token are used
    out.square().sum().backward()
    assert token.grad[..., : model.sm_dim].abs().sum() > 0 and token.grad[..., model.sm_dim :].abs().sum() > 0


def test_large_patches_overlapping_a_masked_small_patch_are_masked():
    model = small(image_size=24, lg_patch_size=6)  # small 6 x 6 grid of 4 px, large 4 x 4 grid of 6 px
    mask = torch.zeros(1, 36)
    mask[0, 1] = 1  # small patch (0, 1): pixels 4..7 across, which lie in large columns 0 and 1
    assert model.lg_mask(mask).view(4, 4).nonzero().tolist() == [[0, 0], [0, 1]]
    model = small()  # aligned: small (2, 3) lies inside large (1, 1) alone
    mask = torch.zeros(1, 64)
    mask[0, 2 * 8 + 3] = 1
    assert model.lg_mask(mask).view(4, 4).nonzero().tolist() == [[1, 1]]


def test_other_input_sizes():
    torch.manual_seed(0)
    model = small().eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, 16, 16)).shape == (2, 96)  # a multiple of both patch sizes
        t = model.forward_features(torch.randn(2, 1, 20, 20))  # 5 x 5 small patches; the large branch sees 16 px
        assert t.shape == (2, 26, 96) and torch.isfinite(t).all()
    with pytest.raises(ValueError, match="multiples of the patch size 4"):
        model(torch.randn(2, 1, 18, 18))
    with pytest.raises(ValueError, match="does not fit"):
        model(torch.randn(2, 3, 32, 32))


def test_patchify_inverts():
    model = small()
    x = torch.randn(2, 1, 32, 32)
    patches = model.patchify(x)
    assert patches.shape == (2, 64, model.patch_pixels) == (2, 64, 16)
    assert torch.equal(model.unpatchify(patches), x)


def test_save_load_round_trip(tmp_path):
    model = small().eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=36), "image_size=36 is not divisible by lg_patch_size=8"),
    (dict(sm_heads=3), "sm_heads=3 must divide the width 32"),
    (dict(cross_heads=3), "cross_heads=3 must divide"),
    (dict(depth=0), "depth=0 must be an integer >= 1"),
    (dict(cross_depth=-1), "cross_depth=-1"),
    (dict(patch=4), "no option 'patch'"),
])
def test_bad_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        small(**kwargs)
