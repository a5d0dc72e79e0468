r"""Image-level adaptation: translate rendered images so they look real, keeping every label of the frame.

CycleGAN (Zhu, Park, Isola & Efros, "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial
Networks", ICCV 2017) learns two generators, :math:`G: A \to B` (rendered to real) and :math:`F: B \to A`, against
two discriminators :math:`D_B` and :math:`D_A`, with least-squares GAN losses (Mao et al., ICCV 2017), cycle and
identity L1 terms, and a history pool of 50 past translations per discriminator (Shrivastava et al., CVPR 2017).

Plain CycleGAN distorts objects. OP-GAN (Xie, Chen, Huang, Liu & Chen, "Self-Supervised CycleGAN for
Object-Preserving Image-to-Image Domain Adaptation", ECCV 2020) adds a multi-task self-supervised Siamese network
:math:`S` (:class:`ObjectPreservingSiamese`): the original and the translated image are each cut into a 3x3 grid of
patches, pairs of patches are drawn at random (:func:`sample_patch_pairs`), and :math:`S`'s weight-sharing encoder
splits each patch's features into content and domain features. The content features give a per-patch attention
map that must agree between the two patches at the same position (:func:`content_consistency_loss`); the
concatenated domain features of a pair are classified into three classes (both patches from the original, both
from the translation, or the same position across the two; :func:`domain_classification_loss`). Training
alternates (:class:`CycleTranslator`): with :math:`D` and :math:`S` frozen the generators minimise the GAN, cycle,
identity and :math:`S` losses; then with the generators frozen :math:`D` and :math:`S` are updated.

Optionally, a CyCADA-style task-consistency term (Hoffman et al., "CyCADA: Cycle-Consistent Adversarial Domain
Adaptation", ICML 2018) asks the frozen synthetic heads of a ``synth pretrain`` checkpoint (depth, normals,
contours) to predict the same maps on a rendered frame and on its translation (:class:`LabelConsistency`).

Images inside this module are in :math:`[-1, 1]` (the generators end with tanh); :func:`to_unit_range` and
:func:`to_imagenet` convert from and to the ImageNet-normalised tensors of :mod:`synth.data`.
"""

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.synthetic import ContourHead, DepthHead, NormalHead, SyntheticObjective
from synth.backbone import Backbone
from synth.constants import IMAGENET_MEAN, IMAGENET_STD

#: The synthetic heads a label-consistency term can use, by their ``synth pretrain`` objective name.
LABEL_HEADS = {"depth": DepthHead, "normal": NormalHead, "contour": ContourHead}

#: The three classes of OP-GAN's domain classification, by index.
PAIR_CLASSES = ("both_original", "both_translated", "same_position")


# ---------------------------------------------------------------------------------------------------------------
# Value ranges
# ---------------------------------------------------------------------------------------------------------------


def _stats(like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=like.dtype, device=like.device).view(1, 3, 1, 1)
    return mean, std


def to_unit_range(images: Tensor) -> Tensor:
    r"""ImageNet-normalised images (as :mod:`synth.data` gives them) to :math:`[-1, 1]`:
    :math:`2 (x \sigma + \mu) - 1`. Shape :math:`(B, 3, H, W)`."""
    mean, std = _stats(images)
    return (images * std + mean) * 2.0 - 1.0


