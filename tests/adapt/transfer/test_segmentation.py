"""adapt.transfer.segmentation: confusion matrix and scores by hand, and tiny segmenters that train."""

import math

import pytest
import torch

from adapt.transfer import (
    build_segmenter,
    confusion_matrix,
    evaluate_segmentation,
    segmentation_scores,
    train_segmenter,
)
from synth.backbone import Backbone


def test_confusion_matrix_and_scores_by_hand():
    target = torch.tensor([[0, 0, 1], [1, 255, 2]])
    prediction = torch.tensor([[0, 1, 1], [1, 0, 0]])
    confusion = confusion_matrix(prediction, target, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[2, 0] = 1, 1, 2, 1
    assert torch.equal(confusion, expected)
    # IoU: class 0 1/(2+2-1), class 1 2/(2+3-2), class 2 0/1; class 3 is in neither map and does not count.
    scores = segmentation_scores(confusion)
    assert scores["mIoU"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    assert scores["pixel_acc"] == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="target holds classes outside"):
        confusion_matrix(prediction, torch.tensor([[0, 0, 7], [1, 255, 2]]), num_classes=4)


def test_evaluate_segmentation_of_given_maps(sets):
    dataset = sets.MaskSet()
    truth = [torch.where(mask == 255, 0, mask) for _, mask in dataset]
    assert evaluate_segmentation(truth, dataset) == {"mIoU": 1.0, "pixel_acc": 1.0}
    background = [torch.zeros_like(mask) for mask in truth]
    scores = evaluate_segmentation(background, dataset)
    labelled = sum(int((mask != 255).sum()) for _, mask in dataset)
    background_pixels = sum(int((mask == 0).sum()) for _, mask in dataset)
    assert scores["pixel_acc"] == pytest.approx(background_pixels / labelled)
    # Red and blue are in the ground truth with IoU 0; background's IoU is its pixel accuracy here.
    assert scores["mIoU"] == pytest.approx(background_pixels / labelled / 3)


@pytest.mark.parametrize(("head", "aux"), [("fpn", False), ("fcn", True)])
def test_tiny_segmenter_trains_and_evaluates(sets, head, aux):
    dataset = sets.MaskSet()
    model = build_segmenter(Backbone("resnet18"), num_classes=3, head=head, aux=aux, channels=16)
    losses = train_segmenter(model, dataset, steps=2, batch_size=2, lr=0.01, size=64)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out["out"].shape == (1, 3, 64, 64) and ("aux" in out) == aux
    scores = evaluate_segmentation(model, dataset, size=64)
    assert set(scores) == {"mIoU", "pixel_acc"} and all(0.0 <= v <= 1.0 for v in scores.values())

