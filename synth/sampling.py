"""Seeded scene samplers: a scene config plus a ``numpy.random.Generator`` gives a :class:`SceneSpec`.

Two families, each a Hydra-instantiable dataclass whose fields are the config keys of ``configs/scene/``:

* :class:`TabletopScene`: a clutter of objects on a support plane, optionally dropped with physics.
* :class:`RoomScene`: floor, walls and ceiling, furniture-like boxes and clutter on and around them,
  several views per room (the indoor setting of SUNCG / SceneNet that Ren & Lee, CVPR 2018, trained on).

The sampler never touches global random state: every draw comes from the generator passed to
:meth:`SceneSampler.sample`, so the same seed and config give the same spec.

Example:
    >>> import numpy as np
    >>> spec = TabletopScene(views=2).sample(np.random.default_rng(0), width=64, height=64)
    >>> spec.n_views
    2
"""

import colorsys
import math
import os
from dataclasses import dataclass, field

import numpy as np

from synth.meshes import PROCEDURAL_SHAPES, MeshFile, sample_deform, scan_mesh_folder
from synth.scene import (
    BACKGROUND_CATEGORY,
    PRIMITIVE_SHAPES,
    TEXTURE_KINDS,
    Camera,
    Light,
    Material,
    ObjectSpec,
    SceneConfigError,
    SceneSamplingError,
    SceneSpec,
    Shape,
    Texture,
    World,
    category_table,
)

FURNITURE_CATEGORY = 1
DEFAULT_SHAPES = (*PRIMITIVE_SHAPES, *PROCEDURAL_SHAPES)


# --------------------------------------------------------------------------------------------- geometry


def look_at(eye: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """Camera-to-world 4x4 matrix (Blender camera convention: looks down local -z, local +y up).

    Args:
        eye: (3,) camera position.
        target: (3,) point the optical axis passes through.
        roll: Rotation about the optical axis in radians.
    """
    forward = np.asarray(target, float) - np.asarray(eye, float)
    forward /= np.linalg.norm(forward)
    up = np.array([0.0, 0.0, 1.0])
    if np.linalg.norm(np.cross(forward, up)) < 1e-6:  # looking straight up or down
        up = np.array([0.0, 1.0, 0.0])
    right = np.cross(forward, up)
    right /= np.linalg.norm(right)
    cam_up = np.cross(right, forward)
    c, s = math.cos(roll), math.sin(roll)
    right, cam_up = c * right + s * cam_up, -s * right + c * cam_up
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, cam_up, -forward], axis=1)
    pose[:3, 3] = eye
    return pose


def euler_xyz(rotation: np.ndarray) -> tuple[float, float, float]:
    """XYZ Euler angles (Blender's default order, ``R = Rz @ Ry @ Rx``) of a 3x3 rotation matrix."""
    y = math.asin(float(np.clip(-rotation[2, 0], -1.0, 1.0)))
    x = math.atan2(rotation[2, 1], rotation[2, 2])
    z = math.atan2(rotation[1, 0], rotation[0, 0])
    return (x, y, z)


def project(pose: np.ndarray, points: np.ndarray, fov_deg: float, width: int, height: int) -> np.ndarray:
    """Normalised image coordinates of world points, in [-1, 1] inside the frame.

    Args:
        pose: (4, 4) camera-to-world, Blender convention.
        points: (N, 3) world points.
        fov_deg: Field of view along the larger image side.

    Returns:
        (N, 3): normalised x (right), y (up) and depth along the optical axis (negative = behind).
    """
    cam = (np.asarray(points, float) - pose[:3, 3]) @ pose[:3, :3]
    depth = -cam[:, 2]
    tan_half = math.tan(math.radians(fov_deg) / 2)
    tan_x = tan_half if width >= height else tan_half * width / height
    tan_y = tan_x * height / width
    with np.errstate(divide="ignore", invalid="ignore"):
        x = cam[:, 0] / depth / tan_x
        y = cam[:, 1] / depth / tan_y
    return np.stack([x, y, depth], axis=1)


