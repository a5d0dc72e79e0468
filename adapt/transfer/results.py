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


#: Label prefix of the naive rows (:mod:`adapt.transfer.naive`): no network, no learning beyond counting.
NAIVE = "naive"

#: Metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER: tuple[str, ...] = ("abs_rel", "sq_rel", "rmse", "log_rmse", "mean_angle", "median_angle",
                                    "mmd_linear", "mmd_rbf", "domain_acc", "proxy_a_distance")


def is_baseline(label: str) -> bool:
    """Whether a results label is the random-init baseline (``"random"`` or ``"random/<arch>"``)."""
    return label == RANDOM or label.startswith(f"{RANDOM}/")


def is_naive(label: str) -> bool:
    """Whether a results label is a naive row (``"naive:<name>"``)."""
    return label.startswith(f"{NAIVE}:")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (``name`` or ``name@stage``) is better."""
    return metric.split("@")[0] not in LOWER_IS_BETTER


@dataclass(frozen=True)
class Comparison:
    """An arm against random init and the best naive row on one ``task/metric`` column, paired by seed.

    Args:
        label: The arm.
        column: ``task/metric``.
        n: Seeds the arm has.
        mean, sd: The arm's mean and standard deviation over seeds.
        vs_random, vs_random_sd: Mean and sd over seeds of (arm - random), signed so that > 0 is better.
        best_naive: The naive row with the best mean on this column (None when there is none).
        vs_naive, vs_naive_sd: Mean and sd over seeds of (arm - that naive row), signed so that > 0 is better.
        gain: The gain rule of the README: both differences are positive and exceed twice their spread (sd over
            seeds). With one seed there is no spread, and without a random or a naive row nothing to beat: no gain.
    """

    label: str
    column: str
    n: int
    mean: float
    sd: float
    vs_random: float | None
    vs_random_sd: float | None
    best_naive: str | None
    vs_naive: float | None
    vs_naive_sd: float | None
    gain: bool


def _paired(arm: dict[int, float], other: dict[int, float], sign: float) -> tuple[float | None, float | None]:
    """Mean and sd of the per-seed differences over the seeds both have (other's mean where it has one seed only,
    e.g. a deterministic naive row)."""
    if not other:
        return None, None
    if len(other) == 1 and len(arm) > 1:
        (value,) = other.values()
        diffs = [sign * (a - value) for a in arm.values()]
    else:
        diffs = [sign * (arm[s] - other[s]) for s in arm if s in other]
    if not diffs:
        return None, None
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else None)


def compare(rows: Sequence[ResultRow]) -> list[Comparison]:
    """Every arm (neither random init nor naive) on every column, against random init and the best naive row.

    Per seed, a label's value on a column is the mean of its rows for that seed (normally one).
    """
    values: dict[tuple[str, str], dict[int, list[float]]] = {}
    for row in rows:
        values.setdefault((row.label, f"{row.task}/{row.metric}"), {}).setdefault(row.seed, []).append(row.value)
    per_seed = {key: {seed: statistics.fmean(v) for seed, v in seeds.items()} for key, seeds in values.items()}
    columns = list(dict.fromkeys(column for _, column in per_seed))
    labels = list(dict.fromkeys(label for label, _ in per_seed))
    out = []
    for column in columns:
        sign = 1.0 if higher_is_better(column.split("/", 1)[1]) else -1.0
        random = per_seed.get((RANDOM, column), {})
        naive = {label: per_seed[(label, column)] for label in labels
                 if is_naive(label) and (label, column) in per_seed}
        best = max(naive, key=lambda label: sign * statistics.fmean(naive[label].values())) if naive else None
        for label in labels:
            if is_baseline(label) or is_naive(label) or (label, column) not in per_seed:
                continue
            arm = per_seed[(label, column)]
            vs_random, vs_random_sd = _paired(arm, random, sign)
            vs_naive, vs_naive_sd = _paired(arm, naive[best], sign) if best else (None, None)
            pairs = ((vs_random, vs_random_sd), (vs_naive, vs_naive_sd))
            gain = len(arm) > 1 and all(d is not None and sd is not None and d > 0 and d > 2 * sd for d, sd in pairs)
            mean = statistics.fmean(arm.values())
            out.append(Comparison(label=label, column=column, n=len(arm), mean=mean,
                                  sd=statistics.stdev(arm.values()) if len(arm) > 1 else 0.0, vs_random=vs_random,
                                  vs_random_sd=vs_random_sd, best_naive=best, vs_naive=vs_naive,
                                  vs_naive_sd=vs_naive_sd, gain=gain))
    return out


def format_comparison(rows: Sequence[ResultRow], digits: int = 4) -> str:
    """A markdown table of :func:`compare`: each arm on each column, its paired differences to random init and to
    the best naive row (mean ± sd over seeds, > 0 is better whatever the metric's direction) and the verdict."""
    comparisons = compare(rows)
    if not comparisons:
        return "(no arm to compare)"

    def diff(d: float | None, sd: float | None) -> str:
        if d is None:
            return "-"
        return f"{d:+.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")

    lines = ["| arm | column | n | mean ± sd | vs random | best naive | vs naive | gain? |",
             "|---|---|---|---|---|---|---|---|"]
    for c in comparisons:
        verdict = "**yes**" if c.gain else ("n/a (1 seed)" if c.n < 2 else "no")
        lines.append(f"| {c.label} | {c.column} | {c.n} | {c.mean:.{digits}f} ± {c.sd:.{digits}f} | "
                     f"{diff(c.vs_random, c.vs_random_sd)} | {c.best_naive or '-'} | "
                     f"{diff(c.vs_naive, c.vs_naive_sd)} | {verdict} |")
    return "\n".join(lines)


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
    atomic_write_text(out / "results.md", format_report(rows) + "\n")
    return out / "results.csv", out / "results.md"


def format_report(rows: Sequence[ResultRow], digits: int = 4) -> str:
    """:func:`format_table`, then, where there are arms to judge, :func:`format_comparison` under a heading."""
    text = format_table(rows, digits)
    if compare(rows):
        text += ("\n\nEach arm against random init and the best naive row (paired by seed, > 0 is better; a gain is "
                 "claimed only where both differences exceed twice their sd):\n\n" + format_comparison(rows, digits))
    return text


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
    difference to the ``"random"`` row's mean in parentheses. Naive rows (``naive:...``) follow the baseline.
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
    naive = [label for label in labels if is_naive(label)]
    labels = baselines + naive + [label for label in labels if label not in baselines and label not in naive]

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


__all__ = ["LOWER_IS_BETTER", "NAIVE", "Comparison", "ResultRow", "compare", "format_comparison", "format_report",
           "format_table", "higher_is_better", "is_baseline", "is_naive", "plot_stage_curve", "read_results",
           "write_results"]
