"""Turn a :class:`synth.scene.SceneSpec` into a Blender scene through BlenderProc, one small method per asset type.

This is the Kubric ``renderer/blender.py`` role: the spec is data, and only this module (with
:mod:`render.bproc_env` and :mod:`render.worker`) touches ``bpy``.
"""

import math
from types import SimpleNamespace

import numpy as np

from synth.meshes import procedural_mesh
from synth.scene import Light, Material, ObjectSpec, SceneSpec, World

_TEXTURE_NODES = {
    "noise": "ShaderNodeTexNoise",
    "voronoi": "ShaderNodeTexVoronoi",
    "checker": "ShaderNodeTexChecker",
    "wave": "ShaderNodeTexWave",
    "magic": "ShaderNodeTexMagic",
}
# Texture inputs that the spec's ``detail`` drives, per texture kind.
_DETAIL_INPUTS = {"noise": "Detail", "wave": "Distortion", "magic": "Distortion", "voronoi": "Randomness"}
#: Blender's sensor fit for every camera; render.labels.intrinsics must be given the same.
CAMERA_SENSOR_FIT = "AUTO"
_PRIMITIVES = {"cube": "CUBE", "sphere": "SPHERE", "cylinder": "CYLINDER", "cone": "CONE", "monkey": "MONKEY"}


