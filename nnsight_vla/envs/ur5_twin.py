"""A protocol-level twin of a Universal Robots controller, for tests and rehearsals.

The twin answers the real wire protocols that the ``ur_rtde`` client (1.6) speaks, so the real
``rtde_control`` / ``rtde_receive`` / ``rtde_io`` / ``dashboard_client`` objects connect to it
unchanged:

* **RTDE** (port 30004): frames ``>HB`` (size including the 3-byte header, type);
  ``V`` protocol version, ``v`` controller version, ``O`` output recipe (frequency + names ->
  recipe id + types), ``I`` input recipes (numbered from 1 per connection, as ur_rtde assumes),
  ``S`` / ``P`` start / pause, ``U`` data packages both ways (outputs streamed at the requested rate).
* **Dashboard** (port 29999): greeting line, then one reply line per command (``PolyscopeVersion``,
  ``get robot model``, ``get serial number``, ``robotmode``, ``safetymode``, ``power on``,
  ``brake release``, ``play``, ``stop``, ``unlock protective stop`` ...).
* **Script port** (port 30003): receives URScript programs; the ``rtde_control`` program uploaded
  by ``RTDEControlInterface`` is *emulated*: runtime state PLAYING, ``output_int_register_0 = 1``,
  then the register handshake of ur_rtde's control script (command id in ``input_int_register_0``,
  arguments in ``input_double_register_0..``, ready = 1 / done = 2 in ``output_int_register_0``).
  The command ids are those of ur_rtde 1.6.5's own control script (``RTDE::RobotCommand::Type``).
* **Admin** (port 30020, twin only): one JSON object per line, for tests and the twin camera source:
  ``status``, ``stats``, ``commands``, ``render``, ``protective_stop``, ``emergency_stop``,
  ``reset_safety``, ``set_q``, ``pause_stream`` (a controller that stops streaming), ``shutdown``.

The robot state is driven by MuJoCo: robosuite's UR5e arm with a Robotiq 85 gripper on a table with a
small toy block; the link offsets are set to the published DH parameters of the chosen model
(``UR5`` or ``UR5e``), so reported TCP poses equal the UR kinematics (UR "base" frame, flange plus the
TCP offset set with ``setTcp``). The arm is position-controlled (servoJ/servoL track their target with
a lookahead lag, moveJ/moveL follow trapezoidal profiles, speedJ/speedL integrate velocities,
stopJ/stopL decelerate); the gripper and the toy are simulated physically. Two cameras are rendered on
request: ``scene`` (a fixed view of the table) and ``wrist`` (on the gripper).

Failure modes for tests: protective / emergency stop (admin command, ``triggerProtectiveStop`` or a
collision of the arm with the table), a killed process (lost connection), and ``hang=True``: a
controller that accepts connections but never answers.

ur_rtde hard-codes the ports (30004 / 30003 / 29999), so parallel twins use distinct loopback
addresses (``127.0.0.2``, ``127.0.0.3`` ... all route to ``lo`` on Linux); see :func:`free_loopback_host`.
A twin whose ports are taken exits at once with a clear error.

Run it in its own process (ur_rtde's constructors hold the GIL while they wait for answers, so an
in-process twin deadlocks): ``python -m nnsight_vla.envs.ur5_twin --host 127.0.0.2`` or
:class:`TwinProcess`.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import queue
import random
import re
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
# at import, not on first use: the first moveL would otherwise stall the physics tick (and the stream) ~0.4 s
from scipy.spatial.transform import Rotation, Slerp
from ..errors import TwinError  # noqa: F401 (re-exported)

__all__ = [
    "TwinConfig",
    "TwinError",
    "TwinProcess",
    "TwinClient",
    "run_twin",
    "twin_cli",
    "free_loopback_host",
    "UR_DH",
    "DEFAULT_HOME_Q",
    "CMD",
]

# --------------------------------------------------------------------------------------------------
# Constants of the protocols (from the UR RTDE guide and ur_rtde 1.6.5's sources / control script)
# --------------------------------------------------------------------------------------------------

RTDE_PORT, SCRIPT_PORT, DASHBOARD_PORT, ADMIN_PORT = 30004, 30003, 29999, 30020

# RTDE message types (ASCII letters)
_V, _v, _M, _U, _O, _I, _S, _P = (ord(c) for c in "VvMUOISP")

# Published DH parameters (d, a) of the arms the twin can be; alpha is the same for all UR arms.
UR_DH: dict[str, dict[str, tuple[float, ...]]] = {
    "UR5": {"d": (0.089159, 0.0, 0.0, 0.10915, 0.09465, 0.0823), "a": (0.0, -0.425, -0.39225, 0.0, 0.0, 0.0)},
    "UR5e": {"d": (0.1625, 0.0, 0.0, 0.1333, 0.0997, 0.0996), "a": (0.0, -0.425, -0.3922, 0.0, 0.0, 0.0)},
}
UR_DH_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)

#: a common "home" pose: upper arm vertical, forearm horizontal, tool pointing down, in front of the base (-x)
DEFAULT_HOME_Q = (0.0, -math.pi / 2, math.pi / 2, -math.pi / 2, -math.pi / 2, 0.0)

#: command ids of ur_rtde's control script (RTDE::RobotCommand::Type in ur_rtde 1.6.5)
CMD = {
    "NO_CMD": 0, "MOVEJ": 1, "MOVEJ_IK": 2, "MOVEL": 3, "MOVEL_FK": 4, "FORCE_MODE": 6,
    "FORCE_MODE_STOP": 7, "ZERO_FT_SENSOR": 8, "SPEEDJ": 9, "SPEEDL": 10, "SERVOJ": 11, "SERVOC": 12,
    "SET_STD_DIGITAL_OUT": 13, "SET_TOOL_DIGITAL_OUT": 14, "SPEED_STOP": 15, "SERVO_STOP": 16,
    "SET_PAYLOAD": 17, "TEACH_MODE": 18, "END_TEACH_MODE": 19, "FORCE_MODE_SET_DAMPING": 20,
    "FORCE_MODE_SET_GAIN_SCALING": 21, "SET_SPEED_SLIDER": 22, "SET_STD_ANALOG_OUT": 23, "SERVOL": 24,
    "TOOL_CONTACT": 25, "GET_STEPTIME": 26, "GET_ACTUAL_JOINT_POSITIONS_HISTORY": 27,
    "GET_TARGET_WAYPOINT": 28, "SET_TCP": 29, "GET_INVERSE_KINEMATICS_ARGS": 30, "PROTECTIVE_STOP": 31,
    "STOPL": 33, "STOPJ": 34, "SET_WATCHDOG": 35, "IS_POSE_WITHIN_SAFETY_LIMITS": 36,
    "IS_JOINTS_WITHIN_SAFETY_LIMITS": 37, "GET_JOINT_TORQUES": 38, "POSE_TRANS": 39, "GET_TCP_OFFSET": 40,
    "JOG_START": 41, "JOG_STOP": 42, "GET_FORWARD_KINEMATICS_DEFAULT": 43, "GET_FORWARD_KINEMATICS_ARGS": 44,
    "MOVE_PATH": 45, "GET_INVERSE_KINEMATICS_DEFAULT": 46, "IS_STEADY": 47, "SET_CONF_DIGITAL_OUT": 48,
    "SET_INPUT_INT_REGISTER": 49, "SET_INPUT_DOUBLE_REGISTER": 50, "MOVE_UNTIL_CONTACT": 51,
    "FREEDRIVE_MODE": 52, "END_FREEDRIVE_MODE": 53, "GET_FREEDRIVE_STATUS": 54,
    "SET_EXTERNAL_FORCE_TORQUE": 55, "FT_RTDE_INPUT_ENABLE": 56, "ENABLE_EXTERNAL_FT_SENSOR": 57,
    "GET_ACTUAL_TOOL_FLANGE_POSE": 58, "SET_GRAVITY": 59, "GET_INVERSE_KINEMATICS_HAS_SOLUTION_DEFAULT": 60,
    "GET_INVERSE_KINEMATICS_HAS_SOLUTION_ARGS": 61, "START_CONTACT_DETECTION": 62,
    "STOP_CONTACT_DETECTION": 63, "READ_CONTACT_DETECTION": 64, "SET_TARGET_PAYLOAD": 65,
    "DIRECT_TORQUE": 66, "STOP_SCRIPT": 255,
}
_CMD_NAME = {v: k for k, v in CMD.items()}
# the control script processes these every loop and stays "ready" (no done/clear handshake)
_REALTIME_CMDS = {24, 11, 9, 10, 6, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71}
_MOTION_CMDS = {1, 2, 3, 4, 9, 10, 11, 12, 24, 41, 45, 51}

# robot / safety / runtime state values (UR RTDE guide; ur_rtde's enums)
ROBOT_MODE = {"NO_CONTROLLER": -1, "DISCONNECTED": 0, "CONFIRM_SAFETY": 1, "BOOTING": 2, "POWER_OFF": 3,
              "POWER_ON": 4, "IDLE": 5, "BACKDRIVE": 6, "RUNNING": 7}
SAFETY_MODE = {"NORMAL": 1, "REDUCED": 2, "PROTECTIVE_STOP": 3, "RECOVERY": 4, "SAFEGUARD_STOP": 5,
               "SYSTEM_EMERGENCY_STOP": 6, "ROBOT_EMERGENCY_STOP": 7, "VIOLATION": 8, "FAULT": 9}
RUNTIME_STATE = {"STOPPING": 0, "STOPPED": 1, "PLAYING": 2, "PAUSING": 3, "PAUSED": 4, "RESUMING": 5}
_SAFETY_BITS = {"NORMAL": 1 << 0, "REDUCED": 1 << 1, "PROTECTIVE_STOP": (1 << 2) | (1 << 10),
                "ROBOT_EMERGENCY_STOP": (1 << 6) | (1 << 7) | (1 << 10),
                "SYSTEM_EMERGENCY_STOP": (1 << 5) | (1 << 7) | (1 << 10)}
_ROBOT_STATUS_POWER_ON, _ROBOT_STATUS_PROGRAM_RUNNING = 1 << 0, 1 << 1

_FMT = {"BOOL": "?", "UINT8": "B", "UINT32": "I", "UINT64": "Q", "INT32": "i", "DOUBLE": "d",
        "VECTOR3D": "3d", "VECTOR6D": "6d", "VECTOR6INT32": "6i", "VECTOR6UINT32": "6I"}
_V6, _V3 = "VECTOR6D", "VECTOR3D"
_OUTPUT_TYPES = {
    "timestamp": "DOUBLE", "target_q": _V6, "target_qd": _V6, "target_qdd": _V6, "target_current": _V6,
    "target_moment": _V6, "actual_q": _V6, "actual_qd": _V6, "actual_qdd": _V6, "actual_current": _V6,
    "actual_moment": _V6, "joint_control_output": _V6, "actual_TCP_pose": _V6, "actual_TCP_speed": _V6,
    "actual_TCP_force": _V6, "target_TCP_pose": _V6, "target_TCP_speed": _V6,
    "actual_digital_input_bits": "UINT64", "joint_temperatures": _V6, "actual_execution_time": "DOUBLE",
    "robot_mode": "INT32", "joint_mode": "VECTOR6INT32", "safety_mode": "INT32", "safety_status": "INT32",
    "actual_tool_accelerometer": _V3, "speed_scaling": "DOUBLE", "target_speed_fraction": "DOUBLE",
    "actual_momentum": "DOUBLE", "actual_main_voltage": "DOUBLE", "actual_robot_voltage": "DOUBLE",
    "actual_robot_current": "DOUBLE", "actual_joint_voltage": _V6, "actual_digital_output_bits": "UINT64",
    "runtime_state": "UINT32", "elbow_position": _V3, "elbow_velocity": _V3, "robot_status_bits": "UINT32",
    "safety_status_bits": "UINT32", "analog_io_types": "UINT32", "standard_analog_input0": "DOUBLE",
    "standard_analog_input1": "DOUBLE", "standard_analog_output0": "DOUBLE", "standard_analog_output1": "DOUBLE",
    "io_current": "DOUBLE", "tool_mode": "UINT32", "tool_analog_input_types": "UINT32",
    "tool_analog_input0": "DOUBLE", "tool_analog_input1": "DOUBLE", "tool_output_voltage": "INT32",
    "tool_output_current": "DOUBLE", "tool_temperature": "DOUBLE", "tcp_force_scalar": "DOUBLE",
    "output_bit_registers0_to_31": "UINT32", "output_bit_registers32_to_63": "UINT32",
    "input_bit_registers0_to_31": "UINT32", "input_bit_registers32_to_63": "UINT32",
    "payload": "DOUBLE", "payload_cog": _V3, "payload_inertia": _V6, "script_control_line": "UINT32",
    "ft_raw_wrench": _V6, "joint_position_deviation_ratio": "DOUBLE", "collision_detection_ratio": "DOUBLE",
    "tool_output_mode": "UINT8", "tool_digital_output0_mode": "UINT8", "tool_digital_output1_mode": "UINT8",
}
_INPUT_TYPES = {
    "speed_slider_mask": "UINT32", "speed_slider_fraction": "DOUBLE",
    "standard_digital_output_mask": "UINT8", "standard_digital_output": "UINT8",
    "configurable_digital_output_mask": "UINT8", "configurable_digital_output": "UINT8",
    "tool_digital_output_mask": "UINT8", "tool_digital_output": "UINT8",
    "standard_analog_output_mask": "UINT8", "standard_analog_output_type": "UINT8",
    "standard_analog_output_0": "DOUBLE", "standard_analog_output_1": "DOUBLE",
    "input_bit_registers0_to_31": "UINT32", "input_bit_registers32_to_63": "UINT32",
    "external_force_torque": _V6,
}
_REGISTER = re.compile(r"^(input|output)_(int|double|bit)_register_(\d+)$")


def _register_type(name: str, direction: str) -> str | None:
    m = _REGISTER.match(name)
    if not m or m.group(1) != direction:
        return None
    kind, idx = m.group(2), int(m.group(3))
    if kind == "bit":
        return "BOOL" if 64 <= idx <= 127 else None
    if idx > 47:
        return None
    return "INT32" if kind == "int" else "DOUBLE"


def output_type(name: str) -> str:
    """RTDE type of an output field, or ``NOT_FOUND`` (as a real controller answers)."""
    return _OUTPUT_TYPES.get(name) or _register_type(name, "output") or _register_type(name, "input") or "NOT_FOUND"


def input_type(name: str) -> str:
    """RTDE type of an input field, or ``NOT_FOUND``."""
    return _INPUT_TYPES.get(name) or _register_type(name, "input") or "NOT_FOUND"


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class TwinConfig:
    """How the twin presents itself and what it simulates.

    ``model`` sets both the dashboard's ``get robot model`` answer and the link geometry (DH) of the
    simulated arm. ``controller_version`` (major, minor, bugfix, build) decides the RTDE rate that
    ur_rtde picks: 125 Hz for CB3 (major 3), 500 Hz for e-Series (major 5). ``reported_model`` lets a
    test present one model while simulating another (wrong-robot checks).
    """

    host: str = "127.0.0.1"
    rtde_port: int = RTDE_PORT
    dashboard_port: int = DASHBOARD_PORT
    script_port: int = SCRIPT_PORT
    admin_port: int = ADMIN_PORT
    model: str = "UR5"
    reported_model: str | None = None
    serial_number: str = "2019300001"
    controller_version: tuple[int, int, int, int] = (3, 15, 8, 106339)
    initial_q: tuple[float, ...] = DEFAULT_HOME_Q
    tcp_offset: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    camera_size: int = 64
    gripper_pin: int = 0  # standard digital output that closes the gripper
    toy_position: tuple[float, float] = (-0.50, -0.10)  # toy block on the table, UR base frame (x, y)
    collision_stop: bool = True  # protective stop when the arm or gripper touches the table
    hang: bool = False  # accept connections, never answer
    physics_hz: float = 500.0

    def __post_init__(self) -> None:
        if self.model not in UR_DH:
            raise ValueError(f"TwinConfig.model={self.model!r} is not simulated; choose one of {sorted(UR_DH)}")
        if len(self.initial_q) != 6 or len(self.tcp_offset) != 6:
            raise ValueError("TwinConfig.initial_q and tcp_offset need 6 values each")
        if self.camera_size < 16 or self.camera_size > 512:
            raise ValueError(f"TwinConfig.camera_size={self.camera_size} must be within 16..512 pixels")
        self.controller_version = tuple(int(v) for v in self.controller_version)  # type: ignore[assignment]
        self.initial_q = tuple(float(v) for v in self.initial_q)
        self.tcp_offset = tuple(float(v) for v in self.tcp_offset)

    @property
    def rtde_hz(self) -> float:
        return 500.0 if self.controller_version[0] >= 5 else 125.0

    @property
    def polyscope_version(self) -> str:
        return ".".join(str(v) for v in self.controller_version)

    def ports(self) -> dict[str, int]:
        return {"rtde": self.rtde_port, "dashboard": self.dashboard_port, "script": self.script_port,
                "admin": self.admin_port}


# --------------------------------------------------------------------------------------------------
# Small pose helpers (UR poses are [x, y, z, rx, ry, rz] with a rotation vector)
# --------------------------------------------------------------------------------------------------


def _rotvec_to_mat(rv) -> np.ndarray:
    """Rotation vector (axis * angle) -> 3x3 matrix (MuJoCo's C helpers: ~50x faster than scipy here)."""
    import mujoco

    rv = np.asarray(rv, dtype=float)
    angle = float(np.linalg.norm(rv))
    if angle < 1e-12:
        return np.eye(3)
    quat = np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * rv / angle])
    R = np.empty(9)
    mujoco.mju_quat2Mat(R, quat)
    return R.reshape(3, 3)


