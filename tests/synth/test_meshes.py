"""Tests for synth.meshes: procedural open3d shapes, their deformations, and user mesh folder scans."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import open3d as o3d
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synth import meshes
from synth.meshes import (
    MESH_SUFFIXES,
    PROCEDURAL_SHAPES,
    MeshDeform,
    MeshFile,
    MeshFolderError,
    procedural_mesh,
    sample_deform,
    scan_mesh_folder,
)

ONE_SIDED = {"o3d_mobius"}  # a Möbius strip has no consistent orientation and no inside

# Exercises every step at once, on a budget small enough for all shapes.
FULL_DEFORM = MeshDeform(
    stretch=(1.3, 0.8, 1.1),
    noise_amplitude=0.06,
    noise_frequency=2.5,
    subdivisions=1,
    target_triangles=800,
    smooth_iterations=3,
    noise_seed=11,
)


def signed_volume(vertices: np.ndarray, triangles: np.ndarray) -> float:
    v0, v1, v2 = (vertices[triangles[:, k]] for k in range(3))
    return float(np.einsum("ij,ij->i", v0, np.cross(v1, v2)).sum() / 6.0)


def directed_edges_unique(triangles: np.ndarray) -> bool:
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]])
    return len(np.unique(edges, axis=0)) == len(edges)


def check_mesh(shape: str, vertices: np.ndarray, triangles: np.ndarray) -> None:
    assert vertices.dtype == np.float64 and vertices.ndim == 2 and vertices.shape[1] == 3
    assert triangles.dtype == np.int64 and triangles.ndim == 2 and triangles.shape[1] == 3
    assert len(vertices) > 0 and len(triangles) > 0
    assert np.isfinite(vertices).all()
    assert triangles.min() >= 0 and triangles.max() < len(vertices)
    # Every vertex is used, none is duplicated, no triangle repeats a vertex.
    assert len(np.unique(triangles)) == len(vertices)
    assert len(np.unique(vertices, axis=0)) == len(vertices)
    assert (triangles[:, 0] != triangles[:, 1]).all()
    assert (triangles[:, 1] != triangles[:, 2]).all()
    assert (triangles[:, 2] != triangles[:, 0]).all()
    assert len(np.unique(np.sort(triangles, axis=1), axis=0)) == len(triangles)
    # Normalised: bounding-box centre at the origin, largest side 1.
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    assert abs((hi - lo).max() - 1.0) < 1e-6
    np.testing.assert_allclose((lo + hi) / 2.0, 0.0, atol=1e-9)
    if shape not in ONE_SIDED:
        assert directed_edges_unique(triangles), "triangle winding is not consistent"
        assert signed_volume(vertices, triangles) > 0.0, "triangles are not oriented outward"


# ----------------------------------------------------------------------------------------------------------
# Procedural shapes
# ----------------------------------------------------------------------------------------------------------


def test_shape_names() -> None:
    assert len(PROCEDURAL_SHAPES) == len(set(PROCEDURAL_SHAPES)) >= 9
    assert all(name.startswith("o3d_") for name in PROCEDURAL_SHAPES)
    for name in ("o3d_torus", "o3d_mobius", "o3d_arrow", "o3d_box", "o3d_blob", "o3d_capsule_like"):
        assert name in PROCEDURAL_SHAPES


@pytest.mark.parametrize("shape", PROCEDURAL_SHAPES)
@pytest.mark.parametrize("deform", [MeshDeform(), FULL_DEFORM], ids=["plain", "deformed"])
def test_procedural_mesh_is_valid(shape: str, deform: MeshDeform) -> None:
    vertices, triangles = procedural_mesh(shape, deform)
    check_mesh(shape, vertices, triangles)


@pytest.mark.parametrize("shape", PROCEDURAL_SHAPES)
def test_default_deform_is_the_default_argument(shape: str) -> None:
    a = procedural_mesh(shape)
    b = procedural_mesh(shape, MeshDeform())
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_closed_shapes_stay_watertight() -> None:
    for shape in ("o3d_box", "o3d_sphere", "o3d_torus", "o3d_blob", "o3d_capsule_like", "o3d_icosahedron"):
        for deform in (MeshDeform(), dataclasses.replace(FULL_DEFORM, target_triangles=0)):
            vertices, triangles = procedural_mesh(shape, deform)
            mesh = o3d.geometry.TriangleMesh(
                o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles.astype(np.int32))
            )
            assert mesh.is_edge_manifold() and mesh.is_vertex_manifold(), (shape, deform)
            assert mesh.is_orientable(), (shape, deform)


@pytest.mark.parametrize("shape", ["o3d_blob", "o3d_box", "o3d_torus", "o3d_mobius"])
def test_deterministic(shape: str) -> None:
    a = procedural_mesh(shape, FULL_DEFORM)
    b = procedural_mesh(shape, dataclasses.replace(FULL_DEFORM))
    assert a[0].tobytes() == b[0].tobytes()
    assert a[1].tobytes() == b[1].tobytes()


DIGEST_CODE = """
import hashlib, json, sys
from synth.meshes import MeshDeform, procedural_mesh
vertices, triangles = procedural_mesh(sys.argv[1], MeshDeform(**json.loads(sys.argv[2])))
print(hashlib.sha256(vertices.tobytes() + triangles.tobytes()).hexdigest())
"""


def test_deterministic_across_processes() -> None:
    """No hidden state (hash seeds, global RNG, caches): a fresh interpreter builds the same bytes."""
    deform = dataclasses.replace(FULL_DEFORM, noise_seed=1234)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(root)}
    out = subprocess.run(
        [sys.executable, "-c", DIGEST_CODE, "o3d_blob", json.dumps(deform.to_dict())],
        capture_output=True,
        text=True,
        check=True,
        cwd=root,
        env=env,
        timeout=60,
    )
    vertices, triangles = procedural_mesh("o3d_blob", deform)
    expected = hashlib.sha256(vertices.tobytes() + triangles.tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == expected


def test_blob_depends_on_noise_seed() -> None:
    a, fa = procedural_mesh("o3d_blob", MeshDeform(noise_seed=0))
    b, fb = procedural_mesh("o3d_blob", MeshDeform(noise_seed=1))
    assert np.array_equal(fa, fb)  # same connectivity, different bumps
    assert not np.allclose(a, b)
    # The noise of the deformation also follows the seed, for any shape.
    c, _ = procedural_mesh("o3d_box", MeshDeform(noise_amplitude=0.1, noise_seed=0))
    d, _ = procedural_mesh("o3d_box", MeshDeform(noise_amplitude=0.1, noise_seed=1))
    assert c.shape == d.shape and not np.allclose(c, d)


def test_noise_seed_does_not_matter_without_noise() -> None:
    a = procedural_mesh("o3d_torus", MeshDeform(noise_seed=0))
    b = procedural_mesh("o3d_torus", MeshDeform(noise_seed=99))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_unknown_shape() -> None:
    with pytest.raises(ValueError, match="o3d_teapot") as info:
        procedural_mesh("o3d_teapot")
    for name in PROCEDURAL_SHAPES:
        assert name in str(info.value)


def test_subdivision_increases_triangles() -> None:
    counts = [len(procedural_mesh("o3d_icosahedron", MeshDeform(subdivisions=n))[1]) for n in (0, 1, 2)]
    assert counts == [20, 80, 320]
    # Loop subdivision also rounds the shape off: a box loses volume.
    volumes = [signed_volume(*procedural_mesh("o3d_box", MeshDeform(subdivisions=n))) for n in (0, 1)]
    assert volumes[1] < volumes[0]


def test_decimation_reaches_about_the_target() -> None:
    full = len(procedural_mesh("o3d_sphere", MeshDeform(subdivisions=1))[1])
    assert full > 4000
    for target in (200, 1000):
        n = len(procedural_mesh("o3d_sphere", MeshDeform(subdivisions=1, target_triangles=target))[1])
        assert 0.8 * target <= n <= target
    # A target above the current count keeps the mesh.
    kept = procedural_mesh("o3d_box", MeshDeform(target_triangles=1000))
    plain = procedural_mesh("o3d_box")
    assert np.array_equal(kept[0], plain[0]) and np.array_equal(kept[1], plain[1])


def test_stretch_changes_proportions() -> None:
    vertices, _ = procedural_mesh("o3d_box", MeshDeform(stretch=(2.0, 1.0, 0.5)))
    np.testing.assert_allclose(np.ptp(vertices, axis=0), [1.0, 0.5, 0.25], atol=1e-12)
    vertices, _ = procedural_mesh("o3d_sphere", MeshDeform(stretch=(1.0, 1.0, 3.0)))
    extent = np.ptp(vertices, axis=0)
    assert extent[2] == pytest.approx(1.0) and extent[0] == pytest.approx(1.0 / 3.0, rel=1e-3)


def test_noise_moves_vertices_along_the_surface_normal() -> None:
    plain, _ = procedural_mesh("o3d_sphere")
    bumpy, triangles = procedural_mesh("o3d_sphere", MeshDeform(noise_amplitude=0.1, noise_seed=5))
    assert len(bumpy) == len(plain)  # the sphere is fine enough to need no refinement
    radii = np.linalg.norm(bumpy, axis=1)
    assert np.ptp(radii) > 0.05  # a sphere has constant radius; the bumps do not
    check_mesh("o3d_sphere", bumpy, triangles)
    # Coarse shapes are refined first so the noise has vertices to move.
    box, _ = procedural_mesh("o3d_box", MeshDeform(noise_amplitude=0.1))
    assert len(box) > 8


def test_smoothing_changes_the_mesh_keeps_connectivity() -> None:
    plain = procedural_mesh("o3d_sphere", MeshDeform(stretch=(1.0, 1.0, 2.0)))
    smooth = procedural_mesh("o3d_sphere", MeshDeform(stretch=(1.0, 1.0, 2.0), smooth_iterations=10))
    assert np.array_equal(plain[1], smooth[1])
    assert not np.allclose(plain[0], smooth[0])


@pytest.mark.parametrize("shape", ["o3d_box", "o3d_tetrahedron"])
def test_smoothing_rounds_coarse_polyhedra_off_instead_of_collapsing_them(shape: str) -> None:
    plain_volume = signed_volume(*procedural_mesh(shape))
    vertices, triangles = procedural_mesh(shape, MeshDeform(smooth_iterations=100))
    check_mesh(shape, vertices, triangles)
    assert len(triangles) > 100  # refined before smoothing
    assert signed_volume(vertices, triangles) > 0.5 * plain_volume  # rounder, so it may even grow


def test_decimation_has_a_floor() -> None:
    vertices, triangles = procedural_mesh("o3d_sphere", MeshDeform(target_triangles=1))
    assert 48 <= len(triangles) <= 64
    check_mesh("o3d_sphere", vertices, triangles)


def test_orientation_repair() -> None:
    """The private helper turns a randomly flipped mesh back into consistent outward triangles."""
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=1.0, resolution=10)
    vertices = np.asarray(sphere.vertices)
    triangles = np.asarray(sphere.triangles).astype(np.int64)
    flip = np.random.default_rng(0).random(len(triangles)) < 0.4
    for scrambled in (np.where(flip[:, None], triangles[:, ::-1], triangles), triangles[:, ::-1]):
        fixed_v, fixed_t = meshes._orient_outward(meshes._mesh(vertices, scrambled))
        assert directed_edges_unique(fixed_t)
        assert signed_volume(fixed_v, fixed_t) > 0.0
        assert np.array_equal(np.sort(fixed_t, axis=1), np.sort(triangles, axis=1))


# ----------------------------------------------------------------------------------------------------------
# MeshDeform and sample_deform
# ----------------------------------------------------------------------------------------------------------


def test_mesh_deform_validation_and_json() -> None:
    deform = MeshDeform(stretch=[1, 2, 3], subdivisions=2.0, noise_seed=7)  # type: ignore[arg-type]
    assert deform.stretch == (1.0, 2.0, 3.0) and isinstance(deform.subdivisions, int)
    data = json.loads(json.dumps(deform.to_dict()))
    assert MeshDeform(**data) == deform
    assert set(data) == {f.name for f in dataclasses.fields(MeshDeform)}
    for bad in (
        {"stretch": (1.0, 0.0, 1.0)},
        {"stretch": (1.0, 1.0)},
        {"noise_amplitude": -0.1},
        {"noise_frequency": 0.0},
        {"subdivisions": 3},
        {"subdivisions": 1.5},
        {"target_triangles": -1},
        {"smooth_iterations": -2},
        {"noise_seed": -1},
    ):
        with pytest.raises(ValueError):
            MeshDeform(**bad)  # type: ignore[arg-type]


def test_sample_deform_uses_the_given_rng() -> None:
    a = [sample_deform(np.random.default_rng(42)) for _ in range(2)]
    assert a[0] == a[1]
    rng = np.random.default_rng(42)
    draws = [sample_deform(rng) for _ in range(20)]
    assert len(set(draws)) == 20
    assert sample_deform(np.random.default_rng(43)) != a[0]
    # The global numpy state is neither used nor touched.
    state = np.random.get_state()[1].copy()
    sample_deform(np.random.default_rng(0))
    assert np.array_equal(np.random.get_state()[1], state)


def test_sample_deform_strength_zero_is_identity() -> None:
    rng = np.random.default_rng(3)
    assert all(sample_deform(rng, 0.0) == MeshDeform() for _ in range(5))
    # The stream advances by the same amount whatever the strength.
    r1, r2 = np.random.default_rng(9), np.random.default_rng(9)
    sample_deform(r1, 0.0)
    sample_deform(r2, 1.0)
    assert r1.random() == r2.random()
    with pytest.raises(ValueError):
        sample_deform(rng, -1.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), strength=st.floats(0.0, 3.0))
def test_sample_deform_is_valid(seed: int, strength: float) -> None:
    deform = sample_deform(np.random.default_rng(seed), strength)
    assert isinstance(deform, MeshDeform)
    json.dumps(deform.to_dict())
    assert all(s > 0 for s in deform.stretch)
    assert 0 <= deform.subdivisions <= 2
    if strength == 0.0:
        assert deform == MeshDeform()
    weak = sample_deform(np.random.default_rng(seed), strength / 4)
    # Weaker strength, smaller stretch and noise, drawn from the same stream.
    assert max(abs(np.log(weak.stretch))) <= max(abs(np.log(deform.stretch))) + 1e-12
    assert weak.noise_amplitude <= deform.noise_amplitude + 1e-12


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), shape=st.sampled_from(PROCEDURAL_SHAPES))
def test_sampled_deforms_build_valid_meshes(seed: int, shape: str) -> None:
    deform = sample_deform(np.random.default_rng(seed), strength=1.0)
    vertices, triangles = procedural_mesh(shape, deform)
    check_mesh(shape, vertices, triangles)


# ----------------------------------------------------------------------------------------------------------
# User mesh folders
# ----------------------------------------------------------------------------------------------------------


def write_box(path: Path, size: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh = o3d.geometry.TriangleMesh.create_box(*size)
    mesh.compute_vertex_normals()  # the STL writer needs normals
    assert o3d.io.write_triangle_mesh(str(path), mesh)


def write_glb(path: Path, vertices: np.ndarray, triangles: np.ndarray) -> None:
    """A minimal binary glTF (open3d's own .glb writer leaves out the binary chunk)."""
    positions = np.asarray(vertices, dtype="<f4").tobytes()
    indices = np.asarray(triangles, dtype="<u4").tobytes()
    binary = positions + indices
    binary += b"\0" * (-len(binary) % 4)
    doc = {
        "asset": {"version": "2.0"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0}, "indices": 1, "mode": 4}]}],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(positions), "target": 34962},
            {"buffer": 0, "byteOffset": len(positions), "byteLength": len(indices), "target": 34963},
        ],
        "accessors": [
            {
                "bufferView": 0,
                "componentType": 5126,
                "count": len(vertices),
                "type": "VEC3",
                "min": np.min(vertices, axis=0).tolist(),
                "max": np.max(vertices, axis=0).tolist(),
            },
            {"bufferView": 1, "componentType": 5125, "count": int(np.size(triangles)), "type": "SCALAR"},
        ],
    }
    text = json.dumps(doc).encode()
    text += b" " * (-len(text) % 4)
    chunks = struct.pack("<II", len(text), 0x4E4F534A) + text + struct.pack("<II", len(binary), 0x004E4942)
    chunks += binary
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<III", 0x46546C67, 2, 12 + len(chunks)) + chunks)


