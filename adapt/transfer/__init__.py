"""Transfer evaluation: how well a pretrained backbone carries over to real tasks, always next to random init.

Ren & Lee (CVPR 2018) judge features learned from synthetic imagery by what they give real tasks: a linear probe
per layer and fine-tuning for classification, fine-tuned detection and segmentation, and depth. This package loads
a ``synth pretrain`` checkpoint's backbone (and heads), puts torchvision's task models on it (Faster/Mask R-CNN,
RetinaNet, FCOS over :class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`; FCN / DeepLab heads or an
FPN decoder for segmentation), trains them at a fixed budget, scores them with the standard tools (pycocotools'
``COCOeval`` for detection, a confusion matrix for segmentation, Eigen et al.'s median-scaled depth metrics), and
writes one table. :func:`run_transfer` always adds the randomly initialised backbone at the same budget and seed:
a pretrained number means little without it.

Modules, one concern each:

- :mod:`~adapt.transfer.common`: checkpoint backbones and depth heads (through :class:`synth.checkpoint.Checkpoint`),
  seeding, the fine-tuning loop, backbone surgery;
- :mod:`~adapt.transfer.classification`, :mod:`~adapt.transfer.detection`, :mod:`~adapt.transfer.segmentation`,
  :mod:`~adapt.transfer.depth`: the task protocols, each declaring its :class:`~adapt.transfer.task.Task` (name,
  data group, budget dataclass, run function);
- :mod:`~adapt.transfer.registry`: the list of tasks and :func:`check_budget`;
- :mod:`~adapt.transfer.results`: :class:`ResultRow`, ``results.csv`` / ``results.md``, the per-stage plot;
- :mod:`~adapt.transfer.runner`: :func:`run_transfer`.

Data conventions (datasets are passed in; :mod:`adapt.datasets` reads real ones):

- classification item ``(image, label)``: image float32 :math:`(3, H, W)` RGB in [0, 1], label int; the dataset has
  ``classes``;
- detection item ``(image, target)``: ``target`` holds ``boxes`` :math:`(N, 4)` float32 xyxy in pixels, ``labels``
  :math:`(N,)` int64 >= 1, ``masks`` :math:`(N, H, W)` uint8, ``image_id`` int, ``area``, ``iscrowd``; the dataset has
  ``categories`` (label :math:`i + 1` is ``categories[i]``) and ``coco()``, the COCO ground-truth dict;
- semantic segmentation item ``(image, mask)``: mask int64 :math:`(H, W)`, 0 background, 255 ignored; the dataset
  has ``classes`` (background included);
- depth: a list of ``{"name", "image": (H, W, 3) uint8, "relative_depth": (H, W) float32}``, depth up to an unknown
  scale, 0 where invalid (zero-shot pairs), or ``(image, depth (1, H, W))`` items of an RGB-D folder.

Every task model takes images in [0, 1] and applies the ImageNet normalisation the backbone was trained with.
"""

from adapt.transfer.classification import (
    FinetuneBudget,
    LinearClassifier,
    LinearProbeBudget,
    build_classifier,
    classification_features,
    evaluate_classifier,
    finetune_classifier,
    fit_linear_probe,
    fit_linear_probes,
    linear_probe,
)
from adapt.transfer.common import RANDOM, is_random, load_backbone, load_depth_head, load_objective_state, seeded
from adapt.transfer.depth import (
    DepthBudget,
    evaluate_depth_zero_shot,
    finetune_depth,
    median_scaled_depth_metrics,
    predict_depth,
)
from adapt.transfer.detection import (
    DETECTORS,
    DetectionBudget,
    build_detector,
    coco_evaluate,
    evaluate_detection,
    predict_detections,
    train_detector,
)
from adapt.transfer.registry import REGISTRY, TASK_DATA, TASKS, check_budget, get_task
from adapt.transfer.results import (
    ResultRow,
    compare,
    format_comparison,
    format_report,
    format_table,
    plot_stage_curve,
    read_results,
    write_results,
)
from adapt.transfer.runner import run_transfer
from adapt.transfer.segmentation import (
    SEGMENTATION_HEADS,
    SegmentationBudget,
    SegmentationModel,
    build_segmenter,
    confusion_matrix,
    evaluate_segmentation,
    predict_segmentation,
    segmentation_loss,
    segmentation_scores,
    train_segmenter,
)
from adapt.transfer.task import Score, Task, TaskContext
from synth.checkpoint import Checkpoint, CheckpointError, read_checkpoint, resolve_checkpoint

__all__ = [
    "DETECTORS",
    "RANDOM",
    "REGISTRY",
    "SEGMENTATION_HEADS",
    "TASKS",
    "TASK_DATA",
    "Checkpoint",
    "CheckpointError",
    "DepthBudget",
    "DetectionBudget",
    "FinetuneBudget",
    "LinearClassifier",
    "LinearProbeBudget",
    "ResultRow",
    "Score",
    "SegmentationBudget",
    "SegmentationModel",
    "Task",
    "TaskContext",
    "build_classifier",
    "build_detector",
    "build_segmenter",
    "check_budget",
    "classification_features",
    "coco_evaluate",
    "compare",
    "confusion_matrix",
    "evaluate_classifier",
    "evaluate_depth_zero_shot",
    "evaluate_detection",
    "evaluate_segmentation",
    "finetune_classifier",
    "finetune_depth",
    "fit_linear_probe",
    "fit_linear_probes",
    "format_comparison",
    "format_report",
    "format_table",
    "get_task",
    "is_random",
    "linear_probe",
    "load_backbone",
    "load_depth_head",
    "load_objective_state",
    "median_scaled_depth_metrics",
    "plot_stage_curve",
    "predict_depth",
    "predict_detections",
    "predict_segmentation",
    "read_checkpoint",
    "read_results",
    "resolve_checkpoint",
    "run_transfer",
    "seeded",
    "segmentation_loss",
    "segmentation_scores",
    "train_detector",
    "train_segmenter",
    "write_results",
]
