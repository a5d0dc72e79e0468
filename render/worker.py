"""The BlenderProc render worker: a child process that renders a list of scenes into a shard, then exits.

Run as ``python -m render.worker JOB.json``. The parent (:mod:`render.shard`) writes the job (scene spec paths,
frame ids, render settings), reads progress lines from the worker's stdout, and owns the shard index. One
worker renders many scenes (process start plus BlenderProc init costs ~3 s), and is replaced after
``recycle_every`` scenes (a safety net: each scene is torn down and its memory handed back, see
:func:`tear_down`).

Every file is written under a temporary name and renamed into place, so a kill at any moment leaves either a
complete frame or none; frames are named by their global id, so re-rendering a scene overwrites, never
duplicates.
"""

import ctypes
import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass

import h5py
import numpy as np

from render import labels
from render.builder import CAMERA_SENSOR_FIT
from synth.frames import sha256
from synth.scene import BACKGROUND_CATEGORY, SceneSpec

PROGRESS_PREFIX = "@@synth2real "


@dataclass(kw_only=True)
class RenderSettings:
    """How frames are rendered (the ``render`` config group).

    Args:
        width: Image width in pixels.
        height: Image height in pixels.
        max_samples: Cycles samples per pixel (BlenderProc's default is 1024; 16-64 is plenty with a denoiser).
        noise_threshold: Cycles adaptive-sampling threshold (0 disables adaptive sampling).
        denoiser: ``"INTEL"`` (OpenImageDenoise, inside Cycles), ``"OPTIX"`` (NVIDIA GPUs) or ``None``.
        denoise_quality: OpenImageDenoise's ``"HIGH"``, ``"BALANCED"`` or ``"FAST"`` (Cycles'
            ``denoising_quality``).
        denoise_prefilter: ``"ACCURATE"`` (the albedo and normal guides are denoised first: two more filter runs),
            ``"FAST"`` or ``"NONE"``. At 64 px OIDN's default (HIGH, ACCURATE) costs more CPU than 16 path-traced
            samples; ``NONE`` renders the colour pass ~1.6x faster with pixels 0.14/255 off on average (max 8/255;
            ``bench/render_worker.py --denoise-prefilter NONE`` measures both).
        threads: Cycles CPU threads (0 = all cores; under Slurm or Ray, the CPUs the job was given). On a cluster
            it is also the CPUs each job asks for (``hydra/launcher=slurm`` or ``ray_cluster``).
        device: ``"cpu"``, ``"gpu"`` (every GPU Cycles finds: OptiX, CUDA or HIP), ``"gpu:0,2"`` (those GPU ids
            only) or ``"auto"`` (GPUs when Cycles finds any, else the CPU). A GPU that was asked for and is
            missing stops the shard with one line. GPU and CPU frames differ in their sampling noise.
        recycle_every: Scenes a worker process renders before it is replaced (keeps memory flat).
        occlusion_jump: Relative depth jump that marks an occlusion contour.
        jpeg_quality: Quality of the COCO images.
    """

    width: int = 64
    height: int = 64
    max_samples: int = 16
    noise_threshold: float = 0.05
    denoiser: str | None = "INTEL"
    denoise_quality: str = "HIGH"
    denoise_prefilter: str = "ACCURATE"
    threads: int = 0
    device: str = "auto"
    recycle_every: int = 100
    occlusion_jump: float = 0.1
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        for key in ("width", "height", "max_samples", "recycle_every"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"render.{key}: expected a positive integer, got {value!r}")
        if self.denoiser not in (None, "INTEL", "OPTIX"):
            raise ValueError(f"render.denoiser: expected INTEL, OPTIX or null, got {self.denoiser!r}")
        for key, allowed in (("denoise_quality", ("HIGH", "BALANCED", "FAST")),
                             ("denoise_prefilter", ("ACCURATE", "FAST", "NONE"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"render.{key}: expected {', '.join(allowed)}, got {getattr(self, key)!r}")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 0:
            raise ValueError(f"render.threads: expected 0 (all cores) or a positive integer, got {self.threads!r}")
        parse_render_device(self.device)


#: Settings that say how a dataset is rendered, not what it holds: left out of its identity (``dataset.json``), so
#: a resumed render may run with other threads, devices or worker lifetimes (e.g. on a cluster).
EXECUTION_KEYS: tuple[str, ...] = ("threads", "device", "recycle_every")

#: Settings added after datasets were first written: a ``dataset.json`` without one was rendered with this value.
LATER_KEYS: dict[str, str] = {"denoise_quality": "HIGH", "denoise_prefilter": "ACCURATE"}


def parse_render_device(device: str) -> tuple[str, list[int] | None]:
    """``render.device`` as ``(kind, gpu ids)``: ``("cpu", None)``, ``("auto", None)``, ``("gpu", None)`` (every
    GPU) or ``("gpu", [0, 2])``.

    Raises:
        ValueError: anything else (one line naming the key).
    """
    text = str(device).strip().lower()
    if text in ("cpu", "auto", "gpu"):
        return text, None
    if text.startswith("gpu:"):
        try:
            ids = [int(part) for part in text[4:].split(",") if part.strip()]
        except ValueError:
            ids = []
        if ids and all(i >= 0 for i in ids):
            return "gpu", ids
    raise ValueError(f"render.device: expected cpu, gpu, gpu:ID[,ID...] or auto, got {device!r}")


def configure_device(bp, device: str) -> str:
    """Point Cycles at the devices of ``render.device``; returns what it renders on (``"CPU"`` or ``"GPU"``).

    Raises:
        RuntimeError: a GPU was asked for and Cycles finds none (or none with the ids asked for).
    """
    kind, ids = parse_render_device(device)
    if kind == "cpu":
        bp.renderer.set_render_devices(use_only_cpu=True)
    else:
        try:
            bp.renderer.set_render_devices(desired_gpu_ids=ids)
        except RuntimeError as error:  # BlenderProc: the ids select no GPU
            raise RuntimeError(f"render.device={device}: {error}") from None
        if kind == "gpu" and bp.bpy.context.scene.cycles.device != "GPU":
            raise RuntimeError(f"render.device={device}: Cycles finds no GPU (OptiX, CUDA or HIP) on "
                               f"{os.uname().nodename}; use render.device=cpu or auto")
    return bp.bpy.context.scene.cycles.device


def frame_labels(data: dict, index: int, *, fov_deg: float, width: int, height: int,
                 occlusion_jump: float) -> dict[str, np.ndarray]:
    """Our labels for rendered frame ``index`` of BlenderProc's ``render()`` output.

    Returns the fields stored per frame: ``colors`` (H,W,3) uint8; ``depth`` (H,W) float32 planar metres, 0 for
    no surface; ``normals`` (H,W,3) float32 unit vectors in the OpenCV camera frame (x right, y down, z
    forward), 0 for no surface; ``category_id_segmaps`` / ``instance_segmaps`` (H,W) int32; ``contours`` (H,W)
    uint8; ``boxes`` (N,4) float32 xyxy; ``box_category_ids`` / ``box_instance_ids`` (N,) int32;
    ``cam_K`` (3,3) float64.
    """
    depth = labels.clean_depth(data["depth"][index])
    instances = np.asarray(data["instance_segmaps"][index], dtype=np.int32)
    categories = np.asarray(data["category_id_segmaps"][index], dtype=np.int32)
    boxes, box_categories, box_instances = labels.boxes_from_instances(
        instances, categories, background_categories=(BACKGROUND_CATEGORY,))
    return {
        "colors": np.asarray(data["colors"][index], dtype=np.uint8),
        "depth": depth,
        "normals": labels.decode_normals(data["normals"][index], surface=depth > 0),
        "category_id_segmaps": categories,
        "instance_segmaps": instances,
        "instance_attribute_maps": data["instance_attribute_maps"][index],
        "contours": labels.contours(instances, depth, rel_jump=occlusion_jump),
        "boxes": boxes,
        "box_category_ids": box_categories,
        "box_instance_ids": box_instances,
        "cam_K": labels.intrinsics(width, height, np.radians(fov_deg), sensor_fit=CAMERA_SENSOR_FIT),
    }


def _report(message: dict) -> None:
    sys.stdout.write(PROGRESS_PREFIX + json.dumps(message) + "\n")
    sys.stdout.flush()


def render_scene(bp, builder, task: dict, settings: RenderSettings, shard_dir: str) -> dict:
    """Render one scene task and move its files into the shard; returns the progress record."""
    spec = SceneSpec.load(task["spec"])
    views = len(task["frame_ids"])
    spec.camera.poses = spec.camera.poses[:views]
    objects = builder.build(spec)
    fresh_session(bp)
    data = render_frames(bp, settings)
    # Poses after physics, so a frame can be re-rendered without simulating again.
    object_poses = {o.get_name(): np.asarray(o.get_local2world_mat()).tolist() for o in objects}

    tmp = os.path.join(shard_dir, f".tmp-scene-{task['scene_index']:08d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    per_frame = [frame_labels(data, i, fov_deg=spec.camera.fov_deg, width=settings.width,
                              height=settings.height, occlusion_jump=settings.occlusion_jump)
                 for i in range(views)]
    bp.writer.write_hdf5(tmp, {key: [f[key] for f in per_frame] for key in per_frame[0]})
    bp.writer.write_coco_annotations(
        os.path.join(tmp, "coco"), instance_segmaps=[f["instance_segmaps"] for f in per_frame],
        instance_attribute_maps=[f["instance_attribute_maps"] for f in per_frame],
        colors=[f["colors"] for f in per_frame], color_file_format="JPEG", jpg_quality=settings.jpeg_quality,
        append_to_existing_output=False)

    frames = []
    for view, frame_id in enumerate(task["frame_ids"]):
        src = os.path.join(tmp, f"{view}.hdf5")
        with h5py.File(src, "a") as f:
            f.attrs.update(frame_id=frame_id, scene_index=task["scene_index"], scene_seed=spec.seed, view=view,
                           cam2world_blender=np.asarray(spec.camera.poses[view]),
                           object_poses=json.dumps(object_poses))
        name = f"{frame_id:08d}.hdf5"
        frames.append({"frame_id": frame_id, "view": view, "file": f"frames/{name}", "sha256": sha256(src)})
        os.replace(src, os.path.join(shard_dir, "frames", name))

    # COCO: BlenderProc's annotations of this scene, renumbered to global frame ids, as one fragment file.
    with open(os.path.join(tmp, "coco", "coco_annotations.json")) as f:
        coco = json.load(f)
    image_ids = {}
    for image in coco["images"]:
        view = int(os.path.splitext(os.path.basename(image["file_name"]))[0])
        frame_id = task["frame_ids"][view]
        name = f"images/{frame_id:08d}.jpg"
        os.replace(os.path.join(tmp, "coco", image["file_name"]), os.path.join(shard_dir, "coco", name))
        image_ids[image["id"]] = frame_id
        image.update(id=frame_id, file_name=name)
    for k, annotation in enumerate(coco["annotations"]):
        annotation.update(id=image_ids[annotation["image_id"]] * 1000 + k,
                          image_id=image_ids[annotation["image_id"]])
    fragment = os.path.join(shard_dir, "coco", "parts", f"{task['scene_index']:08d}.json")
    with open(fragment + ".tmp", "w") as f:
        json.dump({"images": coco["images"], "annotations": coco["annotations"]}, f)
    os.replace(fragment + ".tmp", fragment)
    shutil.rmtree(tmp, ignore_errors=True)
    return {"scene_index": task["scene_index"], "scene_seed": spec.seed, "frames": frames}


# Film filter width of the label pass, in pixels: Cycles' smallest, so every sample goes through the pixel centre.
LABEL_FILTER_WIDTH = 0.01


def render_frames(bp, settings: RenderSettings) -> dict:
    """Render the current scene's frames: exact labels from one pass, anti-aliased colours from another.

    Cycles writes depth and object ids from a pixel's first sample only, but accumulates the Normal pass over all
    samples through its 1.5 px pixel filter, so normals on either side of an object boundary were mixtures of two
    surfaces (up to 63 deg off) and depth came from a point up to ~0.75 px off the pixel centre. The label pass
    renders one sample per pixel with a 0.01 px filter and no denoiser: depth, normals and instance ids all
    describe the surface under the pixel centre, which is where :func:`render.labels.backproject` and ``cam_K``
    put the ray. The colour pass then renders with the configured samples, filter and denoiser, with the
    compositor off (it only feeds the label outputs).

    Returns:
        BlenderProc's ``render()`` dict: ``colors`` from the colour pass, every label key from the label pass.
    """
    scene, layer = bp.bpy.context.scene, bp.bpy.context.view_layer
    cycles = scene.cycles
    keys = ("samples", "filter_width", "use_adaptive_sampling", "use_denoising")
    saved = {key: getattr(cycles, key) for key in keys}
    saved_layer_denoising = layer.cycles.use_denoising
    try:
        cycles.samples, cycles.filter_width = 1, LABEL_FILTER_WIDTH
        cycles.use_adaptive_sampling = cycles.use_denoising = layer.cycles.use_denoising = False
        data = bp.renderer.render()
    finally:
        for key, value in saved.items():
            setattr(cycles, key, value)
        layer.cycles.use_denoising = saved_layer_denoising
    scene.use_nodes = False
    try:
        colors = bp.renderer.render(load_keys={"colors"})["colors"]
    finally:
        scene.use_nodes = True
    return {**data, "colors": colors}


def fresh_session(bp) -> None:
    """Free the previous scene's Cycles session, then keep the next one for every render of this scene.

    Without persistent data Cycles syncs the scene from scratch for each frame of each pass, reloading every
    image texture and the HDRI: a scanned-object tabletop spent ~3 s per 64 px frame doing so. With a session kept
    for the scene's label pass and colour pass (all views) and freed before the next scene (turning the setting off
    frees it), every scene still starts from a clean session, so the pixels are identical to rendering without
    persistent data (tested: colours, depth, normals and ids, scenes re-rendered in another order), and memory
    does not grow with the scenes. Measured (64 px, 2 views, loaded 2-core machine): scanned tabletop 3.2 ->
    0.9 s/frame, furnished room 0.96 -> 0.68, primitives unchanged.
    """
    scene = bp.bpy.context.scene
    scene.render.use_persistent_data = False  # its RNA update frees the persistent session
    scene.render.use_persistent_data = True


def configure_renderer(bp, settings: RenderSettings) -> None:
    """Cycles settings of a worker (and of the benchmark's bare loop, so both render the same pixels)."""
    # BlenderProc's init turns on persistent data. Carried from one scene to the next, Cycles keys its objects by the
    # Blender objects' memory addresses, so a new scene's lights can come out in another order and light sampling
    # draws other noise (one scene with two lights gave 4 different RGB images in 6 identical renders). Off here;
    # :func:`fresh_session` turns it on per scene, after freeing the last scene's session.
    bp.bpy.context.scene.render.use_persistent_data = False
    bp.renderer.set_max_amount_of_samples(settings.max_samples)
    bp.renderer.set_noise_threshold(settings.noise_threshold)
    bp.renderer.set_cpu_threads(settings.threads)
    # BlenderProc's "INTEL" denoiser is a compositor node, and Blender leaks ~0.5 MB per frame through it
    # (measured: +18% RSS over 200 frames, +2% with Cycles' own denoising): denoise inside Cycles instead.
    bp.renderer.set_denoiser(None)
    scene, layer = bp.bpy.context.scene, bp.bpy.context.view_layer
    # Two settings that change no pixel or label (tested) and save ~4% of a 64 px frame: BlenderProc's init leaves
    # the Diffuse Color pass on for its compositor denoiser, which nothing reads now (Cycles' denoiser makes its own
    # albedo guide); and the PNGs Blender writes are read back into HDF5 at once, so zlib level 0 (lossless too).
    layer.use_pass_diffuse_color = False
    scene.render.image_settings.compression = 0
    scene.cycles.use_denoising = layer.cycles.use_denoising = settings.denoiser is not None
    if settings.denoiser is not None:
        scene.cycles.denoiser = "OPENIMAGEDENOISE" if settings.denoiser == "INTEL" else "OPTIX"
        scene.cycles.denoising_quality = settings.denoise_quality
        scene.cycles.denoising_prefilter = settings.denoise_prefilter


def tear_down(bp) -> None:
    """Free a rendered scene before the next one: its objects, meshes, materials, textures and HDRI (BlenderProc's
    ``clean_up``), Cycles' session holding their render copies, then the heap pages that held them.

    Without this the scene stayed loaded until the next one was built, and glibc kept the freed pages of its heap,
    so a worker's RSS followed the largest scene it had seen: a scanned tabletop with 19 M texels holds ~120 MB more
    than one with 1.5 M. Torn down, the worker returns to the same size after every scene.
    """
    bp.clean_up(clean_up_camera=False)
    bp.bpy.context.scene.render.use_persistent_data = False  # frees the session; fresh_session starts the next one
    release_memory()


def release_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    settings = RenderSettings(**job["settings"])
    shard_dir = job["shard_dir"]
    from render.bproc_env import blenderproc
    from render.builder import SceneBuilder

    bp = blenderproc(os.path.join(shard_dir, f".tmp-blender-{os.getpid()}"))
    try:
        configure_device(bp, settings.device)
    except RuntimeError as error:
        _report({"error": str(error), "traceback": traceback.format_exc()})
        return 1
    configure_renderer(bp, settings)
    builder = SceneBuilder(bp, width=settings.width, height=settings.height)
    for task in job["tasks"]:
        try:
            record = render_scene(bp, builder, task, settings, shard_dir)
        except Exception as error:  # reported to the parent with the scene that failed, then stop
            _report({"error": f"scene {task['scene_index']} ({task['spec']}): {error!r}",
                     "traceback": traceback.format_exc()})
            return 1
        _report(record)
        tear_down(bp)
    shutil.rmtree(os.path.join(shard_dir, f".tmp-blender-{os.getpid()}"), ignore_errors=True)
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The bpy wheel segfaults at interpreter shutdown; every file is closed and renamed by now.
    os._exit(code)
