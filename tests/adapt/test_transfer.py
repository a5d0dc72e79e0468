"""Transfer evaluation: checkpoint loading, COCO mAP and segmentation scores against known answers, tiny task
models that train, the linear probe, and the results table (always with the random baseline)."""

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from adapt.transfer import (
    RANDOM,
    CheckpointError,
    ResultRow,
    build_classifier,
    build_detector,
    build_segmenter,
    confusion_matrix,
    evaluate_depth_zero_shot,
    evaluate_detection,
    evaluate_segmentation,
    finetune_classifier,
    finetune_depth,
    fit_linear_probe,
    fit_linear_probes,
    format_table,
    linear_probe,
    load_backbone,
    load_depth_head,
    load_objective_state,
    median_scaled_depth_metrics,
    plot_stage_curve,
    read_results,
    run_transfer,
    seeded,
    segmentation_scores,
    train_detector,
    train_segmenter,
    write_results,
)
from pretext.synthetic import DepthHead
from synth.backbone import Backbone
from synth.engine import MultiTask

# --- tiny datasets following the data conventions ----------------------------------------------------------------


class ColourSet:
    """Classification: red (0) or blue (1) images with noise, (3, S, S) in [0, 1]."""

    classes = ("red", "blue")

    def __init__(self, n: int, seed: int, size: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 2 for i in range(n)]
        base = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])
        self.images = [(base[label].view(3, 1, 1) + 0.1 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
                       for label in self.labels]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


#: Per image: (label, x0, y0, x1, y1); far apart across images so another image's boxes never overlap.
BOXES = [
    [(1, 2, 2, 20, 16)],
    [(2, 40, 4, 60, 26), (1, 6, 40, 22, 60)],
    [(1, 30, 34, 50, 58)],
    [(2, 4, 22, 18, 36), (2, 44, 44, 62, 62)],
]
COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}


