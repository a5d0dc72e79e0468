"""A real detection / instance-segmentation dataset made by pasting photographed object cut-outs onto real photos.

Dwibedi, Misra & Hebert, "Cut, Paste and Learn: Surprisingly Easy Synthesis for Instance Detection", ICCV 2017:
cut real objects out of photographs, paste them at random onto real background scenes with random scale, rotation,
flip and occlusion, and vary the blending at the object edges (none, Gaussian blur, Poisson) so that a detector
cannot find objects by their pasting artefacts. Every pixel is a real photograph, and boxes and masks are exact.

Here the cut-outs are the photographed stamps of Debian's ``tuxpaint-stamps-default`` (PNG with alpha; the
drawings and clip-art among them are filtered out by :func:`find_photo_stamps`), grouped into classes by their
category folders (:data:`STAMP_CLASSES`); the backgrounds are the real photographs and video frames of
:func:`synth.real.offline_real_sources`. :func:`build_cutpaste` writes a COCO dataset per split;
:class:`CutPasteDataset` and :class:`CutPasteSegmentation` read it back through the COCO readers of
:mod:`adapt.datasets`; :class:`CutPasteObjects` crops its objects into a real-object classification set.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm import tqdm

from adapt.datasets import CocoDetection, CocoSemantic, encode_rle, masks_to_boxes_exclusive
from synth.io import atomic_write_bytes
from synth.real import offline_real_sources, read_image, video_frames

logger = logging.getLogger(__name__)

#: Where Debian's ``tuxpaint-stamps-default`` installs the stamps (one folder per category).
STAMPS_DIR = "/usr/share/tuxpaint/stamps"

#: Object classes: name -> stamp folders (relative to :data:`STAMPS_DIR`) whose photographs belong to it. A finer
#: grouping than tuxpaint's 16 top folders, which mix unrelated things ("seasonal", "symbols") or are dominated by one
#: kind ("animals"); folders with fewer than ~10 photographed objects (sports, space, medical, town...) are left out
#: so that every class has instances in every split.
STAMP_CLASSES: dict[str, tuple[str, ...]] = {
    "mammal": ("animals/mammals", "animals/marsupials"),
    "bird": ("animals/birds",),
    "fish": ("animals/fish", "animals/shellfish"),
    "small_animal": ("animals/insects", "animals/amphibians", "animals/lizards"),
    "food": ("food",),
    "plant": ("plants",),
    "coin": ("symbols/money",),
    "tool": ("household/tools", "household/arttools"),
    "instrument": ("hobbies/music",),
    "vehicle": ("vehicles", "military/vehicles"),
}

#: Drawings that pass the statistical test of :func:`find_photo_stamps` (shaded clip-art with noise-like
#: gradients, or too few opaque pixels to judge), found by looking at contact sheets of every selected stamp.
DRAWN_STAMPS: frozenset[str] = frozenset({
    "animals/fish/shrimp.png", "clothes/button.png", "plants/trees/holly_leaves.png",
    "seasonal/christmas/stocking.png", "seasonal/easter/bluebird.png", "seasonal/easter/bunny-egg.png",
    "seasonal/easter/bunny.png", "seasonal/easter/butterfly.png", "seasonal/easter/chick-in-egg.png",
    "seasonal/easter/chick.png", "seasonal/newyears/party-hat.png", "sports/rugby_goal_posts.png",
    "town/roadsigns/toilets.png",
})

#: Background photos of :func:`synth.real.offline_real_sources` left out here because their main subject is an
#: object of one of the classes (it would be an unlabelled positive): fruit (apple, orange, fruits; box.png's
#: nuts; smarties), animals (baboon, chelsea, squirrel_cls, chicky_512, butterfly, rubberwhale1's toy whale), a
#: potted aloe (aloeL), coins, and vehicles (motorcycle_left, rocket, the shuttle behind the astronaut).
#: Incidental small objects stay (vans far away in vtest.avi, foliage filling tree.avi).
EXCLUDED_BACKGROUNDS: frozenset[str] = frozenset({
    "aloeL.jpg", "apple.jpg", "astronaut.png", "baboon.jpg", "box.png", "butterfly.jpg", "chelsea.png",
    "chicky_512.png", "coins.png", "fruits.jpg", "motorcycle_left.png", "orange.jpg", "rocket.jpg",
    "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
})

BLEND_MODES: tuple[str, ...] = ("hard", "gaussian", "feathered", "poisson")

_FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------------
# Objects: photographed stamps
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stamp:
    """One photographed cut-out: ``name`` is its path relative to the stamps folder, ``category`` its class."""

    path: str
    name: str
    category: str
    mirrorable: bool


def flat_fraction(rgba: np.ndarray, min_alpha: int = 250) -> float:
    r"""Fraction of opaque pixels whose right and lower neighbours have exactly the same colour.

    Drawings are filled with flat colours, so most of their pixels repeat their neighbours (median 0.6-1.0 over
    tuxpaint's drawings); photographs carry sensor noise and texture, so exact repeats are rare (median 0.0).

    .. math::
        f = \frac{\#\{p : c_p = c_{p + (1, 0)} = c_{p + (0, 1)}\}}{\#\{p : p, p + (1, 0), p + (0, 1) \text{ opaque}\}}

    Shape:
        - rgba: :math:`(H, W, 4)` uint8 (any channel order; ``[..., 3]`` is alpha).
    """
    rgb, opaque = rgba[..., :3], rgba[..., 3] >= min_alpha
    both = opaque[:-1, :-1] & opaque[1:, :-1] & opaque[:-1, 1:]
    same = np.all(rgb[:-1, :-1] == rgb[1:, :-1], -1) & np.all(rgb[:-1, :-1] == rgb[:-1, 1:], -1)
    return float((same & both).sum() / max(int(both.sum()), 1))


def _stamp_class(name: str) -> str | None:
    for category, prefixes in STAMP_CLASSES.items():
        if any(name == p or name.startswith(p + "/") for p in prefixes):
            return category
    return None


@functools.lru_cache(maxsize=4)
def _select(root: str, max_flat_fraction: float,
            min_pixels: int) -> tuple[tuple[Stamp, ...], tuple[tuple[str, int], ...]]:
    counts: dict[str, int] = {}
    root_path = Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f"{root}: tuxpaint stamps not found; install the Debian package "
                                "tuxpaint-stamps-default")
    pngs = sorted(p for p in root_path.rglob("*.png"))
    counts["png files"] = len(pngs)
    stamps, seen = [], set()
    for path in pngs:
        name = path.relative_to(root_path).as_posix()
        dat = path.with_suffix(".dat").read_text(errors="replace") if path.with_suffix(".dat").is_file() else ""
        # Metadata first: "_mirror" files are tuxpaint's pre-mirrored view of another stamp (same object); a PNG
        # next to an SVG is the raster of a vector drawing; "cartoon" folders hold drawings; tuxpaint recolours
        # only flat-colour drawings ("colorable"/"tintable").
        if path.stem.endswith("_mirror"):
            reason = "mirror variants"
        elif path.with_suffix(".svg").is_file():
            reason = "svg drawings"
        elif "cartoon" in path.relative_to(root_path).parts:
            reason = "cartoon folders"
        elif "colorable" in dat or "tintable" in dat:
            reason = "colorable/tintable"
        else:
            reason = None
        if reason is None:
            rgba = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if rgba is None or rgba.ndim != 3 or rgba.shape[2] != 4:
                reason = "no alpha channel"
            elif int((rgba[..., 3] >= 128).sum()) < min_pixels:
                reason = "too small"
            elif flat_fraction(rgba) >= max_flat_fraction:
                reason = "flat colours (drawing)"
            elif name in DRAWN_STAMPS:
                reason = "drawings by eye"
            else:
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                category = _stamp_class(name)
                if digest in seen:
                    reason = "duplicate files"
                elif category is None:
                    reason = "photos outside the classes"
                else:
                    seen.add(digest)
                    stamps.append(Stamp(str(path), name, category, "nomirror" not in dat))
        if reason is not None:
            counts[reason] = counts.get(reason, 0) + 1
    counts["selected"] = len(stamps)
    return tuple(stamps), tuple(counts.items())


def find_photo_stamps(root: str = STAMPS_DIR, max_flat_fraction: float = 0.1,
                      min_pixels: int = 400) -> tuple[list[Stamp], dict[str, int]]:
    """The photographed objects among the tuxpaint stamps, with their class (the cut-outs of Dwibedi et al. 2017).

    A stamp is kept when all of these hold:

    1. metadata: not a ``*_mirror.png`` (tuxpaint's mirrored copy of another stamp), no ``.svg`` beside it (a
       vector drawing's raster), not under a ``cartoon`` folder, its ``.dat`` not ``colorable``/``tintable``
       (tuxpaint recolours flat-colour drawings only);
    2. it has an alpha channel and at least ``min_pixels`` pixels with alpha >= 128;
    3. :func:`flat_fraction` < ``max_flat_fraction``: photographs rarely repeat a colour exactly between neighbours,
       drawings mostly do;
    4. it is not one of the 13 shaded drawings in :data:`DRAWN_STAMPS` that pass 1-3 (checked by eye);
    5. its bytes differ from every stamp kept before (one file ships twice, under ``military/`` and ``people/``);
    6. its folder belongs to a class of :data:`STAMP_CLASSES`.

    The result depends only on the installed files (cached per arguments).

    Args:
        root: tuxpaint's stamps folder.
        max_flat_fraction: threshold of criterion 3.
        min_pixels: threshold of criterion 2.

    Returns:
        ``(stamps sorted by path, counts)``: ``counts`` maps each reason for leaving a stamp out to how many were,
        plus ``"png files"`` and ``"selected"``.
    """
    stamps, counts = _select(str(root), float(max_flat_fraction), int(min_pixels))
    return list(stamps), dict(counts)


def _load_cutout(stamp: Stamp) -> np.ndarray:
    """RGBA float32 (RGB 0-255, alpha 0-1) cropped to the alpha's bounding box."""
    bgra = cv2.imread(stamp.path, cv2.IMREAD_UNCHANGED)
    if bgra is None:
        raise ValueError(f"{stamp.path}: unreadable stamp")
    rgba = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)
    rows, cols = np.flatnonzero(rgba[..., 3].any(1)), np.flatnonzero(rgba[..., 3].any(0))
    rgba = rgba[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].astype(np.float32)
    rgba[..., 3] /= 255.0
    return rgba


# ---------------------------------------------------------------------------------------------------------------
# Backgrounds
# ---------------------------------------------------------------------------------------------------------------


def _background_units(video_every: int, max_side: int) -> list[tuple[str, list[np.ndarray]]]:
    """(name, frames) per background source: one photo, or all kept frames of one video.

    A whole video is one unit (never split across dataset splits): vtest.avi is a static camera, so frames from
    two of its segments would show the same scene in two splits.
    """
    units = []
    for source in offline_real_sources():
        path = Path(source)
        if path.name in EXCLUDED_BACKGROUNDS:
            continue
        frames = (video_frames(path, every=video_every) if path.suffix.lower() in (".avi", ".mp4", ".mkv", ".mov")
                  else [read_image(path)])
        shrunk = []
        for frame in frames:
            scale = max_side / min(frame.shape[:2])
            if scale < 1:
                frame = cv2.resize(frame, (round(frame.shape[1] * scale), round(frame.shape[0] * scale)),
                                   interpolation=cv2.INTER_AREA)
            shrunk.append(frame)
        units.append((path.name, shrunk))
    return units


def _background(frame: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random square crop (side 60-100% of the short side), resized to ``size``, randomly flipped; float32 RGB."""
    height, width = frame.shape[:2]
    side = max(1, round(min(height, width) * rng.uniform(0.6, 1.0)))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
    crop = cv2.resize(frame[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Pasting
# ---------------------------------------------------------------------------------------------------------------


def _transform(cutout: np.ndarray, longest: float, angle: float, flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale the cut-out so its longest side is ``longest`` px, flip, rotate by ``angle`` degrees (canvas grows).

    Returns (RGB float32 with colours extended outside the object, mask bool = alpha >= 0.5).
    """
    height, width = cutout.shape[:2]
    scale = longest / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    patch = cv2.resize(cutout, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if flip:
        patch = patch[:, ::-1]
    h, w = patch.shape[:2]
    rotation = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(rotation[0, 0]), abs(rotation[0, 1])
    out_w, out_h = int(np.ceil(h * sin + w * cos)), int(np.ceil(h * cos + w * sin))
    rotation[:, 2] += ((out_w - w) / 2, (out_h - h) / 2)
    patch = cv2.warpAffine(np.ascontiguousarray(patch), rotation, (out_w, out_h), flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask = patch[..., 3] >= 0.5
    rgb = patch[..., :3]
    if mask.any() and not mask.all():
        # Outside the object the PNG's colours are arbitrary (often black); give each outside pixel the colour of
        # the nearest object pixel, so a blurred alpha spreads the object's own edge colour and not a dark halo.
        _, labels = cv2.distanceTransformWithLabels((~mask).astype(np.uint8), cv2.DIST_L2, 5,
                                                    labelType=cv2.DIST_LABEL_PIXEL)
        inside = np.argwhere(mask)  # row-major, the order in which OpenCV numbers the zero pixels
        nearest = inside[labels - 1]
        rgb = rgb[nearest[..., 0], nearest[..., 1]]
    return np.ascontiguousarray(rgb, dtype=np.float32), mask


def _blend(canvas: np.ndarray, rgb: np.ndarray, mask: np.ndarray, mode: str, rng: np.random.Generator) -> None:
    """Composite ``rgb`` over ``canvas`` (both full-size float32) in place; ``mask`` is the object's silhouette.

    Modes (Dwibedi et al. 2017, Sec. 3.2, render every object with several blendings so edges are no cue):
    ``hard``: binary alpha (their "no blending"); ``gaussian``: alpha blurred with sigma in [0.5, 2] px;
    ``feathered``: alpha ramps from 0 at the silhouette to 1 at 1-3 px inside it; ``poisson``: gradient-domain
    seamless cloning (Pérez, Gangnet & Blake, SIGGRAPH 2003) via ``cv2.seamlessClone`` in a 2-4 px seam inside
    the silhouette, the object's own pixels further in.
    """
    mask_f = mask.astype(np.float32)
    if mode == "hard":
        alpha = mask_f
    elif mode == "gaussian":
        alpha = cv2.GaussianBlur(mask_f, (0, 0), sigmaX=float(rng.uniform(0.5, 2.0)))
    elif mode == "feathered":
        inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        alpha = np.clip(inside / float(rng.uniform(1.0, 3.0)), 0.0, 1.0).astype(np.float32)
    elif mode == "poisson":
        # Pad so the mask never touches the border (seamlessClone needs a boundary all round).
        pad = 4
        dst = cv2.copyMakeBorder(np.clip(canvas, 0, 255).astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REFLECT)
        src = cv2.copyMakeBorder(np.clip(rgb, 0, 255).astype(np.uint8), pad, pad, pad, pad, cv2.BORDER_REFLECT)
        region = np.pad(mask, pad).astype(np.uint8) * 255
        x, y, w, h = cv2.boundingRect(region)
        try:
            cloned = cv2.seamlessClone(src, dst, region, (x + w // 2, y + h // 2), cv2.NORMAL_CLONE)
        except cv2.error:
            # OpenCV rejects some small or thin silhouettes (an assertion inside its solver); such a paste is
            # feathered instead, deterministically, as the failure depends only on the inputs.
            _blend(canvas, rgb, mask, "feathered", rng)
            return
        cloned = cloned[pad:-pad, pad:-pad].astype(np.float32)
        # Cloning the whole object washes out weakly textured objects until they vanish into the background (seen
        # on contact sheets: labelled but invisible objects); keep the cloned colours only in a 2-4 px seam.
        inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        own = np.clip(inside / float(rng.uniform(2.0, 4.0)), 0.0, 1.0)[..., None]
        canvas[mask] = (own * rgb + (1 - own) * cloned)[mask]
        return
    else:
        raise ValueError(f"blend mode {mode!r}: expected one of {BLEND_MODES}")
    canvas += alpha[..., None] * (rgb - canvas)


def _place(rgb: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray, int]:
    """Put a patch at a random position (up to a quarter of it may hang outside the image).

    Returns the full-size RGB layer, the full-size mask, and the object's pixel count before truncation.
    """
    h, w = mask.shape
    top = int(rng.integers(-(h // 4), size - h + h // 4 + 1)) if h < size else int(rng.integers(size - h, 1))
    left = int(rng.integers(-(w // 4), size - w + w // 4 + 1)) if w < size else int(rng.integers(size - w, 1))
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, size), min(left + w, size)
    layer = np.zeros((size, size, 3), np.float32)
    full_mask = np.zeros((size, size), bool)
    if y1 > y0 and x1 > x0:
        layer[y0:y1, x0:x1] = rgb[y0 - top:y1 - top, x0 - left:x1 - left]
        full_mask[y0:y1, x0:x1] = mask[y0 - top:y1 - top, x0 - left:x1 - left]
    return layer, full_mask, int(mask.sum())


def compose_image(background: np.ndarray, cutouts: Sequence[tuple[np.ndarray, bool]], *, size: int,
                  rng: np.random.Generator, scale: tuple[float, float] = (0.25, 0.6), max_rotation: float = 30.0,
                  blend_modes: Sequence[str] = BLEND_MODES, max_occlusion: float = 0.75, min_pixels: int = 16,
                  max_tries: int = 10) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    r"""Paste cut-outs one after another onto a background (Dwibedi et al., ICCV 2017, Sec. 3).

    Each cut-out gets a random size (its longest side :math:`\sim U(\text{scale}) \cdot \text{size}`), rotation
    :math:`\sim U(-r, r)` degrees, horizontal flip (probability 1/2, if the stamp allows mirroring), position and
    blending mode. Later pastes occlude earlier ones: the instance map is overwritten where the new object lies. A
    paste is accepted only if afterwards every object (itself included, counting what hangs outside the image)
    keeps at least :math:`1 - \text{max\_occlusion}` of its pixels and at least ``min_pixels`` pixels; otherwise its
    position is redrawn, up to ``max_tries`` times, then the object is skipped. So no object in the image is more
    than ``max_occlusion`` hidden and no visible fragment is left unlabelled.

    Args:
        background: ``(size, size, 3)`` float32 RGB, 0-255.
        cutouts: ``(RGBA float32 cut-out, mirrorable)`` per object, in pasting order.
        size: image side.
        rng: the only source of randomness.
        scale: range of the longest side as a fraction of ``size``.
        max_rotation: rotation range in degrees.
        blend_modes: modes drawn uniformly per paste (see :func:`_blend`).
        max_occlusion: largest hidden fraction an object may end with.
        min_pixels: smallest visible object.
        max_tries: placements tried per object.

    Returns:
        ``(image (size, size, 3) uint8, instance map (size, size) uint8 with 0 = background and k = k-th kept
        object, one dict per kept object: ``index`` (position in ``cutouts``), ``blend`` (mode), ``occlusion``
        (fraction of the object hidden by later objects or cut by the image border))``.
    """
    canvas = background.astype(np.float32).copy()
    instances = np.zeros((size, size), np.uint8)
    kept: list[dict] = []
    full_areas: list[int] = []
    for index, (cutout, mirrorable) in enumerate(cutouts):
        longest = float(rng.uniform(*scale)) * size
        angle = float(rng.uniform(-max_rotation, max_rotation))
        flip = bool(mirrorable and rng.random() < 0.5)
        mode = str(blend_modes[int(rng.integers(len(blend_modes)))])
        rgb, mask = _transform(cutout, longest, angle, flip)
        for _ in range(max_tries):
            layer, full_mask, area = _place(rgb, mask, size, rng)
            visible = int(full_mask.sum())
            if visible < max(min_pixels, (1 - max_occlusion) * area):
                continue
            remaining = np.bincount(instances[~full_mask], minlength=len(kept) + 1)[1:]
            if all(r >= max(min_pixels, (1 - max_occlusion) * a) for r, a in zip(remaining, full_areas, strict=True)):
                break
        else:
            continue
        _blend(canvas, layer, full_mask, mode, rng)
        instances[full_mask] = len(kept) + 1
        kept.append({"index": index, "blend": mode})
        full_areas.append(area)
    visible = np.bincount(instances.ravel(), minlength=len(kept) + 1)[1:]
    for record, pixels, area in zip(kept, visible, full_areas, strict=True):
        record["occlusion"] = round(1.0 - int(pixels) / area, 4)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), instances, kept


# ---------------------------------------------------------------------------------------------------------------
# Dataset writer
# ---------------------------------------------------------------------------------------------------------------


def _partition(items: Sequence, weights: Sequence[float], rng: np.random.Generator) -> list[list]:
    """Shuffle ``items`` and cut them into ``len(weights)`` groups of sizes ~ proportional to ``weights``, each
    group non-empty when there are at least as many items as groups."""
    order = [items[i] for i in rng.permutation(len(items))]
    n, k = len(order), len(weights)
    total = float(sum(weights))
    sizes = [int(np.floor(n * w / total)) for w in weights]
    if n >= k:
        for g in range(k):
            if sizes[g] == 0:
                sizes[g] = 1
    while sum(sizes) > n:
        sizes[int(np.argmax(sizes))] -= 1
    # Hand the rounding remainder to the groups furthest below their share.
    while sum(sizes) < n:
        deficit = [n * w / total - s for w, s in zip(weights, sizes, strict=True)]
        sizes[int(np.argmax(deficit))] += 1
    groups, start = [], 0
    for s in sizes:
        groups.append(order[start:start + s])
        start += s
    return groups


def _png(image: np.ndarray) -> bytes:
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def build_cutpaste(out_dir: str = "cutpaste", n_images: Mapping[str, int] | None = None, size: int = 128,
                   objects_per_image: tuple[int, int] = (1, 4), seed: int = 0,
                   scale: tuple[float, float] = (0.25, 0.6), max_rotation: float = 30.0,
                   blend_modes: tuple[str, ...] = BLEND_MODES, max_occlusion: float = 0.75,
                   video_every: int = 10, stamps_dir: str = STAMPS_DIR) -> dict[str, Path]:
    """Write a cut-paste detection / instance-segmentation dataset (Dwibedi et al., ICCV 2017) from real data.

    Stamps (:func:`find_photo_stamps`) are split between the splits BY OBJECT, class by class, and backgrounds
    (each photo, or each whole video, of :func:`synth.real.offline_real_sources`, less
    :data:`EXCLUDED_BACKGROUNDS`) BY SOURCE, both in proportion
    to ``n_images`` and with at least one per split: no stamp and no background source appears in two splits.
    Each image draws a background source of its split uniformly, a random crop of it (of a random frame, for a
    video), a number of objects in ``objects_per_image`` (each: class uniformly, then a stamp of that class in the
    split, so large classes do not swamp the others), and pastes them with :func:`compose_image`. Image ``i`` of
    split ``s`` uses ``numpy.random.default_rng([seed, s, i])``: the output is a function of the arguments.

    Layout (each file written to a temporary name, then renamed)::

        out_dir/dataset.json                 arguments, stamp/background assignment, counts
        out_dir/<split>/images/000000.png    RGB
        out_dir/<split>/masks/000000.png     uint8 instance ids (0 background, k = k-th annotation of the image)
        out_dir/<split>/annotations.json     COCO: boxes are the tight boxes of the final (occluded) masks,
                                             segmentation RLE; extra keys "stamp", "blend",
                                             "occlusion" (annotations), "background" (images)

    Rerunning with the same arguments into a complete folder does nothing; different arguments are refused.

    Args:
        out_dir: output folder.
        n_images: images per split; default ``{"train": 200, "val": 50, "test": 100}``.
        size: image side in pixels.
        objects_per_image: inclusive range of pasted objects (fewer may remain after occlusion checks).
        seed: seed of every random choice.
        scale: longest object side as a fraction of ``size``.
        max_rotation: rotation range in degrees.
        blend_modes: blending modes drawn per paste, a subset of :data:`BLEND_MODES`.
        max_occlusion: largest hidden fraction of a kept object.
        video_every: keep every k-th frame of the background videos.
        stamps_dir: tuxpaint's stamps folder.

    Returns:
        ``{split: split folder}``; read a split with :class:`CutPasteDataset` / :class:`CutPasteSegmentation`.

    Raises:
        ValueError: invalid arguments, or ``out_dir`` holds a dataset built with other arguments (or foreign
            split folders without ``dataset.json``).

    Examples:
        >>> paths = build_cutpaste("data/cutpaste", n_images={"train": 200, "val": 50, "test": 100}, size=128)
        >>> train = CutPasteDataset(root="data/cutpaste", split="train")
    """
    n_images = dict(n_images) if n_images is not None else {"train": 200, "val": 50, "test": 100}
    if not n_images or any(not isinstance(n, int) or n < 1 for n in n_images.values()):
        raise ValueError(f"n_images={n_images}: need at least one split, each with a positive integer count")
    low, high = objects_per_image
    if not 1 <= low <= high <= 255:
        raise ValueError(f"objects_per_image={objects_per_image}: need 1 <= low <= high <= 255")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale={scale}: need 0 < low <= high <= 1")
    if not blend_modes or set(blend_modes) - set(BLEND_MODES):
        raise ValueError(f"blend_modes={blend_modes}: choose from {BLEND_MODES}")
    if not 0 <= max_occlusion < 1 or size < 16 or video_every < 1 or seed < 0:
        raise ValueError(f"need 0 <= max_occlusion < 1, size >= 16, video_every >= 1, seed >= 0; got "
                         f"max_occlusion={max_occlusion}, size={size}, video_every={video_every}, seed={seed}")
    args = {"n_images": [[split, count] for split, count in n_images.items()], "size": size,
            "objects_per_image": [low, high], "seed": seed,
            "scale": list(scale), "max_rotation": max_rotation, "blend_modes": list(blend_modes),
            "max_occlusion": max_occlusion, "video_every": video_every, "stamps_dir": str(stamps_dir),
            "format_version": _FORMAT_VERSION}
    args = json.loads(json.dumps(args))  # the form it takes in dataset.json (tuples become lists)
    out = Path(out_dir)
    splits = list(n_images)
    paths = {split: out / split for split in splits}
    manifest_path = out / "dataset.json"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{manifest_path}: not valid JSON ({error}); delete the folder to rebuild") from error
        if manifest.get("args") != args:
            old = manifest.get("args", {})
            changed = sorted(k for k in set(old) | set(args) if old.get(k) != args.get(k))
            raise ValueError(f"{out}: holds a cut-paste dataset built with other arguments (differing: "
                             f"{', '.join(changed)}; it has {', '.join(f'{k}={old.get(k)!r}' for k in changed)}). "
                             "Use another out_dir or delete this one.")
        if manifest.get("complete") and all((p / "annotations.json").is_file() for p in paths.values()):
            logger.info("%s: complete dataset with these arguments, nothing to do", out)
            return paths
    elif any((out / split).exists() for split in splits):
        raise ValueError(f"{out}: has split folders but no dataset.json; refusing to write into a foreign folder")

    stamps, counts = find_photo_stamps(stamps_dir)
    logger.info("cut-paste: %d photographed stamps selected (%s)", len(stamps), counts)
    classes = list(STAMP_CLASSES)
    weights = [n_images[s] for s in splits]
    rng = np.random.default_rng([seed, 0])
    stamp_split: dict[str, list[Stamp]] = {s: [] for s in splits}
    for category in classes:
        members = [stamp for stamp in stamps if stamp.category == category]
        for split, group in zip(splits, _partition(members, weights, rng), strict=True):
            stamp_split[split] += group
    units = _background_units(video_every, max_side=2 * size)
    background_split = dict(zip(splits, _partition(units, weights, np.random.default_rng([seed, 1])), strict=True))
    for split in splits:
        if not background_split[split] or not stamp_split[split]:
            raise ValueError(f"split {split!r} got no background or no stamp: {len(units)} background sources and "
                             f"{len(stamps)} stamps cannot serve {len(splits)} splits")

    manifest = {"args": args, "complete": False, "classes": classes, "selection": counts,
                "stamps": {s: sorted(stamp.name for stamp in stamp_split[s]) for s in splits},
                "backgrounds": {s: sorted(name for name, _ in background_split[s]) for s in splits}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())

    cutouts: dict[str, np.ndarray] = {}
    label_of = {category: i + 1 for i, category in enumerate(classes)}
    progress = tqdm(total=sum(n_images.values()), desc="cut-paste images", unit="img")
    for split_index, split in enumerate(splits):
        (paths[split] / "images").mkdir(parents=True, exist_ok=True)
        (paths[split] / "masks").mkdir(parents=True, exist_ok=True)
        by_class = {c: [s for s in stamp_split[split] if s.category == c] for c in classes}
        present = [c for c in classes if by_class[c]]
        images, annotations = [], []
        for index in range(n_images[split]):
            image_rng = np.random.default_rng([seed, split_index, index])
            name, frames = background_split[split][int(image_rng.integers(len(background_split[split])))]
            frame_index = int(image_rng.integers(len(frames)))
            background = _background(frames[frame_index], size, image_rng)
            chosen = []
            for _ in range(int(image_rng.integers(low, high + 1))):
                members = by_class[present[int(image_rng.integers(len(present)))]]
                chosen.append(members[int(image_rng.integers(len(members)))])
            for stamp in chosen:
                if stamp.name not in cutouts:
                    cutouts[stamp.name] = _load_cutout(stamp)
            image, instance_map, kept = compose_image(
                background, [(cutouts[s.name], s.mirrorable) for s in chosen], size=size, rng=image_rng,
                scale=scale, max_rotation=max_rotation, blend_modes=blend_modes, max_occlusion=max_occlusion)
            file_name = f"{index:06d}.png"
            atomic_write_bytes(paths[split] / "images" / file_name, _png(image))
            atomic_write_bytes(paths[split] / "masks" / file_name, _png(instance_map))
            image_id = index + 1
            source = f"{name}#{frame_index * video_every}" if len(frames) > 1 else name
            images.append({"id": image_id, "file_name": file_name, "width": size, "height": size,
                           "background": source})
            masks = np.stack([instance_map == k + 1 for k in range(len(kept))]) if kept else np.zeros((0, size, size))
            for mask, box, record in zip(masks, masks_to_boxes_exclusive(masks), kept, strict=True):
                stamp = chosen[record["index"]]
                x1, y1, x2, y2 = (int(v) for v in box)
                annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                    "category_id": label_of[stamp.category], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                    "area": int(mask.sum()), "iscrowd": 0, "segmentation": encode_rle(mask),
                                    "stamp": stamp.name, "blend": record["blend"],
                                    "occlusion": record["occlusion"]})
            progress.update(1)
        coco = {"info": {"description": f"cut-paste split {split!r} (Dwibedi et al. 2017), seed {seed}"},
                "images": images, "annotations": annotations,
                "categories": [{"id": label_of[c], "name": c} for c in classes]}
        atomic_write_bytes(paths[split] / "annotations.json", json.dumps(coco).encode())
    progress.close()
    manifest["complete"] = True
    atomic_write_bytes(manifest_path, json.dumps(manifest, indent=1).encode())
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Readers (the COCO readers of adapt.datasets on a split folder)
# ---------------------------------------------------------------------------------------------------------------


class CutPasteDataset(CocoDetection):
    """Detection / instance-segmentation items of one split written by :func:`build_cutpaste` (Dwibedi et al.,
    ICCV 2017): :class:`adapt.datasets.CocoDetection` on ``root/<split>``.

    Args:
        root: the ``out_dir`` of :func:`build_cutpaste`.
        split: split name.

    Shape:
        - As :class:`adapt.datasets.CocoDetection`.

    Examples:
        >>> dataset = CutPasteDataset(root="data/cutpaste", split="val")
        >>> image, target = dataset[0]
        >>> dataset.categories[int(target["labels"][0]) - 1]
    """

    def __init__(self, root: str = "", split: str = "train"):
        super().__init__(images_dir=str(Path(root) / split / "images"),
                         annotation_file=str(Path(root) / split / "annotations.json"))


class CutPasteSegmentation(CocoSemantic):
    """Semantic-segmentation items of one split of :func:`build_cutpaste` (class id per pixel, Dwibedi et al.,
    ICCV 2017): :class:`adapt.datasets.CocoSemantic` on ``root/<split>``.

    Args:
        root: the ``out_dir`` of :func:`build_cutpaste`.
        split: split name.

    Shape:
        - As :class:`adapt.datasets.CocoSemantic`.

    Examples:
        >>> dataset = CutPasteSegmentation(root="data/cutpaste", split="val")
        >>> image, mask = dataset[0]
    """

    def __init__(self, root: str = "", split: str = "train"):
        super().__init__(images_dir=str(Path(root) / split / "images"),
                         annotation_file=str(Path(root) / split / "annotations.json"))


class CutPasteObjects(torch.utils.data.Dataset):
    r"""Every annotated object of one split of :func:`build_cutpaste`, cropped, as a classification set of real
    photographed objects on real backgrounds (the object crops of Dwibedi et al., ICCV 2017).

    Each object's box is enlarged by ``margin`` of its width and height on every side (so the crop shows some of
    the background and the blended edge), clipped to the image, and resized to ``size`` x ``size`` (aspect ratio
    not kept; area interpolation when shrinking, bilinear when enlarging). Objects whose box is under
    ``min_side`` pixels wide or high are skipped. Occluded objects stay, with whatever the occluder leaves visible
    (at most 75% hidden, :func:`build_cutpaste`'s ``max_occlusion``).

    The split is BY OBJECT: :func:`build_cutpaste` gives each photographed object (stamp) and each background to
    exactly one split, so the train and test crops never show the same object instance or the same background
    photo: a classifier must recognise the category of an object it has never seen, not memorise the instance.

    Args:
        root: The ``out_dir`` of :func:`build_cutpaste`.
        split: Split name.
        size: Side of the crops in pixels.
        margin: Share of the box's width (height) added on the left and right (top and bottom).
        min_side: Smallest box width and height kept, in pixels.

    Attributes:
        classes: Category names, label ``i`` is ``classes[i]`` (the categories of the COCO file, in id order).
        labels: :math:`(N,)` int64 label of each crop.
        stamps: The stamp (object) name of each crop.

    Shape:
        - image: :math:`(3, \text{size}, \text{size})` float32 in [0, 1]; label: 0-dim int64.

    Examples:
        >>> build_cutpaste("data/cutpaste", size=128)
        >>> train = CutPasteObjects(root="data/cutpaste", split="train", size=64)
        >>> image, label = train[0]; train.classes[int(label)]
    """

    def __init__(self, root: str = "", split: str = "train", size: int = 64, margin: float = 0.15,
                 min_side: int = 8):
        if size < 1 or margin < 0 or min_side < 1:
            raise ValueError(f"need size >= 1, margin >= 0, min_side >= 1; got size={size}, margin={margin}, "
                             f"min_side={min_side}")
        self.detection = CutPasteDataset(root=root, split=split)  # validates the COCO file
        self.classes: list[str] = list(self.detection.categories)
        self.size, self.margin, self.min_side = size, margin, min_side
        label_of = {category_id: i for i, category_id in enumerate(self.detection.category_ids)}
        coco = json.loads(self.detection.annotation_file.read_text())
        index_of = {image["id"]: i for i, image in enumerate(self.detection.images)}
        self.items: list[tuple[int, tuple[int, int, int, int]]] = []
        labels, self.stamps = [], []
        for annotation in sorted(coco["annotations"], key=lambda a: (index_of[a["image_id"]], a["id"])):
            info = self.detection.images[index_of[annotation["image_id"]]]
            x, y, w, h = annotation["bbox"]
            if w < min_side or h < min_side or annotation.get("iscrowd", 0):
                continue
            dx, dy = margin * w, margin * h
            box = (max(0, round(x - dx)), max(0, round(y - dy)),
                   min(info["width"], round(x + w + dx)), min(info["height"], round(y + h + dy)))
            self.items.append((index_of[annotation["image_id"]], box))
            labels.append(label_of[annotation["category_id"]])
            self.stamps.append(str(annotation.get("stamp", "")))
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_index, (x1, y1, x2, y2) = self.items[index]
        info = self.detection.images[image_index]
        rgb = read_image(self.detection.images_dir / info["file_name"])
        crop = rgb[y1:y2, x1:x2]
        shrink = crop.shape[0] * crop.shape[1] > self.size * self.size
        crop = cv2.resize(crop, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        image = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float().div_(255.0)
        return image, torch.tensor(int(self.labels[index]), dtype=torch.int64)
