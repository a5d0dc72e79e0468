"""Classification transfer: the layer-wise linear probe on frozen features, and fine-tuning the whole backbone.

Both read the ``classification`` data group: items ``(image (3, H, W) in [0, 1], label)``, the dataset has
``classes``.
"""

import copy
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from adapt.transfer.common import _resize, _train, seeded
from adapt.transfer.results import ResultRow, plot_stage_curve
from adapt.transfer.task import Score, Task, TaskContext
from pretext.common import normalize
from synth.backbone import Backbone, pooled_features
from synth.runtime import resolve_device


@dataclass
class LinearProbeBudget:
    """Settings of the ``linear_probe`` task (:func:`linear_probe`).

    Args:
        size: Side images are resized to (``None``: kept).
        stages: Stage names; ``None`` means all of the backbone's.
        batch_size: Images per feature batch.
        c_grid: Inverse regularisation strengths the validation split chooses from.
        val_fraction: Share of the training set that chooses :math:`C`.
        n_jobs: Processes for the probe fits (-1: every core).
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("size", "stages")
    size: int | None = 32
    stages: Sequence[str] | None = None
    batch_size: int = 256
    c_grid: Sequence[float] = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
    val_fraction: float = 0.2
    n_jobs: int = 1


@dataclass
class FinetuneBudget:
    """Settings of the ``finetune`` task (:func:`finetune_classifier`).

    Args:
        steps: Optimizer steps (AdamW, warm-up then cosine).
        batch_size: Images per step.
        lr: Peak learning rate.
        size: Side images are resized to (``None``: kept).
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: Linear warm-up steps; ``None``: a tenth of ``steps``, at most 100.
        grad_clip: Max global gradient norm (0 disables clipping).
        label_fractions: Few-label fine-tuning: for each fraction :math:`f`, the same fine-tuning on a seeded,
            class-stratified subset of the training split holding :math:`f` of each class (at least one image per
            class; :func:`label_subset`), the same subset for random init and every checkpoint at one seed. Metric
            ``accuracy`` when this is exactly ``(1.0,)``, else ``accuracy@<f>`` per fraction (``accuracy@0.01``,
            ``accuracy@1``).
    """

    SHOWN: ClassVar[tuple[str, ...]] = ("steps", "batch_size", "lr", "size")
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    size: int | None = 32
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    grad_clip: float = 5.0
    label_fractions: Sequence[float] = (1.0,)

    def __post_init__(self) -> None:
        fractions = list(self.label_fractions)
        if not fractions or any(not 0 < f <= 1 for f in fractions) or len(set(fractions)) != len(fractions):
            raise ValueError(f"label_fractions={self.label_fractions!r}: need distinct fractions in (0, 1]")


def fraction_metric(fraction: float) -> str:
    """The metric name of a label fraction: ``accuracy@0.01``, ``accuracy@1``."""
    return f"accuracy@{fraction:g}"


def dataset_labels(dataset) -> np.ndarray:
    """Every item's integer label, :math:`(N,)` int64: the dataset's ``labels`` when it has one of its length (no
    image is read), else read item by item."""
    labels = getattr(dataset, "labels", None)
    if labels is not None and len(labels) == len(dataset):
        return np.asarray([int(label) for label in labels], dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class LabelSubset(torch.utils.data.Dataset):
    """Some items of a classification dataset, keeping its ``classes`` (and ``labels``, restricted).

    Args:
        dataset: Items ``(image, label)`` with ``classes``.
        indices: The items kept, in this order.
    """

    def __init__(self, dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.classes = dataset.classes
        self.labels = dataset_labels(dataset)[self.indices] if len(self.indices) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        return self.dataset[self.indices[index]]


def label_subset(dataset, fraction: float, seed: int = 0):
    """A seeded, class-stratified share of a classification dataset: ``max(1, round(fraction * n_c))`` items of
    each class :math:`c` with :math:`n_c` items (a :class:`LabelSubset` keeping ``classes``; ``fraction == 1``
    returns ``dataset`` itself).

    The items of a class are a prefix of one permutation of that class drawn from ``seed`` (the class's own
    generator), so the subset depends only on the labels, the fraction and the seed: the same for random init,
    every checkpoint and the naive rows, and the subsets of smaller fractions are contained in those of larger ones.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction {fraction}: need 0 < fraction <= 1")
    if fraction == 1:
        return dataset
    labels = dataset_labels(dataset)
    keep = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        order = np.random.default_rng([seed, int(label)]).permutation(len(members))
        keep.append(members[order[:max(1, round(fraction * len(members)))]])
    return LabelSubset(dataset, np.sort(np.concatenate(keep)) if keep else [])


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


