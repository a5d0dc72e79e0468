"""A PNG grid of rendered frames: RGB, depth, normals, instances and contours side by side, one row a frame."""

import os
from pathlib import Path

import cv2
import numpy as np

from synth.frames import list_frames, read_frame
from synth.io import atomic_write_bytes

COLUMNS = ("rgb", "depth", "normals", "instances", "contours")


def colorize_depth(depth: np.ndarray) -> np.ndarray:
    """(H,W) metres -> (H,W,3) uint8 RGB, near = bright; no-surface pixels black."""
    valid = depth > 0
    out = np.zeros((*depth.shape, 3), np.uint8)
    if valid.any():
        inv = np.zeros_like(depth)
        inv[valid] = 1.0 / depth[valid]  # inverse depth spreads the near range where the detail is
        lo, hi = np.percentile(inv[valid], [2, 98])
        scaled = np.clip((inv - lo) / max(hi - lo, 1e-6), 0, 1)
        out = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_TURBO)[..., ::-1].copy()
        out[~valid] = 0
    return out


def colorize_normals(normals: np.ndarray) -> np.ndarray:
    """(H,W,3) unit vectors -> RGB with the usual (n+1)/2 mapping; no-surface pixels black."""
    out = ((normals + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    out[np.abs(normals).sum(-1) == 0] = 0
    return out


def colorize_instances(instances: np.ndarray) -> np.ndarray:
    """(H,W) ids -> RGB with a fixed random colour per id."""
    palette = np.random.default_rng(12345).integers(40, 256, size=(int(instances.max()) + 1, 3), dtype=np.uint8)
    return palette[instances]


def frame_row(frame: dict, cell: int) -> np.ndarray:
    contours = np.repeat(frame["contours"][..., None] * 255, 3, axis=-1).astype(np.uint8)
    rgb = frame["colors"].copy()
    for x1, y1, x2, y2 in frame["boxes"].astype(int):
        cv2.rectangle(rgb, (x1, y1), (x2 - 1, y2 - 1), (255, 255, 0), 1)
    cells = [rgb, colorize_depth(frame["depth"]), colorize_normals(frame["normals"]),
             colorize_instances(frame["instance_segmaps"]), contours]
    return np.concatenate([cv2.resize(c, (cell, cell), interpolation=cv2.INTER_NEAREST) for c in cells], axis=1)


def write_preview(out_dir: str | os.PathLike, path: str | os.PathLike, n_frames: int = 8, cell: int = 128) -> Path:
    """Write a grid of the first ``n_frames`` complete frames of a dataset to ``path`` (PNG)."""
    frames = list_frames(out_dir)[:n_frames]
    if not frames:
        raise FileNotFoundError(f"{out_dir} holds no complete frame to preview")
    rows = [frame_row(read_frame(shard / record["file"]), cell) for shard, record in frames]
    header = np.full((24, cell * len(COLUMNS), 3), 255, np.uint8)
    for i, name in enumerate(COLUMNS):
        cv2.putText(header, name, (i * cell + 6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    grid = np.concatenate([header, *rows], axis=0)
    path = Path(path)
    _, png = cv2.imencode(".png", grid[..., ::-1])
    atomic_write_bytes(path, png.tobytes())
    return path
