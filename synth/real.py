"""Real, unlabelled images for pretraining, read from files that installed packages already ship (no download).

Ren & Lee (CVPR 2018) pair rendered images with real, unlabelled ones: the real side feeds self-supervised and
domain-adaptation objectives. This module turns image folders, single images, videos, the sample photographs
shipped by the Debian package ``opencv-doc`` and by scikit-image (:func:`offline_real_sources`), and
Fashion-MNIST (Debian package ``dataset-fashion-mnist``) into :class:`RealImages`, a map-style dataset keyed like
:class:`synth.data.RenderedFrames`, so :class:`synth.data.StepSampler` and :func:`synth.data.collate_frames`
drive it the same way.

Bad input is reported, not silently used: :func:`read_image` raises :class:`CorruptImageError` naming the file,
and :class:`RealImages` logs each unreadable file by name, skips it and counts it in ``n_unreadable``.
"""

import gzip
import importlib.util
import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from synth.constants import IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, OPENCV_DATA, VIDEO_EXTENSIONS
from synth.data import FrameAugment, _derive_seed

logger = logging.getLogger(__name__)

#: Real photographs among the OpenCV samples, chosen by looking at every file. Left out: logos, drawings, renders
#: (Blender_Suzanne*), charts, text and documents, synthetic shapes, masks, a disparity map, a painting
#: (starry_night) and deliberately degraded pictures (motion/defocus blur demos). Of each near-duplicate pair
#: (stereo or homography pairs: aero1/3, aloeL/R, basketball1/2, graf1/3, leuvenA/B, rubberwhale1/2, left/right,
#: ela_original/modified) one view is kept, and one of the 26 nearly identical chessboard calibration shots
#: (left01..14, right01..14), so no scene dominates the small pool.
OPENCV_PHOTOS = (
    "aero1.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png", "board.jpg", "box.png",
    "box_in_scene.png", "building.jpg", "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg",
    "graf1.png", "home.jpg", "leuvenA.jpg", "left.jpg", "left01.jpg", "messi5.jpg", "orange.jpg",
    "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg", "stuff.jpg",
)

#: Real videos among the OpenCV samples (Megamind.avi is an animated film). tree.avi's header claims 444 frames
#: but OpenCV decodes 68.
OPENCV_VIDEOS = ("vtest.avi", "tree.avi")

#: Real photographs bundled in scikit-image's wheel (``skimage/data``; the others are fetched from the network
#: on first use). Left out: drawings, logos, charts, text pages, the Shepp-Logan phantom, a colour wheel, a
#: silhouette, a synthetically blurred clock, the right view of the motorcycle stereo pair, and two
#: near-featureless microscopy crops (cell, microaneurysms).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png", "grass.png",
    "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png", "retina.jpg",
    "rocket.jpg",
)

#: Real photographs among the Debian wallpaper packages, chosen by looking at every file (the packages also hold
#: renders, gradients, logos and illustrations, left out). High resolution (1280x1024 up to 5k px): cut into tiles
#: (``RealImages(tiles=...)``) they give hundreds of distinct real crops. Package -> (folder, files); for Plasma
#: each name is a wallpaper folder whose largest image is used. Licences per file: lomiri CC-BY/CC-BY-SA/CC0, MATE
#: GPL-2+, Plasma LGPL-3/GPL-2+ (see each package's copyright file).
WALLPAPER_PHOTOS: dict[str, tuple[str, tuple[str, ...]]] = {
    "lomiri-wallpapers-16.04": ("/usr/share/backgrounds", (
        "Bridge_by_Sander_Klootwijk.jpg", "Dragonfly_by_Bolly.jpg", "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg", "Wine_by_Jakkub_Mede.jpg", "aitzgorri_by_Aitzol_Berasategi.jpg",
        "friends_by_Aitzol_Berasategi.jpg", "life_by_Aitzol_Berasategi.jpg", "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg", "sunset_by_Aitzol_Berasategi.jpg")),
    "mate-backgrounds": ("/usr/share/backgrounds/mate/nature", (
        "Aqua.jpg", "Blinds.jpg", "Dune.jpg", "FreshFlower.jpg", "Garden.jpg", "GreenMeadow.jpg", "LadyBird.jpg",
        "RainDrops.jpg", "Storm.jpg", "TwoWings.jpg", "Wood.jpg", "YellowFlower.jpg")),
    "plasma-workspace-wallpapers": ("/usr/share/wallpapers", (
        "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow", "FallenLeaf", "Grey", "Kite",
        "OneStandsOut", "Path", "summer_1am")),
}

