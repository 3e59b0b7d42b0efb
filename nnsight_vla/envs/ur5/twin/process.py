"""Using a twin from Python: :class:`TwinProcess` starts one in its own process (the only safe way to face ur_rtde,
whose constructors hold the GIL while they wait), :class:`TwinClient` talks to its admin port with its token,
:func:`free_loopback_host` finds a 127.x.y.z address whose UR ports are free (parallel twins)."""

from __future__ import annotations

import atexit
import base64
import json
import os
import random
import secrets
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from ....errors import TwinError
from ..protocol import ADMIN_PORT, UR_PORTS
from .config import is_loopback, token_path

#: the environment variable through which a parent hands a twin its admin token (never the command line: other
#: users can read a process's arguments)
TOKEN_ENV = "NNSIGHT_VLA_TWIN_TOKEN"


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


def free_loopback_host(ports=(*UR_PORTS, ADMIN_PORT), tries: int = 50) -> str:
    """A random ``127.x.y.z`` address whose UR ports are all free (parallel twins, parallel tests)."""
    if not isinstance(tries, int) or tries < 1:
        raise TwinError(f"free_loopback_host: tries must be an int >= 1, got {tries!r}")
    rng = random.Random()
    for _ in range(tries):
        host = f"127.{rng.randint(1, 254)}.{rng.randint(1, 254)}.{rng.randint(2, 254)}"
        if _ports_free(host, ports):
            return host
    raise TwinError("no free loopback address found for a controller twin")


class TwinClient:
    """JSON-lines client of a twin's admin port. ``token``: the twin's admin token; None: the one the twin left for
    its user (see :func:`~.config.token_path`)."""

    def __init__(self, host: str = "127.0.0.1", port: int = ADMIN_PORT, timeout: float = 30.0,
                 token: str | None = None):
        if not timeout > 0:
            raise TwinError(f"TwinClient timeout must be > 0 s, got {timeout!r}")
        self.host, self.port, self.timeout, self.token = host, port, timeout, token
        self._sock: socket.socket | None = None
        self._file = None
        self._lock = threading.Lock()

    def _connect(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self._file = self._sock.makefile("rwb")

    def _token(self) -> str:
        if self.token is None:
            path = token_path(self.host, self.port)
            try:
                self.token = path.read_text().strip()
            except OSError:
                raise TwinError(f"no admin token for the twin at {self.host}:{self.port}: pass token=, or run as the "
                                f"user who started it (it leaves its token in {path})") from None
        return self.token

    def request(self, cmd: str, **kw) -> dict:
        """Send one admin request; raise :class:`TwinError` on an error answer or a dead twin."""
        line = (json.dumps({"cmd": cmd, **kw, "token": self._token()}) + "\n").encode()
        with self._lock:
            for attempt in range(2):
                try:
                    if self._sock is None:
                        self._connect()
                    self._file.write(line)
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
                 extra_args: list[str] | None = None, allow_remote: bool = False):
        if not allow_remote and not is_loopback(host):
            raise TwinError(f"a twin listens on loopback addresses only (127.x.y.z), not {host!r}; pass "
                            "allow_remote=True to serve other machines behind a firewall you control")
        if not start_timeout > 0:
            raise TwinError(f"TwinProcess start_timeout must be > 0 s, got {start_timeout!r}")
        self.host = host
        self.token = secrets.token_urlsafe(24)  # handed over in the environment, never on the command line
        # ``import nnsight_vla`` is light (torch and nnsight load on first use), so ``-m`` costs the twin nothing
        args = [sys.executable, "-m", "nnsight_vla.envs.ur5.twin", "--host", host, "--model", model,
                "--camera-size", str(camera_size), "--parent-pid", str(os.getpid())]
        if allow_remote:
            args.append("--allow-remote")
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
        self.client = TwinClient(host, ADMIN_PORT, token=self.token)

    def start(self) -> "TwinProcess":
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        env["PYTHONUNBUFFERED"] = "1"
        env[TOKEN_ENV] = self.token
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
