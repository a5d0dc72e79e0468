"""`synth adapt-images`: config errors, training resume, and translated datasets that keep every label."""

import json
import shutil
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch

from apps.cli import main
from synth.frames import FRAME_FIELDS, list_frames, read_frame, sha256

TINY = ["translator.generator_width=8", "translator.generator_blocks=1", "translator.discriminator_width=8",
        "translator.siamese_width=8", "translator.pairs_per_image=2", "data.size=32", "trainer.batch_size=2",
        "trainer.image_every=0", "trainer.log_every=1", "trainer.checkpoint_every=2"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Small tensors: one intra-op thread (see ``one_thread`` in tests/conftest.py)."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of six real photographs from scikit-image's wheel."""
    import importlib.util

    data = Path(importlib.util.find_spec("skimage").origin).parent / "data"
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "brick.png"):
        shutil.copyfile(data / name, folder / name)
    return folder


def _job(*overrides):
    from apps.adapt_images import adapt_images_job
    from apps.launch import compose

    return adapt_images_job(compose("synth_adapt_images", list(overrides)))


def _train(rendered_dataset, photos, out, steps, *extra):
    return _job(f"data.roots=[{rendered_dataset}]", f"data.real.sources=[{photos}]", f"out_dir={out}",
                f"trainer.steps={steps}", *TINY, *extra)


@pytest.mark.parametrize(("args", "expected"), [
    (["translater.generator_width=8"], "Key 'translater' not in"),
    (["translator.cycle_wieght=1"], "Key 'cycle_wieght' not in"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["mode=bogus"], "mode must be one of"),
    (["apply"], "mode=apply needs checkpoint="),
])
def test_config_errors_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["adapt-images", f"out_dir={tmp_path / 'run'}", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [], "nothing is written"


def test_resume_gives_the_weights_of_an_uninterrupted_run(rendered_dataset, photos, tmp_path):
    _train(rendered_dataset, photos, tmp_path / "straight", 4)
    _train(rendered_dataset, photos, tmp_path / "resumed", 2)
    _train(rendered_dataset, photos, tmp_path / "resumed", 4)
    straight = torch.load(tmp_path / "straight" / "checkpoints" / "translator.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "translator.pt", weights_only=True)
    assert straight["step"] == resumed["step"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    for name in ("optimizer_g", "optimizer_d"):
        for index, state in straight[name]["state"].items():
            assert torch.equal(state["exp_avg"], resumed[name]["state"][index]["exp_avg"])
    assert (tmp_path / "resumed" / "pictures" / "latest.png").exists()
    assert list((tmp_path / "resumed" / "tensorboard").iterdir())


def test_translated_dataset_keeps_every_label_and_reads_back(rendered_dataset, photos, tmp_path, monkeypatch, capsys):
    from synth.data import FrameAugment, RenderedFrames

    run, out = tmp_path / "run", tmp_path / "translated"
    _train(rendered_dataset, photos, run, 2)
    monkeypatch.chdir(tmp_path)
    assert main(["adapt-images", "apply", f"checkpoint={run}", f"source={rendered_dataset}", f"out_dir={out}"]) == 0
    assert "translated 8 frame(s), 0 already done" in capsys.readouterr().out
    assert cv2.imread(str(out / "preview.png")) is not None  # redrawn from the translated colours

    source_frames, frames = list_frames(rendered_dataset), list_frames(out)
    assert [r["frame_id"] for _, r in frames] == [r["frame_id"] for _, r in source_frames]
    changed = 0
    for (src_shard, src_record), (shard, record) in zip(source_frames, frames, strict=True):
        assert record["sha256"] == sha256(shard / record["file"]), "the index checksum is the new file's"
        assert record["source_sha256"] == src_record["sha256"]
        assert {k: v for k, v in record.items() if k not in ("sha256", "source_sha256")} == \
               {k: v for k, v in src_record.items() if k != "sha256"}
        with h5py.File(src_shard / src_record["file"]) as a, h5py.File(shard / record["file"]) as b:
            assert sorted(a) == sorted(b)
            for key in a:
                if key == "colors":
                    assert b[key].shape == a[key].shape and b[key].dtype == a[key].dtype
                    changed += not np.array_equal(a[key][()], b[key][()])
                else:
                    assert a[key][()].tobytes() == b[key][()].tobytes(), key
                    assert a[key].dtype == b[key].dtype and a[key].compression == b[key].compression
            assert json.dumps({k: str(v) for k, v in a.attrs.items()}) == \
                   json.dumps({k: str(v) for k, v in b.attrs.items()})
        frame = read_frame(shard / record["file"])
        assert set(FRAME_FIELDS) <= set(frame)
        assert (shard / "coco" / "images" / f"{record['frame_id']:08d}.jpg").is_file()
    assert changed == len(frames), "every image is translated"
    for shard in sorted(rendered_dataset.glob("shard_*")):
        for name in ("coco_annotations.json", "label_check.json"):
            assert (out / shard.name / name).read_bytes() == (shard / name).read_bytes()
        for scene in (shard / "scenes").glob("*.json"):
            assert (out / shard.name / "scenes" / scene.name).read_bytes() == scene.read_bytes()
    manifest = json.loads((out / "dataset.json").read_text())
    source_manifest = json.loads((rendered_dataset / "dataset.json").read_text())
    assert {k: v for k, v in manifest.items() if k != "translation"} == source_manifest
    assert manifest["translation"]["step"] == 2 and manifest["translation"]["method"] == "OP-GAN"
    assert manifest["translation"]["source"] == str(rendered_dataset.resolve())

    dataset = RenderedFrames([str(out)], augment=FrameAugment(size=32, train=False), verify=True)
    assert len(dataset) == 8 and all(dataset[i] is not None for i in range(len(dataset)))

    # A rerun skips every frame; a deleted frame is redone, and only it.
    stamp = {r["file"]: (s / r["file"]).stat().st_mtime_ns for s, r in frames}
    _job("mode=apply", f"checkpoint={run}", f"source={rendered_dataset}", f"out_dir={out}")
    assert "0 frame(s), 8 already done" in capsys.readouterr().out
    shard, record = frames[3]
    (shard / record["file"]).unlink()
    _job("mode=apply", f"checkpoint={run}", f"source={rendered_dataset}", f"out_dir={out}")
    assert "translated 1 frame(s), 7 already done" in capsys.readouterr().out
    for s, r in list_frames(out):
        if r["file"] != record["file"]:
            assert (s / r["file"]).stat().st_mtime_ns == stamp[r["file"]]


def test_apply_refuses_to_mix_two_translators(rendered_dataset, photos, tmp_path):
    out = tmp_path / "translated"
    _train(rendered_dataset, photos, tmp_path / "a", 1)
    _train(rendered_dataset, photos, tmp_path / "b", 1, "translator.opgan_weight=0", "trainer.seed=1")
    _job("mode=apply", f"checkpoint={tmp_path / 'a'}", f"source={rendered_dataset}", f"out_dir={out}")
    with pytest.raises(ValueError, match="another checkpoint"):
        _job("mode=apply", f"checkpoint={tmp_path / 'b'}", f"source={rendered_dataset}", f"out_dir={out}")