#: Fashion-MNIST as installed by the Debian package ``dataset-fashion-mnist``.
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class CorruptImageError(ValueError):
    """An image or video file exists but cannot be decoded."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file with OpenCV.

    Grey images are replicated to three channels, an alpha channel is dropped, 16-bit images are scaled to 8 bits.

    Args:
        path: An image file in a format OpenCV reads (JPEG, PNG, WebP, BMP, ...).

    Returns:
        (H, W, 3) uint8 RGB.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptImageError: the file cannot be decoded (garbage, truncated, unsupported); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    # imdecode on the bytes, not imread on the path: imread cannot tell a missing file from a corrupt one.
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise CorruptImageError(f"{path}: cannot decode image ({data.size} bytes; corrupt, truncated or not an image)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _iter_video(path: str | Path, every: int, max_frames: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, (H, W, 3) uint8 RGB) of every ``every``-th frame, decoding only those (others are grabbed)."""
    path = Path(path)
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise CorruptImageError(f"{path}: OpenCV cannot open this video (corrupt or unsupported codec)")
        index = kept = 0
        # The header's frame count is unreliable (tree.avi claims 444 frames, 68 decode): read until failure.
        while max_frames is None or kept < max_frames:
            if not capture.grab():
                break
            if index % every == 0:
                ok, bgr = capture.retrieve()
                if not ok:
                    break
                yield index, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
                kept += 1
            index += 1
        if kept == 0:
            raise CorruptImageError(f"{path}: no frame could be decoded")
    finally:
        capture.release()


def video_frames(path: str | Path, every: int = 10, max_frames: int | None = None) -> list[np.ndarray]:
    """Decode frames 0, ``every``, 2 ``every``, ... of a video with ``cv2.VideoCapture``.

    Args:
        path: A video file OpenCV's backends read (AVI, MP4, ...).
        every: Keep one frame in ``every``.
        max_frames: Stop after this many kept frames (None: read to the end).

    Returns:
        A list of (H, W, 3) uint8 RGB frames.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptImageError: the video cannot be opened or yields no frame; the message names the file.
    """
    return [frame for _, frame in _iter_video(path, every, max_frames)]


