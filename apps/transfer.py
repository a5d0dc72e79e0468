"""``synth transfer``: judge pretrained backbones on REAL tasks, always next to the random-initialisation baseline.

The data of each task is a config group whose nodes are ``_target_`` datasets (``transfer/classification``,
``transfer/detection``, ``transfer/segmentation``, ``transfer/depth``); the defaults use only real data that
packages ship (Fashion-MNIST, the cut-paste set built from tuxpaint photos on opencv-doc/scikit-image
backgrounds, the Middlebury pairs). Point them at COCO, VOC, image folders or RGB-D folders for your own data. A
``build`` node (e.g. :func:`adapt.cutpaste.build_cutpaste`) runs first, once: its output folder is reused.
"""

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from adapt.transfer import TASK_DATA, TASKS, check_budget, format_report, run_transfer, write_results
from apps.launch import checked, run_hydra
from synth.checkpoint import read_checkpoint


@dataclass
class TransferData:
    """One node per data group; each holds ``train``/``test`` (and optionally ``build``) ``_target_`` nodes."""

    classification: Any = None
    detection: Any = None
    segmentation: Any = None
    depth: Any = None


@dataclass
class TransferApp:
    """``synth transfer`` config.

    Args:
        checkpoints: ``{label: checkpoint}``: ``synth pretrain`` run folders or ``last.pt`` files.
        checkpoint: Shorthand for one checkpoint, labelled ``pretrained``.
        tasks: Among ``linear_probe``, ``finetune``, ``detection``, ``segmentation``, ``depth``.
        budget: ``{task: settings}`` (steps, batch size, learning rate, sizes) shared by every checkpoint and the
            random baseline; each task's budget dataclass holds its keys and their defaults (e.g.
            :class:`adapt.transfer.detection.DetectionBudget`).
        seed: Seeds the baseline's initialisation, every head and every data order.
        device: ``auto``, ``cpu`` or ``cuda``.
        naive: Add the naive rows (no network: constant and ramp depth, majority class, raw-pixel probe, prior
            boxes, location-prior masks) beside random init.
        out_dir: ``results.csv``, ``results.md`` and ``linear_probe_stages.png`` go here.
    """

    checkpoints: dict[str, str] = field(default_factory=dict)
    checkpoint: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["linear_probe", "detection"])
    budget: dict[str, Any] = field(default_factory=dict)
    data: TransferData = field(default_factory=TransferData)
    seed: int = 0
    device: str = "auto"
    naive: bool = True
    out_dir: str = "runs/transfer"


ConfigStore.instance().store(name="transfer_app_schema", node=TransferApp)


def _check_target_keys(node: DictConfig, where: str) -> None:
    """Every key of a ``_target_`` node must be an argument of its target (a typo is named before any work)."""
    target = get_object(node._target_)
    parameters = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return
    for key in node:
        if not str(key).startswith("_") and key not in parameters:
            raise ValueError(f"{where}.{key}: not an argument of {node._target_} (expected one of "
                             f"{sorted(k for k in parameters if k != 'self')})")


def _checkpoints(cfg: DictConfig) -> dict[str, str]:
    checkpoints = dict(cfg.checkpoints)
    if cfg.checkpoint is not None:
        checkpoints.setdefault("pretrained", cfg.checkpoint)
    return checkpoints


def check_config(cfg: DictConfig) -> None:
    """Tasks, budget keys, data keys and checkpoint files, checked before anything runs."""
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown or not cfg.tasks:
        raise ValueError(f"tasks: expected some of {list(TASKS)}, got {list(cfg.tasks)}")
    check_budget(OmegaConf.to_container(cfg.budget, resolve=True))
    for task in cfg.tasks:
        group = TASK_DATA[task]
        node = cfg.data[group]
        if node is None:
            raise ValueError(f"task {task} needs data.{group}: pick one with transfer/{group}=...")
        OmegaConf.to_container(node, resolve=True, throw_on_missing=True)  # names any ??? left to fill in
        for split, split_node in node.items():
            if isinstance(split_node, DictConfig) and "_target_" in split_node:
                _check_target_keys(split_node, f"data.{group}.{split}")
    for label, path in _checkpoints(cfg).items():
        if str(path) != "random":
            try:  # mapped, not read: a damaged or foreign file is named here, before any work
                read_checkpoint(path, weights_only=False, mmap=True)
            except FileNotFoundError as error:
                raise FileNotFoundError(f"checkpoints.{label}: {error}") from error


def build_data(cfg: DictConfig) -> dict:
    """Instantiate the datasets of the requested tasks (running each group's ``build`` step first)."""
    data = {}
    for group in sorted({TASK_DATA[t] for t in cfg.tasks}):
        node = cfg.data[group]
        if "build" in node:
            instantiate(node.build)
        data[group] = {split: instantiate(value) for split, value in node.items() if split != "build"}
    return data


def transfer_job(cfg: DictConfig) -> list:
    """The Hydra task function of ``synth transfer``: results table printed and written to ``out_dir``."""
    rows = run_transfer(_checkpoints(cfg), list(cfg.tasks), build_data(cfg),
                        budget=OmegaConf.to_container(cfg.budget, resolve=True), seed=cfg.seed,
                        out_dir=cfg.out_dir, device=cfg.device, naive=cfg.naive)
    write_results(rows, cfg.out_dir)
    print(f"\ntransfer results ({Path(cfg.out_dir) / 'results.md'}):\n{format_report(rows)}")
    return rows



def command(args: list[str]) -> None:
    """``synth transfer``: check tasks, budget, data keys and checkpoints, then run the job."""
    checked("synth_transfer", args, check_config)
    run_hydra("synth_transfer", transfer_job, args)


__all__ = ["TASK_DATA", "TransferApp", "build_data", "check_config", "command", "transfer_job"]
