"""Backbone: a torchvision classification network cut into named stages, the shared encoder of every objective.

Ren & Lee (CVPR 2018) pretrain one encoder with several decoders (depth, surface normals, instance contours) and
a domain discriminator attached to its layers. :class:`Backbone` wraps the torchvision module itself (not a copy
of its code), so a checkpoint's ``torchvision_model().state_dict()`` loads into torchvision's own model, and
exposes each stage's output by name so heads and discriminators can attach to any of them.
"""

from collections.abc import Sequence

import torch
import torchvision
from torch import Tensor, nn

#: Stage layout per architecture family: (stage name, total downsampling of its output).
_RESNET_STAGES = (("stem", 4), ("layer1", 4), ("layer2", 8), ("layer3", 16), ("layer4", 32))
_VGG_STAGES = (("block1", 2), ("block2", 4), ("block3", 8), ("block4", 16), ("block5", 32))

#: Channels of each stage's output, per supported architecture. Heads read this to size their lateral convs
#: from a plain ``backbone_arch`` keyword, without building a network; :class:`Backbone` checks its modules
#: against it.
STAGE_CHANNELS: dict[str, dict[str, int]] = {
    "resnet18": {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512},
    "resnet50": {"stem": 64, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048},
    "vgg16_bn": {"block1": 64, "block2": 128, "block3": 256, "block4": 512, "block5": 512},
}

ARCHS: tuple[str, ...] = tuple(STAGE_CHANNELS)


def stage_channels(arch: str) -> dict[str, int]:
    """Channels of each stage's output for ``arch``, without building the network.

    Raises:
        ValueError: ``arch`` is not one of :data:`ARCHS`.
    """
    if arch not in STAGE_CHANNELS:
        raise ValueError(f"backbone arch: unknown {arch!r}, expected one of {', '.join(ARCHS)}")
    return dict(STAGE_CHANNELS[arch])


def resolve_stage(owner: str, arch: str, stage: str | None) -> tuple[str, int]:
    """(stage name, its channels) for a head that reads one stage of an ``arch`` backbone; ``None`` is the last.

    Raises:
        ValueError: ``stage`` is not a stage of ``arch``; the message names ``owner``.
    """
    available = stage_channels(arch)
    stage = list(available)[-1] if stage is None else stage
    if stage not in available:
        raise ValueError(f"{owner}: stage {stage!r} is not one of {arch}'s {list(available)}")
    return stage, available[stage]


def resolve_stages(owner: str, arch: str, stages: Sequence[str] | None) -> dict[str, int]:
    """``{stage: channels}`` finest first, for a decoder over several stages; ``None`` is the last four.

    Raises:
        ValueError: a stage is unknown or none is given; the message names ``owner``.
    """
    available = stage_channels(arch)
    stages = tuple(available)[-4:] if stages is None else tuple(stages)
    unknown = [s for s in stages if s not in available]
    if unknown or not stages:
        raise ValueError(f"{owner}: stages {list(stages)} not among {arch}'s {list(available)}")
    # Finest first, whatever order they were given in, so a decoder's top-down path is well defined.
    return {s: available[s] for s in available if s in stages}


