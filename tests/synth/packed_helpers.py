"""Hand-written shards for the packed-layout tests: random labels in the exact layout ``synth.frames`` reads.

Every label is a function of the pixel position where a test needs it to be (``instance_segmaps`` encodes the
pixel, ``depth`` too, exactly in float16), so a crop that cut two labels differently shows up as a mismatch.
"""

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

from synth.frames import FRAME_FIELDS


def make_frame(frame_id: int, h: int = 40, w: int = 48) -> dict:
    rng = np.random.default_rng(frame_id)
    v, u = np.mgrid[0:h, 0:w]
    position = (v * w + u).astype(np.int32)
    instances = position + 1
    instances[:3] = 0  # a strip with no surface
    depth = (0.25 + position / 256.0).astype(np.float32)  # exact in float16 below 2048 / 256 + 0.25
    depth[instances == 0] = 0.0
    normals = rng.normal(size=(h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    normals[instances == 0] = 0.0
    colors = np.stack([u * 5, v * 6, (u + v) * 2 + frame_id], -1).clip(0, 255).astype(np.uint8)
    n_boxes = int(rng.integers(1, 4))
    x1 = rng.integers(0, w - 4, n_boxes)
    y1 = rng.integers(3, h - 4, n_boxes)
    boxes = np.stack([x1, y1, x1 + rng.integers(1, w - x1 + 1), y1 + rng.integers(1, h - y1 + 1)], 1)
    return {
        "colors": colors,
        "depth": depth,
        "normals": normals,
        "category_id_segmaps": (instances % 5).astype(np.int32),
        "instance_segmaps": instances,
        "contours": ((u + 2 * v) % 3 == 0).astype(np.uint8),
        "boxes": boxes.astype(np.float32),
        "box_category_ids": rng.integers(1, 5, n_boxes).astype(np.int32),
        "box_instance_ids": (rng.permutation(99)[:n_boxes] + 1).astype(np.int32),  # distinct
        "cam_K": np.array([[40.0 + frame_id, 0.0, w / 2], [0.0, 41.0, h / 2], [0.0, 0.0, 1.0]]),
        "attrs": {"frame_id": frame_id, "scene_index": frame_id // 2, "view": frame_id % 2,
                  "cam2world_blender": rng.normal(size=(4, 4))},
    }


def write_frame(path: Path, frame: dict) -> None:
    with h5py.File(path, "w") as f:
        for key in FRAME_FIELDS:
            f.create_dataset(key, data=frame[key])
        f.create_dataset("instance_attribute_maps", data=np.bytes_(json.dumps([{"idx": 1, "name": "a",
                                                                                "category_id": 1}])))
        f.attrs.update(frame["attrs"])


def make_shard(root: Path, frame_ids, shard: int = 0, finished: bool = True, **size) -> Path:
    """A shard laid out as ``synth render`` leaves it; ``finished=False`` leaves out ``label_check.json`` (written
    last by the renderer), as in a shard still being rendered."""
    shard_dir = root / f"shard_{shard:05d}"
    (shard_dir / "frames").mkdir(parents=True, exist_ok=True)
    records = []
    for frame_id in frame_ids:
        name = f"frames/{frame_id:08d}.hdf5"
        write_frame(shard_dir / name, make_frame(frame_id, **size))
        records.append({"frame_id": frame_id, "scene_index": frame_id // 2, "scene_seed": frame_id // 2,
                        "view": frame_id % 2, "file": name,
                        "sha256": hashlib.sha256((shard_dir / name).read_bytes()).hexdigest()})
    (shard_dir / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (shard_dir / "label_check.json").write_text("{}")
        stamp = os.stat(shard_dir / "index.jsonl").st_mtime_ns
        os.utime(shard_dir / "label_check.json", ns=(stamp, stamp))
    return shard_dir
