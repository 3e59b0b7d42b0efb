"""Run (steered) VLA policies on a Universal Robots arm (UR5) through the real ``ur_rtde`` client, safely.

Safe by default:

* **dry run unless armed**: without ``armed=True`` (``--armed``) nothing that could move the arm is created or
  sent: only ``rtde_receive`` (read-only state) and a few read-only dashboard queries; every command the run
  *would* send is checked by the safety envelope and logged (Python logging and the command log);
* every command passes the :class:`~nnsight_vla.envs.safety.SafetyEnvelope` first (workspace box, joint limits,
  joint/TCP speed and acceleration, per-step clamps, NaN refusal);
* a watchdog stops the arm when the policy does not answer in time; a lost connection, a protective or
  emergency stop, a stopped control program or stale robot state halt the run (:class:`RobotHalted`), and a
  halted robot never resumes by itself;
* connecting checks the controller first with short timeouts on plain sockets (an unreachable host fails in
  well under a second, a controller that accepts but never answers fails instead of hanging: ur_rtde's
  constructors would wait forever holding the GIL), then checks the robot model (and serial) and that the
  reported TCP matches the model's kinematics.

Policies: anything with the surface of ``POLICY_INTERFACE.md`` (``family``, ``camera_names``, ``state_dim``,
``action_dim``, ``action_horizon``, ``predict_action``). π0 / π0-FAST chunks are executed as joint-delta targets
with servoJ (or TCP deltas with servoL), OpenVLA-style single actions as TCP deltas with servoL, each action
interpolated over ``1 / action_hz`` at ``servo_hz``. Conditions (baseline, steered, random control, prompt
baseline) come from :mod:`nnsight_vla.envs.conditions`; per-step logs, the results store and statistics from
:mod:`nnsight_vla.envs.episodes`; figures from :mod:`nnsight_vla.plots` (height, per-step and cumulative
displacement), exactly as for LIBERO.

Rehearse against the controller twin first (:mod:`nnsight_vla.envs.ur5_twin`)::

    nnsight-vla ur5 twin &                                   # a fake UR5 on 127.0.0.1 (MuJoCo inside)
    nnsight-vla ur5 run --host 127.0.0.1 --cameras twin      # dry run: logs what it would send
    nnsight-vla ur5 run --host 127.0.0.1 --cameras twin --armed
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import math
import os
import queue
import re
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy.spatial.transform import Rotation  # at import, never inside the servo loop (see safety.py)

from ..errors import InputError, VLAError
from .conditions import Condition, baseline, check_unique
from .episodes import Episode, EpisodeKey, EpisodeRecorder, ResultsStore, _jsonable
from .scripted import ScriptedPolicyBase
from .safety import (
    Checked,
    RobotHalted,
    SafetyConfig,
    SafetyConfigError,
    SafetyEnvelope,
    SafetyViolation,
    URKinematics,
    Watchdog,
    load_mapping,
    matrix_to_pose,
    pose_to_matrix,
)
from ..errors import RobotError, RobotConnectionError, RobotModelError, CameraError, RobotConfigError  # noqa: F401 (re-exported)

__all__ = [
    "UR5Config", "UR5Robot", "ControllerInfo", "RobotState", "probe_controller", "run_episode", "run_conditions",
    "run_cli", "UR5ScriptedPolicy", "CameraSource", "OpenCVCamera", "TwinCamera", "open_camera", "Gripper",
    "IOGripper", "RobotError", "RobotConnectionError", "RobotModelError", "CameraError", "RobotConfigError",
    "RobotHalted", "SafetyViolation", "DEFAULT_HOME_Q", "SweepResult",
]

log = logging.getLogger("nnsight_vla.ur5")

DEFAULT_HOME_Q = (0.0, -math.pi / 2, math.pi / 2, -math.pi / 2, -math.pi / 2, 0.0)
RTDE_PORT, SCRIPT_PORT, DASHBOARD_PORT = 30004, 30003, 29999
ACTION_SPACES = ("auto", "joint_delta", "joint_abs", "tcp_delta")
#: default action space per family: π0 on the UR5 predicts chunks of delta joint targets (paper, openpi UR5)
FAMILY_ACTION_SPACE = {"openvla": "tcp_delta", "pi0": "joint_delta", "pi0-fast": "joint_delta"}
#: gripper convention per family: True = a value above the threshold closes (π0/DROID position 0 open .. 1
#: closed), False = a value below it closes (OpenVLA: 1 = open)
FAMILY_GRIPPER_CLOSE_ABOVE = {"openvla": False, "pi0": True, "pi0-fast": True}


# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------


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
            (isinstance(self.max_steps, int) and self.max_steps >= 1,
             f"max_steps must be an int >= 1, got {self.max_steps!r}"),
            (0 < float(self.action_hz) <= 50, f"action_hz must be in (0, 50], got {self.action_hz!r}"),
            (10 <= float(self.servo_hz) <= 500, f"servo_hz must be in 10..500, got {self.servo_hz!r}"),
            (float(self.servo_hz) >= float(self.action_hz), "servo_hz must be >= action_hz"),
            (self.action_space in ACTION_SPACES,
             f"action_space must be one of {ACTION_SPACES}, got {self.action_space!r}"),
            (self.delta_reference in ("auto", "chunk_start", "previous"),
             f"delta_reference must be 'auto', 'chunk_start' or 'previous', got {self.delta_reference!r}"),
            (math.isfinite(float(self.action_scale)) and float(self.action_scale) > 0,
             f"action_scale must be a finite number > 0, got {self.action_scale!r}"),
            (self.open_loop_steps is None or (isinstance(self.open_loop_steps, int) and self.open_loop_steps >= 1),
             f"open_loop_steps must be None or an int >= 1, got {self.open_loop_steps!r}"),
            (self.gripper in ("io", "none"), f"gripper must be 'io' or 'none', got {self.gripper!r}"),
            (isinstance(self.gripper_pin, int) and 0 <= self.gripper_pin <= 7,
             f"gripper_pin must be 0..7, got {self.gripper_pin!r}"),
            (self.home_q is None or (len(self.home_q) == 6 and all(math.isfinite(v) for v in self.home_q)),
             "home_q must be None or 6 finite joint angles (rad)"),
            (self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 8),
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


# ----------------------------------------------------------------------------------------------------------
# preliminary checks on plain sockets (never hang)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerInfo:
    """What the controller said about itself before any ur_rtde object was created."""

    host: str
    polyscope: str
    version: tuple[int, ...]
    model: str
    serial: str
    robot_mode: str
    safety_mode: str
    rtde_version: tuple[int, int, int, int]

    @property
    def e_series(self) -> bool:
        return self.rtde_version[0] >= 5


def _socket_error(host: str, port: int, what: str, exc: BaseException, timeout: float) -> RobotConnectionError:
    if isinstance(exc, socket.gaierror):
        msg = f"unknown host name {host!r} ({exc.strerror})"
    elif isinstance(exc, ConnectionRefusedError):
        msg = (f"nothing listens on {host}:{port} ({what}): the controller is off, the IP is wrong, or it is not a "
               "UR controller (start `nnsight-vla ur5 twin` to rehearse without a robot)")
    elif isinstance(exc, (socket.timeout, TimeoutError)):
        msg = f"no answer from {host}:{port} ({what}) within {timeout:.2f} s: host unreachable or the controller hangs"
    else:
        msg = f"cannot reach {host}:{port} ({what}): {getattr(exc, 'strerror', None) or exc}"
    return RobotConnectionError(f"UR controller at {host}: {msg}")


def _connect(host: str, port: int, what: str, timeout: float) -> socket.socket:
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise _socket_error(host, port, what, e, timeout) from None


def _dashboard_queries(host: str, port: int, commands: Sequence[str], timeout: float) -> list[str]:
    sock = _connect(host, port, "dashboard server", timeout)
    try:
        sock.settimeout(timeout)
        f = sock.makefile("rb")
        greeting = f.readline()
        if not greeting:
            raise RobotConnectionError(f"UR controller at {host}: the dashboard server closed the connection at once")
        out = []
        for cmd in commands:
            sock.sendall((cmd + "\n").encode())
            line = f.readline()
            if not line:
                raise RobotConnectionError(f"UR controller at {host}: the dashboard server hung up after {cmd!r}")
            out.append(line.decode("utf-8", "replace").strip())
        with contextlib.suppress(OSError):
            sock.sendall(b"quit\n")
        return out
    except (socket.timeout, TimeoutError):
        raise RobotConnectionError(
            f"UR controller at {host}: the dashboard server (port {port}) accepted the connection but did not answer "
            f"within {timeout:.2f} s; the controller hangs or this is not a UR dashboard server") from None
    except OSError as e:
        raise _socket_error(host, port, "dashboard server", e, timeout) from None
    finally:
        sock.close()


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def _rtde_handshake(host: str, port: int, timeout: float) -> tuple[int, int, int, int]:
    sock = _connect(host, port, "RTDE", timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">HBH", 5, ord("V"), 2))
        size, typ = struct.unpack(">HB", _recv_exact(sock, 3))
        body = _recv_exact(sock, size - 3)
        if typ != ord("V") or not body or body[0] != 1:
            raise RobotConnectionError(f"UR controller at {host}: RTDE (port {port}) refused protocol version 2")
        sock.sendall(struct.pack(">HB", 3, ord("v")))
        size, typ = struct.unpack(">HB", _recv_exact(sock, 3))
        body = _recv_exact(sock, size - 3)
        if typ != ord("v") or len(body) < 16:
            raise RobotConnectionError(f"UR controller at {host}: RTDE (port {port}) sent no controller version")
        return struct.unpack(">IIII", body[:16])
    except (socket.timeout, TimeoutError):
        raise RobotConnectionError(
            f"UR controller at {host}: RTDE (port {port}) accepted the connection but did not answer within "
            f"{timeout:.2f} s; the controller hangs (ur_rtde would wait forever here)") from None
    except (ConnectionError, OSError, struct.error) as e:
        if isinstance(e, RobotConnectionError):
            raise
        raise _socket_error(host, port, "RTDE", e, timeout) from None
    finally:
        sock.close()


def probe_controller(host: str, timeout: float = 0.5, *, check_script_port: bool = False) -> ControllerInfo:
    """Ask the controller who it is, on plain sockets with ``timeout`` per step; never hangs.

    Raises :class:`RobotConnectionError` with the reason (refused, unreachable, hung, not a UR controller)."""
    if not isinstance(host, str) or not host.strip():
        raise RobotConnectionError(f"robot host must be an IP address or host name, got {host!r}")
    answers = _dashboard_queries(host, DASHBOARD_PORT, ["PolyscopeVersion", "get robot model", "get serial number",
                                                         "robotmode", "safetymode"], timeout)
    m = re.search(r"(\d+)\.(\d+)\.(\d+)\.(\d+)", answers[0])
    if not m:
        raise RobotConnectionError(f"UR controller at {host}: unexpected PolyscopeVersion answer {answers[0]!r}")
    version = tuple(int(v) for v in m.groups())
    rtde_version = _rtde_handshake(host, RTDE_PORT, timeout)
    if check_script_port:
        _connect(host, SCRIPT_PORT, "script/primary interface", timeout).close()

    def after_colon(text: str) -> str:
        return text.split(":", 1)[1].strip() if ":" in text else text.strip()

    return ControllerInfo(host=host, polyscope=".".join(map(str, version)), version=version, model=answers[1].strip(),
                          serial=answers[2].strip(), robot_mode=after_colon(answers[3]),
                          safety_mode=after_colon(answers[4]), rtde_version=tuple(rtde_version))


def check_model(info: ControllerInfo, expected_model: str | None, expected_serial: str | None = None) -> None:
    """Raise :class:`RobotModelError` unless the controller is the expected robot.

    e-Series dashboards may answer ``UR5`` for a UR5e; that counts as a match for ``expected_model="UR5e"``
    only on an e-Series controller (PolyScope 5+)."""
    if expected_model:
        got, want = info.model.strip().upper(), expected_model.strip().upper()
        ok = got == want or (want.endswith("E") and got == want[:-1] and info.version[0] >= 5)
        if not ok:
            raise RobotModelError(
                f"the controller at {info.host} reports a {info.model!r} (PolyScope {info.polyscope}, serial "
                f"{info.serial}), but this run expects a {expected_model!r}. Wrong robot or wrong IP? Set "
                "expected_model in the config if this is intended.")
    if expected_serial and info.serial.strip() != str(expected_serial).strip():
        raise RobotModelError(f"the controller at {info.host} has serial number {info.serial!r}, but this run "
                              f"expects {expected_serial!r}; wrong robot?")


# ----------------------------------------------------------------------------------------------------------
# cameras
# ----------------------------------------------------------------------------------------------------------


class CameraSource(ABC):
    """A camera: ``read()`` returns an HxWx3 uint8 RGB frame or raises :class:`CameraError`."""

    name: str = "camera"

    @abstractmethod
    def read(self) -> np.ndarray: ...

    def close(self) -> None:  # noqa: B027 - optional
        pass


class OpenCVCamera(CameraSource):
    """An OpenCV ``VideoCapture`` device (index, device path or stream URL); frames converted BGR -> RGB."""

    def __init__(self, device: int | str = 0, *, width: int | None = None, height: int | None = None,
                 warmup: int = 2):
        try:
            import cv2
        except ImportError:
            raise CameraError("camera needs OpenCV: pip install opencv-python (or configure another camera "
                              "source, e.g. 'twin:scene' when rehearsing with the controller twin)") from None
        self._cv2 = cv2
        self.name = f"opencv:{device}"
        self.device = device
        cap = cv2.VideoCapture(device)
        if not cap.isOpened():
            cap.release()
            raise CameraError(f"camera {device!r} could not be opened (no such device, busy, or no permission); "
                              "check the cable and `ls /dev/video*`, or set the robot config's cameras")
        if width:
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        if height:
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        self.cap = cap
        for _ in range(warmup):
            cap.read()

    def read(self) -> np.ndarray:
        ok, frame = self.cap.read()
        if not ok or frame is None:
            raise CameraError(f"camera {self.device!r} returned no frame (unplugged or stalled)")
        return self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        self.cap.release()


class TwinCamera(CameraSource):
    """A camera of the controller twin (``scene`` or ``wrist``), rendered by its MuJoCo scene."""

    def __init__(self, host: str, camera: str = "scene", *, port: int = 30020, timeout: float = 10.0):
        from .ur5_twin import TwinClient, TwinError

        if camera not in ("scene", "wrist"):
            raise CameraError(f"the controller twin has cameras 'scene' and 'wrist', not {camera!r}")
        self.name = f"twin:{camera}"
        self.camera = camera
        self.client = TwinClient(host, port, timeout=timeout)
        self._twin_error = TwinError
        try:
            self.read()
        except CameraError:
            self.client.close()
            raise

    def read(self) -> np.ndarray:
        try:
            return self.client.render([self.camera])[self.camera]
        except (self._twin_error, OSError) as e:
            raise CameraError(f"twin camera {self.camera!r} at {self.client.host}: {e}") from None

    def close(self) -> None:
        self.client.close()


def open_camera(spec: str | int, host: str | None = None) -> CameraSource:
    """A camera from a spec: ``"twin:scene"``, ``"twin:wrist"``, an OpenCV index (``"0"``), a path or a URL."""
    if isinstance(spec, str) and spec.startswith("twin:"):
        if host is None:
            raise CameraError(f"camera {spec!r} needs the twin's host")
        return TwinCamera(host, spec.split(":", 1)[1])
    if isinstance(spec, str) and spec.strip().isdigit():
        spec = int(spec)
    return OpenCVCamera(spec)


# ----------------------------------------------------------------------------------------------------------
# robot state and the safe robot
# ----------------------------------------------------------------------------------------------------------


@dataclass
class RobotState:
    """One reading of the robot (joint angles in rad, poses ``[x, y, z, rx, ry, rz]`` in the base frame)."""

    time: float  # time.monotonic() when read
    timestamp: float  # controller time (s)
    age_s: float  # how long the controller timestamp has not advanced
    q: np.ndarray
    qd: np.ndarray
    tcp_pose: np.ndarray
    tcp_speed: np.ndarray
    robot_mode: int
    safety_mode: int
    runtime_state: int
    digital_out: int
    connected: bool
    program_running: bool | None = None

    @property
    def tcp_xyz(self) -> np.ndarray:
        return self.tcp_pose[:3]

    def to_dict(self) -> dict:
        return _jsonable(asdict(self))


_QUARANTINE: list = []  # ur_rtde objects that must never be destroyed (see _quarantine)


def _quarantine(obj: Any) -> None:
    """Keep a ur_rtde object alive forever.

    After a lost connection, ``RTDEIOInterface``'s destructor throws inside C++ and aborts the whole process
    (``std::terminate``), at garbage collection or at interpreter exit. Leaking one reference keeps CPython from
    ever destroying it."""
    if obj is None:
        return
    _QUARANTINE.append(obj)
    with contextlib.suppress(Exception):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


def _call_with_timeout(fn: Callable[[], Any], timeout: float, what: str) -> tuple[bool, Any]:
    """Run a blocking ur_rtde call in a daemon thread (ur_rtde releases the GIL while it waits).

    Non-realtime commands (stopJ, servoStop, moveJ...) wait up to 300 s for a controller that went away;
    this returns (False, None) after ``timeout`` and leaves the call behind."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except Exception as e:  # reported to the caller
            result["error"] = e

    th = threading.Thread(target=run, name=f"ur_rtde {what}", daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        log.error("ur_rtde %s did not return within %.1f s (controller gone?); continuing without it", what, timeout)
        return False, None
    if "error" in result:
        log.error("ur_rtde %s failed: %s", what, result["error"])
        return False, None
    return True, result.get("value")


class _Caller:
    """One worker thread that runs realtime ur_rtde calls (servoJ, servoL, digital outputs, watchdog kicks) so
    that the control loop can give up on a call that blocks.

    Why: on a connection that dies between our check and the call, ur_rtde's ``sendCommand`` tries to
    *reconnect* inside the call (dashboard connect with its own multi-second timeout) and then raises
    ``RuntimeError``; ur_rtde releases the GIL meanwhile, so waiting here with a timeout works."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ur_rtde caller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            fn, slot, done = self._jobs.get()
            try:
                slot["value"] = fn()
            except Exception as e:  # reported to the caller
                slot["error"] = e
            self._busy.clear()
            done.set()

    def call(self, fn: Callable[[], Any], timeout: float) -> tuple[bool, Any, str | None]:
        """(finished, value, error text); a call still stuck from before refuses new work at once."""
        if self._busy.is_set():
            return False, None, "a previous ur_rtde call has not returned"
        slot: dict = {}
        done = threading.Event()
        self._busy.set()
        self._jobs.put((fn, slot, done))
        if not done.wait(timeout):
            return False, None, f"no return within {timeout:.3f} s"
        if "error" in slot:
            return False, None, f"{type(slot['error']).__name__}: {slot['error']}"
        return True, slot.get("value"), None


class Gripper(ABC):
    """Gripper driver interface. :class:`IOGripper` drives it from a digital output; a Robotiq URCap socket
    driver (port 63352) or a ROS driver can implement the same three methods."""

    @abstractmethod
    def set(self, closed: bool) -> None: ...

    @abstractmethod
    def state(self) -> float:
        """Opening as reported by the hardware (0 open .. 1 closed), NaN when unknown."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class IOGripper(Gripper):
    """A gripper wired to a standard digital output of the controller (high = closed)."""

    def __init__(self, robot: "UR5Robot", pin: int = 0):
        self.robot, self.pin = robot, int(pin)
        self.commanded: bool | None = None

    def set(self, closed: bool) -> None:
        closed = bool(closed)
        if closed == self.commanded:
            return
        self.robot._send_io(self.pin, closed)
        self.commanded = closed

    def state(self) -> float:
        st = self.robot.last_state
        if st is None:
            return float("nan")
        return float(st.digital_out >> self.pin & 1)


class UR5Robot:
    """A UR arm behind the safety envelope; a dry run (nothing sent) unless ``armed=True``.

    Use as a context manager or call :meth:`connect` / :meth:`close`. Commands: :meth:`move_to` (moveJ),
    :meth:`begin_servo` then :meth:`servo_joint` / :meth:`servo_tcp` at ``servo_hz``, :meth:`set_gripper`,
    :meth:`stop`. Every command is checked and logged in :attr:`commands` (the last 20000) and appended to
    ``command_log``, a JSON-lines file, when given. After a :class:`RobotHalted` every command raises it again.
    """

    def __init__(self, host: str, *, armed: bool = False, safety: SafetyConfig | None = None,
                 config: UR5Config | None = None, command_log: str | os.PathLike | None = None):
        self.host = host
        self.armed = bool(armed)
        self.config = config or UR5Config()
        self.safety = safety or SafetyConfig()
        self.envelope = SafetyEnvelope(self.safety)
        self.kin: URKinematics = self.envelope.kin
        self.watchdog = Watchdog(self.safety.watchdog_s)
        self.dt = 1.0 / float(self.config.servo_hz)
        self.info: ControllerInfo | None = None
        self.rtde_r = self.rtde_c = self.rtde_io = None
        self.gripper: Gripper | None = None
        self.halted: RobotHalted | None = None
        self.halted_at: float | None = None  # time.time() of the halt
        self.commands: collections.deque = collections.deque(maxlen=20000)  # recent ones; all in the file
        self.rule_counts: dict[str, int] = {}
        self.sent = 0
        self.last_state: RobotState | None = None
        self._log_path = Path(command_log) if command_log else None
        self._log_fh = None
        self._ts_last, self._ts_change = None, time.monotonic()
        self._servoing = False
        self._next_tick = 0.0
        self.q_cmd = self.v_cmd = None
        self.pose_cmd = None
        self.v_tcp_cmd = 0.0
        self.q_action = None  # last action-level joint target
        self.pose_action = None
        self._last_kind = "joint"
        self._caller: _Caller | None = None

    # -- connection
    def connect(self) -> "UR5Robot":
        cfg = self.config
        t0 = time.monotonic()
        self.info = probe_controller(self.host, cfg.connect_timeout, check_script_port=self.armed)
        check_model(self.info, cfg.expected_model, cfg.expected_serial)
        if self.info.safety_mode not in ("NORMAL", "REDUCED"):
            # a dry run rehearses a real one: it refuses the same robots
            raise RobotHalted(f"robot at {self.host} is in safety mode {self.info.safety_mode}; inspect the cause and "
                              "clear it on the teach pendant before running")
        try:
            import rtde_receive
        except ImportError:
            raise RobotError("the UR5 runner needs ur_rtde: pip install ur-rtde") from None
        try:
            self.rtde_r = rtde_receive.RTDEReceiveInterface(self.host)
            if self.armed:
                import rtde_control
                import rtde_io

                self.rtde_c = rtde_control.RTDEControlInterface(self.host)
                if cfg.gripper == "io":
                    self.rtde_io = rtde_io.RTDEIOInterface(self.host)
        except RuntimeError as e:
            self.close()
            raise RobotConnectionError(f"ur_rtde could not connect to {self.host}: {e}") from None
        if cfg.gripper == "io":
            self.gripper = IOGripper(self, cfg.gripper_pin)
        if self.armed:
            self._caller = _Caller()
        if self._log_path is not None:
            self.open_command_log(self._log_path)
        deadline = time.monotonic() + 2.0
        while self.rtde_r.getTimestamp() <= 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        st = self.read_state()
        # the model's kinematics must reproduce the TCP the controller reports (wrong model or TCP offset?)
        T = self.kin.fk(st.q)
        err = float(np.linalg.norm(T[:3, 3] - st.tcp_pose[:3]))
        if err > 0.01:
            self.close()
            raise RobotModelError(
                f"the TCP the controller reports differs by {err * 100:.1f} cm from the {self.kin.model} kinematics "
                f"with tcp_offset {list(self.safety.tcp_offset)}: set safety.robot_model and safety.tcp_offset to "
                "this robot's model and its configured TCP")
        log.info("connected to %s %s (PolyScope %s, serial %s) in %.2f s, %s", self.info.model, self.host,
                 self.info.polyscope, self.info.serial, time.monotonic() - t0,
                 "ARMED: commands move the arm" if self.armed else "dry run: nothing will be sent")
        self._log({"kind": "connect", "armed": self.armed, "info": asdict(self.info)})
        return self

    def __enter__(self) -> "UR5Robot":
        return self.connect() if self.rtde_r is None else self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        ok = self.rtde_r is not None and self.rtde_r.isConnected()
        if self.armed:
            ok = ok and self.rtde_c is not None and self.rtde_c.isConnected()
        return bool(ok)

    def close(self) -> None:
        """Stop servoing (armed), disconnect. Objects whose connection was lost are kept alive (see
        :func:`_quarantine`)."""
        lost = not self.connected
        if self.armed and not lost and self.halted is None and self._servoing:
            with contextlib.suppress(Exception):
                self.end_servo()
        for name in ("rtde_io", "rtde_c", "rtde_r"):
            obj = getattr(self, name)
            if obj is None:
                continue
            if lost or not obj.isConnected():
                _quarantine(obj)
            else:
                _call_with_timeout(obj.disconnect, 2.0, f"{name}.disconnect")
            setattr(self, name, None)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    # -- logging
    def open_command_log(self, path: str | os.PathLike) -> None:
        """Append every command (sent or, in a dry run, not sent) to a JSON-lines file, line-buffered."""
        if self._log_fh is not None:
            self._log_fh.close()
        self._log_path = Path(path)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self._log_path, "a", buffering=1)
        for entry in self.commands:  # what happened before the file was opened (connect, ...)
            self._log_fh.write(json.dumps(_jsonable(entry)) + "\n")

    def _log(self, entry: dict) -> None:
        entry = {"t": round(time.monotonic(), 5), **entry}
        self.commands.append(entry)
        if self._log_fh is not None:
            self._log_fh.write(json.dumps(_jsonable(entry)) + "\n")

    def _count(self, fired: Sequence[str]) -> None:
        for r in fired:
            self.rule_counts[r] = self.rule_counts.get(r, 0) + 1

    # -- state
    def read_state(self) -> RobotState:
        r = self.rtde_r
        if r is None:
            raise RobotConnectionError("the robot is not connected; call connect() first")
        now = time.monotonic()
        connected = self.connected
        ts = float(r.getTimestamp())
        if ts != self._ts_last:
            self._ts_last, self._ts_change = ts, now
        running = None
        if self.armed and self.rtde_c is not None:
            running = bool(self.rtde_c.isProgramRunning())
        st = RobotState(
            time=now, timestamp=ts, age_s=now - self._ts_change, q=np.asarray(r.getActualQ(), float),
            qd=np.asarray(r.getActualQd(), float), tcp_pose=np.asarray(r.getActualTCPPose(), float),
            tcp_speed=np.asarray(r.getActualTCPSpeed(), float), robot_mode=int(r.getRobotMode()),
            safety_mode=int(r.getSafetyMode()), runtime_state=int(r.getRuntimeState()),
            digital_out=int(r.getActualDigitalOutputBits()), connected=connected, program_running=running)
        self.last_state = st
        return st

    def check(self) -> RobotState:
        """Read the state and halt (stop + :class:`RobotHalted`) unless commands are safe to send."""
        if self.halted is not None:
            raise self.halted
        try:
            st = self.read_state()
            self.envelope.check_state(connected=st.connected, safety_mode=st.safety_mode, robot_mode=st.robot_mode,
                                      state_age_s=st.age_s, program_running=st.program_running)
        except RobotHalted as e:
            self.halt(e)
        return st

    def kick(self) -> None:
        """Keep-alive while waiting (e.g. for the policy): check the robot, feed the controller's watchdog."""
        self.check()
        if self.armed and self.safety.controller_watchdog_hz > 0 and self._servoing:
            self._send_realtime("kickWatchdog", self.rtde_c.kickWatchdog, {"kind": "kickWatchdog"})

    def halt(self, exc: RobotHalted) -> None:
        """Stop the arm (best effort), latch ``exc`` and raise it. Nothing resumes by itself."""
        if self.halted is None:
            self.halted = exc
            self.halted_at = time.time()
            log.error("ROBOT HALTED (%s): %s", exc.rule, exc.reason)
            self._count([exc.rule])
            self._log({"kind": "halt", "rule": exc.rule, "reason": exc.reason})
            self._stop_hardware()
        raise self.halted

    def _stop_hardware(self) -> None:
        self._servoing = False
        if not self.armed or self.rtde_c is None:
            self._log({"kind": "stop", "sent": False, "armed": False})
            return
        if not self.rtde_c.isConnected():
            self._log({"kind": "stop", "sent": False, "reason": "not connected"})
            return  # a non-realtime command on a dead connection blocks for minutes
        ok, _ = _call_with_timeout(lambda: self.rtde_c.servoStop(self.safety.stop_decel), 2.0, "servoStop")
        self._log({"kind": "stop", "sent": True, "ok": bool(ok)})

    def stop(self, reason: str = "stop requested") -> None:
        """Stop servoing and decelerate (armed); logs only in a dry run."""
        log.info("stopping: %s", reason)
        self._stop_hardware()

    # -- commands
    def move_to(self, q, *, speed: float | None = None, acc: float | None = None) -> None:
        """moveJ to ``q`` (blocking), refused unless ``q`` and the joint path stay within the limits and the
        workspace. Speed/acceleration are capped at the safety config's ``move_speed`` / ``move_acc``."""
        if self.halted is not None:
            raise self.halted
        st = self.check()
        q = self.envelope.require_finite(q, "moveJ target")
        if np.any(q < self.envelope.jmin) or np.any(q > self.envelope.jmax):
            self._log({"kind": "moveJ", "target": q, "refused": "joint_limits"})
            raise SafetyViolation(f"refused moveJ to {np.round(q, 3).tolist()}: outside the joint limits "
                                  f"{list(self.safety.joint_min)} .. {list(self.safety.joint_max)}",
                                  rule="joint_limits")
        if not self.envelope.in_workspace(self.kin.fk(q)[:3, 3]):
            self._log({"kind": "moveJ", "target": q, "refused": "workspace"})
            raise SafetyViolation(
                f"refused moveJ to {np.round(q, 3).tolist()}: its TCP {np.round(self.kin.fk(q)[:3, 3], 3).tolist()} is "
                f"outside the workspace {list(self.safety.workspace_min)} .. {list(self.safety.workspace_max)}",
                rule="workspace")
        entered = self.envelope.in_workspace(st.tcp_pose[:3])
        for f in np.linspace(0, 1, 41)[1:]:  # the joint-space path may bulge: it must not leave the box
            p = self.kin.fk(st.q + f * (q - st.q))[:3, 3]
            if self.envelope.in_workspace(p):
                entered = True
            elif entered:
                self._log({"kind": "moveJ", "target": q, "refused": "workspace"})
                raise SafetyViolation(
                    f"refused moveJ to {np.round(q, 3).tolist()}: on the way the TCP would pass "
                    f"{np.round(p, 3).tolist()}, outside the workspace {list(self.safety.workspace_min)} .. "
                    f"{list(self.safety.workspace_max)}; move the arm closer first", rule="workspace")
        v = min(speed or self.safety.move_speed, self.safety.move_speed)
        a = min(acc or self.safety.move_acc, self.safety.move_acc)
        entry = {"kind": "moveJ", "target": q, "speed": v, "acc": a, "armed": self.armed}
        if self.armed:
            dist = float(np.max(np.abs(q - st.q)))
            timeout = 5.0 + 2 * (dist / v + v / a)
            ok, res = _call_with_timeout(lambda: self.rtde_c.moveJ(q.tolist(), v, a), timeout, "moveJ")
            entry["ok"] = bool(ok and res)
            self.sent += 1
            self._log(entry)
            if not (ok and res):
                self.check()  # a safety stop or lost connection raises here
                self.halt(RobotHalted("moveJ to the start pose failed (controller refused or timed out)"))
        else:
            log.info("dry run: would moveJ to %s (v=%.2f, a=%.2f)", np.round(q, 3).tolist(), v, a)
            self._log(entry)

    def begin_servo(self) -> None:
        """Start streaming servo commands from the current state."""
        st = self.check()
        self.q_cmd, self.v_cmd = st.q.copy(), np.zeros(6)
        self.pose_cmd, self.v_tcp_cmd = st.tcp_pose.copy(), 0.0
        self.q_action, self.pose_action = st.q.copy(), st.tcp_pose.copy()
        self._next_tick = time.monotonic()
        self._servoing = True
        self.watchdog.reset()  # active again from the next observation the runner feeds it
        if self.armed and self.safety.controller_watchdog_hz > 0:
            self.rtde_c.setWatchdog(self.safety.controller_watchdog_hz)

    def end_servo(self) -> None:
        """servoStop (armed) - the arm decelerates and holds."""
        if not self._servoing:
            return
        self._servoing = False
        if self.armed and self.rtde_c is not None and self.rtde_c.isConnected():
            ok, _ = _call_with_timeout(lambda: self.rtde_c.servoStop(self.safety.stop_decel), 2.0, "servoStop")
            self._log({"kind": "servoStop", "ok": bool(ok)})
        else:
            self._log({"kind": "servoStop", "armed": self.armed})

    def _send_realtime(self, what: str, fn: Callable[[], Any], entry: dict) -> None:
        """Send one realtime command through the caller thread; halt when it fails, refuses or blocks."""
        ok, res, err = self._caller.call(fn, timeout=max(0.05, 5 * self.dt))
        self.sent += 1
        entry["ok"] = bool(ok and res is not False)
        if entry["ok"]:
            return
        self._log(entry)
        if err is not None or not self.connected:
            self.halt(RobotHalted(f"lost the connection to the robot controller during {what}"
                                  + (f" ({err})" if err else "") + "; stopped", rule="state"))
        self.check()  # a safety stop or a stopped program raises here with its reason
        self.halt(RobotHalted(f"the controller refused {what} (control program not running)", rule="state"))

    def _pace(self) -> None:
        now = time.monotonic()
        if self._next_tick > now:
            time.sleep(self._next_tick - now)
        elif now - self._next_tick > self.dt:
            self._next_tick = now  # late (policy call, GC...): do not try to catch up with a burst
        self._next_tick += self.dt

    def action_joint(self, q_target) -> Checked:
        """Action-level checks of a policy's joint target (relative to the previous action's target)."""
        if self.halted is not None:
            raise self.halted
        checked = self.envelope.action_joint(self.q_action, q_target)
        self._count(checked.fired)
        self.q_action = checked.value
        return checked

    def action_tcp(self, pose_target) -> Checked:
        if self.halted is not None:
            raise self.halted
        checked = self.envelope.action_tcp(self.pose_action, pose_target, self.q_cmd)
        self._count(checked.fired)
        self.pose_action = checked.value
        return checked

    def servo_joint(self, q_target) -> Checked:
        """One servoJ command (paced at ``servo_hz``); checked by the envelope, sent only when armed."""
        self._require_servo()
        checked = self.envelope.servo_joint(self.q_cmd, self.v_cmd, q_target, self.dt)
        self._send_servo("servoJ", q_target, checked)
        self._last_kind = "joint"
        self.v_cmd = (checked.value - self.q_cmd) / self.dt
        self.q_cmd = checked.value
        self.pose_cmd = matrix_to_pose(self.kin.fk(self.q_cmd))
        return checked

    def servo_tcp(self, pose_target) -> Checked:
        """One servoL command (paced at ``servo_hz``); checked by the envelope, sent only when armed."""
        self._require_servo()
        checked, q = self.envelope.servo_tcp(self.pose_cmd, self.v_tcp_cmd, pose_target, self.q_cmd, self.dt)
        self._send_servo("servoL", pose_target, checked)
        self._last_kind = "tcp"
        self.v_tcp_cmd = float(np.linalg.norm(checked.value[:3] - self.pose_cmd[:3])) / self.dt
        self.pose_cmd = checked.value
        self.q_cmd = q
        return checked

    def _require_servo(self) -> None:
        if self.halted is not None:
            raise self.halted
        if not self._servoing:
            raise RobotError("call begin_servo() before streaming servo commands")

    def _send_servo(self, kind: str, target, checked: Checked) -> None:
        """Pace, check, then send (armed) and log one envelope-checked servoJ/servoL target; the order is the
        safety contract: the state and the policy watchdog are checked right before anything goes out."""
        self._count(checked.fired)
        self._pace()
        self.check()  # right before sending: safety stops, connection, fresh state
        try:
            self.watchdog.check()
        except RobotHalted as e:
            self.halt(e)
        entry = {"kind": kind, "target": np.asarray(target, float), "sent": checked.value,
                 "fired": checked.fired, "armed": self.armed}
        if self.armed:
            c, sent = self.safety, checked.value.tolist()
            # the method is looked up inside the call, as every realtime call does: the caller thread keeps no
            # reference to the ur_rtde object once close() drops it
            self._send_realtime(kind, lambda: getattr(self.rtde_c, kind)(
                sent, c.max_joint_speed, c.max_joint_acc, self.dt, c.servo_lookahead, c.servo_gain), entry)
        self._log(entry)

    def hold(self) -> None:
        """Repeat the last servo target for one period (keeps the stream and the controller watchdog alive)."""
        if self._last_kind == "tcp":
            self.servo_tcp(self.pose_cmd)
        else:
            self.servo_joint(self.q_cmd)

    def _send_io(self, pin: int, value: bool) -> None:
        self.check()
        entry = {"kind": "digital_out", "pin": pin, "value": bool(value), "armed": self.armed}
        if self.armed and self.rtde_io is not None:
            self._send_realtime(f"setting digital output {pin}",
                                lambda: self.rtde_io.setStandardDigitalOut(pin, bool(value)), entry)
        else:
            log.info("dry run: would set standard digital output %d to %s", pin, value)
        self._log(entry)

    def set_gripper(self, closed: bool) -> None:
        if self.gripper is not None:
            self.gripper.set(closed)


