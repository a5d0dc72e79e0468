"""What every transfer task shares: the backbone (and depth head) of a checkpoint or of random init, seeding, image
resizing, the fine-tuning loop, and the surgery that turns a backbone into the body of a torchvision task model."""

import contextlib
import copy
import os
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.ops.misc import FrozenBatchNorm2d
from tqdm.auto import tqdm

from pretext.synthetic import DepthHead
from synth.backbone import Backbone
from synth.checkpoint import Checkpoint, CheckpointError
from synth.engine import NonFiniteLossError, lr_factor
from synth.runtime import build_optimizer

#: Label (and checkpoint value) of the randomly initialised baseline.
RANDOM = "random"

#: A checkpoint argument: a file, a run folder, an already read :class:`~synth.checkpoint.Checkpoint`, or ``None`` /
#: ``"random"`` for random initialisation.
CheckpointLike = str | os.PathLike | Checkpoint | None


def is_random(checkpoint: CheckpointLike) -> bool:
    """Whether ``checkpoint`` asks for random initialisation (``None`` or ``"random"``)."""
    return checkpoint is None or (not isinstance(checkpoint, Checkpoint) and str(checkpoint) == RANDOM)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Run the body with torch's global generators seeded, restoring the caller's state afterwards.

    Only for code that draws from the global generators and takes no ``generator`` argument: ``nn.init`` in module
    constructors, dropout, and torchvision's detection samplers (``BalancedPositiveNegativeSampler`` calls
    ``torch.randperm`` without one). Seeding a scoped fork keeps their draws a function of ``seed`` alone.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints: backbone and depth head
# ---------------------------------------------------------------------------------------------------------------


def load_backbone(checkpoint: CheckpointLike = None, arch: str | None = None, seed: int = 0) -> Backbone:
    """The backbone of a ``synth pretrain`` checkpoint, or a randomly initialised one.

    Every backbone key of the checkpoint (``backbone.network.*`` in ``state["model"]``, the state dict of
    :class:`synth.engine.MultiTask`) must match the backbone's exactly: a partial load would silently mix pretrained
    and random weights.

    Args:
        checkpoint: ``runs/<run>/checkpoints/last.pt`` (or the run folder, or a read
            :class:`~synth.checkpoint.Checkpoint`); ``None`` or ``"random"`` for torchvision's initialisation drawn
            with ``seed``.
        arch: Architecture; for random init ``None`` means ``"resnet18"``, for a checkpoint ``None`` means the
            checkpoint's own (any other value must agree with it).
        seed: Seeds the random initialisation.

    Raises:
        CheckpointError: the file is no checkpoint, the arch disagrees, or keys are missing, unexpected or of the
            wrong shape (all listed).
    """
    if is_random(checkpoint):
        with seeded(seed):
            return Backbone(arch or "resnet18")
    checkpoint = Checkpoint.read(checkpoint)
    saved_arch = checkpoint.arch
    if arch is not None and arch != saved_arch:
        raise CheckpointError(f"checkpoint {checkpoint.path}: trained with a {saved_arch} backbone, asked for {arch}")
    with seeded(seed):
        backbone = Backbone(saved_arch, in_channels=checkpoint.in_channels)
    weights = checkpoint.backbone_state()
    _check_keys(backbone, weights, checkpoint, what="backbone")
    backbone.load_state_dict(weights, strict=True)
    return backbone


def load_objective_state(checkpoint: str | os.PathLike | Checkpoint, name: str) -> tuple[dict, dict[str, Tensor]]:
    """The constructor keywords and the state dict of objective ``name`` in a checkpoint (e.g. its depth head).

    Returns:
        ``(kwargs, state_dict)``: ``kwargs`` from ``config["objective"][name]`` (``config["adapt"]`` for the
        adversary) without Hydra's ``_target_`` and the engine's ``weight``; ``state_dict`` the
        ``objectives.<name>.*`` entries with that prefix removed.

    Raises:
        CheckpointError: the checkpoint has no objective ``name`` (the message lists those it has).
    """
    node, weights = Checkpoint.read(checkpoint).objective_state(name)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k != "weight"}  # _target_, _convert_
    return kwargs, weights


def load_depth_head(checkpoint: CheckpointLike = None, arch: str = "resnet18", seed: int = 0,
                    name: str = "depth") -> DepthHead:
    """The :class:`~pretext.synthetic.DepthHead` of a checkpoint (strict load), or a fresh one drawn with ``seed``.

    Raises:
        CheckpointError: the checkpoint has no objective ``name`` or its keys do not fit.
    """
    if is_random(checkpoint):
        with seeded(seed):
            return DepthHead(backbone_arch=arch)
    checkpoint = Checkpoint.read(checkpoint)
    kwargs, weights = load_objective_state(checkpoint, name)
    with seeded(seed):
        head = DepthHead(**kwargs)
    _check_keys(head, weights, checkpoint, what=f"objective {name!r}")
    head.load_state_dict(weights, strict=True)
    return head


def _check_keys(module: nn.Module, weights: Mapping[str, Tensor], checkpoint: Checkpoint, what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{label} {len(keys)}: {_few(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)) if keys]
        raise CheckpointError(f"checkpoint {checkpoint.path}: {what} keys do not match ({'; '.join(parts)})")


