"""A training-ready copy of rendered shards: contiguous, memory-mapped arrays, read one slice per batch.

The HDF5 frames and COCO files stay the interchange format; ``synth pack`` (:func:`pack_shard`) writes beside them,
per shard, one ``.npy`` array per field with the frames of the shard stacked in frame-id order::

    shard_00000/packed/
      colors.npy               (N, H, W, 3) uint8
      depth.npy                (N, H, W) float16     (float16 of the HDF5 float32; see CONVERTED)
      normals.npy              (N, H, W, 3) float16
      contours.npy             (N, H, W) uint8
      instance_segmaps.npy     (N, H, W) as rendered (int32)
      category_id_segmaps.npy  (N, H, W) as rendered (int32)
      cam_K.npy                (N, 3, 3) as rendered (float64)
      frame_id.npy             (N,) int64
      boxes.npy, box_category_ids.npy, box_instance_ids.npy    all boxes of the shard, frame after frame
      box_offsets.npy          (N + 1,) int64: frame i owns rows box_offsets[i]:box_offsets[i + 1]
      attrs.jsonl              per frame: the HDF5 attributes and instance_attribute_maps
      pack.json                written last: the completion mark (index.jsonl's SHA-256, packed records)

Every file is written under a temporary name and renamed (:func:`synth.io.atomic_path`); ``pack.json`` is removed
before a re-pack starts and written after every array is in place, so a pack is used only when it is complete and
was made from the shard's current ``index.jsonl``. A shard whose render has not finished is skipped.

:class:`PackedFrames` is the map-style dataset over packs: the keys, item contract and frame order of
:class:`synth.data.RenderedFrames`, so the engine's sampler and the objectives do not change. Through a DataLoader
it reads a whole batch at once (``__getitems__``: one fancy-index read per shard and array) and augments it with
:class:`synth.batch_augment.BatchAugment` on ``device``.
"""

import fcntl
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from synth.batch_augment import BatchAugment
from synth.data import LIST_FIELDS, FrameAugment, FramePool, _as_roots, _derive_seed
from synth.frames import FRAME_FIELDS, CorruptFrameError, read_frame, read_index, sha256
from synth.io import atomic_path, atomic_write_json, atomic_write_text, clear_stale_temporaries

logger = logging.getLogger(__name__)

PACK_DIR = "packed"
PACK_FORMAT = 1
#: Fields stored in another dtype than the HDF5's: read back, they equal ``hdf5_value.astype(dtype)`` exactly.
CONVERTED = {"depth": np.float16, "normals": np.float16}
#: Per-frame arrays (first axis = frame); the box fields are ragged (see ``box_offsets``).
DENSE_FIELDS = ("colors", "depth", "normals", "contours", "instance_segmaps", "category_id_segmaps", "cam_K")
BOX_FIELDS = ("boxes", "box_category_ids", "box_instance_ids")
#: What training reads (categories are packed for completeness but not read per batch).
TRAINING_FIELDS = ("colors", "depth", "normals", "contours", "instance_segmaps", "cam_K")


class PackMissingError(FileNotFoundError):
    """A shard has no complete pack made from its current index; the message names the shard and the fix."""


def index_digest(shard_dir: str | os.PathLike) -> str:
    """SHA-256 of the shard's ``index.jsonl``: what a pack is keyed by."""
    return sha256(Path(shard_dir) / "index.jsonl")


def unfinished(shard_dir: str | os.PathLike) -> str | None:
    """Why a shard cannot be packed yet (its render has not finished), or None when it can.

    ``synth render`` rewrites ``index.jsonl`` after every scene and writes ``label_check.json`` last, so a shard is
    finished when ``label_check.json`` exists and is not older than the index.
    """
    shard_dir = Path(shard_dir)
    index, check = shard_dir / "index.jsonl", shard_dir / "label_check.json"
    if not index.exists():
        return "no index.jsonl (nothing rendered yet)"
    if not check.exists() or check.stat().st_mtime_ns < index.stat().st_mtime_ns:
        return "still being rendered, or its render was interrupted (label_check.json, written last, is missing " \
               "or older than index.jsonl)"
    return None


def read_pack_meta(shard_dir: str | os.PathLike) -> dict | None:
    """The shard's ``pack.json`` if it is complete and matches the current index, else None."""
    shard_dir = Path(shard_dir)
    path = shard_dir / PACK_DIR / "pack.json"
    if not path.exists() or not (shard_dir / "index.jsonl").exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != PACK_FORMAT or meta.get("index_sha256") != index_digest(shard_dir):
        return None
    return meta


