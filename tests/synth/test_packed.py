"""The packed layout (synth.packed): bit-exact round trip, resumable atomic packing, and the PackedFrames dataset.

Shards are written by hand in the exact layout ``synth.frames`` reads (``packed_helpers``); nothing is rendered.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import synth.packed as packed
from synth.data import FrameAugment, RenderedFrames, StepSampler, collate_frames
from synth.frames import FRAME_FIELDS, read_frame, read_index
from synth.packed import CONVERTED, PackedFrames, PackedShard, PackMissingError, pack_dataset, pack_shard

sys.path.insert(0, str(Path(__file__).parent))
from packed_helpers import make_shard  # a helper module beside this file (tests are not a package)


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Two shards of different frame sizes."""
    root = tmp_path / "dataset"
    make_shard(root, range(0, 6), shard=0)
    make_shard(root, range(6, 10), shard=1, h=36, w=30)
    return root


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp" in p.name]


def assert_round_trip(root: Path) -> None:
    for shard_dir in sorted(root.glob("shard_*")):
        shard = PackedShard(shard_dir)
        assert [r["frame_id"] for r in shard.records] == [r["frame_id"] for r in read_index(shard_dir)]
        for row, record in enumerate(shard.records):
            source, copy = read_frame(shard_dir / record["file"]), shard.frame(row)
            for key in FRAME_FIELDS:
                expected = np.asarray(source[key])
                if key in CONVERTED:  # stored as float16: exactly the float16 of the HDF5 value
                    expected = expected.astype(CONVERTED[key])
                if key == "boxes":
                    expected = expected.reshape(-1, 4)
                assert copy[key].dtype == expected.dtype, key
                assert copy[key].tobytes() == expected.tobytes(), key  # bit-exact (NaN-safe, signed zeros)
            assert copy["attrs"] == packed._plain(source["attrs"])
            assert copy["instance_attribute_maps"] == source["instance_attribute_maps"]


def test_every_field_of_every_frame_round_trips(dataset):
    results = pack_dataset(dataset)
    assert [status for status, _ in results] == ["packed", "packed"]
    assert_round_trip(dataset)
    assert not temporaries(dataset)


def test_rerun_is_a_no_op(dataset):
    pack_dataset(dataset)
    stamps = {p: p.stat().st_mtime_ns for p in dataset.rglob("packed/*")}
    assert [status for status, _ in pack_dataset(dataset)] == ["current", "current"]
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("packed/*")} == stamps


def test_pack_interrupted_after_the_first_array_resumes_without_loss(dataset, monkeypatch):
    pack_shard(dataset / "shard_00000")  # a complete shard must survive the failure of another
    calls = []
    real_write = packed._write_array

    def failing_write(folder, name, array):
        if calls:
            raise KeyboardInterrupt("interrupted")  # after the first array is in place
        calls.append(name)
        real_write(folder, name, array)

    monkeypatch.setattr(packed, "_write_array", failing_write)
    with pytest.raises(KeyboardInterrupt):
        pack_shard(dataset / "shard_00001")
    monkeypatch.undo()
    assert (dataset / "shard_00001" / "packed" / f"{calls[0]}.npy").exists()
    assert not (dataset / "shard_00001" / "packed" / "pack.json").exists(), "no completion mark"
    assert not temporaries(dataset)
    with pytest.raises(PackMissingError, match="shard_00001"):
        PackedFrames([dataset], augment=FrameAugment(size=16))
    assert [status for status, _ in pack_dataset(dataset)] == ["current", "packed"]
    assert_round_trip(dataset)


KILLED_PACK = """
import os, signal, sys
import numpy as np
import synth.packed as packed
real_save = np.save
def save(f, array):
    real_save(f, array)
    if len(array) > 1:  # the first array file is half-written (its temporary is complete but not renamed)
        os.kill(os.getpid(), signal.SIGKILL)
np.save = save
packed.pack_shard(sys.argv[1])
"""


def test_pack_killed_mid_write_leaves_a_temporary_that_the_rerun_clears(dataset):
    shard_dir = dataset / "shard_00000"
    run = subprocess.run([sys.executable, "-c", KILLED_PACK, str(shard_dir)], capture_output=True, text=True)
    assert run.returncode == -signal.SIGKILL, run.stderr
    assert temporaries(shard_dir), "the kill left the temporary behind"
    assert packed.read_pack_meta(shard_dir) is None
    assert pack_shard(shard_dir)[0] == "packed"
    assert not temporaries(shard_dir)
    pack_shard(dataset / "shard_00001")
    assert_round_trip(dataset)


