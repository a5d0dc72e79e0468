"""Depth transfer: a checkpoint's depth head scored zero-shot on real images with depth known up to scale
(median-scaled metrics of Eigen et al.), and optionally after fine-tuning on the user's RGB-D pairs.

Reads the ``depth`` data group: ``test`` (and optionally ``train``), each a list of ``{"name", "image": (H, W, 3)
uint8, "relative_depth": (H, W) float32}`` (depth up to an unknown scale, 0 where invalid: zero-shot pairs), or a
dataset of ``(image (3, H, W) in [0, 1], depth (1, H, W))`` items (an RGB-D folder).
"""

import copy
import math
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapt.transfer.common import _resize, _train, load_depth_head
from adapt.transfer.task import Score, Task, TaskContext
from pretext.common import normalize
from pretext.synthetic import DepthHead, depth_metrics
from synth.backbone import Backbone
from synth.checkpoint import CheckpointError
from synth.runtime import resolve_device


@dataclass
class DepthBudget:
    """Settings of the ``depth`` task: :func:`evaluate_depth_zero_shot`'s and :func:`finetune_depth`'s.

    Args:
        size: Side of the network input (zero-shot: the longer side, rounded to multiples of 32).
        steps: Fine-tuning steps on ``data.depth.train``; 0: zero-shot only.
        batch_size: Pairs per step.
        lr: Peak learning rate (AdamW).
        scale_invariant_weight: :math:`\\lambda` of the scale-invariant loss (1 ignores the global scale).
        weight_decay: AdamW's weight decay.
        warmup_steps: Linear warm-up steps; ``None``: a tenth of ``steps``, at most 100.
        grad_clip: Max global gradient norm (0 disables clipping).
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("size", "steps", "batch_size", "lr")
    size: int = 128
    steps: int = 0
    batch_size: int = 4
    lr: float = 1e-4
    scale_invariant_weight: float = 1.0
    weight_decay: float = 1e-4
    warmup_steps: int | None = None
    grad_clip: float = 5.0


_B = DepthBudget  # the defaults of the functions below are the budget's (fine-tuning steps aside: 0 means none)


def median_scaled_depth_metrics(prediction: Tensor, target: Tensor) -> dict[str, float]:
    r"""abs_rel and :math:`\delta_1` of one depth map after per-image median scaling (Eigen, Puhrsch & Fergus,
    NIPS 2014; the protocol for depth known up to scale, e.g. Zhou et al., CVPR 2017).

    Over valid pixels (positive, finite target), :math:`s = \mathrm{median}(z) / \mathrm{median}(\hat{z})` and the
    metrics of :func:`pretext.synthetic.depth_metrics` are computed on :math:`s\hat{z}`.

    Shape:
        - prediction, target: :math:`(H, W)`; target 0 where invalid.

    Returns:
        ``{"abs_rel", "delta1"}``; NaN when no pixel is valid.
    """
    prediction, target = torch.as_tensor(prediction).float(), torch.as_tensor(target).float()
    valid = torch.isfinite(target) & (target > 0) & torch.isfinite(prediction) & (prediction > 0)
    if not valid.any():
        return {"abs_rel": math.nan, "delta1": math.nan}
    target = torch.where(valid, target, 0.0)
    scale = target[valid].median() / prediction[valid].median()
    metrics = depth_metrics((prediction * scale)[None, None], target[None, None], valid[None, None])
    return {"abs_rel": float(metrics["abs_rel"]), "delta1": float(metrics["delta1"])}


def _network_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Longer side ``size``, aspect kept, both multiples of 32 (the backbone's stride)."""
    scale = size / max(height, width)
    return max(32, round(height * scale / 32) * 32), max(32, round(width * scale / 32) * 32)


def _rgb(image: np.ndarray | Tensor) -> Tensor:
    """An (H, W, 3) uint8 image, or a (3, H, W) float one in [0, 1], as (3, H, W) float32 in [0, 1]."""
    image = torch.as_tensor(np.asarray(image))
    if image.dim() == 3 and image.shape[0] == 3 and image.is_floating_point():
        return image.float()
    if image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"depth image: expected (H, W, 3) uint8 or (3, H, W) float, got {tuple(image.shape)}")
    return image.permute(2, 0, 1).float() / (255.0 if not image.is_floating_point() else 1.0)


