"""The safety envelope every UR arm command passes through before it can be sent, and its limits.

:class:`SafetyConfig` holds the limits (conservative defaults for a UR5 picking on a table in front of its base),
:class:`SafetyEnvelope` checks policy actions and streamed servo commands against them and names the rules that
changed or refused a command (:data:`RULES`; docs/ur5.md explains each), :class:`Watchdog` catches a policy that
stopped answering.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...errors import RobotHalted, SafetyConfigError, SafetyViolation
from .kinematics import UR_DH_PARAMS, URKinematics
from .poses import matrix_to_pose, pose_to_matrix, relative_rotvec, rotation_angle, rotvec_to_matrix
from .protocol import ROBOT_MODE, SAFETY_MODE, robot_mode_name, safety_mode_name

#: rule names, in the order the envelope applies them
RULES = ("nonfinite", "joint_step", "tcp_step", "rot_step", "joint_limits", "workspace", "joint_speed",
         "joint_acc", "tcp_speed", "tcp_acc", "watchdog", "state")

_PI = math.pi


@dataclass(frozen=True)
class SafetyConfig:
    """Limits of the safety envelope. Defaults are conservative for a UR5 picking on a table in front of it.

    Positions are in the robot base frame (metres), the workspace box bounds the TCP (flange + ``tcp_offset``).
    The default box, x in [-0.70, -0.25], y in [-0.35, 0.15], z in [0.15, 0.65], sits in front of the base
    around the flange position of the home pose (0, -90, 90, -90, -90, 0 degrees), at least 15 cm above the
    base plane: room for a ~15 cm gripper over a table at base height. Measure your cell and set your own.
    """

    robot_model: str = "UR5"
    tcp_offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    workspace_min: tuple[float, ...] = (-0.70, -0.35, 0.15)
    workspace_max: tuple[float, ...] = (-0.25, 0.15, 0.65)
    joint_min: tuple[float, ...] = (-_PI, -_PI, 0.0, -_PI, -_PI, -_PI)
    joint_max: tuple[float, ...] = (_PI, 0.0, _PI, 0.0, 0.0, _PI)
    max_joint_speed: float = 0.5  # rad/s (the UR5 can do 3.14)
    max_joint_acc: float = 1.5  # rad/s^2
    max_tcp_speed: float = 0.25  # m/s (ISO/TS 15066-ish collaborative speed)
    max_tcp_rot_speed: float = 1.0  # rad/s
    max_tcp_acc: float = 1.0  # m/s^2
    max_joint_step: float = 0.05  # rad per policy action (0.5 rad/s at 10 Hz)
    max_tcp_step: float = 0.025  # m per policy action (0.25 m/s at 10 Hz)
    max_rot_step: float = 0.1  # rad per policy action
    watchdog_s: float = 2.0  # the policy must answer within this many seconds of its observation
    state_timeout_s: float = 0.2  # robot state must be fresher than this
    move_speed: float = 0.3  # rad/s for moveJ (e.g. going to the start pose)
    move_acc: float = 0.5  # rad/s^2 for moveJ
    stop_decel: float = 2.0  # rad/s^2 for stopJ
    servo_lookahead: float = 0.1  # servoJ/servoL lookahead time (s), UR range 0.03..0.2
    servo_gain: float = 300.0  # servoJ/servoL gain, UR range 100..2000
    controller_watchdog_hz: float = 0.0  # >0: the controller stops the program if commands stop arriving

    def __post_init__(self) -> None:
        want = {"tcp_offset": 6, "workspace_min": 3, "workspace_max": 3, "joint_min": 6, "joint_max": 6}
        for name, n in want.items():
            value = getattr(self, name)
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise SafetyConfigError(f"safety config {name} must be a list of numbers, got {value!r}") from None
            if len(value) != n:
                raise SafetyConfigError(f"safety config {name} needs {n} values, got {len(value)}")
            object.__setattr__(self, name, value)
        if self.robot_model not in UR_DH_PARAMS:
            raise SafetyConfigError(
                f"safety config robot_model {self.robot_model!r} unknown; known models: {', '.join(UR_DH_PARAMS)}")
        for f in fields(self):
            v = getattr(self, f.name)
            vals = v if isinstance(v, tuple) else (v,)
            if f.name != "robot_model" and not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vals):
                raise SafetyConfigError(f"safety config {f.name} must be finite numbers, got {v!r}")
        for lo, hi, what in ((self.workspace_min, self.workspace_max, "workspace"),
                             (self.joint_min, self.joint_max, "joint")):
            bad = [i for i in range(len(lo)) if not lo[i] < hi[i]]
            if bad:
                raise SafetyConfigError(f"safety config {what}_min must be below {what}_max on every axis; "
                                        f"axis {bad} is not ({lo} .. {hi})")
        for name in ("max_joint_speed", "max_joint_acc", "max_tcp_speed", "max_tcp_rot_speed", "max_tcp_acc",
                     "max_joint_step", "max_tcp_step", "max_rot_step", "watchdog_s", "state_timeout_s",
                     "move_speed", "move_acc", "stop_decel"):
            if not getattr(self, name) > 0:
                raise SafetyConfigError(f"safety config {name} must be > 0, got {getattr(self, name)!r}")
        if self.max_joint_speed > math.pi or self.max_tcp_speed > 1.0 or self.move_speed > math.pi:
            raise SafetyConfigError("safety config speeds exceed the UR5's own limits (joint 3.14 rad/s, tool "
                                    "1 m/s); lower max_joint_speed / max_tcp_speed / move_speed")
        if not 0.03 <= self.servo_lookahead <= 0.2:
            raise SafetyConfigError(f"servo_lookahead must be within 0.03..0.2 s, got {self.servo_lookahead}")
        if not 100 <= self.servo_gain <= 2000:
            raise SafetyConfigError(f"servo_gain must be within 100..2000, got {self.servo_gain}")
        if self.controller_watchdog_hz < 0:
            raise SafetyConfigError("controller_watchdog_hz must be >= 0 (0 disables it)")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SafetyConfig":
        """Build from a mapping; unknown keys are an error (a typo must not silently drop a limit)."""
        if not isinstance(data, Mapping):
            raise SafetyConfigError(f"safety config must be a mapping of limits, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SafetyConfigError(f"unknown safety config key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**dict(data))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SafetyConfig":
        """Load from a YAML or JSON file; the limits may sit at the top level or under a ``safety:`` key."""
        data = load_mapping(path)
        if "safety" in data and isinstance(data["safety"], Mapping):
            data = data["safety"]
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def load_mapping(path: str | os.PathLike) -> dict:
    """Read a YAML (``.yaml``/``.yml``) or JSON file holding a mapping."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SafetyConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    yaml_file = path.suffix.lower() in (".yaml", ".yml")
    try:
        if yaml_file:
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise SafetyConfigError(f"config file {path} is not valid {'YAML' if yaml_file else 'JSON'}: {e}") from None
    if not isinstance(data, dict):
        raise SafetyConfigError(f"config file {path} must hold a mapping, got {type(data).__name__}")
    return data