def _mat_to_rotvec(R) -> np.ndarray:
    """3x3 rotation matrix -> rotation vector with angle in [0, pi] (UR's convention)."""
    import mujoco

    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, np.ascontiguousarray(R, dtype=float).reshape(9))
    if quat[0] < 0:
        quat = -quat
    s = math.sqrt(quat[1] ** 2 + quat[2] ** 2 + quat[3] ** 2)
    if s < 1e-12:
        return np.zeros(3)
    angle = 2.0 * math.atan2(s, quat[0])
    return quat[1:] / s * angle


def _pose_to_T(pose) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = _rotvec_to_mat(pose[3:6])
    T[:3, 3] = pose[:3]
    return T


def _T_to_pose(T: np.ndarray) -> np.ndarray:
    return np.concatenate([T[:3, 3], _mat_to_rotvec(T[:3, :3])])


_RZ_PI = np.diag([-1.0, -1.0, 1.0, 1.0])  # UR "base" frame = robosuite/ROS base_link turned by pi about z


# --------------------------------------------------------------------------------------------------
# The simulated arm (MuJoCo)
# --------------------------------------------------------------------------------------------------

_ARM_JOINTS = ("shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint", "wrist_1_joint", "wrist_2_joint",
               "wrist_3_joint")
_TABLE_TOP_Z = 0.8


