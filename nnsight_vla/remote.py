"""Remote execution of nnsight-vla traces on an NDIF server: the client side.

    import nnsight_vla as nv
    vla = nv.load("openvla", "openvla/openvla-7b", dtype="bfloat16")     # meta on the client: no weights here
    with vla.predict_action(image, "pick up the bowl", remote=True) as tracer:   # host/key: NDIF_HOST, NDIF_API_KEY
        steer.edit(vla, tracer)
        action = tracer.result.save()

What travels: the block's source and the variables it reads, plus the model KEY (``vla.model_key``:
``"nnsight_vla.models.<family>.<Class>:{json}"`` with the family, checkpoint path or hub id, revision and dtype, or
for ``nv.tiny`` models the tiny config and seed). The server rebuilds the model from the key, so nnsight-vla must be
installed on every server node (``docs/remote.md``). The tokenizer and image processor are referenced as persistent
objects (the server's own), never shipped.

``remote=`` accepts ``True`` (the configured host), an ``http(s)://`` URL, a :class:`RemoteSettings`
(``remote_settings(host=..., timeout=...)``) or ``"local"`` (nnsight's offline simulation: serialised and run
here). Every real request is **bounded**: a connect/handshake timeout and a total deadline, with one error type per
failure (:class:`RemoteUnreachableError`, :class:`RemoteTimeoutError`, :class:`RemoteModelError`,
:class:`RemoteJobError`, :class:`RemoteAuthError`), each naming the host and quoting the server's message.

The API key is held in a :class:`Secret`: it goes into the ``ndif-api-key`` request header and nowhere else; it is
removed from every error message, log line and status line, and it cannot be pickled or JSON-encoded.

What does NOT travel: stored edits (``with steer.apply(vla):``; a remote trace inside one raises, use
``steer.edit(vla, tracer)`` in the block), and lists created outside the block (a server appends to a copy: create
them inside, ``out = list().save()``). nnsight's ``remote="local"`` misses the second; :class:`ServerSimulationBackend`
(offline, a separate model rebuilt from the key, run as an NDIF actor runs it) does not.

Also here: the server half of the key contract (:func:`rebuild_from_key`, :func:`describe_checkpoint`, called by the
model classes), whole-call helpers (:func:`remote_predict_action`, :func:`remote_lens_topk`) and
:func:`remote_check_cli`.

Client-side only: this module imports neither Ray nor ndif (the server shim is :mod:`nnsight_vla.remote_server`).
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
from nnsight.intervention.backends.remote import RemoteBackend, RemoteError
from nnsight.schema.response import ResponseModel
from nnsight.tracing.backend import Backend

from .errors import CheckpointError, InputError
from .errors import RemoteExecutionError, RemoteUnreachableError, RemoteTimeoutError, RemoteModelError, RemoteJobError, RemoteAuthError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

#: environment variables, first match wins (ours before nnsight's own)
HOST_VARS = ("NNSIGHT_VLA_HOST", "NDIF_HOST")
API_KEY_VARS = ("NNSIGHT_VLA_API_KEY", "NDIF_API_KEY")
CONNECT_TIMEOUT_VAR = "NNSIGHT_VLA_CONNECT_TIMEOUT"
TIMEOUT_VAR = "NNSIGHT_VLA_REMOTE_TIMEOUT"

#: seconds to open the connection and finish each handshake step (TCP, websocket upgrade, session id, POST)
DEFAULT_CONNECT_TIMEOUT = 10.0
#: seconds for a whole job, queueing and a cold model deploy included (a 7B checkpoint loads in minutes)
DEFAULT_TIMEOUT = 900.0

# how often the wait loop wakes to animate nnsight's status display
_REFRESH = 0.1


# ---------------------------------------------------------------------------------------------------------------
# configuration


class Secret:
    """A credential that never prints: ``repr``/``str`` show ``***``; :meth:`reveal` returns the value.

    Pickling and JSON encoding fail on purpose, so a key cannot end up in a saved result by accident.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = str(value)

    def reveal(self) -> str:
        """The raw value (only for the request header)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __bool__(self) -> bool:
        return bool(self._value)

    def __copy__(self) -> "Secret":
        return self

    def __deepcopy__(self, memo: dict) -> "Secret":
        return self

    def __reduce__(self):
        raise TypeError("an API key cannot be pickled (it must never be saved with results)")


@dataclass(frozen=True)
class RemoteSettings:
    """Where and how long to run remotely. Build with :func:`remote_settings`; pass as ``remote=`` to a trace.

    Attributes:
        host: base URL of the NDIF API (``http://`` or ``https://``, no trailing slash).
        api_key: the key as a :class:`Secret` (None: send no key).
        connect_timeout: seconds for each connection/handshake step.
        timeout: seconds for the whole job (queue, deploy, run, download).
        host_from: where ``host`` came from (argument, an environment variable, nnsight's config).
    """

    host: str
    api_key: Secret | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    timeout: float = DEFAULT_TIMEOUT
    host_from: str = "argument"

    def describe(self) -> dict:
        """A JSON-safe summary (the key only as "set"/"unset"), fit for logs and result files."""
        return {
            "host": self.host,
            "host_from": self.host_from,
            "api_key": "set" if self.api_key else "unset",
            "connect_timeout_s": self.connect_timeout,
            "timeout_s": self.timeout,
        }


def _from_env(names: tuple[str, ...]) -> tuple[str | None, str]:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value, name
    return None, ""


def _seconds(value: Any, what: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise InputError(f"{what} must be a positive, finite number of seconds, got {value!r}")
    return seconds


def check_host(host: Any, source: str = "host") -> str:
    """Validate an NDIF API URL (``http(s)://name[:port]``); return it without a trailing slash."""
    if not isinstance(host, str) or not host.startswith(("http://", "https://")) or len(host.split("://", 1)[1]) == 0:
        raise InputError(
            f"invalid NDIF host {host!r} (from {source}): it must be a URL starting with http:// or https://, "
            "e.g. http://127.0.0.1:8001 or https://api.ndif.us"
        )
    return host.rstrip("/")


def remote_settings(
    host: str | None = None,
    api_key: str | Secret | None = None,
    connect_timeout: float | None = None,
    timeout: float | None = None,
) -> RemoteSettings:
    """Resolve the remote configuration. Each value: the argument, else the environment, else nnsight's config.

    * host: ``NNSIGHT_VLA_HOST``, ``NDIF_HOST``, then ``nnsight.CONFIG.API.HOST``;
    * api_key: ``NNSIGHT_VLA_API_KEY``, ``NDIF_API_KEY``, then ``nnsight.CONFIG.API.APIKEY`` (may stay unset);
    * connect_timeout: ``NNSIGHT_VLA_CONNECT_TIMEOUT`` (default 10 s); timeout: ``NNSIGHT_VLA_REMOTE_TIMEOUT``
      (default 900 s).
    """
    from nnsight import CONFIG

    if host is not None:
        host_from = "argument"
    else:
        host, host_from = _from_env(HOST_VARS)
        if host is None:
            host, host_from = CONFIG.API.HOST, "nnsight CONFIG.API.HOST"
    host = check_host(host, host_from)

    if api_key is None:
        api_key, _ = _from_env(API_KEY_VARS)
        if api_key is None:
            api_key = CONFIG.API.APIKEY
    secret = api_key if isinstance(api_key, Secret) else (Secret(api_key) if api_key else None)

    if connect_timeout is None:
        connect_timeout = os.environ.get(CONNECT_TIMEOUT_VAR) or DEFAULT_CONNECT_TIMEOUT
    if timeout is None:
        timeout = os.environ.get(TIMEOUT_VAR) or DEFAULT_TIMEOUT
    return RemoteSettings(
        host=host,
        api_key=secret,
        connect_timeout=_seconds(connect_timeout, f"connect_timeout ({CONNECT_TIMEOUT_VAR})"),
        timeout=_seconds(timeout, f"timeout ({TIMEOUT_VAR})"),
        host_from=host_from,
    )


def redact(text: Any, secret: Secret | str | None) -> str:
    """``text`` with every occurrence of the secret replaced by ``***``."""
    text = str(text)
    value = secret.reveal() if isinstance(secret, Secret) else secret
    return text.replace(value, "***") if value else text


# ---------------------------------------------------------------------------------------------------------------
# errors


# the ndif 0.1.2 messages that tell deploy failures and server-side timeouts apart from errors in the block
_MODEL_MARKERS = ("Could not deploy this model", "Error starting model")
_SERVER_TIMEOUT_MARKERS = ("exceeded the execution timeout",)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _server_error(message: str, *, host: str, model_key: str, job_id: str | None) -> RemoteExecutionError:
    """Turn the text of a server-side ERROR status into the matching error type."""
    common = dict(host=host, model_key=model_key, server_message=message, job_id=job_id)
    if any(marker in message for marker in _MODEL_MARKERS):
        first = message.strip().splitlines()[0] if message.strip() else message
        hint = ""
        if "No module named" in message:
            hint = (
                " The server cannot import the model class: install nnsight-vla (same version as this client) on "
                "every server node, or put it on the server's PYTHONPATH (docs/remote.md)."
            )
        return RemoteModelError(
            f"the NDIF server at {host} could not deploy model {model_key}: {first}{hint}\n--- server message ---\n"
            f"{message}",
            **common,
        )
    if any(marker in message for marker in _SERVER_TIMEOUT_MARKERS):
        return RemoteTimeoutError(f"the NDIF server at {host} stopped the job: {message.strip()}", **common)
    return RemoteJobError(
        f"the job failed on the NDIF server at {host}: {_last_line(message)}\n--- server traceback ---\n{message}",
        **common,
    )


# ---------------------------------------------------------------------------------------------------------------
# the bounded backend


class NDIFBackend(RemoteBackend):
    """nnsight's ``RemoteBackend`` with bounds and clear errors (built for you by ``remote=`` on nnsight-vla models).

    * The websocket connect and upgrade, the session-id message and the HTTP submit each get
      ``settings.connect_timeout``; the whole job gets ``settings.timeout`` (checked between status messages, which
      the wait loop polls with a short socket timeout, so a server that goes silent cannot hang the caller).
    * Errors are mapped to :class:`RemoteUnreachableError` / :class:`RemoteTimeoutError` / :class:`RemoteModelError`
      / :class:`RemoteJobError` / :class:`RemoteAuthError`, naming the host and quoting the server.
    * The API key lives in a :class:`Secret` (``backend.api_key`` prints as ``***``) and is stripped from every
      message, log line and status line. A timed-out job may still run on the server: nnsight 0.8.1 has no cancel.
    """

    def __init__(
        self,
        model_key: str,
        settings: RemoteSettings,
        env: dict | None = None,
        blocking: bool = True,
        job_id: str | None = None,
        verbose: bool = False,
    ) -> None:
        self.settings = settings
        self.last_status: str | None = None
        self.last_description: str = ""
        self.remote_job_id: str | None = job_id
        key = settings.api_key.reveal() if settings.api_key else None
        super().__init__(model_key, host=settings.host, api_key=key, env=env, blocking=blocking, job_id=job_id,
                         verbose=verbose)

    # the parent assigns self.api_key; keep it wrapped so it never prints
    @property
    def api_key(self) -> Secret | None:
        return self.__dict__.get("_api_key")

    @api_key.setter
    def api_key(self, value: Any) -> None:
        self.__dict__["_api_key"] = value if isinstance(value, Secret) or value is None else (Secret(value) if value else None)

    def __repr__(self) -> str:
        return (
            f"NDIFBackend(host={self.host!r}, model_key={self.model_key!r}, api_key={'***' if self.api_key else None}, "
            f"connect_timeout={self.settings.connect_timeout:g}, timeout={self.settings.timeout:g})"
        )

    # -- helpers ---------------------------------------------------------------------------------------------

    def _redact(self, text: Any) -> str:
        return redact(text, self.api_key)

    def _headers(self) -> dict:
        from nnsight.intervention.backends.remote import _NNSIGHT_VERSION

        headers = {"ndif-timestamp": repr(time.time()), "nnsight-version": _NNSIGHT_VERSION, "python-version": sys.version}
        if self.api_key:
            headers["ndif-api-key"] = self.api_key.reveal()
        return headers

    def _remaining(self, deadline: float) -> float:
        return deadline - time.monotonic()

    def _error(self, cls: type, message: str, server_message: str | None = None) -> RemoteExecutionError:
        error = cls(
            self._redact(message),
            host=self.host,
            model_key=self.model_key,
            server_message=None if server_message is None else self._redact(server_message),
            job_id=self.remote_job_id,
        )
        log.warning("%s: %s", cls.__name__, _last_line(str(error)) or str(error))
        return error

    def _unreachable(self, reason: Any) -> RemoteExecutionError:
        return self._error(
            RemoteUnreachableError,
            f"cannot reach the NDIF server at {self.host}: {reason}. Check the host (NNSIGHT_VLA_HOST / NDIF_HOST) and "
            "that the server is running (`nnsight-vla remote check`).",
        )

    def _handshake_timeout(self, step: str) -> RemoteExecutionError:
        return self._error(
            RemoteTimeoutError,
            f"the NDIF server at {self.host} did not answer within {self.settings.connect_timeout:g} s ({step}); "
            f"is it an NDIF API and is it healthy? ({CONNECT_TIMEOUT_VAR} sets this bound)",
        )

    def _deadline_passed(self) -> RemoteExecutionError:
        status = f"last status {self.last_status}" if self.last_status else "no status received"
        detail = f": {self.last_description}" if self.last_description else ""
        return self._error(
            RemoteTimeoutError,
            f"no result from the NDIF server at {self.host} within {self.settings.timeout:g} s (job "
            f"{self.remote_job_id or '?'}, {status}{detail}). The job may still be running on the server; wait longer "
            f"with {TIMEOUT_VAR} or remote_settings(timeout=...).",
        )

    def _http_error(self, response: Any) -> RemoteExecutionError:
        detail: Any = None
        try:
            body = response.json()
            detail = body.get("detail") if isinstance(body, dict) else body
        except ValueError:
            detail = response.text or None
        detail = detail or response.reason_phrase
        code = response.status_code
        if code in (401, 403) or (code == 400 and "key" in str(detail).lower()):
            return self._error(
                RemoteAuthError,
                f"the NDIF server at {self.host} rejected the request (HTTP {code}): {detail}. Check the API key "
                "(NNSIGHT_VLA_API_KEY / NDIF_API_KEY).",
                str(detail),
            )
        if code in (502, 503, 504):
            return self._error(
                RemoteUnreachableError,
                f"the NDIF server at {self.host} is not ready (HTTP {code}): {detail}", str(detail),
            )
        return self._error(
            RemoteExecutionError, f"the NDIF server at {self.host} refused the request (HTTP {code}): {detail}",
            str(detail),
        )

    def _http_timeout(self, deadline: float | None, whole_deadline: bool = False) -> Any:
        # a handshake-like step (submit, poll) gets the connect timeout; a download may use what is left of the job
        import httpx

        step = self.settings.connect_timeout
        if deadline is not None:
            left = max(0.1, self._remaining(deadline))
            step = left if whole_deadline else min(step, left)
        return httpx.Timeout(self.settings.connect_timeout, read=step, write=step, pool=self.settings.connect_timeout)

    # -- status handling ---------------------------------------------------------------------------------------

    def note(self, response: ResponseModel) -> bool:
        # Strip the key before anything shows the message (nnsight's status display prints descriptions).
        if response.description:
            response.description = self._redact(response.description)
        self.last_status = getattr(response.status, "value", str(response.status))
        self.last_description = response.description or ""
        self.remote_job_id = response.id or self.remote_job_id
        log.debug("job %s: %s %s", response.id, self.last_status, _last_line(self.last_description))
        try:
            return super().note(response)
        except RemoteExecutionError:
            raise
        except RemoteError as error:
            classified = _server_error(
                self._redact(error), host=self.host, model_key=self.model_key, job_id=self.remote_job_id
            )
            log.warning("%s from %s: %s", type(classified).__name__, self.host, _last_line(str(error)))
            raise classified from None

    # -- transport (each step bounded) ----------------------------------------------------------------------

    def _post(self, request: Any, blob: bytes, deadline: float | None = None) -> ResponseModel:
        import httpx

        try:
            with httpx.Client(timeout=self._http_timeout(deadline)) as client:
                response = client.post(
                    f"{self.host}/request",
                    data={"data": request.metadata()},
                    files={"blob": ("request", blob, "application/octet-stream")},
                    headers=self._headers(),
                )
        except httpx.TimeoutException:
            raise self._handshake_timeout("submitting the request") from None
        except httpx.HTTPError as error:
            raise self._unreachable(f"{type(error).__name__}: {error}") from None
        if response.status_code >= 400:
            raise self._http_error(response) from None
        try:
            parsed = ResponseModel.model_validate_json(response.text)
        except ValueError:
            raise self._error(
                RemoteExecutionError,
                f"the server at {self.host} answered /request with something that is not an NDIF response "
                f"(HTTP {response.status_code}): {response.text[:300]!r}",
            ) from None
        self.remote_job_id = parsed.id
        return parsed

    def poll(self, tracer: Any = None) -> Any:
        """Non-blocking mode: one bounded status fetch for a submitted job (None while it still runs)."""
        import httpx

        headers = {"ndif-api-key": self.api_key.reveal()} if self.api_key else None
        try:
            with httpx.Client(timeout=self._http_timeout(None)) as client:
                response = client.get(f"{self.host}/response/{self.job_id}", headers=headers)
        except httpx.TimeoutException:
            raise self._handshake_timeout("polling the job status") from None
        except httpx.HTTPError as error:
            raise self._unreachable(f"{type(error).__name__}: {error}") from None
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            raise self._http_error(response) from None
        parsed = ResponseModel.model_validate_json(response.text)
        self.status = parsed.status
        return self.handle(parsed)

    def download_result(self, url: Any, deadline: float | None = None) -> Any:
        if isinstance(url, (bytes, bytearray)):
            return self.finalize(bytes(url))
        if not url:
            return None
        import httpx

        try:
            with httpx.Client(timeout=self._http_timeout(deadline, whole_deadline=True)) as client:
                response = client.get(url)
        except httpx.TimeoutException:
            raise self._deadline_passed() from None
        except httpx.HTTPError as error:
            raise self._unreachable(f"downloading the result failed ({type(error).__name__}: {error})") from None
        if response.status_code >= 400:
            raise self._http_error(response) from None
        return self.finalize(response.content)

    def request(self, request: Any, tracer: Any) -> Any:
        """Blocking mode: subscribe, submit, then wait for COMPLETED, every step bounded."""
        import websocket

        blob = self._serialize(tracer)
        deadline = time.monotonic() + self.settings.timeout
        started = time.monotonic()
        log.info("remote job for %s on %s (payload %d bytes)", self.model_key, self.host, len(blob))
        header = {"ndif-api-key": self.api_key.reveal()} if self.api_key else None
        try:
            connection = websocket.create_connection(
                f"{self.ws_host}/subscribe", header=header, timeout=self.settings.connect_timeout
            )
        except (websocket.WebSocketTimeoutException, TimeoutError):
            raise self._handshake_timeout("opening the /subscribe websocket") from None
        except websocket.WebSocketBadStatusException as error:
            raise self._unreachable(f"the websocket upgrade was refused (HTTP {error.status_code})") from None
        except (OSError, websocket.WebSocketException) as error:
            raise self._unreachable(f"{type(error).__name__}: {error}") from None
        try:
            try:
                connection.settimeout(self.settings.connect_timeout)
                request.session_id = json.loads(connection.recv())["session_id"]
            except (websocket.WebSocketTimeoutException, TimeoutError):
                raise self._handshake_timeout("waiting for the session id") from None
            except (OSError, websocket.WebSocketException, ValueError, KeyError, TypeError) as error:
                raise self._unreachable(f"no session id on /subscribe ({type(error).__name__}: {error})") from None

            response = self._post(request, blob, deadline)
            if self.note(response):
                return self.download_result(response.data, deadline)
            while True:
                remaining = self._remaining(deadline)
                if remaining <= 0:
                    raise self._deadline_passed()
                connection.settimeout(min(_REFRESH, remaining) if self.display.enabled else remaining)
                try:
                    message = connection.recv()
                except (websocket.WebSocketTimeoutException, TimeoutError):
                    self.display.refresh()
                    continue
                except (OSError, websocket.WebSocketException) as error:
                    raise self._unreachable(
                        f"the connection closed while waiting for job {self.remote_job_id} "
                        f"({type(error).__name__}: {error})"
                    ) from None
                response = self.parse(message)
                if self.note(response):
                    result = self.download_result(response.data, deadline)
                    log.info("remote job %s completed in %.2f s", self.remote_job_id, time.monotonic() - started)
                    return result
        finally:
            # a polite close waits for the server's close frame (3 s by default): keep that inside the bounds
            try:
                connection.close(timeout=min(1.0, self.settings.connect_timeout))
            except (OSError, websocket.WebSocketException):
                connection.shutdown()


# ---------------------------------------------------------------------------------------------------------------
# remote= routing (VLA._remote_backend calls this)


def refuse_stored_edits(model: Any) -> None:
    """Raise a clear error when ``model`` carries stored edits (``steer.apply``, ``vla.edit(inplace=True)``).

    They are client-side state: serialising them fails (their frames are gone) or, worse, the server's own model
    never has them, so a remote run would silently be unsteered.
    """
    if getattr(model, "_edits", None):
        raise InputError(
            "this model has stored edits (from `with steer.apply(vla):` or vla.edit(inplace=True)); they live in this "
            "process and do not travel to a remote server, so the remote run would silently be unsteered. Inside "
            "the remote trace call steer.edit(vla, tracer) instead (or nnsight_vla.remote.remote_predict_action("
            "vla, ..., steering=steer)), outside the apply() block."
        )


def remote_backend(model: Any, remote: Any, blocking: bool = True, job_id: str | None = None,
                   verbose: bool = False) -> Backend:
    """The backend for ``remote=`` on an nnsight-vla model: ``"local"`` -> nnsight's ``LocalSimulationBackend``;
    ``True`` / a URL / a :class:`RemoteSettings` -> :class:`NDIFBackend` with the resolved settings."""
    refuse_stored_edits(model)
    if isinstance(remote, str) and remote == "local":
        from nnsight.intervention.backends.local import LocalSimulationBackend

        return LocalSimulationBackend(model, verbose=verbose)
    if remote is True:
        settings = remote_settings()
    elif isinstance(remote, str):
        settings = remote_settings(host=check_host(remote, "remote="))
    elif isinstance(remote, RemoteSettings):
        settings = remote
    else:
        raise InputError(
            f"remote={remote!r} is not understood; use True (the configured host), 'local' (offline simulation), "
            "an http(s):// URL or nnsight_vla.remote.remote_settings(...)"
        )
    return NDIFBackend(model.to_model_key(), settings, env=model._remoteable_get_env(), blocking=blocking,
                       job_id=job_id, verbose=verbose)


# ---------------------------------------------------------------------------------------------------------------
# the server side of the model key (VLA._remoteable_from_model_key / _describe_checkpoint call these)

#: key fields every family has (families add their load options, e.g. pi0's camera_names, as further fields)
_KEY_FIELDS = ("source", "revision", "dtype", "tiny")
#: the key's dtype when none was asked for: the family's default for the source (the checkpoint's own dtype,
#: float32 for tiny models), reproduced server-side by building with dtype=None
AUTO_DTYPE = "auto"
# constructor arguments a key must not set (they are the server's business)
_SERVER_ONLY = {"self", "source", "dispatch", "device", "check", "kwargs", "args"}


def _family_options(cls: type) -> set[str]:
    """Load options a family's constructor takes by name, beyond the common ones (allowed as key fields)."""
    import inspect

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
    constructor (its load options, e.g. pi0's ``camera_names``).
    """
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
    count, config (for ``nnsight.status()``) and revision. Builds the structure only (no weights)."""
    from nnsight.modeling.mixins.remotable import CheckpointInfo, bytes_per_element

    data = json.loads(model_key)
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
    from nnsight.modeling.mixins.remotable import Remotable

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
    from nnsight.tracing.globals import BLOCKS, SOURCES

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
    import torch
    from nnsight.schema.request import RequestModel
    from nnsight.tracing.tracer import _saves, dec, inc

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
        import zstandard

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
        import torch
        import zstandard
        from nnsight.ndif import pull_env
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import save
        from nnsight.tracing.util import push

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


# ---------------------------------------------------------------------------------------------------------------
# convenience: whole calls that run remotely


def remote_predict_action(
    vla: Any,
    images: Any,
    instruction: str,
    state: Any = None,
    *,
    remote: Any = True,
    steering: Any = None,
    steps: int | None = None,
    backend: Backend | None = None,
    **kwargs: Any,
) -> np.ndarray:
    """``vla.predict_action(...)`` on the server (optionally steered there), returning the action.

    ``steering`` is a :class:`~nnsight_vla.steering.Steering` (or group), applied with ``steering.edit(vla, tracer,
    steps)`` inside the remote trace. ``remote`` as for any trace (True, a URL, :class:`RemoteSettings`, "local");
    ``backend`` overrides it (e.g. :class:`ServerSimulationBackend`). Other keyword arguments go to predict_action.
    """
    route = {"backend": backend} if backend is not None else {"remote": remote}
    with vla.predict_action(images, instruction, state=state, **route, **kwargs) as tracer:
        if steering is not None:
            steering.edit(vla, tracer, steps=steps)
        action = tracer.result.save()
    return action


def remote_lens_topk(
    vla: Any,
    k: int = 10,
    layers: Any = None,
    stack: str = "backbone",
    *,
    vocab_rows: int | None = None,
    remote: Any = True,
    backend: Backend | None = None,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The value-vector lens computed where the weights are: top-``k`` tokens of ``unembedding @ W_down[:, i]`` for
    every neuron of the chosen layers, as ``(ids, scores)`` arrays of shape ``(len(layers), d_mlp, k)``.

    Runs :func:`nnsight_vla.lens.project_topk` inside one remote session (on the server's GPU when it has one), so a
    client holding only the meta model gets the lens tables of a checkpoint it never downloads.
    ``vocab_rows`` limits the projection to the first rows of the unembedding (default: the tokenizer's size).
    """
    from .lens import project_topk

    num_layers = vla.stack_dims(stack)[0]
    layers = list(range(num_layers)) if layers is None else [vla.check_layer(layer, stack) for layer in layers]
    if vocab_rows is None:
        tokenizer = getattr(vla, "tokenizer", None)
        rows = vla.vocab_size
        vocab_rows = min(rows, len(tokenizer)) if tokenizer is not None else rows
    import nnsight

    route = {"backend": backend} if backend is not None else {"remote": remote}
    with vla.session(**route):
        weights = [vla.value_vectors(layer, stack) for layer in layers]
        ids, scores = project_topk(weights, vla.unembedding()[:vocab_rows], k, chunk_size=chunk_size, progress=False)
        nnsight.save(ids)
        nnsight.save(scores)
    return ids, scores


# ---------------------------------------------------------------------------------------------------------------
# a check a user or a lab can run (CLI: `nnsight-vla remote check`)


def _sample_inputs(vla: Any, seed: int = 0) -> tuple[dict, Any]:
    rng = np.random.default_rng(seed)
    images = {name: rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for name in vla.camera_names}
    state = None if vla.state_dim is None else rng.normal(size=vla.state_dim).astype(np.float32)
    return images, state


def _edited_action(vla: Any, route: dict, images: dict, state: Any) -> np.ndarray:
    # one edit on the first forward pass, so the check proves edits travel, for every family
    with vla.predict_action(images, "pick up the black bowl", state=state, **route) as tracer:
        vla.layers[-1].mlp.act.output[..., :4] = 4.0
        action = tracer.result.save()
    return action


def remote_check(
    host: str | None = None,
    *,
    family: str = "openvla",
    source: str | None = None,
    seed: int = 0,
    run: bool = True,
    simulate: bool = False,
    compare: bool | None = None,
) -> dict:
    """Check a remote setup end to end and return a JSON-safe report (the API key appears only as "set"/"unset").

    * ``simulate=True``: offline, no server: the edited ``predict_action`` goes through
      :class:`ServerSimulationBackend` (serialised, rebuilt from the key, executed as an NDIF actor would).
    * otherwise: resolves the settings (``host`` or the environment), asks the server's ``/status`` (bounded), and
      with ``run=True`` sends one edited ``predict_action`` of the model (``nv.tiny(family, seed)``, or
      ``nv.load(family, source)``) and, for tiny models or ``compare=True``, compares it with the local run.
    """
    from . import models

    report: dict = {"ok": False, "model": None}
    secret: Secret | None = None
    try:
        vla = models.load(family, source) if source else models.tiny(family, seed=seed)
        report["model"] = vla.model_key
        compare = source is None if compare is None else compare
        images, state = _sample_inputs(vla, seed)
        if simulate:
            started = time.monotonic()
            remote_action = _edited_action(vla, {"backend": ServerSimulationBackend(vla)}, images, state)
            report["simulated_s"] = round(time.monotonic() - started, 3)
        else:
            settings = remote_settings(host=host)
            secret = settings.api_key
            report["settings"] = settings.describe()
            report["deployed"] = _deployed_keys(settings)
            if not run:
                report["ok"] = True
                return report
            started = time.monotonic()
            remote_action = _edited_action(vla, {"remote": settings}, images, state)
            report["remote_s"] = round(time.monotonic() - started, 3)
        report["action"] = np.asarray(remote_action).tolist()
        if compare:
            local_action = _edited_action(vla, {}, images, state)
            report["equal_to_local"] = bool(np.array_equal(np.asarray(local_action), np.asarray(remote_action)))
            report["ok"] = report["equal_to_local"]
        else:
            report["ok"] = True
    except Exception as error:  # noqa: BLE001 - reported, not raised: this is a diagnostic
        report["error"] = {"type": type(error).__name__, "message": redact(error, secret)}
    return report


def _deployed_keys(settings: RemoteSettings) -> list[str]:
    """Model keys the server lists in ``/status`` (bounded by the connect timeout)."""
    import httpx

    headers = {"ndif-api-key": settings.api_key.reveal()} if settings.api_key else None
    timeout = httpx.Timeout(settings.connect_timeout, read=max(settings.connect_timeout, 30.0))
    try:
        response = httpx.get(f"{settings.host}/status", headers=headers, timeout=timeout)
    except httpx.TimeoutException:
        raise RemoteTimeoutError(
            f"the NDIF server at {settings.host} did not answer /status within {settings.connect_timeout:g} s",
            host=settings.host,
        ) from None
    except httpx.HTTPError as error:
        raise RemoteUnreachableError(
            redact(f"cannot reach the NDIF server at {settings.host}: {type(error).__name__}: {error}",
                   settings.api_key),
            host=settings.host,
        ) from None
    if response.status_code >= 400:
        raise RemoteUnreachableError(
            redact(f"the NDIF server at {settings.host} answered /status with HTTP {response.status_code}: "
                   f"{response.text[:300]}", settings.api_key),
            host=settings.host,
        )
    deployments = response.json().get("deployments", {}) if response.headers.get("content-type", "").startswith(
        "application/json") else {}
    return sorted({value.get("model_key") or name for name, value in deployments.items() if isinstance(value, dict)})


def remote_check_cli(
    host: str | None = None,
    family: str = "openvla",
    source: str | None = None,
    seed: int = 0,
    run: bool = True,
    simulate: bool = False,
) -> int:
    """Print :func:`remote_check`'s report as JSON; exit code 0 when it passed. Mountable as
    ``nnsight-vla remote check [--host URL] [--family F] [--source PATH] [--simulate] [--no-run]``."""
    report = remote_check(host, family=family, source=source, seed=seed, run=run, simulate=simulate)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1
