"""Every transfer task, one line each: adding a task is a module declaring a :class:`~adapt.transfer.task.Task`
plus its line here."""

from collections.abc import Mapping, Sequence
from typing import Any

from adapt.transfer import classification, depth, detection, naive, segmentation
from adapt.transfer.task import Task, make_budget

#: The tasks :func:`~adapt.transfer.runner.run_transfer` knows, in the order tables show them.
REGISTRY: tuple[Task, ...] = (
    classification.LINEAR_PROBE,
    classification.FINETUNE,
    detection.TASK,
    segmentation.TASK,
    depth.TASK,
)

#: The naive rows of each task (:mod:`adapt.transfer.naive`): ``naive(data, seed, reference_rows) -> {label:
#: [Score, ...]}``. A task without an entry gets none.
NAIVE_ROWS: dict[str, Any] = {
    "linear_probe": naive.classification_naive,
    "finetune": naive.classification_naive,
    "detection": naive.detection_naive,
    "segmentation": naive.segmentation_naive,
    "depth": naive.depth_naive,
}

#: Task names.
TASKS: tuple[str, ...] = tuple(task.name for task in REGISTRY)

#: Which data group each task reads.
TASK_DATA: dict[str, str] = {task.name: task.data for task in REGISTRY}

_BY_NAME: dict[str, Task] = {task.name: task for task in REGISTRY}


def get_task(name: str) -> Task:
    """The task called ``name``.

    Raises:
        ValueError: no such task (the message lists the known ones).
    """
    if name not in _BY_NAME:
        raise ValueError(f"task {name!r}: expected one of {list(TASKS)}")
    return _BY_NAME[name]


def check_budget(budget: Mapping[str, Mapping[str, Any]] | None) -> dict[str, Any]:
    """Every task's budget dataclass, with the user's ``{task: {key: value}}`` settings over its defaults.

    Checked before any work: an unknown task, an unknown key or a wrong type is a one-line ValueError naming it.

    Returns:
        ``{task name: budget}`` for every task of :data:`REGISTRY`.
    """
    budget = dict(budget or {})
    unknown = sorted(set(budget) - set(TASKS))
    if unknown:
        raise ValueError(f"budget: unknown task(s) {unknown}; expected some of {TASKS}")
    for name, settings in budget.items():
        if settings is not None and not isinstance(settings, Mapping):
            raise ValueError(f"budget[{name!r}]: expected a mapping of settings, got {settings!r}")
    return {task.name: make_budget(task, budget.get(task.name)) for task in REGISTRY}


def select_tasks(names: Sequence[str]) -> list[Task]:
    """The tasks named, in the given order.

    Raises:
        ValueError: none given, or a name no task has.
    """
    unknown = [name for name in names if name not in _BY_NAME]
    if unknown or not names:
        raise ValueError(f"tasks: expected some of {TASKS}, got {list(names)}")
    return [_BY_NAME[name] for name in names]


__all__ = ["NAIVE_ROWS", "REGISTRY", "TASKS", "TASK_DATA", "check_budget", "get_task", "select_tasks"]
