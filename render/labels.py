"""Turn raw BlenderProc outputs (normals, depth, instance/category maps) into the labels we store and train.

Everything here is post-processing on numpy arrays (numpy + OpenCV + open3d); it never imports bpy,
blenderproc or torch, so it runs in data loaders and tests without Blender.

Conventions (measured for BlenderProc 2.8 on Blender 4.2):

* BlenderProc's ``normals`` are camera-space normals in Blender camera axes (x right, y up, +z towards the
  viewer) encoded to [0, 1] as ``raw = (n + 1) / 2``; background encodes to (0.5, 0.5, 0.5), i.e. the zero
  vector. We store normals in OpenCV camera axes (x right, y down, z forward):
  ``n_cv = n_blender * [1, -1, -1]``.
* BlenderProc's ``depth`` is planar depth (distance along the optical axis) in metres, 1e10 where no surface
  was hit. We store float32 metres with 0 for "no surface".
* Intrinsics: square-pixel pinhole, horizontal field of view ``fov``; pixel (u, v) has its centre at image
  coordinates (u + 0.5, v + 0.5), so the optical axis passes through (W / 2, H / 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# Blender camera axes (x right, y up, z backwards) -> OpenCV camera axes (x right, y down, z forwards).
BLENDER_TO_OPENCV = np.array([1.0, -1.0, -1.0], dtype=np.float32)

# Below this decoded length a normal is background: real normals decode to ~1, background to exactly 0, so any
# threshold in between separates them robustly against 8-bit quantisation.
_MIN_NORMAL_NORM = 0.5

__all__ = [
    "BLENDER_TO_OPENCV",
    "NormalCheck",
    "backproject",
    "boxes_from_instances",
    "check_normals",
    "clean_depth",
    "contours",
    "decode_normals",
    "instance_boundaries",
    "intrinsics",
    "occlusion_edges",
]


def decode_normals(raw: np.ndarray, surface: np.ndarray | None = None) -> np.ndarray:
    """Decode BlenderProc's normal output to unit normals in OpenCV camera axes.

    The normal pass is anti-aliased while depth and instance passes are not, so on a silhouette a pixel can
    carry an object's depth but a normal blended with the background's zero vector. Given ``surface`` (where
    depth is valid), every surface pixel gets a unit normal: blended vectors are renormalised (the blend keeps
    the object's direction), and a pixel whose vector vanished takes its nearest surface neighbour's normal;
    every other pixel is zero, so depth and normals share one validity mask.

    Args:
        raw: (H, W, 3) float array in [0, 1], Blender camera-axes normals encoded as ``(n + 1) / 2``.
            Unsigned integer images (e.g. an 8-bit PNG of the same encoding) are scaled by their dtype's
            maximum first.

    Returns:
        (H, W, 3) float32. Unit vectors in OpenCV camera axes (x right, y down, z forward); exactly the zero
        vector where the decoded vector is shorter than 0.5 (background), or outside ``surface`` if given.
    """
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) normals, got shape {raw.shape}")
    if np.issubdtype(raw.dtype, np.unsignedinteger):
        raw = raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    n = (2.0 * raw.astype(np.float32) - 1.0) * BLENDER_TO_OPENCV
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    # NaN norms compare False, so corrupt pixels become background rather than propagating NaN.
    if surface is None:
        fg = norm >= _MIN_NORMAL_NORM
        out = np.where(fg, n / np.where(fg, norm, 1.0), 0.0)
        return out.astype(np.float32)
    surface = np.asarray(surface, bool)
    fg = surface[..., None] & (norm > 1e-3)
    out = np.where(fg, n / np.where(fg, norm, 1.0), 0.0).astype(np.float32)
    holes = surface & ~fg[..., 0]
    if holes.any() and fg.any():
        from scipy import ndimage

        _, (rows, cols) = ndimage.distance_transform_edt(~fg[..., 0], return_indices=True)
        out[holes] = out[rows[holes], cols[holes]]
    return out


def clean_depth(depth: np.ndarray, far: float = 1e9) -> np.ndarray:
    """Convert BlenderProc depth to our stored convention.

    Args:
        depth: (H, W) planar depth in metres; >= ``far`` (BlenderProc writes 1e10) means no surface.
        far: values at or beyond this are background.

    Returns:
        (H, W) float32 metres, 0 where the input is >= ``far``, not finite, or not positive.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"expected (H, W) depth, got shape {depth.shape}")
    # Test in float64 before casting: a far value beyond float32 range would otherwise become inf silently.
    valid = np.isfinite(depth) & (depth < far) & (depth > 0)
    return np.where(valid, depth, 0.0).astype(np.float32)


