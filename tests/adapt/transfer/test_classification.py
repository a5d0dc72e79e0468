"""adapt.transfer.classification: the linear probe (C chosen on a split, independent of n_jobs) and fine-tuning."""

import numpy as np
import pytest

from adapt.transfer import finetune_classifier, fit_linear_probe, fit_linear_probes, linear_probe
from synth.backbone import Backbone


def test_linear_probe_separates_colours(sets):
    accuracies = linear_probe(Backbone("resnet18"), sets.ColourSet(20, seed=0), sets.ColourSet(10, seed=1), size=32)
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


def test_finetune_classifier_runs(sets):
    accuracy = finetune_classifier(Backbone("resnet18"), sets.ColourSet(8, seed=0), sets.ColourSet(4, seed=1), steps=3,
                                   batch_size=4, lr=1e-3, size=32)
    assert 0.0 <= accuracy <= 1.0

