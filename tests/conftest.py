"""Shared fixtures: a small dataset rendered once per test session with the real BlenderProc worker."""

import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="session")
def rendered_dataset(tmp_path_factory):
    """8 tabletop frames (4 scenes x 2 views) at 48x48, rendered by `synth render`."""
    root = tmp_path_factory.mktemp("dataset")
    out = root / "tabletop"
    subprocess.run([sys.executable, "-m", "apps.cli", "render", f"out_dir={out}", "n_frames=8", "seed=11",
                    "render.width=48", "render.height=48", "scene.views=2", "label_check.frames=1", "preview=false"],
                   cwd=root, check=True, capture_output=True, text=True)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread, restored after the test: ops on 32-64 px inputs have little to split, and on the shared
    2-core machine two threads wait for each other at every op (an overfit test took about 5 s on one thread and
    15-47 s on two). Packages of small-tensor tests turn it on for all their tests in their conftest."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
