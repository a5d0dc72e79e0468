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
* Intrinsics: square-pixel pinhole, field of view ``fov`` along the larger image side (Blender's sensor fit
  ``AUTO``); pixel (u, v) has its centre at image coordinates (u + 0.5, v + 0.5), so the optical axis passes
  through (W / 2, H / 2).
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
    "PlaneCheck",
    "backproject",
    "boxes_from_instances",
    "check_normals",
    "check_support_plane",
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


def intrinsics(width: int, height: int, fov: float, sensor_fit: str = "AUTO") -> np.ndarray:
    """Pinhole intrinsics for square pixels, with Blender's rule for which side the field of view spans.

    Blender's camera (``lens_unit="FOV"``) applies its angle to the sensor side that ``sensor_fit`` names:
    ``"HORIZONTAL"`` the width, ``"VERTICAL"`` the height, ``"AUTO"`` (Blender's default and ours) the larger
    of the two, so a portrait image's field of view spans its height.

    Args:
        width: image width W in pixels.
        height: image height H in pixels.
        fov: field of view in radians, along the side chosen by ``sensor_fit``.
        sensor_fit: ``"AUTO"``, ``"HORIZONTAL"`` or ``"VERTICAL"``, as Blender's ``Camera.sensor_fit``.

    Returns:
        (3, 3) float64 K with fx = fy = (S / 2) / tan(fov / 2), where S is the fitted side in pixels
        (max(W, H) for AUTO), cx = W / 2, cy = H / 2 (pixel (u, v) has its centre at (u + 0.5, v + 0.5)).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < fov < np.pi:
        raise ValueError(f"fov must be in (0, pi) radians, got {fov}")
    sides = {"AUTO": max(width, height), "HORIZONTAL": width, "VERTICAL": height}
    if sensor_fit not in sides:
        raise ValueError(f"sensor_fit must be one of {sorted(sides)}, got {sensor_fit!r}")
    f = (sides[sensor_fit] / 2.0) / np.tan(fov / 2.0)
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
    segments: np.ndarray | None = None,
    only: np.ndarray | None = None,
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
        segments: optional (H, W) integer map (e.g. instance ids): normals are estimated within each segment's
            own points, so a neighbourhood never straddles two objects and pixels on instance boundaries can be
            compared too.
        only: optional (H, W) bool: compare only these pixels (e.g. instance boundaries).

    Returns:
        :class:`NormalCheck` with angles in degrees; pixels where open3d could not estimate a normal are not
        counted.
    """
    import open3d as o3d  # imported here: it is slow to import and only this check needs it

    depth = np.asarray(depth, dtype=np.float32)
    normals = np.asarray(normals, dtype=np.float32)
    if depth.ndim != 2 or normals.shape != (*depth.shape, 3):
        raise ValueError(f"expected (H, W) depth and (H, W, 3) normals, got {depth.shape}, {normals.shape}")
    for name, mask in (("exclude", exclude), ("segments", segments), ("only", only)):
        if mask is not None and np.shape(mask) != depth.shape:
            raise ValueError(f"{name} must have shape {depth.shape}, got {np.shape(mask)}")

    surface = depth > 0
    n_norm = np.linalg.norm(normals, axis=-1)
    usable = surface & (n_norm > 0)
    if exclude is not None:
        usable &= ~np.asarray(exclude, dtype=bool)
    if only is not None:
        usable &= np.asarray(only, dtype=bool)

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

    points = backproject(depth, K).reshape(-1, 3)[surf_idx].astype(np.float64)
    groups = [np.arange(len(surf_idx))]
    if segments is not None:
        seg = np.asarray(segments).reshape(-1)[surf_idx]
        groups = [np.flatnonzero(seg == s) for s in np.unique(seg)]
    estimated = np.zeros_like(points)
    for group in groups:
        if len(group) < 3:  # too few points for a plane: left at zero, so not compared
            continue
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(points[group]))
        pcd.estimate_normals(o3d.geometry.KDTreeSearchParamKNN(knn=knn))
        pcd.orient_normals_towards_camera_location(np.zeros(3))
        estimated[group] = np.asarray(pcd.normals)
    est = estimated[pick]

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