def _build_mjcf(model: str, toy_xy_world: tuple[float, float], camera_size: int) -> str:
    """Compose the scene from robosuite's models (UR5e + Robotiq 85, table, toy, cameras) as MJCF text."""
    import logging

    logging.getLogger("robosuite").setLevel(logging.ERROR)  # robosuite's "private macro file" warnings
    from robosuite.models import MujocoWorldBase
    from robosuite.models.arenas import TableArena
    from robosuite.models.grippers import gripper_factory
    from robosuite.models.objects import BoxObject
    from robosuite.models.robots import UR5e

    world = MujocoWorldBase()
    robot = UR5e()
    robot.add_gripper(gripper_factory("Robotiq85Gripper"))
    robot.set_base_xpos([0.0, 0.0, _TABLE_TOP_Z])
    world.merge(robot)
    world.merge(TableArena(table_full_size=(1.1, 1.2, 0.05), table_offset=(0.3, 0.0, _TABLE_TOP_Z)))
    toy = BoxObject(name="toy", size=[0.02, 0.02, 0.02], rgba=[0.9, 0.15, 0.1, 1.0], density=300)
    body = toy.get_obj()
    body.set("pos", f"{toy_xy_world[0]} {toy_xy_world[1]} {_TABLE_TOP_Z + 0.021}")
    world.worldbody.append(body)
    world.merge_assets(toy)

    # Link offsets = the published DH parameters of the model (robosuite's mesh offsets differ by mm;
    # for the UR5 they differ by cm, and the meshes then sit slightly off their joints).
    dh = UR_DH[model]
    d1, d4, d5, d6 = dh["d"][0], dh["d"][3], dh["d"][4], dh["d"][5]
    a2, a3 = -dh["a"][1], -dh["a"][2]
    offsets = {
        "robot0_shoulder_link": f"0 0 {d1}",
        "robot0_forearm_link": f"0 -0.131 {a2}",
        "robot0_wrist_1_link": f"0 0 {a3}",
        "robot0_wrist_2_link": f"0 {d4 - (0.138 - 0.131)} 0",
        "robot0_wrist_3_link": f"0 0 {d5}",
        "robot0_right_hand": f"0 {d6} 0",
    }
    for name, pos in offsets.items():
        el = world.worldbody.find(f".//body[@name='{name}']")
        if el is None:  # pragma: no cover - robosuite layout changed
            raise TwinError(f"robosuite's UR5e model has no body {name!r}; cannot set {model} geometry")
        el.set("pos", pos)
    # robosuite's Robotiq 85 joints have no armature or damping: its tiny finger links under the kp=20 position
    # actuators are unstable at a 2 ms step (finger velocities of hundreds of rad/s, the fingers end outside
    # their joint range and do not reopen); a little rotor inertia and damping makes them close and open cleanly
    for joint in world.worldbody.iter("joint"):
        if joint.get("name", "").startswith("gripper0_"):
            joint.set("armature", "0.01")
            joint.set("damping", "0.1")

    # a fixed scene camera looking at the table from the front-right, slightly above
    cam_pos = np.array([1.25, -0.55, _TABLE_TOP_Z + 0.75])
    target = np.array([0.35, 0.0, _TABLE_TOP_Z + 0.15])
    fwd = target - cam_pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    import xml.etree.ElementTree as ET

    cam = ET.SubElement(world.worldbody, "camera")
    cam.set("name", "scene")
    cam.set("mode", "fixed")
    cam.set("pos", " ".join(f"{v:.4f}" for v in cam_pos))
    cam.set("xyaxes", " ".join(f"{v:.4f}" for v in (*right, *up)))
    cam.set("fovy", "50")
    xml = world.get_xml()
    # an offscreen buffer just large enough for the images, no multisampling: software GL (llvmpipe) on a
    # CPU-only machine renders a 64x64 frame in ~10-40 ms this way instead of ~50-70 ms
    return xml.replace("<visual>", f'<visual><global offwidth="{max(64, camera_size)}" '
                                   f'offheight="{max(64, camera_size)}"/><quality offsamples="0"/>', 1)


