"""Remote execution of nnsight-vla traces on an NDIF server (``remote=True`` on any trace; see docs/remote.md).

Submodules, lowest layer first: :mod:`.backend` (settings, the bounded NDIF backend, ``remote=`` routing; what the
model classes call), :mod:`.keys` (the server half of the model key, an in-process server), :mod:`.policy` (which
keys a server builds), :mod:`.helpers` (remote predict_action / lens / check: above the lens), :mod:`.server`
(NDIF-side glue; imports ray and ndif), :mod:`.stack` and :mod:`.sockets` (a loopback NDIF stack). Names load on
first use, so importing this package imports none of them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_BACKEND = (
    "API_KEY_VARS", "CONNECT_TIMEOUT_VAR", "DEFAULT_CONNECT_TIMEOUT", "DEFAULT_TIMEOUT", "HOST_VARS", "TIMEOUT_VAR",
    "NDIFBackend", "RemoteSettings", "Secret", "check_host", "redact", "refuse_stored_edits", "remote_backend",
    "remote_settings",
)
_KEYS = ("AUTO_DTYPE", "ServerSimulationBackend", "describe_checkpoint", "execute_request", "rebuild_from_key",
         "server_model")
_HELPERS = ("remote_check", "remote_lens_topk", "remote_predict_action")
_ERRORS = ("RemoteAuthError", "RemoteExecutionError", "RemoteJobError", "RemoteModelError", "RemoteTimeoutError",
           "RemoteUnreachableError")

_LAZY = {
    **{name: "nnsight_vla.remote.backend" for name in _BACKEND},
    **{name: "nnsight_vla.remote.keys" for name in _KEYS},
    **{name: "nnsight_vla.remote.helpers" for name in _HELPERS},
    **{name: "nnsight_vla.errors" for name in _ERRORS},
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nnsight_vla.remote' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = sorted(_LAZY)