def _write_array(folder: Path, name: str, array: np.ndarray) -> None:
    with atomic_path(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def pack_shard(shard_dir: str | os.PathLike) -> tuple[str, str]:
    """Pack one shard (resumable: an up-to-date pack is kept, a torn one is redone).

    Frames whose file does not match its index checksum are left out (logged and listed in ``pack.json``).

    Returns:
        ``(status, message)``: status ``"packed"``, ``"current"`` (nothing to do) or ``"skipped"`` (render not
        finished, or another process holds the shard).
    """
    shard_dir = Path(shard_dir)
    with open(shard_dir / ".lock", "a") as lock:
        try:  # synth render holds this lock while it writes the shard
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return "skipped", f"{shard_dir}: skipped, being rendered (or packed) by another process"
        reason = unfinished(shard_dir)
        if reason is not None:
            return "skipped", f"{shard_dir}: skipped, {reason}; pack it once its render has finished"
        if read_pack_meta(shard_dir) is not None:
            return "current", f"{shard_dir}: pack is up to date"
        digest = index_digest(shard_dir)
        out = shard_dir / PACK_DIR
        out.mkdir(exist_ok=True)
        clear_stale_temporaries(out)
        (out / "pack.json").unlink(missing_ok=True)  # from here on, the old pack (if any) is not used
        records, skipped = [], []
        for record in read_index(shard_dir):
            path = shard_dir / record["file"]
            if not path.is_file() or sha256(path) != record["sha256"]:
                logger.warning("not packing %s: missing or checksum mismatch with %s", path, shard_dir / "index.jsonl")
                skipped.append(record["file"])
            else:
                records.append(record)
        n = len(records)
        if n == 0:
            return "skipped", f"{shard_dir}: skipped, no intact frame"
        _pack_frames(shard_dir, out, records)
        atomic_write_json(out / "pack.json", {"format": PACK_FORMAT, "index_sha256": digest, "n_frames": n,
                                              "records": records, "skipped": skipped,
                                              "converted": {k: np.dtype(v).name for k, v in CONVERTED.items()}},
                          indent=1)
    left_out = f", {len(skipped)} corrupt frame(s) left out" if skipped else ""
    return "packed", f"{shard_dir}: packed {n} frames{left_out}"


def _pack_frames(shard_dir: Path, out: Path, records: list[dict]) -> None:
    """Read every frame once and write each array; each array is renamed into place when complete."""
    first = read_frame(shard_dir / records[0]["file"])
    n = len(records)
    dense = {k: np.empty((n, *np.shape(first[k])), CONVERTED.get(k, np.asarray(first[k]).dtype)) for k in DENSE_FIELDS}
    boxes = {k: [] for k in BOX_FIELDS}
    frame_ids, attrs = np.empty(n, np.int64), []
    for i, record in enumerate(records):
        path = shard_dir / record["file"]
        frame = first if i == 0 else read_frame(path)
        for key in DENSE_FIELDS:
            value = np.asarray(frame[key])
            if value.shape != dense[key].shape[1:]:
                raise CorruptFrameError(f"{path}: {key} has shape {value.shape}, the shard's first frame "
                                        f"{dense[key].shape[1:]}")
            dense[key][i] = value
            if key in CONVERTED and not np.isfinite(dense[key][i]).all() and np.isfinite(value).all():
                raise ValueError(f"{path}: {key} overflows {np.dtype(CONVERTED[key]).name}")
        boxes["boxes"].append(np.asarray(frame["boxes"], np.float32).reshape(-1, 4))
        for key in BOX_FIELDS[1:]:
            boxes[key].append(np.asarray(frame[key]).reshape(-1))
        frame_ids[i] = int(frame["attrs"]["frame_id"])
        attrs.append({"attrs": _plain(frame["attrs"]), "instance_attribute_maps": frame["instance_attribute_maps"]})
    for key, value in dense.items():
        _write_array(out, key, value)
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in boxes["boxes"]])]).astype(np.int64)
    _write_array(out, "box_offsets", offsets)
    for key, parts in boxes.items():
        _write_array(out, key, np.concatenate(parts))
    _write_array(out, "frame_id", frame_ids)
    atomic_write_text(out / "attrs.jsonl", "".join(json.dumps(a) + "\n" for a in attrs))


