"""``synth render``: the Hydra app that renders one shard per job, and its end-of-sweep report.

Shards are independent Hydra jobs: ``synth render`` sweeps ``shard=range(0, n_shards)`` through the configured
launcher (joblib locally; ``hydra/launcher=slurm`` or ``ray_cluster`` on a cluster, from the optional
``slurm``/``ray`` extras). Each job renders what is missing from its shard (see :mod:`render.shard`), so a job that
is preempted, requeued or retried resumes. ``out_dir`` is made absolute before launching (a cluster job's working
folder is not the caller's), and the command exits 0 only when the dataset is complete on disk.

The cluster launcher configs size each job from the render settings through three resolvers registered here:
``${synth_cpus:${render.threads}}`` (CPUs per job: ``render.threads``, or :data:`CLUSTER_DEFAULT_CPUS` for 0),
``${synth_gpus:${render.device}}`` (GPUs per job: 1 for ``gpu``, one per id for ``gpu:0,1``, else 0, or the
second argument: ``${synth_gpus:${render.device},null}``) and
``${synth_activate:}`` (the shell line that activates this Python environment in a batch job).
"""

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from apps.launch import RunFailed, checked, run_hydra
from render.shard import LOCKED, n_shards, render_shard, shard_scenes
from render.worker import RenderSettings, parse_render_device
from synth.config import register
from synth.frames import read_index
from synth.realistic import FurnishedRoomScene, ScannedTabletopScene
from synth.sampling import RoomScene, TabletopScene


@dataclass
class LabelCheck:
    """Open3d check of rendered normals against normals estimated from depth, per instance and boundary pixels
    included (catches convention bugs), plus the support plane against its equation (limits in
    :func:`render.shard.label_check_failures`).

    Args:
        frames: Frames checked per shard.
        max_mean_angle_deg: Fail threshold of the mean angle when ``fail``. Correct frames measure 0.73-0.88° per
            shard at 48-64 px (1.7° the worst single frame); a convention bug gives over 30°.
        fail: Fail the shard when a check exceeds its limit.
    """

    frames: int = 8
    max_mean_angle_deg: float = 2.0
    fail: bool = False


@dataclass
class RenderApp:
    """``synth render`` config. ``scene`` and ``render`` come from their config groups."""

    scene: Any = MISSING
    render: Any = MISSING
    out_dir: str = "data/${hydra:runtime.choices.scene}"
    seed: int = 0
    n_frames: int = 16
    scenes_per_shard: int = 50
    shard: int | None = None
    preview: bool = True
    preview_frames: int = 8
    verify: bool = True
    label_check: LabelCheck = field(default_factory=LabelCheck)


#: CPUs a cluster job asks for when ``render.threads=0`` ("all cores" means nothing before a node is chosen).
CLUSTER_DEFAULT_CPUS = 8
#: Launchers that run jobs on this machine: a GPU asked for must be here.
LOCAL_LAUNCHERS = ("local", "joblib", "basic", "submitit_local")


def job_cpus(threads: int | str) -> int:
    """CPUs per cluster job: ``render.threads``, or :data:`CLUSTER_DEFAULT_CPUS` when it is 0 (all cores)."""
    return int(threads) if int(threads) > 0 else CLUSTER_DEFAULT_CPUS


def job_gpus(device: str, none: int | None = 0) -> int | None:
    """GPUs per cluster job for ``render.device``: 1 for ``gpu``, one per id for ``gpu:0,1``, else ``none`` (0, or
    null where a scheduler should get no GPU request at all: a ``--gpus-per-node=0`` is refused on clusters without
    GPU resources)."""
    kind, ids = parse_render_device(device)
    return none if kind != "gpu" else len(ids or [0])


#: Most shard jobs the local launcher runs at once by default: each Blender worker holds 0.5-1.5 GB.
MAX_LOCAL_JOBS = 4


def local_jobs(n_frames: int | str, views: int | str, scenes_per_shard: int | str) -> int:
    """Shard jobs the local (joblib) launcher runs at once by default: one per CPU of this process, at most
    :data:`MAX_LOCAL_JOBS` and at most one per shard (a single shard stays in this process, without a pool).

    Measured on 2 cores (64 px, 384 frames, 2 shards): two jobs of one Cycles thread each render 1.24x the frames/s
    of one job on both cores, with identical pixels: building a scene, the denoiser's start and writing the files
    are serial in one worker, and a second worker fills those gaps.
    """
    shards = n_shards(int(n_frames), int(views), int(scenes_per_shard))
    return max(1, min(len(os.sched_getaffinity(0)), MAX_LOCAL_JOBS, shards))


