"""One shard of a dataset: plan its scenes, run render workers over what is missing, keep the index true.

A dataset is ``n_frames`` frames from ``ceil(n_frames / views)`` scenes; scene ``s`` has the seed
``scene_seed(seed, s)`` and frames ``s * views + v``. Shards are fixed slices of ``scenes_per_shard`` scenes, so
they are independent jobs (see :mod:`apps.render`): more frames means more shards, never a bigger process.

Layout of a shard (everything written under a temporary name, then renamed)::

    shard_00003/
      index.jsonl            one line per complete frame: frame_id, scene_index, scene_seed, view, file, sha256
      frames/00000042.hdf5   BlenderProc's HDF5 writer, plus our contours, boxes and camera fields
      scenes/00000021.json   the SceneSpec, enough to re-render the scene
      coco/images/...jpg     BlenderProc's COCO writer output, renumbered to global frame ids
      coco_annotations.json  merged COCO annotations of the shard
      label_check.json       open3d normal-consistency check and exact support-plane check
      render.log             what Blender printed

The index is the source of truth: on a rerun, frames listed there whose file still matches its checksum are
kept; every other scene of the shard is rendered again.
"""

import contextlib
import ctypes
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from render import labels
from render.worker import EXECUTION_KEYS, LATER_KEYS, PROGRESS_PREFIX, RenderSettings
from synth.config import differences
from synth.frames import read_frame, read_index, sha256
from synth.io import atomic_write_json, atomic_write_text
from synth.sampling import SceneSampler, scene_seed

#: How a shard locked by another render is reported (the app tells it apart from real failures).
LOCKED = "is being rendered by another process"


class RenderError(RuntimeError):
    """A worker failed; the message names the scene and the log file."""


class DatasetMismatchError(ValueError):
    """The output folder holds a dataset rendered with different settings."""


def n_scenes(n_frames: int, views: int) -> int:
    return math.ceil(n_frames / views)


def n_shards(n_frames: int, views: int, scenes_per_shard: int) -> int:
    return math.ceil(n_scenes(n_frames, views) / scenes_per_shard)


def shard_scenes(shard: int, *, n_frames: int, views: int, scenes_per_shard: int) -> dict[int, list[int]]:
    """Scene index -> global frame ids of that scene, for the scenes of ``shard``."""
    first = shard * scenes_per_shard
    last = min(first + scenes_per_shard, n_scenes(n_frames, views))
    return {s: [f for f in range(s * views, (s + 1) * views) if f < n_frames] for s in range(first, last)}


def write_index(shard_dir: Path, records: dict[int, dict]) -> None:
    """Rewrite the index atomically (a kill never leaves a torn line)."""
    atomic_write_text(shard_dir / "index.jsonl",
                      "".join(json.dumps(records[k], sort_keys=True) + "\n" for k in sorted(records)))


def dataset_manifest(sampler: SceneSampler, settings: RenderSettings, *, seed: int, scenes_per_shard: int) -> dict:
    """What identifies a dataset: frames rendered with a different manifest must not be mixed into it."""
    return {
        "format": 1,
        "seed": seed,
        "scenes_per_shard": scenes_per_shard,
        "scene": {"family": sampler.family, **dataclasses.asdict(sampler)},
        "render": dataclasses.asdict(settings),
        "categories": {str(k): v for k, v in sampler.categories.items()},
        "conventions": {
            "depth": "planar depth (z) in metres, float32; 0 = no surface",
            "normals": "unit vectors in the OpenCV camera frame (x right, y down, z forward); 0 = no surface",
            "contours": "uint8 {0,1}: instance boundaries or near side of depth jumps",
            "boxes": "float32 xyxy pixels, x2/y2 exclusive, objects only (category != 0)",
            "cam2world_blender": "4x4 camera-to-world, Blender camera (looks down -z, y up)",
        },
    }


