"""Fault injection, for real: kills, torn and flipped files, overflowing weights, a full disk, racing renders.

Each test does the damage the way it happens (a SIGKILL to the process, a byte flip in the file, a tmpfs that fills
up) and then checks what a user sees (one line on stderr, the exit code) and what is left on disk (every frame once
and readable, the index and COCO json consistent, the last good checkpoint intact and loadable).
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from pretext.synthetic import DepthHead
from synth.backbone import Backbone
from synth.checkpoint import CheckpointError, NonFiniteStateError, read_checkpoint
from synth.data import FrameAugment, RenderedFrames
from synth.engine import Engine, NonFiniteLossError, TrainerSettings
from synth.frames import list_frames, read_frame

PRETRAIN = ["objective=[depth]", "data.real=null", "monitor=[]", "trainer.batch_size=2", "data.augment.size=32",
            "trainer.image_every=0", "trainer.eval_batches=1", "trainer.warmup_steps=1", "data.holdout=0.0"]


def synth(*args, cwd, env=None, **kwargs):
    return subprocess.run([sys.executable, "-m", "apps.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, **kwargs)


def one_error_line(result) -> str:
    """The stderr lines that are not progress bars or logging: exactly one, without a traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("synth ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def _finite(path) -> bool:
    state = read_checkpoint(path, weights_only=False)
    return all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ------------------------------------------------------------------------------------------------ checkpoints


@pytest.fixture(scope="module")
def pretrained(rendered_dataset, tmp_path_factory):
    """A healthy 4-step run folder (copied per test before damaging it)."""
    out = tmp_path_factory.mktemp("run") / "good"
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={out}", "trainer.steps=4",
                   "trainer.checkpoint_every=2", *PRETRAIN, cwd=out.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def _copy(run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "text"])
