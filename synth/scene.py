"""Scene specs: what to render, as plain JSON-able dataclasses (no Blender here).

A :class:`SceneSpec` fully describes one scene (objects, materials, lights, world, camera poses), so any
rendered frame can be re-rendered from the JSON written next to it. Specs are produced by the seeded
samplers in :mod:`synth.sampling` and turned into Blender objects by :mod:`render.builder`, the only place
that knows about ``bpy`` (the Kubric split: the scene is data, the renderer is a view of it).

Conventions:
    * World frame: metres, z up. The support plane or floor is at ``z = 0``.
    * Camera poses are 4x4 camera-to-world matrices in Blender's camera convention (the camera looks down
      its local -z axis, local +y is up), as ``bproc.camera.add_camera_pose`` takes them.
    * Every mesh is normalised by the renderer so its bounding box is centred at the origin with largest
      side 1; ``ObjectSpec.size`` then scales it per axis, in metres.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from synth.io import atomic_write_text
from synth.meshes import PROCEDURAL_SHAPES, MeshDeform

#: Blender primitives that BlenderProc's ``create_primitive`` builds.
PRIMITIVE_SHAPES = ("cube", "sphere", "cylinder", "cone", "monkey")
#: Procedural textures that the renderer wires into the material's base colour.
TEXTURE_KINDS = ("noise", "voronoi", "checker", "wave", "magic")
LIGHT_TYPES = ("POINT", "SUN", "SPOT", "AREA")

BACKGROUND_CATEGORY = 0
#: Fixed category ids: 0 is the background (support plane, floor, walls), then room furniture, then every
#: built-in shape. Categories of user meshes are appended after these (see :func:`category_table`).
BUILTIN_CATEGORIES = ("background", "furniture", *PRIMITIVE_SHAPES, *PROCEDURAL_SHAPES)


class SceneConfigError(ValueError):
    """A scene config value is invalid; the message names the key."""


class SceneSamplingError(RuntimeError):
    """A valid-looking config asks for something impossible (e.g. a camera that keeps every object in view)."""


def category_table(extra: tuple[str, ...] = ()) -> dict[int, str]:
    """Category id -> name: the built-in categories, then ``extra`` names (user meshes) in sorted order."""
    names = list(BUILTIN_CATEGORIES) + sorted(set(extra) - set(BUILTIN_CATEGORIES))
    return dict(enumerate(names))


@dataclass
class Texture:
    """A procedural texture mixed into the base colour (Blender shader node ``ShaderNodeTex<Kind>``).

    Args:
        kind: One of :data:`TEXTURE_KINDS`.
        scale: Texture coordinate scale (higher is finer).
        color: Second colour, RGB in [0, 1]; the texture blends between it and the base colour.
        detail: Noise detail / wave distortion, depending on ``kind``.
    """

    kind: str
    scale: float
    color: tuple[float, float, float]
    detail: float = 2.0


@dataclass
class Material:
    """A Principled BSDF material.

    Args:
        image: A photograph (path) used as the base colour instead of ``base_color``/``texture``, box-projected in
            object space.
        image_scale: Side of one image tile in metres (0: one copy stretched over each face, as for a framed
            photograph).
    """

    base_color: tuple[float, float, float]
    roughness: float
    metallic: float
    texture: Texture | None = None
    image: str | None = None
    image_scale: float = 1.0


@dataclass
class Shape:
    """Where an object's mesh comes from.

    Args:
        source: ``"primitive"`` (Blender primitive), ``"procedural"`` (open3d generator, see
            :mod:`synth.meshes`), ``"file"`` (a user mesh loaded through BlenderProc's loaders) or ``"asset"`` (a
            catalogue mesh, :mod:`synth.assets`, which keeps its own textured materials).
        name: Primitive or procedural shape name, or the mesh file's absolute path.
        deform: Deformation of a procedural mesh.
        up_axis: Up axis of a mesh file: ``"Y"`` (Y-up OBJ, e.g. Sweet Home 3D) or ``"Z"`` (Z-up, e.g. GSO).
        fit: ``"unit"``: the largest side of the mesh is scaled to 1, then ``ObjectSpec.size`` scales each axis;
            ``"box"``: the bounding box is scaled to exactly ``ObjectSpec.size`` (metres), as for catalogue assets
            whose real size is known.
    """

    source: str
    name: str
    deform: MeshDeform | None = None
    up_axis: str = "Z"
    fit: str = "unit"


@dataclass
class ObjectSpec:
    """One object of the scene.

    Args:
        name: Unique name within the scene.
        shape: The mesh.
        category_id: Category id, written to the instance and COCO labels.
        location: Bounding-box centre ``(x, y, z)`` in metres; when ``support_z`` is set, ``z`` is instead the
            gap between the rotated object's lowest point and the support (0 = resting on it).
        rotation: XYZ Euler angles in radians.
        size: Per-axis size in metres of the normalised (unit bounding box) mesh.
        material: Surface material; ``None`` keeps a catalogue asset's own (textured) materials.
        support_z: Height of the surface the object stands on, or ``None`` for free placement.
        physics: ``"active"`` (falls and settles), ``"passive"`` (collider) or ``"none"``.
    """

    name: str
    shape: Shape
    category_id: int
    location: tuple[float, float, float]
    rotation: tuple[float, float, float]
    size: tuple[float, float, float]
    material: Material | None
    support_z: float | None = None
    physics: str = "none"


@dataclass
class Light:
    """A Blender light; ``energy`` in watts (irradiance in W/m² for ``SUN``)."""

    type: str
    location: tuple[float, float, float]
    rotation: tuple[float, float, float]
    energy: float
    color: tuple[float, float, float]
    size: float = 0.5


@dataclass
class World:
    """World background: a uniform colour, or an HDR environment map, and its strength (also the ambient light).

    Args:
        color: Background colour (used when ``hdri`` is None).
        strength: Background strength.
        hdri: Path of an equirectangular HDR map (``.exr``/``.hdr``) lighting the scene, or None.
        rotation: Rotation of the map about the world z axis, radians.
    """

    color: tuple[float, float, float]
    strength: float
    hdri: str | None = None
    rotation: float = 0.0


@dataclass
class Camera:
    """Pinhole camera: field of view along the larger image side, and one pose per view.

    Args:
        fov_deg: Field of view in degrees (Blender's ``lens_unit="FOV"``, sensor fit ``AUTO``).
        poses: Camera-to-world 4x4 matrices, Blender convention, as nested lists.
    """

    fov_deg: float
    poses: list[list[list[float]]]


@dataclass
class SceneSpec:
    """Everything needed to render one scene deterministically."""

    family: str
    seed: int
    objects: list[ObjectSpec]
    lights: list[Light]
    world: World
    camera: Camera
    categories: dict[int, str]
    physics: bool = False
    physics_max_time: float = 2.0

    @property
    def n_views(self) -> int:
        return len(self.camera.poses)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SceneSpec":
        def material(d: dict | None) -> Material | None:
            if d is None:
                return None
            texture = d.get("texture")
            return Material(**{
                **d, "base_color": tuple(d["base_color"]),
                "texture": None if texture is None else Texture(**{**texture, "color": tuple(texture["color"])}),
            })

        def shape(d: dict) -> Shape:
            deform = d.get("deform")
            if deform is not None:
                deform = MeshDeform(**{k: tuple(v) if isinstance(v, list) else v for k, v in deform.items()})
            return Shape(**{**d, "deform": deform})

        objects = [
            ObjectSpec(
                **{
                    **o,
                    "shape": shape(o["shape"]),
                    "material": material(o["material"]),
                    "location": tuple(o["location"]),
                    "rotation": tuple(o["rotation"]),
                    "size": tuple(o["size"]),
                }
            )
            for o in data["objects"]
        ]
        lights = [
            Light(**{**li, "location": tuple(li["location"]), "rotation": tuple(li["rotation"]),
                     "color": tuple(li["color"])})
            for li in data["lights"]
        ]
        return cls(
            family=data["family"],
            seed=data["seed"],
            objects=objects,
            lights=lights,
            world=World(**{**data["world"], "color": tuple(data["world"]["color"])}),
            camera=Camera(fov_deg=data["camera"]["fov_deg"], poses=data["camera"]["poses"]),
            # JSON turns int keys into strings.
            categories={int(k): v for k, v in data["categories"].items()},
            physics=data["physics"],
            physics_max_time=data["physics_max_time"],
        )

    @classmethod
    def from_json(cls, text: str) -> "SceneSpec":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write the spec as JSON atomically (temporary name, then rename)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SceneSpec":
        with open(path) as f:
            return cls.from_json(f.read())


__all__ = [
    "BACKGROUND_CATEGORY",
    "BUILTIN_CATEGORIES",
    "LIGHT_TYPES",
    "PRIMITIVE_SHAPES",
    "TEXTURE_KINDS",
    "Camera",
    "Light",
    "Material",
    "ObjectSpec",
    "SceneConfigError",
    "SceneSamplingError",
    "SceneSpec",
    "Shape",
    "Texture",
    "World",
    "category_table",
    "field",
]
