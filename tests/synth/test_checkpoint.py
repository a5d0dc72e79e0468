"""synth.checkpoint: the engine's checkpoint format written atomically, read once, decoded by prefix; a file that
is no checkpoint is one line naming it and what to do."""

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from synth.backbone import Backbone
from synth.checkpoint import Checkpoint, CheckpointError, read_checkpoint, resolve_checkpoint, save_checkpoint
from synth.engine import Engine, TrainerSettings


class Head(nn.Module):
    """A minimal objective: one linear layer on pooled features."""

    domains = ("synthetic",)

    def __init__(self, channels: int = 4):
        super().__init__()
        self.linear = nn.Linear(512, channels)

    def forward(self, batch, backbone):
        return {"loss": self.linear(batch["features"]["layer4"].mean((2, 3))).square().mean()}


def make_engine(out_dir, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone, head = Backbone("resnet18"), Head()
    config = {"model": {"arch": "resnet18", "in_channels": 3},
              "objective": {"head": {"_target_": "tests.Head", "weight": 2.0, "channels": 4}}}
    return Engine(backbone=backbone, objectives={"head": head}, weights={"head": 2.0},
                  datasets={"synthetic": [None]}, settings=TrainerSettings(device="cpu", steps=3),
                  out_dir=out_dir, config=config)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """An engine and the checkpoint it wrote (at step 7)."""
    out = tmp_path_factory.mktemp("run")
    engine = make_engine(out)
    engine.step = 7
    engine.save()
    return engine, out / "checkpoints" / "last.pt"


def test_engine_checkpoint_round_trip(saved):
    engine, path = saved
    assert not list(path.parent.glob(".tmp-*"))  # written under a temporary name, then renamed
    checkpoint = Checkpoint.read(path)
    assert (checkpoint.path, checkpoint.step, checkpoint.arch, checkpoint.in_channels) == (path, 7, "resnet18", 3)
    assert checkpoint.objectives == ("head",)
    expected = engine.model.backbone.state_dict()
    loaded = checkpoint.backbone_state()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    node, state = checkpoint.objective_state("head")
    assert node == {"_target_": "tests.Head", "weight": 2.0, "channels": 4}
    assert state.keys() == {"linear.weight", "linear.bias"}
    with pytest.raises(CheckpointError, match=r"last\.pt: no objective 'depth'; it has \['head'\]"):
        checkpoint.objective_state("depth")
    # A run folder names its last checkpoint; a Checkpoint passes through without a read.
    assert resolve_checkpoint(path.parent.parent) == path
    assert Checkpoint.read(checkpoint) is checkpoint


def test_engine_resumes_from_its_checkpoint(saved):
    _, path = saved
    resumed = make_engine(path.parent.parent, seed=1)
    assert resumed.resume() and resumed.step == 7
    original = Checkpoint.read(path).backbone_state()
    assert all(torch.equal(v, original[k]) for k, v in resumed.model.backbone.state_dict().items())


def test_a_checkpoint_is_read_once(saved, monkeypatch):
    _, path = saved
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(args[0]) or load(*args, **kwargs))
    checkpoint = Checkpoint.read(path)
    checkpoint.arch, checkpoint.backbone_state(), checkpoint.objective_state("head"), checkpoint.objectives
    assert calls == [path]


def not_checkpoints(folder):
    """Files that are no engine checkpoint, each with the reason the message should give."""
    good = folder / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    files = {"truncated.pt": (good.read_bytes()[: good.stat().st_size // 2], "failed reading zip archive"),
             "random.pt": (bytes(range(256)) * 8, "not tensors and plain data: Unsupported operand"),
             "empty.pt": (b"", "the file is empty"),
             "pickle.pt": (pickle.dumps({"x": 1}), "not tensors and plain data: Unsupported operand")}
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    torch.save({"step": 3, "optimizer": {}}, folder / "no_model.pt")
    torch.save([torch.zeros(2)], folder / "list.pt")
    reasons = {name: reason for name, (_, reason) in files.items()}
    return {**reasons, "no_model.pt": "no 'model' state dict", "list.pt": "holds a list, not a dict"}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it(tmp_path):
    for name, reason in not_checkpoints(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(CheckpointError) as caught:
            Checkpoint.read(path)
        message = str(caught.value)
        assert len(message.splitlines()) == 1, message
        assert message.startswith(f"{path} is not a readable synth pretrain checkpoint"), message
        assert "delete it to start over, or point checkpoint= at another file" in message
        assert reason in message, message
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_checkpoint(tmp_path / "nowhere.pt")


def test_engine_resume_names_a_torn_checkpoint(tmp_path):
    engine = make_engine(tmp_path)
    engine.checkpoint_path.parent.mkdir(parents=True)
    engine.checkpoint_path.write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(CheckpointError, match=r"checkpoints/last\.pt is not a readable synth pretrain checkpoint"):
        engine.resume()


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "last.pt"
    save_checkpoint({"step": 1, "model": {}}, path)

    def fail(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(RuntimeError, match="killed"):
        save_checkpoint({"step": 2, "model": {}}, path)
    assert read_checkpoint(path)["step"] == 1  # the previous checkpoint is untouched, no temporary file left
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
