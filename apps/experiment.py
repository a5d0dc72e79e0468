"""``synth experiment=...``: render, pretrain every arm for every seed, transfer, one results table and curves.

It composes its own config (``configs/synth_experiment.yaml`` with an ``experiment/`` file), then runs the
``synth render`` app (the main dataset and any named extra ``datasets``), the ``stages`` (other ``synth`` commands,
e.g. training and applying an image translator), and the pretrain and transfer jobs with overrides derived from
it, so every stage is exactly what the single-stage commands would run, and each stage's output is reused on a rerun
(a render resumes by shard, a pretraining run by checkpoint, a finished transfer by its completion mark).

In arm, stage and dataset overrides, ``{out}`` is the experiment folder, ``{data}`` the main dataset and
``{data:NAME}`` the extra dataset ``NAME``. Every table holds random init and the naive rows, and ``results.md``
judges each arm against both (paired by seed; a gain only beyond twice the spread). ``curves`` adds the main metric
against pretraining steps and against rendered frames, for one arm, with the spread over seeds (``curves.png``).
"""

import importlib
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from adapt.transfer import ResultRow, format_comparison, format_table, read_results, write_results
from adapt.transfer.results import compare, higher_is_better, is_baseline, is_naive
from apps.launch import UsageError, checked, compose, run_hydra
from apps.pretrain import build_engine
from apps.render import command as render_command
from apps.transfer import check_config as check_transfer
from apps.transfer import transfer_job
from synth.io import atomic_write_json, atomic_write_text
from synth.plots import save_figure


@dataclass
class CurveSettings:
    """Scaling curves of one arm on one metric (``curves.png``, ``curves.md``).

    Args:
        arm: The arm whose budget is varied (its overrides, then ``trainer.steps=N`` or ``data.max_frames=N``).
        metric: The ``task/metric`` column plotted (e.g. ``finetune/accuracy@0.1``).
        steps: Pretraining steps, log-spaced (0 is random init: the curve's first point).
        frames: Rendered training frames.
        transfer: ``synth transfer`` overrides of the curve points (e.g. only the task of ``metric``), after the
            experiment's own.
    """

    arm: str = "synthetic"
    metric: str = "linear_probe/acc@layer4"
    steps: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)


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
        datasets: ``{name: synth render overrides}``: extra datasets (e.g. a realistic scene family), rendered into
            ``{out}/data_<name>`` and named ``{data:<name>}`` in overrides.
        stages: ``{name: [command, key=value, ...]}``: other ``synth`` commands run once, in order, after rendering
            and before pretraining (e.g. ``adapt-images`` to train a translator and write a translated dataset).
        curves: Scaling curves (:class:`CurveSettings`); null for none.
        out_dir: Everything goes here; a rerun skips what is done.
        report_only: Tabulate the seeds that are complete (every arm pretrained and transferred) and run nothing:
            the tables of a long experiment that is still running, or was stopped, without waiting for it.
        merge: Output folders (or copies of their ``results.csv`` and ``curves/results.csv``) of the same experiment
            run elsewhere, e.g. one seed per machine: their seeds that are not in ``seeds`` join the tables (and their
            curve rows, unless ``curves`` is null). The arms and budget must be the same; nothing checks that beyond
            the arm names in the table.
    """

    name: str = "experiment"
    render: list[str] = field(default_factory=list)
    arms: dict[str, Any] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    pretrain: list[str] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)
    datasets: dict[str, list[str]] = field(default_factory=dict)
    stages: dict[str, list[str]] = field(default_factory=dict)
    curves: CurveSettings | None = None
    out_dir: str = "runs/experiment"
    report_only: bool = False
    merge: list[str] = field(default_factory=list)


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
    stages = stages or [r.metric.split("@")[1] for r in rows if r.task in ("knn_probe", "gap") and "@" in r.metric]
    last = stages[-1] if stages else None
    keep = []
    for row in rows:
        metric, _, stage = row.metric.partition("@")
        if stage in stages and stage != last:  # not ``accuracy@0.1``: a label fraction, not a stage
            continue
        if row.task == "gap" and metric not in ("domain_acc", "mmd_rbf"):
            continue
        keep.append(row)
    return keep


def _expand(overrides, out: Path) -> list[str]:
    """``{out}``, ``{data}`` and ``{data:NAME}`` replaced by the experiment's folders."""
    def one(text: str) -> str:
        text = str(text).replace("{out}", str(out)).replace("{data}", str(out / "data"))
        while "{data:" in text:
            start = text.index("{data:")
            end = text.index("}", start)
            text = text[:start] + str(out / f"data_{text[start + 6:end]}") + text[end + 1:]
        return text

    return [one(o) for o in (overrides or [])]


