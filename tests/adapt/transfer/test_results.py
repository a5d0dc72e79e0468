"""adapt.transfer.results: the results file round trip, the table (random baseline first) and the stage plot."""

import matplotlib.image

from adapt.transfer import RANDOM, ResultRow, format_table, plot_stage_curve, read_results, write_results


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
    assert format_table(rows) == table.strip()
    assert not list(tmp_path.glob(".tmp-*"))


def test_stage_curve_png(tmp_path):
    path = plot_stage_curve({RANDOM: {"stem": 0.3, "layer1": 0.4}, "ours": {"stem": 0.5, "layer1": 0.7}},
                            tmp_path / "curve.png")
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100

