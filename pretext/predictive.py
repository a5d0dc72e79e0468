"""Predictive pretext tasks on real unlabelled images: rotation (RotNet), jigsaw puzzles and relative patch position.

Each objective turns an unlabelled photo into a classification problem (which rotation was applied, which
permutation shuffled its tiles, where one patch lies relative to another) and trains the shared backbone through a
small classifier on its globally pooled features:

- :class:`RotationPrediction`: Gidaris, Singh & Komodakis, "Unsupervised Representation Learning by Predicting
  Image Rotations", ICLR 2018.
- :class:`Jigsaw`: Noroozi & Favaro, "Unsupervised Learning of Visual Representations by Solving Jigsaw Puzzles",
  ECCV 2016.
- :class:`RelativePatchPosition`: Doersch, Gupta & Efros, "Unsupervised Visual Representation Learning by Context
  Prediction", ICCV 2015.

Unlike the synthetic heads, these objectives build their own network inputs (rotated copies, tiles, patches) from
``batch["image"]`` and run the backbone on them, so they ignore ``batch["features"]`` (``uses_features = False``).
They call ``backbone(x, stages=[stage])`` rather than ``backbone.pooled``, so a wrapped backbone (DDP, compile)
still goes through its wrapper's forward. Random draws (crop positions, jitter, permutations, colour treatment)
come from :func:`pretext.common.batch_generator` with the objective's ``salt``, on the CPU: the same batch always
gives the same puzzle, on resume too. The input builders are plain functions (:func:`rotate_batch`,
:func:`make_jigsaw`, :func:`sample_patch_pairs` and the colour treatments) so they can be tested and shown on their
own. ``forward`` returns ``{"loss", "acc"}``, the classifier's cross-entropy and accuracy as 0-dim float32 tensors,
and keeps nothing between calls.

Batch contract: ``image`` :math:`(B, 3, H, W)` ImageNet-normalised (channels_last is fine); ``seed`` :math:`(B,)`
int64 on the CPU (jigsaw and relative position; rotation draws nothing).

Pixel boxes returned by the helpers are ``(top, left, bottom, right)`` in pixels of the input image, bottom and right
exclusive, so the crop is ``image[..., top:bottom, left:right]``.
"""

import itertools
import math
from collections.abc import Mapping
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.common import batch_generator, denormalize, normalize
from synth.backbone import Backbone, resolve_stage

#: (row, column) offset of the neighbour patch for each relative-position label: row-major over the 3x3 layout with
#: the centre left out, as Doersch et al. number them (their 1..8 are 0..7 here).
NEIGHBOR_OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))

#: Colour treatments of :class:`RelativePatchPosition` against chromatic aberration.
COLOR_MODES: tuple[str, ...] = ("drop", "project", "keep")

#: ITU-R BT.601 luma weights, as in ``torchvision.transforms.functional.rgb_to_grayscale``.
_LUMA = (0.299, 0.587, 0.114)

#: Permutations of at most this many cells are searched exhaustively (10! = 3.6 M candidates); more cells search a
#: random pool of ``_CANDIDATE_POOL`` permutations.
_EXHAUSTIVE_CELLS = 10
_CANDIDATE_POOL = 200_000


