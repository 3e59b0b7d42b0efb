"""The server half of the model key: rebuild a model from its key, size it, and run requests as an NDIF actor.

A key is ``"nnsight_vla.models.<family>.<Class>:{json}"``; NDIF imports the class and calls
``_remoteable_from_model_key`` / ``_remoteable_describe_checkpoint``, which land in :func:`rebuild_from_key` and
:func:`describe_checkpoint`. :class:`ServerSimulationBackend` runs a trace against a separate model rebuilt from
the key, as an actor would, without a server: a stricter offline check than nnsight's ``remote="local"``.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import linecache
import logging
import math
import threading
from typing import Any, Mapping

import torch
import zstandard
from nnsight.modeling.mixins.meta import MetaDevice
from nnsight.modeling.mixins.remotable import CheckpointInfo, Remotable, bytes_per_element
from nnsight.ndif import pull_env
from nnsight.schema.request import RequestModel
from nnsight.tracing.backend import Backend
from nnsight.tracing.globals import BLOCKS, SOURCES
from nnsight.tracing.tracer import _saves, dec, inc, save
from nnsight.tracing.util import push
from nnsight.util import to_import_path

from ..errors import CheckpointError
from .backend import refuse_stored_edits

log = logging.getLogger(__name__)

#: key fields every family has (families add their load options, e.g. pi0's camera_names, as further fields)
_KEY_FIELDS = ("source", "revision", "dtype", "tiny")
#: the key's dtype when none was asked for: the family's default for the source (the checkpoint's own dtype,
#: float32 for tiny models), reproduced server-side by building with dtype=None
AUTO_DTYPE = "auto"
# constructor arguments a key must not set (they are the server's business)
_SERVER_ONLY = {"self", "source", "dispatch", "device", "check", "kwargs", "args"}


def _family_options(cls: type) -> set[str]:
    """Load options a family's constructor takes by name, beyond the common ones (allowed as key fields)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, parameter in inspect.signature(init).parameters.items():
            if parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                names.add(name)
        if klass.__name__ == "VLA":
            break
    return names - _SERVER_ONLY - set(_KEY_FIELDS)


def _placement(device: Any, device_map: Any, max_memory: Mapping | None) -> str | None:
    """The device an NDIF model actor asks for, as a torch device string.

    ndif's GPU actor passes ``device=<gpu index>`` for one GPU and ``device_map="balanced", max_memory={gpu: bytes}``
    for several; our CPU test actor passes ``device="cpu"``.
    """
    if device_map is None:
        if isinstance(device, bool):
            raise CheckpointError(f"invalid device {device!r}")
        return f"cuda:{device}" if isinstance(device, int) else (None if device is None else str(device))
    targets: set = set()
    if isinstance(device_map, Mapping):
        targets = set(device_map.values())
    elif max_memory:
        targets = set(max_memory)
    if len(targets) == 1:
        (only,) = targets
        return f"cuda:{only}" if isinstance(only, int) else str(only)
    raise CheckpointError(
        f"nnsight-vla serves each model replica on ONE device, but the server asked to spread it over "
        f"{sorted(map(str, targets)) or device_map!r}. Give the deployment GPUs large enough for the model at its "
        "dtype (OpenVLA-7B in bfloat16 needs about 16 GB), or use a smaller dtype in the model key."
    )


