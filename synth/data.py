"""Feed rendered frames to PyTorch training: label-consistent augmentation, datasets, a resumable sampler.

A rendered frame (see :func:`synth.frames.read_frame`) becomes a dict of tensors through :class:`FrameAugment`,
which applies the same geometric transform to the image and every label and photometric changes to the image
only. Two datasets read dataset folders written by ``synth render``:

* :class:`RenderedFrames`: map-style, over the frames complete when it is built. With :class:`StepSampler` the
  sample stream depends only on ``(seed, step)``, so a resumed run sees exactly what an uninterrupted one would.
* :class:`StreamingFrames`: iterable, re-scans the folders every few seconds as it goes, so training can consume a
  dataset that ``synth render`` is still writing ("unlimited data"); :class:`LiveFrames` reads its held-out side,
  re-scanned before each evaluation. Both split by scene with :func:`held_out_scene`, as the fixed pool does.

Randomness never comes from global state: every draw uses an explicit ``torch.Generator`` or
``numpy.random.Generator`` derived from explicit seeds, so results do not depend on which worker or process
produced a sample.

Pixel coordinates follow :mod:`render.labels`: pixel ``(u, v)`` spans ``[u, u + 1) x [v, v + 1)``, its centre is
``(u + 0.5, v + 0.5)``, and boxes are ``x1, y1, x2, y2`` with x2/y2 exclusive.
"""

import logging
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.frames import CorruptFrameError, list_frames, read_frame, read_index, sha256

logger = logging.getLogger(__name__)


# Per-sample fields of variable length: collated as lists, everything else is stacked.
LIST_FIELDS = ("boxes", "box_categories", "box_instances")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=generator))


