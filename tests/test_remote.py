"""Remote execution (default suite): every public path is remote-safe, the model key rebuilds the same model, the
client is bounded and names the host and the server's message, and the API key never leaks.

Remote-safety is checked two ways, each against the plain local run (torch.equal / np.array_equal):
* ``remote="local"``: nnsight's LocalSimulationBackend (serialised, user modules hidden, run here);
* :class:`ServerSimulationBackend`: deserialised against a SEPARATE model rebuilt from the key with the server's
  default dtype (bfloat16), run as an NDIF actor runs it, results back through torch.save.
Bad input runs over real loopback sockets: a closed port, a port that never answers, and a small protocol-level
NDIF stand-in (websocket upgrade + HTTP /request, scripted replies; its happy path executes the real request).
The real server is in tests/test_remote_server.py (slow suite).
"""

from __future__ import annotations

import base64
import copy
import email.parser
import hashlib
import io
import json
import logging
import pickle
import socket
import socketserver
import struct
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from nnsight.intervention.backends.remote import RemoteError
from nnsight.modeling.mixins.remotable import Remotable

import nnsight_vla as nv
from nnsight_vla import remote as rm
from nnsight_vla.remote import helpers as remote_helpers
from nnsight_vla.remote import keys as remote_keys
from nnsight_vla.errors import CheckpointError, InputError, UnknownFamilyError

INSTRUCTION = "pick up the black bowl"
SECRET = "nvla-FAKE-key-7f3c9e21-do-not-leak"


@pytest.fixture(scope="module")
def vla(tiny_openvla):
    tiny_openvla.clear_edits()
    return tiny_openvla


@pytest.fixture(scope="module")
def image(images):
    return images["a"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in (*rm.HOST_VARS, *rm.API_KEY_VARS, rm.CONNECT_TIMEOUT_VAR, rm.TIMEOUT_VAR):
        monkeypatch.delenv(name, raising=False)
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "APIKEY", None)
    monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", False)


def sim(vla, **kwargs):
    return rm.ServerSimulationBackend(vla, **kwargs)


def route(where, vla):
    """remote= or backend= for one of the three ways of running."""
    if where == "plain":
        return {}
    if where == "local":
        return {"remote": "local"}
    return {"backend": sim(vla)}


WAYS = ["local", "server-sim"]


# ------------------------------------------------------------------------------------------------------------------
# the model key


def test_openvla_key_names_family_class_dtype_and_tiny_spec(vla):
    path, _, suffix = vla.model_key.partition(":")
    assert path == "nnsight_vla.models.openvla.OpenVLA"
    data = json.loads(suffix)
    assert data == {"family": "openvla", "source": None, "revision": None, "dtype": "auto",
                    "tiny": {"seed": 0, "config": {}}}
    assert suffix == json.dumps(data, sort_keys=True)  # one spelling = one server deployment
    other = nv.tiny("openvla", seed=3, text={"num_hidden_layers": 2})
    tiny_spec = json.loads(other.model_key.partition(":")[2])["tiny"]
    assert tiny_spec == {"seed": 3, "config": {"text": {"num_hidden_layers": 2}}}


def _family_or_skip(family):
    try:
        return nv.models.get(family)
    except UnknownFamilyError as error:
        pytest.skip(f"{family} is not in this checkout yet ({error})")


def _params(model):
    return dict(model._module.named_parameters())


def test_key_rebuilds_identical_tiny_model_with_server_kwargs(vla):
    # exactly what ndif's actor passes; the key's dtype ("auto": the family default, float32 here) must win over
    # the server's default bfloat16
    server = Remotable.from_model_key(vla.model_key, dispatch=True, dtype="bfloat16", device="cpu",
                                      trust_remote_code=True)
    assert server is not vla and type(server) is type(vla)
    assert server.model_key == vla.model_key
    ours, theirs = _params(vla), _params(server)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert {p.dtype for p in theirs.values()} == {torch.float32}
    # the controller's sizing build (no dispatch) works too
    assert type(vla).from_model_key(vla.model_key, dispatch=False).d_mlp == vla.d_mlp


