"""Synthetic-label objectives: depth, surface-normal and instance-contour heads trained on rendered frames.

Ren & Lee, "Cross-Domain Self-supervised Multi-task Feature Learning using Synthetic Imagery", CVPR 2018, train
one encoder with three decoders that predict a rendered image's depth, surface normals and instance contours.
Each head here owns its decoder (an FPN-style top-down path over backbone stages); the encoder, a
:class:`synth.backbone.Backbone`, is shared and passed in at every call. A head's ``forward`` returns
``{"loss": ..., <metric>: ...}`` as 0-dim tensors and keeps no state between calls; its ``predict`` returns the
prediction at input resolution. The metric computations are plain functions too, so evaluation can run them on
accumulated predictions.

Batch contract (``batch`` is a dict of tensors; ``B`` images of ``H x W``):

- ``image`` :math:`(B, 3, H, W)` float, normalised;
- ``depth`` :math:`(B, 1, H, W)` planar depth in metres, 0 where invalid;
- ``normals`` :math:`(B, 3, H, W)` unit vectors in the camera frame, 0 where invalid;
- ``contours`` :math:`(B, 1, H, W)` float in {0, 1};
- ``valid`` :math:`(B, 1, H, W)` bool, pixels that carry labels (all pixels when absent);
- ``features`` (optional): ``backbone(batch["image"])``, computed once for all heads by the engine.
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synth.backbone import Backbone, resolve_stages

#: Thresholds at which :func:`contour_prf` looks for the best F-score.
DEFAULT_CONTOUR_THRESHOLDS: tuple[float, ...] = tuple(round(0.05 * k, 2) for k in range(1, 20))

#: Angle thresholds (degrees) of the surface-normal accuracy metrics.
NORMAL_ANGLE_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def scale_invariant_log_loss(log_pred: Tensor, target: Tensor, valid: Tensor, weight: float = 0.5) -> Tensor:
    r"""Scale-invariant log-depth error of Eigen, Puhrsch & Fergus, "Depth Map Prediction from a Single Image
    using a Multi-Scale Deep Network", NIPS 2014 (their Eq. 4).

    Per image, with :math:`d_p = \hat{z}_p - \log z_p` over its :math:`n` valid pixels,

    .. math::
        L = \frac{1}{n}\sum_p d_p^2 - \frac{\lambda}{n^2}\Big(\sum_p d_p\Big)^2,

    averaged over the images that have at least one valid pixel. :math:`\lambda = 0` is the plain log-MSE,
    :math:`\lambda = 1` ignores a global scale entirely; Eigen et al. train with 0.5.

    Args:
        log_pred: predicted log-depth :math:`\hat{z}`.
        target: depth in metres; pixels where it is not positive are ignored.
        valid: pixels to use.
        weight: :math:`\lambda`.

    Shape:
        - log_pred, target: :math:`(B, 1, H, W)`; valid: :math:`(B, 1, H, W)` bool.
        - Output: scalar, float32. Zero (still connected to ``log_pred``) when no pixel is valid.
    """
    log_pred = log_pred.float()
    valid = valid & (target > 0)
    # Log of 1 at invalid pixels keeps NaN out of the graph; those pixels are masked anyway.
    diff = torch.where(valid, log_pred - torch.where(valid, target.float(), 1.0).log(), 0.0)
    count = valid.flatten(1).sum(1)
    has_pixels = count > 0
    n = count.clamp(min=1)
    per_image = diff.square().flatten(1).sum(1) / n - weight * (diff.flatten(1).sum(1) / n).square()
    return _masked_mean(per_image, has_pixels)


def cosine_normal_loss(pred: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    r"""Cosine loss on unit surface normals, as used by Ren & Lee (CVPR 2018) for their normal decoder.

    .. math::
        L = \frac{1}{N}\sum_{p\ \mathrm{valid}} \left(1 - \frac{\hat{n}_p \cdot n_p}{\|\hat{n}_p\|\,\|n_p\|}\right)

    over the :math:`N` valid pixels of the whole batch. Pixels whose target is the zero vector are ignored.

    Args:
        pred: predicted normals (normalised here, so raw decoder outputs are fine).
        target: unit normals, 0 where there is no surface.
        valid: pixels to use.

    Shape:
        - pred, target: :math:`(B, 3, H, W)`; valid: :math:`(B, 1, H, W)` bool.
        - Output: scalar, float32. Zero (still connected to ``pred``) when no pixel is valid.
    """
    pred = pred.float()
    valid = (valid & (target.square().sum(1, keepdim=True) > 0))[:, 0]
    return _masked_mean(1.0 - _cosine(pred, target.float()), valid)


def balanced_contour_loss(logits: Tensor, target: Tensor, valid: Tensor) -> Tensor:
    r"""Class-balanced sigmoid cross-entropy of HED (Xie & Tu, "Holistically-Nested Edge Detection", ICCV 2015,
    their Eq. 2), normalised by pixel count.

    Per image, over its :math:`n` valid pixels with contour pixels :math:`Y_+` and the others :math:`Y_-`,
    :math:`\beta = |Y_-| / (|Y_+| + |Y_-|)` and

    .. math::
        L = -\frac{1}{n}\Big(\beta\sum_{p \in Y_+}\log\sigma(x_p)
            + (1 - \beta)\sum_{p \in Y_-}\log\big(1 - \sigma(x_p)\big)\Big),

    averaged over the images that have at least one valid pixel. Contours are a few percent of the pixels, so
    without :math:`\beta` the loss is minimised by predicting no contour at all. An image with no contour pixel
    has :math:`\beta = 1` and contributes 0, as in HED. :math:`\log\sigma(x)` and :math:`\log(1-\sigma(x)) =
    \log\sigma(-x)` are computed with ``logsigmoid``, which is exact for large :math:`|x|`. A soft target
    :math:`y \in [0, 1]` counts :math:`y` towards :math:`Y_+` and :math:`1 - y` towards :math:`Y_-`.

    Args:
        logits: contour logits :math:`x`.
        target: contour labels :math:`y`.
        valid: pixels to use.

    Shape:
        - logits, target: :math:`(B, 1, H, W)`; valid: :math:`(B, 1, H, W)` bool.
        - Output: scalar, float32. Zero (still connected to ``logits``) when no pixel is valid.
    """
    logits = logits.float()
    target = torch.where(valid, target.float(), 0.0)
    negative = torch.where(valid, 1.0 - target, 0.0)
    count = valid.flatten(1).sum(1)
    has_pixels = count > 0
    n = count.clamp(min=1)
    beta = negative.flatten(1).sum(1) / n
    beta = beta.view(-1, *([1] * (logits.dim() - 1)))
    per_pixel = beta * target * F.logsigmoid(logits) + (1.0 - beta) * negative * F.logsigmoid(-logits)
    per_image = -per_pixel.flatten(1).sum(1) / n
    return _masked_mean(per_image, has_pixels)


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine of the angle between ``a`` and ``b`` along dim 1; 0 where either is the zero vector.

    Written out rather than with ``F.normalize`` or ``F.cosine_similarity``, which are tens of times slower on CPU for
    (B, 3, H, W) maps (they reduce over the strided channel dim through a generic norm kernel).
    """
    dot = (a * b).sum(1)
    return dot * (a.square().sum(1) * b.square().sum(1)).clamp(min=1e-24).rsqrt()


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask``; 0 when the mask is empty, still connected to the graph.

    Masking with ``where`` rather than boolean indexing keeps the shapes static: no host sync on the GPU.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def depth_metrics(pred: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
    r"""Standard monocular-depth metrics (Eigen, Puhrsch & Fergus, NIPS 2014) on valid pixels.

    Per image, over pixels with ``valid`` and a positive target,

    .. math::
        \mathrm{abs\_rel} = \frac{1}{n}\sum_p \frac{|\hat{z}_p - z_p|}{z_p}, \quad
        \mathrm{rmse} = \sqrt{\frac{1}{n}\sum_p (\hat{z}_p - z_p)^2}, \quad
        \delta_1 = \frac{1}{n}\Big|\Big\{p : \max\Big(\frac{\hat{z}_p}{z_p}, \frac{z_p}{\hat{z}_p}\Big)
        < 1.25\Big\}\Big|,

    then averaged over the images that have valid pixels (as in Eigen et al.'s evaluation). There is no median
    scaling: rendered depth is metric, the camera is known, and the head is trained with :math:`\lambda = 0.5`,
    which keeps half of the global-scale term, so the absolute scale is part of what is learned; rescaling each
    prediction to the target's median would hide scale errors.

    Args:
        pred: predicted depth in metres (positive).
        target: depth in metres, 0 where invalid.
        valid: pixels to use.

    Shape:
        - pred, target: :math:`(B, 1, H, W)`; valid: :math:`(B, 1, H, W)` bool.
        - Output: ``{"abs_rel", "rmse", "delta1"}``, 0-dim float32 tensors; NaN when no pixel is valid.
    """
    pred, target = pred.float(), target.float()
    valid = valid & (target > 0)
    safe_target = torch.where(valid, target, 1.0)
    safe_pred = torch.where(valid, pred.clamp(min=torch.finfo(torch.float32).tiny), 1.0)
    count = valid.flatten(1).sum(1)
    keep = count > 0
    n = count.clamp(min=1)

    def per_image_mean(values: Tensor) -> Tensor:
        return torch.where(valid, values, 0.0).flatten(1).sum(1) / n

    abs_rel = per_image_mean((safe_pred - safe_target).abs() / safe_target)
    rmse = per_image_mean((safe_pred - safe_target).square()).sqrt()
    ratio = torch.maximum(safe_pred / safe_target, safe_target / safe_pred)
    delta1 = per_image_mean((ratio < 1.25).float())
    return {name: value[keep].mean() for name, value in
            (("abs_rel", abs_rel), ("rmse", rmse), ("delta1", delta1))}


@torch.no_grad()
def normal_metrics(pred: Tensor, target: Tensor, valid: Tensor) -> dict[str, Tensor]:
    r"""Surface-normal angular errors, as reported by Eigen & Fergus (ICCV 2015) and Ren & Lee (CVPR 2018).

    With :math:`\theta_p = \arccos\frac{\hat{n}_p \cdot n_p}{\|\hat{n}_p\|\|n_p\|}` in degrees over all valid
    pixels of the batch: the mean and median of :math:`\theta`, and the fraction of pixels with
    :math:`\theta < t` for :math:`t \in \{11.25, 22.5, 30\}`.

    Args:
        pred: predicted normals (need not be unit length).
        target: unit normals, 0 where invalid.
        valid: pixels to use.

    Shape:
        - pred, target: :math:`(B, 3, H, W)`; valid: :math:`(B, 1, H, W)` bool.
        - Output: ``{"mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30"}``, 0-dim
          float32 tensors; NaN when no pixel is valid.
    """
    valid = (valid & (target.square().sum(1, keepdim=True) > 0))[:, 0]
    cosine = _cosine(pred.float(), target.float())[valid]
    angle = torch.rad2deg(torch.acos(cosine.clamp(-1.0, 1.0)))
    if angle.numel() == 0:
        nan = torch.tensor(math.nan, device=pred.device)
        angle_metrics = {"mean_angle": nan, "median_angle": nan}
        return angle_metrics | {_within_name(t): nan for t in NORMAL_ANGLE_THRESHOLDS}
    metrics = {"mean_angle": angle.mean(), "median_angle": angle.median()}
    for threshold in NORMAL_ANGLE_THRESHOLDS:
        metrics[_within_name(threshold)] = (angle < threshold).float().mean()
    return metrics


def _within_name(threshold: float) -> str:
    """Metric name of an angle threshold: 11.25 -> ``within_11_25``, 30.0 -> ``within_30``."""
    return "within_" + f"{threshold:g}".replace(".", "_")


@torch.no_grad()
def contour_match_counts(prob: Tensor, target: Tensor, thresholds: Sequence[float] = DEFAULT_CONTOUR_THRESHOLDS,
                         valid: Tensor | None = None, tolerance: int = 1) -> Tensor:
    r"""Contour match counts at each threshold, to sum over batches before :func:`contour_prf_from_counts`.

    A predicted contour pixel (:math:`p \ge t`) is correct when a target contour lies within ``tolerance``
    pixels (Chebyshev distance); a target contour pixel is recalled when a predicted one does. Both use a
    :math:`(2k+1) \times (2k+1)` max-pool as the dilation. This approximates the BSDS benchmark's bipartite
    matching (Martin, Fowlkes & Malik, TPAMI 2004) without its one-to-one constraint and without thinning.

    Args:
        prob: contour probabilities.
        target: contour labels in {0, 1} (values above 0.5 count as contour).
        thresholds: probability thresholds :math:`t`, in any order.
        valid: pixels to count (all when ``None``).
        tolerance: matching radius :math:`k` in pixels.

    Shape:
        - prob, target, valid: :math:`(B, 1, H, W)`.
        - Output: :math:`(K, 4)` float64 for :math:`K` thresholds, columns (correct predictions, predictions,
          recalled targets, targets).
    """
    prob = prob.float()
    valid = torch.ones_like(prob, dtype=torch.bool) if valid is None else valid.bool()
    kernel = 2 * tolerance + 1
    target = (target > 0.5) & valid
    near_target = F.max_pool2d(target.float(), kernel, stride=1, padding=tolerance) > 0
    # Dilating the thresholded prediction is thresholding the max-pooled probability, so one pooling serves
    # every threshold, and each count is a histogram of probabilities read from the top.
    near_probability = F.max_pool2d(torch.where(valid, prob, -1.0), kernel, stride=1, padding=tolerance)
    unordered = torch.tensor(list(thresholds), dtype=torch.float32, device=prob.device)
    order = unordered.argsort()
    ordered = unordered[order]

    # right=True puts v in bucket i where ordered[i-1] <= v < ordered[i], so v >= ordered[k] iff its bucket > k.
    prob_bucket = torch.bucketize(prob, ordered, right=True)
    near_bucket = torch.bucketize(near_probability, ordered, right=True)

    def at_least(buckets: Tensor, mask: Tensor) -> Tensor:
        """For each sorted threshold, how many pixels in ``mask`` have a value at or above it."""
        # Pixels outside the mask go to an extra last bin, cheaper than boolean indexing into a copy.
        histogram = torch.bincount(torch.where(mask, buckets, len(ordered) + 1).flatten(), minlength=len(ordered) + 2)
        return histogram[:-1].flip(0).cumsum(0).flip(0)[1:]

    counts = torch.stack([at_least(prob_bucket, valid & near_target), at_least(prob_bucket, valid),
                          at_least(near_bucket, target), target.sum().expand(len(ordered))], dim=1).double()
    # Back to the caller's order of thresholds.
    restored = torch.empty_like(counts)
    restored[order] = counts
    return restored


def contour_prf_from_counts(counts: Tensor, thresholds: Sequence[float] = DEFAULT_CONTOUR_THRESHOLDS
                            ) -> dict[str, Tensor]:
    r"""Precision, recall and F-score at the threshold with the best F, from (summed) match counts.

    .. math::
        P = \frac{\text{correct predictions}}{\text{predictions}}, \quad
        R = \frac{\text{recalled targets}}{\text{targets}}, \quad F = \frac{2PR}{P + R},

    one threshold for the whole set ("ODS", optimal dataset scale, in the BSDS benchmark's terms). An empty
    denominator gives 0.

    Shape:
        - counts: :math:`(K, 4)` from :func:`contour_match_counts`.
        - Output: ``{"precision", "recall", "f_score", "threshold"}``, 0-dim float32 tensors.
    """
    correct, predicted, recalled, targets = counts.unbind(1)
    precision = correct / predicted.clamp(min=1)
    recall = recalled / targets.clamp(min=1)
    f_score = 2 * precision * recall / (precision + recall).clamp(min=torch.finfo(torch.float64).tiny)
    best = int(f_score.argmax())
    values = {"precision": precision[best], "recall": recall[best], "f_score": f_score[best],
              "threshold": torch.tensor(thresholds[best], dtype=torch.float64, device=counts.device)}
    return {name: value.float() for name, value in values.items()}


@torch.no_grad()
def contour_prf(prob: Tensor, target: Tensor, thresholds: Sequence[float] = DEFAULT_CONTOUR_THRESHOLDS,
                valid: Tensor | None = None, tolerance: int = 1) -> dict[str, Tensor]:
    r"""Contour precision, recall and F-score at the best threshold over the whole batch ("ODS").

    :func:`contour_match_counts` then :func:`contour_prf_from_counts`; see those for the matching rule.

    Args:
        prob: contour probabilities.
        target: contour labels in {0, 1}.
        thresholds: probability thresholds to search.
        valid: pixels to count (all when ``None``).
        tolerance: matching radius in pixels.

    Shape:
        - prob, target, valid: :math:`(B, 1, H, W)`.
        - Output: ``{"precision", "recall", "f_score", "threshold"}``, 0-dim float32 tensors.
    """
    counts = contour_match_counts(prob, target, thresholds, valid=valid, tolerance=tolerance)
    return contour_prf_from_counts(counts, thresholds)


# ---------------------------------------------------------------------------------------------------------------
# Decoder and heads
# ---------------------------------------------------------------------------------------------------------------


class Decoder(nn.Module):
    r"""FPN-style top-down decoder over backbone stages (Lin et al., "Feature Pyramid Networks for Object
    Detection", CVPR 2017), predicting a dense map at the input resolution.

    A 1x1 lateral convolution brings each stage to ``channels``; from the coarsest stage down, the running map is
    upsampled (nearest, as in FPN) to the next stage's size and added to its lateral. Two 3x3 convolutions with
    GroupNorm (independent of the batch size, which is small on dense tasks) and ReLU then refine the finest map,
    a 1x1 convolution predicts ``out_channels``, and the prediction is upsampled bilinearly to the input size,
    as in the semantic branch of Panoptic FPN (Kirillov et al., CVPR 2019).

    Args:
        in_channels: channels of each input stage, finest first.
        channels: width of the top-down path.
        out_channels: channels of the prediction.

    Inputs: ``features``, ``size``
        - **features**: one tensor per stage, finest first, each :math:`(B, C_i, H_i, W_i)`.
        - **size**: the output :math:`(H, W)`.

    Shape:
        - Output: :math:`(B, C_{out}, H, W)`, in the dtype of the computation (bf16 under autocast).

    Examples:
        >>> decoder = Decoder([64, 128], channels=32, out_channels=1)
        >>> decoder([torch.zeros(2, 64, 8, 8), torch.zeros(2, 128, 4, 4)], size=(32, 32)).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 64, out_channels: int = 1):
        super().__init__()
        if not in_channels:
            raise ValueError("Decoder needs at least one input stage")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, kernel_size=1) for c in in_channels)
        groups = math.gcd(32, channels)
        self.refine = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(groups, channels),
            nn.ReLU(inplace=True),
        )
        self.predict = nn.Conv2d(channels, out_channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        if len(features) != len(self.lateral):
            raise ValueError(f"Decoder expects {len(self.lateral)} stages, got {len(features)}")
        top_down = self.lateral[-1](features[-1])
        for lateral, feature in zip(reversed(self.lateral[:-1]), reversed(features[:-1]), strict=True):
            top_down = lateral(feature) + F.interpolate(top_down, size=feature.shape[-2:], mode="nearest")
        prediction = self.predict(self.refine(top_down))
        return F.interpolate(prediction, size=tuple(size), mode="bilinear", align_corners=False)


class SyntheticObjective(nn.Module):
    """Base of the synthetic-label heads: a :class:`Decoder` over backbone stages, fed from the batch.

    Subclasses define ``forward`` (loss and metrics) and ``predict`` (the prediction at input resolution). This
    is the encoder/decoder split of Ren & Lee (CVPR 2018): the encoder is shared, each task decodes on its own.

    Args:
        out_channels: channels the decoder predicts.
        backbone_arch: the backbone's architecture, to size the lateral convolutions (see
            :data:`synth.backbone.STAGE_CHANNELS`).
        stages: backbone stages to decode from; ``None`` means the last four (``layer1`` .. ``layer4`` for a
            ResNet, ``block2`` .. ``block5`` for VGG).
        channels: width of the decoder.

    Attributes:
        stages: the stages decoded from, finest first.
        stage_channels: their channel counts, checked against the features at every call.
    """

    #: The batches this objective consumes.
    domains: tuple[str, ...] = ("synthetic",)
    #: The batch key of the labels this head predicts (the engine's pictures put prediction and label side by side).
    target: str = ""

    def __init__(self, out_channels: int, backbone_arch: str = "resnet18", stages: list[str] | None = None,
                 channels: int = 64):
        super().__init__()
        self.stage_channels: dict[str, int] = resolve_stages(type(self).__name__, backbone_arch, stages)
        self.stages: tuple[str, ...] = tuple(self.stage_channels)
        self.backbone_arch = backbone_arch
        self.decoder = Decoder(list(self.stage_channels.values()), channels=channels, out_channels=out_channels)

    def decode(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """The decoder's raw output at input resolution, as float32.

        Uses ``batch["features"]`` when present (the engine computes the backbone once for every head), and
        ``backbone(batch["image"])`` on the stages it needs otherwise.

        Shape:
            - Output: :math:`(B, C_{out}, H, W)` float32.
        """
        image = batch["image"]
        features = batch.get("features")
        if features is None:
            features = backbone(image, stages=self.stages)
        missing = [s for s in self.stages if s not in features]
        if missing:
            raise KeyError(f"{type(self).__name__}: batch['features'] lacks stage(s) {missing}")
        # Checked on the features rather than on backbone.arch, so a wrapped backbone (DDP, compile) works too.
        for stage, channels in self.stage_channels.items():
            if features[stage].shape[1] != channels:
                raise ValueError(f"{type(self).__name__} was built for a {self.backbone_arch} backbone "
                                 f"({stage}: {channels} channels), got {features[stage].shape[1]} channels")
        # Losses and metrics run in float32 even under bf16 autocast: logs, squares and sums over many pixels
        # lose too much with bf16's 8 significant bits.
        return self.decoder([features[s] for s in self.stages], size=image.shape[-2:]).float()

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """The head's prediction at input resolution, for evaluation and pictures."""
        raise NotImplementedError

    @staticmethod
    def valid_mask(batch: Mapping[str, Tensor]) -> Tensor:
        """``batch["valid"]``, or all pixels when the batch has none. Shape :math:`(B, 1, H, W)` bool."""
        valid = batch.get("valid")
        if valid is None:
            image = batch["image"]
            return torch.ones((image.shape[0], 1, *image.shape[-2:]), dtype=torch.bool, device=image.device)
        return valid.bool()


