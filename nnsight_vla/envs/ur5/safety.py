"""The safety envelope every UR arm command passes through before it can be sent, and its limits.

:class:`SafetyConfig` holds the limits (conservative defaults for a UR5 picking on a table in front of its base),
:class:`SafetyEnvelope` checks policy actions and streamed servo commands against them and names the rules that
changed or refused a command (:data:`RULES`; docs/ur5.md explains each, and how a stream still stops safely under
an acceleration limit that also bounds braking), :class:`Watchdog` catches a policy that stopped answering.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...errors import RobotHalted, SafetyConfigError, SafetyViolation
from .kinematics import UR_DH_PARAMS, URKinematics
from .poses import pose_to_matrix, relative_rotvec, rotvec_to_matrix, matrix_to_pose
from .protocol import ROBOT_MODE, SAFETY_MODE, robot_mode_name, safety_mode_name

#: rule names, in the order the envelope applies them
RULES = ("nonfinite", "joint_step", "tcp_step", "rot_step", "joint_limits", "workspace", "joint_speed",
         "joint_acc", "tcp_speed", "tcp_acc", "watchdog", "state")

_PI = math.pi
_TOL = 1e-9  # relative slack on limit comparisons (floating point), far below anything physical
# A straight TCP line needs changing joint speeds and constant joint speeds curve the TCP (at the default limits up
# to 0.7 rad/s^2 and 0.22 m/s^2): limits of the other space, applied through the Jacobian, aim at 80 % of the limit,
# and streams stay able to stop at half the acceleration limits, so that braking always fits under them.
# Stopping points are predicted 25 % farther than that: braking slows the TCP and the joints at rates that drift
# apart along the way (the Jacobian changes), so the prediction drifts by a few percent while the arm brakes.
_LINEAR, _LINEAR_SPEED = 0.8, 0.99
_BRAKE, _PREDICT = 0.5, 1.25


@dataclass(frozen=True)
class SafetyConfig:
    """Limits of the safety envelope. Defaults are conservative for a UR5 picking on a table in front of it.

    Positions are in the robot base frame (metres), the workspace box bounds the TCP (flange + ``tcp_offset``).
    The default box, x in [-0.70, -0.25], y in [-0.35, 0.15], z in [0.15, 0.65], sits in front of the base
    around the flange position of the home pose (0, -90, 90, -90, -90, 0 degrees), at least 15 cm above the
    base plane: room for a ~15 cm gripper over a table at base height. Measure your cell and set your own.
    The acceleration limits bound every change of the streamed velocity vector, braking included;
    ``stop_decel`` is the joint deceleration of a stop (servoStop at a halt or at the end of a stream).
    """

    robot_model: str = "UR5"
    tcp_offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    workspace_min: tuple[float, ...] = (-0.70, -0.35, 0.15)
    workspace_max: tuple[float, ...] = (-0.25, 0.15, 0.65)
    joint_min: tuple[float, ...] = (-_PI, -_PI, 0.0, -_PI, -_PI, -_PI)
    joint_max: tuple[float, ...] = (_PI, 0.0, _PI, 0.0, 0.0, _PI)
    max_joint_speed: float = 0.5  # rad/s (the UR5 can do 3.14)
    max_joint_acc: float = 1.5  # rad/s^2, per joint, speeding up, slowing down and turning alike
    max_tcp_speed: float = 0.25  # m/s (ISO/TS 15066-ish collaborative speed)
    max_tcp_rot_speed: float = 1.0  # rad/s
    max_tcp_acc: float = 1.0  # m/s^2, |v - v_prev| / dt of the TCP's velocity vector
    max_tcp_rot_acc: float = 4.0  # rad/s^2, |w - w_prev| / dt of the TCP's angular velocity vector
    max_joint_step: float = 0.05  # rad per policy action (0.5 rad/s at 10 Hz)
    max_tcp_step: float = 0.025  # m per policy action (0.25 m/s at 10 Hz)
    max_rot_step: float = 0.1  # rad per policy action
    watchdog_s: float = 2.0  # the policy must answer within this many seconds of its observation
    state_timeout_s: float = 0.2  # robot state must be fresher than this
    move_speed: float = 0.3  # rad/s for moveJ (e.g. going to the start pose)
    move_acc: float = 0.5  # rad/s^2 for moveJ
    stop_decel: float = 2.0  # rad/s^2: how hard a stop (servoStop) brakes the joints
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
                     "max_tcp_rot_acc", "max_joint_step", "max_tcp_step", "max_rot_step", "watchdog_s",
                     "state_timeout_s", "move_speed", "move_acc", "stop_decel"):
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


@dataclass(frozen=True)
class ServoState:
    """The last streamed servo command: joints, TCP pose, and the velocities of the step that led there (what the
    acceleration limits compare with). ``target`` is the last waypoint asked for (None: none yet)."""

    q: np.ndarray
    pose: np.ndarray
    qd: np.ndarray
    v: np.ndarray
    w: np.ndarray
    target: np.ndarray | None = None
    target_kind: str | None = None

    @classmethod
    def at_rest(cls, q, pose) -> "ServoState":
        z = np.zeros(3)
        return cls(np.asarray(q, float).copy(), np.asarray(pose, float).copy(), np.zeros(6), z, z.copy())


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


def stop_speed(distance: float, acc: float, dt: float) -> float:
    """The highest speed for the next step of ``dt`` from which braking at ``acc`` (a step at a time) still stops
    within ``distance``: ``sqrt(2 a d) - a dt / 2`` (exact for the discrete steps), a single last step when short."""
    if distance <= 0:
        return 0.0
    v = math.sqrt(2.0 * acc * distance) - 0.5 * acc * dt
    return min(distance / dt, max(v, min(distance / dt, acc * dt)))


def _norm(x) -> float:
    return float(np.linalg.norm(x))


def _amax(x) -> float:
    return float(np.max(np.abs(x)))


def _cap(vec: np.ndarray, limit: float, norm=_norm) -> tuple[np.ndarray, bool]:
    """``vec`` scaled down to ``norm(vec) <= limit`` (direction kept); whether it had to be."""
    n = norm(vec)
    if n > limit * (1 + _TOL):
        return vec * (limit / n), True
    return vec, False


def _add(fired: list[str], rules) -> None:
    for r in rules:
        if r not in fired:
            fired.append(r)


class SafetyEnvelope:
    """Checks and clamps commands. Stateless apart from the config; the caller keeps the command history.

    Two levels:

    * policy actions (:meth:`action_joint`, :meth:`action_tcp`): per-step clamps, joint limits, workspace;
    * streamed servo commands (:meth:`servo_joint`, :meth:`servo_tcp`): joint limits, workspace, joint and TCP
      speed and acceleration at the servo period ``dt``, from a :class:`ServoState` to the next one. A stream
      always stays able to stop inside the joint limits and the workspace without braking harder than the
      acceleration limits. The runner sends nothing that did not pass here.
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

    def _box_ok(self, p_from, points) -> bool:
        """Every point inside the box; from outside it, none farther from it than ``p_from`` is."""
        if self.in_workspace(p_from):
            return all(self.in_workspace(p) for p in points)
        d0 = self._box_distance(p_from) + 1e-9
        return all(self._box_distance(p) <= d0 for p in points)

    def _joints_ok(self, q_from, points) -> bool:
        """Every joint vector inside the limits; a joint already outside them may only come back."""
        lo = np.minimum(self.jmin, q_from) - 1e-9
        hi = np.maximum(self.jmax, q_from) + 1e-9
        return all(bool(np.all(q >= lo) and np.all(q <= hi)) for q in points)

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
    def stop_time(self, qd, v, w) -> float:
        """Seconds a stream moving at joint velocity ``qd`` (TCP ``v``, ``w``) takes to stop when it brakes at half
        the acceleration limits (every velocity at the same rate)."""
        c = self.config
        return max(_amax(qd) / c.max_joint_acc, _norm(v) / c.max_tcp_acc, _norm(w) / c.max_tcp_rot_acc) / _BRAKE

    def stop_target(self, state: ServoState, kind: str) -> np.ndarray:
        """Where ``state`` comes to rest when it brakes at the acceleration limits (a ``hold`` target)."""
        t = self.stop_time(state.qd, state.v, state.w) / 2
        if kind == "joint":
            return state.q + state.qd * t
        T = pose_to_matrix(state.pose)
        T[:3, :3] = rotvec_to_matrix(state.w * t) @ T[:3, :3]
        T[:3, 3] += state.v * t
        return matrix_to_pose(T)

    def _brake_factor(self, state: ServoState, dt: float) -> float:
        """Velocity scale of one braking step: slows every velocity at the same rate, within every limit."""
        t = self.stop_time(state.qd, state.v, state.w)
        return max(0.0, 1.0 - dt / t) if t > dt else 0.0

    def _lag(self, state: ServoState, kind: str) -> np.ndarray | None:
        """From the current command to the previous waypoint of the same kind (None: there is none)."""
        if state.target is None or state.target_kind != kind:
            return None
        if kind == "joint":
            return state.target - state.q
        T_prev, T_t = pose_to_matrix(state.pose), pose_to_matrix(state.target)
        return np.concatenate([T_t[:3, 3] - T_prev[:3, 3], relative_rotvec(T_t[:3, :3], T_prev[:3, :3])])

    @staticmethod
    def _desired(error: np.ndarray, lag: np.ndarray | None, dt: float, norm, acc: float) -> np.ndarray:
        """Velocity toward a waypoint ``error`` away: the waypoints' own velocity (feed-forward) plus a correction
        of the ``lag`` behind the previous waypoint (None: there is none) slow enough to brake to a stop on it."""
        if lag is None:
            return error / dt
        d = norm(lag)
        return (error - lag) / dt + (lag * (stop_speed(d, acc, dt) / d) if d > 0 else 0.0)

    @staticmethod
    def _fit(vec: np.ndarray, limits, fired: list[str], rule: str) -> np.ndarray:
        """``vec`` scaled down until every ``(image, limit)`` pair holds: ``norm(M @ vec) <= limit`` per pair."""
        scale = 1.0
        for image, limit in limits:
            n = image(vec)
            if n > limit * (1 + _TOL):
                scale = min(scale, limit / n)
        if scale < 1.0:
            _add(fired, [rule])
        return vec * scale

    def _search(self, state: ServoState, v, v_brake, step, fired: list[str]):
        """The step ``v`` if it passes every check, else the largest fraction of the way from braking to ``v`` that
        does (bisection); braking itself when nothing else does. ``step(state, v) -> (result, failed rules)``."""
        nxt, failed = step(state, v)
        if not failed:
            return nxt
        _add(fired, failed)
        best, failed_b = step(state, v_brake)
        if failed_b:
            return best  # braking is the safest thing left; the fired rules say why it was needed
        lo, hi = 0.0, 1.0
        for _ in range(10):
            mid = 0.5 * (lo + hi)
            cand, f = step(state, v_brake + mid * (v - v_brake))
            if f:
                hi = mid
            else:
                lo, best = mid, cand
        return best

    def servo_joint(self, state: ServoState, q_target, dt: float) -> tuple[Checked, ServoState]:
        """One servoJ target ``dt`` after ``state``: finite, joint limits, joint speed/acceleration, TCP
        speed/acceleration, workspace. Returns the checked target and the state it leads to."""
        c = self.config
        q_target = self.require_finite(q_target, "servoJ target")
        fired: list[str] = []
        q_t, clipped = self.clamp_joint_limits(q_target)
        if clipped:
            fired.append("joint_limits")
        # linearised TCP limits (the Jacobian at the current command) keep the exact checks below mostly passing
        J = self.kin.jacobian(state.q)
        lin, rot = (lambda x: _norm(J[:3] @ x)), (lambda x: _norm(J[3:] @ x))
        lag = self._lag(state, "joint")
        u = lag if lag is not None and _amax(lag) > 0 else q_t - state.q
        acc = c.max_joint_acc
        if _amax(u) > 0:
            u = u / _amax(u)
            acc = min(acc, _LINEAR * c.max_tcp_acc / max(lin(u), 1e-9), _LINEAR * c.max_tcp_rot_acc / max(rot(u), 1e-9))
        v = self._desired(q_t - state.q, lag, dt, _amax, acc)
        v = self._fit(v, [(_amax, c.max_joint_speed)], fired, "joint_speed")
        v = self._fit(v, [(lin, _LINEAR_SPEED * c.max_tcp_speed), (rot, _LINEAR_SPEED * c.max_tcp_rot_speed)], fired,
                      "tcp_speed")
        dv = self._fit(v - state.qd, [(_amax, c.max_joint_acc * dt)], fired, "joint_acc")
        dv = self._fit(dv, [(lin, _LINEAR * c.max_tcp_acc * dt), (rot, _LINEAR * c.max_tcp_rot_acc * dt)], fired,
                       "tcp_acc")
        v_brake = state.qd * self._brake_factor(state, dt)
        nxt = self._search(state, state.qd + dv, v_brake, lambda s, qd: self._joint_step(s, qd, dt), fired)
        q_hard, _ = self.clamp_joint_limits(nxt.q) if self._joints_ok(state.q, (state.q,)) else (nxt.q, False)
        f = self._workspace_fraction(state.q, q_hard - state.q)
        if f < 1.0 or np.any(q_hard != nxt.q):  # last resort, never needed while braking fits: stop at the boundary
            _add(fired, ["workspace" if f < 1.0 else "joint_limits"])
            nxt, _ = self._joint_step(state, f * (q_hard - state.q) / dt, dt)
        nxt = replace(nxt, target=q_t, target_kind="joint")
        return Checked(nxt.q, fired, held=bool(np.allclose(nxt.q, state.q)) and bool(fired)), nxt

    def _joint_step(self, state: ServoState, qd: np.ndarray, dt: float) -> tuple[ServoState, list[str]]:
        c = self.config
        q = state.q + qd * dt
        T = self.kin.fk(q)
        T_prev = pose_to_matrix(state.pose)
        v = (T[:3, 3] - T_prev[:3, 3]) / dt
        w = relative_rotvec(T[:3, :3], T_prev[:3, :3]) / dt
        failed = []
        if _norm(v) > c.max_tcp_speed * (1 + _TOL) or _norm(w) > c.max_tcp_rot_speed * (1 + _TOL):
            failed.append("tcp_speed")
        if (_norm(v - state.v) > c.max_tcp_acc * dt * (1 + _TOL)
                or _norm(w - state.w) > c.max_tcp_rot_acc * dt * (1 + _TOL)):
            failed.append("tcp_acc")
        q_stop = q + qd * (_PREDICT * self.stop_time(qd, v, w) / 2)  # braking every joint at one rate: a straight line
        if not self._joints_ok(state.q, (q, q_stop)):
            failed.append("joint_limits")
        path = [T[:3, 3]]
        if np.any(q_stop != q):
            path += [self.kin.fk(0.5 * (q + q_stop))[:3, 3], self.kin.fk(q_stop)[:3, 3]]
        if not self._box_ok(T_prev[:3, 3], path):
            failed.append("workspace")
        return ServoState(q, matrix_to_pose(T), qd, v, w), failed

    def servo_tcp(self, state: ServoState, pose_target, dt: float) -> tuple[Checked, ServoState]:
        """One servoL target ``dt`` after ``state``: finite, workspace, TCP speed/acceleration, and the joint
        limits, speed and acceleration of its inverse kinematics. Returns the checked pose and the next state."""
        c = self.config
        T_t = pose_to_matrix(self.require_finite(pose_target, "servoL target"))
        fired: list[str] = []
        p_t = np.clip(T_t[:3, 3], self.wmin, self.wmax)
        if np.any(p_t != T_t[:3, 3]):
            fired.append("workspace")
            T_t[:3, 3] = p_t
        target = matrix_to_pose(T_t)
        T_prev = pose_to_matrix(state.pose)
        error = np.concatenate([p_t - T_prev[:3, 3], relative_rotvec(T_t[:3, :3], T_prev[:3, :3])])
        # joint velocity per TCP twist (damped inverse of the Jacobian at the current command): the linearised joint
        # limits keep the exact checks of the inverse kinematics below mostly passing
        J = self.kin.jacobian(state.q)
        J_inv = J.T @ np.linalg.inv(J @ J.T + 1e-6 * np.eye(6))
        joints = lambda x: _amax(J_inv @ x)  # noqa: E731
        lag = self._lag(state, "tcp")
        vw = np.zeros(6)
        for part, a_max in ((slice(0, 3), c.max_tcp_acc), (slice(3, 6), c.max_tcp_rot_acc)):
            u = np.zeros(6)
            u[part] = (lag if lag is not None and _norm(lag[part]) > 0 else error)[part]
            acc = a_max if _norm(u) == 0 else min(a_max, _LINEAR * c.max_joint_acc * _norm(u) / max(joints(u), 1e-9))
            vw[part] = self._desired(error[part], None if lag is None else lag[part], dt, _norm, acc)
        vw = self._fit(vw, [(lambda x: _norm(x[:3]), c.max_tcp_speed), (lambda x: _norm(x[3:]), c.max_tcp_rot_speed)],
                       fired, "tcp_speed")
        vw = self._fit(vw, [(joints, _LINEAR_SPEED * c.max_joint_speed)], fired, "joint_speed")
        prev = np.concatenate([state.v, state.w])
        dvw = self._fit(vw - prev, [(lambda x: _norm(x[:3]), c.max_tcp_acc * dt),
                                    (lambda x: _norm(x[3:]), c.max_tcp_rot_acc * dt)], fired, "tcp_acc")
        dvw = self._fit(dvw, [(joints, _LINEAR * c.max_joint_acc * dt)], fired, "joint_acc")
        vw_brake = prev * self._brake_factor(state, dt)
        # the workspace first (no inverse kinematics needed), then the joint-level checks of the IK solution
        vw = self._search(state, prev + dvw, vw_brake, lambda s, x: self._tcp_box(s, x, dt, J_inv), fired)
        if self.in_workspace(state.pose) and not self.in_workspace(state.pose[:3] + vw[:3] * dt):
            _add(fired, ["workspace"])  # last resort, never needed while braking fits: stop at the boundary
            vw[:3] = (np.clip(state.pose[:3] + vw[:3] * dt, self.wmin, self.wmax) - state.pose[:3]) / dt
        nxt = self._search(state, vw, vw_brake, lambda s, x: self._tcp_step(s, x, dt), fired)
        if nxt is None:  # not even braking has an inverse kinematics solution inside the joint limits
            _add(fired, ["joint_limits"])
            return Checked(np.asarray(state.pose, float), fired, held=True), ServoState.at_rest(state.q, state.pose)
        nxt = replace(nxt, target=target, target_kind="tcp")
        return Checked(nxt.pose, fired, held=bool(np.allclose(nxt.pose, state.pose)) and bool(fired)), nxt

    def _tcp_box(self, state: ServoState, vw: np.ndarray, dt: float, J_inv) -> tuple[np.ndarray, list[str]]:
        p = state.pose[:3] + vw[:3] * dt
        stop = p + vw[:3] * (_PREDICT * self.stop_time(J_inv @ vw, vw[:3], vw[3:]) / 2)  # braking: a straight line
        return vw, ([] if self._box_ok(state.pose[:3], (p, stop)) else ["workspace"])

    def _tcp_step(self, state: ServoState, vw: np.ndarray, dt: float) -> tuple[ServoState | None, list[str]]:
        c = self.config
        T = pose_to_matrix(state.pose)
        T[:3, :3] = rotvec_to_matrix(vw[3:] * dt) @ T[:3, :3]
        T[:3, 3] += vw[:3] * dt
        q, ok = self.kin.ik(T, state.q)
        if not ok or not self._joints_ok(state.q, (q,)):
            return None, ["joint_limits"]
        qd = (q - state.q) / dt
        failed = []
        if _amax(qd) > c.max_joint_speed * (1 + _TOL):
            failed.append("joint_speed")
        if _amax(qd - state.qd) > c.max_joint_acc * dt * (1 + _TOL):
            failed.append("joint_acc")
        return ServoState(q, matrix_to_pose(T), qd, vw[:3].copy(), vw[3:].copy()), failed

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
