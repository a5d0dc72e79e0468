"""Naive baselines: what each real task scores with no network and no pretraining at all.

Random initialisation is a weak reference for some tasks: a random depth head predicts noise, while a vertical ramp
(depth growing towards the top of the image, the prior of every ground-level photo) already scores well. A
pretrained number means something only where it beats BOTH random init at the same budget AND the best of these
rows. Each function here needs no learning beyond counting or a linear fit on raw pixels:

- depth: a constant map and a vertical ramp, median-scaled like every prediction (:func:`constant_depth`,
  :func:`vertical_ramp_depth`);
- classification: the majority class of the training split, and a logistic-regression probe on raw downsampled
  pixels (:func:`raw_pixel_probe`, the same fit as the feature probe);
- detection: one box per class at the class's mean normalised position, scored by the class's frequency
  (:func:`prior_box_detections`);
- segmentation: the per-position majority class of the training masks (:func:`location_prior_segmentation`).

Each task's :func:`naive_scores` entry returns ``{row label: Score}``; :func:`adapt.transfer.runner.run_transfer`
adds them to every report, labelled ``naive:<name>``.
"""

import math
import statistics
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adapt.transfer.classification import dataset_labels, fit_linear_probe, label_subset
from adapt.transfer.common import _resize
from adapt.transfer.depth import _depth_item, median_scaled_depth_metrics
from adapt.transfer.detection import evaluate_detection
from adapt.transfer.results import NAIVE
from adapt.transfer.segmentation import evaluate_segmentation
from adapt.transfer.task import Score


def constant_depth(height: int, width: int) -> Tensor:
    """A constant depth map :math:`(H, W)`; after median scaling it is the median of the ground truth."""
    return torch.ones(height, width)


def vertical_ramp_depth(height: int, width: int) -> Tensor:
    r"""Depth growing linearly towards the top of the image, :math:`(H, W)`: :math:`z(y) = 2 - y / (H - 1)`, 2 in the
    top row and 1 in the bottom row (a ground plane seen from eye height gets farther upwards)."""
    rows = 2.0 - torch.linspace(0.0, 1.0, height) if height > 1 else torch.ones(1)
    return rows[:, None].expand(height, width).clone()


def depth_baseline_metrics(pairs: Sequence, predictor) -> dict[str, float]:
    """Median-scaled ``{"abs_rel", "delta1"}`` of ``predictor(height, width)`` averaged over the items of ``pairs``
    with valid pixels (the protocol of :func:`adapt.transfer.depth.evaluate_depth_zero_shot`)."""
    per_image = []
    for index in range(len(pairs)):
        _, target = _depth_item(pairs[index], index)
        target = target.reshape(target.shape[-2:])
        metrics = median_scaled_depth_metrics(predictor(*target.shape), target)
        if not math.isnan(metrics["abs_rel"]):
            per_image.append(metrics)
    if not per_image:
        return {"abs_rel": math.nan, "delta1": math.nan}
    return {key: statistics.fmean(m[key] for m in per_image) for key in ("abs_rel", "delta1")}


def _labels(dataset) -> np.ndarray:
    return dataset_labels(dataset)


def majority_accuracy(train_set, test_set) -> float:
    """Test accuracy of always answering the training split's most frequent class (ties: the smallest label)."""
    train, test = _labels(train_set), _labels(test_set)
    counts = np.bincount(train)
    return float(np.mean(test == int(np.argmax(counts))))


def raw_pixels(dataset, size: int) -> np.ndarray:
    """Images resized (bilinear, antialiased) to ``size`` x ``size`` and flattened: :math:`(N, 3 S^2)` float32."""
    return np.stack([_resize(torch.as_tensor(dataset[i][0], dtype=torch.float32), size).flatten().numpy()
                     for i in range(len(dataset))])


def raw_pixel_probe(train_set, test_set, size: int = 16, seed: int = 0) -> float:
    """Test accuracy of a logistic-regression probe on raw pixels downsampled to ``size`` (no network)."""
    probe = fit_linear_probe(raw_pixels(train_set, size), _labels(train_set), seed=seed)
    return float(np.mean(probe.predict(raw_pixels(test_set, size)) == _labels(test_set)))


def prior_box_detections(train_set, test_set) -> list[dict[str, Tensor]]:
    """For every test image, one box per training class at that class's mean normalised box, scored by the class's
    share of training boxes (a detector that has learned where and how often, not what)."""
    sums: dict[int, np.ndarray] = {}
    counts: Counter = Counter()
    for i in range(len(train_set)):
        image, target = train_set[i]
        height, width = image.shape[-2:]
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            normalised = np.asarray(box) / np.asarray([width, height, width, height])
            sums[label] = sums.get(label, 0.0) + normalised
            counts[label] += 1
    total = sum(counts.values())
    labels = sorted(counts)
    predictions = []
    for i in range(len(test_set)):
        image, target = test_set[i]
        height, width = image.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        boxes = torch.stack([torch.as_tensor(sums[c] / counts[c], dtype=torch.float32) * scale for c in labels]
                            ) if labels else torch.zeros(0, 4)
        predictions.append({"boxes": boxes, "labels": torch.tensor(labels, dtype=torch.int64),
                            "scores": torch.tensor([counts[c] / total for c in labels], dtype=torch.float32),
                            "image_id": int(target["image_id"])})
    return predictions


