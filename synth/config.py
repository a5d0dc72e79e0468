"""Structured configs: Hydra schemas derived from the plain-keyword classes they instantiate.

A swappable part is a class (often a dataclass) whose constructor takes plain keyword arguments, usable from
Python without Hydra. :func:`schema` turns it into a structured config with ``_target_`` pointing back at it, so
the config keys are the constructor's arguments, written once; struct mode then rejects a mistyped key and
OmegaConf rejects a wrong type, both naming the full key.
"""

import dataclasses
import inspect
import typing
from pathlib import Path

from hydra.core.config_store import ConfigStore

#: The repository's Hydra config tree.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def _constructor_fields(cls: type, exclude: tuple[str, ...] = ()) -> list[tuple[str, type, dataclasses.Field]]:
    """(name, type, field) for each keyword argument of ``cls`` (a dataclass, or any class's ``__init__``), less
    the ``exclude``d ones (arguments the caller passes itself, e.g. tensors built at run time)."""
    if dataclasses.is_dataclass(cls):
        out = []
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_") or f.name in exclude:
                continue
            default = (dataclasses.field(default_factory=f.default_factory)
                       if f.default_factory is not dataclasses.MISSING else dataclasses.field(default=f.default))
            out.append((f.name, f.type, default))
        return out
    hints = typing.get_type_hints(cls.__init__)
    out = []
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in exclude or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is inspect.Parameter.empty:
            raise TypeError(f"{cls.__qualname__}.__init__ argument {name!r} needs a default to be configurable")
        default = parameter.default
        if isinstance(default, tuple):  # OmegaConf stores sequences as lists
            default = list(default)
        factory = (lambda value=default: list(value)) if isinstance(default, list) else None
        field = dataclasses.field(default_factory=factory) if factory else dataclasses.field(default=default)
        kind = hints.get(name, typing.Any)
        if typing.get_origin(kind) is tuple:
            kind = list[typing.get_args(kind)[0]] if typing.get_args(kind) else list
        out.append((name, kind, field))
    return out


def schema(cls: type, extra: tuple[tuple[str, type, object], ...] = (), exclude: tuple[str, ...] = ()) -> type:
    """A structured-config dataclass whose fields are ``cls``'s constructor arguments plus ``_target_``.

    ``_convert_="all"`` makes :func:`hydra.utils.instantiate` pass plain lists and dicts, not OmegaConf
    containers, so the constructor sees the same types as a direct Python call. ``extra`` adds fields that the
    caller consumes itself (e.g. an objective's loss ``weight``), as ``(name, type, default)``; ``exclude`` drops
    constructor arguments that the caller supplies at run time.
    """
    fields = [("_target_", str, dataclasses.field(default=f"{cls.__module__}.{cls.__qualname__}")),
              ("_convert_", str, dataclasses.field(default="all"))]
    fields += [(name, kind, dataclasses.field(default=default)) for name, kind, default in extra]
    fields += _constructor_fields(cls, exclude)
    return dataclasses.make_dataclass(f"{cls.__name__}Config", fields)


def register(group: str, name: str, cls: type, extra: tuple[tuple[str, type, object], ...] = (),
             exclude: tuple[str, ...] = ()) -> type:
    """Store ``schema(cls, extra, exclude)`` as ``<group>/<name>``, for YAML files to extend via their defaults
    list."""
    node = schema(cls, extra, exclude)
    ConfigStore.instance().store(group=group, name=name, node=node)
    return node


def flatten(data, prefix: str = "") -> dict[str, object]:
    """A nested dict as ``{"a.b.c": leaf}`` (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differences(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """The leaf keys on which two nested configs differ, as ``"key: old -> new"`` lines, sorted.

    Args:
        ignore: Keys (or key prefixes ending in ``.``) that may differ, e.g. logging intervals.
    """
    flat_old, flat_new = flatten(old), flatten(new)
    keys = sorted(set(flat_old) | set(flat_new))
    missing = object()

    def shown(value) -> str:
        return "(absent)" if value is missing else repr(value)

    lines = []
    for key in keys:
        if key in ignore or any(p.endswith(".") and key.startswith(p) for p in ignore):
            continue
        a, b = flat_old.get(key, missing), flat_new.get(key, missing)
        if a != b:
            lines.append(f"{key}: {shown(a)} -> {shown(b)}")
    return lines
