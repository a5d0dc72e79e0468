"""Helpers shared by the self-supervised objectives: seeded randomness from the batch, and image (de)normalisation.

Objectives that draw random parameters (jigsaw permutations, crops, masks, augmentations) take them from a
generator derived from the batch's per-sample seeds, which the sampler makes a fixed function of the run seed and
the step. So a resumed run draws exactly what an uninterrupted one would, and no objective keeps a hidden RNG.
"""

import zlib
from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from synth.constants import IMAGENET_MEAN, IMAGENET_STD


def batch_generator(batch: Mapping, salt: str) -> torch.Generator:
    """A CPU generator seeded from ``batch["seed"]`` and ``salt`` (the objective's name).

    Different objectives on one batch get independent streams (the salt), and the same batch always gives the same
    stream. Draw on CPU with it and move the result to the device.

    Args:
        batch: A batch holding ``seed``, (B,) int64 per-sample seeds on the CPU.
        salt: Distinguishes the callers that share a batch.

    Raises:
        KeyError: the batch has no ``seed``.
    """
    if "seed" not in batch:
        raise KeyError("batch has no 'seed' (per-sample seeds): objectives draw their randomness from it")
    seeds = batch["seed"]
    if isinstance(seeds, Tensor):
        seeds = seeds.detach().cpu().numpy()
    entropy = [int(s) & 0xFFFFFFFFFFFFFFFF for s in np.asarray(seeds).reshape(-1)] + [zlib.crc32(salt.encode())]
    state = np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)
    return mean, std


def denormalize(image: Tensor) -> Tensor:
    """ImageNet-normalised images back to RGB in [0, 1].

    Shape:
        - Input and output: :math:`(B, 3, H, W)`.
    """
    mean, std = _stats(image)
    return image * std + mean


def normalize(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] to the ImageNet normalisation every backbone input uses.

    Shape:
        - Input and output: :math:`(B, 3, H, W)`.
    """
    mean, std = _stats(rgb)
    return (rgb - mean) / std


__all__ = ["batch_generator", "denormalize", "normalize"]
