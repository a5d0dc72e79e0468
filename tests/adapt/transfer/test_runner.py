"""adapt.transfer.runner: every task for a checkpoint and the random baseline, into one table."""

import pytest
import torch

from adapt.transfer import RANDOM, read_results, run_transfer


def test_run_transfer_includes_random_baseline(sets, pretrained, tmp_path):
    path, _ = pretrained
    data = {"classification": {"train": sets.ColourSet(8, seed=0), "test": sets.ColourSet(4, seed=1)},
            "detection": {"train": sets.BoxSet(), "test": sets.BoxSet()},
            "segmentation": {"train": sets.MaskSet(), "test": sets.MaskSet()},
            "depth": {"test": sets.depth_pairs(), "train": sets.depth_pairs()}}
    budget = {"linear_probe": {"stages": ["layer2", "layer4"]},
              "finetune": {"steps": 1, "batch_size": 4},
              "detection": {"steps": 1, "batch_size": 2, "min_size": 64, "max_size": 64, "fpn_channels": 32,
                            "detections_per_image": 10},
              "segmentation": {"steps": 1, "batch_size": 2, "size": 64, "channels": 16},
              "depth": {"steps": 1, "batch_size": 2, "size": 64}}
    rows = run_transfer({"synthetic": path}, ["linear_probe", "finetune", "detection", "segmentation", "depth"],
                        data, budget, seed=0, out_dir=tmp_path, device="cpu")
    assert rows[0].label == RANDOM
    cells = {(r.label, r.task, r.metric) for r in rows}
    expected = {("linear_probe", "acc@layer2"), ("linear_probe", "acc@layer4"), ("finetune", "accuracy"),
                ("detection", "mAP"), ("detection", "AP50"), ("segmentation", "mIoU"), ("segmentation", "pixel_acc"),
                ("depth_zero_shot", "abs_rel"), ("depth_zero_shot", "delta1"), ("depth_finetune", "abs_rel"),
                ("depth_finetune", "delta1")}
    assert {c for c in cells if not c[0].startswith("naive:")} == {(label, *cell) for label in (RANDOM, "synthetic")
                                                                    for cell in expected}
    # The naive rows fill the same columns (no network): classification, detection, segmentation, depth.
    naive = {(label, *cell) for label in ("naive:majority", "naive:raw_pixels") for cell in expected
             if cell[0] in ("linear_probe", "finetune")}
    naive |= {("naive:prior_boxes", "detection", m) for m in ("mAP", "AP50")}
    naive |= {("naive:location_prior", "segmentation", m) for m in ("mIoU", "pixel_acc")}
    naive |= {(label, *cell) for label in ("naive:constant", "naive:ramp") for cell in expected
              if cell[0].startswith("depth")}
    assert {c for c in cells if c[0].startswith("naive:")} == naive
    assert all(r.checkpoint == "naive" for r in rows if r.label.startswith("naive:"))
    assert all(r.seed == 0 and r.wall_s >= 0 for r in rows)
    assert read_results(tmp_path) == rows
    assert "| random |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "linear_probe_stages.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"budget\['detection'\]: unknown setting 'stepz'"):
        run_transfer({"synthetic": path}, ["detection"], data, {"detection": {"stepz": 1}}, device="cpu")



def test_run_transfer_reads_each_checkpoint_once(sets, pretrained, monkeypatch):
    path, _ = pretrained
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(args[0]) or load(*args, **kwargs))
    rows = run_transfer({"synthetic": path, "again": path.parent}, ["depth"], {"depth": {"test": sets.depth_pairs()}},
                        {"depth": {"size": 64}}, device="cpu")
    assert calls == [path, path]  # once per checkpoint entry: arch, backbone and depth head from one read
    labels = (RANDOM, "synthetic", "again", "naive:constant", "naive:ramp")
    assert {(r.label, r.task) for r in rows} == {(label, "depth_zero_shot") for label in labels}
    assert {r.budget for r in rows if not r.label.startswith("naive:")} == {"zero-shot,size=64"}


def test_run_transfer_names_missing_data_before_any_work(pretrained):
    path, _ = pretrained
    with pytest.raises(KeyError, match=r"data: no 'detection' entry"):
        run_transfer({"synthetic": path}, ["linear_probe", "detection"], {"classification": {}}, device="cpu")
    with pytest.raises(ValueError, match=r"tasks: expected some of"):
        run_transfer({"synthetic": path}, ["segmentaton"], {}, device="cpu")