class _Arm:
    """MuJoCo model of the arm + gripper + toy; kinematics in the UR base frame."""

    def __init__(self, cfg: TwinConfig):
        import mujoco

        self.mj = mujoco
        self.cfg = cfg
        toy_world = (-cfg.toy_position[0], -cfg.toy_position[1])  # UR base -> world (turned by pi about z)
        self.m = mujoco.MjModel.from_xml_string(_build_mjcf(cfg.model, toy_world, cfg.camera_size))
        self.d = mujoco.MjData(self.m)
        self.kd = mujoco.MjData(self.m)  # scratch data for FK/IK
        self.qadr = np.array([self.m.joint(f"robot0_{j}").qposadr[0] for j in _ARM_JOINTS])
        self.vadr = np.array([self.m.joint(f"robot0_{j}").dofadr[0] for j in _ARM_JOINTS])
        self.base_id = self.m.body("robot0_base").id
        self.flange_id = self.m.body("robot0_right_hand").id
        self.toy_id = self.m.body("toy_main").id
        self.grip_act = [self.m.actuator(n).id for n in ("gripper0_finger_1", "gripper0_finger_2")]
        self.grip_qadr = self.m.joint("gripper0_finger_joint").qposadr[0]
        # geoms for the collision check: arm/gripper collision geoms against the table
        robot_geoms, table_geoms = set(), set()
        for i in range(self.m.ngeom):
            name = self.m.geom(i).name
            if (name.startswith("robot0_") and name.endswith("_col") and name != "robot0_base_col") or (
                name.startswith("gripper0_") and name.endswith("collision")
            ):
                robot_geoms.add(i)
            elif name.startswith("table") or name == "floor":
                table_geoms.add(i)
        self.robot_geoms, self.table_geoms = robot_geoms, table_geoms
        self.tcp = _pose_to_T(np.asarray(cfg.tcp_offset))
        self.d.qpos[self.qadr] = cfg.initial_q
        mujoco.mj_forward(self.m, self.d)
        self.T_world_urbase = self._T_world_body(self.d, self.base_id) @ _RZ_PI
        self.T_urbase_world = np.linalg.inv(self.T_world_urbase)

    @staticmethod
    def _T_world_body(d, body_id) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = d.xmat[body_id].reshape(3, 3)
        T[:3, 3] = d.xpos[body_id]
        return T

    def flange_T(self, d) -> np.ndarray:
        """Flange pose in the UR base frame from a data whose kinematics are up to date."""
        return self.T_urbase_world @ self._T_world_body(d, self.flange_id)

    def fk(self, q, tcp: np.ndarray | None = None) -> np.ndarray:
        """TCP pose (4x4, UR base frame) of joint vector ``q``."""
        self.kd.qpos[self.qadr] = q
        self.mj.mj_kinematics(self.m, self.kd)
        return self.flange_T(self.kd) @ (self.tcp if tcp is None else tcp)

    def ik(self, T_target: np.ndarray, q_seed, tcp: np.ndarray | None = None, iters: int = 100):
        """Damped least squares on MuJoCo's Jacobian; returns (q, converged)."""
        mj, m, kd = self.mj, self.m, self.kd
        tcp = self.tcp if tcp is None else tcp
        T_flange_des = self.T_world_urbase @ T_target @ np.linalg.inv(tcp)  # world frame
        q = np.array(q_seed, dtype=float)
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iters):
            kd.qpos[self.qadr] = q
            mj.mj_kinematics(m, kd)
            mj.mj_comPos(m, kd)
            T = self._T_world_body(kd, self.flange_id)
            e_p = T_flange_des[:3, 3] - T[:3, 3]
            e_r = _mat_to_rotvec(T_flange_des[:3, :3] @ T[:3, :3].T)
            if np.linalg.norm(e_p) < 1e-6 and np.linalg.norm(e_r) < 1e-5:
                return q, True
            mj.mj_jacBody(m, kd, jacp, jacr, self.flange_id)
            J = np.vstack([jacp[:, self.vadr], jacr[:, self.vadr]])
            e = np.concatenate([e_p, e_r])
            dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), e)
            n = np.linalg.norm(dq)
            if n > 0.3:
                dq *= 0.3 / n
            q = q + dq
        kd.qpos[self.qadr] = q
        mj.mj_kinematics(m, kd)
        T = self._T_world_body(kd, self.flange_id)
        ok = np.linalg.norm(T_flange_des[:3, 3] - T[:3, 3]) < 1e-4
        return q, bool(ok)

    def jacobian(self, q) -> np.ndarray:
        """6x6 Jacobian of the TCP (linear; angular) in the UR base frame."""
        mj, m, kd = self.mj, self.m, self.kd
        kd.qpos[self.qadr] = q
        mj.mj_kinematics(m, kd)
        mj.mj_comPos(m, kd)
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        p_tcp_world = (self._T_world_body(kd, self.flange_id) @ self.tcp)[:3, 3]
        mj.mj_jac(m, kd, jacp, jacr, p_tcp_world, self.flange_id)
        R = self.T_urbase_world[:3, :3]
        return np.vstack([R @ jacp[:, self.vadr], R @ jacr[:, self.vadr]])

    def table_contact(self) -> float:
        """Largest penetration (m) of an arm/gripper collision geom into the table or floor."""
        worst = 0.0
        for i in range(self.d.ncon):
            c = self.d.contact[i]
            g1, g2 = int(c.geom1), int(c.geom2)
            robot, table = self.robot_geoms, self.table_geoms
            if (g1 in robot and g2 in table) or (g2 in robot and g1 in table):
                worst = max(worst, -float(c.dist))
        return worst


# --------------------------------------------------------------------------------------------------
# Motion generation (what the controller's trajectory generator does with each command)
# --------------------------------------------------------------------------------------------------

_JOINT_VMAX = math.pi  # rad/s, UR5 hardware joint speed limit
_Q_LIMIT = 2 * math.pi


def _trapezoid(dist: float, v: float, a: float) -> tuple[float, Callable[[float], float]]:
    """Duration and progress function s(t) in [0, dist] of a trapezoidal (or triangular) profile."""
    v, a = max(v, 1e-6), max(a, 1e-6)
    if dist <= 0:
        return 0.0, lambda t: 0.0
    t_acc = v / a
    if a * t_acc * t_acc >= dist:  # triangular
        t_acc = math.sqrt(dist / a)
        v = a * t_acc
        total = 2 * t_acc
    else:
        total = 2 * t_acc + (dist - a * t_acc * t_acc) / v

    def s(t: float) -> float:
        t = min(max(t, 0.0), total)
        if t < t_acc:
            return 0.5 * a * t * t
        if t > total - t_acc:
            r = total - t
            return dist - 0.5 * a * r * r
        return 0.5 * a * t_acc * t_acc + v * (t - t_acc)

    return total, s


class _Motion:
    """Joint-space state of the arm and the active motion (servo, speed, move, stop)."""

    def __init__(self, arm: _Arm, q0):
        self.arm = arm
        self.q = np.array(q0, dtype=float)
        self.qd = np.zeros(6)
        self.qdd = np.zeros(6)
        self.target_q = self.q.copy()
        self.mode = "idle"
        self.params: dict[str, Any] = {}
        self.done = True
        self.ik_failures = 0

    # -- starting motions
    def servo_j(self, q, lookahead: float) -> None:
        if self.mode != "servo":
            self.mode = "servo"
        self.params = {"q": np.asarray(q, float), "lookahead": float(lookahead)}
        self.done = True

    def servo_l(self, pose, lookahead: float) -> None:
        pose = np.asarray(pose, float)
        last = self.params.get("pose") if self.mode == "servo" else None
        if last is not None and np.array_equal(last, pose):
            self.params["lookahead"] = float(lookahead)
            return
        q, ok = self.arm.ik(_pose_to_T(pose), self.params.get("q", self.q) if self.mode == "servo" else self.q)
        if not ok:
            self.ik_failures += 1
            return
        self.mode = "servo"
        self.params = {"q": q, "lookahead": float(lookahead), "pose": pose}

    def speed_j(self, qd, acc: float) -> None:
        self.mode = "speedj"
        self.params = {"qd": np.asarray(qd, float), "a": max(float(acc), 1e-3)}

    def speed_l(self, xd, acc: float) -> None:
        self.mode = "speedl"
        self.params = {"xd": np.asarray(xd, float), "a": max(float(acc), 1e-3),
                       "x_cmd": self.params.get("x_cmd", np.zeros(6)) if self.mode == "speedl" else np.zeros(6)}

    def move_j(self, q1, v: float, a: float) -> bool:
        q0 = self.q.copy()
        q1 = np.asarray(q1, float)
        dist = float(np.max(np.abs(q1 - q0)))
        total, s = _trapezoid(dist, v, a)
        self.mode, self.done = "movej", False
        self.params = {"q0": q0, "q1": q1, "dist": dist, "total": total, "s": s, "t": 0.0}
        self.qd[:] = 0
        return True

    def move_l(self, pose1, v: float, a: float) -> bool:
        T0 = self.arm.fk(self.q)
        T1 = _pose_to_T(np.asarray(pose1, float))
        q_end, ok = self.arm.ik(T1, self.q)
        if not ok:
            self.ik_failures += 1
            return False
        dist = float(np.linalg.norm(T1[:3, 3] - T0[:3, 3]))
        ang = float(np.linalg.norm(_mat_to_rotvec(T1[:3, :3] @ T0[:3, :3].T)))
        length = max(dist, ang * 0.1)  # pure rotations: treat 1 rad as 10 cm of path
        total, s = _trapezoid(length, v, a)
        slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([T0[:3, :3], T1[:3, :3]])))
        self.mode, self.done = "movel", False
        self.params = {"T0": T0, "T1": T1, "len": length, "total": total, "s": s, "t": 0.0, "slerp": slerp,
                       "q_end": q_end}
        self.qd[:] = 0
        return True

    def stop(self, decel: float) -> None:
        if self.mode == "idle":
            self.done = True
            return
        self.mode, self.done = "stopping", False
        self.params = {"a": max(float(decel), 0.05)}

    def halt(self) -> None:
        """Immediate stop (protective / emergency stop)."""
        self.mode, self.params, self.done = "idle", {}, True
        self.qd[:] = 0
        self.qdd[:] = 0
        self.target_q = self.q.copy()

    # -- one physics tick
    def step(self, dt: float) -> None:
        q_prev, qd_prev = self.q.copy(), self.qd.copy()
        mode, p = self.mode, self.params
        if mode == "servo":
            tau = max(p["lookahead"], 2 * dt)
            v = np.clip((p["q"] - self.q) / tau, -_JOINT_VMAX, _JOINT_VMAX)
            self.q = self.q + v * dt
            self.target_q = p["q"]
        elif mode == "speedj":
            dv = np.clip(p["qd"] - self.qd, -p["a"] * dt, p["a"] * dt)
            self.qd = np.clip(self.qd + dv, -_JOINT_VMAX, _JOINT_VMAX)
            self.q = self.q + self.qd * dt
            self.target_q = self.q
        elif mode == "speedl":
            dx = np.clip(p["xd"] - p["x_cmd"], -p["a"] * dt, p["a"] * dt)
            p["x_cmd"] = p["x_cmd"] + dx
            J = self.arm.jacobian(self.q)
            qd = np.linalg.solve(J.T @ J + 1e-4 * np.eye(6), J.T @ p["x_cmd"])
            self.q = self.q + np.clip(qd, -_JOINT_VMAX, _JOINT_VMAX) * dt
            self.target_q = self.q
        elif mode == "movej":
            p["t"] += dt
            frac = p["s"](p["t"]) / p["dist"] if p["dist"] > 0 else 1.0
            self.q = p["q0"] + (p["q1"] - p["q0"]) * frac
            self.target_q = p["q1"]
            if p["t"] >= p["total"]:
                self.q, self.mode, self.done = p["q1"].copy(), "idle", True
        elif mode == "movel":
            p["t"] += dt
            frac = p["s"](p["t"]) / p["len"] if p["len"] > 0 else 1.0
            T = np.eye(4)
            T[:3, 3] = p["T0"][:3, 3] + (p["T1"][:3, 3] - p["T0"][:3, 3]) * frac
            T[:3, :3] = p["slerp"]([frac]).as_matrix()[0]
            q, ok = self.arm.ik(T, self.q, iters=20)
            if ok:
                self.q = q
            self.target_q = p["q_end"]
            if p["t"] >= p["total"]:
                self.q, self.mode, self.done = p["q_end"].copy(), "idle", True
        elif mode == "stopping":
            speed = np.max(np.abs(self.qd)) if np.any(self.qd) else 0.0
            if speed <= p["a"] * dt:
                self.mode, self.qd, self.done = "idle", np.zeros(6), True
            else:
                self.qd = self.qd * (1.0 - p["a"] * dt / speed)
                self.q = self.q + self.qd * dt
            self.target_q = self.q
        self.q = np.clip(self.q, -_Q_LIMIT, _Q_LIMIT)
        if mode not in ("stopping",):
            self.qd = (self.q - q_prev) / dt
        self.qdd = (self.qd - qd_prev) / dt


