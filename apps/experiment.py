"""``synth experiment=...``: render once, pretrain every arm for every seed, transfer, one results table.

It composes its own config (``configs/synth_experiment.yaml`` with an ``experiment/`` file), then runs the
``synth render`` app and the pretrain and transfer jobs with overrides derived from it, so every stage is exactly
what the single-stage commands would run, and each stage's output is reused on a rerun (a render resumes by shard, a
pretraining run by checkpoint, a finished transfer by its completion mark).
"""

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from adapt.transfer import ResultRow, format_table, read_results, write_results
from apps.launch import UsageError, checked, compose, run_hydra
from apps.pretrain import build_engine
from apps.render import command as render_command
from apps.transfer import check_config as check_transfer
from apps.transfer import transfer_job
from synth.io import atomic_write_json, atomic_write_text
from synth.plots import save_figure


@dataclass
class ExperimentApp:
    """``synth experiment=NAME``: arms x seeds at one budget, then one table.

    Args:
        name: The experiment's name (its ``configs/experiment/`` file).
        render: ``synth render`` overrides of the shared dataset.
        arms: ``{arm: synth pretrain overrides}``; null means no pretraining (random initialisation).
        seeds: Each arm is pretrained and transferred once per seed.
        pretrain: ``synth pretrain`` overrides shared by every arm (the budget).
        transfer: ``synth transfer`` overrides shared by every arm.
        out_dir: Everything goes here; a rerun skips what is done.
    """

    name: str = "experiment"
    render: list[str] = field(default_factory=list)
    arms: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain: list[str] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)
    out_dir: str = "runs/experiment"


ConfigStore.instance().store(name="experiment_app_schema", node=ExperimentApp)


# ------------------------------------------------------------------------------------------------ experiments


def _summary_rows(summary: dict, label: str, seed: int) -> list[ResultRow]:
    """The measured domain gap and probe of a pretraining run, as result rows (task ``gap`` / ``probe``)."""
    rows = []
    for key, value in summary.get("monitors", {}).items():
        parts = key.split("/")  # gap/<stage>/<metric> or probe/knn_acc/<stage>
        if parts[0] == "gap":
            rows.append(ResultRow(checkpoint=label, label=label, task="gap", metric=f"{parts[2]}@{parts[1]}",
                                  value=value, seed=seed, budget="pretrain", wall_s=0.0))
        elif parts[0] == "probe":
            rows.append(ResultRow(checkpoint=label, label=label, task="knn_probe", metric=f"acc@{parts[2]}",
                                  value=value, seed=seed, budget="pretrain", wall_s=0.0))
    return rows


def bar_chart(rows: list[ResultRow], path: Path, columns: list[str]) -> Path:
    """Grouped bars (mean ± std over seeds) of each arm on each ``task/metric`` column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = list(dict.fromkeys(r.label for r in rows))
    fig, axes = plt.subplots(1, len(columns), figsize=(3.2 * len(columns), 3.6), squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        means, stds = [], []
        for label in labels:
            values = [r.value for r in rows if r.label == label and f"{r.task}/{r.metric}" == column]
            means.append(statistics.fmean(values) if values else np.nan)
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        ax.bar(range(len(labels)), means, yerr=stds, color=["0.6" if lb == "random" else "C0" for lb in labels],
               capsize=2)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(column, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def headline_rows(rows: list[ResultRow]) -> list[ResultRow]:
    """The rows of the summary table: per-stage metrics at the last stage only, the gap as classifier accuracy and
    RBF MMD (``results_full.md`` and ``results.csv`` keep every stage and measure)."""
    stages = [r.metric.split("@")[1] for r in rows if r.task == "linear_probe" and "@" in r.metric]
    stages = stages or [r.metric.split("@")[1] for r in rows if "@" in r.metric]
    last = stages[-1] if stages else None
    keep = []
    for row in rows:
        metric, _, stage = row.metric.partition("@")
        if stage and stage != last:
            continue
        if row.task == "gap" and metric not in ("domain_acc", "mmd_rbf"):
            continue
        keep.append(row)
    return keep


def run_experiment(cfg: DictConfig) -> list[ResultRow]:
    """Render once, pretrain every arm for every seed, transfer all of a seed's checkpoints together, tabulate."""
    out = Path(cfg.out_dir)
    data = out / "data"
    tic = time.perf_counter()
    render_command([f"out_dir={data}", *cfg.render])
    rows: list[ResultRow] = []
    for seed in cfg.seeds:
        checkpoints = {}
        for arm, overrides in cfg.arms.items():
            if overrides is None:
                continue  # random initialisation: the transfer baseline
            run = out / "pretrain" / arm / f"seed{seed}"
            summary_path = run / "summary.json"
            if not summary_path.exists():
                print(f"\n== pretrain {arm} (seed {seed}) -> {run}")
                build_engine(compose("synth_pretrain", [f"data.roots=[{data}]", f"out_dir={run}",
                                                        f"trainer.seed={seed}", *cfg.pretrain, *overrides])).fit()
            rows += _summary_rows(json.loads(summary_path.read_text()), arm, seed)
            checkpoints[arm] = str(run)
        results = out / "transfer" / f"seed{seed}"
        done = results / "complete.json"  # results.csv is rewritten after each checkpoint: not a completion mark
        if not done.exists():
            print(f"\n== transfer seed {seed}: {', '.join(['random', *checkpoints])}")
            transfer_job(compose("synth_transfer", [f"out_dir={results}", f"seed={seed}", *cfg.transfer,
                                                    *(f"+checkpoints.{k}={v}" for k, v in checkpoints.items())]))
            atomic_write_json(done, {"checkpoints": checkpoints})
        rows += read_results(results / "results.csv")
    write_results(rows, out)  # every number: every stage, every gap measure
    atomic_write_text(out / "results_full.md", format_table(rows) + "\n")
    headline = headline_rows(rows)
    table = format_table(headline)
    bar_chart(headline, out / "ablation.png", list(dict.fromkeys(f"{r.task}/{r.metric}" for r in headline)))
    minutes = (time.perf_counter() - tic) / 60
    header = (f"# {cfg.name}: {len(cfg.arms)} arms x {len(cfg.seeds)} seeds (mean ± sd over seeds; in brackets the "
              f"difference to random init)\n\nwall time of this invocation: {minutes:.1f} min\n\n")
    atomic_write_text(out / "results.md", header + table + "\n")
    print(f"\n{header}{table}\n\nwritten: {out / 'results.md'}, {out / 'results.csv'}, {out / 'ablation.png'}")
    return rows


def check_experiment(cfg: DictConfig) -> None:
    """Compose every arm's pretraining config and the transfer config (a typo fails before any work)."""
    for overrides in cfg.arms.values():
        if overrides is not None:
            compose("synth_pretrain", [f"data.roots=[{Path(cfg.out_dir) / 'data'}]", *cfg.pretrain, *overrides])
    check_transfer(compose("synth_transfer", list(cfg.transfer)))
    if not cfg.seeds:
        raise ValueError("seeds is empty")


def command(args: list[str]) -> None:
    """``synth experiment=ablation``: every arm x seed pretrained and transferred at one budget, one table."""
    cfg = checked("synth_experiment", args, check_experiment)
    if cfg is None:
        run_hydra("synth_experiment", lambda c: print(c), args)
        return
    if not cfg.arms:
        raise UsageError("no arms: pick an experiment, e.g. synth experiment=ablation")
    run_experiment(cfg)


__all__ = ["ExperimentApp", "bar_chart", "check_experiment", "command", "headline_rows", "run_experiment"]
