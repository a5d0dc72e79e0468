"""Translated datasets: a rendered dataset folder with every image replaced by its translation, every label kept.

:func:`translate_dataset` runs a trained generator (:class:`adapt.translate.ResnetGenerator`, rendered to real)
over the complete frames of a ``synth render`` dataset and writes a new dataset folder with the same layout
(``dataset.json``, ``shard_*/index.jsonl``, ``frames/*.hdf5``, ``scenes/``, ``coco_annotations.json``,
``coco/images/``):

- each frame file is a copy of the source's in which only ``colors`` is replaced (same dtype, shape, chunking and
  compression); every other field and every attribute is copied by HDF5 itself, so the label bytes are identical;
- ``index.jsonl`` keeps every record, with the new file's ``sha256`` (so ``verify=True`` readers accept it) and
  the source file's as ``source_sha256``;
- ``coco/images/<frame>.jpg`` holds the translated image; ``coco_annotations.json``, ``scenes/``,
  ``label_check.json`` and ``coco/parts/`` are byte-identical copies;
- ``dataset.json`` is the source's, plus a ``translation`` entry (the checkpoint, its SHA-256 and step, the source
  folder and the generator's settings).

Every file is written under a temporary name and renamed. A rerun skips the frames whose translation is indexed
with the current source checksum, so an interrupted run resumes; a folder translated by another checkpoint is
refused, never mixed. :func:`synth.frames.list_frames` and :class:`synth.data.RenderedFrames` read the result
like any rendered dataset.
"""

import json
import os
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from adapt.translate import ResnetGenerator
from synth.frames import read_index, sha256
from synth.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text

#: Files and folders of a shard copied byte for byte (labels and metadata, no image).
COPIED = ("coco_annotations.json", "label_check.json", "render.log")
COPIED_FOLDERS = ("scenes", "coco/parts")