def test_key_of_checkpoint_is_absolute_and_rebuilds_same_weights(vla, tmp_path, monkeypatch):
    vla.save_pretrained(tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    loaded = nv.load("openvla", "ckpt", dtype="bfloat16")  # relative path, meta until the first run
    data = json.loads(loaded.model_key.partition(":")[2])
    assert data == {"family": "openvla", "source": str(tmp_path / "ckpt"), "revision": None, "dtype": "bfloat16"}
    monkeypatch.chdir("/")  # the server's working directory is elsewhere
    server = Remotable.from_model_key(loaded.model_key, dispatch=True, dtype="float32", device="cpu")
    reference = {k: v.to(torch.bfloat16) for k, v in _params(vla).items()}
    theirs = _params(server)
    assert all(torch.equal(reference[name], theirs[name]) for name in reference)
    assert server.model_key == loaded.model_key


def test_describe_checkpoint_sizes_in_the_dtype_the_key_loads(vla):
    n_params = sum(p.numel() for p in vla._module.parameters())
    n_elements = n_params + sum(b.numel() for b in vla._module.buffers())
    info = Remotable.describe_checkpoint(vla.model_key, "bfloat16")
    assert info.n_params == n_params
    # "auto" = the bytes the tiny model really holds (float32 weights), not 2 per element as the server asked
    assert info.size_bytes == sum(t.numel() * t.element_size() for t in [*vla._module.parameters(),
                                                                         *vla._module.buffers()])
    assert info.size_bytes >= 4 * n_params
    assert info.config._name_or_path == "tiny-openvla-seed0"
    assert json.loads(info.config.to_json_string())["model_type"] == "openvla"
    wide = nv.tiny("openvla", seed=0, dtype="float64")
    assert json.loads(wide.model_key.partition(":")[2])["dtype"] == "float64"
    assert Remotable.describe_checkpoint(wide.model_key, "bfloat16").size_bytes == 8 * n_elements


def test_family_load_options_travel_in_the_key():
    cls = _family_or_skip("pi0")
    model = cls(None, tiny={"seed": 0, "config": {}}, camera_names=["top", "left"])
    data = json.loads(model.model_key.partition(":")[2])
    assert data["camera_names"] == ["top", "left"]
    server = Remotable.from_model_key(model.model_key, dispatch=True, dtype="bfloat16", device="cpu")
    assert tuple(server.camera_names) == ("top", "left") and server.model_key == model.model_key


@pytest.mark.parametrize(
    "suffix, match",
    [
        ("not json", "not JSON"),
        ('["a"]', "JSON object"),
        ('{"family": "pi0", "source": null}', "family 'pi0'"),
        ('{"family": "openvla", "tiny": {"seed": 0}, "weights": 1}', "unknown field"),
    ],
)
def test_bad_keys_are_refused_clearly(suffix, match):
    with pytest.raises(CheckpointError, match=match):
        Remotable.from_model_key("nnsight_vla.models.openvla.OpenVLA:" + suffix, dispatch=False)


def test_placement_of_ndif_actor_arguments():
    assert remote_keys._placement(0, None, None) == "cuda:0"
    assert remote_keys._placement(3, None, None) == "cuda:3"
    assert remote_keys._placement("cpu", None, None) == "cpu"
    assert remote_keys._placement(None, None, None) is None
    assert remote_keys._placement(None, "balanced", {2: 80 << 30}) == "cuda:2"
    assert remote_keys._placement(None, {"": 1}, None) == "cuda:1"
    with pytest.raises(CheckpointError, match="ONE device"):
        remote_keys._placement(None, "balanced", {0: 1 << 30, 1: 1 << 30})


@pytest.mark.parametrize("family", ["openvla", "pi0", "pi0-fast"])
def test_every_family_key_round_trips_and_runs_remotely(family):
    """Generic over families (pi0 / pi0-fast run here as soon as their modules land)."""
    _family_or_skip(family)
    model = nv.tiny(family, seed=1)
    data = json.loads(model.model_key.partition(":")[2])
    assert data["family"] == family and data["tiny"]["seed"] == 1 and data["dtype"]
    server = Remotable.from_model_key(model.model_key, dispatch=True, dtype="bfloat16", device="cpu")
    ours, theirs = _params(model), _params(server)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    images, state = remote_helpers._sample_inputs(model, seed=2)

    def run(how, edit=True):
        with model.predict_action(images, INSTRUCTION, state=state, **how) as tracer:
            if edit:
                model.layers[0].mlp.act.output[..., :4] = 4.0
            down = model.layers[-1].mlp.down_proj.output.save()
            action = tracer.result.save()
        return down, action

    local_down, local_action = run({})
    assert not torch.equal(run({}, edit=False)[0], local_down), "the edit must reach the last layer"
    for how in ({"remote": "local"}, {"backend": rm.ServerSimulationBackend(model, server=server)}):
        down, action = run(how)
        assert torch.equal(down, local_down) and np.array_equal(action, local_action)


# ------------------------------------------------------------------------------------------------------------------
# what travels


class _RecordingUnpickler:
    """Unpickle a payload, recording which persistent ids it references (and resolving them to the server's)."""

    @staticmethod
    def ids(payload, persistent):
        from nnsight.intervention.serialization import CustomCloudUnpickler

        seen = []

        class Unpickler(CustomCloudUnpickler):
            def persistent_load(self, pid):
                seen.append(pid)
                return super().persistent_load(pid)

        Unpickler(io.BytesIO(payload), persistent).load()
        return seen


def test_tokenizer_and_processor_travel_as_references_not_values(vla, image):
    backend = sim(vla)
    with vla.predict_action(image, INSTRUCTION, backend=backend) as tracer:
        action = tracer.result.save()
    payload = backend.payload
    # the tokenizer's own pickle carries its vocabulary; the request does not
    assert b"<act_0>" in pickle.dumps(vla.tokenizer)
    assert b"<act_0>" not in payload
    assert len(payload) < 200_000
    ids = _RecordingUnpickler.ids(payload, rm.server_model(vla.model_key)._remoteable_persistent_objects())
    assert {"Tokenizer", "ImageProcessor", "Interleaver"} <= set(ids)
    assert action.shape == (7,)


# ------------------------------------------------------------------------------------------------------------------
# every public path, remote-safe (results equal the local run)


@pytest.mark.parametrize("way", WAYS)
def test_plain_predict_action(vla, image, way):
    local = vla.predict_action(image, INSTRUCTION)
    assert np.array_equal(rm.remote_predict_action(vla, image, INSTRUCTION, **route(way, vla)), local)


def _edited_run(vla, image, how):
    with vla.predict_action(image, INSTRUCTION, restrict_to_action_tokens=True, **how) as tracer:
        logits = list().save()  # created inside the block: a list from outside does not come back from a server
        for _ in tracer.iter[:7]:
            vla.layers[2].mlp.act.output[..., [3, 7, 11]] = 4.0
            logits.append(vla.lm_head.output)
        action = tracer.result.save()
    return action, logits


@pytest.mark.parametrize("way", WAYS)
def test_traced_edit_on_every_forward(vla, image, way):
    local_action, local_logits = _edited_run(vla, image, {})
    with vla.predict_action(image, INSTRUCTION, restrict_to_action_tokens=True) as tracer:
        plain = tracer.result.save()
    assert not np.array_equal(local_action, plain), "the edit must change the action, else this proves nothing"
    action, logits = _edited_run(vla, image, route(way, vla))
    assert len(logits) == len(local_logits) == 7
    assert np.array_equal(action, local_action)
    assert all(torch.equal(a, b) for a, b in zip(logits, local_logits))


def test_a_list_from_outside_the_block_stays_empty_on_a_server(vla, image):
    """Pinned because it differs from local runs (and nnsight's remote="local" does not show it): a server runs
    the block on a COPY of the list, and only values saved by name come back. The real server agrees
    (tests/test_remote_server.py)."""
    outside = []
    with vla.predict_action(image, INSTRUCTION, backend=sim(vla)) as tracer:
        for _ in tracer.iter[:7]:
            outside.append(vla.lm_head.output.save())
    assert outside == []


@pytest.fixture(scope="module")
def steer():
    from nnsight_vla.steering import Steering

    return Steering([(2, 3), (2, 7), (3, 11)], alpha=8.0)


@pytest.mark.parametrize("way", WAYS)
def test_steering_edit_inside_remote_trace(vla, image, steer, way):
    kwargs = dict(restrict_to_action_tokens=True)
    local = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote=False, **kwargs)
    unsteered = vla.predict_action(image, INSTRUCTION, **kwargs)
    assert not np.array_equal(local, unsteered)
    remote = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, **route(way, vla), **kwargs)
    assert np.array_equal(remote, local)


