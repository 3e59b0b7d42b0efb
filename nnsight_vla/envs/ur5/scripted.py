"""A policy with the VLA surface that needs no model (tests and rehearsals before a model is at hand)."""

from __future__ import annotations

import math

import numpy as np

from ...errors import InputError, RobotConfigError
from ..scripted import ScriptedPolicyBase
from .config import FAMILY_ACTION_SPACE, is_count
from .kinematics import URKinematics


class UR5ScriptedPolicy(ScriptedPolicyBase):
    """A policy with the VLA surface that needs no model: moves the TCP with a constant velocity that reverses
    every ``period`` calls, expressed as the family expects (π0: chunks of joint deltas relative to the observed
    joints, from the UR5 Jacobian; OpenVLA: one TCP delta per call).

    ``speed`` scales the velocity (what :class:`~nnsight_vla.rollout.conditions.SpeedSteering` changes); ``lift``
    adds an upward velocity (m/s), for height experiments. Inputs are validated like a model's."""

    def __init__(self, family: str = "pi0", *, velocity=(0.0, 0.08, 0.0), lift: float = 0.0, period: int = 4,
                 horizon: int = 8, action_hz: float = 10.0, speed: float = 1.0, model: str = "UR5",
                 tcp_offset=(0, 0, 0, 0, 0, 0), gripper: float = 0.0, delay_s: float = 0.0):
        if family not in FAMILY_ACTION_SPACE:
            raise RobotConfigError(
                f"UR5ScriptedPolicy family must be one of {list(FAMILY_ACTION_SPACE)}, got {family!r}")
        if not (is_count(horizon) and is_count(period)):
            raise RobotConfigError(f"UR5ScriptedPolicy horizon and period must be ints >= 1, got {horizon!r}, "
                                   f"{period!r}")
        if not (action_hz > 0 and math.isfinite(action_hz) and math.isfinite(speed) and delay_s >= 0):
            raise RobotConfigError("UR5ScriptedPolicy needs action_hz > 0, a finite speed and delay_s >= 0")
        super().__init__()
        self.family = family
        self.camera_names = ("primary",) if family == "openvla" else ("base", "wrist")
        self.state_dim = None if family == "openvla" else 7
        self.action_dim = 7
        self.action_horizon = 1 if family == "openvla" else int(horizon)
        self.velocity = np.asarray(velocity, float).reshape(3)
        self.lift = float(lift)
        self.period = int(period)
        self.action_hz = float(action_hz)
        self.speed = float(speed)
        self.gripper = float(gripper)
        self.delay_s = float(delay_s)
        self.kin = URKinematics(model, tcp_offset)

    def to_dict(self) -> dict:
        return {"class": "UR5ScriptedPolicy", "family": self.family, "velocity": self.velocity.tolist(),
                "lift": self.lift, "period": self.period, "horizon": self.action_horizon,
                "action_hz": self.action_hz, "speed": self.speed, "gripper": self.gripper}

    def _act(self, state) -> np.ndarray:
        sign = 1.0 if (self.calls // self.period) % 2 == 0 else -1.0
        self.calls += 1
        v = self.velocity * self.speed * sign + np.array([0.0, 0.0, self.lift * self.speed])
        dt = 1.0 / self.action_hz
        if self.family == "openvla":
            return np.concatenate([v * dt, np.zeros(3), [1.0 - self.gripper]])  # OpenVLA: 1 = open
        if state is None or np.asarray(state).shape != (self.state_dim,):
            raise InputError(f"{self.family} needs a state of dimension {self.state_dim}")
        self.last_state = q = np.asarray(state, float)[:6]
        J = self.kin.jacobian(q)
        qd = np.linalg.solve(J.T @ J + 1e-6 * np.eye(6), J.T @ np.concatenate([v, np.zeros(3)]))
        rows = [np.concatenate([qd * dt * (k + 1), [self.gripper]]) for k in range(self.action_horizon)]
        return np.asarray(rows)


# ----------------------------------------------------------------------------------------------------------
# episodes
