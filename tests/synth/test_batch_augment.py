"""BatchAugment against the per-sample reference (FrameAugment): same draws, same label geometry, exactly.

Frames come from ``packed_helpers``: instance ids and depth encode each pixel's position (exactly, also in float16),
so where a label came from can be read back after any crop, resize and flip.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synth.batch_augment import BatchAugment, hue_matrices, nearest_exact_indices
from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.data import FrameAugment

sys.path.insert(0, str(Path(__file__).parent))
from packed_helpers import make_frame  # a helper module beside this file (tests are not a package)

LABELS = ("depth", "normals", "contours", "valid", "instances", "cam_K", "frame_id")
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "grayscale_prob": 0.0}


def as_packed(frame: dict) -> dict:
    """The frame as the pack stores it (float16 depth and normals), for the per-sample reference."""
    return {**frame, "depth": frame["depth"].astype(np.float16), "normals": frame["normals"].astype(np.float16)}


def raw_batch(frames: list[dict], device="cpu") -> dict:
    """What PackedShard.read gives for these frames, as tensors on ``device``."""
    def stack(key, dtype=None):
        return torch.from_numpy(np.stack([np.asarray(f[key], dtype) for f in frames])).to(device)

    boxes = [np.asarray(f["boxes"], np.float32).reshape(-1, 4) for f in frames]
    return {
        "colors": stack("colors"), "depth": stack("depth", np.float16), "normals": stack("normals", np.float16),
        "contours": stack("contours"), "instance_segmaps": stack("instance_segmaps"), "cam_K": stack("cam_K"),
        "frame_id": torch.tensor([f["attrs"]["frame_id"] for f in frames]),
        "boxes": torch.from_numpy(np.concatenate(boxes)),
        "box_category_ids": torch.from_numpy(np.concatenate([f["box_category_ids"] for f in frames])),
        "box_instance_ids": torch.from_numpy(np.concatenate([f["box_instance_ids"] for f in frames])),
        "box_offsets": torch.from_numpy(np.cumsum([0] + [len(b) for b in boxes])),
    }


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def test_nearest_exact_indices_are_those_of_torch():
    for size in (16, 24, 64):
        for length in range(1, 140):
            ramp = torch.arange(length, dtype=torch.float64).view(1, 1, length, 1)
            expected = torch.nn.functional.interpolate(ramp, size=(size, 1), mode="nearest-exact").view(-1)
            assert np.array_equal(nearest_exact_indices(3, length, size), expected.long().numpy() + 3)
        # One call for a batch of windows: row b is the window (starts[b], lengths[b]).
        starts, lengths = np.arange(139) % 7, np.arange(1, 140)
        batched = nearest_exact_indices(starts, lengths, size)
        assert batched.shape == (139, size)
        for b in range(139):
            assert np.array_equal(batched[b], nearest_exact_indices(int(starts[b]), int(lengths[b]), size))


@pytest.mark.parametrize("recipe", [{}, {"train": False}, {"scale": (0.1, 0.3), "ratio": (0.5, 2.0)},
                                    {"size": 50, "flip_prob": 1.0}])
def test_labels_equal_the_per_sample_reference_exactly(recipe):
    """Same seeds -> same crop, flip and labels as FrameAugment, bit for bit (on the packed float16 values)."""
    augment = FrameAugment(**{"size": 32, "hue": 0.0, **recipe})  # hue differs by design (see the module)
    frames = [make_frame(i) for i in range(12)]
    seeds = torch.arange(12) * 7919 + 3
    batch = BatchAugment(augment)(raw_batch(frames), seeds)
    for b, frame in enumerate(frames):
        reference = augment(as_packed(frame), torch.Generator().manual_seed(int(seeds[b])))
        for key in LABELS:
            assert torch.equal(batch[key][b], reference[key]), (key, b)
        for key in ("boxes", "box_categories", "box_instances"):
            assert torch.equal(batch[key][b], reference[key]), (key, b)
        error = (unnormalise(batch["image"][b]) - unnormalise(reference["image"])).abs()
        if augment.train:
            assert error.mean() < 0.01  # same factors; clamped once here, after every operation there
        else:
            assert error.max() < 1.5 / 255  # the same filter; uint8 rounding
    assert torch.equal(batch["seed"], seeds)


def test_flip_negates_normals_x_and_mirrors_every_label():
    whole = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), **NO_JITTER}
    frame = make_frame(3, h=32, w=32)
    seeds = torch.tensor([1])
    plain = BatchAugment(FrameAugment(size=32, flip_prob=0.0, **whole))(raw_batch([frame]), seeds)
    flipped = BatchAugment(FrameAugment(size=32, flip_prob=1.0, **whole))(raw_batch([frame]), seeds)
    assert torch.equal(flipped["normals"][:, 0], -plain["normals"][:, 0].flip(-1))
    assert torch.equal(flipped["normals"][:, 1:], plain["normals"][:, 1:].flip(-1))
    for key in ("depth", "contours", "instances"):
        assert torch.equal(flipped[key], plain[key].flip(-1)), key
    assert torch.allclose(flipped["image"], plain["image"].flip(-1), atol=1e-5)
    box, mirrored = plain["boxes"][0], flipped["boxes"][0]
    assert torch.equal(mirrored[:, [1, 3]], box[:, [1, 3]]) and torch.allclose(mirrored[:, [2, 0]], 32 - box[:, [0, 2]])
    assert torch.isclose(flipped["cam_K"][0, 0, 2], 32 - plain["cam_K"][0, 0, 2])


def test_crops_cut_every_label_the_same_way_and_boxes_follow():
    h, w, size = 40, 48, 24
    augment = FrameAugment(size=size, scale=(0.2, 0.9), **NO_JITTER)
    frames = []
    for i in range(16):
        frame = make_frame(i, h, w)
        frame["instance_segmaps"] = np.arange(h * w, dtype=np.int32).reshape(h, w) + 1  # no empty strip here
        frame["depth"] = (0.25 + (frame["instance_segmaps"] - 1) / 256.0).astype(np.float32)
        frames.append(frame)
    batch = BatchAugment(augment)(raw_batch(frames), torch.arange(16) + 100)
    for b, frame in enumerate(frames):
        position = batch["instances"][b].numpy() - 1  # source pixel of each output pixel
        v, u = np.divmod(position, w)
        from_depth = np.round((batch["depth"][b, 0].numpy() - 0.25) * 256).astype(np.int64)
        assert np.array_equal(from_depth, position)
        assert np.array_equal(batch["contours"][b, 0].numpy(), frame["contours"][v, u].astype(np.float32))
        source_normals = torch.from_numpy(frame["normals"][v, u].astype(np.float16)).float().permute(2, 0, 1)
        mirrored = not np.all(np.diff(u, axis=1) >= 0)
        if mirrored:
            source_normals[0] = -source_normals[0]
        assert torch.equal(batch["normals"][b], source_normals)
        # Boxes: an output pixel lies in a kept box exactly when its source pixel lies in the source box.
        kept = {int(i): box for i, box in zip(batch["box_instances"][b], batch["boxes"][b], strict=True)}
        for box, instance in zip(frame["boxes"], frame["box_instance_ids"], strict=True):
            inside = (u >= box[0]) & (u < box[2]) & (v >= box[1]) & (v < box[3])
            if not inside.any():
                continue
            out = kept[int(instance)].numpy()
            jj, ii = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
            covered = (jj >= out[0]) & (jj < out[2]) & (ii >= out[1]) & (ii < out[3])
            assert np.array_equal(covered, inside), (b, instance)


def test_jitter_matches_torchvision_where_nothing_clips_and_grayscale_is_grey():
    """Brightness, contrast and saturation with torchvision's formulas, one factor per sample, in each sample's order;
    the composed map is clamped once, so the check uses colours that no step pushes out of [0, 1]."""
    recipe = {"scale": (1.0, 1.0), "ratio": (1.0, 1.0), "flip_prob": 0.0, "brightness": 0.2, "contrast": 0.3,
              "saturation": 0.5, "hue": 0.0, "grayscale_prob": 0.0}
    frames = []
    for i in range(8):
        frame = make_frame(i, 32, 32)
        frame["colors"] = (frame["colors"] // 4 + 80).astype(np.uint8)  # mid-range colours
        frames.append(frame)
    augment = FrameAugment(size=32, **recipe)
    seeds = torch.arange(8) + 11
    batch = BatchAugment(augment)(raw_batch(frames), seeds)
    for b, frame in enumerate(frames):
        reference = augment(frame, torch.Generator().manual_seed(int(seeds[b])))
        assert (unnormalise(batch["image"][b]) - unnormalise(reference["image"])).abs().max() < 1e-4
    grey = BatchAugment(FrameAugment(size=32, grayscale=True))(raw_batch(frames), seeds)
    rgb = unnormalise(grey["image"])
    assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5) and torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)


def test_hue_rotation_keeps_luma_and_zero_is_the_identity():
    matrices = hue_matrices(torch.tensor([0.0, 0.1, -0.3]))
    assert torch.equal(matrices[0], torch.eye(3, dtype=torch.float64))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64)
    assert torch.allclose(luma @ matrices, luma.expand(3, 3))


def test_a_sample_does_not_depend_on_the_rest_of_its_batch():
    augment = BatchAugment(FrameAugment(size=32))
    frames = [make_frame(i) for i in range(6)]
    seeds = torch.tensor([5, 6, 7, 8, 9, 10])
    whole = augment(raw_batch(frames), seeds)
    alone = augment(raw_batch(frames[2:3]), seeds[2:3])
    for key in ("image", *LABELS):
        assert torch.allclose(whole[key][2].float(), alone[key][0].float(), atol=1e-6), key


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_labels_are_those_of_the_cpu():
    augment = BatchAugment(FrameAugment(size=32))
    frames = [make_frame(i) for i in range(8)]
    seeds = torch.arange(8) + 1
    cpu, gpu = augment(raw_batch(frames), seeds), augment(raw_batch(frames, "cuda"), seeds)
    assert gpu["image"].is_cuda and not gpu["seed"].is_cuda
    for key in LABELS:
        assert torch.equal(gpu[key].cpu(), cpu[key]), key
    assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu["boxes"], cpu["boxes"], strict=True))
    assert (gpu["image"].cpu() - cpu["image"]).abs().mean() < 0.02