# ----------------------------------------------------------------------------------------------------------
# a scripted policy with the VLA surface (tests and rehearsals before a model is at hand)
# ----------------------------------------------------------------------------------------------------------


class UR5ScriptedPolicy(ScriptedPolicyBase):
    """A policy with the VLA surface that needs no model: moves the TCP with a constant velocity that reverses
    every ``period`` calls, expressed as the family expects (π0: chunks of joint deltas relative to the observed
    joints, from the UR5 Jacobian; OpenVLA: one TCP delta per call).

    ``speed`` scales the velocity (what :class:`~nnsight_vla.envs.conditions.SpeedSteering` changes); ``lift``
    adds an upward velocity (m/s), for height experiments. Inputs are validated like a model's."""

    def __init__(self, family: str = "pi0", *, velocity=(0.0, 0.08, 0.0), lift: float = 0.0, period: int = 4,
                 horizon: int = 8, action_hz: float = 10.0, speed: float = 1.0, model: str = "UR5",
                 tcp_offset=(0, 0, 0, 0, 0, 0), gripper: float = 0.0, delay_s: float = 0.0):
        if family not in FAMILY_ACTION_SPACE:
            raise RobotConfigError(
                f"UR5ScriptedPolicy family must be one of {list(FAMILY_ACTION_SPACE)}, got {family!r}")
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
# ----------------------------------------------------------------------------------------------------------