def _plain(value):
    """JSON-able copy of HDF5 attributes (numpy scalars and arrays as Python numbers and lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, bytes):
        return value.decode()
    return value


def pack_dataset(root: str | os.PathLike) -> list[tuple[str, str]]:
    """:func:`pack_shard` over every shard of a dataset folder; returns each shard's ``(status, message)``."""
    shards = sorted(Path(root).glob("shard_*"))
    if not shards:
        raise FileNotFoundError(f"{root}: no shard_* folder (render it first with `synth render out_dir={root}`)")
    return [pack_shard(shard) for shard in shards]


class PackedShard:
    """Read access to one shard's pack (arrays memory-mapped on first use, in each process).

    Raises:
        PackMissingError: no complete pack of the current index.
    """

    def __init__(self, shard_dir: str | os.PathLike):
        self.shard_dir = Path(shard_dir)
        meta = read_pack_meta(self.shard_dir)
        if meta is None:
            raise PackMissingError(f"{self.shard_dir}: no up-to-date pack (run `synth pack data.roots="
                                   f"[{self.shard_dir.parent}]`; a shard still being rendered cannot be packed: wait, "
                                   f"or train with data.streaming=true or data.packed=false)")
        self.records: list[dict] = meta["records"]
        self._arrays: dict[str, np.ndarray] = {}
        self.height, self.width = self.array("colors").shape[1:3]

    def __getstate__(self) -> dict:  # workers map the files themselves instead of receiving copies
        return {**self.__dict__, "_arrays": {}}

    def __len__(self) -> int:
        return len(self.records)

    def array(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            mode = "r" if name in DENSE_FIELDS else None  # the small arrays are read whole
            self._arrays[name] = np.load(self.shard_dir / PACK_DIR / f"{name}.npy", mmap_mode=mode)
        return self._arrays[name]

    def read(self, rows: np.ndarray, fields: Sequence[str] = TRAINING_FIELDS) -> dict[str, np.ndarray]:
        """Rows ``rows`` (ascending reads fastest) as stacked arrays; boxes concatenated with ``box_offsets``."""
        rows = np.asarray(rows, np.int64)
        out = {name: self.array(name)[rows] for name in fields}
        out["frame_id"] = self.array("frame_id")[rows]
        offsets = self.array("box_offsets")
        starts, ends = offsets[rows], offsets[rows + 1]
        box_rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)]) if len(rows) else []
        box_rows = np.asarray(box_rows, np.int64)
        for name in BOX_FIELDS:
            out[name] = self.array(name)[box_rows]
        out["box_offsets"] = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return out

    def frame(self, row: int) -> dict:
        """Frame ``row`` with the keys of :func:`synth.frames.read_frame` (``CONVERTED`` fields as stored)."""
        data = self.read(np.array([row]), (*FRAME_FIELDS[:6], "cam_K"))
        frame = {k: v[0] for k, v in data.items() if k not in BOX_FIELDS and k not in ("box_offsets", "frame_id")}
        frame.update({k: data[k] for k in BOX_FIELDS})
        with open(self.shard_dir / PACK_DIR / "attrs.jsonl") as f:
            extra = json.loads(f.readlines()[row])
        return {**frame, **extra}