# --------------------------------------------------------------------------------------------------
# The controller: registers, safety state, control-script emulation, physics tick
# --------------------------------------------------------------------------------------------------


class _Controller:
    def __init__(self, cfg: TwinConfig, arm: _Arm | None):
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
        self.motion = _Motion(arm, cfg.initial_q) if arm is not None else None
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
                m = _REGISTER.match(name)
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
                name = _CMD_NAME.get(cmd, f"CMD_{cmd}")
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
        if cmd in _REALTIME_CMDS:
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
                q, ok = self.arm.ik(_pose_to_T(target), mo.q)
                ok = ok and mo.move_j(q, v, acc)
            elif cmd == CMD["MOVEL"]:
                ok = mo.move_l(target, v, acc)
            else:
                ok = mo.move_l(_T_to_pose(self.arm.fk(target)), v, acc)
            if not ok:
                self.log_event(f"{_CMD_NAME[cmd]}: no inverse kinematics solution; program stopped")
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
            self.arm.tcp = _pose_to_T(self.tcp)
        elif cmd == CMD["GET_TCP_OFFSET"]:
            self._set_out_doubles(self.tcp)
        elif cmd == CMD["GET_FORWARD_KINEMATICS_DEFAULT"]:
            self._set_out_doubles(self.tcp_pose)
        elif cmd == CMD["GET_FORWARD_KINEMATICS_ARGS"]:
            # ur_rtde sends q only (recipe 6) or q + tcp offset (recipe 12); unused registers read 0
            tcp = _pose_to_T(a[6:12]) if np.any(a[6:12]) else None
            self._set_out_doubles(_T_to_pose(self.arm.fk(a[:6], tcp)))
        elif cmd in (CMD["GET_INVERSE_KINEMATICS_ARGS"], CMD["GET_INVERSE_KINEMATICS_DEFAULT"],
                     CMD["GET_INVERSE_KINEMATICS_HAS_SOLUTION_DEFAULT"],
                     CMD["GET_INVERSE_KINEMATICS_HAS_SOLUTION_ARGS"]):
            seed = a[6:12] if cmd in (30, 61) else mo.q
            q, ok = self.arm.ik(_pose_to_T(a[:6]), seed)
            self._set_out_doubles(q)
            self.out_int[off + 1] = int(ok)
        elif cmd in (CMD["IS_POSE_WITHIN_SAFETY_LIMITS"], CMD["IS_JOINTS_WITHIN_SAFETY_LIMITS"], CMD["IS_STEADY"]):
            steady = cmd != CMD["IS_STEADY"] or bool(np.max(np.abs(mo.qd)) < 1e-3)
            self.out_int[off + 1] = int(steady)
        elif cmd == CMD["GET_STEPTIME"]:
            self._set_out_doubles([1.0 / self.cfg.rtde_hz])
        elif cmd == CMD["GET_ACTUAL_TOOL_FLANGE_POSE"]:
            self._set_out_doubles(_T_to_pose(self.arm.fk(mo.q, np.eye(4))))
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
        pose = _T_to_pose(T)
        if not first:
            dt = 1.0 / self.cfg.physics_hz
            R_prev = _rotvec_to_mat(self.tcp_pose[3:])
            self.tcp_speed = np.concatenate([(pose[:3] - self.tcp_pose[:3]) / dt,
                                             _mat_to_rotvec(T[:3, :3] @ R_prev.T) / dt])
        self.tcp_pose = pose
        if first or not np.array_equal(mo.target_q, self._fk_target_q):
            self._fk_target_q = mo.target_q.copy()
            self.target_tcp_pose = _T_to_pose(arm.fk(mo.target_q))
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
        status = (_ROBOT_STATUS_POWER_ON if self.robot_mode >= ROBOT_MODE["POWER_ON"] else 0) | (
            _ROBOT_STATUS_PROGRAM_RUNNING if running else 0)
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
            "safety_status_bits": _SAFETY_BITS.get(self.safety, 0),
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
                "robot_mode": next(k for k, v in ROBOT_MODE.items() if v == self.robot_mode),
                "runtime_state": next(k for k, v in RUNTIME_STATE.items() if v == self.runtime_state),
                "program": self.program, "script_running": self.script_running,
                "motion": mo.mode if mo else "idle", "ik_failures": mo.ik_failures if mo else 0,
                "hang": self.cfg.hang, "events": list(self.events[-20:]),
            }


# --------------------------------------------------------------------------------------------------
# Value getters for streamed output fields
# --------------------------------------------------------------------------------------------------


def _getter(name: str) -> Callable[[dict], Any]:
    m = _REGISTER.match(name)
    if m:
        direction, kind, idx = m.group(1), m.group(2), int(m.group(3))
        key = ("out_" if direction == "output" else "in_") + kind
        if kind == "bit":
            word, bit = divmod(idx - 64, 32)
            return lambda s: bool(s[key + "s"][word] >> bit & 1)
        return lambda s: s[key][idx]
    if name.endswith("bit_registers0_to_31"):
        key = "out_bits" if name.startswith("output") else "in_bits"
        return lambda s: s[key][0]
    if name.endswith("bit_registers32_to_63"):
        key = "out_bits" if name.startswith("output") else "in_bits"
        return lambda s: s[key][1]
    typ = _OUTPUT_TYPES[name]
    default: Any = 0.0
    if typ in ("VECTOR6D", "VECTOR6INT32", "VECTOR6UINT32"):
        default = [0] * 6 if "INT" in typ else [0.0] * 6
    elif typ == "VECTOR3D":
        default = [0.0] * 3
    elif typ in ("UINT8", "UINT32", "UINT64", "INT32"):
        default = 0
    return lambda s: s.get(name, default)


# --------------------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------------------


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return buf


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, handler, twin: "_Twin"):
        self.twin = twin
        super().__init__(addr, handler)


