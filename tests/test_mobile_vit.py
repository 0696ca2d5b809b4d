"""MobileViT: geometry and flags, SimMIM's mask token at the first stage's input, other input
sizes, exact parity with vit-pytorch's MobileViT, the reference configurations, clear errors."""
from __future__ import annotations

import pytest
import torch

import backbones
import objectives
from backbones.convert import REFERENCES, build_vit_pytorch, from_vit_pytorch

EXAMPLE = backbones.example_config("mobile_vit")


def example(**over):
    torch.manual_seed(0)
    return backbones.create("mobile_vit", **{**EXAMPLE, **over})


def randomise_norms(model: torch.nn.Module) -> None:
    """BatchNorm statistics and affine terms away from their identity initialisation, so that a
    parity test would see a misplaced norm."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()


def test_geometry_flags_and_shapes():
    model = example().eval()
    assert len(model.stages) == 2 and model.patch_size == 16 and model.grid_size == (4, 4)
    assert model.embed_dim == 48 and model.mask_token_dim == 16 and model.input_shape == (1, 64, 64)
    assert model.supports_mask_token and model.supports_any_size
    assert not (model.supports_token_drop or model.supports_token_access or model.attention_maps)
    x = torch.randn(2, 1, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 16, 48)
    assert torch.allclose(model(x), feats.mean(1), atol=1e-6)
    assert sum(p.numel() for p in model.parameters()) < 300_000


def test_patchify_round_trip():
    model = example()
    x = torch.randn(2, 1, 64, 64)
    patches = model.patchify(x)
    assert patches.shape == (2, 16, 256)
    assert torch.equal(model.unpatchify(patches), x)


def test_other_sizes_rectangular_unfold_and_their_limit():
    model = example().eval()
    assert model(torch.randn(2, 1, 32, 96)).shape == (2, 48)  # multiples of patch_size * unfold = 32
    with pytest.raises(ValueError, match="H a multiple of 32 and W of 32"):
        model(torch.randn(2, 1, 48, 48))
    rect = example(image_size=(32, 64), unfold_size=(1, 2)).eval()
    assert rect.size_multiple == (16, 32) and rect(torch.randn(2, 1, 32, 64)).shape == (2, 48)


def test_mask_token_replaces_exactly_the_upsampled_stem_positions():
    model = example().eval()
    seen = {}
    model.stages[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    x = torch.randn(2, 1, 64, 64)
    mask = torch.zeros(2, 16)
    mask[0, 6] = 1  # output token (1, 2) of sample 0 -> stride-4 stem positions [4:8, 8:12]
    mask[1, 12] = 1  # token (3, 0) of sample 1 -> [12:16, 0:4]
    token = torch.randn(1, 1, 16)
    model.forward_masked(x, mask, token)
    pix = model.unpatchify(mask[..., None].expand(-1, -1, model.patch_pixels)).bool()
    expect = model.stem(x.masked_fill(pix, 0.0)).clone()  # masked pixels zeroed before the stem
    expect[0, :, 4:8, 8:12] = token.view(16, 1, 1)
    expect[1, :, 12:16, 0:4] = token.view(16, 1, 1)
    assert torch.equal(seen["x"], expect)


def test_masked_pixels_do_not_reach_the_output_and_the_token_is_trained():
    model = example().eval()
    x = torch.randn(2, 1, 64, 64)
    mask = torch.zeros(2, 4, 4)
    mask[:, 0:3, 0:3] = 1  # a 3 x 3 block of tokens: pixels [0:48, 0:48], stem positions [0:12, 0:12]
    mask = mask.flatten(1)
    token = torch.randn(1, 1, 16, requires_grad=True)
    out = model.forward_masked(x, mask, token)
    assert out.shape == (2, 16, 48)
    # stem position i sees pixels 4i - 13 ... 4i + 13, so visible positions reach up to 13 px into the
    # masked block: every masked pixel, those at its border too, may change without changing anything
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
    assert torch.allclose(model.forward_masked(x, none, token), model.forward_features(x), atol=1e-6)
    out.square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_simmim_step_reaches_every_parameter():
    model = example()
    obj = objectives.create("simmim", model)
    obj.train()
    out = obj({"views": [torch.randn(4, 1, 64, 64)]})
    out["loss"].backward()
    missing = [n for n, p in obj.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert torch.isfinite(out["loss"]) and not missing, missing


@pytest.mark.parametrize("expansion", [4, 1])  # 1: vit-pytorch's MV2 without the 1x1 expansion
def test_parity_with_vit_pytorch(expansion):
    from vit_pytorch.mobile_vit import MobileViT as VitPytorchMobileViT

    torch.manual_seed(0)
    kw = dict(image_size=(64, 128), dims=(16, 24, 32), channels=(8, 16, 24, 24, 32, 32, 40, 40, 48, 48, 64),
              num_classes=5, expansion=expansion, depths=(1, 2, 1))
    theirs = VitPytorchMobileViT(**kw).eval()
    randomise_norms(theirs)
    ours = from_vit_pytorch("mobile_vit", theirs, **kw).eval()
    x = torch.randn(2, 3, 64, 128)
    with torch.no_grad():
        assert (theirs(x) - ours(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="does not know"):
        from_vit_pytorch("mobile_vit", {**theirs.state_dict(), "extra.weight": torch.zeros(1)}, **kw)


@pytest.mark.parametrize("size, count", [("small", 1_011_472), ("base", 4_996_720)])
def test_references_have_the_same_parameter_count(size, count):
    ref = next(r for r in REFERENCES if r.family == "mobile_vit" and r.size == size)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        theirs = build_vit_pytorch(ref)
        ours = backbones.create("mobile_vit", **ref.ours)
    head = theirs.to_logits[-1].weight.numel()  # a linear head without bias
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) - head == count


def test_save_load_round_trip(tmp_path):
    model = example().eval()
    backbones.save(model, tmp_path)
    again = backbones.load(tmp_path).eval()
    x = torch.randn(2, 1, 64, 64)
    assert torch.equal(model(x), again(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=48), "multiples of 16 \\* unfold_size = \\[32, 32\\]"),
    (dict(channels=(8, 8, 16, 16, 16, 16, 24, 48)), "has 8 entries; 2 stage\\(s\\) need 5 \\+ 2 \\* 2 = 9"),
    (dict(channels=(8, 8, 16, 16, 16, 20, 24, 24, 48)), "channels\\[4\\]=16 and channels\\[5\\]=20 must be equal"),
    (dict(depths=(1, 1, 1)), "must be equally long"),
    (dict(mlp_ratios=(2.0,)), "one entry per stage"),
    (dict(patch_size=2), "has no option 'patch_size'"),
])
def test_bad_options_are_refused_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        backbones.create("mobile_vit", **{**EXAMPLE, **kwargs})
