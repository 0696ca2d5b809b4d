"""The batched photometric steps (data/augment.py) against the Kornia augmentations they stand for:
same random numbers drawn, same images selected by p, same pixels to float rounding."""
from __future__ import annotations

import math

import kornia
import kornia.augmentation as K
import pytest
import torch
from torch import nn

from data import augment as A
from data.augment import (BatchedColorJitter, BatchedGaussianBlur, BatchedGrayscale, BatchedSolarize, DeviceAugment,
                          ResizedCropFlip, ViewSpec, photometric_steps)

TOL = 1e-5


def colour_images(b=8, c=3, h=10, w=10, seed=0) -> torch.Tensor:
    """Random pixels in [0, 1] with the awkward ones planted: grey (r = g = b), black, white, ties
    for the largest channel, pure primaries and secondaries, values exactly 0.5."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    x[:, :, 0, 0] = 0.0
    x[:, :, 0, 1] = 1.0
    x[:, :, 0, 2] = 0.5
    x[:, :, 0, 3] = x[:, :1, 0, 3]  # grey
    if c == 3:
        specials = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1],
                                 [0.7, 0.7, 0.2], [0.2, 0.7, 0.7], [0.7, 0.2, 0.7]], dtype=x.dtype)
        x[:, :, 1, :len(specials)] = specials.T
    return x


def drawn_alike(ours: nn.Module, theirs: nn.Module, x: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Both modules on x from the same seed; asserts they consumed the same random numbers."""
    before = x.clone()
    torch.manual_seed(seed)
    a = ours(x)
    after_ours = torch.get_rng_state()
    assert torch.equal(x, before), "the input was changed"
    torch.manual_seed(seed)
    b = theirs(x)
    assert torch.equal(after_ours, torch.get_rng_state()), "the RNG was used differently"
    return a, b


def assert_close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype
    err = (a - b).abs().max().item()
    assert err <= tol, f"max abs difference {err:.2e} > {tol:.0e}"


# --------------------------------------------------------------------------- the pixel ops


def test_hue_shift_matches_kornia_over_the_whole_circle():
    x = colour_images(b=9)
    turns = torch.tensor([-0.5, -0.37, -0.1, -1e-7, 0.0, 1e-7, 0.166, 0.33, 0.5])
    work = x.clone()
    out = A.shift_hue(work, turns)
    assert out.data_ptr() == work.data_ptr()  # in place
    assert_close(out, kornia.enhance.adjust_hue(x, turns * 2 * math.pi))
    assert torch.allclose(out[4], x[4], atol=TOL)  # no turn, no change
    # a half turn sends each primary to its complement (red -> cyan) and keeps grey pixels grey
    half = A.shift_hue(x.clone(), torch.full((9,), 0.5))
    assert torch.allclose(half[:, :, 1, 0], torch.tensor([0.0, 1.0, 1.0]).expand(9, 3), atol=TOL)
    assert torch.allclose(half[:, :, 0, 3], x[:, :, 0, 3], atol=TOL)


@pytest.mark.parametrize("step, kornia_step", [
    (A.adjust_brightness, kornia.enhance.adjust_brightness_accumulative),
    (A.adjust_contrast, kornia.enhance.adjust_contrast_with_mean_subtraction),
    (A.adjust_saturation, kornia.enhance.adjust_saturation_with_gray_subtraction),
])
@pytest.mark.parametrize("channels", [1, 3])
def test_blends_match_kornia(step, kornia_step, channels):
    x = colour_images(b=5, c=channels)
    factors = torch.tensor([0.0, 0.6, 1.0, 1.4, 2.5])
    assert_close(step(x.clone(), factors), kornia_step(x, factors))


def test_kernels_and_blur_match_kornia_on_a_non_square_image():
    x = colour_images(b=4, h=9, w=12)
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    kernels = A.gaussian_kernels(sigma, 7)
    assert torch.allclose(kernels.sum(-1), torch.ones(4)) and torch.equal(kernels, kernels.flip(-1))
    expected = kornia.filters.gaussian_blur2d(x, (7, 7), sigma[:, None].expand(-1, 2), border_type="reflect")
    assert_close(A.gaussian_blur(x, kernels), expected)
    work = x.clone()
    assert A.gaussian_blur(work, kernels, out=work) is work  # into its own input
    assert_close(work, expected)


