"""The pretraining engine: one backbone, any set of objectives, one optimizer step (plus an adversary slot).

The engine knows no objective by name. Each objective meets the contract of :mod:`synth.objective` (checked once,
when the engine is built): an ``nn.Module`` with a ``domains`` tuple (which batches it consumes: ``"synthetic"``,
``"real"``) and ``forward(batch, backbone) -> dict`` returning ``"loss"`` and any metrics as 0-dim tensors.
``batch["with_metrics"]`` is False on steps whose metrics will not be logged, so an objective may skip costly metrics
there (on a GPU, per-step metric kernels and syncs cost more than the heads).
``batch["step"]`` and ``batch["total_steps"]`` give schedules (e.g. DANN's reversal ramp) their state explicitly, and
``batch["seed"]`` (per-sample seeds, kept on the CPU) seeds any random draw an objective makes, so nothing hides an
RNG or a counter and a resumed run computes exactly what an uninterrupted one would.
The engine sums ``weight * loss``, steps one optimizer, logs every entry of every dict and, for objectives
that also define ``discriminator_loss(batch, backbone)`` and ``discriminator_parameters()`` (an adversary, e.g.
Ren & Lee's feature GAN), steps a second optimizer on the discriminator alternately.

It runs on CPU or GPU with autocast (bf16 where the hardware has it) and channels_last, and on several
GPUs or nodes under ``torchrun`` with DistributedDataParallel (the backend follows the device: NCCL on CUDA, gloo on
the CPU, even where CUDA exists): rank 0 logs and writes checkpoints. Every collective is entered by every rank:
each rank evaluates its share of the held-out batches (so objectives that gather across ranks, e.g. SimCLR, work in
evaluation too) and the sums are combined; logged losses and metrics are averaged over ranks; on start every rank
must see the same checkpoint step (``out_dir`` must be shared between nodes), else the run stops with one line.
A checkpoint holds the model, optimizers, scaler, scheduler, step and RNG states, written to a
temporary name and renamed; rerunning the same command resumes at the saved step with the same data order.
"""

import contextlib
import json
import math
import os
import socket
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from synth.checkpoint import read_checkpoint, save_checkpoint
from synth.data import StepSampler, collate_frames
from synth.io import atomic_write_json, atomic_write_text, clear_stale_temporaries
from synth.objective import ObjectiveTraits, objective_traits
from synth.runtime import build_optimizer, cpu_has_native_bf16, resolve_device


class NonFiniteLossError(FloatingPointError):
    """An objective produced a NaN or infinite loss; the message names the objective and the step."""


@dataclass(kw_only=True)
class TrainerSettings:
    """How to train (the ``trainer`` config group).

    Args:
        steps: Optimizer steps in the run.
        batch_size: Samples per step and domain, per process.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov).
        lr: Peak learning rate.
        weight_decay: Decoupled (AdamW) or L2 (SGD) weight decay.
        warmup_steps: Linear warm-up steps before the schedule.
        schedule: ``"cosine"`` (to 0 at ``steps``) or ``"constant"``.
        discriminator_lr: Learning rate of the adversary's optimizer (Adam).
        grad_clip: Max global gradient norm (0 disables clipping).
        amp: ``"auto"`` (bf16 on GPUs that support it, else fp16; on CPUs bf16 only with native bf16 support,
            else fp32), ``"bf16"``, ``"fp16"`` or ``"off"``.
        channels_last: Use the NHWC memory format (faster convolutions on CPU and tensor cores).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        num_workers: DataLoader worker processes.
        log_every: Steps between scalar logs.
        image_every: Steps between prediction pictures (0 disables).
        eval_every: Steps between evaluations on held-out frames (0: only at the end).
        eval_batches: Held-out batches per evaluation.
        checkpoint_every: Steps between checkpoints (one is always written at the end).
        compile: Compile the model's forward with ``torch.compile`` (fewer kernel launches; worth it on GPUs,
            where small decoder kernels leave the step launch-bound; costs a minute of compilation).
        sync_bn: Under DDP, turn the backbone's BatchNorm layers into ``SyncBatchNorm``, so batch statistics are
            computed over the global batch instead of each rank's share. Use it when the per-rank batch is small
            (under ~32 per GPU), or to make N processes train like one process on the whole batch; it costs a
            collective per BatchNorm layer per step. No effect on one process; CUDA only (torch's SyncBatchNorm has
            no CPU kernel: a CPU run under torchrun refuses it in one line).
        seed: Seeds the model initialisation and the data order.
    """

    steps: int = 200
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    discriminator_lr: float = 2e-4
    grad_clip: float = 5.0
    amp: str = "auto"
    channels_last: bool = True
    device: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    image_every: int = 100
    eval_every: int = 0
    eval_batches: int = 4
    checkpoint_every: int = 100
    compile: bool = False
    sync_bn: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"trainer.optimizer: expected adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"trainer.schedule: expected cosine or constant, got {self.schedule!r}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"trainer.amp: expected auto, bf16, fp16 or off, got {self.amp!r}")
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"trainer.{key}: must be >= 1, got {getattr(self, key)}")