class DepthHead(SyntheticObjective):
    r"""Depth decoder trained with the scale-invariant log error (Ren & Lee, CVPR 2018, after Eigen, Puhrsch &
    Fergus, NIPS 2014).

    The decoder predicts log-depth :math:`\hat{z}`, so depth :math:`e^{\hat{z}}` is positive and errors are
    relative. The loss is :func:`scale_invariant_log_loss`; metrics are :func:`depth_metrics` on
    :math:`e^{\hat{z}}` (no median scaling). This project's configs weight this loss 5 in the total
    (normals 10, contours 1).

    Args:
        backbone_arch: the backbone's architecture.
        stages: backbone stages to decode from (``None``: the last four).
        channels: decoder width.
        scale_invariant_weight: :math:`\lambda` of the scale-invariant term.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)`, ``depth`` :math:`(B, 1, H, W)` metres (0 invalid),
          optional ``valid`` :math:`(B, 1, H, W)` bool and ``features``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output of ``forward``: ``{"loss", "abs_rel", "rmse", "delta1"}``, 0-dim float32 tensors.
        - Output of ``predict``: depth in metres, :math:`(B, 1, H, W)` float32.

    Examples:
        >>> backbone, head = Backbone("resnet18"), DepthHead()
        >>> batch = {"image": torch.randn(2, 3, 32, 32), "depth": torch.rand(2, 1, 32, 32) + 1}
        >>> sorted(head(batch, backbone))
        ['abs_rel', 'delta1', 'loss', 'rmse']
    """

    target = "depth"

    def __init__(self, backbone_arch: str = "resnet18", stages: list[str] | None = None, channels: int = 64,
                 scale_invariant_weight: float = 0.5):
        super().__init__(1, backbone_arch=backbone_arch, stages=stages, channels=channels)
        self.scale_invariant_weight = scale_invariant_weight

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        log_depth = self.decode(batch, backbone)
        valid = self.valid_mask(batch)
        loss = scale_invariant_log_loss(log_depth, batch["depth"], valid, weight=self.scale_invariant_weight)
        if not batch.get("with_metrics", True):
            return {"loss": loss}
        return {"loss": loss, **depth_metrics(log_depth.detach().exp(), batch["depth"], valid)}

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """Depth in metres at input resolution, :math:`(B, 1, H, W)` float32."""
        return self.decode(batch, backbone).exp()


