"""SceneSpec: JSON round trip and category table."""

import json

import numpy as np

from synth.sampling import RoomScene, TabletopScene
from synth.scene import BUILTIN_CATEGORIES, SceneSpec, category_table


def test_json_round_trip_is_exact(tmp_path):
    for sampler in (TabletopScene(), RoomScene()):
        spec = sampler.sample(np.random.default_rng(3), width=64, height=48, seed=3)
        again = SceneSpec.from_json(spec.to_json())
        assert again == spec
        path = tmp_path / f"{spec.family}.json"
        spec.save(path)
        assert SceneSpec.load(path) == spec
        assert not list(tmp_path.glob("*.tmp*")), "save leaves no temporary file"


def test_json_is_plain_and_stable():
    spec = TabletopScene().sample(np.random.default_rng(0), width=64, height=64, seed=0)
    data = json.loads(spec.to_json())
    assert data["family"] == "primitives_tabletop"
    assert data["categories"]["0"] == "background"
    assert spec.to_json() == SceneSpec.from_json(spec.to_json()).to_json()


def test_category_table_appends_user_categories_after_builtins():
    table = category_table(("mug", "chair", "mug"))
    assert [table[i] for i in range(len(BUILTIN_CATEGORIES))] == list(BUILTIN_CATEGORIES)
    assert list(table.values())[len(BUILTIN_CATEGORIES):] == ["chair", "mug"]
    assert table[0] == "background"