def _policy_surface(policy: Any) -> dict:
    missing = [a for a in ("family", "camera_names", "action_dim", "predict_action") if not hasattr(policy, a)]
    if missing:
        raise RobotConfigError(f"{type(policy).__name__} is not a VLA policy: it lacks {', '.join(missing)} (see "
                               "POLICY_INTERFACE: family, camera_names, state_dim, action_dim, action_horizon, "
                               "predict_action)")
    return {"family": str(policy.family), "camera_names": tuple(policy.camera_names),
            "state_dim": getattr(policy, "state_dim", None), "action_dim": int(policy.action_dim),
            "action_horizon": int(getattr(policy, "action_horizon", 1) or 1),
            "image_size": getattr(policy, "image_size", None)}


def _policy_identity(policy: Any) -> dict:
    out = {"class": f"{type(policy).__module__}.{type(policy).__qualname__}", "family": getattr(policy, "family", None)}
    to_dict = getattr(policy, "to_dict", None)
    if callable(to_dict):
        with contextlib.suppress(Exception):
            out["spec"] = _jsonable(to_dict())
    for attr in ("checkpoint", "source", "name_or_path"):
        if getattr(policy, attr, None) is not None:
            out[attr] = str(getattr(policy, attr))
    return out


@dataclass(frozen=True)
class _Plan:
    action_space: str
    delta_reference: str
    open_loop: int
    close_above: bool
    image_size: int | None