def jobs_at_once(cfg: DictConfig) -> int:
    """Shard jobs running at once on this machine under the local launcher (its ``n_jobs``, -1 = every CPU,
    capped by the shard count); 1 under any other launcher or without Hydra."""
    try:
        launcher = HydraConfig.get().launcher
    except ValueError:  # not inside a Hydra job
        return 1
    n_jobs = launcher.get("n_jobs") if "joblib" in str(launcher.get("_target_", "")) else None
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    if n_jobs < 0:  # joblib's convention: -1 is every CPU, -2 all but one, ...
        n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
    return max(1, min(n_jobs, shard_count(cfg)))


def activate_line() -> str:
    """The shell line that puts this Python environment first on a batch job's PATH."""
    activate = Path(sys.prefix) / "bin" / "activate"
    return f"source {activate}" if activate.exists() else f"export PATH={Path(sys.prefix) / 'bin'}:$PATH"


OmegaConf.register_new_resolver("synth_cpus", job_cpus, replace=True)
OmegaConf.register_new_resolver("synth_gpus", job_gpus, replace=True)
OmegaConf.register_new_resolver("synth_activate", activate_line, replace=True)
OmegaConf.register_new_resolver("synth_local_jobs", local_jobs, replace=True)


def allotted_threads(threads: int, jobs: int = 1) -> int:
    """Cycles threads for this job: ``render.threads`` when set, else the CPUs a scheduler gave the job (Slurm's
    ``SLURM_CPUS_PER_TASK``, Ray's assigned CPUs, or this process's CPU affinity), shared evenly by the ``jobs``
    that the local launcher runs at once, else 0 (all cores)."""
    if threads > 0:
        return threads
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                return max(1, int(cpus))
    affinity = len(os.sched_getaffinity(0))
    if jobs > 1:
        return max(1, affinity // jobs)
    return affinity if affinity < (os.cpu_count() or affinity) else 0


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use (``CUDA_VISIBLE_DEVICES``, else the driver's list), without importing a
    GPU library."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


register("scene", "primitives_tabletop_schema", TabletopScene)
register("scene", "primitives_room_schema", RoomScene)
register("scene", "tabletop_schema", ScannedTabletopScene)
register("scene", "room_schema", FurnishedRoomScene)
register("render", "cycles_schema", RenderSettings)
ConfigStore.instance().store(name="render_app_schema", node=RenderApp)


def shard_count(cfg: DictConfig) -> int:
    return n_shards(cfg.n_frames, cfg.scene.views, cfg.scenes_per_shard)


def render_job(cfg: DictConfig) -> dict:
    """Render shard ``cfg.shard`` (the Hydra task function)."""
    if cfg.shard is None:
        raise ValueError("shard is not set: run `synth render`, which sweeps every shard, or pass shard=N")
    sampler = instantiate(cfg.scene)
    settings = instantiate(cfg.render)
    settings.threads = allotted_threads(settings.threads, jobs_at_once(cfg))
    report = render_shard(
        sampler=sampler, settings=settings, out_dir=cfg.out_dir, shard=cfg.shard, seed=cfg.seed,
        n_frames=cfg.n_frames, scenes_per_shard=cfg.scenes_per_shard,
        label_check_frames=cfg.label_check.frames,
        label_check_max_deg=cfg.label_check.max_mean_angle_deg if cfg.label_check.fail else None,
        verify=cfg.verify)
    return {"shard": report.shard, "frames": report.frames, "label_check_deg": report.label_check["mean_angle_deg"]}


def summarize(cfg: DictConfig) -> str:
    """A short report of the dataset folder: shards, frames, label check, where the files are."""
    out_dir = Path(cfg.out_dir)
    expected = shard_count(cfg)
    lines = [f"dataset {out_dir}  ({cfg.n_frames} frames requested, {expected} shard(s))",
             f"{'shard':>7} {'frames':>7} {'normal check (deg)':>19}"]
    total = 0
    for k in range(expected):
        shard_dir = out_dir / f"shard_{k:05d}"
        frames = len(read_index(shard_dir))
        total += frames
        check = shard_dir / "label_check.json"
        angle = "-"
        if check.exists():
            angle = f"{json.loads(check.read_text())['mean_angle_deg']:.2f}"
        lines.append(f"{k:>7} {frames:>7} {angle:>19}")
    lines.append(f"{'total':>7} {total:>7}")
    if cfg.preview and total:
        from synth.preview import write_preview

        path = write_preview(out_dir, out_dir / "preview.png", n_frames=cfg.preview_frames)
        lines.append(f"preview: {path}")
    return "\n".join(lines)


class RenderFinished(Callback):
    """Print the dataset summary (and write the preview grid) once every shard job has ended."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        print(summarize(config), flush=True)

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        print(summarize(config), flush=True)


def check_config(cfg: DictConfig) -> None:
    """Instantiate every part and sample the first scene: a bad config fails here, before anything is written."""
    sampler = instantiate(cfg.scene)
    settings = instantiate(cfg.render)
    if cfg.n_frames < 1 or cfg.scenes_per_shard < 1:
        raise ValueError(f"n_frames and scenes_per_shard must be positive, got {cfg.n_frames} and "
                         f"{cfg.scenes_per_shard}")
    from synth.sampling import scene_seed

    seed = scene_seed(cfg.seed, 0)
    sampler.sample(np.random.default_rng(seed), width=settings.width, height=settings.height, seed=seed)
    if cfg.shard is not None and not 0 <= cfg.shard < shard_count(cfg):
        raise ValueError(f"shard={cfg.shard} is out of range: {cfg.n_frames} frames make "
                         f"{shard_count(cfg)} shard(s) of {cfg.scenes_per_shard} scenes "
                         f"({math.ceil(cfg.n_frames / sampler.views)} scenes)")
    kind, ids = parse_render_device(settings.device)
    launcher = cfg.hydra.runtime.choices.get("hydra/launcher") if "hydra" in cfg else None
    if kind == "gpu" and launcher in LOCAL_LAUNCHERS:  # a cluster job checks its own node (render.worker)
        have = visible_gpus()
        if have == 0 or (ids and max(ids) >= have):
            raise ValueError(f"render.device={settings.device}: this machine has {have} visible NVIDIA GPU(s); use "
                             f"render.device=cpu or auto")


def override_value(text: str) -> str:
    """``text`` as a Hydra override value: as is when plain, else quoted."""
    if re.fullmatch(r"[\w/.\-+@]+", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def missing_frames(cfg: DictConfig) -> dict[int, int]:
    """Shard -> frames still missing from the dataset folder (only shards with some missing)."""
    missing = {}
    shards = [cfg.shard] if cfg.shard is not None else range(shard_count(cfg))
    for k in shards:
        expected = sum(len(frames) for frames in shard_scenes(k, n_frames=cfg.n_frames, views=cfg.scene.views,
                                                              scenes_per_shard=cfg.scenes_per_shard).values())
        have = len(read_index(Path(cfg.out_dir) / f"shard_{k:05d}"))
        if have < expected:
            missing[k] = expected - have
    return missing


def command(args: list[str]) -> None:
    """``synth render``: one Hydra job per shard (a multirun over ``shard``), or the one shard asked for.

    Exits 0 only when the dataset (or the shard asked for) is complete on disk, whoever rendered it: a shard locked
    by another render is reported, and counts as done once that render has finished it.

    Raises:
        RunFailed: frames are still missing (one line naming the shards).
    """
    cfg = checked("synth_render", args, check_config)
    if cfg is None:
        run_hydra("synth_render", render_job, args)
        return
    # Jobs on other machines (Slurm, Ray) start in other folders: give them, and the check below, one absolute path.
    out_dir = Path(cfg.out_dir).expanduser().absolute()
    with open_dict(cfg):
        cfg.out_dir = str(out_dir)
    args = [*(a for a in args if not a.startswith("out_dir=")), f"out_dir={override_value(str(out_dir))}"]
    failed = None
    try:
        if cfg.shard is not None:
            done = run_hydra("synth_render", render_job, args)
        else:
            done = run_hydra("synth_render", render_job,
                             ["--multirun", *args, f"shard=range(0,{shard_count(cfg)})"])
    except RunFailed as error:
        failed, done = error, []
    mine = sorted(r["shard"] for r in done if r)
    missing = missing_frames(cfg)
    if missing:
        where = ", ".join(f"shard {k} ({n} frames)" for k, n in sorted(missing.items()))
        print(f"synth render: error: {cfg.out_dir} is incomplete: {where} missing; rerun the same command to "
              f"resume", file=sys.stderr)
        raise RunFailed(f"incomplete dataset {cfg.out_dir}")
    if failed is not None:
        if not all(LOCKED in line for line in failed.failures):
            raise failed  # e.g. a label check that failed on frames that are all there
        # Every frame is there: the shards that were locked were finished by the other render meanwhile.
        print(f"{cfg.out_dir} is complete; this run rendered shard(s) {mine or 'none'}, another process the rest")