def _curve_arms(cfg: DictConfig) -> dict[str, list[str]]:
    """The arms of the scaling curves: the curve arm at each step budget and each frame count."""
    if cfg.curves is None:
        return {}
    base = list(cfg.arms[cfg.curves.arm])
    arms = {f"{cfg.curves.arm}_steps{n}": [*base, f"trainer.steps={n}"] for n in cfg.curves.steps if n > 0}
    arms |= {f"{cfg.curves.arm}_frames{n}": [*base, f"data.max_frames={n}"] for n in cfg.curves.frames}
    return arms


def _pretrain(out: Path, arm: str, seed: int, overrides: list[str], cfg: DictConfig) -> tuple[str, dict]:
    run = out / "pretrain" / arm / f"seed{seed}"
    summary_path = run / "summary.json"
    if not summary_path.exists():
        print(f"\n== pretrain {arm} (seed {seed}) -> {run}")
        build_engine(compose("synth_pretrain", [f"data.roots=[{out / 'data'}]", f"out_dir={run}",
                                                f"trainer.seed={seed}", *_expand(cfg.pretrain, out),
                                                *_expand(overrides, out)])).fit()
    return str(run), json.loads(summary_path.read_text())


def _transfer(results: Path, seed: int, checkpoints: dict, overrides: list[str]) -> list[ResultRow]:
    done = results / "complete.json"  # results.csv is rewritten after each checkpoint: not a completion mark
    if not done.exists():
        print(f"\n== transfer seed {seed}: {', '.join(['random', *checkpoints])}")
        transfer_job(compose("synth_transfer", [f"out_dir={results}", f"seed={seed}", *overrides,
                                                *(f"+checkpoints.{k}={v}" for k, v in checkpoints.items())]))
        atomic_write_json(done, {"checkpoints": checkpoints})
    return read_results(results / "results.csv")


def prepare(cfg: DictConfig) -> None:
    """Render the main and extra datasets, then run the stages (each once: a completion mark per stage)."""
    out = Path(cfg.out_dir)
    render_command([f"out_dir={out / 'data'}", *_expand(cfg.render, out)])
    for name, overrides in cfg.datasets.items():
        render_command([f"out_dir={out / f'data_{name}'}", *_expand(overrides, out)])
    for name, stage in cfg.stages.items():
        mark = out / "stages" / f"{name}.done"
        if mark.exists():
            continue
        command, *args = _expand(stage, out)
        print(f"\n== stage {name}: synth {command} {' '.join(args)}")
        if command not in STAGE_COMMANDS:
            raise ValueError(f"stages.{name}: unknown command {command!r}; expected one of {sorted(STAGE_COMMANDS)}")
        importlib.import_module(STAGE_COMMANDS[command]).command(args)
        mark.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mark, " ".join(stage) + "\n")


#: Commands a stage may run (the CLI's, less those that would recurse).
STAGE_COMMANDS = {"render": "apps.render", "pretrain": "apps.pretrain", "transfer": "apps.transfer",
                  "adapt-images": "apps.adapt_images", "pack": "apps.pack"}


def _seed_done(out: Path, seed: int, cfg: DictConfig) -> bool:
    """Whether every arm of ``seed`` is pretrained and its transfer (and curves, if any) complete."""
    pretrained = all((out / "pretrain" / arm / f"seed{seed}" / "summary.json").exists()
                     for arm, overrides in cfg.arms.items() if overrides is not None)
    curves = not _curve_arms(cfg) or (out / "curves" / f"seed{seed}" / "complete.json").exists()
    return pretrained and curves and (out / "transfer" / f"seed{seed}" / "complete.json").exists()


def merged_results(cfg: DictConfig) -> tuple[list[ResultRow], list[ResultRow], list[int]]:
    """The rows and curve rows of ``cfg.merge``'s folders for the seeds that ``cfg.seeds`` does not run here."""
    rows: list[ResultRow] = []
    curve_rows: list[ResultRow] = []
    for folder in map(Path, cfg.merge):
        if not (folder / "results.csv").is_file():
            raise UsageError(f"merge: {folder} has no results.csv")
        rows += read_results(folder / "results.csv")
        if cfg.curves is not None and (folder / "curves" / "results.csv").is_file():
            curve_rows += read_results(folder / "curves" / "results.csv")
    seeds = sorted({r.seed for r in rows} - set(cfg.seeds))
    return [r for r in rows if r.seed in seeds], [r for r in curve_rows if r.seed in seeds], seeds


