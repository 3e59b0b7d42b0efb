"""How a controller twin presents itself and what it simulates (:class:`TwinConfig`), where it may listen, and
where it keeps its admin token for its user."""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from ....errors import InputError
from ..kinematics import DEFAULT_HOME_Q
from ..protocol import ADMIN_PORT, DASHBOARD_PORT, RTDE_PORT, SCRIPT_PORT

#: arms the twin can simulate (robosuite's UR5e meshes with the model's DH link offsets)
SIMULATED_MODELS = ("UR5", "UR5e")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8)."""
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET)
    except (socket.gaierror, UnicodeError):
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def token_path(host: str, admin_port: int) -> Path:
    """Where the twin at ``host:admin_port`` leaves its admin token, readable by its user only."""
    root = os.environ.get("XDG_RUNTIME_DIR") or Path.home() / ".cache"
    return Path(root) / "nnsight-vla" / "twins" / f"{host}_{admin_port}.token"


@dataclass
class TwinConfig:
    """How the twin presents itself and what it simulates.

    ``model`` sets both the dashboard's ``get robot model`` answer and the link geometry (DH) of the
    simulated arm. ``controller_version`` (major, minor, bugfix, build) decides the RTDE rate that
    ur_rtde picks: 125 Hz for CB3 (major 3), 500 Hz for e-Series (major 5). ``reported_model`` lets a
    test present one model while simulating another (wrong-robot checks). ``host`` must be a loopback address
    unless ``allow_remote`` acknowledges that anyone who reaches it can drive the simulated arm (the admin port
    still needs ``admin_token``; None: a fresh random token).
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
    allow_remote: bool = False
    admin_token: str | None = None

    def __post_init__(self) -> None:
        if self.model not in SIMULATED_MODELS:
            raise InputError(f"TwinConfig.model={self.model!r} is not simulated; choose one of {SIMULATED_MODELS}")
        if len(self.initial_q) != 6 or len(self.tcp_offset) != 6:
            raise InputError("TwinConfig.initial_q and tcp_offset need 6 values each")
        if not (isinstance(self.camera_size, int) and 16 <= self.camera_size <= 512):
            raise InputError(f"TwinConfig.camera_size={self.camera_size!r} must be an int within 16..512 pixels")
        if not self.physics_hz > 0:
            raise InputError(f"TwinConfig.physics_hz must be > 0, got {self.physics_hz!r}")
        if not self.allow_remote and not is_loopback(self.host):
            raise InputError(
                f"the twin listens on loopback addresses only (127.x.y.z), not {self.host!r}: its RTDE, dashboard and "
                "script ports drive the simulated arm without authentication, as a real controller's do. To serve "
                "other machines behind a firewall you control, pass allow_remote=True (--allow-remote)")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise InputError("TwinConfig.admin_token must have at least 16 characters")
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
