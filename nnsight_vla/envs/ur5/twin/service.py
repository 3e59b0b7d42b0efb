"""One running twin (:class:`Twin`: its servers, controller, physics and render threads, admin requests) and
:func:`run_twin`, which serves one in this process until it is told to stop."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
from typing import Callable

import numpy as np

from ....errors import TwinError
from ..protocol import ROBOT_MODE
from .arm import Arm
from .config import TwinConfig, token_path
from .controller import Controller
from .servers import AdminHandler, DashboardHandler, RTDEHandler, ScriptHandler, Server


class Twin:
    """All servers, the controller and the physics/render threads of one twin."""

    def __init__(self, cfg: TwinConfig):
        self.cfg = cfg
        self.token = cfg.admin_token or secrets.token_urlsafe(24)
        self.stopping = threading.Event()
        self.hung: list[socket.socket] = []
        self.servers: list[Server] = []
        # bind first so that a busy port fails within milliseconds, before MuJoCo loads
        for name, port, handler in (("RTDE", cfg.rtde_port, RTDEHandler),
                                    ("dashboard", cfg.dashboard_port, DashboardHandler),
                                    ("script", cfg.script_port, ScriptHandler),
                                    ("admin", cfg.admin_port, AdminHandler)):
            try:
                self.servers.append(Server((cfg.host, port), handler, self))
            except OSError as e:
                for s in self.servers:
                    s.server_close()
                hint = ("another controller twin, URSim or robot driver is listening there; stop it or start "
                        "the twin on another loopback address (e.g. --host 127.0.0.2)")
                if e.errno == 99:  # EADDRNOTAVAIL
                    hint = "that address is not on this machine; use 127.0.0.1 or another 127.x.y.z address"
                raise TwinError(f"ur5 twin: cannot listen for {name} on {cfg.host}:{port} ({e.strerror}); "
                                f"{hint}") from None
        self.arm = None if cfg.hang else Arm(cfg)
        self.ctl = Controller(cfg, self.arm)
        self.render_q: queue.Queue = queue.Queue()
        self.stream_pause_until = 0.0

    # -- failure mode: accept, never answer
    def hang(self, sock: socket.socket) -> None:
        self.hung.append(sock)
        self.stopping.wait()


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
            since = req.get("since", 0)
            if not isinstance(since, int) or since < 0:
                raise ValueError(f"commands: since must be an index >= 0, got {since!r}")
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
            seconds = float(req.get("seconds", 1.0))
            if not 0 < seconds <= 60:
                raise ValueError(f"pause_stream: seconds must be in (0, 60], got {seconds!r}")
            self.stream_pause_until = time.perf_counter() + seconds
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


def _write_token(path, token: str) -> bool:
    """Leave the admin token where clients of the same user find it (folder 0700, file 0600); False if it cannot."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        os.replace(tmp, path)
        return True
    except OSError as e:
        print(f"ur5 twin: cannot leave the admin token in {path} ({e.strerror}); pass it to clients yourself",
              file=sys.stderr, flush=True)
        return False


def run_twin(cfg: TwinConfig, ready: Callable[[dict], None] | None = None, parent_pid: int | None = None) -> None:
    """Run a twin in this process until SIGINT/SIGTERM, an admin ``shutdown`` or (with ``parent_pid``) the death
    of the process that started it.

    Prints nothing itself; ``ready`` is called with the listening addresses (and the path of the admin token,
    readable by this user only) once everything runs. Raises :class:`TwinError` at once when a port is taken.
    """
    os.environ.setdefault("MUJOCO_GL", "egl")
    twin = Twin(cfg)
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
    path = token_path(cfg.host, cfg.admin_port)
    wrote = _write_token(path, twin.token)
    try:
        if ready is not None:
            ready({"ready": True, "pid": os.getpid(), "host": cfg.host, "ports": cfg.ports(), "model": cfg.model,
                   "controller_version": cfg.polyscope_version, "rtde_hz": cfg.rtde_hz, "hang": cfg.hang,
                   "admin_token_file": str(path) if wrote else None})
        twin.stopping.wait()
    finally:
        twin.shutdown()
        if wrote:
            with contextlib.suppress(OSError):
                if path.read_text() == twin.token:  # a newer twin on the same address may have replaced it
                    path.unlink()
