"""Transfer evaluation: how well a pretrained backbone carries over to real tasks, always next to random init.

Ren & Lee (CVPR 2018) judge features learned from synthetic imagery by what they give real tasks: a linear probe
per layer and fine-tuning for classification, fine-tuned detection and segmentation, and depth. This module loads a
``synth pretrain`` checkpoint's backbone (and heads), puts torchvision's task models on it (Faster/Mask R-CNN,
RetinaNet, FCOS over :class:`~torchvision.models.detection.backbone_utils.BackboneWithFPN`; FCN / DeepLab heads or an
FPN decoder for segmentation), trains them at a fixed budget, scores them with the standard tools (pycocotools'
``COCOeval`` for detection, a confusion matrix for segmentation, Eigen et al.'s median-scaled depth metrics), and
writes one table. :func:`run_transfer` always adds the randomly initialised backbone at the same budget and seed:
a pretrained number means little without it.

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

import contextlib
import copy
import csv
import dataclasses
import inspect
import io
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from torchvision.models.segmentation.fcn import FCNHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm.auto import tqdm

from pretext.common import normalize
from pretext.synthetic import Decoder, DepthHead, depth_metrics
from synth.backbone import Backbone, pooled_features, stage_channels
from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.engine import NonFiniteLossError, lr_factor

#: The tasks :func:`run_transfer` knows.
TASKS: tuple[str, ...] = ("linear_probe", "finetune", "detection", "segmentation", "depth")

#: Detector families :func:`build_detector` builds.
DETECTORS: tuple[str, ...] = ("fasterrcnn", "maskrcnn", "retinanet", "fcos")

#: Segmentation heads :func:`build_segmenter` builds.
SEGMENTATION_HEADS: tuple[str, ...] = ("fpn", "fcn", "deeplabv3")

#: Label of the randomly initialised baseline in results.
RANDOM = "random"

#: Per-task settings of :func:`run_transfer`; a ``budget`` argument overrides entries. Keys are keyword arguments of
#: the task's functions (e.g. detection: :func:`build_detector` and :func:`train_detector`).
DEFAULT_BUDGET: dict[str, dict] = {
    "linear_probe": {"size": 32, "stages": None},
    "finetune": {"steps": 500, "batch_size": 64, "lr": 1e-3, "size": 32},
    "detection": {"kind": "fasterrcnn", "steps": 1000, "batch_size": 4, "lr": 0.01, "min_size": 256, "max_size": 512},
    "segmentation": {"head": "fpn", "steps": 1000, "batch_size": 8, "lr": 0.01, "size": 128},
    "depth": {"size": 128, "steps": 0, "batch_size": 4, "lr": 1e-4},
}


class CheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into; the message names the file and the keys."""


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def is_random(checkpoint: str | os.PathLike | None) -> bool:
    """Whether ``checkpoint`` asks for random initialisation (``None`` or ``"random"``)."""
    return checkpoint is None or str(checkpoint) == RANDOM


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The checkpoint file: the path itself, or ``<run>/checkpoints/last.pt`` for a run folder.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(checkpoint)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint: {path} is a folder without checkpoints/last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {path}")
    return path


def read_checkpoint(checkpoint: str | os.PathLike) -> dict:
    """A ``synth pretrain`` checkpoint as a dict, on the CPU (tensors and plain data only: ``weights_only``).

    Raises:
        CheckpointError: the file is not an engine checkpoint (no ``model`` state dict).
    """
    path = resolve_checkpoint(checkpoint)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not isinstance(state.get("model"), Mapping):
        raise CheckpointError(f"checkpoint {path}: not a `synth pretrain` checkpoint (no 'model' state dict)")
    return dict(state)


def checkpoint_arch(checkpoint: str | os.PathLike) -> str:
    """The backbone architecture a checkpoint was trained with."""
    state = read_checkpoint(checkpoint)
    return _arch_of(state, resolve_checkpoint(checkpoint))