def test_stored_edits_cannot_travel_and_say_so(vla, image, steer):
    with steer.apply(vla):
        for how in ({"remote": "local"}, {"remote": "http://127.0.0.1:9"}, {"backend": sim(vla)}):
            with pytest.raises(InputError, match=r"steer\.edit\(vla, tracer\)"):
                with vla.predict_action(image, INSTRUCTION, **how) as tracer:
                    tracer.result.save()
    assert not vla._edits


def _session(vla, image, how):
    with vla.session(**how):
        with vla.predict_action(image, INSTRUCTION):
            hidden = vla.layers[1].output.save()
        with vla.predict_action(image, "open the top drawer") as second:
            vla.layers[1].output[:, -1, :] = hidden[:, -1, :]
            logits = vla.lm_head.output.save()
            action = second.result.save()
    return hidden, logits, action


@pytest.mark.parametrize("way", WAYS)
def test_session_batching_two_traces(vla, image, way):
    hidden, logits, action = _session(vla, image, {})
    with vla.predict_action(image, "open the top drawer"):
        unpatched = vla.lm_head.output.save()
    assert not torch.equal(logits, unpatched), "the patch must matter"
    r_hidden, r_logits, r_action = _session(vla, image, route(way, vla))
    assert torch.equal(r_hidden, hidden) and torch.equal(r_logits, logits) and np.array_equal(r_action, action)


@pytest.mark.parametrize("way", WAYS)
def test_language_model_trace_with_fn(vla, way):
    ids = torch.tensor([[1, 5, 9, 200, 31]])

    def run(how):
        with vla.trace(ids, fn=vla._module.language_model.forward, **how):
            vla.layers[0].mlp.act.output[..., :8] = 0.0
            out = vla.lm_head.output.save()
        return out

    assert torch.equal(run(route(way, vla)), run({}))


def _reference_topk(model, k, rows):
    unembedding = model.unembedding()[:rows].detach()
    return [
        torch.topk(unembedding @ model.value_vectors(layer).detach(), k, dim=0) for layer in range(model.num_layers)
    ]


@pytest.mark.parametrize("way", WAYS)
def test_lens_topk_runs_where_the_weights_are(vla, way):
    rows = len(vla.tokenizer)
    ids, scores = rm.remote_lens_topk(vla, k=5, **route(way, vla))
    assert ids.shape == (vla.num_layers, vla.d_mlp, 5)
    for layer, top in enumerate(_reference_topk(vla, 5, rows)):
        assert np.array_equal(ids[layer], top.indices.T.numpy())
        np.testing.assert_allclose(scores[layer], top.values.T.numpy(), rtol=1e-6, atol=1e-6)


def test_lens_reads_the_servers_weights_not_the_clients(vla):
    other = nv.tiny("openvla", seed=5)
    ids, _ = rm.remote_lens_topk(vla, k=3, layers=[1], backend=sim(vla, server=other))
    theirs = _reference_topk(other, 3, len(vla.tokenizer))[1].indices.T.numpy()
    ours = _reference_topk(vla, 3, len(vla.tokenizer))[1].indices.T.numpy()
    assert np.array_equal(ids[0], theirs) and not np.array_equal(ids[0], ours)


def test_direct_call_with_remote_refuses_before_loading_weights(vla, tmp_path, image):
    vla.save_pretrained(tmp_path / "ckpt")
    meta = nv.load("openvla", str(tmp_path / "ckpt"))
    assert not meta.dispatched
    with pytest.raises(InputError, match="need a trace"):
        meta.predict_action(image, INSTRUCTION, remote="local")
    assert not meta.dispatched