def _derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a fixed function of ``keys`` (stable across processes, unlike ``hash``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass(kw_only=True)
class FrameAugment:
    """Augmentations applied consistently to every label (Ren & Lee 2018 style pretraining input).

    Geometric ops (random resized crop, horizontal flip) move the image and all labels together: the image is
    resampled bilinearly with antialiasing, depth, normals, contours and instance ids with nearest-neighbour
    (``NEAREST_EXACT``, i.e. sampled at pixel centres), so depth is never blended across an occlusion edge and no
    instance id is invented. A flip mirrors the camera, so the x component of the camera-frame normals is
    negated and the principal point is mirrored. Boxes are cropped, scaled, flipped and clipped; a box that no
    longer covers any output pixel centre (i.e. whose object has no pixel left) is dropped. Photometric ops
    (colour jitter as in ``torchvision.transforms.ColorJitter``, random grayscale) change the image only.

    Args:
        size: Output side S in pixels (square).
        scale: Range of the crop area as a fraction of the frame area (a list is accepted, as Hydra gives).
        ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        flip_prob: Probability of a horizontal flip.
        brightness: Brightness factor drawn from ``[max(0, 1 - brightness), 1 + brightness]``.
        contrast: Contrast factor drawn from ``[max(0, 1 - contrast), 1 + contrast]``.
        saturation: Saturation factor drawn from ``[max(0, 1 - saturation), 1 + saturation]``.
        hue: Hue shift drawn from ``[-hue, hue]`` (at most 0.5).
        grayscale_prob: Probability of converting the image to grayscale.
        grayscale: Always feed a grayscale image (Ren & Lee: colour must not be a shortcut between domains).
        train: ``False`` gives evaluation input: a centred square crop of side ``min(H, W)`` resized to S, no
            flip, no jitter, no randomness (``grayscale=True`` still applies).
    """

    size: int = 64
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.05
    grayscale_prob: float = 0.2
    grayscale: bool = False
    train: bool = True

    def __post_init__(self):
        self.scale = tuple(float(s) for s in self.scale)
        self.ratio = tuple(float(r) for r in self.ratio)
        if self.size <= 0:
            raise ValueError(f"size must be positive, got {self.size}")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {self.scale}")
        if len(self.ratio) != 2 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must be (min, max) with 0 < min <= max, got {self.ratio}")
        for name in ("flip_prob", "grayscale_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {self.hue}")

    def crop_params(self, height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, ...]:
        """Crop window ``(top, left, h, w)`` in pixels.

        Training: the algorithm of ``torchvision.transforms.RandomResizedCrop.get_params`` (10 tries, then a
        centre crop), with every draw from ``generator``. Evaluation (or no generator): centred square crop.
        """
        if self.train and generator is not None:
            area = height * width
            log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
            for _ in range(10):
                target_area = area * _uniform(generator, *self.scale)
                aspect = math.exp(_uniform(generator, *log_ratio))
                w = round(math.sqrt(target_area * aspect))
                h = round(math.sqrt(target_area / aspect))
                if 0 < w <= width and 0 < h <= height:
                    top = int(torch.randint(0, height - h + 1, (), generator=generator))
                    left = int(torch.randint(0, width - w + 1, (), generator=generator))
                    return top, left, h, w
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                w, h = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                w, h = round(height * self.ratio[1]), height
            else:
                w, h = width, height
        else:
            w = h = min(height, width)
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, frame: dict, generator: torch.Generator) -> dict[str, Tensor]:
        """Augment one frame.

        Args:
            frame: A frame as returned by :func:`synth.frames.read_frame` (numpy arrays of shape (H, W, ...)).
            generator: Source of every random draw (unused when ``train=False``).

        Returns:
            Tensors of one sample, S = ``size``, N = boxes kept:

            * ``image`` (3, S, S) float32, normalised with the ImageNet mean/std.
            * ``depth`` (1, S, S) float32 metres, 0 = no surface; ``valid`` (1, S, S) bool, ``depth > 0``.
            * ``normals`` (3, S, S) float32 unit vectors in the (possibly mirrored) OpenCV camera frame.
            * ``contours`` (1, S, S) float32 in {0, 1}.
            * ``instances`` (S, S) int64 instance ids.
            * ``boxes`` (N, 4) float32 xyxy pixels; ``box_categories`` (N,) int64; ``box_instances`` (N,) int64.
            * ``cam_K`` (3, 3) float32 intrinsics of the output image (crop, resize and flip applied).
            * ``frame_id`` () int64.
        """
        colors = np.asarray(frame["colors"])
        height, width = colors.shape[:2]
        size = [self.size, self.size]
        top, left, h, w = self.crop_params(height, width, generator)
        sx, sy = self.size / w, self.size / h

        image = torch.from_numpy(np.ascontiguousarray(colors)).permute(2, 0, 1).float().div_(255.0)
        image = TF.resized_crop(image, top, left, h, w, size, interpolation=InterpolationMode.BILINEAR,
                                antialias=True).clamp_(0.0, 1.0)
        # One nearest-neighbour pass over all labels so they are sampled at exactly the same source pixels.
        # float64 holds float32 depth/normals and int32 instance ids exactly (float32 would round ids > 2**24).
        labels = torch.cat([
            torch.from_numpy(np.asarray(frame["depth"], np.float64))[None],
            torch.from_numpy(np.asarray(frame["normals"], np.float64)).permute(2, 0, 1),
            torch.from_numpy(np.asarray(frame["contours"], np.float64))[None],
            torch.from_numpy(np.asarray(frame["instance_segmaps"], np.float64))[None],
        ])
        labels = TF.resized_crop(labels, top, left, h, w, size, interpolation=InterpolationMode.NEAREST_EXACT,
                                 antialias=False)

        K = torch.as_tensor(np.asarray(frame["cam_K"]), dtype=torch.float64).clone()
        # Pixel-edge coordinates (centre of pixel u at u + 0.5) make crop a shift and resize a pure scale.
        K[0, 2] = (K[0, 2] - left) * sx
        K[1, 2] = (K[1, 2] - top) * sy
        K[0, :2] *= sx
        K[1, :2] *= sy

        boxes = torch.as_tensor(np.asarray(frame["boxes"], np.float32)).reshape(-1, 4).double()
        boxes = (boxes - torch.tensor([left, top, left, top], dtype=torch.float64)) * torch.tensor([sx, sy, sx, sy])
        box_categories = torch.as_tensor(np.asarray(frame["box_category_ids"]), dtype=torch.int64).reshape(-1)
        box_instances = torch.as_tensor(np.asarray(frame["box_instance_ids"]), dtype=torch.int64).reshape(-1)

        flip = self.train and _uniform(generator, 0.0, 1.0) < self.flip_prob
        if flip:
            image, labels = TF.hflip(image), TF.hflip(labels)
            labels[1] = -labels[1]  # mirrored camera: x axis reversed
            K[0, 2] = self.size - K[0, 2]
            boxes = torch.stack([self.size - boxes[:, 2], boxes[:, 1], self.size - boxes[:, 0], boxes[:, 3]], 1)

        boxes = boxes.clamp(0.0, float(self.size))
        # Nearest-exact output pixel j shows the object iff its centre j + 0.5 lies in [x1, x2): keep a box iff
        # some pixel centre does, which is exactly "some pixel of the object survived the crop".
        first = torch.ceil(boxes - 0.5)
        keep = (first[:, 0] < first[:, 2]) & (first[:, 1] < first[:, 3])

        image = self._photometric(image, generator)
        depth = labels[0:1].float()
        return {
            "image": TF.normalize(image, list(IMAGENET_MEAN), list(IMAGENET_STD)),
            "depth": depth,
            "normals": labels[1:4].float(),
            "contours": labels[4:5].float(),
            "valid": depth > 0,
            "instances": labels[5].long(),  # exact integers in float64
            "boxes": boxes[keep].float(),
            "box_categories": box_categories[keep],
            "box_instances": box_instances[keep],
            "cam_K": K.float(),
            "frame_id": torch.tensor(int(frame["attrs"]["frame_id"]), dtype=torch.int64),
        }

    def _photometric(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Colour jitter and grayscale on a (3, S, S) float image in [0, 1]."""
        if self.train:
            # Draw every parameter whether used or not, so the number of draws per sample is fixed.
            order = torch.randperm(4, generator=generator).tolist()
            factors = [_uniform(generator, max(0.0, 1 - s), 1 + s)
                       for s in (self.brightness, self.contrast, self.saturation)]
            hue = _uniform(generator, -self.hue, self.hue)
            to_gray = _uniform(generator, 0.0, 1.0) < self.grayscale_prob
            ops = [(TF.adjust_brightness, factors[0], self.brightness), (TF.adjust_contrast, factors[1], self.contrast),
                   (TF.adjust_saturation, factors[2], self.saturation), (TF.adjust_hue, hue, self.hue)]
            for i in order:
                op, value, strength = ops[i]
                if strength > 0:
                    image = op(image, value)
        else:
            to_gray = False
        if to_gray or self.grayscale:
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        # Not in place: the 3-channel grayscale is an expanded view of one channel.
        return image.clamp(0.0, 1.0)


def _as_roots(roots: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(roots, str | os.PathLike):
        roots = [roots]
    roots = [Path(r) for r in roots]
    if not roots:
        raise ValueError("no dataset folder given")
    return roots


def _scan(roots: list[Path]) -> list[tuple[Path, dict]]:
    """(shard folder, index record) of every complete frame in ``roots``, folder by folder in frame-id order."""
    return [item for root in roots for item in list_frames(root)]


def held_out_scene(scene_seed: int, holdout: float) -> bool:
    """Whether the scene of ``scene_seed`` is held out for a ``holdout`` fraction: a hash of the seed, so a scene
    lands wholly on one side, the same side as the dataset grows (streaming) and wherever the folder lives."""
    return zlib.crc32(str(scene_seed).encode()) / 2**32 < holdout


class IndexScanner:
    """Complete frames of dataset folders that may still be growing, re-reading only the shard indexes that
    changed since the last scan (their size and mtime), so scanning every few seconds stays cheap.

    Args:
        roots: Dataset folders (they may not exist yet).
        holdout: Fraction of scenes held out (:func:`held_out_scene`).
        side: ``"train"`` (scenes not held out) or ``"held_out"``.
    """

    def __init__(self, roots: list[Path], *, holdout: float = 0.0, side: str = "train"):
        if side not in ("train", "held_out") or not 0 <= holdout < 1:
            raise ValueError(f"need side train or held_out and 0 <= holdout < 1, got {side!r} and {holdout}")
        self.roots, self.holdout, self.side = roots, holdout, side
        self._shards: dict[Path, tuple[tuple[int, int], list[tuple[Path, dict]]]] = {}

    def scan(self) -> list[tuple[Path, dict]]:
        """(shard folder, record) of the frames of this side, folder by folder in frame-id order."""
        frames = []
        for root in self.roots:
            in_root = []
            for shard in sorted(Path(root).glob("shard_*")):
                index = shard / "index.jsonl"
                try:
                    stat = index.stat()
                except OSError:
                    continue
                key = (stat.st_size, stat.st_mtime_ns)
                cached = self._shards.get(shard)
                if cached is None or cached[0] != key:
                    records = [(shard, r) for r in read_index(shard)
                               if held_out_scene(r["scene_seed"], self.holdout) == (self.side == "held_out")]
                    self._shards[shard] = cached = (key, records)
                in_root.extend(cached[1])
            frames.extend(sorted(in_root, key=lambda item: item[1]["frame_id"]))
        return frames


class CorruptSample(str):
    """What a dataset returns for a corrupt frame instead of a sample: the frame's file path (a ``str``), so the
    batch can say which files were skipped (:func:`collate_frames`)."""


#: (file, index checksum) of corrupt frames already reported by this process: one warning per file, not per read.
_REPORTED: set[tuple[str, str]] = set()


def _load(shard_dir: Path, record: dict, verify: bool) -> dict | CorruptSample:
    """Read one frame; a corrupt one is logged once per process (naming the file) and gives its path as a
    :class:`CorruptSample`."""
    path = shard_dir / record["file"]
    try:
        if verify and sha256(path) != record["sha256"]:
            raise CorruptFrameError(f"{path}: checksum mismatch with {shard_dir / 'index.jsonl'}")
        return read_frame(path)
    except (CorruptFrameError, OSError) as error:
        key = (str(path), str(record.get("sha256")))
        if key not in _REPORTED:
            _REPORTED.add(key)
            reason = str(error).removeprefix(f"{path}: ")  # the reader's message already starts with the path
            logger.warning("skipping corrupt frame %s: %s (reported once; a rerun of synth render repairs it)",
                           path, reason)
        return CorruptSample(path)


class FramePool(torch.utils.data.Dataset):
    """What every fixed pool of rendered frames shares: ``frames`` (shard folder, index record) in order, an
    ``augment``, views restricted to some indices, and each frame's file."""

    frames: list[tuple[Path, dict]]
    augment: "FrameAugment"

    def __len__(self) -> int:
        return len(self.frames)

    def subset(self, indices: Sequence[int], augment: "FrameAugment | None" = None) -> "FramePool":
        """The same dataset restricted to ``indices`` (e.g. a train/held-out split), re-indexed from 0.

        Use this rather than ``torch.utils.data.Subset``, which only accepts plain int keys and so breaks on the
        ``(index, sample_seed)`` keys of :class:`StepSampler`.
        """
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.frames = [self.frames[i] for i in indices]
        if augment is not None:  # e.g. the held-out side of a split, without augmentation
            view.augment = augment
        if not view.frames:
            raise ValueError("empty subset")
        view._restrict(indices)
        return view

    def _restrict(self, indices: Sequence[int]) -> None:
        """Hook for subclasses keeping per-frame state beside ``frames`` (called on the new view)."""

    def path(self, index: int) -> Path:
        """File of frame ``index`` (its HDF5 frame)."""
        shard_dir, record = self.frames[index]
        return shard_dir / record["file"]


class RenderedFrames(FramePool):
    """Fixed pool: the complete frames of one or more dataset folders at construction time (reproducible).

    Frames are ordered folder by folder, then by frame id. Frames rendered later are not seen: rebuild the
    dataset, or use :class:`StreamingFrames`.

    Args:
        roots: Dataset folder(s) written by ``synth render``.
        augment: Turns a frame into tensors.
        seed: Seed of the per-sample augmentation when indexing with a plain int (must be >= 0).
        verify: Check each frame's SHA-256 against the shard index before reading it (slower).

    Raises:
        ValueError: no complete frame in any of ``roots``.
    """

    def __init__(self, roots: str | list[str], *, augment: FrameAugment, seed: int = 0, verify: bool = False):
        self.roots = _as_roots(roots)
        self.augment = augment
        self.seed = seed
        self.verify = verify
        self.frames = _scan(self.roots)
        if not self.frames:
            raise ValueError(f"no complete frames in {', '.join(map(str, self.roots))}")

    def __getitem__(self, key: int | tuple[int, int]) -> dict | CorruptSample:
        """One augmented sample.

        Args:
            key: ``index``, or ``(index, sample_seed)``. The augmentation draws from
                ``torch.Generator().manual_seed(sample_seed)``, so a key always gives the same tensors, in any
                process or worker. A plain index uses a sample seed derived from ``(seed, index)``.

        Returns:
            The output of :class:`FrameAugment` plus ``seed`` (0-dim int64, the sample seed, from which objectives
            draw their own randomness), or a :class:`CorruptSample` (the file's path) when the frame is corrupt (a
            warning names the file, once).
        """
        if isinstance(key, tuple | list):
            index, sample_seed = key
        else:
            index, sample_seed = key, None
        index = range(len(self.frames))[int(index)]  # negative indices and IndexError as for a list
        if sample_seed is None:
            sample_seed = _derive_seed(self.seed, index)
        frame = _load(*self.frames[index], self.verify)
        if isinstance(frame, CorruptSample):
            return frame
        return {**self.augment(frame, torch.Generator().manual_seed(int(sample_seed))),
                "seed": torch.tensor(int(sample_seed), dtype=torch.int64)}


def _distributed_rank() -> tuple[int, int]:
    """(rank, world size): from the process group when it exists, else from torchrun's environment (datasets are
    built before the engine joins the group, and DataLoader workers have no group), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class LiveFrames(RenderedFrames):
    """One side of the scene split of dataset folders that may still be growing: a map-style dataset over the frames
    of that side complete at the last :meth:`refresh` (the engine refreshes held-out data before each evaluation).
    May be empty. The held-out side is what :class:`StreamingFrames` leaves out of training.

    Args:
        roots: Dataset folders (they may not exist yet).
        augment: Turns a frame into tensors (normally without augmentation).
        holdout: Fraction of scenes held out (:func:`held_out_scene`).
        side: ``"held_out"`` or ``"train"``.
        seed: Seed of the per-sample augmentation of plain int keys.
    """

    def __init__(self, roots, *, augment: FrameAugment, holdout: float, side: str = "held_out", seed: int = 0):
        self.roots = _as_roots(roots)
        self.augment = augment
        self.seed = seed
        self.verify = False
        self._scanner = IndexScanner(self.roots, holdout=holdout, side=side)
        self.frames = self._scanner.scan()

    def refresh(self) -> int:
        """Re-scan the folders; returns how many frames this side has now."""
        self.frames = self._scanner.scan()
        return len(self.frames)


class StreamingFrames(torch.utils.data.IterableDataset):
    """Unlimited-data mode: train on a dataset that ``synth render`` is still writing.

    The folders are re-scanned every ``refresh_s`` seconds (only shard indexes that changed are re-read), so a
    shard's new frames are drawn from within seconds of being indexed. A draw takes, with probability
    ``fresh_fraction``, the next frame this stream has not used yet (new frames in a random order, the newest
    scan's frames queued behind the older ones), otherwise a frame uniformly from all the training frames complete so
    far: early frames are not over-used while rendering catches up, and every frame keeps being revisited.

    Scenes are split as the fixed pool splits them (:func:`held_out_scene`): the held-out ``holdout`` fraction never
    enters the stream (:class:`LiveFrames` reads them for evaluation).

    Before the first frame exists the stream waits, scanning every ``wait_s`` seconds and logging a warning every
    30 s. When rendering ends the stream goes on drawing from every frame rendered (uniformly once all are used):
    training stops at ``trainer.steps``, never for lack of new frames. A stream is not reproducible (it depends on
    when frames land); use the fixed pool for exact resumption.

    Every DataLoader worker of every DDP rank runs its own endless stream, seeded from
    ``(seed, world_size, rank, num_workers, worker)``, so streams differ without coordination. A corrupt frame is
    logged once and skipped until its index record changes (a resumed render re-renders it with a new checksum).

    Args:
        roots: Dataset folder(s) written (or being written) by ``synth render``; they may not exist yet.
        augment: Turns a frame into tensors.
        seed: Seed of the streams (must be >= 0).
        holdout: Fraction of scenes held out of training (``data.holdout``).
        refresh_s: Seconds between two scans of the folders (``data.refresh_s``).
        fresh_fraction: Probability that a draw takes a frame not used yet by this stream, when there is one.
        wait_s: Polling interval while no frame is available.
        rank: DDP rank (default: from ``torch.distributed`` or torchrun's ``RANK``, else 0).
        world_size: DDP world size (default as for ``rank``).
        clock: Seconds since some fixed point (tests pass a fake one).
    """

    def __init__(self, roots, *, augment: FrameAugment, seed: int = 0, holdout: float = 0.0, refresh_s: float = 2.0,
                 fresh_fraction: float = 0.5, wait_s: float = 1.0, rank: int | None = None,
                 world_size: int | None = None, clock=time.monotonic):
        super().__init__()
        self.roots = _as_roots(roots)
        self.augment = augment
        self.seed = seed
        if refresh_s <= 0 or wait_s <= 0:
            raise ValueError(f"refresh_s and wait_s must be positive, got {refresh_s} and {wait_s}")
        if not 0 <= fresh_fraction <= 1 or not 0 <= holdout < 1:
            raise ValueError(f"need 0 <= fresh_fraction <= 1 and 0 <= holdout < 1, got {fresh_fraction} and {holdout}")
        self.holdout = holdout
        self.refresh_s = refresh_s
        self.fresh_fraction = fresh_fraction
        self.wait_s = wait_s
        self.clock = clock
        # Resolved here, in the main process: DataLoader workers started with spawn have no process group.
        default_rank, default_world = _distributed_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={self.rank}, world_size={self.world_size}")

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rng = np.random.default_rng([self.seed, self.world_size, self.rank, num_workers, worker])
        scanner = IndexScanner(self.roots, holdout=self.holdout, side="train")
        bad: set[tuple[str, str]] = set()  # (file, sha256) of frames found corrupt
        frames: list[tuple[Path, dict]] = []
        known: set[tuple[str, str]] = set()  # (file, sha256) of every frame this stream has queued
        fresh: list[tuple[Path, dict]] = []  # frames not used yet, next one last
        last_scan = -math.inf
        waiting_since, warned_at = None, -math.inf
        while True:
            now = self.clock()
            if now - last_scan >= self.refresh_s or not frames:
                last_scan = now
                frames = [f for f in scanner.scan() if (str(f[0] / f[1]["file"]), f[1]["sha256"]) not in bad]
                new = [f for f in frames if (str(f[0] / f[1]["file"]), f[1]["sha256"]) not in known]
                if new:
                    known.update((str(f[0] / f[1]["file"]), f[1]["sha256"]) for f in new)
                    order = rng.permutation(len(new))
                    fresh = [new[i] for i in order[::-1]] + fresh  # popped from the end: older scans first
                if not frames:
                    waiting_since = now if waiting_since is None else waiting_since
                    if now - warned_at >= 30.0:
                        logger.warning("waiting for rendered frames in %s (none complete yet, %.0f s so far; "
                                       "start `synth render out_dir=...` or check data.roots)",
                                       ", ".join(map(str, self.roots)), now - waiting_since)
                        warned_at = now
                    time.sleep(self.wait_s)
                    continue
                if waiting_since is not None:
                    logger.warning("first rendered frames found after %.0f s: training starts",
                                   now - waiting_since)
                    waiting_since = None
            take_fresh = bool(fresh) and rng.random() < self.fresh_fraction
            if take_fresh:
                shard_dir, record = fresh.pop()
            else:
                shard_dir, record = frames[int(rng.integers(len(frames)))]
            sample_seed = int(rng.integers(2**63))
            frame = _load(shard_dir, record, verify=False)
            if isinstance(frame, CorruptSample):
                bad.add((str(shard_dir / record["file"]), record["sha256"]))
                frames = [f for f in frames if f[1] is not record]
                continue
            yield {**self.augment(frame, torch.Generator().manual_seed(sample_seed)),
                   "seed": torch.tensor(sample_seed, dtype=torch.int64)}


class StepSampler(torch.utils.data.Sampler):
    """Deterministic, resumable index stream for map-style datasets: yields (index, sample_seed) for global
    sample positions start, start+1, ...; the order is a fresh permutation per epoch drawn from
    numpy.random.default_rng([seed, epoch]); under DDP each rank takes a disjoint interleaved share
    (position % world_size == rank) of every global batch. start_step * global_batch_size skips what a resumed
    run already consumed, without iterating over it.

    Global position ``p`` is sample ``p % n`` of epoch ``p // n``. From the epoch's generator, the permutation
    is drawn first, then one sample seed per position, so a frame seen in two epochs is augmented differently.
    The iterator is infinite: training runs by steps, not epochs. Use with
    ``DataLoader(dataset, sampler=..., batch_size=batch_size, collate_fn=collate_frames)``.

    Args:
        n: Dataset size.
        seed: Seed of the order and of the sample seeds (>= 0).
        batch_size: Per-rank batch size B; a global batch is ``B * world_size`` positions.
        start_step: Optimizer steps already taken; the stream starts at position ``start_step * B * world_size``.
        rank: This process's DDP rank.
        world_size: Number of DDP ranks.
    """

    def __init__(self, n: int, *, seed: int, batch_size: int, start_step: int = 0, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        if n <= 0 or batch_size <= 0 or start_step < 0:
            raise ValueError(f"need n > 0, batch_size > 0, start_step >= 0; got {n}, {batch_size}, {start_step}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.n, self.seed, self.batch_size = n, seed, batch_size
        self.start_step, self.rank, self.world_size = start_step, rank, world_size

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(n,) indices and (n,) sample seeds of one epoch, by position within the epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)
        seeds = rng.integers(0, 2**63, size=self.n, dtype=np.int64)
        return order, seeds

    def __iter__(self) -> Iterator[tuple[int, int]]:
        position = self.start_step * self.batch_size * self.world_size + self.rank
        epoch, cached = -1, None
        while True:
            if position // self.n != epoch:
                epoch = position // self.n
                cached = self.epoch(epoch)
            offset = position % self.n
            yield int(cached[0][offset]), int(cached[1][offset])
            position += self.world_size


def collate_frames(samples: list[dict | CorruptSample | None]) -> dict:
    """Stack fixed-size fields; keep boxes/box_categories as lists; drop None (corrupt) samples and report how
    many were dropped as batch['n_corrupt'] (int).

    Args:
        samples: Outputs of :class:`FrameAugment`, or a :class:`CorruptSample` (or None) for corrupt frames.

    Returns:
        ``image`` (B, 3, S, S), ``depth`` (B, 1, S, S), ..., ``frame_id`` (B,) stacked over the B good samples;
        ``boxes``, ``box_categories`` and ``box_instances`` as lists of B tensors; ``n_corrupt`` (samples dropped)
        and, when a dropped sample named its file, ``corrupt_files`` (those paths). When every sample is corrupt
        the batch holds only those keys.
    """
    if isinstance(samples, dict):  # already a batch: a dataset's ``__getitems__`` (synth.packed.PackedFrames)
        return samples
    good = [s for s in samples if isinstance(s, dict)]
    batch: dict = {"n_corrupt": len(samples) - len(good)}
    files = [str(s) for s in samples if isinstance(s, CorruptSample)]
    if files:
        batch["corrupt_files"] = files
    if not good:
        return batch
    for key in good[0]:
        values = [s[key] for s in good]
        batch[key] = values if key in LIST_FIELDS else torch.stack(values)
    return batch
