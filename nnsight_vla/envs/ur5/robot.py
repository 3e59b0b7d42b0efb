"""A UR arm behind the safety envelope (:class:`UR5Robot`): a dry run unless armed, every command checked and
logged, a latched halt on any unsafe state. ur_rtde calls that can block run in a worker thread with a timeout,
and ur_rtde objects whose connection died are never destroyed (their destructor aborts the process)."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import json
import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import RobotConnectionError, RobotError, RobotHalted, RobotModelError, SafetyViolation
from ...rollout.records import jsonable
from .config import UR5Config
from .kinematics import URKinematics
from .probe import ControllerInfo, check_model, probe_controller
from .safety import Checked, SafetyConfig, SafetyEnvelope, ServoState, Watchdog

log = logging.getLogger("nnsight_vla.ur5")


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
        return jsonable(asdict(self))



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
        self.servo: ServoState | None = None  # the last streamed command and its velocities
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
            self._log_fh.write(json.dumps(jsonable(entry)) + "\n")

    def _log(self, entry: dict) -> None:
        entry = {"t": round(time.monotonic(), 5), **entry}
        self.commands.append(entry)
        if self._log_fh is not None:
            self._log_fh.write(json.dumps(jsonable(entry)) + "\n")

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
        self.servo = ServoState.at_rest(st.q, st.tcp_pose)
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

    @property
    def q_cmd(self) -> np.ndarray | None:
        """Joints of the last streamed command."""
        return None if self.servo is None else self.servo.q

    @property
    def pose_cmd(self) -> np.ndarray | None:
        """TCP pose of the last streamed command."""
        return None if self.servo is None else self.servo.pose

    def servo_joint(self, q_target) -> Checked:
        """One servoJ command (paced at ``servo_hz``); checked by the envelope, sent only when armed."""
        self._require_servo()
        checked, nxt = self.envelope.servo_joint(self.servo, q_target, self.dt)
        self._send_servo("servoJ", q_target, checked)
        self._last_kind, self.servo = "joint", nxt
        return checked

    def servo_tcp(self, pose_target) -> Checked:
        """One servoL command (paced at ``servo_hz``); checked by the envelope, sent only when armed."""
        self._require_servo()
        checked, nxt = self.envelope.servo_tcp(self.servo, pose_target, self.dt)
        self._send_servo("servoL", pose_target, checked)
        self._last_kind, self.servo = "tcp", nxt
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
        """One servo period toward where the stream comes to rest when it brakes within the acceleration limits
        (keeps the stream and the controller watchdog alive while the policy thinks)."""
        target = self.envelope.stop_target(self.servo, self._last_kind)
        if self._last_kind == "tcp":
            self.servo_tcp(target)
        else:
            self.servo_joint(target)

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