def test_bad_remote_argument(vla, image):
    for bad in ("ftp://host", 42):
        with pytest.raises(InputError, match="remote=|invalid NDIF host"):
            with vla.predict_action(image, INSTRUCTION, remote=bad) as tracer:
                tracer.result.save()


def test_remote_check_offline():
    from typer.testing import CliRunner

    from nnsight_vla.cli import app

    result = CliRunner().invoke(app, ["remote", "check", "--simulate"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"] and report["equal_to_local"]


# ------------------------------------------------------------------------------------------------------------------
# configuration and secrets


def test_settings_resolution_order(monkeypatch):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.API, "HOST", "https://config.example")
    monkeypatch.setattr(CONFIG.API, "APIKEY", "config-key-123456")
    s = rm.remote_settings()
    assert (s.host, s.host_from, s.api_key.reveal()) == ("https://config.example", "nnsight CONFIG.API.HOST",
                                                         "config-key-123456")
    monkeypatch.setenv("NDIF_HOST", "http://ndif.example:8001/")
    monkeypatch.setenv("NDIF_API_KEY", "ndif-key-123456")
    s = rm.remote_settings()
    assert (s.host, s.host_from, s.api_key.reveal()) == ("http://ndif.example:8001", "NDIF_HOST", "ndif-key-123456")
    monkeypatch.setenv("NNSIGHT_VLA_HOST", "http://ours.example")
    monkeypatch.setenv("NNSIGHT_VLA_API_KEY", "ours-key-123456")
    monkeypatch.setenv("NNSIGHT_VLA_CONNECT_TIMEOUT", "2.5")
    monkeypatch.setenv("NNSIGHT_VLA_REMOTE_TIMEOUT", "30")
    s = rm.remote_settings()
    assert (s.host, s.api_key.reveal(), s.connect_timeout, s.timeout) == ("http://ours.example", "ours-key-123456",
                                                                          2.5, 30.0)
    s = rm.remote_settings(host="https://arg.example", api_key="arg-key-123456", timeout=5)
    assert (s.host, s.host_from, s.api_key.reveal(), s.timeout) == ("https://arg.example", "argument",
                                                                    "arg-key-123456", 5.0)


def test_bad_settings_name_their_source(monkeypatch):
    monkeypatch.setenv("NDIF_HOST", "localhost:8001")
    with pytest.raises(InputError, match="from NDIF_HOST"):
        rm.remote_settings()
    with pytest.raises(InputError, match="NNSIGHT_VLA_REMOTE_TIMEOUT"):
        rm.remote_settings(host="http://h", timeout=-1)
    monkeypatch.setenv("NNSIGHT_VLA_CONNECT_TIMEOUT", "soon")
    with pytest.raises(InputError, match="NNSIGHT_VLA_CONNECT_TIMEOUT"):
        rm.remote_settings(host="http://h")


def test_secret_never_prints_or_serialises():
    settings = rm.remote_settings(host="http://h", api_key=SECRET)
    for text in (repr(settings), str(settings), json.dumps(settings.describe()), repr(settings.api_key),
                 str(settings.api_key), f"{settings.api_key}", repr(copy.deepcopy(settings))):
        assert SECRET not in text
    with pytest.raises(TypeError):
        pickle.dumps(settings)
    with pytest.raises(TypeError):
        json.dumps({"key": settings.api_key})
    backend = rm.NDIFBackend("m:{}", settings)
    assert SECRET not in repr(backend) and SECRET not in repr(vars(backend)) and SECRET not in repr(backend.api_key)
    assert backend._headers()["ndif-api-key"] == SECRET  # sent where it belongs


# ------------------------------------------------------------------------------------------------------------------
# bad input over real sockets


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bounded(fn, limit):
    """Run ``fn`` on a thread; fail the test (instead of hanging it) when it is still running after ``limit`` s."""
    outcome = {}

    def body():
        started = time.monotonic()
        try:
            outcome["value"] = fn()
        except BaseException as error:  # noqa: BLE001
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(limit)
    assert not worker.is_alive(), f"the remote call hung for more than {limit} s"
    return outcome


def _ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    header = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        header += bytes([n])
    elif n < 1 << 16:
        header += bytes([126]) + struct.pack(">H", n)
    else:
        header += bytes([127]) + struct.pack(">Q", n)
    return header + payload


class FakeNDIF:
    """A protocol-level stand-in for an NDIF API on 127.0.0.1 (real sockets; the client is nnsight's + ours).

    modes: "silent" (accepts TCP, never answers), "no-session" (websocket upgrade, then nothing), "script"
    (session id; POST /request answered with ``post``; then the websocket sends ``messages``, or when
    ``execute_on`` is a model, runs the real request on it and sends COMPLETED with the result).
    """

    def __init__(self, mode="script", post=(200, {"id": "job-1", "status": "RECEIVED",
                                               "description": "Your job has been received."}),
                 messages=(), execute_on=None, ping_every=None):
        self.mode, self.post, self.messages, self.execute_on = mode, post, list(messages), execute_on
        self.ping_every = ping_every  # seconds between websocket pings after the messages (uvicorn: 20 s)
        self.stop = threading.Event()
        self.posted = threading.Event()
        self.headers_seen: list[dict] = []
        self.result = None
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                fake._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def _read_head(sock):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None, {}, b""
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return lines[0], headers, rest

    def _handle(self, sock):
        if self.mode == "silent":
            self.stop.wait(60)
            return
        line, headers, rest = self._read_head(sock)
        if line is None:
            return
        self.headers_seen.append(headers)
        if line.startswith("GET /subscribe"):
            accept = base64.b64encode(
                hashlib.sha1((headers["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
            ).decode()
            sock.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Accept: {accept}\r\n\r\n").encode())
            if self.mode == "no-session":
                self.stop.wait(60)
                return
            sock.sendall(_ws_frame(json.dumps({"session_id": "session-1"}).encode()))
            if not self.posted.wait(30):
                return
            for message in self.messages:
                sock.sendall(_ws_frame(json.dumps(message).encode()))
            if self.result is not None:
                sock.sendall(_ws_frame(self.result, opcode=0x2))
            while self.ping_every and not self.stop.wait(self.ping_every):
                try:
                    sock.sendall(_ws_frame(b"keep-alive", opcode=0x9))
                except OSError:
                    return
            self.stop.wait(60)
        elif line.startswith("POST /request"):
            length = int(headers.get("content-length", 0))
            while len(rest) < length:
                rest += sock.recv(65536)
            if self.execute_on is not None:
                self.result = self._execute(headers["content-type"], rest)
            status, body = self.post
            payload = json.dumps(body).encode()
            sock.sendall((f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
                          "\r\nConnection: close\r\n\r\n").encode() + payload)
            self.posted.set()

    def _execute(self, content_type, body):
        from nnsight.schema.response import ResponseModel, Status

        message = email.parser.BytesParser().parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
        parts = {part.get_param("name", header="content-disposition"): part.get_payload(decode=True)
                 for part in message.get_payload()}
        envelope = json.loads(parts["data"])
        outcome = {}
        worker = threading.Thread(target=lambda: outcome.update(
            data=rm.execute_request(parts["blob"], self.execute_on, compress=envelope["compress"])))
        worker.start()
        worker.join()
        return ResponseModel(id="job-1", status=Status.COMPLETED, description="done", data=outcome["data"]).pickle()


@contextmanager
def fake_ndif(**kwargs):
    server = FakeNDIF(**kwargs)
    try:
        yield server
    finally:
        server.close()


def _remote_action(vla, image, settings):
    with vla.predict_action(image, INSTRUCTION, remote=settings) as tracer:
        action = tracer.result.save()
    return action


def _assert_no_secret(error, caplog, *extra):
    texts = [str(error), repr(error), str(getattr(error, "server_message", "")), caplog.text, *extra]
    for text in texts:
        assert SECRET not in text


def test_unreachable_closed_port_fails_fast_and_names_host(vla, image, caplog):
    caplog.set_level(logging.DEBUG)
    settings = rm.remote_settings(host=f"http://127.0.0.1:{_free_port()}", api_key=SECRET)
    outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert isinstance(error, rm.RemoteUnreachableError) and isinstance(error, RemoteError)
    assert settings.host in str(error) and "refused" in str(error).lower()
    assert outcome["seconds"] < 5
    _assert_no_secret(error, caplog)


def test_check_report_is_safe_to_save(monkeypatch, tmp_path):
    monkeypatch.setenv("NDIF_API_KEY", SECRET)
    report = rm.remote_check(f"http://127.0.0.1:{_free_port()}")
    assert not report["ok"] and report["error"]["type"] == "RemoteUnreachableError"
    assert report["settings"]["api_key"] == "set"
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert SECRET not in path.read_text()


def test_host_that_never_answers_is_bounded_by_connect_timeout(vla, image, caplog):
    caplog.set_level(logging.DEBUG)
    with fake_ndif(mode="silent") as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=1.0)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert isinstance(error, rm.RemoteTimeoutError) and isinstance(error, TimeoutError)
    assert server.url in str(error) and "1 s" in str(error)
    assert outcome["seconds"] < 8
    _assert_no_secret(error, caplog)


def test_websocket_without_session_id_is_bounded(vla, image, caplog):
    with fake_ndif(mode="no-session") as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=1.0)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    assert isinstance(outcome["error"], rm.RemoteTimeoutError) and "session id" in str(outcome["error"])
    assert outcome["seconds"] < 8


def test_total_deadline_when_the_job_never_finishes(vla, image, caplog):
    caplog.set_level(logging.DEBUG)
    with fake_ndif(messages=[{"id": "job-1", "status": "QUEUED", "description": "Added to Queue at position 3."}]) \
            as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=2.0, timeout=2.0)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert isinstance(error, rm.RemoteTimeoutError)
    assert "within 2 s" in str(error) and "job-1" in str(error) and "QUEUED" in str(error)
    assert 1.5 < outcome["seconds"] < 8
    assert server.headers_seen[-1].get("ndif-api-key") == SECRET  # the key went where it belongs...
    _assert_no_secret(error, caplog)  # ...and nowhere else


def test_total_deadline_holds_while_the_server_keeps_pinging(vla, image, caplog):
    """ndif's API (uvicorn) pings the websocket every 20 s; a job that never finishes must still end at the
    deadline (before, recv() answered each ping and read on, so the client waited forever)."""
    caplog.set_level(logging.DEBUG)
    with fake_ndif(messages=[{"id": "job-1", "status": "QUEUED", "description": "Added to Queue at position 1."}],
                   ping_every=0.3) as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=2.0, timeout=2.0)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert isinstance(error, rm.RemoteTimeoutError) and "within 2 s" in str(error)
    assert 1.5 < outcome["seconds"] < 8


