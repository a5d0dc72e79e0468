"""The pretraining engine on real rendered frames: losses fall, NaN guard, exact resume, DDP, artefacts."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from pretext.synthetic import ContourHead, DepthHead, NormalHead
from synth.backbone import Backbone
from synth.data import FrameAugment, RenderedFrames
from synth.engine import Engine, NonFiniteLossError, TrainerSettings, lr_factor


def make_engine(dataset_dir, out_dir, *, steps, objectives=None, weights=None, augment=True, **settings):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = Backbone("resnet18")
        objectives = objectives or {"depth": DepthHead(), "normal": NormalHead(), "contour": ContourHead()}
    frames = RenderedFrames([str(dataset_dir)], augment=FrameAugment(size=48, train=augment), seed=0)
    held = RenderedFrames([str(dataset_dir)], augment=FrameAugment(size=48, train=False), seed=0)
    settings = {"batch_size": 4, "lr": 1e-3, "warmup_steps": 5, "log_every": 5, "image_every": 0,
                "checkpoint_every": 1000, "eval_batches": 1, **settings}
    trainer = TrainerSettings(steps=steps, **settings)
    return Engine(backbone=backbone, objectives=objectives,
                  weights=weights or {"depth": 5.0, "normal": 10.0, "contour": 1.0},
                  datasets={"synthetic": frames}, eval_datasets={"synthetic": held}, settings=trainer,
                  out_dir=out_dir)


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_factor(0, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.1)
    assert lr_factor(9, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(10, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(55, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.5)
    assert lr_factor(100, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(70, steps=100, warmup_steps=10, schedule="constant") == 1.0


def test_each_head_loss_falls_on_real_rendered_frames(rendered_dataset, tmp_path):
    """An honest overfit check: the 8 frames without augmentation, so the heads can memorise them."""
    engine = make_engine(rendered_dataset, tmp_path, steps=120, augment=False, lr=2e-3)
    summary = engine.fit()
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    for head in ("depth", "normal", "contour"):
        first = sum(r[f"{head}/loss"] for r in rows[:3]) / 3
        last = sum(r[f"{head}/loss"] for r in rows[-3:]) / 3
        assert last < 0.6 * first, f"{head}: loss went from {first:.4f} to {last:.4f}"
    # The artefacts a person opens, and the held-out metrics.
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert list((tmp_path / "pictures").glob("*.png"))
    assert list((tmp_path / "tensorboard").iterdir())
    assert "eval/depth/abs_rel" in summary["eval"] and "eval/normal/mean_angle" in summary["eval"]


class Diverging(nn.Module):
    """An objective whose loss is NaN, as a diverged head would give."""

    domains = ("synthetic",)

    def forward(self, batch, backbone):
        return {"loss": batch["features"]["layer4"].float().mean() * float("nan")}


def test_a_nan_loss_stops_the_run_naming_the_objective(rendered_dataset, tmp_path):
    engine = make_engine(rendered_dataset, tmp_path, steps=3, objectives={"depth": DepthHead(), "wild": Diverging()},
                         weights={"depth": 1.0, "wild": 1.0})
    with pytest.raises(NonFiniteLossError, match="'wild'"):
        engine.fit()


def test_resume_after_interruption_gives_the_same_weights(rendered_dataset, tmp_path):
    straight = make_engine(rendered_dataset, tmp_path / "straight", steps=8, checkpoint_every=3)
    straight.fit()

    interrupted = make_engine(rendered_dataset, tmp_path / "resumed", steps=8, checkpoint_every=3)
    step = interrupted.train_step

    def killed_after_step_4(batches, **kwargs):
        if interrupted.step == 4:
            raise KeyboardInterrupt  # as a kill would, one step after the checkpoint at step 3
        return step(batches, **kwargs)

    interrupted.train_step = killed_after_step_4
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    state = torch.load(interrupted.checkpoint_path, weights_only=False)
    assert state["step"] == 3 and state["amp"] == str(interrupted.amp_dtype)

    resumed = make_engine(rendered_dataset, tmp_path / "resumed", steps=8, checkpoint_every=3)
    resumed.amp_dtype = torch.float16  # as if this machine's auto chose otherwise: the checkpoint's choice wins
    resumed.fit()
    assert resumed.amp_dtype == interrupted.amp_dtype
    assert resumed.step == 8
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "no step is logged twice after a resume"


def test_two_ddp_processes_end_with_identical_weights(rendered_dataset, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
           "-m", "apps.cli", "pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={out}",
           "trainer.steps=4", "trainer.batch_size=2", "trainer.image_every=0", "trainer.eval_batches=1",
           "data.augment.size=32", "data.holdout=0.0"]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    first, second = summary["rank_fingerprints"]
    assert first == second, "both ranks hold the same weights"
    assert first != [0.0, 0.0]


def test_pretrain_cli_reports_bad_config_in_one_line(tmp_path, monkeypatch, capsys):
    from apps.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "trainer.optimiser=sgd"]) == 2
    assert "optimiser" in capsys.readouterr().err
    assert main(["pretrain", f"data.roots=[{tmp_path / 'nothing'}]"]) == 2
    assert "synth render" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
