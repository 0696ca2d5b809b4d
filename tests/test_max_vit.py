"""MaxViT: geometry and flags, SimMIM's mask token at the first stage's input, other input sizes,
exact parity with vit-pytorch's MaxViT, the reference configurations, clear errors."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch
from backbones.max_vit import relative_position_index

EXAMPLE = backbones.example_config("max_vit")


def example(**over):
    torch.manual_seed(0)
    return backbones.create("max_vit", **{**EXAMPLE, **over})


def randomise_norms(model: torch.nn.Module) -> None:
    """BatchNorm statistics and affine terms away from their identity initialisation, so that a
    parity test would see a misplaced norm."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
        elif isinstance(m, torch.nn.Embedding):  # vit-pytorch's relative-position tables start at N(0, 1) already
            m.weight.data.normal_()


def test_geometry_flags_and_shapes():
    model = example().eval()
    assert model.patch_size == 8 and model.grid_size == (4, 4) and model.num_patches == 16
    assert model.embed_dim == 32 and model.mask_token_dim == 16 and model.input_shape == (1, 32, 32)
    assert model.supports_mask_token and model.supports_any_size
    assert not (model.supports_token_drop or model.supports_token_access or model.attention_maps)
    x = torch.randn(2, 1, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 32)
    assert torch.allclose(model(x), model.pool(feats), atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) < 300_000


def test_patchify_round_trip():
    model = example()
    x = torch.randn(2, 1, 32, 32)
    patches = model.patchify(x)
    assert patches.shape == (2, 16, model.patch_pixels) == (2, 16, 64)
    assert torch.equal(model.unpatchify(patches), x)


def test_other_sizes_and_their_limit():
    model = example().eval()
    assert model(torch.randn(2, 1, 16, 48)).shape == (2, 32)  # multiples of patch_size * window = 16
    with pytest.raises(ValueError, match="multiples of patch_size \\* window_size = 16"):
        model(torch.randn(2, 1, 24, 24))
    with pytest.raises(ValueError, match="\\(B, 1, H, W\\)"):
        model(torch.randn(2, 3, 32, 32))


def test_mask_token_replaces_exactly_the_upsampled_stem_positions():
    model = example().eval()
    seen = {}
    model.stages[0][0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 16)
    mask[0, 5] = 1  # output token (1, 1) of sample 0 -> stem positions [4:8, 4:8]
    mask[1, 15] = 1  # token (3, 3) of sample 1 -> [12:16, 12:16]
    token = torch.randn(1, 1, 16)
    model.forward_masked(x, mask, token)
    pix = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels)).bool()
    expect = model.stem(x.masked_fill(pix, 0.0)).clone()  # masked pixels zeroed before the stem
    expect[0, :, 4:8, 4:8] = token.view(16, 1, 1)
    expect[1, :, 12:16, 12:16] = token.view(16, 1, 1)
    assert torch.equal(seen["x"], expect)


def test_masked_pixels_do_not_reach_the_output_and_the_token_is_trained():
    model = example().eval()
    x = torch.randn(2, 1, 32, 32)
    mask = torch.zeros(2, 4, 4)
    mask[:, 1:3, 1:3] = 1  # a 2 x 2 block of tokens: pixels [8:24, 8:24]
    mask = mask.flatten(1)
    token = torch.randn(1, 1, 16, requires_grad=True)
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 16, 32)
    # every masked pixel, the ones at the block's border too (which the stem's 3x3 kernels of
    # visible positions reach), may change without changing anything
    pix = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels)).bool()
    y = torch.where(pix, x + 5.0 * torch.randn_like(x), x)
    assert torch.allclose(model.forward_masked(y, mask, token), out, atol=1e-6)
    y = torch.where(pix, x.new_full((), 100.0), x)
    assert torch.allclose(model.forward_masked(y, mask, token), out, atol=1e-6)
    # a masked block of one token alone, every other token visible: still nothing leaks
    one = torch.zeros_like(mask)
    one[:, 5] = 1
    pix1 = model.unpatchify(one[..., None].expand(-1, -1, model.patch_pixels)).bool()
    ref = model.forward_masked(x, one, token)
    assert torch.allclose(model.forward_masked(torch.where(pix1, -x * 7, x), one, token), ref, atol=1e-6)
    # the same change without the mask does change the output, and so does a visible pixel
    none = torch.zeros_like(mask)
    assert not torch.allclose(model.forward_masked(y, none, token), model.forward_masked(x, none, token))
    assert not torch.allclose(model.forward_masked(torch.where(pix, x, x + 1), mask, token), out)
    # with no mask: the ordinary tokens through the (per-token) norm
    assert torch.allclose(model.forward_masked(x, none, token), model.norm(model.forward_features(x)), atol=1e-5)
    out.square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_simmim_step_reaches_every_parameter():
    model = example()
    obj = objectives.create("simmim", model)
    obj.train()
    out = obj({"views": [torch.randn(4, 1, 32, 32)]})
    out["loss"].backward()
    missing = [n for n, p in obj.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert torch.isfinite(out["loss"]) and not missing, missing


def test_relative_position_index():
    """Offsets (dy, dx) from key j to query i, row-major, each shifted into [0, 2w-2]."""
    w = 3
    idx = relative_position_index(w)
    for i in range(w * w):
        for j in range(w * w):
            dy, dx = i // w - j // w + w - 1, i % w - j % w + w - 1
            assert idx[i, j] == dy * (2 * w - 1) + dx


@pytest.mark.parametrize("dim_conv_stem", [12, None])
def test_parity_with_vit_pytorch(dim_conv_stem):
    from vit_pytorch.max_vit import MaxViT as VitPytorchMaxViT

    torch.manual_seed(0)
    kw = dict(num_classes=7, dim=16, depth=(2, 1), dim_head=8, dim_conv_stem=dim_conv_stem, window_size=4, channels=2)
    theirs = VitPytorchMaxViT(**kw).eval()
    randomise_norms(theirs)
    ours = from_vit_pytorch("max_vit", theirs, image_size=(64, 32), **kw).eval()
    x = torch.randn(3, 2, 64, 32)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="does not know"):
        from_vit_pytorch("max_vit", {**theirs.state_dict(), "extra.weight": torch.zeros(1)}, **kw)


def test_small_reference_has_the_same_parameter_count():
    ref = next(r for r in REFERENCES if r.family == "max_vit" and r.size == "small")
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        theirs = build_vit_pytorch(ref)
        ours = backbones.create("max_vit", **ref.ours)
    head = theirs.mlp_head[-1]
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) - \
        head.weight.numel() - head.bias.numel() == 35_314_856
    assert {r.size for r in REFERENCES if r.family == "max_vit"} == {"small", "base"}


def test_save_load_round_trip(tmp_path):
    model = example().eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), again(x))


def test_bias_follows_autocast():
    model = example().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 32) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=40), "multiples of 8 \\* 2 = 16"),
    (dict(dim=12, dim_head=8), "dim_head=8 must divide every stage's width \\[12, 24\\]"),
    (dict(depth=()), "depth=\\[\\] must list at least one stage"),
    (dict(size="huge", dim=None, depth=None, dim_conv_stem=None), "size='huge' is not one of tiny, small, base, large"),
    (dict(window=4), "has no option 'window'"),
])
def test_bad_options_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.create("max_vit", **{**EXAMPLE, **kwargs})
