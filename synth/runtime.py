"""Where and how a model trains: the device a config asks for, whether the CPU has native bf16, and the optimizer
a config names, built in one place."""

import torch
from torch import nn

#: Optimizers a config may name.
OPTIMIZERS: tuple[str, ...] = ("adamw", "sgd")


def resolve_device(requested: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device for ``requested``: ``"auto"`` (CUDA when there is one, else CPU), ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"``. ``"cuda"`` under ``torchrun`` means this process's GPU (``local_rank``), made current.

    Raises:
        ValueError: CUDA was asked for on a machine without it (one line, instead of torch's deep traceback).
    """
    requested = str(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {requested!r}: this machine has no CUDA device (use device=cpu or auto)")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


#: CPU flags (``/proc/cpuinfo``) of native bf16 arithmetic: AVX512-BF16 (Cooper Lake, Zen 4) and AMX (Sapphire
#: Rapids). oneDNN also runs bf16 on plain AVX512 by converting to fp32, which is slower than fp32 itself.
NATIVE_BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic natively (``cpuinfo``: the text of ``/proc/cpuinfo``, read when
    None). Where the flags cannot be read (not Linux), oneDNN's own answer stands."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def build_optimizer(parameters, name: str, *, lr: float, weight_decay: float, nesterov: bool = False,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or SGD with momentum 0.9 (optionally Nesterov, L2 weight decay).

    Args:
        parameters: Parameters or parameter groups.
        name: ``"adamw"`` or ``"sgd"``.
        lr: Learning rate.
        weight_decay: Weight decay.
        nesterov: Nesterov momentum for SGD.
        fused: AdamW's fused kernel (one launch for all parameters; the GPU step is launch-bound without it).
    """
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay, **({"fused": True} if fused else {}))
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=nesterov, weight_decay=weight_decay)
    raise ValueError(f"optimizer: expected one of {list(OPTIMIZERS)}, got {name!r}")


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that require gradients."""
    return [p for p in module.parameters() if p.requires_grad]


__all__ = ["OPTIMIZERS", "build_optimizer", "resolve_device", "trainable"]
