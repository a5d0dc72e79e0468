"""Cut-paste dataset: stamp selection, exact boxes and masks, occlusion, determinism, disjoint splits, reruns."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from adapt.cutpaste import (
    DRAWN_STAMPS,
    STAMP_CLASSES,
    STAMPS_DIR,
    CutPasteDataset,
    CutPasteObjects,
    CutPasteSegmentation,
    _partition,
    build_cutpaste,
    compose_image,
    find_photo_stamps,
    flat_fraction,
)

pytestmark = pytest.mark.skipif(not Path(STAMPS_DIR).is_dir(), reason="tuxpaint-stamps-default not installed")

SPLITS = {"train": 6, "val": 3, "test": 3}
ARGS = {"n_images": SPLITS, "size": 64, "objects_per_image": (2, 4), "video_every": 40}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same tiny dataset built twice with seed 0 and once with seed 1."""
    root = tmp_path_factory.mktemp("cutpaste")
    return {name: (root / name, build_cutpaste(str(root / name), seed=seed, **ARGS))
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_flat_fraction_counts_exact_repeats():
    rgba = np.zeros((3, 3, 4), np.uint8)
    rgba[..., 3] = 255
    # Counted pixels (with a right and a lower neighbour): the top-left 2x2. The corner (2, 2) is nobody's right or
    # lower neighbour, so changing it changes nothing.
    rgba[2, 2, :3] = 9
    assert flat_fraction(rgba) == 1.0
    rgba[1, 2, :3] = 5  # the right neighbour of (1, 1): 3 of 4 counted pixels still repeat
    assert flat_fraction(rgba) == 0.75
    rgba[..., 3] = 0
    assert flat_fraction(rgba) == 0.0  # no opaque pixel


def test_selected_stamps_are_photographs():
    stamps, counts = find_photo_stamps()
    print(f"photographed stamps selected: {len(stamps)}; reasons left out: {counts}")
    assert len(stamps) > 100 and counts["selected"] == len(stamps)
    names = [s.name for s in stamps]
    assert len(set(names)) == len(names) and not set(names) & DRAWN_STAMPS
    assert not any(Path(n).stem.endswith("_mirror") or "cartoon" in n.split("/") for n in names)
    assert not any(Path(s.path).with_suffix(".svg").is_file() for s in stamps)
    by_class = {c: [s for s in stamps if s.category == c] for c in STAMP_CLASSES}
    assert all(len(members) >= 8 for members in by_class.values()), {c: len(m) for c, m in by_class.items()}
    for stamp in stamps[::10]:
        rgba = cv2.imread(stamp.path, cv2.IMREAD_UNCHANGED)
        assert rgba.shape[2] == 4 and flat_fraction(rgba) < 0.1


def test_partition_is_proportional_and_complete():
    items = list(range(23))
    groups = _partition(items, [200, 50, 100], np.random.default_rng(0))
    assert sorted(item for group in groups for item in group) == items
    assert [len(g) for g in groups] == [13, 3, 7]
    assert all(len(g) == 1 for g in _partition([1, 2, 3], [200, 50, 100], np.random.default_rng(0)))


def _square(color: tuple[int, int, int], side: int = 10) -> np.ndarray:
    cutout = np.zeros((side, side, 4), np.float32)
    cutout[..., :3] = color
    cutout[..., 3] = 1.0
    return cutout


def test_compose_hard_blend_and_no_occlusion():
    size = 40
    background = np.full((size, size, 3), 100.0, np.float32)
    cutouts = [(_square((250, 0, 0)), True), (_square((0, 250, 0)), True), (_square((0, 0, 250)), True)]
    image, instances, kept = compose_image(background, cutouts, size=size, rng=np.random.default_rng(0),
                                           scale=(0.25, 0.25), max_rotation=0.0, blend_modes=("hard",),
                                           max_occlusion=0.0)
    assert len(kept) >= 2
    colors = {0: (250, 0, 0), 1: (0, 250, 0), 2: (0, 0, 250)}
    for k, record in enumerate(kept, start=1):
        region = instances == k
        # A 10 px square scaled to 10 px, no rotation, hard alpha: exactly its pixels, exactly its colour.
        assert record["occlusion"] == 0.0 and region.sum() == 100
        rows, cols = np.flatnonzero(region.any(1)), np.flatnonzero(region.any(0))
        assert len(rows) == len(cols) == 10 and region[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
        assert (image[region] == colors[record["index"]]).all()
    assert (image[instances == 0] == 100).all()


def test_compose_occlusion_limit():
    size = 32
    background = np.zeros((size, size, 3), np.float32)
    cutouts = [(_square((200, 200, 200), 12), True) for _ in range(8)]
    for seed in range(5):
        _, instances, kept = compose_image(background, cutouts, size=size, rng=np.random.default_rng(seed),
                                           scale=(0.5, 0.6), max_occlusion=0.5)
        areas = np.bincount(instances.ravel(), minlength=len(kept) + 1)[1:]
        assert all(record["occlusion"] <= 0.5 for record in kept) and (areas > 0).all()


def test_boxes_are_tight_boxes_of_masks(built):
    root, _ = built["a"]
    for split in SPLITS:
        coco = json.loads((root / split / "annotations.json").read_text())
        assert len(coco["images"]) == SPLITS[split]
        for image in coco["images"]:
            annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert annotations, "every image keeps at least one object"
            instance_png = cv2.imread(str(root / split / "masks" / image["file_name"]), cv2.IMREAD_UNCHANGED)
            assert instance_png.shape == (64, 64) and instance_png.max() == len(annotations)
            union = np.zeros((64, 64), np.int32)
            for k, annotation in enumerate(annotations, start=1):
                mask = mask_utils.decode(annotation["segmentation"])
                assert mask.any() and np.array_equal(mask.astype(bool), instance_png == k)
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                assert annotation["bbox"] == [cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0]]
                assert annotation["area"] == int(mask.sum()) and annotation["occlusion"] <= 0.75
                union += mask
            assert union.max() == 1  # instance masks are disjoint


def test_readers(built):
    root, _ = built["a"]
    dataset = CutPasteDataset(root=str(root), split="val")
    assert dataset.categories == list(STAMP_CLASSES) and len(dataset) == SPLITS["val"]
    segmentation = CutPasteSegmentation(root=str(root), split="val")
    for index in range(len(dataset)):
        image, target = dataset[index]
        assert image.shape == (3, 64, 64) and image.dtype == torch.float32
        stored = cv2.cvtColor(cv2.imread(str(root / "val" / "images" / f"{index:06d}.png")), cv2.COLOR_BGR2RGB)
        assert torch.equal(image, torch.from_numpy(stored).permute(2, 0, 1).float() / 255)
        from torchvision.ops import masks_to_boxes

        assert torch.equal(target["boxes"], masks_to_boxes(target["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert (target["labels"] >= 1).all() and (target["iscrowd"] == 0).all()
        _, semantic = segmentation[index]
        expected = torch.zeros((64, 64), dtype=torch.int64)
        for mask, label in zip(target["masks"].bool(), target["labels"], strict=True):
            expected[mask] = label
        assert torch.equal(semantic, expected)


def test_object_crops(built):
    root, _ = built["a"]
    crops = {split: CutPasteObjects(root=str(root), split=split, size=32, margin=0.15, min_side=8) for split in SPLITS}
    train, test = crops["train"], crops["test"]
    assert train.classes == list(STAMP_CLASSES) == test.classes
    for split, dataset in crops.items():
        coco = json.loads((root / split / "annotations.json").read_text())
        kept = [a for a in coco["annotations"] if min(a["bbox"][2:]) >= 8]
        assert len(dataset) == len(kept) > 0 and dataset.stamps == [a["stamp"] for a in kept]
        assert dataset.labels.tolist() == [a["category_id"] - 1 for a in kept]
    # Crops are the enlarged, clipped box of the stored image, resized.
    annotation = next(a for a in json.loads((root / "train" / "annotations.json").read_text())["annotations"]
                      if min(a["bbox"][2:]) >= 8)
    x, y, w, h = annotation["bbox"]
    file_name = f"{annotation['image_id'] - 1:06d}.png"
    stored = cv2.cvtColor(cv2.imread(str(root / "train" / "images" / file_name)), cv2.COLOR_BGR2RGB)
    box = (max(0, round(x - 0.15 * w)), max(0, round(y - 0.15 * h)), min(64, round(x + w + 0.15 * w)),
           min(64, round(y + h + 0.15 * h)))
    expected = cv2.resize(stored[box[1]:box[3], box[0]:box[2]], (32, 32),
                          interpolation=cv2.INTER_AREA if (box[3] - box[1]) * (box[2] - box[0]) > 32 * 32
                          else cv2.INTER_LINEAR)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert label.dtype == torch.int64 and int(label) == annotation["category_id"] - 1
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1).float() / 255)
    # Split by object: no stamp is in two splits.
    assert not set(train.stamps) & set(test.stamps)
    # Larger min_side keeps fewer objects.
    assert len(CutPasteObjects(root=str(root), split="train", min_side=20)) < len(train)


def test_same_seed_same_bytes_other_seed_differs(built):
    (root_a, _), (root_b, _), (root_c, _) = built["a"], built["b"], built["c"]
    files_a, files_b, files_c = _files(root_a), _files(root_b), _files(root_c)
    assert len(files_a) == 1 + 3 + 2 * sum(SPLITS.values())
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a["train/images/000000.png"] != files_c["train/images/000000.png"]
    assert files_a["train/annotations.json"] != files_c["train/annotations.json"]


def test_splits_share_no_stamp_and_no_background(built):
    root, _ = built["a"]
    manifest = json.loads((root / "dataset.json").read_text())
    stamps, backgrounds = {}, {}
    for split in SPLITS:
        coco = json.loads((root / split / "annotations.json").read_text())
        stamps[split] = {a["stamp"] for a in coco["annotations"]}
        backgrounds[split] = {i["background"].split("#")[0] for i in coco["images"]}
        assert stamps[split] <= set(manifest["stamps"][split])
        assert backgrounds[split] <= set(manifest["backgrounds"][split])
    for first in SPLITS:
        for second in SPLITS:
            if first < second:
                assert not set(manifest["stamps"][first]) & set(manifest["stamps"][second])
                assert not set(manifest["backgrounds"][first]) & set(manifest["backgrounds"][second])
    # Every class has stamps in every split.
    category = {stamp.name: stamp.category for stamp in find_photo_stamps()[0]}
    for split in SPLITS:
        assert {category[name] for name in manifest["stamps"][split]} == set(STAMP_CLASSES)


def test_rerun_is_noop_and_other_args_are_refused(built):
    root, paths = built["a"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert build_cutpaste(str(root), seed=0, **ARGS) == paths
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match=r"other arguments.*size.*size=64"):
        build_cutpaste(str(root), seed=0, **{**ARGS, "size": 32})
    with pytest.raises(ValueError, match=r"other arguments.*seed"):
        build_cutpaste(str(root), seed=5, **ARGS)


def test_foreign_folder_is_refused(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"no dataset\.json"):
        build_cutpaste(str(tmp_path), seed=0, **ARGS)