def _few(keys: Sequence[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


# ---------------------------------------------------------------------------------------------------------------
# Images and the training loop
# ---------------------------------------------------------------------------------------------------------------


def _square(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _resize(image: Tensor, size: int | Sequence[int] | None, mode: str = "bilinear") -> Tensor:
    """``(C, H, W)`` or ``(B, C, H, W)`` resized to ``size`` (unchanged when ``None`` or already that size)."""
    if size is None or tuple(image.shape[-2:]) == _square(size):
        return image
    batched = image if image.dim() == 4 else image[None]
    if mode == "nearest":
        out = F.interpolate(batched.float(), size=_square(size), mode="nearest-exact").to(image.dtype)
    else:
        out = F.interpolate(batched.float(), size=_square(size), mode="bilinear", align_corners=False,
                            antialias=True)
    return out if image.dim() == 4 else out[0]


def _endless(loader: DataLoader) -> Iterator:
    while True:
        yield from loader


def _train(model: nn.Module, dataset, *, collate: Callable, loss_fn: Callable[[nn.Module, object], Tensor],
           steps: int, batch_size: int, lr: float, seed: int, device: torch.device, optimizer: str,
           weight_decay: float, warmup_steps: int | None, grad_clip: float, desc: str) -> list[float]:
    """The loop every fine-tuning shares: shuffled batches from an explicit generator, warm-up then cosine decay.

    ``optimizer``: ``"sgd"`` (momentum 0.9, no Nesterov, L2 weight decay) or ``"adamw"``
    (:func:`synth.runtime.build_optimizer`).

    Returns:
        The loss of every step.
    """
    if steps < 1:
        raise ValueError(f"{desc}: steps must be >= 1, got {steps}")
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the training dataset is empty")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=True, generator=generator,
                        collate_fn=collate, drop_last=True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(parameters, optimizer, lr=lr, weight_decay=weight_decay, nesterov=False)
    warmup = min(100, steps // 10) if warmup_steps is None else warmup_steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps=steps, warmup_steps=warmup, schedule="cosine"))
    model.to(device).train()
    losses: list[float] = []
    batches = _endless(loader)
    with seeded(seed, device), tqdm(total=steps, desc=desc, unit="step", leave=False, dynamic_ncols=True) as bar:
        for step in range(steps):
            loss = loss_fn(model, next(batches))
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(f"{desc}: non-finite loss ({loss.item()}) at step {step}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                nn.utils.clip_grad_norm_(parameters, grad_clip)
            opt.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Backbone surgery: stages as named children, freezing, batch norm
# ---------------------------------------------------------------------------------------------------------------


def _stage_children(backbone: Backbone) -> tuple[nn.Module, dict[str, list[str]]]:
    """The torchvision module whose direct children make up the stages, and each stage's children in order.

    :class:`~torchvision.models._utils.IntermediateLayerGetter` (and so ``BackboneWithFPN``) returns outputs of
    direct children: a ResNet's ``maxpool`` / ``layer1`` .. ``layer4``, or VGG ``features``' max-pool indices.
    """
    network = backbone.torchvision_model()
    if isinstance(network, torchvision.models.ResNet):
        layout = {"stem": ["conv1", "bn1", "relu", "maxpool"]}
        layout |= {f"layer{k}": [f"layer{k}"] for k in range(1, 5)}
        return network, layout
    if isinstance(network, torchvision.models.VGG):
        layout, block = {}, []
        for name, child in network.features.named_children():
            block.append(name)
            if isinstance(child, nn.MaxPool2d):
                layout[f"block{len(layout) + 1}"] = block
                block = []
        return network.features, layout
    raise NotImplementedError(f"transfer models support ResNet and VGG backbones, not {type(network).__name__}")


def _freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`~torchvision.ops.misc.FrozenBatchNorm2d` with its
    statistics and affine parameters (torchvision's detection recipe for pretrained backbones)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.running_mean is not None:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen.to(module.weight.device if module.affine else "cpu")
    for name, child in module.named_children():
        replaced = _freeze_batchnorm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def _prepare_encoder(backbone: Backbone, trainable_stages: int, norm: str) -> tuple[nn.Module, dict[str, str]]:
    """A copy of the backbone's network with its first stages frozen, and each stage's output child.

    Args:
        trainable_stages: How many of the last stages train (0 .. all), as torchvision's ``trainable_layers``.
        norm: ``"batch"``: batch norm of trainable stages keeps training; ``"frozen"``: all batch norm frozen.
            Batch norm of frozen stages is always frozen, so their statistics stay the checkpoint's.
    """
    if norm not in ("batch", "frozen"):
        raise ValueError(f"norm: expected 'batch' or 'frozen', got {norm!r}")
    if getattr(backbone, "in_channels", 3) != 3:
        raise ValueError(f"transfer models take RGB images; the backbone has {backbone.in_channels} input channels")
    copied = copy.deepcopy(backbone)
    module, layout = _stage_children(copied)
    if not 0 <= trainable_stages <= len(layout):
        raise ValueError(f"trainable_stages: expected 0 .. {len(layout)}, got {trainable_stages}")
    frozen_stages = list(layout)[:len(layout) - trainable_stages]
    for stage in frozen_stages:
        for child in layout[stage]:
            submodule = getattr(module, child)
            submodule.requires_grad_(False)
            setattr(module, child, _freeze_batchnorm(submodule))
    if norm == "frozen":
        _freeze_batchnorm(module)
    return module, {stage: children[-1] for stage, children in layout.items()}


__all__ = ["RANDOM", "CheckpointLike", "is_random", "load_backbone", "load_depth_head", "load_objective_state",
           "seeded"]
