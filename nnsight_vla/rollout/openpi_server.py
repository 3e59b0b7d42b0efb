"""openpi's policy-server protocol for any nnsight-vla policy, steered or not.

An openpi client (``openpi_client.websocket_client_policy.WebsocketClientPolicy``, and the LIBERO / DROID
evaluation scripts built on it) connects over a websocket, receives the server's metadata, then sends one
observation per message and gets ``{"actions": (H, D), ...}`` back, all msgpack with openpi's numpy encoding.
Each request runs under one served :class:`~nnsight_vla.rollout.conditions.Condition` (its steering applied
around the call): the default one, or the one the observation names under ``"condition"``. A bad request gets
a text frame (openpi's client raises it) and the connection keeps serving. See docs/openpi.md.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from typing import Any, Iterable, Mapping

import numpy as np

from ..errors import InputError, VLAError
from .conditions import Condition, baseline, check_unique, parse_conditions
from .policy import condition_context, policy_surface

logger = logging.getLogger(__name__)

#: families whose ``predict_action`` takes no robot state (a state in the observation is ignored)
STATELESS_FAMILIES = ("openvla",)
#: the observation key that picks a served condition by name (absent: the default condition)
CONDITION_KEY = "condition"
#: numpy kinds an observation array may have (bool, signed / unsigned int, float): never object arrays
_ARRAY_KINDS = "biuf"

# -- openpi's msgpack-numpy wire format (openpi_client.msgpack_numpy) ---------------------------------------------


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, (np.ndarray, np.generic)) and obj.dtype.kind in "VOc":
        raise InputError(f"cannot send an array of dtype {obj.dtype} (openpi's encoding has numbers only)")
    if isinstance(obj, np.ndarray):
        return {b"__ndarray__": True, b"data": np.ascontiguousarray(obj).tobytes(), b"dtype": obj.dtype.str,
                b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {type(obj).__name__}")


def _unpack_hook(obj: dict) -> Any:
    if b"__ndarray__" in obj or b"__npgeneric__" in obj:
        try:
            dtype = np.dtype(obj[b"dtype"])
        except (TypeError, ValueError, KeyError) as error:
            raise InputError(f"bad array dtype in the message: {error}") from None
        if dtype.kind not in _ARRAY_KINDS:
            raise InputError(f"arrays of dtype {dtype} are refused (numbers and booleans only)")
        if b"__npgeneric__" in obj:
            return dtype.type(obj[b"data"])
        try:
            shape = tuple(int(n) for n in obj[b"shape"])
            return np.frombuffer(obj[b"data"], dtype=dtype).reshape(shape).copy()
        except (TypeError, ValueError, KeyError) as error:
            raise InputError(f"bad array in the message (data does not fit dtype and shape): {error}") from None
    return obj


def pack(obj: Any) -> bytes:
    """msgpack bytes of ``obj`` with numpy arrays as openpi encodes them."""
    import msgpack

    return msgpack.packb(obj, default=_pack_default)


def unpack(data: bytes) -> Any:
    """Inverse of :func:`pack` (and of openpi's ``msgpack_numpy.packb``); numeric arrays only."""
    import msgpack

    try:
        return msgpack.unpackb(data, object_hook=_unpack_hook, strict_map_key=False)
    except VLAError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure is the message's fault
        raise InputError(f"the message is not msgpack (openpi_client.msgpack_numpy): {error}") from None


# -- the policy side ---------------------------------------------------------------------------------------------


def image_keys(camera_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """The observation keys each camera is read from, in order of preference: ``observation/{camera}``, then
    openpi's LIBERO / DROID names (the first camera is the scene view, a camera named ``*wrist*`` the wrist)."""
    out = {}
    for i, camera in enumerate(camera_names):
        keys = [f"observation/{camera}", f"observation/{camera}_image"]
        if "wrist" in camera.lower():
            keys += ["observation/wrist_image", "observation/wrist_image_left"]
        elif i == 0:
            keys += ["observation/image", "observation/exterior_image_1_left"]
        out[camera] = tuple(dict.fromkeys(keys))
    return out


#: where the robot state is read from: one vector, or DROID's joint and gripper positions concatenated
STATE_KEYS = ("observation/state", "state")
DROID_STATE_KEYS = ("observation/joint_position", "observation/gripper_position")


class OpenpiPolicy:
    """openpi's policy surface (``infer(obs) -> {"actions": (H, D)}``, ``metadata``) over an nnsight-vla policy.

    ``conditions``: None (unsteered), a :class:`Condition`, a steering (``Steering``, ``SteeringGroup``...), a
    condition spec in the shared syntax (``"steer:FILE#KEY@4/late"``, a conditions file) or a list of these. The
    first is the default; ``"baseline"`` is always served too. ``predict_kwargs`` go to every call (e.g.
    ``unnorm_key``), ``action_dims`` keeps the first D action dimensions (openpi's output transforms do the same)."""

    def __init__(self, policy: Any, conditions: Any = None, *, default: str | None = None,
                 predict_kwargs: Mapping | None = None, action_dims: int | None = None,
                 uses_state: bool | None = None):
        self.policy = policy
        self.surface = policy_surface(policy)
        served = _as_conditions(conditions, getattr(policy, "d_mlp", None))
        self.default = default or served[0].name
        if all(c.name != "baseline" for c in served):
            served.append(baseline())
        check_unique(served)
        self.conditions = {c.name: c for c in served}
        if self.default not in self.conditions:
            raise InputError(f"default condition {self.default!r} is not served; conditions: {list(self.conditions)}")
        self.predict_kwargs = dict(predict_kwargs or {})
        if action_dims is not None and not 1 <= int(action_dims) <= self.surface.action_dim:
            raise InputError(f"action_dims must be 1..{self.surface.action_dim} (the model's action size), "
                             f"got {action_dims}")
        self.action_dims = None if action_dims is None else int(action_dims)
        self.uses_state = self.surface.family not in STATELESS_FAMILIES if uses_state is None else bool(uses_state)
        self.image_keys = image_keys(self.surface.camera_names)
        self._lock = threading.Lock()
        for condition in self.conditions.values():  # a steering that cannot apply to this model fails now
            with condition_context(policy, condition):
                pass

    @property
    def metadata(self) -> dict:
        """What a client receives on connecting: the model's surface, the observation keys read, the conditions."""
        s = self.surface
        horizon = s.action_horizon or 1
        return {
            "server": "nnsight-vla", "family": s.family, "camera_names": list(s.camera_names),
            "uses_state": self.uses_state, "state_dim": s.state_dim, "action_dim": s.action_dim,
            "action_horizon": horizon, "actions_shape": [horizon, self.action_dims or s.action_dim],
            "observation_keys": {"prompt": ["prompt"], **{c: list(k) + [f"images/{c}"]
                                                          for c, k in self.image_keys.items()},
                                 "state": list(STATE_KEYS) + ["+".join(DROID_STATE_KEYS)] if self.uses_state else []},
            "conditions": {name: {k: c.to_dict()[k] for k in ("kind", "concept", "alpha", "layers", "prompt")}
                           for name, c in self.conditions.items()},
            "default_condition": self.default, "condition_key": CONDITION_KEY,
            "predict_kwargs": {k: v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)
                               for k, v in self.predict_kwargs.items()},
        }

    def infer(self, obs: Mapping) -> dict:
        """One request: the actions ``(H, D)`` (OpenVLA: H = 1), the condition's name, the model's time."""
        images, prompt, state, condition = self.parse(obs)
        kwargs = dict(self.predict_kwargs)
        if state is not None:
            kwargs["state"] = state
        with self._lock:
            start = time.perf_counter()
            with condition_context(self.policy, condition):
                out = self.policy.predict_action(images, condition.instruction(prompt), **kwargs)
            elapsed = time.perf_counter() - start
        actions = np.asarray(out)
        if actions.ndim == 1:
            actions = actions[None]
        if self.action_dims is not None:
            actions = actions[:, : self.action_dims]
        return {"actions": actions, "condition": condition.name, "policy_timing": {"infer_ms": elapsed * 1000.0}}

    def parse(self, obs: Any) -> tuple[dict, str, np.ndarray | None, Condition]:
        """An openpi observation -> (``{camera: image}``, prompt, state or None, condition); clear errors."""
        if not isinstance(obs, Mapping):
            raise InputError(f"an observation is a dict such as {{'observation/image': HxWx3 uint8, 'prompt': "
                             f"'...'}}, got {type(obs).__name__}")
        prompt = obs.get("prompt")
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", "replace")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"the observation needs 'prompt' (the task instruction, a non-empty string); "
                             f"got {prompt!r}; keys: {sorted(map(str, obs))}")
        images = {camera: self._image(obs, camera) for camera in self.surface.camera_names}
        state = self._state(obs) if self.uses_state else None
        name = obs.get(CONDITION_KEY, self.default)
        if name not in self.conditions:
            raise InputError(f"no served condition {name!r}; conditions: {list(self.conditions)}")
        return images, prompt, state, self.conditions[name]

    def _image(self, obs: Mapping, camera: str) -> np.ndarray:
        keys = self.image_keys[camera]
        nested = obs.get("images")
        found = next((obs[k] for k in keys if k in obs), None)
        if found is None and isinstance(nested, Mapping):
            found = nested.get(camera)
        if found is None:
            raise InputError(f"{self.surface.family} needs camera {camera!r}: send it as {' or '.join(keys)} (or "
                             f"images/{camera}); the observation has {sorted(map(str, obs))}")
        image = np.asarray(found)
        if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:  # openpi's CHW images
            image = np.ascontiguousarray(image.transpose(1, 2, 0))
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise InputError(f"camera {camera!r}: expected an HxWx3 (or 3xHxW) uint8 image, got shape "
                             f"{image.shape} dtype {image.dtype}")
        return image

    def _state(self, obs: Mapping) -> np.ndarray:
        key = next((k for k in STATE_KEYS if k in obs), None)
        if key is not None:
            parts = [obs[key]]
        elif all(k in obs for k in DROID_STATE_KEYS):
            parts = [obs[k] for k in DROID_STATE_KEYS]
        else:
            raise InputError(f"{self.surface.family} needs the robot state: send {' or '.join(STATE_KEYS)} (or "
                             f"DROID's {' + '.join(DROID_STATE_KEYS)}); the observation has {sorted(map(str, obs))}")
        try:
            state = np.concatenate([np.asarray(p, np.float64).reshape(-1) for p in parts])
        except (TypeError, ValueError) as error:
            raise InputError(f"the robot state must be numbers: {error}") from None
        if not np.all(np.isfinite(state)):
            raise InputError(f"the robot state has NaN or infinite values: {state.tolist()}")
        return state.astype(np.float32)


