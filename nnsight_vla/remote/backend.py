"""The client side of remote execution: settings, the bounded NDIF backend, and ``remote=`` routing.

This is what the model classes call (``VLA._remote_backend``), so it imports no method, rollout or env module.
Every request is bounded (a connect/handshake timeout and a total deadline) and each failure has one error type
naming the host and quoting the server. The API key is a :class:`Secret`: it goes into the ``ndif-api-key``
header only, is removed from every message and log line, and cannot be pickled or JSON-encoded.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import httpx
import websocket
from nnsight import CONFIG
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import _NNSIGHT_VERSION, RemoteBackend, RemoteError
from nnsight.schema.response import ResponseModel
from nnsight.tracing.backend import Backend

from ..errors import (
    InputError,
    RemoteAuthError,
    RemoteExecutionError,
    RemoteJobError,
    RemoteModelError,
    RemoteTimeoutError,
    RemoteUnreachableError,
)

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
        elif "refused by this server's policy" in message:
            hint = " The server's operator decides which models it builds (docs/remote.md §6)."
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
        if value is not None and not isinstance(value, Secret):
            value = Secret(value) if value else None
        self.__dict__["_api_key"] = value

    def __repr__(self) -> str:
        return (
            f"NDIFBackend(host={self.host!r}, model_key={self.model_key!r}, api_key={'***' if self.api_key else None}, "
            f"connect_timeout={self.settings.connect_timeout:g}, timeout={self.settings.timeout:g})"
        )

    # -- helpers ---------------------------------------------------------------------------------------------

    def _redact(self, text: Any) -> str:
        return redact(text, self.api_key)

    def _headers(self) -> dict:
        headers = {
            "ndif-timestamp": repr(time.time()), "nnsight-version": _NNSIGHT_VERSION, "python-version": sys.version
        }
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
                    # control frames come back too: the server's keep-alive pings (uvicorn: every 20 s) must not
                    # keep one recv() reading past the deadline (recv() answers pings and reads on)
                    opcode, message = connection.recv_data(control_frame=True)
                except (websocket.WebSocketTimeoutException, TimeoutError):
                    self.display.refresh()
                    continue
                except (OSError, websocket.WebSocketException) as error:
                    raise self._unreachable(
                        f"the connection closed while waiting for job {self.remote_job_id} "
                        f"({type(error).__name__}: {error})"
                    ) from None
                if opcode in (websocket.ABNF.OPCODE_PING, websocket.ABNF.OPCODE_PONG):
                    continue
                if opcode == websocket.ABNF.OPCODE_CLOSE:
                    raise self._unreachable(f"the server closed the connection while waiting for job "
                                            f"{self.remote_job_id}")
                if opcode == websocket.ABNF.OPCODE_TEXT and isinstance(message, bytes):
                    message = message.decode("utf-8")
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

