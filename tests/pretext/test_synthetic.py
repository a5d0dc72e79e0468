"""Synthetic-label heads: losses against hand-computed values, masking, metrics, gradients, and an overfit run."""

import math

import pytest
import torch

from pretext import (
    ContourHead,
    Decoder,
    DepthHead,
    NormalHead,
    balanced_contour_loss,
    contour_match_counts,
    contour_prf,
    contour_prf_from_counts,
    cosine_normal_loss,
    depth_metrics,
    normal_metrics,
    scale_invariant_log_loss,
)
from synth.backbone import Backbone

HEADS = {"depth": DepthHead, "normals": NormalHead, "contours": ContourHead}




def image_tensor(rows):
    """A (1, 1, H, W) float tensor from nested lists."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


def normal_tensor(rows):
    """A (1, 3, H, W) tensor from an H x W grid of 3-vectors."""
    return torch.tensor(rows, dtype=torch.float32).permute(2, 0, 1)[None]


ALL_VALID = torch.ones(1, 1, 2, 2, dtype=torch.bool)


# --- losses against hand-computed values ------------------------------------------------------------------------


def test_scale_invariant_loss_by_hand():
    target = image_tensor([[1.0, 2.0], [4.0, 1.0]])
    log_pred = image_tensor([[0.0, 0.0], [math.log(2.0), 1.0]])
    # d = log_pred - log(target) = [0, -log 2, -log 2, 1]
    d = [0.0, -math.log(2), -math.log(2), 1.0]
    n = 4
    expected = sum(x * x for x in d) / n - 0.5 * (sum(d) / n) ** 2
    loss = scale_invariant_log_loss(log_pred, target, ALL_VALID, weight=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # lambda = 0 is the plain log-MSE.
    assert scale_invariant_log_loss(log_pred, target, ALL_VALID, weight=0.0).item() == pytest.approx(
        sum(x * x for x in d) / n, rel=1e-6)
    # lambda = 1 ignores a global scale: a prediction 3x too far costs nothing.
    assert scale_invariant_log_loss(target.log() + math.log(3), target, ALL_VALID, weight=1.0).item() == (
        pytest.approx(0.0, abs=1e-6))


def test_scale_invariant_loss_masks_and_averages_over_images():
    target = torch.cat([image_tensor([[1.0, 2.0], [0.0, 1.0]]), image_tensor([[5.0, 5.0], [5.0, 5.0]])])
    log_pred = torch.cat([image_tensor([[0.0, 0.0], [7.0, 1.0]]), image_tensor([[9.0, 9.0], [9.0, 9.0]])])
    valid = torch.tensor([[[[True, True], [True, False]]], [[[False, False], [False, False]]]])
    # Image 0: pixel (1,0) has depth 0 and pixel (1,1) is masked: d = [0, -log 2]. Image 1 has no valid pixel.
    d = [0.0, -math.log(2)]
    expected = sum(x * x for x in d) / 2 - 0.5 * (sum(d) / 2) ** 2
    assert scale_invariant_log_loss(log_pred, target, valid).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_normal_loss_by_hand():
    target = normal_tensor([[[1, 0, 0], [1, 0, 0]], [[1, 0, 0], [0, 0, 1]]])
    # Same direction (not unit length), 90 degrees, 45 degrees, and a masked pixel.
    pred = normal_tensor([[[2, 0, 0], [0, 1, 0]], [[1, 1, 0], [0, 0, -1]]])
    valid = torch.tensor([[[[True, True], [True, False]]]])
    expected = (0.0 + 1.0 + (1.0 - 1.0 / math.sqrt(2.0))) / 3
    assert cosine_normal_loss(pred, target, valid).item() == pytest.approx(expected, rel=1e-6)
    # A zero target is no surface: ignored even where valid.
    target_with_hole = target.clone()
    target_with_hole[..., 1, 1] = 0.0
    assert cosine_normal_loss(pred, target_with_hole, ALL_VALID).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_contour_loss_by_hand():
    logits = image_tensor([[0.0, 2.0], [-1.0, 3.0]])
    target = image_tensor([[1.0, 0.0], [0.0, 0.0]])
    # |Y+| = 1, |Y-| = 3, beta = 3/4; -log sigma(x) = log(1 + e^-x), -log(1 - sigma(x)) = log(1 + e^x).
    beta = 3 / 4
    positive = math.log(1 + math.exp(-0.0))
    negative = math.log(1 + math.exp(2.0)) + math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(3.0))
    expected = (beta * positive + (1 - beta) * negative) / 4
    assert balanced_contour_loss(logits, target, ALL_VALID).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_contour_loss_beta_is_per_image():
    logits = torch.cat([image_tensor([[1.0, -1.0], [0.5, 0.0]]), image_tensor([[2.0, 0.0], [0.0, -2.0]])])
    target = torch.cat([image_tensor([[1.0, 0.0], [0.0, 0.0]]), image_tensor([[1.0, 1.0], [0.0, 0.0]])])
    valid = torch.ones(2, 1, 2, 2, dtype=torch.bool)

    def softplus(x):
        return math.log(1 + math.exp(x))

    # Image 0: beta = 3/4. Image 1: beta = 2/4.
    first = (3 / 4 * softplus(-1.0) + 1 / 4 * (softplus(-1.0) + softplus(0.5) + softplus(0.0))) / 4
    second = (2 / 4 * (softplus(-2.0) + softplus(0.0)) + 2 / 4 * (softplus(0.0) + softplus(-2.0))) / 4
    expected = (first + second) / 2
    assert balanced_contour_loss(logits, target, valid).item() == pytest.approx(expected, rel=1e-6)


def test_balanced_contour_loss_is_stable_for_large_logits():
    logits = image_tensor([[200.0, -200.0], [-200.0, 200.0]])
    target = image_tensor([[1.0, 0.0], [0.0, 0.0]])
    logits.requires_grad_(True)
    loss = balanced_contour_loss(logits, target, ALL_VALID)
    loss.backward()
    # Only the last pixel is wrong, by a logit of 200: -log(1 - sigma(200)) = 200 (to float precision).
    assert loss.item() == pytest.approx(0.25 * 200.0 / 4, rel=1e-5)
    assert torch.isfinite(logits.grad).all()


# --- invalid pixels contribute nothing ---------------------------------------------------------------------------


def random_case(channels):
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, channels, 8, 8, generator=generator)
    target = torch.rand(2, channels, 8, 8, generator=generator) + 0.5
    valid = torch.rand(2, 1, 8, 8, generator=generator) > 0.3
    return pred, target, valid


@pytest.mark.parametrize(("loss_fn", "channels"), [(scale_invariant_log_loss, 1), (cosine_normal_loss, 3),
                                                   (balanced_contour_loss, 1)])
def test_invalid_pixels_contribute_nothing(loss_fn, channels):
    pred, target, valid = random_case(channels)
    if loss_fn is balanced_contour_loss:
        target = (target > 1.2).float()
    generator = torch.Generator().manual_seed(1)
    noise_pred = torch.randn(pred.shape, generator=generator) * 10
    noise_target = torch.rand(target.shape, generator=generator) * 10
    changed_pred = torch.where(valid, pred, noise_pred).requires_grad_(True)
    changed_target = torch.where(valid, target, noise_target.round() if loss_fn is balanced_contour_loss
                                 else noise_target)
    loss = loss_fn(pred, target, valid)
    changed = loss_fn(changed_pred, changed_target, valid)
    assert changed.item() == pytest.approx(loss.item(), rel=1e-6)
    changed.backward()
    assert (changed_pred.grad * ~valid).abs().max() == 0


def test_losses_are_float32_and_connected_when_nothing_is_valid():
    pred = torch.randn(1, 3, 2, 2, dtype=torch.bfloat16, requires_grad=True)
    none = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    for loss in (scale_invariant_log_loss(pred[:, :1], torch.ones(1, 1, 2, 2), none),
                 cosine_normal_loss(pred, torch.ones(1, 3, 2, 2), none),
                 balanced_contour_loss(pred[:, :1], torch.ones(1, 1, 2, 2), none)):
        assert loss.dtype == torch.float32
        assert loss.item() == 0.0
        loss.backward()


# --- metrics -----------------------------------------------------------------------------------------------------


def test_depth_metrics():
    target = torch.tensor([1.0, 2.0, 4.0, 0.0]).view(1, 1, 2, 2)
    valid = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    perfect = depth_metrics(target.clamp(min=0.5), target, valid)
    assert perfect["abs_rel"].item() == 0.0
    assert perfect["rmse"].item() == 0.0
    assert perfect["delta1"].item() == 1.0
    doubled = depth_metrics(2 * target, target, valid)  # the zero-depth pixel is ignored
    assert doubled["abs_rel"].item() == pytest.approx(1.0)
    assert doubled["rmse"].item() == pytest.approx(math.sqrt((1 + 4 + 16) / 3))
    assert doubled["delta1"].item() == 0.0
    assert depth_metrics(1.2 * target, target, valid)["delta1"].item() == 1.0
    # Averaged per image: one image with one pixel 50% off, one image exact.
    targets = torch.cat([torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 2.0)])
    preds = targets.clone()
    preds[0, 0, 0, 0] = 3.0
    one_pixel = torch.zeros(2, 1, 2, 2, dtype=torch.bool)
    one_pixel[0, 0, 0, 0] = True
    one_pixel[1] = True
    metrics = depth_metrics(preds, targets, one_pixel)
    assert metrics["abs_rel"].item() == pytest.approx((0.5 + 0.0) / 2)
    assert metrics["rmse"].item() == pytest.approx((1.0 + 0.0) / 2)
    assert metrics["delta1"].item() == pytest.approx((0.0 + 1.0) / 2)


def test_normal_metrics():
    generator = torch.Generator().manual_seed(0)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 4, generator=generator), dim=1)
    valid = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    perfect = normal_metrics(3 * target, target, valid)
    assert perfect["mean_angle"].item() == pytest.approx(0.0, abs=0.05)
    assert perfect["median_angle"].item() == pytest.approx(0.0, abs=0.05)
    for name in ("within_11_25", "within_22_5", "within_30"):
        assert perfect[name].item() == 1.0
    x_axis = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    y_axis = torch.tensor([0.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    right_angle = normal_metrics(y_axis, x_axis, torch.ones(1, 1, 2, 2, dtype=torch.bool))
    assert right_angle["mean_angle"].item() == pytest.approx(90.0)
    assert right_angle["median_angle"].item() == pytest.approx(90.0)
    assert right_angle["within_30"].item() == 0.0
    # Errors of 0, 0 and 90 degrees, and a masked pixel whose error would be 180.
    valid = torch.tensor([[[[True, True], [True, False]]]])
    grid = torch.stack([torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]),
                        torch.tensor([0.0, 1.0, 0.0]), torch.tensor([-1.0, 0.0, 0.0])]).T.reshape(1, 3, 2, 2)
    mixed = normal_metrics(grid, x_axis, valid)
    assert mixed["mean_angle"].item() == pytest.approx(30.0)
    assert mixed["median_angle"].item() == pytest.approx(0.0, abs=0.05)
    assert mixed["within_30"].item() == pytest.approx(2 / 3)


def square_contour(size=16, low=4, high=12):
    contour = torch.zeros(1, 1, size, size)
    contour[..., low:high, low:high] = 1.0
    contour[..., low + 1:high - 1, low + 1:high - 1] = 0.0
    return contour


def test_contour_prf():
    target = square_contour()
    perfect = contour_prf(target, target)
    assert perfect["precision"].item() == 1.0
    assert perfect["recall"].item() == 1.0
    assert perfect["f_score"].item() == 1.0
    # One pixel off is within the default tolerance; not with tolerance 0; two pixels off is not.
    shifted = torch.roll(target, shifts=1, dims=-1)
    assert contour_prf(shifted, target)["f_score"].item() == 1.0
    assert contour_prf(shifted, target, tolerance=0)["f_score"].item() < 0.6
    two_off = torch.roll(target, shifts=(2, 2), dims=(-2, -1))
    assert contour_prf(two_off, target)["f_score"].item() < 0.3
    # No prediction: precision, recall and F are 0, not NaN.
    nothing = contour_prf(torch.zeros_like(target), target)
    assert nothing["f_score"].item() == 0.0
    # The ring at 0.8 and scattered false positives at 0.3, far from it: the best threshold is the first above 0.3.
    noisy = 0.8 * target
    noisy[..., 0, ::3] = 0.3
    best = contour_prf(noisy, target)
    assert best["threshold"].item() == pytest.approx(0.35)
    assert best["f_score"].item() == 1.0
    assert contour_prf(noisy, target, thresholds=[0.25])["precision"].item() < 1.0


def test_contour_counts_match_a_naive_loop():
    generator = torch.Generator().manual_seed(0)
    prob = torch.rand(3, 1, 10, 12, generator=generator)
    target = (torch.rand(3, 1, 10, 12, generator=generator) > 0.8).float()
    valid = torch.rand(3, 1, 10, 12, generator=generator) > 0.2
    thresholds = [0.9, 0.1, 0.5, 0.5, 0.33]
    for tolerance in (0, 1, 2):
        rows = []
        for threshold in thresholds:
            predicted = (prob >= threshold) & valid
            contour = (target > 0.5) & valid
            dilate = torch.nn.MaxPool2d(2 * tolerance + 1, stride=1, padding=tolerance)
            rows.append([(predicted & (dilate(contour.float()) > 0)).sum().item(), predicted.sum().item(),
                         (contour & (dilate(predicted.float()) > 0)).sum().item(), contour.sum().item()])
        expected = torch.tensor(rows, dtype=torch.float64)
        torch.testing.assert_close(contour_match_counts(prob, target, thresholds, valid, tolerance), expected)


def test_contour_counts_sum_over_batches():
    generator = torch.Generator().manual_seed(0)
    prob = torch.rand(4, 1, 12, 12, generator=generator)
    target = (torch.rand(4, 1, 12, 12, generator=generator) > 0.8).float()
    whole = contour_match_counts(prob, target)
    parts = contour_match_counts(prob[:2], target[:2]) + contour_match_counts(prob[2:], target[2:])
    torch.testing.assert_close(whole, parts)
    assert contour_prf_from_counts(parts) == contour_prf(prob, target)


# --- heads -------------------------------------------------------------------------------------------------------


def plane_and_square_batch(size=32):
    """Two rendered-like frames with analytic labels: a tilted plane's depth and normals, and a square's outline.

    The plane n . X = -c (n unit, facing the camera) seen through a pinhole with focal ``size`` has depth
    z = c / -(n . r) along the ray r = ((u - cx) / f, (v - cy) / f, 1), and normal n everywhere.
    """
    v, u = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                          indexing="ij")
    centre = (size - 1) / 2
    rays = torch.stack([(u - centre) / size, (v - centre) / size, torch.ones_like(u)])
    frames = []
    for normal, distance, (low, high) in [((0.0, -0.6, -0.8), 2.0, (8, 20)),
                                          ((0.5, 0.0, -math.sqrt(0.75)), 3.0, (12, 28))]:
        n = torch.tensor(normal).view(3, 1, 1)
        depth = distance / -(n * rays).sum(0, keepdim=True)
        square = torch.zeros(1, size, size)
        square[:, low:high, low:high] = 1.0
        contour = square.clone()
        contour[:, low + 1:high - 1, low + 1:high - 1] = 0.0
        image = torch.cat([depth / 4, n[:1].expand(1, size, size), square])
        frames.append({"image": image, "depth": depth, "normals": n.expand(3, size, size), "contours": contour})
    batch = {key: torch.stack([frame[key] for frame in frames]) for key in frames[0]}
    batch["valid"] = torch.ones(2, 1, size, size, dtype=torch.bool)
    return batch


def build(seed=0, **head_kwargs):
    """A ResNet-18 backbone and the three heads, initialised from a fixed seed without touching global state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        backbone = Backbone("resnet18")
        heads = torch.nn.ModuleDict({name: cls(**head_kwargs) for name, cls in HEADS.items()})
    return backbone, heads


