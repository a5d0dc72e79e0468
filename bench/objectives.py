"""Benchmark: the training-step cost of each pretraining objective, relative to a plain classification step.

Every objective row times one full :meth:`synth.engine.Engine.train_step` with that objective alone (forward,
weighted loss, backward, gradient clipping, fused AdamW step, and for an adversary the discriminator's Adam step),
with ``with_metrics=False`` as on the steps between logs. The baseline, measured in the same run on the same
device, batch size, resolution, precision (``--amp``) and memory format (channels_last, the engine's default), is
what a user would write: :class:`synth.backbone.Backbone` -> pooled last stage -> ``nn.Linear(C, 10)`` ->
cross-entropy on random labels -> AdamW step. Real-domain objectives and the baseline see the same batch of real
photos (:class:`synth.real.RealImages`, ``"offline"`` sources); synthetic batches are random tensors of the right
shapes (depth > 0, unit normals, binary contours, all pixels valid): the cost does not depend on the values.

Reading the table: ``ratio`` is ms/step over the baseline's ms/step, i.e. how many plain steps one step of the
objective costs. It is set mostly by how many images the backbone sees per step (last column): rotation feeds
4B images and SimCLR 2B views, so ratios near 4 and 2 mean the objective's own work (input building, heads,
decoders) is cheap; a ratio well above the pass count points at that work. Count pixels, not images, for tiles and
patches: jigsaw's 9 tiles of 32 px per 64 px image are 2.25 images' worth, relpos's 2 patches half an image's.
``plain (engine)`` is the baseline's classifier run as an engine objective: its ratio is the engine's own overhead
(clipping, the finite-loss check, the scheduler). Adversaries (``feature_gan``, ``dann``) are timed joined with
the depth head, as they are used, and their extra cost over the depth head alone (``adapt=X`` vs ``adapt=none``) is
printed below the table. Times are medians of ``--iters`` steps after ``--warmup`` steps, with the device
synchronised around each step.

Run: ``python bench/objectives.py [--device cuda] [--arch resnet18] [--batch 16] [--size 64] [--amp off|bf16]
[--objectives all | depth rotation dann ...] [--iters 5] [--warmup 2] [--threads N]``.
"""

import argparse
import contextlib
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from adapt.domain import DANN, FeatureGAN
from apps.pretrain import OBJECTIVES
from synth.backbone import Backbone, stage_channels
from synth.engine import Engine, TrainerSettings
from synth.real import RealImages

from timing import median_seconds

ADVERSARIES = {"feature_gan": FeatureGAN, "dann": DANN}


class PlainClassifier(nn.Module):
    """The baseline's linear classifier as an engine objective, to separate the engine's overhead from the work."""

    domains: tuple[str, ...] = ("real",)
    uses_features = False  # pools the last stage itself, like the baseline
    joint = False

    def __init__(self, channels: int = 512, labels: torch.Tensor | None = None):
        super().__init__()
        self.fc = nn.Linear(channels, 10)
        self.register_buffer("labels", labels)

    def forward(self, batch, backbone):
        return {"loss": F.cross_entropy(self.fc(backbone.pooled(batch["image"])).float(), self.labels)}


