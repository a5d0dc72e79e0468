r"""SimCLR's augmentation, applied on the training device to a whole batch with different parameters per sample.

Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual Representations", ICML
2020 (their Appendix A) compose: a random resized crop, a horizontal flip, colour jitter (brightness, contrast,
saturation, hue in random order, with probability 0.8), grayscale (probability 0.2) and a Gaussian blur (kernel
10% of the image side, :math:`\sigma \in [0.1, 2]`, probability 0.5). Per-image pipelines (torchvision's
``transforms``) run in the data loader on the CPU; here the same recipe runs as a handful of batched tensor ops on
the images already on the device, because the objective, not the loader, makes the views (the loader's images are
shared by every objective of a run).

Every random parameter is drawn on the CPU from the ``torch.Generator`` passed in (see
:func:`pretext.common.batch_generator`), a fixed number of draws per sample, then moved to the device in one copy:
the views depend only on the images and the generator's state, not on the device.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from pretext.common import denormalize, normalize

#: Luma weights of the grayscale, contrast and saturation operations: torchvision's ``rgb_to_grayscale``
#: (ITU-R BT.601, red rounded to 0.2989), so those three match torchvision's formulas exactly.
LUMA_WEIGHTS: tuple[float, float, float] = (0.2989, 0.587, 0.114)

#: RGB -> YIQ (FCC NTSC). Hue is the angle of (I, Q).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]], dtype=torch.float64)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)

#: Crop attempts per sample before falling back to the largest central crop, as in torchvision's RandomResizedCrop.
_CROP_ATTEMPTS = 10

# Colour-jitter operations, in the order of the columns that rank them per sample.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def hue_rotation_matrix(angle: Tensor) -> Tensor:
    r"""Per-sample RGB matrices that rotate the hue by ``angle`` radians in YIQ space, keeping luma.

    With :math:`T` the RGB-to-YIQ matrix and :math:`R_\theta` the rotation of the (I, Q) plane,

    .. math::
        M_\theta = I + T^{-1}(R_\theta - I)\,T,

    which equals :math:`T^{-1} R_\theta T` and is exactly the identity at :math:`\theta = 0` (no round-off from
    :math:`T^{-1}T`). Since the Y row of :math:`R_\theta - I` is zero, :math:`M_\theta` keeps YIQ's luma
    :math:`Y = 0.299R + 0.587G + 0.114B` of every colour (before clamping to :math:`[0, 1]`). This is the hue
    shift of SimCLR's colour jitter done as a linear map instead of torchvision's HSV round trip. The two differ in
    detail (HSV hue is not a rotation of a linear chroma plane, and HSV keeps the value, not luma); as an
    augmentation both turn every colour by up to the same fraction of a turn, in either direction.

    Args:
        angle: rotation per sample, radians.

    Shape:
        - Input: :math:`(B,)`. Output: :math:`(B, 3, 3)`, in the dtype of ``angle``.
    """
    cos_minus_one, sin = torch.cos(angle.double()) - 1.0, torch.sin(angle.double())
    rotation_minus_identity = torch.zeros(angle.shape[0], 3, 3, dtype=torch.float64)
    rotation_minus_identity[:, 1, 1], rotation_minus_identity[:, 1, 2] = cos_minus_one, -sin
    rotation_minus_identity[:, 2, 1], rotation_minus_identity[:, 2, 2] = sin, cos_minus_one
    matrix = torch.eye(3, dtype=torch.float64) + _YIQ_TO_RGB @ rotation_minus_identity @ _RGB_TO_YIQ
    return matrix.to(angle.dtype)


def blur_kernel_size(size: int) -> int:
    """SimCLR's Gaussian-blur kernel size for views of ``size`` pixels: 10% of the side, made odd, at least 3."""
    kernel = max(3, int(0.1 * size))
    return kernel + 1 - kernel % 2