@dataclass
class PlaneCheck:
    """Exact check of the labels on a support plane's top face, against the plane's own equation.

    Attributes:
        max_angle_deg: largest angle between a rendered normal and the plane's normal (NaN when ``n_points`` is 0).
        mean_angle_deg: mean of those angles.
        max_depth_rel_error: largest ``|depth - analytic depth| / analytic depth``, the analytic depth being where
            the ray of ``K`` through the pixel centre meets the plane (a wrong ``K`` shows up here).
        n_points: top-face pixels compared, every one next to another instance included.
        n_boundary: how many of them are on an instance boundary.
    """

    max_angle_deg: float
    mean_angle_deg: float
    max_depth_rel_error: float
    n_points: int
    n_boundary: int


def check_support_plane(depth: np.ndarray, normals: np.ndarray, K: np.ndarray, cam2world_blender: np.ndarray,
                        slab2world: np.ndarray, mask: np.ndarray, instance_map: np.ndarray | None = None,
                        margin: float = 1e-3) -> PlaneCheck:
    """Compare depth and normals on the top face of a box-shaped support (table, floor) with the analytic plane.

    The support is the unit cube ``[-0.5, 0.5]^3`` mapped to the world by ``slab2world`` (its object pose, scale
    included); its top face is local ``z = 0.5``. A pixel is compared when it belongs to the support (``mask``)
    and the ray through its centre meets the top face inside its edges (``margin`` in local units away from
    them): such a pixel sees the top face. Boundary pixels are compared like every other: labels mixed across an
    object boundary (a pixel filter, a blended pass) show up as large angles.

    Args:
        depth: (H, W) clean planar depth in metres.
        normals: (H, W, 3) unit normals in OpenCV camera axes.
        K: (3, 3) intrinsics.
        cam2world_blender: (4, 4) camera-to-world, Blender camera axes.
        slab2world: (4, 4) local-to-world of the support object.
        mask: (H, W) bool, the support's pixels (its instance id).
        instance_map: (H, W) instance ids, only to count boundary pixels.
        margin: keep this far (local units) from the top face's edges.
    """
    depth = np.asarray(depth, dtype=np.float64)
    h, w = depth.shape
    c2w = np.asarray(cam2world_blender, dtype=np.float64)
    rot = c2w[:3, :3] * BLENDER_TO_OPENCV.astype(np.float64)  # OpenCV camera axes -> world
    slab = np.asarray(slab2world, dtype=np.float64)
    centre = slab[:3, :3] @ [0.0, 0.0, 0.5] + slab[:3, 3]
    up = np.linalg.inv(slab[:3, :3]).T @ [0.0, 0.0, 1.0]  # the face normal transforms with the inverse transpose
    up /= np.linalg.norm(up)
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    rays_cam = np.stack([u + 0.5, v + 0.5, np.ones_like(u)], axis=-1) @ np.linalg.inv(np.asarray(K, float)).T
    rays = rays_cam @ rot.T  # world direction per unit planar depth
    denom = rays @ up
    with np.errstate(divide="ignore", invalid="ignore"):
        t = ((centre - c2w[:3, 3]) @ up) / denom  # analytic planar depth
    hit = c2w[:3, 3] + rays * t[..., None]
    local = (hit - slab[:3, 3]) @ np.linalg.inv(slab[:3, :3]).T
    inside = np.isfinite(t) & (t > 0) & (np.abs(local[..., :2]) < 0.5 - margin).all(axis=-1)
    sel = np.asarray(mask, bool) & inside & (depth > 0)
    n = int(sel.sum())
    boundary = int((instance_boundaries(instance_map) & sel).sum()) if instance_map is not None else 0
    if n == 0:
        return PlaneCheck(float("nan"), float("nan"), float("nan"), 0, 0)
    up_cam = rot.T @ up
    cos = np.clip(np.asarray(normals, dtype=np.float64)[sel] @ up_cam, -1.0, 1.0)
    angles = np.degrees(np.arccos(cos))
    rel = np.abs(depth[sel] - t[sel]) / t[sel]
    return PlaneCheck(float(angles.max()), float(angles.mean()), float(rel.max()), n, boundary)