class _RTDEHandler(socketserver.BaseRequestHandler):
    def setup(self) -> None:
        self.twin: _Twin = self.server.twin  # type: ignore[attr-defined]
        self.ctl = self.twin.ctl
        self.sock: socket.socket = self.request
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.send_lock = threading.Lock()
        self.inputs: dict[int, tuple[list[str], struct.Struct]] = {}
        self.output: tuple[list[str], struct.Struct, list[Callable]] | None = None
        self.freq = self.twin.cfg.rtde_hz
        self.streaming = threading.Event()
        self.closed = threading.Event()
        with self.ctl.lock:
            self.ctl.stats["rtde_connections"] += 1
            self.client_id = self.ctl.stats["rtde_connections"]

    def send(self, typ: int, payload: bytes = b"") -> None:
        with self.send_lock:
            self.sock.sendall(struct.pack(">HB", len(payload) + 3, typ) + payload)

    def handle(self) -> None:
        if self.twin.cfg.hang:
            self.twin.hang(self.sock)
            return
        streamer = threading.Thread(target=self._stream, daemon=True)
        streamer.start()
        try:
            while True:
                size, typ = struct.unpack(">HB", _recv_exact(self.sock, 3))
                payload = _recv_exact(self.sock, size - 3) if size > 3 else b""
                self._dispatch(typ, payload)
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.streaming.clear()

    def _dispatch(self, typ: int, payload: bytes) -> None:
        cfg = self.twin.cfg
        if typ == _V:
            version = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 0
            self.send(_V, struct.pack(">B", 1 if version in (1, 2) else 0))
        elif typ == _v:
            self.send(_v, struct.pack(">IIII", *cfg.controller_version))
        elif typ == _O:
            freq = struct.unpack(">d", payload[:8])[0]
            names = [n for n in payload[8:].decode("ascii", "replace").split(",") if n]
            types = [output_type(n) for n in names]
            if "NOT_FOUND" not in types:
                fmt = ">B" + "".join(_FMT[t] for t in types)
                self.output = (names, struct.Struct(fmt), [_getter(n) for n in names])
                self.freq = min(max(freq, 1.0), cfg.rtde_hz) if freq > 0 else cfg.rtde_hz
            self.send(_O, struct.pack(">B", 1) + ",".join(types).encode())
        elif typ == _I:
            names = [n for n in payload.decode("ascii", "replace").split(",") if n]
            types = [input_type(n) for n in names]
            rid = len(self.inputs) + 1  # recipes numbered from 1 per connection, as ur_rtde assumes
            if "NOT_FOUND" not in types:
                self.inputs[rid] = (names, struct.Struct(">" + "".join(_FMT[t] for t in types)))
            else:
                rid = 0
            self.send(_I, struct.pack(">B", rid) + ",".join(types).encode())
        elif typ == _S:
            ok = self.output is not None
            self.send(_S, struct.pack(">B", int(ok)))
            if ok:
                self.streaming.set()
        elif typ == _P:
            self.streaming.clear()
            with self.send_lock:  # no data package may slip in before the pause answer
                pass
            self.send(_P, struct.pack(">B", 1))
        elif typ == _U:
            rid = payload[0]
            recipe = self.inputs.get(rid)
            if recipe is None:
                self.ctl.log_event(f"RTDE client {self.client_id}: data package for unknown recipe {rid}")
                return
            names, st = recipe
            body = payload[1:1 + st.size]
            if len(body) < st.size:
                self.ctl.log_event(f"RTDE client {self.client_id}: short data package for recipe {rid}")
                return
            vals = list(st.unpack(body))
            flat, i = [], 0
            for n in names:
                t = input_type(n)
                k = 6 if t == "VECTOR6D" else 1
                flat.append(vals[i] if k == 1 else vals[i:i + k])
                i += k
            self.ctl.apply_inputs(self.client_id, names, flat)
        elif typ == _M:
            pass  # text messages from the client are not needed
        else:
            self.ctl.log_event(f"RTDE client {self.client_id}: unknown message type {typ}")

    def _stream(self) -> None:
        next_t = time.perf_counter()
        while not self.closed.is_set() and not self.twin.stopping.is_set():
            if not self.streaming.wait(0.05):
                next_t = time.perf_counter()
                continue
            if time.perf_counter() < self.twin.stream_pause_until:  # admin "pause_stream": a stalled controller
                time.sleep(0.005)
                next_t = time.perf_counter()
                continue
            names, st, getters = self.output  # type: ignore[misc]
            snap = self.ctl.snapshot
            vals: list[Any] = [1]
            for g in getters:
                v = g(snap)
                if isinstance(v, (list, tuple)):
                    vals.extend(v)
                else:
                    vals.append(v)
            try:
                data = st.pack(*vals)
                with self.send_lock:
                    if not self.streaming.is_set():
                        continue
                    self.sock.sendall(struct.pack(">HB", len(data) + 3, _U) + data)
            except (OSError, struct.error) as e:
                if isinstance(e, struct.error):
                    self.ctl.log_event(f"RTDE pack error: {e}")
                return
            next_t += 1.0 / self.freq
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.1:
                next_t = time.perf_counter()


class _DashboardHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        twin: _Twin = self.server.twin  # type: ignore[attr-defined]
        if twin.cfg.hang:
            twin.hang(self.request)
            return
        self.wfile.write(b"Connected: Universal Robots Dashboard Server\n")
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            reply, close = twin.dashboard(line)
            self.wfile.write((reply + "\n").encode())
            if close:
                return


class _ScriptHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        twin: _Twin = self.server.twin  # type: ignore[attr-defined]
        sock: socket.socket = self.request
        if twin.cfg.hang:
            twin.hang(sock)
            return
        buf = ""
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data.decode("utf-8", "replace")
            buf = twin.consume_script(buf)


class _AdminHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        twin: _Twin = self.server.twin  # type: ignore[attr-defined]
        for raw in self.rfile:
            try:
                req = json.loads(raw)
                reply = twin.admin(req)
            except Exception as e:  # answer every request; errors travel back as text
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.wfile.write((json.dumps(reply) + "\n").encode())
            if req.get("cmd") == "shutdown":
                return


