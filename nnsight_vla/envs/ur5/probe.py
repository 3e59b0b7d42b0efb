"""Checks on a UR controller before any ur_rtde object exists: plain sockets with short timeouts, so an unreachable
host fails in well under a second and a controller that accepts but never answers fails instead of hanging
(ur_rtde's constructors would wait forever holding the GIL); then the robot model and serial number."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from ...errors import RobotConnectionError, RobotModelError
from .protocol import DASHBOARD_PORT, MSG_V, MSG_v, RTDE_PORT, SCRIPT_PORT, frame, read_frame


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
        if not f.readline():
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


def _rtde_handshake(host: str, port: int, timeout: float) -> tuple[int, int, int, int]:
    sock = _connect(host, port, "RTDE", timeout)
    try:
        sock.settimeout(timeout)
        sock.sendall(frame(MSG_V, struct.pack(">H", 2)))
        typ, body = read_frame(sock)
        if typ != MSG_V or not body or body[0] != 1:
            raise RobotConnectionError(f"UR controller at {host}: RTDE (port {port}) refused protocol version 2")
        sock.sendall(frame(MSG_v))
        typ, body = read_frame(sock)
        if typ != MSG_v or len(body) < 16:
            raise RobotConnectionError(f"UR controller at {host}: RTDE (port {port}) sent no controller version")
        return struct.unpack(">IIII", body[:16])
    except (socket.timeout, TimeoutError):
        raise RobotConnectionError(
            f"UR controller at {host}: RTDE (port {port}) accepted the connection but did not answer within "
            f"{timeout:.2f} s; the controller hangs (ur_rtde would wait forever here)") from None
    except RobotConnectionError:
        raise
    except (ConnectionError, OSError, struct.error) as e:
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
