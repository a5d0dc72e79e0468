"""Where and how a model trains: the device a config asks for, whether the CPU has native bf16, and the optimizer
a config names, built in one place."""

import ctypes

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


#: glibc ``mallopt`` parameters (``malloc.h``) and the values :func:`keep_freed_memory` sets: the largest ``int``.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_NEVER = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc keep freed heap memory for the next allocation instead of handing it back to the system.

    A training step and a packed loader batch allocate and free the same large tensors over and over. By default
    glibc serves each block over its (dynamic) mmap threshold with a fresh ``mmap`` and returns it on ``free``, so
    every step page-faults its buffers in again and the kernel zeroes them: measured on 2 cores, the packed
    loader's batch augmentation at 128 px spends 32 ms per batch of 32 with the defaults and 18 ms with this, and a
    CPU training step ~10% less. The same settings as ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_TOP_PAD_`` in the environment, set from inside the process so that every ``synth`` training command
    (and the DataLoader workers it forks) has them however it was started. The price is a resident size that keeps
    its high-water mark, which is why render workers (new processes, see :mod:`render.shard`) do not use it.

    Returns:
        Whether the settings took effect (False where there is no glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "mallopt"):
        return False
    settings = ((_M_MMAP_THRESHOLD, _NEVER), (_M_TRIM_THRESHOLD, _NEVER), (_M_TOP_PAD, 2**30))
    accepted = [libc.mallopt(param, value) == 1 for param, value in settings]  # all three, even if one is refused
    return all(accepted)


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
