"""Benchmark: does image-level translation close the domain gap, and does OP-GAN keep the objects better?

Trains two translators on the same rendered frames and real photos, with the same seed, steps and networks:
plain CycleGAN (``opgan_weight=0``) and OP-GAN (``opgan_weight=1``). Then measures, on centre crops:

- the domain gap to HELD-OUT real photos (never trained on) of (a) the rendered frames, (b) their CycleGAN
  translations, (c) their OP-GAN translations: the distance between the per-channel colour mean and standard
  deviation of the two sets, and measures on a fixed random-init ResNet-18
  (:func:`adapt.translate_eval.translation_gap`: domain-classifier accuracy, Gaussian MMD, proxy A-distance);
- object preservation between each frame and its translation (:func:`adapt.translate_eval.edge_preservation`:
  Sobel edge-map L1 and correlation), and the cycle error :math:`|F(G(a)) - a|` in [-1, 1] units;
- seconds per training step (median over the run's steps after the first 5, one generator and one critic step),
  and the step time at a second resolution (``--time-size``).

Run: ``python bench/translate_gap.py [--data DIR] [--frames 40] [--steps 300] [--size 32] [--batch 4]
[--threads 1] [--time-size 64]``. Without ``--data`` it renders ``--frames`` tabletop frames at 64x64 first.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapt.translate import to_imagenet, to_unit_range
from adapt.translate_eval import edge_preservation, gap_backbone, translation_gap
from adapt.translate_train import TranslatorTrainer, TranslatorTraining, build_translator
from synth.data import FrameAugment, RenderedFrames
from synth.real import RealImages

#: A small translator that trains in minutes on two CPU cores.
SMALL = {"generator_width": 16, "generator_blocks": 3, "discriminator_width": 32, "siamese_width": 16}


def render(out: Path, frames: int) -> Path:
    subprocess.run([sys.executable, "-m", "apps.cli", "render", f"out_dir={out}", f"n_frames={frames}", "seed=5",
                    "render.width=64", "render.height=64", "scene.views=2", "label_check.frames=1", "preview=false"],
                   check=True, capture_output=True, text=True)
    return out


def train(name: str, opgan_weight: float, synthetic, real, args, out: Path) -> tuple[TranslatorTrainer, list[float]]:
    translator = build_translator(seed=args.seed, opgan_weight=opgan_weight, **SMALL)
    settings = TranslatorTraining(steps=args.steps, batch_size=args.batch, seed=args.seed, image_every=0,
                                  checkpoint_every=10**9, log_every=max(1, args.steps // 10))
    trainer = TranslatorTrainer(translator, synthetic, real, settings, out / name)
    times = []
    original = trainer.train_step

    def timed(a, b):
        start = time.perf_counter()
        values = original(a, b)
        times.append(time.perf_counter() - start)
        return values

    trainer.train_step = timed
    trainer.fit()
    return trainer, times


def colour_distance(images: torch.Tensor, real: torch.Tensor) -> float:
    """Distance between the per-channel mean and standard deviation (over all pixels) of two image sets."""
    def stats(x):
        return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))])
    return float((stats(images) - stats(real)).norm())


@torch.no_grad()
def measure(trainer: TranslatorTrainer | None, rendered: torch.Tensor, real: torch.Tensor, backbone) -> dict:
    a = to_unit_range(rendered)
    if trainer is None:
        images, row = rendered, {}
    else:
        trainer.translator.eval()
        fake = trainer.translator.g_ab.translate(a)
        images = to_imagenet(fake)
        row = edge_preservation(a, fake)
        row["cycle_l1"] = float((trainer.translator.g_ba.translate(fake) - a).abs().mean())
    row["colour_dist"] = colour_distance(to_unit_range(images), to_unit_range(real))
    gap = translation_gap(images, real, backbone)
    for stage in ("layer3", "layer4"):
        for metric in ("domain_acc", "mmd_rbf", "pad"):
            row[f"{stage}/{metric}"] = gap[f"gap/{stage}/{metric}"]
    return row


def step_time(size: int, batch: int, opgan_weight: float, steps: int = 4) -> float:
    """Median seconds of one training step at ``size`` on random images (data loading excluded)."""
    translator = build_translator(seed=0, opgan_weight=opgan_weight, **SMALL)
    images = [torch.randn(batch, 3, size, size) for _ in range(2)]

    class Fixed:
        def __len__(self):
            return batch

        def __getitem__(self, key):
            return {"image": images[0][key[0] % batch]}

    with tempfile.TemporaryDirectory() as out:
        trainer = TranslatorTrainer(translator, Fixed(), Fixed(), TranslatorTraining(steps=steps), out)
        times = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            trainer.train_step(*images)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path)
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--time-size", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or render(tmp / "tabletop", args.frames)
        crop = FrameAugment(size=args.size, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, grayscale_prob=0.0)
        synthetic = RenderedFrames([str(data)], augment=crop, seed=args.seed)
        pool = RealImages(["offline"], size=args.size, video_every=40, seed=args.seed)
        train_idx, held_idx = pool.split(0.3)
        real_train, real_held = pool.subset(train_idx), pool.subset(held_idx, train=False)
        centre = RenderedFrames([str(data)], augment=FrameAugment(size=args.size, train=False))
        rendered = torch.stack([centre[i]["image"] for i in range(len(centre))])
        real = torch.stack([real_held[i]["image"] for i in range(len(real_held))])
        print(f"{len(synthetic)} rendered frames, {len(train_idx)} real training / {len(held_idx)} held-out photos, "
              f"{args.steps} steps at {args.size} px, batch {args.batch}, {torch.get_num_threads()} thread(s)")
        backbone = gap_backbone(args.seed)
        rows = {"rendered": measure(None, rendered, real, backbone)}
        seconds = {}
        for name, weight in (("CycleGAN", 0.0), ("OP-GAN", 1.0)):
            trainer, times = train(name, weight, synthetic, real_train, args, tmp)
            seconds[name] = statistics.median(times[5:] or times)
            rows[name] = measure(trainer, rendered, real, backbone)
    columns = ["colour_dist", "layer3/domain_acc", "layer4/domain_acc", "layer3/mmd_rbf", "layer4/mmd_rbf",
               "layer4/pad", "edge_l1", "edge_corr", "cycle_l1"]
    print("| images | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in columns) + " |")
    for name, value in seconds.items():
        print(f"{name}: {value:.3f} s/step at {args.size} px, batch {args.batch}")
    timing = {name: step_time(args.time_size, args.batch, weight) for name, weight in (("CycleGAN", 0.0),
                                                                                        ("OP-GAN", 1.0))}
    for name, value in timing.items():
        print(f"{name}: {value:.3f} s/step at {args.time_size} px, batch {args.batch} (random images)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "seconds": seconds, "timing": timing}, indent=2))


if __name__ == "__main__":
    main()