class _Twin:
    """All servers, the controller and the physics/render threads of one twin."""

    def __init__(self, cfg: TwinConfig):
        self.cfg = cfg
        self.stopping = threading.Event()
        self.hung: list[socket.socket] = []
        self.servers: list[_Server] = []
        # bind first so that a busy port fails within milliseconds, before MuJoCo loads
        for name, port, handler in (("RTDE", cfg.rtde_port, _RTDEHandler),
                                    ("dashboard", cfg.dashboard_port, _DashboardHandler),
                                    ("script", cfg.script_port, _ScriptHandler),
                                    ("admin", cfg.admin_port, _AdminHandler)):
            try:
                self.servers.append(_Server((cfg.host, port), handler, self))
            except OSError as e:
                for s in self.servers:
                    s.server_close()
                hint = ("another controller twin, URSim or robot driver is listening there; stop it or start "
                        "the twin on another loopback address (e.g. --host 127.0.0.2)")
                if e.errno == 99:  # EADDRNOTAVAIL
                    hint = "that address is not on this machine; use 127.0.0.1 or another 127.x.y.z address"
                raise TwinError(f"ur5 twin: cannot listen for {name} on {cfg.host}:{port} ({e.strerror}); "
                                f"{hint}") from None
        self.arm = None if cfg.hang else _Arm(cfg)
        self.ctl = _Controller(cfg, self.arm)
        self.render_q: queue.Queue = queue.Queue()
        self.stream_pause_until = 0.0

    # -- failure mode: accept, never answer
    def hang(self, sock: socket.socket) -> None:
        self.hung.append(sock)
        self.stopping.wait()

    # -- dashboard commands
    def dashboard(self, line: str) -> tuple[str, bool]:
        ctl, cfg = self.ctl, self.cfg
        with ctl.lock:
            ctl.stats["dashboard_commands"] += 1
        cmd = line.strip()
        low = cmd.lower()
        model = cfg.reported_model or cfg.model
        rmode = lambda: next(k for k, v in ROBOT_MODE.items() if v == ctl.robot_mode)  # noqa: E731
        if low == "polyscopeversion":
            return f"URSoftware {cfg.polyscope_version} (Mar 08 2023)", False
        if low == "version":
            return cfg.polyscope_version, False
        if low == "get robot model":
            return model, False
        if low == "get serial number":
            return cfg.serial_number, False
        if low == "robotmode":
            return f"Robotmode: {rmode()}", False
        if low == "safetymode":
            return f"Safetymode: {ctl.safety}", False
        if low == "safetystatus":
            return f"Safetystatus: {ctl.safety}", False
        if low == "running":
            return f"Program running: {str(ctl.runtime_state == RUNTIME_STATE['PLAYING']).lower()}", False
        if low == "programstate":
            state = next(k for k, v in RUNTIME_STATE.items() if v == ctl.runtime_state)
            return f"{state} {ctl.program or '<unnamed>'}", False
        if low == "is in remote control":
            return "true", False
        if low == "isprogramsaved":
            return f"true {ctl.program or '<unnamed>'}", False
        if low == "get loaded program":
            return (f"Loaded program: {ctl.program}" if ctl.program else "No program loaded"), False
        if low.startswith("load "):
            return f"Loading program: {cmd[5:].strip()}", False
        if low == "power on":
            with ctl.lock:
                if ctl.safety.endswith("EMERGENCY_STOP"):
                    return "Powering on failed: emergency stop active", False
                if ctl.robot_mode < ROBOT_MODE["IDLE"]:
                    ctl.robot_mode = ROBOT_MODE["IDLE"]
            return "Powering on", False
        if low == "power off":
            with ctl.lock:
                ctl.stop_program("power off")
                ctl.robot_mode = ROBOT_MODE["POWER_OFF"]
            return "Powering off", False
        if low == "brake release":
            with ctl.lock:
                if ctl.robot_mode >= ROBOT_MODE["POWER_ON"]:
                    ctl.robot_mode = ROBOT_MODE["RUNNING"]
            return "Brake releasing", False
        if low == "play":
            with ctl.lock:
                if ctl.safety != "NORMAL" or ctl.program is None:
                    return "Failed to execute: play", False
                if ctl.program == "rtde_control":
                    ctl.script_running = True
                    ctl.executing_cmd = False
                    ctl.out_int[ctl.reg_off] = 1
                ctl.runtime_state = RUNTIME_STATE["PLAYING"]
            return "Starting program", False
        if low == "stop":
            ctl.stop_program("dashboard stop")
            return "Stopped", False
        if low == "pause":
            with ctl.lock:
                if ctl.runtime_state == RUNTIME_STATE["PLAYING"]:
                    ctl.runtime_state = RUNTIME_STATE["PAUSED"]
                    if ctl.motion:
                        ctl.motion.stop(3.0)
            return "Pausing program", False
        if low == "unlock protective stop":
            with ctl.lock:
                if ctl.safety != "PROTECTIVE_STOP":
                    return ("Cannot unlock protective stop until 5s after occurrence. Always inspect cause of "
                            "protective stop before unlocking"), False
                ctl.clear_safety()
                ctl.log_event("protective stop unlocked from the dashboard")
            return "Protective stop releasing", False
        if low in ("close safety popup", "close popup"):
            return "closing safety popup" if "safety" in low else "closing popup", False
        if low.startswith("popup "):
            return "showing popup", False
        if low == "restart safety":
            with ctl.lock:
                ctl.clear_safety()
                ctl.robot_mode = ROBOT_MODE["POWER_OFF"]
            return "Restarting safety", False
        if low.startswith("addtolog "):
            return "Added log message", False
        if low.startswith("setuserrole "):
            return f"Setting user role: {cmd.split(' ', 1)[1]}", False
        if low == "quit":
            return "Disconnected", True
        if low == "shutdown":
            return "Shutting down", True
        return f"could not understand: '{cmd}'", False

    # -- script port: split the byte stream into programs (def/sec NAME(): ... end)
    def consume_script(self, buf: str) -> str:
        while True:
            m = re.search(r"^(def|sec)\s+(\w+)\s*\(\s*\)\s*:", buf, re.M)
            if not m:
                # single-line script commands are recorded, not executed
                if "\n" in buf and not re.search(r"^(def|sec)\s", buf, re.M):
                    for line in buf.splitlines():
                        if line.strip():
                            self.ctl.log_event(f"script line ignored: {line.strip()[:80]}")
                    return ""
                return buf
            end = re.search(r"^end\s*$", buf[m.end():], re.M)
            if not end:
                return buf[m.start():]
            text = buf[m.start():m.end() + end.end()]
            self.ctl.load_program(m.group(2), text)
            buf = buf[m.end() + end.end():]

    # -- admin requests (tests, rehearsal camera source)
    def admin(self, req: dict) -> dict:
        cmd = req.get("cmd")
        ctl = self.ctl
        if cmd == "status":
            return {"ok": True, **ctl.status()}
        if cmd == "stats":
            with ctl.lock:
                return {"ok": True, **json.loads(json.dumps(ctl.stats))}
        if cmd == "commands":
            since = int(req.get("since", 0))
            with ctl.lock:
                return {"ok": True, "total": len(ctl.command_log), "commands": ctl.command_log[since:]}
        if cmd == "protective_stop":
            ctl.set_safety("PROTECTIVE_STOP", req.get("reason", "protective stop requested (admin)"))
            return {"ok": True}
        if cmd == "emergency_stop":
            ctl.set_safety("ROBOT_EMERGENCY_STOP", req.get("reason", "emergency stop pressed (admin)"))
            return {"ok": True}
        if cmd == "reset_safety":
            with ctl.lock:
                ctl.clear_safety()
                ctl.robot_mode = ROBOT_MODE["RUNNING"]
            return {"ok": True}
        if cmd == "pause_stream":
            self.stream_pause_until = time.perf_counter() + float(req.get("seconds", 1.0))
            return {"ok": True}
        if cmd == "set_q":
            q = np.asarray(req["q"], float)
            if q.shape != (6,) or not np.all(np.isfinite(q)):
                raise ValueError("set_q needs 6 finite joint angles")
            with ctl.lock:
                if ctl.motion is None:
                    raise TwinError("this twin has no arm (hang mode)")
                ctl.motion.q = q.copy()
                ctl.motion.halt()
            return {"ok": True}
        if cmd == "render":
            cams = req.get("cameras", ["scene", "wrist"])
            if self.arm is None:
                raise TwinError("this twin has no cameras (hang mode)")
            bad = [c for c in cams if c not in ("scene", "wrist")]
            if bad:
                raise ValueError(f"unknown camera(s) {bad}; the twin renders 'scene' and 'wrist'")
            slot: dict = {}
            ev = threading.Event()
            self.render_q.put((cams, slot, ev))
            if not ev.wait(30):
                raise TwinError("render timed out")
            if "error" in slot:
                raise TwinError(slot["error"])
            return {"ok": True, "time": slot["time"], "images": {
                c: {"shape": list(img.shape), "data": base64.b64encode(img.tobytes()).decode()}
                for c, img in slot["images"].items()}}
        if cmd == "shutdown":
            threading.Thread(target=self.shutdown, daemon=True).start()
            return {"ok": True}
        raise ValueError(f"unknown admin command {cmd!r}; allowed: status, stats, commands, render, "
                         "protective_stop, emergency_stop, reset_safety, set_q, pause_stream, shutdown")

    # -- threads
    def _physics(self) -> None:
        dt = 1.0 / self.cfg.physics_hz
        self.arm.m.opt.timestep = dt
        next_t = time.perf_counter()
        while not self.stopping.is_set():
            self.ctl.tick(dt)
            next_t += dt
            delay = next_t - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -0.05:  # fell behind (e.g. busy machine): drop the backlog, stay real-time
                next_t = time.perf_counter()

    def _render(self) -> None:
        import mujoco

        size = self.cfg.camera_size
        renderer = None
        data = mujoco.MjData(self.arm.m)
        cams = {"scene": "scene", "wrist": "robot0_eye_in_hand"}
        opt = mujoco.MjvOption()
        opt.geomgroup[0] = 0  # robosuite's collision geoms
        opt.sitegroup[:] = 0  # and its marker sites are not part of the picture
        while not self.stopping.is_set():
            try:
                names, slot, ev = self.render_q.get(timeout=0.1)
            except queue.Empty:
                continue
            try:
                if renderer is None:
                    renderer = mujoco.Renderer(self.arm.m, size, size)
                with self.ctl.lock:
                    data.qpos[:] = self.arm.d.qpos
                    data.qvel[:] = self.arm.d.qvel
                    t = self.ctl.now()
                mujoco.mj_forward(self.arm.m, data)
                imgs = {}
                for n in names:
                    renderer.update_scene(data, camera=cams[n], scene_option=opt)
                    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False  # cheap software rendering
                    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
                    imgs[n] = renderer.render().copy()
                slot["images"], slot["time"] = imgs, t
            except Exception as e:  # report to the requester instead of killing the thread
                slot["error"] = f"{type(e).__name__}: {e}"
            ev.set()
        if renderer is not None:
            try:
                renderer.close()
            except Exception:
                pass

    def serve(self) -> None:
        threads = [threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
                   for s in self.servers]
        if self.arm is not None:
            threads += [threading.Thread(target=self._physics, daemon=True),
                        threading.Thread(target=self._render, daemon=True)]
        for t in threads:
            t.start()

    def shutdown(self) -> None:
        self.stopping.set()
        for s in self.servers:
            s.shutdown()
            s.server_close()
        for sock in self.hung:
            try:
                sock.close()
            except OSError:
                pass


