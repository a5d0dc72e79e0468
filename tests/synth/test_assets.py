"""The asset catalogue on tiny fixture packs the tests write (a fake .sh3f zip, a GSO-like folder, a user folder),
and the realistic samplers on the installed catalogue (no Blender here)."""

import json
import os
import zipfile

import numpy as np
import pytest

from synth import assets
from synth.assets import AssetError, classify, extract_model, load_catalogue, mtl_facts, scan_user_dir

CUBE_OBJ = "mtllib {mtl}\n" + "".join(f"v {x} {y} {z}\n" for x in (0, 2) for y in (0, 1) for z in (0, 3)) + \
    "usemtl m\nf 1 2 4\nf 1 4 3\nf 5 6 8\nf 5 8 7\nf 1 2 6\nf 1 6 5\n"
PROPERTIES = """# fake pack
id=Test
license=Public domain
id#1=Test#chair
name#1=Kitchen chair
tags#1=Seat
category#1=Kitchen
model#1=/pack/chair/chair.obj
width#1=45
depth#1=50
height#1=90
dropOnTopElevation#1=45
doorOrWindow#1=false
id#2=Test#glasstable
name#2=Low table
tags#2=Table
category#2=Living room
model#2=/pack/table/table.obj
width#2=100
depth#2=60
height#2=40
doorOrWindow#2=false
id#3=Test#door
name#3=Door
category#3=Doors and windows
model#3=/pack/door/door.obj
width#3=90
depth#3=10
height#3=200
doorOrWindow#3=true
"""


