"""adapt.transfer.common: checkpoint backbones and depth heads loaded exactly (through synth.checkpoint, each file
read once), seeding, and the backbone surgery every task model shares."""

import pytest
import torch

from adapt.transfer import (
    RANDOM,
    CheckpointError,
    build_classifier,
    build_detector,
    build_segmenter,
    load_backbone,
    load_depth_head,
    load_objective_state,
    train_segmenter,
)
from synth.backbone import Backbone
from synth.checkpoint import Checkpoint


def test_random_backbone_is_seeded():
    a, b, c = load_backbone(None, seed=1), load_backbone(RANDOM, seed=1), load_backbone(None, seed=2)
    w = "network.conv1.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])


def test_seeding_leaves_the_global_generator_alone(sets):
    before = torch.get_rng_state()
    model = build_segmenter(load_backbone(None, seed=1), 3, head="fcn", seed=1)  # FCNHead has dropout
    train_segmenter(model, sets.MaskSet(), steps=1, batch_size=2, size=32)
    assert torch.equal(torch.get_rng_state(), before)


def test_checkpoint_loads_backbone_and_depth_head_exactly(sets, pretrained):
    path, state = pretrained
    loaded = load_backbone(path).state_dict()
    expected = sets.backbone_state(state)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert load_backbone(path.parent).arch == "resnet18"  # a folder holding last.pt works too

    kwargs, head_state = load_objective_state(path, "depth")
    assert kwargs == sets.DEPTH_KWARGS
    head = load_depth_head(path)
    assert head.decoder.predict.in_channels == 16
    assert all(torch.equal(head.state_dict()[k], v) for k, v in head_state.items())
    with pytest.raises(CheckpointError, match=r"no objective 'normal'.*depth"):
        load_objective_state(path, "normal")
    with pytest.raises(CheckpointError, match=r"resnet18.*resnet50"):
        load_backbone(path, arch="resnet50")


def test_checkpoint_with_wrong_keys_is_a_clear_error(sets, pretrained, tmp_path):
    _, state = pretrained
    missing = sets.write_checkpoint(tmp_path / "missing.pt",
                               {k: v for k, v in state.items() if k != "backbone.network.layer3.0.conv1.weight"})
    with pytest.raises(CheckpointError, match=r"missing\.pt.*missing 1: network\.layer3\.0\.conv1\.weight"):
        load_backbone(missing)
    extra = sets.write_checkpoint(tmp_path / "extra.pt", {**state, "backbone.network.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"extra\.pt.*unexpected 1: network\.extra\.weight"):
        load_backbone(extra)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_backbone(tmp_path / "nowhere.pt")


def test_every_head_holds_the_checkpoint_weights(sets, pretrained):
    path, state = pretrained
    backbone = load_backbone(path)
    network = {k.removeprefix("network."): v for k, v in sets.backbone_state(state).items()}
    for norm in ("batch", "frozen"):
        detector = build_detector(backbone, num_classes=2, fpn_channels=32, norm=norm)
        sets.assert_holds_network(detector.backbone.body.state_dict(), network)
    for head in ("fpn", "fcn", "deeplabv3"):
        sets.assert_holds_network(build_segmenter(backbone, 3, head=head).body.state_dict(), network)
    classifier = build_classifier(backbone, 2)
    sets.assert_holds_network({k.removeprefix("network."): v for k, v in classifier.backbone.state_dict().items()},
                         network)
    # The task models hold copies: training them leaves the loaded backbone as it was.
    assert detector.backbone.body.conv1.weight.data_ptr() != backbone.network.conv1.weight.data_ptr()


def test_frozen_stages_do_not_train():
    detector = build_detector(Backbone("resnet18"), num_classes=2, fpn_channels=32, trainable_stages=2)
    trainable = {name.split(".")[2] for name, p in detector.backbone.body.named_parameters(prefix="backbone.body")
                 if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert type(detector.backbone.body.bn1).__name__ == "FrozenBatchNorm2d"



def test_a_read_checkpoint_loads_without_reading_the_file_again(sets, pretrained, monkeypatch):
    path, state = pretrained
    calls = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: calls.append(args[0]) or load(*args, **kwargs))
    checkpoint = Checkpoint.read(path)
    backbone, head = load_backbone(checkpoint), load_depth_head(checkpoint)
    kwargs, _ = load_objective_state(checkpoint, "depth")
    assert calls == [path]
    assert kwargs == sets.DEPTH_KWARGS and head.decoder.predict.in_channels == 16
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in sets.backbone_state(state).items())
