"""The arm scene as a rollout environment: closed-loop episodes of a (steered) image policy reaching the target.

Each step renders the camera, calls ``predict_action(image, condition.instruction(text))`` under the condition's
context, executes the 7-dim action and records the end-effector position; an episode ends when the gripper rests
above the target or after ``max_steps``. Trials are paired across conditions: trial ``k`` has the same scene
layout (seed ``seed + k``) and instruction (``instructions[k % n]``) in every condition.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ...errors import InputError
from ...rollout.conditions import Condition
from ...rollout.policy import PolicySurface, condition_context
from ...rollout.records import Episode, EpisodeKey, EpisodeRecorder
from .scene import ArmScene, SceneConfig

TASK = "arm_reach"
_SCENES: dict = {}  # this process's scenes, by (image size, robot): building one takes seconds


@dataclass(frozen=True)
class ArmRolloutConfig:
    """What defines an arm-scene episode (stored in the results manifest).

    Args:
        instructions: the task instructions; trial k uses ``instructions[k % len(instructions)]``.
        trials: episodes per condition. seed: trial k's scene layout is ``seed + k``.
        max_steps: policy steps per episode. image_size: the camera (= model input) size.
        restrict_to_action_tokens: decode the best action token at each step (a steered model may prefer a word
            token, which OpenVLA's published decoding maps to a clipped extreme bin).
    """

    instructions: tuple[str, ...]
    trials: int
    max_steps: int = 60
    seed: int = 1000
    image_size: int = 64
    restrict_to_action_tokens: bool = True
    robot: str = "Panda"

    def __post_init__(self) -> None:
        object.__setattr__(self, "instructions", tuple(self.instructions))
        if not self.instructions or not all(isinstance(t, str) and t.strip() for t in self.instructions):
            raise InputError("instructions must be non-empty strings")
        for name in ("trials", "max_steps", "image_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive int, got {value!r}")


def scene(image_size: int = 64, robot: str = "Panda") -> ArmScene:
    """This process's scene for (image size, robot), built on first use."""
    key = (int(image_size), robot)
    if key not in _SCENES:
        _SCENES[key] = ArmScene(SceneConfig(image_size=int(image_size)), robot=robot)
    return _SCENES[key]


def close_scenes() -> None:
    for s in _SCENES.values():
        s.close()
    _SCENES.clear()


def run_episode(policy: Any, arm: ArmScene, condition: Condition, trial: int, config: ArmRolloutConfig) -> Episode:
    """One closed-loop episode of ``condition``, trial ``trial``."""
    text = config.instructions[int(trial) % len(config.instructions)]
    instruction = condition.instruction(text)
    obs = arm.reset(config.seed + int(trial))
    recorder = EpisodeRecorder(EpisodeKey(condition.name, TASK, int(trial)), obs["eef_pos"], meta={
        "instruction": instruction, "base_instruction": text, "scene_seed": config.seed + int(trial),
        "target_pos": obs["target_pos"].tolist(), "table_z": obs["table_z"],
    })
    kwargs = {"restrict_to_action_tokens": True} if config.restrict_to_action_tokens else {}
    success = False
    with condition_context(policy, condition):
        for _ in range(config.max_steps):
            t0 = time.perf_counter()
            action = np.asarray(policy.predict_action(obs["image"], instruction, **kwargs))
            t1 = time.perf_counter()
            obs = arm.step(action)
            t2 = time.perf_counter()
            success = arm.success(obs)
            recorder.record(obs["eef_pos"], action, policy_call=True, policy_s=t1 - t0, env_s=t2 - t1,
                            reward=float(success), done=success)
            if success:
                break
    episode = recorder.finish(success)
    z = np.asarray(episode.columns["eef_z"], np.float64)
    table = float(obs["table_z"])
    episode.summary.update({
        "max_height_table": float(z.max() - table) if len(z) else float("nan"),
        "mean_height_table": float(z.mean() - table) if len(z) else float("nan"),
        "final_lateral_error": float(abs(obs["eef_pos"][1] - obs["target_pos"][1])),
    })
    return episode


class ArmSceneEnv:
    """The arm scene as a :class:`~nnsight_vla.rollout.sweep.Environment` (task ``"arm_reach"``, ``trials``
    paired trials)."""

    kind = "arm_scene"
    parallel = True

    def __init__(self, config: ArmRolloutConfig):
        if not isinstance(config, ArmRolloutConfig):
            raise InputError(f"ArmSceneEnv needs an ArmRolloutConfig, got {type(config).__name__}")
        self.config = config

    def bind(self, surface: PolicySurface) -> None:
        if surface.action_dim != 7 or surface.state_dim:
            raise InputError(f"the arm scene feeds one camera image and executes 7-d actions; the {surface.family} "
                             f"policy takes state {surface.state_dim} and outputs {surface.action_dim}-d actions")

    def identity(self) -> dict:
        return {**asdict(self.config), "scene": asdict(SceneConfig(image_size=self.config.image_size)),
                "task": TASK}

    def episodes(self) -> list[tuple[str, int]]:
        return [(TASK, trial) for trial in range(self.config.trials)]

    def run_episode(self, policy: Any, condition: Condition, task: str, trial: int) -> Episode:
        return run_episode(policy, scene(self.config.image_size, self.config.robot), condition, trial, self.config)

    def close(self) -> None:
        """Scenes stay cached for the next sweep in this process (:func:`close_scenes` frees them)."""
