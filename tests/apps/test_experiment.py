"""`synth demo` end to end at the smallest scale, and the experiment runner's table and chart."""

import csv
import shutil
import statistics

import cv2
import pytest

from adapt.transfer import ResultRow, compare, read_results
from apps.cli import main
from apps.demo import demo_overrides
from apps.experiment import bar_chart, check_experiment, curve_points, headline_rows
from apps.launch import compose


@pytest.mark.slow
def test_demo_writes_every_artefact_and_a_table_with_every_row(tmp_path, monkeypatch, capsys):
    """Render -> pretrain (heads + rotation + SimCLR + feature GAN) -> transfer (probe + detection), tiny."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", f"out_dir={out}", "demo.frames=8", "demo.pretrain_steps=3", "demo.batch_size=4",
                 "demo.detection_steps=2", "demo.probe_images=100", "demo.cutpaste_images=24"]) == 0
    printed = capsys.readouterr().out
    for picture in ["data/preview.png", "pretrain/loss_curves.png", "pretrain/embeddings/embedding.png",
                    "transfer/linear_probe_stages.png"]:
        image = cv2.imread(str(out / picture))
        assert image is not None and image.size > 0, picture
    assert list((out / "pretrain" / "tensorboard").glob("events.out.tfevents.*"))
    assert list((out / "pretrain" / "pictures").glob("step_*.png"))
    table = (out / "transfer" / "results.md").read_text()
    assert "| random |" in table and "| pretrained |" in table
    for column in ["linear_probe/acc@layer4", "detection/mAP", "detection/AP50"]:
        assert column in table
    assert table.splitlines()[0] in printed  # the table is printed, not only written
    with open(out / "transfer" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # The naive rows stand beside random init: majority class and raw pixels for the probe, prior boxes.
    assert {r["label"] for r in rows} == {"random", "pretrained", "naive:majority", "naive:raw_pixels",
                                          "naive:prior_boxes"}
    assert "| naive:raw_pixels |" in table and "| naive:raw_pixels |" in printed
    assert all(0.0 <= float(r["value"]) <= 1.0 for r in rows)


def test_demo_scale_multiplies_the_budget():
    cfg = compose("synth_demo", ["demo.scale=4"])
    stages = demo_overrides(cfg)
    assert "n_frames=96" in stages["render"]
    assert "trainer.steps=400" in stages["pretrain"]
    assert "budget.detection.steps=240" in stages["transfer"]


def test_demo_rejects_a_bad_key_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "demo.frmes=8"]) == 2
    err = capsys.readouterr().err
    assert "frmes" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_experiment_arms_compose_and_bad_arm_override_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = compose("synth_experiment", ["experiment=ablation"])
    assert cfg.arms["random"] is None and len(cfg.seeds) >= 3
    for arm in ["synthetic", "synthetic_gan", "rotation", "jigsaw", "relpos", "colorization", "inpainting", "simclr",
                "all"]:
        assert arm in cfg.arms
    assert main(["experiment=ablation", "pretrain=[trainer.stepz=3]"]) == 2
    assert "stepz" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["ablation", "ablation_gpu", "smoke", "proof", "proof_gpu", "realistic"])
def test_every_shipped_experiment_passes_its_check(name):
    # Composes every arm's pretraining config and the transfer config, as `synth experiment=NAME` does first.
    cfg = compose("synth_experiment", [f"experiment={name}"])
    check_experiment(cfg)
    assert cfg.name == name


def test_bar_chart_has_mean_and_spread_over_seeds(tmp_path):
    rows = [ResultRow(checkpoint=label, label=label, task="detection", metric="mAP", value=v, seed=s, budget="b",
                      wall_s=0.0)
            for label, values in {"random": [0.1, 0.2, 0.15], "all": [0.3, 0.35, 0.25]}.items()
            for s, v in enumerate(values)]
    path = bar_chart(rows, tmp_path / "chart.png", ["detection/mAP"])
    assert cv2.imread(str(path)) is not None


def test_headline_keeps_the_last_probe_stage_and_every_label_fraction():
    def row(task, metric):
        return ResultRow(checkpoint="random", label="random", task=task, metric=metric, value=0.5, seed=0,
                         budget="", wall_s=0.0)

    rows = [row("linear_probe", "acc@layer3"), row("linear_probe", "acc@layer4"), row("finetune", "accuracy@0.1"),
            row("finetune", "accuracy@1"), row("gap", "mmd_rbf@layer3"), row("gap", "mmd_rbf@layer4"),
            row("gap", "pad@layer4"), row("depth_zero_shot", "abs_rel")]
    kept = [f"{r.task}/{r.metric}" for r in headline_rows(rows)]
    assert kept == ["linear_probe/acc@layer4", "finetune/accuracy@0.1", "finetune/accuracy@1",
                    "gap/mmd_rbf@layer4", "depth_zero_shot/abs_rel"]


@pytest.mark.slow
def test_smoke_experiment_end_to_end_and_its_statistics(tmp_path, monkeypatch):
    """`synth experiment=smoke`: two datasets, a translator stage, 3 arms x 2 seeds, both curves; every artefact,
    and the judged statistics equal a recomputation from results.csv."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "smoke"
    assert main(["experiment=smoke", f"out_dir={out}"]) == 0
    for artefact in ["results.md", "results.csv", "results_full.md", "ablation.png", "curves.png",
                     "curves/results.csv", "data_translated/dataset.json", "stages/translated.done"]:
        assert (out / artefact).exists(), artefact
    rows = read_results(out / "results.csv")
    labels = {r.label for r in rows}
    assert {"random", "synthetic", "rotation_gan", "translated", "naive:ramp", "naive:raw_pixels"} <= labels
    assert {r.seed for r in rows} == {0, 1}

    # Recompute the depth comparison of one arm by hand from the csv: mean, sd, paired differences.
    def value(label, seed):
        (v,) = [r.value for r in rows if r.label == label and r.seed == seed and r.task == "depth_zero_shot"
                and r.metric == "abs_rel"]
        return v

    arm = [value("synthetic", s) for s in (0, 1)]
    vs_random = [value("random", s) - a for s, a in zip((0, 1), arm, strict=True)]  # lower is better: flipped
    vs_ramp = [value("naive:ramp", s) - a for s, a in zip((0, 1), arm, strict=True)]
    (judged,) = [c for c in compare(headline_rows(rows))
                 if c.label == "synthetic" and c.column == "depth_zero_shot/abs_rel"]
    assert judged.mean == pytest.approx(statistics.fmean(arm)) and judged.sd == pytest.approx(statistics.stdev(arm))
    assert judged.vs_random == pytest.approx(statistics.fmean(vs_random))
    assert judged.vs_random_sd == pytest.approx(statistics.stdev(vs_random))
    assert judged.best_naive == "naive:ramp" and judged.vs_naive == pytest.approx(statistics.fmean(vs_ramp))
    assert judged.gain == (all(d > 0 for d in (judged.vs_random, judged.vs_naive))
                           and judged.vs_random > 2 * judged.vs_random_sd and judged.vs_naive > 2 * judged.vs_naive_sd)
    text = (out / "results.md").read_text()
    assert "| synthetic | depth_zero_shot/abs_rel | 2 |" in text and "gains:" in text
    # The curve points: steps (0 = random, 1, 3 = the arm) and frames (2), each over both seeds.
    cfg = compose("synth_experiment", ["experiment=smoke", f"out_dir={out}"])
    curve_rows = rows + read_results(out / "curves" / "results.csv")
    assert [x for x, _ in curve_points(cfg, curve_rows, "steps")] == [0, 1, 3]
    assert all(len(v) == 2 for _, v in curve_points(cfg, curve_rows, "steps"))
    assert [x for x, _ in curve_points(cfg, curve_rows, "frames")] == [2, 8]  # 8: the arm on the whole dataset
    # A rerun finds everything done.
    assert main(["experiment=smoke", f"out_dir={out}"]) == 0
    assert "incomplete" not in text
    # A copy of the tables, as another machine that ran seed 1 would hand them over (merge, below).
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "curves").mkdir(parents=True)
    shutil.copy(out / "results.csv", elsewhere / "results.csv")
    shutil.copy(out / "curves" / "results.csv", elsewhere / "curves" / "results.csv")
    # report_only tabulates the finished seeds and trains nothing: seed 1 made unfinished, its rows are left out.
    (out / "transfer" / "seed1" / "complete.json").unlink()
    before = sorted(p for p in out.rglob("*") if p.is_file() and "results" not in p.name and p.suffix != ".png")
    assert main(["experiment=smoke", f"out_dir={out}", "report_only=true"]) == 0
    assert sorted(p for p in out.rglob("*") if p.is_file() and "results" not in p.name
                  and p.suffix != ".png") == before
    assert {r.seed for r in read_results(out / "results.csv")} == {0}
    assert "incomplete: seeds [1] not done yet" in (out / "results.md").read_text()
    # merge: seed 1's rows from the copy join seed 0's, the same table as the run that did both.
    assert main(["experiment=smoke", f"out_dir={out}", "report_only=true", "seeds=[0]", f"merge=[{elsewhere}]"]) == 0
    merged = (out / "results.md").read_text()
    assert "2 seeds [0, 1]" in merged and "incomplete" not in merged
    assert merged.split("wall time")[1].split("\n", 1)[1] == text.split("wall time")[1].split("\n", 1)[1]
    assert {r.seed for r in read_results(out / "curves" / "results.csv")} == {0, 1}
    assert main(["experiment=smoke", f"out_dir={out}", "report_only=true", f"merge=[{tmp_path / 'nothing'}]"]) == 2
