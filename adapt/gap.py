r"""Measuring the domain gap: how far apart a frozen backbone puts rendered and real images.

Four numbers per backbone stage, on globally average-pooled features (:func:`synth.backbone.pooled_features`):

- ``domain_acc``: cross-validated accuracy of a fresh logistic regression telling the domains apart (0.5: no gap);
- ``mmd_linear`` and ``mmd_rbf``: the unbiased squared maximum mean discrepancy (Gretton et al., "A Kernel
  Two-Sample Test", JMLR 2012) with a linear and a Gaussian kernel (0 in expectation: no gap);
- ``pad``: the proxy :math:`\mathcal{A}`-distance (Ben-David et al., "Analysis of Representations for Domain
  Adaptation", NeurIPS 2007) from a linear classifier's held-out error (0: no gap, 2: separable).

:class:`DomainGapMonitor` computes them for the engine at every evaluation and draws a t-SNE of the last stage.
Every random choice (subsamples, folds, t-SNE) comes from an explicit seed.
"""

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import TSNE
from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_score, train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from torch import Tensor, nn

from synth.backbone import pooled_features
from synth.io import atomic_path, atomic_write_bytes

ArrayLike = Tensor | np.ndarray


def _float64(name: str, value: ArrayLike) -> Tensor:
    """A (N, D) float64 CPU tensor; raises ValueError naming ``name`` for other shapes or non-finite values."""
    tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value.detach())
    tensor = tensor.to("cpu", torch.float64)
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a (N, D) matrix of features, got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name}: features contain NaN or infinite values")
    return tensor


