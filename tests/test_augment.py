"""Augmentation on the device (issue 5): RandAugment per image against PIL (timm's ops work on PIL
images), MixUp / CutMix against plain formulas, grey input, and each objective's views: shapes,
dtype, range before normalisation, per-image parameters, a seed's reproducibility, the device."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import backbones
import objectives
from conftest import tiny_vit_kwargs
from data import augment as A
from data.augment import DeviceAugment, MixParams, MixUp, RandAugment, ViewSpec

LEVEL = 1 / 255


def smooth_images(b=2, c=3, h=24, w=32):
    """uint8 (b, c, h, w) with gradients and every brightness, so each op has something to change."""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    planes = [(torch.sin(xx / (3 + k) + k) + torch.cos(yy / (4 + k)) + 2) / 4 for k in range(b * c)]
    return (torch.stack(planes).view(b, c, h, w) * 255).round().to(torch.uint8)


def to_pil(img: torch.Tensor) -> Image.Image:
    arr = img.permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0], "L") if img.shape[0] == 1 else Image.fromarray(arr, "RGB")


def from_pil(img: Image.Image) -> torch.Tensor:
    arr = torch.from_numpy(np.array(img)).float() / 255
    return arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)


def run_op(name, x_u8, level, sign=1.0):
    x = x_u8.float() / 255
    n = x.shape[0]
    return A.PIXEL_OPS[name](x, torch.full((n,), float(level)), torch.full((n,), float(sign)))


# --------------------------------------------------------------------------- RandAugment ops vs PIL (timm)


def timm_solarize_add(img, add):
    return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * len(img.getbands()))


# name -> (PIL reference given level and sign, tolerance in levels); timm's "inc1" level maps
PIL_REFERENCE = {
    "equalize": (lambda im, lv, s: ImageOps.equalize(im), 0),
    "invert": (lambda im, lv, s: ImageOps.invert(im), 0),
    "posterize": (lambda im, lv, s: ImageOps.posterize(im, max(1, 4 - int(lv / 10 * 4))), 0),
    "solarize": (lambda im, lv, s: ImageOps.solarize(im, 256 - min(256, int(lv / 10 * 256))), 0),
    "solarize_add": (lambda im, lv, s: timm_solarize_add(im, min(128, int(lv / 10 * 110))), 0),
    "auto_contrast": (lambda im, lv, s: ImageOps.autocontrast(im), 1),  # PIL truncates its table
    # PIL blends in uint8 (truncating) from a rounded degenerate image
    "color": (lambda im, lv, s: ImageEnhance.Color(im).enhance(1 + s * 0.9 * lv / 10), 2),
    "contrast": (lambda im, lv, s: ImageEnhance.Contrast(im).enhance(1 + s * 0.9 * lv / 10), 2),
    "brightness": (lambda im, lv, s: ImageEnhance.Brightness(im).enhance(1 + s * 0.9 * lv / 10), 1),
    "sharpness": (lambda im, lv, s: ImageEnhance.Sharpness(im).enhance(1 + s * 0.9 * lv / 10), 2),
}


@pytest.mark.parametrize("name", sorted(PIL_REFERENCE))
@pytest.mark.parametrize("level, sign", [(3.0, 1.0), (9.0, -1.0), (10.0, 1.0)])
def test_pixel_ops_match_timm_on_pil(name, level, sign):
    x = smooth_images(b=2, c=3)
    x[1, :, :4] = 7  # a flat stripe
    ours = run_op(name, x, level, sign)
    reference, tol = PIL_REFERENCE[name]
    want = torch.stack([from_pil(reference(to_pil(img), level, sign)) for img in x])
    assert ours.shape == want.shape and ours.dtype == torch.float32
    assert (ours - want).abs().max() <= (tol + 0.01) * LEVEL, (ours - want).abs().max() * 255


@pytest.mark.parametrize("name", ["equalize", "posterize", "auto_contrast", "contrast", "sharpness"])
def test_pixel_ops_on_grey_images_match_pil_mode_L(name):
    x = smooth_images(b=2, c=1)
    reference, tol = PIL_REFERENCE[name]
    want = torch.stack([from_pil(reference(to_pil(img), 6.0, 1.0)) for img in x])
    assert (run_op(name, x, 6.0) - want).abs().max() <= (tol + 0.01) * LEVEL


def pil_geometric(img, name, value, fill):
    if name == "rotate":
        return img.rotate(value, resample=Image.BILINEAR, fillcolor=fill)
    w, h = img.size
    matrix = {"shear_x": (1, value, 0, 0, 1, 0), "shear_y": (1, 0, 0, value, 1, 0),
              "translate_x": (1, 0, value * w, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, value * h)}[name]
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=fill)


@pytest.mark.parametrize("name, scale", [("rotate", 30.0), ("shear_x", 0.3), ("shear_y", 0.3), ("translate_x", 0.45),
                                         ("translate_y", 0.45)])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_geometric_ops_match_timm_on_pil(name, scale, sign):
    """Rotation about the centre, shears about the top-left corner, translation in image fractions,
    on a non-square image: equal to PIL within its uint8 rounding wherever the image covers the
    output; uncovered pixels take the fill."""
    x = smooth_images(b=1, c=1, h=24, w=32)
    theta = A.geometric_theta(torch.tensor([A.GEOMETRIC_OPS.index(name)]), torch.tensor([7.0]), torch.tensor([sign]), 24, 32)
    fill = torch.full((1, 1, 1, 1), 128 / 255)
    ours = A.warp(x.float() / 255, theta, fill)[0]
    covered = A.warp(torch.ones(1, 1, 24, 32), theta, torch.zeros(1, 1, 1, 1))[0]
    want = from_pil(pil_geometric(to_pil(x[0]), name, sign * 0.7 * scale, 128))
    inside, outside = covered > 0.999, covered < 0.001
    assert inside.float().mean() > 0.5 and outside.any()
    assert (ours - want)[inside].abs().max() <= 1.01 * LEVEL
    assert torch.allclose(ours[outside], torch.tensor(128 / 255))


# --------------------------------------------------------------------------- RandAugment, per image


def test_kornia_randaugment_picks_its_ops_once_per_batch():
    """Why RandAugment is ours: Kornia 0.9's draws one set of ops for the whole batch."""
    from kornia.augmentation.auto import RandAugment as KorniaRandAugment

    torch.manual_seed(0)
    k = KorniaRandAugment(n=2, m=10)
    names = [[name for name, _ in k.get_forward_sequence()] for _ in range(3)]
    assert all(len(n) == 2 for n in names)  # one list of op names per call, none per image
    params = k.forward_parameters(torch.Size((8, 3, 16, 16)))
    assert len(params) == 2  # two ops for all 8 images