@pytest.fixture(scope="module")
def model():
    return build()


def test_decoder_output_size():
    decoder = Decoder([64, 128, 256], channels=16, out_channels=5)
    features = [torch.randn(2, 64, 8, 8), torch.randn(2, 128, 4, 4), torch.randn(2, 256, 2, 2)]
    assert decoder(features, size=(32, 30)).shape == (2, 5, 32, 30)


@pytest.mark.parametrize("name", list(HEADS))
def test_gradients_reach_the_backbone(model, name):
    backbone, heads = model
    backbone.zero_grad(set_to_none=True)
    output = heads[name](plane_and_square_batch(), backbone)
    assert all(value.dim() == 0 for value in output.values())
    output["loss"].backward()
    network = backbone.torchvision_model()
    for parameter in (network.conv1.weight, network.layer1[0].conv1.weight, network.layer4[-1].conv2.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    # Metrics are reported, detached from the graph.
    assert not any(value.requires_grad for key, value in output.items() if key != "loss")


def test_expected_keys(model):
    backbone, heads = model
    with torch.no_grad():
        batch = plane_and_square_batch()
        assert set(heads["depth"](batch, backbone)) == {"loss", "abs_rel", "rmse", "delta1"}
        assert set(heads["normals"](batch, backbone)) == {"loss", "mean_angle", "median_angle", "within_11_25",
                                                          "within_22_5", "within_30"}
        assert set(heads["contours"](batch, backbone)) == {"loss", "precision", "recall", "f_score", "threshold"}
    # Each head names the batch key it is trained on, and consumes rendered batches.
    assert {name: head.target for name, head in heads.items()} == {name: name for name in HEADS}
    assert all(head.domains == ("synthetic",) for head in heads.values())


def test_features_from_the_batch_are_used(model):
    backbone, heads = model
    backbone.eval()
    calls = []
    handle = backbone.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        with torch.no_grad():
            batch = plane_and_square_batch()
            batch_without_valid = {k: v for k, v in batch.items() if k != "valid"}
            features = backbone(batch["image"])
            calls.clear()
            for name, head in heads.items():
                own = head(batch_without_valid, backbone)
                assert len(calls) == 1, "without features, the head runs the backbone itself"
                shared = head({**batch, "features": features}, backbone)
                assert len(calls) == 1, f"{name} ran the backbone although the batch carried features"
                calls.clear()
                for key in own:
                    torch.testing.assert_close(own[key], shared[key], msg=f"{name}/{key}")
            with pytest.raises(KeyError, match="layer1"):
                heads["depth"]({**batch, "features": {"layer4": features["layer4"]}}, backbone)
    finally:
        handle.remove()
        backbone.train()


def test_predictions(model):
    backbone, heads = model
    with torch.no_grad():
        batch = plane_and_square_batch()
        depth = heads["depth"].predict(batch, backbone)
        normals = heads["normals"].predict(batch, backbone)
        contours = heads["contours"].predict(batch, backbone)
    assert depth.shape == (2, 1, 32, 32) and (depth > 0).all()
    assert normals.shape == (2, 3, 32, 32)
    torch.testing.assert_close(normals.norm(dim=1), torch.ones(2, 32, 32))
    assert contours.shape == (2, 1, 32, 32) and ((contours >= 0) & (contours <= 1)).all()


def test_losses_are_float32_under_bf16_autocast(model):
    backbone, heads = model
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch = plane_and_square_batch()
        batch["features"] = backbone(batch["image"])
        assert batch["features"]["layer4"].dtype == torch.bfloat16
        for head in heads.values():
            output = head(batch, backbone)
            assert output["loss"].dtype == torch.float32 and torch.isfinite(output["loss"])
            assert head.predict(batch, backbone).dtype == torch.float32


def test_head_checks_the_backbone_arch():
    with pytest.raises(ValueError, match="stages"):
        DepthHead(stages=["block3"])
    head = DepthHead(backbone_arch="resnet50", stages=["layer3", "layer2"])
    assert head.stages == ("layer2", "layer3")
    with pytest.raises(ValueError, match="resnet50"):
        head(plane_and_square_batch(), Backbone("resnet18"))


def test_overfits_two_frames():
    backbone, heads = build(seed=0)
    batch = plane_and_square_batch()
    # fused: one kernel over all 11 M parameters; the per-tensor loop costs as much as the forward pass here.
    optimizer = torch.optim.Adam([*backbone.parameters(), *heads.parameters()], lr=1e-3, fused=True)
    weights = {"depth": 5.0, "normals": 10.0, "contours": 1.0}
    history = []
    for _ in range(60):
        features = backbone(batch["image"])
        losses = {name: head({**batch, "features": features}, backbone)["loss"] for name, head in heads.items()}
        total = sum(weights[name] * loss for name, loss in losses.items())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append({name: loss.item() for name, loss in losses.items()})
    for name in HEADS:
        first = history[0][name]
        # The last few steps' best, so one noisy step (BatchNorm on two images) cannot fail the test.
        last = min(step[name] for step in history[-5:])
        assert last < 0.5 * first, f"{name}: loss {first:.4f} -> {last:.4f}"
