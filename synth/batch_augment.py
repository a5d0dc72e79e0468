"""FrameAugment's recipe applied to a whole batch of rendered frames at once, on the training device.

:class:`synth.data.FrameAugment` augments one frame per call on the loader's CPU, in float64, at about 3 ms a
sample. :class:`BatchAugment` runs the same recipe over a batch of raw frames (as :mod:`synth.packed` stores them)
with a handful of batched tensor ops, on whatever device the frames are on:

* every random draw comes from ``torch.Generator().manual_seed(seed)`` of each sample's seed (``batch["seed"]``),
  in exactly FrameAugment's order, so a sample gets the same crop window, flip and jitter factors as FrameAugment
  would give it (and a resumed run sees the same batches);
* labels (depth, normals, contours, instance ids) are gathered at the source pixels that FrameAugment's
  ``NEAREST_EXACT`` resize samples, computed with the same float32 arithmetic, so they equal FrameAugment's labels
  exactly; a flip negates the x of the normals and mirrors boxes and the principal point;
* the image is cropped and resized per sample with the same antialiased bilinear filter as FrameAugment (uint8 on
  the CPU, float on a GPU: equal to FrameAugment's image up to rounding to 1/255); brightness, contrast,
  saturation and grayscale use torchvision's formulas with one factor per sample, in each sample's order. Hue is
  shifted by a rotation of the YIQ chroma plane (as :mod:`pretext.augment` does): a 3x3 matrix per sample instead
  of torchvision's HSV round trip, which cost more than everything else here together (0.4 ms a sample); both
  turn every colour by up to the same fraction of a turn.

Pixel conventions follow :mod:`synth.data`: pixel ``(u, v)`` spans ``[u, u + 1) x [v, v + 1)``.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from synth.constants import IMAGENET_MEAN, IMAGENET_STD
from synth.data import FrameAugment, _uniform

#: torchvision's ``rgb_to_grayscale`` weights (contrast, saturation and grayscale use them).
_LUMA = (0.2989, 0.587, 0.114)
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)


def nearest_exact_indices(start: int | np.ndarray, length: int | np.ndarray, size: int) -> np.ndarray:
    """Source indices ``start + i`` that an ``(length -> size)`` ``nearest-exact`` resize samples.

    The arithmetic of PyTorch's kernel: ``min(floor(float32((j + 0.5) * float32(length / size))), length - 1)``
    (checked against ``F.interpolate`` for every length up to 300 and sizes 16-224). ``start`` and ``length`` may be
    (B,) arrays (one window per sample, one vectorised call for a batch): the result is then (B, size).
    """
    start, length = np.asarray(start, np.int64)[..., None], np.asarray(length, np.int64)[..., None]
    scale = (length / size).astype(np.float32)
    source = np.floor(((np.arange(size) + 0.5) * scale).astype(np.float32)).astype(np.int64)
    return start + np.minimum(source, length - 1)


#: RGB -> YIQ (FCC NTSC); hue is the angle of (I, Q).
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                            [0.595716, -0.274453, -0.321263],
                            [0.211456, -0.522591, 0.311135]], dtype=torch.float64)


def hue_matrices(hue: Tensor) -> Tensor:
    r"""(B, 3, 3) RGB matrices that turn the hue by ``hue`` (in turns, as torchvision's ``hue_factor``).

    :math:`M = I + T^{-1}(R_\theta - I)T` with :math:`T` RGB-to-YIQ and :math:`R_\theta` the rotation of the (I, Q)
    plane by :math:`\theta = 2\pi \cdot hue`: luma is kept, and ``hue=0`` is exactly the identity.
    """
    theta = hue.double() * 2 * torch.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    rotation = torch.zeros(len(hue), 3, 3, dtype=torch.float64)
    rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos - 1, -sin, sin, cos - 1
    return torch.eye(3, dtype=torch.float64) + torch.linalg.inv(_RGB_TO_YIQ) @ rotation @ _RGB_TO_YIQ


class BatchAugment:
    """:class:`synth.data.FrameAugment`'s recipe (the same settings object) applied per batch.

    Args:
        recipe: The augmentation settings; ``recipe.train=False`` gives the deterministic evaluation input.

    Example:
        >>> augment = BatchAugment(FrameAugment(size=64))  # doctest: +SKIP
        >>> batch = augment(raw_frames, seeds)              # raw_frames on the GPU, seeds (B,) int64 on the CPU
    """

    def __init__(self, recipe: FrameAugment):
        self.recipe = recipe

    def parameters(self, seeds: Tensor | list[int], height: int, width: int) -> dict[str, np.ndarray]:
        """Per-sample draws, from ``torch.Generator().manual_seed(seed)`` in FrameAugment's order.

        Returns:
            ``crop`` (B, 4) int64 ``top, left, h, w``; ``flip`` (B,) bool; ``order`` (B, 4) int64 jitter order;
            ``factors`` (B, 4) float64 brightness, contrast, saturation, hue; ``gray`` (B,) bool.
        """
        recipe = self.recipe
        n = len(seeds)
        crop = np.zeros((n, 4), np.int64)
        flip = np.zeros(n, bool)
        order = np.tile(np.arange(4), (n, 1))
        factors = np.zeros((n, 4))
        factors[:, :3] = 1.0
        gray = np.zeros(n, bool)
        for b, seed in enumerate(torch.as_tensor(seeds).tolist()):
            generator = torch.Generator().manual_seed(int(seed)) if recipe.train else None
            crop[b] = recipe.crop_params(height, width, generator)
            if not recipe.train:
                continue
            flip[b] = _uniform(generator, 0.0, 1.0) < recipe.flip_prob
            order[b] = torch.randperm(4, generator=generator).numpy()
            for k, strength in enumerate((recipe.brightness, recipe.contrast, recipe.saturation)):
                factors[b, k] = _uniform(generator, max(0.0, 1 - strength), 1 + strength)
            factors[b, 3] = _uniform(generator, -recipe.hue, recipe.hue)
            gray[b] = _uniform(generator, 0.0, 1.0) < recipe.grayscale_prob
        return {"crop": crop, "flip": flip, "order": order, "factors": factors, "gray": gray}

    def __call__(self, frames: dict, seeds: Tensor) -> dict:
        """Augment a batch of raw frames of one size.

        Args:
            frames: Raw frames, all ``H x W``, on the training device (boxes may stay on the CPU):
                ``colors`` (B, H, W, 3) uint8; ``depth`` (B, H, W) and ``normals`` (B, H, W, 3) float16 or
                float32; ``contours`` (B, H, W) uint8; ``instance_segmaps`` (B, H, W) integer; ``cam_K``
                (B, 3, 3); ``frame_id`` (B,); ``boxes`` (M, 4) float32, ``box_category_ids`` and
                ``box_instance_ids`` (M,), the boxes of all samples one after the other, and ``box_offsets``
                (B + 1,) int64: sample ``b`` owns rows ``box_offsets[b]:box_offsets[b + 1]``.
            seeds: (B,) int64 per-sample seeds (kept on the CPU; passed on as ``seed``).

        Returns:
            The batch :func:`synth.data.collate_frames` makes of FrameAugment's samples, on the frames' device:
            ``image`` (B, 3, S, S) normalised, ``depth`` (B, 1, S, S) float32, ``valid`` (B, 1, S, S) bool,
            ``normals`` (B, 3, S, S), ``contours`` (B, 1, S, S) float32, ``instances`` (B, S, S) int64, ``cam_K``
            (B, 3, 3) float32, ``frame_id`` (B,) int64, lists of B ``boxes`` (N_b, 4), ``box_categories`` and
            ``box_instances`` (N_b,) int64, and ``seed``.
        """
        colors = frames["colors"]
        device = colors.device
        n, height, width = colors.shape[:3]
        size = self.recipe.size
        params = self.parameters(seeds, height, width)
        crop, flip = params["crop"], params["flip"]

        # Labels: one gather at the source pixels of FrameAugment's nearest-exact resize (after the flip).
        rows = nearest_exact_indices(crop[:, 0], crop[:, 2], size)
        cols = nearest_exact_indices(crop[:, 1], crop[:, 3], size)
        cols[flip] = cols[flip, ::-1]
        # Flat pixel index (b, row, col) -> (b * H + row) * W + col.
        flat = (np.arange(n).reshape(n, 1, 1) * height + rows.reshape(n, size, 1)) * width + cols.reshape(n, 1, size)
        flat = flat.reshape(-1)
        flat_on_device = None if device.type == "cpu" else torch.from_numpy(flat).to(device, non_blocking=True)

        def gather(array: Tensor) -> Tensor:
            channels = array.shape[3:]
            if flat_on_device is None:
                # numpy's take is 4-5x faster than torch's index_select for one-channel pixels on a CPU (0.3 vs
                # 1.4 ms for 32 x 128^2) and 1.6x for three (the normals); the result shares memory with torch.
                pixels = array.numpy().reshape(n * height * width, -1)
                taken = np.take(pixels[:, 0], flat) if pixels.shape[1] == 1 else np.take(pixels, flat, axis=0)
                return torch.from_numpy(taken).view(n, size, size, *channels)
            return array.reshape(n * height * width, -1).index_select(0, flat_on_device).view(n, size, size, *channels)

        depth = gather(frames["depth"]).float().unsqueeze(1)
        # One pass converts and makes channels first.
        normals = gather(frames["normals"]).permute(0, 3, 1, 2).to(torch.float32,
                                                                  memory_format=torch.contiguous_format)
        if flip.any():
            flipped = torch.from_numpy(np.flatnonzero(flip)).to(device, non_blocking=True)
            normals[flipped, 0] = -normals[flipped, 0]  # mirrored camera: x axis reversed
        contours = gather(frames["contours"]).float().unsqueeze(1)
        instances = gather(frames["instance_segmaps"]).long()

        image = self._photometric(self._resample(colors, crop, flip), params)

        K, boxes, categories, instances_of_boxes = self._geometry(frames, crop, flip)
        return {
            "image": image,
            "depth": depth,
            "normals": normals,
            "contours": contours,
            "valid": depth > 0,
            "instances": instances,
            "boxes": boxes,
            "box_categories": categories,
            "box_instances": instances_of_boxes,
            "cam_K": K.to(device, non_blocking=True),
            "frame_id": torch.as_tensor(frames["frame_id"]).to(device=device, dtype=torch.int64),
            "seed": torch.as_tensor(seeds, dtype=torch.int64).cpu(),
        }

    def _resample(self, colors: Tensor, crop: np.ndarray, flip: np.ndarray) -> Tensor:
        """(B, 3, S, S) float image in 0..255: each crop window resized as FrameAugment does, then flipped."""
        size = self.recipe.size
        out = torch.empty(colors.shape[0], 3, size, size, device=colors.device)
        for b, (top, left, h, w) in enumerate(crop.tolist()):
            window = colors[b:b + 1, top:top + h, left:left + w].permute(0, 3, 1, 2)
            if colors.device.type != "cpu":  # CUDA's antialiased kernel takes floats; the CPU's is fastest on uint8
                window = window.float()
            resized = F.interpolate(window, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[b:b + 1] = resized.flip(-1) if flip[b] else resized
        return out

    def colour_maps(self, params: dict) -> tuple[Tensor, Tensor, Tensor]:
        r"""Per-sample affine colour map ``x' = A x + c + D mean(x)`` of the whole photometric recipe.

        Brightness (:math:`x' = f x`), contrast (:math:`x' = f x + (1 - f)\,\bar y\,\mathbf 1`, :math:`\bar y` the
        image's mean luma), saturation (:math:`x' = f x + (1 - f)\,\mathbf 1 w^\top x`), hue (:func:`hue_matrices`)
        and grayscale (:math:`\mathbf 1 w^\top x`) are affine in the pixel and in the image's mean colour, so their
        composition in each sample's order is one such map (``D`` carries the contrast's mean). torchvision clamps
        to [0, 1] after every operation; here the composed map is clamped once, which differs only where an
        intermediate colour left [0, 1].

        Returns:
            ``A`` (B, 3, 3), ``c`` (B, 3), ``D`` (B, 3, 3), float64 on the CPU.
        """
        recipe = self.recipe
        n = len(params["factors"])
        eye = torch.eye(3, dtype=torch.float64).expand(n, 3, 3)
        luma = torch.tensor(_LUMA, dtype=torch.float64)
        to_gray = torch.ones(3, 1, dtype=torch.float64) * luma  # 1 w^T
        A, c, D = eye.clone(), torch.zeros(n, 3, dtype=torch.float64), torch.zeros(n, 3, 3, dtype=torch.float64)
        if recipe.train:
            factors = torch.from_numpy(params["factors"])
            strengths = (recipe.brightness, recipe.contrast, recipe.saturation, recipe.hue)
            hue = hue_matrices(factors[:, _HUE])
            for position in range(4):
                op = torch.from_numpy(params["order"][:, position])
                f = factors.gather(1, op.view(n, 1)).view(n, 1, 1)
                linear = eye.clone()
                linear = torch.where((op == _BRIGHTNESS).view(n, 1, 1), f * eye, linear)
                linear = torch.where((op == _SATURATION).view(n, 1, 1), f * eye + (1 - f) * to_gray, linear)
                linear = torch.where((op == _HUE).view(n, 1, 1), hue, linear)
                is_contrast = (op == _CONTRAST).view(n, 1, 1)
                linear = torch.where(is_contrast, f * eye, linear)
                active = torch.tensor([strengths[i] > 0 for i in range(4)])[op].view(n, 1, 1)
                linear = torch.where(active, linear, eye)
                contrast = active & is_contrast
                # contrast adds (1 - f) * mean luma of the current image = (1 - f) 1 w^T (A mean + c + D mean)
                mixed = torch.where(contrast, (1 - f) * to_gray, torch.zeros(()))
                c_next = linear @ c.unsqueeze(2) + mixed @ c.unsqueeze(2)
                D = linear @ D + mixed @ (A + D)
                A = linear @ A
                c = c_next.squeeze(2)
        gray = torch.from_numpy(params["gray"] | recipe.grayscale).view(n, 1, 1)
        if gray.any():
            A, D = torch.where(gray, to_gray @ A, A), torch.where(gray, to_gray @ D, D)
            c = torch.where(gray.view(n, 1), (to_gray @ c.unsqueeze(2)).squeeze(2), c)
        return A, c, D

    def _photometric(self, image: Tensor, params: dict) -> Tensor:
        """Jitter and grayscale (:meth:`colour_maps`) on a 0..255 image, then clamp and ImageNet normalisation."""
        n, image_shape = image.shape[0], image.shape[2:]
        A, c, D = (t.to(image.device, torch.float32, non_blocking=True) for t in self.colour_maps(params))
        pixels = image.view(n, 3, -1)
        mean = pixels.mean(2, keepdim=True)  # (B, 3, 1) on the 0..255 scale
        # ImageNet normalisation (x / 255 - m) / s folded into the map, and the clamp to [0, 255] moved with it.
        std = torch.tensor(IMAGENET_STD, device=image.device).view(1, 3, 1)
        shift = torch.tensor(IMAGENET_MEAN, device=image.device).view(1, 3, 1) / std
        bias = (c.unsqueeze(2) + torch.bmm(D, mean) / 255.0) / std - shift
        image = torch.baddbmm(bias, A / (255.0 * std), pixels)
        if image.device.type != "cpu":
            return image.clamp_(min=-shift, max=1.0 / std - shift).view(n, 3, *image_shape)
        # On a CPU a clamp to per-channel tensor bounds is ~10x slower than three clamps to scalars (the same
        # float32 bounds).
        for channel, (low, high) in enumerate(zip((-shift).view(3).tolist(), (1.0 / std - shift).view(3).tolist(),
                                                  strict=True)):
            image[:, channel].clamp_(min=low, max=high)
        return image.view(n, 3, *image_shape)

    def _geometry(self, frames: dict, crop: np.ndarray, flip: np.ndarray):
        """Intrinsics and boxes of the output images (CPU float64 arithmetic, as FrameAugment)."""
        size = float(self.recipe.size)
        device = frames["colors"].device
        top, left, h, w = (torch.from_numpy(crop[:, i]).double() for i in range(4))
        sx, sy = size / w, size / h
        flip_t = torch.from_numpy(flip)
        K = torch.as_tensor(frames["cam_K"]).cpu().double().clone()
        K[:, 0, 2] = (K[:, 0, 2] - left) * sx
        K[:, 1, 2] = (K[:, 1, 2] - top) * sy
        K[:, 0, :2] *= sx[:, None]
        K[:, 1, :2] *= sy[:, None]
        K[:, 0, 2] = torch.where(flip_t, size - K[:, 0, 2], K[:, 0, 2])

        offsets = torch.as_tensor(frames["box_offsets"]).cpu()
        counts = (offsets[1:] - offsets[:-1]).tolist()
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts, dtype=torch.int64))
        boxes = torch.as_tensor(frames["boxes"]).cpu().reshape(-1, 4).float().double()
        shift = torch.stack([left, top, left, top], 1)[owner]
        # FrameAugment scales boxes by a float32 tensor of the factors: the same rounding here.
        scale = torch.stack([sx, sy, sx, sy], 1).float().double()[owner]
        boxes = (boxes - shift) * scale
        mirrored = torch.stack([size - boxes[:, 2], boxes[:, 1], size - boxes[:, 0], boxes[:, 3]], 1)
        boxes = torch.where(flip_t[owner].view(-1, 1), mirrored, boxes).clamp(0.0, size)
        first = torch.ceil(boxes - 0.5)  # kept iff some output pixel centre lies inside (see FrameAugment)
        keep = (first[:, 0] < first[:, 2]) & (first[:, 1] < first[:, 3])
        kept_counts = torch.zeros(len(counts), dtype=torch.int64).index_add_(0, owner[keep], torch.ones_like(
            owner[keep])).tolist()
        categories = torch.as_tensor(frames["box_category_ids"]).cpu().reshape(-1).long()[keep]
        box_instances = torch.as_tensor(frames["box_instance_ids"]).cpu().reshape(-1).long()[keep]
        moved = [t.to(device, non_blocking=True) for t in (boxes[keep].float(), categories, box_instances)]
        return (K.float(), *(list(t.split(kept_counts)) for t in moved))

