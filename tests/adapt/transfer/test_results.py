"""adapt.transfer.results: the results file round trip, the table (random baseline first) and the stage plot."""

import statistics

import matplotlib.image
import pytest

from adapt.transfer import RANDOM, ResultRow, format_table, plot_stage_curve, read_results, write_results
from adapt.transfer.results import compare, format_comparison, higher_is_better


def test_results_round_trip_and_table(tmp_path):
    rows = [ResultRow("random", RANDOM, "detection", "mAP", 0.125, 0, "steps=10", 1.5),
            ResultRow("runs/a/last.pt", "synthetic", "detection", "mAP", 0.25, 0, "steps=10", 1.25),
            ResultRow("runs/a/last.pt", "synthetic", "detection", "mAP", 0.35, 1, "steps=10", 1.0),
            ResultRow("runs/a/last.pt", "synthetic", "segmentation", "mIoU", 1 / 3, 0, "steps=10", 2.0)]
    csv_path, md_path = write_results(rows, tmp_path)
    assert read_results(csv_path) == rows
    table = md_path.read_text()
    assert table.startswith("| checkpoint | detection/mAP | segmentation/mIoU |")
    lines = table.splitlines()
    assert lines[2].startswith("| random | 0.1250 | - |")
    # Mean of the two seeds, their sd, and the difference to the baseline.
    assert "| synthetic | 0.3000 ± 0.0707 (n=2) (+0.1750) | 0.3333 |" in lines[3]
    assert table.startswith(format_table(rows))
    assert not list(tmp_path.glob(".tmp-*"))


def test_comparison_pairs_seeds_and_claims_a_gain_only_beyond_twice_the_spread():
    def row(label, metric, value, seed, task="detection"):
        return ResultRow("x", label, task, metric, value, seed, "", 0.0)

    rows = [row(RANDOM, "mAP", 0.10, 0), row(RANDOM, "mAP", 0.12, 1), row(RANDOM, "mAP", 0.14, 2),
            row("naive:prior_boxes", "mAP", 0.05, 0), row("naive:prior_boxes", "mAP", 0.05, 1),
            row("naive:prior_boxes", "mAP", 0.05, 2),
            row("arm", "mAP", 0.20, 0), row("arm", "mAP", 0.23, 1), row("arm", "mAP", 0.23, 2),
            row("noisy", "mAP", 0.10, 0), row("noisy", "mAP", 0.30, 1), row("noisy", "mAP", 0.14, 2),
            # lower is better: an arm whose abs_rel is below the ramp's gains
            row(RANDOM, "abs_rel", 0.40, 0, "depth_zero_shot"), row(RANDOM, "abs_rel", 0.42, 1, "depth_zero_shot"),
            row("naive:ramp", "abs_rel", 0.22, 0, "depth_zero_shot"),
            row("naive:ramp", "abs_rel", 0.22, 1, "depth_zero_shot"),
            row("arm", "abs_rel", 0.23, 0, "depth_zero_shot"), row("arm", "abs_rel", 0.21, 1, "depth_zero_shot")]
    by = {(c.label, c.column): c for c in compare(rows)}
    arm = by[("arm", "detection/mAP")]
    # Paired differences by seed: (0.10, 0.11, 0.09) -> mean 0.10, sd 0.01; vs naive: (0.15, 0.18, 0.18).
    assert arm.vs_random == pytest.approx(0.10) and arm.vs_random_sd == pytest.approx(0.01)
    assert arm.best_naive == "naive:prior_boxes" and arm.vs_naive == pytest.approx(0.17)
    assert arm.vs_naive_sd == pytest.approx(statistics.stdev([0.15, 0.18, 0.18])) and arm.gain
    noisy = by[("noisy", "detection/mAP")]  # differences (0, 0.18, 0): mean 0.06 < 2 sd
    assert noisy.vs_random == pytest.approx(0.06) and not noisy.gain
    depth = by[("arm", "depth_zero_shot/abs_rel")]  # signed so > 0 is better: random - arm = (0.17, 0.21)
    assert depth.vs_random == pytest.approx(0.19) and depth.vs_naive == pytest.approx(0.0) and not depth.gain
    assert not higher_is_better("abs_rel@layer4") and higher_is_better("mAP")
    text = format_comparison(rows)
    assert "| arm | detection/mAP | 3 |" in text and "**yes**" in text


def test_stage_curve_png(tmp_path):
    path = plot_stage_curve({RANDOM: {"stem": 0.3, "layer1": 0.4}, "ours": {"stem": 0.5, "layer1": 0.7}},
                            tmp_path / "curve.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100