def test_each_image_draws_its_own_ops_levels_and_signs():
    ra = RandAugment(2, magnitude=9, magnitude_std=0.5, p=0.5)
    torch.manual_seed(0)
    params = ra.sample(4000, torch.device("cpu"))
    op, level, sign = params["op"], params["level"], params["sign"]
    assert op.shape == level.shape == sign.shape == (2, 4000)
    skipped = op == len(ra.ops)
    assert abs(skipped.float().mean().item() - 0.5) < 0.03  # p = 0.5, as timm
    counts = torch.bincount(op[~skipped], minlength=len(ra.ops)).float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()  # uniform over 15 ops
    assert level.min() >= 0 and level.max() <= 10 and abs(level.mean().item() - 9.0) < 0.05
    assert 0.4 < level.std().item() < 0.5  # N(9, 0.5) clipped at 10
    assert set(sign.unique().tolist()) == {-1.0, 1.0}


def test_randaugment_output_range_dtype_device_and_per_image_difference():
    twins = smooth_images(b=1, c=3).repeat(16, 1, 1, 1).float() / 255
    ra = RandAugment(2, p=1.0)
    torch.manual_seed(1)
    out = ra(twins)
    assert out.shape == twins.shape and out.dtype == torch.float32 and out.device == twins.device
    assert out.min() >= 0 and out.max() <= 1
    distinct = {tuple(o.flatten()[:64].tolist()) for o in out}
    assert len(distinct) > 8  # images of one picture come out differently
    assert torch.equal(twins, smooth_images(b=1, c=3).repeat(16, 1, 1, 1).float() / 255)  # input untouched
    torch.manual_seed(1)
    assert torch.equal(ra(twins), out)