def test_rejected_key_is_redacted_from_the_servers_echo(vla, image, caplog):
    # ndif with Postgres auth answers a malformed key with HTTP 400 "Invalid API key format: '<key>'"
    caplog.set_level(logging.DEBUG)
    with fake_ndif(post=(400, {"detail": f"Invalid API key format: '{SECRET}'"})) as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=2.0, timeout=10)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert isinstance(error, rm.RemoteAuthError)
    assert "Invalid API key format: '***'" in str(error) and server.url in str(error)
    _assert_no_secret(error, caplog)


def test_service_unavailable(vla, image):
    detail = "Service temporarily unavailable: compute backend is reconnecting."
    with fake_ndif(post=(503, {"detail": detail})) as server:
        settings = rm.remote_settings(host=server.url, connect_timeout=2.0, timeout=10)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    assert isinstance(outcome["error"], rm.RemoteUnreachableError) and detail in str(outcome["error"])


@pytest.mark.parametrize(
    "description, kind, expected",
    [
        ("Could not deploy this model. No module named 'nnsight_vla'\nTraceback ...", rm.RemoteModelError,
         "install nnsight-vla"),
        ("Error starting model. Please try again later.", rm.RemoteModelError, "could not deploy model"),
        ("Your job exceeded the execution timeout of 5.0s.", rm.RemoteTimeoutError, "exceeded the execution timeout"),
        (f"Traceback (most recent call last):\n  File \"x\", line 3\n    key = '{SECRET}'\n"
         "IndexError: index 10000 is out of bounds for dimension 0 with size 128", rm.RemoteJobError,
         "IndexError: index 10000"),
    ],
)
def test_server_errors_are_typed_and_quote_the_server(vla, image, caplog, capsys, monkeypatch, description, kind,
                                                       expected):
    from nnsight import CONFIG

    monkeypatch.setattr(CONFIG.APP, "REMOTE_LOGGING", True)  # nnsight's status display prints descriptions
    caplog.set_level(logging.DEBUG)
    messages = [{"id": "job-1", "status": "RUNNING", "description": "Your job has started running."},
                {"id": "job-1", "status": "ERROR", "description": description}]
    with fake_ndif(messages=messages) as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=2.0, timeout=10)
        outcome = bounded(lambda: _remote_action(vla, image, settings), 30)
    error = outcome["error"]
    assert type(error) is kind and expected in str(error) and server.url in str(error)
    assert error.server_message and error.job_id == "job-1" and error.model_key == vla.model_key
    _assert_no_secret(error, caplog, capsys.readouterr().out)


