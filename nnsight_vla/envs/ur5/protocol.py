"""The UR controller's wire facts, shared by the client side (probes, robot) and the controller twin.

Ports, RTDE frames (``>HB``: size including the 3-byte header, then a type letter), the RTDE register type
tables, robot / safety / runtime mode values and the command ids of ur_rtde 1.6.5's control script
(``RTDE::RobotCommand::Type``). docs/ur5.md describes what the twin answers on each port.
"""

from __future__ import annotations

import re
import socket
import struct

RTDE_PORT, SCRIPT_PORT, DASHBOARD_PORT = 30004, 30003, 29999
ADMIN_PORT = 30020  # the controller twin's own admin port (not on a real controller)
UR_PORTS = (RTDE_PORT, SCRIPT_PORT, DASHBOARD_PORT)

# RTDE message types (ASCII letters)
MSG_V, MSG_v, MSG_M, MSG_U, MSG_O, MSG_I, MSG_S, MSG_P = (ord(c) for c in "VvMUOISP")


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; ``ConnectionError`` when the peer closes first."""
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def frame(typ: int, payload: bytes = b"") -> bytes:
    """One RTDE frame."""
    return struct.pack(">HB", len(payload) + 3, typ) + payload


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The next RTDE frame from ``sock``: (type, payload)."""
    size, typ = struct.unpack(">HB", recv_exact(sock, 3))
    return typ, recv_exact(sock, size - 3) if size > 3 else b""


# -- robot state values (UR RTDE guide; ur_rtde's enums) ------------------------------------------------------

ROBOT_MODE = {"NO_CONTROLLER": -1, "DISCONNECTED": 0, "CONFIRM_SAFETY": 1, "BOOTING": 2, "POWER_OFF": 3,
              "POWER_ON": 4, "IDLE": 5, "BACKDRIVE": 6, "RUNNING": 7, "UPDATING_FIRMWARE": 8}
SAFETY_MODE = {"NORMAL": 1, "REDUCED": 2, "PROTECTIVE_STOP": 3, "RECOVERY": 4, "SAFEGUARD_STOP": 5,
               "SYSTEM_EMERGENCY_STOP": 6, "ROBOT_EMERGENCY_STOP": 7, "VIOLATION": 8, "FAULT": 9,
               "VALIDATE_JOINT_ID": 10, "UNDEFINED_SAFETY_MODE": 11, "AUTOMATIC_MODE_SAFEGUARD_STOP": 12,
               "SYSTEM_THREE_POSITION_ENABLING_STOP": 13}
RUNTIME_STATE = {"STOPPING": 0, "STOPPED": 1, "PLAYING": 2, "PAUSING": 3, "PAUSED": 4, "RESUMING": 5}
SAFETY_BITS = {"NORMAL": 1 << 0, "REDUCED": 1 << 1, "PROTECTIVE_STOP": (1 << 2) | (1 << 10),
               "ROBOT_EMERGENCY_STOP": (1 << 6) | (1 << 7) | (1 << 10),
               "SYSTEM_EMERGENCY_STOP": (1 << 5) | (1 << 7) | (1 << 10)}
ROBOT_STATUS_POWER_ON, ROBOT_STATUS_PROGRAM_RUNNING = 1 << 0, 1 << 1


def mode_name(table: dict[str, int], value: int) -> str:
    """The name of a mode value in ``table`` (``ROBOT_MODE``, ``SAFETY_MODE``, ``RUNTIME_STATE``)."""
    return next((k for k, v in table.items() if v == int(value)), str(value))


def safety_mode_name(mode: int) -> str:
    return mode_name(SAFETY_MODE, mode)


def robot_mode_name(mode: int) -> str:
    return mode_name(ROBOT_MODE, mode)


# -- ur_rtde's control script ---------------------------------------------------------------------------------

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
CMD_NAME = {v: k for k, v in CMD.items()}
#: the control script processes these every loop and stays "ready" (no done/clear handshake)
REALTIME_CMDS = {24, 11, 9, 10, 6, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71}

# -- RTDE field types -----------------------------------------------------------------------------------------

FMT = {"BOOL": "?", "UINT8": "B", "UINT32": "I", "UINT64": "Q", "INT32": "i", "DOUBLE": "d",
       "VECTOR3D": "3d", "VECTOR6D": "6d", "VECTOR6INT32": "6i", "VECTOR6UINT32": "6I"}
_V6, _V3 = "VECTOR6D", "VECTOR3D"
OUTPUT_TYPES = {
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
INPUT_TYPES = {
    "speed_slider_mask": "UINT32", "speed_slider_fraction": "DOUBLE",
    "standard_digital_output_mask": "UINT8", "standard_digital_output": "UINT8",
    "configurable_digital_output_mask": "UINT8", "configurable_digital_output": "UINT8",
    "tool_digital_output_mask": "UINT8", "tool_digital_output": "UINT8",
    "standard_analog_output_mask": "UINT8", "standard_analog_output_type": "UINT8",
    "standard_analog_output_0": "DOUBLE", "standard_analog_output_1": "DOUBLE",
    "input_bit_registers0_to_31": "UINT32", "input_bit_registers32_to_63": "UINT32",
    "external_force_torque": _V6,
}
REGISTER = re.compile(r"^(input|output)_(int|double|bit)_register_(\d+)$")


def _register_type(name: str, direction: str) -> str | None:
    m = REGISTER.match(name)
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
    return OUTPUT_TYPES.get(name) or _register_type(name, "output") or _register_type(name, "input") or "NOT_FOUND"


def input_type(name: str) -> str:
    """RTDE type of an input field, or ``NOT_FOUND``."""
    return INPUT_TYPES.get(name) or _register_type(name, "input") or "NOT_FOUND"