def _depth_item(item, index: int) -> tuple[Tensor, Tensor]:
    """(RGB (3, H, W) in [0, 1], depth (H, W), 0 invalid) from either depth convention.

    A dict ``{"image": (H, W, 3) uint8, "relative_depth" or "depth": (H, W)}`` (zero-shot pairs), or an
    ``(image (3, H, W) in [0, 1], depth (1, H, W))`` item (:class:`adapt.datasets.RGBDFolder`).
    """
    if isinstance(item, Mapping):
        name = item.get("name", index)
        key = "relative_depth" if item.get("relative_depth") is not None else "depth"
        if "image" not in item or item.get(key) is None:
            raise KeyError(f"depth item {name!r}: needs 'image' and 'relative_depth' (or 'depth')")
        image, depth = item["image"], item[key]
    else:
        image, depth = item
    rgb = _rgb(image)
    depth = torch.as_tensor(np.asarray(depth), dtype=torch.float32)
    depth = depth[0] if depth.dim() == 3 else depth
    if tuple(depth.shape) != tuple(rgb.shape[-2:]):
        raise ValueError(f"depth item {index}: depth {tuple(depth.shape)} and image {tuple(rgb.shape[-2:])} differ")
    return rgb, depth


@torch.no_grad()
def predict_depth(backbone: Backbone, depth_head: DepthHead, image: np.ndarray | Tensor, size: int = 128) -> Tensor:
    """Depth :math:`(H, W)` on the CPU for one image ((H, W, 3) uint8 or (3, H, W) in [0, 1]): predicted at ``size``
    (longer side) on the backbone's device, then upsampled back to the image's size."""
    device = next(backbone.parameters()).device
    rgb = _rgb(image)
    x = normalize(_resize(rgb, _network_size(*rgb.shape[-2:], size))[None].to(device))
    depth = depth_head.predict({"image": x}, backbone)
    return F.interpolate(depth, size=tuple(rgb.shape[-2:]), mode="bilinear", align_corners=False)[0, 0].cpu()


def evaluate_depth_zero_shot(backbone: Backbone, depth_head: DepthHead, pairs: Sequence, size: int = _B.size,
                             device: str | torch.device = "cpu") -> dict[str, float]:
    """Median-scaled depth metrics of a depth head on real images with depth known up to scale, without training.

    Ren & Lee (CVPR 2018) ask whether depth learned on renders holds on real photographs. The ground truth is known
    up to scale, so each prediction is median-scaled (:func:`median_scaled_depth_metrics`); metrics are averaged
    over images with valid pixels.

    Args:
        backbone, depth_head: Evaluated in eval mode (copies on ``device``; the originals are not modified).
        pairs: ``{"name", "image": (H, W, 3) uint8, "relative_depth": (H, W) float32, 0 invalid}`` dicts (e.g.
            :func:`adapt.datasets.middlebury_pairs`; ``"depth"`` is read when there is no ``"relative_depth"``), or
            a dataset of ``(image (3, H, W) in [0, 1], depth (1, H, W))`` items (:class:`adapt.datasets.RGBDFolder`).
            The depth must be proportional to depth, not disparity.
        size: Longer side of the network input (rounded to multiples of 32).

    Returns:
        ``{"abs_rel", "delta1"}``.
    """
    device = resolve_device(device)
    backbone, depth_head = copy.deepcopy(backbone).to(device).eval(), copy.deepcopy(depth_head).to(device).eval()
    per_image = []
    for index in range(len(pairs)):
        rgb, target = _depth_item(pairs[index], index)
        metrics = median_scaled_depth_metrics(predict_depth(backbone, depth_head, rgb, size=size), target)
        if not math.isnan(metrics["abs_rel"]):
            per_image.append(metrics)
    if not per_image:
        return {"abs_rel": math.nan, "delta1": math.nan}
    return {key: statistics.fmean(m[key] for m in per_image) for key in ("abs_rel", "delta1")}


def _depth_collate(items: list, size: int) -> dict[str, Tensor]:
    pairs = [_depth_item(item, i) for i, item in enumerate(items)]
    images = torch.stack([_resize(rgb, size) for rgb, _ in pairs])
    depth = torch.stack([_resize(depth[None], size, mode="nearest") for _, depth in pairs])
    return {"image": normalize(images), "depth": depth, "valid": depth > 0}


