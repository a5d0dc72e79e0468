"""Scene sampling: determinism, ranges, camera constraints and bad configs (no Blender involved)."""

import math

import numpy as np
import open3d as o3d
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from synth.meshes import MeshFolderError
from synth.sampling import (
    RoomScene,
    TabletopScene,
    euler_xyz,
    in_view,
    look_at,
    project,
    scene_seed,
)
from synth.scene import BACKGROUND_CATEGORY, SceneConfigError, SceneSamplingError


def sample(sampler, seed=0, width=64, height=64):
    return sampler.sample(np.random.default_rng(seed), width=width, height=height, seed=seed)


@pytest.mark.parametrize("sampler", [TabletopScene(), RoomScene()], ids=["tabletop", "room"])
def test_same_seed_same_spec_other_seed_other_spec(sampler):
    assert sample(sampler, 7) == sample(sampler, 7)
    assert sample(sampler, 7) != sample(sampler, 8)


def test_scene_seed_is_independent_of_sharding_and_distinct():
    seeds = [scene_seed(0, s) for s in range(1000)]
    assert len(set(seeds)) == 1000
    assert scene_seed(0, 5) == scene_seed(0, 5) != scene_seed(1, 5)


def test_tabletop_values_lie_in_their_configured_ranges():
    sampler = TabletopScene(n_objects=[2, 4], object_size=[0.1, 0.2], views=3, physics=False)
    for seed in range(20):
        spec = sample(sampler, seed)
        objects = [o for o in spec.objects if o.category_id != BACKGROUND_CATEGORY]
        assert 2 <= len(objects) <= 4
        assert spec.n_views == 3
        for o in objects:
            assert 0.1 * sampler.aspect[0] - 1e-9 <= min(o.size) and max(o.size) <= 0.2 + 1e-9
            assert math.hypot(*o.location[:2]) <= sampler.spread + 1e-9
            assert o.support_z == 0.0 and o.physics == "none"
            assert o.rotation[:2] == (0.0, 0.0), "without physics objects stand upright"
            assert 0 <= o.material.roughness <= 1 and 0 <= o.material.metallic <= 1
        for light in spec.lights:
            assert sampler.light_energy[0] <= light.energy <= sampler.light_energy[1]


def test_tabletop_camera_keeps_every_object_in_view_and_respects_distance():
    sampler = TabletopScene(views=4)
    for seed in range(10):
        spec = sample(sampler, seed, width=64, height=48)
        centres = np.array([[o.location[0], o.location[1], max(o.size) / 2]
                            for o in spec.objects if o.category_id != BACKGROUND_CATEGORY])
        for pose in spec.camera.poses:
            pose = np.asarray(pose)
            assert in_view(pose, centres, spec.camera.fov_deg, 64, 48, margin=sampler.view_margin).all()
            distance = np.linalg.norm(pose[:3, 3] - centres.mean(axis=0))
            assert distance < sampler.camera_distance[1] + 0.5
            assert pose[2, 3] > 0, "camera above the table"


def test_room_cameras_are_inside_the_room_and_look_at_an_object():
    sampler = RoomScene()
    for seed in range(10):
        spec = sample(sampler, seed)
        floor = next(o for o in spec.objects if o.name == "floor")
        half_x, half_y = floor.size[0] / 2, floor.size[1] / 2
        walls_top = next(o for o in spec.objects if o.name == "ceiling").location[2]
        assert spec.n_views == 4
        for pose in spec.camera.poses:
            x, y, z = np.asarray(pose)[:3, 3]
            assert abs(x) < half_x and abs(y) < half_y and 0 < z < walls_top
        furniture = [o for o in spec.objects if o.name.startswith("furniture")]
        for i, a in enumerate(furniture):
            for b in furniture[i + 1:]:
                apart_x = abs(a.location[0] - b.location[0]) >= (a.size[0] + b.size[0]) / 2
                apart_y = abs(a.location[1] - b.location[1]) >= (a.size[1] + b.size[1]) / 2
                assert apart_x or apart_y, "furniture footprints do not overlap"


def test_look_at_points_the_camera_minus_z_axis_at_the_target():
    eye, target = np.array([1.0, -2.0, 1.5]), np.array([0.1, 0.2, 0.3])
    pose = look_at(eye, target, roll=0.3)
    rotation = pose[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(rotation), 1.0)
    forward = -rotation[:, 2]
    np.testing.assert_allclose(forward, (target - eye) / np.linalg.norm(target - eye), atol=1e-12)
    xyd = project(pose, target[None], 50.0, 64, 64)
    np.testing.assert_allclose(xyd[0, :2], 0.0, atol=1e-12)


