"""`synth demo` end to end at the smallest scale, and the experiment runner's table and chart."""

import csv

import cv2
import pytest

from adapt.transfer import ResultRow
from apps.cli import main
from apps.demo import demo_overrides
from apps.experiment import bar_chart, check_experiment
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


@pytest.mark.parametrize("name", ["ablation", "ablation_gpu", "smoke"])
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
