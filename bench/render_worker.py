"""Benchmark of the BlenderProc render worker against two baselines measured in the same run, plus its memory.

For each resolution (default 128 and 256 px) the same ``--scenes`` tabletop scenes (physics off, ``--views``
views each, one sampler instance and one dataset seed, so all three render identical scenes) are rendered
three ways, each timed as the wall time of everything it starts (process start and BlenderProc init included):

1. **ours**: :func:`render.shard.render_shard` with one worker process for the whole shard (``recycle_every``
   larger than the shard): Cycles colour + depth + normals + segmentation, labels, HDF5 and COCO written,
   index kept.
2. **bare bpy loop**: one subprocess (this file with ``--bare JOB.json``) that initialises BlenderProc the
   same way (:func:`render.bproc_env.blenderproc`), builds each scene with
   ``SceneBuilder.build(spec, outputs=False)`` (colour only) and renders every camera pose with plain bpy:
   ``scene.frame_set(view)`` and ``bpy.ops.render.render(write_still=True)`` to a PNG per frame: no
   BlenderProc ``render()``, no extra passes, no writers. ``ours / bare`` is the overhead of our worker
   (target >= 0.9). ``--bare-render animation`` renders each scene's poses with one
   ``render(animation=True)`` call instead (how BlenderProc renders), which saves the per-call overhead of
   one render call per frame (measured small: within the run-to-run noise at 128 and 256 px).
3. **one process per scene**: ``render_shard`` with ``recycle_every=1``, i.e. what ``blenderproc run`` once
   per scene costs (process start + init per scene); ``ours / per-process`` is the gain of a long-lived
   worker (target >= 2).

Then the worker's resident memory over a long run: ``--rss-frames`` frames at 64 px rendered by
``render_shard`` once with the worker recycled every ``--recycle-every`` scenes and once without recycling. A
thread samples the ``VmRSS`` of the worker process tree (children of this process running ``render.worker``)
from ``/proc`` every 0.5 s; the growth is the last sample vs the first sample taken after the first frame was
written (i.e. after process start, init and the first scene), and the maximum over the run is printed too
(target: growth within 10% with recycling). With the defaults (200 frames = 100 scenes, recycling every 100)
no worker is replaced, so one run serves both; ``--rss-frames 1000`` compares them.

The colours ``render_shard`` stored are compared with the bare loop's PNGs: same scenes, seeds and settings
give identical pixels, and a difference (printed as a WARNING) means the two timings are not of the same
render.

Cycles timings vary about ±50% between runs on a busy machine; ``--repeats`` renders each
way several times in rotated order and compares the medians. The CPU seconds (user + sys) of this process and
its children are printed beside the wall times: they suffer less from other load on the machine.

Run (about 5 minutes with the defaults on 2 CPU cores)::

    .venv/bin/python bench/render_worker.py
    .venv/bin/python bench/render_worker.py --resolution 128 --scenes 10 --views 2 --rss-frames 1000

``--denoise-prefilter NONE`` (and/or ``--denoise-quality``, ``--samples``) renders ours and the bare loop with
those settings, plus a fourth way, ours with today's defaults (16 samples, HIGH, ACCURATE), and prints the speed-up
and the colour difference between the two. ``render=cycles_fast`` is measured with::

    .venv/bin/python bench/render_worker.py --resolution 64 128 --scenes 4 --views 8 --rss-frames 0 \
        --samples 8 --denoise-prefilter NONE

``--out DIR`` keeps the rendered shards, specs and logs in ``DIR`` (default: a temporary folder, removed).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

SEED = 20240611
NO_RECYCLING = 10**9
RSS_RESOLUTION = 64


# --------------------------------------------------------------------------------------------- bare bpy loop


def bare_main(job_path: str) -> int:
    """Body of the ``--bare`` subprocess: build each spec colour-only and render its poses with plain bpy.

    Args:
        job_path: JSON with ``specs`` (spec file paths), ``width``, ``height``, ``settings`` (a
            :class:`render.worker.RenderSettings` as a dict), ``mode`` (``"frame"``: one render call per
            frame; ``"animation"``: one animation render per scene) and ``out_dir`` (where the PNGs go).

    Returns:
        The exit code (0).
    """
    with open(job_path) as f:
        job = json.load(f)
    settings = job["settings"]
    from render.bproc_env import blenderproc
    from render.builder import SceneBuilder
    from render.worker import RenderSettings, configure_renderer, fresh_session
    from synth.scene import SceneSpec

    bp = blenderproc(os.path.join(job["out_dir"], "blender-tmp"))
    configure_renderer(bp, RenderSettings(**settings))
    bpy = bp.bpy
    scene = bpy.context.scene
    scene.render.image_settings.file_format = "PNG"
    builder = SceneBuilder(bp, width=job["width"], height=job["height"])
    for index, path in enumerate(job["specs"]):
        spec = SceneSpec.load(path)
        builder.build(spec, outputs=False)
        fresh_session(bp)  # the worker's persistent session per scene, so the ratio compares the same tricks
        if job["mode"] == "animation":  # frames 0 .. views-1 in one call, PNGs named <prefix><frame>.png
            scene.frame_start, scene.frame_end = 0, spec.n_views - 1
            scene.render.filepath = os.path.join(job["out_dir"], f"{index:04d}_")
            bpy.ops.render.render(animation=True, write_still=True)
            continue
        for frame in range(spec.n_views):  # the camera poses are keyframes 0 .. views-1
            scene.frame_set(frame)
            scene.render.filepath = os.path.join(job["out_dir"], f"{index:04d}_{frame:02d}.png")
            bpy.ops.render.render(write_still=True)
    return 0


# --------------------------------------------------------------------------------------------- RSS sampling


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc/*/stat`` (psutil is not a dependency)."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # the process ended meanwhile
            continue
        # The command name (field 2) may hold spaces and parentheses: the fields after it follow the last ")".
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0  # ended, or a zombie (no VmRSS line)


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"render.worker" in f.read()
    except OSError:
        return False


def worker_rss(root: int) -> tuple[int, list[int]]:
    """Summed ``VmRSS`` in bytes of the render workers among ``root``'s children and of their descendants.

    Only children that run ``render.worker`` count: a child forked by ``subprocess`` but not yet exec'd is a
    copy of this process.

    Returns:
        The summed RSS and the pids counted.
    """
    tree = _children()
    frontier = [p for p in tree.get(root, []) if _is_worker(p)]
    pids = []
    while frontier:
        pid = frontier.pop()
        pids.append(pid)
        frontier += tree.get(pid, [])
    return sum(_rss_bytes(p) for p in pids), pids


class RssSampler:
    """Samples the RSS of the render workers this process started, from a thread every ``interval`` seconds.

    Args:
        frames_dir: Folder whose ``*.hdf5`` count tells how many frames were written when a sample is taken.
        interval: Seconds between samples.
    """

    def __init__(self, frames_dir: Path, interval: float = 0.5):
        self.frames_dir, self.interval = frames_dir, interval
        self.samples: list[tuple[float, int, int, tuple[int, ...]]] = []  # (time, rss, frames, pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pids = worker_rss(os.getpid())
            frames = len(list(self.frames_dir.glob("*.hdf5"))) if self.frames_dir.is_dir() else 0
            if pids:
                self.samples.append((time.perf_counter(), rss, frames, tuple(pids)))
            self._stop.wait(self.interval)

    def summary(self) -> dict:
        """RSS after init (first sample once a frame exists), at the end (last sample), max, workers seen, and the
        medians of the first and last tenth of the run's samples with their growth.

        A single sample depends on the scene being rendered at that instant: a scanned tabletop whose textures
        hold 19 M texels keeps ~120 MB more than one with 1.5 M, so first-vs-last compares two different scenes.
        The medians of the first and last tenth (a dozen scenes each over 1,000 frames) compare like with like;
        a leak shows in both measures.
        """
        after_init = [s for s in self.samples if s[2] > 0 and s[1] > 0]
        if not after_init:
            raise RuntimeError("no RSS sample was taken while the worker was running")
        first, last = after_init[0][1], after_init[-1][1]
        tenth = max(1, len(after_init) // 10)
        head = statistics.median(s[1] for s in after_init[:tenth])
        tail = statistics.median(s[1] for s in after_init[-tenth:])
        return {"first": first, "last": last, "max": max(s[1] for s in after_init),
                "growth": (last - first) / first, "median_first_tenth": head, "median_last_tenth": tail,
                "median_growth": (tail - head) / head, "workers": len({p for s in self.samples for p in s[3]})}


# --------------------------------------------------------------------------------------------- timed runs


class Timed:
    """Wall time, and CPU time (user + sys) of this process plus of the children that ended in the block."""

    @staticmethod
    def _cpu_now() -> float:
        return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self) -> "Timed":
        self._cpu, self._wall = self._cpu_now(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = self._cpu_now() - self._cpu


#: ``--samples`` / ``--denoise-quality`` / ``--denoise-prefilter``: used by ours and by the bare loop alike (a fair
#: ratio); everything else is :class:`render.worker.RenderSettings`' default (``render=cycles``).
OVERRIDES: dict = {}
#: The settings those flags change, as the bench prints them.
QUALITY_KEYS = ("max_samples", "denoiser", "denoise_quality", "denoise_prefilter")


def _settings(resolution: int, recycle_every: int, overrides: dict | None = None):
    from render.worker import RenderSettings

    chosen = OVERRIDES if overrides is None else overrides
    return RenderSettings(width=resolution, height=resolution, recycle_every=recycle_every, **chosen)


def describe(settings) -> str:
    """``max_samples=16 denoiser=INTEL ...``: the :data:`QUALITY_KEYS` of a RenderSettings."""
    return " ".join(f"{key}={getattr(settings, key)}" for key in QUALITY_KEYS)


def run_ours(sampler, out_dir: Path, *, resolution: int, scenes: int, recycle_every: int,
             overrides: dict | None = None) -> Timed:
    """``render_shard`` over ``scenes`` scenes (one shard) into ``out_dir``, timed (``overrides``: settings that
    differ from RenderSettings' defaults, by default :data:`OVERRIDES`)."""
    from render.shard import render_shard

    settings = _settings(resolution, recycle_every, overrides)
    with Timed() as timed:
        report = render_shard(sampler=sampler, settings=settings, out_dir=out_dir, shard=0, seed=SEED,
                              n_frames=scenes * sampler.views, scenes_per_shard=scenes, label_check_frames=0,
                              progress=False)
    if report.frames != scenes * sampler.views:
        raise RuntimeError(f"render_shard wrote {report.frames} frames, expected {scenes * sampler.views}")
    return timed


def write_specs(sampler, spec_dir: Path, *, resolution: int, scenes: int) -> list[str]:
    """Sample the shard's scenes exactly as ``render_shard`` does and save them as JSON; returns the paths."""
    from synth.sampling import scene_seed

    spec_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(scenes):
        s_seed = scene_seed(SEED, s)
        spec = sampler.sample(np.random.default_rng(s_seed), width=resolution, height=resolution, seed=s_seed)
        path = spec_dir / f"{s:08d}.json"
        spec.save(path)
        paths.append(str(path))
    return paths


def run_bare(spec_paths: list[str], out_dir: Path, *, resolution: int, mode: str) -> Timed:
    """The ``--bare`` subprocess (start, init, build and render every pose), timed; checks the PNG count."""
    out_dir.mkdir(parents=True)
    job = out_dir / "job.json"
    settings = asdict(_settings(resolution, NO_RECYCLING))
    job.write_text(json.dumps({"specs": spec_paths, "width": resolution, "height": resolution, "mode": mode,
                               "settings": settings, "out_dir": str(out_dir)}))
    log = out_dir / "render.log"
    with open(log, "w") as f, Timed() as timed:
        code = subprocess.call([sys.executable, os.path.abspath(__file__), "--bare", str(job)], stdout=f,
                               stderr=subprocess.STDOUT)
    if code != 0:
        raise RuntimeError(f"bare bpy loop exited with code {code}:\n{log.read_text()[-3000:]}")
    return timed


def check_same_scenes(spec_paths: list[str], shard_dir: Path) -> None:
    """The bare loop's specs must be the very scenes ``render_shard`` rendered."""
    from synth.scene import SceneSpec

    for path in spec_paths:
        ours = SceneSpec.load(shard_dir / "scenes" / Path(path).name)
        if ours.to_json() != SceneSpec.load(path).to_json():
            raise RuntimeError(f"{path} differs from the scene render_shard rendered")


def compare_pixels(shard_dir: Path, bare_dir: Path, *, scenes: int, views: int) -> dict:
    """Compare the colours ``render_shard`` stored with the bare loop's PNGs of the same frames.

    The two render the same scenes with the same seeds and settings, so they should agree to the last bit; if
    they do not, the timings do not compare like with like (e.g. one of them skipped the denoiser).

    Returns:
        ``identical`` (frames with equal pixels), ``frames``, ``mean_abs_diff`` (0-255 scale) and ``noise_ratio``
        (mean absolute Laplacian of ours over that of bare: > 1 means ours is grainier).
    """
    import cv2
    import png  # pypng: cv2.imread warns about the duplicate eXIf chunk that Blender writes

    from synth.frames import read_frame

    def noise(image: np.ndarray) -> float:
        grey = cv2.cvtColor(image.astype(np.float32), cv2.COLOR_RGB2GRAY)
        return float(np.abs(cv2.Laplacian(grey, cv2.CV_32F)).mean())

    identical, diffs, ours_noise, bare_noise = 0, [], 0.0, 0.0
    for s in range(scenes):
        pngs = sorted(bare_dir.glob(f"{s:04d}_*.png"))
        for view, path in enumerate(pngs[:views]):
            ours = read_frame(shard_dir / "frames" / f"{s * views + view:08d}.hdf5")["colors"].astype(np.int16)
            width, height, rows, _ = png.Reader(filename=str(path)).asRGB8()
            bare = np.vstack([np.asarray(row, np.int16) for row in rows]).reshape(height, width, 3)
            identical += bool(np.array_equal(ours, bare))
            diffs.append(float(np.abs(ours - bare).mean()))
            ours_noise, bare_noise = ours_noise + noise(ours), bare_noise + noise(bare)
    return {"identical": identical, "frames": len(diffs), "mean_abs_diff": float(np.mean(diffs)),
            "noise_ratio": ours_noise / max(bare_noise, 1e-9)}


def bench_resolution(sampler, root: Path, *, resolution: int, scenes: int, repeats: int,
                     bare_mode: str) -> dict:
    """Time the three ways on the same scenes, ``repeats`` times in rotated order.

    Returns:
        ``frames``, the per-run ``wall`` and ``cpu`` seconds of each way, and ``fps`` (frames over the median
        wall time) and ``cpu_per_frame`` (median CPU seconds per frame).
    """
    frames = scenes * sampler.views
    spec_paths = write_specs(sampler, root / "specs", resolution=resolution, scenes=scenes)
    ways = ["ours", "bare", "per_process"] + (["default"] if OVERRIDES else [])
    runs: dict[str, list[Timed]] = {way: [] for way in ways}
    for k in range(repeats):
        for way in ways[k % len(ways):] + ways[:k % len(ways)]:  # rotate: no way always runs first on a cold machine
            out_dir = root / f"{way}_{k}"
            if way == "ours":
                runs[way].append(run_ours(sampler, out_dir, resolution=resolution, scenes=scenes,
                                          recycle_every=NO_RECYCLING))
                check_same_scenes(spec_paths, out_dir / "shard_00000")
            elif way == "default":  # today's settings: what --samples and the --denoise-* flags buy
                runs[way].append(run_ours(sampler, out_dir, resolution=resolution, scenes=scenes,
                                          recycle_every=NO_RECYCLING, overrides={}))
            elif way == "bare":
                runs[way].append(run_bare(spec_paths, out_dir, resolution=resolution, mode=bare_mode))
                n_png = len(list(out_dir.glob("*.png")))
                if n_png != frames:
                    raise RuntimeError(f"bare bpy loop wrote {n_png} PNGs, expected {frames}")
            else:
                runs[way].append(run_ours(sampler, out_dir, resolution=resolution, scenes=scenes,
                                          recycle_every=1))
    return {
        "frames": frames,
        "wall": {way: [t.wall for t in r] for way, r in runs.items()},
        "cpu": {way: [t.cpu for t in r] for way, r in runs.items()},
        "fps": {way: frames / statistics.median(t.wall for t in r) for way, r in runs.items()},
        "cpu_per_frame": {way: statistics.median(t.cpu for t in r) / frames for way, r in runs.items()},
        "pixels": compare_pixels(root / "ours_0" / "shard_00000", root / "bare_0", scenes=scenes,
                                 views=sampler.views),
        "vs_default": (compare_shards(root / "ours_0" / "shard_00000", root / "default_0" / "shard_00000")
                       if OVERRIDES else None),
    }


def compare_shards(shard_dir: Path, other_dir: Path) -> dict:
    """Mean and max absolute colour difference (0-255) between the same frames of two shards."""
    from synth.frames import read_frame

    diffs, worst = [], 0
    for path in sorted((shard_dir / "frames").glob("*.hdf5")):
        a = read_frame(path)["colors"].astype(np.int16)
        b = read_frame(other_dir / "frames" / path.name)["colors"].astype(np.int16)
        diffs.append(float(np.abs(a - b).mean()))
        worst = max(worst, int(np.abs(a - b).max()))
    return {"mean_abs_diff": float(np.mean(diffs)), "max_abs_diff": worst, "frames": len(diffs)}


def bench_rss(sampler, root: Path, *, frames: int, recycle_every: int) -> dict:
    """RSS of the worker over ``frames`` frames at 64 px, with and without recycling.

    When the run has no more than ``recycle_every`` scenes no worker is replaced, so the two configurations are
    the same and one run serves both.
    """
    scenes = -(-frames // sampler.views)
    result = {}
    for name, every in (("recycling", recycle_every), ("no_recycling", NO_RECYCLING)):
        if name == "no_recycling" and scenes <= recycle_every:
            result[name] = result["recycling"]
            break
        out_dir = root / f"rss_{name}"
        with RssSampler(out_dir / "shard_00000" / "frames") as rss:
            timed = run_ours(sampler, out_dir, resolution=RSS_RESOLUTION, scenes=scenes, recycle_every=every)
        result[name] = {**rss.summary(), "seconds": timed.wall}
    return {"frames": scenes * sampler.views, "scenes": scenes, **result}


# --------------------------------------------------------------------------------------------- report


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.0f} MB"


def print_resolution(resolution: int, result: dict, bare_mode: str) -> None:
    fps, cpu = result["fps"], result["cpu_per_frame"]
    bare = "bare bpy" if bare_mode == "frame" else "bare bpy (animation)"
    print(f"resolution {resolution}: frames={result['frames']}  ours {fps['ours']:.2f} fps | "
          f"{bare} {fps['bare']:.2f} fps | per-process {fps['per_process']:.2f} fps")
    print(f"  ours / {bare:14s} {fps['ours'] / fps['bare']:.2f}x  (target >= 0.9)")
    print(f"  ours / {'per-process':14s} {fps['ours'] / fps['per_process']:.2f}x  (target >= 2)")
    print(f"  CPU s/frame (less sensitive to other load): ours {cpu['ours']:.2f} | bare {cpu['bare']:.2f} | "
          f"per-process {cpu['per_process']:.2f}  -> ours/bare {cpu['bare'] / cpu['ours']:.2f}x, "
          f"ours/per-process {cpu['per_process'] / cpu['ours']:.2f}x")
    if result.get("vs_default"):
        vs = result["vs_default"]
        flags = " ".join(f"{k}={v}" for k, v in OVERRIDES.items())
        print(f"  {flags} vs today's settings ({describe(_settings(resolution, NO_RECYCLING, {}))}): "
              f"{fps['ours'] / fps['default']:.2f}x fps "
              f"({fps['default']:.2f} fps), CPU s/frame {cpu['default']:.3f}; pixels "
              f"{vs['mean_abs_diff']:.3f}/255 off on average, max {vs['max_abs_diff']}/255 over {vs['frames']} frames")
    px = result["pixels"]
    if px["identical"] == px["frames"]:
        print(f"  same pixels: ours == bare on {px['identical']}/{px['frames']} frames")
    else:
        print(f"  WARNING: ours and bare differ on {px['frames'] - px['identical']}/{px['frames']} frames "
              f"(mean |diff| {px['mean_abs_diff']:.2f}/255, ours {px['noise_ratio']:.2f}x as grainy): the "
              "timings do not compare the same render (a missing denoiser makes ours grainier and faster)")
    if len(result["wall"]["ours"]) > 1:
        for way, seconds in result["wall"].items():
            print(f"    {way:12s} wall s: {', '.join(f'{s:.1f}' for s in seconds)}")
    sys.stdout.flush()


def format_rss(r: dict) -> str:
    """One line of :meth:`RssSampler.summary`: first -> last sample, max, and the medians of the tenths."""
    return (f"{_mb(r['first'])} -> {_mb(r['last'])} ({100 * r['growth']:+.1f}%, max {_mb(r['max'])}; median of "
            f"the first / last tenth {_mb(r['median_first_tenth'])} -> {_mb(r['median_last_tenth'])} "
            f"({100 * r['median_growth']:+.1f}%); {r['workers']} worker process{'es' if r['workers'] > 1 else ''})")


def print_rss(result: dict, recycle_every: int) -> None:
    print(f"worker RSS over {result['frames']} frames ({result['scenes']} scenes, {RSS_RESOLUTION} px): "
          f"{format_rss(result['recycling'])} with recycling every {recycle_every} scenes; "
          f"{format_rss(result['no_recycling'])} without  (target: within 10% with recycling)")
    if result["scenes"] <= recycle_every:
        print(f"  note: {result['scenes']} scenes <= recycle_every={recycle_every}: no worker is replaced, "
              "so one run serves both configurations (use --rss-frames > views * recycle_every to compare)")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, nargs="+", default=[128, 256], help="square image sides")
    parser.add_argument("--scenes", type=int, default=6, help="scenes per resolution")
    parser.add_argument("--views", type=int, default=2, help="camera views (frames) per scene")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each way (medians compared)")
    parser.add_argument("--bare-render", choices=["frame", "animation"], default="frame",
                        help="bare loop: one render call per frame, or one animation render per scene")
    parser.add_argument("--rss-frames", type=int, default=200, help="frames of the RSS run (0 skips it)")
    parser.add_argument("--recycle-every", type=int, default=100, help="scenes per worker, recycling run")
    parser.add_argument("--samples", type=int,
                        help="Cycles samples of ours and the bare loop (also renders today's 16 to compare)")
    parser.add_argument("--denoise-quality", choices=["HIGH", "BALANCED", "FAST"],
                        help="OIDN quality of ours and the bare loop (also renders today's default to compare)")
    parser.add_argument("--denoise-prefilter", choices=["ACCURATE", "FAST", "NONE"],
                        help="OIDN guide prefilter of ours and the bare loop (also renders today's default)")
    parser.add_argument("--out", help="keep everything in this folder (default: a temporary folder)")
    parser.add_argument("--bare", metavar="JOB", help=argparse.SUPPRESS)  # internal: the bare bpy subprocess
    args = parser.parse_args(argv)
    if args.bare:
        return bare_main(args.bare)
    OVERRIDES.update({k: v for k, v in (("max_samples", args.samples), ("denoise_quality", args.denoise_quality),
                                        ("denoise_prefilter", args.denoise_prefilter)) if v})

    from synth.sampling import TabletopScene

    sampler = TabletopScene(views=args.views, physics=False)
    if args.out:
        root = Path(args.out)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            parser.error(f"--out {root} is not empty")
    else:
        root = Path(tempfile.mkdtemp(prefix="bench-render-worker-"))
    try:
        settings = describe(_settings(args.resolution[0], NO_RECYCLING))
        print(f"tabletop scenes, physics off, {args.views} views, {settings}, {os.cpu_count()} CPUs, "
              f"repeats={args.repeats}, load average {os.getloadavg()[0]:.1f}")
        for resolution in args.resolution:
            result = bench_resolution(sampler, root / f"r{resolution}", resolution=resolution,
                                      scenes=args.scenes, repeats=args.repeats, bare_mode=args.bare_render)
            print_resolution(resolution, result, args.bare_render)
        if args.rss_frames > 0:
            rss = bench_rss(sampler, root / "rss", frames=args.rss_frames, recycle_every=args.recycle_every)
            print_rss(rss, args.recycle_every)
    finally:
        if not args.out:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # The --bare subprocess imported bpy, whose wheel segfaults at interpreter exit; all output is written.
    os._exit(code)