# --------------------------------------------------------------------------- each module against Kornia's


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("strengths", [(0.4, 0, 0, 0), (0, 0.4, 0, 0), (0, 0, 0.6, 0), (0, 0, 0, 0.3),
                                       (0.4, 0.4, 0.2, 0.1)])
def test_colour_jitter_draws_selects_and_paints_like_kornia(strengths, p):
    x = colour_images(b=12)
    ours, theirs = BatchedColorJitter(*strengths, p=p), K.ColorJitter(*strengths, p=p)
    assert isinstance(ours, K.ColorJitter)
    for seed in range(3):
        a, b = drawn_alike(ours, theirs, x, seed)
        assert_close(a, b)
        chosen = ours._params["batch_prob"] > 0.5
        assert torch.equal(chosen, theirs._params["batch_prob"] > 0.5)
        assert torch.equal(a[~chosen], x[~chosen])  # the images p left alone are untouched, bit for bit
        if p == 1.0 or chosen.any():
            assert not torch.allclose(a[chosen], x[chosen], atol=1e-3)  # the others did change
        assert a is not x


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_grey_images_jitter_brightness_and_contrast_like_kornia(p):
    x = colour_images(b=10, c=1)
    for seed in range(3):
        a, b = drawn_alike(BatchedColorJitter(0.4, 0.4, 0.0, 0.0, p=p), K.ColorJitter(0.4, 0.4, 0.0, 0.0, p=p), x, seed)
        assert_close(a, b)
    # saturation leaves a grey image alone, as Kornia's; hue has no meaning there and says so
    a, b = drawn_alike(BatchedColorJitter(0.0, 0.0, 0.5, 0.0), K.ColorJitter(0.0, 0.0, 0.5, 0.0), x)
    assert_close(a, b)
    with pytest.raises(ValueError, match="hue needs RGB"):
        BatchedColorJitter(0.0, 0.0, 0.0, 0.2)(x)


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("channels, size, kernel", [(3, 10, 9), (1, 8, 5), (3, 12, 3)])
def test_blur_draws_selects_and_paints_like_kornia(channels, size, kernel, p):
    x = colour_images(b=10, c=channels, h=size, w=size)
    ours = BatchedGaussianBlur(kernel, (0.1, 2.0), p=p)
    theirs = K.RandomGaussianBlur((kernel, kernel), (0.1, 2.0), border_type="reflect", p=p)
    for seed in range(3):
        a, b = drawn_alike(ours, theirs, x, seed)
        assert_close(a, b)
        assert torch.equal(ours._params["sigma"], theirs._params["sigma"])
        chosen = ours._params["batch_prob"] > 0.5
        assert torch.equal(a[~chosen], x[~chosen])


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_greyscale_and_solarize_like_kornia(p):
    x = colour_images(b=10)
    for seed in range(3):
        a, b = drawn_alike(BatchedGrayscale(p=p), K.RandomGrayscale(p=p), x, seed)
        assert_close(a, b)
        a, b = drawn_alike(BatchedSolarize(0.5, p=p), K.RandomSolarize((0.5, 0.5), (0.0, 0.0), p=p), x, seed)
        assert_close(a, b, tol=0.0)
    grey = BatchedGrayscale(p=1.0)(x)
    assert grey.is_contiguous() and torch.equal(grey[:, 0], grey[:, 2])  # its own pixels, not a view of one channel
    grey[:, 0] += 1.0
    assert not torch.equal(grey[:, 0], grey[:, 1])
    out = BatchedSolarize(0.5, p=1.0)(x)
    assert torch.equal(out[:, :, 0, 2], torch.full_like(out[:, :, 0, 2], 0.5))  # 0.5 is at the threshold: 1 - 0.5