def rebuild_from_key(cls: type, model_key: str, **server_kwargs: Any) -> Any:
    """Rebuild a model from its key suffix, accepting what an NDIF model actor passes.

    ``dispatch`` (False: structure only, used to size a checkpoint), ``dtype`` (the server's default: the key's own
    dtype wins -- "auto" rebuilds with the family's default, as the client did -- so the server computes exactly what
    the client traced against), ``device`` (GPU index or "cpu"), ``device_map``/``max_memory`` (one device only),
    ``trust_remote_code`` (ignored: nnsight-vla never runs checkpoint code). Other server arguments are ignored with
    a log line. Key fields beyond family/source/revision/dtype/tiny must be named parameters of the family's
    constructor (its load options, e.g. pi0's ``camera_names``). ``policy`` (a :class:`~.policy.ServerPolicy`, as
    the server shim passes): the key must be admitted and its size, measured on the meta device, within the cap
    before any weight is allocated.
    """
    policy = server_kwargs.pop("policy", None)
    if policy is not None:
        admitted = policy.admit(f"{to_import_path(cls)}:{model_key}")
        policy.check_size(describe_checkpoint(cls, model_key, server_kwargs.get("dtype") or "float32").size_bytes,
                          admitted.tiny)
    try:
        data = json.loads(model_key)
    except ValueError as error:
        raise CheckpointError(f"model key {model_key!r} of {cls.__name__} is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"model key of {cls.__name__} must be a JSON object, got {model_key!r}")
    family = data.pop("family", cls.family)
    if family != cls.family:
        raise CheckpointError(f"model key names family {family!r} but the class {cls.__name__} is {cls.family!r}")
    options = _family_options(cls)
    unknown = sorted(set(data) - set(_KEY_FIELDS) - options)
    if unknown:
        raise CheckpointError(
            f"model key of {cls.__name__} has unknown field(s) {unknown}; known: {sorted({*_KEY_FIELDS, *options})}"
        )
    server_dtype = server_kwargs.pop("dtype", None)
    key_dtype = data.pop("dtype", None)
    if key_dtype in (None, AUTO_DTYPE):
        dtype = None  # the family's own default, exactly as on the client
    else:
        dtype = key_dtype
    if server_dtype and str(server_dtype).removeprefix("torch.") != key_dtype:
        log.info("model key asks for dtype %s; the server default %s is not used", key_dtype, server_dtype)
    server_kwargs.pop("trust_remote_code", None)
    device = _placement(server_kwargs.pop("device", None), server_kwargs.pop("device_map", None),
                        server_kwargs.pop("max_memory", None))
    dispatch = bool(server_kwargs.pop("dispatch", False))
    check = server_kwargs.pop("check", True)
    if server_kwargs:
        log.info("ignoring server arguments %s for %s", sorted(server_kwargs), cls.__name__)
    source = data.pop("source", None)
    return cls(source, dtype=dtype, device=device, dispatch=dispatch, check=check, **data)


def describe_checkpoint(cls: type, model_key: str, dtype: str) -> Any:
    """What an NDIF controller needs to place the model: size in the dtype it will really be held in, parameter
    count, config (for ``nnsight.status()``) and revision. Built on the meta device: no weight is allocated, not
    even for a tiny model (which the family builds with real weights at once)."""
    data = json.loads(model_key)
    with MetaDevice():
        model = rebuild_from_key(cls, model_key, dispatch=False, dtype=dtype, check=False)
    module = model._module
    tensors = [*module.parameters(), *module.buffers()]
    n_params = sum(p.nelement() for p in module.parameters())
    held = data.get("dtype")  # the key's dtype wins at load time, so size with it
    if held in (None, AUTO_DTYPE):
        # the family's default: sized as the structure is built (an over-estimate for a half-precision
        # checkpoint, never an under-estimate)
        size = sum(t.nelement() * t.element_size() for t in tensors)
    else:
        size = math.ceil(sum(t.nelement() for t in tensors) * bytes_per_element(held))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config = config.__class__.from_dict(config.to_dict())
        config._name_or_path = data.get("source") or f"tiny-{cls.family}-seed{(data.get('tiny') or {}).get('seed', 0)}"
    else:
        config = None
    return CheckpointInfo(
        size_bytes=size, n_params=n_params, config=config,
        revision=data.get("revision"),
    )


# ---------------------------------------------------------------------------------------------------------------
# a faithful in-process server (offline checks)

_SERVER_MODELS: dict[tuple[str, str], Any] = {}


def server_model(model_key: str, dtype: str = "bfloat16") -> Any:
    """The model an NDIF CPU actor would hold for ``model_key`` (built once per process and cached).

    Built exactly as the actor does: ``Remotable.from_model_key(key, dispatch=True, dtype=<server default>,
    device="cpu", trust_remote_code=False)``.
    """
    cache_key = (model_key, str(dtype))
    if cache_key not in _SERVER_MODELS:
        while len(_SERVER_MODELS) >= 2:  # weights can be big: keep the two most recent
            _SERVER_MODELS.pop(next(iter(_SERVER_MODELS)))
        model = Remotable.from_model_key(model_key, dispatch=True, dtype=dtype, device="cpu", trust_remote_code=False)
        model._module.requires_grad_(False)
        _SERVER_MODELS[cache_key] = model
    return _SERVER_MODELS[cache_key]


@contextlib.contextmanager
def _isolated_source_caches():
    # Deserialising registers the block's source under the client's filename (linecache) and nnsight memoises
    # parsed blocks by filename and line: in one process that would clobber the client's own entries.
    saved = (dict(linecache.cache), dict(SOURCES), dict(BLOCKS))
    try:
        yield
    finally:
        for cache, snapshot in zip((linecache.cache, SOURCES, BLOCKS), saved):
            cache.clear()
            cache.update(snapshot)


def execute_request(blob: bytes, server: Any, compress: bool = True) -> bytes:
    """What an NDIF model actor does with a request payload, on the calling thread (use a fresh thread: nnsight's
    trace depth and saved-value set are per thread).

    Deserialises the payload against ``server``'s persistent objects (its modules, interleaver, tokenizer and
    processors), runs the block, and returns the saved values as ``torch.save`` bytes (zstd-compressed when
    ``compress``, as the client expects when it compressed its request). Errors propagate.
    """
    with _isolated_source_caches():
        restored = RequestModel.deserialize(blob, server._remoteable_persistent_objects(), compress=compress)
        inc()
        try:
            restored.execute(restored.info.code)
            saves = _saves()
            saved = {name: value for name, value in restored.info.frame.f_locals.items() if id(value) in saves}
        finally:
            dec()
    buffer = io.BytesIO()
    torch.save(saved, buffer, pickle_protocol=4)
    data = buffer.getvalue()
    if compress:
        data = zstandard.ZstdCompressor(level=6).compress(data)
    return data


class ServerSimulationBackend(Backend):
    """Run a trace as an NDIF model actor would, without a server: a stricter offline check than ``remote="local"``.

    The request is serialised (compressed, as sent), deserialised against a SEPARATE model rebuilt from the model
    key (:func:`server_model`, with the server's default dtype) or the ``server`` model given, executed on a worker
    thread as ndif runs it (:func:`execute_request`), and only the saved values come back, through
    ``torch.save``/``torch.load``. So it proves that the key rebuilds the same model, that every object the block
    uses survives the trip, and that persistent objects (tokenizer, processors) resolve to the server's own.
    ``payload`` keeps the last request bytes (uncompressed) for inspection.

        with vla.predict_action(image, text, backend=ServerSimulationBackend(vla)) as tracer: ...
    """

    def __init__(self, model: Any, server_dtype: str = "bfloat16", server: Any = None) -> None:
        self.model = model
        self.server_dtype = server_dtype
        self.server = server
        self.payload: bytes | None = None
        self.result_bytes: int = 0

    def __call__(self, tracer: Any) -> dict:
        refuse_stored_edits(self.model)  # as a real remote run
        pull_env()
        blob = RequestModel.serialize(tracer, compress=True)
        self.payload = zstandard.ZstdDecompressor().decompress(blob)
        server = self.server if self.server is not None else server_model(self.model.to_model_key(), self.server_dtype)
        outcome: dict = {}

        def actor() -> None:
            try:
                outcome["result"] = execute_request(blob, server, compress=True)
            except BaseException as error:  # noqa: BLE001 - re-raised on the caller's thread
                outcome["error"] = error

        worker = threading.Thread(target=actor, name="nnsight-vla-server-simulation")
        worker.start()
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        self.result_bytes = len(outcome["result"])
        data = zstandard.ZstdDecompressor().decompress(outcome["result"])
        result = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        for value in result.values():
            save(value)
        if tracer.info is not None and tracer.info.frame is not None:
            push(tracer.info.frame, result)
        return result
