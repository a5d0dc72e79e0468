"""Benchmark: how far is each scene family from real photos? The rendered-vs-real gap, side by side.

Renders (or reads) the same number of frames of each scene family at the same size and measures, against the
offline real photos (opencv-doc, scikit-image, street video, the wallpaper photographs; centre crops at the same
size), the project's gap measures on one fixed feature extractor (:func:`adapt.translate_eval.translation_gap`: a
seeded random-init ResNet-18; domain-classifier accuracy (0.5: no gap), RBF MMD², proxy A-distance) and the
distance between per-channel colour statistics. The baseline of the ratio column is the first family.

Run: ``python bench/scene_gap.py [--families primitives_tabletop tabletop primitives_room room] [--frames 48]
[--size 64] [--data-dir DIR]``. A family whose dataset folder exists under ``--data-dir`` is read, not rendered.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapt.translate_eval import gap_backbone, translation_gap
from synth.data import FrameAugment, RenderedFrames
from synth.real import RealImages


def render(family: str, out: Path, frames: int, size: int) -> float:
    """Render ``frames`` frames of ``family`` into ``out`` (resumable); returns the wall seconds."""
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", "apps.cli", "render", f"scene={family}", f"out_dir={out}",
                    f"n_frames={frames}", "seed=7", f"render.width={size}", f"render.height={size}",
                    "label_check.frames=1", "preview=false"], check=True, capture_output=True, text=True)
    return time.perf_counter() - tic


def colour_distance(images: torch.Tensor, real: torch.Tensor) -> float:
    """Distance between the per-channel mean and standard deviation of two ImageNet-normalised image sets."""
    def stats(x):
        return torch.cat([x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))])
    return float((stats(images) - stats(real)).norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["primitives_tabletop", "tabletop", "primitives_room", "room"])
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--data-dir", type=Path, default=Path("runs/scene_gap"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    real = RealImages(sources=["offline", "wallpapers"], size=args.size, train=False, tiles=2, video_every=40)
    real_images = torch.stack([real[i]["image"] for i in range(len(real))])
    backbone = gap_backbone(0)
    rows = {}
    for family in args.families:
        out = args.data_dir / f"{family}_{args.size}"
        seconds = render(family, out, args.frames, args.size)
        frames = RenderedFrames([str(out)], augment=FrameAugment(size=args.size, train=False), seed=0)
        images = torch.stack([frames[i]["image"] for i in range(len(frames))])
        gap = translation_gap(images, real_images, backbone)
        rows[family] = {"frames": len(frames), "render_s": seconds, "colour": colour_distance(images, real_images),
                        **{f"{stage}/{metric}": gap[f"gap/{stage}/{metric}"] for stage in ("layer3", "layer4")
                           for metric in ("domain_acc", "mmd_rbf", "pad")}}
    first = next(iter(rows.values()))
    print(f"rendered families vs {len(real_images)} real photo crops at {args.size} px (fixed random-init ResNet-18)")
    print("| family | frames | colour | domain acc l3 / l4 | MMD² rbf l3 / l4 | PAD l4 | MMD² l4 vs first |")
    print("|---|---|---|---|---|---|---|")
    for family, r in rows.items():
        print(f"| {family} | {r['frames']} | {r['colour']:.3f} | {r['layer3/domain_acc']:.3f} / "
              f"{r['layer4/domain_acc']:.3f} | {r['layer3/mmd_rbf']:.3f} / {r['layer4/mmd_rbf']:.3f} | "
              f"{r['layer4/pad']:.2f} | {r['layer4/mmd_rbf'] / max(first['layer4/mmd_rbf'], 1e-12):.2f}x |")


if __name__ == "__main__":
    main()