def in_view(pose, points, fov_deg, width, height, margin=0.05, near=0.05) -> np.ndarray:
    """(N,) bool: each point is in front of the camera and inside the frame shrunk by ``margin``."""
    xyd = project(pose, points, fov_deg, width, height)
    limit = 1.0 - margin
    return (xyd[:, 2] > near) & (np.abs(xyd[:, 0]) <= limit) & (np.abs(xyd[:, 1]) <= limit)


# --------------------------------------------------------------------------------------------- validation


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_range(key: str, value, *, low: float | None = None, high: float | None = None,
                 integer: bool = False) -> list:
    """Validate a ``[min, max]`` config pair; the error names ``scene.<key>``."""
    if not (isinstance(value, list | tuple) and len(value) == 2):
        raise SceneConfigError(f"scene.{key}: expected [min, max], got {value!r}")
    if not all(_number(v) and (not integer or float(v).is_integer()) for v in value):
        kind = "integers" if integer else "finite numbers"
        raise SceneConfigError(f"scene.{key}: expected two {kind}, got {value!r}")
    lo, hi = value
    if lo > hi:
        raise SceneConfigError(f"scene.{key}: min {lo} is larger than max {hi}")
    if low is not None and lo < low:
        raise SceneConfigError(f"scene.{key}: values must be >= {low}, got {value!r}")
    if high is not None and hi > high:
        raise SceneConfigError(f"scene.{key}: values must be <= {high}, got {value!r}")
    return [int(lo), int(hi)] if integer else [float(lo), float(hi)]


