"""Running (steered) policies in environments: the Policy protocol, conditions, the results store, statistics,
one sweep loop and its executors. Names load on first use (nothing heavy is imported with the package)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_LAZY = {
    "Policy": "policy", "PolicySpec": "policy", "PolicySurface": "policy", "policy_surface": "policy",
    "condition_context": "policy",
    "Condition": "conditions", "baseline": "conditions", "prompt_baseline": "conditions", "steered": "conditions",
    "sweep_grid": "conditions", "SpeedSteering": "conditions", "parse_conditions": "conditions",
    "load_conditions": "conditions", "steering_from_dict": "conditions", "register_steering_kind": "conditions",
    "Episode": "records", "EpisodeKey": "records", "EpisodeRecorder": "records",
    "ResultsStore": "store",
    "compare_conditions": "stats", "success_rates": "stats", "metric_samples": "stats", "format_rows": "stats",
    "Environment": "sweep", "SweepReport": "sweep", "run_sweep": "sweep",
    "Inline": "executors", "Processes": "executors", "Ray": "executors",
    "PolicyServer": "server", "PolicyClient": "server",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)


__all__ = sorted(_LAZY)