def to_imagenet(images: Tensor) -> Tensor:
    r"""Images in :math:`[-1, 1]` to ImageNet normalisation: :math:`((x + 1) / 2 - \mu) / \sigma`.
    Shape :math:`(B, 3, H, W)`."""
    mean, std = _stats(images)
    return ((images + 1.0) * 0.5 - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with instance norm and a skip connection (CycleGAN's block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels), nn.ReLU(True),
            nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3), nn.InstanceNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    r"""CycleGAN's ResNet generator (Johnson et al., ECCV 2016, as in Zhu et al., ICCV 2017).

    A reflection-padded 7x7 convolution, ``downsampling`` stride-2 convolutions (each doubling the width),
    ``blocks`` :class:`ResidualBlock`\ s, as many transposed convolutions back to full resolution, and a
    reflection-padded 7x7 convolution with tanh. Instance norm and ReLU after every convolution but the last.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        width: Channels of the first convolution (CycleGAN: 64).
        blocks: Residual blocks (CycleGAN: 9 at 256 px, 6 at 128 px).
        downsampling: Stride-2 stages; input sides must be multiples of :math:`2^{\text{downsampling}}`
            (:meth:`translate` pads any size).

    Shape:
        - Input: :math:`(B, C_{in}, H, W)` in :math:`[-1, 1]`, :math:`H, W` multiples of :math:`2^d`, at least
          :math:`4 \cdot 2^d`.
        - Output: :math:`(B, C_{out}, H, W)` in :math:`[-1, 1]`.

    Examples:
        >>> generator = ResnetGenerator(width=8, blocks=2)
        >>> generator(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = 32, blocks: int = 6,
                 downsampling: int = 2):
        super().__init__()
        if width < 1 or blocks < 0 or downsampling < 0:
            raise ValueError(f"need width >= 1, blocks >= 0, downsampling >= 0; got {width}, {blocks}, {downsampling}")
        self.downsampling = downsampling
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, width, 7), nn.InstanceNorm2d(width),
                                   nn.ReLU(True)]
        channels = width
        for _ in range(downsampling):
            layers += [nn.Conv2d(channels, channels * 2, 3, stride=2, padding=1), nn.InstanceNorm2d(channels * 2),
                       nn.ReLU(True)]
            channels *= 2
        layers += [ResidualBlock(channels) for _ in range(blocks)]
        for _ in range(downsampling):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(channels // 2), nn.ReLU(True)]
            channels //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(channels, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def translate(self, x: Tensor) -> Tensor:
        """:meth:`forward` on any size: reflection-pads to a multiple of :math:`2^d` (at least 4 of them) and crops
        back. Shape :math:`(B, C, H, W) \\to (B, C_{out}, H, W)`."""
        multiple = 2 ** self.downsampling
        height, width = x.shape[-2:]
        target_h = max(-(-height // multiple) * multiple, 4 * multiple)
        target_w = max(-(-width // multiple) * multiple, 4 * multiple)
        if (target_h, target_w) == (height, width):
            return self(x)
        padded = F.pad(x, (0, target_w - width, 0, target_h - height), mode="replicate")
        return self(padded)[..., :height, :width]


class PatchGANDiscriminator(nn.Module):
    r"""The 70x70 PatchGAN of pix2pix and CycleGAN (Isola et al., CVPR 2017): one real/fake score per patch.

    A 4x4 stride-2 convolution with LeakyReLU(0.2), ``layers - 1`` more with instance norm (width doubling, at most
    8x), a 4x4 stride-1 convolution with instance norm, and a 4x4 stride-1 convolution to one score. With
    ``layers=3`` each score sees 70x70 input pixels; on 32-pixel inputs the map is 2x2 (use ``layers=2`` at 16 px).
    No sigmoid: the scores go to :func:`lsgan_loss`.

    Args:
        in_channels: Input channels.
        width: Channels of the first convolution (CycleGAN: 64).
        layers: Stride-2 convolutions.

    Shape:
        - Input: :math:`(B, C, H, W)` in :math:`[-1, 1]`, :math:`H, W \ge 2^{\text{layers}+2}`.
        - Output: :math:`(B, 1, H / 2^{\text{layers}} - 2, W / 2^{\text{layers}} - 2)` (for sides divisible by
          :math:`2^{\text{layers}}`).

    Examples:
        >>> PatchGANDiscriminator(width=8)(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 1, 6, 6])
    """

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        if width < 1 or layers < 1:
            raise ValueError(f"need width >= 1 and layers >= 1, got {width} and {layers}")
        self.layers = layers
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = width
        for n in range(1, layers + 1):
            out = width * min(2 ** n, 8)
            stride = 2 if n < layers else 1
            blocks += [nn.Conv2d(channels, out, 4, stride=stride, padding=1), nn.InstanceNorm2d(out),
                       nn.LeakyReLU(0.2, True)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.model = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        minimum = 2 ** (self.layers + 2)
        if min(x.shape[-2:]) < minimum:
            raise ValueError(f"PatchGANDiscriminator with layers={self.layers} needs sides >= {minimum}, got "
                             f"{tuple(x.shape[-2:])}: use fewer layers or larger images")
        return self.model(x)


class ObjectPreservingSiamese(nn.Module):
    r"""OP-GAN's multi-task self-supervised Siamese network :math:`S` (Xie et al., ECCV 2020).

    One encoder (the two branches share its weights) maps a patch to features that are split channel-wise into
    content features (the first ``content_channels``) and domain features (the rest). Content registration: a 1x1
    convolution and a sigmoid on the content features give a content attention map, bilinearly interpolated to
    the patch size. Domain classification: the globally pooled domain features of the two patches of a pair are
    concatenated and a two-layer MLP scores the pair's three classes (:data:`PAIR_CLASSES`).

    The encoder has no normalisation layer: batch statistics would mix original and translated patches.

    Args:
        in_channels: Patch channels.
        width: Channels of the encoder's first convolution; its output has ``2 * width`` channels.
        content_channels: Of those, how many are content features (the rest are domain features).

    Inputs: ``first``, ``second``
        - **first**, **second**: the two patches of each pair, :math:`(N, C, P, P)`.

    Shape:
        - Output: ``{"attention_first": (N, 1, P, P), "attention_second": (N, 1, P, P), "logits": (N, 3)}``,
          attention in :math:`(0, 1)`.

    Examples:
        >>> siamese = ObjectPreservingSiamese(width=8)
        >>> out = siamese(torch.zeros(5, 3, 10, 10), torch.zeros(5, 3, 10, 10))
        >>> out["attention_first"].shape, out["logits"].shape
        (torch.Size([5, 1, 10, 10]), torch.Size([5, 3]))
    """

    def __init__(self, in_channels: int = 3, width: int = 32, content_channels: int | None = None):
        super().__init__()
        features = 2 * width
        content_channels = width if content_channels is None else content_channels
        if not 0 < content_channels < features:
            raise ValueError(f"content_channels must be in (0, {features}), got {content_channels}")
        self.content_channels = content_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(width, features, 3, stride=2, padding=1), nn.LeakyReLU(0.2, True),
            nn.Conv2d(features, features, 3, padding=1), nn.LeakyReLU(0.2, True))
        self.attention = nn.Conv2d(content_channels, 1, 1)
        domain_channels = features - content_channels
        self.classifier = nn.Sequential(nn.Linear(2 * domain_channels, domain_channels), nn.ReLU(True),
                                        nn.Linear(domain_channels, len(PAIR_CLASSES)))

    def encode(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        """``(attention (N, 1, P, P), pooled domain features (N, C_d))`` of a batch of patches."""
        features = self.encoder(patches)
        content, domain = features[:, :self.content_channels], features[:, self.content_channels:]
        attention = torch.sigmoid(F.interpolate(self.attention(content), size=patches.shape[-2:], mode="bilinear",
                                                align_corners=False))
        return attention, domain.mean(dim=(2, 3))

    def forward(self, first: Tensor, second: Tensor) -> dict[str, Tensor]:
        # One pass over both sides: the branches share weights, and one batch is cheaper than two.
        attention, domain = self.encode(torch.cat([first, second]))
        n = len(first)
        logits = self.classifier(torch.cat([domain[:n], domain[n:]], dim=1))
        return {"attention_first": attention[:n], "attention_second": attention[n:], "logits": logits}


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def lsgan_loss(scores: Tensor, target: float) -> Tensor:
    r"""Least-squares GAN loss (Mao et al., ICCV 2017), as CycleGAN uses it:
    :math:`\frac{1}{n}\sum_i (s_i - t)^2` over every patch score, with :math:`t = 1` for real and 0 for fake.

    Shape:
        - scores: any, e.g. :math:`(B, 1, h, w)`; output: scalar (float32).
    """
    return (scores.float() - target).square().mean()


def cycle_consistency_loss(reconstructed: Tensor, original: Tensor) -> Tensor:
    r"""CycleGAN's cycle loss for one direction: :math:`\frac{1}{n}\sum |F(G(x)) - x|` (mean absolute error).

    Shape:
        - reconstructed, original: :math:`(B, C, H, W)`; output: scalar.
    """
    return (reconstructed.float() - original.float()).abs().mean()


def identity_loss(mapped: Tensor, original: Tensor) -> Tensor:
    r"""CycleGAN's identity loss for one generator: :math:`\frac{1}{n}\sum |G(y) - y|` for :math:`y` already in the
    generator's output domain (keeps colours when there is nothing to change).

    Shape:
        - mapped, original: :math:`(B, C, H, W)`; output: scalar.
    """
    return (mapped.float() - original.float()).abs().mean()


def content_consistency_loss(attention_original: Tensor, attention_translated: Tensor) -> Tensor:
    r"""OP-GAN's content-registration loss: the pixel-wise squared difference of the content attention maps of two
    patches at the same position in the original and the translated image,
    :math:`\frac{1}{n}\sum_{i,u} (a_i(u) - a'_i(u))^2`.

    Shape:
        - attention_original, attention_translated: :math:`(N, 1, P, P)`; output: scalar (0 when :math:`N = 0`).
    """
    if attention_original.numel() == 0:
        return attention_original.new_zeros(()).float()
    return (attention_original.float() - attention_translated.float()).square().mean()


def domain_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    r"""OP-GAN's pair classification loss: the cross-entropy
    :math:`-\frac{1}{N}\sum_i \log \mathrm{softmax}(z_i)_{y_i}` over the three pair classes
    (:data:`PAIR_CLASSES`).

    Shape:
        - logits: :math:`(N, 3)`; labels: :math:`(N,)` int64 in :math:`\{0, 1, 2\}`; output: scalar.
    """
    return F.cross_entropy(logits.float(), labels)


# ---------------------------------------------------------------------------------------------------------------
# Patches and pairs
# ---------------------------------------------------------------------------------------------------------------


def grid_patches(images: Tensor, grid: int = 3) -> Tensor:
    r"""Cut each image into a ``grid`` x ``grid`` grid of square patches of side :math:`P = \min(H, W) //`
    ``grid``; patch :math:`k` is row :math:`k //` grid, column :math:`k \bmod` grid, its top-left corner at
    :math:`(\text{row} \cdot P, \text{col} \cdot P)` (a remainder at the right and bottom is left out).

    Shape:
        - images: :math:`(B, C, H, W)`; output: :math:`(B, \text{grid}^2, C, P, P)`.
    """
    side = min(images.shape[-2:]) // grid
    if side < 1:
        raise ValueError(f"grid_patches: images of {tuple(images.shape[-2:])} px are too small for a "
                         f"{grid}x{grid} grid")
    crop = images[..., :grid * side, :grid * side]
    batch, channels = crop.shape[:2]
    patches = crop.reshape(batch, channels, grid, side, grid, side).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, grid * grid, channels, side, side)


@dataclass(frozen=True)
class PatchPairs:
    """Pairs of grid patches drawn by :func:`sample_patch_pairs`, each field an :math:`(N,)` int64 tensor.

    Attributes:
        image: Which image of the batch (original and translation of the same frame).
        first_position, second_position: Grid positions in :math:`[0, \\text{grid}^2)`.
        first_translated, second_translated: 1 where the patch comes from the translated image, 0 from the original.
        label: The pair's class: 0 both from the original, 1 both from the translation, 2 the same position across
            the two (:data:`PAIR_CLASSES`).
    """

    image: Tensor
    first_position: Tensor
    second_position: Tensor
    first_translated: Tensor
    second_translated: Tensor
    label: Tensor


def sample_patch_pairs(batch_size: int, pairs_per_image: int, generator: torch.Generator,
                       grid: int = 3) -> PatchPairs:
    r"""Draw OP-GAN's patch pairs: for every image, ``pairs_per_image`` pairs with a uniformly drawn class.

    - class 0: two distinct positions, both from the original;
    - class 1: two distinct positions, both from the translation;
    - class 2: one position, the original's patch and the translation's, in a random order.

    Every draw comes from ``generator``, in a fixed number of draws per call.

    Returns:
        :class:`PatchPairs` with :math:`N = B \cdot` ``pairs_per_image`` pairs, image-major.
    """
    if batch_size < 1 or pairs_per_image < 1 or grid < 2:
        raise ValueError(f"need batch_size >= 1, pairs_per_image >= 1, grid >= 2; got {batch_size}, "
                         f"{pairs_per_image}, {grid}")
    n, cells = batch_size * pairs_per_image, grid * grid
    image = torch.arange(batch_size).repeat_interleave(pairs_per_image)
    label = torch.randint(0, 3, (n,), generator=generator)
    first = torch.randint(0, cells, (n,), generator=generator)
    # A distinct second position: an offset in [1, cells) modulo cells.
    offset = torch.randint(1, cells, (n,), generator=generator)
    swap = torch.randint(0, 2, (n,), generator=generator)
    same = label == 2
    second = torch.where(same, first, (first + offset) % cells)
    first_translated = torch.where(same, swap, (label == 1).long())
    second_translated = torch.where(same, 1 - swap, (label == 1).long())
    return PatchPairs(image=image, first_position=first, second_position=second, first_translated=first_translated,
                      second_translated=second_translated, label=label)


def gather_pairs(original: Tensor, translated: Tensor, pairs: PatchPairs) -> tuple[Tensor, Tensor]:
    r"""The two patches of each pair, from the grid patches of the originals and of their translations.

    Shape:
        - original, translated: :math:`(B, K, C, P, P)` (:func:`grid_patches`); output: two :math:`(N, C, P, P)`.
    """
    stacked = torch.stack([original, translated], dim=1)  # (B, 2, K, C, P, P)
    device = original.device
    image = pairs.image.to(device)

    def side(translated_flag: Tensor, position: Tensor) -> Tensor:
        return stacked[image, translated_flag.to(device), position.to(device)]

    return (side(pairs.first_translated, pairs.first_position),
            side(pairs.second_translated, pairs.second_position))


def siamese_losses(siamese: ObjectPreservingSiamese, original: Tensor, translated: Tensor, pairs: PatchPairs,
                   grid: int = 3) -> dict[str, Tensor]:
    """OP-GAN's two self-supervised losses on a batch of originals and their translations.

    The content-consistency loss is taken over the same-position pairs only (class 2), where the original's
    patch and the translation's must have the same attention map; the domain classification over all pairs.

    Shape:
        - original, translated: :math:`(B, C, H, W)`.
        - Output: ``{"content": scalar, "domain": scalar, "domain_acc": scalar}``.
    """
    first, second = gather_pairs(grid_patches(original, grid), grid_patches(translated, grid), pairs)
    out = siamese(first, second)
    same = (pairs.label == 2).to(original.device)
    # Order the same-position pairs as (original, translation); the loss is symmetric, the order is for clarity.
    content = content_consistency_loss(out["attention_first"][same], out["attention_second"][same])
    labels = pairs.label.to(original.device)
    domain = domain_classification_loss(out["logits"], labels)
    accuracy = (out["logits"].detach().argmax(1) == labels).float().mean()
    return {"content": content, "domain": domain, "domain_acc": accuracy}


# ---------------------------------------------------------------------------------------------------------------
# History pool
# ---------------------------------------------------------------------------------------------------------------


class ImagePool:
    """CycleGAN's history of generated images (Shrivastava et al., CVPR 2017): the discriminator sees a mix of the
    newest translations and older ones, so it does not forget what the generator did before.

    While fewer than ``size`` images are stored, every new image is stored and returned. Then each new image is,
    with probability 1/2, returned as it is; otherwise a uniformly drawn stored image is returned and the new one
    takes its place. Every draw comes from the ``generator`` passed in (a fixed number per image), and the stored
    images are :meth:`state_dict`, so a resumed run continues exactly.

    Args:
        size: Images kept (CycleGAN: 50); 0 returns the images unchanged.

    Shape:
        - query: :math:`(B, C, H, W)` (detached, kept on their device); output: the same shape.
    """

    def __init__(self, size: int = 50):
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self.images: list[Tensor] = []

    def query(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            use_old = bool(torch.rand((), generator=generator) < 0.5)
            slot = int(torch.randint(0, self.size, (), generator=generator))
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif use_old:
                slot %= len(self.images)
                out.append(self.images[slot].clone())
                self.images[slot] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict:
        return {"size": self.size, "images": torch.stack(self.images) if self.images else None}

    def load_state_dict(self, state: Mapping) -> None:
        images = state.get("images")
        self.images = [] if images is None else [image.clone() for image in images]


# ---------------------------------------------------------------------------------------------------------------
# Label consistency (CyCADA)
# ---------------------------------------------------------------------------------------------------------------


class LabelConsistency(nn.Module):
    r"""CyCADA's task consistency with the frozen synthetic heads of a ``synth pretrain`` checkpoint: a rendered
    frame and its translation must give the same predictions.

    With predictions :math:`h(x)` on the original and :math:`h(G(x))` on the translation:

    - depth: :math:`\frac{1}{n}\sum |\log \hat d(G(x)) - \log \hat d(x)|` (the head predicts log depth);
    - normals: :math:`\frac{1}{n}\sum (1 - \hat n(G(x)) \cdot \hat n(x))` on unit normals;
    - contours: :math:`\frac{1}{n}\sum |\sigma(c(G(x))) - \sigma(c(x))|` on contour probabilities.

    The backbone and heads stay in eval mode with ``requires_grad=False``; the gradient reaches the translation
    only. The original's predictions are computed without gradient.

    Args:
        backbone: The pretrained encoder.
        heads: Head name (``depth``, ``normal``, ``contour``) -> its :class:`~pretext.synthetic.SyntheticObjective`.

    Inputs: ``original``, ``translated``
        - :math:`(B, 3, H, W)` in :math:`[-1, 1]`.

    Shape:
        - Output: ``{<head>: scalar for each head, "loss": their mean}``.
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, SyntheticObjective]):
        super().__init__()
        unknown = sorted(set(heads) - set(LABEL_HEADS))
        if unknown or not heads:
            raise ValueError(f"label consistency: heads must be a non-empty subset of {list(LABEL_HEADS)}, got "
                             f"{sorted(heads)}")
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LabelConsistency":
        return super().train(False)  # frozen: batch-norm statistics never move

    def _predict(self, images: Tensor) -> dict[str, Tensor]:
        batch = {"image": to_imagenet(images)}
        stages = sorted({s for head in self.heads.values() for s in head.stages})
        batch["features"] = self.backbone(batch["image"], stages=stages)
        out = {}
        for name, head in self.heads.items():
            raw = head.decode(batch, self.backbone)
            if name == "normal":
                raw = raw * raw.square().sum(1, keepdim=True).clamp(min=1e-12).rsqrt()
            elif name == "contour":
                raw = raw.sigmoid()
            out[name] = raw
        return out

    def forward(self, original: Tensor, translated: Tensor) -> dict[str, Tensor]:
        with torch.no_grad():
            target = self._predict(original)
        predicted = self._predict(translated)
        losses = {}
        for name in self.heads:
            if name == "normal":
                losses[name] = (1.0 - (predicted[name] * target[name]).sum(1)).mean()
            else:
                losses[name] = (predicted[name] - target[name]).abs().mean()
        losses["loss"] = torch.stack(list(losses.values())).mean()
        return losses


