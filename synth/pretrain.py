"""``synth pretrain``: build the backbone, objectives and datasets from the config and run the engine.

Objectives are a Hydra config group with several selections (``objective=[depth,normal,contour]``); each entry
is instantiated from its ``_target_`` with its own keyword arguments, and its ``weight`` scales its loss. The
engine never sees a config object.
"""

import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, OmegaConf

from pretext.synthetic import ContourHead, DepthHead, NormalHead
from render.reader import list_frames
from synth.backbone import Backbone
from synth.config import register
from synth.data import FrameAugment, RenderedFrames, StreamingFrames
from synth.engine import Engine, TrainerSettings

WEIGHT = (("weight", float, 1.0),)


@dataclass
class SyntheticData:
    """Rendered training data.

    Args:
        roots: Dataset folders written by ``synth render``.
        streaming: Keep picking up frames as rendering adds them (unlimited-data mode); otherwise a fixed pool of
            the frames complete at start (reproducible).
        holdout: Fraction of scenes held out for evaluation and pictures (split by scene, so no view of a
            held-out scene is trained on).
        verify: Re-hash every frame against the index before using it.
    """

    roots: list[str] = field(default_factory=lambda: ["data/tabletop"])
    streaming: bool = False
    holdout: float = 0.2
    verify: bool = False
    augment: Any = MISSING


@dataclass
class PretrainApp:
    """``synth pretrain`` config; ``model``, ``objective`` and ``trainer`` come from their config groups."""

    model: Any = MISSING
    objective: Any = MISSING
    trainer: Any = MISSING
    data: SyntheticData = field(default_factory=SyntheticData)
    out_dir: str = "runs/pretrain"


register("model", "backbone_schema", Backbone)
register("objective", "depth_schema", DepthHead, WEIGHT)
register("objective", "normal_schema", NormalHead, WEIGHT)
register("objective", "contour_schema", ContourHead, WEIGHT)
register("trainer", "trainer_schema", TrainerSettings)
register("data/augment", "augment_schema", FrameAugment)
ConfigStore.instance().store(name="pretrain_app_schema", node=PretrainApp)


def split_by_scene(frames: RenderedFrames, holdout: float) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of a frame pool. A scene lands wholly on one side, decided by a hash of its seed:
    stable as the dataset grows and wherever the dataset folder lives."""
    train, held = [], []
    for i, (_, record) in enumerate(frames.frames):
        (held if zlib.crc32(str(record["scene_seed"]).encode()) / 2**32 < holdout else train).append(i)
    if not train:
        raise ValueError(f"data.holdout={holdout} leaves no training frame out of {len(frames)}")
    return train, held


def build_engine(cfg: DictConfig) -> Engine:
    """Instantiate every part from a composed ``synth pretrain`` config."""
    trainer = instantiate(cfg.trainer)
    # Model initialisation draws from torch's RNG: seed it from the config without touching the caller's state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(trainer.seed)
        backbone = instantiate(cfg.model)
        objectives, weights = {}, {}
        for name, node in cfg.objective.items():
            node = OmegaConf.to_container(node, resolve=True)
            weights[name] = float(node.pop("weight"))
            objectives[name] = instantiate(node)
    data = cfg.data
    datasets, eval_datasets = {}, {}
    if any("synthetic" in o.domains for o in objectives.values()):
        augment = instantiate(data.augment)
        missing = [r for r in data.roots if not list_frames(r)] if not data.streaming else []
        if missing:
            raise FileNotFoundError(f"data.roots: no rendered frame in {missing}; run `synth render "
                                    f"out_dir={missing[0]}` first")
        eval_augment = instantiate(data.augment, train=False)
        if data.streaming:
            datasets["synthetic"] = StreamingFrames(list(data.roots), augment=augment, seed=trainer.seed)
            eval_datasets["synthetic"] = RenderedFrames(list(data.roots), augment=eval_augment, seed=trainer.seed)
        else:
            pool = RenderedFrames(list(data.roots), augment=augment, seed=trainer.seed, verify=data.verify)
            train, held = split_by_scene(pool, data.holdout)
            datasets["synthetic"] = pool.subset(train)
            if held:
                eval_datasets["synthetic"] = pool.subset(held, augment=eval_augment)
    return Engine(backbone=backbone, objectives=objectives, weights=weights, datasets=datasets,
                  settings=trainer, out_dir=cfg.out_dir, eval_datasets=eval_datasets,
                  config=plain_config(cfg))


def plain_config(cfg: DictConfig) -> dict:
    """The job's config as plain data for checkpoints: resolved, without Hydra's own node."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def check_config(cfg: DictConfig) -> None:
    """Instantiate every part (and find the data) before anything is written."""
    build_engine(cfg)


def pretrain_job(cfg: DictConfig) -> dict:
    """The Hydra task function of ``synth pretrain``."""
    summary = build_engine(cfg).fit()
    if summary.get("eval"):
        lines = [f"  {k.removeprefix('eval/')}: {v:.4g}" for k, v in sorted(summary["eval"].items())]
        print(f"pretrained {summary['steps']} steps -> {cfg.out_dir}\nheld-out metrics:\n" + "\n".join(lines))
    return summary
