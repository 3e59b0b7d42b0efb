"""One policy, many simulator workers: a server process owns the model and answers ``predict_action`` calls.

Workers hold a :class:`PolicyClient` (the policy surface; ``predict_action`` is a call over a local,
authenticated ``multiprocessing.connection`` socket). Each request names its condition; the server runs the
call inside that condition's context (its steering), so workers never touch the model. With ``max_batch > 1``
requests of the same condition that arrive within ``max_wait_s`` are answered by one batched
``predict_action`` call (lists in, a batch out), each element equal to its single call.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import threading
import time
import traceback
from typing import Any, Mapping

import numpy as np

from ..errors import InputError
from .conditions import Condition
from .policy import PolicySpec, policy_surface
from .seeding import rng_state, seed_everything, set_rng_state


class PolicyServer:
    """Start a server process for ``policy`` (an object that pickles, or a :class:`PolicySpec`)."""

    def __init__(self, policy: Any, address: tuple[str, int] = ("127.0.0.1", 0), *, max_batch: int = 1,
                 max_wait_s: float = 0.005, start_timeout_s: float = 600.0):
        import secrets

        self.authkey = secrets.token_bytes(16)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        try:
            payload = pickle.dumps(policy)
        except Exception as exc:
            raise InputError(f"the policy ({type(policy).__name__}) cannot be sent to the server process ({exc}); "
                             "pass a PolicySpec") from None
        self.process = ctx.Process(target=_serve, args=(payload, address, self.authkey, child, int(max_batch),
                                                        float(max_wait_s)), daemon=True)
        self.process.start()
        child.close()
        if not parent.poll(start_timeout_s):
            self.close()
            raise InputError(f"the policy server did not start within {start_timeout_s:g} s")
        message = parent.recv()
        if isinstance(message, str):
            self.close()
            raise InputError(f"the policy server failed to start: {message}")
        self.address, self.surface = message

    def client(self) -> "PolicyClient":
        return PolicyClient(self.address, self.authkey, self.surface)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                self.client()._call(("stop",))
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()


class PolicyClient:
    """The worker side of :class:`PolicyServer`: the policy surface; ``predict_action`` is a remote call."""

    def __init__(self, address, authkey: bytes, surface: Mapping):
        self.address, self.authkey, self.surface = address, authkey, dict(surface)
        for name in ("family", "camera_names", "state_dim", "action_dim", "action_horizon", "image_size"):
            setattr(self, name, self.surface.get(name))
        self._conn = None
        self._condition: str | None = None

    def __getstate__(self):
        return {"address": self.address, "authkey": self.authkey, "surface": self.surface}

    def __setstate__(self, state):
        self.__init__(state["address"], state["authkey"], state["surface"])

    def build(self) -> "PolicyClient":  # lets a worker treat it like a PolicySpec
        return self

    def identity(self) -> dict:
        return {"class": "PolicyClient", "family": self.family}

    def _call(self, msg):
        from multiprocessing.connection import Client

        if self._conn is None:
            self._conn = Client(self.address, authkey=self.authkey)
        self._conn.send(msg)
        status, value = self._conn.recv()
        if status != "ok":
            raise InputError(f"policy server error: {value}")
        return value

    @contextlib.contextmanager
    def condition_context(self, condition: Condition):
        """Run the following calls under ``condition`` (applied by the server around each call)."""
        self._call(("condition", condition.to_dict()))
        previous, self._condition = self._condition, condition.name
        try:
            yield
        finally:
            self._condition = previous

    def seed_episode(self, seed: int) -> None:
        """Seed this worker's random stream on the server (environments call it at each episode start)."""
        self._call(("seed", int(seed)))

    def predict_action(self, images, instruction: str, state=None, **kwargs: Any) -> np.ndarray:
        return self._call(("predict", self._condition, images, instruction, state, kwargs))