@dataclass
class Checked:
    """A command after the envelope: the value to send and the rules that changed it."""

    value: np.ndarray
    fired: list[str] = field(default_factory=list)
    held: bool = False  # the command was replaced by "stay where you are"


class Watchdog:
    """Stale policy output detector: ``feed(t_obs)`` when an observation is taken, ``check(now)`` before acting.

    Inactive until the first ``feed`` (commands sent without a policy are not policy output); ``reset()``
    deactivates it again."""

    def __init__(self, timeout_s: float):
        self.timeout_s = float(timeout_s)
        self.t_obs: float | None = None

    def feed(self, t_obs: float | None = None) -> None:
        self.t_obs = time.monotonic() if t_obs is None else t_obs

    def reset(self) -> None:
        self.t_obs = None

    def age(self, now: float | None = None) -> float:
        if self.t_obs is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self.t_obs

    def check(self, now: float | None = None) -> None:
        """Raise :class:`RobotHalted` (rule ``watchdog``) when the policy output is stale."""
        age = self.age(now)
        if age > self.timeout_s:
            raise RobotHalted(f"watchdog: no fresh policy output for {age:.2f} s (limit {self.timeout_s:.2f} s); "
                              "the arm was stopped", rule="watchdog")


def _norm(x) -> float:
    return float(np.linalg.norm(x))


