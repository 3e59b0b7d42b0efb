"""Remote execution against a REAL NDIF server on this machine (slow suite).

    .venv/bin/python -m pytest -m slow tests/test_remote_server.py

The session fixture starts the whole stack on 127.0.0.1 with :mod:`nnsight_vla.remote.stack` (ndif 0.1.2's API under
gunicorn, Ray with the NDIF controller and CPU model actors, Redis from Debian, moto's S3), in its own state folder
and ports (base 18500), with nnsight_vla importable server-side from this checkout (PYTHONPATH) and the server's
default dtype set to bfloat16 (so every equality below also proves the model key's dtype wins). It stops everything
it started at the end; a stack already running on those ports is reused and left running.

Results are compared with the local run under ONE torch thread: the Ray model actor has one CPU, and continuous
outputs (pi0's flow matching) differ in the last bits between thread counts. Then every comparison is exact.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla import remote as rm
from nnsight_vla.remote import stack as ndif_stack
from nnsight_vla.errors import UnknownFamilyError

pytestmark = pytest.mark.slow

INSTRUCTION = "pick up the black bowl"
SECRET = "nvla-FAKE-key-51d0a7-do-not-leak"  # ndif without Postgres accepts any key
EXEC_TIMEOUT = 8  # the server's execution cap, seconds (short, so its error is tested quickly)
STACK_ENV = {
    "NVLA_NDIF_HOME": "/tmp/nvla-ndif-test",
    "NVLA_NDIF_PORT_BASE": "18500",
    "NVLA_NDIF_DTYPE": "bfloat16",
    "NVLA_NDIF_EXEC_TIMEOUT": str(EXEC_TIMEOUT),
    "NVLA_NDIF_PYTHONPATH": str(Path(__file__).resolve().parents[1]),
}
TIMINGS: dict = {}


@pytest.fixture(scope="session")
def ndif_server():
    saved = {name: os.environ.get(name) for name in STACK_ENV}
    os.environ.update(STACK_ENV)
    already_up = ndif_stack.status()["connected"]
    started = time.monotonic()
    try:
        state = ndif_stack.up(timeout=300)
    except ndif_stack.StackError as error:
        ndif_stack.down()
        pytest.fail(f"the NDIF stack did not start: {error}")
    TIMINGS["stack_up_s"] = state.get("startup_s", round(time.monotonic() - started, 1))
    TIMINGS["stack_reused"] = already_up
    yield state
    if not already_up:
        ndif_stack.down()
        assert not ndif_stack.status()["connected"]
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    print("\nremote server timings:", json.dumps(TIMINGS))


@pytest.fixture(scope="session")
def settings(ndif_server):
    from nnsight import CONFIG

    CONFIG.APP.REMOTE_LOGGING = False
    return rm.remote_settings(host=ndif_server["api_url"], api_key=SECRET, connect_timeout=10, timeout=240)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def openvla():
    return nv.tiny("openvla", seed=0)


@pytest.fixture(scope="session")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _steering(pairs, alpha):
    from nnsight_vla.steering import Steering

    return Steering(pairs, alpha=alpha)


def _no_secret(*texts):
    for text in texts:
        assert SECRET not in str(text)


def test_steered_predict_action_equals_local(settings, openvla, image, one_thread, caplog):
    caplog.set_level(logging.DEBUG)
    steer = _steering([(2, 3), (2, 7), (3, 11)], 8.0)
    kwargs = dict(restrict_to_action_tokens=True)
    local = rm.remote_predict_action(openvla, image, INSTRUCTION, steering=steer, remote=False, **kwargs)
    assert not np.array_equal(local, openvla.predict_action(image, INSTRUCTION, **kwargs))
    started = time.monotonic()
    remote = rm.remote_predict_action(openvla, image, INSTRUCTION, steering=steer, remote=settings, **kwargs)
    TIMINGS["openvla_first_request_s"] = round(time.monotonic() - started, 2)  # includes deploying the model
    assert np.array_equal(remote, local)
    warm = []
    for _ in range(3):
        started = time.monotonic()
        assert np.array_equal(
            rm.remote_predict_action(openvla, image, INSTRUCTION, steering=steer, remote=settings, **kwargs), local
        )
        warm.append(round(time.monotonic() - started, 3))
    TIMINGS["openvla_warm_request_s"] = warm
    # the server lists the deployment under our key, held with the server default dtype while computing in float32
    report = rm.remote_check(settings.host, run=False)
    assert openvla.model_key in report["deployed"]
    _no_secret(caplog.text, json.dumps(report))


def test_session_with_several_traces_equals_local(settings, openvla, image, one_thread):
    def run(how):
        with openvla.session(**how):
            with openvla.predict_action(image, INSTRUCTION):
                hidden = openvla.layers[1].output.save()
            with openvla.predict_action(image, "open the top drawer", restrict_to_action_tokens=True) as second:
                openvla.layers[1].output[:, -1, :] = hidden[:, -1, :]
                logits = list().save()
                for _ in second.iter[:7]:
                    logits.append(openvla.lm_head.output)
                action = second.result.save()
        return hidden, logits, action

    local = run({})
    started = time.monotonic()
    remote = run({"remote": settings})
    TIMINGS["openvla_session_s"] = round(time.monotonic() - started, 3)
    assert torch.equal(remote[0], local[0])
    assert len(remote[1]) == 7 and all(torch.equal(a, b) for a, b in zip(remote[1], local[1]))
    assert np.array_equal(remote[2], local[2])


def test_a_list_from_outside_the_block_stays_empty_on_the_server(settings, openvla, image):
    outside = []
    with openvla.predict_action(image, INSTRUCTION, remote=settings) as tracer:
        for _ in tracer.iter[:7]:
            outside.append(openvla.lm_head.output.save())
    assert outside == []  # as ServerSimulationBackend says (tests/test_remote.py), unlike remote="local"


def test_lens_topk_on_the_server(settings, openvla):
    ids, scores = rm.remote_lens_topk(openvla, k=5, remote=settings)
    rows = len(openvla.tokenizer)
    unembedding = openvla.unembedding()[:rows].detach()
    for layer in range(openvla.num_layers):
        top = torch.topk(unembedding @ openvla.value_vectors(layer).detach(), 5, dim=0)
        assert np.array_equal(ids[layer], top.indices.T.numpy())
        np.testing.assert_allclose(scores[layer], top.values.T.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["pi0", "pi0-fast"])
def test_other_families_steered_remotely(settings, family, one_thread):
    try:
        vla = nv.tiny(family, seed=0)
    except UnknownFamilyError as error:
        pytest.skip(str(error))
    images, state = rm._sample_inputs(vla, 0)
    steer = _steering([(0, 1), (1, 2)], 5.0)

    def first_forward(how, steered=True):
        with vla.predict_action(images, INSTRUCTION, state=state, **how) as tracer:
            for step in tracer.iter[:1]:
                if steered:
                    steer.edit_step(vla, step)
                act = vla.layers[-1].mlp.act.output.save()
            action = tracer.result.save()
        return act, action

    local_act, local_action = first_forward({})
    assert not torch.equal(local_act, first_forward({}, steered=False)[0])
    started = time.monotonic()
    act, action = first_forward({"remote": settings})
    TIMINGS[f"{family}_first_request_s"] = round(time.monotonic() - started, 2)
    assert torch.equal(act, local_act) and np.array_equal(action, local_action)
    whole = rm.remote_predict_action(vla, images, INSTRUCTION, state, steering=steer, remote=settings)
    assert np.array_equal(whole, rm.remote_predict_action(vla, images, INSTRUCTION, state, steering=steer,
                                                          remote=False))


# ------------------------------------------------------------------------------------------------------------------
# the server's own messages


def _run_error(fn, caplog):
    with pytest.raises(rm.RemoteExecutionError) as info:
        fn()
    _no_secret(str(info.value), repr(info.value), info.value.server_message, caplog.text)
    return info.value


def _trace_with_key(openvla, settings, model_key):
    backend = rm.NDIFBackend(model_key, settings)
    ids = torch.tensor([[1, 5, 9]])
    with openvla.trace(ids, fn=openvla._module.language_model.forward, backend=backend):
        out = openvla.lm_head.output.save()
    return out


def test_unknown_model_class(settings, openvla, caplog):
    caplog.set_level(logging.DEBUG)
    error = _run_error(lambda: _trace_with_key(openvla, settings, 'nnsight_vla.models.nope.Nope:{"family": "nope"}'),
                       caplog)
    assert isinstance(error, rm.RemoteModelError)
    assert "No module named 'nnsight_vla.models.nope'" in str(error) and settings.host in str(error)
    assert "install nnsight-vla" in str(error)


def test_unknown_checkpoint(settings, openvla, caplog):
    caplog.set_level(logging.DEBUG)
    key = 'nnsight_vla.models.openvla.OpenVLA:{"dtype": "auto", "family": "openvla", "revision": null, ' \
          '"source": "/nonexistent/openvla-ckpt"}'
    error = _run_error(lambda: _trace_with_key(openvla, settings, key), caplog)
    assert isinstance(error, rm.RemoteModelError) and "/nonexistent/openvla-ckpt does not exist" in str(error)


def test_job_error_quotes_the_servers_traceback(settings, openvla, image, caplog):
    caplog.set_level(logging.DEBUG)

    def bad():
        with openvla.predict_action(image, INSTRUCTION, remote=settings):
            openvla.layers[1].mlp.act.output[..., 10_000] = 0.0

    error = _run_error(bad, caplog)
    assert isinstance(error, rm.RemoteJobError)
    assert "IndexError: index 10000 is out of bounds" in str(error)
    assert "openvla.layers[1].mlp.act.output[..., 10000] = 0.0" in error.server_message  # the user's line


def test_client_deadline(openvla, ndif_server, caplog):
    caplog.set_level(logging.DEBUG)
    short = rm.remote_settings(host=ndif_server["api_url"], api_key=SECRET, connect_timeout=10, timeout=3)

    def slow():
        import time as clock

        with openvla.session(remote=short):
            for _ in range(60):  # short sleeps: a Python thread is only interruptible between them
                clock.sleep(0.1)

    started = time.monotonic()
    error = _run_error(slow, caplog)
    assert isinstance(error, rm.RemoteTimeoutError) and "within 3 s" in str(error)
    assert time.monotonic() - started < 10


def test_server_execution_timeout(settings, openvla, caplog):
    caplog.set_level(logging.DEBUG)

    def too_long():
        import time as clock

        with openvla.session(remote=settings):
            for _ in range(10 * (EXEC_TIMEOUT + 6)):
                clock.sleep(0.1)

    error = _run_error(too_long, caplog)
    assert isinstance(error, rm.RemoteTimeoutError)
    assert f"exceeded the execution timeout of {float(EXEC_TIMEOUT)}s" in str(error)
    # the replica survives and serves the next request
    ids = torch.tensor([[1, 5, 9]])
    with openvla.trace(ids, fn=openvla._module.language_model.forward, remote=settings):
        out = openvla.lm_head.output.save()
    assert out.shape[-1] == openvla.vocab_size