def _serve(payload: bytes, address, authkey: bytes, ready, max_batch: int, max_wait_s: float) -> None:
    from multiprocessing.connection import Listener, wait

    try:
        obj = pickle.loads(payload)
        policy = obj.build() if isinstance(obj, PolicySpec) else obj
        surface = policy_surface(policy).to_dict()
        listener = Listener(address, authkey=authkey)
    except Exception as exc:
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send((listener.address, surface))
    state = _ServerState(policy)
    conns: list = []
    accepted: list = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    while True:
        conns.extend(accepted)
        accepted.clear()
        requests = []
        deadline = None
        while True:  # gather requests; with batching, wait up to max_wait_s for more of them
            timeout = 0.05 if deadline is None else max(0.0, deadline - time.monotonic())
            for conn in wait(conns, timeout=timeout) if conns else []:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    conns.remove(conn)
                    state.rng.pop(conn, None)
                    continue
                if msg[0] == "stop":
                    listener.close()
                    return
                if msg[0] != "predict":
                    conn.send(state.control(conn, msg))
                    continue
                requests.append((conn, msg))
            if not requests or max_batch <= 1 or len(requests) >= max_batch:
                break
            if deadline is None:
                deadline = time.monotonic() + max_wait_s
            elif time.monotonic() >= deadline:
                break
            conns.extend(accepted)
            accepted.clear()
        for group in _groups(requests, max_batch):
            for conn, reply in state.predict(group):
                conn.send(reply)


def _groups(requests: list, max_batch: int) -> list[list]:
    """Requests split into batches of one condition and the same keyword arguments, in arrival order."""
    groups: dict = {}
    for conn, msg in requests:
        _, cond, _, _, state, kwargs = msg
        key = (cond, repr(sorted(kwargs.items())), state is None)
        groups.setdefault(key, []).append((conn, msg))
    out = []
    for members in groups.values():
        for start in range(0, len(members), max_batch):
            out.append(members[start:start + max_batch])
    return out


class _ServerState:
    """The model, the conditions the workers announced, and each worker's random stream."""

    def __init__(self, policy: Any):
        self.policy = policy
        self.conditions: dict[str, Condition] = {}
        self.rng: dict = {}

    def control(self, conn, msg) -> tuple:
        try:
            if msg[0] == "condition":
                condition = Condition.from_dict(msg[1])
                self.conditions[condition.name] = condition
            elif msg[0] == "seed":
                seed_everything(int(msg[1]))
                self.rng[conn] = rng_state()
            else:
                return ("error", f"unknown request {msg[0]!r}")
            return ("ok", None)
        except Exception as exc:
            return ("error", f"{type(exc).__name__}: {exc}")

    def predict(self, group: list) -> list[tuple]:
        cond_name = group[0][1][1]
        condition = self.conditions.get(cond_name)
        context = condition.context(self.policy) if condition is not None else contextlib.nullcontext()
        try:
            with context:
                if len(group) == 1:
                    conn, (_, _, images, instruction, state, kwargs) = group[0]
                    if conn in self.rng:  # each worker's episode draws from its own seeded stream
                        set_rng_state(self.rng[conn])
                    out = [self._call(images, instruction, state, kwargs)]
                    if conn in self.rng:
                        self.rng[conn] = rng_state()
                else:
                    kwargs = group[0][1][5]
                    images = [m[2] for _, m in group]
                    instructions = [m[3] for _, m in group]
                    states = None if group[0][1][4] is None else [m[4] for _, m in group]
                    out = list(self._call(images, instructions, states, kwargs))
            return [(conn, ("ok", np.asarray(o))) for (conn, _), o in zip(group, out)]
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
            return [(conn, ("error", message)) for conn, _ in group]

    def _call(self, images, instruction, state, kwargs):
        if state is None:
            return self.policy.predict_action(images, instruction, **kwargs)
        return self.policy.predict_action(images, instruction, state=state, **kwargs)