def intrinsics(width: int, height: int, fov: float) -> np.ndarray:
    """Pinhole intrinsics for square pixels and a horizontal field of view.

    Args:
        width: image width W in pixels.
        height: image height H in pixels.
        fov: horizontal field of view in radians.

    Returns:
        (3, 3) float64 K with fx = fy = (W / 2) / tan(fov / 2), cx = W / 2, cy = H / 2 (pixel (u, v) has its
        centre at (u + 0.5, v + 0.5)).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < fov < np.pi:
        raise ValueError(f"fov must be in (0, pi) radians, got {fov}")
    f = (width / 2.0) / np.tan(fov / 2.0)
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]], dtype=np.float64)


def instance_boundaries(instance_map: np.ndarray) -> np.ndarray:
    """Mark pixels on either side of an instance boundary.

    Args:
        instance_map: (H, W) integer instance ids.

    Returns:
        (H, W) bool, True where a pixel's id differs from at least one of its 4-neighbours. The image border
        is not a boundary.
    """
    ids = np.asarray(instance_map)
    if ids.ndim != 2:
        raise ValueError(f"expected (H, W) instance map, got shape {ids.shape}")
    out = np.zeros(ids.shape, dtype=bool)
    dx = ids[:, 1:] != ids[:, :-1]
    dy = ids[1:, :] != ids[:-1, :]
    out[:, 1:] |= dx
    out[:, :-1] |= dx
    out[1:, :] |= dy
    out[:-1, :] |= dy
    return out


def occlusion_edges(depth: np.ndarray, rel_jump: float = 0.1) -> np.ndarray:
    """Mark the near side of depth discontinuities.

    Args:
        depth: (H, W) clean depth in metres (0 = no surface).
        rel_jump: a neighbour counts as behind a discontinuity when it is farther than this fraction of the
            pixel's own depth; relative so one threshold works at every distance.

    Returns:
        (H, W) bool, True at valid pixels with a 3x3 neighbour farther than ``(1 + rel_jump) * depth`` or with
        no surface (0). Background pixels and the far side are never marked; outside the image does not count.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"expected (H, W) depth, got shape {depth.shape}")
    valid = depth > 0
    # No surface is infinitely far, so a surface next to background is an occluding edge; the largest finite
    # float keeps the comparison well defined without relying on inf handling inside OpenCV.
    far = np.where(valid, depth, np.finfo(np.float32).max).astype(np.float32)
    # cv2.dilate's default constant border is neutral for max, so pixels outside the image are ignored.
    farthest = cv2.dilate(far, np.ones((3, 3), np.uint8))
    return valid & (farthest > depth * np.float32(1.0 + rel_jump))


def contours(instance_map: np.ndarray, depth: np.ndarray, rel_jump: float = 0.1) -> np.ndarray:
    """Contour target of Ren & Lee (CVPR 2018): instance boundaries or occlusion edges.

    Args:
        instance_map: (H, W) integer instance ids.
        depth: (H, W) clean depth in metres (0 = no surface).
        rel_jump: relative depth jump for :func:`occlusion_edges`.

    Returns:
        (H, W) uint8 in {0, 1}.
    """
    if np.shape(instance_map) != np.shape(depth):
        raise ValueError(f"shape mismatch: instance map {np.shape(instance_map)} vs depth {np.shape(depth)}")
    edges = instance_boundaries(instance_map) | occlusion_edges(depth, rel_jump)
    return edges.astype(np.uint8)


