"""``synth pretrain``: build the backbone, objectives and datasets from the config and run the engine.

Objectives are a Hydra config group with several selections (``objective=[depth,normal,contour]``); each entry
is instantiated from its ``_target_`` with its own keyword arguments, and its ``weight`` scales its loss. The
engine never sees a config object.
"""

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from adapt.domain import DANN, FeatureGAN
from adapt.gap import DomainGapMonitor
from apps.launch import checked, run_hydra
from pretext.contrastive import MoCoV2, SimCLR
from pretext.generative import Colorization, Inpainting
from pretext.predictive import Jigsaw, RelativePatchPosition, RotationPrediction
from pretext.synthetic import ContourHead, DepthHead, NormalHead
from synth.backbone import Backbone
from synth.checkpoint import read_checkpoint
from synth.config import differences, register
from synth.data import FrameAugment, LiveFrames, RenderedFrames, StreamingFrames, held_out_scene
from synth.engine import Engine, TrainerSettings, local_rank
from synth.frames import list_frames
from synth.packed import PackedFrames
from synth.probe import FashionMNISTProbe
from synth.real import RealImages
from synth.runtime import resolve_device

logger = logging.getLogger(__name__)

WEIGHT = (("weight", float, 1.0),)
#: The objectives of the ``objective`` config group, each registered as ``<name>_schema`` for its YAML file.
OBJECTIVES = {"depth": DepthHead, "normal": NormalHead, "contour": ContourHead, "rotation": RotationPrediction,
              "jigsaw": Jigsaw, "relpos": RelativePatchPosition, "colorization": Colorization,
              "inpainting": Inpainting, "simclr": SimCLR, "moco": MoCoV2}


@dataclass
class SyntheticData:
    """Rendered training data.

    Args:
        roots: Dataset folders written by ``synth render``.
        streaming: Keep picking up frames as rendering adds them (unlimited-data mode,
            :class:`synth.data.StreamingFrames`): the run may start before the first frame (it waits, saying so),
            new shards are used within ``refresh_s`` seconds, and when rendering ends it trains on to
            ``trainer.steps`` over everything rendered. Otherwise a fixed pool of the frames complete at start
            (reproducible, exactly resumable).
        holdout: Fraction of scenes held out for evaluation and pictures (split by a hash of the scene seed, so no
            view of a held-out scene is trained on; the same split in streaming mode).
        refresh_s: Streaming: seconds between two scans of the dataset folders.
        verify: Re-hash every frame against the index before using it (HDF5 path; ``synth pack`` always does).
        packed: Train on the packed layout that ``synth pack`` writes beside the shards (memory-mapped arrays,
            augmented per batch on the training device by :class:`synth.batch_augment.BatchAugment`, about 15x
            less loader CPU per sample); every shard must have an up-to-date pack. Off by default, so a run and its
            resumption always read the same path. Streaming mode reads HDF5 frames either way.
        max_frames: Train on the first this many training frames only (in frame order, so whole scenes first); the
            held-out split is unchanged. For curves of a metric against the number of rendered frames. None: all.
        augment: The ``data/augment`` group (:class:`synth.data.FrameAugment`).
        real: The ``data/real`` group: real, unlabelled images (:class:`synth.real.RealImages` plus the
            ``holdout`` fraction kept for evaluation and the domain-gap measure).
    """

    roots: list[str] = field(default_factory=lambda: ["data/tabletop"])
    streaming: bool = False
    holdout: float = 0.2
    refresh_s: float = 2.0
    verify: bool = False
    packed: bool = False
    max_frames: int | None = None
    augment: Any = MISSING
    real: Any = None


@dataclass
class PretrainApp:
    """``synth pretrain`` config; ``model``, ``objective``, ``adapt``, ``monitor`` and ``trainer`` come from their
    config groups (``adapt=none`` is null: no adversary)."""

    model: Any = MISSING
    objective: Any = MISSING
    adapt: Any = None
    monitor: Any = field(default_factory=dict)
    trainer: Any = MISSING
    data: SyntheticData = field(default_factory=SyntheticData)
    out_dir: str = "runs/pretrain"