def _check_scalar(key: str, value, *, low: float | None = None, high: float | None = None,
                  integer: bool = False, open_low: bool = False) -> None:
    if not _number(value) or (integer and not float(value).is_integer()):
        raise SceneConfigError(f"scene.{key}: expected {'an integer' if integer else 'a finite number'}, "
                               f"got {value!r}")
    if low is not None and (value <= low if open_low else value < low):
        raise SceneConfigError(f"scene.{key}: must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise SceneConfigError(f"scene.{key}: must be <= {high}, got {value!r}")


# --------------------------------------------------------------------------------------------- samplers


@dataclass(kw_only=True)
class SceneSampler:
    """Fields shared by every scene family. Subclasses implement :meth:`_sample`.

    Args:
        views: Camera views rendered per scene (frames per scene).
        fov_deg: Camera field of view along the larger image side, degrees.
        view_margin: Fraction of the half-frame kept free at the border when checking that objects are
            in view.
        camera_roll_deg: Range of rotation about the optical axis.
        shapes: Built-in shapes drawn from (Blender primitives and open3d procedural shapes).
        mesh_dir: Optional folder of user meshes (.obj/.ply/.glb/.gltf/.stl), added to the shape pool;
            a file's category is its parent folder name (or its stem in a flat folder).
        deform_strength: Strength of the random deformation of procedural meshes (0 = none).
        object_size: Range of the largest object side, metres.
        aspect: Range of the per-axis size factor relative to the largest side.
        textured_prob: Probability that a material gets a procedural texture.
        n_lights: Range of the number of lights.
        light_energy: Range of a point/area light's power, watts.
        world_strength: Range of the ambient world light strength.
        max_tries: Rejection-sampling attempts before reporting an impossible constraint.
    """

    views: int = 2
    fov_deg: float = 55.0
    view_margin: float = 0.08
    camera_roll_deg: list[float] = field(default_factory=lambda: [-10.0, 10.0])
    shapes: list[str] = field(default_factory=lambda: list(DEFAULT_SHAPES))
    mesh_dir: str | None = None
    deform_strength: float = 1.0
    object_size: list[float] = field(default_factory=lambda: [0.1, 0.25])
    aspect: list[float] = field(default_factory=lambda: [0.6, 1.0])
    textured_prob: float = 0.7
    n_lights: list[int] = field(default_factory=lambda: [1, 3])
    light_energy: list[float] = field(default_factory=lambda: [50.0, 300.0])
    world_strength: list[float] = field(default_factory=lambda: [0.2, 0.8])
    max_tries: int = 200

    family = "base"
    _draws_assets = False  # the realistic families draw catalogue assets, not shapes

    def __post_init__(self) -> None:
        _check_scalar("views", self.views, low=1, integer=True)
        self.views = int(self.views)
        _check_scalar("fov_deg", self.fov_deg, low=1.0, high=170.0)
        _check_scalar("view_margin", self.view_margin, low=0.0, high=0.9)
        self.camera_roll_deg = _check_range("camera_roll_deg", self.camera_roll_deg, low=-180.0, high=180.0)
        if not isinstance(self.shapes, list | tuple) or not all(isinstance(s, str) for s in self.shapes):
            raise SceneConfigError(f"scene.shapes: expected a list of shape names, got {self.shapes!r}")
        unknown = sorted(set(self.shapes) - set(DEFAULT_SHAPES))
        if unknown:
            raise SceneConfigError(f"scene.shapes: unknown shape(s) {unknown}; choose from {list(DEFAULT_SHAPES)}")
        _check_scalar("deform_strength", self.deform_strength, low=0.0, high=3.0)
        self.object_size = _check_range("object_size", self.object_size, low=1e-3)
        self.aspect = _check_range("aspect", self.aspect, low=0.05, high=1.0)
        _check_scalar("textured_prob", self.textured_prob, low=0.0, high=1.0)
        self.n_lights = _check_range("n_lights", self.n_lights, low=1, high=16, integer=True)
        self.light_energy = _check_range("light_energy", self.light_energy, low=0.0)
        self.world_strength = _check_range("world_strength", self.world_strength, low=0.0)
        _check_scalar("max_tries", self.max_tries, low=1, integer=True)
        self.max_tries = int(self.max_tries)
        if self.mesh_dir is not None and not isinstance(self.mesh_dir, str | os.PathLike):
            raise SceneConfigError(f"scene.mesh_dir: expected a folder path, got {self.mesh_dir!r}")
        # Scanning validates every file now, so a bad folder fails before anything is written.
        self._mesh_files: list[MeshFile] = [] if self.mesh_dir is None else scan_mesh_folder(self.mesh_dir)
        if not self.shapes and not self._mesh_files and not self._draws_assets:
            raise SceneConfigError("scene.shapes: empty, and no scene.mesh_dir given: nothing to place")

    @property
    def categories(self) -> dict[int, str]:
        return category_table(tuple(m.category for m in self._mesh_files))

    def sample(self, rng: np.random.Generator, *, width: int, height: int, seed: int = 0) -> SceneSpec:
        """Draw one scene.

        Args:
            rng: The only source of randomness.
            width: Image width in pixels (the in-view check depends on the aspect ratio).
            height: Image height in pixels.
            seed: Recorded in the spec (and used by the renderer as the Cycles noise seed).

        Raises:
            SceneSamplingError: the constraints cannot be met within ``max_tries``.
        """
        return self._sample(rng, width=width, height=height, seed=int(seed))

    def _sample(self, rng, *, width, height, seed) -> SceneSpec:
        raise NotImplementedError

    # ---- shared draws

    def _color(self, rng, saturation=(0.2, 0.9), value=(0.2, 0.95)) -> tuple[float, float, float]:
        rgb = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value))
        return tuple(float(c) for c in rgb)

    def _material(self, rng, textured_prob: float | None = None) -> Material:
        prob = self.textured_prob if textured_prob is None else textured_prob
        texture = None
        if rng.uniform() < prob:
            texture = Texture(
                kind=str(rng.choice(TEXTURE_KINDS)),
                scale=float(rng.uniform(2.0, 20.0)),
                color=self._color(rng),
                detail=float(rng.uniform(1.0, 8.0)),
            )
        metallic = float(rng.uniform(0.5, 1.0)) if rng.uniform() < 0.2 else 0.0
        return Material(base_color=self._color(rng), roughness=float(rng.uniform(0.15, 0.9)),
                        metallic=metallic, texture=texture)

    def _shape(self, rng) -> tuple[Shape, int]:
        pool = len(self.shapes) + len(self._mesh_files)
        pick = int(rng.integers(pool))
        ids = {name: cid for cid, name in self.categories.items()}
        if pick < len(self.shapes):
            name = self.shapes[pick]
            if name in PRIMITIVE_SHAPES:
                return Shape(source="primitive", name=name), ids[name]
            return Shape(source="procedural", name=name, deform=sample_deform(rng, self.deform_strength)), ids[name]
        mesh = self._mesh_files[pick - len(self.shapes)]
        return Shape(source="file", name=mesh.path), ids[mesh.category]

    def _draw_object(self, rng) -> tuple[Shape, int, tuple[float, float, float]]:
        """A clutter object's shape, category id and size (subclasses draw catalogue assets instead)."""
        shape, category = self._shape(rng)
        return shape, category, self._size(rng)

    def _object_material(self, rng, shape: Shape) -> Material | None:
        return self._material(rng)

    def _support_material(self, rng) -> Material:
        """Material of the table (tabletop) or of the room's shell."""
        return self._material(rng, textured_prob=0.9)

    def _draw_fov(self, rng) -> float:
        """The scene's field of view (fixed here; the realistic families draw it from a range)."""
        return float(self.fov_deg)

    def _size(self, rng) -> tuple[float, float, float]:
        largest = rng.uniform(*self.object_size)
        factors = rng.uniform(*self.aspect, size=3)
        factors[rng.integers(3)] = 1.0
        return tuple(float(largest * f) for f in factors)

    def _roll(self, rng) -> float:
        return math.radians(rng.uniform(*self.camera_roll_deg))

    def _world(self, rng) -> World:
        return World(color=self._color(rng, saturation=(0.0, 0.3), value=(0.3, 1.0)),
                     strength=float(rng.uniform(*self.world_strength)))

    def _light_color(self, rng) -> tuple[float, float, float]:
        tint = self._color(rng, saturation=(0.0, 0.4), value=(1.0, 1.0))
        return tuple(float(0.7 + 0.3 * c) for c in tint)


