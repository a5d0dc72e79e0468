"""Training data pipeline on tiny hand-written frames: label-consistent augmentation, datasets, sampler, collate.

The frames are analytic: a tilted plane (depth and normals computed from the same plane equation), a
fronto-parallel rectangle in front of it with a known box and instance id, a strip with no surface at the top,
contours on both sides of every instance boundary (as ``render.labels.contours`` marks them) and an
asymmetric colour pattern. They are written with the exact layout ``synth.frames`` reads; nothing is rendered.
"""

import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.data import (
    CorruptSample,
    FrameAugment,
    LiveFrames,
    RenderedFrames,
    StepSampler,
    StreamingFrames,
    collate_frames,
    held_out_scene,
)
from synth.frames import FRAME_FIELDS, read_frame

H = W = 48
FX = 40.0
PLANE_NORMAL = np.array([0.6, 0.25, -1.0]) / np.linalg.norm([0.6, 0.25, -1.0])  # faces the camera
PLANE_DISTANCE = 2.0
OBJ_ID, OBJ_CAT, BG_ID, BG_CAT = 7, 3, 1, 0
OBJ_DEPTH = 1.0
SKY_ROWS = 4  # rows with no surface (depth 0, instance 0)

# Photometric ops off: isolates geometry in the tests that compare labels.
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "grayscale_prob": 0.0}


def intrinsics(h: int, w: int) -> np.ndarray:
    # The project's convention (render.labels.intrinsics): pixel (u, v) has its centre at (u + 0.5, v + 0.5).
    return np.array([[FX, 0.0, w / 2], [0.0, FX, h / 2], [0.0, 0.0, 1.0]])


def backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera-frame points of planar depth, pixel centres at (u + 0.5, v + 0.5)."""
    v, u = np.mgrid[0:depth.shape[0], 0:depth.shape[1]] + 0.5
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T
    return rays * depth[..., None]


def id_changes(ids: np.ndarray) -> np.ndarray:
    """Pixels whose id differs from a 4-neighbour (both sides of a boundary; the image edge is not one)."""
    out = np.zeros(ids.shape, bool)
    dx, dy = ids[:, 1:] != ids[:, :-1], ids[1:] != ids[:-1]
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:] |= dy
    out[:-1] |= dy
    return out


def object_box(frame_id: int) -> tuple[int, int, int, int]:
    x1 = 8 + frame_id % 4  # frames differ a little
    return x1, 12, x1 + 22, 30


def make_frame(frame_id: int, h: int = H, w: int = W) -> dict:
    K = intrinsics(h, w)
    v, u = np.mgrid[0:h, 0:w] + 0.5
    rays = np.stack([u, v, np.ones_like(u)], -1) @ np.linalg.inv(K).T  # z = 1
    depth = -PLANE_DISTANCE / (rays @ PLANE_NORMAL)  # plane n.X = -d, so planar depth z = -d / (n.ray)
    normals = np.broadcast_to(PLANE_NORMAL, (h, w, 3)).copy()
    instances = np.full((h, w), BG_ID, np.int32)
    categories = np.full((h, w), BG_CAT, np.int32)
    x1, y1, x2, y2 = object_box(frame_id)
    obj = np.zeros((h, w), bool)
    obj[y1:y2, x1:x2] = True
    depth[obj], normals[obj], instances[obj], categories[obj] = OBJ_DEPTH, (0.0, 0.0, -1.0), OBJ_ID, OBJ_CAT
    sky = np.zeros((h, w), bool)
    sky[:SKY_ROWS] = True
    depth[sky], normals[sky], instances[sky] = 0.0, 0.0, 0
    uu, vv = np.mgrid[0:h, 0:w][::-1]
    colors = np.stack([uu * 5, vv * 4 + 20, np.where(obj, 220, 40 + frame_id)], -1).astype(np.uint8)
    return {
        "colors": colors,
        "depth": depth.astype(np.float32),
        "normals": normals.astype(np.float32),
        "category_id_segmaps": categories,
        "instance_segmaps": instances,
        "contours": id_changes(instances).astype(np.uint8),
        "boxes": np.array([[x1, y1, x2, y2]], np.float32),
        "box_category_ids": np.array([OBJ_CAT], np.int32),
        "box_instance_ids": np.array([OBJ_ID], np.int32),
        "cam_K": K,
        "attrs": {"frame_id": frame_id},
    }


def write_frame(path: Path, frame: dict) -> None:
    with h5py.File(path, "w") as f:
        for key in FRAME_FIELDS:
            f.create_dataset(key, data=frame[key])
        attribute_maps = [{"idx": BG_ID, "name": "plane", "category_id": BG_CAT},
                          {"idx": OBJ_ID, "name": "box", "category_id": OBJ_CAT}]
        f.create_dataset("instance_attribute_maps", data=np.bytes_(json.dumps(attribute_maps)))
        f.attrs.update(frame_id=frame["attrs"]["frame_id"], scene_index=frame["attrs"]["frame_id"], view=0)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_dataset(root: Path, frame_ids, shard: int = 0, **size) -> Path:
    """One shard in ``root`` with the layout of ``synth render``; like the renderer, frame files first, then the
    index, replaced atomically (a concurrent reader never sees a torn index)."""
    shard_dir = root / f"shard_{shard:05d}"
    (shard_dir / "frames").mkdir(parents=True, exist_ok=True)
    records = []
    for frame_id in frame_ids:
        name = f"frames/{frame_id:08d}.hdf5"
        write_frame(shard_dir / name, make_frame(frame_id, **size))
        records.append({"frame_id": frame_id, "scene_index": frame_id, "scene_seed": 0, "view": 0, "file": name,
                        "sha256": sha256(shard_dir / name)})
    tmp = shard_dir / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, shard_dir / "index.jsonl")
    return shard_dir


def unnormalise(image: torch.Tensor) -> torch.Tensor:
    """(3, S, S) normalised image -> (3, S, S) in [0, 1]."""
    return image * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def estimate_normals(depth: np.ndarray, ids: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normals from depth by central differences, facing the camera, and where they are meaningful (interior
    pixels whose 3x3 neighbourhood is one surface). Returns (H-2, W-2, 3) normals and (H-2, W-2) mask."""
    P = backproject(depth, K)
    du = P[1:-1, 2:] - P[1:-1, :-2]
    dv = P[2:, 1:-1] - P[:-2, 1:-1]
    n = np.cross(dv, du)
    n /= np.linalg.norm(n, axis=-1, keepdims=True) + 1e-12
    # A mirrored camera frame is left-handed, so fix the orientation by the geometry, not the cross product.
    n *= -np.sign((n * P[1:-1, 1:-1]).sum(-1, keepdims=True))
    centre = ids[1:-1, 1:-1]
    same = (depth[1:-1, 1:-1] > 0) & (centre > 0)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            same &= ids[dy:dy + ids.shape[0] - 2, dx:dx + ids.shape[1] - 2] == centre
    return n, same


def angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    padded = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return out


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    make_dataset(tmp_path / "data", range(4))
    return tmp_path / "data"


def test_helper_frames_are_readable_and_self_consistent(dataset_dir):
    frame = read_frame(dataset_dir / "shard_00000" / "frames" / "00000002.hdf5")
    assert frame["attrs"]["frame_id"] == 2 and frame["instance_attribute_maps"][1]["idx"] == OBJ_ID
    # Control for the flip test: the analytic normals agree with normals estimated from the analytic depth.
    est, mask = estimate_normals(frame["depth"], frame["instance_segmaps"], frame["cam_K"])
    assert mask.sum() > 500
    assert angles_deg(est, frame["normals"][1:-1, 1:-1])[mask].max() < 0.1


def test_output_fields_shapes_and_dtypes(dataset_dir):
    ds = RenderedFrames(str(dataset_dir), augment=FrameAugment(size=32))
    assert len(ds) == 4
    out = ds[(1, 5)]
    expected = {"image": ((3, 32, 32), torch.float32), "depth": ((1, 32, 32), torch.float32),
                "normals": ((3, 32, 32), torch.float32), "contours": ((1, 32, 32), torch.float32),
                "valid": ((1, 32, 32), torch.bool), "instances": ((32, 32), torch.int64),
                "cam_K": ((3, 3), torch.float32), "frame_id": ((), torch.int64)}
    for key, (shape, dtype) in expected.items():
        assert out[key].shape == shape and out[key].dtype == dtype, key
    n = len(out["boxes"])
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == torch.float32
    assert out["box_categories"].shape == (n,) and out["box_categories"].dtype == torch.int64
    assert out["box_instances"].shape == (n,) and out["box_instances"].dtype == torch.int64
    assert set(out["contours"].unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(out["valid"], out["depth"] > 0)
    assert out["frame_id"].item() == 1


def test_eval_mode_is_a_plain_resize_and_image_unnormalises_to_the_original(dataset_dir):
    ds = RenderedFrames(dataset_dir, augment=FrameAugment(size=W, train=False))
    frame = make_frame(3)
    a, b = ds[(3, 0)], ds[(3, 1)]
    for key in set(a) - {"seed"}:  # no randomness in eval mode; the sample seed is passed through
        assert torch.equal(a[key], b[key]), key
    assert (a["seed"].item(), b["seed"].item()) == (0, 1)
    assert torch.allclose(unnormalise(a["image"]) * 255, torch.from_numpy(frame["colors"]).permute(2, 0, 1).float(),
                          atol=1e-3)
    assert torch.equal(a["depth"][0], torch.from_numpy(frame["depth"]))
    assert torch.equal(a["normals"], torch.from_numpy(frame["normals"]).permute(2, 0, 1))
    assert torch.equal(a["instances"], torch.from_numpy(frame["instance_segmaps"]).long())
    assert torch.equal(a["boxes"], torch.from_numpy(frame["boxes"]))
    assert torch.allclose(a["cam_K"], torch.from_numpy(frame["cam_K"]).float())


def test_eval_mode_centre_crops_non_square_frames(tmp_path):
    make_dataset(tmp_path, [0], h=40, w=48)
    out = RenderedFrames(tmp_path, augment=FrameAugment(size=20, train=False))[0]
    # Centred 40x40 window starts at column 4, then everything is halved.
    x1, y1, x2, y2 = object_box(0)
    assert out["boxes"].tolist() == [[(x1 - 4) / 2, y1 / 2, (x2 - 4) / 2, y2 / 2]]
    assert out["cam_K"][0, 2].item() == pytest.approx((48 / 2 - 4) / 2)


def test_flip_negates_normals_x_so_they_agree_with_flipped_depth(dataset_dir):
    flip_only = FrameAugment(size=W, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0, **NO_JITTER)
    out = RenderedFrames(dataset_dir, augment=flip_only)[(0, 11)]
    frame = make_frame(0)
    depth = out["depth"][0].numpy()
    assert np.array_equal(depth, frame["depth"][:, ::-1])  # a flip and nothing else

    # Mirroring the image mirrors the camera about the image centre: u -> W - u in pixel-edge coordinates.
    K = frame["cam_K"].copy()
    K[0, 2] = W - K[0, 2]
    assert np.allclose(out["cam_K"].numpy(), K)
    est, mask = estimate_normals(depth, out["instances"].numpy(), K)
    normals = out["normals"].numpy().transpose(1, 2, 0)[1:-1, 1:-1]
    assert mask.sum() > 500
    assert angles_deg(est, normals)[mask].max() < 0.5
    # The x negation matters: without it the tilted plane's normals would be off by tens of degrees.
    unnegated = normals * np.array([-1.0, 1.0, 1.0])
    plane = mask & (out["instances"].numpy()[1:-1, 1:-1] == BG_ID)
    assert angles_deg(est, unnegated)[plane].min() > 30


def test_crop_and_resize_keep_labels_aligned(dataset_dir):
    # Crops of at most 60% of the area, resized to the frame size: always upsampling, which makes the contour
    # checks exact (a downscale may skip a 1-pixel contour; nearest-neighbour cannot help that).
    augment = FrameAugment(size=W, scale=(0.25, 0.6), **NO_JITTER)
    ds = RenderedFrames(dataset_dir, augment=augment)
    frame = make_frame(2)
    crops, visible, cut = set(), 0, 0
    for seed in range(25):
        out = ds[(2, seed)]
        crops.add(tuple(out["cam_K"].flatten().tolist()))
        ids, depth = out["instances"].numpy(), out["depth"][0].numpy()
        assert set(np.unique(ids)) <= {0, BG_ID, OBJ_ID}
        assert np.isin(depth, frame["depth"]).all()  # nearest: no value is invented
        assert np.array_equal(depth > 0, ids > 0)

        obj = ids == OBJ_ID
        if obj.any():
            visible += 1
            ys, xs = np.nonzero(obj)
            extent = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            assert out["boxes"].shape == (1, 4)
            assert np.abs(out["boxes"][0].numpy() - extent).max() <= 1.0, (seed, out["boxes"], extent)
            assert out["box_categories"].tolist() == [OBJ_CAT] and out["box_instances"].tolist() == [OBJ_ID]
            cut += int(extent[0] == 0 or extent[1] == 0 or extent[2] == W or extent[3] == H)
        else:
            assert out["boxes"].shape == (0, 4) and out["box_categories"].shape == (0,)

        contours = out["contours"][0].numpy().astype(bool)
        change = id_changes(ids)
        assert contours[change].all()  # every boundary pixel of the output is still a contour
        # ... and every contour is within one upsampled source pixel of a boundary (or of the crop edge, where
        # the boundary's other side was cut off).
        r = math.ceil(max(out["cam_K"][0, 0].item(), out["cam_K"][1, 1].item()) / FX)
        near = dilate(np.pad(change, 1, constant_values=True), r)[1:-1, 1:-1]
        assert not (contours & ~near).any(), seed
    assert len(crops) == 25 and visible > 5 and cut > 0


def test_same_key_same_tensors_other_seed_other_crop(dataset_dir):
    ds = RenderedFrames(dataset_dir, augment=FrameAugment(size=24))
    a, b = ds[(0, 42)], ds[(0, 42)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    crops = {tuple(ds[(0, s)]["cam_K"].flatten().tolist()) for s in range(5)}
    assert len(crops) == 5
    # A plain index derives its sample seed from (seed, index): fixed per dataset seed, different across seeds.
    assert torch.equal(ds[1]["image"], ds[1]["image"])
    other = RenderedFrames(dataset_dir, augment=FrameAugment(size=24), seed=1)
    assert not torch.equal(ds[1]["cam_K"], other[1]["cam_K"])


def test_samples_do_not_depend_on_the_worker_process(dataset_dir):
    ds = RenderedFrames(dataset_dir, augment=FrameAugment(size=16))
    sampler = StepSampler(len(ds), seed=3, batch_size=2)
    loader = torch.utils.data.DataLoader(ds, sampler=sampler, batch_size=2, collate_fn=collate_frames,
                                         num_workers=2)
    keys = iter(sampler)
    for batch, _ in zip(loader, range(3), strict=False):
        expected = collate_frames([ds[next(keys)] for _ in range(2)])
        for key in ("image", "depth", "instances", "frame_id"):
            assert torch.equal(batch[key], expected[key]), key


def test_subset_takes_sampler_keys(dataset_dir):
    ds = RenderedFrames(dataset_dir, augment=FrameAugment(size=16))
    part = ds.subset([3, 1])
    assert len(part) == 2 and len(ds) == 4
    assert torch.equal(part[(0, 7)]["image"], ds[(3, 7)]["image"])
    loader = torch.utils.data.DataLoader(part, sampler=StepSampler(len(part), seed=0, batch_size=2), batch_size=2,
                                         collate_fn=collate_frames)
    assert sorted(next(iter(loader))["frame_id"].tolist()) == [1, 3]
    # A held-out view with its own (eval) augmentation, leaving the training view's untouched.
    held = ds.subset([2], augment=FrameAugment(size=16, train=False))
    unaugmented = RenderedFrames(dataset_dir, augment=FrameAugment(size=16, train=False))
    assert torch.equal(held[(0, 5)]["image"], unaugmented[(2, 5)]["image"])
    assert ds.augment.train and part.augment.train


def test_photometric_ops_leave_labels_untouched(dataset_dir):
    plain = RenderedFrames(dataset_dir, augment=FrameAugment(size=32, **NO_JITTER))
    jitter = RenderedFrames(dataset_dir, augment=FrameAugment(size=32, brightness=0.8, contrast=0.8, saturation=0.8,
                                                              hue=0.3, grayscale_prob=0.5))
    changed = 0
    for seed in range(6):
        a, b = plain[(1, seed)], jitter[(1, seed)]
        for key in ("depth", "normals", "contours", "valid", "instances", "boxes", "box_categories", "cam_K"):
            assert torch.equal(a[key], b[key]), key
        changed += not torch.allclose(a["image"], b["image"], atol=1e-3)
    assert changed == 6

    gray = RenderedFrames(dataset_dir, augment=FrameAugment(size=32, grayscale=True))
    for key in [(0, 1), (2, 2)]:
        image = unnormalise(gray[key]["image"])
        assert torch.allclose(image[0], image[1], atol=1e-5) and torch.allclose(image[0], image[2], atol=1e-5)
    image = unnormalise(RenderedFrames(dataset_dir, augment=FrameAugment(size=32, grayscale=True, train=False))[0]
                        ["image"])
    assert torch.allclose(image[0], image[2], atol=1e-5)


def test_corrupt_frame_is_logged_and_dropped(dataset_dir, caplog):
    bad = dataset_dir / "shard_00000" / "frames" / "00000001.hdf5"
    bad.write_bytes(bad.read_bytes()[:1000])  # truncated
    ds = RenderedFrames(dataset_dir, augment=FrameAugment(size=16))
    with caplog.at_level(logging.WARNING, logger="synth.data"):
        assert isinstance(ds[1], CorruptSample) and ds[1] == str(bad)  # the file, not a sample
        ds[1]
    warnings = [r for r in caplog.records if str(bad) in r.getMessage() and r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per file, however often it is drawn

    batch = collate_frames([ds[0], ds[1], ds[2]])
    assert batch["n_corrupt"] == 1 and batch["image"].shape == (2, 3, 16, 16)
    assert batch["corrupt_files"] == [str(bad)]
    assert batch["frame_id"].tolist() == [0, 2] and len(batch["boxes"]) == 2
    assert collate_frames([None]) == {"n_corrupt": 1}

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_frames, num_workers=0)
    batches = list(loader)
    assert [b["n_corrupt"] for b in batches] == [1, 0]
    assert [b["frame_id"].tolist() for b in batches] == [[0], [2, 3]]


def test_verify_catches_a_checksum_mismatch(dataset_dir, caplog):
    path = dataset_dir / "shard_00000" / "frames" / "00000002.hdf5"
    write_frame(path, make_frame(3) | {"attrs": {"frame_id": 2}})  # readable, but not what the index hashed
    assert isinstance(RenderedFrames(dataset_dir, augment=FrameAugment(size=16))[2], dict)
    with caplog.at_level(logging.WARNING, logger="synth.data"):
        assert isinstance(RenderedFrames(dataset_dir, augment=FrameAugment(size=16), verify=True)[2], CorruptSample)
    assert any(str(path) in r.getMessage() and "checksum" in r.getMessage() for r in caplog.records)


def test_augment_config_validation():
    assert FrameAugment(scale=[0.2, 0.9], ratio=[1, 2]).scale == (0.2, 0.9)
    for bad in ({"scale": (0.9, 0.2)}, {"scale": (0.0, 1.0)}, {"ratio": (2, 1)}, {"flip_prob": 1.5}, {"hue": 0.7},
                {"size": 0}):
        with pytest.raises(ValueError):
            FrameAugment(**bad)


def take(sampler: StepSampler, k: int) -> list[tuple[int, int]]:
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_step_sampler_resumes_where_a_run_left_off():
    n, B, k = 10, 4, 3
    full = take(StepSampler(n, seed=5, batch_size=B), 8 * B)
    resumed = take(StepSampler(n, seed=5, batch_size=B, start_step=k), 5 * B)
    assert resumed == full[k * B:]
    # Resuming computes the position, it does not replay: a huge step is immediate.
    start = time.perf_counter()
    take(StepSampler(n, seed=5, batch_size=B, start_step=10**12), 3)
    assert time.perf_counter() - start < 1.0


def test_step_sampler_epochs_are_fresh_permutations():
    n = 7
    items = take(StepSampler(n, seed=9, batch_size=3), 3 * n)
    epochs = [[i for i, _ in items[e * n:(e + 1) * n]] for e in range(3)]
    for e, order in enumerate(epochs):
        assert order == np.random.default_rng([9, e]).permutation(n).tolist()
    assert epochs[0] != epochs[1]
    seeds = [s for _, s in items]
    assert len(set(seeds)) == len(seeds)  # a frame seen again is augmented differently


def test_step_sampler_ranks_split_each_global_batch():
    n, B, world = 11, 4, 3
    steps = 5
    single = take(StepSampler(n, seed=1, batch_size=B * world), steps * B * world)
    per_rank = [take(StepSampler(n, seed=1, batch_size=B, rank=r, world_size=world), steps * B)
                for r in range(world)]
    for step in range(steps):
        shares = [per_rank[r][step * B:(step + 1) * B] for r in range(world)]
        union = [item for share in shares for item in share]
        assert len(set(union)) == B * world  # disjoint
        assert sorted(union) == sorted(single[step * B * world:(step + 1) * B * world])
    resumed = take(StepSampler(n, seed=1, batch_size=B, rank=2, world_size=world, start_step=2), B)
    assert resumed == per_rank[2][2 * B:3 * B]


def test_streaming_waits_for_frames_then_picks_up_new_shards(tmp_path):
    root = tmp_path / "live"
    root.mkdir()
    stream = StreamingFrames(root, augment=FrameAugment(size=16), refresh_s=0.05, wait_s=0.02)
    writer = threading.Timer(0.2, make_dataset, args=(root, [0, 1]))
    writer.start()
    it = iter(stream)
    start = time.perf_counter()
    first = next(it)
    writer.join()
    assert time.perf_counter() - start >= 0.15  # it waited for the shard
    assert first["frame_id"].item() in {0, 1} and first["image"].shape == (3, 16, 16)

    make_dataset(root, [10, 11], shard=1)  # rendered while training runs
    seen = {next(it)["frame_id"].item() for _ in range(40)}
    assert seen == {0, 1, 10, 11}


def test_streaming_draws_from_every_folder_and_skips_corrupt_frames(tmp_path, caplog):
    make_dataset(tmp_path / "a", [0, 1, 2])
    make_dataset(tmp_path / "b", [100, 101])
    bad = tmp_path / "a" / "shard_00000" / "frames" / "00000001.hdf5"
    bad.write_bytes(b"not an hdf5 file")
    stream = StreamingFrames([str(tmp_path / "a"), str(tmp_path / "b")], augment=FrameAugment(size=16), seed=2,
                             refresh_s=0.05, wait_s=0.01)
    with caplog.at_level(logging.WARNING, logger="synth.data"):
        it = iter(stream)
        ids = [next(it)["frame_id"].item() for _ in range(40)]
    assert set(ids) == {0, 2, 100, 101}
    warnings = [r for r in caplog.records if str(bad) in r.getMessage()]
    assert len(warnings) == 1  # remembered, not re-read after every scan

    # Streams of different ranks (and, alike, DataLoader workers) are seeded differently.
    def first_ids(rank):
        s = StreamingFrames(tmp_path / "b", augment=FrameAugment(size=16), rank=rank, world_size=2)
        it = iter(s)
        return [next(it)["cam_K"].flatten().tolist() for _ in range(3)]

    assert first_ids(0) != first_ids(1)
    assert first_ids(0) == first_ids(0)


def _one_scene_per_frame(shard_dir: Path) -> None:
    """Give every frame of a test shard its own scene (seed = frame id), index replaced atomically."""
    records = [json.loads(line) for line in (shard_dir / "index.jsonl").read_text().splitlines()]
    tmp = shard_dir / "index.jsonl.tmp"
    tmp.write_text("".join(json.dumps({**r, "scene_seed": r["frame_id"]}) + "\n" for r in records))
    os.replace(tmp, shard_dir / "index.jsonl")


def test_streaming_uses_new_shards_within_seconds_and_never_trains_on_held_out_scenes(tmp_path):
    root = tmp_path / "live"
    _one_scene_per_frame(make_dataset(root, range(0, 6)))
    stream = StreamingFrames(root, augment=FrameAugment(size=16), refresh_s=0.1, holdout=0.4, wait_s=0.01)
    it = iter(stream)
    seen = {next(it)["frame_id"].item() for _ in range(12)}
    held = {i for i in range(6) if held_out_scene(i, 0.4)}
    assert held and seen == set(range(6)) - held  # every training frame drawn early, no held-out one

    _one_scene_per_frame(make_dataset(root, range(100, 106), shard=1))  # a shard lands while training runs
    new = {i for i in range(100, 106) if not held_out_scene(i, 0.4)}
    start, drawn = time.monotonic(), []
    while not new <= set(drawn):
        drawn.append(next(it)["frame_id"].item())
        assert time.monotonic() - start < 5, f"new frames {new} not all drawn within 5 s: {drawn}"
    assert not set(drawn) & {i for i in range(100, 106) if held_out_scene(i, 0.4)}
    # Unused frames come first: once the rescan has seen the new shard (how many draws that takes depends on the
    # machine's speed within refresh_s), it is used up well before the old frames are drawn as often.
    first_new = next(i for i, frame in enumerate(drawn) if frame in new)
    assert len(drawn) - first_new <= 4 * len(new) + 10

    # The held-out side, re-scanned as the dataset grows (what evaluation reads).
    live = LiveFrames(root, augment=FrameAugment(size=16, train=False), holdout=0.4)
    assert sorted(r["frame_id"] for _, r in live.frames) == sorted(
        i for i in [*range(6), *range(100, 106)] if held_out_scene(i, 0.4))
    _one_scene_per_frame(make_dataset(root, range(200, 206), shard=2))
    assert live.refresh() == len([i for i in [*range(6), *range(100, 106), *range(200, 206)]
                                  if held_out_scene(i, 0.4)])
