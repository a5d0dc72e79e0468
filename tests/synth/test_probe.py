"""Fashion-MNIST kNN probe: the weighted kNN rule against a naive loop, and the probe on a random-init ResNet-18."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.backbone import Backbone
from synth.probe import FashionMNISTProbe, knn_predict
from synth.real import FASHION_MNIST_ROOT

HAVE_FASHION = all((Path(FASHION_MNIST_ROOT) / f"{split}-{kind}-ubyte.gz").is_file()
                   for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason="Debian package dataset-fashion-mnist not installed")


def naive_knn(bank, labels, queries, k, temperature, n_classes):
    """Wu et al. 2018 written out one query and one neighbour at a time."""
    predictions = []
    for query in queries.tolist():
        sims = []
        for feature, label in zip(bank.tolist(), labels.tolist(), strict=True):
            dot = sum(a * b for a, b in zip(query, feature, strict=True))
            norm = math.sqrt(sum(a * a for a in query)) * math.sqrt(sum(b * b for b in feature))
            sims.append((dot / norm, label))
        sims.sort(key=lambda pair: -pair[0])
        votes = [0.0] * n_classes
        for sim, label in sims[:k]:
            votes[label] += math.exp(sim / temperature)
        predictions.append(max(range(n_classes), key=lambda c: votes[c]))
    return predictions


@pytest.mark.parametrize(("k", "temperature", "chunk_size"), [(1, 0.07, 1024), (7, 0.1, 3), (60, 0.5, 7)])
def test_knn_predict_matches_naive_loop(k, temperature, chunk_size):
    generator = torch.Generator().manual_seed(k)
    bank = torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 5, (50,), generator=generator)
    queries = torch.randn(23, 8, generator=generator) * 3  # unnormalised: the rule must normalise
    predicted = knn_predict(bank, labels, queries, k=k, temperature=temperature, n_classes=5, chunk_size=chunk_size)
    assert predicted.dtype == torch.int64 and predicted.shape == (23,)
    assert predicted.tolist() == naive_knn(bank, labels, queries, min(k, 50), temperature, 5)


def test_knn_weights_beat_majority():
    # Two far neighbours of class 1 against one identical neighbour of class 0: with k = 3 and a small temperature
    # the weight exp(1 / 0.1) of the exact match outweighs 2 exp(0.6 / 0.1); a plain majority vote would say 1.
    bank = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])
    assert knn_predict(bank, labels, query, k=3, temperature=0.1, n_classes=2).tolist() == [0]
    assert knn_predict(bank, labels, query, k=3, temperature=100.0, n_classes=2).tolist() == [1]


def test_knn_predict_errors():
    bank, labels = torch.zeros(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_predict(bank, labels, torch.zeros(2, 3), k=0)
    with pytest.raises(ValueError, match="features"):
        knn_predict(bank, labels, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="train_labels"):
        knn_predict(bank, labels[:3], torch.zeros(2, 3))


@pytest.fixture(scope="module")
def probe():
    return FashionMNISTProbe(n_train=200, n_test=100, size=32, stages=["layer2", "layer4"])


@needs_fashion
def test_probe_subsets_are_fixed_balanced_and_normalised(probe):
    assert probe.train_images.shape == (200, 3, 32, 32) and probe.test_images.shape == (100, 3, 32, 32)
    np.testing.assert_array_equal(torch.bincount(probe.train_labels).numpy(), [20] * 10)
    np.testing.assert_array_equal(torch.bincount(probe.test_labels).numpy(), [10] * 10)
    again = FashionMNISTProbe(n_train=200, n_test=100, size=32)
    assert torch.equal(again.train_images, probe.train_images) and torch.equal(again.test_labels, probe.test_labels)
    other = FashionMNISTProbe(n_train=200, n_test=100, size=32, seed=1)
    assert not torch.equal(other.train_images, probe.train_images)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    rgb = probe.train_images * std + mean
    assert rgb.min() >= -1e-5 and rgb.max() <= 1 + 1e-5
    torch.testing.assert_close(rgb[:, 0], rgb[:, 2], atol=1e-5, rtol=0)  # grey replicated


@needs_fashion
def test_probe_random_init_resnet18_above_chance(probe):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # torchvision initialises from the global generator; fixed here, restored after
        backbone = Backbone("resnet18")
    backbone.train()
    out = probe(backbone)
    assert set(out) == {"probe/knn_acc/layer2", "probe/knn_acc/layer4"}
    for accuracy in out.values():
        assert isinstance(accuracy, float) and 0.2 < accuracy <= 1.0  # chance is 0.1; random init scores ~0.6
    assert backbone.training  # mode restored
    assert probe(backbone) == out  # frozen features, no randomness


@needs_fashion
def test_probe_default_stage_is_the_last():
    small = FashionMNISTProbe(n_train=10, n_test=10, size=32, k=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = Backbone("resnet18")
    assert list(small(backbone)) == ["probe/knn_acc/layer4"]


def test_probe_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        FashionMNISTProbe(root=str(tmp_path))
    with pytest.raises(ValueError, match="n_train"):
        FashionMNISTProbe(n_train=5)
    with pytest.raises(ValueError, match="stages"):
        FashionMNISTProbe(stages=[])