def test_happy_path_over_sockets_equals_local(vla, image, steer, caplog):
    caplog.set_level(logging.DEBUG)
    local = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote=False)
    server_side = rm.server_model(vla.model_key)
    with fake_ndif(execute_on=server_side) as server:
        settings = rm.remote_settings(host=server.url, api_key=SECRET, connect_timeout=2.0, timeout=30)
        outcome = bounded(lambda: rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote=settings),
                          60)
    assert "error" not in outcome, outcome.get("error")
    assert np.array_equal(outcome["value"], local)
    assert server.headers_seen[-1].get("ndif-api-key") == SECRET
    assert SECRET not in caplog.text


# ------------------------------------------------------------------------------------------------------------------
# the server's policy on client-chosen model keys (nnsight_vla.remote.policy; the real server: test_remote_server)

OPENVLA = "nnsight_vla.models.openvla.OpenVLA"


def _key(cls=OPENVLA, **fields):
    data = {"family": "openvla", "source": None, "revision": None, "dtype": "auto", **fields}
    return f"{cls}:{json.dumps(data, sort_keys=True)}"


def test_policy_refuses_a_class_before_importing_it():
    import sys

    from nnsight_vla.remote.policy import ServerPolicy

    assert "this" not in sys.modules  # `import this` prints the Zen of Python: a module that acts on import
    with pytest.raises(CheckpointError, match=r"model class 'this\.Zen' is not served here.*OpenVLA"):
        ServerPolicy().admit('this.Zen:{"tiny": {"seed": 0}}')
    assert "this" not in sys.modules
    for bad in ("no colon", "x" * 70000, 'nnsight_vla.models.openvla.OpenVLA:["a"]', f"{OPENVLA}:not json"):
        with pytest.raises(CheckpointError, match="refused by this server's policy"):
            ServerPolicy().admit(bad)
    assert ServerPolicy().admit(_key(tiny={"seed": 0, "config": {}})).tiny


def test_policy_refuses_every_unlisted_source_with_one_message(tmp_path):
    """A client must not learn which paths exist: outside the roots, missing, `..`, a symlink out of a root, the
    root's parent, a relative path, an unlisted hub id -- one message, only the echoed source differs."""
    from nnsight_vla.remote.policy import ServerPolicy

    root = tmp_path / "checkpoints"
    (root / "ckpt").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (root / "escape").symlink_to(tmp_path / "secret")
    policy = ServerPolicy(checkpoint_roots=(str(root),), hub_ids=("openvla/*",))
    assert not policy.admit(_key(source=str(root / "ckpt"))).tiny
    assert policy.admit(_key(source="openvla/openvla-7b", revision="main")).fields["source"] == "openvla/openvla-7b"
    refused = ["/etc", str(tmp_path / "secret"), "/nonexistent/openvla-ckpt", str(root / "missing"),
               f"{root}/../secret", f"{root}/ckpt/../ckpt", str(root / "escape"), str(tmp_path), "ckpt",
               "./checkpoints/ckpt", "someone/else", "openvla/../x", "", 7]
    messages = set()
    for source in refused:
        with pytest.raises(CheckpointError) as info:
            policy.admit(_key(source=source))
        messages.add(str(info.value).replace(repr(source), "<source>"))
    assert len(messages) == 1, messages
    (message,) = messages
    assert "source <source> is not a checkpoint this server serves" in message
    assert str(root) not in message and "exist" not in message
    with pytest.raises(CheckpointError, match="revision"):
        policy.admit(_key(source="openvla/openvla-7b", revision="../../x"))
    with pytest.raises(CheckpointError, match="not both"):
        policy.admit(_key(source=str(root / "ckpt"), tiny={"seed": 0}))
    with pytest.raises(CheckpointError, match="no checkpoint and no tiny model"):
        policy.admit(_key())
    language_model = "nnsight.modeling.language.LanguageModel"  # nnsight's HuggingFace keys name it repo_id
    with pytest.raises(CheckpointError, match="'/etc' is not a checkpoint this server serves"):
        ServerPolicy(model_classes=(language_model,)).admit(f'{language_model}:{{"repo_id": "/etc"}}')