class ContrastiveAugment(nn.Module):
    r"""SimCLR's augmentation (Chen et al., ICML 2020), batched on the device with per-sample parameters.

    For each image, in this order:

    1. **Random resized crop** of area fraction in ``scale`` and aspect ratio (log-uniform) in ``ratio``, resized to
       ``size`` x ``size`` by :func:`torchvision.ops.roi_align` (one box per sample, ``aligned=True``, adaptive
       sampling: one bilinear sample per output pixel when enlarging, the average of several when shrinking).
       As in torchvision's ``RandomResizedCrop``, 10 attempts are drawn and the first that fits the image is kept,
       else the largest central crop within ``ratio``; unlike it, the box is not rounded to whole pixels.
    2. **Horizontal flip** with probability ``flip_p``.
    3. **Colour jitter** with probability ``jitter_p``: brightness :math:`x \mapsto b x`, contrast
       :math:`x \mapsto c x + (1 - c)\,\bar{y}` (:math:`\bar{y}` the image's mean luma), saturation
       :math:`x \mapsto s x + (1 - s)\,y` (:math:`y` the pixel's luma), each factor uniform in
       :math:`[\max(0, 1 - v), 1 + v]` for strength :math:`v`, and a hue rotation by :math:`2\pi h`,
       :math:`h \sim U[-\mathrm{hue}, \mathrm{hue}]`, in YIQ space (:func:`hue_rotation_matrix`), in a random order
       per sample. Brightness, contrast and saturation are torchvision's formulas; hue is a linear stand-in for
       its HSV shift.
    4. **Grayscale** (luma in all three channels) with probability ``grayscale_p``.
    5. **Gaussian blur** with probability ``blur_p``, :math:`\sigma \sim U[\mathrm{blur\_sigma}]` in output pixels,
       kernel :func:`blur_kernel_size` (10% of ``size``), reflect padding, as a separable grouped convolution with
       one kernel per sample.

    Images are clamped to :math:`[0, 1]` in RGB after the crop and after every colour operation, as torchvision's
    tensor ops do. The recipe's constants were chosen for 224-pixel ImageNet crops; ``blur_sigma`` is in pixels
    of the view, so a small ``size`` blurs relatively more.

    Args:
        size: side of the square views.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio (width / height).
        jitter_p: probability of the colour jitter.
        brightness: brightness strength :math:`v`.
        contrast: contrast strength :math:`v`.
        saturation: saturation strength :math:`v`.
        hue: maximum hue shift, as a fraction of a full turn (at most 0.5).
        grayscale_p: probability of converting to grayscale.
        blur_p: probability of the Gaussian blur.
        blur_sigma: range of the blur's standard deviation, pixels.
        flip_p: probability of the horizontal flip.

    Inputs: ``images``, ``generator``
        - **images**: ImageNet-normalised images on any device, any float dtype.
        - **generator**: a CPU ``torch.Generator``; the call advances it by a fixed amount per sample.

    Shape:
        - images: :math:`(B, 3, H, W)`.
        - Output: ImageNet-normalised views :math:`(B, 3, \mathrm{size}, \mathrm{size})`, float32, on the images'
          device (channels_last when the images are).

    Examples:
        >>> augment = ContrastiveAugment(size=32)
        >>> generator = torch.Generator().manual_seed(0)
        >>> augment(torch.randn(4, 3, 48, 48), generator).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(self, size: int = 64, scale: tuple[float, float] = (0.2, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter_p: float = 0.8, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.1, grayscale_p: float = 0.2,
                 blur_p: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0), flip_p: float = 0.5):
        super().__init__()
        if size < 2:
            raise ValueError(f"ContrastiveAugment: size must be >= 2, got {size}")
        for name, (low, high) in (("scale", scale), ("ratio", ratio), ("blur_sigma", blur_sigma)):
            if not 0 < low <= high:
                raise ValueError(f"ContrastiveAugment: {name} must be 0 < low <= high, got {(low, high)}")
        if scale[1] > 1:
            raise ValueError(f"ContrastiveAugment: scale is a fraction of the image's area, got {scale}")
        for name, value in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p),
                            ("flip_p", flip_p)):
            if not 0 <= value <= 1:
                raise ValueError(f"ContrastiveAugment: {name} is a probability, got {value}")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"ContrastiveAugment: {name} must be >= 0, got {value}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"ContrastiveAugment: hue must be in [0, 0.5], got {hue}")
        self.size = size
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.flip_p = flip_p
        self.kernel_size = blur_kernel_size(size)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"

    def forward(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ContrastiveAugment: images must be (B, 3, H, W), got {tuple(images.shape)}")
        if generator.device.type != "cpu":
            raise ValueError(f"ContrastiveAugment: generator must be a CPU generator, got {generator.device}")
        batch, _, height, width = images.shape
        params = self.sample_parameters(batch, height, width, generator)
        device = images.device
        params = {name: params[name].to(device, non_blocking=True)
                  for name in ("boxes", "flip", "matrices", "mean_weights", "grayscale", "kernels")}
        channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
        # Matmuls and convolutions here would run in bf16 under autocast; colours need float32.
        with torch.autocast(device_type=device.type, enabled=False):
            rgb = denormalize(images.float()).clamp(0.0, 1.0)
            views = roi_align(rgb.contiguous(), params["boxes"], output_size=(self.size, self.size),
                              spatial_scale=1.0, sampling_ratio=-1, aligned=True).clamp(0.0, 1.0)
            views = torch.where(params["flip"].view(-1, 1, 1, 1), views.flip(-1), views)
            views = self._jitter(views, params["matrices"], params["mean_weights"])
            luma = _luma(views)
            views = torch.where(params["grayscale"].view(-1, 1, 1, 1), luma.expand_as(views), views)
            views = self._blur(views, params["kernels"])
            views = normalize(views)
        if channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        return views

    @torch.no_grad()
    def sample_parameters(self, batch: int, height: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw every random parameter of a batch on the CPU: a fixed number of uniforms per sample.

        Returns:
            ``boxes`` :math:`(B, 5)` (sample index, x0, y0, x1, y1 in pixels, ``roi_align``'s format), ``flip``
            :math:`(B,)` bool, ``matrices`` :math:`(4, B, 3, 3)` and ``mean_weights`` :math:`(4, B)` (the jitter's
            four steps, see :meth:`_jitter`), ``grayscale`` :math:`(B,)` bool, ``kernels`` :math:`(B, k)` (1-D
            blur kernels, a unit impulse where there is no blur); and, for inspection, the factors they were built
            from: ``brightness``, ``contrast``, ``saturation`` (1 without jitter), ``hue_angle`` (radians),
            ``order`` :math:`(B, 4)` (the operation at each step: 0 brightness, 1 contrast, 2 saturation, 3 hue),
            ``sigma`` and ``blur`` (bool). Float32 except the masks and ``order``.
        """
        columns = 2 * _CROP_ATTEMPTS + 2 + 1 + 5 + 4 + 1 + 2
        uniform = torch.rand(batch, columns, generator=generator, dtype=torch.float64)
        draws = iter(uniform.unbind(1))

        def take(count: int) -> Tensor:
            return torch.stack([next(draws) for _ in range(count)], dim=1)

        # --- random resized crop (torchvision's RandomResizedCrop.get_params, continuous) ---
        area = height * width * (self.scale[0] + (self.scale[1] - self.scale[0]) * take(_CROP_ATTEMPTS))
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_low + (log_high - log_low) * take(_CROP_ATTEMPTS))
        crop_w, crop_h = (area * aspect).sqrt(), (area / aspect).sqrt()
        fits = (crop_w <= width) & (crop_h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        crop_w, crop_h = crop_w.gather(1, first)[:, 0], crop_h.gather(1, first)[:, 0]
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            fallback_w, fallback_h = width, width / self.ratio[0]
        elif in_ratio > self.ratio[1]:
            fallback_w, fallback_h = height * self.ratio[1], height
        else:
            fallback_w, fallback_h = width, height
        found = fits.any(dim=1)
        crop_w = torch.where(found, crop_w, fallback_w)
        crop_h = torch.where(found, crop_h, fallback_h)
        position = take(2)
        # The fallback is centred, as in torchvision; a crop that fits is placed uniformly.
        x0 = torch.where(found, position[:, 0], 0.5) * (width - crop_w)
        y0 = torch.where(found, position[:, 1], 0.5) * (height - crop_h)
        boxes = torch.stack([torch.arange(batch, dtype=torch.float64), x0, y0, x0 + crop_w, y0 + crop_h], dim=1)

        flip = take(1)[:, 0] < self.flip_p

        # --- colour jitter: factors, then each sample's order of the four operations ---
        jitter = take(5)
        apply = jitter[:, 0] < self.jitter_p

        def factor(u: Tensor, strength: float) -> Tensor:
            low, high = max(0.0, 1.0 - strength), 1.0 + strength
            return torch.where(apply, low + (high - low) * u, 1.0)

        brightness = factor(jitter[:, 1], self.brightness)
        contrast = factor(jitter[:, 2], self.contrast)
        saturation = factor(jitter[:, 3], self.saturation)
        hue_angle = torch.where(apply, 2 * math.pi * self.hue * (2 * jitter[:, 4] - 1), 0.0)
        order = take(4).argsort(dim=1)  # order[b, k]: the operation sample b applies at step k

        eye = torch.eye(3, dtype=torch.float64).expand(batch, 3, 3)
        luma_rows = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64).expand(3, 3)
        per_operation = torch.stack([
            brightness.view(-1, 1, 1) * eye,
            contrast.view(-1, 1, 1) * eye,
            saturation.view(-1, 1, 1) * eye + (1 - saturation).view(-1, 1, 1) * luma_rows,
            hue_rotation_matrix(hue_angle),
        ], dim=1)  # (B, 4, 3, 3)
        matrices = per_operation.gather(1, order.view(batch, 4, 1, 1).expand(batch, 4, 3, 3)).transpose(0, 1)
        mean_weights = torch.where(order == _CONTRAST, (1 - contrast).view(-1, 1), 0.0).transpose(0, 1)

        grayscale = take(1)[:, 0] < self.grayscale_p

        # --- Gaussian blur ---
        blur = take(2)
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * blur[:, 1]
        offsets = torch.arange(self.kernel_size, dtype=torch.float64) - self.kernel_size // 2
        kernels = torch.exp(-0.5 * (offsets / sigma.view(-1, 1)) ** 2)
        kernels = kernels / kernels.sum(dim=1, keepdim=True)
        impulse = (offsets == 0).to(torch.float64).expand_as(kernels)
        kernels = torch.where((blur[:, 0] < self.blur_p).view(-1, 1), kernels, impulse)

        return {"boxes": boxes.float(), "flip": flip, "matrices": matrices.float(),
                "mean_weights": mean_weights.float(), "grayscale": grayscale, "kernels": kernels.float(),
                "brightness": brightness.float(), "contrast": contrast.float(), "saturation": saturation.float(),
                "hue_angle": hue_angle.float(), "order": order, "sigma": sigma.float(),
                "blur": blur[:, 0] < self.blur_p}

    @staticmethod
    def _jitter(views: Tensor, matrices: Tensor, mean_weights: Tensor) -> Tensor:
        r"""Four colour steps, each :math:`x \mapsto \mathrm{clamp}(A x + \beta\,\bar{y}(x), 0, 1)` per sample.

        Brightness, saturation and hue are the 3x3 matrix :math:`A` alone (:math:`\beta = 0`); contrast is
        :math:`A = cI`, :math:`\beta = 1 - c` with :math:`\bar{y}` the current image's mean luma. Step :math:`k`
        of sample :math:`b` carries the operation that sample ranks :math:`k`-th; samples without jitter carry
        identities, which leave them bit-for-bit unchanged.
        """
        for matrix, mean_weight in zip(matrices, mean_weights, strict=True):
            mean_luma = _luma(views).mean(dim=(1, 2, 3))
            views = torch.einsum("bij,bjhw->bihw", matrix, views)
            views = (views + (mean_weight * mean_luma).view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        return views

    def _blur(self, views: Tensor, kernels: Tensor) -> Tensor:
        """Separable Gaussian blur with one kernel per sample: a grouped convolution over (sample, channel)."""
        batch, channels, height, width = views.shape
        radius = self.kernel_size // 2
        weights = kernels.repeat_interleave(channels, dim=0)  # (B*C, k)
        flat = views.reshape(1, batch * channels, height, width)
        flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
        flat = F.conv2d(flat, weights.view(-1, 1, self.kernel_size, 1), groups=batch * channels)
        flat = F.conv2d(flat, weights.view(-1, 1, 1, self.kernel_size), groups=batch * channels)
        return flat.view(batch, channels, height, width).clamp(0.0, 1.0)


def _luma(rgb: Tensor) -> Tensor:
    """Luma :math:`(B, 1, H, W)` of RGB images :math:`(B, 3, H, W)`."""
    weights = torch.tensor(LUMA_WEIGHTS, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    return (rgb * weights).sum(dim=1, keepdim=True)


__all__ = ["LUMA_WEIGHTS", "ContrastiveAugment", "blur_kernel_size", "hue_rotation_matrix"]