def finetune_depth(backbone: Backbone, depth_head: DepthHead, rgbd: Sequence, steps: int = 200,
                   batch_size: int = _B.batch_size, lr: float = _B.lr, seed: int = 0,
                   device: str | torch.device = "cpu", size: int = _B.size,
                   scale_invariant_weight: float = _B.scale_invariant_weight, weight_decay: float = _B.weight_decay,
                   warmup_steps: int | None = _B.warmup_steps, grad_clip: float = _B.grad_clip
                   ) -> tuple[Backbone, DepthHead]:
    r"""Fine-tune copies of a backbone and depth head on a user's RGB-D pairs with the head's own loss.

    The loss is :class:`~pretext.synthetic.DepthHead`'s scale-invariant log error (Eigen et al., NIPS 2014) with
    :math:`\lambda` = ``scale_invariant_weight``; 1 (the default) ignores the global scale entirely, as the depth is
    only relative. Images are resized to ``size x size`` (depth with nearest, so invalid zeros are not blended).

    Args:
        rgbd: A dataset or list of RGB-D items in either convention of :func:`evaluate_depth_zero_shot`.

    Returns:
        The fine-tuned ``(backbone, depth_head)``; the arguments are not modified.
    """
    device = resolve_device(device)
    head = copy.deepcopy(depth_head)
    head.scale_invariant_weight = scale_invariant_weight
    model = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": head})

    def loss_fn(model, batch):
        batch = {k: v.to(device) for k, v in batch.items()} | {"with_metrics": False}
        return model["head"](batch, model["backbone"])["loss"]

    _train(model, rgbd, collate=lambda items: _depth_collate(items, size), loss_fn=loss_fn, steps=steps,
           batch_size=batch_size, lr=lr, seed=seed, device=device, optimizer="adamw", weight_decay=weight_decay,
           warmup_steps=warmup_steps, grad_clip=grad_clip, desc="finetune depth")
    return model["backbone"], model["head"]



def _run(context: TaskContext, budget: DepthBudget) -> list[Score]:
    """Zero-shot with the checkpoint's depth head (a fresh head for the baseline; none when the checkpoint has no
    depth objective), then, with ``train`` data and ``steps > 0``, after fine-tuning."""
    (test,) = context.splits("test")
    scores = []
    tic = time.perf_counter()
    if context.checkpoint is None:
        head = load_depth_head(None, arch=context.arch, seed=context.seed)
    else:
        try:
            head = load_depth_head(context.checkpoint, seed=context.seed)
        except CheckpointError as error:
            if "no objective" not in str(error):
                raise
            warnings.warn(f"depth: {context.checkpoint.path} has no depth head, so no zero-shot depth for it",
                          stacklevel=2)
            head = None
    if head is not None:
        metrics = evaluate_depth_zero_shot(context.backbone, head, test, size=budget.size, device=context.device)
        scores.append(Score("depth_zero_shot", metrics, f"zero-shot,size={budget.size}", time.perf_counter() - tic))
    train = context.data.get("train")
    if train and budget.steps > 0:
        tic = time.perf_counter()
        start = head if head is not None else load_depth_head(None, arch=context.arch, seed=context.seed)
        tuned_backbone, tuned_head = finetune_depth(
            context.backbone, start, train, steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr,
            seed=context.seed, device=context.device, size=budget.size,
            scale_invariant_weight=budget.scale_invariant_weight, weight_decay=budget.weight_decay,
            warmup_steps=budget.warmup_steps, grad_clip=budget.grad_clip)
        metrics = evaluate_depth_zero_shot(tuned_backbone, tuned_head, test, size=budget.size, device=context.device)
        scores.append(Score("depth_finetune", metrics, context.budget_text, time.perf_counter() - tic))
    return scores


#: Depth on real images: zero-shot (``depth_zero_shot``) and fine-tuned (``depth_finetune``).
TASK = Task(name="depth", data="depth", budget=DepthBudget, run=_run)


__all__ = [
    "TASK",
    "DepthBudget",
    "evaluate_depth_zero_shot",
    "finetune_depth",
    "median_scaled_depth_metrics",
    "predict_depth",
]