class PackedFrames(FramePool):
    """:class:`synth.data.RenderedFrames` over packed shards, augmented per batch.

    Same frame order (folder by folder, then frame id), keys (``index`` or ``(index, sample_seed)``), sample seeds
    and output keys as RenderedFrames; a sample gets the same crop window, flip and jitter draws as RenderedFrames
    gives it, with labels exactly equal to FrameAugment's on the packed (float16 depth/normals) values.

    Args:
        roots: Dataset folder(s), every shard packed by ``synth pack``.
        augment: The augmentation recipe (applied by :class:`synth.batch_augment.BatchAugment`).
        seed: Seed of the per-sample augmentation for plain int keys.
        device: Where batches are augmented and returned: the training device when the DataLoader has no
            workers (reading a batch is a few memory copies), ``"cpu"`` inside DataLoader workers.

    Raises:
        PackMissingError: a shard with frames has no up-to-date pack.
        ValueError: no frame at all.
    """

    def __init__(self, roots: str | list[str], *, augment: FrameAugment, seed: int = 0,
                 device: str | torch.device = "cpu"):
        self.roots = _as_roots(roots)
        self.augment = augment
        self.seed = seed
        self.device = torch.device(device)
        self.shards: list[PackedShard] = []
        self.frames: list[tuple[Path, dict]] = []
        where = []
        for root in self.roots:
            items = []
            for shard_dir in sorted(root.glob("shard_*")):
                if not read_index(shard_dir):
                    continue
                shard = PackedShard(shard_dir)
                items += [(record["frame_id"], shard_dir, record, len(self.shards), row)
                          for row, record in enumerate(shard.records)]
                self.shards.append(shard)
            items.sort(key=lambda item: item[0])
            self.frames += [(shard_dir, record) for _, shard_dir, record, _, _ in items]
            where += [(shard, row) for *_, shard, row in items]
        if not self.frames:
            raise ValueError(f"no packed frames in {', '.join(map(str, self.roots))}")
        self._where = np.array(where, np.int64).reshape(-1, 2)

    def _restrict(self, indices: Sequence[int]) -> None:
        self._where = self._where[np.asarray(indices, np.int64)].reshape(-1, 2)

    def _keys(self, keys: Sequence) -> tuple[np.ndarray, list[int]]:
        indices, seeds = [], []
        for key in keys:
            index, sample_seed = key if isinstance(key, tuple | list) else (key, None)
            index = range(len(self.frames))[int(index)]
            indices.append(index)
            seeds.append(_derive_seed(self.seed, index) if sample_seed is None else int(sample_seed))
        return np.array(indices, np.int64), seeds

    def read(self, indices: np.ndarray) -> list[tuple[np.ndarray, dict]]:
        """Raw frames of ``indices``, one slice per shard and array: ``(positions in indices, arrays)`` groups,
        one per frame size (a single group in key order when every shard has the same size)."""
        where = self._where[indices]
        shards = np.unique(where[:, 0])
        if len(shards) == 1:
            return [(np.arange(len(indices)), self.shards[shards[0]].read(where[:, 1]))]
        by_size: dict[tuple[int, int], list] = {}
        for shard in shards:
            positions = np.flatnonzero(where[:, 0] == shard)
            size = (self.shards[shard].height, self.shards[shard].width)
            by_size.setdefault(size, []).append((positions, self.shards[shard].read(where[positions, 1])))
        return [_in_order(groups) for groups in by_size.values()]

    def __getitems__(self, keys: Sequence) -> dict:
        """A whole batch (what :func:`synth.data.collate_frames` makes of RenderedFrames' samples, plus
        ``n_corrupt=0``); the DataLoader calls this instead of ``__getitem__`` per key."""
        indices, seeds = self._keys(keys)
        augment = BatchAugment(self.augment)
        parts = []
        for positions, arrays in self.read(indices):
            frames = {k: torch.from_numpy(v) for k, v in arrays.items()}
            frames.update({k: frames[k].to(self.device, non_blocking=True) for k in (*TRAINING_FIELDS, "frame_id")})
            parts.append((positions, augment(frames, torch.tensor([seeds[p] for p in positions]))))
        return {**_merge(parts, len(indices)), "n_corrupt": 0}

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """One sample (as RenderedFrames returns it); use a DataLoader for speed."""
        batch = self.__getitems__([key])
        batch.pop("n_corrupt")
        return {k: v[0] for k, v in batch.items()}


def _in_order(groups: list[tuple[np.ndarray, dict]]) -> tuple[np.ndarray, dict]:
    """Join raw frames read from several shards of one frame size, sorted by position in the batch."""
    positions = np.concatenate([p for p, _ in groups])
    order = np.argsort(positions, kind="stable")
    out = {k: np.concatenate([g[k] for _, g in groups])[order] for k in groups[0][1] if k not in BOX_FIELDS
           and k != "box_offsets"}
    per_frame = {k: [part for _, g in groups for part in np.split(g[k], g["box_offsets"][1:-1])] for k in BOX_FIELDS}
    for k, parts in per_frame.items():
        out[k] = np.concatenate([parts[i] for i in order])
    counts = np.array([len(per_frame["boxes"][i]) for i in order], np.int64)
    out["box_offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return positions[order], out


def _merge(parts: list[tuple[np.ndarray, dict]], n: int) -> dict:
    """Put augmented groups back in key order."""
    if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(n)):
        return parts[0][1]
    order = np.argsort(np.concatenate([p for p, _ in parts]), kind="stable")
    batch = {}
    for key in parts[0][1]:
        if key in LIST_FIELDS:
            values = [v for _, b in parts for v in b[key]]
            batch[key] = [values[i] for i in order]
        else:
            value = torch.cat([b[key] for _, b in parts])
            batch[key] = value[torch.from_numpy(order).to(value.device)]
    return batch