def test_a_draw_replays_and_the_where_path_agrees_with_the_subset_path():
    """``params`` replays a draw; the accelerator path (whole batch + torch.where, no host read)
    gives what the CPU path (the chosen images alone) gives."""
    x = colour_images(b=12)
    jitter = BatchedColorJitter(0.4, 0.4, 0.2, 0.1, p=0.5)
    torch.manual_seed(4)
    first = jitter(x)
    params = jitter._params
    assert 0 < int((params["batch_prob"] > 0.5).sum()) < 12  # a mixed selection, so both paths matter
    assert torch.equal(jitter(x, params=params), first)
    chosen = (params["batch_prob"] > 0.5).view(-1, 1, 1, 1)
    assert_close(torch.where(chosen, jitter.transform(x, params, owned=False), x), first, tol=0.0)


# --------------------------------------------------------------------------- the whole chain


def kornia_steps(view: ViewSpec, channels: int) -> nn.Sequential:
    """photometric_steps as it was built from Kornia's own modules."""
    b, c, s, h = view.color_jitter
    if channels != 3:
        s = h = 0.0
    k = A.blur_kernel_size(view.blur_sigma[1], view.size)
    t = view.solarize_threshold
    steps = [K.ColorJitter(b, c, s, h, p=view.color_jitter_p)]
    steps += [K.RandomGrayscale(p=view.grayscale_p)] if channels == 3 else []
    steps += [K.RandomGaussianBlur((k, k), view.blur_sigma, border_type="reflect", p=view.blur_p),
              K.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=view.solarize_p)]
    return nn.Sequential(*steps)


@pytest.mark.parametrize("channels", [1, 3])
def test_the_photometric_chain_matches_kornia(channels):
    view = ViewSpec(10, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                    solarize_p=0.2)
    ours = nn.Sequential(*photometric_steps(view, channels))
    assert [type(m) for m in ours] == ([BatchedColorJitter] + [BatchedGrayscale] * (channels == 3)
                                       + [BatchedGaussianBlur, BatchedSolarize])
    x = colour_images(b=16, c=channels)
    for seed in range(4):
        a, b = drawn_alike(ours, kornia_steps(view, channels), x, seed)
        assert_close(a, b)


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_in_place_steps_give_the_same_pixels_in_their_input(p):
    view = ViewSpec(10, color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=p, grayscale_p=p, blur_p=p, solarize_p=p)
    x = colour_images(b=12)
    for step, again in zip(photometric_steps(view, 3), photometric_steps(view, 3, inplace=True)):
        assert again.inplace and not step.inplace
        torch.manual_seed(0)
        expected = step(x)
        work = x.clone()
        torch.manual_seed(0)
        out = again(work)
        assert torch.equal(out, expected) and out.data_ptr() == work.data_ptr(), type(step).__name__


def test_device_augment_views_match_the_kornia_pipeline():
    """A DINO-like view through DeviceAugment, against crop + Kornia's photometric steps + Normalize."""
    view = ViewSpec(12, scale=(0.4, 1.0), color_jitter=(0.4, 0.4, 0.2, 0.1), color_jitter_p=0.8, grayscale_p=0.2,
                    blur_p=1.0, solarize_p=0.2)
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    reference = nn.Sequential(ResizedCropFlip(12, view.scale, view.ratio, view.hflip), *kornia_steps(view, 3),
                              K.Normalize(mean=torch.tensor(mean), std=torch.tensor(std)))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    (ours,) = DeviceAugment([view], mean, std)(images)
    torch.manual_seed(2)
    assert_close(ours, reference(images.float() / 255), tol=1e-4)  # std 0.2 magnifies the rounding


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="kernel_size=4 must be an odd integer"):
        BatchedGaussianBlur(4, (0.1, 2.0))
    with pytest.raises(ValueError, match=r"kernel_size=9 needs images larger than its radius 4.*\(2, 1, 4, 4\)"):
        BatchedGaussianBlur(9, (0.1, 2.0), p=1.0)(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"BatchedColorJitter takes float \(B, C, H, W\) images, got torch.uint8"):
        BatchedColorJitter(0.4)(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="BatchedGrayscale needs RGB"):
        BatchedGrayscale(p=1.0)(torch.rand(2, 1, 4, 4))
