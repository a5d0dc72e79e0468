"""Benchmark: the multitask pretraining step against a plain torchvision classification step, and the loader.

Both steps run in this process on the same device, batch and resolution, so the printed ratios compare like
with like (targets from the engine issue: step >= 0.7x the plain step; loader >= 3x the step's consumption):

* plain: torchvision ResNet (``weights=None``) forward + cross-entropy + SGD step, fp32 (what a user would write),
  and the same with the engine's autocast/channels_last settings, so the heads' cost is separated from the
  precision gain;
* ours: :class:`synth.engine.Engine.train_step` with the depth, normal and contour heads (Ren & Lee, CVPR 2018);
* loader: :class:`synth.data.RenderedFrames` through a DataLoader with the engine's sampler and collate
  (rendered frames on disk, real augmentation), in samples/s, against the samples/s the step consumes;
* with ``--packed``: ``bench/loader.py``'s comparison of the HDF5 and the packed loader (``synth pack`` +
  per-batch augmentation): CPU ms per sample, samples/s with 0/1/2 workers, and each against the step.

Run: ``python bench/pretrain_step.py --data data/tabletop [--device cuda] [--batch 32] [--size 128]``.
Render data first if needed: ``synth render n_frames=64 render.width=128 render.height=128 out_dir=data/bench``.
"""

import argparse
import contextlib
import tempfile
import time

import torch
import torchvision
from torch import nn

from pretext.synthetic import ContourHead, DepthHead, NormalHead
from synth.backbone import Backbone
from synth.data import FrameAugment, RenderedFrames, StepSampler, collate_frames
from synth.engine import Engine, TrainerSettings
from synth.runtime import keep_freed_memory


def timed(step, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of ``step()``, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def plain_step_fn(arch, batch, size, device, amp_dtype, channels_last, generator):
    model = getattr(torchvision.models, arch)(weights=None, num_classes=10).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, size, size, generator=generator).to(device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), generator=generator).to(device)
    autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a dataset folder written by `synth render`")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the multitask model (trainer.compile)")
    parser.add_argument("--packed", action="store_true",
                        help="also compare the packed loader (packs --data beside its HDF5 frames if needed)")
    args = parser.parse_args()
    keep_freed_memory()  # as every `synth` training command does
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)

    frames = RenderedFrames([args.data], augment=FrameAugment(size=args.size), seed=0)
    with tempfile.TemporaryDirectory() as out, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        engine = Engine(backbone=Backbone(args.arch),
                        objectives={"depth": DepthHead(), "normal": NormalHead(), "contour": ContourHead()},
                        weights={"depth": 5.0, "normal": 10.0, "contour": 1.0}, datasets={"synthetic": frames},
                        settings=TrainerSettings(batch_size=args.batch, amp=args.amp, device=args.device,
                                                 compile=args.compile),
                        out_dir=out)
        batch = collate_frames([frames[(i % len(frames), i)] for i in range(args.batch)])
        batch.pop("n_corrupt")

        def ours():
            moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            if engine.settings.channels_last:
                moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
            engine.train_step({"synthetic": moved}, with_metrics=False)  # as on the steps between logs

        warm = 5 if args.compile else 2
        t_ours = timed(ours, warm, args.iters, device)
    t_plain32 = timed(plain_step_fn(args.arch, args.batch, args.size, device, None, False, generator), warm,
                      args.iters, device)
    t_plain_amp = timed(plain_step_fn(args.arch, args.batch, args.size, device, engine.amp_dtype,
                                      engine.settings.channels_last, generator), warm, args.iters, device)

    loader = torch.utils.data.DataLoader(frames, batch_size=args.batch, collate_fn=collate_frames,
                                         sampler=StepSampler(len(frames), seed=0, batch_size=args.batch),
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not throughput
    n_batches = max(3, args.iters)
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    loader_rate = n_batches * args.batch / (time.perf_counter() - start)

    rate = {name: args.batch / t for name, t in (("ours", t_ours), ("plain32", t_plain32),
                                                 ("plain_amp", t_plain_amp))}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device {name}; {args.arch} batch {args.batch} at {args.size}x{args.size}; engine amp "
          f"{engine.amp_dtype}, channels_last {engine.settings.channels_last}, compile {args.compile}")
    print(f"  plain torchvision step fp32        {rate['plain32']:8.1f} img/s")
    print(f"  plain torchvision step amp+cl      {rate['plain_amp']:8.1f} img/s")
    print(f"  ours: backbone + depth/normal/contour heads {rate['ours']:8.1f} img/s")
    print(f"  ours / plain fp32                  {rate['ours'] / rate['plain32']:8.2f}x  (target >= 0.7)")
    print(f"  ours / plain same precision        {rate['ours'] / rate['plain_amp']:8.2f}x")
    print(f"  loader ({args.workers} workers)             {loader_rate:8.1f} samples/s = "
          f"{loader_rate / rate['ours']:.2f}x the step's consumption (target >= 3)")
    if args.packed:
        import loader as loader_bench  # bench/loader.py, beside this script

        loader_bench.report(loader_bench.measure(args.data, size=args.size, batch=args.batch), rate["ours"])


if __name__ == "__main__":
    main()