def _read_idx(path: Path) -> np.ndarray:
    """An array from a gzipped IDX file (the MNIST format: zero, zero, type code, rank, big-endian int32 dims)."""
    with gzip.open(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise CorruptImageError(f"{path}: not an unsigned-byte IDX file")
    rank = data[3]
    dims = np.frombuffer(data, dtype=">i4", count=rank, offset=4).astype(int)
    offset = 4 + 4 * rank
    if len(data) - offset != int(np.prod(dims)):
        raise CorruptImageError(f"{path}: {len(data) - offset} bytes of data for shape {tuple(dims)}")
    # A copy: arrays over the read-only bytes would become non-writable tensors.
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


def fashion_mnist(split: str = "train", root: str = FASHION_MNIST_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from the IDX files of the Debian package.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (10 000, the ``t10k`` files).
        root: Folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
        ``images`` (N, 28, 28) uint8 and ``labels`` (N,) int64 in [0, 10).

    Raises:
        ValueError: unknown ``split``.
        FileNotFoundError: a file is missing (the message names it and the package to install).
    """
    prefixes = {"train": "train", "test": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    paths = [Path(root) / f"{prefixes[split]}-{kind}-ubyte.gz" for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Fashion-MNIST file missing; install the Debian package "
                                    f"dataset-fashion-mnist (or pass root= the folder holding the files)")
    images, labels = (_read_idx(path) for path in paths)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise CorruptImageError(f"{paths[0]}: images {images.shape} do not match labels {labels.shape}")
    return images, labels.astype(np.int64)


def offline_real_sources() -> list[str]:
    """The real photographs and videos that installed packages ship on this machine, as file paths.

    A curated whitelist (see :data:`OPENCV_PHOTOS`, :data:`OPENCV_VIDEOS`, :data:`SKIMAGE_PHOTOS`): photographs
    only, no logos, drawings, renders, charts or text. Missing packages or files are skipped with one warning.

    Raises:
        FileNotFoundError: none of the files is installed (names the packages to install).
    """
    wanted = [OPENCV_DATA / name for name in (*OPENCV_PHOTOS, *OPENCV_VIDEOS)]
    spec = importlib.util.find_spec("skimage")
    if spec is not None and spec.origin is not None:
        # The wheel's data folder, located without importing scikit-image (and without its network fetcher).
        wanted += [Path(spec.origin).parent / "data" / name for name in SKIMAGE_PHOTOS]
    found = [str(path) for path in wanted if path.is_file()]
    missing = len(wanted) - len(found) + (len(SKIMAGE_PHOTOS) if spec is None else 0)
    if not found:
        raise FileNotFoundError(f"no offline real photographs found: install the Debian package opencv-doc "
                                f"(photos and videos in {OPENCV_DATA}) and/or the Python package scikit-image")
    if missing:
        logger.warning("offline real sources: %d whitelisted files missing (packages opencv-doc, scikit-image), "
                       "using the %d found", missing, len(found))
    return found


def wallpaper_photos() -> list[str]:
    """The photographs of :data:`WALLPAPER_PHOTOS` installed on this machine, as file paths.

    Raises:
        FileNotFoundError: none is installed (names the Debian packages to install).
    """
    found = []
    for folder, names in WALLPAPER_PHOTOS.values():
        for name in names:
            path = Path(folder) / name
            if path.suffix:
                found += [str(path)] if path.is_file() else []
            else:  # a Plasma wallpaper folder: its largest image
                images = sorted((path / "contents" / "images").glob("*"), key=lambda p: p.stat().st_size)
                found += [str(images[-1])] if images else []
    if not found:
        raise FileNotFoundError(f"no wallpaper photographs found: install the Debian packages "
                                f"{' '.join(WALLPAPER_PHOTOS)}")
    wanted = sum(len(names) for _, names in WALLPAPER_PHOTOS.values())
    if len(found) < wanted:
        logger.warning("wallpaper photographs: %d of %d installed (packages %s)", len(found), wanted,
                       ", ".join(WALLPAPER_PHOTOS))
    return found


def tile_image(image: np.ndarray, tiles: int) -> list[tuple[str, np.ndarray]]:
    """Cut ``image`` into square, non-overlapping tiles, ``tiles`` across its short side (as many as fit along the
    long side, the grid centred). ``tiles=1`` returns the whole image.

    Returns:
        ``(suffix, tile)`` pairs, the suffix ``"#tile<row>,<col>"`` (empty for ``tiles=1``).
    """
    if tiles <= 1:
        return [("", image)]
    height, width = image.shape[:2]
    side = min(height, width) // tiles
    rows, cols = height // side, width // side
    top, left = (height - rows * side) // 2, (width - cols * side) // 2
    return [(f"#tile{r},{c}", image[top + r * side: top + (r + 1) * side, left + c * side: left + (c + 1) * side])
            for r in range(rows) for c in range(cols)]


def _shrink(image: np.ndarray, max_short_side: int) -> np.ndarray:
    """Downscale (area interpolation) so the short side is at most ``max_short_side``; never upscale."""
    height, width = image.shape[:2]
    short = min(height, width)
    if short <= max_short_side:
        return image
    scale = max_short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


class RealImages(torch.utils.data.Dataset):
    """Real, unlabelled images as augmented, ImageNet-normalised crops (the real domain of Ren & Lee 2018).

    Every source is decoded once at construction and kept in memory as uint8, downscaled so its short side is at
    most ``max(cache_side, 2 * size)``. A sample is a random resized crop (the algorithm of
    ``torchvision.transforms.RandomResizedCrop``, via :meth:`synth.data.FrameAugment.crop_params`) of area
    fraction in ``scale`` and aspect ratio in [3/4, 4/3], resized bilinearly with antialiasing to ``size``, then a
    horizontal flip with probability 1/2. With ``train=False`` it is the centred square crop, no flip.

    Items are ordered source by source; within a folder by path; within a video by frame. Each item has a name:
    its file path, with ``#k`` appended for frame ``k`` of a video or image ``k`` of Fashion-MNIST.

    Args:
        sources: Each entry is an image folder (searched recursively for .jpg/.jpeg/.png/.webp/.bmp), an image
            file, a video file (.avi/.mp4/.mkv/.mov; every ``video_every``-th frame), ``"offline"`` (the files of
            :func:`offline_real_sources`), ``"wallpapers"`` (the photographs of :func:`wallpaper_photos`) or
            ``"fashion_mnist"`` (the 60 000 training images, 28x28 grey as RGB).
        size: Output side S in pixels.
        video_every: Keep one video frame in this many.
        max_images: Keep this many items, a deterministic subsample chosen by a hash of ``(seed, name)`` before
            decoding (None: all).
        scale: Range of the crop area as a fraction of the image area.
        flip: Random horizontal flips in training mode.
        train: ``False`` gives evaluation input: centred square crop, no flip, no randomness.
        seed: Seed of the per-sample augmentation when indexing with a plain int, and of ``max_images``.
        cache_side: Short side kept in memory is at most ``max(cache_side, 2 * size)``; 0 means ``2 * size``.
        tiles: Cut every still image into square tiles, this many across its short side (see :func:`tile_image`),
            each an item of its own: a 16:9 photo with ``tiles=4`` gives 28 crops at four times the detail of the
            whole image. 1 keeps whole images. Videos are not tiled (their frames are many already).

    Attributes:
        names: Name of each item.
        n_unreadable: Files (images or videos) that could not be decoded; each was logged by name and skipped.

    Raises:
        FileNotFoundError: a source path does not exist.
        ValueError: a source is neither a folder, an image, a video nor a keyword; or no image could be read.

    Shape:
        - ``image``: :math:`(3, S, S)` float32, ImageNet-normalised.
        - ``seed``: :math:`()` int64, the sample seed the augmentation drew from.

    Examples:
        >>> dataset = RealImages(sources=["offline"], size=64)
        >>> sample = dataset[0, 1234]  # (index, sample_seed), as synth.data.StepSampler yields
        >>> sample["image"].shape, int(sample["seed"])
        (torch.Size([3, 64, 64]), 1234)
        >>> train_indices, held_indices = dataset.split(0.1)
        >>> held = dataset.subset(held_indices, train=False)
    """

    def __init__(self, sources: tuple[str, ...] = ("offline",), size: int = 64, video_every: int = 10,
                 max_images: int | None = None, scale: tuple[float, float] = (0.35, 1.0), flip: bool = True,
                 train: bool = True, seed: int = 0, cache_side: int = 0, tiles: int = 1):
        if isinstance(sources, str | Path):
            sources = [sources]
        self.sources = [str(s) for s in sources]
        if not self.sources:
            raise ValueError("sources is empty")
        if (size <= 0 or video_every < 1 or cache_side < 0 or tiles < 1
                or (max_images is not None and max_images < 1)):
            raise ValueError(f"need size > 0, video_every >= 1, cache_side >= 0, tiles >= 1, max_images >= 1 or "
                             f"None; got size={size}, video_every={video_every}, cache_side={cache_side}, "
                             f"tiles={tiles}, max_images={max_images}")
        self.tiles = tiles
        self.size, self.video_every, self.max_images = size, video_every, max_images
        self.flip, self.train, self.seed = flip, train, seed
        self.cache_side = max(cache_side, 2 * size)
        self._crop = FrameAugment(size=size, scale=tuple(scale), train=train)  # validates scale
        self.scale = self._crop.scale
        self.n_unreadable = 0
        self.names, self.images = self._load()
        if not self.images:
            raise ValueError(f"no readable image in sources {self.sources} ({self.n_unreadable} unreadable files)")

    def _load(self) -> tuple[list[str], list[np.ndarray]]:
        """Expand the sources, subsample, decode. Returns (names, images) of the readable items."""
        # (name, decoded image or path still to read). Videos are decoded here: their frame count is only known
        # by decoding them.
        items: list[tuple[str, np.ndarray | Path]] = []
        for source in self.sources:
            if source == "offline":
                paths = [Path(p) for p in offline_real_sources()]
            elif source == "wallpapers":
                paths = [Path(p) for p in wallpaper_photos()]
            elif source == "fashion_mnist":
                images, _ = fashion_mnist("train")
                items += [(f"{FASHION_MNIST_ROOT}/train-images-idx3-ubyte.gz#{i}", image)
                          for i, image in enumerate(images)]  # (28, 28) views, expanded to RGB per sample
                continue
            else:
                path = Path(source)
                if not path.exists():
                    raise FileNotFoundError(f"real image source {source!r}: no such file or folder")
                paths = [path]
            for path in paths:
                if path.is_dir():
                    found = _files_under(path)
                    if not found:
                        logger.warning("real image source %s: no %s file", path, "/".join(IMAGE_EXTENSIONS))
                    items += [(str(p), p) for p in found]
                elif path.suffix.lower() in IMAGE_EXTENSIONS:
                    items.append((str(path), path))
                elif path.suffix.lower() in VIDEO_EXTENSIONS:
                    items += self._video_items(path)
                else:
                    raise ValueError(f"real image source {str(path)!r}: not a folder, an image "
                                     f"({', '.join(IMAGE_EXTENSIONS)}) or a video ({', '.join(VIDEO_EXTENSIONS)})")
        if self.max_images is not None and len(items) > self.max_images:
            # A hash per name, not a permutation of positions: the choice of one item does not depend on the others.
            keys = [zlib.crc32(f"{self.seed}:{name}".encode()) for name, _ in items]
            keep = sorted(np.argsort(np.asarray(keys), kind="stable")[:self.max_images].tolist())
            items = [items[i] for i in keep]
        names, images = [], []
        for name, item in tqdm(items, desc="decoding real images", unit="img", disable=len(items) < 100):
            if isinstance(item, Path):
                try:
                    image = read_image(item)
                except (CorruptImageError, OSError) as error:
                    logger.warning("skipping unreadable image: %s", error)
                    self.n_unreadable += 1
                    continue
                for suffix, tile in tile_image(image, self.tiles):
                    names.append(name + suffix)
                    images.append(_shrink(tile, self.cache_side))
                continue
            names.append(name)
            images.append(item)
        return names, images

    def _video_items(self, path: Path) -> list[tuple[str, np.ndarray]]:
        try:
            return [(f"{path}#{index}", _shrink(frame, self.cache_side))
                    for index, frame in tqdm(_iter_video(path, self.video_every, None), desc=f"decoding {path.name}",
                                             unit="frame", leave=False)]
        except CorruptImageError as error:
            logger.warning("skipping unreadable video: %s", error)
            self.n_unreadable += 1
            return []

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int], train: bool | None = None) -> "RealImages":
        """The same dataset restricted to ``indices``, re-indexed from 0, sharing the decoded images.

        Use this rather than ``torch.utils.data.Subset``, which breaks on the ``(index, sample_seed)`` keys of
        :class:`synth.data.StepSampler`.

        Args:
            indices: Items to keep, in the order given.
            train: Switch to training (True) or evaluation (False) input; None keeps the current mode.

        Raises:
            ValueError: ``indices`` is empty.
        """
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.names = [self.names[i] for i in indices]
        view.images = [self.images[i] for i in indices]
        if train is not None:
            view.train = train
            view._crop = FrameAugment(size=self.size, scale=self.scale, train=train)
        if not view.images:
            raise ValueError("empty subset")
        return view

    def split(self, holdout: float) -> tuple[list[int], list[int]]:
        """Train and held-out indices, by a CRC-32 hash of each item's name (without its ``#tile`` suffix).

        The split of an item depends only on its name, so it is the same however the sources are ordered or
        subsampled. The tiles of one photo land on one side; frames of one video may land on both sides.

        Args:
            holdout: Expected fraction of items held out, in [0, 1).

        Returns:
            ``(train_indices, held_indices)``, disjoint, together all indices, each in increasing order.
        """
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        train, held = [], []
        for i, name in enumerate(self.names):
            key = name.split("#tile")[0]
            (held if zlib.crc32(key.encode()) / 2**32 < holdout else train).append(i)
        return train, held

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Tensor]:
        """One augmented crop.

        Args:
            key: ``index``, or ``(index, sample_seed)``. Every random draw comes from
                ``torch.Generator().manual_seed(sample_seed)``, so a key always gives the same tensor. A plain
                index uses a sample seed derived from ``(seed, index)``, as :class:`synth.data.RenderedFrames`.

        Returns:
            ``{"image": (3, S, S) float32 normalised, "seed": () int64}``.
        """
        if isinstance(key, tuple | list):
            index, sample_seed = key
        else:
            index, sample_seed = key, None
        index = range(len(self.images))[int(index)]  # negative indices and IndexError as for a list
        if sample_seed is None:
            sample_seed = _derive_seed(self.seed, index)
        generator = torch.Generator().manual_seed(int(sample_seed))
        image = torch.from_numpy(self.images[index])
        image = image.expand(3, -1, -1) if image.ndim == 2 else image.permute(2, 0, 1)
        top, left, h, w = self._crop.crop_params(image.shape[1], image.shape[2], generator if self.train else None)
        # Crop the uint8 image first, so only the window is converted to float.
        crop = TF.crop(image, top, left, h, w).float().div_(255.0)
        crop = TF.resize(crop, [self.size, self.size], interpolation=InterpolationMode.BILINEAR,
                         antialias=True).clamp_(0.0, 1.0)
        if self.train and self.flip and float(torch.rand((), generator=generator)) < 0.5:
            crop = TF.hflip(crop)
        return {"image": TF.normalize(crop, list(IMAGENET_MEAN), list(IMAGENET_STD)),
                "seed": torch.tensor(int(sample_seed), dtype=torch.int64)}


__all__ = ["CorruptImageError", "RealImages", "fashion_mnist", "offline_real_sources", "read_image", "tile_image",
           "video_frames", "wallpaper_photos"]
