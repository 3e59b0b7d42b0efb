"""Simulated and real environments for (steered) VLA policies.

Submodules (import them directly; nothing heavy is imported with this package):

* :mod:`nnsight_vla.envs.conditions` - :class:`Condition` and sweep-grid helpers (baseline, steered, controls,
  prompt baselines);
* :mod:`nnsight_vla.envs.episodes` - per-step logging, the atomic resumable results store, statistics;
* :mod:`nnsight_vla.envs.libero` - the LIBERO runner (needs the ``sim`` extra).
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Condition": "conditions", "sweep_grid": "conditions", "baseline": "conditions", "prompt_baseline": "conditions",
    "steered": "conditions", "SpeedSteering": "conditions",
    "ResultsStore": "episodes", "EpisodeRecorder": "episodes", "compare_conditions": "episodes",
    "success_rates": "episodes",
    "LiberoConfig": "libero", "run_sweep": "libero", "PolicySpec": "libero", "ScriptedPolicy": "libero",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnsight_vla.envs' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_LAZY)
