"""``run_transfer``: every checkpoint, and the random-initialisation baseline, through the requested tasks of
:data:`~adapt.transfer.registry.REGISTRY` at one budget, into one results table."""

import os
import time
from collections.abc import Mapping, Sequence

import torch

from adapt.transfer.common import RANDOM, is_random, load_backbone
from adapt.transfer.registry import NAIVE_ROWS, check_budget, select_tasks
from adapt.transfer.results import NAIVE, ResultRow, write_results
from adapt.transfer.task import TaskContext, budget_text
from synth.checkpoint import Checkpoint
from synth.runtime import resolve_device


def run_transfer(checkpoints: Mapping[str, str | os.PathLike | None], tasks: Sequence[str], data: Mapping,
                 budget: Mapping[str, Mapping] | None = None, seed: int = 0, out_dir: str | os.PathLike | None = None,
                 device: str | torch.device = "auto", naive: bool = True) -> list[ResultRow]:
    """Evaluate every checkpoint, and the random-initialisation baseline, on the requested tasks at one budget.

    The baseline (label ``"random"``, or ``"random/<arch>"`` when the checkpoints use several architectures) is
    always added: torchvision's initialisation of the same architecture drawn with ``seed``, trained with the same
    budget, seed and data order, so every difference is the pretraining's.

    Args:
        checkpoints: ``{label: checkpoint path}``; a ``None`` / ``"random"`` path is a random-init entry. Each file
            is read once.
        tasks: Among :data:`~adapt.transfer.registry.TASKS`. ``"depth"`` scores checkpoints that have a ``depth``
            objective zero-shot (task ``depth_zero_shot``; the baseline with a fresh head) and, with
            ``data["depth"]["train"]`` and ``steps > 0``, after fine-tuning (``depth_finetune``).
        data: ``{"classification": {"train", "test"}, "detection": {"train", "test"}, "segmentation":
            {"train", "test"}, "depth": {"test", optional "train"}}``: datasets following the package's conventions
            (each task reads the group its :class:`~adapt.transfer.task.Task` names; ``linear_probe`` and
            ``finetune`` both read ``"classification"``).
        budget: ``{task: settings}`` over the defaults of each task's budget dataclass (e.g. ``{"detection":
            {"kind": "maskrcnn", "steps": 2000}}``).
        seed: Seeds the baseline's initialisation, every head's initialisation and every data order.
        out_dir: Where ``results.csv``, ``results.md`` (rewritten after each checkpoint) and the tasks' reports
            (``linear_probe_stages.png``) go; ``None`` writes nothing.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        naive: Add each task's naive rows (:data:`~adapt.transfer.registry.NAIVE_ROWS`, labelled ``naive:<name>``):
            what the task scores with no network, the second reference every number is judged against.

    Returns:
        Every :class:`~adapt.transfer.results.ResultRow`, the baseline's first, then the naive rows.
    """
    selected = select_tasks(tasks)
    budgets = check_budget(budget)
    texts = {name: budget_text(budgets[name], (budget or {}).get(name) or {}) for name in budgets}
    for task in selected:
        if task.data not in data:
            raise KeyError(f"data: no {task.data!r} entry (needed by the requested tasks); it has {sorted(data)}")
    device = resolve_device(device)

    entries = {label: (None if is_random(path) else str(path)) for label, path in checkpoints.items()}
    if entries.get(RANDOM) is not None:
        raise ValueError(f"checkpoints: the label {RANDOM!r} is reserved for the random-init baseline")
    read = {label: Checkpoint.read(path) for label, path in entries.items() if path is not None}
    archs = {label: checkpoint.arch for label, checkpoint in read.items()}
    baselines = {label for label, path in entries.items() if path is None}
    needed = sorted(set(archs.values())) or ["resnet18"]
    runs: list[tuple[str, str | None, str]] = []
    if not baselines:
        for arch in needed:
            runs.append((RANDOM if len(needed) == 1 else f"{RANDOM}/{arch}", None, arch))
    runs += [(label, None, needed[0]) for label in entries if label in baselines]
    runs += [(label, path, archs[label]) for label, path in entries.items() if path is not None]

    rows: list[ResultRow] = []
    for label, path, arch in runs:
        checkpoint = read.pop(label) if path is not None else None  # freed after its run
        backbone = load_backbone(checkpoint, arch=arch, seed=seed)
        for task in selected:
            tic = time.perf_counter()
            context = TaskContext(label=label, backbone=backbone, checkpoint=checkpoint, arch=arch,
                                  data=data[task.data], group=task.data, seed=seed, device=device,
                                  budget_text=texts[task.name])
            for score in task.run(context, budgets[task.name]):
                wall = score.wall_s if score.wall_s is not None else time.perf_counter() - tic
                rows.extend(ResultRow(checkpoint=path if path is not None else RANDOM, label=label, task=score.task,
                                      metric=metric, value=float(value), seed=seed, budget=score.budget, wall_s=wall)
                            for metric, value in score.metrics.items())
        if out_dir is not None:
            write_results(rows, out_dir)
        if naive and path is None and label == runs[0][0]:  # after the first baseline: the naive rows, once
            rows += naive_rows(selected, data, rows, label, seed)
    if out_dir is not None:
        write_results(rows, out_dir)
        for task in dict.fromkeys(selected):
            if task.report is not None:
                task.report(rows, out_dir)
    return rows


def naive_rows(tasks: Sequence, data: Mapping, rows: Sequence[ResultRow], reference: str, seed: int
               ) -> list[ResultRow]:
    """The naive rows of ``tasks``, filling the columns that the ``reference`` label's rows have."""
    out = []
    for task in dict.fromkeys(tasks):
        make = NAIVE_ROWS.get(task.name)
        if make is None:
            continue
        tic = time.perf_counter()
        reference_rows = [r for r in rows if r.label == reference
                          and (r.task == task.name or r.task.startswith(f"{task.name}_"))]
        for label, scores in make(data[task.data], seed, reference_rows).items():
            for score in scores:
                out.extend(ResultRow(checkpoint=NAIVE, label=label, task=score.task, metric=metric,
                                     value=float(value), seed=seed, budget=score.budget,
                                     wall_s=time.perf_counter() - tic) for metric, value in score.metrics.items())
    return out


__all__ = ["naive_rows", "run_transfer"]