class MultiTask(nn.Module):
    """The backbone and every objective, as one module (what DDP wraps and what a checkpoint holds)."""

    def __init__(self, backbone: nn.Module, objectives: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.objectives = nn.ModuleDict(objectives)
        #: Each objective checked against :mod:`synth.objective`'s contract once, here.
        self.traits: dict[str, ObjectiveTraits] = {n: objective_traits(n, o) for n, o in objectives.items()}

    def forward(self, batches: dict[str, dict]) -> dict[str, dict[str, torch.Tensor]]:
        """Run every objective on the batch of each domain it consumes.

        Objectives with ``joint = True`` get ``{domain: batch}`` for all their domains in one call (and are skipped
        when a domain is missing, e.g. in an evaluation without real images).

        Returns:
            ``{objective: outputs}``, or ``{"objective/domain": outputs}`` for objectives of several domains.
        """
        for domain, batch in batches.items():
            # Heads that read the plain image share one backbone pass per domain batch.
            if any(domain in t.domains and t.uses_features for t in self.traits.values()):
                batch["features"] = self.backbone(batch["image"])
        outputs = {}
        for name, objective in self.objectives.items():
            traits = self.traits[name]
            domains = [d for d in traits.domains if d in batches]
            if traits.joint:  # e.g. an adversary that compares the domains
                if len(domains) == len(traits.domains):
                    outputs[name] = objective({d: batches[d] for d in domains}, self.backbone)
                continue
            for domain in domains:
                key = name if len(traits.domains) == 1 else f"{name}/{domain}"
                outputs[key] = objective(batches[domain], self.backbone)
        return outputs


def ddp_backend(device: torch.device) -> str:
    """The process-group backend for a training device: NCCL for CUDA tensors, gloo for CPU tensors (NCCL cannot
    reduce CPU tensors, so a CPU run on a machine with GPUs still needs gloo)."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def local_rank() -> int:
    """This process's rank on its node under torchrun (0 otherwise)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size) under torchrun; initialises the process group once, with the backend of ``device``."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=ddp_backend(device))
    return dist.get_rank(), dist.get_world_size()


class RankMismatchError(ValueError):
    """The ranks of a DDP run disagree on what to resume from (e.g. an ``out_dir`` that is not shared)."""


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    if amp == "off":
        return None
    if amp == "auto":
        if device.type == "cpu":
            # Without native bf16 (AVX512-BF16/AMX) oneDNN emulates it: 6x slower than fp32 on an AVX2 EPYC, and
            # slower on plain AVX512 too, which oneDNN reports as bf16-capable; CPUs with AMX gain up to ~3x. The
            # CPU's flags decide (the same answer on every run; a timed probe was tried and flipped with the
            # load of a shared 2-core machine). A resumed run keeps the precision it started with.
            return torch.bfloat16 if cpu_has_native_bf16() else None
        if not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _to(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if key == "seed":  # objectives seed CPU generators from it: moving it would sync the device to read it
            moved[key] = value
        elif isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4 and key == "image":
                value = value.contiguous(memory_format=torch.channels_last)
        elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
            value = [v.to(device, non_blocking=True) for v in value]
        moved[key] = value
    return moved


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to 0 or constant."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loader(dataset, *, batch_size, seed, start_step, rank, world, num_workers) -> Iterator[dict]:
    """An endless iterator of batches; map-style datasets get the resumable StepSampler."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_frames,
                                             num_workers=num_workers)
    else:
        sampler = StepSampler(len(dataset), seed=seed, batch_size=batch_size, start_step=start_step, rank=rank,
                              world_size=world)
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                             collate_fn=collate_frames, num_workers=num_workers,
                                             persistent_workers=num_workers > 0)
    while True:
        yield from loader


def parameter_fingerprint(module: nn.Module) -> list[float]:
    """(sum, sum of squares) of every parameter in float64: equal across DDP ranks iff weights agree."""
    flat = torch.cat([p.detach().double().flatten().cpu() for p in module.parameters()])
    return [float(flat.sum()), float((flat * flat).sum())]


class Engine:
    """Train a :class:`MultiTask` model on per-domain datasets.

    Args:
        backbone: The shared encoder (:class:`synth.backbone.Backbone`).
        objectives: Name -> objective module.
        weights: Name -> loss weight.
        datasets: Domain (``"synthetic"``, ``"real"``) -> training dataset (map-style or iterable).
        settings: Trainer settings.
        out_dir: Run folder: checkpoints, TensorBoard logs, pictures, ``train_log.jsonl``, ``summary.json``.
        eval_datasets: Domain -> held-out dataset for evaluation and pictures.
        config: Plain dict stored in checkpoints, so a checkpoint says how it was made.
        monitors: Name -> callable ``(backbone, step) -> {metric: float}`` run on rank 0 at every evaluation and at
            the end (e.g. an online kNN probe on real images, the measured domain gap); logged to TensorBoard,
            ``monitor_log.jsonl`` and the summary.

    Example:
        >>> engine = Engine(backbone=Backbone("resnet18"), objectives={"depth": DepthHead()},
        ...                 weights={"depth": 5.0}, datasets={"synthetic": frames}, settings=TrainerSettings())
        >>> summary = engine.fit()  # doctest: +SKIP
    """

    def __init__(self, *, backbone: nn.Module, objectives: dict[str, nn.Module], weights: dict[str, float],
                 datasets: dict, settings: TrainerSettings, out_dir: str | os.PathLike,
                 eval_datasets: dict | None = None, config: dict | None = None, monitors: dict | None = None,
                 data_report: dict | None = None):
        if not objectives:
            raise ValueError("no objective to train: list at least one in objective=[...]")
        traits = {name: objective_traits(name, o) for name, o in objectives.items()}  # the contract, checked once
        missing = {d for t in traits.values() for d in t.domains} - set(datasets)
        unknown = set(weights) ^ set(objectives)
        if unknown:
            raise ValueError(f"weights and objectives disagree on {sorted(unknown)}")
        bad = {name: w for name, w in weights.items() if not math.isfinite(w) or abs(w) > 1e6}
        if bad:  # a weight like 1e39 is finite as a Python float and overflows float32 once it scales a loss
            raise ValueError(f"objective weights must be finite and at most 1e6 in size, got {bad}")
        if not any(d in datasets for t in traits.values() for d in t.domains):
            raise ValueError(f"no dataset for the objectives' domains {sorted(missing)}")
        self.settings = settings
        self.weights = weights
        self.datasets = datasets
        self.eval_datasets = eval_datasets or {}
        self.monitors = monitors or {}
        self.data_report = dict(data_report or {})
        self.out_dir = Path(out_dir)
        self.config = config or {}
        self.device = resolve_device(settings.device, local_rank())
        self.rank, self.world = _distributed(self.device)
        self.amp_dtype = _amp_dtype(settings.amp, self.device)
        if settings.sync_bn and self.world > 1:  # before the optimizers are built over the parameters
            if self.device.type != "cuda":
                raise ValueError("trainer.sync_bn=true needs CUDA devices (torch's SyncBatchNorm has no CPU "
                                 "kernel); drop it for a CPU run")
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
        self.model = MultiTask(backbone, objectives).to(self.device)
        if settings.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)

        self.adversaries = [n for n, t in self.model.traits.items() if t.adversary]
        adversaries = [objectives[n] for n in self.adversaries]
        disc_params = {id(p) for o in adversaries for p in o.discriminator_parameters()}
        main_params = [p for p in self.model.parameters() if id(p) not in disc_params]
        # Fused kernels: one launch for all parameters instead of several per tensor (launch-bound on GPUs).
        self.optimizer = build_optimizer(main_params, settings.optimizer, lr=settings.lr,
                                         weight_decay=settings.weight_decay, nesterov=True,
                                         fused=self.device.type in ("cuda", "cpu"))
        self.disc_optimizer = None
        if adversaries:
            self.disc_optimizer = torch.optim.Adam(
                [p for o in adversaries for p in o.discriminator_parameters()], lr=settings.discriminator_lr,
                betas=(0.5, 0.999))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, steps=settings.steps, warmup_steps=settings.warmup_steps,
                                                schedule=settings.schedule))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(adversaries))
        if settings.compile:
            self.ddp = torch.compile(self.ddp)
        self.step = 0

    # ------------------------------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoints" / "last.pt"

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "disc_optimizer": None if self.disc_optimizer is None else self.disc_optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": self.config,
            "backbone": {"arch": getattr(self.model.backbone, "arch", None)},
            "amp": str(self.amp_dtype),
        }

    def save(self) -> None:
        """Write :meth:`state_dict` to ``checkpoints/last.pt`` atomically (:func:`synth.checkpoint.save_checkpoint`);
        a state with NaN or inf parameters or optimizer moments is refused, so the last good checkpoint stays."""
        if self.rank == 0:
            save_checkpoint(self.state_dict(), self.checkpoint_path)

    def resume(self) -> bool:
        """Load ``last.pt`` if the run folder has one; returns whether it did.

        Under DDP every rank reads ``last.pt`` from its own view of ``out_dir`` and the ranks compare the steps
        they found before any of them loads: a node that sees another step (or no checkpoint, as with an
        ``out_dir`` on a node-local disk) would otherwise train from another state and the ranks would hang in
        their next collective.

        Raises:
            CheckpointError: ``last.pt`` is not a readable checkpoint (one line naming it and what to do).
            RankMismatchError: the ranks found different steps (one line naming them; same on every rank).
        """
        state, problem = None, None
        if self.checkpoint_path.exists():
            try:
                state = read_checkpoint(self.checkpoint_path, map_location=self.device, weights_only=False)
            except Exception as error:
                if self.world == 1:
                    raise
                problem = error
        if self.world > 1:
            mine = f"unreadable ({type(problem).__name__})" if problem is not None else (
                "no checkpoint" if state is None else f"step {int(state['step'])}")
            seen = [None] * self.world
            dist.all_gather_object(seen, (mine, socket.gethostname()))
            if problem is not None:
                raise problem
            if len({s for s, _ in seen}) > 1:
                ranks = ", ".join(f"rank {r} ({host}): {s}" for r, (s, host) in enumerate(seen))
                raise RankMismatchError(
                    f"the ranks see different checkpoints in {self.checkpoint_path} ({ranks}): out_dir must be one "
                    f"folder shared by every node (a network file system), with the same path on each")
        if state is None:
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.disc_optimizer is not None and state["disc_optimizer"] is not None:
            self.disc_optimizer.load_state_dict(state["disc_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["rng"]["cuda"]])
        self.step = int(state["step"])
        if self.settings.amp == "auto" and "amp" in state:  # what auto chose at the start, not a new measurement
            self.amp_dtype = {"None": None, "torch.bfloat16": torch.bfloat16,
                              "torch.float16": torch.float16}.get(state["amp"], self.amp_dtype)
        return True

    # ------------------------------------------------------------------------------------------ training

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _losses(self, outputs: dict[str, dict]) -> torch.Tensor:
        terms = {key: self.weights[key.split("/")[0]] * out["loss"].float() for key, out in outputs.items()}
        total = sum(terms.values())
        if not torch.isfinite(total.detach()):  # one sync per step; find the culprit only when needed
            for key, out in outputs.items():
                if not torch.isfinite(out["loss"].detach()).all():
                    raise NonFiniteLossError(f"objective {key!r} produced a non-finite loss ({out['loss'].item()}) "
                                             f"at step {self.step}; lower trainer.lr or check its inputs")
            for key, term in terms.items():  # each loss finite: its weighted term overflowed
                if not torch.isfinite(term.detach()).all():
                    name = key.split("/")[0]
                    raise NonFiniteLossError(f"objective {key!r}: weight {self.weights[name]:g} x loss "
                                             f"{outputs[key]['loss'].item():.4g} overflows to {term.item()} at step "
                                             f"{self.step}; lower objective.{name}.weight")
            raise NonFiniteLossError(f"the sum of the weighted losses is {total.item()} at step {self.step}; lower "
                                     f"the objectives' weights")
        return total

    def train_step(self, batches: dict[str, dict], with_metrics: bool = True) -> dict[str, torch.Tensor]:
        """One optimizer step (and one discriminator step if there is an adversary).

        Returns:
            Scalars to log, as 0-dim tensors (converting them would sync the device every step).
        """
        self.ddp.train()
        for batch in batches.values():
            batch.update(with_metrics=with_metrics, step=self.step, total_steps=self.settings.steps)
        with self._autocast():
            outputs = self.ddp(batches)
            total = self._losses(outputs)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.settings.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.settings.grad_clip,
                                                 foreach=True)
        else:
            grad_norm = torch.zeros(())
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

        logs = {"loss": total.detach(), "grad_norm": grad_norm.detach(), "lr": self.scheduler.get_last_lr()[0]}
        if self.disc_optimizer is not None:
            with self._autocast():
                disc_total = 0.0
                for name in self.adversaries:
                    out = self.model.objectives[name].discriminator_loss(batches, self.model.backbone)
                    if not torch.isfinite(out["loss"].detach()):
                        raise NonFiniteLossError(f"discriminator of {name!r} produced a non-finite loss at "
                                                 f"step {self.step}")
                    disc_total = disc_total + out["loss"].float()
                    logs.update({f"{name}/discriminator/{k}": v.detach() for k, v in out.items()})
            self.disc_optimizer.zero_grad(set_to_none=True)
            disc_total.backward()
            if self.world > 1:  # the discriminator is outside DDP's reducer: average its gradients by hand
                for group in self.disc_optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            dist.all_reduce(p.grad)
                            p.grad /= self.world
            self.disc_optimizer.step()
        for key, out in outputs.items():
            for metric, value in out.items():
                if isinstance(value, torch.Tensor) and value.dim() == 0:
                    logs[f"{key}/{metric}"] = value.detach()
        if self.world > 1 and with_metrics:
            # Each rank computed its losses on its share of the batch: log the mean over ranks, which is what one
            # process on the whole batch would report (for per-sample means) instead of rank 0's half.
            keys = sorted(k for k, v in logs.items() if isinstance(v, torch.Tensor) and v.dim() == 0)
            values = torch.stack([logs[k].float() for k in keys])
            dist.all_reduce(values)
            logs.update(zip(keys, (values / self.world).unbind(), strict=True))
        return logs

    def _eval_domains(self) -> list[str]:
        """Domains with held-out data now, agreed by every rank. A dataset with ``refresh()`` (held-out frames of
        a dataset still being rendered) is re-scanned first; an empty one is left out."""
        domains = []
        for domain, dataset in self.eval_datasets.items():
            if hasattr(dataset, "refresh"):
                dataset.refresh()
            if isinstance(dataset, torch.utils.data.IterableDataset) or len(dataset) > 0:
                domains.append(domain)
        if self.world > 1:  # every rank must run the same objectives, whose collectives (gathers) pair up
            seen = [None] * self.world
            dist.all_gather_object(seen, domains)
            domains = [d for d in domains if all(d in other for other in seen)]
        return domains

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of every objective's outputs over ``eval_batches`` held-out batches, in eval mode.

        Called on every rank: under DDP each rank evaluates its interleaved share of the global held-out batches
        (``eval_batches`` batches of ``batch_size`` per rank, as in training), so an objective that gathers across
        ranks meets its peers, and the per-rank sums are combined. One process gives the same numbers as before.
        """
        domains = self._eval_domains()
        if not domains:
            return {}
        self.model.eval()
        sums, counts = defaultdict(float), defaultdict(int)
        iterators = {d: _loader(self.eval_datasets[d], batch_size=self.settings.batch_size,
                                seed=self.settings.seed + 1, start_step=0, rank=self.rank, world=self.world,
                                num_workers=0) for d in domains}
        for _ in range(self.settings.eval_batches):
            batches = {d: _to(next(it), self.device, self.settings.channels_last) for d, it in iterators.items()}
            for batch in batches.values():
                batch.update(with_metrics=True, step=self.step, total_steps=self.settings.steps)
            with self._autocast():
                outputs = self.model(batches)
            for key, out in outputs.items():
                for metric, value in out.items():
                    if isinstance(value, torch.Tensor) and value.dim() == 0:
                        sums[f"eval/{key}/{metric}"] += float(value)
                        counts[f"eval/{key}/{metric}"] += 1
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, (dict(sums), dict(counts)))
            sums, counts = defaultdict(float), defaultdict(int)
            for part_sums, part_counts in parts:
                for key, value in part_sums.items():
                    sums[key] += value
                    counts[key] += part_counts[key]
        return {k: sums[k] / counts[k] for k in sorted(sums)}

    def run_monitors(self) -> dict[str, float]:
        """Run every monitor on the backbone; appends the values to ``monitor_log.jsonl`` (one line per step)."""
        if not self.monitors:
            return {}
        values = {}
        for monitor in self.monitors.values():
            values.update({k: float(v) for k, v in monitor(self.model.backbone, self.step).items()})
        path = self.out_dir / "monitor_log.jsonl"
        _truncate_log(path, self.step - 1)  # a rerun of the final evaluation replaces, not duplicates, its line
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step, **values}) + "\n")
        return values

    def fit(self) -> dict:
        """Train until ``settings.steps`` (resuming from ``last.pt`` if present); returns the run summary."""
        s = self.settings
        if self.rank == 0:  # temporaries of writers that died (a kill, a full disk) are never resumed from
            for folder in (self.out_dir, self.checkpoint_path.parent):
                clear_stale_temporaries(folder)
        resumed = self.resume()
        log_path = self.out_dir / "train_log.jsonl"
        writer = None
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _truncate_log(log_path, self.step)
            _truncate_log(self.out_dir / "monitor_log.jsonl", self.step)
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step if resumed else None)
        iterators = {d: _loader(ds, batch_size=s.batch_size, seed=s.seed, start_step=self.step, rank=self.rank,
                                world=self.world, num_workers=s.num_workers) for d, ds in self.datasets.items()}
        n_corrupt, corrupt_files = 0, set()
        bar = tqdm(total=s.steps, initial=self.step, disable=self.rank != 0, desc="pretrain", unit="step",
                   dynamic_ncols=True)
        tic, seen = time.perf_counter(), 0
        try:
            while self.step < s.steps:
                batches = {}
                for domain, it in iterators.items():
                    while True:
                        batch = next(it)
                        n_corrupt += batch.pop("n_corrupt", 0)
                        corrupt_files.update(batch.pop("corrupt_files", ()))
                        if "image" in batch:  # else every sample of the batch was corrupt (and reported)
                            break
                    batches[domain] = _to(batch, self.device, s.channels_last)
                log_now = (self.step + 1) % s.log_every == 0 or self.step + 1 == s.steps
                logs = self.train_step(batches, with_metrics=log_now)
                self.step += 1
                seen += sum(b["image"].shape[0] for b in batches.values()) * self.world
                bar.update(1)
                if self.rank == 0 and log_now:
                    logs = {k: float(v) for k, v in logs.items()}
                    elapsed = time.perf_counter() - tic
                    logs["images_per_s"] = seen / max(elapsed, 1e-9)
                    logs["data/corrupt_frames"] = len(corrupt_files)  # files, each reported once by the loader
                    logs["data/corrupt_samples"] = n_corrupt  # draws that hit one of them and were skipped
                    tic, seen = time.perf_counter(), 0
                    for key, value in logs.items():
                        writer.add_scalar(key, value, self.step)
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": self.step, **logs}) + "\n")
                    bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()
                                     if k in ("loss", "images_per_s") or k.endswith("/loss")})
                if s.image_every and self.step % s.image_every == 0 and self.rank == 0:
                    self.write_pictures()
                if s.eval_every and self.step % s.eval_every == 0:
                    values = self.evaluate()  # every rank: objectives may gather across ranks
                    if self.rank == 0:
                        for key, value in {**values, **self.run_monitors()}.items():
                            writer.add_scalar(key, value, self.step)
                if self.step % s.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        self.save()
        summary = {"steps": self.step, "world_size": self.world, "corrupt_frames": len(corrupt_files),
                   "corrupt_samples": n_corrupt, "corrupt_files": sorted(corrupt_files), **self.data_report,
                   "device": str(self.device), "amp": str(self.amp_dtype)}
        fingerprint = parameter_fingerprint(self.model)
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, fingerprint)
            summary["rank_fingerprints"] = gathered
        summary["eval"] = self.evaluate()  # every rank, as during training
        if self.rank == 0:
            summary["monitors"] = self.run_monitors()
            for key, value in {**summary["eval"], **summary["monitors"]}.items():
                writer.add_scalar(key, value, self.step)
            summary["fingerprint"] = fingerprint
            self.write_pictures()
            from synth.plots import plot_curves

            plot_curves(log_path, self.out_dir / "loss_curves.png")
            atomic_write_json(self.out_dir / "summary.json", summary, indent=2)
            writer.close()
        return summary

    @torch.no_grad()
    def write_pictures(self) -> list[Path]:
        """PNGs of input / predicted / true maps on a held-out batch of each domain (training frames if none is
        held out), for the objectives of that domain that can ``predict`` (``pictures/step_N.png`` for rendered
        frames, ``step_N_real.png`` for real)."""
        from synth.plots import prediction_grid

        paths = []
        for domain in self.datasets:
            # Held-out frames when there are any; a tiny dataset may hold out none, then its training frames.
            dataset = self.eval_datasets.get(domain)
            if dataset is None or (not isinstance(dataset, torch.utils.data.IterableDataset) and len(dataset) == 0):
                dataset = self.datasets[domain]
            heads = {n: o for n, o in self.model.objectives.items()
                     if self.model.traits[n].predictor and domain in self.model.traits[n].domains}
            if not heads:
                continue
            self.model.eval()
            batch = next(_loader(dataset, batch_size=min(4, self.settings.batch_size), seed=self.settings.seed + 1,
                                 start_step=0, rank=0, world=1, num_workers=0))
            batch = _to(batch, self.device, self.settings.channels_last)
            batch.update(with_metrics=True, step=self.step, total_steps=self.settings.steps)
            with self._autocast():
                batch["features"] = self.model.backbone(batch["image"])
                predictions = {n: (h.target, h.predict(batch, self.model.backbone).float()) for n, h in heads.items()}
            suffix = "" if domain == "synthetic" else f"_{domain}"
            path = self.out_dir / "pictures" / f"step_{self.step:07d}{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.append(prediction_grid(batch, predictions, path))
        return paths


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the resumed step, so a resumed run's curves have no duplicated steps."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


__all__ = ["Engine", "MultiTask", "NonFiniteLossError", "RankMismatchError", "TrainerSettings", "ddp_backend",
           "lr_factor"]
