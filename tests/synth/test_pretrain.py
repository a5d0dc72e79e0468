"""`synth pretrain` wiring: the held-out split."""

import shutil

from synth.data import FrameAugment, RenderedFrames
from synth.pretrain import split_by_scene


def test_holdout_splits_by_scene_and_does_not_depend_on_where_the_dataset_lives(rendered_dataset, tmp_path):
    pool = RenderedFrames([str(rendered_dataset)], augment=FrameAugment(size=32), seed=0)
    train, held = split_by_scene(pool, 0.5)
    assert train and held and sorted(train + held) == list(range(len(pool)))
    scenes = {side: {pool.frames[i][1]["scene_index"] for i in indices}
              for side, indices in (("train", train), ("held", held))}
    assert not scenes["train"] & scenes["held"], "no scene has views on both sides"

    moved = tmp_path / "elsewhere"
    shutil.copytree(rendered_dataset, moved)
    assert split_by_scene(RenderedFrames([str(moved)], augment=FrameAugment(size=32), seed=0), 0.5) == (train, held)
    assert split_by_scene(pool, 0.0) == (list(range(len(pool))), [])