def claim_manifest(out_dir: Path, manifest: dict) -> None:
    """Write ``dataset.json`` or check that the existing one matches; never mixes two datasets in a folder."""
    path = out_dir / "dataset.json"
    if path.exists():
        existing = json.loads(path.read_text())
        if isinstance(existing.get("render"), dict):  # written before a setting existed: its value then
            existing["render"] = {**LATER_KEYS, **existing["render"]}
        # Threads, devices and worker lifetimes say how frames are rendered, not what they hold: a resume may change
        # them (e.g. on a cluster with other CPUs per task, or a GPU).
        different = differences({k: existing.get(k) for k in manifest}, manifest,
                                ignore=tuple(f"render.{key}" for key in EXECUTION_KEYS))
        if different:
            shown = "; ".join(different[:4]) + (f"; and {len(different) - 4} more" if len(different) > 4 else "")
            raise DatasetMismatchError(
                f"{path} describes a dataset rendered with other settings ({shown}); render into a new out_dir, or "
                f"delete {out_dir} to start over")
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, manifest, indent=2, sort_keys=True)


def _die_with_parent() -> None:
    """Linux: the worker gets SIGKILL when its parent dies, so a killed run leaves no orphan writing files."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class ShardReport:
    shard: int
    frames: int
    rendered_scenes: int
    label_check: dict


def render_shard(*, sampler: SceneSampler, settings: RenderSettings, out_dir: str | os.PathLike, shard: int,
                 seed: int, n_frames: int, scenes_per_shard: int, label_check_frames: int = 8,
                 label_check_max_deg: float | None = None, verify: bool = True,
                 progress: bool = True) -> ShardReport:
    """Render whatever is missing from one shard.

    Args:
        sampler: Scene family sampler.
        settings: Render settings.
        out_dir: Dataset folder (holds ``dataset.json`` and the ``shard_*`` folders).
        shard: Shard number.
        seed: Dataset seed.
        n_frames: Frames in the whole dataset.
        scenes_per_shard: Scenes per shard.
        label_check_frames: Frames of the shard checked with open3d (0 disables the check).
        label_check_max_deg: Fail when the mean normal disagreement exceeds this, or when the support-plane check
            exceeds ``SUPPORT_PLANE_MAX_DEG`` / ``SUPPORT_PLANE_MAX_DEPTH_REL_ERROR`` (None: report only).
        verify: Re-hash indexed frames to catch corrupt files before trusting them.
        progress: Show a progress bar.

    Raises:
        SceneSamplingError, SceneConfigError: before anything is written.
        DatasetMismatchError: ``out_dir`` holds a dataset with another seed, scene config or render settings.
        RenderError: a worker failed (the scenes it completed are kept).
    """
    out_dir = Path(out_dir)
    scenes = shard_scenes(shard, n_frames=n_frames, views=sampler.views, scenes_per_shard=scenes_per_shard)
    if not scenes:
        raise ValueError(f"shard {shard} is empty: {n_frames} frames make "
                         f"{n_shards(n_frames, sampler.views, scenes_per_shard)} shard(s)")
    # Sample every spec before touching the disk: a bad config or impossible constraint writes nothing.
    specs = {}
    for s in scenes:
        s_seed = scene_seed(seed, s)
        specs[s] = sampler.sample(np.random.default_rng(s_seed), width=settings.width, height=settings.height,
                                  seed=s_seed)
    claim_manifest(out_dir, dataset_manifest(sampler, settings, seed=seed, scenes_per_shard=scenes_per_shard))

    shard_dir = out_dir / f"shard_{shard:05d}"
    for sub in ("frames", "scenes", "coco/images", "coco/parts"):
        (shard_dir / sub).mkdir(parents=True, exist_ok=True)
    with open(shard_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RenderError(f"{shard_dir} {LOCKED}") from None
        _remove_stale(shard_dir)
        indexed = read_index(shard_dir)
        records = {r["frame_id"]: r for r in indexed if _intact(shard_dir, r, verify)}
        if len(records) < len(indexed):  # damaged since they were written: dropped from the index, rendered again
            broken = sorted({r["frame_id"] for r in indexed} - set(records))
            print(f"shard {shard}: repairing {len(broken)} corrupt frame(s) {broken} (failed the checksum or could "
                  f"not be read)", file=sys.stderr, flush=True)
        write_index(shard_dir, records)
        todo = [s for s, frames in scenes.items() if not all(f in records for f in frames)]
        for s in todo:
            specs[s].save(shard_dir / "scenes" / f"{s:08d}.json")

        total = sum(len(f) for f in scenes.values())
        with tqdm(total=total, initial=total - sum(len(scenes[s]) for s in todo), unit="frame",
                  desc=f"shard {shard}", disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, len(todo), settings.recycle_every):
                chunk = todo[start:start + settings.recycle_every]
                tasks = [{"scene_index": s, "spec": str(shard_dir / "scenes" / f"{s:08d}.json"),
                          "frame_ids": scenes[s]} for s in chunk]
                for record in _run_worker(shard_dir, settings, tasks):
                    for frame in record["frames"]:
                        records[frame["frame_id"]] = {**frame, "scene_index": record["scene_index"],
                                                      "scene_seed": record["scene_seed"]}
                    write_index(shard_dir, records)
                    bar.update(len(record["frames"]))

        merge_coco(shard_dir, specs[next(iter(scenes))].categories)
        check = check_shard_labels(shard_dir, records, n_frames=label_check_frames, seed=seed)
        atomic_write_json(shard_dir / "label_check.json", check, indent=2)
    failures = label_check_failures(check, label_check_max_deg) if label_check_max_deg is not None else []
    if failures:
        raise RenderError(f"{shard_dir}: {'; '.join(failures)}; see label_check.json")
    return ShardReport(shard=shard, frames=len(records), rendered_scenes=len(todo), label_check=check)


def _remove_stale(shard_dir: Path) -> None:
    """Delete temporaries a killed run left behind (we hold the shard lock, so none is in use)."""
    for path in list(shard_dir.rglob("*.tmp*")) + list(shard_dir.glob(".tmp-*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _intact(shard_dir: Path, record: dict, verify: bool) -> bool:
    path = shard_dir / record["file"]
    if not path.is_file():
        return False
    return not verify or sha256(str(path)) == record["sha256"]


#: glibc allocator settings that keep freed memory (what :func:`synth.runtime.keep_freed_memory` sets inside training
#: processes; a user may also export them) and that a render worker must not inherit: with them glibc never returns
#: a freed texture's pages, and a worker's RSS grew +34% over 240 scanned-tabletop frames instead of +20%
#: (``bench/realistic_scenes.py``, before :func:`render.worker.tear_down`).
TRAINING_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def worker_environment() -> dict[str, str]:
    """This process's environment less :data:`TRAINING_MALLOC_SETTINGS`."""
    return {k: v for k, v in os.environ.items() if k not in TRAINING_MALLOC_SETTINGS}