def linear_probe(backbone: Backbone, train_set, test_set, stages: Sequence[str] | None = LinearProbeBudget.stages,
                 size: int | None = LinearProbeBudget.size, seed: int = 0,
                 batch_size: int = LinearProbeBudget.batch_size, device: str | torch.device = "cpu",
                 c_grid: Sequence[float] = LinearProbeBudget.c_grid,
                 val_fraction: float = LinearProbeBudget.val_fraction,
                 n_jobs: int = LinearProbeBudget.n_jobs) -> dict[str, float]:
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


def finetune_classifier(backbone: Backbone, train_set, test_set, steps: int = FinetuneBudget.steps,
                        batch_size: int = FinetuneBudget.batch_size, lr: float = FinetuneBudget.lr, seed: int = 0,
                        device: str | torch.device = "cpu", size: int | None = FinetuneBudget.size,
                        weight_decay: float = FinetuneBudget.weight_decay,
                        warmup_steps: int | None = FinetuneBudget.warmup_steps,
                        grad_clip: float = FinetuneBudget.grad_clip, num_classes: int | None = None) -> float:
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
# The tasks
# ---------------------------------------------------------------------------------------------------------------


def _run_linear_probe(context: TaskContext, budget: LinearProbeBudget) -> list[Score]:
    train, test = context.splits("train", "test")
    accuracies = linear_probe(context.backbone, train, test, stages=budget.stages, size=budget.size,
                              seed=context.seed, batch_size=budget.batch_size, device=context.device,
                              c_grid=budget.c_grid, val_fraction=budget.val_fraction, n_jobs=budget.n_jobs)
    return [Score("linear_probe", {f"acc@{stage}": acc for stage, acc in accuracies.items()},
                  f"logistic regression,n_train={len(train)},{context.budget_text}")]


def _plot_stages(rows: Sequence[ResultRow], out_dir: str | os.PathLike) -> Path | None:
    """``linear_probe_stages.png``: the probe's accuracy per stage, one line per checkpoint."""
    curves: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.task == "linear_probe" and row.metric.startswith("acc@"):
            curves.setdefault(row.label, {})[row.metric.removeprefix("acc@")] = row.value
    return plot_stage_curve(curves, Path(out_dir) / "linear_probe_stages.png") if curves else None


def _run_finetune(context: TaskContext, budget: FinetuneBudget) -> list[Score]:
    train, test = context.splits("train", "test")
    fractions = list(budget.label_fractions)
    scores = []
    for fraction in fractions:
        tic = time.perf_counter()
        subset = label_subset(train, fraction, seed=context.seed)
        accuracy = finetune_classifier(context.backbone, subset, test, steps=budget.steps,
                                       batch_size=budget.batch_size, lr=budget.lr, seed=context.seed,
                                       device=context.device, size=budget.size, weight_decay=budget.weight_decay,
                                       warmup_steps=budget.warmup_steps, grad_clip=budget.grad_clip)
        if fractions == [1.0]:
            return [Score("finetune", {"accuracy": accuracy}, context.budget_text)]
        scores.append(Score("finetune", {fraction_metric(fraction): accuracy},
                            f"{context.budget_text},n_train={len(subset)}", wall_s=time.perf_counter() - tic))
    return scores


#: Layer-wise linear evaluation of frozen features (Gidaris et al., ICLR 2018; Ren & Lee, CVPR 2018).
LINEAR_PROBE = Task(name="linear_probe", data="classification", budget=LinearProbeBudget, run=_run_linear_probe,
                    report=_plot_stages)

#: Fine-tuning every layer with a new linear head (Ren & Lee, CVPR 2018).
FINETUNE = Task(name="finetune", data="classification", budget=FinetuneBudget, run=_run_finetune)


__all__ = [
    "FINETUNE",
    "LINEAR_PROBE",
    "FinetuneBudget",
    "LabelSubset",
    "LinearClassifier",
    "LinearProbeBudget",
    "build_classifier",
    "classification_features",
    "dataset_labels",
    "evaluate_classifier",
    "finetune_classifier",
    "fit_linear_probe",
    "fit_linear_probes",
    "fraction_metric",
    "label_subset",
    "linear_probe",
]