class SceneBuilder:
    """Builds scenes into the current Blender session; one instance per worker process.

    Args:
        bproc: The namespace returned by :func:`render.bproc_env.blenderproc`.
        width: Image width in pixels.
        height: Image height in pixels.
    """

    def __init__(self, bproc: SimpleNamespace, *, width: int, height: int):
        self.bp = bproc
        self.bpy = bproc.bpy
        self.width, self.height = width, height
        self._outputs_enabled = False
        self._normal_nodes: set[str] = set()

    # ------------------------------------------------------------------------------------------ scene

    def build(self, spec: SceneSpec, *, outputs: bool = True) -> list:
        """Replace the current scene with ``spec``; returns the BlenderProc mesh objects in spec order.

        Args:
            spec: The scene.
            outputs: Set up the depth, normal and segmentation outputs (False: colour only, as a bare loop).
        """
        self.bp.clean_up(clean_up_camera=False)
        self.bp.utility.reset_keyframes()
        objects = [self.add_object(o) for o in spec.objects]
        for light in spec.lights:
            self.add_light(light)
        self.set_world(spec.world)
        if spec.physics:
            # A sphere never counts as at rest: the simulated time is capped by the spec.
            self.bp.object.simulate_physics_and_fix_final_poses(
                min_simulation_time=min(0.5, spec.physics_max_time), max_simulation_time=spec.physics_max_time,
                check_object_interval=0.25)
        self.set_camera(spec)
        if outputs:
            self._enable_outputs()
        # Cycles' sampling pattern is seeded per scene, so the same spec gives the same pixels.
        self.bpy.context.scene.cycles.seed = spec.seed % (2**31)
        return objects

    def add_object(self, spec: ObjectSpec):
        obj = self._mesh(spec)
        obj.set_name(spec.name)
        extent = self._normalise(obj)
        if spec.shape.fit == "box":  # the bounding box becomes exactly spec.size (a catalogue asset's real size)
            obj.set_scale([s / max(e, 1e-9) for s, e in zip(spec.size, extent, strict=True)])
        else:
            obj.set_scale(list(spec.size))
        obj.set_rotation_euler(list(spec.rotation))
        if spec.support_z is None:
            obj.set_location(list(spec.location))
        else:
            obj.set_location([spec.location[0], spec.location[1], 0.0])
            self.bpy.context.view_layer.update()
            lowest = np.asarray(obj.get_bound_box())[:, 2].min()
            obj.set_location([spec.location[0], spec.location[1], spec.support_z + spec.location[2] - lowest])
        obj.set_cp("category_id", int(spec.category_id))
        # A catalogue asset keeps its own (textured) materials unless the spec swaps them; a user file keeps its own.
        keep = spec.shape.source == "file" or (spec.shape.source == "asset" and spec.material is None)
        if not keep or not obj.get_materials():
            material = spec.material or Material(base_color=(0.6, 0.6, 0.6), roughness=0.6, metallic=0.0)
            obj.clear_materials()
            obj.add_material(self.material(material, f"{spec.name}_material", size=spec.size))
        if spec.physics == "active":
            # Damping stops spheres rolling for ever: a settled pile is reproducible, a rolling ball is chaotic.
            obj.enable_rigidbody(active=True, collision_shape="CONVEX_HULL", mass=1.0, friction=0.9,
                                 angular_damping=0.6, linear_damping=0.3)
        elif spec.physics == "passive":
            obj.enable_rigidbody(active=False, collision_shape="BOX")
        return obj

    def _mesh(self, spec: ObjectSpec):
        shape = spec.shape
        if shape.source == "primitive":
            return self.bp.object.create_primitive(_PRIMITIVES[shape.name])
        if shape.source == "procedural":
            vertices, triangles = procedural_mesh(shape.name, shape.deform)
            mesh = self.bpy.data.meshes.new(spec.name)
            mesh.from_pydata(vertices.tolist(), [], triangles.tolist())
            mesh.validate()
            mesh.update()
            blender_obj = self.bpy.data.objects.new(spec.name, mesh)
            self.bpy.context.collection.objects.link(blender_obj)
            # Auto smooth (Blender >= 4.1 API): smooth shading except across edges sharper than 35 degrees.
            # BlenderProc's set_shading_mode("AUTO") needs an asset file the bpy wheel keeps elsewhere.
            mesh.shade_smooth()
            mesh.set_sharp_from_angle(angle=math.radians(35))
            return self.bp.types.MeshObject(blender_obj)
        if shape.source in ("file", "asset"):
            # Blender's OBJ importer turns Y-up files to Z-up by default; Z-up files (GSO) keep their axes.
            axes = {"forward_axis": "Y", "up_axis": "Z"} if shape.source == "asset" and shape.up_axis == "Z" else {}
            parts = self.bp.loader.load_obj(shape.name, **axes)
            if not parts:
                raise RuntimeError(f"BlenderProc loaded no mesh from {shape.name}")
            if len(parts) > 1:
                parts[0].join_with_other_objects(parts[1:])
            return parts[0]
        raise ValueError(f"unknown shape source {shape.source!r} for object {spec.name}")

    def _normalise(self, obj) -> np.ndarray:
        """Centre the mesh's bounding box at the origin and scale its largest side to 1 (in mesh data); returns the
        normalised bounding-box size."""
        from mathutils import Matrix

        mesh = obj.get_mesh()
        coords = np.empty(len(mesh.vertices) * 3)
        mesh.vertices.foreach_get("co", coords)
        coords = coords.reshape(-1, 3)
        low, high = coords.min(axis=0), coords.max(axis=0)
        scale = 1.0 / float(max((high - low).max(), 1e-9))
        centre = (low + high) / 2
        mesh.transform(Matrix.Diagonal((scale, scale, scale, 1.0)) @ Matrix.Translation(-centre))
        mesh.update()
        obj.set_location([0.0, 0.0, 0.0])
        obj.set_rotation_euler([0.0, 0.0, 0.0])
        obj.set_scale([1.0, 1.0, 1.0])
        return (high - low) * scale

    def material(self, spec: Material, name: str, size=(1.0, 1.0, 1.0)):
        """A Principled BSDF material: a photograph box-projected in object space (tiles of ``image_scale`` metres
        on an object of ``size``), or a procedural texture ramped between two colours, or a plain colour."""
        mat = self.bp.material.create(name)
        mat.set_principled_shader_value("Base Color", [*spec.base_color, 1.0])
        mat.set_principled_shader_value("Roughness", float(spec.roughness))
        mat.set_principled_shader_value("Metallic", float(spec.metallic))
        if spec.image is not None:
            image = self.bpy.data.images.load(spec.image, check_existing=True)
            texture = mat.new_node("ShaderNodeTexImage")
            texture.image = image
            texture.projection = "BOX"
            texture.projection_blend = 0.1
            coords, mapping = mat.new_node("ShaderNodeTexCoord"), mat.new_node("ShaderNodeMapping")
            # Object coordinates of the normalised mesh span [-0.5, 0.5]: scale them to tiles of image_scale metres
            # (0: one copy of the image on each face, offset so it starts at the face's corner).
            tiles = [s / spec.image_scale if spec.image_scale > 0 else 1.0 for s in size]
            mapping.inputs["Scale"].default_value = tiles
            mapping.inputs["Location"].default_value = [0.5 * t for t in tiles]
            mat.link(coords.outputs["Object"], mapping.inputs["Vector"])
            mat.link(mapping.outputs["Vector"], texture.inputs["Vector"])
            tint = mat.new_node("ShaderNodeMix")
            tint.data_type, tint.blend_type = "RGBA", "MULTIPLY"
            tint.inputs["Factor"].default_value = 1.0
            rgba = {(socket.name, socket.type): socket for socket in tint.inputs}
            rgba[("B", "RGBA")].default_value = (*spec.base_color, 1.0)
            mat.link(texture.outputs["Color"], rgba[("A", "RGBA")])
            result = next(socket for socket in tint.outputs if socket.type == "RGBA")
            bsdf = mat.get_the_one_node_with_type("BsdfPrincipled")
            mat.link(result, bsdf.inputs["Base Color"])
        elif spec.texture is not None:
            texture = mat.new_node(_TEXTURE_NODES[spec.texture.kind])
            texture.inputs["Scale"].default_value = spec.texture.scale
            detail = _DETAIL_INPUTS.get(spec.texture.kind)
            if detail is not None:
                value = spec.texture.detail / 8.0 if detail == "Randomness" else spec.texture.detail
                texture.inputs[detail].default_value = value
            ramp = mat.new_node("ShaderNodeValToRGB")
            ramp.color_ramp.elements[0].color = (*spec.base_color, 1.0)
            ramp.color_ramp.elements[1].color = (*spec.texture.color, 1.0)
            output = texture.outputs["Fac"] if "Fac" in texture.outputs else texture.outputs["Distance"]
            mat.link(output, ramp.inputs["Fac"])
            bsdf = mat.get_the_one_node_with_type("BsdfPrincipled")
            mat.link(ramp.outputs["Color"], bsdf.inputs["Base Color"])
        return mat

    def set_world(self, world: World) -> None:
        """A uniform background colour, or an HDR environment map rotated about z (built here rather than with
        BlenderProc's ``set_world_background_hdr_img``, which adds nodes on every call)."""
        if world.hdri is None:
            self.bp.renderer.set_world_background(list(world.color), strength=world.strength)
            return
        blender_world = self.bpy.context.scene.world
        blender_world.use_nodes = True
        tree = blender_world.node_tree
        tree.nodes.clear()
        output = tree.nodes.new("ShaderNodeOutputWorld")
        background = tree.nodes.new("ShaderNodeBackground")
        environment = tree.nodes.new("ShaderNodeTexEnvironment")
        environment.image = self.bpy.data.images.load(world.hdri, check_existing=True)
        mapping, coords = tree.nodes.new("ShaderNodeMapping"), tree.nodes.new("ShaderNodeTexCoord")
        mapping.inputs["Rotation"].default_value = (0.0, 0.0, float(world.rotation))
        tree.links.new(coords.outputs["Generated"], mapping.inputs["Vector"])
        tree.links.new(mapping.outputs["Vector"], environment.inputs["Vector"])
        tree.links.new(environment.outputs["Color"], background.inputs["Color"])
        background.inputs["Strength"].default_value = float(world.strength)
        tree.links.new(background.outputs["Background"], output.inputs["Surface"])

    def add_light(self, spec: Light):
        light = self.bp.types.Light(light_type=spec.type)
        light.set_location(list(spec.location))
        light.set_rotation_euler(list(spec.rotation))
        light.set_energy(spec.energy)
        light.set_color(list(spec.color))
        data = light.blender_obj.data
        if spec.type == "AREA":
            data.size = spec.size
        elif spec.type in ("POINT", "SPOT"):
            data.shadow_soft_size = 0.2 * spec.size
        return light

    def set_camera(self, spec: SceneSpec) -> None:
        self.bp.camera.set_resolution(self.width, self.height)
        self.bp.camera.set_intrinsics_from_blender_params(
            lens=math.radians(spec.camera.fov_deg), lens_unit="FOV", image_width=self.width,
            image_height=self.height, clip_start=0.01, clip_end=1000.0)
        # The spec's field of view spans the larger image side, which is Blender's AUTO sensor fit; the stored
        # cam_K (render.labels.intrinsics) follows the same rule, so pin it rather than rely on the default.
        self.bpy.context.scene.camera.data.sensor_fit = CAMERA_SENSOR_FIT
        for pose in spec.camera.poses:
            self.bp.camera.add_camera_pose(np.asarray(pose, dtype=float))

    # ------------------------------------------------------------------------------------------ outputs

    def _enable_outputs(self) -> None:
        renderer = self.bp.renderer
        if not self._outputs_enabled:
            renderer.enable_depth_output(activate_antialiasing=False)
            renderer.enable_segmentation_output(map_by=["category_id", "instance", "name"],
                                                default_values={"category_id": 0})
            self._outputs_enabled = True
        # Segmentation reads each object's pass index, which enable_segmentation_output assigns only to the
        # objects that exist when it is called: number the new scene's objects the same way.
        from blenderproc.python.utility.BlenderUtility import get_all_blender_mesh_objects

        for index, obj in enumerate(get_all_blender_mesh_objects()):
            obj.pass_index = index + 1
        # The normals output bakes the camera rotations of the current poses into compositor keyframes, and
        # the compositor tree outlives clean_up: drop the previous scene's normal nodes (exactly those the last
        # call created: the denoiser also reads the Normal pass and must stay) or every scene gets the first
        # scene's cameras.
        tree = self.bpy.context.scene.node_tree
        for name in self._normal_nodes:
            if name in tree.nodes:
                tree.nodes.remove(tree.nodes[name])
        before = {node.name for node in tree.nodes}
        renderer.enable_normals_output()
        self._normal_nodes = {node.name for node in self.bpy.context.scene.node_tree.nodes} - before
