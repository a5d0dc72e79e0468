"""Domain-gap measures: MMD against naive double loops and closed forms, the classifiers on separable and identical
sets, and the monitor on a real backbone writing its t-SNE picture."""

import itertools
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from adapt.gap import (
    DomainGapMonitor,
    domain_classifier_accuracy,
    domain_gap,
    embedding_plot,
    median_bandwidth,
    mmd2,
    proxy_a_distance,
)
from synth.backbone import Backbone

METRICS = ("domain_acc", "mmd_linear", "mmd_rbf", "pad")




def gaussian(n, d, seed, shift=0.0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def naive_mmd2(x, y, kernel):
    """Gretton et al. (JMLR 2012) Eq. 3, one pair at a time."""
    x, y = x.tolist(), y.tolist()
    n, m = len(x), len(y)
    within_x = sum(kernel(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    within_y = sum(kernel(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    between = sum(kernel(a, b) for a in x for b in y) / (n * m)
    return within_x + within_y - 2 * between


def dot(a, b):
    return sum(p * q for p, q in zip(a, b, strict=True))


def gaussian_kernel(sigma):
    return lambda a, b: math.exp(-sum((p - q) ** 2 for p, q in zip(a, b, strict=True)) / (2 * sigma**2))


# --- MMD -------------------------------------------------------------------------------------------------------------


def test_mmd_matches_naive_double_loops():
    x, y = gaussian(9, 3, seed=0), gaussian(7, 3, seed=1, shift=0.7)
    assert mmd2(x, y, kernel="linear") == pytest.approx(naive_mmd2(x, y, dot), rel=1e-10)
    assert mmd2(x, y, kernel="rbf", bandwidth=1.3) == pytest.approx(naive_mmd2(x, y, gaussian_kernel(1.3)), rel=1e-10)
    # Several bandwidths: the sum of the kernels.
    both = naive_mmd2(x, y, gaussian_kernel(0.5)) + naive_mmd2(x, y, gaussian_kernel(2.0))
    assert mmd2(x, y, kernel="rbf", bandwidth=[0.5, 2.0]) == pytest.approx(both, rel=1e-10)

    # The median heuristic: the (lower) median distance over distinct pairs of the pooled sample.
    points = torch.cat([x, y]).tolist()
    distances = sorted(math.dist(a, b) for a, b in itertools.combinations(points, 2))
    sigma = distances[(len(distances) - 1) // 2]
    assert median_bandwidth(x, y) == pytest.approx(sigma, rel=1e-12)
    assert mmd2(x, y) == pytest.approx(naive_mmd2(x, y, gaussian_kernel(sigma)), rel=1e-10)


def test_mmd_is_near_zero_for_one_distribution_and_positive_for_shifted_ones():
    x, y = gaussian(300, 5, seed=0), gaussian(300, 5, seed=1)
    shifted = gaussian(300, 5, seed=2, shift=1.0)
    assert abs(mmd2(x, y, kernel="rbf")) < 0.01
    assert abs(mmd2(x, y, kernel="linear")) < 0.1
    assert mmd2(x, shifted, kernel="rbf") > 0.1
    assert mmd2(x, shifted, kernel="linear") > 3.0
    # float32 and numpy inputs are computed in float64 all the same.
    assert mmd2(x.float().numpy(), shifted.float(), kernel="linear") == pytest.approx(
        mmd2(x, shifted, kernel="linear"), rel=1e-5)


def test_linear_mmd_estimates_the_squared_mean_difference():
    shift = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    x, y = gaussian(20000, 3, seed=0), gaussian(20000, 3, seed=1) + shift
    assert mmd2(x, y, kernel="linear") == pytest.approx(float(shift.square().sum()), rel=0.02)


def test_mmd_rejects_bad_inputs():
    x = gaussian(5, 2, seed=0)
    with pytest.raises(ValueError, match="feature sizes"):
        mmd2(x, gaussian(5, 3, seed=1))
    with pytest.raises(ValueError, match="kernel"):
        mmd2(x, x, kernel="cosine")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd2(x, x, bandwidth=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        mmd2(x[:1], x)
    with pytest.raises(ValueError, match="NaN"):
        mmd2(x, torch.full((3, 2), math.nan))


# --- classifiers -----------------------------------------------------------------------------------------------------


def test_domain_classifier_accuracy_separated_and_identical():
    assert domain_classifier_accuracy(gaussian(100, 8, seed=0), gaussian(60, 8, seed=1, shift=3.0)) > 0.98
    same = gaussian(400, 8, seed=2)
    assert abs(domain_classifier_accuracy(same[:200], same[200:]) - 0.5) < 0.1
    with pytest.raises(ValueError, match="at least 5"):
        domain_classifier_accuracy(same[:4], same[4:10])


def test_proxy_a_distance_separated_and_identical():
    separated = proxy_a_distance(gaussian(200, 8, seed=0), gaussian(200, 8, seed=1, shift=3.0))
    same = gaussian(600, 8, seed=2)
    identical = proxy_a_distance(same[:300], same[300:])
    assert 0.0 <= identical <= 2.0 and 0.0 <= separated <= 2.0
    assert separated > 1.9
    assert identical < 0.4


def test_domain_gap_keys_and_stage_check():
    synthetic = {"layer3": gaussian(30, 4, seed=0), "layer4": gaussian(30, 6, seed=1)}
    real = {"layer3": gaussian(24, 4, seed=2, shift=2.0), "layer4": gaussian(24, 6, seed=3)}
    metrics = domain_gap(synthetic, real, seed=3)
    assert set(metrics) == {f"gap/{s}/{m}" for s in ("layer3", "layer4") for m in METRICS}
    assert metrics["gap/layer3/domain_acc"] > 0.9 and metrics["gap/layer3/pad"] > 1.5
    assert metrics["gap/layer3/mmd_rbf"] > metrics["gap/layer4/mmd_rbf"]
    # A uniform rescaling of the features changes no measure.
    scaled = domain_gap({k: 10 * v for k, v in synthetic.items()}, {k: 10 * v for k, v in real.items()}, seed=3)
    assert scaled == pytest.approx(metrics, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="different stages"):
        domain_gap(synthetic, {"layer3": real["layer3"]})


# --- pictures and the monitor ----------------------------------------------------------------------------------------


def test_embedding_plot_writes_a_png(tmp_path):
    path = embedding_plot({"synthetic": gaussian(12, 5, seed=0), "real": gaussian(9, 5, seed=1, shift=2.0)},
                          tmp_path / "tsne.png", title="two blobs")
    picture = matplotlib.image.imread(path)
    assert picture.ndim == 3 and picture.shape[0] > 100
    assert [p.name for p in tmp_path.iterdir()] == ["tsne.png"]


def test_domain_gap_monitor_on_a_backbone(tmp_path):
    generator = torch.Generator().manual_seed(0)
    # Smooth "renders" against noisy "photos", at two image sizes.
    synthetic = torch.nn.functional.interpolate(torch.randn(10, 3, 4, 4, generator=generator), size=32,
                                                mode="bilinear")
    real = torch.randn(8, 3, 48, 48, generator=generator)
    backbone = Backbone("resnet18").train()
    monitor = DomainGapMonitor(synthetic_images=synthetic, real_images=real, seed=1, plot_dir=str(tmp_path / "gap"))
    metrics = monitor(backbone, step=5)
    assert set(metrics) == {f"gap/{s}/{m}" for s in ("layer2", "layer3", "layer4") for m in METRICS}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert backbone.training  # the mode is restored
    files = sorted(p.name for p in (tmp_path / "gap").iterdir())
    assert files == ["embedding.png", "embedding_step_5.png"]
    assert matplotlib.image.imread(tmp_path / "gap" / "embedding.png").shape[-1] in (3, 4)
    # The same backbone and seed give the same numbers.
    assert monitor(backbone, step=6) == metrics
    with pytest.raises(ValueError, match="real_images"):
        DomainGapMonitor(synthetic_images=synthetic, real_images=real[:, :1])