def test_a_damaged_last_pt_is_one_line_naming_it(pretrained, rendered_dataset, tmp_path, damage):
    run = _copy(pretrained, tmp_path)
    last = run / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        last.write_bytes(data[: len(data) // 3])
    elif damage == "flip":  # flip bytes in the zip directory at the end, where torch looks first
        for i in range(len(data) - 200, len(data) - 100):
            data[i] ^= 0xFF
        last.write_bytes(bytes(data))
    elif damage == "empty":
        last.write_bytes(b"")
    else:
        last.write_text("not a checkpoint\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={run}", "trainer.steps=6",
                   "trainer.checkpoint_every=2", *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert str(last) in line and "delete it" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "no Hydra run folder is written"

    # The same file given to `synth transfer` is named the same way, before any work.
    result = synth("transfer", f"checkpoint={last}", "tasks=[depth]", f"out_dir={tmp_path / 't'}", cwd=tmp_path)
    assert result.returncode == 2 and str(last) in one_error_line(result)
    assert not (tmp_path / "t").exists()


def test_resuming_with_another_config_is_refused_naming_the_keys(pretrained, rendered_dataset, tmp_path):
    run = _copy(pretrained, tmp_path)
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={run}", "trainer.steps=6",
                   "trainer.lr=0.01", "trainer.checkpoint_every=2", *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 2
    line = one_error_line(result)
    assert "trainer.lr: 0.001 -> 0.01" in line and "trainer.steps: 4 -> 6" in line
    assert read_checkpoint(run / "checkpoints" / "last.pt")["step"] == 4
    # Logging intervals may change on a resume.
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={run}", "trainer.steps=4",
                   "trainer.checkpoint_every=2", "trainer.log_every=1", *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]


def test_an_overflowing_weight_is_refused_before_any_work(pretrained, rendered_dataset, tmp_path):
    run = _copy(pretrained, tmp_path)
    good = (run / "checkpoints" / "last.pt").read_bytes()
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={run}", "trainer.steps=4",
                   "trainer.checkpoint_every=1", "objective.depth.weight=1e39", *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 2 and "depth" in one_error_line(result)
    assert (run / "checkpoints" / "last.pt").read_bytes() == good


class Huge(nn.Module):
    """A finite loss that overflows float32 once weighted (1e35 x 1e4)."""

    domains = ("synthetic",)

    def forward(self, batch, backbone):
        return {"loss": batch["features"]["layer4"].float().mean() * 0 + 1e35}


def _engine(dataset, out, objectives, weights, steps):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        backbone = Backbone("resnet18")
    frames = RenderedFrames([str(dataset)], augment=FrameAugment(size=32), seed=0)
    return Engine(backbone=backbone, objectives=objectives, weights=weights, datasets={"synthetic": frames},
                  settings=TrainerSettings(steps=steps, batch_size=2, warmup_steps=1, image_every=0,
                                           checkpoint_every=1, device="cpu"), out_dir=out)


def test_an_overflowing_weighted_term_stops_the_run_and_keeps_the_good_checkpoint(rendered_dataset, tmp_path):
    _engine(rendered_dataset, tmp_path, {"depth": DepthHead()}, {"depth": 1.0}, steps=2).fit()
    good = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    engine = _engine(rendered_dataset, tmp_path, {"depth": DepthHead(), "huge": Huge()},
                     {"depth": 1.0, "huge": 1e4}, steps=4)
    engine.resume = lambda: False  # a new objective: start from scratch in the same folder
    with pytest.raises(NonFiniteLossError, match=r"'huge': weight 10000 x loss 1e\+35 overflows"):
        engine.fit()
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == good


def test_a_non_finite_state_is_never_saved(rendered_dataset, tmp_path):
    engine = _engine(rendered_dataset, tmp_path, {"depth": DepthHead()}, {"depth": 1.0}, steps=1)
    engine.fit()
    good = engine.checkpoint_path.read_bytes()
    with torch.no_grad():
        next(engine.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteStateError, match="previous checkpoint is kept"):
        engine.save()
    assert engine.checkpoint_path.read_bytes() == good and _finite(engine.checkpoint_path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 3 MB tmpfs (root only, as CI runs): a real full filesystem."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_named_and_leaves_no_temporary(rendered_dataset, tmp_path, tiny_disk):
    out = tiny_disk / "run"  # a ResNet-18 checkpoint (~90 MB with AdamW state) cannot fit in 3 MB
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={out}", "trainer.steps=2",
                   *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"disk full while writing {out / 'checkpoints' / 'last.pt'}" in line
    leftovers = [p for p in tiny_disk.rglob("*") if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_a_stale_temporary_of_a_dead_writer_is_cleared(pretrained, rendered_dataset, tmp_path):
    run = _copy(pretrained, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = run / "checkpoints" / f".tmp-{int(dead.stdout)}-last.pt"
    stale.write_bytes(b"half a checkpoint")
    result = synth("pretrain", f"data.roots=[{rendered_dataset}]", f"out_dir={run}", "trainer.steps=4",
                   "trainer.checkpoint_every=2", *PRETRAIN, cwd=tmp_path)
    assert result.returncode == 0 and not stale.exists()


# ------------------------------------------------------------------------------------------------ kills


def _kill_after(cmd, cwd, seconds):
    process = subprocess.Popen([sys.executable, "-m", "apps.cli", *cmd], cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               start_new_session=True)
    time.sleep(seconds)
    os.killpg(process.pid, signal.SIGKILL)  # the app and its render worker, as an OOM killer or a scheduler would
    process.wait()


@pytest.mark.slow
def test_pretrain_killed_at_random_points_resumes_to_the_same_weights(rendered_dataset, tmp_path):
    args = [f"data.roots=[{rendered_dataset}]", "trainer.steps=8", "trainer.checkpoint_every=1", *PRETRAIN]
    straight = synth("pretrain", *args, f"out_dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    rng = random.Random(7)
    for _ in range(3):
        _kill_after(["pretrain", *args, f"out_dir={tmp_path / 'killed'}"], tmp_path, rng.uniform(4.0, 12.0))
        last = tmp_path / "killed" / "checkpoints" / "last.pt"
        if last.exists():
            assert _finite(last)  # whatever moment the kill hit, the checkpoint on disk is whole
    resumed = synth("pretrain", *args, f"out_dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = read_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["model"]
    b = read_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert not list((tmp_path / "killed").rglob(".tmp-*"))


RENDER = ["render.width=32", "render.height=32", "scene.views=2", "label_check.frames=1", "preview=false",
          "scenes_per_shard=2"]


def _check_dataset(out, n_frames):
    frames = list_frames(out)
    ids = [record["frame_id"] for _, record in frames]
    assert sorted(ids) == list(range(n_frames)), "every frame exactly once"
    for shard, record in frames:
        read_frame(shard / record["file"])
        coco = json.loads((shard / "coco" / "annotations.json").read_text()) if (
            shard / "coco" / "annotations.json").exists() else None
        if coco is not None:
            names = {image["file_name"] for image in coco["images"]}
            assert all((shard / "coco" / name).exists() for name in names)


@pytest.mark.slow
def test_render_killed_at_random_points_resumes_with_every_frame_once(tmp_path):
    out = tmp_path / "data"
    rng = random.Random(3)
    for _ in range(2):
        _kill_after(["render", f"out_dir={out}", "n_frames=8", *RENDER], tmp_path, rng.uniform(5.0, 12.0))
    result = synth("render", f"out_dir={out}", "n_frames=8", *RENDER, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    _check_dataset(out, 8)


@pytest.mark.slow
def test_two_renders_racing_complete_the_dataset_together(tmp_path):
    out = tmp_path / "data"
    cmd = [sys.executable, "-m", "apps.cli", "render", f"out_dir={out}", "n_frames=8", *RENDER]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(1.0)
    second = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    _check_dataset(out, 8)
    codes = [first.returncode, second.returncode]
    # A render that met a locked shard says so in one line per shard; it exits 0 when the other finished that
    # shard before it ended, else 1 naming what is missing (never a traceback).
    for (_, stderr), code in zip(outputs, codes, strict=True):
        assert "Traceback" not in stderr
        if code != 0:
            assert "is being rendered by another process" in stderr or "incomplete" in stderr
    assert 0 in codes, "the render that ends last sees a complete dataset"
    # Rerunning after both ended: nothing to do, exit 0.
    assert synth("render", f"out_dir={out}", "n_frames=8", *RENDER, cwd=tmp_path).returncode == 0


# ------------------------------------------------------------------------------------------------ readers


def test_checkpoint_reader_survives_arbitrary_damage(pretrained, tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = (pretrained / "checkpoints" / "last.pt").read_bytes()
    path = tmp_path / "x.pt"

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cut=st.integers(0, len(good)), flips=st.lists(st.integers(0, len(good) - 1), max_size=8))
    def damaged(cut, flips):
        data = bytearray(good[:cut] if cut < len(good) else good)
        for i in flips:
            if i < len(data):
                data[i] ^= 0x5A
        path.write_bytes(bytes(data))
        try:
            state = read_checkpoint(path)  # weights_only, as synth transfer reads checkpoints
        except CheckpointError as error:
            assert str(path) in str(error) and "\n" not in str(error)
        else:
            assert "model" in state  # a flip in padding or in a tensor's bytes: still a checkpoint

    assert hypothesis.__version__
    damaged()


def test_frame_reader_survives_arbitrary_damage(rendered_dataset, tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from synth.frames import CorruptFrameError

    shard, record = list_frames(rendered_dataset)[0]
    good = (shard / record["file"]).read_bytes()
    path = tmp_path / "frame.hdf5"

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cut=st.integers(0, len(good)), flips=st.lists(st.integers(0, len(good) - 1), max_size=8))
    def damaged(cut, flips):
        data = bytearray(good[:cut])
        for i in flips:
            if i < len(data):
                data[i] ^= 0xA5
        path.write_bytes(bytes(data))
        try:
            frame = read_frame(path)
        except CorruptFrameError as error:
            assert str(path) in str(error)
        else:
            assert frame["colors"].shape[-1] == 3  # the flips fell in bytes the reader does not validate

    damaged()


def test_coco_reader_survives_arbitrary_damage(tmp_path):
    import numpy as np
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from PIL import Image

    from adapt.datasets import CocoDetection

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    good = json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}],
                       "categories": [{"id": 3, "name": "cup"}],
                       "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 4, 4], "area": 16,
                                        "iscrowd": 0, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]})
    path = tmp_path / "annotations.json"

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cut=st.integers(0, len(good)), edits=st.lists(st.tuples(st.integers(0, len(good) - 1),
                                                                   st.sampled_from("0-9,:[]{}\"e.")), max_size=4))
    def damaged(cut, edits):
        text = list(good[:cut] if cut < len(good) else good)
        for i, char in edits:
            if i < len(text):
                text[i] = char
        path.write_text("".join(text))
        try:
            dataset = CocoDetection(images_dir=str(tmp_path), annotation_file=str(path))
        except ValueError as error:
            assert str(path) in str(error)
        else:
            for i in range(len(dataset)):
                image, target = dataset[i]
                assert image.shape[0] == 3 and target["boxes"].shape[-1] == 4

    damaged()
