"""The checkpoint format of :class:`synth.engine.Engine`, read and written in one place.

A checkpoint is one ``torch.save`` dict:

- ``step``: optimizer steps done;
- ``model``: the state dict of :class:`synth.engine.MultiTask`: ``backbone.*`` (the shared encoder) and
  ``objectives.<name>.*`` (each objective's head);
- ``optimizer``, ``disc_optimizer`` (``None`` without an adversary), ``scheduler``, ``scaler``: training state;
- ``rng``: ``{"torch": CPU generator state, "cuda": per-device states or None}``;
- ``config``: the plain config dict of the run (``config["model"]`` builds the backbone, ``config["objective"]
  [<name>]`` each objective, ``config["adapt"]`` the adversary);
- ``backbone``: ``{"arch": the backbone's architecture}``.

:func:`save_checkpoint` writes it atomically (temporary name, then rename: a reader never sees half of one);
:class:`Checkpoint` reads it once and decodes the prefixes, for the engine's resume and for transfer.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from synth.io import atomic_path


class CheckpointError(ValueError):
    """A file is not a readable checkpoint, or a checkpoint does not fit what it is loaded into; the message (one
    line) names the file."""


def resolve_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The checkpoint file: the path itself, or ``<run>/checkpoints/last.pt`` (or ``<folder>/last.pt``) for a folder.

    Raises:
        FileNotFoundError: neither exists.
    """
    path = Path(checkpoint)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "last.pt", path / "last.pt"):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"checkpoint: {path} is a folder without checkpoints/last.pt")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file {path}")
    return path


def _load_error(path: Path, error: Exception) -> str:
    """The gist of torch's (often long, multi-line) reason for not loading a file."""
    if path.stat().st_size == 0:
        return "the file is empty"
    text = str(error).strip()
    if "WeightsUnpickler error:" in text:  # weights_only refused it: name the opcode, not torch's advice
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].strip()
        return f"not tensors and plain data: {detail}"
    first = text.splitlines()[0].split(". ")[0] if text else ""
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _unreadable(path: Path, reason: str) -> CheckpointError:
    reason = " ".join(reason.split())  # one line, whatever the reason looked like
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return CheckpointError(f"{path} is not a readable synth pretrain checkpoint ({reason}): delete it to start over, "
                           f"or point checkpoint= at another file")


def read_checkpoint(checkpoint: str | os.PathLike, *, map_location: str | torch.device = "cpu",
                    weights_only: bool = True, mmap: bool = False) -> dict:
    """A checkpoint as a dict (the file read once), by default on the CPU with tensors and plain data only.

    ``mmap=True`` maps the tensors instead of reading them: a cheap way to check a file and read its config.

    Raises:
        FileNotFoundError: no such file (or run folder without ``checkpoints/last.pt``).
        CheckpointError: the file is not an engine checkpoint: truncated, not a torch file, not a dict, or without
            a ``model`` state dict.
    """
    path = resolve_checkpoint(checkpoint)
    try:
        state = torch.load(path, map_location=map_location, weights_only=weights_only, mmap=mmap)
    except (PermissionError, FileNotFoundError, IsADirectoryError):
        raise  # the file may be fine: say what the system said
    # torch reports a torn zip as OSError(EINVAL), a foreign file as RuntimeError, UnpicklingError, EOFError...
    except Exception as error:
        raise _unreadable(path, _load_error(path, error)) from error
    if not isinstance(state, Mapping):
        raise _unreadable(path, f"it holds a {type(state).__name__}, not a dict")
    if not isinstance(state.get("model"), Mapping):
        raise _unreadable(path, "no 'model' state dict")
    return dict(state)


class NonFiniteStateError(FloatingPointError):
    """A state to be saved holds NaN or infinite values; nothing was written (the good checkpoint stays)."""


