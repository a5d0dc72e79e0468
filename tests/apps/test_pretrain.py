"""`synth pretrain` wiring: the held-out split, real-image objectives, the adversary and the monitors."""

import json
import math
import shutil

import pytest

from apps.pretrain import split_by_scene
from synth.data import FrameAugment, RenderedFrames


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


def _pretrain(rendered_dataset, out, *overrides):
    from apps.launch import compose
    from apps.pretrain import build_engine

    return build_engine(compose("synth_pretrain", [f"data.roots=[{rendered_dataset}]", f"out_dir={out}",
                                                   "trainer.image_every=0", "trainer.log_every=5",
                                                   "data.augment.size=64", *overrides])).fit()


def test_real_objectives_adversary_and_monitors_run_from_one_config(rendered_dataset, tmp_path):
    """Synthetic heads, a predictive, a generative and a contrastive objective, the feature GAN, the kNN probe and
    the domain-gap monitor, all from one command line."""
    summary = _pretrain(rendered_dataset, tmp_path, "objective=[depth,rotation,inpainting,simclr]",
                        "adapt=feature_gan", "trainer.steps=2", "trainer.batch_size=4",
                        "monitor.knn_probe.n_train=50", "monitor.knn_probe.n_test=20", "objective.simclr.weight=0.5")
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    for key in ["depth/loss", "rotation/loss", "inpainting/loss", "simclr/loss", "adapt/loss",
                "adapt/discriminator/loss"]:
        assert key in log[-1] and math.isfinite(log[-1][key]), key
    assert {"probe/knn_acc/layer4", "gap/layer4/domain_acc", "gap/layer4/mmd_rbf"} <= set(summary["monitors"])
    assert (tmp_path / "embeddings" / "embedding.png").exists()
    assert list((tmp_path / "pictures").glob("step_*_real.png")), "inpainting pictured on real images"


def test_an_objective_on_real_images_without_real_data_is_one_clear_error(rendered_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"data\.real is null"):
        _pretrain(rendered_dataset, tmp_path, "objective=[rotation]", "data.real=null", "monitor=[]")


@pytest.mark.slow
def test_feature_gan_lowers_the_measured_gap_against_no_adaptation(rendered_dataset, tmp_path):
    """Ren & Lee's feature GAN on layer4 against adapt=none, same seed, steps and data: the RBF MMD between
    rendered and real layer4 features (scale-normalised, see adapt.gap) ends lower with the adversary."""
    gaps = {}
    for adapt in ("none", "feature_gan"):
        summary = _pretrain(rendered_dataset, tmp_path / adapt, "objective=[depth]", f"adapt={adapt}",
                            "monitor=[domain_gap]", "trainer.steps=40", "trainer.batch_size=8",
                            *(["adapt.weight=1.0"] if adapt != "none" else []))
        gaps[adapt] = summary["monitors"]["gap/layer4/mmd_rbf"]
    assert gaps["feature_gan"] < 0.8 * gaps["none"], gaps
