"""SimCLR's batched augmentation: shapes, seeding, per-sample parameters, and each operation against a reference."""

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from pretext.augment import LUMA_WEIGHTS, ContrastiveAugment, blur_kernel_size, hue_rotation_matrix
from pretext.common import denormalize, normalize

#: Every operation off: the view is the crop, resized.
PLAIN = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0, "flip_p": 0.0}
#: The crop is the whole (square) image.
WHOLE = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0)}




def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rgb_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random RGB images in [0, 1]: blurred noise, so resizing them is well conditioned."""
    noise = torch.rand(batch, 3, size // 4, size // 4, generator=generator(seed))
    return F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)


# --- shape, seeding, per-sample parameters -----------------------------------------------------------------------


def test_views_have_the_requested_size_and_are_finite():
    augment = ContrastiveAugment(size=32)
    views = augment(torch.randn(4, 3, 48, 40), generator())
    assert views.shape == (4, 3, 32, 32)
    assert views.dtype == torch.float32
    assert torch.isfinite(views).all()
    rgb = denormalize(views)
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5


def test_channels_last_input_gives_channels_last_views():
    images = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    views = ContrastiveAugment(size=16)(images, generator())
    assert views.is_contiguous(memory_format=torch.channels_last)


def test_same_generator_seed_gives_the_same_views_and_another_seed_does_not():
    augment = ContrastiveAugment(size=32)
    images = normalize(rgb_images(4, 48))
    first = augment(images, generator(3))
    again = augment(images, generator(3))
    other = augment(images, generator(4))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other, atol=1e-3)


def test_the_generator_advances_so_two_calls_give_two_different_views():
    augment = ContrastiveAugment(size=32)
    images = normalize(rgb_images(2, 48))
    shared = generator(0)
    view1, view2 = augment(images, shared), augment(images, shared)
    assert not torch.allclose(view1, view2, atol=1e-3)


def test_each_sample_gets_its_own_crop_and_jitter():
    augment = ContrastiveAugment(size=32)
    params = augment.sample_parameters(8, 48, 48, generator())
    boxes = params["boxes"][:, 1:]
    assert len({tuple(box.tolist()) for box in boxes}) == 8
    assert len({tuple(order.tolist()) for order in params["order"]}) > 1
    # One image repeated: views of different samples still differ.
    views = augment(normalize(rgb_images(1, 48)).expand(8, -1, -1, -1), generator())
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(views[i], views[j], atol=1e-3), (i, j)


def test_crops_stay_inside_the_image_with_the_requested_area_and_ratio():
    augment = ContrastiveAugment(size=16, scale=(0.3, 0.6), ratio=(0.5, 2.0))
    params = augment.sample_parameters(256, 40, 60, generator())
    x0, y0, x1, y1 = params["boxes"][:, 1:].unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 60 + 1e-4).all() and (y1 <= 40 + 1e-4).all()
    area = (x1 - x0) * (y1 - y0) / (40 * 60)
    ratio = (x1 - x0) / (y1 - y0)
    assert (area >= 0.3 - 1e-4).all() and (area <= 0.6 + 1e-4).all()
    assert (ratio >= 0.5 - 1e-4).all() and (ratio <= 2.0 + 1e-4).all()


def test_a_crop_that_cannot_fit_falls_back_to_the_central_crop():
    # A 10:1 strip with ratios near 1 and the whole area: no attempt fits, as in torchvision.
    augment = ContrastiveAugment(size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    boxes = augment.sample_parameters(3, 10, 100, generator())["boxes"]
    expected = torch.tensor([45.0, 0.0, 55.0, 10.0])
    for box in boxes:
        torch.testing.assert_close(box[1:], expected)


def test_bad_inputs_are_rejected_by_name():
    augment = ContrastiveAugment(size=16)
    with pytest.raises(ValueError, match="images"):
        augment(torch.zeros(2, 1, 16, 16), generator())
    with pytest.raises(ValueError, match="scale"):
        ContrastiveAugment(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="jitter_p"):
        ContrastiveAugment(jitter_p=1.5)


# --- each operation against a reference ---------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target", "mode"), [(32, 32, None), (24, 48, "bilinear"), (64, 32, "area")])
def test_whole_image_crop_without_other_ops_is_a_plain_resize(source, target, mode):
    """roi_align with aligned=True samples pixel centres as interpolate(align_corners=False) does; shrinking by
    2 averages 2x2 samples, i.e. area resampling."""
    rgb = rgb_images(3, source, seed=1)
    views = ContrastiveAugment(size=target, **WHOLE, **PLAIN)(normalize(rgb), generator())
    expected = rgb if mode is None else F.interpolate(rgb, size=(target, target), mode=mode)
    torch.testing.assert_close(denormalize(views), expected, atol=1e-5, rtol=0)


def test_flip_mirrors_the_view():
    rgb = rgb_images(2, 16)
    views = ContrastiveAugment(size=16, **WHOLE, **{**PLAIN, "flip_p": 1.0})(normalize(rgb), generator())
    torch.testing.assert_close(denormalize(views), rgb.flip(-1), atol=1e-5, rtol=0)


def test_grayscale_view_has_equal_channels():
    rgb = rgb_images(4, 32)
    augment = ContrastiveAugment(size=24, **{**PLAIN, "grayscale_p": 1.0})
    views = denormalize(augment(normalize(rgb), generator()))
    torch.testing.assert_close(views[:, 0], views[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(views[:, 1], views[:, 2], atol=1e-5, rtol=0)
    assert views.std() > 0.01


def test_colour_jitter_matches_torchvision_applied_in_each_samples_order():
    """Brightness, contrast and saturation are torchvision's formulas; hue is the YIQ rotation; each sample
    applies them in its own drawn order, clamping after each."""
    rgb = rgb_images(6, 16, seed=2)
    augment = ContrastiveAugment(size=16, **WHOLE, **{**PLAIN, "jitter_p": 1.0}, brightness=0.5, contrast=0.5,
                                 saturation=0.5, hue=0.1)
    views = denormalize(augment(normalize(rgb), generator(5)))
    params = augment.sample_parameters(6, 16, 16, generator(5))
    for b in range(6):
        x = rgb[b]
        for operation in params["order"][b].tolist():
            if operation == 0:
                x = TF.adjust_brightness(x, float(params["brightness"][b]))
            elif operation == 1:
                x = TF.adjust_contrast(x, float(params["contrast"][b]))
            elif operation == 2:
                x = TF.adjust_saturation(x, float(params["saturation"][b]))
            else:
                matrix = hue_rotation_matrix(params["hue_angle"][b:b + 1])[0]
                x = torch.einsum("ij,jhw->ihw", matrix, x).clamp(0, 1)
        torch.testing.assert_close(views[b], x, atol=2e-5, rtol=0)
    assert (params["brightness"] != 1).all() and (params["hue_angle"] != 0).all()


def test_hue_rotation_by_zero_is_the_identity():
    assert torch.equal(hue_rotation_matrix(torch.zeros(2)), torch.eye(3).expand(2, 3, 3))
    rgb = rgb_images(2, 16)
    augment = ContrastiveAugment(size=16, **WHOLE, **{**PLAIN, "jitter_p": 1.0}, brightness=0, contrast=0,
                                 saturation=0, hue=0)
    torch.testing.assert_close(denormalize(augment(normalize(rgb), generator())), rgb, atol=1e-5, rtol=0)


def test_hue_rotation_preserves_yiq_luma_and_turns_chroma():
    angles = torch.tensor([0.3, -1.0, math.pi / 2], dtype=torch.float64)
    matrices = hue_rotation_matrix(angles)
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    for matrix in matrices:
        torch.testing.assert_close(luma @ matrix, luma, atol=1e-5, rtol=0)  # Y of M x equals Y of x
    # Rotations compose: θ then -θ is the identity, and a full turn is too.
    back = hue_rotation_matrix(-angles) @ matrices
    torch.testing.assert_close(back, torch.eye(3, dtype=torch.float64).expand(3, 3, 3), atol=1e-12, rtol=0)
    full = hue_rotation_matrix(torch.tensor([2 * math.pi], dtype=torch.float64))[0]
    torch.testing.assert_close(full, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    # A saturated red moves: its chroma turns while its luma stays.
    red = torch.tensor([0.8, 0.2, 0.2], dtype=torch.float64)
    turned = matrices[2] @ red
    assert (turned - red).abs().max() > 0.1
    torch.testing.assert_close(luma @ turned, luma @ red)


def test_saturation_zero_gives_luma_gray():
    rgb = rgb_images(2, 16)
    gray = (rgb * torch.tensor(LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(rgb)
    augment = ContrastiveAugment(size=16, **WHOLE, **{**PLAIN, "jitter_p": 1.0}, brightness=0, contrast=0,
                                 saturation=1.0, hue=0)
    params = augment.sample_parameters(2, 16, 16, generator())
    views = denormalize(augment(normalize(rgb), generator()))
    for b in range(2):
        s = float(params["saturation"][b])
        torch.testing.assert_close(views[b], (s * rgb[b] + (1 - s) * gray[b]).clamp(0, 1), atol=1e-5, rtol=0)


def test_blur_matches_torchvision_gaussian_blur_per_sample():
    rgb = rgb_images(3, 32, seed=3)
    augment = ContrastiveAugment(size=32, **WHOLE, **{**PLAIN, "blur_p": 1.0}, blur_sigma=(0.5, 2.0))
    views = denormalize(augment(normalize(rgb), generator(7)))
    params = augment.sample_parameters(3, 32, 32, generator(7))
    kernel = blur_kernel_size(32)
    assert kernel == 3
    for b in range(3):
        sigma = float(params["sigma"][b])
        expected = TF.gaussian_blur(rgb[b], kernel_size=[kernel, kernel], sigma=[sigma, sigma])
        torch.testing.assert_close(views[b], expected, atol=1e-5, rtol=0)
    assert params["sigma"].unique().numel() == 3


def test_blur_kernel_is_ten_percent_of_the_side_and_odd():
    assert blur_kernel_size(224) == 23  # SimCLR's ImageNet setting
    assert blur_kernel_size(64) == 7
    assert blur_kernel_size(16) == 3


def test_probabilities_are_per_sample():
    augment = ContrastiveAugment(size=16, jitter_p=0.5, grayscale_p=0.5, blur_p=0.5, flip_p=0.5)
    params = augment.sample_parameters(400, 32, 32, generator())
    for name in ("flip", "grayscale", "blur"):
        assert 0.35 < params[name].float().mean() < 0.65, name
    jittered = (params["brightness"] != 1).float().mean()
    assert 0.35 < jittered < 0.65


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views():
    augment = ContrastiveAugment(size=32)
    images = normalize(rgb_images(4, 48))
    cpu = augment(images, generator(1))
    cuda = augment(images.cuda(), generator(1)).cpu()
    torch.testing.assert_close(cuda, cpu, atol=1e-4, rtol=0)