@pytest.fixture(autouse=True)
def _fresh_scan_cache():
    meshes._scan_cached.cache_clear()
    yield
    meshes._scan_cached.cache_clear()


def test_scan_flat_folder_uses_stems(tmp_path: Path) -> None:
    write_box(tmp_path / "b_box.ply", (1.0, 2.0, 3.0))
    write_box(tmp_path / "a_box.obj")
    write_box(tmp_path / "c_box.STL")
    (tmp_path / "notes.txt").write_text("not a mesh")
    (tmp_path / "a_box.mtl").write_text("newmtl x\n")
    found = scan_mesh_folder(tmp_path)
    assert [Path(f.path).name for f in found] == ["a_box.obj", "b_box.ply", "c_box.STL"]
    assert [f.category for f in found] == ["a_box", "b_box", "c_box"]
    assert all(isinstance(f, MeshFile) and Path(f.path).is_absolute() for f in found)
    assert all(f.n_triangles == 12 for f in found)
    assert found[1].extent == pytest.approx((1.0, 2.0, 3.0))
    assert all(isinstance(x, float) for x in found[1].extent)
    assert scan_mesh_folder(str(tmp_path)) == found


def test_scan_category_subfolders(tmp_path: Path) -> None:
    write_box(tmp_path / "mugs" / "m2.ply")
    write_box(tmp_path / "mugs" / "m1.obj", (0.5, 0.5, 1.0))
    write_box(tmp_path / "chairs" / "x" / "models" / "model.obj")  # deep layout: category is "chairs"
    write_box(tmp_path / "loose.obj")  # a file next to the category folders keeps its stem
    write_box(tmp_path / ".hidden" / "skip.obj")
    write_glb(tmp_path / "mugs" / "m3.glb", *procedural_mesh("o3d_tetrahedron"))
    write_box(tmp_path / "mugs" / "m4.gltf")
    found = scan_mesh_folder(tmp_path)
    relative = [Path(f.path).relative_to(tmp_path.resolve()).as_posix() for f in found]
    assert relative == [
        "chairs/x/models/model.obj",
        "loose.obj",
        "mugs/m1.obj",
        "mugs/m2.ply",
        "mugs/m3.glb",
        "mugs/m4.gltf",
    ]
    assert [f.category for f in found] == ["chairs", "loose", "mugs", "mugs", "mugs", "mugs"]
    assert found[2].extent == pytest.approx((0.5, 0.5, 1.0))
    assert found[4].n_triangles == 4 and max(found[4].extent) == pytest.approx(1.0, abs=1e-6)
    assert found[5].n_triangles == 12