def build(name: str, args) -> nn.Module:
    """One objective with its defaults, sized for ``args.arch``; contrastive views at ``args.size``."""
    kwargs = {"backbone_arch": args.arch}
    if name in ("simclr", "moco"):
        kwargs["augment_size"] = args.size
    if name == "moco":  # the queue must hold a whole number of batches
        kwargs["queue_size"] = args.batch * -(-4096 // args.batch)
    return (OBJECTIVES | ADVERSARIES)[name](**kwargs)


def passes(name: str, objective: nn.Module | None, b: int, s: int) -> str:
    """What the backbone sees in one step of ``name``, in words."""
    decoder = f"1 x {b} at {s}px + FPN decoder"
    if name == "feature_gan":  # without metrics the real features feed only the detached discriminator step
        return (f"1 x {b} synthetic + 1 x {b} real (no backward) at {s}px; depth decoder; patch D on "
                f"{objective.stage} + its Adam step")
    if name == "dann":
        return f"1 x {b} synthetic + 1 x {b} real at {s}px; depth decoder; domain MLP behind gradient reversal"
    return {
        "plain": f"1 x {b} at {s}px", "plain (engine)": f"1 x {b} at {s}px",
        "depth": decoder, "normal": decoder, "contour": decoder, "rotation": f"4 x {b} (rotated copies) at {s}px",
        "jigsaw": f"{getattr(objective, 'grid', 0) ** 2} x {b} tiles at {getattr(objective, 'tile_size', 0)}px + MLP",
        "relpos": f"2 x {b} patches at {getattr(objective, 'patch_size', 0)}px + MLP",
        "colorization": f"1 x {b} grey at {s}px + FPN decoder (ab classes)",
        "inpainting": f"1 x {b} masked at {s}px + FPN decoder",
        "simclr": f"2 x {b} views at {s}px (batched augmentation)",
        "moco": f"1 x {b} queries + 1 x {b} keys (key encoder, no grad) at {s}px + momentum update",
    }[name]


def plain_step_fn(arch: str, image: torch.Tensor, labels: torch.Tensor, settings: TrainerSettings, autocast):
    """The baseline step: backbone -> pooled last stage -> linear -> cross-entropy -> fused AdamW, as the engine's."""
    with torch.random.fork_rng(devices=[]):  # fixed initialisation; the caller's RNG is left alone
        torch.manual_seed(0)
        backbone = Backbone(arch)
        head = nn.Linear(backbone.stage_channels[backbone.stage_names[-1]], 10)
    model = nn.ModuleDict({"backbone": backbone, "head": head}).to(image.device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, fused=True)

    def step():
        with autocast():
            loss = F.cross_entropy(head(backbone.pooled(image)).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--objectives", nargs="+", default=["all"], help="names, or all")
    parser.add_argument("--amp", default="off", choices=["off", "bf16"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    known = [*OBJECTIVES, *ADVERSARIES]
    unknown = [n for n in args.objectives if n not in (*known, "all")]
    if unknown:
        parser.error(f"--objectives: unknown {unknown}; choose from all {' '.join(known)}")
    names = known if "all" in args.objectives else [n for n in known if n in args.objectives]
    if any(n in ADVERSARIES for n in names) and "depth" not in names:
        names.insert(0, "depth")  # an adversary's extra cost is measured against the depth head alone
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = {"off": None, "bf16": torch.bfloat16}[args.amp]
    generator = torch.Generator().manual_seed(0)
    b, s = args.batch, args.size

    real = RealImages(sources=["offline"], size=s)
    samples = [real[(i % len(real), i)] for i in range(b)]
    cpu_batches = {
        "real": {key: torch.stack([x[key] for x in samples]) for key in ("image", "seed")},
        "synthetic": {"image": torch.randn(b, 3, s, s, generator=generator),
                      "depth": 0.5 + 4 * torch.rand(b, 1, s, s, generator=generator),
                      "normals": F.normalize(torch.randn(b, 3, s, s, generator=generator), dim=1),
                      "contours": (torch.rand(b, 1, s, s, generator=generator) < 0.1).float(),
                      "valid": torch.ones(b, 1, s, s, dtype=torch.bool), "seed": torch.arange(b) + 10_000},
    }
    settings = TrainerSettings(batch_size=b, amp=args.amp, device=args.device, steps=1000, warmup_steps=0)
    batches = {domain: {key: value if key == "seed" else value.to(device) for key, value in batch.items()}
               for domain, batch in cpu_batches.items()}
    for batch in batches.values():  # as the engine's loader hands them over (seeds stay on the CPU)
        batch["image"] = batch["image"].contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (b,), generator=generator)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    image, target = batches["real"]["image"], labels.to(device)

    def milliseconds(step) -> float:
        return 1000 * median_seconds(step, args.warmup, args.iters, device)

    rows = {"plain": (milliseconds(plain_step_fn(args.arch, image, target, settings, autocast)), None)}

    def engine_ms(objectives: dict[str, nn.Module]) -> float:
        domains = {d for o in objectives.values() for d in o.domains}
        with tempfile.TemporaryDirectory() as out, torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # train_step is fed directly below; fit() never runs, so the datasets only need the right domains.
            engine = Engine(backbone=Backbone(args.arch), objectives=objectives,
                            weights=dict.fromkeys(objectives, 1.0), settings=settings, out_dir=out,
                            datasets={d: [cpu_batches[d]] for d in domains})
            return milliseconds(lambda: engine.train_step({d: dict(batches[d]) for d in domains}, with_metrics=False))

    channels = list(stage_channels(args.arch).values())[-1]
    rows["plain (engine)"] = (engine_ms({"plain": PlainClassifier(channels, labels)}), None)
    for name in names:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            objective = build(name, args)
            objectives = {name: objective}
            if name in ADVERSARIES:
                objectives = {"depth": build("depth", args), "adapt": objective}
        rows[f"depth + {name}" if name in ADVERSARIES else name] = (engine_ms(objectives), (name, objective))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"device {where}; {args.arch} batch {b} at {s}x{s}; amp {args.amp}, channels_last; median of {args.iters} "
          f"steps after {args.warmup}")
    print("| objective | ms/step | ratio vs plain step | backbone passes per step |")
    print("|---|---:|---:|---|")
    base = rows["plain"][0]
    for label, (ms, named) in rows.items():
        name, objective = named if named else (label, None)
        print(f"| {label} | {ms:.1f} | {ms / base:.2f}x | {passes(name, objective, b, s)} |")
    for name in (n for n in names if n in ADVERSARIES):
        extra = rows[f"depth + {name}"][0] - rows["depth"][0]
        print(f"adapt={name} vs adapt=none (with the depth head): {extra:+.1f} ms/step = {extra / base:+.2f} plain "
              f"steps ({rows[f'depth + {name}'][0] / rows['depth'][0]:.2f}x the depth step)")


if __name__ == "__main__":
    main()