# ---------------------------------------------------------------------------------------------------------------
# Input builders
# ---------------------------------------------------------------------------------------------------------------


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    r"""All four rotations of every image, the input of RotNet (Gidaris et al., ICLR 2018).

    Copy :math:`kB + i` is image :math:`i` rotated by :math:`k \cdot 90°` counter-clockwise, i.e.
    ``torch.rot90(images[i], k, dims=(-2, -1))``, and has label :math:`k`. Gidaris et al. found that feeding all four
    rotations of each image in the same batch trains better than one random rotation per image; there is nothing
    random here.

    Args:
        images: square images.

    Returns:
        ``(rotated, labels)``; labels are int64 on the images' device.

    Raises:
        ValueError: the images are not square (a rotated copy would have another shape).

    Shape:
        - images: :math:`(B, C, S, S)`.
        - Output: rotated :math:`(4B, C, S, S)`, labels :math:`(4B,)`.
    """
    height, width = images.shape[-2:]
    if height != width:
        raise ValueError(f"rotate_batch: images must be square to rotate by 90 degrees, got {height}x{width}")
    rotated = torch.cat([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    labels = torch.arange(4, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


def maximal_hamming_permutations(n: int, grid_cells: int, rng: np.random.Generator, *,
                                 return_min_distance: bool = False) -> Tensor | tuple[Tensor, int]:
    r"""A set of ``n`` permutations of ``grid_cells`` tiles far apart in Hamming distance, chosen greedily.

    Noroozi & Favaro (ECCV 2016, Algorithm 1) start from a random permutation and repeatedly add the candidate with
    the largest *average* Hamming distance to those chosen, because a jigsaw task whose permutations differ in many
    positions is harder and transfers better (their ablation of the permutation set). Here the candidate with the
    largest *minimum* distance to those chosen is added, ties broken by the largest average, then by candidate
    order. With the average alone, most candidates tie as soon as the chosen set uses each tile about equally often
    at each position, and the tie-break decides: for 100 permutations of 9 tiles the average criterion gave a set
    whose closest pair differs in only 2 positions, this one in 6 (both with the same average distance, 8.08).

    Candidates are all ``grid_cells!`` permutations (in lexicographic order) up to 10 cells, and a pool of 200 000
    random permutations drawn from ``rng`` beyond.

    Args:
        n: how many permutations (classes of the jigsaw task), at least 2.
        grid_cells: tiles per puzzle (9 for a 3x3 grid).
        rng: draws the first permutation (and the candidate pool for more than 10 cells).
        return_min_distance: also return the smallest Hamming distance between two chosen permutations.

    Returns:
        The permutations, int64; row :math:`p` lists, for each position of the shuffled puzzle, the grid cell whose
        tile goes there. With ``return_min_distance``, ``(permutations, min_distance)``.

    Raises:
        ValueError: ``n < 2`` or more permutations are requested than there are distinct candidates.

    Shape:
        - Output: :math:`(n, \text{grid\_cells})`.
    """
    if n < 2:
        raise ValueError(f"maximal_hamming_permutations: n must be at least 2, got {n}")
    if grid_cells < 2:
        raise ValueError(f"maximal_hamming_permutations: grid_cells must be at least 2, got {grid_cells}")
    if grid_cells <= _EXHAUSTIVE_CELLS:
        candidates = _all_permutations(grid_cells)
    else:
        base = np.tile(np.arange(grid_cells, dtype=np.int16), (_CANDIDATE_POOL, 1))
        candidates = rng.permuted(base, axis=1)
    count = len(candidates)
    if grid_cells <= _EXHAUSTIVE_CELLS and n > count:
        raise ValueError(f"maximal_hamming_permutations: n={n} exceeds the {count} permutations of {grid_cells} cells")
    # One contiguous row per position and in-place int32 arithmetic: comparing a column with a scalar is ~10x faster
    # than (count, cells) != row, and a set of 100 out of 9! takes under a second.
    columns = np.ascontiguousarray(candidates.T)
    nearest = np.full(count, grid_cells + 1, dtype=np.int32)
    total = np.zeros(count, dtype=np.int32)
    distance = np.empty(count, dtype=np.int32)
    equal = np.empty(count, dtype=bool)
    score = np.empty(count, dtype=np.int64)
    chosen = [int(rng.integers(count))]
    min_distance = grid_cells
    for _ in range(n - 1):
        last = candidates[chosen[-1]]
        distance.fill(grid_cells)
        for position in range(grid_cells):
            np.equal(columns[position], last[position], out=equal)
            distance -= equal
        np.minimum(nearest, distance, out=nearest)
        total += distance
        # Lexicographic (nearest, total), as total < n * grid_cells + 1. Chosen ones have nearest 0.
        np.multiply(nearest, n * grid_cells + 1, out=score)
        score += total
        pick = int(score.argmax())
        if nearest[pick] == 0:
            raise ValueError(f"maximal_hamming_permutations: only {len(chosen)} distinct permutations among the "
                             f"candidates, asked for n={n}")
        min_distance = min(min_distance, int(nearest[pick]))
        chosen.append(pick)
    permutations = torch.from_numpy(candidates[chosen].astype(np.int64))
    return (permutations, min_distance) if return_min_distance else permutations


@lru_cache(maxsize=4)
def _all_permutations(cells: int) -> np.ndarray:
    """All permutations of ``range(cells)`` in lexicographic order, ``(cells!, cells)`` int8, read-only (cached)."""
    flat = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(cells))), dtype=np.int8,
                       count=math.factorial(cells) * cells)
    permutations = flat.reshape(-1, cells)
    permutations.flags.writeable = False
    return permutations


@lru_cache(maxsize=8)
def _permutation_set(n: int, grid_cells: int, seed: int) -> tuple[np.ndarray, int]:
    """:func:`maximal_hamming_permutations` from ``default_rng(seed)``, cached: objectives are built often in tests
    and sweeps, and a set of 100 takes about half a second."""
    permutations, min_distance = maximal_hamming_permutations(n, grid_cells, np.random.default_rng(seed),
                                                              return_min_distance=True)
    return permutations.numpy(), min_distance


