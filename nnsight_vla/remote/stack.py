"""Bring a real NDIF stack up and down on ONE machine, loopback only, idempotently (tests, demos, a lab's first try).

    nnsight-vla remote stack up | status | down | install

Stdlib only (no Ray, no ndif imported). Redis, moto's S3, Ray with a declared GPU plus the NDIF controller, and
ndif's API under gunicorn, each in its own session (``down`` ends exactly those). Every service listens on
127.0.0.1: Ray's C++ servers have no bind option but bind loopback when the node IP is loopback, which single-node
mode gives (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``). ``up`` then checks every listening socket of the stack and
stops it if one is on another address of a host that has one, unless ``NVLA_NDIF_FIREWALLED=1`` says a firewall
covers it. Configuration: the ``NVLA_NDIF_*`` variables read by :func:`_config`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ..errors import StackError
from ..files import pid_alive
from .sockets import host_addresses, is_loopback, listening_sockets

HOST = "127.0.0.1"

# Offsets from NVLA_NDIF_PORT_BASE; every port Ray would otherwise pick is pinned too, so two
# stacks with different bases never collide and nothing lands on a default port.
PORTS = {
    "api": 1,
    "redis": 2,
    "s3": 3,
    "ray_gcs": 4,
    "ray_client": 5,
    "ray_dashboard": 6,
    "ray_node_manager": 7,
    "ray_object_manager": 8,
    "ray_dashboard_agent": 9,
    "ray_dashboard_agent_grpc": 10,
    "ray_metrics": 11,
    "ray_runtime_env_agent": 12,
    "ray_worker_min": 100,
    "ray_worker_max": 199,
}

# The server environment that was verified with this script (Python 3.11; ndif itself is
# installed with --ignore-requires-python, see docs/remote.md for why that is sound).
SERVER_REQUIREMENTS = [
    "torch==2.13.0",
    "nnsight==0.8.1",
    "transformers==5.24.0",
    "accelerate==1.15.0",
    "peft==0.21.2",
    "ray[default]==2.60.0",
    "redis==8.1.0",
    "boto3==1.44.8",
    "fastapi==0.165.0",
    "uvicorn[standard]==0.54.0",
    "gunicorn==27.0.1",
    "python-multipart==0.0.34",
    "click",
    "python-dotenv",
    "pyyaml",
    "zstandard",
    "psutil",
    "tokenizers",
    "safetensors",
    "moto[s3,server]==5.2.5",
    # what nnsight_vla's model code imports beyond the above (it is put on PYTHONPATH or
    # installed with --no-deps, so its heavy optional deps stay out of the server)
    "scipy",
    "pillow",
]
NDIF_REQUIREMENT = "ndif==0.1.2"

SERVICES = ("redis", "s3", "ray", "api")  # start order; stop order is reversed


# ----------------------------------------------------------------------------- configuration


def _default_pythonpath() -> str:
    # A source checkout (editable install included) is put on the server's path; a copy installed in the client's
    # site-packages is not (that would mix two environments): install nnsight-vla into the server venv instead.
    root = Path(__file__).resolve().parents[2]
    return "" if root.name in ("site-packages", "dist-packages") else str(root)


def _config() -> dict:
    """The stack's configuration from the environment (defaults in brackets):

    NVLA_NDIF_HOME        state dir: logs/, run/ (pids), ray temp   [/tmp/nvla-ndif]
    NVLA_NDIF_VENV        server venv (Python 3.11, ndif 0.1.2)     [/work/venvs/ndif]
    NVLA_NDIF_PYTHON      interpreter used to create that venv      [python3.11 on PATH or pyenv 3.11]
    NVLA_NDIF_PYTHONPATH  import path for the server: where nnsight_vla lives  [this checkout's root, unless
                          nnsight_vla is installed in site-packages: then install it into the server venv]
    NVLA_NDIF_SHIM        module holding ControllerActor/ModelActor/CPUModelActor  [nnsight_vla.remote.server]
    NVLA_NDIF_CPU         "1": CPU model actor + declared GPU; "0": stock GPU actor  [1 if no nvidia-smi]
    NVLA_NDIF_PORT_BASE   ports are base+offset (see PORTS)         [18000]
    NVLA_NDIF_EXEC_TIMEOUT  server-side execution timeout, seconds  [300]
    NVLA_NDIF_DTYPE       server default dtype                      [float32 on CPU, bfloat16 on GPU]
    NVLA_NDIF_EXTRA_PIP   extra pip requirements for the server venv (space separated)
    NVLA_NDIF_FIREWALLED  "1": a firewall keeps other hosts off this machine's ports, so a service found
                          listening beyond loopback is reported instead of refused (see check_listeners)  [0]
    """
    home = Path(os.environ.get("NVLA_NDIF_HOME", "/tmp/nvla-ndif"))
    base = int(os.environ.get("NVLA_NDIF_PORT_BASE", "18000"))
    cpu_default = "0" if shutil.which("nvidia-smi") else "1"
    cpu = os.environ.get("NVLA_NDIF_CPU", cpu_default) == "1"
    return {
        "home": home,
        "venv": Path(os.environ.get("NVLA_NDIF_VENV", "/work/venvs/ndif")),
        "pythonpath": os.environ.get("NVLA_NDIF_PYTHONPATH", _default_pythonpath()),
        "shim": os.environ.get("NVLA_NDIF_SHIM", "nnsight_vla.remote.server"),
        "cpu": cpu,
        "ports": {name: base + offset for name, offset in PORTS.items()},
        "exec_timeout": os.environ.get("NVLA_NDIF_EXEC_TIMEOUT", "300"),
        "dtype": os.environ.get("NVLA_NDIF_DTYPE", "float32" if cpu else "bfloat16"),
        "firewalled": os.environ.get("NVLA_NDIF_FIREWALLED", "0") == "1",
    }


def _bin(cfg: dict, name: str) -> str:
    return str(cfg["venv"] / "bin" / name)


def _server_env(cfg: dict) -> dict:
    """Environment shared by every server process (Ray workers inherit it from `ray start`)."""
    p = cfg["ports"]
    env = dict(os.environ)
    # A stray RAY_ADDRESS would make `ray start --head` attach to another cluster.
    env.pop("RAY_ADDRESS", None)
    env.update(
        {
            "NDIF_REDIS_URL": f"redis://{HOST}:{p['redis']}",
            "NDIF_OBJECT_STORE_URL": f"http://{HOST}:{p['s3']}",
            "NDIF_OBJECT_STORE_ACCESS_KEY": "nvla-test",
            "NDIF_OBJECT_STORE_SECRET_KEY": "nvla-test",
            "NDIF_OBJECT_STORE_BUCKET": "ndif-results",
            "NDIF_OBJECT_STORE_REGION": "us-east-1",
            "NDIF_RAY_ADDRESS": f"ray://{HOST}:{p['ray_client']}",
            "NDIF_API_URL": f"http://{HOST}:{p['api']}",
            "NDIF_MODEL_IMPORT_PATH": (
                f"{cfg['shim']}.CPUModelActor"
                if cfg["cpu"]
                else f"{cfg['shim']}.ModelActor"
            ),
            "NDIF_CONTROLLER_IMPORT_PATH": f"{cfg['shim']}.ControllerActor",
            "NDIF_DEFAULT_DTYPE": cfg["dtype"],
            "NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS": cfg["exec_timeout"],
            "NDIF_INFLUX_ENABLED": "false",
            "NDIF_CONTROLLER_SYNC_INTERVAL_S": "30",
            "GRPC_ENABLE_FORK_SUPPORT": "0",  # see ndif's ray/start.sh
            "RAY_USAGE_STATS_ENABLED": "0",
            # Single-node mode: Ray takes 127.0.0.1 as this node's IP (a plain `ray start` replaces a loopback
            # --node-ip-address with the external one), so the GCS, raylet, object manager and worker gRPC servers,
            # which bind all interfaces unless the node IP is 127.0.0.1, and the agents, which bind the node IP,
            # all listen on loopback. Other nodes can then not join: a multi-node lab follows docs/remote.md §4.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "HF_HUB_OFFLINE": env.get("HF_HUB_OFFLINE", "1"),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    if cfg["pythonpath"]:
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (cfg["pythonpath"], env.get("PYTHONPATH", "")) if x
        )
    return env


# ----------------------------------------------------------------------------- install


def _find_python311() -> str:
    explicit = os.environ.get("NVLA_NDIF_PYTHON")
    if explicit:
        return explicit
    for candidate in ("python3.11", str(Path.home() / ".pyenv/versions/3.11.7/bin/python")):
        path = shutil.which(candidate) or (candidate if Path(candidate).exists() else None)
        if path:
            return path
    raise StackError("no Python 3.11 found for the server venv; set NVLA_NDIF_PYTHON")


def install(cfg: dict | None = None, log=print) -> None:
    """Install Redis (Debian) and the server venv when they are missing. Idempotent."""
    cfg = cfg or _config()
    if shutil.which("redis-server") is None:
        log("installing redis-server (apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-qq", "redis-server"]
        if subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, stdin=subprocess.DEVNULL)
            subprocess.run(cmd, env=env, check=True, stdin=subprocess.DEVNULL)
    marker = cfg["venv"] / ".nvla-ndif-ok"
    if marker.exists():
        return
    log(f"creating server venv {cfg['venv']} (a few minutes)")
    subprocess.run([_find_python311(), "-m", "venv", str(cfg["venv"])], check=True)
    pip = [_bin(cfg, "python"), "-m", "pip", "install", "-q"]
    extra = os.environ.get("NVLA_NDIF_EXTRA_PIP", "").split()
    subprocess.run(pip + SERVER_REQUIREMENTS + extra, check=True, stdin=subprocess.DEVNULL)
    # ndif declares Requires-Python >=3.12 but its code runs on 3.11 (every module compiles
    # and imports there); its dependencies are installed above with pinned versions.
    subprocess.run(
        pip + ["--no-deps", "--ignore-requires-python", NDIF_REQUIREMENT],
        check=True,
        stdin=subprocess.DEVNULL,
    )
    marker.write_text(json.dumps(SERVER_REQUIREMENTS + [NDIF_REQUIREMENT] + extra))


# ----------------------------------------------------------------------------- processes


def _run_dir(cfg: dict) -> Path:
    return cfg["home"] / "run"


def _log_path(cfg: dict, name: str) -> Path:
    return cfg["home"] / "logs" / f"{name}.log"


def _spawn(cfg: dict, name: str, cmd: list[str], env: dict) -> int:
    """Start `cmd` as the leader of a new session; record its pid (= its session id)."""
    log = open(_log_path(cfg, name), "ab")
    try:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=str(cfg["home"]),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()
    (_run_dir(cfg) / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _session_members(sid: int) -> list[int]:
    """Pids whose session id is `sid` (the processes a recorded service started)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 6 (session) comes after the parenthesised command name, which may hold spaces.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def _stop_service(cfg: dict, name: str, grace: float = 15.0) -> None:
    pid_file = _run_dir(cfg) / f"{name}.pid"
    if not pid_file.exists():
        return
    sid = int(pid_file.read_text())
    members = _session_members(sid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            members = [pid for pid in _session_members(sid) if pid_alive(pid)]
            if not members:
                break
            time.sleep(0.2)
        if not members:
            break
    try:  # reap our own direct children (when up() and down() run in one process)
        os.waitpid(sid, os.WNOHANG)
    except ChildProcessError:
        pass
    pid_file.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- listening sockets

def check_listeners(sessions: list[int], firewalled: bool = False) -> list[dict]:
    """Every socket the processes of ``sessions`` listen on beyond loopback (``[]`` when all are loopback).

    On a host with a non-loopback address such a socket is reachable from the network (Ray has no
    authentication by default, Redis and the API none here): :class:`StackError` unless ``firewalled``.
    """
    pids = [pid for sid in sessions for pid in _session_members(sid)]
    exposed = [entry for entry in listening_sockets(pids) if not is_loopback(entry["address"])]
    external = [address for address in host_addresses() if not is_loopback(address)]
    if exposed and external and not firewalled:
        listed = ", ".join(f"{e['process']} (pid {e['pid']}) on {e['address']}:{e['port']}" for e in exposed)
        raise StackError(
            f"the NDIF stack must listen on loopback only, but {listed}; this host is reachable at "
            f"{', '.join(external)}. Stopped. If a firewall keeps other hosts off these ports, set "
            "NVLA_NDIF_FIREWALLED=1 to start anyway."
        )
    return exposed


def _stack_sessions(cfg: dict) -> list[int]:
    sessions = []
    for name in SERVICES:
        pid_file = _run_dir(cfg) / f"{name}.pid"
        if pid_file.exists():
            sessions.append(int(pid_file.read_text()))
    return sessions


# ----------------------------------------------------------------------------- readiness


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def _http(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


def _wait(cfg: dict, name: str, ready, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pid_file = _run_dir(cfg) / f"{name}.pid"
    while time.monotonic() < deadline:
        if ready():
            return
        if pid_file.exists() and not pid_alive(int(pid_file.read_text())):
            break
        time.sleep(0.25)
    tail = _log_path(cfg, name).read_text(errors="replace")[-3000:]
    raise StackError(f"{name} did not become ready; log {_log_path(cfg, name)}:\n{tail}")


# ----------------------------------------------------------------------------- up/down


def _ray_command(cfg: dict) -> list[str]:
    p = cfg["ports"]
    # ndif's cluster model manages only nodes with a GPU resource and sizes replicas from
    # cuda_memory_bytes; on a CPU machine both are declared (8 GiB "GPU").
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if cfg["cpu"]:
        gpus, cuda_bytes = 1, 8 << 30
    else:
        gpus, cuda_bytes = None, None  # computed by ndif's resources.py below
    resources = {"head": 10, "cpu_memory_bytes": total_mem}
    if cuda_bytes is not None:
        resources["cuda_memory_bytes"] = cuda_bytes
    else:
        out = subprocess.run(
            [_bin(cfg, "python"), "-m", "ndif.services.ray.resources", "--head"],
            capture_output=True, text=True, check=True, env=_server_env(cfg),
        )
        resources = json.loads(out.stdout)
    cmd = [
        _bin(cfg, "ray"), "start", "--head", "--block",
        f"--node-ip-address={HOST}",
        f"--port={p['ray_gcs']}",
        f"--ray-client-server-port={p['ray_client']}",
        f"--node-manager-port={p['ray_node_manager']}",
        f"--object-manager-port={p['ray_object_manager']}",
        f"--min-worker-port={p['ray_worker_min']}",
        f"--max-worker-port={p['ray_worker_max']}",
        "--include-dashboard=true",  # ndif's controller lists nodes through Ray's state API
        f"--dashboard-host={HOST}",
        f"--dashboard-port={p['ray_dashboard']}",
        f"--dashboard-agent-listen-port={p['ray_dashboard_agent']}",
        f"--dashboard-agent-grpc-port={p['ray_dashboard_agent_grpc']}",
        f"--metrics-export-port={p['ray_metrics']}",
        f"--runtime-env-agent-port={p['ray_runtime_env_agent']}",
        f"--resources={json.dumps(resources)}",
        # Ray slots, not cores: the controller and each model actor hold one (ndif places by GPU memory only, so
        # an actor without a free slot would wait forever); 8 serve the controller and 7 deployed models
        "--num-cpus=8",
        "--object-store-memory=200000000",
        f"--temp-dir={cfg['home'] / 'ray'}",
        "--disable-usage-stats",
    ]
    if gpus is not None:
        cmd.append(f"--num-gpus={gpus}")
    return cmd


def status(cfg: dict | None = None) -> dict:
    cfg = cfg or _config()
    p = cfg["ports"]
    services = {}
    for name in SERVICES:
        pid_file = _run_dir(cfg) / f"{name}.pid"
        pid = int(pid_file.read_text()) if pid_file.exists() else None
        services[name] = {"pid": pid, "alive": bool(pid and pid_alive(pid))}
    return {
        "api_url": f"http://{HOST}:{p['api']}",
        "connected": _http(f"http://{HOST}:{p['api']}/connected") == 200,
        "services": services,
        "logs": str(cfg["home"] / "logs"),
        "ports": p,
    }


def up(cfg: dict | None = None, timeout: float = 240.0, log=print) -> dict:
    """Start the whole stack (idempotent) and return `status()` once the API is connected.

    Raises StackError (with the failing service's log tail) when a service does not come up;
    the caller should then call `down()`.
    """
    cfg = cfg or _config()
    current = status(cfg)
    if current["connected"] and all(s["alive"] for s in current["services"].values()):
        _refuse_exposed(cfg, log)
        return current
    down(cfg)  # a partial or stale stack: start from nothing
    install(cfg, log=log)
    for sub in ("run", "logs", "s3"):
        (cfg["home"] / sub).mkdir(parents=True, exist_ok=True)
    env = _server_env(cfg)
    p = cfg["ports"]
    started = time.monotonic()

    _spawn(cfg, "redis", [
        "redis-server", "--bind", HOST, "--port", str(p["redis"]), "--protected-mode", "yes",
        "--save", "", "--appendonly", "no", "--daemonize", "no",
    ], env)
    _spawn(cfg, "s3", [_bin(cfg, "moto_server"), "-H", HOST, "-p", str(p["s3"])], env)
    _wait(cfg, "redis", lambda: _port_open(p["redis"]), 30)
    _wait(cfg, "s3", lambda: _http(f"http://{HOST}:{p['s3']}/") == 200, 60)

    _spawn(cfg, "ray", _ray_command(cfg), env)
    _wait(cfg, "ray", lambda: _port_open(p["ray_client"]) and _port_open(p["ray_dashboard"]), timeout)
    # The controller is a detached actor; this launcher returns once it is scheduled.
    launch = subprocess.run(
        [_bin(cfg, "python"), "-m", "ndif.services.ray.deployments.controller.controller"],
        env={**env, "RAY_ADDRESS": f"{HOST}:{p['ray_gcs']}"},
        cwd=str(cfg["home"]), stdin=subprocess.DEVNULL,
        stdout=open(_log_path(cfg, "controller-launch"), "ab"), stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    if launch.returncode != 0:
        raise StackError(f"controller launch failed; see {_log_path(cfg, 'controller-launch')}")

    _spawn(cfg, "api", [
        _bin(cfg, "gunicorn"), "--config", "python:ndif.services.api.gunicorn_conf",
        "--bind", f"{HOST}:{p['api']}", "ndif.services.api.app:app",
    ], {**env, "NDIF_SERVICE": "api", "NDIF_API_PORT": str(p["api"])})
    # /connected answers 200 once the dispatcher reached Ray and the Controller actor exists.
    _wait(cfg, "api", lambda: _http(f"http://{HOST}:{p['api']}/connected") == 200, timeout)

    _refuse_exposed(cfg, log)
    result = status(cfg)
    result["startup_s"] = round(time.monotonic() - started, 1)
    return result


def _refuse_exposed(cfg: dict, log) -> None:
    """Stop the stack and raise when a service listens beyond loopback (see :func:`check_listeners`)."""
    try:
        exposed = check_listeners(_stack_sessions(cfg), firewalled=cfg["firewalled"])
    except StackError:
        down(cfg)
        raise
    if exposed:
        log(f"warning: listening beyond loopback (NVLA_NDIF_FIREWALLED=1): {exposed}")


def down(cfg: dict | None = None) -> None:
    """Stop every service `up` started (idempotent; safe after a failed `up`)."""
    cfg = cfg or _config()
    for name in reversed(SERVICES):
        _stop_service(cfg, name)
