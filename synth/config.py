"""Structured configs: Hydra schemas derived from the plain-keyword classes they instantiate.

A swappable part is a class (often a dataclass) whose constructor takes plain keyword arguments, usable from
Python without Hydra. :func:`schema` turns it into a structured config with ``_target_`` pointing back at it, so
the config keys are the constructor's arguments, written once; struct mode then rejects a mistyped key and
OmegaConf rejects a wrong type, both naming the full key.
"""

import dataclasses
from pathlib import Path

from hydra.core.config_store import ConfigStore

#: The repository's Hydra config tree.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def schema(cls: type) -> type:
    """A structured-config dataclass whose fields are ``cls``'s dataclass fields plus ``_target_``.

    ``_convert_="all"`` makes :func:`hydra.utils.instantiate` pass plain lists and dicts, not OmegaConf
    containers, so the constructor sees the same types as a direct Python call.
    """
    fields = [("_target_", str, dataclasses.field(default=f"{cls.__module__}.{cls.__qualname__}")),
              ("_convert_", str, dataclasses.field(default="all"))]
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        default = (dataclasses.field(default_factory=f.default_factory)
                   if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
        fields.append((f.name, f.type, default))
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def register(group: str, name: str, cls: type) -> type:
    """Store ``schema(cls)`` as ``<group>/<name>``, for YAML files to extend via their defaults list."""
    node = schema(cls)
    ConfigStore.instance().store(group=group, name=name, node=node)
    return node