def test_randaugment_applies_each_drawn_op_to_exactly_its_images():
    """Given drawn parameters, image i's result is its op alone on image i (the batching is exact)."""
    ra = RandAugment(1, p=1.0, fill=(0.25,))
    x = (smooth_images(b=len(ra.ops) + 1, c=3) * 0.6 + 50).round().float() / 255  # a narrow range: autocontrast acts
    op = torch.tensor([list(range(len(ra.ops))) + [len(ra.ops)]])  # each op once; the last image skips
    level, sign = torch.full((1, x.shape[0]), 8.0), torch.ones(1, x.shape[0])
    out = ra(x, {"op": op, "level": level, "sign": sign})
    for i, name in enumerate(ra.ops):
        one = x[i:i + 1]
        if name in A.GEOMETRIC_OPS:
            theta = A.geometric_theta(torch.tensor([A.GEOMETRIC_OPS.index(name)]), level[0, :1], sign[0, :1], *x.shape[2:])
            want = A.warp(one, theta, torch.full((1, 1, 1, 1), 0.25))
        else:
            want = A.PIXEL_OPS[name](one, level[0, :1], sign[0, :1])
        assert torch.allclose(out[i:i + 1], want, atol=1e-6), name
        assert not torch.allclose(out[i], x[i], atol=1e-3), f"{name} at level 8 changes the image"
    assert torch.equal(out[-1], x[-1])


def test_grey_images_never_draw_colour_ops():
    assert "color" in RandAugment(2).ops
    grey = RandAugment(2, channels=1)
    assert "color" not in grey.ops and len(grey.ops) == len(A.RANDAUGMENT_OPS) - 1
    x = smooth_images(b=8, c=1).float() / 255
    torch.manual_seed(0)
    out = grey(x)
    assert out.shape == x.shape and 0 <= out.min() and out.max() <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(randaugment_ops=-1), "ViewSpec randaugment_ops=-1"),
    (dict(randaugment_magnitude=12), "ViewSpec randaugment_magnitude=12"),
    (dict(randaugment_p=1.5), "ViewSpec randaugment_p=1.5"),
])
def test_bad_randaugment_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewSpec(8, **kwargs)


def test_unknown_randaugment_op_is_named():
    with pytest.raises(ValueError, match="'cutout'.*choose among"):
        RandAugment(2, ops=["rotate", "cutout"])


# --------------------------------------------------------------------------- MixUp / CutMix


def smoothed(label, k, smoothing):
    return [1 - smoothing + smoothing / k if j == label else smoothing / k for j in range(k)]


def plain_mix(images, labels, lam, box, k, smoothing):
    """Image i with image B-1-i, pixel by pixel; the targets mixed by the same lambda."""
    B, C, H, W = images.shape
    out = torch.empty_like(images)
    targets = torch.empty(B, k)
    for i in range(B):
        j = B - 1 - i
        for y in range(H):
            for x in range(W):
                if box is None:
                    out[i, :, y, x] = lam * images[i, :, y, x] + (1 - lam) * images[j, :, y, x]
                else:
                    y0, y1, x0, x1 = box
                    out[i, :, y, x] = images[j, :, y, x] if (y0 <= y < y1 and x0 <= x < x1) else images[i, :, y, x]
        own, other = smoothed(int(labels[i]), k, smoothing), smoothed(int(labels[j]), k, smoothing)
        targets[i] = torch.tensor([lam * a + (1 - lam) * b for a, b in zip(own, other)])
    return out, targets


