"""Shared fixtures: a small dataset rendered once per test session with the real BlenderProc worker."""

import subprocess
import sys

import pytest


@pytest.fixture(scope="session")
def rendered_dataset(tmp_path_factory):
    """8 tabletop frames (4 scenes x 2 views) at 48x48, rendered by `synth render`."""
    root = tmp_path_factory.mktemp("dataset")
    out = root / "tabletop"
    subprocess.run([sys.executable, "-m", "synth.cli", "render", f"out_dir={out}", "n_frames=8", "seed=11",
                    "render.width=48", "render.height=48", "scene.views=2", "label_check.frames=1", "preview=false"],
                   cwd=root, check=True, capture_output=True, text=True)
    return out
