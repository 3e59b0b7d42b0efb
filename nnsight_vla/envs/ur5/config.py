"""How episodes run on the arm (:class:`UR5Config`: everything but the policy, the conditions and the safety
limits) and the config file that holds it with the safety limits (:func:`load_config`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from ...errors import RobotConfigError, SafetyConfigError
from .kinematics import DEFAULT_HOME_Q
from .safety import SafetyConfig, load_mapping

ACTION_SPACES = ("auto", "joint_delta", "joint_abs", "tcp_delta")
#: default action space per family: π0 on the UR5 predicts chunks of delta joint targets (paper, openpi UR5)
FAMILY_ACTION_SPACE = {"openvla": "tcp_delta", "pi0": "joint_delta", "pi0-fast": "joint_delta"}
#: gripper convention per family: True = a value above the threshold closes (π0/DROID position 0 open .. 1
#: closed), False = a value below it closes (OpenVLA: 1 = open)
FAMILY_GRIPPER_CLOSE_ABOVE = {"openvla": False, "pi0": True, "pi0-fast": True}


def is_count(value: Any, minimum: int = 1) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


@dataclass(frozen=True)
class UR5Config:
    """How episodes run on the arm (everything but the policy, the conditions and the safety limits).

    Args:
        task: name of the task (the episode key's task), e.g. ``"transport_high"``.
        instruction: the task instruction given to the policy (a condition may rewrite it).
        max_steps: policy actions per episode.
        action_hz: policy actions per second; each action is interpolated over ``1/action_hz`` seconds.
        servo_hz: servoJ/servoL commands per second (125 suits CB3 and e-Series controllers).
        action_space: ``auto`` (by family: π0/π0-FAST ``joint_delta``, OpenVLA ``tcp_delta``), ``joint_delta``
            (action[:6] are joint offsets, rad), ``joint_abs`` (absolute joint targets) or ``tcp_delta``
            (dx, dy, dz in m and droll, dpitch, dyaw in rad, base frame).
        delta_reference: what a delta is relative to: ``chunk_start`` (the joints/TCP observed when the action or
            chunk was predicted; openpi's convention for joint chunks), ``previous`` (the previous action's target)
            or ``auto`` (``chunk_start`` for joint deltas, ``previous`` for TCP deltas: single TCP deltas applied to
            the measured pose undershoot by the servo lag, ~lookahead x speed).
        action_scale: multiplies the position part of every action (1.0 for real checkpoints).
        open_loop_steps: rows of a chunk executed before the policy is queried again (None: 1 for single
            actions, ``min(horizon, 8)`` for chunks).
        gripper: ``io`` (a standard digital output drives the gripper) or ``none``.
        gripper_pin, gripper_index, gripper_threshold, gripper_close_above: which output, which action entry,
            and the threshold/direction (None: by family) that closes the gripper.
        home_q: joint pose (rad) the arm moves to (moveJ, slow) before every episode; None: start where it is.
        settle_s: wait after reaching ``home_q``.
        cameras: ``{model camera name: source}``; sources: an OpenCV device index (``"0"``), a device path or
            stream URL, or ``"twin:scene"`` / ``"twin:wrist"`` (the controller twin's renders).
        image_size: resize camera frames to this square size (None: the policy's ``image_size`` if it has one).
        expected_model / expected_serial: refuse to run on another robot (dashboard ``get robot model`` / serial).
        connect_timeout: seconds for each preliminary socket check.
        video: keep scene frames of each episode in the results' ``media/``.
    """

    task: str = "transport"
    instruction: str = "pick up the toy and move it to the right"
    max_steps: int = 50
    action_hz: float = 10.0
    servo_hz: float = 125.0
    action_space: str = "auto"
    delta_reference: str = "auto"
    action_scale: float = 1.0
    open_loop_steps: int | None = None
    gripper: str = "io"
    gripper_pin: int = 0
    gripper_index: int | None = 6
    gripper_threshold: float = 0.5
    gripper_close_above: bool | None = None
    home_q: tuple[float, ...] | None = DEFAULT_HOME_Q
    settle_s: float = 0.2
    cameras: tuple[tuple[str, str], ...] = (("primary", "0"), ("base", "0"), ("wrist", "1"))
    image_size: int | None = None
    expected_model: str = "UR5"
    expected_serial: str | None = None
    connect_timeout: float = 0.5
    seed: int = 7
    video: bool = False

    def __post_init__(self) -> None:
        cams = self.cameras
        if isinstance(cams, Mapping):
            cams = tuple((str(k), str(v)) for k, v in cams.items())
        object.__setattr__(self, "cameras", tuple((str(k), str(v)) for k, v in cams))
        if self.home_q is not None:
            object.__setattr__(self, "home_q", tuple(float(v) for v in self.home_q))
        checks = [
            (is_count(self.max_steps), f"max_steps must be an int >= 1, got {self.max_steps!r}"),
            (0 < float(self.action_hz) <= 50, f"action_hz must be in (0, 50], got {self.action_hz!r}"),
            (10 <= float(self.servo_hz) <= 500, f"servo_hz must be in 10..500, got {self.servo_hz!r}"),
            (float(self.servo_hz) >= float(self.action_hz), "servo_hz must be >= action_hz"),
            (self.action_space in ACTION_SPACES,
             f"action_space must be one of {ACTION_SPACES}, got {self.action_space!r}"),
            (self.delta_reference in ("auto", "chunk_start", "previous"),
             f"delta_reference must be 'auto', 'chunk_start' or 'previous', got {self.delta_reference!r}"),
            (math.isfinite(float(self.action_scale)) and float(self.action_scale) > 0,
             f"action_scale must be a finite number > 0, got {self.action_scale!r}"),
            (self.open_loop_steps is None or is_count(self.open_loop_steps),
             f"open_loop_steps must be None or an int >= 1, got {self.open_loop_steps!r}"),
            (self.gripper in ("io", "none"), f"gripper must be 'io' or 'none', got {self.gripper!r}"),
            (is_count(self.gripper_pin, 0) and self.gripper_pin <= 7,
             f"gripper_pin must be 0..7, got {self.gripper_pin!r}"),
            (self.gripper_index is None or is_count(self.gripper_index, 0),
             f"gripper_index must be None or an int >= 0, got {self.gripper_index!r}"),
            (math.isfinite(float(self.gripper_threshold)),
             f"gripper_threshold must be finite, got {self.gripper_threshold!r}"),
            (self.home_q is None or (len(self.home_q) == 6 and all(math.isfinite(v) for v in self.home_q)),
             "home_q must be None or 6 finite joint angles (rad)"),
            (self.image_size is None or is_count(self.image_size, 8),
             f"image_size must be None or an int >= 8, got {self.image_size!r}"),
            (0 < float(self.connect_timeout) <= 10,
             f"connect_timeout must be in (0, 10] s, got {self.connect_timeout!r}"),
            (float(self.settle_s) >= 0, "settle_s must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise RobotConfigError(message)

    @property
    def camera_map(self) -> dict[str, str]:
        return dict(self.cameras)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "UR5Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RobotConfigError(f"unknown robot config key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        return cls(**dict(data))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cameras"] = dict(self.cameras)
        return d


def load_config(path: str | os.PathLike | None) -> tuple[UR5Config, SafetyConfig]:
    """Read a YAML/JSON file with optional ``robot:`` and ``safety:`` sections (defaults for what is missing)."""
    if path is None:
        return UR5Config(), SafetyConfig()
    try:
        data = load_mapping(path)
    except SafetyConfigError as e:
        raise RobotConfigError(str(e)) from None
    unknown = sorted(set(data) - {"robot", "safety"})
    if unknown:
        raise RobotConfigError(f"config file {path}: unknown section(s) {unknown}; allowed: robot, safety")
    return UR5Config.from_dict(data.get("robot") or {}), SafetyConfig.from_dict(data.get("safety") or {})