def test_policy_from_environment_and_file(tmp_path):
    from nnsight_vla.remote.policy import ServerPolicy

    assert ServerPolicy.from_env({}) == ServerPolicy()
    file = tmp_path / "policy.json"
    file.write_text(json.dumps({"hub_ids": ["openvla/*"], "max_bytes": 1 << 30}))
    policy = ServerPolicy.from_env({"NVLA_SERVER_POLICY": str(file), "NVLA_SERVER_MAX_TINY_BYTES": "1024",
                                    "NVLA_SERVER_CHECKPOINT_ROOTS": f"{tmp_path}:/data/ckpt"})
    assert policy.hub_ids == ("openvla/*",) and policy.max_bytes == 1 << 30 and policy.max_tiny_bytes == 1024
    assert policy.checkpoint_roots == (str(tmp_path), "/data/ckpt")
    assert ServerPolicy.from_env({"NVLA_SERVER_MODEL_CLASSES": f"{OPENVLA}, x.Y"}).model_classes == (OPENVLA, "x.Y")
    for env, match in [({"NVLA_SERVER_POLICY": str(tmp_path / "missing.json")}, "unreadable"),
                       ({"NVLA_SERVER_MAX_BYTES": "lots"}, "number of bytes"),
                       ({"NVLA_SERVER_MAX_BYTES": "0"}, "positive"),
                       ({"NVLA_SERVER_CHECKPOINT_ROOTS": "relative/dir"}, "absolute")]:
        with pytest.raises(CheckpointError, match=match):
            ServerPolicy.from_env(env)
    file.write_text(json.dumps({"hub_id": ["typo"]}))
    with pytest.raises(CheckpointError, match="fields among"):
        ServerPolicy.from_env({"NVLA_SERVER_POLICY": str(file)})


