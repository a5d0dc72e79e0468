"""Semantic-segmentation transfer: FCN, DeepLabV3 or an FPN decoder on the backbone, fine-tuned at a fixed budget,
scored by mean IoU and pixel accuracy from one confusion matrix.

Reads the ``segmentation`` data group: items ``(image, mask)``, mask int64 :math:`(H, W)`, 0 background, 255
ignored; the dataset has ``classes`` (background included).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead

from adapt.transfer.common import _prepare_encoder, _resize, _train, seeded
from adapt.transfer.task import Score, Task, TaskContext
from pretext.common import normalize
from pretext.synthetic import Decoder
from synth.backbone import Backbone, stage_channels
from synth.runtime import resolve_device

#: Segmentation heads :func:`build_segmenter` builds.
SEGMENTATION_HEADS: tuple[str, ...] = ("fpn", "fcn", "deeplabv3")


@dataclass
class SegmentationBudget:
    """Settings of the ``segmentation`` task: :func:`build_segmenter`'s and :func:`train_segmenter`'s (see there).

    Args:
        head: One of :data:`SEGMENTATION_HEADS`.
        aux: An auxiliary ``FCNHead`` (not with ``"fpn"``).
        trainable_stages: How many of the last backbone stages train.
        norm: ``"batch"`` or ``"frozen"``.
        channels: Width of the ``"fpn"`` decoder.
        steps: Optimizer steps.
        batch_size: Images per step.
        lr: Peak learning rate.
        size: Side images and masks are resized to, in training and evaluation (``None``: kept).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adamw"``.
        weight_decay: Weight decay.
        aux_weight: Weight of the auxiliary head's loss.
        warmup_steps: Linear warm-up steps; ``None``: a tenth of ``steps``, at most 100.
        grad_clip: Max global gradient norm (0 disables clipping).
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("head", "steps", "batch_size", "lr", "size")
    head: str = "fpn"
    aux: bool = False
    trainable_stages: int = 5
    norm: str = "batch"
    channels: int = 128
    steps: int = 1000
    batch_size: int = 8
    lr: float = 0.01
    size: int | None = 128
    optimizer: str = "sgd"
    weight_decay: float = 1e-4
    aux_weight: float = 0.5
    warmup_steps: int | None = None
    grad_clip: float = 10.0

    def __post_init__(self) -> None:
        if self.head not in SEGMENTATION_HEADS:
            raise ValueError(f"head: expected one of {list(SEGMENTATION_HEADS)}, got {self.head!r}")


_B = SegmentationBudget  # the defaults of the functions below are the budget's


class SegmentationModel(nn.Module):
    """Stage features of a backbone, a segmentation head, and an optional auxiliary head, at input resolution.

    Like torchvision's ``_SimpleSegmentationModel`` (FCN, DeepLabV3), with two differences: the input is RGB in
    [0, 1] (normalised inside), and the ``"fpn"`` head decodes every stage rather than the last.

    Args:
        body: An :class:`~torchvision.models._utils.IntermediateLayerGetter` returning stage outputs, finest first.
        head: Dense head: ``head(features, size)`` when ``dense``, else ``head(last_feature)``.
        aux_head: Head on the second-to-last stage (FCN's auxiliary loss), or ``None``.
        dense: Whether ``head`` takes all stages and upsamples itself.

    Shape:
        - Input: :math:`(B, 3, H, W)` in [0, 1].
        - Output: ``{"out": (B, K, H, W)}`` logits, plus ``"aux"`` with an auxiliary head.

    Examples:
        >>> model = build_segmenter(load_backbone(None), num_classes=21, head="fcn", aux=True)
        >>> {k: tuple(v.shape) for k, v in model(torch.rand(2, 3, 64, 64)).items()}
        {'out': (2, 21, 64, 64), 'aux': (2, 21, 64, 64)}
    """

    def __init__(self, body: nn.Module, head: nn.Module, aux_head: nn.Module | None = None, dense: bool = False):
        super().__init__()
        self.body = body
        self.head = head
        self.aux_head = aux_head
        self.dense = dense

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        size = images.shape[-2:]
        features = list(self.body(normalize(images)).values())
        if self.dense:
            out = {"out": self.head(features, size=size)}
        else:
            out = {"out": F.interpolate(self.head(features[-1]), size=size, mode="bilinear", align_corners=False)}
        if self.aux_head is not None:
            out["aux"] = F.interpolate(self.aux_head(features[-2]), size=size, mode="bilinear", align_corners=False)
        return out


