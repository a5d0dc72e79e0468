"""``synth demo``: the main job on a small default (``configs/synth_demo.yaml``), chained from the single commands.

It renders a few frames, pretrains with synthetic heads, a pretext task, a contrastive objective and the feature
GAN, transfers to real tasks next to random init, and prints the results table. Each stage is the single-stage
command with overrides derived from the demo's settings, so a rerun reuses what is done.
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from apps import pretrain, render, transfer
from apps.launch import checked, run_hydra


@dataclass
class DemoSettings:
    """The demo's budget; ``scale`` multiplies frames and steps (``synth demo demo.scale=8`` on a GPU).

    Args:
        scale: Multiplier of ``frames``, ``pretrain_steps`` and the transfer steps.
        frames: Rendered frames.
        resolution: Rendered image side.
        pretrain_steps: Pretraining steps.
        batch_size: Pretraining batch per domain.
        objectives: The pretraining objectives.
        adapt: The adversary (``feature_gan``, ``dann`` or ``none``).
        tasks: Transfer tasks.
        detection_steps: Detector fine-tuning steps.
        probe_images: Fashion-MNIST training images of the linear probe (half as many test images).
        cutpaste_images: Images of the cut-paste detection set (2/3 train, 1/4 test, the rest validation).
        device: ``auto``, ``cpu`` or ``cuda``.
    """

    scale: int = 1
    frames: int = 24
    resolution: int = 64
    pretrain_steps: int = 100
    batch_size: int = 8
    objectives: list[str] = field(default_factory=lambda: ["depth", "normal", "contour", "rotation", "simclr"])
    adapt: str = "feature_gan"
    tasks: list[str] = field(default_factory=lambda: ["linear_probe", "detection"])
    detection_steps: int = 60
    probe_images: int = 2000
    cutpaste_images: int = 240
    device: str = "auto"


@dataclass
class DemoApp:
    demo: DemoSettings = field(default_factory=DemoSettings)
    out_dir: str = "outputs/demo"


ConfigStore.instance().store(name="demo_app_schema", node=DemoApp)


def demo_overrides(cfg: DictConfig) -> dict[str, list[str]]:
    """The render, pretrain and transfer overrides the demo runs, from its settings."""
    d, out = cfg.demo, Path(cfg.out_dir)
    if d.scale < 1:
        raise ValueError(f"demo.scale must be >= 1, got {d.scale}")
    steps = d.pretrain_steps * d.scale
    render = [f"out_dir={out / 'data'}", f"n_frames={d.frames * d.scale}", "preview=true",
              f"render.width={d.resolution}", f"render.height={d.resolution}"]
    pretrain = [f"data.roots=[{out / 'data'}]", f"out_dir={out / 'pretrain'}", f"trainer.steps={steps}",
                f"trainer.batch_size={d.batch_size}", "trainer.log_every=5", f"trainer.image_every={steps // 2}",
                f"trainer.eval_every={steps // 2}", f"trainer.warmup_steps={min(20, steps // 5)}",
                f"trainer.device={d.device}", "data.holdout=0.25", f"data.augment.size={d.resolution}",
                f"objective=[{','.join(d.objectives)}]", f"adapt={d.adapt}"]
    n = d.cutpaste_images * d.scale
    splits = f"{{train: {2 * n // 3}, val: {max(1, n // 12)}, test: {max(1, n // 4)}}}"
    transfer = [f"checkpoint={out / 'pretrain'}", f"tasks=[{','.join(d.tasks)}]", f"out_dir={out / 'transfer'}",
                f"device={d.device}", f"data.detection.build.out_dir={out / 'cutpaste'}",
                f"data.segmentation.build.out_dir={out / 'cutpaste'}",
                f"+data.detection.build.n_images={splits}", f"+data.segmentation.build.n_images={splits}",
                "data.detection.build.size=96", "data.segmentation.build.size=96",
                f"budget.detection.steps={d.detection_steps * d.scale}", "budget.detection.min_size=96",
                "budget.detection.max_size=96", "+budget.detection.fpn_channels=64",
                f"data.classification.train.max_images={d.probe_images * d.scale}",
                f"data.classification.test.max_images={max(10, d.probe_images * d.scale // 2)}"]
    return {"render": render, "pretrain": pretrain, "transfer": transfer}


def artefacts(out: Path) -> list[Path]:
    """What a person opens after the demo."""
    return [out / "data" / "preview.png", out / "pretrain" / "loss_curves.png",
            out / "pretrain" / "embeddings" / "embedding.png", out / "pretrain" / "tensorboard",
            out / "transfer" / "results.md", out / "transfer" / "linear_probe_stages.png"]


def command(args: list[str]) -> None:
    """Render, pretrain and transfer with the demo's derived overrides, then list the pictures to open."""
    cfg = checked("synth_demo", args, demo_overrides)
    if cfg is None:
        run_hydra("synth_demo", lambda c: print(c), args)
        return
    stages = demo_overrides(cfg)
    render.command(stages["render"])
    pretrain.command(stages["pretrain"])
    transfer.command(stages["transfer"])
    print("\nopen these:\n" + "\n".join(f"  {p}" for p in artefacts(Path(cfg.out_dir)) if p.exists()))


__all__ = ["DemoApp", "DemoSettings", "artefacts", "command", "demo_overrides"]