def load_label_consistency(checkpoint: str | os.PathLike, heads: Sequence[str] = ("depth", "normal", "contour"),
                           map_location: str | torch.device = "cpu") -> LabelConsistency:
    """Build :class:`LabelConsistency` from a ``synth pretrain`` checkpoint (a ``last.pt`` or a run folder).

    Reads the documented engine format directly: ``model`` holds ``backbone.*`` and ``objectives.<name>.*``;
    ``config["objective"][<name>]`` the head's keyword arguments; ``backbone["arch"]`` (or ``config["model"]``) the
    architecture.

    Raises:
        FileNotFoundError: no checkpoint there.
        ValueError: the checkpoint lacks a requested head (the message lists those it has).
    """
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoints", "last.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"label_consistency.checkpoint: no synth pretrain checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    model, config = state["model"], state.get("config") or {}
    arch = (state.get("backbone") or {}).get("arch") or (config.get("model") or {}).get("arch") or "resnet18"
    in_channels = int((config.get("model") or {}).get("in_channels", 3))
    backbone = Backbone(arch, in_channels=in_channels)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")})
    modules = {}
    for name in heads:
        prefix = f"objectives.{name}."
        weights = {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}
        if name not in LABEL_HEADS or not weights:
            have = sorted({k.split(".")[1] for k in model if k.startswith("objectives.")})
            raise ValueError(f"label_consistency: checkpoint {path} has no synthetic head {name!r} (it has {have})")
        node = dict((config.get("objective") or {}).get(name) or {})
        kwargs = {k: v for k, v in node.items() if not k.startswith("_") and k != "weight"}
        kwargs.setdefault("backbone_arch", arch)
        head = LABEL_HEADS[name](**kwargs)
        head.load_state_dict(weights)
        modules[name] = head
    return LabelConsistency(backbone, modules)