def test_shard_still_being_rendered_is_skipped_with_a_message(tmp_path):
    root = tmp_path / "dataset"
    make_shard(root, range(0, 4), shard=0)
    make_shard(root, range(4, 6), shard=1, finished=False)  # no label_check.json yet
    (status0, _), (status1, message) = pack_dataset(root)
    assert (status0, status1) == ("packed", "skipped")
    assert "shard_00001" in message and "still being rendered" in message
    assert not (root / "shard_00001" / "packed").exists()

    import fcntl
    with open(root / "shard_00000" / ".lock", "a") as lock:  # as synth render holds it
        fcntl.flock(lock, fcntl.LOCK_EX)
        code = f"import synth.packed as p; print(*p.pack_shard({str(root / 'shard_00000')!r}), sep='|')"
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        status, message = run.stdout.strip().split("|")
    assert status == "skipped" and "another process" in message


def test_a_re_rendered_shard_makes_its_pack_stale(dataset):
    pack_dataset(dataset)
    index = dataset / "shard_00000" / "index.jsonl"
    index.write_text("".join(index.read_text().splitlines(keepends=True)[:-1]))  # one frame fewer
    os.utime(dataset / "shard_00000" / "label_check.json")
    with pytest.raises(PackMissingError, match="synth pack"):
        PackedFrames([dataset], augment=FrameAugment(size=16))
    assert [status for status, _ in pack_dataset(dataset)] == ["packed", "current"]
    assert len(PackedShard(dataset / "shard_00000")) == 5


def test_a_corrupt_frame_is_left_out_and_listed(dataset, caplog):
    victim = dataset / "shard_00000" / "frames" / "00000002.hdf5"
    victim.write_bytes(victim.read_bytes()[:100])
    status, message = pack_shard(dataset / "shard_00000")
    assert status == "packed" and "1 corrupt" in message and "00000002.hdf5" in caplog.text
    shard = PackedShard(dataset / "shard_00000")
    assert [r["frame_id"] for r in shard.records] == [0, 1, 3, 4, 5]


def test_packed_frames_has_the_order_keys_and_outputs_of_rendered_frames(dataset):
    pack_dataset(dataset)
    augment = FrameAugment(size=24)
    packed_frames = PackedFrames([dataset], augment=augment, seed=5)
    rendered = RenderedFrames([dataset], augment=augment, seed=5)
    assert len(packed_frames) == len(rendered)
    assert [r["frame_id"] for _, r in packed_frames.frames] == [r["frame_id"] for _, r in rendered.frames]
    keys = [(i % len(rendered), 100 + i) for i in range(12)] + [3, -1]
    batch = packed_frames.__getitems__(keys)
    reference = collate_frames([rendered[k] for k in keys])
    assert batch.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert batch[key].shape == value.shape and batch[key].dtype == value.dtype, key
    assert torch.equal(batch["frame_id"], reference["frame_id"]) and torch.equal(batch["seed"], reference["seed"])
    assert torch.equal(batch["instances"], reference["instances"])  # same crops and flips, frame by frame
    single = packed_frames[keys[4]]
    assert all(torch.equal(single[k], batch[k][4]) for k in ("image", "depth", "normals", "instances", "cam_K"))
    assert torch.equal(single["boxes"], batch["boxes"][4])

    held = packed_frames.subset([1, 7], augment=FrameAugment(size=24, train=False))
    assert [r["frame_id"] for _, r in held.frames] == [1, 7]
    assert torch.equal(held[(0, 1)]["instances"], held[(0, 2)]["instances"]), "evaluation input has no randomness"


@pytest.mark.parametrize("workers", [0, 1])
def test_data_loader_batches_are_those_of_the_step_sampler_keys(dataset, workers):
    pack_dataset(dataset)
    frames = PackedFrames([dataset], augment=FrameAugment(size=16), seed=0)
    sampler = StepSampler(len(frames), seed=3, batch_size=4, start_step=2)
    loader = torch.utils.data.DataLoader(frames, batch_size=4, sampler=sampler, collate_fn=collate_frames,
                                         num_workers=workers)
    iterator, keys = iter(loader), iter(sampler)
    for _ in range(3):
        batch = next(iterator)
        expected = frames.__getitems__([next(keys) for _ in range(4)])
        assert batch["n_corrupt"] == 0
        for key in ("image", "depth", "normals", "contours", "instances", "cam_K", "frame_id", "seed"):
            assert torch.equal(batch[key], expected[key]), key