def run_experiment(cfg: DictConfig) -> list[ResultRow]:
    """Render, run the stages, pretrain every arm for every seed, transfer all of a seed's checkpoints together
    (with random init and the naive rows), tabulate, judge every arm, and draw the curves.

    The tables are rewritten after each seed, so a stopped experiment leaves the tables of the seeds it finished;
    ``report_only`` tabulates the finished seeds and runs nothing.
    """
    out = Path(cfg.out_dir)
    tic = time.perf_counter()
    if not cfg.report_only:
        prepare(cfg)
    rows, curve_rows, seeds = merged_results(cfg)
    for seed in cfg.seeds:
        if cfg.report_only and not _seed_done(out, seed, cfg):
            continue
        checkpoints = {}
        for arm, overrides in cfg.arms.items():
            if overrides is None:
                continue  # random initialisation: the transfer baseline
            checkpoints[arm], summary = _pretrain(out, arm, seed, overrides, cfg)
            rows += _summary_rows(summary, arm, seed)
        rows += _transfer(out / "transfer" / f"seed{seed}", seed, checkpoints, _expand(cfg.transfer, out))
        curve_points = {arm: _pretrain(out, arm, seed, overrides, cfg)[0]
                        for arm, overrides in _curve_arms(cfg).items()}
        if curve_points:
            curve_rows += _transfer(out / "curves" / f"seed{seed}", seed, curve_points,
                                    [*_expand(cfg.transfer, out), *_expand(cfg.curves.transfer, out)])
        seeds.append(seed)
        report(cfg, rows, curve_rows, sorted(seeds), minutes=(time.perf_counter() - tic) / 60)
    if not seeds:
        raise UsageError(f"{out}: no seed is complete yet (report_only=true tabulates finished seeds only)")
    if not set(seeds) & set(cfg.seeds):  # only merged seeds (none run or finished here): their tables
        report(cfg, rows, curve_rows, sorted(seeds), minutes=(time.perf_counter() - tic) / 60)
    return rows + curve_rows


def report(cfg: DictConfig, rows: list[ResultRow], curve_rows: list[ResultRow], seeds: list[int], *,
           minutes: float) -> None:
    """Write ``results.md`` / ``results.csv`` / ``results_full.md`` / ``ablation.png`` (and ``curves.png``) of the
    ``seeds`` done so far, and print the table."""
    out = Path(cfg.out_dir)
    write_results(rows, out)  # every number: every stage, every gap measure
    atomic_write_text(out / "results_full.md", format_table(rows) + "\n")
    headline = headline_rows(rows)
    table = format_table(headline)
    bar_chart(headline, out / "ablation.png", list(dict.fromkeys(f"{r.task}/{r.metric}" for r in headline)))
    pending = [s for s in cfg.seeds if s not in seeds]
    header = (f"# {cfg.name}: {len(cfg.arms)} arms x {len(seeds)} seeds {seeds} (mean ± sd over seeds; in brackets "
              f"the difference to random init)\n\n"
              + (f"**incomplete: seeds {pending} not done yet**\n\n" if pending else "")
              + f"wall time of this invocation: {minutes:.1f} min\n\n")
    transfer_rows = [r for r in headline if r.task not in ("gap", "knn_probe")]  # measured in pretraining
    verdicts = compare(transfer_rows)
    judged = ("\n\nEach arm against random init and the best naive row, paired by seed (> 0 is better; a gain "
              "only where both differences exceed twice their sd):\n\n" + format_comparison(transfer_rows)
              + f"\n\ngains: {sum(c.gain for c in verdicts)} of {len(verdicts)} arm x column cells")
    atomic_write_text(out / "results.md", header + table + judged + "\n")
    written = [out / "results.md", out / "results.csv", out / "ablation.png"]
    if curve_rows:
        write_results(curve_rows, out / "curves")
        written += [plot_curves(cfg, rows + curve_rows, out / "curves.png")]
    print(f"\n{header}{table}{judged}\n\nwritten: {', '.join(map(str, written))}")