def build_segmenter(backbone: Backbone, num_classes: int, head: str = _B.head, aux: bool = _B.aux,
                    trainable_stages: int = _B.trainable_stages, norm: str = _B.norm, channels: int = _B.channels,
                    seed: int = 0) -> SegmentationModel:
    """A semantic-segmentation model on a copy of ``backbone``.

    Heads: ``"fcn"`` (Long, Shelhamer & Darrell, CVPR 2015; torchvision's ``FCNHead``) and ``"deeplabv3"`` (Chen et
    al., 2017; ``DeepLabHead``) on the last stage, whose stride is 32 here (torchvision's segmentation ResNets dilate
    to 8; ours keep the pretrained strides), so a 128-pixel image gives 4 x 4 logits before upsampling; ``"fpn"``
    (default), the semantic branch of Panoptic FPN (Kirillov et al., CVPR 2019) as in
    :class:`pretext.synthetic.Decoder`, decodes the last four stages at stride 4.

    Args:
        backbone: Not modified (the model holds a copy).
        num_classes: Classes including background (``len(dataset.classes)``).
        head: One of :data:`SEGMENTATION_HEADS`.
        aux: Add an ``FCNHead`` on the second-to-last stage (torchvision's auxiliary loss; not with ``"fpn"``).
        trainable_stages, norm: As in :func:`build_detector`.
        channels: Width of the ``"fpn"`` decoder.
        seed: Seeds the heads' initialisation.
    """
    if head not in SEGMENTATION_HEADS:
        raise ValueError(f"segmentation head: expected one of {SEGMENTATION_HEADS}, got {head!r}")
    if aux and head == "fpn":
        raise ValueError("segmentation aux head: only with head='fcn' or 'deeplabv3'")
    module, outputs = _prepare_encoder(backbone, trainable_stages, norm)
    available = stage_channels(backbone.arch)
    stages = list(outputs)[-4:] if head == "fpn" else list(outputs)[-2:]
    body = IntermediateLayerGetter(module, return_layers={outputs[s]: s for s in stages})
    last, previous = available[stages[-1]], available[stages[-2]]
    with seeded(seed):
        if head == "fpn":
            return SegmentationModel(body, Decoder([available[s] for s in stages], channels=channels,
                                                   out_channels=num_classes), dense=True)
        main = FCNHead(last, num_classes) if head == "fcn" else DeepLabHead(last, num_classes)
        return SegmentationModel(body, main, FCNHead(previous, num_classes) if aux else None)


def _segmentation_collate(items: list, size: int | None) -> tuple[Tensor, Tensor]:
    images = [_resize(torch.as_tensor(image, dtype=torch.float32), size) for image, _ in items]
    masks = [_resize(torch.as_tensor(mask)[None], size, mode="nearest")[0] for _, mask in items]
    shapes = {tuple(image.shape[-2:]) for image in images}
    if len(shapes) > 1:
        raise ValueError(f"segmentation images differ in size {sorted(shapes)}: pass size= to resize them")
    return torch.stack(images), torch.stack(masks).long()


def segmentation_loss(outputs: Mapping[str, Tensor], masks: Tensor, aux_weight: float = 0.5,
                      ignore_index: int = 255) -> Tensor:
    r"""Pixel-wise cross-entropy over labelled pixels, plus ``aux_weight`` times the auxiliary head's.

    As torchvision's segmentation reference (after Long et al., CVPR 2015). Normalised by the labelled-pixel count;
    0 (connected to the graph) when no pixel is labelled, where the mean would be NaN.

    Shape:
        - outputs: ``"out"`` (and ``"aux"``) :math:`(B, K, H, W)`; masks: :math:`(B, H, W)` int64.
    """
    count = (masks != ignore_index).sum().clamp(min=1)
    total = F.cross_entropy(outputs["out"].float(), masks, ignore_index=ignore_index, reduction="sum") / count
    if "aux" in outputs and aux_weight:
        total = total + aux_weight * F.cross_entropy(outputs["aux"].float(), masks, ignore_index=ignore_index,
                                                     reduction="sum") / count
    return total


def train_segmenter(model: SegmentationModel, dataset, steps: int = _B.steps, batch_size: int = _B.batch_size,
                    lr: float = _B.lr, seed: int = 0, device: str | torch.device = "cpu",
                    size: int | None = _B.size, optimizer: str = _B.optimizer, weight_decay: float = _B.weight_decay,
                    aux_weight: float = _B.aux_weight, warmup_steps: int | None = _B.warmup_steps,
                    grad_clip: float = _B.grad_clip) -> list[float]:
    """Train a :func:`build_segmenter` model in place (:func:`segmentation_loss`); returns every step's loss.

    Args:
        size: Images (bilinear) and masks (nearest) are resized to ``size x size``; ``None`` keeps them (they must
            then share a size).
    """
    device = resolve_device(device)

    def loss_fn(model, batch):
        images, masks = batch
        return segmentation_loss(model(images.to(device)), masks.to(device), aux_weight=aux_weight)

    return _train(model, dataset, collate=lambda items: _segmentation_collate(items, size), loss_fn=loss_fn,
                  steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, optimizer=optimizer,
                  weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip, desc="train segmenter")


