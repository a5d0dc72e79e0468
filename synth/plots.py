"""Pictures people look at: loss curves from the training log, and input / predicted / true map grids."""

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np
import torch

from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.io import atomic_path
from synth.preview import colorize_depth, colorize_normals


def plot_curves(log_path: str | os.PathLike, png_path: str | os.PathLike) -> Path | None:
    """One panel per objective loss (plus the total), from ``train_log.jsonl``; returns the PNG path."""
    path = Path(log_path)
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line]
    keys = ["loss", *sorted({k for r in rows for k in r if k.endswith("/loss")})]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*points, strict=True), lw=1.5)
        ax.set_title("total (weighted)" if key == "loss" else key.removesuffix("/loss"), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if all(v > 0 for _, v in points):
            ax.set_yscale("log")
    return save_figure(fig, png_path)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG atomically (a reader never sees half a file) and close it; returns ``path``."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return path


def _to_rgb(kind: str, tensor: torch.Tensor) -> np.ndarray:
    """One sample's map (C,H,W) as (H,W,3) uint8, drawn like the render preview."""
    array = tensor.detach().float().cpu().numpy()
    if kind == "image":
        image = array.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
        return (np.clip(image, 0, 1) * 255).astype(np.uint8)
    if kind == "rgb":  # an RGB prediction in [0, 1] (colorization, inpainting)
        return (np.clip(array.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8)
    if kind == "depth":
        return colorize_depth(array[0])
    if kind == "normals":
        return colorize_normals(array.transpose(1, 2, 0))
    gray = (np.clip(array[0], 0, 1) * 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def prediction_grid(batch: dict, predictions: dict[str, tuple[str, torch.Tensor]], path: str | os.PathLike) -> Path:
    """Rows are samples; columns are the input, then predicted and true map of each head.

    Args:
        batch: Batch with ``image`` (B,3,H,W) and the target maps named by each prediction.
        predictions: Head name -> (target key, prediction (B,C,H,W) in the target's units; for the target
            ``image``, RGB in [0, 1]).
        path: PNG to write.
    """
    n = batch["image"].shape[0]
    columns = [("input", [_to_rgb("image", batch["image"][i]) for i in range(n)])]
    for name, (target, prediction) in predictions.items():
        valid = batch.get("valid")
        shown = prediction if valid is None or target != "depth" else prediction * valid
        kind = "rgb" if target == "image" else target
        columns.append((f"{name} pred", [_to_rgb(kind, shown[i]) for i in range(n)]))
        columns.append((f"{name} true", [_to_rgb(target, batch[target][i]) for i in range(n)]))
    fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n + 0.3), squeeze=False)
    for col, (title, images) in enumerate(columns):
        for row, image in enumerate(images):
            ax = axes[row][col]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    return save_figure(fig, path, dpi=100)
