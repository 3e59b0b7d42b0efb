"""The twin's command line: ``python -m nnsight_vla.envs.ur5.twin`` (argparse) and ``nnsight-vla ur5 twin``
(:func:`twin_cli`, mounted by the package CLI)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ....errors import TwinError
from ..kinematics import DEFAULT_HOME_Q
from ..protocol import ADMIN_PORT, DASHBOARD_PORT, RTDE_PORT, SCRIPT_PORT
from .config import SIMULATED_MODELS, TwinConfig
from .process import TOKEN_ENV
from .service import run_twin


def twin_cli(host: str = "127.0.0.1", model: str = "UR5", reported_model: str | None = None,
             controller_version: str = "3.15.8.106339", camera_size: int = 64, hang: bool = False,
             initial_q: str | None = None, collision_stop: bool = True, serial_number: str = "2019300001",
             rtde_port: int = RTDE_PORT, dashboard_port: int = DASHBOARD_PORT, script_port: int = SCRIPT_PORT,
             admin_port: int = ADMIN_PORT, parent_pid: int | None = None, allow_remote: bool = False) -> None:
    """Start a controller twin in this process and serve until Ctrl-C (``nnsight-vla ur5 twin``).

    Prints one JSON line when it listens. Exit code 2 with a clear message when a port is taken or the host is
    not a loopback address (``--allow-remote`` acknowledges a firewall you control). The admin port's token comes
    from $NNSIGHT_VLA_TWIN_TOKEN or is made fresh; clients of the same user find it in the file the JSON line names.
    ur_rtde always uses ports 30004/30003/29999: give each twin its own loopback address (``--host 127.0.0.2``)
    rather than other ports unless the client lets you choose them.
    """
    try:
        version = tuple(int(v) for v in controller_version.split("."))
        if len(version) != 4:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--controller-version must look like 3.15.8.106339 or 5.15.0.0, got {controller_version!r}"
                         ) from None
    q = DEFAULT_HOME_Q
    if initial_q:
        q = tuple(float(v) for v in initial_q.split(","))
    try:
        cfg = TwinConfig(host=host, model=model, reported_model=reported_model, controller_version=version,
                         camera_size=camera_size, hang=hang, initial_q=q, collision_stop=collision_stop,
                         serial_number=serial_number, rtde_port=rtde_port, dashboard_port=dashboard_port,
                         script_port=script_port, admin_port=admin_port, allow_remote=allow_remote,
                         admin_token=os.environ.pop(TOKEN_ENV, None) or None)
        run_twin(cfg, ready=lambda info: print(json.dumps(info), flush=True), parent_pid=parent_pid)
    except (TwinError, ValueError) as e:
        print(str(e), file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nnsight_vla.envs.ur5.twin",
                                description="A protocol-level twin of a UR controller with a MuJoCo arm.")
    p.add_argument("--host", default="127.0.0.1", help="a loopback address (127.x.y.z) unless --allow-remote")
    p.add_argument("--model", default="UR5", choices=SIMULATED_MODELS)
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
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a non-loopback address: anyone who reaches it can drive the simulated arm")
    a = p.parse_args(argv)
    twin_cli(host=a.host, model=a.model, reported_model=a.reported_model, controller_version=a.controller_version,
             camera_size=a.camera_size, hang=a.hang, initial_q=a.initial_q, collision_stop=not a.no_collision_stop,
             serial_number=a.serial_number, rtde_port=a.rtde_port, dashboard_port=a.dashboard_port,
             script_port=a.script_port, admin_port=a.admin_port, parent_pid=a.parent_pid,
             allow_remote=a.allow_remote)


if __name__ == "__main__":
    main()
