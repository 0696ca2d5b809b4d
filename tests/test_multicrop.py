"""Multi-crop and the photometric steps of the device augmentation (DINO's views)."""
from __future__ import annotations

import kornia.augmentation as K
import pytest
import torch
from torch import nn

import backbones
import objectives
from conftest import tiny_vit_kwargs
from data.augment import DeviceAugment, ViewSpec

JITTER = dict(color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2)


def dino_specs(num_local=3, local=12):
    return [ViewSpec(28, scale=(0.4, 1.0), blur_p=1.0, **JITTER),
            ViewSpec(28, scale=(0.4, 1.0), blur_p=0.1, solarize_p=0.2, **JITTER),
            ViewSpec(local, scale=(0.05, 0.4), blur_p=0.5, count=num_local, **JITTER)]


def images(b=6, c=1, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=g)


def test_an_old_style_spec_gives_the_same_views_as_before():
    spec = ViewSpec(16, scale=(0.3, 0.9))
    assert (spec.color_jitter_p, spec.grayscale_p, spec.blur_p, spec.solarize_p) == (0, 0, 0, 0)
    mean, std = [0.2, 0.4, 0.6], [0.5, 0.25, 0.1]
    before = nn.Sequential(  # DeviceAugment's pipeline before the photometric steps existed
        K.RandomResizedCrop((16, 16), scale=(0.3, 0.9), ratio=(3 / 4, 4 / 3), p=1.0),
        K.RandomHorizontalFlip(p=0.5),
        K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)),
    )
    x = images(c=3, size=24)
    torch.manual_seed(5)
    (now,) = DeviceAugment([spec], mean, std)(x)
    torch.manual_seed(5)
    # the same random numbers; the crop is now one grid_sample (ResizedCropFlip): float rounding apart
    assert torch.allclose(now, before(x.float() / 255), atol=1e-4)  # std 0.1 magnifies it


@pytest.mark.parametrize("channels", [1, 3])
def test_dino_views_number_sizes_and_dtypes(channels):
    stats = [0.5] * channels
    views = DeviceAugment(dino_specs(num_local=3), stats, stats)(images(c=channels))
    assert [tuple(v.shape) for v in views] == [(6, channels, 28, 28)] * 2 + [(6, channels, 12, 12)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)


def test_dino_objective_declares_two_global_views_and_its_local_ones():
    bb = backbones.create("vit", **tiny_vit_kwargs())
    for n in (0, 4):
        dino = objectives.create("dino", bb, out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, num_local=n)
        specs = dino.views
        g1, g2 = specs[:2]
        assert (g1.size, g1.count, g1.scale, g1.blur_p, g1.solarize_p) == (28, 1, (0.4, 1.0), 1.0, 0.0)
        assert (g2.size, g2.count, g2.scale, g2.blur_p, g2.solarize_p) == (28, 1, (0.4, 1.0), 0.1, 0.2)
        assert g1.color_jitter == (0.4, 0.4, 0.2, 0.1) and g1.color_jitter_p == 0.8 and g1.grayscale_p == 0.2
        if n:
            (loc,) = specs[2:]
            assert (loc.count, loc.scale, loc.blur_p, loc.solarize_p) == (4, (0.05, 0.4), 0.5, 0.0)
        else:
            assert len(specs) == 2
        out = DeviceAugment(specs, [0.5], [0.5])(images())
        assert len(out) == 2 + n


def test_each_image_draws_its_own_parameters_and_a_seed_reproduces_them():
    augment = DeviceAugment(dino_specs(num_local=2), [0.5, 0.5, 0.5], [0.2, 0.2, 0.2])
    twins = images(b=1, c=3).repeat(4, 1, 1, 1)
    for view in augment(twins):
        assert not all(torch.equal(view[0], view[i]) for i in range(1, 4))
    torch.manual_seed(3)
    first = augment(twins)
    torch.manual_seed(3)
    assert all(torch.equal(a, b) for a, b in zip(first, augment(twins)))


def test_grey_input_skips_the_colour_only_steps():
    augment = DeviceAugment(dino_specs(), [0.5], [0.5])
    for pipeline in augment.pipelines:
        assert not any(isinstance(m, K.RandomGrayscale) for m in pipeline)
        (jitter,) = [m for m in pipeline if isinstance(m, K.ColorJitter)]
        assert "saturation=0.0, hue=0.0" in repr(jitter) and "brightness=0.4, contrast=0.4" in repr(jitter)
    colour = DeviceAugment(dino_specs(), [0.5] * 3, [0.5] * 3)
    assert any(isinstance(m, K.RandomGrayscale) for m in colour.pipelines[0])  # (a batched subclass of it)


def plain(size, **kw):
    """A view with no geometric randomness: the whole image, no flip."""
    return ViewSpec(size, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, **kw)


def test_solarize_inverts_bright_pixels_when_p_is_one():
    x = torch.full((3, 1, 8, 8), 200, dtype=torch.uint8)
    x[:, :, :4] = 50  # top half dark, bottom half bright
    (out,) = DeviceAugment([plain(8, solarize_p=1.0)], [0.0], [1.0])(x)
    assert torch.allclose(out[:, :, :4], torch.full_like(out[:, :, :4], 50 / 255), atol=1e-6)
    assert torch.allclose(out[:, :, 4:], torch.full_like(out[:, :, 4:], 1 - 200 / 255), atol=1e-6)


def test_blur_changes_pixels_when_p_is_one_and_keeps_flat_images():
    edge = torch.zeros((3, 1, 16, 16), dtype=torch.uint8)
    edge[..., 8:] = 255
    (sharp,) = DeviceAugment([plain(16)], [0.0], [1.0])(edge)
    (blurred,) = DeviceAugment([plain(16, blur_p=1.0, blur_sigma=(1.0, 2.0))], [0.0], [1.0])(edge)
    assert torch.equal(sharp, edge.float() / 255)
    assert not torch.allclose(blurred, sharp, atol=0.05)
    assert torch.allclose(blurred.mean(), sharp.mean(), atol=0.02)  # a blur moves no mass across the edge
    flat = torch.full((2, 1, 16, 16), 90, dtype=torch.uint8)
    (same,) = DeviceAugment([plain(16, blur_p=1.0)], [0.0], [1.0])(flat)
    assert torch.allclose(same, flat.float() / 255, atol=1e-5)


def test_jitter_and_greyscale_act_when_p_is_one():
    x = images(b=4, c=3, size=8)
    (grey,) = DeviceAugment([plain(8, grayscale_p=1.0)], [0.0] * 3, [1.0] * 3)(x)
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    (bright,) = DeviceAugment([plain(8, color_jitter=(0.8, 0, 0, 0), color_jitter_p=1.0)], [0.0], [1.0])(x[:, :1])
    assert not torch.allclose(bright, x[:, :1].float() / 255)


@pytest.mark.parametrize("field, value", [("blur_p", 1.5), ("solarize_p", -0.1), ("color_jitter", (0.4, 0.4)),
                                          ("blur_sigma", (0.0, 1.0)), ("grayscale_p", 2.0)])
def test_bad_photometric_settings_are_named(field, value):
    with pytest.raises(ValueError, match=f"ViewSpec {field}="):
        ViewSpec(8, **{field: value})