def _arch_of(state: Mapping, path: Path) -> str:
    arch = (state.get("backbone") or {}).get("arch") or ((state.get("config") or {}).get("model") or {}).get("arch")
    if not arch:
        raise CheckpointError(f"checkpoint {path}: records no backbone arch (state['backbone']['arch'])")
    return str(arch)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the body with torch's global generators seeded, restoring the caller's state afterwards.

    Only for code that draws from the global generators and takes no ``generator`` argument: ``nn.init`` in module
    constructors, dropout, and torchvision's detection samplers (``BalancedPositiveNegativeSampler`` calls
    ``torch.randperm`` without one). Seeding a scoped fork keeps their draws a function of ``seed`` alone.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def load_backbone(checkpoint: str | os.PathLike | None = None, arch: str | None = None, seed: int = 0) -> Backbone:
    """The backbone of a ``synth pretrain`` checkpoint, or a randomly initialised one.

    Every backbone key of the checkpoint (``backbone.network.*`` in ``state["model"]``, the state dict of
    :class:`synth.engine.MultiTask`) must match the backbone's exactly: a partial load would silently mix pretrained
    and random weights.

    Args:
        checkpoint: ``runs/<run>/checkpoints/last.pt`` (or the run folder); ``None`` or ``"random"`` for torchvision's
            initialisation drawn with ``seed``.
        arch: Architecture; for random init ``None`` means ``"resnet18"``, for a checkpoint ``None`` means the
            checkpoint's own (any other value must agree with it).
        seed: Seeds the random initialisation.

    Raises:
        CheckpointError: the arch disagrees, or keys are missing, unexpected or of the wrong shape (all listed).
    """
    if is_random(checkpoint):
        with seeded(seed):
            return Backbone(arch or "resnet18")
    path = resolve_checkpoint(checkpoint)
    state = read_checkpoint(path)
    saved_arch = _arch_of(state, path)
    if arch is not None and arch != saved_arch:
        raise CheckpointError(f"checkpoint {path}: trained with a {saved_arch} backbone, asked for {arch}")
    in_channels = int(((state.get("config") or {}).get("model") or {}).get("in_channels", 3))
    with seeded(seed):
        backbone = Backbone(saved_arch, in_channels=in_channels)
    weights = _prefixed(state["model"], "backbone.")
    _check_keys(backbone, weights, path, what="backbone")
    backbone.load_state_dict(weights, strict=True)
    return backbone


def load_objective_state(checkpoint: str | os.PathLike, name: str) -> tuple[dict, dict[str, Tensor]]:
    """The constructor keywords and the state dict of objective ``name`` in a checkpoint (e.g. its depth head).

    Returns:
        ``(kwargs, state_dict)``: ``kwargs`` from ``config["objective"][name]`` (``config["adapt"]`` for the
        adversary) without Hydra's ``_target_`` and the engine's ``weight``; ``state_dict`` the
        ``objectives.<name>.*`` entries with that prefix removed.

    Raises:
        CheckpointError: the checkpoint has no objective ``name`` (the message lists those it has).
    """
    path = resolve_checkpoint(checkpoint)
    state = read_checkpoint(path)
    weights = _prefixed(state["model"], f"objectives.{name}.")
    configs = (state.get("config") or {}).get("objective") or {}
    if not weights:
        saved = sorted({key.split(".")[1] for key in state["model"] if key.startswith("objectives.")})
        raise CheckpointError(f"checkpoint {path}: no objective {name!r}; it has {saved}")
    # `synth pretrain` keeps the adversary's config under `adapt` (objective name "adapt"), the others under
    # `objective.<name>`.
    node = configs.get(name) or (state.get("config") or {}).get(name) or {}
    kwargs = {k: v for k, v in dict(node).items() if not k.startswith("_") and k != "weight"}  # _target_, _convert_
    return kwargs, weights


def load_depth_head(checkpoint: str | os.PathLike | None = None, arch: str = "resnet18", seed: int = 0,
                    name: str = "depth") -> DepthHead:
    """The :class:`~pretext.synthetic.DepthHead` of a checkpoint (strict load), or a fresh one drawn with ``seed``.

    Raises:
        CheckpointError: the checkpoint has no objective ``name`` or its keys do not fit.
    """
    if is_random(checkpoint):
        with seeded(seed):
            return DepthHead(backbone_arch=arch)
    kwargs, weights = load_objective_state(checkpoint, name)
    with seeded(seed):
        head = DepthHead(**kwargs)
    _check_keys(head, weights, resolve_checkpoint(checkpoint), what=f"objective {name!r}")
    head.load_state_dict(weights, strict=True)
    return head


