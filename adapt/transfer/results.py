"""Transfer results: one row per number, written as ``results.csv`` and a markdown table, and the per-stage plot."""

import csv
import dataclasses
import io
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from adapt.transfer.common import RANDOM
from synth.io import atomic_path, atomic_write_text


@dataclass(frozen=True)
class ResultRow:
    """One number of a transfer run.

    Args:
        checkpoint: The checkpoint path, or ``"random"``.
        label: The checkpoint's name in tables.
        task: e.g. ``"detection"``, ``"linear_probe"``.
        metric: e.g. ``"mAP"``, ``"acc@layer3"``.
        value: The score.
        seed: The seed of the run (head initialisation, data order).
        budget: How much training it got, e.g. ``"steps=1000,batch_size=4,lr=0.01"``.
        wall_s: Seconds the task took for this checkpoint.
    """

    checkpoint: str
    label: str
    task: str
    metric: str
    value: float
    seed: int
    budget: str
    wall_s: float


_FIELDS = tuple(f.name for f in dataclasses.fields(ResultRow))


def is_baseline(label: str) -> bool:
    """Whether a results label is the random-init baseline (``"random"`` or ``"random/<arch>"``)."""
    return label == RANDOM or label.startswith(f"{RANDOM}/")


def write_results(rows: Sequence[ResultRow], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.csv`` (one row per number) and ``results.md`` (:func:`format_table`), each atomically.

    Returns:
        The two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(dataclasses.asdict(row))
    atomic_write_text(out / "results.csv", buffer.getvalue())
    atomic_write_text(out / "results.md", format_table(rows) + "\n")
    return out / "results.csv", out / "results.md"


def read_results(path: str | os.PathLike) -> list[ResultRow]:
    """The rows of a ``results.csv`` (or of the folder holding it)."""
    path = Path(path)
    path = path / "results.csv" if path.is_dir() else path
    with open(path, newline="") as f:
        return [ResultRow(checkpoint=r["checkpoint"], label=r["label"], task=r["task"], metric=r["metric"],
                          value=float(r["value"]), seed=int(r["seed"]), budget=r["budget"], wall_s=float(r["wall_s"]))
                for r in csv.DictReader(f)]


def format_table(rows: Sequence[ResultRow], digits: int = 4) -> str:
    """A markdown table: one row per checkpoint label (random baselines first), one column per ``task/metric``.

    A cell is the mean over seeds (``± sd (n=k)`` with several), and for a checkpoint other than the baseline the
    difference to the ``"random"`` row's mean in parentheses.
    """
    if not rows:
        return "(no results)"
    labels, columns = [], []
    cells: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        column = f"{row.task}/{row.metric}"
        labels += [row.label] if row.label not in labels else []
        columns += [column] if column not in columns else []
        cells.setdefault((row.label, column), []).append(row.value)
    baselines = [label for label in labels if is_baseline(label)]
    labels = baselines + [label for label in labels if label not in baselines]

    def mean(values: list[float]) -> float:
        return statistics.fmean(values)

    def cell(label: str, column: str) -> str:
        values = cells.get((label, column))
        if not values:
            return "-"
        text = f"{mean(values):.{digits}f}"
        if len(values) > 1:
            text += f" ± {statistics.stdev(values):.{digits}f} (n={len(values)})"
        baseline = cells.get((RANDOM, column))
        if label not in baselines and baseline:
            text += f" ({mean(values) - mean(baseline):+.{digits}f})"
        return text

    lines = ["| checkpoint | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += ["| " + " | ".join([label] + [cell(label, c) for c in columns]) + " |" for label in labels]
    return "\n".join(lines)


def plot_stage_curve(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                     title: str = "linear probe per stage") -> Path:
    """PNG of linear-probe accuracy against stage, one line per checkpoint (the random baseline dashed grey).

    Args:
        results: ``{label: {stage: accuracy}}``, e.g. :func:`~adapt.transfer.classification.linear_probe` per
            checkpoint.
        path: Where to write the PNG (written under a temporary name, then renamed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages: list[str] = []
    for curve in results.values():
        stages += [s for s in curve if s not in stages]
    fig, ax = plt.subplots(figsize=(1.2 * len(stages) + 2.5, 3.2))
    try:
        for label, curve in results.items():
            xs = [stages.index(s) for s in curve]
            style = {"color": "0.5", "linestyle": "--"} if is_baseline(label) else {}
            ax.plot(xs, list(curve.values()), marker="o", label=label, **style)
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlabel("backbone stage")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


__all__ = ["ResultRow", "format_table", "plot_stage_curve", "read_results", "write_results"]