def boxes_from_instances(
    instance_map: np.ndarray, category_map: np.ndarray, background_categories=(0,)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axis-aligned boxes, one per foreground instance.

    Args:
        instance_map: (H, W) integer instance ids.
        category_map: (H, W) integer category ids.
        background_categories: category ids whose instances get no box.

    Returns:
        ``(boxes, categories, instance_ids)``, sorted by instance id:

        * boxes: (N, 4) float32 ``x1, y1, x2, y2`` in pixels, x2/y2 exclusive (x2 = max column + 1).
        * categories: (N,) int32, the most frequent category over the instance's pixels (ties go to the
          smallest category id).
        * instance_ids: (N,) int32.

        With no foreground instance: shapes (0, 4), (0,), (0,).
    """
    inst = np.asarray(instance_map)
    cat = np.asarray(category_map)
    if inst.ndim != 2 or inst.shape != cat.shape:
        raise ValueError(f"expected two (H, W) maps of equal shape, got {inst.shape} and {cat.shape}")
    h, w = inst.shape
    empty = (np.zeros((0, 4), np.float32), np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    if inst.size == 0:
        return empty

    ids, inv = np.unique(inst.ravel(), return_inverse=True)
    inv = inv.ravel()
    n = len(ids)

    # Mode per instance without an (instances x categories) table, which can be huge when ids are sparse:
    # count distinct (instance, category) pairs, then keep the most frequent pair of each instance.
    cats, cat_inv = np.unique(cat.ravel(), return_inverse=True)
    pair_keys, pair_counts = np.unique(inv.astype(np.int64) * len(cats) + cat_inv.ravel(), return_counts=True)
    pair_inst, pair_cat = np.divmod(pair_keys, len(cats))
    # lexsort: last key is primary; within an instance, highest count first, then smallest category id.
    order = np.lexsort((pair_cat, -pair_counts, pair_inst))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pair_inst[order][1:] != pair_inst[order][:-1]
    mode = cats[pair_cat[order][first]]  # one per instance, in instance-id order

    # Row/column occupancy per instance is (N x H) and (N x W) booleans: vectorised and small in practice.
    rows = np.zeros((n, h), dtype=bool)
    cols = np.zeros((n, w), dtype=bool)
    rows[inv, np.repeat(np.arange(h), w)] = True
    cols[inv, np.tile(np.arange(w), h)] = True
    y1 = rows.argmax(axis=1)
    y2 = h - rows[:, ::-1].argmax(axis=1)
    x1 = cols.argmax(axis=1)
    x2 = w - cols[:, ::-1].argmax(axis=1)

    keep = ~np.isin(mode, np.asarray(tuple(background_categories), dtype=mode.dtype))
    if not keep.any():
        return empty
    boxes = np.stack([x1, y1, x2, y2], axis=1)[keep].astype(np.float32)
    return boxes, mode[keep].astype(np.int32), ids[keep].astype(np.int32)


def backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Back-project planar depth to camera-frame points.

    Args:
        depth: (H, W) clean planar depth in metres (0 = no surface).
        K: (3, 3) intrinsics; pixel (u, v) is sampled at its centre (u + 0.5, v + 0.5).

    Returns:
        (H, W, 3) float32 points in OpenCV camera axes (x right, y down, z forward); 0 where depth is 0.
    """
    depth = np.asarray(depth, dtype=np.float64)
    if depth.ndim != 2:
        raise ValueError(f"expected (H, W) depth, got shape {depth.shape}")
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    pix = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], axis=-1)
    # Full inverse rather than (u - cx) / fx so a skewed K is handled too; rays have z = 1, so scaling by
    # planar depth gives the point directly.
    rays = pix @ np.linalg.inv(np.asarray(K, dtype=np.float64)).T
    return (rays * depth[..., None]).astype(np.float32)