def test_mesh_suffixes() -> None:
    assert MESH_SUFFIXES == (".obj", ".ply", ".glb", ".gltf", ".stl")


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("garbage.obj", np.random.default_rng(0).bytes(400)),
        ("no_faces.obj", b"v 0 0 0\nv 1 0 0\nv 0 1 0\n"),
        (
            "points.ply",
            b"ply\nformat ascii 1.0\nelement vertex 1\nproperty float x\nproperty float y\n"
            b"property float z\nend_header\n0 0 0\n",
        ),
        ("broken.glb", b"glTF\x02\x00\x00\x00junk"),
        ("empty.stl", b""),
    ],
)
def test_scan_bad_file_names_it(tmp_path: Path, name: str, content: bytes) -> None:
    write_box(tmp_path / "cat" / "good.obj")
    (tmp_path / "cat" / name).write_bytes(content)
    with pytest.raises(MeshFolderError, match=name.replace(".", r"\.")):
        scan_mesh_folder(tmp_path)


def test_scan_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(MeshFolderError, match="nowhere"):
        scan_mesh_folder(missing)


def test_scan_empty_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty_meshes"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no meshes here")
    with pytest.raises(MeshFolderError, match="empty_meshes"):
        scan_mesh_folder(empty)


def test_scan_file_instead_of_folder(tmp_path: Path) -> None:
    write_box(tmp_path / "single.obj")
    with pytest.raises(MeshFolderError, match=r"single\.obj"):
        scan_mesh_folder(tmp_path / "single.obj")
    assert issubclass(MeshFolderError, ValueError)


def test_scan_is_cached_until_a_file_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_box(tmp_path / "a.obj")
    write_box(tmp_path / "b.ply")
    reads: list[str] = []
    real_read = meshes._read_mesh

    def counting_read(path: Path) -> o3d.geometry.TriangleMesh:
        reads.append(Path(path).name)
        return real_read(path)

    monkeypatch.setattr(meshes, "_read_mesh", counting_read)
    first = scan_mesh_folder(tmp_path)
    assert sorted(reads) == ["a.obj", "b.ply"]
    second = scan_mesh_folder(tmp_path)
    assert second == first and len(reads) == 2
    second.clear()  # callers get their own list
    assert len(scan_mesh_folder(tmp_path)) == 2
    # Rewriting a file (new mtime and size) invalidates the cache.
    write_box(tmp_path / "b.ply", (2.0, 2.0, 2.0))
    stat = (tmp_path / "b.ply").stat()
    os.utime(tmp_path / "b.ply", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = scan_mesh_folder(tmp_path)
    assert len(reads) > 2
    assert third[1].extent == pytest.approx((2.0, 2.0, 2.0))
    # A new file too.
    write_box(tmp_path / "c.obj")
    assert len(scan_mesh_folder(tmp_path)) == 3