register("model", "backbone_schema", Backbone)
register("trainer", "trainer_schema", TrainerSettings)
register("data/augment", "augment_schema", FrameAugment)
register("data/real", "real_schema", RealImages, (("holdout", float, 0.1),))
register("adapt", "feature_gan_schema", FeatureGAN, WEIGHT)
register("adapt", "dann_schema", DANN, WEIGHT)
register("monitor", "knn_probe_schema", FashionMNISTProbe)
# The monitor's images are built from the data (build_monitors); the config picks how many.
register("monitor", "domain_gap_schema", DomainGapMonitor, (("n_images", int, 64),),
         exclude=("synthetic_images", "real_images"))
for _name, _cls in OBJECTIVES.items():
    register("objective", f"{_name}_schema", _cls, WEIGHT)
ConfigStore.instance().store(name="pretrain_app_schema", node=PretrainApp)


def split_by_scene(frames: RenderedFrames, holdout: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of a frame pool. A scene lands wholly on one side, decided by a hash of its seed:
    stable as the dataset grows and wherever the dataset folder lives."""
    train, held = [], []
    for i, (_, record) in enumerate(frames.frames):
        (held if held_out_scene(record["scene_seed"], holdout) else train).append(i)
    if not train:
        raise ValueError(f"data.holdout={holdout} leaves no training frame out of {len(frames)}")
    return train, held


def augment_device(trainer: TrainerSettings) -> str:
    """Where packed batches are augmented: the training device when batches are read in the main process, the CPU
    in DataLoader workers (no CUDA there). ``"cuda"`` means the current GPU, which the engine sets per DDP rank."""
    if trainer.num_workers > 0:
        return "cpu"
    requested = str(trainer.device)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested).type


def build_engine(cfg: DictConfig) -> Engine:
    """Instantiate every part from a composed ``synth pretrain`` config."""
    trainer = instantiate(cfg.trainer)
    # Model initialisation draws from torch's RNG: seed it from the config without touching the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trainer.seed)
        backbone = instantiate(cfg.model)
        objectives, weights = {}, {}
        nodes = dict(cfg.objective.items())
        if cfg.adapt is not None:
            nodes["adapt"] = cfg.adapt
        for name, node in nodes.items():
            node = OmegaConf.to_container(node, resolve=True)
            weights[name] = float(node.pop("weight"))
            objectives[name] = instantiate(node)
    data = cfg.data
    datasets, eval_datasets = {}, {}
    report = {}  # what the data sources skipped, for the summary
    measure = {}  # domain -> [held-out, training] datasets without augmentation, for the domain-gap monitor
    gap = "domain_gap" in cfg.monitor  # measured on both domains even when only one is trained on
    if any("synthetic" in o.domains for o in objectives.values()) or gap:
        trains = any("synthetic" in o.domains for o in objectives.values())
        augment = instantiate(data.augment)
        missing = [r for r in data.roots if not list_frames(r)] if not data.streaming else []
        if missing:
            raise FileNotFoundError(f"data.roots: no rendered frame in {missing}; run `synth render "
                                    f"out_dir={missing[0]}` first")
        if not 0 <= data.holdout < 1 or data.refresh_s <= 0:
            raise ValueError(f"data.holdout must be in [0, 1) and data.refresh_s positive, got {data.holdout} and "
                             f"{data.refresh_s}")
        eval_augment = instantiate(data.augment, train=False)
        if data.streaming:
            # Folders that are still being written (or not yet): the held-out side is re-scanned at each evaluation.
            held_out = LiveFrames(list(data.roots), augment=eval_augment, holdout=data.holdout, side="held_out",
                                  seed=trainer.seed)
            if trains:
                datasets["synthetic"] = StreamingFrames(list(data.roots), augment=augment, seed=trainer.seed,
                                                        holdout=data.holdout, refresh_s=data.refresh_s)
                eval_datasets["synthetic"] = held_out
            measure["synthetic"] = [held_out, LiveFrames(list(data.roots), augment=eval_augment,
                                                         holdout=data.holdout, side="train", seed=trainer.seed)]
        else:
            if data.packed:
                pool = PackedFrames(list(data.roots), augment=augment, seed=trainer.seed,
                                    device=augment_device(trainer))
            else:
                pool = RenderedFrames(list(data.roots), augment=augment, seed=trainer.seed, verify=data.verify)
            train, held = split_by_scene(pool, data.holdout)
            measured = train  # the gap is measured on every frame, whatever max_frames trains on
            if data.max_frames is not None:
                if data.max_frames < 1:
                    raise ValueError(f"data.max_frames must be >= 1 or null, got {data.max_frames}")
                train = train[:data.max_frames]
            if trains:
                datasets["synthetic"] = pool.subset(train)
                if held:
                    eval_datasets["synthetic"] = pool.subset(held, augment=eval_augment)
            measure["synthetic"] = [pool.subset(held, augment=eval_augment) if held else None,
                                    pool.subset(measured, augment=eval_augment)]
    if any("real" in o.domains for o in objectives.values()) or gap:
        trains = any("real" in o.domains for o in objectives.values())
        if data.real is None:
            raise ValueError("an objective or monitor reads real images but data.real is null; "
                             "pick one with data/real=offline")
        node = OmegaConf.to_container(data.real, resolve=True)
        holdout = node.pop("holdout")
        pool = instantiate(node, seed=trainer.seed)
        report["real_images"] = len(pool)
        report["real_unreadable"] = pool.n_unreadable  # each was logged by name when decoding
        train, held = pool.split(holdout)
        if not train:
            raise ValueError(f"data.real.holdout={holdout} leaves no real training image out of {len(pool)}")
        if trains:
            datasets["real"] = pool.subset(train)
            if held:
                eval_datasets["real"] = pool.subset(held, train=False)
        measure["real"] = [pool.subset(held, train=False) if held else None, pool.subset(train, train=False)]
    return Engine(backbone=backbone, objectives=objectives, weights=weights, datasets=datasets,
                  settings=trainer, out_dir=cfg.out_dir, eval_datasets=eval_datasets,
                  config=plain_config(cfg), monitors=build_monitors(cfg, measure), data_report=report)


def _first_images(datasets: list, n: int) -> torch.Tensor:
    """Up to ``n`` unaugmented images, held-out ones first, then training ones (a small dataset's held-out side
    alone is too few to measure a gap). Fixed sample seed: the same images at every call."""
    images = []
    for dataset in datasets:
        if hasattr(dataset, "refresh"):  # a dataset still being rendered
            dataset.refresh()
        for i in range(len(dataset) if dataset is not None else 0):
            if len(images) == n:
                break
            sample = dataset[(i, 0)]
            if isinstance(sample, dict):  # not a corrupt frame
                images.append(sample["image"])
    return torch.stack(images) if images else torch.empty(0, 3, 1, 1)


class GapWhenReady:
    """The domain-gap monitor, built at the first evaluation that finds enough images (it needs 6 of each domain):
    until then each call warns that it is skipped and returns nothing, so a run on a dataset still being rendered
    (``data.streaming=true``), or one too small, trains on instead of stopping."""

    def __init__(self, build):
        self.build = build
        self.monitor = None

    def __call__(self, backbone, step: int) -> dict:
        if self.monitor is None:
            try:
                self.monitor = self.build()
            except ValueError as error:
                logger.warning("monitor domain_gap skipped at step %d: %s", step, error)
                print(f"synth pretrain: warning: monitor domain_gap skipped at step {step}: {error}", flush=True)
                return {}
        return self.monitor(backbone, step)


def build_monitors(cfg: DictConfig, measure: dict) -> dict:
    """The ``monitor`` group: callables ``(backbone, step) -> {metric: value}`` the engine runs at evaluations.

    Args:
        cfg: The composed config.
        measure: Domain -> ``[held-out, training]`` datasets without augmentation (the domain-gap monitor's images).
    """
    monitors = {}
    for name, node in cfg.monitor.items():
        node = OmegaConf.to_container(node, resolve=True)
        if name == "domain_gap":
            missing = [d for d in ("synthetic", "real") if d not in measure]
            if missing:
                raise ValueError(f"monitor.domain_gap needs {' and '.join(missing)} images: set data.roots / "
                                 f"data.real, or drop the monitor (monitor=[knn_probe])")
            n_images = node.pop("n_images")
            monitor = GapWhenReady(lambda node=node, n=n_images: instantiate(
                node, synthetic_images=_first_images(measure["synthetic"], n),
                real_images=_first_images(measure["real"], n)))
            if not cfg.data.streaming:  # a fixed pool does not grow: find out now, and warn once if it is too small
                try:
                    monitor.monitor = monitor.build()
                except ValueError as error:
                    print(f"synth pretrain: warning: monitor domain_gap skipped: {error}", flush=True)
                    continue
            monitors[name] = monitor
        else:
            probe = instantiate(node)
            monitors[name] = lambda backbone, step, probe=probe: probe(backbone)
    return monitors


def plain_config(cfg: DictConfig) -> dict:
    """The job's config as plain data for checkpoints: resolved, without Hydra's own node."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


#: Config keys a resumed run may change: they decide what is logged, drawn and measured, or where and how fast it
#: runs, not what is trained.
RESUMABLE_CHANGES: tuple[str, ...] = (
    "out_dir", "monitor.", "data.verify", "trainer.log_every", "trainer.image_every", "trainer.eval_every",
    "trainer.eval_batches", "trainer.checkpoint_every", "trainer.num_workers", "trainer.compile", "trainer.device",
)


def check_resume(cfg: DictConfig, engine: Engine) -> None:
    """Refuse to resume a run folder whose checkpoint was made with another config, naming the keys that differ.

    Raises:
        synth.checkpoint.CheckpointError: ``last.pt`` is damaged (one line naming it and what to do).
        ValueError: the configs differ on keys outside :data:`RESUMABLE_CHANGES`.
    """
    if not engine.checkpoint_path.exists():
        return
    saved = read_checkpoint(engine.checkpoint_path, weights_only=False, mmap=True)
    changed = differences(saved.get("config") or {}, engine.config, ignore=RESUMABLE_CHANGES)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
        raise ValueError(f"{cfg.out_dir} holds a run (step {saved.get('step')}) made with another config ({shown}): "
                         f"use another out_dir, or delete {cfg.out_dir} to start over")


def check_config(cfg: DictConfig) -> None:
    """Instantiate every part (and find the data) before anything is written; check a run folder to resume.

    The device comes first: ``trainer=gpu`` or ``trainer.device=cuda`` on a machine without CUDA is one line.
    """
    try:
        resolve_device(cfg.trainer.device, local_rank())
    except ValueError as error:
        raise ValueError(f"trainer.device: {error}") from None
    check_resume(cfg, build_engine(cfg))


def pretrain_job(cfg: DictConfig) -> dict:
    """The Hydra task function of ``synth pretrain``."""
    summary = build_engine(cfg).fit()
    skipped = [f"{summary[k]} {what}" for k, what in (("corrupt_frames", "corrupt rendered frames"),
                                                        ("real_unreadable", "unreadable real images"))
               if summary.get(k)]
    if skipped:
        print(f"skipped {' and '.join(skipped)} (named in the log above and in {cfg.out_dir}/summary.json)")
    if summary.get("eval"):
        lines = [f"  {k.removeprefix('eval/')}: {v:.4g}" for k, v in sorted(summary["eval"].items())]
        print(f"pretrained {summary['steps']} steps -> {cfg.out_dir}\nheld-out metrics:\n" + "\n".join(lines))
    return summary


def command(args: list[str]) -> None:
    """``synth pretrain``: check the config (instantiating every part), then run the job."""
    checked("synth_pretrain", args, check_config)
    run_hydra("synth_pretrain", pretrain_job, args)
