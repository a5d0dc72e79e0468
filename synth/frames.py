"""Read rendered shards: the index (source of truth for what is complete) and per-frame HDF5 files."""

import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np


class CorruptFrameError(OSError):
    """A frame file is unreadable, truncated or misses a field; the message names the file."""


FRAME_FIELDS = ("colors", "depth", "normals", "category_id_segmaps", "instance_segmaps", "contours", "boxes",
                "box_category_ids", "box_instance_ids", "cam_K")


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, as recorded in the shard index."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_index(shard_dir: str | os.PathLike) -> list[dict]:
    """Records of the complete frames of a shard, sorted by frame id (empty if the shard has none yet)."""
    path = Path(shard_dir) / "index.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: r["frame_id"])


def list_frames(out_dir: str | os.PathLike) -> list[tuple[Path, dict]]:
    """(shard folder, index record) of every complete frame of a dataset, in frame-id order."""
    frames = [(shard, record) for shard in sorted(Path(out_dir).glob("shard_*")) for record in read_index(shard)]
    return sorted(frames, key=lambda item: item[1]["frame_id"])


def read_frame(path: str | os.PathLike) -> dict:
    """All fields of one frame as numpy arrays, plus ``attrs`` (frame id, scene, camera pose) and the decoded
    ``instance_attribute_maps`` (instance index -> object name and category).

    Raises:
        CorruptFrameError: the file cannot be read or a field is missing.
    """
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in FRAME_FIELDS if k not in f]
            if missing:
                raise CorruptFrameError(f"{path}: missing field(s) {missing}")
            frame = {k: f[k][()] for k in FRAME_FIELDS}
            frame["instance_attribute_maps"] = json.loads(f["instance_attribute_maps"][()])
            frame["attrs"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in f.attrs.items()}
    except CorruptFrameError:
        raise
    except (OSError, KeyError, ValueError) as error:
        raise CorruptFrameError(f"{path}: unreadable frame ({error})") from error
    return frame