def write_sh3f(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "Test.sh3f"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("PluginFurnitureCatalog.properties", PROPERTIES)
        zf.writestr("pack/chair/chair.obj", CUBE_OBJ.format(mtl="chair.mtl"))
        zf.writestr("pack/chair/chair.mtl", "newmtl m\nKd 1 1 1\nmap_Kd wood.png\n")
        zf.writestr("pack/chair/wood.png", b"not really a png")
        zf.writestr("pack/table/table.obj", CUBE_OBJ.format(mtl="table.mtl"))
        zf.writestr("pack/table/table.mtl", "newmtl m\nKd 1 1 1\nd 0.4\n")
        zf.writestr("pack/door/door.obj", CUBE_OBJ.format(mtl="door.mtl"))
    return path


@pytest.fixture(autouse=True)
def fresh_memo():
    assets._MEMO.clear()
    yield
    assets._MEMO.clear()


def test_sweethome3d_pack_is_catalogued_with_size_class_texture_and_transparency(tmp_path):
    write_sh3f(tmp_path / "furniture")
    catalogue = load_catalogue(["sweethome3d"], sweethome3d_dir=str(tmp_path / "furniture"),
                               cache_dir=tmp_path / "cache")
    by_name = {a.name: a for a in catalogue.assets}
    assert set(by_name) == {"Kitchen chair", "Low table"}  # the door is left out
    chair, table = by_name["Kitchen chair"], by_name["Low table"]
    assert (chair.category, chair.up_axis, chair.unit_scale, chair.size) == ("chair", "Y", 0.01, (0.45, 0.5, 0.9))
    assert chair.has_texture and not chair.transparent and chair.top == pytest.approx(0.5)
    assert chair.licence == "Public domain"
    assert table.transparent and not table.has_texture
    assert [a.name for a in catalogue.meshes()] == ["Kitchen chair"]  # transparent assets are never drawn
    # The model's folder is extracted into the cache once, textures beside it.
    path = catalogue.local_file(chair)
    assert path.endswith("chair.obj") and os.path.isfile(path)
    assert os.path.isfile(os.path.join(os.path.dirname(path), "wood.png"))
    assert catalogue.local_file(chair) == path


def test_catalogue_is_cached_as_json_and_rebuilt_when_the_package_changes(tmp_path):
    pack = write_sh3f(tmp_path / "furniture")
    kwargs = {"sweethome3d_dir": str(tmp_path / "furniture"), "cache_dir": tmp_path / "cache"}
    first = load_catalogue(["sweethome3d"], **kwargs)
    files = sorted((tmp_path / "cache").glob("catalogue-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["assets"]
    assets._MEMO.clear()
    assert load_catalogue(["sweethome3d"], **kwargs).assets == first.assets  # read back from JSON
    os.utime(pack, ns=(1, 1))  # the package changed: a new catalogue file
    assets._MEMO.clear()
    load_catalogue(["sweethome3d"], **kwargs)
    assert len(list((tmp_path / "cache").glob("catalogue-*.json"))) == 2


def test_missing_package_is_one_line_naming_it(tmp_path):
    catalogue = load_catalogue(["sweethome3d"], sweethome3d_dir=str(tmp_path / "none"), cache_dir=tmp_path)
    with pytest.raises(AssetError) as error:
        catalogue.require("sweethome3d")
    message = str(error.value)
    assert "sweethome3d-furniture" in message and "\n" not in message
    with pytest.raises(AssetError, match="unknown asset source"):
        load_catalogue(["nope"], cache_dir=tmp_path)


def test_gso_like_folder_gets_size_in_metres_class_and_skips_collision_meshes(tmp_path):
    root = tmp_path / "stable_scanned_objects"
    for name in ("red_bowl", "white_plate"):
        (root / name).mkdir(parents=True)
        (root / name / "model.obj").write_text(CUBE_OBJ.format(mtl="model.mtl"))
        (root / name / "model.mtl").write_text("newmtl m\nmap_Kd texture.png\n")
        (root / name / f"{name}_col.obj").write_text(CUBE_OBJ.format(mtl="x"))
    skipped = []
    found = assets._scan_obj_folder(root, "gso", "CC-BY-4.0", "Z", 1.0, skipped, name_of=lambda p: p.parent.name)
    assert [(a.name, a.category, a.size, a.has_texture) for a in found] == [
        ("red bowl", "bowl", (2.0, 1.0, 3.0), True), ("white plate", "plate", (2.0, 1.0, 3.0), True)]
    assert not skipped


def test_user_folder_bad_files_are_named_skipped_and_counted_or_refused_when_strict(tmp_path):
    import cv2

    (tmp_path / "mug").mkdir()
    (tmp_path / "mug" / "good.obj").write_text(CUBE_OBJ.format(mtl="none.mtl"))
    (tmp_path / "mug" / "broken.obj").write_text("this is not a mesh\n")
    (tmp_path / "textures").mkdir()
    cv2.imwrite(str(tmp_path / "textures" / "oak.png"), np.full((8, 16, 3), 120, np.uint8))
    (tmp_path / "textures" / "bad.png").write_bytes(b"\x89PNG garbage")
    meshes, images, skipped = scan_user_dir(tmp_path)
    assert [m.name for m in meshes] == ["good"] and meshes[0].category == "mug"
    assert [i.aspect for i in images] == [2.0]
    assert len(skipped) == 2 and any("broken.obj" in s for s in skipped) and any("bad.png" in s for s in skipped)
    with pytest.raises(AssetError, match=r"broken\.obj|bad\.png"):
        scan_user_dir(tmp_path, strict=True)


def test_classify_and_mtl_facts():
    assert classify("Bedside table") == "cabinet"
    assert classify("Coffee table") == "table"
    assert classify("Armchair") == "chair"
    assert classify("Glass table") == ""  # glass is excluded by name
    assert classify("akita_black_bowl") == "bowl"
    assert mtl_facts("newmtl a\nmap_Kd t.png\nd 1.0\n") == (True, False)
    assert mtl_facts("newmtl a\nKd 1 1 1\nTr 0.5\n") == (False, True)
    assert mtl_facts("newmtl a\nmap_d alpha.png\n") == (False, True)


def test_extract_model_is_atomic_and_idempotent(tmp_path):
    pack = write_sh3f(tmp_path)
    first = extract_model(str(pack), "/pack/chair/chair.obj", tmp_path / "cache")
    assert extract_model(str(pack), "pack/chair/chair.obj", tmp_path / "cache") == first
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


# ------------------------------------------------------------------ realistic samplers on the installed catalogue


def _installed(*sources):
    catalogue = load_catalogue(sources)
    missing = [catalogue.missing[s] for s in sources if s in catalogue.missing]
    if missing:
        pytest.skip(missing[0])


def test_scanned_tabletop_same_seed_same_spec_and_real_assets():
    _installed("gso", "sweethome3d", "blender_hdri", "libero_textures")
    from synth.realistic import ScannedTabletopScene

    sampler = ScannedTabletopScene()
    a, b, c = (sampler.sample(np.random.default_rng(s), width=64, height=64, seed=s) for s in (4, 4, 5))
    assert a.to_json() == b.to_json() and a.to_json() != c.to_json()
    assert a.world.hdri and a.world.hdri.endswith(".exr")
    assert a.objects[0].material.image  # the table is a photographic texture
    assert all(o.shape.source == "asset" and os.path.isfile(o.shape.name) for o in a.objects[1:])
    assert {a.categories[o.category_id] for o in a.objects[1:]} <= set(assets.TABLETOP_CLASSES)


def test_furnished_room_furniture_stands_inside_the_room_without_overlap():
    _installed("sweethome3d", "gso", "libero_textures", "wallpapers")
    from synth.realistic import FurnishedRoomScene, _yawed

    sampler = FurnishedRoomScene()
    for seed in range(8):
        spec = sampler.sample(np.random.default_rng(seed), width=64, height=64, seed=seed)
        floor = next(o for o in spec.objects if o.name == "floor")
        half_x, half_y = floor.size[0] / 2, floor.size[1] / 2
        boxes = []
        for o in (o for o in spec.objects if o.name.startswith("furniture")):
            assert spec.categories[o.category_id] in assets.FURNITURE_CLASSES
            w, d, _ = _yawed(o.size, o.rotation[2])
            box = (o.location[0] - w / 2, o.location[1] - d / 2, o.location[0] + w / 2, o.location[1] + d / 2)
            assert -half_x <= box[0] and box[2] <= half_x and -half_y <= box[1] and box[3] <= half_y
            for other in boxes:
                assert box[2] <= other[0] or other[2] <= box[0] or box[3] <= other[1] or other[3] <= box[1]
            boxes.append(box)
        assert boxes, "a room has furniture"
        assert spec.objects[0].material.image  # photographic floor
        assert all(o.shape.source == "asset" for o in spec.objects if o.name.startswith("object"))
