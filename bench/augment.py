"""Benchmark: SimCLR/MoCo view augmentation, batched on the device against a per-sample torchvision pipeline.

Both sides make two views of each of the same ``--batch`` real photos (:class:`synth.real.RealImages`,
``"offline"`` sources, ``--size`` pixels, ImageNet-normalised) at ``--size`` pixels, with the recipe of Chen et al.,
"A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020 (Appendix A):

* ours: :class:`pretext.augment.ContrastiveAugment` called twice on the whole batch, as :class:`pretext.contrastive.
  SimCLR` and :class:`pretext.contrastive.MoCoV2` do (per-sample parameters drawn from an explicit CPU generator,
  then a handful of batched tensor ops on ``--device``);
* baseline: a ``torchvision.transforms.v2`` pipeline of the same recipe (RandomResizedCrop, RandomHorizontalFlip,
  RandomApply(ColorJitter), RandomGrayscale, RandomApply(GaussianBlur), Normalize, with the parameters read off the
  ContrastiveAugment), applied image by image in a Python loop and the views stacked, which is what a DataLoader
  worker does. It runs on the CPU from RGB in [0, 1]; with ``--device cuda`` it is also run on the GPU copies.
  It draws from torch's global RNG, seeded here with ``torch.manual_seed`` for repeatable runs (a benchmark only:
  library code never touches the global RNG).

Printed: images/s (each image gets two views) as ``--batch`` over the median time of ``--iters`` batches after
``--warmup``, device synchronised on CUDA, and ``ours / baseline``: above 1 means the batched augmentation makes
views faster than the per-sample pipeline on that many threads (``--threads``, default torch's). A DataLoader with W
workers multiplies the baseline's CPU rate by at most W, at the cost of W cores.

Run: ``python bench/augment.py [--device cuda] [--batch 64] [--size 64] [--iters 10] [--threads N]``.
"""

import argparse

import torch
from torchvision.transforms import v2 as T

from pretext.augment import ContrastiveAugment
from pretext.common import denormalize
from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.real import RealImages

from timing import median_seconds


def torchvision_pipeline(augment: ContrastiveAugment) -> T.Compose:
    """The per-sample ``transforms.v2`` equivalent of ``augment``, from RGB in [0, 1] to normalised views."""
    return T.Compose([
        T.RandomResizedCrop(augment.size, scale=augment.scale, ratio=augment.ratio, antialias=True),
        T.RandomHorizontalFlip(augment.flip_p),
        T.RandomApply([T.ColorJitter(augment.brightness, augment.contrast, augment.saturation, augment.hue)],
                      p=augment.jitter_p),
        T.RandomGrayscale(augment.grayscale_p),
        T.RandomApply([T.GaussianBlur(augment.kernel_size, sigma=augment.blur_sigma)], p=augment.blur_p),
        T.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD)),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    real = RealImages(sources=["offline"], size=args.size)
    images = torch.stack([real[(i % len(real), i)]["image"] for i in range(args.batch)])
    augment = ContrastiveAugment(size=args.size)
    pipeline = torchvision_pipeline(augment)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # the baseline's transforms draw from the global RNG

    def ours(batch: torch.Tensor):
        return lambda: torch.cat([augment(batch, generator), augment(batch, generator)])

    def per_sample(rgb: list[torch.Tensor]):
        return lambda: torch.stack([view for image in rgb for view in (pipeline(image), pipeline(image))])

    rgb = list(denormalize(images).clamp(0.0, 1.0))  # what a loader holds before normalising
    cpu = torch.device("cpu")

    def rate(step, on: torch.device) -> float:
        return args.batch / median_seconds(step, args.warmup, args.iters, on)

    rates = {"ours (batched, cpu)": rate(ours(images), cpu),
             "torchvision v2 per-sample (cpu)": rate(per_sample(rgb), cpu)}
    if device.type == "cuda":
        on_device = images.to(device)
        rates["ours (batched, cuda)"] = rate(ours(on_device), device)
        rates["torchvision v2 per-sample (cuda)"] = rate(per_sample([x.to(device) for x in rgb]), device)

    where = f"CPU x{torch.get_num_threads()} threads"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    print(f"{where}; batch {args.batch} at {args.size}x{args.size}, two views per image at {augment.size}px; "
          f"median of {args.iters} batches after {args.warmup}")
    for name, rate in rates.items():
        print(f"  {name:34s} {rate:9.1f} images/s")
    baseline = rates["torchvision v2 per-sample (cpu)"]
    for name in (n for n in rates if n.startswith("ours")):
        print(f"  {name} / torchvision per-sample (cpu) {rates[name] / baseline:7.2f}x")
    if device.type == "cuda":
        print(f"  ours (batched, cuda) / torchvision per-sample (cuda) "
              f"{rates['ours (batched, cuda)'] / rates['torchvision v2 per-sample (cuda)']:7.2f}x")


if __name__ == "__main__":
    main()