def _pair(x: ArrayLike, y: ArrayLike, minimum: int) -> tuple[Tensor, Tensor]:
    x, y = _float64("x", x), _float64("y", y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y have different feature sizes: {x.shape[1]} and {y.shape[1]}")
    for name, value in (("x", x), ("y", y)):
        if len(value) < minimum:
            raise ValueError(f"{name}: needs at least {minimum} samples, got {len(value)}")
    return x, y


# ---------------------------------------------------------------------------------------------------------------
# Maximum mean discrepancy
# ---------------------------------------------------------------------------------------------------------------


def median_bandwidth(x: ArrayLike, y: ArrayLike) -> float:
    r"""The median heuristic (Gretton et al., JMLR 2012, Sec. 8): the median Euclidean distance between distinct
    points of the pooled sample, the :math:`\sigma` of :func:`mmd2`'s Gaussian kernel.

    Shape:
        - x: :math:`(N, D)`, y: :math:`(M, D)`.
    """
    x, y = _pair(x, y, minimum=1)
    z = torch.cat([x, y])
    distances = torch.cdist(z, z)
    off_diagonal = distances[~torch.eye(len(z), dtype=torch.bool)]
    median = float(off_diagonal.median()) if off_diagonal.numel() else 0.0
    # Identical points only: any positive bandwidth gives the same (zero) discrepancy.
    return median if median > 0 else 1.0


def mmd2(x: ArrayLike, y: ArrayLike, kernel: str = "rbf", bandwidth: float | Sequence[float] | None = None) -> float:
    r"""Unbiased squared maximum mean discrepancy (Gretton et al., "A Kernel Two-Sample Test", JMLR 2012, Eq. 3).

    .. math::
        \mathrm{MMD}^2_u = \frac{1}{N(N-1)}\sum_{i \ne j} k(x_i, x_j) + \frac{1}{M(M-1)}\sum_{i \ne j} k(y_i, y_j)
            - \frac{2}{NM}\sum_{i, j} k(x_i, y_j),

    with :math:`k(a, b) = a^\top b` (``"linear"``: an unbiased estimate of :math:`\|\mu_x - \mu_y\|^2`, computed in
    :math:`O((N + M) D)`) or :math:`k(a, b) = \sum_\sigma \exp(-\|a - b\|^2 / 2\sigma^2)` (``"rbf"``, a sum of
    Gaussian kernels, one per bandwidth, as in multi-kernel MMD). Being unbiased, it can be slightly negative when
    the distributions are equal. Computed in float64.

    Args:
        x: Samples of the first distribution.
        y: Samples of the second distribution.
        kernel: ``"linear"`` or ``"rbf"``.
        bandwidth: The Gaussian kernel's :math:`\sigma`, or a list of them; ``None`` means the median heuristic
            (:func:`median_bandwidth`). Ignored by the linear kernel.

    Shape:
        - x: :math:`(N, D)`, y: :math:`(M, D)`, :math:`N, M \ge 2`.
        - Output: a float.

    Raises:
        ValueError: bad shapes, too few samples, non-finite values, an unknown kernel or a non-positive bandwidth.

    Examples:
        >>> x, y = torch.zeros(4, 2), torch.ones(5, 2)
        >>> round(mmd2(x, y, kernel="linear"), 6)
        2.0
    """
    x, y = _pair(x, y, minimum=2)
    n, m = len(x), len(y)
    if kernel == "linear":
        sum_x, sum_y = x.sum(0), y.sum(0)
        # sum over i != j of x_i . x_j = |sum_i x_i|^2 - sum_i |x_i|^2
        within_x = (sum_x.dot(sum_x) - x.square().sum()) / (n * (n - 1))
        within_y = (sum_y.dot(sum_y) - y.square().sum()) / (m * (m - 1))
        return float(within_x + within_y - 2.0 * sum_x.dot(sum_y) / (n * m))
    if kernel != "rbf":
        raise ValueError(f"mmd2: kernel must be 'linear' or 'rbf', got {kernel!r}")
    if bandwidth is None:
        bandwidths = [median_bandwidth(x, y)]
    elif isinstance(bandwidth, int | float):
        bandwidths = [float(bandwidth)]
    else:
        bandwidths = [float(b) for b in bandwidth]
    if not bandwidths or min(bandwidths) <= 0:
        raise ValueError(f"mmd2: bandwidths must be positive, got {bandwidth!r}")
    z = torch.cat([x, y])
    squared = torch.cdist(z, z).square()
    gram = sum(torch.exp(-squared / (2.0 * sigma**2)) for sigma in bandwidths)
    k_xx, k_yy, k_xy = gram[:n, :n], gram[n:, n:], gram[:n, n:]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (n * (n - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return float(within_x + within_y - 2.0 * k_xy.mean())


# ---------------------------------------------------------------------------------------------------------------
# Classifier-based measures
# ---------------------------------------------------------------------------------------------------------------


def _balanced_domains(x: Tensor, y: Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features and labels (0: x, 1: y) with the larger set subsampled to the smaller's size."""
    rng = np.random.default_rng(seed)
    count = min(len(x), len(y))
    x = x.numpy()[np.sort(rng.choice(len(x), count, replace=False))]
    y = y.numpy()[np.sort(rng.choice(len(y), count, replace=False))]
    return np.concatenate([x, y]), np.concatenate([np.zeros(count, dtype=int), np.ones(count, dtype=int)])


def domain_classifier_accuracy(x: ArrayLike, y: ArrayLike, seed: int = 0, folds: int = 5) -> float:
    r"""How well a fresh linear classifier tells two feature sets apart: cross-validated accuracy.

    A logistic regression (L2, :math:`C = 1`) on standardised features (the scaler is fitted inside each training
    fold), on a class-balanced subsample (the larger set is subsampled to the smaller's size, so chance is 0.5), with
    stratified ``folds``-fold cross-validation. 0.5 means the domains are linearly indistinguishable, 1.0 separable:
    the "domain classifier" test of domain-adaptation papers (e.g. Ganin et al., JMLR 2016, Sec. 6.2.4).

    Args:
        x: Features of the first domain.
        y: Features of the second domain.
        seed: Seeds the subsample and the folds.
        folds: Cross-validation folds.

    Shape:
        - x: :math:`(N, D)`, y: :math:`(M, D)`, :math:`N, M \ge` ``folds``.
        - Output: a float in :math:`[0, 1]`.
    """
    if folds < 2:
        raise ValueError(f"domain_classifier_accuracy: folds must be >= 2, got {folds}")
    x, y = _pair(x, y, minimum=folds)
    features, labels = _balanced_domains(x, y, seed)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(cross_val_score(model, features, labels, cv=splits, scoring="accuracy").mean())


def proxy_a_distance(x: ArrayLike, y: ArrayLike, seed: int = 0) -> float:
    r"""Proxy :math:`\mathcal{A}`-distance (Ben-David et al., "Analysis of Representations for Domain Adaptation",
    NeurIPS 2007), as computed by Ganin et al. (JMLR 2016, Sec. 6.2.4).

    .. math::
        \hat{d}_{\mathcal{A}} = 2\,(1 - 2\epsilon),

    with :math:`\epsilon` the test error of a linear SVM trained to tell the domains apart: a class-balanced
    subsample is split in halves (stratified), the SVM's :math:`C \in \{0.01, 0.1, 1\}` is chosen by 3-fold
    cross-validation on the training half, and :math:`\epsilon` is measured on the other half. Features are
    standardised with the training half's statistics. Clipped to :math:`[0, 2]` (an error above 0.5 is chance).

    Args:
        x: Features of the first domain.
        y: Features of the second domain.
        seed: Seeds the subsample and the split.

    Shape:
        - x: :math:`(N, D)`, y: :math:`(M, D)`, :math:`N, M \ge 6`.
        - Output: a float in :math:`[0, 2]`.
    """
    x, y = _pair(x, y, minimum=6)
    features, labels = _balanced_domains(x, y, seed)
    train_x, test_x, train_y, test_y = train_test_split(features, labels, test_size=0.5, stratify=labels,
                                                        random_state=seed)
    model = make_pipeline(StandardScaler(), LinearSVC(max_iter=5000))
    search = GridSearchCV(model, {"linearsvc__C": [0.01, 0.1, 1.0]},
                          cv=StratifiedKFold(n_splits=3, shuffle=True, random_state=seed))
    search.fit(train_x, train_y)
    error = 1.0 - float(search.score(test_x, test_y))
    return float(np.clip(2.0 * (1.0 - 2.0 * error), 0.0, 2.0))


def _unit_scale(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets divided by one scalar: the root of the pooled sample's mean per-dimension variance."""
    scale = torch.cat([x, y]).var(dim=0).mean().sqrt()
    scale = scale if scale > 0 else torch.ones((), dtype=scale.dtype)
    return x / scale, y / scale


def domain_gap(synthetic: Mapping[str, ArrayLike], real: Mapping[str, ArrayLike], seed: int = 0) -> dict[str, float]:
    r"""Every gap measure for every stage: ``gap/<stage>/{domain_acc, mmd_linear, mmd_rbf, pad}``.

    Before the MMDs, both sets are divided by one scalar, the root of the pooled sample's mean per-dimension
    variance, so the values do not change when the encoder merely rescales its features and stay comparable over
    training; the linear MMD is then :math:`\|\mu_s - \mu_r\|^2` in units of the mean feature variance (summed over
    dimensions). The Gaussian MMD uses the median-heuristic bandwidth, itself scale-free. The classifiers
    standardise per dimension.

    Args:
        synthetic: Stage -> synthetic features.
        real: Stage -> real features, the same stages.
        seed: Seeds the classifiers' subsamples and splits.

    Shape:
        - synthetic[s]: :math:`(N, C_s)`, real[s]: :math:`(M, C_s)`.

    Raises:
        ValueError: the two dicts name different stages.
    """
    if set(synthetic) != set(real):
        raise ValueError(f"domain_gap: synthetic and real features have different stages: {sorted(synthetic)} and "
                         f"{sorted(real)}")
    metrics = {}
    for stage in synthetic:
        x, y = _pair(synthetic[stage], real[stage], minimum=6)
        scaled_x, scaled_y = _unit_scale(x, y)
        metrics[f"gap/{stage}/domain_acc"] = domain_classifier_accuracy(x, y, seed=seed)
        metrics[f"gap/{stage}/mmd_linear"] = mmd2(scaled_x, scaled_y, kernel="linear")
        metrics[f"gap/{stage}/mmd_rbf"] = mmd2(scaled_x, scaled_y, kernel="rbf")
        metrics[f"gap/{stage}/pad"] = proxy_a_distance(x, y, seed=seed)
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Pictures and the monitor
# ---------------------------------------------------------------------------------------------------------------


def embedding_plot(features_by_domain: Mapping[str, ArrayLike], path: str | os.PathLike, title: str = "",
                   seed: int = 0) -> Path:
    r"""A t-SNE map (van der Maaten & Hinton, JMLR 2008) of several domains' features, one colour per domain.

    The pooled features are standardised, then embedded with scikit-learn's t-SNE (PCA initialisation, seeded),
    with a perplexity of :math:`\min(30, (N - 1) / 3)` for :math:`N` points in all (t-SNE needs it below
    :math:`N`). Written with Matplotlib's Agg canvas, without pyplot's global figure registry, to a temporary name
    renamed into place, so a reader never sees half a file.

    Args:
        features_by_domain: Domain name -> features; the legend shows the names and counts.
        path: The PNG to write.
        title: The figure's title (e.g. the gap metrics).
        seed: Seeds t-SNE.

    Shape:
        - features_by_domain[d]: :math:`(N_d, C)`, at least 4 points in all.

    Returns:
        ``path``.
    """
    arrays = {name: _float64(f"features_by_domain[{name!r}]", value).numpy()
              for name, value in features_by_domain.items()}
    pooled = np.concatenate(list(arrays.values()))
    if len(pooled) < 4:
        raise ValueError(f"embedding_plot: needs at least 4 points in all, got {len(pooled)}")
    pooled = StandardScaler().fit_transform(pooled)
    perplexity = max(1.0, min(30.0, (len(pooled) - 1) / 3))
    embedded = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                    random_state=seed).fit_transform(pooled)
    figure = Figure(figsize=(5.0, 4.6))
    FigureCanvasAgg(figure)  # files only, and no pyplot: nothing global is touched
    axes = figure.add_subplot()
    start = 0
    for name, array in arrays.items():
        points = embedded[start:start + len(array)]
        start += len(array)
        axes.scatter(points[:, 0], points[:, 1], s=10, alpha=0.7, label=f"{name} ({len(array)})")
    axes.legend(loc="best", fontsize=8)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title, fontsize=8)
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    return path


class DomainGapMonitor:
    r"""The domain gap of the backbone's frozen features on fixed held-out images, for the engine's monitors.

    At each call, pools the features of the given stages (:func:`synth.backbone.pooled_features`, eval mode) for a
    fixed set of rendered and of real images and returns :func:`domain_gap`. With ``plot_dir``, it also draws a
    t-SNE of the last stage's features (:func:`embedding_plot`) to ``embedding_step_<step>.png`` and copies it to
    ``embedding.png`` (the latest; replaced atomically). Keeps the images and settings only: every value is a
    function of the backbone's weights and the seed.

    Args:
        synthetic_images: Normalised rendered images.
        real_images: Normalised real images.
        stages: Backbone stages to measure; ``None`` means the backbone's last three.
        seed: Seeds the classifiers and t-SNE.
        plot_dir: Folder for the t-SNE pictures (created when needed); ``None``: no pictures.

    Inputs: ``backbone``, ``step``
        - **backbone**: A :class:`~synth.backbone.Backbone` (its train/eval mode is restored afterwards).
        - **step**: The training step, for the picture's name.

    Shape:
        - synthetic_images: :math:`(N, 3, H, W)`, real_images: :math:`(M, 3, H', W')`, :math:`N, M \ge 6`.
        - Output: ``{"gap/<stage>/<metric>": float}``, see :func:`domain_gap`.

    Examples:
        >>> from synth.backbone import Backbone
        >>> monitor = DomainGapMonitor(synthetic_images=torch.randn(8, 3, 32, 32),
        ...                            real_images=torch.randn(8, 3, 32, 32), stages=["layer4"])
        >>> sorted(monitor(Backbone("resnet18"), step=0))
        ['gap/layer4/domain_acc', 'gap/layer4/mmd_linear', 'gap/layer4/mmd_rbf', 'gap/layer4/pad']
    """

    def __init__(self, *, synthetic_images: Tensor, real_images: Tensor, stages: list[str] | None = None,
                 seed: int = 0, plot_dir: str | None = None):
        for name, images in (("synthetic_images", synthetic_images), ("real_images", real_images)):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"DomainGapMonitor: {name} must be (N, 3, H, W), got {tuple(images.shape)}")
            if len(images) < 6:
                raise ValueError(f"DomainGapMonitor: {name} needs at least 6 images, got {len(images)}")
        self.synthetic_images = synthetic_images
        self.real_images = real_images
        self.stages = None if stages is None else list(stages)
        self.seed = seed
        self.plot_dir = plot_dir

    def __call__(self, backbone: nn.Module, step: int) -> dict[str, float]:
        stages = self.stages if self.stages is not None else list(backbone.stage_names)[-3:]
        synthetic = pooled_features(backbone, self.synthetic_images, stages)
        real = pooled_features(backbone, self.real_images, stages)
        metrics = domain_gap(synthetic, real, seed=self.seed)
        if self.plot_dir is not None:
            last = [s for s in backbone.stage_names if s in stages][-1]
            title = (f"step {step}, {last}: domain acc {metrics[f'gap/{last}/domain_acc']:.2f}, "
                     f"PAD {metrics[f'gap/{last}/pad']:.2f}\n"
                     f"MMD² linear {metrics[f'gap/{last}/mmd_linear']:.3g}, rbf {metrics[f'gap/{last}/mmd_rbf']:.3g}")
            folder = Path(self.plot_dir)
            folder.mkdir(parents=True, exist_ok=True)
            picture = embedding_plot({"synthetic": synthetic[last], "real": real[last]},
                                     folder / f"embedding_step_{step}.png", title=title, seed=self.seed)
            latest = folder / "embedding.png"
            atomic_write_bytes(latest, picture.read_bytes())
        return metrics


__all__ = ["DomainGapMonitor", "domain_classifier_accuracy", "domain_gap", "embedding_plot", "median_bandwidth",
           "mmd2", "proxy_a_distance"]