def _resolve_plan(config: UR5Config, surface: Mapping) -> _Plan:
    fam = surface["family"]
    space = config.action_space
    if space == "auto":
        if fam not in FAMILY_ACTION_SPACE:
            raise RobotConfigError(f"no default UR5 action space for family {fam!r}; set action_space to one of "
                                   f"{ACTION_SPACES[1:]}")
        space = FAMILY_ACTION_SPACE[fam]
    if surface["action_dim"] < 6:
        raise RobotConfigError(f"{fam} policy has action_dim {surface['action_dim']}; the UR5 runner needs >= 6 "
                               "(6 joint or TCP components, optionally a gripper)")
    horizon = surface["action_horizon"]
    open_loop = config.open_loop_steps or (1 if horizon == 1 else min(horizon, 8))
    open_loop = min(open_loop, horizon)
    close_above = config.gripper_close_above
    if close_above is None:
        close_above = FAMILY_GRIPPER_CLOSE_ABOVE.get(fam, True)
    size = config.image_size or surface.get("image_size")
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    ref = config.delta_reference
    if ref == "auto":
        ref = "previous" if space == "tcp_delta" else "chunk_start"
    return _Plan(space, ref, int(open_loop), bool(close_above), int(size) if size else None)


def _prepare_image(img: np.ndarray, size: int | None) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise CameraError(f"camera frame must be HxWx3 uint8, got shape {img.shape} dtype {img.dtype}")
    if size and img.shape[:2] != (size, size):
        from PIL import Image

        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(img)


