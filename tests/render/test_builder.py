"""SceneBuilder inside a real Blender session (in a child process: the bpy wheel crashes at interpreter exit)."""

import json
import subprocess
import sys
import textwrap

import pytest


def run_in_blender(code: str) -> dict:
    """Run ``code`` after BlenderProc init in a fresh process; it must print one JSON line last."""
    script = textwrap.dedent("""
        import json, os, sys
        import numpy as np
        from render.bproc_env import blenderproc
        from render.builder import SceneBuilder
        from render.worker import RenderSettings, configure_renderer
        from synth.sampling import TabletopScene
        bp = blenderproc()
        configure_renderer(bp, RenderSettings())
        builder = SceneBuilder(bp, width=32, height=32)
    """) + textwrap.dedent(code) + "\nsys.stdout.flush()\nos._exit(0)\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_rebuilding_scenes_keeps_the_compositor_output_and_one_set_of_normal_nodes():
    out = run_in_blender("""
        counts = []
        for seed in range(3):
            spec = TabletopScene().sample(np.random.default_rng(seed), width=32, height=32, seed=seed)
            builder.build(spec)
            nodes = [n.bl_idname for n in bp.bpy.context.scene.node_tree.nodes]
            counts.append({"denoise": bool(bp.bpy.context.scene.cycles.use_denoising), "total": len(nodes),
                           "composite": nodes.count("CompositorNodeComposite")})
        print(json.dumps({"counts": counts}))
    """)
    counts = out["counts"]
    assert all(c["denoise"] and c["composite"] == 1 for c in counts), counts
    assert counts[1]["total"] == counts[2]["total"], "each scene replaces the last scene's normal nodes"


def test_tear_down_frees_every_mesh_material_image_and_the_cycles_session():
    # A scanned tabletop: textured scanned objects, a photographic table and an HDRI, i.e. every kind of data block
    # whose memory a worker must hand back before the next scene.
    out = run_in_blender("""
        from render.worker import tear_down
        from synth.realistic import ScannedTabletopScene
        spec = ScannedTabletopScene().sample(np.random.default_rng(3), width=32, height=32, seed=3)
        builder.build(spec)
        d = bp.bpy.data
        kinds = ("meshes", "materials", "images", "lights")
        before = {k: len(getattr(d, k)) for k in kinds}
        bp.bpy.context.scene.render.use_persistent_data = True
        tear_down(bp)
        after = {k: len(getattr(d, k)) for k in kinds}
        print(json.dumps({"before": before, "after": after, "objects": [o.name for o in d.objects],
                          "persistent": bp.bpy.context.scene.render.use_persistent_data}))
    """)
    assert out["before"]["meshes"] > 1 and out["before"]["images"] >= 1, out  # the scene held real assets
    assert out["after"] == {"meshes": 0, "materials": 0, "images": 0, "lights": 0}, out
    assert out["objects"] == ["Camera"] and not out["persistent"], out


def test_objects_are_normalised_scaled_and_rest_on_their_support():
    out = run_in_blender("""
        spec = TabletopScene(n_objects=[4, 4]).sample(np.random.default_rng(5), width=32, height=32, seed=5)
        objects = builder.build(spec)
        bp.bpy.context.view_layer.update()
        rows = []
        for obj, o in zip(objects, spec.objects):
            box = np.asarray(obj.get_bound_box())
            rows.append({"name": o.name, "extent": (box.max(0) - box.min(0)).tolist(), "low": float(box[:, 2].min()),
                         "size": list(o.size), "support": o.support_z})
        print(json.dumps({"rows": rows}))
    """)
    for row in out["rows"][1:]:
        assert abs(row["low"] - row["support"]) < 1e-4, row  # upright objects stand on the table
        # Meshes are normalised to a largest side of 1, then scaled per axis: an upright object is at most size_z
        # tall (exactly, when its tallest side was the largest).
        assert 0 < row["extent"][2] <= row["size"][2] * (1 + 1e-5), row