def confusion_matrix(prediction: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Pixel counts :math:`M_{ij}` of ground-truth class :math:`i` predicted as :math:`j`, skipping ignored pixels.

    Shape:
        - prediction, target: any equal shapes of integer class indices.
        - Output: :math:`(K, K)` int64.

    Raises:
        ValueError: a class index outside ``[0, num_classes)`` (other than ``ignore_index`` in the target).
    """
    prediction, target = torch.as_tensor(prediction).long(), torch.as_tensor(target).long()
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    prediction, target = prediction[keep], target[keep]
    for name, values in (("target", target), ("prediction", prediction)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds classes outside [0, {num_classes}): {values.unique().tolist()}")
    return torch.bincount(target * num_classes + prediction, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(confusion: Tensor) -> dict[str, float]:
    r"""Mean IoU and pixel accuracy of a confusion matrix (Long et al., CVPR 2015; PASCAL VOC's mIoU).

    .. math::
        \mathrm{IoU}_c = \frac{M_{cc}}{\sum_j M_{cj} + \sum_i M_{ic} - M_{cc}}, \quad
        \mathrm{pixel\_acc} = \frac{\sum_c M_{cc}}{\sum_{ij} M_{ij}},

    the mean over classes present in the ground truth or the prediction (others have no defined IoU).
    """
    confusion = confusion.double()
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    total = confusion.sum()
    return {"mIoU": float((true_positive[present] / union[present]).mean()) if present.any() else math.nan,
            "pixel_acc": float(true_positive.sum() / total) if total > 0 else math.nan}


@torch.no_grad()
def predict_segmentation(model: nn.Module, dataset, size: int | None = 128, batch_size: int = 8,
                         device: str | torch.device = "cpu") -> list[Tensor]:
    """Class maps :math:`(H, W)` int64 at each item's mask resolution: predicted at ``size``, logits upsampled."""
    device = resolve_device(device)
    was_training = model.training
    model.to(device).eval()
    predictions = []
    try:
        loader = DataLoader(dataset, batch_size=batch_size if size is not None else 1, collate_fn=list)
        for items in loader:
            images = torch.stack([_resize(torch.as_tensor(image, dtype=torch.float32), size) for image, _ in items])
            logits = model(images.to(device))["out"].float()
            for logit, (_, mask) in zip(logits, items, strict=True):
                logit = F.interpolate(logit[None], size=tuple(mask.shape[-2:]), mode="bilinear", align_corners=False)
                predictions.append(logit[0].argmax(0).cpu())
    finally:
        model.train(was_training)
    return predictions


def evaluate_segmentation(model: nn.Module | Sequence[Tensor], dataset, num_classes: int | None = None,
                          size: int | None = 128, batch_size: int = 8, device: str | torch.device = "cpu"
                          ) -> dict[str, float]:
    """``{"mIoU", "pixel_acc"}`` of a segmenter, or of precomputed class maps, over a whole dataset.

    One confusion matrix over all pixels (label 255 ignored), then :func:`segmentation_scores`.

    Args:
        model: A model taking [0, 1] images and returning ``{"out": logits}``, or one :math:`(H, W)` class map per
            item, in order.
        num_classes: Defaults to ``len(dataset.classes)``.
    """
    num_classes = len(dataset.classes) if num_classes is None else num_classes
    if isinstance(model, nn.Module):
        predictions = predict_segmentation(model, dataset, size=size, batch_size=batch_size, device=device)
    else:
        predictions = list(model)
        if len(predictions) != len(dataset):
            raise ValueError(f"evaluate_segmentation: {len(predictions)} predictions for {len(dataset)} images")
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for i, prediction in enumerate(predictions):
        confusion += confusion_matrix(prediction, dataset[i][1], num_classes)
    return segmentation_scores(confusion)



def _run(context: TaskContext, budget: SegmentationBudget) -> list[Score]:
    train, test = context.splits("train", "test")
    model = build_segmenter(context.backbone, len(train.classes), head=budget.head, aux=budget.aux,
                            trainable_stages=budget.trainable_stages, norm=budget.norm, channels=budget.channels,
                            seed=context.seed)
    train_segmenter(model, train, steps=budget.steps, batch_size=budget.batch_size, lr=budget.lr, seed=context.seed,
                    device=context.device, size=budget.size, optimizer=budget.optimizer,
                    weight_decay=budget.weight_decay, aux_weight=budget.aux_weight, warmup_steps=budget.warmup_steps,
                    grad_clip=budget.grad_clip)
    scores = evaluate_segmentation(model, test, size=budget.size, device=context.device)
    return [Score("segmentation", scores, context.budget_text)]


#: Fine-tuned semantic segmentation, scored by mIoU and pixel accuracy.
TASK = Task(name="segmentation", data="segmentation", budget=SegmentationBudget, run=_run)


__all__ = [
    "SEGMENTATION_HEADS",
    "TASK",
    "SegmentationBudget",
    "SegmentationModel",
    "build_segmenter",
    "confusion_matrix",
    "evaluate_segmentation",
    "predict_segmentation",
    "segmentation_loss",
    "segmentation_scores",
    "train_segmenter",
]
