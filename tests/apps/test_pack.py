"""`synth pack` and `synth pretrain data.packed=true` on hand-written shards (nothing is rendered)."""

import sys
from pathlib import Path

import pytest

from apps.cli import main
from synth.packed import PackedFrames

sys.path.insert(0, str(Path(__file__).parents[1] / "synth"))
from packed_helpers import make_shard  # the shard writer of tests/synth (tests are not a package)


def test_pack_command_packs_skips_unfinished_shards_and_reruns_as_a_no_op(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # Hydra's output folder
    root = tmp_path / "dataset"
    make_shard(root, range(0, 4), shard=0)
    make_shard(root, range(4, 6), shard=1, finished=False)
    assert main(["pack", f"data.roots=[{root}]"]) == 0
    out = capsys.readouterr().out
    assert "shard_00000: packed 4 frames" in out
    assert "shard_00001: skipped, still being rendered" in out and "1 skipped" in out
    assert main(["pack", f"data.roots=[{root}]"]) == 0
    assert "shard_00000: pack is up to date" in capsys.readouterr().out

    assert main(["pack", f"data.roots=[{tmp_path / 'nothing'}]"]) == 2
    assert "no rendered shard" in capsys.readouterr().err


def _build(root: Path, out: Path, *overrides):
    from apps.launch import compose
    from apps.pretrain import build_engine

    return build_engine(compose("synth_pretrain", [f"data.roots=[{root}]", f"out_dir={out}", "objective=[depth]",
                                                   "monitor=[]", "trainer.steps=2", "trainer.batch_size=4",
                                                   "trainer.image_every=0", "data.augment.size=16",
                                                   "data.holdout=0.3", *overrides]))


def test_pretrain_trains_on_the_pack_and_names_the_fix_when_there_is_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "dataset"
    make_shard(root, range(0, 12), shard=0)
    with pytest.raises(FileNotFoundError, match="synth pack"):
        _build(root, tmp_path / "run", "data.packed=true")
    assert main(["pack", f"data.roots=[{root}]"]) == 0
    engine = _build(root, tmp_path / "run", "data.packed=true")
    assert isinstance(engine.datasets["synthetic"], PackedFrames)
    summary = engine.fit()
    assert summary["steps"] == 2
    assert not isinstance(_build(root, tmp_path / "hdf5").datasets["synthetic"], PackedFrames), "HDF5 by default"
