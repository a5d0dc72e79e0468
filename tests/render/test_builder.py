"""SceneBuilder inside a real Blender session (in a child process: the bpy wheel crashes at interpreter exit)."""

import json
import subprocess
import sys
import textwrap


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