def make_jigsaw(images: Tensor, permutations: Tensor, generator: torch.Generator, *, tile_fraction: float = 0.8,
                tile_size: int = 32, channel_jitter_fraction: float = 0.0, return_boxes: bool = False
                ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    r"""Shuffled jigsaw tiles of each image (Noroozi & Favaro, ECCV 2016).

    Each image is divided into a :math:`g \times g` grid of cells of :math:`\lfloor H/g \rfloor \times
    \lfloor W/g \rfloor` pixels (the grid placed at a random offset when :math:`H` or :math:`W` is not a multiple
    of :math:`g`). From every cell a crop of ``tile_fraction`` of its side is taken at a random position within the
    cell, so neighbouring tiles are separated by a random gap (on average ``1 - tile_fraction`` of a cell, now and
    then none) and edges can rarely be matched by low-level continuity, as in the paper (64-pixel tiles from
    85-pixel cells). With
    ``channel_jitter_fraction`` each colour channel of a tile is read from a window shifted by up to that fraction
    of the crop side (rounded to whole pixels, kept inside the image), independently per channel: the paper
    jitters colour channels by 0-2 pixels on 64-pixel tiles so that chromatic aberration, which displaces the
    channels in a way that depends on the position in the frame, cannot reveal where a tile comes from. Crops are
    resized (bilinear, antialiased) to ``tile_size``; a crop of that size already is copied unchanged.

    One permutation per image is drawn uniformly from ``permutations``; its index is the label. Position :math:`i`
    of the shuffled puzzle holds the tile of grid cell ``permutations[label, i]`` (cells in row-major order), so
    ``tiles[b, i] = tile of cell permutations[labels[b], i]``.

    Draws from ``generator`` (CPU), in this order: labels, grid offsets, crop positions, channel shifts.

    Args:
        images: the images.
        permutations: the permutation set, e.g. from :func:`maximal_hamming_permutations`; its width :math:`g^2`
            sets the grid.
        generator: a CPU generator, e.g. from :func:`pretext.common.batch_generator`.
        tile_fraction: crop side over cell side, in (0, 1].
        tile_size: side of the returned tiles.
        channel_jitter_fraction: maximum per-channel shift over crop side (0: none).
        return_boxes: also return each channel's crop window.

    Returns:
        ``(tiles, labels)``, or ``(tiles, labels, boxes)`` with ``return_boxes``. Labels are int64 on the images'
        device; boxes are int64 on the CPU, ``(top, left, bottom, right)`` of the window each channel of each
        *grid cell's* tile was cropped from (cell order, not shuffled order).

    Raises:
        ValueError: the permutation width is not a square, an argument is out of range, or the images are too
            small for the grid.

    Shape:
        - images: :math:`(B, C, H, W)`; permutations: :math:`(P, g^2)` integer.
        - Output: tiles :math:`(B, g^2, C, t, t)` with :math:`t` = ``tile_size``, labels :math:`(B,)`,
          boxes :math:`(B, g^2, C, 4)`.

    Examples:
        >>> permutations = maximal_hamming_permutations(10, 9, np.random.default_rng(0))
        >>> tiles, labels = make_jigsaw(torch.randn(2, 3, 64, 64), permutations, torch.Generator().manual_seed(0))
        >>> tiles.shape, labels.shape
        (torch.Size([2, 9, 3, 32, 32]), torch.Size([2]))
    """
    batch, channels, height, width = images.shape
    count, cells = permutations.shape
    grid = math.isqrt(cells)
    if grid * grid != cells or grid < 2:
        raise ValueError(f"make_jigsaw: permutations have {cells} columns, expected g*g cells of a g x g grid, g >= 2")
    _check_fraction("make_jigsaw: tile_fraction", tile_fraction)
    if channel_jitter_fraction < 0:
        raise ValueError(f"make_jigsaw: channel_jitter_fraction must be >= 0, got {channel_jitter_fraction}")
    if tile_size < 1:
        raise ValueError(f"make_jigsaw: tile_size must be positive, got {tile_size}")
    cell_h, cell_w = height // grid, width // grid
    crop_h, crop_w = min(cell_h, _round(tile_fraction * cell_h)), min(cell_w, _round(tile_fraction * cell_w))
    if crop_h < 1 or crop_w < 1:
        raise ValueError(f"make_jigsaw: {height}x{width} images are too small for a {grid}x{grid} grid of tiles "
                         f"of {tile_fraction} of a cell")
    labels = torch.randint(count, (batch,), generator=generator)
    grid_top = torch.randint(height - grid * cell_h + 1, (batch, 1), generator=generator)
    grid_left = torch.randint(width - grid * cell_w + 1, (batch, 1), generator=generator)
    cell = torch.arange(cells)
    top = grid_top + (cell // grid) * cell_h + torch.randint(cell_h - crop_h + 1, (batch, cells), generator=generator)
    left = grid_left + (cell % grid) * cell_w + torch.randint(cell_w - crop_w + 1, (batch, cells),
                                                              generator=generator)
    top = top[..., None].expand(batch, cells, channels)
    left = left[..., None].expand(batch, cells, channels)
    jitter = _round(channel_jitter_fraction * min(crop_h, crop_w))
    if jitter > 0:
        shift = torch.randint(-jitter, jitter + 1, (2, batch, cells, channels), generator=generator)
        top = (top + shift[0]).clamp(0, height - crop_h)
        left = (left + shift[1]).clamp(0, width - crop_w)
    device = images.device
    crops = _gather_crops(images, top.to(device), left.to(device), crop_h, crop_w)
    tiles = _resize(crops.flatten(0, 1), tile_size).view(batch, cells, channels, tile_size, tile_size)
    labels = labels.to(device)
    order = permutations.to(device=device, dtype=torch.long)[labels]
    tiles = tiles[torch.arange(batch, device=device)[:, None], order]
    if not return_boxes:
        return tiles, labels
    boxes = torch.stack([top, left, top + crop_h, left + crop_w], dim=-1)
    return tiles, labels, boxes


def sample_patch_pairs(images: Tensor, generator: torch.Generator, *, gap_fraction: float = 0.5,
                       jitter_fraction: float = 0.075, patch_size: int = 32, return_boxes: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""A centre patch and one of its eight neighbours per image (Doersch et al., ICCV 2015).

    A 3x3 layout of square patches of side :math:`s`, separated by gaps of :math:`\lfloor g s \rceil` pixels
    (:math:`g` = ``gap_fraction``), is placed at a random position in the image, with :math:`s` the largest side
    for which the layout plus a jitter margin fits in :math:`\min(H, W)`. The neighbour is drawn uniformly among
    the eight (label :math:`k`, offset ``NEIGHBOR_OFFSETS[k]``), and each of the two patches is moved by up to
    :math:`j = \lfloor \text{jitter\_fraction} \cdot s \rfloor` pixels along each axis, independently. The gap and
    the jitter are Doersch et al.'s defence against trivial solutions through low-level cues (boundary patterns,
    textures continuing between patches): 96-pixel patches, 48-pixel gaps and up to 7 pixels of jitter, i.e.
    ``gap_fraction=0.5``, ``jitter_fraction=0.075``. Patches never touch: the gap exceeds twice the jitter.
    Patches are resized (bilinear, antialiased) to ``patch_size``; a patch of that size already is copied unchanged.

    Draws from ``generator`` (CPU), in this order: labels, layout positions, jitter.

    Args:
        images: the images.
        generator: a CPU generator, e.g. from :func:`pretext.common.batch_generator`.
        gap_fraction: gap between neighbouring patches over patch side.
        jitter_fraction: maximum shift of each patch along each axis over patch side; less than half of
            ``gap_fraction``.
        patch_size: side of the returned patches.
        return_boxes: also return the two crop windows.

    Returns:
        ``(center, neighbor, labels)``, or ``(center, neighbor, labels, center_boxes, neighbor_boxes)`` with
        ``return_boxes``. Labels are int64 on the images' device; boxes are int64 on the CPU,
        ``(top, left, bottom, right)``.

    Raises:
        ValueError: an argument is out of range, or the images are too small for the layout.

    Shape:
        - images: :math:`(B, C, H, W)`.
        - Output: center, neighbor :math:`(B, C, p, p)` with :math:`p` = ``patch_size``; labels :math:`(B,)`;
          boxes :math:`(B, 4)`.

    Examples:
        >>> center, neighbor, labels = sample_patch_pairs(torch.randn(2, 3, 64, 64), torch.Generator().manual_seed(0))
        >>> center.shape, labels.shape
        (torch.Size([2, 3, 32, 32]), torch.Size([2]))
    """
    batch, channels, height, width = images.shape
    if patch_size < 1:
        raise ValueError(f"sample_patch_pairs: patch_size must be positive, got {patch_size}")
    size, gap, jitter = _patch_layout(min(height, width), gap_fraction, jitter_fraction)
    step = size + gap
    span = 3 * size + 2 * gap + 2 * jitter
    labels = torch.randint(len(NEIGHBOR_OFFSETS), (batch,), generator=generator)
    origin = torch.stack([torch.randint(height - span + 1, (batch,), generator=generator),
                          torch.randint(width - span + 1, (batch,), generator=generator)], dim=-1)  # (B, 2)
    shifts = torch.randint(-jitter, jitter + 1, (2, batch, 2), generator=generator)
    offsets = torch.tensor(NEIGHBOR_OFFSETS)[labels]  # (B, 2) rows, columns
    center_corner = origin + jitter + step + shifts[0]
    neighbor_corner = origin + jitter + step * (1 + offsets) + shifts[1]
    corners = torch.stack([center_corner, neighbor_corner], dim=1)  # (B, 2 patches, 2 axes)
    top = corners[..., 0, None].expand(batch, 2, channels)
    left = corners[..., 1, None].expand(batch, 2, channels)
    device = images.device
    crops = _gather_crops(images, top.to(device), left.to(device), size, size)
    patches = _resize(crops.flatten(0, 1), patch_size).view(batch, 2, channels, patch_size, patch_size)
    center, neighbor, labels = patches[:, 0], patches[:, 1], labels.to(device)
    if not return_boxes:
        return center, neighbor, labels
    boxes = torch.cat([corners, corners + size], dim=-1)  # (B, 2, 4): top, left, bottom, right
    return center, neighbor, labels, boxes[:, 0], boxes[:, 1]


def _patch_layout(side: int, gap_fraction: float, jitter_fraction: float) -> tuple[int, int, int]:
    """Patch side, gap and jitter (pixels) of the largest 3x3 layout, jitter margin included, that fits in ``side``."""
    if gap_fraction < 0 or jitter_fraction < 0 or gap_fraction <= 2 * jitter_fraction:
        raise ValueError(f"sample_patch_pairs: need gap_fraction > 2 * jitter_fraction >= 0 so patches never touch, "
                         f"got gap_fraction={gap_fraction}, jitter_fraction={jitter_fraction}")
    size = math.floor(side / (3 + 2 * gap_fraction + 2 * jitter_fraction))
    while size >= 1:
        gap, jitter = _round(gap_fraction * size), math.floor(jitter_fraction * size)
        if 3 * size + 2 * gap + 2 * jitter <= side and gap > 2 * jitter:
            return size, gap, jitter
        size -= 1
    raise ValueError(f"sample_patch_pairs: a {side}-pixel image is too small for a 3x3 patch layout with "
                     f"gap_fraction={gap_fraction}, jitter_fraction={jitter_fraction}")


def _gather_crops(images: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """Crops of ``height x width`` at per-(image, crop, channel) corners, in one indexing op.

    Shape:
        - images: :math:`(B, C, H, W)`; top, left: :math:`(B, K, C)` int64 on the images' device.
        - Output: :math:`(B, K, C, h, w)`, contiguous.
    """
    batch, channels = images.shape[:2]
    device = images.device
    rows = top[..., None] + torch.arange(height, device=device)  # (B, K, C, h)
    cols = left[..., None] + torch.arange(width, device=device)  # (B, K, C, w)
    image_index = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
    channel_index = torch.arange(channels, device=device).view(1, 1, channels, 1, 1)
    return images[image_index, channel_index, rows[..., :, None], cols[..., None, :]]


def _resize(images: Tensor, size: int) -> Tensor:
    """Bilinear, antialiased resize to ``size x size``; images already that size are returned as they are."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _round(x: float) -> int:
    """Round half up (Python's ``round`` rounds half to even: 7.5 -> 8 but 8.5 -> 8)."""
    return math.floor(x + 0.5)


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


# ---------------------------------------------------------------------------------------------------------------
# Colour treatments against chromatic aberration and low-level statistics
# ---------------------------------------------------------------------------------------------------------------


def random_grayscale(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    r"""Each image replaced by its grey version with probability ``probability``, independently.

    Grey is the BT.601 luma of the RGB image, :math:`0.299R + 0.587G + 0.114B`, copied to the three channels and
    normalised again, so a grey image is what the backbone would see of a grey photo. Draws ``N`` uniforms from
    ``generator`` (none when ``probability`` is 0).

    Shape:
        - images: :math:`(N, 3, H, W)` ImageNet-normalised; output: the same.
    """
    if not 0 <= probability <= 1:
        raise ValueError(f"random_grayscale: probability must be in [0, 1], got {probability}")
    if probability == 0:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"random_grayscale: images need 3 channels (RGB), got {images.shape[1]}")
    chosen = (torch.rand(images.shape[0], generator=generator) < probability).to(images.device)
    rgb = denormalize(images)
    luma = torch.tensor(_LUMA, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    gray = normalize((rgb * luma).sum(1, keepdim=True).expand_as(rgb))
    return torch.where(chosen.view(-1, 1, 1, 1), gray, images)


def standardize_each(images: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Each image shifted and scaled to zero mean and unit standard deviation over all its pixels and channels.

    Noroozi & Favaro normalise the mean and standard deviation of every tile independently, so that neighbouring
    tiles cannot be matched by their similar brightness and contrast. One mean and one deviation per image, over
    all channels, so the colour balance within a tile is kept. An image whose deviation is below ``eps`` (flat)
    is only centred.

    Shape:
        - images: :math:`(N, C, H, W)`; output: the same.
    """
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    std = images.std(dim=(1, 2, 3), keepdim=True, correction=0)
    return (images - mean) / torch.where(std > eps, std, 1.0)


def drop_color_channels(images: Tensor, generator: torch.Generator, noise_fraction: float = 0.01) -> Tensor:
    r"""Doersch et al.'s *colour dropping*: keep one random channel per image, replace the others with weak noise.

    Chromatic aberration shifts the colour channels against each other by an amount that depends on the position
    in the frame, which a network can read to locate a patch without understanding it. Doersch et al. (ICCV 2015)
    remove that cue by dropping two of the three channels of each patch and replacing them with Gaussian
    noise of about 1/100 of the standard deviation of the kept channel. Here the noise has zero mean in the
    normalised space (the dataset's mean colour) and standard deviation ``noise_fraction`` times that of the kept
    channel of the same image. Draws ``N`` channel indices, then :math:`N C H W` normals from ``generator``.

    Shape:
        - images: :math:`(N, C, H, W)` normalised; output: the same.
    """
    count, channels = images.shape[:2]
    keep = torch.randint(channels, (count,), generator=generator).to(images.device)
    noise = torch.randn(images.shape, generator=generator).to(device=images.device, dtype=images.dtype)
    kept = images[torch.arange(count, device=images.device), keep]  # (N, H, W)
    scale = noise_fraction * kept.flatten(1).std(dim=1, correction=0)
    is_kept = torch.arange(channels, device=images.device) == keep[:, None]  # (N, C)
    return torch.where(is_kept[..., None, None], images, noise * scale.view(count, 1, 1, 1))


def project_out_green_magenta(images: Tensor) -> Tensor:
    r"""Doersch et al.'s *projection*: remove the green-magenta component of every pixel.

    The other defence of Doersch et al. (ICCV 2015) against chromatic aberration, which mostly shifts
    green against magenta (red plus blue): in RGB, each pixel :math:`x` loses its component along
    :math:`a = (-1, 2, -1)/\sqrt{6}`, :math:`x \leftarrow x - (a^\top x)\,a`, which moves green and magenta toward
    grey and keeps grey pixels and the red-blue axis intact. Deterministic.

    Shape:
        - images: :math:`(N, 3, H, W)` ImageNet-normalised; output: the same.
    """
    if images.shape[1] != 3:
        raise ValueError(f"project_out_green_magenta: images need 3 channels (RGB), got {images.shape[1]}")
    rgb = denormalize(images)
    axis = torch.tensor([-1.0, 2.0, -1.0], device=images.device, dtype=images.dtype).div(math.sqrt(6.0))
    along = (rgb * axis.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return normalize(rgb - along * axis.view(1, 3, 1, 1))


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


def _classifier(in_features: int, hidden: int, classes: int) -> nn.Sequential:
    """A linear classifier (``hidden == 0``) or a one-hidden-layer MLP; the last module is always the ``Linear`` that
    produces the logits."""
    if hidden < 0:
        raise ValueError(f"hidden must be >= 0 (0: linear classifier), got {hidden}")
    if hidden == 0:
        return nn.Sequential(nn.Linear(in_features, classes))
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))


def _classification_outputs(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Cross-entropy and accuracy in float32 (bf16 logits under autocast would round the log-softmax)."""
    logits = logits.float()
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return {"loss": loss, "acc": acc}


class _PoolingClassifierObjective(nn.Module):
    """Base of the predictive objectives: resolves the pooled stage and runs the backbone on built inputs."""

    #: The batches this objective consumes.
    domains: tuple[str, ...] = ("real",)
    #: Builds its own inputs from ``batch["image"]``; the engine's features are not used.
    uses_features = False
    joint = False
    #: Names this objective's random stream in :func:`pretext.common.batch_generator`.
    salt: str = ""

    def __init__(self, backbone_arch: str, stage: str | None):
        super().__init__()
        self.backbone_arch = backbone_arch
        self.stage, self.feature_dim = resolve_stage(type(self).__name__, backbone_arch, stage)

    def pooled(self, backbone: Backbone, inputs: Tensor, like: Tensor) -> Tensor:
        """Globally average-pooled features of ``self.stage`` for ``inputs``, laid out in memory like ``like``.

        Shape:
            - inputs: :math:`(N, C_{in}, h, w)`; output: :math:`(N, C_s)`.
        """
        if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        features = backbone(inputs, stages=[self.stage])[self.stage]
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"{type(self).__name__} was built for a {self.backbone_arch} backbone ({self.stage}: "
                             f"{self.feature_dim} channels), got {features.shape[1]} channels")
        return features.mean(dim=(2, 3))


class RotationPrediction(_PoolingClassifierObjective):
    r"""RotNet: predict which of four rotations was applied to an image (Gidaris, Singh & Komodakis, ICLR 2018).

    Every image of the batch is fed in all four rotations (0, 90, 180, 270 degrees; :func:`rotate_batch`), the
    arrangement Gidaris et al. found best; a classifier on the pooled features of ``stage`` predicts the rotation
    and is trained with cross-entropy,

    .. math::
        L = -\frac{1}{4B}\sum_{i=1}^{B}\sum_{k=0}^{3} \log \operatorname{softmax}\big(f(R_k x_i)\big)_k .

    Recognising an object's upright orientation requires knowing what and where it is, which is why this trains
    semantic features. Rotations are exact pixel permutations, so there is no interpolation cue to exploit; nothing
    is random, and the batch needs no ``seed``.

    Args:
        backbone_arch: the backbone's architecture, to size the classifier.
        stage: the backbone stage whose pooled features are classified (``None``: the last).
        hidden: width of a hidden layer (0: a linear classifier).

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, S, S)`, square.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output: ``{"loss", "acc"}``, 0-dim float32; the backbone sees :math:`4B` images.

    Examples:
        >>> backbone, objective = Backbone("resnet18"), RotationPrediction()
        >>> sorted(objective({"image": torch.randn(2, 3, 32, 32)}, backbone))
        ['acc', 'loss']
    """

    salt = "rotation"

    def __init__(self, backbone_arch: str = "resnet18", stage: str | None = None, hidden: int = 0):
        super().__init__(backbone_arch, stage)
        self.classifier = _classifier(self.feature_dim, hidden, 4)

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        image = batch["image"]
        rotated, labels = rotate_batch(image)
        logits = self.classifier(self.pooled(backbone, rotated, like=image))
        return _classification_outputs(logits, labels)


class Jigsaw(_PoolingClassifierObjective):
    r"""Solve jigsaw puzzles: which permutation shuffled an image's tiles (Noroozi & Favaro, ECCV 2016).

    Each image becomes ``grid x grid`` tiles shuffled by one of ``n_permutations`` fixed permutations
    (:func:`make_jigsaw`); the permutation set is chosen once, greedily, for large Hamming distances between its
    members (:func:`maximal_hamming_permutations`, from ``permutation_seed``), and is a registered buffer so a
    checkpoint carries it. As in the paper's context-free network, every tile is encoded on its own by the shared
    backbone (a siamese network, so no convolution sees two tiles), the pooled features are concatenated in the
    shuffled order, and an MLP predicts the permutation index with cross-entropy,

    .. math::
        L = -\frac{1}{B}\sum_{i=1}^{B} \log \operatorname{softmax}\big(f([h(t_{i,\pi_i(1)}); \dots;
            h(t_{i,\pi_i(g^2)})])\big)_{\pi_i} .

    Shortcuts and what is done about them, after the paper: tiles are random crops of ``tile_fraction`` of their
    cell, so there are gaps between them and edges cannot be matched; every tile's mean and standard deviation are
    normalised independently (``normalize_tiles``), so brightness and contrast do not chain neighbours; against
    chromatic aberration the colour channels of each tile are shifted independently by up to
    ``channel_jitter_fraction`` of the crop (the paper: 0-2 pixels on 64-pixel tiles) and each tile is made grey
    with probability ``grayscale_probability`` (the paper trains on a mix of colour and grey images; here the choice
    is per tile). All draws come from the batch's seeds (salt ``"jigsaw"``).

    Tiles are resized to ``tile_size`` pixels, a multiple of 32 so the backbone's strides divide it: with the
    default 32, a 64-96 pixel image gives crops of 17-26 pixels, upsampled. The backbone sees :math:`g^2 B` tiles
    per step, in one pass.

    Args:
        backbone_arch: the backbone's architecture, to size the classifier.
        stage: the backbone stage whose pooled features describe a tile (``None``: the last).
        grid: tiles per side.
        tile_fraction: crop side over cell side, in (0, 1].
        tile_size: side of the tiles fed to the backbone, a multiple of 32.
        n_permutations: size of the permutation set, the number of classes.
        permutation_seed: seed of the permutation set (``numpy.random.default_rng``).
        hidden: width of the MLP's hidden layer (0: a linear classifier).
        channel_jitter_fraction: maximum per-channel shift of a tile's window over the crop side (0: none).
        grayscale_probability: probability that a tile is made grey.
        normalize_tiles: standardise each tile on its own (:func:`standardize_each`).

    Attributes:
        permutations: buffer :math:`(P, g^2)` int64, the permutation set.
        min_hamming_distance: the smallest Hamming distance between two permutations of the set.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)`, ``seed`` :math:`(B,)` int64 on the CPU.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output: ``{"loss", "acc"}``, 0-dim float32.

    Examples:
        >>> backbone, objective = Backbone("resnet18"), Jigsaw(n_permutations=10)
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "seed": torch.tensor([0, 1])}
        >>> sorted(objective(batch, backbone))
        ['acc', 'loss']
    """

    salt = "jigsaw"

    def __init__(self, backbone_arch: str = "resnet18", stage: str | None = None, grid: int = 3,
                 tile_fraction: float = 0.8, tile_size: int = 32, n_permutations: int = 100,
                 permutation_seed: int = 0, hidden: int = 512, channel_jitter_fraction: float = 0.03,
                 grayscale_probability: float = 0.3, normalize_tiles: bool = True):
        super().__init__(backbone_arch, stage)
        if grid < 2:
            raise ValueError(f"Jigsaw: grid must be at least 2, got {grid}")
        _check_fraction("Jigsaw: tile_fraction", tile_fraction)
        _check_tile_size("Jigsaw: tile_size", tile_size)
        if channel_jitter_fraction < 0:
            raise ValueError(f"Jigsaw: channel_jitter_fraction must be >= 0, got {channel_jitter_fraction}")
        if not 0 <= grayscale_probability <= 1:
            raise ValueError(f"Jigsaw: grayscale_probability must be in [0, 1], got {grayscale_probability}")
        cells = grid * grid
        if cells <= _EXHAUSTIVE_CELLS and not 2 <= n_permutations <= math.factorial(cells):
            raise ValueError(f"Jigsaw: n_permutations must be in [2, {math.factorial(cells)}] for a {grid}x{grid} "
                             f"grid, got {n_permutations}")
        self.grid = grid
        self.tile_fraction = tile_fraction
        self.tile_size = tile_size
        self.channel_jitter_fraction = channel_jitter_fraction
        self.grayscale_probability = grayscale_probability
        self.normalize_tiles = normalize_tiles
        permutations, self.min_hamming_distance = _permutation_set(n_permutations, cells, permutation_seed)
        self.register_buffer("permutations", torch.from_numpy(permutations.copy()))
        self.classifier = _classifier(cells * self.feature_dim, hidden, n_permutations)

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        image = batch["image"]
        generator = batch_generator(batch, salt=self.salt)
        tiles, labels = make_jigsaw(image, self.permutations, generator, tile_fraction=self.tile_fraction,
                                    tile_size=self.tile_size, channel_jitter_fraction=self.channel_jitter_fraction)
        count, cells = tiles.shape[:2]
        tiles = random_grayscale(tiles.flatten(0, 1), self.grayscale_probability, generator)
        if self.normalize_tiles:
            tiles = standardize_each(tiles)
        features = self.pooled(backbone, tiles, like=image).view(count, cells * self.feature_dim)
        return _classification_outputs(self.classifier(features), labels)


class RelativePatchPosition(_PoolingClassifierObjective):
    r"""Context prediction: where a patch lies relative to a centre patch, one of eight positions (Doersch, Gupta &
    Efros, ICCV 2015).

    Each image gives a centre patch and one of its eight neighbours in a 3x3 layout with gaps and jitter
    (:func:`sample_patch_pairs`). Both patches are encoded by the shared backbone (late fusion, as the paper's
    pair of AlexNet towers with shared weights), their pooled features concatenated (centre first), and an MLP
    predicts the neighbour's position with cross-entropy,

    .. math::
        L = -\frac{1}{B}\sum_{i=1}^{B} \log \operatorname{softmax}\big(f([h(c_i); h(n_i)])\big)_{k_i} .

    Shortcuts and what is done about them, after the paper: the gap between patches (``gap_fraction``, half a
    patch) and the jitter of each patch (``jitter_fraction``) stop edges and textures from being matched across the
    boundary; against chromatic aberration, ``color_mode`` applies, to each patch independently, ``"drop"``
    (:func:`drop_color_channels`: keep one random channel, noise in the other two; the default), ``"project"``
    (:func:`project_out_green_magenta`), or ``"keep"`` (nothing). Doersch et al. describe both; dropping
    removes more colour information, projection keeps most of it. All draws come from the batch's seeds
    (salt ``"relative_patch_position"``).

    Patches are resized to ``patch_size`` pixels, a multiple of 32 so the backbone's strides divide it: a 64-pixel
    image gives 15-pixel patches with 8-pixel gaps, upsampled to 32. The backbone sees :math:`2B` patches per step.

    Args:
        backbone_arch: the backbone's architecture, to size the classifier.
        stage: the backbone stage whose pooled features describe a patch (``None``: the last).
        patch_size: side of the patches fed to the backbone, a multiple of 32.
        gap_fraction: gap between neighbouring patches over patch side (the paper: 48 / 96).
        jitter_fraction: maximum shift of each patch along each axis over patch side (the paper: 7 / 96); less
            than half of ``gap_fraction``.
        hidden: width of the MLP's hidden layer (0: a linear classifier).
        color_mode: ``"drop"``, ``"project"`` or ``"keep"``.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)`, ``seed`` :math:`(B,)` int64 on the CPU.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output: ``{"loss", "acc"}``, 0-dim float32.

    Examples:
        >>> backbone, objective = Backbone("resnet18"), RelativePatchPosition()
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "seed": torch.tensor([0, 1])}
        >>> sorted(objective(batch, backbone))
        ['acc', 'loss']
    """

    salt = "relative_patch_position"

    def __init__(self, backbone_arch: str = "resnet18", stage: str | None = None, patch_size: int = 32,
                 gap_fraction: float = 0.5, jitter_fraction: float = 0.075, hidden: int = 512,
                 color_mode: str = "drop"):
        super().__init__(backbone_arch, stage)
        _check_tile_size("RelativePatchPosition: patch_size", patch_size)
        if jitter_fraction < 0 or gap_fraction <= 2 * jitter_fraction:
            raise ValueError(f"RelativePatchPosition: need gap_fraction > 2 * jitter_fraction >= 0 so patches never "
                             f"touch, got gap_fraction={gap_fraction}, jitter_fraction={jitter_fraction}")
        if color_mode not in COLOR_MODES:
            raise ValueError(f"RelativePatchPosition: color_mode {color_mode!r} is not one of {list(COLOR_MODES)}")
        self.patch_size = patch_size
        self.gap_fraction = gap_fraction
        self.jitter_fraction = jitter_fraction
        self.color_mode = color_mode
        self.classifier = _classifier(2 * self.feature_dim, hidden, len(NEIGHBOR_OFFSETS))

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        image = batch["image"]
        generator = batch_generator(batch, salt=self.salt)
        center, neighbor, labels = sample_patch_pairs(image, generator, gap_fraction=self.gap_fraction,
                                                      jitter_fraction=self.jitter_fraction,
                                                      patch_size=self.patch_size)
        patches = torch.cat([center, neighbor])
        if self.color_mode == "drop":
            patches = drop_color_channels(patches, generator)
        elif self.color_mode == "project":
            patches = project_out_green_magenta(patches)
        features = self.pooled(backbone, patches, like=image)
        count = center.shape[0]
        pairs = torch.cat([features[:count], features[count:]], dim=1)
        return _classification_outputs(self.classifier(pairs), labels)


def _check_tile_size(name: str, size: int) -> None:
    if size < 32 or size % 32:
        raise ValueError(f"{name} must be a positive multiple of 32 (the backbone's total stride), got {size}")


__all__ = [
    "COLOR_MODES",
    "NEIGHBOR_OFFSETS",
    "Jigsaw",
    "RelativePatchPosition",
    "RotationPrediction",
    "drop_color_channels",
    "make_jigsaw",
    "maximal_hamming_permutations",
    "project_out_green_magenta",
    "random_grayscale",
    "rotate_batch",
    "sample_patch_pairs",
    "standardize_each",
]
