"""An online probe of real-image features during pretraining: weighted kNN accuracy on Fashion-MNIST.

A kNN classifier on frozen features needs no training, so it can be evaluated every few hundred steps and read as a
curve: does pretraining on rendered images make the features of real images more linearly/locally separable?
Fashion-MNIST (Debian package ``dataset-fashion-mnist``) is the real, labelled data that ships offline.
"""

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode

from synth.backbone import pooled_features
from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.real import FASHION_MNIST_ROOT, fashion_mnist

N_CLASSES = 10


def knn_predict(train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int = 20,
                temperature: float = 0.07, n_classes: int = N_CLASSES, chunk_size: int = 1024) -> Tensor:
    r"""Weighted k-nearest-neighbour classification of Wu et al., "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination", CVPR 2018 (the kNN monitor of InstDisc, MoCo and solo-learn).

    Features are L2-normalised; the similarity of a test feature :math:`f` to a bank feature :math:`f_i` is
    the cosine :math:`s_i = f^\top f_i`. Among the :math:`k` most similar bank features :math:`N_k`, each votes for
    its label with weight :math:`\exp(s_i / \tau)`, and the prediction is the class with the highest total

    .. math::
        \hat y = \arg\max_c \sum_{i \in N_k} \exp(s_i / \tau) \, [y_i = c].

    Args:
        train_features: The memory bank.
        train_labels: Its labels in ``[0, n_classes)``.
        test_features: Features to classify.
        k: Neighbours per query (at most the bank size is used).
        temperature: :math:`\tau`.
        n_classes: Number of classes.
        chunk_size: Queries per similarity matrix, to bound memory.

    Returns:
        Predicted labels (int64).

    Shape:
        - train_features: :math:`(N, C)`; train_labels: :math:`(N,)`; test_features: :math:`(M, C)`.
        - Output: :math:`(M,)`.
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, C) and (M, C), got {tuple(train_features.shape)} and "
                         f"{tuple(test_features.shape)}")
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(f"train_labels {tuple(train_labels.shape)} do not match train_features "
                         f"{tuple(train_features.shape)}")
    bank = F.normalize(train_features.float(), dim=1)
    queries = F.normalize(test_features.float(), dim=1)
    k = min(k, len(bank))
    labels = train_labels.long().to(bank.device)
    predictions = []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start:start + chunk_size] @ bank.T  # (m, N)
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        scores = torch.zeros(len(weights), n_classes, device=bank.device)
        scores.scatter_add_(1, labels[top_index], weights)
        predictions.append(scores.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def _balanced_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices, as equal a number per class as possible (the first ``n % n_classes`` classes get one more)."""
    counts = [n // N_CLASSES + (c < n % N_CLASSES) for c in range(N_CLASSES)]
    chosen = []
    for c, count in enumerate(counts):
        pool = np.flatnonzero(labels == c)
        if count > len(pool):
            raise ValueError(f"asked for {count} images of class {c}, Fashion-MNIST has {len(pool)}")
        chosen.append(rng.permutation(pool)[:count])
    return np.sort(np.concatenate(chosen))


def _to_input(images: np.ndarray, size: int) -> Tensor:
    """(N, 28, 28) uint8 grey -> (N, 3, size, size) float32, ImageNet-normalised."""
    grey = torch.from_numpy(images).float().div_(255.0)[:, None]
    grey = TF.resize(grey, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True).clamp_(0.0, 1.0)
    return TF.normalize(grey.expand(-1, 3, -1, -1), list(IMAGENET_MEAN), list(IMAGENET_STD))


class FashionMNISTProbe:
    r"""Weighted kNN accuracy (Wu et al., CVPR 2018) of frozen, globally pooled backbone features on Fashion-MNIST.

    A fixed, class-balanced, seeded subset of the training split is the memory bank; a fixed, class-balanced subset
    of the test split is classified with :func:`knn_predict`. Both are decoded once, at construction, as
    ImageNet-normalised (N, 3, size, size) tensors (grey replicated, resized bilinearly). Features come from
    :func:`synth.backbone.pooled_features` (eval mode, no gradient).

    Read the result as a curve relative to step 0: random-init features already score far above chance (10%)
    on Fashion-MNIST (the classes differ in silhouette, which even random convolutions separate; a random-init
    ResNet-18 at 32 px scores around 60-70%), so only the change during pretraining says anything.

    Args:
        n_train: Size of the memory bank (from Fashion-MNIST train).
        n_test: Images classified (from Fashion-MNIST test).
        size: Input side in pixels.
        k: Neighbours per query.
        temperature: Temperature :math:`\tau` of the neighbour weights.
        stages: Backbone stages probed; None: the last stage.
        seed: Seed of the subsets.
        root: Folder of the Fashion-MNIST IDX files.
        batch_size: Images per forward pass.

    Shape:
        - ``train_images``: :math:`(N_{train}, 3, S, S)`; ``test_images``: :math:`(N_{test}, 3, S, S)`.

    Examples:
        >>> from synth.backbone import Backbone
        >>> probe = FashionMNISTProbe(n_train=200, n_test=100)
        >>> probe(Backbone("resnet18"))  # doctest: +SKIP
        {'probe/knn_acc/layer4': 0.64}
    """

    def __init__(self, n_train: int = 2000, n_test: int = 1000, size: int = 32, k: int = 20,
                 temperature: float = 0.07, stages: list[str] | None = None, seed: int = 0,
                 root: str = FASHION_MNIST_ROOT, batch_size: int = 128):
        if n_train < N_CLASSES or n_test < 1 or size < 1 or k < 1 or temperature <= 0 or batch_size < 1:
            raise ValueError(f"need n_train >= {N_CLASSES}, n_test >= 1, size >= 1, k >= 1, temperature > 0, "
                             f"batch_size >= 1; got n_train={n_train}, n_test={n_test}, size={size}, k={k}, "
                             f"temperature={temperature}, batch_size={batch_size}")
        if stages is not None and not stages:
            raise ValueError("stages is empty: give stage names or None for the last stage")
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.stages = None if stages is None else list(stages)
        sides = {}
        for split, n, stream in (("train", n_train, 0), ("test", n_test, 1)):
            images, labels = fashion_mnist(split, root)
            chosen = _balanced_subset(labels, n, np.random.default_rng([seed, stream]))
            sides[split] = (_to_input(images[chosen], size), torch.from_numpy(labels[chosen]))
        self.train_images, self.train_labels = sides["train"]
        self.test_images, self.test_labels = sides["test"]

    def __call__(self, backbone: nn.Module) -> dict[str, float]:
        """kNN accuracy of each probed stage.

        Args:
            backbone: A :class:`synth.backbone.Backbone` (any device; its train/eval mode is restored).

        Returns:
            ``{"probe/knn_acc/<stage>": accuracy in [0, 1]}``.
        """
        stages: Sequence[str] = self.stages if self.stages is not None else [backbone.stage_names[-1]]
        features = pooled_features(backbone, torch.cat([self.train_images, self.test_images]), stages,
                                   batch_size=self.batch_size)
        n_train = len(self.train_images)
        out = {}
        for stage in stages:
            predicted = knn_predict(features[stage][:n_train], self.train_labels, features[stage][n_train:],
                                    k=self.k, temperature=self.temperature, n_classes=N_CLASSES)
            out[f"probe/knn_acc/{stage}"] = float((predicted == self.test_labels).float().mean())
        return out


__all__ = ["FashionMNISTProbe", "knn_predict"]