def _prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _check_keys(module: nn.Module, weights: Mapping[str, Tensor], path: Path, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {len(keys)}: {_few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise CheckpointError(f"checkpoint {path}: {what} keys do not match ({'; '.join(parts)})")


def _few(keys: Sequence[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Shared training plumbing
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _square(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize(image: Tensor, size: int | Sequence[int] | None, mode: str = "bilinear") -> Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` resized to ``size`` (unchanged when ``None`` or already that size)."""
    if size is None or tuple(image.shape[-2:]) == _square(size):
        return image
    batched = image if image.dim() == 4 else image[None]
    if mode == "nearest":
        out = F.interpolate(batched.float(), size=_square(size), mode="nearest-exact").to(image.dtype)
    else:
        out = F.interpolate(batched.float(), size=_square(size), mode="bilinear", align_corners=False,
                            antialias=True)
    return out if image.dim() == 4 else out[0]


def _endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def _make_optimizer(parameters: list[nn.Parameter], name: str, lr: float, weight_decay: float
                    ) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected 'sgd' or 'adamw', got {name!r}")


def _train(model: nn.Module, dataset, *, collate: Callable, loss_fn: Callable[[nn.Module, object], Tensor],
           steps: int, batch_size: int, lr: float, seed: int, device: torch.device, optimizer: str,
           weight_decay: float, warmup_steps: int | None, grad_clip: float, desc: str) -> list[float]:
    """The loop every fine-tuning shares: shuffled batches from an explicit generator, warm-up then cosine decay.

    Returns:
        The loss of every step.
    """
    if steps < 1:
        raise ValueError(f"{desc}: steps must be >= 1, got {steps}")
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the training dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=generator,
                        collate_fn=collate, drop_last=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt = _make_optimizer(parameters, optimizer, lr, weight_decay)
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps=steps, warmup_steps=warmup, schedule="cosine"))
    model.to(device).train()
    losses: list[float] = []
    batches = _endless(loader)
    with seeded(seed, device), tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True) as bar:
        for step in range(steps):
            loss = loss_fn(model, next(batches))
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"{desc}: non-finite loss ({loss.item()}) at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(parameters, grad_clip)
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Backbone surgery: stages as named children, freezing, batch norm
# ---------------------------------------------------------------------------------------------------------------


def _stage_children(backbone: Backbone) -> tuple[nn.Module, dict[str, list[str]]]:
    """The torchvision module whose direct children make up the stages, and each stage's children in order.

    :class:`~torchvision.models._utils.IntermediateLayerGetter` (and so ``BackboneWithFPN``) returns outputs of
    direct children: a ResNet's ``maxpool`` / ``layer1`` .. ``layer4``, or VGG ``features``' max-pool indices.
    """
    network = backbone.torchvision_model()
    if isinstance(network, torchvision.models.ResNet):
        layout = {"stem": ["conv1", "bn1", "relu", "maxpool"]}
        layout |= {f"layer{k}": [f"layer{k}"] for k in range(1, 5)}
        return network, layout
    if isinstance(network, torchvision.models.VGG):
        layout, block = {}, []
        for name, child in network.features.named_children():
            block.append(name)
            if isinstance(child, nn.MaxPool2d):
                layout[f"block{len(layout) + 1}"] = block
                block = []
        return network.features, layout
    raise NotImplementedError(f"transfer models support ResNet and VGG backbones, not {type(network).__name__}")


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`~torchvision.ops.misc.FrozenBatchNorm2d` with its
    statistics and affine parameters (torchvision's detection recipe for pretrained backbones)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen.to(module.weight.device if module.affine else "cpu")
    for name, child in module.named_children():
        replaced = _freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _prepare_encoder(backbone: Backbone, trainable_stages: int, norm: str) -> tuple[nn.Module, dict[str, str]]:
    """A copy of the backbone's network with its first stages frozen, and each stage's output child.

    Args:
        trainable_stages: How many of the last stages train (0 .. all), as torchvision's ``trainable_layers``.
        norm: ``"batch"``: batch norm of trainable stages keeps training; ``"frozen"``: all batch norm frozen.
            Batch norm of frozen stages is always frozen, so their statistics stay the checkpoint's.
    """
    if norm not in ("batch", "frozen"):
        raise ValueError(f"norm: expected 'batch' or 'frozen', got {norm!r}")
    if getattr(backbone, "in_channels", 3) != 3:
        raise ValueError(f"transfer models take RGB images; the backbone has {backbone.in_channels} input channels")
    copied = copy.deepcopy(backbone)
    module, layout = _stage_children(copied)
    if not 0 <= trainable_stages <= len(layout):
        raise ValueError(f"trainable_stages: expected 0 .. {len(layout)}, got {trainable_stages}")
    frozen_stages = list(layout)[:len(layout) - trainable_stages]
    for stage in frozen_stages:
        for child in layout[stage]:
            submodule = getattr(module, child)
            submodule.requires_grad_(False)
            setattr(module, child, _freeze_batchnorm(submodule))
    if norm == "frozen":
        _freeze_batchnorm(module)
    return module, {stage: children[-1] for stage, children in layout.items()}


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


def _classification_collate(items: list, size: int | None) -> tuple[Tensor, Tensor]:
    images = torch.stack([_resize(torch.as_tensor(image, dtype=torch.float32), size) for image, _ in items])
    labels = torch.as_tensor([int(label) for _, label in items], dtype=torch.int64)
    return images, labels


def classification_features(backbone: Backbone, dataset, stages: Sequence[str] | None = None, size: int | None = 32,
                            batch_size: int = 256, device: str | torch.device = "cpu"
                            ) -> tuple[dict[str, Tensor], Tensor]:
    """Frozen pooled features (:func:`synth.backbone.pooled_features`) of every image in a classification dataset.

    Args:
        backbone: Not modified (a copy runs on ``device``).
        dataset: Items ``(image (3, H, W) in [0, 1], label)``.
        stages: Stage names; ``None`` means all.
        size: Images are resized to ``size x size`` (``None``: kept, they must share a size).

    Returns:
        ``({stage: (N, C_s)}, labels (N,))`` on the CPU.
    """
    encoder = copy.deepcopy(backbone).to(resolve_device(device))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False,
                        collate_fn=lambda items: _classification_collate(items, size))
    chunks: dict[str, list[Tensor]] = {}
    labels = []
    for images, batch_labels in loader:
        for stage, value in pooled_features(encoder, normalize(images), stages, batch_size=batch_size).items():
            chunks.setdefault(stage, []).append(value)
        labels.append(batch_labels)
    if not labels:
        raise ValueError("classification dataset is empty")
    return {stage: torch.cat(values) for stage, values in chunks.items()}, torch.cat(labels)


def _fit_probe(x: np.ndarray, y: np.ndarray, c: float, max_iter: int):
    """One standardised multinomial logistic regression (scikit-learn's deterministic L-BFGS)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    # A probe a few iterations short of the optimum is still a fair comparison across checkpoints.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return probe.fit(x, y)


def fit_linear_probes(features: Mapping[str, np.ndarray], train_y: np.ndarray, seed: int = 0,
                      c_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), val_fraction: float = 0.2,
                      min_train_for_selection: int = 50, max_iter: int = 1000, n_jobs: int = 1) -> dict:
    r"""Standardised multinomial logistic regressions, one per feature set, each with :math:`C` chosen on a split.

    The linear evaluation of self-supervised features (Zhang, Isola & Efros, "Colorful Image Colorization",
    ECCV 2016; per layer in Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting Image
    Rotations", ICLR 2018): minimise :math:`\frac{1}{2C}\|W\|^2 + \sum_i \mathrm{CE}(W z_i + b, y_i)` on
    standardised features :math:`z`. scikit-learn's L-BFGS solver is deterministic. :math:`C` is picked on a
    ``val_fraction`` split drawn with ``seed`` (the same split for every feature set), then the probe is refit on
    all training features; with fewer than ``min_train_for_selection`` samples, :math:`C = 1`.

    The fits are CPU work (minutes for 10k samples x 4 stages x 5 values of :math:`C`, even beside a GPU); all
    (feature set, :math:`C`) fits are independent and run as one batch of ``n_jobs`` processes (joblib; -1 = every
    core), with a progress bar. The result does not depend on ``n_jobs``.

    Args:
        features: ``{name: (N, D) array}``, e.g. one per backbone stage.
        train_y: :math:`(N,)` integer labels.

    Returns:
        ``{name: fitted scikit-learn pipeline (scaler, logistic regression)}``.
    """
    from joblib import Parallel, delayed

    if len(np.unique(train_y)) < 2:
        raise ValueError(f"linear probe: the training labels hold fewer than two classes ({np.unique(train_y)})")
    names = list(features)
    best_c = dict.fromkeys(names, 1.0)
    order = np.random.default_rng(seed).permutation(len(train_y))
    n_val = max(1, round(val_fraction * len(train_y)))
    val, fit_part = order[:n_val], order[n_val:]
    parallel = Parallel(n_jobs=n_jobs, return_as="generator")
    if (len(train_y) >= min_train_for_selection and len(c_grid) > 1
            and len(np.unique(train_y[fit_part])) >= 2):
        jobs = [(name, c) for name in names for c in c_grid]
        fit_x = {name: features[name][fit_part] for name in names}  # one copy per set, not one per C
        fitted = parallel(delayed(_fit_probe)(fit_x[name], train_y[fit_part], c, max_iter) for name, c in jobs)
        scores: dict[str, list[float]] = {name: [] for name in names}
        for (name, _), probe in zip(jobs, tqdm(fitted, total=len(jobs), desc="linear probe: choose C",
                                               unit="fit", leave=False), strict=True):
            scores[name].append(probe.score(features[name][val], train_y[val]))
        best_c = {name: c_grid[int(np.argmax(scores[name]))] for name in names}
    fitted = parallel(delayed(_fit_probe)(features[name], train_y, best_c[name], max_iter) for name in names)
    return dict(zip(names, tqdm(fitted, total=len(names), desc="linear probe: refit", unit="fit", leave=False),
                    strict=True))


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, seed: int = 0,
                     c_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), val_fraction: float = 0.2,
                     min_train_for_selection: int = 50, max_iter: int = 1000):
    """One feature set's probe: :func:`fit_linear_probes` on ``{"x": train_x}``.

    Returns:
        A fitted scikit-learn pipeline (scaler, logistic regression).
    """
    return fit_linear_probes({"x": train_x}, train_y, seed=seed, c_grid=c_grid, val_fraction=val_fraction,
                             min_train_for_selection=min_train_for_selection, max_iter=max_iter)["x"]


def linear_probe(backbone: Backbone, train_set, test_set, stages: Sequence[str] | None = None, size: int | None = 32,
                 seed: int = 0, batch_size: int = 256, device: str | torch.device = "cpu",
                 c_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0), val_fraction: float = 0.2,
                 n_jobs: int = 1) -> dict[str, float]:
    """Test accuracy of a linear classifier on the frozen pooled features of each stage.

    The layer-wise linear evaluation of Gidaris et al. (ICLR 2018, their Table 1) and Ren & Lee (CVPR 2018): how
    linearly separable the classes are after each stage; see :func:`fit_linear_probes`.

    Args:
        backbone: Frozen; not modified.
        train_set, test_set: Classification datasets (items ``(image, label)``).
        stages: Stage names; ``None`` means all of the backbone's.
        size: Side images are resized to.
        seed: Seeds the validation split.
        n_jobs: Processes for the probe fits (-1: every core; on a GPU machine the fits, not the features, take
            the time).

    Returns:
        ``{stage: accuracy}`` in network order.
    """
    device = resolve_device(device)
    train_features, train_labels = classification_features(backbone, train_set, stages, size, batch_size, device)
    test_features, test_labels = classification_features(backbone, test_set, stages, size, batch_size, device)
    probes = fit_linear_probes({stage: x.double().numpy() for stage, x in train_features.items()},
                               train_labels.numpy(), seed=seed, c_grid=c_grid, val_fraction=val_fraction,
                               n_jobs=n_jobs)
    return {stage: float(probe.score(test_features[stage].double().numpy(), test_labels.numpy()))
            for stage, probe in probes.items()}


def plot_stage_curve(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                     title: str = "linear probe per stage") -> Path:
    """PNG of linear-probe accuracy against stage, one line per checkpoint (the random baseline dashed grey).

    Args:
        results: ``{label: {stage: accuracy}}``, e.g. :func:`linear_probe` per checkpoint.
        path: Where to write the PNG (written under a temporary name, then renamed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: list[str] = []
    for curve in results.values():
        stages += [s for s in curve if s not in stages]
    fig, ax = plt.subplots(figsize=(1.2 * len(stages) + 2.5, 3.2))
    for label, curve in results.items():
        xs = [stages.index(s) for s in curve]
        style = {"color": "0.5", "linestyle": "--"} if label == RANDOM or label.startswith(f"{RANDOM}/") else {}
        ax.plot(xs, list(curve.values()), marker="o", label=label, **style)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_xlabel("backbone stage")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path


class LinearClassifier(nn.Module):
    """A backbone, global average pooling of its last stage and a linear layer: the fine-tuning classifier.

    Shape:
        - Input: :math:`(B, 3, H, W)` RGB in [0, 1] (normalised inside).
        - Output: :math:`(B, K)` logits.

    Examples:
        >>> classifier = build_classifier(load_backbone(None), num_classes=10)
        >>> classifier(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.out_channels, num_classes)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone.pooled(normalize(images)))


def build_classifier(backbone: Backbone, num_classes: int, seed: int = 0) -> LinearClassifier:
    """A :class:`LinearClassifier` on a copy of ``backbone``, the linear layer drawn with ``seed``."""
    with seeded(seed):
        return LinearClassifier(copy.deepcopy(backbone), num_classes)


@torch.no_grad()
def evaluate_classifier(model: nn.Module, dataset, size: int | None = 32, batch_size: int = 256,
                        device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of a classifier that takes [0, 1] images."""
    device = resolve_device(device)
    model.to(device).eval()
    correct = total = 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda items: _classification_collate(items, size))
    for images, labels in loader:
        correct += int((model(images.to(device)).argmax(1).cpu() == labels).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("classification test set is empty")
    return correct / total


def finetune_classifier(backbone: Backbone, train_set, test_set, steps: int = 500, batch_size: int = 64,
                        lr: float = 1e-3, seed: int = 0, device: str | torch.device = "cpu", size: int | None = 32,
                        weight_decay: float = 0.05, warmup_steps: int | None = None, grad_clip: float = 5.0,
                        num_classes: int | None = None) -> float:
    """Test accuracy after fine-tuning a copy of the whole backbone with a new linear head (AdamW, cosine).

    The fine-tuning protocol of Ren & Lee (CVPR 2018): every layer trains, starting from the pretrained weights.

    Args:
        backbone: Not modified (a copy is trained).
        num_classes: Defaults to ``len(train_set.classes)``.
    """
    device = resolve_device(device)
    num_classes = len(train_set.classes) if num_classes is None else num_classes
    model = build_classifier(backbone, num_classes, seed=seed)

    def loss_fn(model, batch):
        images, labels = batch
        return F.cross_entropy(model(images.to(device)), labels.to(device))

    _train(model, train_set, collate=lambda items: _classification_collate(items, size), loss_fn=loss_fn,
           steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device, optimizer="adamw",
           weight_decay=weight_decay, warmup_steps=warmup_steps, grad_clip=grad_clip, desc="finetune classifier")
    return evaluate_classifier(model, test_set, size=size, device=device)


# ---------------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------------


def build_detector(backbone: Backbone, num_classes: int, kind: str = "fasterrcnn", min_size: int = 256,
                   max_size: int = 512, trainable_stages: int = 5, norm: str = "batch", fpn_channels: int = 256,
                   anchor_sizes: Sequence[int] | None = None, detections_per_image: int = 100,
                   score_threshold: float = 0.001, seed: int = 0) -> nn.Module:
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


def train_detector(model: nn.Module, dataset, steps: int = 1000, batch_size: int = 4, lr: float = 0.01, seed: int = 0,
                   device: str | torch.device = "cpu", optimizer: str = "sgd", weight_decay: float = 1e-4,
                   warmup_steps: int | None = None, grad_clip: float = 10.0) -> list[float]:
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


# ---------------------------------------------------------------------------------------------------------------
# Semantic segmentation
# ---------------------------------------------------------------------------------------------------------------


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


def build_segmenter(backbone: Backbone, num_classes: int, head: str = "fpn", aux: bool = False,
                    trainable_stages: int = 5, norm: str = "batch", channels: int = 128, seed: int = 0
                    ) -> SegmentationModel:
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


def train_segmenter(model: SegmentationModel, dataset, steps: int = 1000, batch_size: int = 8, lr: float = 0.01,
                    seed: int = 0, device: str | torch.device = "cpu", size: int | None = 128,
                    optimizer: str = "sgd", weight_decay: float = 1e-4, aux_weight: float = 0.5,
                    warmup_steps: int | None = None, grad_clip: float = 10.0) -> list[float]:
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


# ---------------------------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------------------------


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


def evaluate_depth_zero_shot(backbone: Backbone, depth_head: DepthHead, pairs: Sequence, size: int = 128,
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
                   batch_size: int = 4, lr: float = 1e-4, seed: int = 0, device: str | torch.device = "cpu",
                   size: int = 128, scale_invariant_weight: float = 1.0, weight_decay: float = 1e-4,
                   warmup_steps: int | None = None, grad_clip: float = 5.0) -> tuple[Backbone, DepthHead]:
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


# ---------------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    """One number of a transfer run.

    Args:
        checkpoint: The checkpoint path, or ``"random"``.
        label: The checkpoint's name in tables.
        task: e.g. ``"detection"``, ``"linear_probe"``.
        metric: e.g. ``"mAP"``, ``"acc@layer3"``.
        value: The score.
        seed: The seed of the run (head initialisation, data order).
        budget: How much training it got, e.g. ``"steps=1000,batch_size=4,lr=0.01"``.
        wall_s: Seconds the task took for this checkpoint.
    """

    checkpoint: str
    label: str
    task: str
    metric: str
    value: float
    seed: int
    budget: str
    wall_s: float


_FIELDS = tuple(f.name for f in dataclasses.fields(ResultRow))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(rows: Sequence[ResultRow], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.csv`` (one row per number) and ``results.md`` (:func:`format_table`), each atomically.

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dataclasses.asdict(row))
    _write_atomic(out / "results.csv", buffer.getvalue())
    _write_atomic(out / "results.md", format_table(rows) + "\n")
    return out / "results.csv", out / "results.md"


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """The rows of a ``results.csv`` (or of the folder holding it)."""
    path = Path(path)
    path = path / "results.csv" if path.is_dir() else path
    with open(path, newline="") as f:
        return [ResultRow(checkpoint=r["checkpoint"], label=r["label"], task=r["task"], metric=r["metric"],
                          value=float(r["value"]), seed=int(r["seed"]), budget=r["budget"], wall_s=float(r["wall_s"]))
                for r in csv.DictReader(f)]


def format_table(rows: Sequence[ResultRow], digits: int = 4) -> str:
    """A markdown table: one row per checkpoint label (random baselines first), one column per ``task/metric``.

    A cell is the mean over seeds (``± sd (n=k)`` with several), and for a checkpoint other than the baseline the
    difference to the ``"random"`` row's mean in parentheses.
    """
    if not rows:
        return "(no results)"
    labels, columns = [], []
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        column = f"{row.task}/{row.metric}"
        labels += [row.label] if row.label not in labels else []
        columns += [column] if column not in columns else []
        cells.setdefault((row.label, column), []).append(row.value)
    baselines = [label for label in labels if label == RANDOM or label.startswith(f"{RANDOM}/")]
    labels = baselines + [label for label in labels if label not in baselines]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    def cell(label: str, column: str) -> str:
        values = cells.get((label, column))
        if not values:
            return "-"
        text = f"{mean(values):.{digits}f}"
        if len(values) > 1:
            text += f" ± {statistics.stdev(values):.{digits}f} (n={len(values)})"
        baseline = cells.get((RANDOM, column))
        if label not in baselines and baseline:
            text += f" ({mean(values) - mean(baseline):+.{digits}f})"
        return text

    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([label] + [cell(label, c) for c in columns]) + " |" for label in labels]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------------------------


def _split_kwargs(task: str, settings: Mapping, *functions: Callable) -> list[dict]:
    """Route a task's budget entries to the functions whose keyword arguments they name."""
    routed = [{} for _ in functions]
    for key, value in settings.items():
        if key in ("seed", "device"):
            raise ValueError(f"budget[{task!r}]: {key!r} is run_transfer's own argument, not a budget setting")
        targets = [i for i, f in enumerate(functions) if key in inspect.signature(f).parameters]
        if not targets:
            names = sorted({p for f in functions for p in inspect.signature(f).parameters})
            raise ValueError(f"budget[{task!r}]: unknown setting {key!r}; expected one of {names}")
        for i in targets:
            routed[i][key] = value
    return routed


def _task_functions() -> dict[str, tuple[Callable, ...]]:
    """The functions each task's budget settings are keyword arguments of."""
    return {"linear_probe": (linear_probe,), "finetune": (finetune_classifier,),
            "detection": (build_detector, train_detector), "segmentation": (build_segmenter, train_segmenter),
            "depth": (evaluate_depth_zero_shot, finetune_depth)}


def check_budget(budget: Mapping[str, Mapping] | None) -> None:
    """Raise a ValueError naming the task and key of any budget setting no task function takes (before any work)."""
    unknown = sorted(set(budget or {}) - set(TASKS))
    if unknown:
        raise ValueError(f"budget: unknown task(s) {unknown}; expected some of {TASKS}")
    for task, settings in (budget or {}).items():
        _split_kwargs(task, settings, *_task_functions()[task])


def _budget_text(settings: Mapping) -> str:
    return ",".join(f"{k}={v}" for k, v in settings.items() if v is not None)


def _task_data(data: Mapping, task: str, *splits: str) -> list:
    if task not in data:
        raise KeyError(f"data: no {task!r} entry (needed by the requested tasks); it has {sorted(data)}")
    missing = [s for s in splits if s not in data[task]]
    if missing:
        raise KeyError(f"data[{task!r}]: no {missing} split(s); it has {sorted(data[task])}")
    return [data[task][s] for s in splits]


def run_transfer(checkpoints: Mapping[str, str | os.PathLike | None], tasks: Sequence[str], data: Mapping,
                 budget: Mapping[str, Mapping] | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "auto") -> list[ResultRow]:
    """Evaluate every checkpoint, and the random-initialisation baseline, on the requested tasks at one budget.

    The baseline (label ``"random"``, or ``"random/<arch>"`` when the checkpoints use several architectures) is
    always added: torchvision's initialisation of the same architecture drawn with ``seed``, trained with the same
    budget, seed and data order, so every difference is the pretraining's.

    Args:
        checkpoints: ``{label: checkpoint path}``; a ``None`` / ``"random"`` path is a random-init entry.
        tasks: Among :data:`TASKS`. ``"depth"`` scores checkpoints that have a ``depth`` objective zero-shot
            (task ``depth_zero_shot``; the baseline with a fresh head) and, with ``data["depth"]["train"]`` and
            ``steps > 0``, after fine-tuning (``depth_finetune``).
        data: ``{"classification": {"train", "test"}, "detection": {"train", "test"}, "segmentation":
            {"train", "test"}, "depth": {"test", optional "train"}}``: datasets following the module's conventions
            (``linear_probe`` and ``finetune`` both read ``"classification"``).
        budget: ``{task: settings}`` overriding :data:`DEFAULT_BUDGET`; settings are keyword arguments of the task's
            functions (e.g. ``{"detection": {"kind": "maskrcnn", "steps": 2000}}``).
        seed: Seeds the baseline's initialisation, every head's initialisation and every data order.
        out_dir: Where ``results.csv``, ``results.md`` (rewritten after each checkpoint) and
            ``linear_probe_stages.png`` go; ``None`` writes nothing.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.

    Returns:
        Every :class:`ResultRow`, the baseline's first.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"tasks: expected some of {TASKS}, got {list(tasks)}")
    check_budget(budget)
    settings = {task: {**DEFAULT_BUDGET[task], **dict((budget or {}).get(task, {}))} for task in TASKS}
    device = resolve_device(device)

    entries = {label: (None if is_random(path) else str(path)) for label, path in checkpoints.items()}
    if entries.get(RANDOM) is not None:
        raise ValueError(f"checkpoints: the label {RANDOM!r} is reserved for the random-init baseline")
    archs = {label: checkpoint_arch(path) for label, path in entries.items() if path is not None}
    baselines = {label for label, path in entries.items() if path is None}
    needed = sorted(set(archs.values())) or ["resnet18"]
    runs: list[tuple[str, str | None, str]] = []
    if not baselines:
        for arch in needed:
            runs.append((RANDOM if len(needed) == 1 else f"{RANDOM}/{arch}", None, arch))
    runs += [(label, None, needed[0]) for label in entries if label in baselines]
    runs += [(label, path, archs[label]) for label, path in entries.items() if path is not None]

    rows: list[ResultRow] = []
    curves: dict[str, dict[str, float]] = {}
    for label, path, arch in runs:
        backbone = load_backbone(path, arch=arch, seed=seed)
        checkpoint_name = path if path is not None else RANDOM

        def add(task: str, metrics: Mapping[str, float], task_budget: str, wall: float,
                label: str = label, checkpoint_name: str = checkpoint_name) -> None:
            rows.extend(ResultRow(checkpoint=checkpoint_name, label=label, task=task, metric=metric,
                                  value=float(value), seed=seed, budget=task_budget, wall_s=wall)
                        for metric, value in metrics.items())

        for task in tasks:
            tic = time.perf_counter()
            config = settings[task]
            if task == "linear_probe":
                train, test = _task_data(data, "classification", "train", "test")
                (kwargs,) = _split_kwargs(task, config, linear_probe)
                accuracies = linear_probe(backbone, train, test, seed=seed, device=device, **kwargs)
                curves[label] = accuracies
                add(task, {f"acc@{stage}": acc for stage, acc in accuracies.items()},
                    f"logistic regression,n_train={len(train)},{_budget_text(config)}", time.perf_counter() - tic)
            elif task == "finetune":
                train, test = _task_data(data, "classification", "train", "test")
                (kwargs,) = _split_kwargs(task, config, finetune_classifier)
                accuracy = finetune_classifier(backbone, train, test, seed=seed, device=device, **kwargs)
                add(task, {"accuracy": accuracy}, _budget_text(config), time.perf_counter() - tic)
            elif task == "detection":
                train, test = _task_data(data, "detection", "train", "test")
                build_kwargs, train_kwargs = _split_kwargs(task, config, build_detector, train_detector)
                model = build_detector(backbone, len(train.categories), seed=seed, **build_kwargs)
                train_detector(model, train, seed=seed, device=device, **train_kwargs)
                scores = evaluate_detection(model, test, device=device)
                add(task, scores, _budget_text(config), time.perf_counter() - tic)
            elif task == "segmentation":
                train, test = _task_data(data, "segmentation", "train", "test")
                build_kwargs, train_kwargs = _split_kwargs(task, config, build_segmenter, train_segmenter)
                model = build_segmenter(backbone, len(train.classes), seed=seed, **build_kwargs)
                train_segmenter(model, train, seed=seed, device=device, **train_kwargs)
                scores = evaluate_segmentation(model, test, size=train_kwargs.get("size", 128), device=device)
                add(task, scores, _budget_text(config), time.perf_counter() - tic)
            else:
                _depth_task(backbone, path, arch, data, config, seed, device, add)
        if out_dir is not None:
            write_results(rows, out_dir)
    if out_dir is not None and curves:
        plot_stage_curve(curves, Path(out_dir) / "linear_probe_stages.png")
    return rows


def _depth_task(backbone: Backbone, path: str | None, arch: str, data: Mapping, config: Mapping, seed: int,
                device: torch.device, add: Callable) -> None:
    (test,) = _task_data(data, "depth", "test")
    size = config.get("size", 128)
    tic = time.perf_counter()
    if path is None:
        head = load_depth_head(None, arch=arch, seed=seed)
    else:
        try:
            head = load_depth_head(path, seed=seed)
        except CheckpointError as error:
            if "no objective" not in str(error):
                raise
            warnings.warn(f"depth: {path} has no depth head, so no zero-shot depth for it", stacklevel=3)
            head = None
    if head is not None:
        add("depth_zero_shot", evaluate_depth_zero_shot(backbone, head, test, size=size, device=device),
            f"zero-shot,size={size}", time.perf_counter() - tic)
    train = data["depth"].get("train")
    if train and config.get("steps", 0) > 0:
        tic = time.perf_counter()
        start = head if head is not None else load_depth_head(None, arch=arch, seed=seed)
        (kwargs,) = _split_kwargs("depth", config, finetune_depth)
        tuned_backbone, tuned_head = finetune_depth(backbone, start, train, seed=seed, device=device, **kwargs)
        add("depth_finetune", evaluate_depth_zero_shot(tuned_backbone, tuned_head, test, size=size, device=device),
            _budget_text(config), time.perf_counter() - tic)


__all__ = [
    "DEFAULT_BUDGET",
    "DETECTORS",
    "RANDOM",
    "SEGMENTATION_HEADS",
    "TASKS",
    "CheckpointError",
    "LinearClassifier",
    "ResultRow",
    "SegmentationModel",
    "build_classifier",
    "build_detector",
    "build_segmenter",
    "check_budget",
    "checkpoint_arch",
    "classification_features",
    "coco_evaluate",
    "confusion_matrix",
    "evaluate_classifier",
    "evaluate_depth_zero_shot",
    "evaluate_detection",
    "evaluate_segmentation",
    "finetune_classifier",
    "finetune_depth",
    "fit_linear_probe",
    "fit_linear_probes",
    "format_table",
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
    "resolve_checkpoint",
    "resolve_device",
    "run_transfer",
    "seeded",
    "segmentation_loss",
    "segmentation_scores",
    "train_detector",
    "train_segmenter",
    "write_results",
]