def test_labels_match_the_analytic_plane_and_sphere_on_portrait_square_and_landscape_frames():
    """Depth back-projected with the stored cam_K lies on the support plane and on the sphere, and the normals are
    the analytic ones, on every pixel (those next to the other object included), whichever side is longer."""
    out = run_in_blender("""
        import dataclasses, math
        from render import labels
        from render.worker import frame_labels, render_frames
        from synth.scene import Shape
        from synth.meshes import MeshDeform
        results = {}
        for width, height in [(48, 64), (48, 48), (64, 48)]:
            settings = RenderSettings(width=width, height=height)
            spec = TabletopScene(n_objects=[1, 1]).sample(np.random.default_rng(2), width=width, height=height, seed=2)
            sphere = spec.objects[1]
            sphere.shape = Shape(source="procedural", name="o3d_sphere", deform=MeshDeform())
            sphere.size, sphere.rotation = (0.3, 0.3, 0.3), (0.0, 0.0, 0.0)
            spec.camera.poses = spec.camera.poses[:1]
            builder.width, builder.height = width, height  # outputs can be enabled once per process
            objects = builder.build(spec)
            blender_K = np.asarray(bp.camera.get_intrinsics_as_K_matrix())
            frame = frame_labels(render_frames(bp, settings), 0, fov_deg=spec.camera.fov_deg, width=width,
                                 height=height, occlusion_jump=settings.occlusion_jump)
            inst, depth, normals, K = (frame["instance_segmaps"], frame["depth"], frame["normals"], frame["cam_K"])
            ids = {m["name"]: m["idx"] for m in frame["instance_attribute_maps"]}
            pose = np.asarray(spec.camera.poses[0])
            poses = {o.get_name(): np.asarray(o.get_local2world_mat()) for o in objects}
            plane = labels.check_support_plane(depth, normals, K, pose, poses["table"], inst == ids["table"], inst)
            # Sphere: centre and radius from its pose; points and normals in world coordinates.
            rot = pose[:3, :3] * labels.BLENDER_TO_OPENCV
            on_sphere = inst == ids[sphere.name]
            points = labels.backproject(depth, K)[on_sphere] @ rot.T + pose[:3, 3]
            centre, radius = poses[sphere.name][:3, 3], 0.15
            radial = np.linalg.norm(points - centre, axis=1)
            analytic = (points - centre) / radial[:, None]
            angle = np.degrees(np.arccos(np.clip(np.sum((normals[on_sphere] @ rot.T) * analytic, axis=1), -1, 1)))
            results[f"{width}x{height}"] = {
                "fx": K[0, 0], "blender_fx": blender_K[0, 0], "blender_fy": blender_K[1, 1],
                "plane": dataclasses.asdict(plane), "sphere_pixels": int(on_sphere.sum()),
                "sphere_radial_error": float(np.abs(radial / radius - 1).max()),
                "sphere_mean_deg": float(angle.mean()), "sphere_max_deg": float(angle.max())}
        print(json.dumps(results))
    """)
    for size, r in out.items():
        # Blender's own K (sensor fit AUTO: the field of view spans the larger side) is the one we store.
        assert abs(r["fx"] - r["blender_fx"]) < 1e-6 * r["fx"] and abs(r["fx"] - r["blender_fy"]) < 1e-6 * r["fx"], r
        plane = r["plane"]
        assert plane["n_points"] > 500 and plane["n_boundary"] > 5, (size, plane)
        assert plane["max_angle_deg"] < 0.1, (size, plane)  # boundary pixels included
        assert plane["max_depth_rel_error"] < 1e-4, (size, plane)
        assert r["sphere_pixels"] > 30, (size, r)
        # A 20-ring mesh sphere, smooth-shaded: within its tessellation of the true sphere.
        assert r["sphere_radial_error"] < 0.02, (size, r)
        assert r["sphere_mean_deg"] < 1.0 and r["sphere_max_deg"] < 4.0, (size, r)
    assert out["48x64"]["fx"] == pytest.approx(out["64x48"]["fx"]) == pytest.approx(out["48x48"]["fx"] * 64 / 48)