class Backbone(nn.Module):
    """A torchvision classification network built with ``weights=None``, cut into named stages.

    ResNets are cut into ``stem`` (conv1, bn1, relu, maxpool) and ``layer1`` .. ``layer4``; VGG16-BN's
    ``features`` is cut after each max-pool into ``block1`` .. ``block5``. The classification head (ResNet's
    ``fc``, VGG's ``classifier``) is replaced by :class:`~torch.nn.Identity`: no objective uses it, gradients
    would never reach it, and VGG's holds 120 M of its 135 M parameters. Every other parameter keeps its
    torchvision name under :meth:`torchvision_model`, so that module's ``state_dict()`` loads into a fresh
    torchvision model with only the head's keys missing.

    This is the shared encoder of Ren & Lee, "Cross-Domain Self-supervised Multi-task Feature Learning using
    Synthetic Imagery", CVPR 2018; each head owns its decoder.

    Args:
        arch: ``"resnet18"``, ``"resnet50"`` or ``"vgg16_bn"``.
        in_channels: input channels; other than 3, the first convolution is replaced by a freshly initialised
            one with the same shape otherwise (e.g. 1 for grey images or depth).

    Attributes:
        stage_names: the stages in order.
        stage_channels: channels of each stage's output.
        stage_strides: total downsampling of each stage's output relative to the input.
        out_channels: channels of the last stage.

    Shape:
        - Input: :math:`(B, C_{in}, H, W)`, with :math:`H, W` multiples of 32 for exact strides.
        - Output of stage :math:`s`: :math:`(B, C_s, H / r_s, W / r_s)` with :math:`C_s` =
          ``stage_channels[s]`` and :math:`r_s` = ``stage_strides[s]``.

    Examples:
        >>> import torch
        >>> backbone = Backbone("resnet18")
        >>> features = backbone(torch.zeros(2, 3, 64, 64), stages=["layer2"])
        >>> features["layer2"].shape
        torch.Size([2, 128, 8, 8])
        >>> backbone.pooled(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 512])
    """

    def __init__(self, arch: str = "resnet18", in_channels: int = 3):
        super().__init__()
        channels = stage_channels(arch)
        self.arch = arch
        self.in_channels = in_channels
        network = torchvision.models.get_model(arch, weights=None)
        if arch.startswith("resnet"):
            if in_channels != 3:
                old = network.conv1
                network.conv1 = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                          stride=old.stride, padding=old.padding, bias=False)
                # The same initialisation torchvision gives conv1.
                nn.init.kaiming_normal_(network.conv1.weight, mode="fan_out", nonlinearity="relu")
            network.fc = nn.Identity()
            stages = {"stem": (network.conv1, network.bn1, network.relu, network.maxpool),
                      "layer1": (network.layer1,), "layer2": (network.layer2,),
                      "layer3": (network.layer3,), "layer4": (network.layer4,)}
            strides = dict(_RESNET_STAGES)
        else:
            features = network.features
            if in_channels != 3:
                old = features[0]
                features[0] = nn.Conv2d(in_channels, old.out_channels, kernel_size=old.kernel_size,
                                        stride=old.stride, padding=old.padding)
                nn.init.kaiming_normal_(features[0].weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(features[0].bias)
            network.classifier = nn.Identity()
            # Cut after each max-pool, so block k's output is at stride 2**k like a ResNet's stages.
            stages, block = {}, []
            for module in features:
                block.append(module)
                if isinstance(module, nn.MaxPool2d):
                    stages[f"block{len(stages) + 1}"] = tuple(block)
                    block = []
            strides = dict(_VGG_STAGES)
        self.network = network
        # Plain tuples, not ModuleLists: the modules are registered once, under their torchvision names in
        # self.network, so the state dict keeps torchvision's keys.
        self._stage_modules: dict[str, tuple[nn.Module, ...]] = stages
        self.stage_names: tuple[str, ...] = tuple(stages)
        self.stage_strides: dict[str, int] = strides
        self.stage_channels: dict[str, int] = {name: _last_conv_channels(mods) for name, mods in stages.items()}
        if self.stage_channels != channels:
            raise AssertionError(f"{arch}: stage channels {self.stage_channels} differ from {channels}")
        self.out_channels: int = self.stage_channels[self.stage_names[-1]]

    def forward(self, x: Tensor, stages: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The outputs of the requested stages, computing nothing past the last one requested.

        Args:
            x: images :math:`(B, C_{in}, H, W)`.
            stages: names from :attr:`stage_names`, in any order; ``None`` means all.

        Returns:
            ``{stage: (B, C_s, H / r_s, W / r_s)}`` for the requested stages, in network order.

        Raises:
            KeyError: a requested stage is not one of :attr:`stage_names`.
        """
        wanted = set(self.stage_names if stages is None else stages)
        unknown = wanted.difference(self.stage_names)
        if unknown:
            raise KeyError(f"unknown backbone stage(s) {sorted(unknown)}; {self.arch} has {list(self.stage_names)}")
        outputs: dict[str, Tensor] = {}
        for name in self.stage_names:
            for module in self._stage_modules[name]:
                x = module(x)
            if name in wanted:
                outputs[name] = x
                if len(outputs) == len(wanted):
                    break
        return outputs

    def pooled(self, x: Tensor, stage: str | None = None) -> Tensor:
        """Global-average-pooled features of one stage.

        Args:
            x: images :math:`(B, C_{in}, H, W)`.
            stage: a name from :attr:`stage_names`; ``None`` means the last stage.

        Returns:
            :math:`(B, C_s)`.
        """
        stage = self.stage_names[-1] if stage is None else stage
        return self(x, stages=[stage])[stage].mean(dim=(2, 3))

    def torchvision_model(self) -> nn.Module:
        """The underlying torchvision module, sharing this backbone's parameters, for transfer code.

        Its classification head is :class:`~torch.nn.Identity` (see the class docstring); its ``state_dict()``
        keys are torchvision's.
        """
        return self.network


def _last_conv_channels(modules: Sequence[nn.Module]) -> int:
    """Output channels of the last convolution among ``modules`` and their children."""
    convs = [m for module in modules for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


@torch.no_grad()
def pooled_features(backbone: nn.Module, images: Tensor, stages: Sequence[str] | None = None, *,
                    batch_size: int = 64) -> dict[str, Tensor]:
    """Global-average-pooled features of several stages for a stack of images, in eval mode, on the CPU.

    The measuring tools (linear probes, domain-gap metrics, embedding plots) all read frozen features this way. The
    backbone runs on its own device in batches; its train/eval mode is restored afterwards.

    Args:
        backbone: A :class:`Backbone`.
        images: ImageNet-normalised images :math:`(N, 3, H, W)`.
        stages: Stage names; ``None`` means all.
        batch_size: Images per forward pass.

    Returns:
        ``{stage: (N, C_s)}`` float32 on the CPU.
    """
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    chunks: dict[str, list[Tensor]] = {}
    try:
        for start in range(0, len(images), batch_size):
            out = backbone(images[start:start + batch_size].to(device), stages=stages)
            for stage, value in out.items():
                chunks.setdefault(stage, []).append(value.float().mean(dim=(2, 3)).cpu())
    finally:
        backbone.train(was_training)
    return {stage: torch.cat(values) for stage, values in chunks.items()}


__all__ = ["ARCHS", "STAGE_CHANNELS", "Backbone", "pooled_features", "resolve_stage", "resolve_stages",
           "stage_channels"]
