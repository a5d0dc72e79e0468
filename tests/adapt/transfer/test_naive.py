"""Naive baselines against values computed by hand on tiny arrays."""

import math

import numpy as np
import pytest
import torch

from adapt.transfer.naive import (
    classification_naive,
    constant_depth,
    depth_baseline_metrics,
    depth_naive,
    location_prior_segmentation,
    majority_accuracy,
    prior_box_detections,
    raw_pixel_probe,
    vertical_ramp_depth,
)
from adapt.transfer.results import ResultRow


class _Items(list):
    """A list of dataset items with the attributes task datasets carry."""

    classes = ("background", "a", "b")


def test_ramp_and_constant_maps():
    ramp = vertical_ramp_depth(3, 2)
    torch.testing.assert_close(ramp, torch.tensor([[2.0, 2.0], [1.5, 1.5], [1.0, 1.0]]))
    assert torch.equal(constant_depth(2, 3), torch.ones(2, 3))


def test_depth_metrics_by_hand():
    # Ground truth rows 4, 2 (one column), one invalid pixel (0) that must be ignored.
    target = np.array([[4.0, 0.0], [2.0, 2.0]], dtype=np.float32)
    pairs = [{"name": "t", "image": np.zeros((2, 2, 3), np.uint8), "relative_depth": target}]
    # constant: median of valid targets {4, 2, 2} is 2 -> prediction 2 everywhere.
    # abs_rel = mean(|2-4|/4, 0, 0) = 1/6; delta1: max(2/4, 4/2) = 2 >= 1.25 fails once -> 2/3.
    constant = depth_baseline_metrics(pairs, constant_depth)
    assert constant["abs_rel"] == pytest.approx(1 / 6) and constant["delta1"] == pytest.approx(2 / 3)
    # ramp: rows 2, 1; valid predictions {2, 1, 1}, median 1 -> scale 2: predictions {4, 2, 2} = target exactly.
    ramp = depth_baseline_metrics(pairs, vertical_ramp_depth)
    assert ramp["abs_rel"] == pytest.approx(0.0) and ramp["delta1"] == pytest.approx(1.0)
    scores = depth_naive({"test": pairs}, seed=0, reference=[])
    assert set(scores) == {"naive:constant", "naive:ramp"}
    (ramp_score,) = scores["naive:ramp"]
    assert ramp_score.task == "depth_zero_shot" and ramp_score.metrics["abs_rel"] == pytest.approx(0.0)


def test_depth_without_valid_pixels_is_nan():
    pairs = [{"name": "t", "image": np.zeros((2, 2, 3), np.uint8), "relative_depth": np.zeros((2, 2), np.float32)}]
    assert math.isnan(depth_baseline_metrics(pairs, constant_depth)["abs_rel"])


def _classification(labels, values):
    return _Items((torch.full((3, 4, 4), float(v)), label) for label, v in zip(labels, values, strict=True))


def test_majority_by_hand():
    train = _classification([0, 1, 1, 2], [0, 0, 0, 0])
    test = _classification([1, 2, 1, 0, 1], [0] * 5)
    assert majority_accuracy(train, test) == pytest.approx(3 / 5)


def test_raw_pixel_probe_separates_bright_from_dark():
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(60)]
    values = [0.8 * label + 0.1 * rng.random() for label in labels]  # class 1 bright, class 0 dark
    train, test = _classification(labels[:40], values[:40]), _classification(labels[40:], values[40:])
    assert raw_pixel_probe(train, test, size=2) == 1.0
    reference = [ResultRow(checkpoint="random", label="random", task="linear_probe", metric=metric, value=0.5, seed=0,
                           budget="", wall_s=0.0) for metric in ("acc@layer3", "acc@layer4")]
    scores = classification_naive({"train": train, "test": test}, seed=0, reference=reference)
    assert scores["naive:raw_pixels"][0].metrics == {"acc@layer3": 1.0, "acc@layer4": 1.0}
    assert scores["naive:majority"][0].metrics["acc@layer4"] == pytest.approx(0.5)


def _detection(items):
    return _Items((torch.zeros(3, 10, 20), {"boxes": torch.tensor(b, dtype=torch.float32).reshape(-1, 4),
                                            "labels": torch.tensor(labels, dtype=torch.int64), "image_id": i})
                  for i, (b, labels) in enumerate(items))


def test_prior_boxes_by_hand():
    train = _detection([([[0, 0, 10, 10], [10, 0, 20, 10]], [1, 2]), ([[0, 0, 2, 2]], [1])])
    test = _detection([([[0, 0, 4, 4]], [1])])
    (prediction,) = prior_box_detections(train, test)
    # class 1: mean of (0, 0, 0.5, 1) and (0, 0, 0.1, 0.2) normalised = (0, 0, 0.3, 0.6) -> (0, 0, 6, 6) in 20x10
    torch.testing.assert_close(prediction["boxes"], torch.tensor([[0.0, 0.0, 6.0, 6.0], [10.0, 0.0, 20.0, 10.0]]))
    assert prediction["labels"].tolist() == [1, 2]
    torch.testing.assert_close(prediction["scores"], torch.tensor([2 / 3, 1 / 3]))


def test_location_prior_by_hand():
    top = torch.tensor([[1, 1], [0, 0]])
    train = _Items([(torch.zeros(3, 2, 2), top), (torch.zeros(3, 2, 2), top),
                    (torch.zeros(3, 2, 2), torch.tensor([[2, 2], [255, 255]]))])
    test = _Items([(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.int64))])
    (prediction,) = location_prior_segmentation(train, test, num_classes=3, size=2)
    assert prediction.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_classification_naive_few_label_columns_fit_on_the_same_subset():
    from adapt.transfer.classification import label_subset

    # Class 0 is dark, 1 bright; 2 is the most frequent class of the whole training split, so the majority of
    # the full split and of a 1-per-class subset (ties: smallest label) differ.
    labels = [0] * 10 + [1] * 10 + [2] * 30
    values = [0.0] * 10 + [1.0] * 10 + [0.5] * 30
    train, test = _classification(labels, values), _classification([0, 1, 1, 1], [0.0, 1.0, 1.0, 1.0])
    reference = [ResultRow(checkpoint="random", label="random", task="finetune", metric=metric, value=0.5, seed=0,
                           budget="", wall_s=0.0) for metric in ("accuracy@0.01", "accuracy@1")]
    scores = classification_naive({"train": train, "test": test}, seed=7, reference=reference)
    majority = scores["naive:majority"][0].metrics
    assert majority == {"accuracy@0.01": pytest.approx(1 / 4), "accuracy@1": pytest.approx(0.0)}
    subset = label_subset(train, 0.01, seed=7)
    assert len(subset) == 3
    raw = scores["naive:raw_pixels"][0].metrics
    assert raw["accuracy@0.01"] == raw_pixel_probe(subset, test, seed=7)
    assert raw["accuracy@1"] == raw_pixel_probe(train, test, seed=7)
