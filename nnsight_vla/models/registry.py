"""The registry of VLA families: name -> model class, filled by each family module on import."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ..errors import UnknownFamilyError

if TYPE_CHECKING:
    from .base import VLA

# family name -> module that registers it (imported lazily so `import nnsight_vla` stays light)
_FAMILY_MODULES = {
    "openvla": "nnsight_vla.models.openvla",
    "pi0": "nnsight_vla.models.pi0",
    "pi0-fast": "nnsight_vla.models.pi0_fast",
}
_CLASSES: dict[str, type["VLA"]] = {}


def register(family: str):
    """Class decorator: register a :class:`VLA` subclass under ``family``."""

    def decorator(cls):
        cls.family = family
        _CLASSES[family] = cls
        return cls

    return decorator


def families() -> list[str]:
    """The names of every known family."""
    return sorted(set(_FAMILY_MODULES) | set(_CLASSES))


def get(family: str) -> type["VLA"]:
    """The model class registered for ``family`` (importing its module on first use)."""
    if family not in _CLASSES:
        module = _FAMILY_MODULES.get(family)
        if module is None:
            raise UnknownFamilyError(f"unknown VLA family {family!r}; known families: {', '.join(families())}")
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name == module:
                raise UnknownFamilyError(
                    f"VLA family {family!r} is not available in this installation ({error}); "
                    f"known families: {', '.join(families())}"
                ) from error
            raise
    return _CLASSES[family]
