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
from nnsight_vla.remote import helpers as remote_helpers
from nnsight_vla.remote import stack as ndif_stack
from nnsight_vla.errors import UnknownFamilyError

pytestmark = pytest.mark.slow

INSTRUCTION = "pick up the black bowl"
SECRET = "nvla-FAKE-key-51d0a7-do-not-leak"  # ndif without Postgres accepts any key
EXEC_TIMEOUT = 8  # the server's execution cap, seconds (short, so its error is tested quickly)
HOME = Path("/tmp/nvla-ndif-test")
ROOT = HOME / "checkpoints"  # the one checkpoint root this server's policy allows
TINY_CAP = 64 << 20  # the server's cap on tiny models (its default: 256 MiB)
STACK_ENV = {
    "NVLA_NDIF_HOME": str(HOME),
    "NVLA_SERVER_CHECKPOINT_ROOTS": str(ROOT),
    "NVLA_SERVER_MAX_TINY_BYTES": str(TINY_CAP),
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
    images, state = remote_helpers._sample_inputs(vla, 0)
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


def _server_logs():
    """Every log the stack wrote: its services' and Ray's (each worker's stdout and stderr)."""
    return "\n".join(path.read_text(errors="replace") for path in HOME.rglob("*")
                     if path.is_file() and path.suffix in (".log", ".out", ".err"))


def test_a_key_naming_any_module_is_refused_before_it_is_imported(settings, openvla, caplog):
    """`import this` prints the Zen of Python: before the policy, the controller imported whatever module a key
    named (running its top-level code) and only then failed; now the key is refused unimported."""
    caplog.set_level(logging.DEBUG)
    zen = "Beautiful is better than ugly"
    assert zen not in _server_logs()
    error = _run_error(lambda: _trace_with_key(openvla, settings, 'this.Zen:{"family": "openvla"}'), caplog)
    assert isinstance(error, rm.RemoteModelError) and settings.host in str(error)
    assert "model class 'this.Zen' is not served here" in str(error)
    assert "nnsight_vla.models.openvla.OpenVLA" in str(error) and "operator" in str(error)
    time.sleep(2)  # Ray flushes worker output to its log files
    assert zen not in _server_logs()
    nope = _run_error(lambda: _trace_with_key(openvla, settings, 'nnsight_vla.models.nope.Nope:{"family": "nope"}'),
                      caplog)
    assert "model class 'nnsight_vla.models.nope.Nope' is not served here" in str(nope)


def _checkpoint_key(source):
    return "nnsight_vla.models.openvla.OpenVLA:" + json.dumps(
        {"dtype": "auto", "family": "openvla", "revision": None, "source": source}, sort_keys=True)


def test_checkpoint_sources_are_refused_alike_and_an_allowed_one_is_served(settings, openvla, image, one_thread,
                                                                          caplog):
    """Outside the root, missing, `..`, a symlink out of the root: one message (before, a missing folder said
    "does not exist" and an existing one failed otherwise, so clients could map the server's disk)."""
    caplog.set_level(logging.DEBUG)
    (ROOT / "tiny").parent.mkdir(parents=True, exist_ok=True)
    if not (ROOT / "tiny" / "config.json").exists():
        openvla.save_pretrained(ROOT / "tiny")
    escape = ROOT / "escape"
    if not escape.is_symlink():
        escape.symlink_to("/etc")
    first_lines = set()
    for source in ["/etc", "/nonexistent/openvla-ckpt", str(ROOT / "missing"), f"{ROOT}/../logs", str(escape)]:
        error = _run_error(lambda source=source: _trace_with_key(openvla, settings, _checkpoint_key(source)), caplog)
        assert isinstance(error, rm.RemoteModelError)
        text = error.server_message.replace(repr(source), "<source>")
        assert f"{ROOT}" not in text.replace(source, "") and "exist" not in text
        first_lines.add(text.strip().splitlines()[0])
    assert len(first_lines) == 1, first_lines
    assert "is not a checkpoint this server serves" in first_lines.pop()
    # a checkpoint under the root deploys and computes what the client computes
    loaded = nv.load("openvla", ROOT / "tiny")
    local = rm.remote_predict_action(loaded, image, INSTRUCTION, remote=False)
    assert np.array_equal(rm.remote_predict_action(loaded, image, INSTRUCTION, remote=settings), local)


def test_an_oversized_tiny_model_is_refused_without_being_built(settings, openvla, caplog):
    """A ~540 MB tiny OpenVLA (float32) against the server's 64 MiB cap: measured on the meta device and refused
    within seconds (before, the controller built it with real weights to size it, then an actor built it again)."""
    caplog.set_level(logging.DEBUG)
    text = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8}
    key = "nnsight_vla.models.openvla.OpenVLA:" + json.dumps(
        {"dtype": "auto", "family": "openvla", "revision": None, "source": None,
         "tiny": {"config": {"text": text}, "seed": 0}}, sort_keys=True)
    started = time.monotonic()
    error = _run_error(lambda: _trace_with_key(openvla, settings, key), caplog)
    TIMINGS["oversized_tiny_refused_s"] = round(time.monotonic() - started, 2)
    assert isinstance(error, rm.RemoteModelError)
    assert f"exceeds this server's cap of {TINY_CAP / 2**20:,.1f} MiB" in str(error)
    assert TIMINGS["oversized_tiny_refused_s"] < 30


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


def test_every_service_of_the_stack_listens_on_loopback_only(ndif_server):
    """Last, once every model actor of this file exists: each socket any process of the stack listens on (Redis,
    S3, the API, gcs_server, raylet, agents, the controller and model actors) is on loopback. Before the fix
    gcs_server and raylet listened on all interfaces and the runtime-env agent on the external address."""
    import ipaddress

    import psutil

    sessions = ndif_stack._stack_sessions(ndif_stack._config())
    assert len(sessions) == len(ndif_stack.SERVICES)
    listeners = []
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        try:
            if os.getsid(conn.pid) in sessions:
                listeners.append((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    names = {name for _, _, name in listeners}
    assert {"redis-server", "gcs_server", "raylet"} <= names, names
    assert any("ModelDeployment" in name or "ModelActor" in name for name in names), names  # actors included

    def loopback(address):
        ip = ipaddress.ip_address(address)
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback

    exposed = sorted(entry for entry in listeners if not loopback(entry[0]))
    assert exposed == [], f"listening beyond loopback: {exposed}"
    assert ndif_stack.check_listeners(sessions) == []