class NormalHead(SyntheticObjective):
    r"""Surface-normal decoder trained with the cosine loss on unit normals (Ren & Lee, CVPR 2018).

    The decoder predicts 3 channels, L2-normalised into a unit normal. The loss is :func:`cosine_normal_loss`;
    metrics are :func:`normal_metrics`. This project's configs weight this loss 10 in the total (depth 5,
    contours 1).

    Args:
        backbone_arch: the backbone's architecture.
        stages: backbone stages to decode from (``None``: the last four).
        channels: decoder width.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)`, ``normals`` :math:`(B, 3, H, W)` unit vectors (0 invalid),
          optional ``valid`` :math:`(B, 1, H, W)` bool and ``features``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output of ``forward``: ``{"loss", "mean_angle", "median_angle", "within_11_25", "within_22_5",
          "within_30"}``, 0-dim float32 tensors (angles in degrees).
        - Output of ``predict``: unit normals :math:`(B, 3, H, W)` float32.
    """

    target = "normals"

    def __init__(self, backbone_arch: str = "resnet18", stages: list[str] | None = None, channels: int = 64):
        super().__init__(3, backbone_arch=backbone_arch, stages=stages, channels=channels)

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        raw = self.decode(batch, backbone)
        valid = self.valid_mask(batch)
        loss = cosine_normal_loss(raw, batch["normals"], valid)
        if not batch.get("with_metrics", True):
            return {"loss": loss}
        return {"loss": loss, **normal_metrics(raw.detach(), batch["normals"], valid)}

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """Unit normals at input resolution, :math:`(B, 3, H, W)` float32."""
        raw = self.decode(batch, backbone)
        return raw * raw.square().sum(1, keepdim=True).clamp(min=1e-24).rsqrt()