def _as_conditions(conditions: Any, d_mlp: int | None) -> list[Condition]:
    if conditions is None:
        return [baseline()]
    items = [conditions] if isinstance(conditions, (str, Condition)) or hasattr(conditions, "apply") else list(
        conditions)
    out: list[Condition] = []
    for item in items:
        if isinstance(item, Condition):
            out.append(item)
        elif isinstance(item, str):
            out.extend(parse_conditions([item], d_mlp=d_mlp))
        elif callable(getattr(item, "apply", None)) and callable(getattr(item, "to_dict", None)):
            out.append(Condition(str(getattr(item, "name", None) or "steered"), steering=item, kind="steered"))
        else:
            raise InputError(f"a served condition is a Condition, a steering or a condition spec, got "
                             f"{type(item).__name__}")
    if not out:
        raise InputError("no conditions to serve (pass None for the unsteered policy)")
    check_unique(out)
    return out


# -- the server --------------------------------------------------------------------------------------------------


class OpenpiServer:
    """Serve ``policy`` (a model, or an :class:`OpenpiPolicy`) over openpi's websocket protocol.

    ``port=0`` picks a free port (see :attr:`port`). :meth:`serve_forever` blocks; :meth:`start` serves from a
    thread (``with OpenpiServer(vla, port=0) as server:``). Requests run one at a time (one model); each
    connection has its own thread, and ``GET /healthz`` answers 200 as openpi's server does."""

    def __init__(self, policy: Any, conditions: Any = None, *, host: str = "127.0.0.1", port: int = 8000,
                 **options: Any):
        from websockets.sync.server import serve

        if isinstance(policy, OpenpiPolicy):
            if conditions is not None or options:
                raise InputError("pass conditions and options to OpenpiPolicy, or pass a model here")
            self.policy = policy
        else:
            self.policy = OpenpiPolicy(policy, conditions, **options)
        self._metadata = pack(self.policy.metadata)
        try:
            self._server = serve(self._handle, host, int(port), compression=None, max_size=None,
                                 process_request=_health_check)
        except OSError as error:
            raise InputError(f"cannot listen on {host}:{port}: {error}") from None
        self.host, self.port = self._server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None
        self._served = False
        self.requests = 0
        self.errors = 0

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}"

    def serve_forever(self) -> None:
        self._served = True
        self._server.serve_forever()

    def start(self) -> "OpenpiServer":
        self._served = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="openpi-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop listening, close the open connections and wait for their handlers (idempotent)."""
        if not self._served:  # websockets' shutdown waits for a serving loop to end: give it one to end
            self.start()
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "OpenpiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _handle(self, connection: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        peer = connection.remote_address
        logger.info("connection from %s", peer)
        try:
            connection.send(self._metadata)
            while True:
                connection.send(self._reply(connection.recv()))
        except ConnectionClosed:
            logger.info("connection from %s closed", peer)

    def _reply(self, message: bytes | str) -> bytes | str:
        start = time.perf_counter()
        self.requests += 1
        try:
            if isinstance(message, str):
                raise InputError("observations are binary msgpack frames (openpi_client.msgpack_numpy), not text")
            out = self.policy.infer(unpack(message))
            out["server_timing"] = {"infer_ms": (time.perf_counter() - start) * 1000.0}
            return pack(out)
        except Exception as error:  # noqa: BLE001 - every failure becomes the reply; the server keeps serving
            self.errors += 1
            text = f"nnsight-vla server: {type(error).__name__}: {error}"
            if not isinstance(error, VLAError):
                text += "\n" + traceback.format_exc(limit=6)
            logger.warning("request failed: %s", text.splitlines()[0])
            return text


def _health_check(connection: Any, request: Any) -> Any:
    if request.path == "/healthz":
        return connection.respond(200, "OK\n")
    return None
