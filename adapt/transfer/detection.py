"""Detection transfer: torchvision detectors (Faster/Mask R-CNN, RetinaNet, FCOS) on a backbone with a feature
pyramid, fine-tuned at a fixed budget and scored with pycocotools' ``COCOeval``.

Reads the ``detection`` data group: items ``(image, target)``, ``target`` holding ``boxes`` :math:`(N, 4)` float32
xyxy in pixels, ``labels`` :math:`(N,)` int64 >= 1, ``masks`` :math:`(N, H, W)` uint8, ``image_id`` int, ``area``,
``iscrowd``; the dataset has ``categories`` (label :math:`i + 1` is ``categories[i]``) and ``coco()``, the COCO
ground-truth dict.
"""

import contextlib
import copy
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from adapt.transfer.common import _prepare_encoder, _train, seeded
from adapt.transfer.task import Score, Task, TaskContext
from synth.backbone import Backbone, stage_channels
from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.runtime import resolve_device

#: Detector families :func:`build_detector` builds.
DETECTORS: tuple[str, ...] = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")


@dataclass
class DetectionBudget:
    """Settings of the ``detection`` task: :func:`build_detector`'s and :func:`train_detector`'s (see there).

    Args:
        kind: One of :data:`DETECTORS`.
        min_size, max_size: torchvision's resize bounds.
        trainable_stages: How many of the last backbone stages train.
        norm: ``"batch"`` or ``"frozen"``.
        fpn_channels: Width of the pyramid.
        anchor_sizes: One anchor size per pyramid level; ``None``: derived from ``min_size``.
        detections_per_image: Most detections kept per image at inference.
        score_threshold: Lowest score of a detection kept at inference.
        steps: Optimizer steps.
        batch_size: Images per step.
        lr: Peak learning rate.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        weight_decay: Weight decay.
        warmup_steps: Linear warm-up steps; ``None``: a tenth of ``steps``, at most 100.
        grad_clip: Max global gradient norm (0 disables clipping).
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("kind", "steps", "batch_size", "lr", "min_size", "max_size")
    kind: str = "fasterrcnn"
    min_size: int = 256
    max_size: int = 512
    trainable_stages: int = 5
    norm: str = "batch"
    fpn_channels: int = 256
    anchor_sizes: Sequence[int] | None = None
    detections_per_image: int = 100
    score_threshold: float = 0.001
    steps: int = 1000
    batch_size: int = 4
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in DETECTORS:
            raise ValueError(f"kind: expected one of {list(DETECTORS)}, got {self.kind!r}")


_B = DetectionBudget  # the defaults of the functions below are the budget's
def build_detector(backbone: Backbone, num_classes: int, kind: str = _B.kind, min_size: int = _B.min_size,
                   max_size: int = _B.max_size, trainable_stages: int = _B.trainable_stages, norm: str = _B.norm,
                   fpn_channels: int = _B.fpn_channels, anchor_sizes: Sequence[int] | None = _B.anchor_sizes,
                   detections_per_image: int = _B.detections_per_image,
                   score_threshold: float = _B.score_threshold, seed: int = 0) -> nn.Module:
    """A torchvision detector on a copy of ``backbone`` with a feature pyramid (Lin et al., CVPR 2017).

    ``kind``: Faster R-CNN (Ren et al., NeurIPS 2015) and Mask R-CNN (He et al., ICCV 2017) read the pyramid over
    the last four stages (``layer1`` .. ``layer4``, VGG ``block2`` .. ``block5``) plus a max-pooled level;
    RetinaNet (Lin et al., ICCV 2017) and FCOS (Tian et al., ICCV 2019) the last three plus P6/P7, as torchvision's
    builders do. Images go in as [0, 1] tensors; torchvision's transform resizes them (shorter side ``min_size``,
    longer at most ``max_size``) and normalises with the ImageNet statistics the backbone was trained with.

    Args:
        backbone: Not modified (the detector holds a copy).
        num_classes: Object categories, background excluded (labels 1 .. ``num_classes``).
        kind: One of :data:`DETECTORS`.
        min_size, max_size: torchvision's resize bounds.
        trainable_stages: How many of the last backbone stages train (0 .. 5 for ResNets); the rest are frozen
            with frozen batch norm.
        norm: ``"batch"`` (trainable stages keep batch norm, so a random backbone stays normalised) or
            ``"frozen"`` (torchvision's ``FrozenBatchNorm2d`` everywhere, its recipe for pretrained backbones).
        fpn_channels: Width of the pyramid.
        anchor_sizes: One anchor size per pyramid level (pixels of the resized image). ``None``: torchvision's
            (32 .. 512, i.e. 8x the stride for R-CNN) when ``min_size >= 512``, else half of them, as objects in
            small images are small (FCOS keeps its strides, 8 .. 128).
        detections_per_image: Most detections kept per image at inference (COCO's evaluation reads 100).
        score_threshold: Lowest score of a detection kept at inference (AP needs the low-score tail too).
        seed: Seeds the new layers' initialisation.

    Returns:
        The torchvision model: in train mode ``model(images, targets)`` gives a loss dict, in eval mode
        ``model(images)`` a list of ``{"boxes", "labels", "scores", ("masks")}``.

    Examples:
        >>> backbone = load_backbone("runs/pretrain/checkpoints/last.pt")  # doctest: +SKIP
        >>> detector = build_detector(backbone, num_classes=20)  # doctest: +SKIP
        >>> losses = train_detector(detector, voc_train, steps=2000)  # doctest: +SKIP
        >>> evaluate_detection(detector, voc_test)  # doctest: +SKIP
        {'mAP': ..., 'AP50': ...}
    """
    if kind not in DETECTORS:
        raise ValueError(f"detector kind: expected one of {DETECTORS}, got {kind!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes: need at least one object category, got {num_classes}")
    module, outputs = _prepare_encoder(backbone, trainable_stages, norm)
    channels = stage_channels(backbone.arch)
    rcnn = kind in ("fasterrcnn", "maskrcnn")
    stages = list(outputs)[-4:] if rcnn else list(outputs)[-3:]
    common = {"min_size": min_size, "max_size": max_size, "image_mean": list(IMAGENET_MEAN),
              "image_std": list(IMAGENET_STD)}
    limit = {"box_detections_per_img" if rcnn else "detections_per_img": detections_per_image,
             # COCO-style AP integrates over the whole score range: torchvision's 0.05 default would hide the
             # low-confidence detections of a briefly trained detector and report AP 0 for any backbone.
             "box_score_thresh" if rcnn else "score_thresh": score_threshold}
    base = 32 if min_size >= 512 else 16
    sizes = tuple(anchor_sizes) if anchor_sizes is not None else tuple(base * 2**i for i in range(5))
    if len(sizes) != 5:
        raise ValueError(f"anchor_sizes: one size per pyramid level (5), got {list(sizes)}")
    with seeded(seed):
        fpn = BackboneWithFPN(module, return_layers={outputs[s]: str(i) for i, s in enumerate(stages)},
                              in_channels_list=[channels[s] for s in stages], out_channels=fpn_channels,
                              extra_blocks=None if rcnn else LastLevelP6P7(fpn_channels, fpn_channels))
        if rcnn:
            anchors = AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 5)
            model_class = FasterRCNN if kind == "fasterrcnn" else MaskRCNN
            return model_class(fpn, num_classes=num_classes + 1, rpn_anchor_generator=anchors, **common, **limit)
        if kind == "retinanet":
            # Three octave scales per level, as torchvision's RetinaNet builder.
            anchors = AnchorGenerator(sizes=tuple((s, int(s * 2 ** (1 / 3)), int(s * 2 ** (2 / 3))) for s in sizes),
                                      aspect_ratios=((0.5, 1.0, 2.0),) * 5)
            return RetinaNet(fpn, num_classes=num_classes + 1, anchor_generator=anchors, **common, **limit)
        anchors = None if anchor_sizes is None else AnchorGenerator(sizes=tuple((s,) for s in sizes),
                                                                    aspect_ratios=((1.0,),) * 5)
        return FCOS(fpn, num_classes=num_classes + 1, anchor_generator=anchors, **common, **limit)


def _detection_collate(items: list) -> tuple[list[Tensor], list[dict]]:
    return [torch.as_tensor(image, dtype=torch.float32) for image, _ in items], [target for _, target in items]


def _has_masks(model: nn.Module) -> bool:
    roi_heads = getattr(model, "roi_heads", None)
    return roi_heads is not None and roi_heads.has_mask()


def train_detector(model: nn.Module, dataset, steps: int = _B.steps, batch_size: int = _B.batch_size,
                   lr: float = _B.lr, seed: int = 0, device: str | torch.device = "cpu",
                   optimizer: str = _B.optimizer, weight_decay: float = _B.weight_decay,
                   warmup_steps: int | None = _B.warmup_steps, grad_clip: float = _B.grad_clip) -> list[float]:
    """Train a :func:`build_detector` model in place on a detection dataset; returns the total loss of every step.

    SGD with momentum 0.9 (or AdamW), linear warm-up and cosine decay; batches shuffled by a generator seeded with
    ``seed`` (which also seeds torchvision's proposal samplers).
    """
    device = resolve_device(device)
    keys = ("boxes", "labels", "masks") if _has_masks(model) else ("boxes", "labels")

    def loss_fn(model, batch):
        images, targets = batch
        targets = [{k: torch.as_tensor(t[k]).to(device) for k in keys} for t in targets]
        for t in targets:
            t["boxes"] = t["boxes"].float().reshape(-1, 4)
        return sum(model([image.to(device) for image in images], targets).values())

    return _train(model, dataset, collate=_detection_collate, loss_fn=loss_fn, steps=steps, batch_size=batch_size,
                  lr=lr, seed=seed, device=device, optimizer=optimizer, weight_decay=weight_decay,
                  warmup_steps=warmup_steps, grad_clip=grad_clip, desc="train detector")


@torch.no_grad()
def predict_detections(model: nn.Module, dataset, batch_size: int = 4, device: str | torch.device = "cpu"
                       ) -> list[dict[str, Tensor]]:
    """The detector's outputs for every item of ``dataset`` in order, on the CPU, with the item's ``image_id``."""
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    predictions = []
    try:
        for images, targets in DataLoader(dataset, batch_size=batch_size, collate_fn=_detection_collate):
            outputs = model([image.to(device) for image in images])
            for output, target in zip(outputs, targets, strict=True):
                predictions.append({k: v.cpu() for k, v in output.items()} | {"image_id": int(target["image_id"])})
    finally:
        model.train(was_training)
    return predictions


def _label_to_category(dataset, gt: Mapping) -> dict[int, int]:
    """Dataset label (1-based index into ``dataset.categories``) -> COCO ``category_id`` of ``dataset.coco()``."""
    ids = [int(c["id"]) for c in gt["categories"]]
    by_name = {str(c.get("name")): int(c["id"]) for c in gt["categories"]}
    categories = list(getattr(dataset, "categories", []))
    if not categories:
        return {i: i for i in ids}
    if [str(c.get("name")) for c in gt["categories"]] == [str(c) for c in categories]:
        # The same list in the same order (adapt.datasets: ids are the labels): position decides, names may repeat.
        return {label: category_id for label, category_id in enumerate(ids, start=1)}
    mapping = {}
    for label, category in enumerate(categories, start=1):
        if isinstance(category, Mapping) and "id" in category:
            mapping[label] = int(category["id"])
        elif str(category) in by_name:
            mapping[label] = by_name[str(category)]
        elif label in ids:
            mapping[label] = label
        else:
            raise ValueError(f"detection dataset: category {category!r} (label {label}) is not in coco()'s "
                             f"categories {sorted(by_name)}")
    return mapping


def _coco_results(predictions: Sequence[Mapping], image_ids: Sequence[int], categories: Mapping[int, int]
                  ) -> tuple[list[dict], list[dict] | None]:
    """Detections as COCO result lists: boxes (xywh) and, when predictions carry masks, RLE segmentations."""
    from pycocotools import mask as mask_utils

    boxes_out, masks_out = [], None
    if any("masks" in p for p in predictions):
        masks_out = []
    for prediction, image_id in zip(predictions, image_ids, strict=True):
        boxes = torch.as_tensor(prediction["boxes"], dtype=torch.float64).reshape(-1, 4)
        scores = torch.as_tensor(prediction["scores"], dtype=torch.float64).reshape(-1)
        labels = torch.as_tensor(prediction["labels"]).reshape(-1)
        if not len(boxes) == len(scores) == len(labels):
            raise ValueError(f"prediction for image {image_id}: boxes, scores and labels differ in length")
        # Label 0 is the background slot: RetinaNet and FCOS score it with a sigmoid like any class, so at a low
        # score threshold it shows up among their detections. It is not a detection of anything.
        foreground = labels != 0
        boxes, scores, labels = boxes[foreground], scores[foreground], labels[foreground]
        if "masks" in prediction:
            prediction = {**prediction, "masks": torch.as_tensor(prediction["masks"])[foreground]}
        unknown = sorted({int(lab) for lab in labels} - set(categories))
        if unknown:
            raise ValueError(f"prediction for image {image_id}: labels {unknown} are not dataset categories")
        for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
            boxes_out.append({"image_id": image_id, "category_id": categories[int(label)],
                              "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]], "score": score})
        if masks_out is not None and "masks" in prediction:
            masks = torch.as_tensor(prediction["masks"])
            masks = masks[:, 0] if masks.dim() == 4 else masks
            binary = (masks > 0.5) if masks.is_floating_point() else masks.bool()
            for mask, score, label in zip(binary.numpy().astype(np.uint8), scores.tolist(), labels.tolist(),
                                          strict=True):
                rle = mask_utils.encode(np.asfortranarray(mask))
                masks_out.append({"image_id": image_id, "category_id": categories[int(label)], "segmentation": rle,
                                  "score": score})
    return boxes_out, masks_out


def coco_evaluate(gt: Mapping, results: list[dict], iou_type: str = "bbox") -> tuple[float, float]:
    """(AP@[.5:.95], AP@.5) of COCO-format ``results`` against a COCO ground-truth dict, with pycocotools.

    The COCO detection metric (Lin et al., "Microsoft COCO", ECCV 2014). No result at all scores 0; a ground truth
    without annotations gives NaN.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    for key in ("images", "annotations", "categories"):
        if key not in gt:
            raise ValueError(f"detection dataset.coco(): the ground-truth dict has no {key!r}")
    if not gt["annotations"]:
        return math.nan, math.nan
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and its summary table
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(dict(gt))
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return tuple(math.nan if s < 0 else float(s) for s in evaluator.stats[:2])


def evaluate_detection(model: nn.Module | Sequence[Mapping], dataset, batch_size: int = 4,
                       device: str | torch.device = "cpu") -> dict[str, float]:
    """COCO mAP of a detector, or of precomputed detections, on a detection dataset (pycocotools ``COCOeval``).

    Args:
        model: A detector (run here in eval mode), or one prediction per dataset item in order, each
            ``{"boxes" (N, 4) xyxy, "scores" (N,), "labels" (N,), optional "masks" (N, [1,] H, W),
            optional "image_id"}`` (the item's ``image_id`` otherwise).
        dataset: Detection dataset with ``coco()`` and ``categories``.

    Returns:
        ``{"mAP", "AP50"}`` on boxes, plus ``{"mask_mAP", "mask_AP50"}`` when the predictions carry masks.
    """
    if isinstance(model, nn.Module):
        predictions = predict_detections(model, dataset, batch_size=batch_size, device=device)
    else:
        predictions = list(model)
        if len(predictions) != len(dataset):
            raise ValueError(f"evaluate_detection: {len(predictions)} predictions for {len(dataset)} images")
    image_ids = [int(p["image_id"]) if "image_id" in p else int(dataset[i][1]["image_id"])
                 for i, p in enumerate(predictions)]
    gt = dataset.coco()
    boxes, masks = _coco_results(predictions, image_ids, _label_to_category(dataset, gt))
    scores = dict(zip(("mAP", "AP50"), coco_evaluate(gt, boxes, "bbox"), strict=True))
    if masks is not None:
        scores |= dict(zip(("mask_mAP", "mask_AP50"), coco_evaluate(gt, masks, "segm"), strict=True))
    return scores



def _run(context: TaskContext, budget: DetectionBudget) -> list[Score]:
    train, test = context.splits("train", "test")
    model = build_detector(context.backbone, len(train.categories), kind=budget.kind, min_size=budget.min_size,
                           max_size=budget.max_size, trainable_stages=budget.trainable_stages, norm=budget.norm,
                           fpn_channels=budget.fpn_channels, anchor_sizes=budget.anchor_sizes,
                           detections_per_image=budget.detections_per_image, score_threshold=budget.score_threshold,
                           seed=context.seed)
    train_detector(model, train, steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, seed=context.seed,
                   device=context.device, optimizer=budget.optimizer, weight_decay=budget.weight_decay,
                   warmup_steps=budget.warmup_steps, grad_clip=budget.grad_clip)
    return [Score("detection", evaluate_detection(model, test, device=context.device), context.budget_text)]


#: Fine-tuned detection, scored by COCO mAP (Ren & Lee, CVPR 2018).
TASK = Task(name="detection", data="detection", budget=DetectionBudget, run=_run)


__all__ = [
    "DETECTORS",
    "TASK",
    "DetectionBudget",
    "build_detector",
    "coco_evaluate",
    "evaluate_detection",
    "predict_detections",
    "train_detector",
]