# ---------------------------------------------------------------------------------------------------------------
# The translator
# ---------------------------------------------------------------------------------------------------------------


class CycleTranslator(nn.Module):
    r"""CycleGAN between rendered (:math:`A`) and real (:math:`B`) images, with OP-GAN's object preservation.

    Parts: generators :math:`G` (``g_ab``, rendered to real) and :math:`F` (``g_ba``), PatchGAN discriminators
    :math:`D_B` (``d_b``, on real-looking images) and :math:`D_A` (``d_a``), and the Siamese network :math:`S`
    (``siamese``, built only when ``opgan_weight > 0``).

    Generator step (:meth:`generator_losses`, :math:`D` and :math:`S` frozen), with :math:`\ell` = :func:`lsgan_loss`:

    .. math::
        L_G = \lambda_{gan} [\ell(D_B(G(a)), 1) + \ell(D_A(F(b)), 1)]
            + \lambda_{cyc} [\|F(G(a)) - a\|_1 + \|G(F(b)) - b\|_1]
            + \lambda_{id} [\|G(b) - b\|_1 + \|F(a) - a\|_1]
            + \lambda_{op} \sum_{(x, y)} (\lambda_c L_{content}(x, y) + \lambda_d L_{domain}(x, y))
            + \lambda_{label} L_{label}(a, G(a)),

    the OP-GAN sum over the two (original, translation) pairs :math:`(a, G(a))` and :math:`(b, F(b))`. The
    generators minimise both of :math:`S`'s losses: the content maps of a translated patch must match the
    original's (objects stay), and the pair classes must stay recognisable (the translation does change the domain).

    Critic step (:meth:`critic_losses`, generators frozen, translations detached, fakes from the history pools):

    .. math::
        L_D = \tfrac{1}{2}[\ell(D_B(b), 1) + \ell(D_B(\tilde{G}(a)), 0)] + \tfrac{1}{2}[\ell(D_A(a), 1)
            + \ell(D_A(\tilde{F}(b)), 0)] + \lambda_{op} \sum_{(x, y)} (\lambda_c L_{content} + \lambda_d L_{domain}).

    Every term has a weight; 0 switches it off (and skips its computation). ``opgan_weight=0`` is plain CycleGAN.

    Args:
        generator_width: First convolution's channels of each generator.
        generator_blocks: Residual blocks of each generator.
        generator_downsampling: Stride-2 stages of each generator.
        discriminator_width: First convolution's channels of each discriminator.
        discriminator_layers: Stride-2 convolutions of each discriminator (3: 70x70 patches; needs >= 32 px).
        siamese_width: Width of :math:`S`'s encoder.
        grid: Patches per side of OP-GAN's grid.
        pairs_per_image: Patch pairs drawn per image and direction.
        gan_weight: :math:`\lambda_{gan}`.
        cycle_weight: :math:`\lambda_{cyc}` (CycleGAN: 10).
        identity_weight: :math:`\lambda_{id}` (CycleGAN: 0.5 :math:`\lambda_{cyc}` = 5).
        opgan_weight: :math:`\lambda_{op}`; 0 gives plain CycleGAN.
        content_weight: :math:`\lambda_c`, within the OP-GAN term.
        domain_weight: :math:`\lambda_d`, within the OP-GAN term.
        label_weight: :math:`\lambda_{label}`; needs a :class:`LabelConsistency` passed to :meth:`generator_losses`.
        pool_size: History pool per discriminator (CycleGAN: 50).

    Examples:
        >>> translator = CycleTranslator(generator_width=8, generator_blocks=1, discriminator_width=8,
        ...                              siamese_width=8)
        >>> a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
        >>> losses, fakes = translator.generator_losses(a, b, torch.Generator().manual_seed(0))
        >>> sorted(fakes), losses["loss"].shape
        (['fake_a', 'fake_b'], torch.Size([]))
    """

    def __init__(self, generator_width: int = 32, generator_blocks: int = 6, generator_downsampling: int = 2,
                 discriminator_width: int = 64, discriminator_layers: int = 3, siamese_width: int = 32,
                 grid: int = 3, pairs_per_image: int = 6, gan_weight: float = 1.0, cycle_weight: float = 10.0,
                 identity_weight: float = 5.0, opgan_weight: float = 1.0, content_weight: float = 1.0,
                 domain_weight: float = 1.0, label_weight: float = 0.0, pool_size: int = 50):
        arguments = dict(locals())
        super().__init__()
        #: The constructor's arguments, to rebuild the translator from a checkpoint.
        self.config = {k: v for k, v in arguments.items() if k not in ("self", "__class__")}
        weights = {"gan_weight": gan_weight, "cycle_weight": cycle_weight, "identity_weight": identity_weight,
                   "opgan_weight": opgan_weight, "content_weight": content_weight, "domain_weight": domain_weight,
                   "label_weight": label_weight}
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        self.weights = weights
        self.grid, self.pairs_per_image = grid, pairs_per_image
        generator = {"width": generator_width, "blocks": generator_blocks, "downsampling": generator_downsampling}
        self.g_ab = ResnetGenerator(**generator)
        self.g_ba = ResnetGenerator(**generator)
        self.d_a = PatchGANDiscriminator(width=discriminator_width, layers=discriminator_layers)
        self.d_b = PatchGANDiscriminator(width=discriminator_width, layers=discriminator_layers)
        self.siamese = ObjectPreservingSiamese(width=siamese_width) if opgan_weight > 0 else None
        self.pool_a, self.pool_b = ImagePool(pool_size), ImagePool(pool_size)

    def generators(self) -> list[nn.Parameter]:
        """Parameters of the generators' optimizer."""
        return [*self.g_ab.parameters(), *self.g_ba.parameters()]

    def critics(self) -> list[nn.Parameter]:
        """Parameters of the critics' optimizer: both discriminators and :math:`S`."""
        parts = [self.d_a, self.d_b] + ([self.siamese] if self.siamese is not None else [])
        return [p for part in parts for p in part.parameters()]

    def _opgan(self, pairs_of_images: list[tuple[Tensor, Tensor]], generator: torch.Generator,
               losses: dict[str, Tensor], prefix: str) -> Tensor:
        """Weighted OP-GAN terms over (original, translation) pairs; fills ``losses`` with the named terms."""
        total = 0.0
        for name, (original, translated) in zip(("a", "b"), pairs_of_images, strict=True):
            pairs = sample_patch_pairs(len(original), self.pairs_per_image, generator, self.grid)
            out = siamese_losses(self.siamese, original, translated, pairs, self.grid)
            losses[f"{prefix}content_{name}"] = out["content"]
            losses[f"{prefix}domain_{name}"] = out["domain"]
            losses[f"{prefix}domain_acc_{name}"] = out["domain_acc"]
            total = (total + self.weights["content_weight"] * out["content"]
                     + self.weights["domain_weight"] * out["domain"])
        return self.weights["opgan_weight"] * total

    def generator_losses(self, real_a: Tensor, real_b: Tensor, generator: torch.Generator,
                         label_consistency: LabelConsistency | None = None
                         ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The generators' objective :math:`L_G` (see the class docstring); call with :math:`D` and :math:`S` frozen.

        Args:
            real_a: Rendered images :math:`(B, 3, H, W)` in :math:`[-1, 1]`.
            real_b: Real images :math:`(B', 3, H, W)` in :math:`[-1, 1]`.
            generator: Draws the patch pairs.
            label_consistency: Required when ``label_weight > 0``.

        Returns:
            ``(losses, fakes)``: ``losses`` holds ``loss`` (the weighted total) and every unweighted term
            (``gan_ab``, ``gan_ba``, ``cycle_a``, ``cycle_b``, ``identity_a``, ``identity_b``, ``content_a/b``,
            ``domain_a/b``, ``domain_acc_a/b``, ``label``); ``fakes`` holds the translations ``fake_b`` = G(a)
            and ``fake_a`` = F(b), for the critic step.
        """
        w = self.weights
        fake_b, fake_a = self.g_ab(real_a), self.g_ba(real_b)
        losses: dict[str, Tensor] = {}
        total = real_a.new_zeros(()).float()
        if w["gan_weight"] > 0:
            losses["gan_ab"] = lsgan_loss(self.d_b(fake_b), 1.0)
            losses["gan_ba"] = lsgan_loss(self.d_a(fake_a), 1.0)
            total = total + w["gan_weight"] * (losses["gan_ab"] + losses["gan_ba"])
        if w["cycle_weight"] > 0:
            losses["cycle_a"] = cycle_consistency_loss(self.g_ba(fake_b), real_a)
            losses["cycle_b"] = cycle_consistency_loss(self.g_ab(fake_a), real_b)
            total = total + w["cycle_weight"] * (losses["cycle_a"] + losses["cycle_b"])
        if w["identity_weight"] > 0:
            losses["identity_a"] = identity_loss(self.g_ba(real_a), real_a)
            losses["identity_b"] = identity_loss(self.g_ab(real_b), real_b)
            total = total + w["identity_weight"] * (losses["identity_a"] + losses["identity_b"])
        if self.siamese is not None:
            total = total + self._opgan([(real_a, fake_b), (real_b, fake_a)], generator, losses, "")
        if w["label_weight"] > 0:
            if label_consistency is None:
                raise ValueError("label_weight > 0 needs a LabelConsistency (label_consistency.checkpoint)")
            out = label_consistency(real_a, fake_b)
            losses["label"] = out["loss"]
            total = total + w["label_weight"] * out["loss"]
        losses["loss"] = total
        return losses, {"fake_b": fake_b, "fake_a": fake_a}

    def critic_losses(self, real_a: Tensor, real_b: Tensor, fake_a: Tensor, fake_b: Tensor,
                      generator: torch.Generator) -> dict[str, Tensor]:
        """The critics' objective :math:`L_D` (discriminators and :math:`S`); call with the generators frozen.

        Args:
            real_a, real_b: As in :meth:`generator_losses`.
            fake_a, fake_b: The generator step's translations (detached here); the discriminators see them through
                the history pools, :math:`S` sees the newest ones, paired with their originals.
            generator: Draws the pool's choices and the patch pairs.

        Returns:
            ``loss`` and the terms ``disc_a``, ``disc_b``, ``s_content_a/b``, ``s_domain_a/b``,
            ``s_domain_acc_a/b``.
        """
        fake_a, fake_b = fake_a.detach(), fake_b.detach()
        losses: dict[str, Tensor] = {}
        total = real_a.new_zeros(()).float()
        if self.weights["gan_weight"] > 0:
            pooled_b = self.pool_b.query(fake_b, generator)
            pooled_a = self.pool_a.query(fake_a, generator)
            losses["disc_b"] = 0.5 * (lsgan_loss(self.d_b(real_b), 1.0) + lsgan_loss(self.d_b(pooled_b), 0.0))
            losses["disc_a"] = 0.5 * (lsgan_loss(self.d_a(real_a), 1.0) + lsgan_loss(self.d_a(pooled_a), 0.0))
            total = total + losses["disc_a"] + losses["disc_b"]
        if self.siamese is not None:
            total = total + self._opgan([(real_a, fake_b), (real_b, fake_a)], generator, losses, "s_")
        losses["loss"] = total
        return losses


__all__ = ["LABEL_HEADS", "PAIR_CLASSES", "CycleTranslator", "ImagePool", "LabelConsistency", "ObjectPreservingSiamese",
           "PatchGANDiscriminator", "PatchPairs", "ResnetGenerator", "content_consistency_loss",
           "cycle_consistency_loss", "domain_classification_loss", "gather_pairs", "grid_patches", "identity_loss",
           "load_label_consistency", "lsgan_loss", "sample_patch_pairs", "siamese_losses", "to_imagenet",
           "to_unit_range"]