def test_project_puts_a_point_at_half_the_fov_on_the_frame_edge():
    pose = look_at(np.zeros(3), np.array([0.0, 1.0, 0.0]))  # looks along +y, x to the right
    fov = 60.0
    edge = np.array([[math.tan(math.radians(fov / 2)), 1.0, 0.0]])
    np.testing.assert_allclose(project(pose, edge, fov, 64, 32)[0], [1.0, 0.0, 1.0], atol=1e-12)
    assert not in_view(pose, np.array([[0.0, -1.0, 0.0]]), fov, 64, 64).any(), "behind the camera"


def test_euler_xyz_matches_blender_order():
    x, y, z = 0.3, -0.4, 1.1
    rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    np.testing.assert_allclose(euler_xyz(rz @ ry @ rx), (x, y, z), atol=1e-12)


@pytest.mark.parametrize(("kwargs", "key"), [
    ({"n_objects": [5, 2]}, "scene.n_objects"),
    ({"n_objects": [1.5, 2]}, "scene.n_objects"),
    ({"views": 0}, "scene.views"),
    ({"views": "two"}, "scene.views"),
    ({"fov_deg": 200}, "scene.fov_deg"),
    ({"shapes": ["cube", "teapot"]}, "scene.shapes"),
    ({"object_size": [0.1]}, "scene.object_size"),
    ({"physics": "yes"}, "scene.physics"),
    ({"spread": 2.0, "table_size": 1.0}, "scene.spread"),
    ({"camera_elevation_deg": [10, 120]}, "scene.camera_elevation_deg"),
])
def test_bad_tabletop_config_names_the_key(kwargs, key):
    with pytest.raises(SceneConfigError, match=key.replace(".", r"\.")):
        TabletopScene(**kwargs)


def test_impossible_camera_constraint_is_a_clear_error():
    sampler = TabletopScene(fov_deg=3.0, max_tries=20)
    with pytest.raises(SceneSamplingError, match="camera_distance"):
        sample(sampler)


def test_mesh_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(MeshFolderError, match="missing"):
        TabletopScene(mesh_dir=str(tmp_path / "missing"))
    bad = tmp_path / "meshes"
    bad.mkdir()
    (bad / "broken.obj").write_text("this is not a mesh\n")
    with pytest.raises(MeshFolderError, match=r"broken\.obj"):
        TabletopScene(mesh_dir=str(bad))


def test_user_meshes_join_the_pool_with_their_own_category(tmp_path):
    folder = tmp_path / "meshes" / "widget"
    folder.mkdir(parents=True)
    o3d.io.write_triangle_mesh(str(folder / "a.ply"), o3d.geometry.TriangleMesh.create_torus())
    sampler = TabletopScene(mesh_dir=str(tmp_path / "meshes"), shapes=[], n_objects=[3, 3])
    spec = sample(sampler)
    ids = {v: k for k, v in spec.categories.items()}
    files = [o for o in spec.objects if o.shape.source == "file"]
    assert len(files) == 3
    assert all(o.category_id == ids["widget"] for o in files)


# Hypothesis: any config either builds a valid spec or raises the clear error, never anything else.
_range = st.lists(st.one_of(st.floats(-5, 5, allow_nan=False), st.integers(-3, 12)), min_size=0, max_size=3)
_configs = st.fixed_dictionaries({}, optional={
    "views": st.one_of(st.integers(-1, 5), st.floats(-1, 5), st.text(max_size=2)),
    "n_objects": _range,
    "object_size": _range,
    "camera_distance": _range,
    "camera_elevation_deg": _range,
    "fov_deg": st.one_of(st.floats(-10, 200), st.none()),
    "spread": st.floats(-1, 3),
    "view_margin": st.floats(-0.5, 1.5),
    "physics": st.one_of(st.booleans(), st.integers(0, 1)),
    "max_tries": st.integers(0, 30),
})


def check_spec_or_clear_error(family, config: dict, seed: int) -> None:
    """A config either builds a valid spec or raises the error that names a ``scene.`` key; nothing else."""
    try:
        sampler = family(**config)
    except SceneConfigError as error:
        assert str(error).startswith("scene.")
        return
    try:
        spec = sample(sampler, seed)
    except SceneSamplingError as error:
        assert "scene." in str(error)
        return
    assert spec.n_views == sampler.views
    assert all(np.isfinite(np.asarray(p)).all() for p in spec.camera.poses)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=_configs, seed=st.integers(0, 2**32 - 1))
def test_random_tabletop_configs_give_a_spec_or_a_clear_error(config, seed):
    check_spec_or_clear_error(TabletopScene, config, seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=st.fixed_dictionaries({}, optional={
    "room_size": _range, "room_height": _range, "n_furniture": _range, "furniture_size": _range,
    "n_objects": _range, "camera_height": _range, "min_view_distance": st.floats(-1, 6),
    "max_tries": st.integers(0, 30)}), seed=st.integers(0, 2**32 - 1))
def test_random_room_configs_give_a_spec_or_a_clear_error(config, seed):
    check_spec_or_clear_error(RoomScene, config, seed)