def curve_points(cfg: DictConfig, rows: list[ResultRow], kind: str) -> list[tuple[int, list[float]]]:
    """``[(x, [value per seed]), ...]`` of the curve arm on ``cfg.curves.metric``: x pretraining steps (0 = random
    init, the full budget = the arm itself) or training frames (the main dataset's ``n_frames`` = the arm
    itself)."""
    column = cfg.curves.metric
    arm = cfg.curves.arm

    def values(label: str) -> list[float]:  # one per seed (random init is also in the curves' own transfer)
        return list({r.seed: r.value for r in rows if r.label == label and f"{r.task}/{r.metric}" == column}.values())

    points = []
    if kind == "steps":
        points.append((0, values("random")))
        points += [(n, values(f"{arm}_steps{n}")) for n in cfg.curves.steps if n > 0]
        full = next((o for o in [*cfg.pretrain, *cfg.arms[arm]] if str(o).startswith("trainer.steps=")), None)
        if full is not None:
            points.append((int(str(full).split("=")[1]), values(arm)))
    else:
        points += [(n, values(f"{arm}_frames{n}")) for n in cfg.curves.frames]
        # The arm itself is the point at the whole main dataset (unless it trains on another dataset).
        full = next((o for o in cfg.render if str(o).startswith("n_frames=")), None)
        if full is not None and not any(str(o).startswith("data.roots=") for o in cfg.arms[arm]):
            points.append((int(str(full).split("=")[1]), values(arm)))
    return sorted((x, v) for x, v in points if v)


def plot_curves(cfg: DictConfig, rows: list[ResultRow], path: Path) -> Path:
    """Two panels: the main metric against pretraining steps and against rendered frames (mean ± sd over seeds),
    with random init and the best naive row as horizontal bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column = cfg.curves.metric
    sign = 1.0 if higher_is_better(column.split("/", 1)[1]) else -1.0
    naive = {r.label for r in rows if is_naive(r.label) and f"{r.task}/{r.metric}" == column}
    best = max(naive, key=lambda label: sign * statistics.fmean(
        r.value for r in rows if r.label == label and f"{r.task}/{r.metric}" == column), default=None)
    def per_seed(keep) -> list[float]:
        return list({r.seed: r.value for r in rows if keep(r.label) and f"{r.task}/{r.metric}" == column}.values())

    references = {"random init": per_seed(is_baseline)}
    if best:
        references[best] = per_seed(lambda label: label == best)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, kind, xlabel in zip(axes, ("steps", "frames"), ("pretraining steps", "rendered training frames"),
                                strict=True):
        points = curve_points(cfg, rows, kind)
        for (name, values), colour in zip(references.items(), ("0.5", "C3"), strict=False):
            if values:
                mean, sd = statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
                ax.axhline(mean, color=colour, linestyle="--", label=name)
                ax.axhspan(mean - sd, mean + sd, color=colour, alpha=0.15)
        if points:
            xs = [x for x, _ in points]
            means = [statistics.fmean(v) for _, v in points]
            sds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
            ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, color="C0", label=cfg.curves.arm)
            if len(xs) > 1 and max(xs) >= 10 * max(1, min(x for x in xs if x > 0) if any(xs) else 1):
                ax.set_xscale("symlog", linthresh=max(1, min((x for x in xs if x > 0), default=1)))  # 0 included
        ax.set_xlabel(xlabel)
        ax.set_ylabel(column)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def check_experiment(cfg: DictConfig) -> None:
    """Compose every arm's pretraining config and the transfer config (a typo fails before any work)."""
    out = Path(cfg.out_dir)
    if cfg.curves is not None and cfg.curves.arm not in cfg.arms:
        raise ValueError(f"curves.arm={cfg.curves.arm!r} is not an arm; expected one of {sorted(cfg.arms)}")
    if cfg.curves is not None and (cfg.arms[cfg.curves.arm] is None or any(n < 0 for n in cfg.curves.steps)
                                   or any(n < 1 for n in cfg.curves.frames)):
        raise ValueError("curves: the arm must be pretrained, steps >= 0 and frames >= 1")
    for name, stage in cfg.stages.items():
        if not stage or stage[0] not in STAGE_COMMANDS:
            raise ValueError(f"stages.{name}: expected [command, key=value, ...] with a command among "
                             f"{sorted(STAGE_COMMANDS)}, got {list(stage)}")
    for overrides in [*cfg.arms.values(), *_curve_arms(cfg).values()]:
        if overrides is not None:
            compose("synth_pretrain", [f"data.roots=[{out / 'data'}]", *_expand(cfg.pretrain, out),
                                       *_expand(overrides, out)])
    check_transfer(compose("synth_transfer", _expand(cfg.transfer, out)))
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
