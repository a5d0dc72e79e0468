"""The realistic scene families: scanned objects on a textured table under an HDR sky, furnished rooms.

:class:`ScannedTabletopScene` and :class:`FurnishedRoomScene` extend the primitive samplers of
:mod:`synth.sampling` with assets of the catalogue (:mod:`synth.assets`: Sweet Home 3D furniture, Google Scanned
Objects, photographic textures and backdrops, Blender's HDR maps) and the domain-randomisation knobs of
:class:`RealisticOptions`. Like every sampler they are pure data: the same seed and config give the same spec.
"""

import math
from dataclasses import dataclass, field

import numpy as np

from synth.sampling import RoomScene, TabletopScene, _check_range, _check_scalar, _disjoint, _footprint_radius
from synth.scene import Material, ObjectSpec, SceneConfigError, Shape, World

#: Largest side of a catalogue asset drawn as table-top clutter, metres.
MAX_CLUTTER_SIZE = 0.4


@dataclass(kw_only=True)
class RealisticOptions:
    """Asset and domain-randomisation knobs shared by the realistic families (defaults in brackets).

    Args:
        asset_sources: Catalogue sources drawn from (see :mod:`synth.assets`); a missing one is a one-line error
            naming the package to install.
        asset_dir: Optional user folder of meshes (``<category>/<file>``) and ``textures/*.png|jpg``.
        strict_assets: Refuse a user folder with a file that does not load (default: skip, name and count it).
        cache_dir: Catalogue cache (default ``$SYNTH2REAL_CACHE`` or ``~/.cache/synth2real``).
        fov_range_deg: Field of view drawn per scene, degrees ([45, 65]).
        texture_swap_prob: Probability that an asset's own material is replaced by a photographic texture
            (material randomisation, [0.15]).
        hdri_strength: Range of the HDR environment map's strength ([0.6, 1.6]).
        hdri_rotation_deg: Range of its rotation about the vertical axis ([0, 360]).
        light_tint: Largest saturation of a light's colour (0 = white, [0.3]).
    """

    asset_sources: list[str] = field(default_factory=list)
    asset_dir: str | None = None
    strict_assets: bool = False
    cache_dir: str | None = None
    fov_range_deg: list[float] = field(default_factory=lambda: [45.0, 65.0])
    texture_swap_prob: float = 0.15
    hdri_strength: list[float] = field(default_factory=lambda: [0.6, 1.6])
    hdri_rotation_deg: list[float] = field(default_factory=lambda: [0.0, 360.0])
    light_tint: float = 0.3

    _draws_assets = True

    def _init_assets(self, pools: dict[str, tuple[str, ...]], required: tuple[str, ...]) -> None:
        from synth.assets import ALL_SOURCES, ASSET_CLASSES, AssetError, load_catalogue

        if not isinstance(self.asset_sources, list | tuple) or not all(isinstance(s, str) for s in self.asset_sources):
            raise SceneConfigError(f"scene.asset_sources: expected a list of source names, got {self.asset_sources!r}")
        unknown = sorted(set(self.asset_sources) - set(ALL_SOURCES))
        if unknown:
            raise SceneConfigError(f"scene.asset_sources: unknown source(s) {unknown}; choose from {list(ALL_SOURCES)}")
        self.fov_range_deg = _check_range("fov_range_deg", self.fov_range_deg, low=1.0, high=170.0)
        _check_scalar("texture_swap_prob", self.texture_swap_prob, low=0.0, high=1.0)
        self.hdri_strength = _check_range("hdri_strength", self.hdri_strength, low=0.0)
        self.hdri_rotation_deg = _check_range("hdri_rotation_deg", self.hdri_rotation_deg, low=-360.0, high=720.0)
        _check_scalar("light_tint", self.light_tint, low=0.0, high=1.0)
        try:
            catalogue = load_catalogue(self.asset_sources, cache_dir=self.cache_dir, user_dir=self.asset_dir,
                                       strict=self.strict_assets)
            for source in required:
                if source in self.asset_sources:
                    catalogue.require(source)
        except AssetError as error:
            raise SceneConfigError(f"scene.asset_sources: {error}") from None
        self._catalogue = catalogue
        self._pools = {}
        for name, classes in pools.items():
            pool = catalogue.meshes(classes)
            if name == "objects":  # table-top sized: a laundry basket or a crate is not clutter
                pool = [a for a in pool if max(a.size) <= MAX_CLUTTER_SIZE]
            pool += [a for a in catalogue.assets if a.source == "user" and not a.transparent and name == "objects"
                     and a.category not in classes]
            if not pool:
                raise SceneConfigError(f"scene.asset_sources: no {name} ({', '.join(classes)}) in the sources "
                                       f"{list(self.asset_sources)}; install {catalogue.missing or 'more sources'}")
            self._pools[name] = pool
        self._textures = catalogue.images_of("texture")
        self._hdris = catalogue.images_of("hdri")
        self._photos = catalogue.images_of("photo")
        extra = sorted({a.category for a in catalogue.assets if a.category not in ASSET_CLASSES})
        self._category_ids = {name: i for i, name in enumerate(("background", *ASSET_CLASSES, *extra))}

    @property
    def categories(self) -> dict[int, str]:
        return {i: name for name, i in self._category_ids.items()}

    def _draw_fov(self, rng) -> float:
        return float(rng.uniform(*self.fov_range_deg))

    def _asset_object(self, rng, pool: str, scale: tuple[float, float] = (0.9, 1.1)):
        asset = self._pools[pool][int(rng.integers(len(self._pools[pool])))]
        factor = rng.uniform(*scale)
        size = tuple(float(v * factor) for v in asset.size)
        shape = Shape(source="asset", name=self._catalogue.local_file(asset), up_axis=asset.up_axis, fit="box")
        return asset, shape, self._category_ids[asset.category], size

    def _photo_material(self, rng, roles: tuple[str, ...] | None = None, tile: tuple[float, float] = (0.5, 1.5),
                        roughness: tuple[float, float] = (0.3, 0.9)) -> Material:
        """A Principled material whose base colour is a photographic texture (``roles`` preferred)."""
        pool = [t for t in self._textures if roles is None or t.role in roles] or self._textures
        if not pool:
            return self._material(rng)
        image = pool[int(rng.integers(len(pool)))]
        tint = self._color(rng, saturation=(0.0, 0.15), value=(0.85, 1.0))
        return Material(base_color=tint, roughness=float(rng.uniform(*roughness)), metallic=0.0,
                        image=image.file, image_scale=float(rng.uniform(*tile)))

    def _object_material(self, rng, shape: Shape) -> Material | None:
        if shape.source != "asset":
            return self._material(rng)
        return self._photo_material(rng, ("wood", "other")) if rng.uniform() < self.texture_swap_prob else None

    def _hdri_world(self, rng) -> World:
        hdri = self._hdris[int(rng.integers(len(self._hdris)))].file if self._hdris else None
        return World(color=self._color(rng, saturation=(0.0, 0.3), value=(0.3, 1.0)),
                     strength=float(rng.uniform(*self.hdri_strength)), hdri=hdri,
                     rotation=math.radians(rng.uniform(*self.hdri_rotation_deg)))

    def _light_color(self, rng) -> tuple[float, float, float]:
        tint = self._color(rng, saturation=(0.0, self.light_tint), value=(1.0, 1.0))
        return tuple(float(c) for c in tint)


