"""What a transfer task is: a name, the data group it reads, a budget dataclass and the function that runs it.

Each task module declares one :class:`Task` (``TASK``, or several for a module with several protocols) and
:mod:`adapt.transfer.registry` lists them; :func:`adapt.transfer.runner.run_transfer` knows tasks only through
this interface. A budget is a ``@dataclass`` whose field defaults are the task's defaults (nowhere else); a user's
``{key: value}`` settings become one with :func:`make_budget`, which names an unknown key or a wrong type.
"""

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from synth.backbone import Backbone
from synth.checkpoint import Checkpoint


@dataclass(frozen=True)
class Score:
    """Metrics of one task run for one checkpoint.

    Args:
        task: The results' task column (e.g. ``"detection"``, ``"depth_zero_shot"``).
        metrics: ``{metric: value}``.
        budget: How much training it got, e.g. ``"steps=1000,batch_size=4,lr=0.01"``.
        wall_s: Seconds it took; ``None``: the runner's time for the whole task call.
    """

    task: str
    metrics: Mapping[str, float]
    budget: str
    wall_s: float | None = None


@dataclass(frozen=True)
class TaskContext:
    """What a task run gets for one checkpoint (or the random baseline).

    Args:
        label: The checkpoint's name in tables.
        backbone: Its backbone (task models copy it; not modified).
        checkpoint: The read checkpoint; ``None`` for random initialisation.
        arch: The backbone's architecture.
        data: The task's data group, ``{split: dataset}`` (e.g. ``{"train", "test"}``).
        group: The data group's name (for messages).
        seed: Seeds heads' initialisation and data order.
        device: Where to train and evaluate.
        budget_text: The budget as the results' ``budget`` column shows it.
    """

    label: str
    backbone: Backbone
    checkpoint: Checkpoint | None
    arch: str
    data: Mapping[str, Any]
    group: str
    seed: int
    device: torch.device
    budget_text: str

    def splits(self, *names: str) -> list:
        """The datasets of the named splits of the task's data group.

        Raises:
            KeyError: a split is missing (the message lists those there are).
        """
        missing = [s for s in names if s not in self.data]
        if missing:
            raise KeyError(f"data[{self.group!r}]: no {missing} split(s); it has {sorted(self.data)}")
        return [self.data[s] for s in names]


@dataclass(frozen=True)
class Task:
    """A transfer task, declared once in its own module.

    Args:
        name: Its name in ``tasks=[...]`` and ``budget.<name>``.
        data: The data group it reads (``data.<group>``; several tasks may share one).
        budget: Its budget ``@dataclass``; the field defaults are the task's defaults. A class variable ``SHOWN``
            (field names) says which fields the results' ``budget`` column always shows; settings a user gives are
            shown too.
        run: ``run(context, budget) -> [Score, ...]``.
        report: Optional ``report(rows, out_dir)`` called once after every checkpoint ran (e.g. a plot).
    """

    name: str
    data: str
    budget: type
    run: Callable[[TaskContext, Any], list[Score]]
    report: Callable[[Sequence, str | os.PathLike], object] | None = None

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.budget):
            raise TypeError(f"task {self.name}: its budget must be a dataclass, got {self.budget!r}")


#: Settings that are :func:`~adapt.transfer.runner.run_transfer`'s own arguments, never a budget's.
_RUN_ARGUMENTS = ("seed", "device")


def _type_name(hint: Any) -> str:
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("collections.abc.", "")


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a config value fits a budget field's annotation (ints pass as floats; bools are not numbers)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or hint in (list, tuple, Sequence):
        item = args[0] if args else Any
        return isinstance(value, list | tuple) and all(_conforms(v, item) for v in value)
    return isinstance(value, origin or hint)


def make_budget(task: Task, settings: Mapping[str, Any] | None = None) -> Any:
    """The task's budget dataclass with ``settings`` over its defaults.

    Raises:
        ValueError: one line naming the task and the key: an unknown key (with the valid ones), a wrong type, or a
            value the budget rejects.
    """
    fields = {f.name: f for f in dataclasses.fields(task.budget) if f.init}
    hints = typing.get_type_hints(task.budget)
    settings = dict(settings or {})
    for key, value in settings.items():
        if key in _RUN_ARGUMENTS:
            raise ValueError(f"budget[{task.name!r}]: {key!r} is run_transfer's own argument, not a budget setting")
        if key not in fields:
            raise ValueError(f"budget[{task.name!r}]: unknown setting {key!r}; expected one of {sorted(fields)}")
        if not _conforms(value, hints.get(key, Any)):
            raise ValueError(f"budget[{task.name!r}].{key}: expected {_type_name(hints[key])}, got {value!r}")
    try:
        return task.budget(**settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"budget[{task.name!r}]: {error}") from error


def budget_text(budget: Any, given: Iterable[str] = ()) -> str:
    """The budget as ``k=v,...``: the fields the budget always shows (``SHOWN``), then the ``given`` ones; ``None``
    values are left out."""
    shown = list(getattr(budget, "SHOWN", ()))
    keys = shown + [key for key in given if key not in shown]
    values = ((key, getattr(budget, key)) for key in keys)
    return ",".join(f"{key}={value}" for key, value in values if value is not None)


__all__ = ["Score", "Task", "TaskContext", "budget_text", "make_budget"]
