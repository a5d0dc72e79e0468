"""Colorization and inpainting: Lab against skimage, ab bins, losses against references written out here, masks, the
adversary, and short training runs on real photos."""

import copy
import math
import warnings

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.color import lab2rgb, rgb2lab

from pretext.common import denormalize, normalize
from pretext.generative import (
    Colorization,
    Inpainting,
    annealed_mean,
    in_gamut_ab_bins,
    lab_to_rgb,
    lightness_to_grey,
    rebalancing_weights,
    rgb_to_lab,
    smooth_prior,
    soft_encode,
)
from synth.backbone import Backbone


def photos(size=64, names=("astronaut", "coffee", "chelsea")):
    """scikit-image's bundled photos, centre-cropped square and resized to ``size``, ImageNet-normalised."""
    images = []
    for name in names:
        rgb = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        side = min(rgb.shape[1:])
        top, left = (rgb.shape[1] - side) // 2, (rgb.shape[2] - side) // 2
        square = rgb[None, :, top:top + side, left:left + side]
        images.append(F.interpolate(square, size=(size, size), mode="bilinear", antialias=True, align_corners=False))
    return normalize(torch.cat(images).clamp(0, 1))


def build(objective_cls, seed=0, **kwargs):
    """A ResNet-18 and an objective, initialised from a fixed seed without touching global state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Backbone("resnet18"), objective_cls(**kwargs)


class Capture:
    """Records a module's output (forward hook) or first input (pre-hook) while active."""

    def __init__(self, module, inputs=False):
        self.values = []
        if inputs:
            self.handle = module.register_forward_pre_hook(lambda m, args: self.values.append(args[0].detach()))
        else:
            self.handle = module.register_forward_hook(lambda m, args, out: self.values.append(out.detach()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def as_pixels(colours):
    """(N, 3) colours as the (3, N, 1) image layout the converters take."""
    return torch.as_tensor(colours).T[:, :, None]


def from_pixels(image):
    return image[:, :, 0].T.numpy()


def skimage_lab(images):
    """Lab of ImageNet-normalised images via skimage, float64 (B, 3, H, W)."""
    rgb = denormalize(images).clamp(0, 1).double().permute(0, 2, 3, 1).numpy()
    return torch.from_numpy(rgb2lab(rgb)).permute(0, 3, 1, 2)


# --- colour space ------------------------------------------------------------------------------------------------


EXTREMES = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [0.04045, 0.04045, 0.04045], [0.04, 0.05, 0.03], [1e-4, 0, 0],
            [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1], [0.2, 0.2, 0.2], [0.99, 0.01, 0.5]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rgb_to_lab_matches_skimage(dtype):
    generator = torch.Generator().manual_seed(0)
    colours = torch.cat([torch.rand(2000, 3, generator=generator, dtype=torch.float64),
                         torch.tensor(EXTREMES, dtype=torch.float64)])
    lab = rgb_to_lab(as_pixels(colours).to(dtype))
    assert lab.dtype == dtype
    np.testing.assert_allclose(from_pixels(lab), rgb2lab(colours.numpy()), atol=1e-3, rtol=0)
    # Batched (B, 3, H, W) input, any batch shape.
    images = torch.rand(2, 3, 4, 5, generator=generator, dtype=torch.float64)
    expected = rgb2lab(images.numpy(), channel_axis=1)
    np.testing.assert_allclose(rgb_to_lab(images).numpy(), expected, atol=1e-3, rtol=0)
    np.testing.assert_allclose(rgb_to_lab(images[None]).numpy()[0], expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lab_to_rgb_matches_skimage_and_round_trips(dtype):
    generator = torch.Generator().manual_seed(1)
    # The whole Lab box, most of it out of the sRGB gamut (clipped, and negative f(Z) zeroed, as skimage does).
    lab = torch.stack([torch.rand(2000, generator=generator) * 100, torch.rand(2000, generator=generator) * 256 - 128,
                       torch.rand(2000, generator=generator) * 256 - 128], dim=1).double()
    lab = torch.cat([lab, torch.tensor([[0.0, 0, 0], [100, 0, 0], [50, 0, 0], [8, 0, 0], [50, 0, 120]])])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns about the negative Z values it clips
        expected = lab2rgb(lab.numpy())
    rgb = lab_to_rgb(as_pixels(lab).to(dtype))
    assert rgb.dtype == dtype
    np.testing.assert_allclose(from_pixels(rgb), expected, atol=1e-3, rtol=0)
    assert rgb.min() >= 0 and rgb.max() <= 1
    # Round trip through Lab, in range colours and the extremes.
    colours = torch.cat([torch.rand(2000, 3, generator=generator, dtype=torch.float64),
                         torch.tensor(EXTREMES, dtype=torch.float64)])
    back = lab_to_rgb(rgb_to_lab(as_pixels(colours).to(dtype)))
    np.testing.assert_allclose(from_pixels(back), colours.numpy(), atol=1e-4 if dtype == torch.float32 else 1e-6,
                               rtol=0)


def test_lab_conversions_reject_other_shapes():
    with pytest.raises(ValueError, match=r"\(\*, 3, H, W\)"):
        rgb_to_lab(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"\(\*, 3, H, W\)"):
        lab_to_rgb(torch.zeros(3, 3))


# --- ab bins, soft encoding, rebalancing ----------------------------------------------------------------------------


def test_in_gamut_bins():
    centers = in_gamut_ab_bins(10.0)
    count = centers.shape[0]
    print(f"in-gamut ab bins at bin_size 10: {count} (Zhang et al.: 313)")
    assert 200 <= count <= 330
    assert count == 261  # the value this implementation gives; a change means the gamut or the grid changed
    assert torch.equal(centers, torch.round(centers / 10) * 10)
    assert len({tuple(c) for c in centers.tolist()}) == count
    assert [0.0, 0.0] in centers.tolist()
    # Every 8-bit colour (a sample of the whole cube, not only its surface) and every photo pixel has its own cell.
    generator = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (100000, 3), generator=generator).double() / 255
    ab = np.concatenate([rgb2lab(colours.numpy())[:, 1:],
                         skimage_lab(photos(32)).permute(0, 2, 3, 1).reshape(-1, 3)[:, 1:].numpy()])
    cells = {tuple(c) for c in (np.round(ab / 10) * 10).tolist()}
    assert cells <= {tuple(c) for c in centers.tolist()}
    # Finer grids have more cells. Memoised, but each call returns its own copy.
    assert in_gamut_ab_bins(5.0).shape[0] > count > in_gamut_ab_bins(20.0).shape[0]
    again = in_gamut_ab_bins(10.0)
    assert again is not centers and torch.equal(again, centers)


def naive_soft_encode(ab, centers, neighbours=5, sigma=5.0):
    """Full sort of the distances to every centre, Gaussian weights on the nearest ones, in float64."""
    ab, centers = np.asarray(ab, dtype=np.float64), np.asarray(centers, dtype=np.float64)
    squared = ((ab[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    order = np.argsort(squared, axis=1, kind="stable")[:, :neighbours]
    weights = np.exp(-np.take_along_axis(squared, order, 1) / (2 * sigma ** 2))
    return order, weights / weights.sum(1, keepdims=True)


def test_soft_encoding():
    centers = in_gamut_ab_bins(10.0)
    generator = torch.Generator().manual_seed(0)
    ab = torch.from_numpy(rgb2lab(torch.rand(500, 3, generator=generator).double().numpy())[:, 1:]).float()
    indices, weights = soft_encode(ab, centers, chunk=128)  # several chunks
    expected_indices, expected_weights = naive_soft_encode(ab.numpy(), centers.numpy())
    np.testing.assert_array_equal(indices.numpy(), expected_indices)
    np.testing.assert_allclose(weights.numpy(), expected_weights, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weights.sum(1), torch.ones(500))
    assert (weights[:, :1] >= weights).all(), "the nearest bin weighs most"
    # A value on a bin centre: that bin at distance 0 and its four grid neighbours at 10, weight exp(-100 / 50).
    indices, weights = soft_encode(torch.zeros(1, 2), centers)
    assert centers[indices[0, 0]].tolist() == [0.0, 0.0]
    assert sorted(centers[indices[0, 1:]].abs().sum(1).tolist()) == [10.0] * 4
    near = math.exp(-2.0)
    torch.testing.assert_close(weights[0], torch.tensor([1.0, near, near, near, near]) / (1 + 4 * near))


def test_rebalancing_weights_by_hand():
    prior = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    raw = [1 / (0.5 * p + 0.5 / 4) for p in prior.tolist()]
    expectation = sum(p * w for p, w in zip(prior.tolist(), raw, strict=True))
    torch.testing.assert_close(rebalancing_weights(prior, 0.5), torch.tensor(raw, dtype=torch.float64) / expectation)
    # Normalised as the paper: expectation 1 under the prior. lambda = 1: all weights 1.
    assert (prior * rebalancing_weights(prior, 0.5)).sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(rebalancing_weights(prior, 1.0), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="lambda"):
        rebalancing_weights(prior, 0.0)


def test_smooth_prior_matches_a_loop():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 20.0]])
    prior = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64)
    smoothed = [sum(prior[r].item() * math.exp(-((centers[q] - centers[r]) ** 2).sum().item() / 50) for r in range(3))
                for q in range(3)]
    expected = torch.tensor(smoothed, dtype=torch.float64) / sum(smoothed)
    torch.testing.assert_close(smooth_prior(prior, centers, sigma=5.0), expected)


def test_annealed_mean_by_hand():
    centers = torch.tensor([[0.0, 0.0], [10.0, -20.0]])
    logits = torch.tensor([math.log(0.25), math.log(0.75)]).view(1, 2, 1, 1)
    # T = 1: the mean of the distribution (0.25, 0.75).
    torch.testing.assert_close(annealed_mean(logits, centers, 1.0)[0, :, 0, 0], torch.tensor([7.5, -15.0]))
    # T = 0.5: probabilities squared and renormalised: (1/16, 9/16) -> (0.1, 0.9).
    torch.testing.assert_close(annealed_mean(logits, centers, 0.5)[0, :, 0, 0], torch.tensor([9.0, -18.0]))
    # T -> 0: the mode.
    torch.testing.assert_close(annealed_mean(logits, centers, 0.01)[0, :, 0, 0], torch.tensor([10.0, -20.0]))


# --- colorization ------------------------------------------------------------------------------------------------


def reference_class_weights(counts, centers, sigma=5.0, mix=0.5):
    """The paper's Eq. 4 written out in numpy: smoothed empirical prior mixed with uniform, inverted, E_p[w] = 1."""
    counts, centers = counts.numpy(), centers.numpy().astype(np.float64)
    prior = counts / counts.sum()
    squared = ((centers[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
    smoothed = np.exp(-squared / (2 * sigma ** 2)) @ prior
    smoothed /= smoothed.sum()
    weights = 1 / ((1 - mix) * smoothed + mix / len(prior))
    return weights / (smoothed * weights).sum()


def area_downsample(values, factor):
    """Mean over factor x factor blocks, (B, C, H, W) -> (B, C, H / factor, W / factor)."""
    b, c, h, w = values.shape
    return values.reshape(b, c, h // factor, factor, w // factor, factor).mean((3, 5))


def test_classification_loss_matches_the_weighted_cross_entropy():
    backbone, colorization = build(Colorization)
    images = photos(64, names=("astronaut", "coffee"))
    generator = torch.Generator().manual_seed(0)
    counts_before = torch.randint(0, 50, colorization.bin_counts.shape, generator=generator).double()
    colorization.bin_counts.copy_(counts_before)
    with Capture(colorization.decoder) as logits:
        out = colorization({"image": images}, backbone)
    logits = logits.values[0].double()
    assert logits.shape == (2, colorization.bin_centers.shape[0], 16, 16)

    lab = skimage_lab(images)
    target_ab = area_downsample(lab[:, 1:], 4).permute(0, 2, 3, 1).reshape(-1, 2)
    order, soft = naive_soft_encode(target_ab.numpy(), colorization.bin_centers.numpy())
    nearest = order[:, 0]
    # Training mode: the batch's nearest bins were counted before its weights were computed.
    expected_counts = counts_before + torch.bincount(torch.from_numpy(nearest), minlength=len(counts_before))
    torch.testing.assert_close(colorization.bin_counts, expected_counts)
    weights = reference_class_weights(expected_counts, colorization.bin_centers)
    log_probs = torch.log_softmax(logits, dim=1).permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).numpy()
    cross_entropy = -(soft * np.take_along_axis(log_probs, order, 1)).sum(1)
    expected_loss = (weights[nearest] * cross_entropy).mean()
    assert out["loss"].item() == pytest.approx(expected_loss, rel=1e-4)
    assert out["accuracy"].item() == pytest.approx((log_probs.argmax(1) == nearest).mean())
    probs = torch.softmax(logits / 0.38, dim=1)
    ab = torch.einsum("bqhw,qc->bchw", probs, colorization.bin_centers.double())
    ab = F.interpolate(ab, size=(64, 64), mode="bilinear", align_corners=False)
    assert out["ab_mae"].item() == pytest.approx((ab - lab[:, 1:]).abs().mean().item(), rel=1e-4)
    assert all(value.dim() == 0 and value.dtype == torch.float32 for value in out.values())


def test_prior_is_counted_in_training_only():
    backbone, colorization = build(Colorization)
    images = photos(32, names=("astronaut", "coffee"))
    # Uniform until something is counted: every weight 1.
    torch.testing.assert_close(colorization.class_weights(), torch.ones(colorization.bin_centers.shape[0]))
    colorization.eval()
    with torch.no_grad():
        colorization({"image": images}, backbone)
    assert colorization.bin_counts.sum() == 0
    colorization.train()
    colorization({"image": images, "with_metrics": False}, backbone)
    assert colorization.bin_counts.sum() == 2 * 8 * 8  # one count per target pixel at output stride 4
    assert "bin_counts" in colorization.state_dict() and "bin_centers" in colorization.state_dict()
    # The weights have expectation 1 under the (smoothed) prior they come from, as the paper normalises them.
    prior, weights = colorization.prior(), colorization.class_weights()
    assert (prior * weights.double()).sum().item() == pytest.approx(1.0, rel=1e-6)
    assert weights.max() > 1 > weights.min()


def test_regression_loss_is_smooth_l1():
    backbone, colorization = build(Colorization, mode="regression")
    images = photos(64, names=("astronaut", "coffee"))
    with Capture(colorization.decoder) as raw:
        out = colorization({"image": images}, backbone)
    predicted = 100 * raw.values[0].double()
    assert predicted.shape == (2, 2, 16, 16)
    lab = skimage_lab(images)
    difference = (predicted - area_downsample(lab[:, 1:], 4)).abs()
    expected = torch.where(difference < 1, 0.5 * difference ** 2, difference - 0.5).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-4)
    ab = F.interpolate(predicted, size=(64, 64), mode="bilinear", align_corners=False)
    assert out["ab_mae"].item() == pytest.approx((ab - lab[:, 1:]).abs().mean().item(), rel=1e-4)
    assert set(out) == {"loss", "ab_mae"}
    assert not hasattr(colorization, "bin_counts")


def test_colorization_input_is_the_grey_lightness():
    backbone, colorization = build(Colorization)
    images = photos(32, names=("astronaut", "coffee"))
    with Capture(backbone, inputs=True) as inputs, torch.no_grad():
        colorization({"image": images}, backbone)
    grey = denormalize(inputs.values[0]).double()
    assert grey.shape == images.shape
    torch.testing.assert_close(grey[:, 0], grey[:, 1], atol=1e-6, rtol=0)  # equal up to the float32 (de)normalisation
    torch.testing.assert_close(grey[:, 0], grey[:, 2], atol=1e-6, rtol=0)
    grey_lab, lab = skimage_lab(normalize(grey)), skimage_lab(images)
    torch.testing.assert_close(grey_lab[:, 0], lab[:, 0], atol=1e-3, rtol=0)
    # skimage's matrix rows and white point differ in the 5th digit, so its Lab of an exact grey has |a|, |b| < 0.01.
    assert grey_lab[:, 1:].abs().max() < 0.01
    # The grey itself is exact: three equal channels.
    lightness = torch.linspace(0, 100, 11).view(1, 1, 11, 1)
    assert torch.equal(lightness_to_grey(lightness)[:, 0], lightness_to_grey(lightness)[:, 2])
    torch.testing.assert_close(rgb_to_lab(lightness_to_grey(lightness))[:, :1], lightness, atol=1e-4, rtol=0)


# --- inpainting ----------------------------------------------------------------------------------------------------


def test_center_mask_and_input():
    backbone, inpainting = build(Inpainting)  # centre, 1/4 of the area, 4 px overlap
    images = photos(64, names=("astronaut", "coffee"))
    batch = {"image": images}  # the centre mask needs no seed
    mask = inpainting.mask(batch)
    expected_region = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    expected_region[..., 16:48, 16:48] = True
    expected_hole = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    expected_hole[..., 20:44, 20:44] = True
    assert torch.equal(mask.region, expected_region) and torch.equal(mask.hole, expected_hole)
    assert mask.region.float().mean().item() == 0.25
    assert mask.box == (16, 48, 16, 48) and mask.region_pixels == 2 * 32 * 32
    with Capture(backbone, inputs=True) as inputs, torch.no_grad():
        inpainting(batch, backbone)
    seen = inputs.values[0]
    # Unchanged outside the hole (the overlap band included), the dataset mean (0 normalised) inside.
    assert torch.equal(torch.where(expected_hole, 0.0, images), seen)
    assert (seen[expected_hole.expand_as(seen)] == 0).all()


def test_random_block_masks():
    backbone, inpainting = build(Inpainting, mask="random_blocks", overlap=1)
    images = photos(64)
    batch = {"image": images, "seed": torch.tensor([5, 6, 7])}
    mask = inpainting.mask(batch)
    # Coverage at least the fraction, exceeded by at most one square (side at most sqrt(f) * 64 / 2 = 16).
    coverage = mask.region.flatten(1).float().mean(1)
    assert (coverage >= 0.25).all() and (coverage < 0.25 + 16 ** 2 / 64 ** 2).all()
    assert not torch.equal(mask.region[0], mask.region[1])
    # Same seeds, same masks (so the discriminator sees what forward saw); other seeds, other masks.
    assert torch.equal(inpainting.mask(batch).region, mask.region)
    assert not torch.equal(inpainting.mask({**batch, "seed": torch.tensor([8, 9, 10])}).region, mask.region)
    # The hole is the region eroded by 1 px (the image border does not erode): check against a loop.
    region = mask.region[:, 0]
    padded = F.pad(region, (1, 1, 1, 1), value=True)
    eroded = torch.ones_like(region)
    for dy in range(3):
        for dx in range(3):
            eroded &= padded[:, dy:dy + 64, dx:dx + 64]
    assert torch.equal(mask.hole[:, 0], eroded)
    with Capture(backbone, inputs=True) as inputs, torch.no_grad():
        inpainting(batch, backbone)
    assert torch.equal(inputs.values[0], torch.where(mask.hole, 0.0, images))
    with pytest.raises(KeyError, match="seed"):
        inpainting.mask({"image": images})


def test_overlap_that_erases_the_mask_is_an_error():
    backbone, inpainting = build(Inpainting, overlap=8)
    with pytest.raises(ValueError, match="overlap=8"):
        inpainting({"image": photos(32, names=("coffee",))}, backbone)


def test_inpainting_loss_by_hand():
    backbone, inpainting = build(Inpainting, overlap=2, overlap_weight=10.0)
    images = photos(32, names=("astronaut", "coffee"))
    with Capture(inpainting.decoder) as raw:
        out = inpainting({"image": images}, backbone)
    reconstruction = denormalize(raw.values[0]).double()
    target = denormalize(images).double()
    squared = (reconstruction - target).square().sum(1)  # (B, H, W), summed over channels
    # Region: rows/columns 8..23 (16 x 16 = 1/4 of 32 x 32); hole: 10..21; the 2-px band between them weighs 10.
    hole_sum = squared[:, 10:22, 10:22].sum()
    band_sum = squared[:, 8:24, 8:24].sum() - hole_sum
    expected = (hole_sum + 10 * band_sum) / (3 * 2 * 16 * 16)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    clamped = (reconstruction.clamp(0, 1) - target).square().sum(1)
    psnr = [-10 * math.log10(clamped[i, 10:22, 10:22].sum().item() / (3 * 12 * 12)) for i in range(2)]
    assert out["psnr"].item() == pytest.approx(sum(psnr) / 2, rel=1e-5)
    assert set(out) == {"loss", "psnr"}


def softplus(x):
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


def test_adversarial_inpainting():
    assert not hasattr(Inpainting(), "discriminator_loss")
    assert not hasattr(Inpainting(), "discriminator_parameters")
    backbone, inpainting = build(Inpainting, adversarial_weight=0.1, overlap=2)
    assert hasattr(inpainting, "discriminator_loss")
    images = photos(32, names=("astronaut", "coffee"))
    batch = {"image": images}
    # Eval mode: BatchNorm uses running statistics, so the discriminator's recomputed reconstruction is forward's.
    backbone.eval()
    inpainting.eval()
    with Capture(inpainting.decoder) as raw:
        out = inpainting(batch, backbone)
    composite = torch.where(inpainting.mask(batch).region, raw.values[0], images)[..., 8:24, 8:24]
    with torch.no_grad():
        fake = inpainting.discriminator(composite).mean((1, 2, 3))
        real = inpainting.discriminator(images[..., 8:24, 8:24]).mean((1, 2, 3))
    # Non-saturating generator loss: -log sigmoid(D(fake)) = softplus(-D(fake)).
    assert out["adversarial_loss"].item() == pytest.approx(softplus(-fake).mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(out["reconstruction_loss"].item() + 0.1 * out["adversarial_loss"].item(),
                                               rel=1e-6)
    assert set(out) == {"loss", "reconstruction_loss", "adversarial_loss", "psnr"}

    backbone.zero_grad(set_to_none=True)
    discriminator = inpainting.discriminator_loss({"real": batch}, backbone)
    expected = 0.5 * (softplus(-real).mean() + softplus(fake).mean())
    assert torch.isfinite(discriminator["loss"])
    assert discriminator["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert discriminator["accuracy"].item() == pytest.approx(((real > 0).sum() + (fake < 0).sum()).item() / 4)
    discriminator["loss"].backward()
    parameters = list(inpainting.discriminator_parameters())
    assert parameters == list(inpainting.discriminator.parameters()) and len(parameters) > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in parameters)
    # The reconstruction was recomputed without a graph: nothing reaches the generator.
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad is None for p in inpainting.decoder.parameters())
    with pytest.raises(KeyError, match="real"):
        inpainting.discriminator_loss({"synthetic": batch}, backbone)


# --- both objectives ---------------------------------------------------------------------------------------------

OBJECTIVES = {
    "classification": (Colorization, {}),
    "regression": (Colorization, {"mode": "regression"}),
    "center": (Inpainting, {}),
    "random_blocks": (Inpainting, {"mask": "random_blocks", "overlap": 1}),
}


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_gradients_predictions_and_contract(name):
    cls, kwargs = OBJECTIVES[name]
    backbone, objective = build(cls, **kwargs)
    assert objective.domains == ("real",) and objective.uses_features is False and objective.target == "image"
    images = photos(32, names=("astronaut", "coffee"))
    batch = {"image": images, "seed": torch.tensor([1, 2])}
    output = objective(batch, backbone)
    assert all(value.dim() == 0 and value.dtype == torch.float32 for value in output.values())
    assert not any(value.requires_grad for key, value in output.items() if key != "loss")
    output["loss"].backward()
    network = backbone.torchvision_model()
    for parameter in (network.conv1.weight, network.layer1[0].conv1.weight, network.layer4[-1].conv2.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    assert set(objective({**batch, "with_metrics": False}, backbone)) == {"loss"}
    # Features computed by the engine for other heads are not this objective's input: they are ignored.
    with torch.no_grad():
        objective.eval()
        backbone.eval()
        plain = objective.predict(batch, backbone)
        features = {key: torch.zeros_like(value) for key, value in backbone(images).items()}
        assert torch.equal(objective.predict({**batch, "features": features}, backbone), plain)
    assert plain.shape == (2, 3, 32, 32) and plain.dtype == torch.float32
    assert plain.min() >= 0 and plain.max() <= 1


def test_predictions_keep_what_the_input_shows():
    images = photos(32, names=("astronaut", "coffee"))
    backbone, inpainting = build(Inpainting, overlap=2)
    with torch.no_grad():
        filled = inpainting.predict({"image": images}, backbone)
    hole = inpainting.mask({"image": images}).hole.expand_as(filled)
    torch.testing.assert_close(filled[~hole], denormalize(images).clamp(0, 1)[~hole])
    # Colorization keeps the image's lightness: a zero chroma prediction gives back the image in grey.
    backbone, colorization = build(Colorization, mode="regression")
    torch.nn.init.zeros_(colorization.decoder.predict.weight)
    torch.nn.init.zeros_(colorization.decoder.predict.bias)
    with torch.no_grad():
        grey = colorization.predict({"image": images}, backbone)
    grey_lab, lab = skimage_lab(normalize(grey)), skimage_lab(images)
    torch.testing.assert_close(grey_lab[:, 0], lab[:, 0], atol=1e-3, rtol=0)
    assert grey_lab[:, 1:].abs().max() < 1e-3


@pytest.mark.parametrize(("cls", "kwargs", "match"), [
    (Colorization, {"mode": "ordinal"}, "mode"),
    (Colorization, {"rebalance_lambda": 0.0}, "rebalance_lambda"),
    (Colorization, {"soft_neighbours": 0}, "soft_neighbours"),
    (Colorization, {"annealing_temperature": 0.0}, "annealing_temperature"),
    (Colorization, {"output_stride": 0}, "output_stride"),
    (Colorization, {"bin_size": -1.0}, "bin_size"),
    (Colorization, {"stages": ["layer9"]}, "layer9"),
    (Inpainting, {"mask": "free_form"}, "mask"),
    (Inpainting, {"mask_fraction": 1.0}, "mask_fraction"),
    (Inpainting, {"overlap": -1}, "overlap"),
    (Inpainting, {"stages": []}, "stages"),
])
def test_bad_arguments_are_named(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_decoding_from_chosen_stages():
    backbone, colorization = build(Colorization, stages=["layer3", "layer2"], channels=32)
    assert colorization.stages == ("layer2", "layer3")
    images = photos(32, names=("coffee",))
    assert torch.isfinite(colorization({"image": images}, backbone)["loss"])
    with pytest.raises(ValueError, match="resnet18"):
        colorization({"image": images}, Backbone("resnet50"))


# --- training on real photos ---------------------------------------------------------------------------------------


def train(objective, backbone, images, steps, lr=1e-3):
    """AdamW on backbone and objective, the engine's way: seeds a function of the step, metrics off."""
    parameters = list(backbone.parameters()) + [p for n, p in objective.named_parameters()
                                                if not n.startswith("discriminator.")]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    backbone.train()
    objective.train()
    for step in range(steps):
        seeds = torch.arange(len(images)) + 1000 * step
        loss = objective({"image": images, "seed": seeds, "step": step, "with_metrics": False}, backbone)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def evaluate(objective, backbone, images):
    objective.eval()
    backbone.eval()
    with torch.no_grad():
        outputs = objective({"image": images, "seed": torch.arange(len(images))}, backbone)
    return {key: value.item() for key, value in outputs.items()}


@pytest.mark.slow
def test_colorization_learns_real_photos():
    """100 steps on 3 photos at 64 px: the loss falls below half of the untrained model's (about 3.5x measured).

    Both are measured in eval mode with the prior the training counted, so they use the same class weights.
    """
    backbone, colorization = build(Colorization, seed=1)
    untrained = copy.deepcopy((backbone, colorization))
    images = photos(64)
    train(colorization, backbone, images, steps=100)
    untrained[1].bin_counts.copy_(colorization.bin_counts)
    before, after = evaluate(untrained[1], untrained[0], images), evaluate(colorization, backbone, images)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["ab_mae"] < 0.5 * before["ab_mae"]
    assert after["accuracy"] > 0.5 > before["accuracy"]


@pytest.mark.slow
def test_inpainting_learns_real_photos():
    """100 steps on 3 photos at 64 px: the loss falls below a quarter of the untrained model's (about 10x measured)
    and the hole's PSNR rises by more than 5 dB (about 8 measured)."""
    backbone, inpainting = build(Inpainting, seed=1)
    untrained = copy.deepcopy((backbone, inpainting))
    images = photos(64)
    train(inpainting, backbone, images, steps=100)
    before, after = evaluate(untrained[1], untrained[0], images), evaluate(inpainting, backbone, images)
    assert after["loss"] < 0.25 * before["loss"]
    assert after["psnr"] > before["psnr"] + 5.0