@dataclass(kw_only=True)
class ScannedTabletopScene(RealisticOptions, TabletopScene):
    """Scanned household objects (Google Scanned Objects, Sweet Home 3D kitchenware) on a photo-textured table,
    lit by an HDR environment map and a few lights; every :class:`TabletopScene` knob applies.

    Objects keep their real sizes (times ``object_scale``) and their own textures (or, with
    ``texture_swap_prob``, a photographic one); the table top is a photographic wood, floor or tile texture.
    """

    asset_sources: list[str] = field(default_factory=lambda: ["gso", "sweethome3d", "blender_hdri",
                                                              "libero_textures"])
    object_scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    n_lights: list[int] = field(default_factory=lambda: [1, 2])
    light_energy: list[float] = field(default_factory=lambda: [20.0, 150.0])
    spread: float = 0.3
    camera_distance: list[float] = field(default_factory=lambda: [0.7, 1.3])
    shapes: list[str] = field(default_factory=list)

    family = "tabletop"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.object_scale = _check_range("object_scale", self.object_scale, low=0.05, high=10.0)
        from synth.assets import TABLETOP_CLASSES

        self._init_assets({"objects": TABLETOP_CLASSES}, required=("gso", "blender_hdri"))

    def _draw_object(self, rng):
        _, shape, category, size = self._asset_object(rng, "objects", tuple(self.object_scale))
        return shape, category, size

    def _support_material(self, rng) -> Material:
        return self._photo_material(rng, ("wood", "floor"), tile=(0.4, 1.2))

    def _world(self, rng) -> World:
        return self._hdri_world(rng)