def _policy_state(st: RobotState, state_dim: int | None, gripper_state: float) -> np.ndarray | None:
    if state_dim is None:
        return None
    g = 0.0 if not math.isfinite(gripper_state) else gripper_state
    vec = np.concatenate([st.q, [g]]).astype(np.float32)
    if state_dim >= len(vec):
        return np.concatenate([vec, np.zeros(state_dim - len(vec), np.float32)])
    return vec[:state_dim]


def _tcp_target(pose_ref: np.ndarray, row: np.ndarray, scale: float) -> np.ndarray:
    """Base-frame TCP delta (dx, dy, dz, droll, dpitch, dyaw) applied to ``pose_ref``."""
    T = pose_to_matrix(pose_ref)
    R = Rotation.from_euler("xyz", row[3:6]).as_matrix() @ T[:3, :3]
    out = np.eye(4)
    out[:3, :3] = R
    out[:3, 3] = T[:3, 3] + scale * row[:3]
    return matrix_to_pose(out)


def _interp_pose(a: np.ndarray, b: np.ndarray, f: float) -> np.ndarray:
    Ta, Tb = pose_to_matrix(a), pose_to_matrix(b)
    rv = Rotation.from_matrix(Tb[:3, :3] @ Ta[:3, :3].T).as_rotvec()
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(f * rv).as_matrix() @ Ta[:3, :3]
    T[:3, 3] = Ta[:3, 3] + f * (Tb[:3, 3] - Ta[:3, 3])
    return matrix_to_pose(T)


