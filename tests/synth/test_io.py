"""Atomic writes (synth.io) and the run-time helpers (synth.runtime)."""

import errno
import os
import subprocess
import sys

import pytest
import torch

from synth.io import (
    DiskFullError,
    atomic_path,
    atomic_write_json,
    atomic_write_text,
    clear_stale_temporaries,
    temporary_name,
)
from synth.runtime import build_optimizer, resolve_device


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"x": 1})
    assert path.read_text() == '{"x": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_failure_keeps_old_file_and_removes_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("good")
    with pytest.raises(KeyError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise KeyError("writer died")
    assert path.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_disk_full_is_named(tmp_path):
    path = tmp_path / "last.pt"
    with pytest.raises(DiskFullError, match=f"disk full while writing {path}"), atomic_path(path) as tmp:
        tmp.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not any(tmp_path.iterdir())


def test_stale_temporaries_of_dead_writers_are_cleared(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".tmp-{int(dead.stdout)}-last.pt"
    stale.write_bytes(b"half")
    alive = tmp_path / f".tmp-{os.getppid()}-last.pt"  # a live process (our parent)
    alive.write_bytes(b"in progress")
    keep = tmp_path / "last.pt"
    keep.write_bytes(b"good")
    assert clear_stale_temporaries(tmp_path) == [stale]
    assert alive.exists() and keep.exists() and not stale.exists()
    assert temporary_name(keep).name == f".tmp-{os.getpid()}-last.pt"


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_build_optimizer():
    parameters = [torch.nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer(parameters, "sgd", lr=0.1, weight_decay=0.0, nesterov=True)
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"]
    assert isinstance(build_optimizer(parameters, "adamw", lr=0.1, weight_decay=0.0), torch.optim.AdamW)
    with pytest.raises(ValueError, match="optimizer: expected one of"):
        build_optimizer(parameters, "adam", lr=0.1, weight_decay=0.0)