@torch.no_grad()
def translate_colors(generator: ResnetGenerator, colors: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    """Translate one (H, W, 3) uint8 RGB image with ``generator`` (any size), back to uint8 (rounded)."""
    image = torch.from_numpy(np.ascontiguousarray(colors)).permute(2, 0, 1)[None].float().div(127.5).sub(1.0)
    out = generator.translate(image.to(device)).float().clamp(-1, 1)
    return ((out[0].cpu() + 1.0) * 127.5).round().byte().permute(1, 2, 0).numpy()


def write_translated_frame(source: Path, target: Path, colors: np.ndarray) -> None:
    """Copy HDF5 frame ``source`` to ``target`` (atomically) with ``colors`` replaced; every other dataset and
    attribute is copied by ``h5py`` (same bytes, dtype, chunks and filters)."""
    with h5py.File(source, "r") as src, atomic_path(target) as tmp, h5py.File(tmp, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for key in src:
            if key != "colors":
                src.copy(src[key], dst, name=key)
                continue
            old = src[key]
            if old.shape != colors.shape or old.dtype != colors.dtype:
                raise ValueError(f"{source}: colors {old.shape} {old.dtype}, translation {colors.shape} "
                                 f"{colors.dtype}")
            new = dst.create_dataset(key, data=colors, chunks=old.chunks, compression=old.compression,
                                     compression_opts=old.compression_opts, shuffle=old.shuffle,
                                     fletcher32=old.fletcher32)
            for name, value in old.attrs.items():
                new.attrs[name] = value


def _copy_if_changed(source: Path, target: Path) -> None:
    if target.exists() and target.read_bytes() == source.read_bytes():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def _write_jpeg(path: Path, colors: np.ndarray, quality: int = 95) -> None:
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(colors, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"cannot encode {path} as JPEG")
    atomic_write_bytes(path, data.tobytes())


def _write_index(shard_dir: Path, records: dict[int, dict]) -> None:
    text = "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records))
    atomic_write_text(shard_dir / "index.jsonl", text)


def translate_dataset(generator: ResnetGenerator, source: str | os.PathLike, out_dir: str | os.PathLike, *,
                      provenance: dict, device: str | torch.device = "cpu", flush_every: int = 16) -> dict:
    """Write the translated copy of a rendered dataset (see the module docstring).

    Args:
        generator: The rendered-to-real generator (e.g. ``read_translator(...)[0].g_ab``).
        source: A ``synth render`` dataset folder.
        out_dir: The new dataset folder (not ``source`` nor inside it).
        provenance: Recorded under ``dataset.json["translation"]``; must hold ``checkpoint_sha256``, which a rerun
            compares to refuse mixing two translators in one folder.
        device: Where the generator runs.
        flush_every: Frames between two rewrites of a shard's index (a resumed run redoes at most this many).

    Returns:
        ``{"frames": complete frames of the source, "translated": written now, "skipped": already done}``.

    Raises:
        FileNotFoundError: ``source`` holds no complete frame.
        ValueError: ``out_dir`` is ``source`` (or inside it), or holds a translation by another checkpoint.
    """
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    if out_dir == source or source in out_dir.parents:
        raise ValueError(f"out_dir {out_dir} must not be the source dataset {source} or inside it")
    shards = sorted(p for p in source.glob("shard_*") if p.is_dir())
    if not any(read_index(shard) for shard in shards):
        raise FileNotFoundError(f"source: no complete rendered frame in {source}")
    if "checkpoint_sha256" not in provenance:
        raise ValueError("provenance needs checkpoint_sha256")
    manifest_path = out_dir / "dataset.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text()).get("translation", {})
        if previous.get("checkpoint_sha256") != provenance["checkpoint_sha256"]:
            raise ValueError(f"out_dir {out_dir} holds a translation by another checkpoint "
                             f"({previous.get('checkpoint')}); pick another out_dir or delete it")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((source / "dataset.json").read_text()) if (source / "dataset.json").exists() else {}
    manifest["translation"] = {**provenance, "source": str(source)}
    atomic_write_json(manifest_path, manifest, indent=2, sort_keys=True)

    generator = generator.to(device).eval()
    counts = {"frames": 0, "translated": 0, "skipped": 0}
    todo = []
    for shard in shards:
        records = read_index(shard)
        target = out_dir / shard.name
        (target / "frames").mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            if (shard / name).is_file():
                _copy_if_changed(shard / name, target / name)
        for folder in COPIED_FOLDERS:
            for path in sorted((shard / folder).glob("*")) if (shard / folder).is_dir() else []:
                if path.is_file():
                    _copy_if_changed(path, target / folder / path.name)
        done = {}
        for record in read_index(target):
            path = target / record["file"]
            if path.is_file() and sha256(path) == record["sha256"]:
                done[record["frame_id"]] = record
        current = {r["frame_id"]: r for r in records}
        # Keep only translations of the source's current frames (a re-rendered frame has a new checksum).
        kept = {k: r for k, r in done.items() if k in current and r.get("source_sha256") == current[k]["sha256"]}
        counts["frames"] += len(records)
        counts["skipped"] += len(kept)
        todo.append((shard, target, records, kept))

    progress = tqdm(total=counts["frames"] - counts["skipped"], desc="translating frames", unit="frame")
    for shard, target, records, kept in todo:
        pending = 0
        for record in records:
            if record["frame_id"] in kept:
                continue
            with h5py.File(shard / record["file"], "r") as f:
                colors = f["colors"][()]
            translated = translate_colors(generator, colors, device)
            frame_path = target / record["file"]
            frame_path.parent.mkdir(parents=True, exist_ok=True)
            write_translated_frame(shard / record["file"], frame_path, translated)
            if (shard / "coco" / "images").is_dir():
                (target / "coco" / "images").mkdir(parents=True, exist_ok=True)
                _write_jpeg(target / "coco" / "images" / f"{record['frame_id']:08d}.jpg", translated)
            kept[record["frame_id"]] = {**record, "sha256": sha256(frame_path), "source_sha256": record["sha256"]}
            counts["translated"] += 1
            pending += 1
            progress.update(1)
            if pending >= flush_every:
                _write_index(target, kept)
                pending = 0
        _write_index(target, kept)
    progress.close()
    return counts


__all__ = ["translate_colors", "translate_dataset", "write_translated_frame"]
