"""`synth` command line: bad input gives one clear line naming the key or file, and writes nothing."""

import subprocess
import sys

import pytest

from apps.cli import main


@pytest.mark.parametrize(("args", "expected"), [
    (["scene.foo=1"], "Key 'foo' not in"),
    (["scene.views=abc"], "scene.views"),
    (["scene.camera_distance=[5,1]"], "scene.camera_distance: min 5.0 is larger than max 1.0"),
    (["scene=nope"], "Could not find 'scene/nope'"),
    (["scene.mesh_dir=/does/not/exist"], "/does/not/exist"),
    (["scene.fov_deg=3", "scene.max_tries=10"], "no camera pose keeps all objects in view"),
    (["render.width=0"], "render.width"),
    (["shard=7"], "shard=7 is out of range"),
    (["n_frames=0"], "n_frames"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path, monkeypatch, capsys, args, expected):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "data"
    assert main(["render", f"out_dir={out}", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "nothing is written, not even Hydra's output folder"


def test_a_bad_key_in_a_config_file_names_the_file(tmp_path, monkeypatch, capsys):
    import apps.launch as launch

    configs = tmp_path / "configs"
    import shutil

    shutil.copytree(launch.CONFIG_DIR, configs)
    with open(configs / "scene" / "room.yaml", "a") as f:
        f.write("camera_hieght: [1, 2]\n")
    monkeypatch.setattr(launch, "CONFIG_DIR", configs)
    monkeypatch.chdir(tmp_path)
    assert main(["render", "scene=room", f"out_dir={tmp_path / 'data'}"]) == 2
    err = capsys.readouterr().err
    assert "camera_hieght" in err and str(configs / "scene" / "room.yaml") in err


def test_unknown_command_and_help():
    assert main(["paint"]) == 2
    assert main(["--help"]) == 0


def test_print_config_goes_through_hydra(tmp_path):
    result = subprocess.run([sys.executable, "-m", "apps.cli", "render", "--cfg", "job", "scene=room"],
                            cwd=tmp_path, capture_output=True, text=True, check=True)
    assert "_target_: synth.realistic.FurnishedRoomScene" in result.stdout