def run_twin(cfg: TwinConfig, ready: Callable[[dict], None] | None = None, parent_pid: int | None = None) -> None:
    """Run a twin in this process until SIGINT/SIGTERM, an admin ``shutdown`` or (with ``parent_pid``) the death
    of the process that started it.

    Prints nothing itself; ``ready`` is called with the listening addresses once everything runs.
    Raises :class:`TwinError` at once when a port is taken.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    twin = _Twin(cfg)
    twin.serve()
    if parent_pid:
        def orphan_watch() -> None:  # a twin must not outlive the test run or rehearsal that started it
            while not twin.stopping.wait(0.5):
                if os.getppid() != parent_pid:
                    twin.stopping.set()

        threading.Thread(target=orphan_watch, daemon=True).start()
    stop = lambda *_: twin.stopping.set()  # noqa: E731
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    if ready is not None:
        ready({"ready": True, "pid": os.getpid(), "host": cfg.host, "ports": cfg.ports(), "model": cfg.model,
               "controller_version": cfg.polyscope_version, "rtde_hz": cfg.rtde_hz, "hang": cfg.hang})
    twin.stopping.wait()
    twin.shutdown()


# --------------------------------------------------------------------------------------------------
# Client side: start a twin in a subprocess, talk to its admin port
# --------------------------------------------------------------------------------------------------


def _ports_free(host: str, ports) -> bool:
    for port in ports:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind((host, port))
        except OSError:
            return False
        finally:
            s.close()
    return True


def free_loopback_host(ports=(RTDE_PORT, SCRIPT_PORT, DASHBOARD_PORT, ADMIN_PORT), tries: int = 50) -> str:
    """A random ``127.x.y.z`` address whose UR ports are all free (parallel twins, parallel tests)."""
    rng = random.Random()
    for _ in range(tries):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(2, 254)}"
        if _ports_free(host, ports):
            return host
    raise TwinError("no free loopback address found for a controller twin")


class TwinClient:
    """JSON-lines client of a twin's admin port."""

    def __init__(self, host: str = "127.0.0.1", port: int = ADMIN_PORT, timeout: float = 30.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._file = None
        self._lock = threading.Lock()

    def _connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._file = self._sock.makefile("rwb")

    def request(self, cmd: str, **kw) -> dict:
        """Send one admin request; raise :class:`TwinError` on an error answer or a dead twin."""
        with self._lock:
            for attempt in range(2):
                try:
                    if self._sock is None:
                        self._connect()
                    self._file.write((json.dumps({"cmd": cmd, **kw}) + "\n").encode())
                    self._file.flush()
                    line = self._file.readline()
                    if not line:
                        raise ConnectionError("twin closed the admin connection")
                    break
                except OSError as e:
                    self.close()
                    if attempt:
                        raise TwinError(f"controller twin at {self.host}:{self.port} is not answering ({e})") from e
        reply = json.loads(line)
        if not reply.get("ok"):
            raise TwinError(f"twin refused {cmd!r}: {reply.get('error')}")
        return reply

    def render(self, cameras=("scene", "wrist")) -> dict[str, np.ndarray]:
        """Rendered camera images as HxWx3 uint8 arrays."""
        rep = self.request("render", cameras=list(cameras))
        return {c: np.frombuffer(base64.b64decode(v["data"]), dtype=np.uint8).reshape(v["shape"])
                for c, v in rep["images"].items()}

    def close(self) -> None:
        try:
            if self._file is not None:
                self._file.close()
            if self._sock is not None:
                self._sock.close()
        except OSError:
            pass
        self._sock, self._file = None, None


class TwinProcess:
    """A controller twin in its own process (the only safe way to face ur_rtde, which holds the GIL).

    ``with TwinProcess(host=free_loopback_host()) as twin: ...`` starts it, waits for it to listen,
    and stops it afterwards. ``twin.kill()`` simulates a lost controller (SIGKILL).
    """

    def __init__(self, host: str = "127.0.0.1", *, model: str = "UR5", reported_model: str | None = None,
                 controller_version: str | None = None, hang: bool = False, camera_size: int = 64,
                 initial_q=None, collision_stop: bool = True, start_timeout: float = 60.0,
                 extra_args: list[str] | None = None):
        self.host = host
        # ``import nnsight_vla`` is light (torch and nnsight load on first use), so ``-m`` costs the twin nothing
        args = [sys.executable, "-m", "nnsight_vla.envs.ur5_twin", "--host", host, "--model", model,
                "--camera-size", str(camera_size), "--parent-pid", str(os.getpid())]
        if reported_model:
            args += ["--reported-model", reported_model]
        if controller_version:
            args += ["--controller-version", controller_version]
        if hang:
            args.append("--hang")
        if initial_q is not None:
            args += ["--initial-q", ",".join(str(float(v)) for v in initial_q)]
        if not collision_stop:
            args.append("--no-collision-stop")
        self.args = args + list(extra_args or [])
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.info: dict = {}
        self.client = TwinClient(host, ADMIN_PORT)

    def start(self) -> "TwinProcess":
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + self.start_timeout
        line = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.1)
            if r:
                line = self.proc.stdout.readline()
                if line.strip().startswith(b"{"):
                    break
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise TwinError("controller twin exited before it was ready: " + (err[-1] if err else "no output"))
        else:
            self.kill()
            raise TwinError(f"controller twin not ready within {self.start_timeout:.0f} s")
        self.info = json.loads(line)
        import atexit

        atexit.register(self.kill)  # never leave a twin behind
        # drain the pipes in the background so the twin never blocks on a full pipe
        for stream in (self.proc.stdout, self.proc.stderr):
            threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def admin(self, cmd: str, **kw) -> dict:
        return self.client.request(cmd, **kw)

    def kill(self) -> None:
        """SIGKILL: the controller vanishes (lost connection)."""
        self.client.close()
        if self.alive():
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.client.close()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "TwinProcess":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def twin_cli(host: str = "127.0.0.1", model: str = "UR5", reported_model: str | None = None,
             controller_version: str = "3.15.8.106339", camera_size: int = 64, hang: bool = False,
             initial_q: str | None = None, collision_stop: bool = True, serial_number: str = "2019300001",
             rtde_port: int = RTDE_PORT, dashboard_port: int = DASHBOARD_PORT, script_port: int = SCRIPT_PORT,
             admin_port: int = ADMIN_PORT, parent_pid: int | None = None) -> None:
    """Start a controller twin in this process and serve until Ctrl-C (``nnsight-vla ur5 twin``).

    Prints one JSON line when it listens. Exit code 2 with a clear message when a port is taken.
    ur_rtde always uses ports 30004/30003/29999: give each twin its own loopback address (``--host 127.0.0.2``)
    rather than other ports unless the client lets you choose them.
    """
    try:
        version = tuple(int(v) for v in controller_version.split("."))
        if len(version) != 4:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--controller-version must look like 3.15.8.106339 or 5.15.0.0, got {controller_version!r}")
    q = DEFAULT_HOME_Q
    if initial_q:
        q = tuple(float(v) for v in initial_q.split(","))
    try:
        cfg = TwinConfig(host=host, model=model, reported_model=reported_model, controller_version=version,
                         camera_size=camera_size, hang=hang, initial_q=q, collision_stop=collision_stop,
                         serial_number=serial_number, rtde_port=rtde_port, dashboard_port=dashboard_port,
                         script_port=script_port, admin_port=admin_port)
        run_twin(cfg, ready=lambda info: print(json.dumps(info), flush=True), parent_pid=parent_pid)
    except (TwinError, ValueError) as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(2)


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nnsight_vla.envs.ur5_twin", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="UR5", choices=sorted(UR_DH))
    p.add_argument("--reported-model", default=None)
    p.add_argument("--controller-version", default="3.15.8.106339")
    p.add_argument("--camera-size", type=int, default=64)
    p.add_argument("--initial-q", default=None, help="6 comma-separated joint angles (rad)")
    p.add_argument("--hang", action="store_true", help="accept connections, never answer")
    p.add_argument("--no-collision-stop", action="store_true")
    p.add_argument("--serial-number", default="2019300001")
    p.add_argument("--rtde-port", type=int, default=RTDE_PORT)
    p.add_argument("--dashboard-port", type=int, default=DASHBOARD_PORT)
    p.add_argument("--script-port", type=int, default=SCRIPT_PORT)
    p.add_argument("--admin-port", type=int, default=ADMIN_PORT)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone")
    a = p.parse_args(argv)
    twin_cli(host=a.host, model=a.model, reported_model=a.reported_model, controller_version=a.controller_version,
             camera_size=a.camera_size, hang=a.hang, initial_q=a.initial_q, collision_stop=not a.no_collision_stop,
             serial_number=a.serial_number, rtde_port=a.rtde_port, dashboard_port=a.dashboard_port,
             script_port=a.script_port, admin_port=a.admin_port, parent_pid=a.parent_pid)


if __name__ == "__main__":
    _main()