class ContourHead(SyntheticObjective):
    r"""Instance-contour decoder trained with HED's class-balanced cross-entropy (Ren & Lee, CVPR 2018, after
    Xie & Tu, ICCV 2015).

    The decoder predicts one logit per pixel. The loss is :func:`balanced_contour_loss`; metrics are
    :func:`contour_prf` over the batch (best threshold, 1-pixel tolerance by default). This project's configs
    weight this loss 1 in the total (depth 5, normals 10).

    Args:
        backbone_arch: the backbone's architecture.
        stages: backbone stages to decode from (``None``: the last four).
        channels: decoder width.
        thresholds: probability thresholds searched by the F-score metric.
        tolerance: matching radius of the metric, in pixels.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)`, ``contours`` :math:`(B, 1, H, W)` in {0, 1}, optional
          ``valid`` :math:`(B, 1, H, W)` bool and ``features``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output of ``forward``: ``{"loss", "precision", "recall", "f_score", "threshold"}``, 0-dim float32.
        - Output of ``predict``: contour probabilities :math:`(B, 1, H, W)` float32.
    """

    target = "contours"

    def __init__(self, backbone_arch: str = "resnet18", stages: list[str] | None = None, channels: int = 64,
                 thresholds: tuple[float, ...] = DEFAULT_CONTOUR_THRESHOLDS, tolerance: int = 1):
        super().__init__(1, backbone_arch=backbone_arch, stages=stages, channels=channels)
        self.thresholds = tuple(thresholds)
        self.tolerance = tolerance

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        logits = self.decode(batch, backbone)
        # Every pixel has a contour label, background included (an object's silhouette borders it): unlike depth
        # and normals, contours are not masked by the surface mask.
        valid = torch.ones_like(batch["contours"], dtype=torch.bool)
        loss = balanced_contour_loss(logits, batch["contours"], valid)
        if not batch.get("with_metrics", True):
            return {"loss": loss}
        metrics = contour_prf(logits.detach().sigmoid(), batch["contours"], self.thresholds, valid=valid,
                              tolerance=self.tolerance)
        return {"loss": loss, **metrics}

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """Contour probabilities at input resolution, :math:`(B, 1, H, W)` float32."""
        return self.decode(batch, backbone).sigmoid()


__all__ = [
    "DEFAULT_CONTOUR_THRESHOLDS",
    "NORMAL_ANGLE_THRESHOLDS",
    "ContourHead",
    "Decoder",
    "DepthHead",
    "NormalHead",
    "SyntheticObjective",
    "balanced_contour_loss",
    "contour_match_counts",
    "contour_prf",
    "contour_prf_from_counts",
    "cosine_normal_loss",
    "depth_metrics",
    "normal_metrics",
    "scale_invariant_log_loss",
]
