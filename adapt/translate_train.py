"""Training the rendered-to-real translator (:class:`adapt.translate.CycleTranslator`): a resumable, seeded loop.

The loop alternates as OP-GAN does: the generators' step with the discriminators and the Siamese network frozen,
then the critics' step with the generators frozen (:meth:`~adapt.translate.CycleTranslator.generator_losses`,
:meth:`~adapt.translate.CycleTranslator.critic_losses`). Adam with :math:`\\beta_1 = 0.5` for both (CycleGAN), a
constant learning rate then a linear decay to zero.

Determinism and resume: the data order comes from :class:`synth.data.StepSampler` (a function of the seed and the
step), and every other random draw of a step (history pools, patch pairs) from a ``torch.Generator`` seeded by
``(seed, step)``. The checkpoint holds the weights, both optimizers and the history pools, so a rerun of the same
command resumes where it stopped and ends with the same weights as an uninterrupted run (bit-exact on the CPU);
a rerun after the last step does nothing. A non-finite loss stops the run naming the term; a checkpoint is never
written with non-finite weights.

A run folder holds ``checkpoints/translator.pt``, ``train_log.jsonl``, ``tensorboard/``, ``pictures/step_*.png``
(rendered input / translation / reconstruction, then the same for real images) and ``summary.json``.
"""

import json
import math
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from adapt.translate import CycleTranslator, LabelConsistency, to_unit_range
from synth.data import StepSampler, collate_frames
from synth.engine import NonFiniteLossError
from synth.io import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text
from synth.runtime import resolve_device

#: The ``format`` entry of a translator checkpoint.
CHECKPOINT_FORMAT = "synth-translator/1"


