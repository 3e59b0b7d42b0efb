"""A protocol-level twin of a Universal Robots controller, for tests and rehearsals: the real ``ur_rtde`` client
connects to it unchanged, and a MuJoCo UR5 / UR5e arm (robosuite's model) moves as the commands say. Run it in its
own process (:class:`TwinProcess`, or ``python -m nnsight_vla.envs.ur5.twin``); docs/ur5.md lists what it answers."""

from __future__ import annotations

import importlib
from typing import Any

from ....errors import TwinError

_LAZY = {
    "TwinConfig": "config", "SIMULATED_MODELS": "config", "TwinProcess": "process", "TwinClient": "process",
    "free_loopback_host": "process", "run_twin": "service", "Twin": "service", "twin_cli": "__main__",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["SIMULATED_MODELS", "Twin", "TwinClient", "TwinConfig", "TwinError", "TwinProcess", "free_loopback_host",
           "run_twin", "twin_cli"]
