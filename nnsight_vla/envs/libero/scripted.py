"""A LIBERO policy without a model, for smoke runs, rehearsals and runner benchmarks."""

from __future__ import annotations

import numpy as np

from ...errors import InputError, LiberoError
from ...rollout.policy import PolicySpec
from ..scripted import ScriptedPolicyBase
from .config import FAMILY_CAMERAS, LIBERO_ACTION_DIM, LIBERO_STATE_DIM


class ScriptedPolicy(ScriptedPolicyBase):
    """A policy with the VLA surface that needs no model: for smoke runs, rehearsals and runner benchmarks.

    ``family="openvla"``: one action per call from the agent-view image: a constant translation command
    ``velocity * speed`` that reverses every ``period`` calls since :meth:`reset` (0: never; the arm oscillates
    instead of hitting a limit),
    gripper output 1.0 (= open in OpenVLA's [0, 1] convention).
    ``family="pi0"`` / ``"pi0-fast"``: a proportional controller on the 8-d state towards ``target`` (eef xyz),
    returning chunks of ``horizon`` identical actions in LIBERO's convention (gripper -1 = open).

    ``speed`` scales every translation command; :class:`~nnsight_vla.rollout.conditions.SpeedSteering` changes it
    inside a condition's context, like neuron steering changes a real model. Inputs are validated like a real
    model's (camera names, HxWx3 uint8 images, state size) and the last inputs are kept for inspection.
    """

    def __init__(self, family: str = "openvla", *, velocity=(0.3, 0.0, 0.2), period: int = 20,
                 target=(0.0, 0.0, 1.0), gain: float = 5.0, horizon: int = 5, image_size: int = 224,
                 speed: float = 1.0, delay_s: float = 0.0):
        if family not in FAMILY_CAMERAS:
            raise LiberoError(f"ScriptedPolicy family must be one of {', '.join(FAMILY_CAMERAS)}, got {family!r}")
        super().__init__()
        self.family = family
        self.camera_names = FAMILY_CAMERAS[family]
        self.state_dim = None if family == "openvla" else LIBERO_STATE_DIM
        self.action_dim = LIBERO_ACTION_DIM
        self.action_horizon = 1 if family == "openvla" else int(horizon)
        self.image_size = int(image_size)
        self.velocity = np.asarray(velocity, np.float64).reshape(3)
        self.period = int(period)
        self.target = np.asarray(target, np.float64).reshape(3)
        self.gain = float(gain)
        self.speed = float(speed)
        self.delay_s = float(delay_s)

    def to_dict(self) -> dict:
        return {"class": "ScriptedPolicy", "family": self.family, "velocity": self.velocity.tolist(),
                "period": self.period, "target": self.target.tolist(), "gain": self.gain,
                "horizon": self.action_horizon, "image_size": self.image_size, "speed": self.speed}

    def _act(self, state) -> np.ndarray:
        self.calls += 1
        if self.family == "openvla":
            sign = 1.0 if not self.period or ((self.calls - 1) // self.period) % 2 == 0 else -1.0
            xyz = np.clip(self.velocity * self.speed * sign, -1, 1)
            return np.concatenate([xyz, np.zeros(3), [1.0]])
        if state is None or np.asarray(state).shape != (self.state_dim,):
            raise InputError(f"{self.family} needs a state of dimension {self.state_dim}")
        self.last_state = np.asarray(state, np.float64)
        xyz = np.clip(self.gain * (self.target - self.last_state[:3]) * self.speed, -1, 1)
        row = np.concatenate([xyz, np.zeros(3), [-1.0]])
        return np.tile(row, (self.action_horizon, 1))




def scripted_spec(family: str = "openvla", **options) -> PolicySpec:
    """A :class:`~nnsight_vla.rollout.policy.PolicySpec` that builds a :class:`ScriptedPolicy` in each worker."""
    return PolicySpec.from_factory("nnsight_vla.envs.libero.scripted:ScriptedPolicy", family, family=family,
                                   **options)
