"""Generative objectives on real unlabelled images: colorization and context-encoder inpainting.

(About 800 lines, kept in one module on purpose: the two objectives share the masking, Lab conversion and decoder
plumbing below, and the tests exercise them together.)

Both hide part of a real photo from the encoder and train it, with a decoder, to predict what was hidden: the
colour of a grey image (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016) or a masked region
(Pathak et al., "Context Encoders: Feature Learning by Inpainting", CVPR 2016). They need no labels, so they run
on the ``"real"`` domain beside the synthetic-label heads of :mod:`pretext.synthetic`, whose FPN
:class:`~pretext.synthetic.Decoder` they reuse.

Each objective builds its own encoder input from ``batch["image"]`` (a grey or a masked image) and runs the
backbone on it, so it ignores ``batch["features"]`` (``uses_features = False``). The backbone keeps its 3 input
channels for every input, so one encoder serves every objective and transfers unchanged. ``forward`` returns
``{"loss": ..., <metric>: ...}`` as 0-dim float32 tensors; ``predict`` returns RGB in [0, 1] for pictures.

The CIE Lab conversions :func:`rgb_to_lab` and :func:`lab_to_rgb` follow ``skimage.color`` (sRGB, D65, 2 degree
observer) and are vectorised over any batch shape.
"""

import functools
import itertools
import math
from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.common import batch_generator, denormalize, normalize
from pretext.synthetic import Decoder
from synth.backbone import Backbone, resolve_stages

#: sRGB (linear) to CIE XYZ, as in ``skimage.color.colorconv.xyz_from_rgb``.
_XYZ_FROM_RGB = torch.tensor([[0.412453, 0.357580, 0.180423],
                              [0.212671, 0.715160, 0.072169],
                              [0.019334, 0.119193, 0.950227]], dtype=torch.float64)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
#: XYZ of the D65 white point for the 2 degree observer (skimage's default reference white).
_D65_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)

#: The regression head predicts ab / AB_SCALE, so its outputs are O(1) like the other decoders'.
AB_SCALE = 100.0

COLORIZATION_MODES: tuple[str, ...] = ("classification", "regression")
INPAINTING_MASKS: tuple[str, ...] = ("center", "random_blocks")


# ---------------------------------------------------------------------------------------------------------------
# Colour space
# ---------------------------------------------------------------------------------------------------------------


def _float_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; every other dtype (half, bf16, integers) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _full_precision(x: Tensor) -> torch.autocast:
    """Autocast off on ``x``'s device: under autocast, einsum and cdist would run in bf16 (3 significant digits)."""
    return torch.autocast(x.device.type, enabled=False)


def _mix_channels(matrix: Tensor, x: Tensor) -> Tensor:
    """``matrix @ x`` over the channel dim -3 of :math:`(*, 3, H, W)`."""
    return torch.einsum("ij,...jhw->...ihw", matrix.to(device=x.device, dtype=x.dtype), x)