def non_finite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors in a (nested) state dict that hold NaN or infinite values."""
    if isinstance(state, Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, Mapping):
        items = state.items()
    elif isinstance(state, list | tuple):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items for name in non_finite_entries(value, f"{prefix}.{key}" if prefix else
                                                                         str(key))]


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike, *,
                    check: tuple[str, ...] = ("model", "optimizer", "disc_optimizer")) -> Path:
    """Write ``state`` (e.g. :meth:`synth.engine.Engine.state_dict`) to ``path`` atomically; returns ``path``.

    The parent folder is created. A crash or a full disk leaves the previous checkpoint as it was, and so does a
    state whose parameters or optimizer moments are not finite: a diverged run never overwrites a good checkpoint.

    Args:
        check: Entries of ``state`` that must hold only finite floating-point tensors.

    Raises:
        NonFiniteStateError: names the first non-finite tensors; nothing is written.
        synth.io.DiskFullError: the disk filled up (the temporary file is removed).
    """
    bad = [name for key in check for name in non_finite_entries(state.get(key), key)]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteStateError(f"not writing {path}: {', '.join(bad[:3])}{more} hold NaN or inf values; the "
                                  f"previous checkpoint is kept")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)
    return path


def _prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


@dataclass(frozen=True, eq=False)
class Checkpoint:
    """An engine checkpoint read once from a file: what it was trained as, and its weights by part.

    Example:
        >>> checkpoint = Checkpoint.read("runs/pretrain")  # doctest: +SKIP
        >>> backbone = Backbone(checkpoint.arch)  # doctest: +SKIP
        >>> backbone.load_state_dict(checkpoint.backbone_state())  # doctest: +SKIP

    Args:
        path: The file it was read from.
        step: Optimizer steps done.
        config: The run's plain config dict (empty when it recorded none).
        model: The :class:`synth.engine.MultiTask` state dict (``backbone.*``, ``objectives.<name>.*``).
        backbone: The ``backbone`` record (``{"arch": ...}``).
    """

    path: Path
    step: int
    config: dict = field(repr=False)
    model: dict[str, Tensor] = field(repr=False)
    backbone: dict = field(default_factory=dict, repr=False)

    @classmethod
    def read(cls, checkpoint: "str | os.PathLike | Checkpoint", *,
             map_location: str | torch.device = "cpu") -> "Checkpoint":
        """Read a checkpoint file (or a run folder's ``checkpoints/last.pt``); a :class:`Checkpoint` is returned
        as it is, so functions can take either without reading twice.

        Raises:
            FileNotFoundError: no such file.
            CheckpointError: the file is not an engine checkpoint.
        """
        if isinstance(checkpoint, Checkpoint):
            return checkpoint
        path = resolve_checkpoint(checkpoint)
        return cls.from_state(read_checkpoint(path, map_location=map_location), path)

    @classmethod
    def from_state(cls, state: Mapping[str, Any], path: str | os.PathLike) -> "Checkpoint":
        """The :class:`Checkpoint` of an already loaded checkpoint dict (the training state is not kept)."""
        if not isinstance(state.get("model"), Mapping):
            raise _unreadable(Path(path), "no 'model' state dict")
        return cls(path=Path(path), step=int(state.get("step") or 0), config=dict(state.get("config") or {}),
                   model=dict(state["model"]), backbone=dict(state.get("backbone") or {}))

    @property
    def arch(self) -> str:
        """The backbone architecture it was trained with.

        Raises:
            CheckpointError: the checkpoint records none.
        """
        arch = self.backbone.get("arch") or (self.config.get("model") or {}).get("arch")
        if not arch:
            raise CheckpointError(f"checkpoint {self.path}: records no backbone arch (state['backbone']['arch'])")
        return str(arch)

    @property
    def in_channels(self) -> int:
        """Input channels of the backbone (``config["model"]["in_channels"]``, 3 when not recorded)."""
        return int((self.config.get("model") or {}).get("in_channels", 3))

    @property
    def objectives(self) -> tuple[str, ...]:
        """Names of the objectives whose weights it holds, sorted."""
        return tuple(sorted({key.split(".")[1] for key in self.model if key.startswith("objectives.")}))

    def backbone_state(self) -> dict[str, Tensor]:
        """The backbone's state dict (the ``backbone.*`` entries, prefix removed)."""
        return _prefixed(self.model, "backbone.")

    def objective_state(self, name: str) -> tuple[dict, dict[str, Tensor]]:
        """The config node and the state dict of objective ``name``.

        Returns:
            ``(node, state_dict)``: ``node`` is ``config["objective"][name]`` (``config[name]`` for the adversary,
            which ``synth pretrain`` keeps under ``adapt``), ``{}`` when not recorded; ``state_dict`` the
            ``objectives.<name>.*`` entries with that prefix removed.

        Raises:
            CheckpointError: it has no objective ``name`` (the message lists those it has).
        """
        weights = _prefixed(self.model, f"objectives.{name}.")
        if not weights:
            raise CheckpointError(f"checkpoint {self.path}: no objective {name!r}; it has {list(self.objectives)}")
        node = (self.config.get("objective") or {}).get(name) or self.config.get(name) or {}
        return dict(node), weights


__all__ = ["Checkpoint", "CheckpointError", "read_checkpoint", "resolve_checkpoint", "save_checkpoint"]
