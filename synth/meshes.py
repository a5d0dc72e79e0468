"""Mesh sources for the scenes: procedural open3d shapes with seeded deformations, and user mesh folders.

This module never imports ``bpy``: it produces plain numpy arrays (procedural meshes) and validated file
listings (user folders) that the rendering code turns into Blender objects.

Procedural meshes are a pure function of ``(shape, MeshDeform)``: the deformation carries its own noise
seed, so a scene description that stores both can rebuild the exact same mesh anywhere. Every function that
draws random numbers takes an explicit :class:`numpy.random.Generator`; the module never touches global
random state.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open3d as o3d

o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)

__all__ = [
    "MESH_SUFFIXES",
    "PROCEDURAL_SHAPES",
    "MeshDeform",
    "MeshFile",
    "MeshFolderError",
    "procedural_mesh",
    "sample_deform",
    "scan_mesh_folder",
]

# ----------------------------------------------------------------------------------------------------------
# Procedural shapes
# ----------------------------------------------------------------------------------------------------------

_BLOB_NOISE_AMPLITUDE = 0.25  # radial bumps of the blob, relative to its radius
_BLOB_NOISE_FREQUENCY = 1.5  # cycles of the blob's bumps across its diameter
_NOISE_WAVES = 8  # sinusoids summed by the smooth noise
_REFINE_MIN_TRIANGLES = 1000  # coarse meshes get midpoint-refined to this size before noise/smoothing
_MIN_DECIMATION_TARGET = 64  # lower decimation targets collapse thin parts (the arrow's shaft) into sheets
_NORMAL_SMOOTHING_ITERATIONS = 5  # neighbour rings averaged into the noise displacement directions


def _mesh(vertices: np.ndarray, triangles: np.ndarray) -> o3d.geometry.TriangleMesh:
    """Wraps numpy arrays in an open3d mesh."""
    return o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.ascontiguousarray(vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.ascontiguousarray(triangles, dtype=np.int32)),
    )


def _arrays(mesh: o3d.geometry.TriangleMesh) -> tuple[np.ndarray, np.ndarray]:
    """Copies an open3d mesh's vertices (float64) and triangles (int64) out to numpy."""
    vertices = np.asarray(mesh.vertices, dtype=np.float64).copy()
    triangles = np.asarray(mesh.triangles, dtype=np.int64).copy()
    return vertices.reshape(-1, 3), triangles.reshape(-1, 3)


def _clean(mesh: o3d.geometry.TriangleMesh) -> o3d.geometry.TriangleMesh:
    """Removes duplicated vertices and triangles, degenerate triangles and unreferenced vertices."""
    mesh.remove_duplicated_vertices()
    mesh.remove_degenerate_triangles()
    mesh.remove_duplicated_triangles()
    mesh.remove_unreferenced_vertices()
    return mesh


def _scatter_add(values: np.ndarray, triangles: np.ndarray, n_vertices: int) -> np.ndarray:
    """Sums per-triangle (F, 3) vectors onto each of the triangle's three vertices."""
    index = triangles.reshape(-1)
    out = np.empty((n_vertices, 3))
    for axis in range(3):
        out[:, axis] = np.bincount(index, weights=np.repeat(values[:, axis], 3), minlength=n_vertices)
    return out


def _normalise_rows(vectors: np.ndarray) -> np.ndarray:
    """Unit rows; rows that are (numerically) zero stay zero."""
    length = np.linalg.norm(vectors, axis=1, keepdims=True)
    ok = length[:, 0] > 1e-12 * max(float(length.max(initial=0.0)), 1e-300)
    out = np.zeros_like(vectors)
    out[ok] = vectors[ok] / length[ok]
    return out


