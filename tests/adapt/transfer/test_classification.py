"""adapt.transfer.classification: the linear probe (C chosen on a split, independent of n_jobs) and fine-tuning."""

import numpy as np
import pytest
import torch

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



def test_label_subset_is_stratified_seeded_and_nested(sets):
    from adapt.transfer.classification import LabelSubset, label_subset

    full = sets.ColourSet(40, seed=0)  # 20 red, 20 blue
    assert label_subset(full, 1.0, seed=3) is full
    small, large = label_subset(full, 0.1, seed=3), label_subset(full, 0.5, seed=3)
    assert isinstance(small, LabelSubset) and small.classes == full.classes
    assert sorted(small.labels.tolist()) == [0, 0, 1, 1] and len(large) == 20
    assert [int(small[i][1]) for i in range(len(small))] == small.labels.tolist()
    assert set(small.indices) <= set(large.indices)  # a prefix of one permutation per class
    assert small.indices == label_subset(full, 0.1, seed=3).indices  # the same for every checkpoint at a seed
    assert small.indices != label_subset(full, 0.1, seed=4).indices
    tiny = label_subset(full, 0.001, seed=0)
    assert sorted(tiny.labels.tolist()) == [0, 1]  # at least one image per class
    with pytest.raises(ValueError, match="label fraction"):
        label_subset(full, 0.0)


def test_finetune_label_fractions_metrics(sets):
    from adapt.transfer.classification import FINETUNE
    from adapt.transfer.task import TaskContext, make_budget

    context = TaskContext(label="random", backbone=Backbone("resnet18"), checkpoint=None, arch="resnet18",
                          data={"train": sets.ColourSet(20, seed=0), "test": sets.ColourSet(4, seed=1)},
                          group="classification", seed=0, device=torch.device("cpu"), budget_text="steps=1")
    default = FINETUNE.run(context, make_budget(FINETUNE, {"steps": 1, "batch_size": 4}))
    assert [list(score.metrics) for score in default] == [["accuracy"]]
    scores = FINETUNE.run(context, make_budget(FINETUNE, {"steps": 1, "batch_size": 4,
                                                          "label_fractions": [0.1, 1.0]}))
    assert [list(score.metrics) for score in scores] == [["accuracy@0.1"], ["accuracy@1"]]
    assert [score.budget for score in scores] == ["steps=1,n_train=2", "steps=1,n_train=20"]
    for bad in ([], [0.0], [1.5], [0.5, 0.5]):
        with pytest.raises(ValueError, match="label_fractions"):
            make_budget(FINETUNE, {"label_fractions": bad})
