"""adapt.transfer.detection: COCO mAP against known answers, and tiny detectors that train reproducibly."""

import math

import pytest
import torch

from adapt.transfer import build_detector, evaluate_detection, load_backbone, train_detector


def perfect_predictions(dataset):
    return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])), "masks": t["masks"]}
            for _, t in dataset]


def test_map_of_perfect_and_wrong_predictions(sets):
    dataset = sets.BoxSet()
    perfect = perfect_predictions(dataset)
    scores = evaluate_detection(perfect, dataset)
    assert scores == pytest.approx({"mAP": 1.0, "AP50": 1.0, "mask_mAP": 1.0, "mask_AP50": 1.0})

    shifted = [perfect[(i + 1) % len(perfect)] for i in range(len(perfect))]  # boxes of another image
    shifted = [p | {"image_id": dataset[i][1]["image_id"]} for i, p in enumerate(shifted)]
    assert evaluate_detection(shifted, dataset)["mAP"] < 0.3
    swapped = [p | {"labels": 3 - p["labels"]} for p in perfect]
    assert evaluate_detection(swapped, dataset)["mAP"] < 0.3
    boxes_only = [{k: v for k, v in p.items() if k != "masks"} for p in perfect]
    assert set(evaluate_detection(boxes_only, dataset)) == {"mAP", "AP50"}
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}
             for _ in dataset]
    assert evaluate_detection(empty, dataset) == {"mAP": 0.0, "AP50": 0.0}


def test_map_maps_labels_to_coco_categories_by_name(sets):
    dataset = sets.RenumberedBoxSet()
    perfect = perfect_predictions(dataset)
    assert evaluate_detection(perfect, dataset)["mAP"] == pytest.approx(1.0)
    assert evaluate_detection([p | {"labels": 3 - p["labels"]} for p in perfect], dataset)["mAP"] < 0.3


def test_map_counts_a_missed_object(sets):
    dataset = sets.BoxSet()
    predictions = perfect_predictions(dataset)
    # Drop image 1's red object: 2 of the 3 red objects are found with precision 1, so on COCO's 101-point recall
    # grid (0, 0.01, .., 1) the 67 points up to recall 2/3 have precision 1 and the rest 0; blue AP = 1.
    predictions[1] = {k: v[:1] for k, v in predictions[1].items()}
    assert predictions[1]["labels"].tolist() == [2]
    red_ap = 67 / 101
    assert evaluate_detection(predictions, dataset)["AP50"] == pytest.approx((red_ap + 1.0) / 2)


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_tiny_detector_trains_and_evaluates(sets, kind):
    dataset = sets.BoxSet()
    # Few detections per image: an untrained Mask R-CNN pastes a mask for each (~20 ms apiece on one CPU core).
    model = build_detector(load_backbone(None), num_classes=2, kind=kind, min_size=64, max_size=64, fpn_channels=32,
                           detections_per_image=10)
    losses = train_detector(model, dataset, steps=2, batch_size=2, lr=0.005, seed=0)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    scores = evaluate_detection(model, dataset, batch_size=2)
    assert {"mAP", "AP50"} <= set(scores)
    assert ("mask_mAP" in scores) == (kind == "maskrcnn")
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_detector_training_is_reproducible(sets):
    dataset = sets.BoxSet()
    def run(seed):
        model = build_detector(load_backbone(None, seed=seed), 2, min_size=64, max_size=64, fpn_channels=32, seed=seed)
        return train_detector(model, dataset, steps=2, batch_size=2, lr=0.005, seed=seed)

    first = run(3)
    assert run(3) == first
    assert run(4) != first