@dataclass
class NormalCheck:
    """Agreement between rendered normals and normals estimated from rendered depth.

    Attributes:
        mean_angle_deg: mean angle in degrees (NaN when ``n_points`` is 0).
        median_angle_deg: median angle in degrees (NaN when ``n_points`` is 0).
        n_points: number of pixels compared.
    """

    mean_angle_deg: float
    median_angle_deg: float
    n_points: int


def check_normals(
    depth: np.ndarray,
    normals: np.ndarray,
    K: np.ndarray,
    *,
    max_points: int = 20000,
    knn: int = 16,
    rng: np.random.Generator | None = None,
    exclude: np.ndarray | None = None,
) -> NormalCheck:
    """Label check with open3d: do the rendered normals agree with the geometry of the rendered depth?

    Back-projects the depth to a point cloud, estimates normals with open3d (``KDTreeSearchParamKNN(knn)``),
    orients them towards the camera at the origin and measures the angle to the rendered normals at the same
    pixels. The comparison is signed, so a flipped axis or a missing Blender->OpenCV conversion shows up as a
    large angle.

    Normals are estimated on every surface pixel (excluded ones included) so that neighbourhoods have the
    image's full density; only the compared pixels are subsampled.

    Args:
        depth: (H, W) clean depth in metres (0 = no surface).
        normals: (H, W, 3) rendered normals in OpenCV camera axes (as from :func:`decode_normals`); zero
            vectors are skipped.
        K: (3, 3) intrinsics.
        max_points: compare at most this many pixels.
        knn: neighbours for open3d's normal estimation.
        rng: random generator for subsampling; required when more than ``max_points`` pixels qualify.
        exclude: optional (H, W) bool of pixels to skip, e.g. contours, where a point's neighbourhood
            straddles two surfaces.

    Returns:
        :class:`NormalCheck` with angles in degrees; pixels where open3d could not estimate a normal are not
        counted.
    """
    import open3d as o3d  # imported here: it is slow to import and only this check needs it

    depth = np.asarray(depth, dtype=np.float32)
    normals = np.asarray(normals, dtype=np.float32)
    if depth.ndim != 2 or normals.shape != (*depth.shape, 3):
        raise ValueError(f"expected (H, W) depth and (H, W, 3) normals, got {depth.shape}, {normals.shape}")
    if exclude is not None and np.shape(exclude) != depth.shape:
        raise ValueError(f"exclude must have shape {depth.shape}, got {np.shape(exclude)}")

    surface = depth > 0
    n_norm = np.linalg.norm(normals, axis=-1)
    usable = surface & (n_norm > 0)
    if exclude is not None:
        usable &= ~np.asarray(exclude, dtype=bool)

    nan = NormalCheck(float("nan"), float("nan"), 0)
    # Fewer than 3 points cannot define a plane; open3d would return arbitrary normals.
    if not usable.any() or surface.sum() < 3:
        return nan

    # Index compared pixels within the surface cloud so estimated normals line up with them.
    surf_idx = np.flatnonzero(surface)
    pick = np.flatnonzero(usable.ravel()[surf_idx])
    if len(pick) > max_points:
        if rng is None:
            raise ValueError(f"{len(pick)} pixels exceed max_points={max_points}: pass rng to subsample")
        pick = np.sort(rng.choice(pick, size=max_points, replace=False))

    points = backproject(depth, K).reshape(-1, 3)[surf_idx]
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points.astype(np.float64)))
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=knn))
    pcd.orient_normals_towards_camera_location(np.zeros(3))
    est = np.asarray(pcd.normals)[pick]

    ref = normals.reshape(-1, 3)[surf_idx[pick]].astype(np.float64)
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    est_norm = np.linalg.norm(est, axis=1, keepdims=True)
    # A degenerate neighbourhood (e.g. all points on one line) can leave a zero normal: nothing to compare.
    ok = est_norm[:, 0] > 0
    if not ok.any():
        return nan
    ref, est = ref[ok], est[ok] / est_norm[ok]
    angles = np.degrees(np.arccos(np.clip(np.sum(ref * est, axis=1), -1.0, 1.0)))
    return NormalCheck(float(angles.mean()), float(np.median(angles)), len(angles))
