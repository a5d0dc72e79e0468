"""Tests for render.labels: conventions checked against arrays built by hand or by analytic ray casting."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from render.labels import (
    NormalCheck,
    backproject,
    boxes_from_instances,
    check_normals,
    clean_depth,
    contours,
    decode_normals,
    instance_boundaries,
    intrinsics,
    occlusion_edges,
)


def pattern(rows: str) -> np.ndarray:
    """Bool image from lines of '0'/'1', so expected masks read as pictures."""
    return np.array([[c == "1" for c in line] for line in rows.split()], dtype=bool)


# ------------------------------------------------------------------------------------------------------------
# decode_normals / clean_depth


def test_decode_normals_hand_value_background_and_unit_length():
    raw = np.full((2, 3, 3), 0.5, dtype=np.float32)
    # Blender camera normal (0.6, 0.8, 0) encodes to (0.8, 0.9, 0.5); in OpenCV axes y flips: (0.6, -0.8, 0).
    raw[0, 0] = [0.8, 0.9, 0.5]
    # Facing the camera in Blender is +z: encodes to (0.5, 0.5, 1.0); in OpenCV it is -z.
    raw[0, 1] = [0.5, 0.5, 1.0]
    # Slightly off unit length (as 8-bit quantisation leaves it): must come back renormalised.
    raw[1, 2] = [0.5, 0.5 + 0.45, 0.5]
    out = decode_normals(raw)
    assert out.dtype == np.float32 and out.shape == (2, 3, 3)
    np.testing.assert_allclose(out[0, 0], [0.6, -0.8, 0.0], atol=1e-6)
    np.testing.assert_allclose(out[0, 1], [0.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(out[1, 2], [0.0, -1.0, 0.0], atol=1e-6)
    for bg in [(0, 2), (1, 0), (1, 1)]:
        assert np.array_equal(out[bg], np.zeros(3, np.float32))
    fg = np.linalg.norm(out, axis=-1) > 0
    np.testing.assert_allclose(np.linalg.norm(out[fg], axis=-1), 1.0, atol=1e-6)


def test_decode_normals_uint8_png():
    raw = np.array([[[128, 128, 128], [128, 128, 255]]], dtype=np.uint8)
    out = decode_normals(raw)
    assert np.array_equal(out[0, 0], np.zeros(3, np.float32))
    np.testing.assert_allclose(out[0, 1], [0.0, 0.0, -1.0], atol=1e-2)


@settings(max_examples=50, deadline=None)
@given(
    st.floats(-1, 1, allow_nan=False),
    st.floats(-1, 1, allow_nan=False),
    st.floats(-1, 1, allow_nan=False),
)
def test_decode_normals_roundtrip(x, y, z):
    n = np.array([x, y, z], dtype=np.float64)
    if np.linalg.norm(n) < 1e-3:
        return
    n /= np.linalg.norm(n)
    raw = ((n + 1.0) / 2.0).reshape(1, 1, 3)
    out = decode_normals(raw)[0, 0]
    np.testing.assert_allclose(out, [n[0], -n[1], -n[2]], atol=1e-5)


def test_clean_depth():
    d = np.array([[1.5, 1e10, np.inf], [np.nan, -np.inf, 2.0]], dtype=np.float64)
    out = clean_depth(d)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[1.5, 0, 0], [0, 0, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(clean_depth(np.array([[5.0, 10.0]]), far=10.0), [[5.0, 0.0]])


# ------------------------------------------------------------------------------------------------------------
# intrinsics / backproject


def test_intrinsics_values_and_rays():
    fov = math.radians(60)
    K = intrinsics(64, 48, fov)
    f = 32 / math.tan(math.radians(30))
    np.testing.assert_allclose(K, [[f, 0, 32], [0, f, 24], [0, 0, 1]])
    assert K.dtype == np.float64

    K = intrinsics(64, 64, fov)
    Kinv = np.linalg.inv(K)
    # The image centre (32, 32) is the corner shared by the four middle pixels: its ray is the optical axis.
    np.testing.assert_allclose(Kinv @ [32, 32, 1], [0, 0, 1], atol=1e-12)
    # The right edge of the image (x = 64) is at fov/2 horizontally, the left edge at -fov/2.
    ray = Kinv @ [64, 32, 1]
    assert math.degrees(math.atan2(ray[0], ray[2])) == pytest.approx(30.0)
    ray = Kinv @ [0, 32, 1]
    assert math.degrees(math.atan2(ray[0], ray[2])) == pytest.approx(-30.0)


def test_intrinsics_follow_blenders_sensor_fit():
    fov = math.radians(60)
    f_long = 32 / math.tan(math.radians(30))  # the 64 px side spans the field of view
    # Portrait: Blender's AUTO fit puts the field of view on the height (48x64 gave fx = 46.1 before, not 61.5).
    np.testing.assert_allclose(intrinsics(48, 64, fov), [[f_long, 0, 24], [0, f_long, 32], [0, 0, 1]])
    np.testing.assert_allclose(intrinsics(64, 48, fov), intrinsics(64, 48, fov, sensor_fit="HORIZONTAL"))
    np.testing.assert_allclose(intrinsics(48, 64, fov, sensor_fit="HORIZONTAL")[0, 0], 24 / math.tan(math.radians(30)))
    np.testing.assert_allclose(intrinsics(64, 48, fov, sensor_fit="VERTICAL")[1, 1], 24 / math.tan(math.radians(30)))
    with pytest.raises(ValueError, match="sensor_fit"):
        intrinsics(48, 64, fov, sensor_fit="DIAGONAL")


def test_backproject():
    f = 32 / math.tan(math.radians(30))
    K = np.array([[f, 0, 32], [0, f, 32], [0, 0, 1]])
    depth = np.zeros((64, 64), np.float32)
    depth[31, 32] = 2.0
    depth[10, 63] = 3.0
    pts = backproject(depth, K)
    assert pts.shape == (64, 64, 3) and pts.dtype == np.float32
    # Pixel (u=32, v=31) has its centre at (32.5, 31.5): half a pixel right of and above the optical axis.
    np.testing.assert_allclose(pts[31, 32], [2 * 0.5 / f, 2 * -0.5 / f, 2.0], rtol=1e-6)
    np.testing.assert_allclose(pts[10, 63], [3 * 31.5 / f, 3 * -21.5 / f, 3.0], rtol=1e-6)
    assert np.count_nonzero(np.any(pts != 0, axis=-1)) == 2


# ------------------------------------------------------------------------------------------------------------
# instance_boundaries / occlusion_edges / contours

# 8x8 of id 1 with a 3x3 square of id 2 at rows 2-4, cols 2-4.
SQUARE = np.ones((8, 8), np.int32)
SQUARE[2:5, 2:5] = 2


def test_instance_boundaries_square():
    expected = pattern(
        """
        00000000
        00111000
        01111100
        01101100
        01111100
        00111000
        00000000
        00000000
        """
    )
    out = instance_boundaries(SQUARE)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)
    assert not instance_boundaries(np.full((4, 5), 7)).any()


def test_occlusion_edges_near_square_far_plane():
    depth = np.full((10, 10), 4.0, np.float32)
    depth[3:7, 3:7] = 1.0
    expected = pattern(
        """
        0000000000
        0000000000
        0000000000
        0001111000
        0001001000
        0001001000
        0001111000
        0000000000
        0000000000
        0000000000
        """
    )
    out = occlusion_edges(depth)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)


def test_occlusion_edges_smooth_slant_has_no_edges():
    # Depth grows 1% per pixel along x and y (and diagonally ~2%): well under a 10% jump.
    u = np.arange(32)
    depth = (2.0 * 1.01 ** (u[None, :] + u[:, None])).astype(np.float32)
    assert not occlusion_edges(depth).any()


def test_occlusion_edges_threshold_and_background():
    depth = np.array([[1.0, 1.05, 1.2]], np.float32)
    # 1.0 -> 1.05 is a 5% jump (no edge); 1.05 -> 1.2 is ~14% (edge on the near side only).
    np.testing.assert_array_equal(occlusion_edges(depth), [[False, True, False]])
    # A surface next to no surface (0) is an occluding edge; background itself never is.
    depth = np.array([[0, 0, 0, 0], [0, 2, 2, 2], [0, 2, 2, 2]], np.float32)
    expected = pattern(
        """
        0000
        0111
        0100
        """
    )
    np.testing.assert_array_equal(occlusion_edges(depth), expected)


def test_contours_square_plus_depth_step():
    # Square at 1 m; instance 1 is at 3 m left of column 6 and 6 m from column 6 on: the step inside
    # instance 1 is an occlusion edge on its near side (column 5) but not an instance boundary.
    depth = np.full((8, 8), 3.0, np.float32)
    depth[:, 6:] = 6.0
    depth[2:5, 2:5] = 1.0
    expected = pattern(
        """
        00000100
        00111100
        01111100
        01101100
        01111100
        00111100
        00000100
        00000100
        """
    )
    out = contours(SQUARE, depth)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


# ------------------------------------------------------------------------------------------------------------
# boxes_from_instances


def test_boxes_from_instances():
    inst = np.zeros((10, 12), np.int32)
    cat = np.zeros((10, 12), np.int32)
    inst[1:4, 2:6] = 3  # rows 1-3, cols 2-5
    cat[1:4, 2:6] = 7
    cat[1, 2] = 9  # a minority category: the mode (7) wins
    inst[6:9, 0] = 5  # a single column
    cat[6:9, 0] = 2
    inst[8:10, 8:12] = 4  # background category 0: no box
    boxes, cats, ids = boxes_from_instances(inst, cat)
    assert boxes.dtype == np.float32 and cats.dtype == np.int32 and ids.dtype == np.int32
    np.testing.assert_array_equal(boxes, [[2, 1, 6, 4], [0, 6, 1, 9]])
    np.testing.assert_array_equal(cats, [7, 2])
    np.testing.assert_array_equal(ids, [3, 5])

    boxes, cats, ids = boxes_from_instances(inst, cat, background_categories=(0, 2))
    np.testing.assert_array_equal(boxes, [[2, 1, 6, 4]])
    np.testing.assert_array_equal(ids, [3])


def test_boxes_from_instances_empty():
    inst = np.arange(12).reshape(3, 4)
    boxes, cats, ids = boxes_from_instances(inst, np.zeros((3, 4), np.int64))
    assert boxes.shape == (0, 4) and boxes.dtype == np.float32
    assert cats.shape == (0,) and cats.dtype == np.int32
    assert ids.shape == (0,) and ids.dtype == np.int32


@settings(max_examples=40, deadline=None)
@given(arrays(np.int32, (6, 7), elements=st.integers(0, 4)))
def test_boxes_are_tight_and_cover_every_pixel(inst):
    cat = inst % 3  # category 0 for ids 0 and 3
    boxes, cats, ids = boxes_from_instances(inst, cat)
    assert list(ids) == sorted(i for i in set(inst.ravel().tolist()) if i % 3 != 0)
    for (x1, y1, x2, y2), c, i in zip(boxes.astype(int), cats, ids, strict=True):
        ys, xs = np.nonzero(inst == i)
        assert (x1, y1, x2, y2) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert c == i % 3


# ------------------------------------------------------------------------------------------------------------
# check_normals on analytically ray-cast scenes

W = H = 64
FOV = math.radians(60)
F = (W / 2) / math.tan(FOV / 2)  # written out here, not taken from intrinsics()


def pixel_rays():
    """(H, W, 3) rays through pixel centres, scaled so z = 1 (ray parameter = planar depth)."""
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    return np.stack([(u + 0.5 - W / 2) / F, (v + 0.5 - H / 2) / F, np.ones_like(u)], axis=-1)


def ray_cast_plane(a=2.0, b=0.3, c=0.5):
    """Plane z = a + b*x + c*y in OpenCV camera axes: planar depth and camera-facing unit normals."""
    d = pixel_rays()
    depth = a / (1.0 - b * d[..., 0] - c * d[..., 1])
    assert (depth > 0).all()
    n = np.array([b, c, -1.0]) / math.sqrt(b * b + c * c + 1)  # gradient of b*x + c*y - z, pointing to -z
    return depth, np.broadcast_to(n, (H, W, 3)).copy()


def ray_cast_sphere_on_plane(centre=(0.15, -0.1, 2.0), radius=0.5):
    """Sphere in front of the tilted plane: depth, normals and a 1/2 instance map."""
    depth, normals = ray_cast_plane(a=3.0)
    d = pixel_rays()
    cv = np.asarray(centre)
    dd = np.sum(d * d, axis=-1)
    dc = d @ cv
    disc = dc**2 - dd * (cv @ cv - radius**2)
    hit = disc > 0
    t = (dc - np.sqrt(np.where(hit, disc, 0))) / dd
    hit &= t < depth
    p = d * t[..., None]
    depth = np.where(hit, t, depth)
    normals = np.where(hit[..., None], (p - cv) / radius, normals)
    inst = np.where(hit, 2, 1)
    return depth, normals, inst


def angle_between(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, axis=-1), -1, 1)))


def test_check_normals_plane_passes_and_catches_convention_bugs():
    depth, normals = ray_cast_plane()
    K = intrinsics(W, H, FOV)
    good = check_normals(depth, normals, K)
    assert isinstance(good, NormalCheck)
    assert good.n_points == W * H
    assert good.mean_angle_deg < 3.0 and good.median_angle_deg < 3.0

    y_flipped = normals * [1, -1, 1]
    assert angle_between(normals[0, 0], y_flipped[0, 0]) > 40  # the corruption itself is large
    assert check_normals(depth, y_flipped, K).mean_angle_deg > 30.0
    blender_axes = normals * [1, -1, -1]  # forgot the Blender -> OpenCV conversion
    assert check_normals(depth, blender_axes, K).mean_angle_deg > 30.0


def test_check_normals_through_decode_normals():
    # End to end: encode the analytic normals the way BlenderProc does (Blender camera axes, [0, 1]).
    depth, normals = ray_cast_plane(a=2.5, b=-0.4, c=0.35)
    raw = (normals * [1, -1, -1] + 1.0) / 2.0
    K = intrinsics(W, H, FOV)
    assert check_normals(depth, decode_normals(raw), K).mean_angle_deg < 3.0
    # Decoding without the axis conversion is caught.
    assert check_normals(depth, 2.0 * raw - 1.0, K).mean_angle_deg > 30.0


def test_check_normals_sphere_with_contours_excluded():
    depth, normals, inst = ray_cast_sphere_on_plane()
    assert (inst == 2).sum() > 300  # the sphere covers a fair part of the image
    K = intrinsics(W, H, FOV)
    edges = contours(inst, depth.astype(np.float32)).astype(bool)
    good = check_normals(depth, normals, K, exclude=edges)
    assert good.n_points == W * H - edges.sum()
    assert good.mean_angle_deg < 3.0 and good.median_angle_deg < 3.0

    not_sphere = inst != 2
    flipped = check_normals(depth, normals * [1, -1, 1], K, exclude=edges | not_sphere)
    assert flipped.mean_angle_deg > 30.0
    flipped = check_normals(depth, normals * [1, -1, -1], K, exclude=edges)
    assert flipped.mean_angle_deg > 30.0


def test_check_normals_subsampling_background_and_empty():
    depth, normals = ray_cast_plane()
    depth[:, :8] = 0  # background strip: skipped
    normals[:8, :] = 0  # no rendered normal: skipped
    K = intrinsics(W, H, FOV)
    full = check_normals(depth, normals, K)
    assert full.n_points == (W - 8) * (H - 8)
    with pytest.raises(ValueError, match="rng"):
        check_normals(depth, normals, K, max_points=100)
    a = check_normals(depth, normals, K, max_points=100, rng=np.random.default_rng(0))
    b = check_normals(depth, normals, K, max_points=100, rng=np.random.default_rng(0))
    assert a.n_points == 100 and a == b
    assert a.mean_angle_deg < 3.0

    empty = check_normals(np.zeros((H, W)), normals, K)
    assert empty.n_points == 0
    assert math.isnan(empty.mean_angle_deg) and math.isnan(empty.median_angle_deg)


def test_decode_normals_with_surface_mask_keeps_depth_and_normals_consistent():
    """Anti-aliased silhouette pixels: blended normals are renormalised, vanished ones filled from a neighbour."""
    n_blender = np.zeros((4, 4, 3), np.float32)
    n_blender[:, :2] = [0.0, 0.0, 1.0]           # object facing the camera (Blender axes)
    n_blender[1, 2] = [0.0, 0.0, 0.3]           # blended with the background: shorter, same direction
    raw = (n_blender + 1.0) / 2.0               # (background decodes to zero)
    surface = np.zeros((4, 4), bool)
    surface[:, :2] = True
    surface[1, 2] = True                         # depth says object here
    surface[2, 2] = True                         # depth says object, normal vanished entirely
    out = decode_normals(raw, surface=surface)
    np.testing.assert_allclose(out[1, 2], [0.0, 0.0, -1.0])
    np.testing.assert_allclose(out[2, 2], [0.0, 0.0, -1.0])
    assert (np.linalg.norm(out[surface], axis=-1) > 0.999).all()
    assert (out[~surface] == 0).all()