def _predict(policy, condition: Condition, images, instruction, state, robot: UR5Robot,
             executor: concurrent.futures.ThreadPoolExecutor, t_obs: float):
    """Query the policy in a worker thread while the main thread keeps checking the robot; the watchdog halts
    the robot when no answer comes within ``watchdog_s`` of the observation."""

    def call():
        with condition.context(policy):
            if state is None:
                return policy.predict_action(images, instruction)
            return policy.predict_action(images, instruction, state=state)

    fut = executor.submit(call)
    while True:
        try:
            return fut.result(timeout=min(0.02, robot.dt * 2))
        except concurrent.futures.TimeoutError:
            robot.kick()
            if robot.armed and robot._servoing:
                robot.hold()
            try:
                robot.watchdog.check()
            except RobotHalted as e:
                robot.halt(e)


def run_episode(robot: UR5Robot, policy: Any, condition: Condition, config: UR5Config,
                cameras: Mapping[str, CameraSource], *, trial: int = 0) -> Episode:
    """One episode of ``policy`` under ``condition`` on ``robot``; returns it (not yet stored).

    Ends after ``config.max_steps`` actions, or early when the robot halts (summary ``termination``:
    ``halted:<rule>``, with ``halt_reason``) or the policy outputs a non-finite action (``unsafe_action``; it
    is never sent). The per-step records up to that point are kept either way."""
    surface = _policy_surface(policy)
    plan = _resolve_plan(config, surface)
    missing = [c for c in surface["camera_names"] if c not in cameras]
    if missing:
        raise CameraError(f"{surface['family']} policy needs camera(s) {missing}; the robot config maps "
                          f"{sorted(cameras)} (set robot.cameras, e.g. {{'{missing[0]}': '0'}})")
    key = EpisodeKey(condition.name, config.task, int(trial))
    instruction = condition.instruction(config.instruction)
    if callable(getattr(type(policy), "reset", None)):
        policy.reset()
    if config.home_q is not None:
        robot.move_to(config.home_q)
        time.sleep(config.settle_s)
    st0 = robot.check()
    recorder = EpisodeRecorder(key, st0.tcp_xyz, action_xyz=(0, 1, 2) if plan.action_space == "tcp_delta" else None,
                               meta={"instruction": config.instruction, "policy_instruction": instruction,
                                     "condition": condition.to_dict(), "armed": robot.armed,
                                     "action_space": plan.action_space, "open_loop_steps": plan.open_loop,
                                     "start_q": st0.q.tolist(), "start_tcp": st0.tcp_pose.tolist(),
                                     "robot": asdict(robot.info) if robot.info else None})
    termination, halt_reason, error = "max_steps", None, None
    n_servo = max(1, int(round(config.servo_hz / config.action_hz)))
    grip_idx = config.gripper_index
    if grip_idx is not None and grip_idx >= surface["action_dim"]:
        grip_idx = None  # the policy has no gripper output
    sent_before, rules_before = robot.sent, dict(robot.rule_counts)
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
    perf = time.perf_counter
    try:
        robot.begin_servo()
        step = 0
        while step < config.max_steps:
            st = robot.check()
            try:
                images = {name: _prepare_image(cameras[name].read(), plan.image_size)
                          for name in surface["camera_names"]}
            except CameraError:
                # a controller that just died explains a dead twin camera: report the robot's reason if so
                for _ in range(5):
                    time.sleep(robot.dt)
                    robot.check()
                raise
            if config.video:
                recorder.add_frame(images[surface["camera_names"][0]])
            grip_state = robot.gripper.state() if robot.gripper else float("nan")
            state_vec = _policy_state(st, surface["state_dim"], grip_state)
            t_obs = time.monotonic()
            robot.watchdog.feed(t_obs)
            t0 = perf()
            raw = _predict(policy, condition, images, instruction, state_vec, robot, executor, t_obs)
            policy_s = perf() - t0
            rows = np.asarray(raw, dtype=float)
            if rows.ndim == 1:
                rows = rows[None]
            if rows.ndim != 2 or rows.shape[1] < 6:
                raise RobotConfigError(f"{surface['family']} policy returned an action of shape {np.shape(raw)}; "
                                       f"expected ({surface['action_dim']},) or (H, {surface['action_dim']})")
            q_ref, pose_ref = st.q.copy(), st.tcp_pose.copy()
            prev_target_q = robot.q_action.copy()
            for j, row in enumerate(rows[: plan.open_loop]):
                if step >= config.max_steps:
                    break
                if not np.all(np.isfinite(row)):
                    raise SafetyViolation(f"policy output a non-finite action at step {step} "
                                          f"({np.array2string(row, precision=4)}); nothing of it was sent")
                t0 = perf()
                rules_step = sum(robot.rule_counts.values())
                if plan.action_space == "tcp_delta":
                    base = pose_ref if (j == 0 and plan.delta_reference == "chunk_start") else robot.pose_action
                    target = _tcp_target(base, row, config.action_scale)
                    checked = robot.action_tcp(target)
                    start = robot.pose_cmd.copy()
                    for i in range(1, n_servo + 1):
                        robot.servo_tcp(_interp_pose(start, checked.value, i / n_servo))
                    executed = np.concatenate([checked.value[:3] - base[:3], row[3:6]])
                else:
                    if plan.action_space == "joint_abs":
                        target_q = row[:6]
                    elif plan.delta_reference == "previous":
                        target_q = prev_target_q + config.action_scale * row[:6]
                    else:
                        target_q = q_ref + config.action_scale * row[:6]
                    checked = robot.action_joint(target_q)
                    prev_target_q = checked.value
                    start = robot.q_cmd.copy()
                    for i in range(1, n_servo + 1):
                        robot.servo_joint(start + (checked.value - start) * (i / n_servo))
                    executed = checked.value - (q_ref if plan.delta_reference == "chunk_start" else start)
                g_cmd = float("nan")
                if grip_idx is not None:
                    g_val = float(row[grip_idx])
                    closed = g_val > config.gripper_threshold if plan.close_above else g_val < config.gripper_threshold
                    robot.set_gripper(closed)
                    g_cmd = float(closed)
                env_s = perf() - t0
                after = robot.check()
                recorder.record(after.tcp_xyz, np.concatenate([executed, [g_cmd]]), raw_action=row,
                                gripper=g_cmd, gripper_state=robot.gripper.state() if robot.gripper else float("nan"),
                                policy_call=(j == 0), policy_s=policy_s if j == 0 else 0.0, env_s=env_s,
                                tcp_speed=float(np.linalg.norm(after.tcp_speed[:3])),
                                safety_clamps=float(sum(robot.rule_counts.values()) - rules_step),
                                held=float(checked.held),
                                **{f"q{i}": float(after.q[i]) for i in range(6)})
                step += 1
    except RobotHalted as e:
        termination, halt_reason = f"halted:{e.rule}", e.reason
    except SafetyViolation as e:
        termination, error = "unsafe_action", str(e)
        log.error("episode %s: %s", key.id, e)
        with contextlib.suppress(RobotHalted):
            robot.stop("unsafe action refused")
    except CameraError as e:
        termination, error = "camera_error", str(e)
        log.error("episode %s: %s; the arm was stopped", key.id, e)
        with contextlib.suppress(RobotHalted):
            robot.stop("camera failed")
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if robot.halted is None:
            with contextlib.suppress(Exception):
                robot.end_servo()
    rules = {r: n - rules_before.get(r, 0) for r, n in robot.rule_counts.items() if n - rules_before.get(r, 0)}
    summary = {"termination": termination, "completed": termination == "max_steps", "halt_reason": halt_reason,
               "error": error, "armed": robot.armed, "commands_sent": robot.sent - sent_before,
               "safety_rules": rules, "max_steps": config.max_steps, "action_hz": config.action_hz,
               "servo_hz": config.servo_hz}
    if robot.halted is not None:
        summary["halted_wall"] = robot.halted_at
    return recorder.finish(False, summary=summary)


