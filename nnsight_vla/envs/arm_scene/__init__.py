"""The small arm scene of the trained VLA (robosuite Panda, one 64 px camera) and its rollout environment."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering, before mujoco is imported

from .env import TASK, ArmRolloutConfig, ArmSceneEnv, close_scenes, run_episode, scene  # noqa: E402
from .scene import (  # noqa: E402
    GRIPPER_OPEN, HEIGHTS, SPEEDS, ArmScene, EpisodeSpec, SceneConfig, ScriptedExpert, run_expert_episode,
)

__all__ = [
    "GRIPPER_OPEN", "HEIGHTS", "SPEEDS", "TASK", "ArmRolloutConfig", "ArmScene", "ArmSceneEnv", "EpisodeSpec",
    "SceneConfig", "ScriptedExpert", "close_scenes", "run_episode", "run_expert_episode", "scene",
]
