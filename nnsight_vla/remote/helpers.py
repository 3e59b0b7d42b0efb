"""Whole calls of the method that run remotely, and the end-to-end check behind ``nnsight-vla remote check``.

:func:`remote_predict_action` (steered on the server), :func:`remote_lens_topk` (the value-vector lens computed
where the weights are) and :func:`remote_check`. These sit above the lens and steering in the layers; the
backend they route through is :mod:`nnsight_vla.remote.backend`.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import nnsight
import numpy as np
from nnsight.tracing.backend import Backend

from .. import models
from ..errors import RemoteTimeoutError, RemoteUnreachableError
from ..lens import project_topk
from .backend import RemoteSettings, Secret, redact, remote_settings
from .keys import ServerSimulationBackend

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
    num_layers = vla.stack_dims(stack)[0]
    layers = list(range(num_layers)) if layers is None else [vla.check_layer(layer, stack) for layer in layers]
    if vocab_rows is None:
        tokenizer = getattr(vla, "tokenizer", None)
        rows = vla.vocab_size
        vocab_rows = min(rows, len(tokenizer)) if tokenizer is not None else rows
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
