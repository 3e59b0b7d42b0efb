"""The openpi-protocol policy server (issue 17 item 6), driven by openpi's REAL client package (openpi-client on
PyPI: ``WebsocketClientPolicy``, ``msgpack_numpy``) over loopback.

The reference is the direct call: ``infer(obs)["actions"]`` equals ``vla.predict_action`` (under
``Steering.apply`` for a steered condition), for OpenVLA and pi0, steered and not; a steered answer differs from
the unsteered one (so the condition was applied). Bad observations get an error reply and the same connection
serves the next request. The command line is started as a subprocess and talked to the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import msgpack
import numpy as np
import pytest

import nnsight_vla as nv
from nnsight_vla.rollout.openpi_server import OpenpiPolicy, OpenpiServer, pack, unpack
from nnsight_vla.steering import Steering

openpi_client = pytest.importorskip("openpi_client", reason="openpi-client is installed by .ci/run (pip --no-deps)")
from openpi_client import msgpack_numpy  # noqa: E402
from openpi_client.websocket_client_policy import WebsocketClientPolicy  # noqa: E402

PROMPT = "pick up the black bowl"
OPENVLA_KW = {"restrict_to_action_tokens": True, "unnorm_key": False}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def openvla():
    return nv.tiny("openvla", seed=0)


@pytest.fixture(scope="module")
def pi0():
    return nv.tiny("pi0", seed=0)


def image(seed: int = 0, shape=(64, 80, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def steering(vla, stack: str = "backbone", alpha: float = 6.0, name: str = "lift") -> Steering:
    layers = vla.stack_dims(stack)[0]
    return Steering([(layer, n) for layer in range(layers) for n in range(8)], alpha, stack=stack, name=name)


def direct(vla, images, steer=None, **kwargs) -> np.ndarray:
    if steer is None:
        return np.atleast_2d(vla.predict_action(images, PROMPT, **kwargs))
    with steer.apply(vla):
        return np.atleast_2d(vla.predict_action(images, PROMPT, **kwargs))


def test_wire_format_is_openpis(openvla):
    """Our encoder and openpi's decode each other's messages, arrays included."""
    obs = {"observation/image": image(), "prompt": PROMPT, "state": np.arange(3, dtype=np.float32),
           "n": np.int64(5), "nested": {"x": np.ones((2, 2), np.float64)}}
    for ours, theirs in ((pack(obs), msgpack_numpy.unpackb), (msgpack_numpy.packb(obs), unpack)):
        back = theirs(ours) if theirs is msgpack_numpy.unpackb else unpack(ours)
        np.testing.assert_array_equal(back["observation/image"], obs["observation/image"])
        assert back["observation/image"].dtype == np.uint8 and back["prompt"] == PROMPT
        np.testing.assert_array_equal(back["nested"]["x"], obs["nested"]["x"])
        assert back["n"] == 5
    assert unpack(msgpack_numpy.packb(obs))["state"].flags.writeable  # a copy, usable by torch


def test_openvla_served_equals_direct_steered_and_not(openvla):
    img = image()
    steer = steering(openvla)
    want_steered = direct(openvla, img, steer, **OPENVLA_KW)
    want_plain = direct(openvla, img, **OPENVLA_KW)
    assert not np.array_equal(want_steered, want_plain)  # the steering changes this action
    with OpenpiServer(openvla, [steer], port=0, predict_kwargs=OPENVLA_KW) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        meta = client.get_server_metadata()
        assert meta["family"] == "openvla" and meta["camera_names"] == ["primary"]
        assert meta["actions_shape"] == [1, 7] and meta["default_condition"] == "lift"
        assert set(meta["conditions"]) == {"lift", "baseline"} and meta["observation_keys"]["state"] == []
        # openpi's LIBERO example keys; OpenVLA takes no state, so the LIBERO state is ignored
        obs = {"observation/image": img, "observation/wrist_image": image(1), "prompt": PROMPT,
               "observation/state": np.zeros(8, np.float32)}
        out = client.infer(obs)
        assert out["actions"].shape == (1, 7) and out["condition"] == "lift"
        np.testing.assert_array_equal(out["actions"], want_steered)
        assert out["server_timing"]["infer_ms"] > 0 and out["policy_timing"]["infer_ms"] > 0
        np.testing.assert_array_equal(client.infer({**obs, "condition": "baseline"})["actions"], want_plain)
        # the model is left clean between requests: the default condition again, then our own direct call
        np.testing.assert_array_equal(client.infer(obs)["actions"], want_steered)
    np.testing.assert_array_equal(direct(openvla, img, **OPENVLA_KW), want_plain)


@pytest.mark.parametrize("stack", ["backbone", "expert"])
def test_pi0_served_equals_direct_steered_and_not(pi0, stack):
    base, wrist = image(2), image(3, (48, 48, 3))
    state = np.linspace(-0.5, 0.5, pi0.state_dim, dtype=np.float32)
    images = {"base": base, "wrist": wrist}
    steer = steering(pi0, stack, alpha=8.0, name=f"steer-{stack}")
    want_steered = direct(pi0, images, steer, state=state)
    want_plain = direct(pi0, images, state=state)
    assert want_plain.shape == (pi0.action_horizon, pi0.action_dim)
    assert not np.array_equal(want_steered, want_plain)
    with OpenpiServer(pi0, steer, port=0) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        assert client.get_server_metadata()["actions_shape"] == [pi0.action_horizon, pi0.action_dim]
        libero = {"observation/image": base, "observation/wrist_image": wrist, "observation/state": state,
                  "prompt": PROMPT}
        np.testing.assert_array_equal(client.infer(libero)["actions"], want_steered)
        np.testing.assert_array_equal(client.infer({**libero, "condition": "baseline"})["actions"], want_plain)
        # DROID's keys: exterior + wrist image, joint positions + gripper position concatenated
        droid = {"observation/exterior_image_1_left": base, "observation/wrist_image_left": wrist,
                 "observation/joint_position": state[:-1], "observation/gripper_position": state[-1:],
                 "prompt": PROMPT, "condition": "baseline"}
        np.testing.assert_array_equal(client.infer(droid)["actions"], want_plain)
        # our own camera names, images channel-first (as openpi's ALOHA client sends them)
        ours = {"images": {"base": base.transpose(2, 0, 1), "wrist": wrist.transpose(2, 0, 1)}, "state": state,
                "prompt": PROMPT}
        np.testing.assert_array_equal(client.infer(ours)["actions"], want_steered)


def test_bad_requests_get_an_error_reply_and_the_connection_keeps_serving(openvla):
    from websockets.sync.client import connect

    img = image()
    want = direct(openvla, img, **OPENVLA_KW)
    good = {"observation/image": img, "prompt": PROMPT}
    bad_observations = [
        ({"prompt": PROMPT}, "needs camera 'primary'"),
        ({"observation/image": img}, "needs 'prompt'"),
        ({**good, "prompt": ""}, "needs 'prompt'"),
        ({**good, "observation/image": img.astype(np.float32)}, "uint8 image"),
        ({**good, "observation/image": img[..., 0]}, "HxWx3"),
        ({**good, "condition": "fast"}, "no served condition 'fast'"),
    ]
    with OpenpiServer(openvla, port=0, predict_kwargs=OPENVLA_KW) as server:
        client = WebsocketClientPolicy("127.0.0.1", server.port)
        for obs, message in bad_observations:
            with pytest.raises(RuntimeError, match="Error in inference server") as info:
                client.infer(obs)
            assert message in str(info.value)
            np.testing.assert_array_equal(client.infer(good)["actions"], want)  # the same connection goes on
        # what openpi's client cannot even send: raw frames on a plain websocket
        forged = msgpack_numpy.packb({**good, "observation/image": np.zeros(3, np.uint8)}).replace(b"|u1", b"|O8")
        short = {b"__ndarray__": True, b"data": img.tobytes()[:100], b"dtype": "|u1", b"shape": list(img.shape)}
        truncated = msgpack.packb({**good, "observation/image": short})
        raw = [(b"\x00\xffnot msgpack", "not msgpack"), ("a text frame", "binary msgpack"),
               (msgpack_numpy.packb([1, 2, 3]), "an observation is a dict"),
               (forged, "refused (numbers and booleans only)"), (truncated, "does not fit dtype and shape")]
        with connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
            assert msgpack_numpy.unpackb(ws.recv())["family"] == "openvla"
            for frame, message in raw:
                ws.send(frame)
                reply = ws.recv()
                assert isinstance(reply, str) and message in reply, reply
                ws.send(msgpack_numpy.packb(good))
                np.testing.assert_array_equal(msgpack_numpy.unpackb(ws.recv())["actions"], want)
        assert server.errors == len(bad_observations) + len(raw)
        # a second client is served too, and openpi's health check answers
        np.testing.assert_array_equal(WebsocketClientPolicy("127.0.0.1", server.port).infer(good)["actions"], want)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as response:
            assert response.status == 200 and response.read() == b"OK\n"


def test_bad_configurations_are_refused_before_serving(openvla, pi0, tmp_path):
    from nnsight_vla.errors import InputError

    with pytest.raises(InputError, match="default condition 'fast' is not served"):
        OpenpiPolicy(openvla, default="fast")
    with pytest.raises(InputError, match="action_dims must be 1..7"):
        OpenpiPolicy(openvla, action_dims=9)
    with pytest.raises(InputError, match="outside the backbone stack"):
        OpenpiPolicy(openvla, Steering([(0, 100000)], 1.0))
    with pytest.raises(InputError, match="two conditions are named"):
        OpenpiPolicy(openvla, [Steering([(0, 1)], 1.0, name="a"), Steering([(0, 2)], 1.0, name="a")])
    policy = OpenpiPolicy(pi0, action_dims=3)
    with pytest.raises(InputError, match="needs the robot state"):
        policy.parse({"observation/image": image(), "observation/wrist_image": image(), "prompt": PROMPT})
    bad_state = {"observation/image": image(), "observation/wrist_image": image(), "prompt": PROMPT,
                 "observation/state": np.array([np.nan] * pi0.state_dim)}
    with pytest.raises(InputError, match="NaN"):
        policy.parse(bad_state)
    ok = {**bad_state, "observation/state": np.zeros(pi0.state_dim)}
    assert policy.infer(ok)["actions"].shape == (pi0.action_horizon, 3)
    busy = OpenpiServer(openvla, port=0)
    try:
        with pytest.raises(InputError, match="cannot listen"):
            OpenpiServer(openvla, port=busy.port)
    finally:
        busy.close()


def test_the_serve_command_with_the_authors_file(openvla, tmp_path):
    """``nnsight-vla serve --tiny --condition steer:dictionaries.yaml#KEY@ALPHA``, driven by openpi's client."""
    flat = [layer * openvla.d_mlp + n for layer in range(openvla.num_layers) for n in range(8)]
    path = tmp_path / "dictionaries.yaml"
    path.write_text("blank: {}\nlift:\n" + "".join(f"  {i}: ['w{i}']\n" for i in flat))
    steer = Steering(path, 6.0, key="lift", d_mlp=openvla.d_mlp)
    img = image()
    want_steered, want_plain = direct(openvla, img, steer), direct(openvla, img)
    assert not np.array_equal(want_steered, want_plain)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "nnsight_vla", "serve", "--family", "openvla", "--tiny", "--port", "0",
               "--condition", f"steer:{path}#lift@6", "--action-dims", "7"]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving openvla at ws://127.0.0.1:"), line + proc.stderr.read()
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        assert "lift@a6/all" in proc.stdout.readline()
        client = WebsocketClientPolicy("127.0.0.1", port)
        assert client.get_server_metadata()["default_condition"] == "lift@a6/all"
        obs = {"observation/image": img, "prompt": PROMPT}
        np.testing.assert_array_equal(client.infer(obs)["actions"], want_steered)
        np.testing.assert_array_equal(client.infer({**obs, "condition": "baseline"})["actions"], want_plain)
    finally:
        # SIGTERM, not SIGINT: a test run started from a background shell job inherits SIGINT ignored
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in out
    helped = subprocess.run([sys.executable, "-m", "nnsight_vla", "serve", "--help"], cwd=ROOT, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert helped.returncode == 0 and "--condition" in helped.stdout, helped.stderr
    # a model must be chosen: refused with one line and no traceback
    refused = subprocess.run([sys.executable, "-m", "nnsight_vla", "serve", "--port", "0"], cwd=ROOT,
                             capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300)
    assert refused.returncode != 0 and "choose the model" in refused.stderr and "Traceback" not in refused.stderr
