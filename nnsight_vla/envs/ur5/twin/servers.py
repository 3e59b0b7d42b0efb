"""The twin's servers: RTDE (streams the controller's snapshot, applies input packages), dashboard (one reply
line per command), script port (programs; ur_rtde's control script is emulated by the controller) and the
twin's own admin port (one JSON request per line, each with the twin's token)."""

from __future__ import annotations

import hmac
import json
import re
import socket
import socketserver
import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..protocol import (
    FMT,
    MSG_I,
    MSG_M,
    MSG_O,
    MSG_P,
    MSG_S,
    MSG_U,
    MSG_V,
    MSG_v,
    OUTPUT_TYPES,
    REGISTER,
    ROBOT_MODE,
    RUNTIME_STATE,
    frame,
    input_type,
    mode_name,
    output_type,
    read_frame,
)
from .config import TwinConfig
from .controller import Controller

if TYPE_CHECKING:
    from .service import Twin


def _getter(name: str) -> Callable[[dict], Any]:
    """How to read a streamed output field from the controller's snapshot."""
    m = REGISTER.match(name)
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
    typ = OUTPUT_TYPES[name]
    default: Any = 0.0
    if typ in ("VECTOR6D", "VECTOR6INT32", "VECTOR6UINT32"):
        default = [0] * 6 if "INT" in typ else [0.0] * 6
    elif typ == "VECTOR3D":
        default = [0.0] * 3
    elif typ in ("UINT8", "UINT32", "UINT64", "INT32"):
        default = 0
    return lambda s: s.get(name, default)



class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, addr, handler, twin: "Twin"):
        self.twin = twin
        super().__init__(addr, handler)


class RTDEHandler(socketserver.BaseRequestHandler):
    def setup(self) -> None:
        self.twin: Twin = self.server.twin  # type: ignore[attr-defined]
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
            self.sock.sendall(frame(typ, payload))

    def handle(self) -> None:
        if self.twin.cfg.hang:
            self.twin.hang(self.sock)
            return
        streamer = threading.Thread(target=self._stream, daemon=True)
        streamer.start()
        try:
            while True:
                self._dispatch(*read_frame(self.sock))
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed.set()
            self.streaming.clear()

    def _dispatch(self, typ: int, payload: bytes) -> None:
        cfg = self.twin.cfg
        if typ == MSG_V:
            version = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 0
            self.send(MSG_V, struct.pack(">B", 1 if version in (1, 2) else 0))
        elif typ == MSG_v:
            self.send(MSG_v, struct.pack(">IIII", *cfg.controller_version))
        elif typ == MSG_O:
            freq = struct.unpack(">d", payload[:8])[0]
            names = [n for n in payload[8:].decode("ascii", "replace").split(",") if n]
            types = [output_type(n) for n in names]
            if "NOT_FOUND" not in types:
                fmt = ">B" + "".join(FMT[t] for t in types)
                self.output = (names, struct.Struct(fmt), [_getter(n) for n in names])
                self.freq = min(max(freq, 1.0), cfg.rtde_hz) if freq > 0 else cfg.rtde_hz
            self.send(MSG_O, struct.pack(">B", 1) + ",".join(types).encode())
        elif typ == MSG_I:
            names = [n for n in payload.decode("ascii", "replace").split(",") if n]
            types = [input_type(n) for n in names]
            rid = len(self.inputs) + 1  # recipes numbered from 1 per connection, as ur_rtde assumes
            if "NOT_FOUND" not in types:
                self.inputs[rid] = (names, struct.Struct(">" + "".join(FMT[t] for t in types)))
            else:
                rid = 0
            self.send(MSG_I, struct.pack(">B", rid) + ",".join(types).encode())
        elif typ == MSG_S:
            ok = self.output is not None
            self.send(MSG_S, struct.pack(">B", int(ok)))
            if ok:
                self.streaming.set()
        elif typ == MSG_P:
            self.streaming.clear()
            with self.send_lock:  # no data package may slip in before the pause answer
                pass
            self.send(MSG_P, struct.pack(">B", 1))
        elif typ == MSG_U:
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
        elif typ == MSG_M:
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
                    self.sock.sendall(frame(MSG_U, data))
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


class DashboardHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        twin: Twin = self.server.twin  # type: ignore[attr-defined]
        if twin.cfg.hang:
            twin.hang(self.request)
            return
        self.wfile.write(b"Connected: Universal Robots Dashboard Server\n")
        for raw in self.rfile:
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            reply, close = dashboard_reply(twin.ctl, twin.cfg, line)
            self.wfile.write((reply + "\n").encode())
            if close:
                return


class ScriptHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        twin: Twin = self.server.twin  # type: ignore[attr-defined]
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
            buf = consume_script(twin.ctl, buf)


class AdminHandler(socketserver.StreamRequestHandler):
    """One JSON request per line, one JSON reply per request; a request without the twin's token is refused and
    the connection closed."""

    def handle(self) -> None:
        twin: Twin = self.server.twin  # type: ignore[attr-defined]
        for raw in self.rfile:
            req: Any = None
            try:
                req = json.loads(raw)
                if not isinstance(req, dict):
                    raise ValueError("an admin request is a JSON object")
                token = req.get("token")
                if not (isinstance(token, str) and hmac.compare_digest(token.encode(), twin.token.encode())):
                    self.wfile.write(b'{"ok": false, "error": "admin token missing or wrong"}\n')
                    return
                reply = twin.admin(req)
            except Exception as e:  # answer every request; errors travel back as text
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            self.wfile.write((json.dumps(reply) + "\n").encode())
            if isinstance(req, dict) and req.get("cmd") == "shutdown":
                return


def dashboard_reply(ctl: Controller, cfg: TwinConfig, line: str) -> tuple[str, bool]:
    """The dashboard server's answer to one command line, and whether it closes the connection."""
    with ctl.lock:
        ctl.stats["dashboard_commands"] += 1
    cmd = line.strip()
    low = cmd.lower()
    model = cfg.reported_model or cfg.model
    rmode = lambda: mode_name(ROBOT_MODE, ctl.robot_mode)  # noqa: E731
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
        state = mode_name(RUNTIME_STATE, ctl.runtime_state)
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

def consume_script(ctl: Controller, buf: str) -> str:
    """Hand every complete program (``def``/``sec NAME(): ... end``) in ``buf`` to the controller; the rest stays."""
    while True:
        m = re.search(r"^(def|sec)\s+(\w+)\s*\(\s*\)\s*:", buf, re.M)
        if not m:
            # single-line script commands are recorded, not executed
            if "\n" in buf and not re.search(r"^(def|sec)\s", buf, re.M):
                for line in buf.splitlines():
                    if line.strip():
                        ctl.log_event(f"script line ignored: {line.strip()[:80]}")
                return ""
            return buf
        end = re.search(r"^end\s*$", buf[m.end():], re.M)
        if not end:
            return buf[m.start():]
        text = buf[m.start():m.end() + end.end()]
        ctl.load_program(m.group(2), text)
        buf = buf[m.end() + end.end():]