def _run_worker(shard_dir: Path, settings: RenderSettings, tasks: list[dict]):
    """Run one worker process over ``tasks``; yields its per-scene records as they complete."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=shard_dir, prefix=".tmp-job-", delete=False) as f:
        json.dump({"shard_dir": str(shard_dir), "settings": dataclasses.asdict(settings), "tasks": tasks}, f)
        job = f.name
    log_path = shard_dir / "render.log"
    error = None
    try:
        with open(log_path, "a") as log:
            proc = subprocess.Popen([sys.executable, "-m", "render.worker", job], stdout=subprocess.PIPE,
                                    stderr=log, text=True, preexec_fn=_die_with_parent, env=worker_environment())
            for line in proc.stdout:
                if line.startswith(PROGRESS_PREFIX):
                    message = json.loads(line[len(PROGRESS_PREFIX):])
                    if "error" in message:
                        error = message
                        log.write(message["traceback"])
                    else:
                        yield message
                else:
                    log.write(line)
            code = proc.wait()
    finally:
        os.unlink(job)
    if error is not None:
        raise RenderError(f"{error['error']} (traceback in {log_path})")
    if code != 0:
        raise RenderError(f"render worker exited with code {code}; see {log_path}")


def merge_coco(shard_dir: Path, categories: dict[int, str]) -> None:
    """Merge the per-scene COCO fragments of a shard into ``coco_annotations.json``."""
    images, annotations = [], []
    for part in sorted((shard_dir / "coco" / "parts").glob("*.json")):
        data = json.loads(part.read_text())
        images += data["images"]
        annotations += data["annotations"]
    coco = {
        "info": {"description": "Synth2Real rendered shard", "version": "1"},
        "licenses": [],
        "categories": [{"id": k, "name": v, "supercategory": "synth2real"} for k, v in categories.items() if k],
        "images": sorted(images, key=lambda im: im["id"]),
        "annotations": sorted(annotations, key=lambda a: a["id"]),
    }
    atomic_write_json(shard_dir / "coco_annotations.json", coco)


#: Objects whose top face is the support plane at z = 0 (tabletop: the table; room: the floor).
SUPPORT_PLANES = ("table", "floor")
#: Exact-label tolerances on the support plane (measured with the 0.01 px label pass: 0.01 deg and a relative
#: depth error under 1e-5 on every top-face pixel, boundary pixels included; blended normals gave 26-62 deg, the
#: old width-based cam_K on portrait frames a depth error of 7-31%).
SUPPORT_PLANE_MAX_DEG = 0.5
SUPPORT_PLANE_MAX_DEPTH_REL_ERROR = 1e-3


def check_shard_labels(shard_dir: Path, records: dict[int, dict], *, n_frames: int, seed: int) -> dict:
    """Label checks on up to ``n_frames`` frames of the shard.

    * ``mean_angle_deg``: open3d normals estimated from back-projected depth vs rendered normals, estimated within
      each instance (a neighbourhood never straddles two objects), on every surface pixel except the near side of
      depth jumps (occlusion edges, where an object's own points are one-sided); instance boundaries are included.
    * ``support_plane``: exact comparison with the support plane's equation (:func:`render.labels.check_support_plane`)
      on every visible top-face pixel, those next to objects included: the largest normal angle and the largest
      relative depth error (which catches a wrong ``cam_K``).
    """
    rng = np.random.default_rng(seed)
    ids = sorted(records)[:n_frames]
    per_frame, planes = {}, {}
    for frame_id in ids:
        frame = read_frame(shard_dir / records[frame_id]["file"])
        result = labels.check_normals(frame["depth"], frame["normals"], frame["cam_K"], rng=rng,
                                      segments=frame["instance_segmaps"],
                                      exclude=labels.occlusion_edges(frame["depth"]))
        per_frame[frame_id] = dataclasses.asdict(result)
        names = {m["name"]: m["idx"] for m in frame["instance_attribute_maps"]}
        poses = json.loads(frame["attrs"].get("object_poses", "{}"))
        for name in SUPPORT_PLANES:
            if name in names and name in poses:
                plane = labels.check_support_plane(
                    frame["depth"], frame["normals"], frame["cam_K"], frame["attrs"]["cam2world_blender"],
                    poses[name], frame["instance_segmaps"] == names[name], frame["instance_segmaps"])
                if plane.n_points:
                    planes[frame_id] = dataclasses.asdict(plane)
                break
    means = [r["mean_angle_deg"] for r in per_frame.values() if r["n_points"]]
    support = {"frames": planes}
    if planes:
        support.update(max_angle_deg=max(p["max_angle_deg"] for p in planes.values()),
                       max_depth_rel_error=max(p["max_depth_rel_error"] for p in planes.values()),
                       n_points=sum(p["n_points"] for p in planes.values()),
                       n_boundary=sum(p["n_boundary"] for p in planes.values()))
    return {"mean_angle_deg": float(np.mean(means)) if means else float("nan"), "frames": per_frame,
            "support_plane": support}


def label_check_failures(check: dict, max_mean_angle_deg: float) -> list[str]:
    """Why a shard's label check fails (empty: it passes)."""
    failures = []
    if check["mean_angle_deg"] > max_mean_angle_deg:
        failures.append(f"rendered normals disagree with normals estimated from depth by "
                        f"{check['mean_angle_deg']:.1f} deg on average (limit label_check.max_mean_angle_deg="
                        f"{max_mean_angle_deg})")
    plane = check.get("support_plane", {})
    if plane.get("max_angle_deg", 0.0) > SUPPORT_PLANE_MAX_DEG:
        failures.append(f"support-plane normals are up to {plane['max_angle_deg']:.2f} deg off the plane's "
                        f"(limit {SUPPORT_PLANE_MAX_DEG})")
    if plane.get("max_depth_rel_error", 0.0) > SUPPORT_PLANE_MAX_DEPTH_REL_ERROR:
        failures.append(f"back-projected support-plane depth is up to {plane['max_depth_rel_error']:.2%} off the "
                        f"plane (limit {SUPPORT_PLANE_MAX_DEPTH_REL_ERROR:.1%}): wrong cam_K or depth")
    return failures