@dataclass(kw_only=True)
class TranslatorTraining:
    """How the translator is trained.

    Args:
        steps: Optimizer steps (each: one generator step and one critic step).
        batch_size: Rendered and real images per step (each).
        lr: Adam learning rate of both optimizers (CycleGAN: 2e-4).
        beta1: Adam's :math:`\\beta_1` (CycleGAN: 0.5).
        decay_from: Fraction of ``steps`` after which the learning rate decays linearly to 0 (CycleGAN: 0.5).
        seed: Seeds the initial weights, the data order and every draw of a step.
        device: ``cpu`` (default), ``cuda``, ``cuda:N`` or ``auto``.
        amp: bf16 autocast (on GPUs; on CPUs without native bf16 it is slower).
        log_every: Steps between two log lines (TensorBoard, ``train_log.jsonl``).
        image_every: Steps between two picture grids; 0: only at the end.
        checkpoint_every: Steps between two checkpoints (one is always written at the end).
        preview_images: Images per domain in the picture grids.
    """

    steps: int = 400
    batch_size: int = 4
    lr: float = 2e-4
    beta1: float = 0.5
    decay_from: float = 0.5
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    log_every: int = 10
    image_every: int = 100
    checkpoint_every: int = 50
    preview_images: int = 4

    def __post_init__(self):
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0 or not 0 <= self.decay_from <= 1:
            raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, 0 <= decay_from <= 1; got {self.steps}, "
                             f"{self.batch_size}, {self.lr}, {self.decay_from}")
        if self.log_every < 1 or self.checkpoint_every < 1 or self.image_every < 0 or self.preview_images < 1:
            raise ValueError("log_every, checkpoint_every and preview_images must be >= 1, image_every >= 0")

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): constant, then linear to 0 from ``decay_from * steps``."""
        start = self.decay_from * self.steps
        if step < start or self.steps <= start:
            return self.lr
        return self.lr * max(0.0, 1.0 - (step - start) / (self.steps - start))


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A 63-bit seed that is a fixed function of ``(seed, stream, step)`` (stable across processes)."""
    state = np.random.SeedSequence([int(seed), int(stream), int(step)]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where a run folder keeps its translator checkpoint."""
    return Path(out_dir) / "checkpoints" / "translator.pt"


def read_translator(checkpoint: str | Path, map_location: str | torch.device = "cpu"
                    ) -> tuple[CycleTranslator, dict]:
    """The translator of a checkpoint written by :class:`TranslatorTrainer` (a file or a run folder), and the
    checkpoint dict.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the file is not a translator checkpoint.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = checkpoint_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no translator checkpoint at {path} (train one with synth adapt-images)")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch reports a torn or foreign file as RuntimeError, UnpicklingError, EOFError...
        raise ValueError(f"{path} is not a readable translator checkpoint ({type(error).__name__})") from error
    if not isinstance(state, Mapping) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a translator checkpoint (format {CHECKPOINT_FORMAT!r} expected)")
    translator = CycleTranslator(**state["translator_config"])
    translator.load_state_dict(state["model"])
    return translator, dict(state)


def _keys(n: int, seed: int, batch_size: int, start_step: int) -> Iterator[list[tuple[int, int]]]:
    """Batches of ``(index, sample_seed)`` keys from :class:`synth.data.StepSampler`, from ``start_step`` on."""
    stream = iter(StepSampler(n, seed=seed, batch_size=batch_size, start_step=start_step))
    while True:
        yield [next(stream) for _ in range(batch_size)]


def _images(dataset, keys: list[tuple[int, int]]) -> Tensor:
    """The stacked ImageNet-normalised images of ``keys``; corrupt frames (None) are dropped."""
    batch = collate_frames([dataset[key] for key in keys])
    if "image" not in batch:
        raise ValueError(f"every sample of a batch was unreadable (keys {keys[:3]}...): see the warnings above")
    return batch["image"]


def _tiles(images: Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (H, N * W, 3) uint8 RGB, one row of tiles with a 2-pixel gap."""
    array = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().numpy().transpose(0, 2, 3, 1)
    gap = np.full((array.shape[1], 2, 3), 255, np.uint8)
    parts = []
    for tile in array:
        parts += [tile, gap]
    return np.concatenate(parts[:-1], axis=1)


def picture_grid(rows: list[Tensor], min_side: int = 96) -> np.ndarray:
    """Rows of images in [-1, 1] (each :math:`(N, 3, H, W)`, same shape) as one RGB uint8 grid, upscaled by an
    integer factor (nearest) so a tile is at least ``min_side`` pixels."""
    scale = max(1, math.ceil(min_side / rows[0].shape[-1]))
    strips = [_tiles(row) for row in rows]
    gap = np.full((2, strips[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate([part for strip in strips for part in (strip, gap)][:-1], axis=0)
    return cv2.resize(grid, (grid.shape[1] * scale, grid.shape[0] * scale), interpolation=cv2.INTER_NEAREST)


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image as PNG atomically."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode {path} as PNG")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(path, data.tobytes())


class TranslatorTrainer:
    """Trains a :class:`~adapt.translate.CycleTranslator` from a rendered and a real dataset.

    Args:
        translator: The networks and losses (built under a seeded RNG by the caller, e.g. :func:`build_translator`).
        synthetic: Map-style dataset of rendered frames keyed by ``(index, sample_seed)`` with an ``image`` entry
            (:class:`synth.data.RenderedFrames`).
        real: The same for real images (:class:`synth.real.RealImages`).
        settings: :class:`TranslatorTraining`.
        out_dir: Run folder.
        config: Plain config recorded in the checkpoint.
        label_consistency: The frozen heads of the label-consistency term (when ``label_weight > 0``).
        preview_synthetic: ImageNet-normalised rendered images for the pictures (default: the first
            ``preview_images`` of ``synthetic`` with sample seed 0).
        preview_real: The same for real images.

    Examples:
        >>> trainer = TranslatorTrainer(build_translator(seed=0), synthetic, real,  # doctest: +SKIP
        ...                             TranslatorTraining(steps=200), out_dir="runs/translate")
        >>> summary = trainer.fit()  # doctest: +SKIP
    """

    def __init__(self, translator: CycleTranslator, synthetic, real, settings: TranslatorTraining,
                 out_dir: str | Path, config: Mapping | None = None, label_consistency: LabelConsistency | None = None,
                 preview_synthetic: Tensor | None = None, preview_real: Tensor | None = None):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.translator = translator.to(self.device)
        self.label_consistency = None if label_consistency is None else label_consistency.to(self.device)
        if translator.weights["label_weight"] > 0 and label_consistency is None:
            raise ValueError("translator.label_weight > 0 needs label_consistency.checkpoint (a synth pretrain run)")
        self.synthetic, self.real = synthetic, real
        self.out_dir = Path(out_dir)
        self.config = dict(config or {})
        betas = (settings.beta1, 0.999)
        # Adam, not synth.runtime.build_optimizer's AdamW: CycleGAN's recipe is Adam with beta1 = 0.5, no decay.
        self.optimizer_g = torch.optim.Adam(translator.generators(), lr=settings.lr, betas=betas)
        self.optimizer_d = torch.optim.Adam(translator.critics(), lr=settings.lr, betas=betas)
        n = settings.preview_images
        self.preview_synthetic = (preview_synthetic if preview_synthetic is not None
                                  else _images(synthetic, [(i, 0) for i in range(min(n, len(synthetic)))]))
        self.preview_real = (preview_real if preview_real is not None
                             else _images(real, [(i, 0) for i in range(min(n, len(real)))]))
        self.step = 0

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "step": self.step, "model": self.translator.state_dict(),
                "translator_config": dict(self.translator.config),
                "optimizer_g": self.optimizer_g.state_dict(), "optimizer_d": self.optimizer_d.state_dict(),
                "pools": {"a": self.translator.pool_a.state_dict(), "b": self.translator.pool_b.state_dict()},
                "settings": asdict(self.settings), "config": self.config}

    def save(self) -> Path:
        """Write the checkpoint atomically, after checking that every weight is finite.

        Raises:
            NonFiniteLossError: a weight is NaN or infinite (nothing is written; the previous checkpoint stays).
        """
        bad = [name for name, p in self.translator.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLossError(f"step {self.step}: non-finite weights in {bad[:3]}; checkpoint not written "
                                     f"(the previous one is kept)")
        path = checkpoint_path(self.out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)
        return path

    def resume(self) -> bool:
        """Load the run folder's checkpoint if there is one; True when it did."""
        path = checkpoint_path(self.out_dir)
        if not path.is_file():
            return False
        _, state = read_translator(path, map_location=self.device)
        self.translator.load_state_dict(state["model"])
        self.optimizer_g.load_state_dict(state["optimizer_g"])
        self.optimizer_d.load_state_dict(state["optimizer_d"])
        self.translator.pool_a.load_state_dict(state["pools"]["a"])
        self.translator.pool_b.load_state_dict(state["pools"]["b"])
        self.step = int(state["step"])
        return True

    # ------------------------------------------------------------------ one step
    @staticmethod
    def _check(losses: Mapping[str, Tensor], step: int, side: str) -> None:
        if torch.isfinite(losses["loss"].detach()):
            return
        for name, value in losses.items():
            if name != "loss" and not torch.isfinite(value.detach()).all():
                raise NonFiniteLossError(f"step {step}: non-finite {side} loss term {name!r} "
                                         f"({float(value.detach())}); stopped, the last checkpoint is kept")
        total = float(losses["loss"].detach())
        raise NonFiniteLossError(f"step {step}: non-finite {side} loss ({total}); stopped")

    def train_step(self, real_a: Tensor, real_b: Tensor) -> dict[str, float]:
        """One generator step and one critic step on ImageNet-normalised batches; returns the logged values."""
        settings, translator = self.settings, self.translator
        lr = settings.lr_at(self.step)
        for optimizer in (self.optimizer_g, self.optimizer_d):
            for group in optimizer.param_groups:
                group["lr"] = lr
        real_a = to_unit_range(real_a.to(self.device))
        real_b = to_unit_range(real_b.to(self.device))
        generator = torch.Generator().manual_seed(step_seed(settings.seed, self.step, stream=2))
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=settings.amp)

        critics = translator.critics()
        for p in critics:
            p.requires_grad_(False)
        with autocast:
            losses, fakes = translator.generator_losses(real_a, real_b, generator, self.label_consistency)
        self._check(losses, self.step, "generator")
        self.optimizer_g.zero_grad(set_to_none=True)
        losses["loss"].backward()
        self.optimizer_g.step()
        for p in critics:
            p.requires_grad_(True)

        with autocast:
            critic = translator.critic_losses(real_a, real_b, fakes["fake_a"], fakes["fake_b"], generator)
        self._check(critic, self.step, "critic")
        if critic["loss"].requires_grad:
            self.optimizer_d.zero_grad(set_to_none=True)
            critic["loss"].backward()
            self.optimizer_d.step()
        self.step += 1
        values = {f"generator/{k}": float(v.detach()) for k, v in losses.items()}
        values.update({f"critic/{k}": float(v.detach()) for k, v in critic.items()})
        values["lr"] = lr
        return values

    # ------------------------------------------------------------------ pictures
    @torch.no_grad()
    def pictures(self) -> np.ndarray:
        """The picture grid: rendered input / G(a) / F(G(a)) / real input / F(b) / G(F(b))."""
        g_ab, g_ba = self.translator.g_ab, self.translator.g_ba
        a = to_unit_range(self.preview_synthetic.to(self.device))
        b = to_unit_range(self.preview_real.to(self.device))
        fake_b, fake_a = g_ab.translate(a), g_ba.translate(b)
        n = min(len(a), len(b))
        rows = [a, fake_b, g_ba.translate(fake_b), b, fake_a, g_ab.translate(fake_a)]
        return picture_grid([row[:n] for row in rows])

    def write_pictures(self) -> Path:
        grid = self.pictures()
        path = write_png(self.out_dir / "pictures" / f"step_{self.step:06d}.png", grid)
        atomic_write_bytes(self.out_dir / "pictures" / "latest.png", path.read_bytes())
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to ``settings.steps`` (resuming from the run folder's checkpoint); returns the summary.

        Raises:
            NonFiniteLossError: a loss term became NaN or infinite (the message names it and the step).
        """
        settings = self.settings
        resumed = self.resume()
        log_path = self.out_dir / "train_log.jsonl"
        if resumed and self.step >= settings.steps:
            print(f"translator already trained to step {self.step} (steps={settings.steps}): nothing to do")
            summary_path = self.out_dir / "summary.json"
            return json.loads(summary_path.read_text()) if summary_path.exists() else {"steps": self.step}
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_log(log_path)
        from torch.utils.tensorboard import SummaryWriter  # slow import, only when training

        writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step if resumed else None)
        synthetic_keys = _keys(len(self.synthetic), step_seed(settings.seed, 0, stream=0), settings.batch_size,
                               self.step)
        real_keys = _keys(len(self.real), step_seed(settings.seed, 0, stream=1), settings.batch_size, self.step)
        self.translator.train()
        window: list[dict[str, float]] = []
        start_step, started = self.step, time.perf_counter()
        progress = tqdm(total=settings.steps, initial=self.step, desc="adapt-images", unit="step")
        try:
            while self.step < settings.steps:
                real_a = _images(self.synthetic, next(synthetic_keys))
                real_b = _images(self.real, next(real_keys))
                values = self.train_step(real_a, real_b)
                window.append(values)
                progress.update(1)
                if self.step % settings.log_every == 0 or self.step == settings.steps:
                    mean = {k: float(np.mean([w[k] for w in window])) for k in window[-1]}
                    for key, value in mean.items():
                        writer.add_scalar(key, value, self.step)
                    with open(log_path, "a") as log:
                        log.write(json.dumps({"step": self.step, **mean}) + "\n")
                    progress.set_postfix(g=f"{mean['generator/loss']:.3f}", d=f"{mean['critic/loss']:.3f}")
                    window = []
                if settings.image_every and self.step % settings.image_every == 0:
                    self.write_pictures()
                if self.step % settings.checkpoint_every == 0 or self.step == settings.steps:
                    self.save()
        finally:
            progress.close()
            writer.close()
        seconds = time.perf_counter() - started
        self.write_pictures()
        lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
        summary = {"steps": self.step, "seconds_per_step": seconds / max(1, self.step - start_step),
                   "device": str(self.device), "last": lines[-1] if lines else {},
                   "checkpoint": str(checkpoint_path(self.out_dir))}
        atomic_write_json(self.out_dir / "summary.json", summary, indent=2)
        return summary

    def _truncate_log(self, log_path: Path) -> None:
        """Drop log lines past the resumed step (a run killed after logging but before its checkpoint)."""
        if not log_path.exists():
            return
        lines = [line for line in log_path.read_text().splitlines()
                 if line.strip() and json.loads(line)["step"] <= self.step]
        atomic_write_text(log_path, "".join(line + "\n" for line in lines))


def build_translator(seed: int = 0, **kwargs) -> CycleTranslator:
    """A :class:`~adapt.translate.CycleTranslator` whose initial weights depend only on ``seed`` (the caller's
    global RNG state is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CycleTranslator(**kwargs)


__all__ = ["CHECKPOINT_FORMAT", "TranslatorTrainer", "TranslatorTraining", "build_translator", "checkpoint_path",
           "picture_grid", "read_translator", "step_seed", "write_png"]