def _aim(eye: np.ndarray, target: np.ndarray) -> tuple[float, float, float]:
    """Euler angles that point a light's (or camera's) local -z from ``eye`` at ``target``."""
    return euler_xyz(look_at(eye, target)[:3, :3])


@dataclass(kw_only=True)
class TabletopScene(SceneSampler):
    """Clutter of objects on a support plane; the camera looks at the clutter from above.

    Args:
        n_objects: Range of the number of objects.
        spread: Radius of the disk (metres) in which object centres are placed.
        table_size: Side of the square support plane, metres.
        physics: Drop the objects with random orientations and let them settle (rigid-body simulation). The
            settled poses are stored with every frame, but are not bit-reproducible across processes:
            Blender's Bullet orders collision pairs by memory address, and a rolling object amplifies the
            difference. Off, objects stand upright with a random yaw and the same seed gives identical frames.
        physics_max_time: Cap on simulated seconds (a rolling sphere never counts as at rest).
        camera_distance: Range of the camera's distance to the look-at target, metres.
        camera_elevation_deg: Range of the camera's elevation above the support plane.
        target_jitter: Std of the look-at target's offset from the clutter's centre, metres.
    """

    n_objects: list[int] = field(default_factory=lambda: [3, 6])
    spread: float = 0.3
    table_size: float = 3.0
    physics: bool = False
    physics_max_time: float = 2.0
    camera_distance: list[float] = field(default_factory=lambda: [0.6, 1.1])
    camera_elevation_deg: list[float] = field(default_factory=lambda: [25.0, 75.0])
    target_jitter: float = 0.05

    family = "primitives_tabletop"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.n_objects = _check_range("n_objects", self.n_objects, low=1, high=100, integer=True)
        _check_scalar("spread", self.spread, low=0.0)
        _check_scalar("table_size", self.table_size, low=0.0, open_low=True)
        if not isinstance(self.physics, bool):
            raise SceneConfigError(f"scene.physics: expected true or false, got {self.physics!r}")
        _check_scalar("physics_max_time", self.physics_max_time, low=0.0, open_low=True)
        self.camera_distance = _check_range("camera_distance", self.camera_distance, low=0.05)
        self.camera_elevation_deg = _check_range("camera_elevation_deg", self.camera_elevation_deg, low=1.0, high=90.0)
        _check_scalar("target_jitter", self.target_jitter, low=0.0)
        if self.spread + self.object_size[1] > self.table_size / 2:
            raise SceneConfigError(
                f"scene.spread: objects placed within {self.spread} m of the centre fall off a table of "
                f"scene.table_size={self.table_size} m"
            )

    def _sample(self, rng, *, width, height, seed) -> SceneSpec:
        objects = [
            ObjectSpec(
                name="table", shape=Shape(source="primitive", name="cube"), category_id=BACKGROUND_CATEGORY,
                location=(0.0, 0.0, -0.025), rotation=(0.0, 0.0, 0.0),
                size=(self.table_size, self.table_size, 0.05),
                material=self._support_material(rng),
                physics="passive" if self.physics else "none",
            )
        ]
        placed: list[tuple[np.ndarray, float]] = []
        for i in range(int(rng.integers(self.n_objects[0], self.n_objects[1] + 1))):
            shape, category, size = self._draw_object(rng)
            radius = _footprint_radius(shape, size)
            xy = self._free_spot(rng, radius, placed)
            placed.append((xy, radius))
            if self.physics:
                rotation = tuple(float(a) for a in rng.uniform(-math.pi, math.pi, size=3))
                gap = float(rng.uniform(0.01, 0.05) + 0.5 * radius)
            else:
                rotation = (0.0, 0.0, float(rng.uniform(-math.pi, math.pi)))
                gap = 0.0
            objects.append(ObjectSpec(
                name=f"object_{i:02d}", shape=shape, category_id=category,
                location=(float(xy[0]), float(xy[1]), gap), rotation=rotation, size=size,
                material=self._object_material(rng, shape), support_z=0.0,
                physics="active" if self.physics else "none",
            ))

        # Where the objects end up (approximately, physics moves them a little): bbox centres at rest.
        centres = np.array([[o.location[0], o.location[1], _rest_height(o)] for o in objects[1:]])
        lights = []
        for _ in range(int(rng.integers(self.n_lights[0], self.n_lights[1] + 1))):
            azimuth, elevation = rng.uniform(0, 2 * math.pi), rng.uniform(math.radians(30), math.radians(85))
            distance = rng.uniform(1.5, 3.0)
            eye = distance * np.array([math.cos(elevation) * math.cos(azimuth),
                                       math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
            kind = str(rng.choice(["POINT", "AREA"]))
            lights.append(Light(type=kind, location=tuple(float(v) for v in eye), rotation=_aim(eye, np.zeros(3)),
                                energy=float(rng.uniform(*self.light_energy)), color=self._light_color(rng),
                                size=float(rng.uniform(0.2, 1.0))))

        fov = self._draw_fov(rng)
        poses = [self._camera_pose(rng, centres, width, height, fov) for _ in range(self.views)]
        return SceneSpec(family=self.family, seed=seed, objects=objects, lights=lights, world=self._world(rng),
                         camera=Camera(fov_deg=fov, poses=poses), categories=self.categories,
                         physics=self.physics, physics_max_time=float(self.physics_max_time))

    def _free_spot(self, rng, radius: float, placed) -> np.ndarray:
        """A point in the spread disk whose footprint does not overlap earlier objects (best effort)."""
        best, best_clearance = None, -math.inf
        for _ in range(self.max_tries):
            r, angle = self.spread * math.sqrt(rng.uniform()), rng.uniform(0, 2 * math.pi)
            xy = np.array([r * math.cos(angle), r * math.sin(angle)])
            clearance = min((np.linalg.norm(xy - p) - radius - q for p, q in placed), default=math.inf)
            if clearance >= 0:
                return xy
            if clearance > best_clearance:
                best, best_clearance = xy, clearance
        return best  # crowded: physics (or a slight overlap) resolves it

    def _camera_pose(self, rng, centres: np.ndarray, width: int, height: int, fov: float) -> list[list[float]]:
        target_base = centres.mean(axis=0)
        for _ in range(self.max_tries):
            target = target_base + rng.normal(0.0, self.target_jitter, size=3) * [1, 1, 0.3]
            azimuth = rng.uniform(0, 2 * math.pi)
            elevation = math.radians(rng.uniform(*self.camera_elevation_deg))
            distance = rng.uniform(*self.camera_distance)
            eye = target + distance * np.array([math.cos(elevation) * math.cos(azimuth),
                                                math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
            pose = look_at(eye, target, self._roll(rng))
            if in_view(pose, centres, fov, width, height, self.view_margin).all():
                return pose.tolist()
        raise SceneSamplingError(
            f"no camera pose keeps all objects in view after scene.max_tries={self.max_tries} tries: "
            f"objects spread over scene.spread={self.spread} m, seen from scene.camera_distance="
            f"{list(self.camera_distance)} m with scene.fov_deg={self.fov_deg} and scene.view_margin="
            f"{self.view_margin}; increase camera_distance or fov_deg, or reduce spread"
        )


@dataclass(kw_only=True)
class RoomScene(SceneSampler):
    """A room: floor, four walls, ceiling, furniture-like boxes and clutter; several views per room.

    Args:
        room_size: Range of the room's width and depth, metres.
        room_height: Range of the ceiling height, metres.
        n_furniture: Range of the number of furniture boxes (category ``furniture``).
        furniture_size: Range of a furniture box's width/depth/height, metres.
        n_objects: Range of the number of clutter objects, on furniture tops or the floor.
        camera_height: Range of the camera's height above the floor, metres.
        min_view_distance: Smallest distance between the camera and the object it looks at, metres.
    """

    views: int = 4
    fov_deg: float = 60.0
    room_size: list[float] = field(default_factory=lambda: [3.5, 6.0])
    room_height: list[float] = field(default_factory=lambda: [2.4, 3.0])
    n_furniture: list[int] = field(default_factory=lambda: [2, 5])
    furniture_size: list[float] = field(default_factory=lambda: [0.4, 1.4])
    n_objects: list[int] = field(default_factory=lambda: [3, 8])
    object_size: list[float] = field(default_factory=lambda: [0.12, 0.35])
    camera_height: list[float] = field(default_factory=lambda: [1.0, 1.8])
    min_view_distance: float = 0.8
    light_energy: list[float] = field(default_factory=lambda: [80.0, 300.0])
    n_lights: list[int] = field(default_factory=lambda: [1, 2])

    family = "primitives_room"
    _wall = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self.room_size = _check_range("room_size", self.room_size, low=1.0)
        self.room_height = _check_range("room_height", self.room_height, low=1.0)
        self.n_furniture = _check_range("n_furniture", self.n_furniture, low=0, high=50, integer=True)
        self.furniture_size = _check_range("furniture_size", self.furniture_size, low=0.05)
        self.n_objects = _check_range("n_objects", self.n_objects, low=0, high=100, integer=True)
        self.camera_height = _check_range("camera_height", self.camera_height, low=0.05)
        _check_scalar("min_view_distance", self.min_view_distance, low=0.0)
        if self.camera_height[1] >= self.room_height[0]:
            raise SceneConfigError(f"scene.camera_height: max {self.camera_height[1]} m is not below the lowest "
                                   f"ceiling (scene.room_height min {self.room_height[0]} m)")
        if self.n_furniture[1] == 0 and self.n_objects[1] == 0:
            raise SceneConfigError("scene.n_objects: a room with no furniture and no objects has nothing to "
                                   "look at")

    def _sample(self, rng, *, width, height, seed) -> SceneSpec:
        size_x, size_y = rng.uniform(*self.room_size, size=2)
        room_h = rng.uniform(*self.room_height)
        t = self._wall
        shell = {
            "floor": ((0.0, 0.0, -t / 2), (size_x, size_y, t)),
            "ceiling": ((0.0, 0.0, room_h + t / 2), (size_x, size_y, t)),
            "wall_x0": ((-(size_x + t) / 2, 0.0, room_h / 2), (t, size_y, room_h)),
            "wall_x1": (((size_x + t) / 2, 0.0, room_h / 2), (t, size_y, room_h)),
            "wall_y0": ((0.0, -(size_y + t) / 2, room_h / 2), (size_x + 2 * t, t, room_h)),
            "wall_y1": ((0.0, (size_y + t) / 2, room_h / 2), (size_x + 2 * t, t, room_h)),
        }
        objects = [
            ObjectSpec(name=name, shape=Shape(source="primitive", name="cube"), category_id=BACKGROUND_CATEGORY,
                       location=loc, rotation=(0.0, 0.0, 0.0), size=dims,
                       material=self._shell_material(rng, name))
            for name, (loc, dims) in shell.items()
        ]

        footprints, furniture = self._furniture(rng, size_x, size_y, room_h)
        objects += furniture + self._wall_decor(rng, size_x, size_y, room_h)

        clutter = self._clutter(rng, furniture, size_x, size_y)
        objects += clutter
        return self._finish_room(rng, objects, furniture, clutter, footprints, size_x, size_y, room_h,
                                 width=width, height=height, seed=seed)

    def _shell_material(self, rng, name: str) -> Material:
        return self._material(rng, textured_prob=0.9)

    def _wall_decor(self, rng, size_x, size_y, room_h) -> list[ObjectSpec]:
        return []

    def _furniture(self, rng, size_x, size_y, room_h) -> tuple[list, list[ObjectSpec]]:
        """Axis-aligned boxes with non-overlapping footprints, often against a wall; (footprints, objects)."""
        footprints: list[tuple[float, float, float, float]] = []  # x0, y0, x1, y1
        furniture: list[ObjectSpec] = []
        for i in range(int(rng.integers(self.n_furniture[0], self.n_furniture[1] + 1))):
            for _ in range(self.max_tries):
                w, d, h = rng.uniform(*self.furniture_size, size=3)
                h = min(h, room_h * 0.6)
                side = int(rng.integers(4)) if rng.uniform() < 0.6 else -1  # against a wall, or free
                if side >= 2:
                    w, d = d, w
                if w >= size_x or d >= size_y:
                    continue  # larger than this room (scene.furniture_size vs scene.room_size): another draw
                if side >= 0:
                    x = rng.uniform(-size_x / 2 + w / 2, size_x / 2 - w / 2) if side >= 2 else \
                        (-1) ** side * (size_x / 2 - w / 2 - 0.02)
                    y = rng.uniform(-size_y / 2 + d / 2, size_y / 2 - d / 2) if side < 2 else \
                        (-1) ** side * (size_y / 2 - d / 2 - 0.02)
                else:
                    x = rng.uniform(-size_x / 2 + w / 2, size_x / 2 - w / 2)
                    y = rng.uniform(-size_y / 2 + d / 2, size_y / 2 - d / 2)
                box = (x - w / 2, y - d / 2, x + w / 2, y + d / 2)
                if all(_disjoint(box, other, gap=0.1) for other in footprints):
                    footprints.append(box)
                    furniture.append(ObjectSpec(
                        name=f"furniture_{i:02d}", shape=Shape(source="primitive", name="cube"),
                        category_id=FURNITURE_CATEGORY, location=(float(x), float(y), float(h / 2)),
                        rotation=(0.0, 0.0, 0.0), size=(float(w), float(d), float(h)),
                        material=self._material(rng)))
                    break
        return footprints, furniture

    def _support_top(self, furniture: ObjectSpec) -> float | None:
        """Height of a furniture piece's top surface, or None when nothing can stand on it."""
        return furniture.size[2]

    def _clutter(self, rng, furniture: list[ObjectSpec], size_x, size_y) -> list[ObjectSpec]:
        clutter: list[ObjectSpec] = []
        for i in range(int(rng.integers(self.n_objects[0], self.n_objects[1] + 1))):
            shape, category, size = self._draw_object(rng)
            radius = _footprint_radius(shape, size)
            tops = [f for f in furniture if self._support_top(f) is not None and min(f.size[:2]) > 2 * radius]
            if tops and rng.uniform() < 0.7:
                top = tops[int(rng.integers(len(tops)))]
                x = top.location[0] + rng.uniform(-1, 1) * (top.size[0] / 2 - radius)
                y = top.location[1] + rng.uniform(-1, 1) * (top.size[1] / 2 - radius)
                support = self._support_top(top)
            else:
                x = rng.uniform(-size_x / 2 + radius, size_x / 2 - radius)
                y = rng.uniform(-size_y / 2 + radius, size_y / 2 - radius)
                support = 0.0
            clutter.append(ObjectSpec(
                name=f"object_{i:02d}", shape=shape, category_id=category, location=(float(x), float(y), 0.0),
                rotation=(0.0, 0.0, float(rng.uniform(-math.pi, math.pi))), size=size,
                material=self._object_material(rng, shape), support_z=float(support)))
        return clutter

    def _finish_room(self, rng, objects, furniture, clutter, footprints, size_x, size_y, room_h, *, width, height,
                     seed) -> SceneSpec:
        lights = []
        for _ in range(int(rng.integers(self.n_lights[0], self.n_lights[1] + 1))):
            eye = np.array([rng.uniform(-0.35, 0.35) * size_x, rng.uniform(-0.35, 0.35) * size_y, room_h - 0.05])
            lights.append(Light(type="AREA", location=tuple(float(v) for v in eye), rotation=(0.0, 0.0, 0.0),
                                energy=float(rng.uniform(*self.light_energy)), color=self._light_color(rng),
                                size=float(rng.uniform(0.5, 1.5))))

        looks = [(np.array([o.location[0], o.location[1], (o.support_z or 0.0) + _rest_height(o)]))
                 for o in clutter] + [_centre(f) for f in furniture]
        fov = self._draw_fov(rng)
        poses = [self._camera_pose(rng, looks, footprints, size_x, size_y, width, height, fov)
                 for _ in range(self.views)]
        return SceneSpec(family=self.family, seed=seed, objects=objects, lights=lights, world=self._world(rng),
                         camera=Camera(fov_deg=fov, poses=poses), categories=self.categories)

    def _camera_pose(self, rng, looks, footprints, size_x, size_y, width, height, fov) -> list[list[float]]:
        margin = 0.3
        for _ in range(self.max_tries):
            target = looks[int(rng.integers(len(looks)))]
            eye = np.array([rng.uniform(-size_x / 2 + margin, size_x / 2 - margin),
                            rng.uniform(-size_y / 2 + margin, size_y / 2 - margin),
                            rng.uniform(*self.camera_height)])
            inside_furniture = any(x0 - 0.2 < eye[0] < x1 + 0.2 and y0 - 0.2 < eye[1] < y1 + 0.2
                                   for x0, y0, x1, y1 in footprints)
            if inside_furniture or np.linalg.norm(eye - target) < self.min_view_distance:
                continue
            pose = look_at(eye, target, self._roll(rng))
            if in_view(pose, target[None], fov, width, height, self.view_margin).all():
                return pose.tolist()
        raise SceneSamplingError(
            f"no camera pose inside the room after scene.max_tries={self.max_tries} tries keeps an object in "
            f"view at least scene.min_view_distance={self.min_view_distance} m away; reduce min_view_distance "
            f"or scene.n_furniture, or enlarge scene.room_size"
        )


def _centre(obj: ObjectSpec) -> np.ndarray:
    """Bounding-box centre of a free-standing object (catalogue assets stand on the floor: location z is 0)."""
    if obj.support_z is not None:
        return np.array([obj.location[0], obj.location[1], obj.support_z + _rest_height(obj)])
    return np.array(obj.location, dtype=float)


def _footprint_radius(shape: Shape, size) -> float:
    """Radius of the disk that holds an object's footprint under any yaw."""
    return math.hypot(size[0], size[1]) / 2 if shape.fit == "box" else max(size) / 2


def _rest_height(obj: ObjectSpec) -> float:
    """Height of an upright object's bounding-box centre above its support."""
    return obj.size[2] / 2 if obj.shape.fit == "box" else max(obj.size) / 2


def _disjoint(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def scene_seed(seed: int, scene_index: int) -> int:
    """Seed of one scene, independent of how scenes are split into shards or processes."""
    return int(np.random.SeedSequence(entropy=seed, spawn_key=(scene_index,)).generate_state(1)[0])