@pytest.mark.parametrize("params", [MixParams(0.7), MixParams(1 - 12 / 48, (1, 4, 2, 6))])
def test_mix_matches_the_plain_formula(params):
    torch.manual_seed(0)
    images, labels = torch.randn(5, 2, 6, 8), torch.tensor([0, 3, 3, 1, 2])
    mix = MixUp(4, label_smoothing=0.1)
    got, targets = mix.apply(images, labels, params)
    want, want_targets = plain_mix(images, labels, params.lam, params.box, 4, 0.1)
    assert torch.allclose(got, want, atol=1e-6) and torch.allclose(targets, want_targets, atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert not torch.equal(images, got)


@pytest.mark.parametrize("lam, cy, cx", [(0.75, 10, 12), (0.3, 0, 31), (0.99, 5, 5), (0.0, 8, 8)])
def test_cutmix_box_and_area_corrected_lambda(lam, cy, cx):
    H, W = 20, 32
    p = A.cutmix_box(lam, H, W, cy, cx)
    ch, cw = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
    y0, y1 = min(max(cy - ch // 2, 0), H), min(max(cy + ch // 2, 0), H)
    x0, x1 = min(max(cx - cw // 2, 0), W), min(max(cx + cw // 2, 0), W)
    assert p.box == (y0, y1, x0, x1)
    assert p.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (H * W))


def test_mix_draws_as_configured_and_a_seed_reproduces_it():
    mix = MixUp(3, mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.8, switch_prob=0.25)
    torch.manual_seed(0)
    draws = [mix.sample(16, 16) for _ in range(2000)]
    unmixed = [d for d in draws if d.lam == 1.0 and d.box is None]
    cut = [d for d in draws if d.box is not None]
    assert abs(len(unmixed) / 2000 - 0.2) < 0.03
    assert abs(len(cut) / (2000 - len(unmixed)) - 0.25) < 0.04
    lams = torch.tensor([d.lam for d in draws if d.box is None and d.lam < 1.0])
    assert abs(lams.mean().item() - 0.5) < 0.03 and abs(lams.var().item() - 1 / (4 * 2.6)) < 0.015  # Beta(0.8, 0.8)
    torch.manual_seed(0)
    assert [mix.sample(16, 16) for _ in range(50)] == draws[:50]
    only_cut = MixUp(3, mixup_alpha=0.0, cutmix_alpha=1.0)
    assert all(only_cut.sample(16, 16).box is not None for _ in range(20))


def test_mix_keeps_device_and_dtype_and_off_means_smoothed_labels():
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
    out, targets = MixUp(3, prob=0.0, label_smoothing=0.3)(images, labels)
    assert torch.equal(out, images)
    assert torch.allclose(targets, torch.tensor([smoothed(int(y), 3, 0.3) for y in labels]))
    torch.manual_seed(4)
    out, targets = MixUp(3)(images, labels)
    assert out.dtype == torch.float32 and out.device == images.device and targets.shape == (4, 3)


@pytest.mark.parametrize("kwargs, match", [(dict(mixup_alpha=0.0, cutmix_alpha=0.0), "nothing to mix"),
                                           (dict(mixup_alpha=-1.0), "mixup_alpha=-1.0"),
                                           (dict(prob=2.0), "mix_prob=2.0"),
                                           (dict(num_classes=1), "num_classes=1")])
def test_bad_mix_settings_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixUp(**{"num_classes": 5, **kwargs})


# --------------------------------------------------------------------------- grey input


def test_a_grey_batch_feeds_a_colour_backbone_with_allow_grey():
    spec = ViewSpec(12, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=1.0, grayscale_p=1.0, randaugment_ops=2)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1]
    aug = DeviceAugment([spec], mean, std, allow_grey=True)
    grey_steps = [type(m) for m in aug.grey_pipelines[0]]
    assert A.RepeatChannels in grey_steps and grey_steps.index(A.RepeatChannels) == len(grey_steps) - 2
    import kornia.augmentation as K
    assert not any(isinstance(m, K.RandomGrayscale) for m in aug.grey_pipelines[0])
    (ra,) = [m for m in aug.grey_pipelines[0] if isinstance(m, RandAugment)]
    assert "color" not in ra.ops
    torch.manual_seed(0)
    (view,) = aug(smooth_images(b=4, c=1, h=16, w=16))
    assert view.shape == (4, 3, 12, 12)
    pixels = view * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert torch.allclose(pixels[:, 0], pixels[:, 1], atol=1e-5) and torch.allclose(pixels[:, 1], pixels[:, 2], atol=1e-5)
    (colour,) = aug(smooth_images(b=4, c=3, h=16, w=16))  # colour input takes the colour pipeline
    assert colour.shape == (4, 3, 12, 12)
    with pytest.raises(ValueError, match="allow_grey=True"):
        DeviceAugment([spec], mean, std)(smooth_images(b=2, c=1))


# --------------------------------------------------------------------------- each objective's views


def tiny(**over):
    torch.manual_seed(0)
    return backbones.create("vit", **tiny_vit_kwargs(**over))


def objective_views(kind):
    if kind == "mae":
        return objectives.create("mae", tiny(), decoder_dim=16, decoder_depth=1, decoder_heads=2).views
    if kind == "simmim":
        return objectives.create("simmim", tiny()).views
    if kind == "dino":
        return objectives.create("dino", tiny(patch_size=4), out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8,
                                 num_local=2, local_size=12).views
    return objectives.create("distill", tiny(), num_classes=3, kind="none", randaugment_ops=2).views


@pytest.mark.parametrize("kind, sizes", [("mae", [28]), ("simmim", [28]), ("dino", [28, 28, 12, 12]),
                                         ("distill", [28])])
def test_views_of_each_objective(kind, sizes):
    """mean 0 / std 1: the output is the pixels before normalisation, in [0, 1]."""
    views = objective_views(kind)
    aug = DeviceAugment(views, [0.0], [1.0])
    twins = smooth_images(b=1, c=1, h=32, w=32).repeat(6, 1, 1, 1)
    torch.manual_seed(7)
    out = aug(twins)
    assert [tuple(v.shape) for v in out] == [(6, 1, s, s) for s in sizes]
    for v in out:
        assert v.dtype == torch.float32 and v.device == twins.device
        assert v.min() >= 0 and v.max() <= 1
        assert len({tuple(img.flatten().tolist()) for img in v}) > 1  # each image its own parameters
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(out, aug(twins)))


def test_dino_defaults_are_the_issues_numbers():
    g1, g2, loc = objective_views("dino")
    jitter = ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2)
    for v in (g1, g2, loc):
        assert (v.color_jitter, v.color_jitter_p, v.grayscale_p) == jitter and v.hflip == 0.5
    assert (g1.scale, g1.blur_p, g1.solarize_p) == ((0.4, 1.0), 1.0, 0.0)
    assert (g2.scale, g2.blur_p, g2.solarize_p) == ((0.4, 1.0), 0.1, 0.2)
    assert (loc.scale, loc.blur_p, loc.solarize_p, loc.count) == ((0.05, 0.4), 0.5, 0.0, 2)
    assert g1.randaugment_ops == 0


def test_classifier_views_take_randaugment_only_when_asked():
    sup = objectives.create("supervised", tiny(), num_classes=3)
    (view,) = sup.views
    assert view == ViewSpec(28, scale=(0.08, 1.0), hflip=0.5) and sup.mix is None
    deit = objectives.create("supervised", tiny(), num_classes=3, randaugment_ops=2, randaugment_magnitude=9,
                             mixup_alpha=0.8, cutmix_alpha=1.0)
    (view,) = deit.views
    assert (view.randaugment_ops, view.randaugment_magnitude, view.randaugment_mstd) == (2, 9, 0.5)
    assert isinstance(deit.mix, MixUp) and (deit.mix.mixup_alpha, deit.mix.cutmix_alpha) == (0.8, 1.0)
    assert any(isinstance(m, RandAugment) for m in DeviceAugment(deit.views, [0.5], [0.5]).pipelines[0])


# --------------------------------------------------------------------------- the batched crop


@pytest.mark.parametrize("h, w, size, scale, hflip", [(24, 24, 16, (0.3, 0.9), 0.5), (32, 20, 12, (0.05, 0.4), 0.5),
                                                      (28, 28, 28, (0.08, 1.0), 1.0), (9, 9, 1, (0.5, 1.0), 0.0)])
def test_resized_crop_flip_is_kornias_crop_and_flip_in_one_sample(h, w, size, scale, hflip):
    """The same random numbers as Kornia's RandomResizedCrop + RandomHorizontalFlip (the RNG ends
    in the same state) and the same pixels up to float rounding."""
    import kornia.augmentation as K
    from torch import nn

    x = torch.rand(32, 3, h, w)
    steps = [K.RandomResizedCrop((size, size), scale=scale, p=1.0)] + ([K.RandomHorizontalFlip(p=hflip)] if hflip else [])
    torch.manual_seed(2)
    want, state = nn.Sequential(*steps)(x), torch.get_rng_state()
    torch.manual_seed(2)
    got = A.ResizedCropFlip(size, scale, (3 / 4, 4 / 3), hflip)(x)
    assert torch.equal(torch.get_rng_state(), state)
    assert got.shape == (32, 3, size, size) and torch.allclose(got, want, atol=1e-5)


def test_a_whole_image_crop_is_the_image_exactly():
    x = torch.rand(6, 1, 10, 10)
    plain = A.ResizedCropFlip(10, (1.0, 1.0), (1.0, 1.0), 0.0)
    assert torch.equal(plain(x), x)
    assert torch.equal(A.ResizedCropFlip(10, (1.0, 1.0), (1.0, 1.0), 1.0)(x), x.flip(-1))