def _displacement_directions(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals, averaged over a few rings of neighbours.

    The averaging rounds the directions off at sharp edges and corners (box, tetrahedron), where plain
    vertex normals would make neighbouring faces move apart or cross. Vertices whose face normals cancel
    out (the seam of a one-sided surface) get a zero direction and do not move.
    """
    v0, v1, v2 = (vertices[triangles[:, k]] for k in range(3))
    face_normals = np.cross(v1 - v0, v2 - v0)  # length is twice the triangle's area
    normals = _normalise_rows(_scatter_add(face_normals, triangles, len(vertices)))
    for _ in range(_NORMAL_SMOOTHING_ITERATIONS):
        normals = _normalise_rows(_scatter_add(normals[triangles].sum(axis=1), triangles, len(vertices)))
    return normals


def _smooth_noise(points: np.ndarray, frequency: float, seed: int, stream: int) -> np.ndarray:
    """Smooth scalar noise in [-1, 1]: a fixed sum of random plane waves.

    Args:
        points: (N, 3) positions, already scaled so the mesh fits in the unit ball.
        frequency: cycles across the unit ball's diameter (2 units).
        seed: the noise seed; the same seed always gives the same field.
        stream: separates independent fields drawn from one seed (blob shape vs. deformation noise).

    Returns:
        (N,) noise values.
    """
    rng = np.random.default_rng([int(seed), int(stream)])
    directions = rng.normal(size=(_NOISE_WAVES, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    frequencies = frequency * rng.uniform(0.5, 1.5, size=_NOISE_WAVES)
    phases = rng.uniform(0.0, 2.0 * math.pi, size=_NOISE_WAVES)
    weights = rng.uniform(0.5, 1.0, size=_NOISE_WAVES)
    weights /= weights.sum()
    waves = np.sin(math.pi * (points @ directions.T) * frequencies + phases)
    return waves @ weights


def _refine(mesh: o3d.geometry.TriangleMesh) -> o3d.geometry.TriangleMesh:
    """Midpoint-subdivides a coarse mesh (which keeps its shape) until it has enough triangles.

    Noise needs vertices to move, and Taubin smoothing of a mesh as coarse as a box or a tetrahedron (where
    every vertex neighbours almost every other) collapses it to a point instead of rounding it off.
    """
    while len(mesh.triangles) < _REFINE_MIN_TRIANGLES:
        mesh = mesh.subdivide_midpoint(number_of_iterations=1)
    return mesh


def _displace(
    mesh: o3d.geometry.TriangleMesh, amplitude: float, frequency: float, seed: int, stream: int
) -> o3d.geometry.TriangleMesh:
    """Moves every vertex along its (smoothed) normal by ``amplitude * radius * noise``."""
    vertices, triangles = _arrays(mesh)
    lo, hi = vertices.min(axis=0), vertices.max(axis=0)
    centre = (lo + hi) / 2.0
    radius = float(np.linalg.norm(vertices - centre, axis=1).max())
    if radius <= 0.0:
        return mesh
    noise = _smooth_noise((vertices - centre) / radius, frequency, seed, stream)
    normals = _displacement_directions(vertices, triangles)
    vertices = vertices + (amplitude * radius * noise)[:, None] * normals
    return _mesh(vertices, triangles)


def _unit_sphere_from_icosahedron(levels: int) -> o3d.geometry.TriangleMesh:
    """A geodesic sphere: an icosahedron midpoint-subdivided ``levels`` times, projected onto the sphere."""
    mesh = o3d.geometry.TriangleMesh.create_icosahedron(radius=1.0)
    mesh = mesh.subdivide_midpoint(number_of_iterations=levels)
    vertices, triangles = _arrays(mesh)
    vertices /= np.linalg.norm(vertices, axis=1, keepdims=True)
    return _mesh(vertices, triangles)


def _blob(noise_seed: int) -> o3d.geometry.TriangleMesh:
    """A geodesic sphere with smooth radial bumps; the bumps are drawn from ``noise_seed``."""
    mesh = _unit_sphere_from_icosahedron(levels=3)
    vertices, triangles = _arrays(mesh)
    noise = _smooth_noise(vertices, _BLOB_NOISE_FREQUENCY, noise_seed, stream=1)
    # On the unit sphere the outward normal is the position itself: a radial, star-shaped displacement.
    vertices *= (1.0 + _BLOB_NOISE_AMPLITUDE * noise)[:, None]
    return _mesh(vertices, triangles)


def _capsule_like() -> o3d.geometry.TriangleMesh:
    """A capsule: a UV sphere whose upper half is lifted, turning its middle band into a cylinder.

    The sphere's resolution is odd, so no vertex ring lies on the equator and the band between the two rings
    next to it (same radius) becomes an exact cylinder.
    """
    mesh = o3d.geometry.TriangleMesh.create_sphere(radius=0.5, resolution=21)
    vertices, triangles = _arrays(mesh)
    vertices[vertices[:, 2] > 0.0, 2] += 0.5
    return _mesh(vertices, triangles)


_GENERATORS: dict[str, Callable[[int], o3d.geometry.TriangleMesh]] = {
    "o3d_box": lambda _seed: o3d.geometry.TriangleMesh.create_box(1.0, 1.0, 1.0),
    "o3d_sphere": lambda _seed: o3d.geometry.TriangleMesh.create_sphere(radius=0.5, resolution=20),
    "o3d_cylinder": lambda _seed: o3d.geometry.TriangleMesh.create_cylinder(
        radius=0.5, height=1.0, resolution=32, split=4
    ),
    "o3d_cone": lambda _seed: o3d.geometry.TriangleMesh.create_cone(
        radius=0.5, height=1.0, resolution=32, split=4
    ),
    "o3d_capsule_like": lambda _seed: _capsule_like(),
    "o3d_torus": lambda _seed: o3d.geometry.TriangleMesh.create_torus(
        torus_radius=1.0, tube_radius=0.35, radial_resolution=40, tubular_resolution=20
    ),
    "o3d_arrow": lambda _seed: o3d.geometry.TriangleMesh.create_arrow(
        cylinder_radius=0.1, cone_radius=0.2, cylinder_height=0.6, cone_height=0.4, resolution=24
    ),
    "o3d_tetrahedron": lambda _seed: o3d.geometry.TriangleMesh.create_tetrahedron(radius=1.0),
    "o3d_octahedron": lambda _seed: o3d.geometry.TriangleMesh.create_octahedron(radius=1.0),
    "o3d_icosahedron": lambda _seed: o3d.geometry.TriangleMesh.create_icosahedron(radius=1.0),
    "o3d_mobius": lambda _seed: o3d.geometry.TriangleMesh.create_mobius(
        length_split=80, width_split=8, twists=1, radius=1.0, flatness=1.0, width=0.6, scale=1.0
    ),
    "o3d_blob": _blob,
}

PROCEDURAL_SHAPES: tuple[str, ...] = tuple(_GENERATORS)
"""Names accepted by :func:`procedural_mesh`, each built from ``open3d.geometry.TriangleMesh.create_*``.

``o3d_capsule_like`` is a lifted UV sphere, ``o3d_blob`` a geodesic sphere (subdivided icosahedron) with
smooth radial bumps drawn from ``MeshDeform.noise_seed``, ``o3d_arrow`` two closed parts (shaft and head)
touching at one vertex, and ``o3d_mobius`` a one-sided strip; the others are the open3d primitives.
"""

_ONE_SIDED_SHAPES = frozenset({"o3d_mobius"})
"""Non-orientable surfaces: their triangles cannot be oriented consistently, so they are left as generated."""


@dataclass(frozen=True)
class MeshDeform:
    """How a procedural mesh is varied. All plain JSON-able fields.

    The steps run in this order: loop subdivision, stretch, midpoint refinement of coarse meshes (only when
    noise or smoothing is on; it keeps the shape), noise displacement, Taubin smoothing, quadric decimation;
    the result is then cleaned, oriented and normalised (see :func:`procedural_mesh`).

    Attributes:
        stretch: Non-uniform scale along x, y, z applied before normalisation (all > 0).
        noise_amplitude: Displacement along vertex normals, relative to the mesh radius (>= 0; 0 = off).
        noise_frequency: Spatial frequency of the smooth noise, in cycles across the mesh's diameter (> 0).
            The noise is a sum of a few random sinusoids drawn from ``noise_seed``.
        subdivisions: Loop subdivision iterations, 0 to 2. Loop subdivision also rounds the shape.
        target_triangles: Quadric decimation target triangle count (0 = keep; targets below 64 act as 64).
        smooth_iterations: Taubin smoothing iterations (>= 0).
        noise_seed: Seeds the noise (and the bumps of ``o3d_blob``), so the mesh is a pure function of
            ``(shape, deform)``.
    """

    stretch: tuple[float, float, float] = (1.0, 1.0, 1.0)
    noise_amplitude: float = 0.0
    noise_frequency: float = 2.0
    subdivisions: int = 0
    target_triangles: int = 0
    smooth_iterations: int = 0
    noise_seed: int = 0

    def __post_init__(self) -> None:
        """Normalises field types (lists from JSON/YAML become tuples) and validates the ranges."""
        stretch = tuple(float(s) for s in self.stretch)
        if len(stretch) != 3 or not all(math.isfinite(s) and s > 0.0 for s in stretch):
            raise ValueError(
                f"MeshDeform.stretch must be three finite positive numbers, got {self.stretch!r}"
            )
        object.__setattr__(self, "stretch", stretch)
        for name in ("noise_amplitude", "noise_frequency"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("subdivisions", "target_triangles", "smooth_iterations", "noise_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value:
                raise ValueError(f"MeshDeform.{name} must be an integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not (math.isfinite(self.noise_amplitude) and self.noise_amplitude >= 0.0):
            raise ValueError(f"MeshDeform.noise_amplitude must be >= 0, got {self.noise_amplitude!r}")
        if not (math.isfinite(self.noise_frequency) and self.noise_frequency > 0.0):
            raise ValueError(f"MeshDeform.noise_frequency must be > 0, got {self.noise_frequency!r}")
        if not 0 <= self.subdivisions <= 2:
            raise ValueError(f"MeshDeform.subdivisions must be 0, 1 or 2, got {self.subdivisions!r}")
        if self.target_triangles < 0:
            raise ValueError(f"MeshDeform.target_triangles must be >= 0, got {self.target_triangles!r}")
        if self.smooth_iterations < 0:
            raise ValueError(f"MeshDeform.smooth_iterations must be >= 0, got {self.smooth_iterations!r}")
        if self.noise_seed < 0:
            raise ValueError(f"MeshDeform.noise_seed must be >= 0, got {self.noise_seed!r}")

    def to_dict(self) -> dict[str, object]:
        """The fields as a JSON-able dict (``stretch`` as a list); ``MeshDeform(**d)`` rebuilds it."""
        data = dataclasses.asdict(self)
        data["stretch"] = list(self.stretch)
        return data


def sample_deform(rng: np.random.Generator, strength: float = 1.0) -> MeshDeform:
    """Random deformation parameters; strength 0 gives the identity deformation.

    The same number of values is drawn from ``rng`` whatever ``strength`` is, so changing the strength does
    not shift the random stream of the caller.

    Args:
        rng: The only source of randomness.
        strength: 0 returns ``MeshDeform()`` exactly; 1 gives stretches of about 0.7-1.4 per axis, noise
            up to 8% of the radius, and (each with a probability growing with the strength) one loop
            subdivision, Taubin smoothing, and decimation to a low-poly look. Values above 1 are allowed
            and exaggerate the stretch and the noise.

    Returns:
        The sampled deformation.

    Raises:
        ValueError: If ``strength`` is negative or not finite.
    """
    strength = float(strength)
    if not (math.isfinite(strength) and strength >= 0.0):
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    log_stretch = rng.uniform(-0.35, 0.35, size=3)
    amplitude = rng.uniform(0.0, 0.08)
    frequency = rng.uniform(1.0, 3.0)
    coins = rng.uniform(size=3)  # subdivide, smooth, decimate
    smooth_iterations = int(rng.integers(1, 11))
    target_triangles = int(rng.integers(150, 1501))
    noise_seed = int(rng.integers(0, 2**31 - 1))
    if strength == 0.0:
        return MeshDeform()
    p = min(1.0, strength)
    return MeshDeform(
        stretch=tuple(float(s) for s in np.exp(strength * log_stretch)),
        noise_amplitude=float(min(strength * amplitude, 0.3)),
        noise_frequency=float(frequency),
        subdivisions=int(coins[0] < 0.3 * p),
        target_triangles=target_triangles if coins[2] < 0.2 * p else 0,
        smooth_iterations=smooth_iterations if coins[1] < 0.3 * p else 0,
        noise_seed=noise_seed,
    )


def _is_consistently_oriented(triangles: np.ndarray, n_vertices: int) -> bool:
    """True if no directed edge is used twice, i.e. every pair of neighbouring triangles agrees."""
    heads = triangles.reshape(-1)
    tails = triangles[:, [1, 2, 0]].reshape(-1)
    keys = heads * np.int64(n_vertices) + tails
    return len(np.unique(keys)) == len(keys)


def _orient_outward(mesh: o3d.geometry.TriangleMesh) -> tuple[np.ndarray, np.ndarray]:
    """Makes triangle winding consistent, then flips every connected part whose signed volume is negative."""
    vertices, triangles = _arrays(mesh)
    if not _is_consistently_oriented(triangles, len(vertices)):
        mesh.orient_triangles()
        vertices, triangles = _arrays(mesh)
    clusters, _, _ = mesh.cluster_connected_triangles()
    clusters = np.asarray(clusters, dtype=np.int64)
    v0, v1, v2 = (vertices[triangles[:, k]] for k in range(3))
    signed = np.einsum("ij,ij->i", v0, np.cross(v1, v2))  # 6 x signed volume of each face's tetrahedron
    volume = np.bincount(clusters, weights=signed)
    flip = volume[clusters] < 0.0
    triangles[flip] = triangles[flip][:, ::-1]
    return vertices, triangles


def _normalise(vertices: np.ndarray) -> np.ndarray | None:
    """Centres the bounding box at the origin and scales its largest side to 1; None if that is impossible."""
    for _ in range(2):  # the second pass removes the rounding error of the first from the centre
        lo, hi = vertices.min(axis=0), vertices.max(axis=0)
        size = float((hi - lo).max())
        if not (math.isfinite(size) and size > 0.0):
            return None
        vertices = (vertices - (lo + hi) / 2.0) / size
    return vertices


def procedural_mesh(shape: str, deform: MeshDeform = MeshDeform()) -> tuple[np.ndarray, np.ndarray]:
    """Build the mesh.

    Returns (vertices float64 (V,3), triangles int64 (F,3)), centred at the origin (bounding-box centre),
    scaled so the bounding box's largest side is 1.0, with outward-oriented consistent triangles and no
    degenerate triangles or duplicate vertices (open3d's ``remove_*`` cleanups). ``o3d_mobius`` is one-sided:
    its triangles are consistent except across the seam, where no orientation can be. Deterministic: the
    same arguments give bit-identical arrays.

    Args:
        shape: One of :data:`PROCEDURAL_SHAPES`.
        deform: The variation to apply; the default leaves the shape as generated.

    Returns:
        ``(vertices, triangles)``.

    Raises:
        ValueError: If ``shape`` is unknown (the message names it and lists the known shapes), or the
            deformation leaves no triangle.
    """
    if shape not in _GENERATORS:
        raise ValueError(f"unknown procedural shape {shape!r}; known shapes: {', '.join(PROCEDURAL_SHAPES)}")
    mesh = _clean(_GENERATORS[shape](deform.noise_seed))
    if deform.subdivisions:
        mesh = _clean(mesh.subdivide_loop(number_of_iterations=deform.subdivisions))
    if deform.stretch != (1.0, 1.0, 1.0):
        vertices, triangles = _arrays(mesh)
        centre = (vertices.min(axis=0) + vertices.max(axis=0)) / 2.0
        mesh = _mesh((vertices - centre) * np.asarray(deform.stretch) + centre, triangles)
    if deform.noise_amplitude > 0.0 or deform.smooth_iterations:
        mesh = _refine(mesh)
    if deform.noise_amplitude > 0.0:
        mesh = _displace(mesh, deform.noise_amplitude, deform.noise_frequency, deform.noise_seed, stream=0)
    if deform.smooth_iterations:
        mesh = mesh.filter_smooth_taubin(number_of_iterations=deform.smooth_iterations)
    if deform.target_triangles:
        target = max(deform.target_triangles, _MIN_DECIMATION_TARGET)
        if target < len(mesh.triangles):
            mesh = mesh.simplify_quadric_decimation(target_number_of_triangles=target)
    mesh = _clean(mesh)
    if len(mesh.triangles) == 0:
        raise ValueError(f"procedural mesh {shape!r} with {deform!r} has no triangle left")
    if shape in _ONE_SIDED_SHAPES:
        vertices, triangles = _arrays(mesh)
    else:
        vertices, triangles = _orient_outward(mesh)
    vertices = _normalise(vertices)
    if vertices is None:
        raise ValueError(f"procedural mesh {shape!r} with {deform!r} collapsed to a point or is not finite")
    return vertices, triangles


# ----------------------------------------------------------------------------------------------------------
# User mesh folders
# ----------------------------------------------------------------------------------------------------------

MESH_SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".stl")


@dataclass(frozen=True)
class MeshFile:
    """One validated mesh file of a user folder.

    Attributes:
        path: Absolute path of the file.
        category: For a file inside a subfolder of the scanned folder, the name of that top-level subfolder
            (for the usual ``folder/<category>/<file>`` layout, the file's parent folder); for a file
            directly in the scanned folder, the file's stem.
        extent: Size of the axis-aligned bounding box (x, y, z), as read by open3d.
        n_triangles: Number of triangles open3d reads.
    """

    path: str
    category: str
    extent: tuple[float, float, float]
    n_triangles: int


class MeshFolderError(ValueError):
    """A user mesh folder cannot be used; the message names the folder or the offending file."""


def _read_mesh(path: Path) -> o3d.geometry.TriangleMesh:
    """Reads a mesh with open3d (an unreadable file gives an empty mesh or raises).

    glTF/glb go through assimp, which applies the node transforms and triangulates even without open3d's
    optional post-processing; that post-processing only splits vertices, so it is left off.
    """
    return o3d.io.read_triangle_mesh(str(path), enable_post_processing=False, print_progress=False)


def _mesh_file(root: Path, relative: str) -> MeshFile:
    """Reads and validates one file of a folder scan."""
    path = root / relative
    try:
        mesh = _read_mesh(path)
    except Exception as exc:  # open3d raises RuntimeError for some unreadable files
        raise MeshFolderError(f"cannot read mesh file {path}: {exc}") from exc
    n_triangles = len(mesh.triangles)
    if n_triangles == 0:
        raise MeshFolderError(f"mesh file {path} is unreadable or has no triangles")
    vertices = np.asarray(mesh.vertices)
    if not np.isfinite(vertices).all():
        raise MeshFolderError(f"mesh file {path} has non-finite vertex coordinates")
    extent = mesh.get_axis_aligned_bounding_box().get_extent()
    parts = Path(relative).parts
    category = parts[0] if len(parts) > 1 else path.stem
    return MeshFile(
        path=str(path),
        category=category,
        extent=(float(extent[0]), float(extent[1]), float(extent[2])),
        n_triangles=int(n_triangles),
    )


@functools.lru_cache(maxsize=64)
def _scan_cached(root: str, entries: tuple[tuple[str, int, int], ...]) -> tuple[MeshFile, ...]:
    """Reads every listed file; keyed by the folder and each file's (relative path, mtime_ns, size)."""
    return tuple(_mesh_file(Path(root), relative) for relative, _, _ in entries)


def scan_mesh_folder(folder: str | os.PathLike) -> list[MeshFile]:
    """Recursively lists and validates the mesh files under a folder.

    Files are those whose suffix (any case) is in :data:`MESH_SUFFIXES`, sorted by their path relative to
    ``folder`` for determinism; hidden files and folders (name starting with ``.``) are skipped. Each file
    is read with ``open3d.io.read_triangle_mesh`` to validate it. Results are cached per (resolved folder,
    files' relative paths, mtimes and sizes), so repeated calls only cost a directory walk.

    Args:
        folder: The folder to scan.

    Returns:
        One :class:`MeshFile` per mesh file, in sorted relative-path order.

    Raises:
        MeshFolderError: If the folder is missing, is not a directory or contains no mesh file (the message
            names the folder), or if a file is unreadable or has no triangles (the message names the file).
    """
    given = Path(folder).expanduser()
    if not given.exists():
        raise MeshFolderError(f"mesh folder {str(given)!r} does not exist")
    if not given.is_dir():
        raise MeshFolderError(f"mesh folder {str(given)!r} is not a directory")
    root = given.resolve()
    entries: list[tuple[str, int, int]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in MESH_SUFFIXES:
                continue
            path = Path(dirpath) / name
            try:
                stat = path.stat()
            except OSError as exc:
                raise MeshFolderError(f"cannot stat mesh file {path}: {exc}") from exc
            entries.append((path.relative_to(root).as_posix(), stat.st_mtime_ns, stat.st_size))
    if not entries:
        raise MeshFolderError(
            f"mesh folder {str(given)!r} contains no mesh file (suffixes: {', '.join(MESH_SUFFIXES)})"
        )
    entries.sort()
    return list(_scan_cached(str(root), tuple(entries)))
