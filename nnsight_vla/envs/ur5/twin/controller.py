"""The twin's controller: RTDE registers, the safety state, an emulation of ur_rtde's control script (command id in
``input_int_register_0``, arguments in the double registers, ready / done in ``output_int_register_0``), and the
physics tick that moves the MuJoCo arm and snapshots the state the RTDE servers stream."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np

from ..poses import matrix_to_pose, pose_to_matrix, relative_rotvec
from ..protocol import (
    CMD,
    CMD_NAME,
    REALTIME_CMDS,
    REGISTER,
    ROBOT_MODE,
    ROBOT_STATUS_POWER_ON,
    ROBOT_STATUS_PROGRAM_RUNNING,
    RUNTIME_STATE,
    SAFETY_BITS,
    SAFETY_MODE,
    mode_name,
)
from .arm import Arm
from .config import TwinConfig
from .motion import Motion


class Controller:
    def __init__(self, cfg: TwinConfig, arm: Arm | None):
        self.cfg = cfg
        self.arm = arm
        self.lock = threading.RLock()
        self.t0 = time.perf_counter()
        self.in_int = [0] * 48
        self.in_double = [0.0] * 48
        self.in_bits = [0, 0]
        self.out_int = [0] * 48
        self.out_double = [0.0] * 48
        self.out_bits = [0, 0]
        self.digital_out = 0  # bits 0-7 standard, 8-15 configurable, 16-17 tool
        self.speed_slider = 1.0
        self.robot_mode = ROBOT_MODE["RUNNING"]
        self.safety = "NORMAL"
        self.safety_reason = ""
        # penetration already there when a protective stop was unlocked: a real arm resting where it stopped does
        # not stop again; pressing further in (or a new contact after it lifted off) does
        self.contact_allowance = 0.0
        self.runtime_state = RUNTIME_STATE["STOPPED"]
        self.program: str | None = None  # name of the loaded/running program
        self.script_running = False  # the rtde_control emulation is active
        self.executing_cmd = False
        self.pending_done = False
        self.reg_off = 0
        self.watchdog_hz = 0.0
        self.last_cmd_reg_update = time.perf_counter()
        self.async_op = 0
        self.async_count = 0
        self.async_running = False
        self.tcp = np.asarray(cfg.tcp_offset, float)
        self.motion = Motion(arm, cfg.initial_q) if arm is not None else None
        self.stats: dict[str, Any] = {"input_packages": 0, "command_packages": 0, "commands": {}, "scripts": 0,
                                      "programs": [], "dashboard_commands": 0, "rtde_connections": 0,
                                      "io_writes": 0, "path_length_rad": 0.0, "watchdog_stops": 0,
                                      "protective_stops": 0, "emergency_stops": 0}
        self.command_log: list[dict] = []
        self.events: list[str] = []
        self.tcp_pose = np.zeros(6)
        self.tcp_speed = np.zeros(6)
        self.target_tcp_pose = np.zeros(6)
        self.toy = np.zeros(3)
        self.grip = 0.0
        self.snapshot: dict[str, Any] = {}
        self._fk_target_q = None
        if arm is not None:
            self._update_kinematics(first=True)
        self._make_snapshot()

    # -- time
    def now(self) -> float:
        return time.perf_counter() - self.t0

    def log_event(self, text: str) -> None:
        self.events.append(f"{self.now():9.3f} {text}")
        del self.events[:-200]

    # -- safety state
    def clear_safety(self) -> None:
        """Back to NORMAL (unlock, safety restart, admin reset); the table penetration the arm rests in now is
        tolerated until it lifts off, so only pressing further in stops it again (caller holds ``self.lock``)."""
        self.safety, self.safety_reason = "NORMAL", ""
        self.contact_allowance = self.arm.table_contact()

    def set_safety(self, mode: str, reason: str) -> None:
        with self.lock:
            if mode == self.safety:
                return
            self.safety, self.safety_reason = mode, reason
            self.log_event(f"safety mode -> {mode}: {reason}")
            if mode != "NORMAL":
                if self.motion is not None:
                    self.motion.halt()
                if self.script_running:
                    # a protective stop pauses the program, an emergency stop ends it and cuts power
                    self.runtime_state = RUNTIME_STATE["PAUSED" if mode == "PROTECTIVE_STOP" else "STOPPED"]
                if mode.endswith("EMERGENCY_STOP"):
                    self.robot_mode = ROBOT_MODE["POWER_OFF"]
                    self.script_running = False
                    self.stats["emergency_stops"] += 1
                else:
                    self.stats["protective_stops"] += 1

    # -- inputs from RTDE clients
    def apply_inputs(self, client: int, names: list[str], values: list[Any]) -> None:
        with self.lock:
            self.stats["input_packages"] += 1
            fields = dict(zip(names, values))
            cmd_reg = f"input_int_register_{self.reg_off}"
            for name, val in fields.items():
                m = REGISTER.match(name)
                if m:
                    kind, idx = m.group(2), int(m.group(3))
                    if kind == "int":
                        self.in_int[idx] = int(val)
                    elif kind == "double":
                        self.in_double[idx] = float(val)
                    else:
                        word, bit = divmod(idx - 64, 32)
                        self.in_bits[word] = (self.in_bits[word] & ~(1 << bit)) | (int(bool(val)) << bit)
                elif name.startswith("input_bit_registers"):
                    self.in_bits[0 if name.endswith("0_to_31") else 1] = int(val)
            if cmd_reg in fields:
                self.last_cmd_reg_update = time.perf_counter()
            io = False
            for prefix, shift in (("standard", 0), ("configurable", 8), ("tool", 16)):
                mask = fields.get(f"{prefix}_digital_output_mask")
                if mask:
                    val = int(fields.get(f"{prefix}_digital_output", 0))
                    m8 = (int(mask) & 0xFF) << shift
                    self.digital_out = (self.digital_out & ~m8) | ((val << shift) & m8)
                    io = True
            if fields.get("speed_slider_mask"):
                self.speed_slider = float(np.clip(fields.get("speed_slider_fraction", 1.0), 0.0, 1.0))
                io = True
            if io:
                self.stats["io_writes"] += 1
                self._log_command(client, -1, "IO", fields)
            cmd = int(fields.get(cmd_reg, 0)) if cmd_reg in fields else 0
            if cmd:
                self.stats["command_packages"] += 1
                name = CMD_NAME.get(cmd, f"CMD_{cmd}")
                self.stats["commands"][name] = self.stats["commands"].get(name, 0) + 1
                self._log_command(client, cmd, name, fields)

    def _log_command(self, client: int, cmd: int, name: str, fields: dict) -> None:
        entry = {"t": round(self.now(), 4), "client": client, "cmd": cmd, "name": name,
                 "fields": {k: (float(v) if isinstance(v, float) else v) for k, v in fields.items()}}
        self.command_log.append(entry)
        del self.command_log[:-5000]

    # -- programs from the script port
    def load_program(self, name: str, text: str) -> None:
        with self.lock:
            self.stats["scripts"] += 1
            self.stats["programs"].append(name)
            self.log_event(f"program received: {name} ({len(text)} bytes)")
            if name == "rtde_control":
                m = re.search(r"global\s+reg_offset_int\s*=\s*(\d+)", text)
                self.reg_off = int(m.group(1)) if m else 0
                if self.safety != "NORMAL" or self.robot_mode != ROBOT_MODE["RUNNING"]:
                    self.log_event("program not started: robot not running or in a safety stop")
                    return
                self.program = name
                self.script_running = True
                self.executing_cmd = False
                self.pending_done = False
                self.watchdog_hz = 0.0
                self.runtime_state = RUNTIME_STATE["PLAYING"]
                self.out_int[self.reg_off] = 1  # signal_ready()
            else:
                # Other programs (custom scripts) are recorded but not interpreted; a new program
                # replaces the running one, as on a real controller.
                self.script_running = False
                self.program = name
                self.runtime_state = RUNTIME_STATE["STOPPED"]
                if self.motion is not None:
                    self.motion.stop(2.0)

    def stop_program(self, reason: str) -> None:
        with self.lock:
            if self.script_running or self.runtime_state != RUNTIME_STATE["STOPPED"]:
                self.log_event(f"program stopped: {reason}")
            self.script_running = False
            self.runtime_state = RUNTIME_STATE["STOPPED"]
            if self.motion is not None:
                self.motion.stop(3.0)

    # -- the rtde_control script loop, once per tick
    def _script_tick(self) -> None:
        if not self.script_running or self.runtime_state != RUNTIME_STATE["PLAYING"]:
            return
        off = self.reg_off
        if self.watchdog_hz > 0 and time.perf_counter() - self.last_cmd_reg_update > 1.0 / self.watchdog_hz:
            self.stats["watchdog_stops"] += 1
            self.stop_program(f"RTDE watchdog: input_int_register_{off} not updated for "
                              f"{1.0 / self.watchdog_hz:.3f} s")
            return
        if self.pending_done and self.motion.done:
            self.pending_done = False
            self.out_int[off] = 2  # signal_done_with_cmd()
        if self.async_running and self.motion.done:
            self.async_running = False
            self._async_progress(False)
        cmd = self.in_int[off]
        if cmd in REALTIME_CMDS:
            self._process(cmd)
            if not self.pending_done:
                self.out_int[off] = 1
        elif cmd == 0:
            self.executing_cmd = False
            if not self.pending_done:
                self.out_int[off] = 1
        elif not self.executing_cmd:
            self.executing_cmd = True
            keep_running = self._process(cmd)
            if not keep_running:
                self.stop_program("stop script command")
                return
            if not self.pending_done:
                self.out_int[off] = 2

    def _args(self, n: int) -> np.ndarray:
        return np.array(self.in_double[self.reg_off:self.reg_off + n], dtype=float)

    def _set_out_doubles(self, vals) -> None:
        for i, v in enumerate(vals):
            self.out_double[self.reg_off + i] = float(v)

    def _async_progress(self, running: bool) -> None:
        self.async_count = (self.async_count + 1) % 128
        if running:
            self.async_op = (self.async_op + 1) % 128
        val = self.async_count * 65536 + self.async_op * 16777216 + (32768 if running else 0)
        self.out_int[self.reg_off + 2] = val

    def _process(self, cmd: int) -> bool:
        """Execute one command of ur_rtde's control script; False ends the program (stop script)."""
        mo, off = self.motion, self.reg_off
        a = self._args(14)
        async_flag = self.in_int[off + 1]
        if cmd in (CMD["MOVEJ"], CMD["MOVEJ_IK"], CMD["MOVEL"], CMD["MOVEL_FK"]):
            target, v, acc = a[:6], a[6], a[7]
            if cmd == CMD["MOVEJ"]:
                ok = mo.move_j(target, v, acc)
            elif cmd == CMD["MOVEJ_IK"]:
                q, ok = self.arm.ik(pose_to_matrix(target), mo.q)
                ok = ok and mo.move_j(q, v, acc)
            elif cmd == CMD["MOVEL"]:
                ok = mo.move_l(target, v, acc)
            else:
                ok = mo.move_l(matrix_to_pose(self.arm.fk(target)), v, acc)
            if not ok:
                self.log_event(f"{CMD_NAME[cmd]}: no inverse kinematics solution; program stopped")
                self.stop_program("inverse kinematics failed")
                return True
            if async_flag:
                self._async_progress(True)
                self.async_running = True
            else:
                self.pending_done = True
        elif cmd == CMD["SERVOJ"]:
            mo.servo_j(a[:6], a[9])
        elif cmd == CMD["SERVOL"]:
            mo.servo_l(a[:6], a[9])
        elif cmd == CMD["SPEEDJ"]:
            mo.speed_j(a[:6], a[6])
        elif cmd == CMD["SPEEDL"]:
            mo.speed_l(a[:6], a[6])
        elif cmd in (CMD["SPEED_STOP"], CMD["SERVO_STOP"]):
            mo.stop(a[0] if a[0] > 0 else 10.0)
            self.pending_done = not mo.done
        elif cmd in (CMD["STOPJ"], CMD["STOPL"]):
            mo.stop(a[0] if a[0] > 0 else 2.0)
            self.pending_done = not mo.done and not async_flag
        elif cmd == CMD["PROTECTIVE_STOP"]:
            self.set_safety("PROTECTIVE_STOP", "triggerProtectiveStop() from the control script")
            return True
        elif cmd == CMD["SET_WATCHDOG"]:
            self.watchdog_hz = float(a[0])
            self.last_cmd_reg_update = time.perf_counter()
        elif cmd == CMD["SET_TCP"]:
            self.tcp = a[:6].copy()
            self.arm.tcp = pose_to_matrix(self.tcp)
        elif cmd == CMD["GET_TCP_OFFSET"]:
            self._set_out_doubles(self.tcp)
        elif cmd == CMD["GET_FORWARD_KINEMATICS_DEFAULT"]:
            self._set_out_doubles(self.tcp_pose)
        elif cmd == CMD["GET_FORWARD_KINEMATICS_ARGS"]:
            # ur_rtde sends q only (recipe 6) or q + tcp offset (recipe 12); unused registers read 0
            tcp = pose_to_matrix(a[6:12]) if np.any(a[6:12]) else None
            self._set_out_doubles(matrix_to_pose(self.arm.fk(a[:6], tcp)))
        elif cmd in (CMD["GET_INVERSE_KINEMATICS_ARGS"], CMD["GET_INVERSE_KINEMATICS_DEFAULT"],
                     CMD["GET_INVERSE_KINEMATICS_HAS_SOLUTION_DEFAULT"],
                     CMD["GET_INVERSE_KINEMATICS_HAS_SOLUTION_ARGS"]):
            seed = a[6:12] if cmd in (30, 61) else mo.q
            q, ok = self.arm.ik(pose_to_matrix(a[:6]), seed)
            self._set_out_doubles(q)
            self.out_int[off + 1] = int(ok)
        elif cmd in (CMD["IS_POSE_WITHIN_SAFETY_LIMITS"], CMD["IS_JOINTS_WITHIN_SAFETY_LIMITS"], CMD["IS_STEADY"]):
            steady = cmd != CMD["IS_STEADY"] or bool(np.max(np.abs(mo.qd)) < 1e-3)
            self.out_int[off + 1] = int(steady)
        elif cmd == CMD["GET_STEPTIME"]:
            self._set_out_doubles([1.0 / self.cfg.rtde_hz])
        elif cmd == CMD["GET_ACTUAL_TOOL_FLANGE_POSE"]:
            self._set_out_doubles(matrix_to_pose(self.arm.fk(mo.q, np.eye(4))))
        elif cmd == CMD["GET_TARGET_WAYPOINT"]:
            self._set_out_doubles(self.target_tcp_pose)
        elif cmd == CMD["STOP_SCRIPT"]:
            return False
        # everything else (payload, gravity, force mode, teach mode ...) is accepted without effect
        return True

    # -- physics
    def _update_kinematics(self, first: bool = False) -> None:
        arm, mo = self.arm, self.motion
        T = arm.flange_T(arm.d) @ arm.tcp
        pose = matrix_to_pose(T)
        if not first:
            dt = 1.0 / self.cfg.physics_hz
            R_prev = pose_to_matrix(self.tcp_pose)[:3, :3]
            self.tcp_speed = np.concatenate([(pose[:3] - self.tcp_pose[:3]) / dt,
                                             relative_rotvec(T[:3, :3], R_prev) / dt])
        self.tcp_pose = pose
        if first or not np.array_equal(mo.target_q, self._fk_target_q):
            self._fk_target_q = mo.target_q.copy()
            self.target_tcp_pose = matrix_to_pose(arm.fk(mo.target_q))
        self.toy = (arm.T_urbase_world @ np.append(arm.d.xpos[arm.toy_id], 1.0))[:3]
        self.grip = float(arm.d.qpos[arm.grip_qadr])

    def tick(self, dt: float) -> None:
        arm, mo, mj = self.arm, self.motion, self.arm.mj
        with self.lock:
            self._script_tick()
            q_before = mo.q.copy()
            mo.step(dt)
            self.stats["path_length_rad"] += float(np.sum(np.abs(mo.q - q_before)))
            d = arm.d
            d.qpos[arm.qadr] = mo.q
            d.qvel[arm.vadr] = mo.qd
            d.qfrc_applied[arm.vadr] = d.qfrc_bias[arm.vadr]  # gravity compensation during the step
            closed = bool(self.digital_out >> self.cfg.gripper_pin & 1)
            d.ctrl[arm.grip_act] = 0.8 if closed else 0.0
            mj.mj_step(arm.m, d)
            d.qpos[arm.qadr] = mo.q  # the arm is position controlled: undo the step's drift
            d.qvel[arm.vadr] = mo.qd
            mj.mj_kinematics(arm.m, d)
            self._update_kinematics()
            if self.cfg.collision_stop and self.safety == "NORMAL":
                pen = arm.table_contact()
                if pen == 0.0:
                    self.contact_allowance = 0.0
                if pen > self.contact_allowance + 0.004:
                    self.set_safety("PROTECTIVE_STOP", f"collision with the table ({pen * 1000:.1f} mm)")
            self._make_snapshot()

    def _make_snapshot(self) -> None:
        mo = self.motion
        q = mo.q.tolist() if mo is not None else list(self.cfg.initial_q)
        zeros6 = [0.0] * 6
        running = self.script_running and self.runtime_state == RUNTIME_STATE["PLAYING"]
        status = (ROBOT_STATUS_POWER_ON if self.robot_mode >= ROBOT_MODE["POWER_ON"] else 0) | (
            ROBOT_STATUS_PROGRAM_RUNNING if running else 0)
        s = {
            "timestamp": self.now(),
            "target_q": (mo.target_q.tolist() if mo is not None else q),
            "target_qd": (mo.qd.tolist() if mo is not None else zeros6),
            "target_qdd": (mo.qdd.tolist() if mo is not None else zeros6),
            "actual_q": q,
            "actual_qd": (mo.qd.tolist() if mo is not None else zeros6),
            "actual_qdd": (mo.qdd.tolist() if mo is not None else zeros6),
            "actual_TCP_pose": self.tcp_pose.tolist(),
            "actual_TCP_speed": self.tcp_speed.tolist(),
            "target_TCP_pose": self.target_tcp_pose.tolist(),
            "target_TCP_speed": self.tcp_speed.tolist(),
            "actual_digital_output_bits": self.digital_out,
            "joint_temperatures": [32.0] * 6,
            "actual_execution_time": 0.3,
            "robot_mode": self.robot_mode,
            "joint_mode": [253] * 6 if self.robot_mode == ROBOT_MODE["RUNNING"] else [236] * 6,
            "safety_mode": SAFETY_MODE[self.safety],
            "safety_status": SAFETY_MODE[self.safety],
            "safety_status_bits": SAFETY_BITS.get(self.safety, 0),
            "runtime_state": self.runtime_state,
            "robot_status_bits": status,
            "speed_scaling": self.speed_slider,
            "target_speed_fraction": self.speed_slider,
            "actual_main_voltage": 48.0, "actual_robot_voltage": 48.0, "actual_robot_current": 0.8,
            "actual_joint_voltage": [47.8] * 6,
            "actual_tool_accelerometer": [0.0, 0.0, -9.81],
            "payload": 1.0, "payload_cog": [0.0, 0.0, 0.05], "payload_inertia": zeros6,
            "out_int": list(self.out_int), "out_double": list(self.out_double), "out_bits": list(self.out_bits),
            "in_int": list(self.in_int), "in_double": list(self.in_double), "in_bits": list(self.in_bits),
        }
        self.snapshot = s

    def status(self) -> dict:
        with self.lock:
            mo = self.motion
            return {
                "time": self.now(), "model": self.cfg.model, "q": mo.q.tolist() if mo else list(self.cfg.initial_q),
                "tcp_pose": self.tcp_pose.tolist(), "toy": self.toy.tolist(), "gripper_qpos": self.grip,
                "gripper_closed": bool(self.digital_out >> self.cfg.gripper_pin & 1),
                "digital_out": self.digital_out, "safety_mode": self.safety, "safety_reason": self.safety_reason,
                "robot_mode": mode_name(ROBOT_MODE, self.robot_mode),
                "runtime_state": mode_name(RUNTIME_STATE, self.runtime_state),
                "program": self.program, "script_running": self.script_running,
                "motion": mo.mode if mo else "idle", "ik_failures": mo.ik_failures if mo else 0,
                "hang": self.cfg.hang, "events": list(self.events[-20:]),
            }