@dataclass(kw_only=True)
class FurnishedRoomScene(RealisticOptions, RoomScene):
    """A room furnished with Sweet Home 3D models (chairs, tables, sofas, beds, cabinets, lamps, plants) standing on
    the floor without interpenetration, most against a wall facing into the room, kitchenware and scanned objects on
    tables and cabinets, photographs framed on the walls, photographic floor, wall and ceiling materials, ceiling
    area lights; several views per room from eye height.

    Args:
        wall_furniture_prob: Probability that a piece stands against a wall (facing into the room).
        n_pictures: Range of framed photographs on the walls (category ``picture``).
    """

    asset_sources: list[str] = field(default_factory=lambda: ["sweethome3d", "gso", "libero_textures",
                                                              "wallpapers"])
    n_furniture: list[int] = field(default_factory=lambda: [3, 6])
    n_objects: list[int] = field(default_factory=lambda: [2, 5])
    wall_furniture_prob: float = 0.7
    n_pictures: list[int] = field(default_factory=lambda: [0, 2])
    camera_height: list[float] = field(default_factory=lambda: [1.2, 1.7])
    light_energy: list[float] = field(default_factory=lambda: [40.0, 160.0])
    room_size: list[float] = field(default_factory=lambda: [3.5, 5.5])
    shapes: list[str] = field(default_factory=list)

    family = "room"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_scalar("wall_furniture_prob", self.wall_furniture_prob, low=0.0, high=1.0)
        self.n_pictures = _check_range("n_pictures", self.n_pictures, low=0, high=8, integer=True)
        from synth.assets import FURNITURE_CLASSES, TABLETOP_CLASSES

        self._init_assets({"furniture": FURNITURE_CLASSES, "objects": TABLETOP_CLASSES},
                          required=("sweethome3d",))

    def _draw_object(self, rng):
        _, shape, category, size = self._asset_object(rng, "objects")
        return shape, category, size

    def _shell_material(self, rng, name: str) -> Material:
        if name == "floor":
            return self._photo_material(rng, ("floor", "wood"), tile=(0.6, 2.0))
        if name == "ceiling":
            return Material(base_color=self._color(rng, saturation=(0.0, 0.05), value=(0.85, 1.0)),
                            roughness=0.9, metallic=0.0)
        # Walls: one texture for the room (drawn once, on the first wall), for coherence.
        if name == "wall_x0" or not hasattr(self, "_wall_cache"):
            self._wall_cache = self._photo_material(rng, ("wall",), tile=(0.8, 2.5))
        return self._wall_cache

    def _world(self, rng) -> World:
        # The room is closed: an environment map would light nothing, so the world is a dim uniform colour.
        return World(color=(1.0, 1.0, 1.0), strength=float(rng.uniform(0.05, 0.2)))

    def _support_top(self, furniture: ObjectSpec) -> float | None:
        top = self._tops.get(furniture.name)
        return None if top is None else furniture.size[2] * top

    def _furniture(self, rng, size_x, size_y, room_h):
        footprints: list[tuple[float, float, float, float]] = []
        furniture: list[ObjectSpec] = []
        self._tops: dict[str, float] = {}
        clearance, gap = 0.03, 0.15  # off the wall; between pieces
        for i in range(int(rng.integers(self.n_furniture[0], self.n_furniture[1] + 1))):
            for _ in range(self.max_tries):
                asset, shape, category, size = self._asset_object(rng, "furniture")
                w, d, h = size
                if h > room_h - 0.05 or max(w, d) > min(size_x, size_y) - 0.6:
                    continue
                if rng.uniform() < self.wall_furniture_prob:
                    side = int(rng.integers(4))  # 0: wall x0 (-x), 1: x1 (+x), 2: y0 (-y), 3: y1 (+y)
                    # The model's front faces -y after import: turn it to face into the room.
                    yaw = (-math.pi / 2, math.pi / 2, math.pi, 0.0)[side]
                    fw, fd = (d, w) if side < 2 else (w, d)
                    if side < 2:
                        x = (-1) ** (side + 1) * (size_x / 2 - fw / 2 - clearance)
                        y = rng.uniform(-size_y / 2 + fd / 2, size_y / 2 - fd / 2)
                    else:
                        x = rng.uniform(-size_x / 2 + fw / 2, size_x / 2 - fw / 2)
                        y = (-1) ** (side + 1) * (size_y / 2 - fd / 2 - clearance)
                else:
                    yaw = float(rng.integers(4)) * math.pi / 2
                    fw, fd = (d, w) if round(yaw / (math.pi / 2)) % 2 else (w, d)
                    x = rng.uniform(-size_x / 2 + fw / 2 + 0.3, size_x / 2 - fw / 2 - 0.3)
                    y = rng.uniform(-size_y / 2 + fd / 2 + 0.3, size_y / 2 - fd / 2 - 0.3)
                box = (x - fw / 2, y - fd / 2, x + fw / 2, y + fd / 2)
                if all(_disjoint(box, other, gap=gap) for other in footprints):
                    footprints.append(box)
                    name = f"furniture_{i:02d}"
                    furniture.append(ObjectSpec(
                        name=name, shape=shape, category_id=category, location=(float(x), float(y), 0.0),
                        rotation=(0.0, 0.0, float(yaw)), size=size, material=self._object_material(rng, shape),
                        support_z=0.0))
                    if asset.category in ("table", "cabinet"):
                        self._tops[name] = asset.top or 1.0
                    break
        return footprints, furniture

    def _clutter(self, rng, furniture, size_x, size_y) -> list[ObjectSpec]:
        # Only on top of tables and cabinets (the floor of a room is not where kitchenware lives).
        clutter: list[ObjectSpec] = []
        tops = [f for f in furniture if f.name in self._tops]
        for i in range(int(rng.integers(self.n_objects[0], self.n_objects[1] + 1)) if tops else 0):
            shape, category, size = self._draw_object(rng)
            radius = _footprint_radius(shape, size)
            top = tops[int(rng.integers(len(tops)))]
            half = np.abs(np.array(_yawed(top.size, top.rotation[2]))[:2]) / 2 - radius
            if (half <= 0).any():
                continue
            x = top.location[0] + rng.uniform(-1, 1) * half[0]
            y = top.location[1] + rng.uniform(-1, 1) * half[1]
            if any(np.hypot(x - o.location[0], y - o.location[1]) < radius + _footprint_radius(o.shape, o.size)
                   for o in clutter):
                continue
            clutter.append(ObjectSpec(
                name=f"object_{i:02d}", shape=shape, category_id=category, location=(float(x), float(y), 0.0),
                rotation=(0.0, 0.0, float(rng.uniform(-math.pi, math.pi))), size=size,
                material=self._object_material(rng, shape), support_z=float(self._support_top(top))))
        return clutter

    def _wall_decor(self, rng, size_x, size_y, room_h) -> list[ObjectSpec]:
        pictures = []
        if not self._photos:
            return pictures
        for i in range(int(rng.integers(self.n_pictures[0], self.n_pictures[1] + 1))):
            photo = self._photos[int(rng.integers(len(self._photos)))]
            width = float(rng.uniform(0.5, 1.1))
            height = width / max(photo.aspect, 0.3)
            side = int(rng.integers(4))
            wall_len = size_y if side < 2 else size_x
            along = rng.uniform(-wall_len / 2 + width / 2 + 0.1, wall_len / 2 - width / 2 - 0.1)
            z = float(min(rng.uniform(1.3, 1.7), room_h - height / 2 - 0.1))
            t = 0.015
            if side < 2:
                loc, dims = ((-1) ** (side + 1) * (size_x / 2 - t / 2), along, z), (t, width, height)
            else:
                loc, dims = (along, (-1) ** (side + 1) * (size_y / 2 - t / 2), z), (width, t, height)
            pictures.append(ObjectSpec(
                name=f"picture_{i:02d}", shape=Shape(source="primitive", name="cube"),
                category_id=self._category_ids["picture"], location=tuple(float(v) for v in loc), rotation=(0, 0, 0),
                size=tuple(float(v) for v in dims),
                material=Material(base_color=(1.0, 1.0, 1.0), roughness=0.4, metallic=0.0, image=photo.file,
                                  image_scale=0.0)))
        return pictures


def _yawed(size, yaw: float) -> tuple[float, float, float]:
    """Axis-aligned footprint size of a box turned by a multiple of 90 degrees about z."""
    quarter = round(yaw / (math.pi / 2)) % 2
    return (size[1], size[0], size[2]) if quarter else tuple(size)
