"""Tiny datasets following the transfer data conventions, and a checkpoint in the engine's format, shared by the
tests of every adapt.transfer module (as the ``sets`` and ``pretrained`` fixtures)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from adapt.transfer import seeded
from pretext.synthetic import DepthHead
from synth.backbone import Backbone
from synth.engine import MultiTask


class ColourSet:
    """Classification: red (0) or blue (1) images with noise, (3, S, S) in [0, 1]."""

    classes = ("red", "blue")

    def __init__(self, n: int, seed: int, size: int = 32):
        g = torch.Generator().manual_seed(seed)
        self.labels = [i % 2 for i in range(n)]
        base = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.1, 0.9]])
        self.images = [(base[label].view(3, 1, 1) + 0.1 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
                       for label in self.labels]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


#: Per image: (label, x0, y0, x1, y1); far apart across images so another image's boxes never overlap.
BOXES = [
    [(1, 2, 2, 20, 16)],
    [(2, 40, 4, 60, 26), (1, 6, 40, 22, 60)],
    [(1, 30, 34, 50, 58)],
    [(2, 4, 22, 18, 36), (2, 44, 44, 62, 62)],
]
COLOURS = {1: (0.9, 0.1, 0.1), 2: (0.1, 0.2, 0.9)}


class BoxSet:
    """Detection: coloured rectangles on grey 64x64 images, with masks and a COCO ground truth."""

    categories = ("red", "blue")

    def __init__(self, size: int = 64):
        self.items = []
        for index, objects in enumerate(BOXES):
            image = torch.full((3, size, size), 0.5)
            masks = torch.zeros(len(objects), size, size, dtype=torch.uint8)
            for k, (label, x0, y0, x1, y1) in enumerate(objects):
                image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[label]).view(3, 1, 1)
                masks[k, y0:y1, x0:x1] = 1
            target = {"boxes": torch.tensor([o[1:] for o in objects], dtype=torch.float32),
                      "labels": torch.tensor([o[0] for o in objects], dtype=torch.int64), "masks": masks,
                      "image_id": 100 + index, "area": masks.flatten(1).sum(1).float(),
                      "iscrowd": torch.zeros(len(objects), dtype=torch.int64)}
            self.items.append((image, target))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]

    def coco(self):
        images, annotations = [], []
        for image, target in self.items:
            images.append({"id": target["image_id"], "height": image.shape[1], "width": image.shape[2]})
            for box, label, mask in zip(target["boxes"].tolist(), target["labels"].tolist(), target["masks"],
                                        strict=True):
                rle = mask_utils.encode(np.asfortranarray(mask.numpy()))
                annotations.append({"id": len(annotations) + 1, "image_id": target["image_id"], "category_id": label,
                                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    "area": float(mask.sum()), "iscrowd": 0, "segmentation": rle})
        return {"images": images, "annotations": annotations,
                "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "blue"}]}


class RenumberedBoxSet(BoxSet):
    """The same boxes, but coco() numbers the categories 9 (blue) and 7 (red), listed in another order."""

    def coco(self):
        gt = super().coco()
        for annotation in gt["annotations"]:
            annotation["category_id"] = {1: 7, 2: 9}[annotation["category_id"]]
        gt["categories"] = [{"id": 9, "name": "blue"}, {"id": 7, "name": "red"}]
        return gt


class MaskSet:
    """Segmentation: the rectangles of :class:`BoxSet` as class maps (0 background), a 255 border."""

    classes = ("background", "red", "blue")

    def __init__(self):
        self.items = []
        for image, target in BoxSet().items:
            mask = torch.zeros(image.shape[1:], dtype=torch.int64)
            for label, object_mask in zip(target["labels"], target["masks"], strict=True):
                mask[object_mask.bool()] = label
            mask[0, :] = 255
            self.items.append((image, mask))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def depth_pairs(n: int = 2, size: int = 48):
    """Depth pairs: a horizontal gradient image and a depth ramp, 0 (invalid) in one corner."""
    pairs = []
    for i in range(n):
        ramp = np.linspace(1.0, 3.0 + i, size, dtype=np.float32)
        depth = np.tile(ramp, (size, 1))
        depth[:4, :4] = 0.0
        image = np.stack([np.tile((ramp / ramp.max() * 255).astype(np.uint8), (size, 1))] * 3, axis=-1)
        pairs.append({"name": f"pair{i}", "image": image, "relative_depth": depth})
    return pairs


# --- checkpoints ---------------------------------------------------------------------------------------------------

DEPTH_KWARGS = {"backbone_arch": "resnet18", "stages": None, "channels": 16, "scale_invariant_weight": 0.5}


def write_checkpoint(path, model_state):
    config = {"model": {"_target_": "synth.backbone.Backbone", "arch": "resnet18", "in_channels": 3},
              "objective": {"depth": {"_target_": "pretext.synthetic.DepthHead", "weight": 5.0, **DEPTH_KWARGS}}}
    torch.save({"step": 2, "model": model_state, "config": config, "backbone": {"arch": "resnet18"}}, path)
    return path


def backbone_state(state):
    return {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def assert_holds_network(module_state, network_state):
    """Every backbone tensor (batch-norm counters aside) is in ``module_state`` under its torchvision name."""
    keys = [k for k in network_state if not k.endswith("num_batches_tracked")]
    assert keys
    for key in keys:
        assert key in module_state, key
        assert torch.equal(module_state[key], network_state[key]), key


@pytest.fixture(scope="session")
def sets():
    """The helpers above, for the test modules (which cannot import this conftest)."""
    return SimpleNamespace(ColourSet=ColourSet, BoxSet=BoxSet, RenumberedBoxSet=RenumberedBoxSet, MaskSet=MaskSet,
                           depth_pairs=depth_pairs, DEPTH_KWARGS=DEPTH_KWARGS, write_checkpoint=write_checkpoint,
                           backbone_state=backbone_state, assert_holds_network=assert_holds_network)


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A checkpoint in the engine's format whose every tensor differs from torchvision's initialisation."""
    with seeded(123):
        model = MultiTask(Backbone("resnet18"), {"depth": DepthHead(**DEPTH_KWARGS)})
    g = torch.Generator().manual_seed(5)
    state = {k: (v + 0.01 * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    return write_checkpoint(tmp_path_factory.mktemp("run") / "last.pt", state), state