def location_prior_segmentation(train_set, test_set, num_classes: int, size: int = 64) -> list[Tensor]:
    """Each test mask predicted as the per-position majority class of the training masks (resized with nearest
    neighbours to ``size`` x ``size`` to be counted, and back to each test image's size)."""
    votes = torch.zeros(num_classes, size, size, dtype=torch.int64)
    for i in range(len(train_set)):
        mask = torch.as_tensor(train_set[i][1]).long()
        small = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
        valid = small != 255
        votes += F.one_hot(small.clamp(0, num_classes - 1), num_classes).permute(2, 0, 1) * valid
    prior = votes.argmax(0)
    predictions = []
    for i in range(len(test_set)):
        height, width = torch.as_tensor(test_set[i][1]).shape[-2:]
        predictions.append(F.interpolate(prior[None, None].float(), size=(height, width), mode="nearest")[0, 0].long())
    return predictions


# ---------------------------------------------------------------------------------------------------------------
# Per task: naive(data, seed, reference) -> {row label: [Score, ...]}, reference being the random-init rows of the
# task, so the naive rows fill the same columns.
# ---------------------------------------------------------------------------------------------------------------


def _columns(reference: Sequence) -> dict[str, list[str]]:
    """``{task: [metric, ...]}`` of reference rows, in order."""
    columns: dict[str, list[str]] = {}
    for row in reference:
        metrics = columns.setdefault(row.task, [])
        metrics += [row.metric] if row.metric not in metrics else []
    return columns


def _label_fraction(metric: str) -> float | None:
    """The label fraction of a few-label fine-tuning metric ``accuracy@<f>``; ``None`` for any other metric."""
    if not metric.startswith("accuracy@"):
        return None
    try:
        return float(metric.removeprefix("accuracy@"))
    except ValueError:
        return None


def classification_naive(data: Mapping, seed: int, reference: Sequence, raw_size: int = 16) -> dict[str, list[Score]]:
    """``naive:majority`` and ``naive:raw_pixels`` (a logistic-regression probe on ``raw_size``-pixel images), each
    accuracy written into every accuracy column of the task (e.g. ``acc@<stage>`` for each stage of the probe).

    A few-label fine-tuning column ``accuracy@<f>`` gets both fit on the same class-stratified ``f`` share of the
    training split that fine-tuning used (:func:`adapt.transfer.classification.label_subset` with ``seed``), so the
    naive row faces the same labels; every other column (``accuracy``, ``acc@<stage>``) gets them fit on the whole
    training split."""
    train, test = data["train"], data["test"]
    fractions = sorted({_label_fraction(metric) or 1.0 for metrics in _columns(reference).values()
                        for metric in metrics} or {1.0})
    accuracy: dict[str, dict[float, float]] = {f"{NAIVE}:majority": {}, f"{NAIVE}:raw_pixels": {}}
    for fraction in fractions:
        subset = label_subset(train, fraction, seed=seed)
        accuracy[f"{NAIVE}:majority"][fraction] = majority_accuracy(subset, test)
        accuracy[f"{NAIVE}:raw_pixels"][fraction] = raw_pixel_probe(subset, test, size=raw_size, seed=seed)
    budgets = {f"{NAIVE}:majority": "no learning",
               f"{NAIVE}:raw_pixels": f"logistic regression on {raw_size}x{raw_size} pixels"}
    return {label: [Score(task, {metric: values[_label_fraction(metric) or 1.0] for metric in metrics}, budgets[label])
                    for task, metrics in _columns(reference).items()]
            for label, values in accuracy.items()}


def depth_naive(data: Mapping, seed: int, reference: Sequence) -> dict[str, list[Score]]:
    """``naive:constant`` and ``naive:ramp`` on the depth test pairs, under every depth task of the reference rows
    (zero-shot and fine-tuned depth are scored on the same test pairs)."""
    test = data["test"]
    tasks = list(_columns(reference)) or ["depth_zero_shot"]
    return {f"{NAIVE}:{name}": [Score(task, depth_baseline_metrics(test, predictor), "no network") for task in tasks]
            for name, predictor in (("constant", constant_depth), ("ramp", vertical_ramp_depth))}


def detection_naive(data: Mapping, seed: int, reference: Sequence) -> dict[str, list[Score]]:
    """``naive:prior_boxes``: per-class mean boxes scored by class frequency."""
    train, test = data["train"], data["test"]
    return {f"{NAIVE}:prior_boxes": [Score("detection", evaluate_detection(prior_box_detections(train, test), test),
                                           "class means and frequencies")]}


def segmentation_naive(data: Mapping, seed: int, reference: Sequence) -> dict[str, list[Score]]:
    """``naive:location_prior``: the per-position majority class of the training masks."""
    train, test = data["train"], data["test"]
    num_classes = len(test.classes)
    predictions = location_prior_segmentation(train, test, num_classes)
    return {f"{NAIVE}:location_prior": [Score("segmentation", evaluate_segmentation(predictions, test, num_classes),
                                              "per-position majority class")]}


__all__ = ["classification_naive", "constant_depth", "depth_baseline_metrics", "depth_naive", "detection_naive",
           "location_prior_segmentation", "majority_accuracy", "prior_box_detections", "raw_pixel_probe",
           "raw_pixels", "segmentation_naive", "vertical_ramp_depth"]
