"""`synth transfer`: a bad budget key, data key or checkpoint is one clear line, before any work."""

import pytest

from apps.cli import main
from apps.launch import compose
from apps.transfer import TASK_DATA, build_data


@pytest.mark.parametrize(("args", "expected"), [
    (["budget.detection.stepz=3"], "Key 'stepz' is not in struct"),
    (["+budget.detection.stepz=3"], "unknown setting 'stepz'"),
    (["tasks=[linear_probe,segmentaton]"], "segmentaton"),
    (["+data.detection.build.sizee=3"], "data.detection.build.sizee: not an argument of adapt.cutpaste.build_cutpaste"),
    (["checkpoint=/no/such/run"], "/no/such/run"),
    (["transfer/detection=coco"], "full_key: data.detection.train.images_dir"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    assert main(["transfer", f"out_dir={tmp_path / 'out'}", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []


def test_default_data_are_real_and_follow_the_task_conventions(tmp_path):
    cfg = compose("synth_transfer", ["tasks=[linear_probe,depth]", "data.classification.train.max_images=20",
                                     "data.classification.test.max_images=10"])
    data = build_data(cfg)
    assert set(data) == {TASK_DATA["linear_probe"], TASK_DATA["depth"]}
    image, _ = data["classification"]["train"][0]
    assert image.shape == (3, 32, 32) and float(image.min()) >= 0 and float(image.max()) <= 1
    assert len(data["classification"]["train"].classes) == 10
    pairs = data["depth"]["test"]
    assert len(pairs) == 2 and all((p["relative_depth"] > 0).any() for p in pairs)