@torch.no_grad()
def rgb_to_lab(rgb: Tensor) -> Tensor:
    r"""sRGB in [0, 1] to CIE Lab (D65, 2 degree observer), as ``skimage.color.rgb2lab``.

    Used by Zhang, Isola & Efros (ECCV 2016) to split an image into the lightness :math:`L \in [0, 100]` the
    network sees and the chroma :math:`(a, b)` it predicts. The sRGB gamma is undone, XYZ is scaled by the white
    point, and :math:`f(t) = t^{1/3}` above :math:`0.008856`, :math:`7.787 t + 16/116` below;
    :math:`L = 116 f(Y) - 16`, :math:`a = 500 (f(X) - f(Y))`, :math:`b = 200 (f(Y) - f(Z))`.

    Not differentiated (it makes targets and inputs); computed in float32 (float64 if given float64).

    Shape:
        - Input: :math:`(*, 3, H, W)` RGB.
        - Output: :math:`(*, 3, H, W)` channels :math:`(L, a, b)`.
    """
    if rgb.dim() < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb_to_lab: expected (*, 3, H, W), got shape {tuple(rgb.shape)}")
    x = rgb.to(_float_dtype(rgb))
    # clamp inside the unused branch keeps pow away from negative bases (NaN) without changing the result.
    linear = torch.where(x > 0.04045, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4, x / 12.92)
    with _full_precision(x):
        xyz = _mix_channels(_XYZ_FROM_RGB, linear) / _D65_WHITE.to(x).view(3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp(min=0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


@torch.no_grad()
def lab_to_rgb(lab: Tensor) -> Tensor:
    r"""CIE Lab (D65, 2 degree observer) to sRGB in [0, 1], as ``skimage.color.lab2rgb``.

    The inverse of :func:`rgb_to_lab`, used to show colorization predictions (Zhang, Isola & Efros, ECCV 2016)
    and to render the grey input. Like skimage, a negative :math:`f(Z)` is set to 0 and the result is clipped to
    [0, 1], so out-of-gamut colours map to the nearest displayable value per channel.

    Shape:
        - Input: :math:`(*, 3, H, W)` channels :math:`(L, a, b)`.
        - Output: :math:`(*, 3, H, W)` RGB in [0, 1].
    """
    if lab.dim() < 3 or lab.shape[-3] != 3:
        raise ValueError(f"lab_to_rgb: expected (*, 3, H, W), got shape {tuple(lab.shape)}")
    lab = lab.to(_float_dtype(lab))
    lightness, a, b = lab.unbind(-3)
    fy = (lightness + 16.0) / 116.0
    f = torch.stack([a / 500.0 + fy, fy, (fy - b / 200.0).clamp(min=0.0)], dim=-3)
    xyz = _inverse_f(f) * _D65_WHITE.to(f).view(3, 1, 1)
    with _full_precision(xyz):
        linear = _mix_channels(_RGB_FROM_XYZ, xyz)
    return _srgb_encode(linear).clamp(0.0, 1.0)


@torch.no_grad()
def lightness_to_grey(lightness: Tensor) -> Tensor:
    r"""The grey sRGB value of each CIE lightness :math:`L`, the encoder input of colorization (Zhang, Isola &
    Efros, ECCV 2016, who feed :math:`L` itself).

    For a grey :math:`R = G = B = c`, the luminance is :math:`Y = c_{linear}` (the matrix's Y row sums to 1),
    so :math:`c` is the sRGB encoding of :math:`Y = f^{-1}((L + 16) / 116)`: exactly equal channels whose
    :func:`rgb_to_lab` lightness is :math:`L` (``lab_to_rgb(L, 0, 0)`` differs from it by up to 1e-5 between
    channels, from rounding in the skimage matrix). Clipped to [0, 1].

    Shape:
        - Input: :math:`(*, 1, H, W)`. Output: :math:`(*, 3, H, W)`, three equal channels.
    """
    lightness = lightness.to(_float_dtype(lightness))
    grey = _srgb_encode(_inverse_f((lightness + 16.0) / 116.0)).clamp(0.0, 1.0)
    return grey.expand(*grey.shape[:-3], 3, *grey.shape[-2:])


def _srgb_encode(linear: Tensor) -> Tensor:
    """Linear RGB to sRGB (gamma); the clamp in the unused branch keeps pow away from negative bases (NaN)."""
    return torch.where(linear > 0.0031308, 1.055 * linear.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055,
                       12.92 * linear)


def _inverse_f(f: Tensor) -> Tensor:
    """The inverse of CIE Lab's compression :math:`f`, with skimage's threshold."""
    return torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)


# ---------------------------------------------------------------------------------------------------------------
# Quantised ab space (Zhang, Isola & Efros, ECCV 2016)
# ---------------------------------------------------------------------------------------------------------------


def in_gamut_ab_bins(bin_size: float = 10.0, levels: int = 256) -> Tensor:
    r"""Centres of the ab grid cells that some sRGB colour falls in (Zhang, Isola & Efros, ECCV 2016, Sec. 2.1).

    The grid has centres at multiples of ``bin_size`` (a colour belongs to the cell of
    :math:`\mathrm{round}(ab / \text{bin\_size})`). A cell is kept when a colour on the surface of the RGB cube,
    sampled at ``levels`` values per channel (all 8-bit colours on the surface by default), falls in it. The
    surface suffices: along a line of fixed :math:`(a, b)` through the gamut, the colours enter and leave it on
    its boundary, which is the image of the cube's surface; checked against all :math:`256^3` 8-bit colours
    (same 261 cells at ``bin_size`` 10). Zhang et al. report 313 cells over their gamut; this one is sRGB's.

    Deterministic: computed in float64, cells sorted by :math:`(a, b)`. Memoised (a few tenths of a second per
    call otherwise); each call returns a fresh copy.

    Args:
        bin_size: cell width in ab units.
        levels: samples per channel along each edge of the cube.

    Shape:
        - Output: :math:`(Q, 2)` float32 :math:`(a, b)` centres.
    """
    if bin_size <= 0:
        raise ValueError(f"bin_size must be > 0, got {bin_size!r}")
    return _in_gamut_ab_bins(float(bin_size), int(levels)).clone()


@functools.lru_cache(maxsize=8)
@torch.no_grad()
def _in_gamut_ab_bins(bin_size: float, levels: int) -> Tensor:
    ramp = torch.linspace(0.0, 1.0, levels, dtype=torch.float64)
    u, v = torch.meshgrid(ramp, ramp, indexing="ij")
    faces = []
    for axis in range(3):
        for value in (0.0, 1.0):
            channels = [u, v]
            channels.insert(axis, torch.full_like(u, value))
            faces.append(torch.stack(channels).reshape(3, -1, 1))
    lab = rgb_to_lab(torch.cat(faces, dim=1))
    cells = torch.round(lab[1:, :, 0].T / bin_size).long()
    # One int64 key per cell, ordered like (a, b): unique over 1-D keys is ~30x faster than unique(dim=0).
    low = cells.min(0).values
    span = int(cells[:, 1].max() - low[1]) + 1
    keys = torch.unique((cells[:, 0] - low[0]) * span + (cells[:, 1] - low[1]))
    unique_cells = torch.stack([keys // span + low[0], keys % span + low[1]], dim=1)
    return (unique_cells.double() * bin_size).float()


@torch.no_grad()
def soft_encode(ab: Tensor, centers: Tensor, neighbours: int = 5, sigma: float = 5.0,
                chunk: int = 65536) -> tuple[Tensor, Tensor]:
    r"""Soft-encoding of ab values over the ab bins (Zhang, Isola & Efros, ECCV 2016, Sec. 2.1).

    Each value is spread over its ``neighbours`` nearest bin centres :math:`c_k` with weights
    :math:`\propto \exp(-\|ab - c_k\|^2 / 2\sigma^2)`, normalised to sum to 1 (the paper: 5 neighbours,
    :math:`\sigma = 5`). Returned sparse, nearest first, since the loss only gathers these columns.

    Args:
        ab: the values to encode.
        centers: bin centres, e.g. from :func:`in_gamut_ab_bins`.
        neighbours: :math:`K`, bins per value.
        sigma: Gaussian width in ab units.
        chunk: rows per distance computation, bounding memory to ``chunk x Q`` floats.

    Shape:
        - ab: :math:`(N, 2)`; centers: :math:`(Q, 2)`.
        - Output: ``(indices, weights)``, :math:`(N, K)` int64 and float32, nearest bin first.
    """
    if not 1 <= neighbours <= centers.shape[0]:
        raise ValueError(f"soft_encode: neighbours must be in [1, {centers.shape[0]}], got {neighbours!r}")
    ab, centers = ab.float(), centers.float()
    indices, distances = [], []
    for start in range(0, ab.shape[0], chunk):
        with _full_precision(ab):
            squared = torch.cdist(ab[start:start + chunk], centers).square()
        nearest = squared.topk(neighbours, dim=1, largest=False, sorted=True)
        distances.append(nearest.values)
        indices.append(nearest.indices)
    if not indices:
        empty = ab.new_zeros((0, neighbours))
        return empty.long(), empty
    squared = torch.cat(distances)
    # Subtracting the nearest distance changes nothing after normalisation and keeps exp away from underflow.
    weights = torch.exp(-(squared - squared[:, :1]) / (2.0 * sigma ** 2))
    return torch.cat(indices), weights / weights.sum(1, keepdim=True)


def smooth_prior(prior: Tensor, centers: Tensor, sigma: float = 5.0) -> Tensor:
    r"""A distribution over ab bins smoothed by a Gaussian kernel in ab (Zhang, Isola & Efros, ECCV 2016, Eq. 4).

    .. math::
        \tilde{p}_q \propto \sum_r p_r \exp\left(-\frac{\|c_q - c_r\|^2}{2\sigma^2}\right), \quad
        \sum_q \tilde{p}_q = 1.

    Shape:
        - prior: :math:`(Q,)`; centers: :math:`(Q, 2)`.
        - Output: :math:`(Q,)` in the dtype of ``prior``.
    """
    kernel = torch.exp(-torch.cdist(centers.double(), centers.double()).square() / (2.0 * sigma ** 2))
    smoothed = kernel @ prior.double()
    return (smoothed / smoothed.sum()).to(prior.dtype)


def rebalancing_weights(prior: Tensor, mix: float = 0.5) -> Tensor:
    r"""Class-rebalancing weights of Zhang, Isola & Efros (ECCV 2016, Eq. 4).

    .. math::
        w \propto \left((1 - \lambda)\tilde{p} + \frac{\lambda}{Q}\right)^{-1}, \quad
        \mathbb{E}_{\tilde{p}}[w] = \sum_q \tilde{p}_q w_q = 1.

    Rare colours weigh more, so the loss is not dominated by the desaturated ab values most pixels have;
    :math:`\lambda = 1` gives equal weights.

    Args:
        prior: :math:`\tilde{p}`, a distribution over the bins.
        mix: :math:`\lambda \in (0, 1]`, the weight of the uniform distribution.

    Shape:
        - prior: :math:`(Q,)`. Output: :math:`(Q,)`.
    """
    if not 0.0 < mix <= 1.0:
        raise ValueError(f"rebalancing mix (lambda) must be in (0, 1], got {mix!r}")
    weights = 1.0 / ((1.0 - mix) * prior + mix / prior.numel())
    return weights / (prior * weights).sum()


def annealed_mean(logits: Tensor, centers: Tensor, temperature: float = 0.38) -> Tensor:
    r"""Point estimate of ab from a distribution over bins (Zhang, Isola & Efros, ECCV 2016, Eq. 5).

    .. math::
        \hat{ab} = \sum_q f_T(z)_q\, c_q, \quad f_T(z) = \frac{\exp(\log z / T)}{\sum_r \exp(\log z_r / T)}
        = \mathrm{softmax}(\ell / T)

    for logits :math:`\ell`. :math:`T = 1` is the mean (desaturated), :math:`T \to 0` the mode (colourful but
    patchy); the paper uses 0.38.

    Shape:
        - logits: :math:`(B, Q, H, W)`; centers: :math:`(Q, 2)`.
        - Output: :math:`(B, 2, H, W)` float32.
    """
    probs = torch.softmax(logits.float() / temperature, dim=1)
    with _full_precision(probs):
        return torch.einsum("bqhw,qc->bchw", probs, centers.float())


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


def _like_layout(x: Tensor, reference: Tensor) -> Tensor:
    """``x`` in ``reference``'s memory format, so a channels_last run keeps its fast convolutions."""
    if reference.dim() == 4 and reference.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous(memory_format=torch.channels_last)
    return x


class _RealImageObjective(nn.Module):
    """A decoder over backbone stages for an objective that builds its own encoder input from a real image.

    The same encoder/decoder split as :class:`pretext.synthetic.SyntheticObjective` (stages resolved the same
    way, the same :class:`~pretext.synthetic.Decoder`), but the backbone runs on an input the objective makes.
    """

    domains: tuple[str, ...] = ("real",)
    uses_features = False
    #: ``predict`` returns a picture in the place of ``batch["image"]``.
    target: str = "image"

    def __init__(self, out_channels: int, backbone_arch: str, stages: list[str] | None, channels: int):
        super().__init__()
        self.stage_channels: dict[str, int] = resolve_stages(type(self).__name__, backbone_arch, stages)
        self.stages: tuple[str, ...] = tuple(self.stage_channels)
        self.backbone_arch = backbone_arch
        self.decoder = Decoder(list(self.stage_channels.values()), channels=channels, out_channels=out_channels)

    def _decode(self, inputs: Tensor, backbone: Backbone, size: tuple[int, int]) -> Tensor:
        """The decoder's output at ``size`` for the backbone run on ``inputs``, as float32."""
        features = backbone(inputs, stages=self.stages)
        for stage, channels in self.stage_channels.items():
            if features[stage].shape[1] != channels:
                raise ValueError(f"{type(self).__name__} was built for a {self.backbone_arch} backbone "
                                 f"({stage}: {channels} channels), got {features[stage].shape[1]} channels")
        return self.decoder([features[s] for s in self.stages], size=size).float()


class Colorization(_RealImageObjective):
    r"""Colorization of real images (Zhang, Isola & Efros, "Colorful Image Colorization", ECCV 2016).

    The image is converted to CIE Lab; the encoder sees only the lightness :math:`L`, rendered as the grey sRGB
    image of that lightness (:func:`lightness_to_grey`, three equal channels) and normalised like every other
    input. The paper feeds :math:`L` as one channel; here the backbone keeps its 3 input channels, so one encoder
    serves every objective, and a grey photo is an input the other objectives' images could be. The decoder
    predicts chroma at ``1 / output_stride`` of the input resolution (the paper predicts at 1/4 and compares with
    subsampled ground truth; here the target ab is area-averaged to that size).

    ``mode="classification"`` (the paper's): ab is quantised into the :math:`Q` in-gamut bins of
    :func:`in_gamut_ab_bins`; each target pixel is soft-encoded over its 5 nearest bins (:func:`soft_encode`)
    into :math:`Z`, and with predicted :math:`\hat{Z} = \mathrm{softmax}(\ell)` the loss is the class-rebalanced
    multinomial cross-entropy (Eq. 2) averaged over the :math:`N` target pixels (the paper sums):

    .. math::
        L = -\frac{1}{N}\sum_{h,w} w_{q^*_{h,w}} \sum_q Z_{h,w,q} \log \hat{Z}_{h,w,q},

    with :math:`q^*` the nearest bin and :math:`w` from :func:`rebalancing_weights` of the smoothed
    (:func:`smooth_prior`) empirical prior. The paper estimates that prior once on ImageNet; here it is the
    histogram of nearest bins over every training batch seen so far, the registered float64 buffer
    ``bin_counts`` (checkpointed, so a resumed run continues it). It is updated in training mode only, before
    the batch's weights are computed; a uniform prior (all weights 1) stands in while it is empty. Under DDP the
    buffers are broadcast from rank 0 each step, so the histogram counts rank 0's batches, a sample of the same
    distribution. Predictions are the annealed mean (:func:`annealed_mean`, :math:`T = 0.38`).

    ``mode="regression"``: the decoder predicts :math:`ab / 100` and the loss is smooth-L1 (Huber with
    :math:`\beta = 1` ab unit, so L1 beyond one unit) between :math:`100\times` the prediction and the target,
    averaged over pixels and both channels, in ab units.

    Metrics: ``ab_mae``, the mean absolute error of the predicted :math:`(a, b)` upsampled to the input
    resolution, over pixels and both channels, in ab units; ``accuracy`` (classification only), the fraction of
    target pixels whose most likely bin is the nearest bin :math:`q^*`.

    Args:
        backbone_arch: the backbone's architecture.
        stages: backbone stages to decode from (``None``: the last four).
        channels: decoder width.
        mode: ``"classification"`` or ``"regression"``.
        bin_size: width of the ab grid cells.
        rebalance_lambda: :math:`\lambda`, weight of the uniform distribution in the rebalancing.
        soft_neighbours: bins per pixel in the soft encoding.
        soft_sigma: Gaussian width of the soft encoding and of the prior's smoothing, ab units.
        annealing_temperature: :math:`T` of the annealed mean.
        output_stride: the decoder predicts at :math:`(H / s, W / s)`; the logits are
            :math:`B \times Q \times H W / s^2` floats, 16x fewer at the paper's 4 than at full resolution.

    Attributes:
        bin_centers: buffer :math:`(Q, 2)`, the in-gamut bin centres (classification only).
        bin_counts: buffer :math:`(Q,)` float64, the nearest-bin histogram of the training pixels so far
            (classification only).

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)` normalised RGB.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output of ``forward``: ``{"loss", "ab_mae", "accuracy"}`` (regression: ``{"loss", "ab_mae"}``), 0-dim
          float32 tensors.
        - Output of ``predict``: RGB in [0, 1], :math:`(B, 3, H, W)` float32: the image's :math:`L` with the
          predicted :math:`(a, b)`.

    Examples:
        >>> backbone, colorization = Backbone("resnet18"), Colorization()
        >>> batch = {"image": torch.randn(2, 3, 64, 64)}
        >>> sorted(colorization(batch, backbone))
        ['ab_mae', 'accuracy', 'loss']
        >>> colorization.predict(batch, backbone).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, backbone_arch: str = "resnet18", stages: list[str] | None = None, channels: int = 64,
                 mode: str = "classification", bin_size: float = 10.0, rebalance_lambda: float = 0.5,
                 soft_neighbours: int = 5, soft_sigma: float = 5.0, annealing_temperature: float = 0.38,
                 output_stride: int = 4):
        if mode not in COLORIZATION_MODES:
            raise ValueError(f"Colorization: mode must be one of {COLORIZATION_MODES}, got {mode!r}")
        if not 0.0 < rebalance_lambda <= 1.0:
            raise ValueError(f"Colorization: rebalance_lambda must be in (0, 1], got {rebalance_lambda!r}")
        if soft_sigma <= 0 or annealing_temperature <= 0:
            raise ValueError(f"Colorization: soft_sigma and annealing_temperature must be > 0, got {soft_sigma!r} "
                             f"and {annealing_temperature!r}")
        if output_stride < 1:
            raise ValueError(f"Colorization: output_stride must be >= 1, got {output_stride!r}")
        centers = in_gamut_ab_bins(bin_size) if mode == "classification" else None
        if centers is not None and not 1 <= soft_neighbours <= centers.shape[0]:
            raise ValueError(f"Colorization: soft_neighbours must be in [1, {centers.shape[0]}], "
                             f"got {soft_neighbours!r}")
        super().__init__(2 if centers is None else centers.shape[0], backbone_arch, stages, channels)
        self.mode = mode
        self.bin_size = bin_size
        self.rebalance_lambda = rebalance_lambda
        self.soft_neighbours = soft_neighbours
        self.soft_sigma = soft_sigma
        self.annealing_temperature = annealing_temperature
        self.output_stride = output_stride
        if centers is not None:
            self.register_buffer("bin_centers", centers)
            self.register_buffer("bin_counts", torch.zeros(centers.shape[0], dtype=torch.float64))

    # --- prior and weights -------------------------------------------------------------------------------------

    def prior(self) -> Tensor:
        """The smoothed empirical distribution :math:`\\tilde{p}` over the bins, uniform before any count.

        Shape:
            - Output: :math:`(Q,)` float64.
        """
        counts = self.bin_counts
        total = counts.sum()
        uniform = torch.full_like(counts, 1.0 / counts.numel())
        # where instead of an if: no host sync on the GPU. Uniform itself, not smoothed: smoothing would thin
        # the gamut's edge bins and the weights would not all be 1.
        empirical = torch.where(total > 0, counts / total.clamp(min=1.0), uniform)
        return torch.where(total > 0, smooth_prior(empirical, self.bin_centers, self.soft_sigma), uniform)

    def class_weights(self) -> Tensor:
        """Rebalancing weight of each bin, :func:`rebalancing_weights` of :meth:`prior`. Shape :math:`(Q,)` float32.
        """
        return rebalancing_weights(self.prior(), self.rebalance_lambda).float()

    # --- forward -----------------------------------------------------------------------------------------------

    def lab_and_input(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """The image in Lab and the grey encoder input of its lightness.

        Shape:
            - image: :math:`(B, 3, H, W)` normalised RGB.
            - Output: Lab :math:`(B, 3, H, W)` float32 and the normalised grey input :math:`(B, 3, H, W)`.
        """
        with torch.no_grad():
            lab = rgb_to_lab(denormalize(image.float()).clamp(0.0, 1.0))
            return lab, _like_layout(normalize(lightness_to_grey(lab[:, :1])), image)

    def _output_size(self, image: Tensor) -> tuple[int, int]:
        height, width = image.shape[-2:]
        if height < self.output_stride or width < self.output_stride:
            raise ValueError(f"Colorization: image {height}x{width} is smaller than output_stride "
                             f"{self.output_stride}")
        return height // self.output_stride, width // self.output_stride

    def _ab(self, raw: Tensor) -> Tensor:
        """Predicted :math:`(a, b)` from the decoder output, at the decoder's resolution."""
        if self.mode == "classification":
            return annealed_mean(raw, self.bin_centers, self.annealing_temperature)
        return AB_SCALE * raw

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        image = batch["image"]
        lab, inputs = self.lab_and_input(image)
        size = self._output_size(image)
        raw = self._decode(inputs, backbone, size)
        with torch.no_grad():
            target_ab = F.interpolate(lab[:, 1:], size=size, mode="area")
        outputs = {}
        if self.mode == "classification":
            ab_flat = target_ab.permute(0, 2, 3, 1).reshape(-1, 2)
            indices, soft = soft_encode(ab_flat, self.bin_centers, self.soft_neighbours, self.soft_sigma)
            nearest = indices[:, 0]
            if self.training:
                with torch.no_grad():
                    self.bin_counts += torch.bincount(nearest, minlength=self.bin_counts.numel()).double()
            log_probs = torch.log_softmax(raw, dim=1).permute(0, 2, 3, 1).reshape(-1, raw.shape[1])
            cross_entropy = -(soft * log_probs.gather(1, indices)).sum(1)
            outputs["loss"] = (self.class_weights()[nearest] * cross_entropy).mean()
            if batch.get("with_metrics", True):
                outputs["accuracy"] = (log_probs.detach().argmax(1) == nearest).float().mean()
        else:
            outputs["loss"] = F.smooth_l1_loss(AB_SCALE * raw, target_ab, beta=1.0)
        if batch.get("with_metrics", True):
            with torch.no_grad():
                ab = F.interpolate(self._ab(raw.detach()), size=image.shape[-2:], mode="bilinear",
                                   align_corners=False)
                outputs["ab_mae"] = (ab - lab[:, 1:]).abs().mean()
        return outputs

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """The image's lightness with the predicted chroma, as RGB in [0, 1]: :math:`(B, 3, H, W)` float32."""
        image = batch["image"]
        lab, inputs = self.lab_and_input(image)
        ab = self._ab(self._decode(inputs, backbone, self._output_size(image)))
        ab = F.interpolate(ab, size=image.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1)).float()


class InpaintingMask(NamedTuple):
    """Where an inpainting objective hides and scores pixels.

    Attributes:
        region: :math:`(B, 1, H, W)` bool, the region the loss covers (``mask_fraction`` of the image).
        hole: :math:`(B, 1, H, W)` bool, the part of ``region`` blanked in the input: ``region`` eroded by
            ``overlap`` pixels (a square structuring element; the image border does not erode).
        box: ``(top, bottom, left, right)``, the bounding box of ``region`` over the batch (what the
            discriminator sees).
        region_pixels: number of ``region`` pixels in the batch.
    """

    region: Tensor
    hole: Tensor
    box: tuple[int, int, int, int]
    region_pixels: int


class Inpainting(_RealImageObjective):
    r"""Context-encoder inpainting of real images (Pathak et al., "Context Encoders: Feature Learning by
    Inpainting", CVPR 2016).

    A region :math:`R` covering ``mask_fraction`` of each image is chosen: the centre square (``"center"``;
    the paper's central region, 1/4 of the image) or a union of random squares (``"random_blocks"``: squares of
    side uniform in :math:`[\sqrt{f} S / 4, \sqrt{f} S / 2]`, :math:`S` the shorter image side, at uniform
    positions, added until they cover at least the fraction :math:`f`, so the coverage is :math:`f` plus at most
    one square). As in the authors' code (``overlapPred``), the pixels of :math:`R` within ``overlap`` px of its
    edge stay visible: only the hole :math:`R^-`, :math:`R` eroded by ``overlap`` px, is filled with the dataset
    mean (0 in normalised space). The decoder reconstructs the image in normalised space (so an untrained
    decoder's output near 0 is the mean fill), and the loss is the squared error in RGB [0, 1] over :math:`R`,
    with the visible band :math:`R \setminus R^-` weighted ``overlap_weight`` (the paper's 10) to make the
    prediction agree with its context, averaged over the :math:`3|R|` elements of the batch, as the authors' MSE:

    .. math::
        L_{rec} = \frac{1}{3|R|}\sum_{p \in R} \omega_p \|\hat{x}_p - x_p\|^2, \quad
        \omega_p = 1 \text{ on } R^-,\ \text{overlap\_weight on } R \setminus R^-.

    With ``adversarial_weight`` :math:`\lambda_{adv} > 0`, a small convolutional discriminator :math:`D` judges
    the crop of the batch's bounding box of :math:`R` (the paper's centre region for ``"center"``) of the real
    image against the composite :math:`x \odot (1 - R) + \hat{x} \odot R` (normalised space), and the objective
    adds the non-saturating generator loss :math:`L = L_{rec} + \lambda_{adv}\,
    \mathrm{BCE}(D(\text{composite}), 1)`. The paper's :math:`\lambda_{rec} = 0.999, \lambda_{adv} = 0.001`
    correspond to ``adversarial_weight`` about 0.001. The objective then also defines
    ``discriminator_parameters()`` and ``discriminator_loss(batches, backbone)``, which the engine steps after the
    main step; it keeps nothing between the two calls, so ``discriminator_loss`` recomputes the reconstruction
    under ``torch.no_grad()``: one more backbone and decoder forward per step (no backward), from the weights
    just updated, which in training mode also updates the backbone's BatchNorm running statistics a second time on
    the same batch.

    Metrics: ``psnr``, :math:`10 \log_{10}(1 / \mathrm{MSE})` of the clamped reconstruction over each image's
    hole :math:`R^-` (RGB in [0, 1]), averaged over images; with an adversary also ``reconstruction_loss`` and
    ``adversarial_loss``.

    Args:
        backbone_arch: the backbone's architecture.
        stages: backbone stages to decode from (``None``: the last four).
        channels: decoder width.
        mask: ``"center"`` or ``"random_blocks"``.
        mask_fraction: :math:`f`, the fraction of the image :math:`R` covers, in (0, 1).
        overlap: width in pixels of the visible band inside :math:`R`; 0 blanks all of :math:`R`.
        overlap_weight: loss weight of the band relative to the hole.
        adversarial_weight: :math:`\lambda_{adv}`; 0 builds no discriminator.
        discriminator_channels: width of the discriminator's first layer (doubled at each of its 3 stride-2
            convolutions, so its input crop must be at least 8 px).

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)` normalised RGB; ``seed`` :math:`(B,)` int64 on the CPU for
          ``"random_blocks"``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output of ``forward``: ``{"loss", "psnr"}`` (with an adversary also ``"reconstruction_loss"`` and
          ``"adversarial_loss"``), 0-dim float32 tensors.
        - Output of ``predict``: RGB in [0, 1], :math:`(B, 3, H, W)` float32: the image with its hole filled by
          the reconstruction.

    Examples:
        >>> backbone, inpainting = Backbone("resnet18"), Inpainting()
        >>> batch = {"image": torch.randn(2, 3, 64, 64), "seed": torch.tensor([0, 1])}
        >>> sorted(inpainting(batch, backbone))
        ['loss', 'psnr']
        >>> inpainting.mask(batch).region.float().mean().item()
        0.25
    """

    def __init__(self, backbone_arch: str = "resnet18", stages: list[str] | None = None, channels: int = 64,
                 mask: str = "center", mask_fraction: float = 0.25, overlap: int = 4, overlap_weight: float = 10.0,
                 adversarial_weight: float = 0.0, discriminator_channels: int = 64):
        if mask not in INPAINTING_MASKS:
            raise ValueError(f"Inpainting: mask must be one of {INPAINTING_MASKS}, got {mask!r}")
        if not 0.0 < mask_fraction < 1.0:
            raise ValueError(f"Inpainting: mask_fraction must be in (0, 1), got {mask_fraction!r}")
        if overlap < 0 or overlap_weight < 0 or adversarial_weight < 0:
            raise ValueError(f"Inpainting: overlap, overlap_weight and adversarial_weight must be >= 0, got "
                             f"{overlap!r}, {overlap_weight!r}, {adversarial_weight!r}")
        super().__init__(3, backbone_arch, stages, channels)
        self.mask_kind = mask
        self.mask_fraction = mask_fraction
        self.overlap = overlap
        self.overlap_weight = overlap_weight
        self.adversarial_weight = adversarial_weight
        self.discriminator = _discriminator(discriminator_channels) if adversarial_weight > 0 else None

    # --- masks -------------------------------------------------------------------------------------------------

    def mask(self, batch: Mapping[str, Tensor]) -> InpaintingMask:
        """The region and hole of each image, drawn on the CPU from ``batch["seed"]`` (``"random_blocks"``).

        The same batch always gives the same masks, so ``discriminator_loss`` sees what ``forward`` saw.

        Raises:
            ValueError: ``overlap`` erodes some image's region entirely.
        """
        image = batch["image"]
        count, _, height, width = image.shape
        if self.mask_kind == "center":
            region = self._center_region(count, height, width)
        else:
            region = self._random_blocks(batch_generator(batch, salt="inpainting"), count, height, width)
        hole = region
        if self.overlap > 0:
            # Erosion as a min-pool; max_pool2d pads with -inf, so pixels beyond the border count as inside.
            hole = -F.max_pool2d(-region.float(), 2 * self.overlap + 1, stride=1, padding=self.overlap) > 0.5
        if not hole.flatten(1).any(1).all():
            raise ValueError(f"Inpainting: overlap={self.overlap} px erodes the whole {self.mask_kind!r} mask of a "
                             f"{height}x{width} image; lower overlap or raise mask_fraction")
        rows = region.any(3).any(0).flatten().nonzero()
        columns = region.any(2).any(0).flatten().nonzero()
        box = (int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1)
        device = image.device
        return InpaintingMask(region.to(device, non_blocking=True), hole.to(device, non_blocking=True), box,
                              int(region.sum()))

    def _center_region(self, count: int, height: int, width: int) -> Tensor:
        side = math.sqrt(self.mask_fraction)
        box_height, box_width = max(1, round(side * height)), max(1, round(side * width))
        top, left = (height - box_height) // 2, (width - box_width) // 2
        region = torch.zeros(count, 1, height, width, dtype=torch.bool)
        region[..., top:top + box_height, left:left + box_width] = True
        return region

    def _random_blocks(self, generator: torch.Generator, count: int, height: int, width: int) -> Tensor:
        side = math.sqrt(self.mask_fraction) * min(height, width)
        low = max(1, round(side / 4))
        high = max(low, round(side / 2))
        needed = math.ceil(self.mask_fraction * height * width)
        # Draw a fixed number of squares up front so the stream does not depend on the coverage; far more than
        # needed (4x as many as the smallest squares would take without overlapping).
        draws = 4 * math.ceil(needed / low ** 2)
        sizes = torch.randint(low, high + 1, (count, draws), generator=generator)
        tops = (torch.rand((count, draws), generator=generator) * (height - sizes + 1)).long()
        lefts = (torch.rand((count, draws), generator=generator) * (width - sizes + 1)).long()
        region = torch.zeros(count, 1, height, width, dtype=torch.bool)
        for i in range(count):
            for size, top, left in zip(sizes[i].tolist(), tops[i].tolist(), lefts[i].tolist(), strict=True):
                if int(region[i].sum()) >= needed:
                    break
                region[i, :, top:top + size, left:left + size] = True
        return region

    # --- forward -----------------------------------------------------------------------------------------------

    def _reconstruct(self, image: Tensor, mask: InpaintingMask, backbone: Backbone) -> Tensor:
        """The decoder's reconstruction (normalised space, float32) from the image with its hole at the mean."""
        inputs = _like_layout(torch.where(mask.hole, 0.0, image), image)
        return self._decode(inputs, backbone, image.shape[-2:])

    def forward(self, batch: Mapping[str, Tensor], backbone: Backbone) -> dict[str, Tensor]:
        image = batch["image"].float()
        mask = self.mask(batch)
        raw = self._reconstruct(image, mask, backbone)
        target = denormalize(image)
        weight = torch.where(mask.hole, 1.0, torch.where(mask.region, self.overlap_weight, 0.0))
        squared_error = (denormalize(raw) - target).square()
        reconstruction = (weight * squared_error).sum() / (3 * mask.region_pixels)
        outputs = {"loss": reconstruction}
        if self.discriminator is not None:
            top, bottom, left, right = mask.box
            composite = torch.where(mask.region, raw, image)[..., top:bottom, left:right]
            logits = self.discriminator(composite).float().mean((1, 2, 3))
            adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
            outputs = {"loss": reconstruction + self.adversarial_weight * adversarial,
                       "reconstruction_loss": reconstruction.detach(), "adversarial_loss": adversarial.detach()}
        if batch.get("with_metrics", True):
            outputs["psnr"] = _masked_psnr(denormalize(raw.detach()).clamp(0.0, 1.0), target, mask.hole)
        return outputs

    def predict(self, batch: Mapping[str, Tensor], backbone: Backbone) -> Tensor:
        """The image with its hole filled by the reconstruction, RGB in [0, 1]: :math:`(B, 3, H, W)` float32."""
        image = batch["image"].float()
        mask = self.mask(batch)
        raw = self._reconstruct(image, mask, backbone)
        return torch.where(mask.hole, denormalize(raw), denormalize(image)).clamp(0.0, 1.0)

    # --- adversary (only with adversarial_weight > 0) ----------------------------------------------------------

    @property
    def discriminator_parameters(self):
        """The discriminator's parameters, for the engine's second optimizer; absent without an adversary, so
        ``hasattr(objective, "discriminator_loss")`` tells the engine whether to build one."""
        if self.discriminator is None:
            raise AttributeError("Inpainting has no discriminator (adversarial_weight=0)")
        return self.discriminator.parameters

    @property
    def discriminator_loss(self):
        """``discriminator_loss(batches, backbone)``, see :meth:`_discriminator_loss`; absent without an adversary."""
        if self.discriminator is None:
            raise AttributeError("Inpainting has no discriminator (adversarial_weight=0)")
        return self._discriminator_loss

    def _discriminator_loss(self, batches: Mapping[str, Mapping[str, Tensor]], backbone: Backbone
                            ) -> dict[str, Tensor]:
        r"""The discriminator's loss on the real batch (Pathak et al., CVPR 2016, Eq. 2, as a minimisation):

        .. math::
            L_D = \tfrac{1}{2}\big(\mathrm{BCE}(D(x_R), 1) + \mathrm{BCE}(D(\tilde{x}_R), 0)\big)

        with :math:`x_R` the crop of the real image and :math:`\tilde{x}_R` that of the composite, whose
        reconstruction is recomputed under ``torch.no_grad()`` (see the class docstring for the cost).

        Shape:
            - Output: ``{"loss", "accuracy"}``, 0-dim float32; accuracy over the :math:`2B` crops.
        """
        if "real" not in batches:
            raise KeyError(f"Inpainting.discriminator_loss needs a 'real' batch, got {sorted(batches)}")
        batch = batches["real"]
        image = batch["image"].float()
        mask = self.mask(batch)
        with torch.no_grad():
            composite = torch.where(mask.region, self._reconstruct(image, mask, backbone), image)
        top, bottom, left, right = mask.box
        real = self.discriminator(image[..., top:bottom, left:right]).float().mean((1, 2, 3))
        fake = self.discriminator(composite[..., top:bottom, left:right]).float().mean((1, 2, 3))
        loss = 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        accuracy = torch.cat([real.detach() > 0, fake.detach() < 0]).float().mean()
        return {"loss": loss, "accuracy": accuracy}


def _discriminator(channels: int) -> nn.Sequential:
    """A small DCGAN-style critic (Radford et al., ICLR 2016) producing a map of logits.

    GroupNorm instead of the paper's BatchNorm: real and fake crops pass separately, and batch statistics would
    tell them apart by themselves.
    """
    widths = [channels, 2 * channels, 4 * channels]
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], kernel_size=4, stride=2, padding=1),
                               nn.LeakyReLU(0.2, inplace=True)]
    for previous, width in itertools.pairwise(widths):
        layers += [nn.Conv2d(previous, width, kernel_size=4, stride=2, padding=1, bias=False),
                   nn.GroupNorm(math.gcd(32, width), width), nn.LeakyReLU(0.2, inplace=True)]
    layers.append(nn.Conv2d(widths[-1], 1, kernel_size=3, padding=1))
    return nn.Sequential(*layers)


@torch.no_grad()
def _masked_psnr(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean over images of the PSNR (peak 1) over each image's masked pixels; images without any are skipped."""
    squared = torch.where(mask, (prediction - target).square(), 0.0).flatten(1).sum(1)
    pixels = 3 * mask.flatten(1).sum(1)
    keep = pixels > 0
    mse = squared / pixels.clamp(min=1)
    psnr = -10.0 * torch.log10(mse.clamp(min=1e-10))
    return torch.where(keep, psnr, 0.0).sum() / keep.sum().clamp(min=1)


__all__ = [
    "AB_SCALE",
    "COLORIZATION_MODES",
    "INPAINTING_MASKS",
    "Colorization",
    "Inpainting",
    "InpaintingMask",
    "annealed_mean",
    "in_gamut_ab_bins",
    "lab_to_rgb",
    "lightness_to_grey",
    "rebalancing_weights",
    "rgb_to_lab",
    "smooth_prior",
    "soft_encode",
]
