"""``synth adapt-images``: train the rendered-to-real translator (CycleGAN + OP-GAN), or apply it to a dataset.

Two modes (``mode=train`` is the default; ``synth adapt-images apply ...`` is shorthand for ``mode=apply``):

- ``train``: CycleGAN between the rendered frames of ``data.roots`` and the real images of the ``data/real`` group,
  with OP-GAN's object-preserving Siamese network (``translator.opgan_weight=0``: plain CycleGAN) and an optional
  label-consistency term from a ``synth pretrain`` checkpoint's heads (:mod:`adapt.translate`,
  :mod:`adapt.translate_train`). Resumable from ``out_dir/checkpoints/translator.pt``.
- ``apply``: translate every frame of the rendered dataset ``source`` with the generator of ``checkpoint`` and
  write a new dataset folder ``out_dir`` with the same layout and labels (:mod:`adapt.translated_dataset`).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from adapt.translate import CycleTranslator, load_label_consistency
from adapt.translate_train import TranslatorTrainer, TranslatorTraining, build_translator, read_translator
from adapt.translated_dataset import translate_dataset
from apps.launch import checked, run_hydra
from synth.config import register, schema
from synth.data import FrameAugment, RenderedFrames
from synth.engine import NonFiniteLossError
from synth.frames import list_frames, sha256
from synth.preview import write_preview
from synth.real import RealImages
from synth.runtime import resolve_device

TranslatorConfig = schema(CycleTranslator)
TrainingConfig = schema(TranslatorTraining)
MODES = ("train", "apply")


@dataclass
class TranslationData:
    """Training images.

    Args:
        roots: Rendered dataset folders (``synth render`` output).
        size: Side of the square training crops, in pixels.
        scale: Range of the crop area as a fraction of the frame (random resized crop; no colour jitter).
        verify: Re-hash every rendered frame against its index before using it.
        real: The ``data/real`` group (:class:`synth.real.RealImages` plus ``holdout``, the fraction kept out of
            training and used for the pictures).
    """

    roots: list[str] = field(default_factory=lambda: ["data/tabletop"])
    size: int = 64
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    verify: bool = False
    real: Any = None


@dataclass
class LabelConsistencyConfig:
    """CyCADA-style label consistency: the frozen heads of a ``synth pretrain`` checkpoint (run folder or
    ``last.pt``) must predict the same maps on a frame and its translation; weighted by
    ``translator.label_weight``."""

    checkpoint: str | None = None
    heads: list[str] = field(default_factory=lambda: ["depth", "normal", "contour"])


@dataclass
class AdaptImagesApp:
    """``synth adapt-images`` config.

    Args:
        mode: ``train`` or ``apply``.
        translator: Networks and loss weights (:class:`adapt.translate.CycleTranslator`).
        trainer: Steps, batch, learning rate, seed, device, AMP, logging (:class:`TranslatorTraining`).
        data: Training images.
        label_consistency: The optional label-consistency heads.
        out_dir: ``train``: the run folder; ``apply``: the translated dataset folder to write.
        checkpoint: ``apply``: a translator run folder or ``translator.pt``.
        source: ``apply``: the rendered dataset to translate.
    """

    mode: str = "train"
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    trainer: TrainingConfig = field(default_factory=TrainingConfig)
    data: TranslationData = field(default_factory=TranslationData)
    label_consistency: LabelConsistencyConfig = field(default_factory=LabelConsistencyConfig)
    out_dir: str = "runs/adapt_images"
    checkpoint: str | None = None
    source: str | None = None


register("data/real", "real_schema", RealImages, (("holdout", float, 0.1),))
ConfigStore.instance().store(name="adapt_images_app_schema", node=AdaptImagesApp)


def _plain(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


def build_trainer(cfg: DictConfig) -> TranslatorTrainer:
    """Every part of a ``mode=train`` run from its composed config."""
    settings: TranslatorTraining = instantiate(cfg.trainer)
    node = OmegaConf.to_container(cfg.translator, resolve=True)
    node.pop("_target_"), node.pop("_convert_")
    translator = build_translator(seed=settings.seed, **node)
    data = cfg.data
    missing = [r for r in data.roots if not list_frames(r)]
    if missing or not data.roots:
        raise FileNotFoundError(f"data.roots: no rendered frame in {missing or '[]'}; run `synth render` first")
    crop = {"size": data.size, "scale": tuple(data.scale)}
    augment = FrameAugment(**crop, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0)
    synthetic = RenderedFrames(list(data.roots), augment=augment, seed=settings.seed, verify=data.verify)
    if data.real is None:
        raise ValueError("data.real is null: the translator needs real images (data/real=offline)")
    real_node = OmegaConf.to_container(data.real, resolve=True)
    holdout = real_node.pop("holdout")
    pool = instantiate(real_node, seed=settings.seed)
    train, held = pool.split(holdout)
    if not train:
        raise ValueError(f"data.real.holdout={holdout} leaves no real training image out of {len(pool)}")
    n = settings.preview_images
    preview = RenderedFrames(list(data.roots), augment=FrameAugment(**crop, train=False), seed=settings.seed)
    preview_real = pool.subset(held + train, train=False)  # held-out photos first
    preview_synthetic = torch.stack([preview[i]["image"] for i in range(min(n, len(preview)))])
    preview_real_images = torch.stack([preview_real[i]["image"] for i in range(min(n, len(preview_real)))])
    label = cfg.label_consistency
    consistency = None
    if label.checkpoint is not None:
        if translator.weights["label_weight"] <= 0:
            raise ValueError("label_consistency.checkpoint is set but translator.label_weight is 0: set a weight")
        consistency = load_label_consistency(label.checkpoint, heads=list(label.heads))
    elif translator.weights["label_weight"] > 0:
        raise ValueError("translator.label_weight > 0 needs label_consistency.checkpoint (a synth pretrain run)")
    return TranslatorTrainer(translator, synthetic, pool.subset(train), settings, cfg.out_dir, config=_plain(cfg),
                             label_consistency=consistency, preview_synthetic=preview_synthetic,
                             preview_real=preview_real_images)


def _apply_inputs(cfg: DictConfig) -> tuple[str, str]:
    if cfg.checkpoint is None or cfg.source is None:
        raise ValueError("mode=apply needs checkpoint=<translator run or translator.pt> and source=<rendered dataset>")
    if not list_frames(cfg.source):
        raise FileNotFoundError(f"source: no rendered frame in {cfg.source}")
    return cfg.checkpoint, cfg.source


def check_config(cfg: DictConfig) -> None:
    """Instantiate every part (and find the data) before anything is written."""
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {cfg.mode!r}")
    if cfg.mode == "train":
        build_trainer(cfg)
    else:
        read_translator(_apply_inputs(cfg)[0])


def apply_translator(cfg: DictConfig) -> dict:
    """``mode=apply``: write the translated copy of ``source`` to ``out_dir``."""
    checkpoint, source = _apply_inputs(cfg)
    translator, state = read_translator(checkpoint)
    path = checkpoint if str(checkpoint).endswith(".pt") else f"{checkpoint}/checkpoints/translator.pt"
    provenance = {"checkpoint": str(path), "checkpoint_sha256": sha256(path), "step": int(state["step"]),
                  "direction": "rendered->real", "method": ("OP-GAN" if translator.siamese is not None else "CycleGAN"),
                  "translator": dict(translator.config)}
    device = instantiate(cfg.trainer).device
    counts = translate_dataset(translator.g_ab, source, cfg.out_dir, provenance=provenance,
                               device=resolve_device(device))
    # The dataset's picture, redrawn from the translated colours (with the labels they keep).
    preview = write_preview(cfg.out_dir, Path(cfg.out_dir) / "preview.png")
    print(f"translated {counts['translated']} frame(s), {counts['skipped']} already done, of {counts['frames']}: "
          f"{source} -> {cfg.out_dir}\npreview: {preview}")
    return counts


def adapt_images_job(cfg: DictConfig) -> dict:
    """The Hydra task function of ``synth adapt-images``."""
    try:
        if cfg.mode == "apply":
            return apply_translator(cfg)
        summary = build_trainer(cfg).fit()
    except NonFiniteLossError as error:
        print(f"synth adapt-images: error: {error}", file=sys.stderr)
        sys.exit(1)
    last = summary.get("last", {})
    print(f"translator trained {summary['steps']} steps -> {cfg.out_dir} "
          f"(cycle a {last.get('generator/cycle_a', float('nan')):.3f}, "
          f"disc b {last.get('critic/disc_b', float('nan')):.3f})")
    return summary


def command(args: list[str]) -> None:
    """``synth adapt-images [apply] key=value ...``: check the config (instantiating every part), then run."""
    # `synth adapt-images apply ...` reads as mode=apply (a bare word is no Hydra override).
    args = [f"mode={arg}" if arg in MODES else arg for arg in args]
    checked("synth_adapt_images", args, check_config)
    run_hydra("synth_adapt_images", adapt_images_job, args)


__all__ = ["AdaptImagesApp", "adapt_images_job", "apply_translator", "build_trainer", "command"]
