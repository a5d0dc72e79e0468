"""Backbone: stage shapes and strides, early stop, pooling, input channels, torchvision state-dict compatibility."""

from copy import deepcopy

import pytest
import torch
import torchvision

from synth.backbone import ARCHS, STAGE_CHANNELS, Backbone, stage_channels

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def resnet18():
    return Backbone("resnet18")


@pytest.mark.parametrize(("arch", "size"), [("resnet18", 64), ("resnet50", 64), ("vgg16_bn", 32)])
def test_stage_shapes_and_strides(arch, size):
    backbone = Backbone(arch)
    expected_names = ("stem", "layer1", "layer2", "layer3", "layer4") if arch.startswith("resnet") else tuple(
        f"block{k}" for k in range(1, 6))
    assert backbone.stage_names == expected_names
    assert backbone.stage_channels == STAGE_CHANNELS[arch] == stage_channels(arch)
    assert backbone.out_channels == backbone.stage_channels[expected_names[-1]]
    expected_strides = (4, 4, 8, 16, 32) if arch.startswith("resnet") else (2, 4, 8, 16, 32)
    assert tuple(backbone.stage_strides[name] for name in expected_names) == expected_strides
    with torch.no_grad():
        features = backbone(torch.randn(2, 3, size, size))
    assert list(features) == list(expected_names)
    for name, feature in features.items():
        stride = backbone.stage_strides[name]
        assert feature.shape == (2, backbone.stage_channels[name], size // stride, size // stride), name


def test_requested_stages_only_and_early_stop(resnet18):
    calls = []
    handles = [getattr(resnet18.torchvision_model(), name).register_forward_hook(
        lambda module, args, output, name=name: calls.append(name)) for name in ("layer2", "layer3", "layer4")]
    try:
        with torch.no_grad():
            features = resnet18(torch.randn(2, 3, 64, 64), stages=["layer2", "stem"])
            assert list(features) == ["stem", "layer2"]
            assert calls == ["layer2"], "layer3 and layer4 must not run when layer2 is the last stage requested"
            calls.clear()
            resnet18(torch.randn(2, 3, 64, 64), stages=["layer3"])
            assert calls == ["layer2", "layer3"]
    finally:
        for handle in handles:
            handle.remove()
    with pytest.raises(KeyError, match="layer9"):
        resnet18(torch.randn(1, 3, 64, 64), stages=["layer9"])


def test_pooled(resnet18):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert resnet18.pooled(x).shape == (2, 512)
        layer2 = resnet18.pooled(x, stage="layer2")
        assert layer2.shape == (2, 128)
        torch.testing.assert_close(layer2, resnet18(x, stages=["layer2"])["layer2"].mean(dim=(2, 3)))


def test_one_input_channel():
    backbone = Backbone("resnet18", in_channels=1)
    assert backbone.torchvision_model().conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        features = backbone(torch.randn(2, 1, 64, 64))
    assert features["layer4"].shape == (2, 512, 2, 2)
    assert backbone.pooled(torch.randn(2, 1, 64, 64)).shape == (2, 512)


def test_state_dict_loads_into_torchvision_resnet18(resnet18):
    reference = torchvision.models.resnet18(weights=None)
    result = reference.load_state_dict(resnet18.torchvision_model().state_dict(), strict=False)
    # Only the classification head, which the backbone drops, is missing.
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    assert result.unexpected_keys == []
    # The other way round, strictly: a torchvision checkpoint minus its head loads into the backbone.
    reference_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    resnet18.torchvision_model().load_state_dict(reference_state, strict=True)
    # Same weights, same function: the stages compose to torchvision's own forward pass.
    reference.fc = torch.nn.Identity()
    reference.eval()
    resnet18.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(resnet18.pooled(x), reference(x))
    resnet18.train()


def test_every_arch_keeps_torchvision_parameter_names():
    for arch in ARCHS:
        # Built on the meta device: names and shapes without the cost of initialising VGG's classifier.
        with torch.device("meta"):
            reference = torchvision.models.get_model(arch, weights=None)
            backbone = Backbone(arch)
        head = "fc." if arch.startswith("resnet") else "classifier."
        expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith(head)}
        assert {k: v.shape for k, v in backbone.torchvision_model().state_dict().items()} == expected, arch


def test_deep_copy_runs_its_own_parameters(resnet18):
    # Momentum encoders and EMA teachers deep-copy the backbone: the copy's stages must use the copy's weights.
    copy = deepcopy(resnet18)
    with torch.no_grad():
        copy.torchvision_model().layer1[0].conv1.weight.zero_()
        x = torch.randn(2, 3, 64, 64)
        assert not torch.equal(copy(x, stages=["layer1"])["layer1"], resnet18(x, stages=["layer1"])["layer1"])
    assert resnet18.torchvision_model().layer1[0].conv1.weight.abs().sum() > 0


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet18"):
        Backbone("alexnet")