# ~270M parameters: a 1.07 GB tiny OpenVLA in float32 (the audit's key pushed a head node to 1.57 GB)
BIG_TINY = {"seed": 0, "config": {"text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 16}}}


def test_tiny_model_size_is_measured_without_weights_and_capped():
    """describe_checkpoint (what the controller runs) sizes a 1.07 GB tiny key on the meta device: the process
    grows by far less than the model; rebuild_from_key with the server's policy refuses it before building.
    Run in a fresh process so its peak memory is this check's alone."""
    import subprocess
    import sys

    code = f"""
import json, resource
from nnsight_vla.models.openvla import OpenVLA
from nnsight_vla.remote.keys import describe_checkpoint, rebuild_from_key
from nnsight_vla.remote.policy import ServerPolicy
from nnsight_vla.errors import CheckpointError
suffix = {_key(tiny=BIG_TINY).partition(":")[2]!r}
OpenVLA(None, tiny={{"seed": 0, "config": {{}}}}, check=False)  # imports and first-use allocations, once
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = describe_checkpoint(OpenVLA, suffix, "bfloat16").size_bytes
try:
    rebuild_from_key(OpenVLA, suffix, dispatch=True, dtype="bfloat16", device="cpu", policy=ServerPolicy())
    refused = ""
except CheckpointError as error:
    refused = str(error)
grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
print(json.dumps({{"size": size, "grown": grown, "refused": refused}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert 1.0e9 < result["size"] < 1.2e9  # float32 ("auto" for a tiny model)
    assert result["grown"] < 150 << 20, f"the process grew by {result['grown'] / 2**20:.0f} MiB"
    assert "exceeds this server's cap of 256.0 MiB" in result["refused"]


def test_tiny_config_numbers_are_bounded_before_any_build():
    from nnsight_vla.remote.policy import MAX_TINY_INT, ServerPolicy

    with pytest.raises(CheckpointError, match=f"holds the number 100000000; at most {MAX_TINY_INT}"):
        ServerPolicy().admit(_key(tiny={"seed": 0, "config": {"vocab": 100_000_000}}))
    with pytest.raises(CheckpointError, match="not a JSON object"):
        ServerPolicy().admit(_key(tiny=[1, 2]))


def test_server_policy_lets_the_usual_tiny_models_through(vla):
    """The in-process path of the actors: admitted, sized, built; the same weights as without a policy."""
    from nnsight_vla.remote.policy import ServerPolicy

    server = Remotable.from_model_key(vla.model_key, dispatch=True, dtype="bfloat16", device="cpu",
                                      policy=ServerPolicy())
    ours, theirs = _params(vla), _params(server)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    with pytest.raises(CheckpointError, match="exceeds this server's cap"):
        Remotable.from_model_key(vla.model_key, dispatch=True, device="cpu", policy=ServerPolicy(max_tiny_bytes=1024))


# ------------------------------------------------------------------------------------------------------------------
# the loopback stack (nnsight_vla.remote.stack): what really listens, and the refusal


def _listeners_of_session(sid):
    """(address, port, process name) of every TCP listener of a session, seen by psutil (not by the stack's own
    /proc reader)."""
    import os

    import psutil

    found = set()
    for conn in psutil.net_connections("inet"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None:
            continue
        try:
            if os.getsid(conn.pid) == sid:
                found.add((conn.laddr.ip, conn.laddr.port, psutil.Process(conn.pid).name()))
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


def _loopback(address):
    import ipaddress

    ip = ipaddress.ip_address(address)
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def test_ray_head_with_the_stacks_arguments_listens_on_loopback_only(monkeypatch):
    """Ray head started exactly as the stack starts it (its `ray start` arguments and server environment), with this
    venv's Ray: gcs_server, raylet (node + object manager), the agents and the workers all listen on loopback.
    Before the fix gcs_server and raylet listened on all interfaces (::) and the runtime-env agent on the host's
    external address. This venv's Ray is the minimal one (no Ray Client, no dashboard), so those two options are
    left out here; tests/test_remote_server.py checks the whole stack with them."""
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    from nnsight_vla.remote import stack

    home = Path(tempfile.mkdtemp(prefix="nvla-ray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    monkeypatch.setenv("NVLA_NDIF_HOME", str(home))
    monkeypatch.setenv("NVLA_NDIF_VENV", sys.prefix)
    monkeypatch.setenv("NVLA_NDIF_PORT_BASE", "18700")
    monkeypatch.setenv("NVLA_NDIF_CPU", "1")
    cfg = stack._config()
    for sub in ("run", "logs"):
        (home / sub).mkdir(parents=True)
    needs_extras = ("--ray-client-server-port", "--include-dashboard", "--dashboard-host", "--dashboard-port")
    command = [arg for arg in stack._ray_command(cfg) if arg.split("=")[0] not in needs_extras]
    assert f"--node-ip-address={stack.HOST}" in command
    ports = cfg["ports"]
    try:
        sid = stack._spawn(cfg, "ray", command, stack._server_env(cfg))
        expected = {ports[name] for name in ("ray_gcs", "ray_node_manager", "ray_object_manager",
                                             "ray_runtime_env_agent")}
        deadline = time.monotonic() + 120
        while not expected <= {port for _, port, _ in _listeners_of_session(sid)} and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(3)  # the idle workers the raylet prestarts
        listeners = _listeners_of_session(sid)
        names = {name for _, _, name in listeners}
        assert {"gcs_server", "raylet"} <= names, listeners
        assert expected <= {port for _, port, _ in listeners}, listeners
        exposed = sorted(entry for entry in listeners if not _loopback(entry[0]))
        assert exposed == [], f"listening beyond loopback: {exposed}"
        assert stack.check_listeners([sid]) == []  # the stack's own check agrees
    finally:
        stack._stop_service(cfg, "ray")
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def _listener_in_its_own_session(bind):
    """A real process, in a new session as the stack starts its services, listening on ``bind``."""
    import subprocess
    import sys

    code = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
            "s.bind((sys.argv[1], 0)); s.listen(); print(s.getsockname()[1], flush=True); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, bind], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        port = int(proc.stdout.readline())
        yield proc, port
    finally:
        proc.kill()
        proc.wait(30)


def test_a_service_listening_beyond_loopback_is_refused_unless_firewalled(tmp_path, monkeypatch):
    from nnsight_vla.errors import StackError
    from nnsight_vla.remote import stack

    external = [a for a in stack.host_addresses() if not _loopback(a)]
    if not external:
        pytest.skip("this host has no address beyond loopback: nothing to refuse")
    with _listener_in_its_own_session("127.0.0.1") as (quiet, _):
        assert stack.check_listeners([quiet.pid]) == []
    for bind in ("0.0.0.0", "::"):
        with _listener_in_its_own_session(bind) as (loud, port):
            with pytest.raises(StackError, match=rf"on {bind}:{port}.*NVLA_NDIF_FIREWALLED=1"):
                stack.check_listeners([loud.pid])
            (entry,) = stack.check_listeners([loud.pid], firewalled=True)  # acknowledged: reported, not refused
            assert (entry["address"], entry["port"], entry["pid"]) == (bind, port, loud.pid)
    # up()'s own step: a recorded service found listening on all interfaces is stopped, and up() raises
    monkeypatch.setenv("NVLA_NDIF_HOME", str(tmp_path))
    monkeypatch.delenv("NVLA_NDIF_FIREWALLED", raising=False)
    cfg = stack._config()
    (tmp_path / "run").mkdir()
    with _listener_in_its_own_session("0.0.0.0") as (loud, port):
        (tmp_path / "run" / "api.pid").write_text(str(loud.pid))
        with pytest.raises(StackError, match=f"0.0.0.0:{port}"):
            stack._refuse_exposed(cfg, log=lambda _: None)
        assert loud.wait(30) is not None  # stopped by the refusal
        assert not (tmp_path / "run" / "api.pid").exists()


def test_client_paths_never_import_the_server_shim():
    """Last in this file, after every client path above ran: the shim (ray + ndif) stayed out of the client."""
    import sys

    assert "nnsight_vla.remote.server" not in sys.modules
    assert "ndif" not in sys.modules
