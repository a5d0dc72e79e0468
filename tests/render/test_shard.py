"""Shard planning, the index and the dataset manifest (no rendering)."""

import json

import pytest

from render.shard import (
    DatasetMismatchError,
    claim_manifest,
    dataset_manifest,
    n_shards,
    shard_scenes,
    write_index,
)
from render.worker import RenderSettings
from synth.frames import read_index
from synth.sampling import TabletopScene


def test_shards_partition_every_frame_exactly_once():
    n_frames, views, per_shard = 103, 4, 5
    seen = []
    for shard in range(n_shards(n_frames, views, per_shard)):
        for scene, frames in shard_scenes(shard, n_frames=n_frames, views=views, scenes_per_shard=per_shard).items():
            assert frames == [f for f in range(scene * views, scene * views + views) if f < n_frames]
            seen += frames
    assert seen == list(range(n_frames))
    assert n_shards(103, 4, 5) == 6  # 26 scenes


def test_more_frames_add_shards_and_keep_existing_scenes():
    small = shard_scenes(0, n_frames=40, views=2, scenes_per_shard=10)
    large = shard_scenes(0, n_frames=4000, views=2, scenes_per_shard=10)
    assert small == large
    assert n_shards(4000, 2, 10) == 200


def test_index_rewrite_is_atomic_and_sorted(tmp_path):
    write_index(tmp_path, {3: {"frame_id": 3, "file": "c"}, 1: {"frame_id": 1, "file": "a"}})
    assert [r["frame_id"] for r in read_index(tmp_path)] == [1, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["index.jsonl"]


def test_manifest_refuses_to_mix_datasets(tmp_path):
    sampler, settings = TabletopScene(), RenderSettings()
    claim_manifest(tmp_path, dataset_manifest(sampler, settings, seed=0, scenes_per_shard=10))
    claim_manifest(tmp_path, dataset_manifest(sampler, settings, seed=0, scenes_per_shard=10))  # same: fine
    with pytest.raises(DatasetMismatchError, match="seed"):
        claim_manifest(tmp_path, dataset_manifest(sampler, settings, seed=1, scenes_per_shard=10))
    with pytest.raises(DatasetMismatchError, match="render"):
        claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(width=32), seed=0, scenes_per_shard=10))
    manifest = json.loads((tmp_path / "dataset.json").read_text())
    assert manifest["scene"]["family"] == "primitives_tabletop"
    assert "OpenCV camera frame" in manifest["conventions"]["normals"]


def test_a_dataset_written_before_the_denoiser_knobs_existed_still_resumes(tmp_path):
    sampler = TabletopScene()
    manifest = dataset_manifest(sampler, RenderSettings(), seed=0, scenes_per_shard=10)
    for key in ("denoise_quality", "denoise_prefilter"):
        del manifest["render"][key]  # as an older version wrote it
    claim_manifest(tmp_path, manifest)
    claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(), seed=0, scenes_per_shard=10))
    with pytest.raises(DatasetMismatchError, match=r"render\.denoise_prefilter: 'ACCURATE' -> 'NONE'"):
        claim_manifest(tmp_path, dataset_manifest(sampler, RenderSettings(denoise_prefilter="NONE"), seed=0,
                                                  scenes_per_shard=10))
    with pytest.raises(ValueError, match=r"^render\.denoise_quality: expected HIGH, BALANCED, FAST, got 'best'$"):
        RenderSettings(denoise_quality="best")
