"""Run (steered) VLA policies on a Universal Robots arm through the real ``ur_rtde`` client, safely, and rehearse
against a protocol-level controller twin with a MuJoCo arm (:mod:`.twin`).

Safe by default: a dry run unless armed (nothing that could move the arm is created or sent), every command
through the :class:`SafetyEnvelope`, a watchdog on the policy, and a latched halt on a lost connection, a safety
stop or stale state. Names are imported on first use, so the twin's process does not load the runner's modules.
"""

from __future__ import annotations

import importlib
from typing import Any

from ...errors import (
    CameraError,
    RobotConfigError,
    RobotConnectionError,
    RobotError,
    RobotHalted,
    RobotModelError,
    SafetyConfigError,
    SafetyViolation,
    TwinError,
)

_LAZY = {
    **dict.fromkeys(("UR5Config", "load_config", "ACTION_SPACES", "FAMILY_ACTION_SPACE",
                     "FAMILY_GRIPPER_CLOSE_ABOVE"), "config"),
    **dict.fromkeys(("DEFAULT_HOME_Q", "URKinematics", "UR_DH_PARAMS"), "kinematics"),
    **dict.fromkeys(("pose_to_matrix", "matrix_to_pose", "rotation_angle"), "poses"),
    **dict.fromkeys(("CMD", "RTDE_PORT", "SCRIPT_PORT", "DASHBOARD_PORT", "ADMIN_PORT"), "protocol"),
    **dict.fromkeys(("SafetyConfig", "SafetyEnvelope", "ServoState", "Checked", "Watchdog", "RULES", "load_mapping"),
                    "safety"),
    **dict.fromkeys(("ControllerInfo", "probe_controller", "check_model"), "probe"),
    **dict.fromkeys(("CameraSource", "OpenCVCamera", "TwinCamera", "open_camera"), "cameras"),
    **dict.fromkeys(("UR5Robot", "RobotState", "Gripper", "IOGripper"), "robot"),
    "UR5ScriptedPolicy": "scripted",
    **dict.fromkeys(("run_episode", "check_policy", "resolve_plan", "action_rows", "Plan"), "episode"),
    **dict.fromkeys(("run_conditions", "build_policy", "SweepResult"), "runner"), "UR5Env": "env",
    **dict.fromkeys(("TwinConfig", "TwinProcess", "TwinClient", "run_twin", "twin_cli", "free_loopback_host"), "twin"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [  # noqa: F822 - the lazy names resolve through __getattr__
    "ACTION_SPACES", "ADMIN_PORT", "CMD", "CameraError", "CameraSource", "Checked", "ControllerInfo",
    "DASHBOARD_PORT", "DEFAULT_HOME_Q", "FAMILY_ACTION_SPACE", "FAMILY_GRIPPER_CLOSE_ABOVE", "Gripper", "IOGripper",
    "OpenCVCamera", "Plan", "RTDE_PORT", "RULES", "RobotConfigError", "RobotConnectionError", "RobotError",
    "RobotHalted", "RobotModelError", "RobotState", "SCRIPT_PORT", "SafetyConfig", "SafetyConfigError",
    "SafetyEnvelope", "SafetyViolation", "ServoState", "SweepResult", "TwinCamera", "TwinClient", "TwinConfig",
    "TwinError", "UR5Env", "TwinProcess", "UR5Config", "UR5Robot", "UR5ScriptedPolicy", "URKinematics", "UR_DH_PARAMS",
    "Watchdog", "action_rows", "check_model", "free_loopback_host", "load_config", "load_mapping",
    "matrix_to_pose", "open_camera", "check_policy", "pose_to_matrix", "probe_controller", "resolve_plan",
    "rotation_angle", "build_policy", "run_conditions", "run_episode", "run_twin", "twin_cli",
]