@dataclass
class SweepResult:
    """What :func:`run_conditions` did."""

    results: str
    completed: int = 0
    skipped: int = 0
    halted: str | None = None
    episodes: list[str] = field(default_factory=list)
    terminations: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_conditions(policy: Any, conditions: Sequence[Condition], config: UR5Config, results: str | os.PathLike, *,
                   host: str, armed: bool = False, safety: SafetyConfig | None = None, trials: int = 1,
                   cameras: Mapping[str, CameraSource] | None = None, robot: UR5Robot | None = None,
                   command_log: bool = True) -> SweepResult:
    """Run every (trial, condition) episode not yet in ``results`` on the robot at ``host``, conditions
    interleaved within each trial (slow drift of the cell then affects all conditions alike).

    A halt (safety stop, lost connection, watchdog) ends the sweep after committing the episode it interrupted:
    a human decides whether and when to continue (rerunning resumes with the missing episodes)."""
    conditions = list(conditions)
    check_unique(conditions)
    if not isinstance(trials, int) or trials < 1:
        raise RobotConfigError(f"trials must be an int >= 1, got {trials!r}")
    safety = safety or SafetyConfig()
    surface = _policy_surface(policy)
    plan = _resolve_plan(config, surface)
    out = SweepResult(results=str(results))
    t_start = time.perf_counter()
    own_robot = robot is None
    if robot is None:
        robot = UR5Robot(host, armed=armed, safety=safety, config=config)
        robot.connect()
    own_cams: list[CameraSource] = []
    try:
        if cameras is None:
            cameras = {}
            for name in surface["camera_names"]:
                spec = config.camera_map.get(name)
                if spec is None:
                    raise CameraError(f"no camera configured for the policy's camera {name!r}; set robot.cameras")
                cam = open_camera(spec, host)
                own_cams.append(cam)
                cameras[name] = cam
        ident = {"robot_config": {k: v for k, v in config.to_dict().items() if k not in ("cameras", "connect_timeout")},
                 "safety": safety.to_dict(), "armed": robot.armed, "plan": asdict(plan),
                 "robot": {"model": robot.info.model, "serial": robot.info.serial} if robot.info else None,
                 "policy": _policy_identity(policy)}
        store = ResultsStore.create(results, ident, [c.to_dict() for c in conditions], kind="ur5",
                                    run_info={"host": host, "trials": trials,
                                              "conditions": [c.name for c in conditions]})
        out.results = str(store.root)
        if command_log:
            robot.open_command_log(store.root / "commands" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
        with store.lock():
            store.clean_partial()
            done = store.completed()
            for trial in range(trials):
                for cond in conditions:
                    key = EpisodeKey(cond.name, config.task, trial)
                    if key.id in done:
                        out.skipped += 1
                        continue
                    try:
                        episode = run_episode(robot, policy, cond, config, cameras, trial=trial)
                    except RobotHalted as e:  # halted before the episode started: nothing to record
                        out.halted = f"{e.rule}: {e.reason}"
                        log.error("robot halted before episode %s could start: %s", key.id, e.reason)
                        return out
                    store.write_episode(episode)
                    out.completed += 1
                    out.episodes.append(key.id)
                    term = episode.summary["termination"]
                    out.terminations[term] = out.terminations.get(term, 0) + 1
                    if robot.halted is not None or term == "camera_error":
                        out.halted = (f"{robot.halted.rule}: {robot.halted.reason}" if robot.halted is not None
                                      else f"camera: {episode.summary['error']}")
                        log.error("sweep stopped after a halt; fix the cause, then rerun to resume")
                        return out
    finally:
        out.wall_s = time.perf_counter() - t_start
        for cam in own_cams:
            with contextlib.suppress(Exception):
                cam.close()
        if own_robot:
            robot.close()
    return out


# ----------------------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------------------


def _build_policy(spec: str, family: str, seed: int) -> Any:
    if spec == "scripted":
        return UR5ScriptedPolicy(family)
    if spec == "tiny":
        import nnsight_vla as nv

        return nv.tiny(family, seed=seed)
    if spec.startswith("load:"):
        import nnsight_vla as nv

        return nv.load(family, spec[5:])
    raise RobotConfigError(f"--policy must be 'scripted', 'tiny' or 'load:<checkpoint>', got {spec!r}")


def _build_conditions(spec: str) -> list[Condition]:
    from .conditions import prompt_baseline

    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "baseline":
            out.append(baseline())
        elif item.startswith("prompt:"):
            out.append(prompt_baseline(item.split(":", 1)[1]))
        elif item.startswith("speed:"):
            from .conditions import SpeedSteering

            scale = float(item.split(":", 1)[1])
            out.append(Condition(f"speed@{scale:g}", steering=SpeedSteering(scale), kind="steered", concept="speed"))
        else:
            raise RobotConfigError(f"unknown condition {item!r}; use baseline, prompt:<word> or speed:<scale> "
                                   "(neuron steering from Python: run_conditions(..., conditions=sweep_grid(...)))")
    return out or [baseline()]


def run_cli(host: str, armed: bool = False, config: str | os.PathLike | None = None, *, policy: str = "scripted",
            family: str = "pi0", instruction: str | None = None, task: str | None = None,
            conditions: str = "baseline", steps: int | None = None, trials: int = 1,
            results: str = "runs/ur5", cameras: str | None = None, expected_model: str | None = None,
            plots: bool = True, verbose: bool = False) -> SweepResult:
    """``nnsight-vla ur5 run``: a sweep on the robot at ``host`` (a dry run unless ``armed``).

    ``config``: YAML/JSON with ``robot:`` (:class:`UR5Config`) and ``safety:`` (:class:`SafetyConfig`) sections.
    ``cameras="twin"`` uses the controller twin's renders (``scene`` for base/primary, ``wrist``).
    Returns the :class:`SweepResult`; raises :class:`RobotError` for setup problems and ``SystemExit(3)`` after a
    halt (the reason is printed)."""
    logging.basicConfig(level=logging.INFO if verbose or not armed else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ur5_cfg, safety = load_config(config)
    changes: dict[str, Any] = {}
    if instruction:
        changes["instruction"] = instruction
    if task:
        changes["task"] = task
    if steps:
        changes["max_steps"] = int(steps)
    if expected_model:
        changes["expected_model"] = expected_model
    if cameras == "twin":
        changes["cameras"] = {"primary": "twin:scene", "base": "twin:scene", "wrist": "twin:wrist"}
    elif cameras:
        changes["cameras"] = dict(item.split("=", 1) for item in cameras.split(","))
    if changes:
        ur5_cfg = replace(ur5_cfg, **changes)
    pol = _build_policy(policy, family, ur5_cfg.seed)
    conds = _build_conditions(conditions)
    if not armed:
        print(f"DRY RUN on {host}: commands are checked and logged, nothing is sent (use --armed to move the arm)")
    res = run_conditions(pol, conds, ur5_cfg, results, host=host, armed=armed, safety=safety, trials=trials)
    print(f"{res.completed} episode(s) written to {res.results} ({res.skipped} already there); "
          f"terminations: {res.terminations}")
    if plots and res.completed + res.skipped:
        from .. import plots as plots_mod

        files = plots_mod.plot_all(res.results, Path(res.results) / "plots")
        print("plots: " + ", ".join(str(f) for f in files))
    if res.halted:
        print(f"ROBOT HALTED: {res.halted}")
        raise SystemExit(3)
    return res
