r"""Measuring a translator: how much closer to real its translations are, and how well they keep the objects.

- :func:`translation_gap`: the domain gap (:func:`adapt.gap.domain_gap`: domain-classifier accuracy, linear and
  Gaussian MMD, proxy :math:`\mathcal{A}`-distance) between real images and a set of rendered or translated
  images, on a fixed random-initialisation ResNet-18 (:class:`synth.backbone.Backbone`, seeded: no ImageNet
  weights exist offline, and a random network's features still separate the domains).
- :func:`edge_preservation`: how close the Sobel edge maps of the originals and their translations are: the mean
  absolute difference of the mean-normalised edge magnitudes and their Pearson correlation per image. A
  translation that moves, deletes or invents object boundaries scores a larger difference and a lower correlation.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from adapt.gap import domain_gap
from synth.backbone import Backbone, pooled_features


def sobel_edges(images: Tensor) -> Tensor:
    r"""Sobel gradient magnitude of the grey level :math:`(0.299 R + 0.587 G + 0.114 B)`, replicate-padded:
    :math:`\sqrt{(K_x * I)^2 + (K_y * I)^2}`.

    Shape:
        - images: :math:`(B, 3, H, W)` (any range); output: :math:`(B, 1, H, W)`.
    """
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    grey = (images * weights).sum(1, keepdim=True)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=images.dtype, device=images.device)
    kernels = torch.stack([kx, kx.t()])[:, None]
    gradients = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.square().sum(1, keepdim=True).sqrt()


def edge_preservation(original: Tensor, translated: Tensor, eps: float = 1e-6) -> dict[str, float]:
    r"""Object preservation as edge agreement between originals and their translations.

    With :math:`e = ` :func:`sobel_edges` divided by its per-image mean (so a global contrast change is not
    counted):

    - ``edge_l1``: :math:`\frac{1}{n}\sum |e(x) - e(G(x))|` (0: the same edges);
    - ``edge_corr``: the mean over images of the Pearson correlation of :math:`e(x)` and :math:`e(G(x))` (1: the same
      edges up to scale).

    Shape:
        - original, translated: :math:`(B, 3, H, W)`, the same range.
    """
    a, b = sobel_edges(original.float()), sobel_edges(translated.float())
    a = a / (a.mean(dim=(1, 2, 3), keepdim=True) + eps)
    b = b / (b.mean(dim=(1, 2, 3), keepdim=True) + eps)
    l1 = (a - b).abs().mean()
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)
    return {"edge_l1": float(l1), "edge_corr": float(corr.mean())}


def gap_backbone(seed: int = 0) -> Backbone:
    """The fixed measuring network: a random-initialisation ResNet-18, weights a function of ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Backbone("resnet18").eval()


def translation_gap(images: Tensor, real: Tensor, backbone: Backbone | None = None,
                    stages: tuple[str, ...] = ("layer2", "layer3", "layer4"), seed: int = 0) -> dict[str, float]:
    """:func:`adapt.gap.domain_gap` between ``images`` (rendered or translated) and ``real`` on a frozen backbone.

    Shape:
        - images: :math:`(N, 3, H, W)`, real: :math:`(M, 3, H, W)`, ImageNet-normalised, :math:`N, M \\ge 6`.
    """
    backbone = gap_backbone(seed) if backbone is None else backbone
    return domain_gap(pooled_features(backbone, images, list(stages)), pooled_features(backbone, real, list(stages)),
                      seed=seed)


__all__ = ["edge_preservation", "gap_backbone", "sobel_edges", "translation_gap"]