def _cap(vec: np.ndarray, limit: float, norm=_norm) -> tuple[np.ndarray, bool]:
    """``vec`` scaled down to ``norm(vec) <= limit`` (direction kept); whether it had to be."""
    n = norm(vec)
    if n > limit:
        return vec * (limit / n), True
    return vec, False


class SafetyEnvelope:
    """Checks and clamps commands. Stateless apart from the config; the caller keeps the command history.

    Two levels:

    * policy actions (:meth:`action_joint`, :meth:`action_tcp`): per-step clamps, joint limits, workspace;
    * streamed servo commands (:meth:`servo_joint`, :meth:`servo_tcp`): everything again plus speed and
      acceleration limits at the servo period ``dt``. The runner sends nothing that did not pass here.
    """

    def __init__(self, config: SafetyConfig | None = None):
        self.config = config or SafetyConfig()
        c = self.config
        self.kin = URKinematics(c.robot_model, c.tcp_offset)
        self.jmin, self.jmax = np.asarray(c.joint_min), np.asarray(c.joint_max)
        self.wmin, self.wmax = np.asarray(c.workspace_min), np.asarray(c.workspace_max)

    # -- single checks
    @staticmethod
    def require_finite(values, what: str) -> np.ndarray:
        arr = np.asarray(values, dtype=float)
        if not np.all(np.isfinite(arr)):
            raise SafetyViolation(f"refused {what}: it contains NaN/inf ({np.array2string(arr, precision=4)}); "
                                  "nothing was sent", rule="nonfinite")
        return arr

    def in_workspace(self, p, tol: float = 1e-9) -> bool:
        p = np.asarray(p, float)[:3]
        return bool(np.all(p >= self.wmin - tol) and np.all(p <= self.wmax + tol))

    def _box_distance(self, p) -> float:
        p = np.asarray(p, float)[:3]
        return _norm(np.maximum(self.wmin - p, 0) + np.maximum(p - self.wmax, 0))

    def clamp_joint_limits(self, q) -> tuple[np.ndarray, bool]:
        c = np.clip(q, self.jmin, self.jmax)
        return c, bool(np.any(c != q))

    def _workspace_fraction(self, q_from, dq) -> float:
        """Largest fraction f in [0, 1] of the joint step ``dq`` whose TCP stays in the box (bisection).

        When ``q_from`` itself is outside the box, steps that bring the TCP closer to the box are allowed."""
        p_to = self.kin.fk(q_from + dq)[:3, 3]
        if self.in_workspace(p_to):
            p_mid = self.kin.fk(q_from + 0.5 * dq)[:3, 3]  # joint paths curve: check the midpoint as well
            if self.in_workspace(p_mid):
                return 1.0
        p_from = self.kin.fk(q_from)[:3, 3]
        if not self.in_workspace(p_from):
            return 1.0 if self._box_distance(p_to) < self._box_distance(p_from) else 0.0
        lo, hi = 0.0, 1.0
        for _ in range(12):
            mid = 0.5 * (lo + hi)
            if self.in_workspace(self.kin.fk(q_from + mid * dq)[:3, 3]):
                lo = mid
            else:
                hi = mid
        return lo

    # -- policy actions
    def action_joint(self, q_ref, q_target) -> Checked:
        """A policy's joint target: finite, at most ``max_joint_step`` from ``q_ref`` (the previous target),
        inside the joint limits, TCP inside the workspace (the step is shortened otherwise)."""
        c = self.config
        q_target = self.require_finite(q_target, "joint target")
        q_ref = np.asarray(q_ref, float)
        fired = []
        dq = q_target - q_ref
        if np.any(np.abs(dq) > c.max_joint_step):
            dq = np.clip(dq, -c.max_joint_step, c.max_joint_step)
            fired.append("joint_step")
        q, clipped = self.clamp_joint_limits(q_ref + dq)
        if clipped:
            fired.append("joint_limits")
        dq = q - q_ref
        f = self._workspace_fraction(q_ref, dq)
        if f < 1.0:
            fired.append("workspace")
            q = q_ref + f * dq
        return Checked(q, fired, held=bool(np.allclose(q, q_ref)) and bool(fired))

    def action_tcp(self, pose_ref, pose_target, q_seed) -> Checked:
        """A policy's TCP target: finite, at most ``max_tcp_step`` / ``max_rot_step`` from ``pose_ref``,
        position clamped into the workspace, reachable within the joint limits (else the arm holds)."""
        c = self.config
        pose_target = self.require_finite(pose_target, "TCP target")
        T_ref, T_t = pose_to_matrix(pose_ref), pose_to_matrix(pose_target)
        fired = []
        dp, clamped = _cap(T_t[:3, 3] - T_ref[:3, 3], c.max_tcp_step)
        if clamped:
            fired.append("tcp_step")
        rv, clamped = _cap(relative_rotvec(T_t[:3, :3], T_ref[:3, :3]), c.max_rot_step)
        if clamped:
            fired.append("rot_step")
        p = T_ref[:3, 3] + dp
        p_c = np.clip(p, self.wmin, self.wmax)
        if np.any(p_c != p):
            fired.append("workspace")
        T = np.eye(4)
        T[:3, :3] = rotvec_to_matrix(rv) @ T_ref[:3, :3]
        T[:3, 3] = p_c
        q, ok = self.kin.ik(T, q_seed)
        if not ok or np.any(q < self.jmin) or np.any(q > self.jmax):
            fired.append("joint_limits")
            return Checked(np.asarray(pose_ref, float), fired, held=True)
        return Checked(matrix_to_pose(T), fired)

    # -- streamed servo commands
    def servo_joint(self, q_prev, v_prev, q_target, dt: float) -> Checked:
        """One servoJ target ``dt`` seconds after the previous one (``q_prev``, sent with joint velocity
        ``v_prev``): finite, joint limits, joint speed/acceleration, TCP speed/acceleration, workspace."""
        c = self.config
        q_target = self.require_finite(q_target, "servoJ target")
        q_prev, v_prev = np.asarray(q_prev, float), np.asarray(v_prev, float)
        fired = []
        q, clipped = self.clamp_joint_limits(q_target)
        if clipped:
            fired.append("joint_limits")
        v = (q - q_prev) / dt
        vmax = float(np.max(np.abs(v)))
        if vmax > c.max_joint_speed:
            v *= c.max_joint_speed / vmax
            fired.append("joint_speed")
        # acceleration: speeding up (or reversing) is limited, slowing down is free
        a_step = c.max_joint_acc * dt
        same = np.sign(v) == np.sign(v_prev)
        cap = np.where(same, np.abs(v_prev) + a_step, a_step)
        if np.any(np.abs(v) > cap + 1e-12):
            v = np.sign(v) * np.minimum(np.abs(v), cap)
            fired.append("joint_acc")
        # TCP speed and acceleration (shrink the whole step)
        T_prev = self.kin.fk(q_prev)
        T_new = self.kin.fk(q_prev + v * dt)
        lin = float(np.linalg.norm(T_new[:3, 3] - T_prev[:3, 3])) / dt
        rot = rotation_angle(T_new[:3, :3], T_prev[:3, :3]) / dt
        scale = 1.0
        if lin > c.max_tcp_speed:
            scale = min(scale, c.max_tcp_speed / lin)
        if rot > c.max_tcp_rot_speed:
            scale = min(scale, c.max_tcp_rot_speed / rot)
        if scale < 1.0:
            v *= scale * 0.999
            fired.append("tcp_speed")
        v_tcp_prev = float(np.linalg.norm((self.kin.jacobian(q_prev) @ v_prev)[:3]))
        lin = float(np.linalg.norm(self.kin.fk(q_prev + v * dt)[:3, 3] - T_prev[:3, 3])) / dt
        if lin > v_tcp_prev + c.max_tcp_acc * dt + 1e-9:
            v *= (v_tcp_prev + c.max_tcp_acc * dt) / lin
            fired.append("tcp_acc")
        dq = v * dt
        f = self._workspace_fraction(q_prev, dq)
        if f < 1.0:
            dq *= f
            fired.append("workspace")
        return Checked(q_prev + dq, fired, held=bool(np.allclose(dq, 0.0)) and bool(fired))

    def servo_tcp(self, pose_prev, v_prev, pose_target, q_seed, dt: float) -> tuple[Checked, np.ndarray]:
        """One servoL target ``dt`` after ``pose_prev`` (sent with TCP linear speed ``v_prev`` m/s).

        Returns the checked pose and the joint solution used for the joint-level checks."""
        c = self.config
        pose_target = self.require_finite(pose_target, "servoL target")
        T_prev, T_t = pose_to_matrix(pose_prev), pose_to_matrix(pose_target)
        fired = []
        p_t = np.clip(T_t[:3, 3], self.wmin, self.wmax)
        if np.any(p_t != T_t[:3, 3]):
            fired.append("workspace")
        dp = p_t - T_prev[:3, 3]
        rv = relative_rotvec(T_t[:3, :3], T_prev[:3, :3])
        lin, rot = float(np.linalg.norm(dp)) / dt, float(np.linalg.norm(rv)) / dt
        scale = 1.0
        if lin > c.max_tcp_speed:
            scale = min(scale, c.max_tcp_speed / lin)
        if rot > c.max_tcp_rot_speed:
            scale = min(scale, c.max_tcp_rot_speed / rot)
        if scale < 1.0:
            fired.append("tcp_speed")
        v_cap = float(v_prev) + c.max_tcp_acc * dt
        if lin * scale > v_cap + 1e-12:
            scale = v_cap / lin
            fired.append("tcp_acc")
        dp, rv = dp * scale, rv * scale
        q_prev = np.asarray(q_seed, float)
        for _ in range(4):  # joint-level checks on the IK solution; shrink the step if needed
            T = np.eye(4)
            T[:3, :3] = rotvec_to_matrix(rv) @ T_prev[:3, :3]
            T[:3, 3] = T_prev[:3, 3] + dp
            q, ok = self.kin.ik(T, q_prev)
            if not ok or np.any(q < self.jmin) or np.any(q > self.jmax):
                fired.append("joint_limits")
                return Checked(np.asarray(pose_prev, float), fired, held=True), q_prev
            vj = float(np.max(np.abs(q - q_prev))) / dt
            if vj <= c.max_joint_speed * 1.0001:
                return Checked(matrix_to_pose(T), fired), q
            shrink = c.max_joint_speed / vj * 0.999
            dp, rv = dp * shrink, rv * shrink
            if "joint_speed" not in fired:
                fired.append("joint_speed")
        return Checked(np.asarray(pose_prev, float), fired, held=True), q_prev

    # -- robot state
    def check_state(self, *, connected: bool, safety_mode: int, robot_mode: int, state_age_s: float,
                    program_running: bool | None = None) -> None:
        """Raise :class:`RobotHalted` (rule ``state``) unless the robot can safely take commands."""
        if not connected:
            raise RobotHalted("lost the connection to the robot controller; stopped", rule="state")
        if state_age_s > self.config.state_timeout_s:
            raise RobotHalted(f"robot state is {state_age_s:.3f} s old (limit {self.config.state_timeout_s} s): "
                              "the controller stopped streaming; stopped", rule="state")
        if safety_mode not in (SAFETY_MODE["NORMAL"], SAFETY_MODE["REDUCED"]):
            raise RobotHalted(f"robot safety mode is {safety_mode_name(safety_mode)}; halted. Inspect the cause and "
                              "clear it on the teach pendant before starting a new run", rule="state")
        if robot_mode != ROBOT_MODE["RUNNING"]:
            raise RobotHalted(f"robot mode is {robot_mode_name(robot_mode)}, not RUNNING (power on and release the "
                              "brakes first)", rule="state")
        if program_running is False:
            raise RobotHalted("the robot's control program stopped (watchdog, pendant or another client); halted",
                              rule="state")