class BoxSet:
    """Detection: coloured rectangles on grey 64x64 images, with masks and a COCO ground truth."""

    categories = ("red", "blue")

    def __init__(self, size: int = 64):
        self.items = []
        for index, objects in enumerate(BOXES):
            image = torch.full((3, size, size), 0.5)
            masks = torch.zeros(len(objects), size, size, dtype=torch.uint8)
            for k, (label, x0, y0, x1, y1) in enumerate(objects):
                image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[label]).view(3, 1, 1)
                masks[k, y0:y1, x0:x1] = 1
            target = {"boxes": torch.tensor([o[1:] for o in objects], dtype=torch.float32),
                      "labels": torch.tensor([o[0] for o in objects], dtype=torch.int64), "masks": masks,
                      "image_id": 100 + index, "area": masks.flatten(1).sum(1).float(),
                      "iscrowd": torch.zeros(len(objects), dtype=torch.int64)}
            self.items.append((image, target))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def coco(self):
        images, annotations = [], []
        for image, target in self.items:
            images.append({"id": target["image_id"], "height": image.shape[1], "width": image.shape[2]})
            for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"],
                                        strict=True):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
                annotations.append({"id": len(annotations) + 1, "image_id": target["image_id"], "category_id": label,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
        return {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}


class MaskSet:
    """Segmentation: the rectangles of :class:`BoxSet` as class maps (0 background), a 255 border."""

    classes = ("background", "red", "blue")

    def __init__(self):
        self.items = []
        for image, target in BoxSet().items:
            mask = torch.zeros(image.shape[1:], dtype=torch.int64)
            for label, object_mask in zip(target["labels"], target["masks"], strict=True):
                mask[object_mask.bool()] = label
            mask[0, :] = 255
            self.items.append((image, mask))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def depth_pairs(n: int = 2, size: int = 48):
    """Depth pairs: a horizontal gradient image and a depth ramp, 0 (invalid) in one corner."""
    pairs = []
    for i in range(n):
        ramp = np.linspace(1.0, 3.0 + i, size, dtype=np.float32)
        depth = np.tile(ramp, (size, 1))
        depth[:4, :4] = 0.0
        image = np.stack([np.tile((ramp / ramp.max() * 255).astype(np.uint8), (size, 1))] * 3, axis=-1)
        pairs.append({"name": f"pair{i}", "image": image, "relative_depth": depth})
    return pairs


# --- checkpoints ---------------------------------------------------------------------------------------------------

DEPTH_KWARGS = {"backbone_arch": "resnet18", "stages": None, "channels": 16, "scale_invariant_weight": 0.5}


def write_checkpoint(path, model_state):
    config = {"model": {"_target_": "synth.backbone.Backbone", "arch": "resnet18", "in_channels": 3},
              "objective": {"depth": {"_target_": "pretext.synthetic.DepthHead", "weight": 5.0, **DEPTH_KWARGS}}}
    torch.save({"step": 2, "model": model_state, "config": config, "backbone": {"arch": "resnet18"}}, path)
    return path


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A checkpoint in the engine's format whose every tensor differs from torchvision's initialisation."""
    with seeded(123):
        model = MultiTask(Backbone("resnet18"), {"depth": DepthHead(**DEPTH_KWARGS)})
    g = torch.Generator().manual_seed(5)
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    return write_checkpoint(tmp_path_factory.mktemp("run") / "last.pt", state), state


def backbone_state(state):
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def assert_holds_network(module_state, network_state):
    """Every backbone tensor (batch-norm counters aside) is in ``module_state`` under its torchvision name."""
    keys = [k for k in network_state if not k.endswith("num_batches_tracked")]
    assert keys
    for key in keys:
        assert key in module_state, key
        assert torch.equal(module_state[key], network_state[key]), key


def test_random_backbone_is_seeded():
    a, b, c = load_backbone(None, seed=1), load_backbone(RANDOM, seed=1), load_backbone(None, seed=2)
    w = "network.conv1.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_seeding_leaves_the_global_generator_alone():
    before = torch.get_rng_state()
    model = build_segmenter(load_backbone(None, seed=1), 3, head="fcn", seed=1)  # FCNHead has dropout
    train_segmenter(model, MaskSet(), steps=1, batch_size=2, size=32)
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpoint_loads_backbone_and_depth_head_exactly(pretrained):
    path, state = pretrained
    loaded = load_backbone(path).state_dict()
    expected = backbone_state(state)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert load_backbone(path.parent).arch == "resnet18"  # a folder holding last.pt works too

    kwargs, head_state = load_objective_state(path, "depth")
    assert kwargs == DEPTH_KWARGS
    head = load_depth_head(path)
    assert head.decoder.predict.in_channels == 16
    assert all(torch.equal(head.state_dict()[k], v) for k, v in head_state.items())
    with pytest.raises(CheckpointError, match=r"no objective 'normal'.*depth"):
        load_objective_state(path, "normal")
    with pytest.raises(CheckpointError, match=r"resnet18.*resnet50"):
        load_backbone(path, arch="resnet50")


def test_checkpoint_with_wrong_keys_is_a_clear_error(pretrained, tmp_path):
    _, state = pretrained
    missing = write_checkpoint(tmp_path / "missing.pt",
                               {k: v for k, v in state.items() if k != "backbone.network.layer3.0.conv1.weight"})
    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing 1: network\.layer3\.0\.conv1\.weight"):
        load_backbone(missing)
    extra = write_checkpoint(tmp_path / "extra.pt", {**state, "backbone.network.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"extra\.pt.*unexpected 1: network\.extra\.weight"):
        load_backbone(extra)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(tmp_path / "nowhere.pt")


def test_every_head_holds_the_checkpoint_weights(pretrained):
    path, state = pretrained
    backbone = load_backbone(path)
    network = {k.removeprefix("network."): v for k, v in backbone_state(state).items()}
    for norm in ("batch", "frozen"):
        detector = build_detector(backbone, num_classes=2, fpn_channels=32, norm=norm)
        assert_holds_network(detector.backbone.body.state_dict(), network)
    for head in ("fpn", "fcn", "deeplabv3"):
        assert_holds_network(build_segmenter(backbone, 3, head=head).body.state_dict(), network)
    classifier = build_classifier(backbone, 2)
    assert_holds_network({k.removeprefix("network."): v for k, v in classifier.backbone.state_dict().items()},
                         network)
    # The task models hold copies: training them leaves the loaded backbone as it was.
    assert detector.backbone.body.conv1.weight.data_ptr() != backbone.network.conv1.weight.data_ptr()


def test_frozen_stages_do_not_train():
    detector = build_detector(Backbone("resnet18"), num_classes=2, fpn_channels=32, trainable_stages=2)
    trainable = {name.split(".")[2] for name, p in detector.backbone.body.named_parameters(prefix="backbone.body")
                 if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert type(detector.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"


# --- detection -----------------------------------------------------------------------------------------------------


def perfect_predictions(dataset):
    return [{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])), "masks": t["masks"]}
            for _, t in dataset]


def test_map_of_perfect_and_wrong_predictions():
    dataset = BoxSet()
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


class RenumberedBoxSet(BoxSet):
    """The same boxes, but coco() numbers the categories 9 (blue) and 7 (red), listed in another order."""

    def coco(self):
        gt = super().coco()
        for annotation in gt["annotations"]:
            annotation["category_id"] = {1: 7, 2: 9}[annotation["category_id"]]
        gt["categories"] = [{"id": 9, "name": "blue"}, {"id": 7, "name": "red"}]
        return gt


def test_map_maps_labels_to_coco_categories_by_name():
    dataset = RenumberedBoxSet()
    perfect = perfect_predictions(dataset)
    assert evaluate_detection(perfect, dataset)["mAP"] == pytest.approx(1.0)
    assert evaluate_detection([p | {"labels": 3 - p["labels"]} for p in perfect], dataset)["mAP"] < 0.3


def test_map_counts_a_missed_object():
    dataset = BoxSet()
    predictions = perfect_predictions(dataset)
    # Drop image 1's red object: 2 of the 3 red objects are found with precision 1, so on COCO's 101-point recall
    # grid (0, 0.01, .., 1) the 67 points up to recall 2/3 have precision 1 and the rest 0; blue AP = 1.
    predictions[1] = {k: v[:1] for k, v in predictions[1].items()}
    assert predictions[1]["labels"].tolist() == [2]
    red_ap = 67 / 101
    assert evaluate_detection(predictions, dataset)["AP50"] == pytest.approx((red_ap + 1.0) / 2)


@pytest.mark.parametrize("kind", ["fasterrcnn", "maskrcnn", "retinanet", "fcos"])
def test_tiny_detector_trains_and_evaluates(kind):
    dataset = BoxSet()
    # Few detections per image: an untrained Mask R-CNN pastes a mask for each (~20 ms apiece on one CPU core).
    model = build_detector(load_backbone(None), num_classes=2, kind=kind, min_size=64, max_size=64, fpn_channels=32,
                           detections_per_image=10)
    losses = train_detector(model, dataset, steps=2, batch_size=2, lr=0.005, seed=0)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    scores = evaluate_detection(model, dataset, batch_size=2)
    assert {"mAP", "AP50"} <= set(scores)
    assert ("mask_mAP" in scores) == (kind == "maskrcnn")
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_detector_training_is_reproducible():
    dataset = BoxSet()
    def run(seed):
        model = build_detector(load_backbone(None, seed=seed), 2, min_size=64, max_size=64, fpn_channels=32, seed=seed)
        return train_detector(model, dataset, steps=2, batch_size=2, lr=0.005, seed=seed)

    first = run(3)
    assert run(3) == first
    assert run(4) != first


# --- segmentation --------------------------------------------------------------------------------------------------


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


def test_evaluate_segmentation_of_given_maps():
    dataset = MaskSet()
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
def test_tiny_segmenter_trains_and_evaluates(head, aux):
    dataset = MaskSet()
    model = build_segmenter(Backbone("resnet18"), num_classes=3, head=head, aux=aux, channels=16)
    losses = train_segmenter(model, dataset, steps=2, batch_size=2, lr=0.01, size=64)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    out = model.eval()(torch.rand(1, 3, 64, 64))
    assert out["out"].shape == (1, 3, 64, 64) and ("aux" in out) == aux
    scores = evaluate_segmentation(model, dataset, size=64)
    assert set(scores) == {"mIoU", "pixel_acc"} and all(0.0 <= v <= 1.0 for v in scores.values())


# --- depth ---------------------------------------------------------------------------------------------------------


def test_median_scaled_depth_metrics():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(16, 16, generator=g) * 4 + 0.5
    target[:3] = 0.0  # invalid
    prediction = torch.where(target > 0, target / 3.7, 123.0)
    metrics = median_scaled_depth_metrics(prediction, target)
    assert metrics["abs_rel"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["delta1"] == 1.0
    # By hand: medians 2 (torch's lower median of 1, 2, 4, 8) and 1, so the prediction becomes 2 everywhere:
    # abs_rel = (1/1 + 0/2 + 2/4 + 6/8) / 4; only the pixel with ratio 1 is within 1.25.
    metrics = median_scaled_depth_metrics(torch.ones(1, 4), torch.tensor([[1.0, 2.0, 4.0, 8.0]]))
    assert metrics == pytest.approx({"abs_rel": (1 + 0 + 0.5 + 0.75) / 4, "delta1": 0.25})
    assert math.isnan(median_scaled_depth_metrics(torch.ones(2, 2), torch.zeros(2, 2))["abs_rel"])


def test_depth_zero_shot_and_finetune(pretrained):
    path, _ = pretrained
    backbone, head = load_backbone(path), load_depth_head(path)
    pairs = depth_pairs()
    before = evaluate_depth_zero_shot(backbone, head, pairs, size=64)
    assert set(before) == {"abs_rel", "delta1"} and all(math.isfinite(v) for v in before.values())
    tuned_backbone, tuned_head = finetune_depth(backbone, head, pairs, steps=2, batch_size=2, size=64)
    assert tuned_head.scale_invariant_weight == 1.0 and head.scale_invariant_weight == 0.5
    assert not torch.equal(tuned_backbone.network.conv1.weight, backbone.network.conv1.weight)
    after = evaluate_depth_zero_shot(tuned_backbone, tuned_head, pairs, size=64)
    assert all(math.isfinite(v) for v in after.values())
    # The RGB-D folder convention: (image (3, H, W) in [0, 1], depth (1, H, W)) items.
    folder = [(torch.as_tensor(p["image"]).permute(2, 0, 1).float() / 255, torch.as_tensor(p["relative_depth"])[None])
              for p in pairs]
    assert evaluate_depth_zero_shot(backbone, head, folder, size=64) == pytest.approx(before)
    finetune_depth(backbone, head, folder, steps=1, batch_size=2, size=64)


# --- classification ------------------------------------------------------------------------------------------------


def test_linear_probe_separates_colours():
    accuracies = linear_probe(Backbone("resnet18"), ColourSet(20, seed=0), ColourSet(10, seed=1), size=32)
    assert list(accuracies) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert all(acc == 1.0 for acc in accuracies.values()), accuracies


def test_linear_probes_choose_c_on_the_split_and_do_not_depend_on_n_jobs():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 90)
    features = {name: rng.normal(size=(90, 6)) + scale * np.eye(3, 6)[y] for name, scale in (("a", 0.5), ("b", 3.0))}
    grid = (1e-3, 1e-1, 10.0)
    serial = fit_linear_probes(features, y, seed=4, c_grid=grid, n_jobs=1)
    parallel = fit_linear_probes(features, y, seed=4, c_grid=grid, n_jobs=2)
    order = np.random.default_rng(4).permutation(90)  # the documented split: the first 20% validate
    val, fit = order[:18], order[18:]
    for name, x in features.items():
        scores = [make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)).fit(x[fit], y[fit])
                  .score(x[val], y[val]) for c in grid]
        chosen = serial[name][-1].C
        assert chosen == grid[int(np.argmax(scores))]
        np.testing.assert_array_equal(serial[name][-1].coef_, parallel[name][-1].coef_)
        np.testing.assert_array_equal(serial[name][-1].coef_, fit_linear_probe(x, y, seed=4, c_grid=grid)[-1].coef_)
    with pytest.raises(ValueError, match="fewer than two classes"):
        fit_linear_probes(features, np.zeros(90, dtype=int))


def test_finetune_classifier_runs():
    accuracy = finetune_classifier(Backbone("resnet18"), ColourSet(8, seed=0), ColourSet(4, seed=1), steps=3,
                                   batch_size=4, lr=1e-3, size=32)
    assert 0.0 <= accuracy <= 1.0


# --- results -------------------------------------------------------------------------------------------------------


def test_results_round_trip_and_table(tmp_path):
    rows = [ResultRow("random", RANDOM, "detection", "mAP", 0.125, 0, "steps=10", 1.5),
            ResultRow("runs/a/last.pt", "synthetic", "detection", "mAP", 0.25, 0, "steps=10", 1.25),
            ResultRow("runs/a/last.pt", "synthetic", "detection", "mAP", 0.35, 1, "steps=10", 1.0),
            ResultRow("runs/a/last.pt", "synthetic", "segmentation", "mIoU", 1 / 3, 0, "steps=10", 2.0)]
    csv_path, md_path = write_results(rows, tmp_path)
    assert read_results(csv_path) == rows
    table = md_path.read_text()
    assert table.startswith("| checkpoint | detection/mAP | segmentation/mIoU |")
    lines = table.splitlines()
    assert lines[2].startswith("| random | 0.1250 | - |")
    # Mean of the two seeds, their sd, and the difference to the baseline.
    assert "| synthetic | 0.3000 ± 0.0707 (n=2) (+0.1750) | 0.3333 |" in lines[3]
    assert format_table(rows) == table.strip()
    assert not list(tmp_path.glob(".tmp-*"))


def test_stage_curve_png(tmp_path):
    path = plot_stage_curve({RANDOM: {"stem": 0.3, "layer1": 0.4}, "ours": {"stem": 0.5, "layer1": 0.7}},
                            tmp_path / "curve.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100


def test_run_transfer_includes_random_baseline(pretrained, tmp_path):
    path, _ = pretrained
    data = {"classification": {"train": ColourSet(8, seed=0), "test": ColourSet(4, seed=1)},
            "detection": {"train": BoxSet(), "test": BoxSet()},
            "segmentation": {"train": MaskSet(), "test": MaskSet()},
            "depth": {"test": depth_pairs(), "train": depth_pairs()}}
    budget = {"linear_probe": {"stages": ["layer2", "layer4"]},
              "finetune": {"steps": 1, "batch_size": 4},
              "detection": {"steps": 1, "batch_size": 2, "min_size": 64, "max_size": 64, "fpn_channels": 32,
                            "detections_per_image": 10},
              "segmentation": {"steps": 1, "batch_size": 2, "size": 64, "channels": 16},
              "depth": {"steps": 1, "batch_size": 2, "size": 64}}
    rows = run_transfer({"synthetic": path}, ["linear_probe", "finetune", "detection", "segmentation", "depth"],
                        data, budget, seed=0, out_dir=tmp_path, device="cpu")
    assert rows[0].label == RANDOM
    cells = {(r.label, r.task, r.metric) for r in rows}
    expected = {("linear_probe", "acc@layer2"), ("linear_probe", "acc@layer4"), ("finetune", "accuracy"),
                ("detection", "mAP"), ("detection", "AP50"), ("segmentation", "mIoU"), ("segmentation", "pixel_acc"),
                ("depth_zero_shot", "abs_rel"), ("depth_zero_shot", "delta1"), ("depth_finetune", "abs_rel"),
                ("depth_finetune", "delta1")}
    assert cells == {(label, *cell) for label in (RANDOM, "synthetic") for cell in expected}
    assert all(r.seed == 0 and r.wall_s >= 0 for r in rows)
    assert read_results(tmp_path) == rows
    assert "| random |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "linear_probe_stages.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"budget\['detection'\]: unknown setting 'stepz'"):
        run_transfer({"synthetic": path}, ["detection"], data, {"detection": {"stepz": 1}}, device="cpu")
