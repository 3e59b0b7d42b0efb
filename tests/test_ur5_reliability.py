"""Issue 15 on the UR5, end to end through the real ur_rtde client and the controller twin: counts refused (item 2),
acceleration bounded as a vector, braking included (item 3), malformed policy outputs ending in a recorded, halted
episode (item 4), a twin that stays private (item 11).

The reference is what the twin received: its log of every RTDE package the client sent (``input_double_register_0..5``
hold a servoJ / servoL target).
"""

from __future__ import annotations

import json
import math
import re
import socket
import stat
import time

import numpy as np
import pytest

pytest.importorskip("rtde_control")
pytest.importorskip("mujoco")

from nnsight_vla.cli.ur5 import run_command as run_cli  # noqa: E402
from nnsight_vla.envs.ur5 import (  # noqa: E402
    DEFAULT_HOME_Q,
    RobotConfigError,
    SafetyConfig,
    TwinClient,
    TwinConfig,
    TwinError,
    TwinProcess,
    UR5Config,
    UR5ScriptedPolicy,
    URKinematics,
    free_loopback_host,
    pose_to_matrix,
    run_conditions,
)
from nnsight_vla.envs.ur5.poses import relative_rotvec  # noqa: E402
from nnsight_vla.envs.ur5.twin.config import token_path  # noqa: E402
from nnsight_vla.errors import InputError  # noqa: E402
from nnsight_vla.rollout.conditions import baseline  # noqa: E402
from nnsight_vla.rollout.store import ResultsStore  # noqa: E402

HOME = np.array(DEFAULT_HOME_Q)
DT = 1.0 / 125.0
KIN = URKinematics("UR5")
TWIN_CAMS = {"base": "twin:scene", "wrist": "twin:wrist", "primary": "twin:scene"}
LOOSE = dict(state_timeout_s=1.0)  # the twin shares two busy cores with the tests (see test_ur5.py)


@pytest.fixture(scope="module")
def twin():
    with TwinProcess(free_loopback_host()) as tw:
        yield tw


def _reset(twin):
    twin.admin("reset_safety")
    twin.admin("set_q", q=HOME.tolist())
    time.sleep(0.03)


def _log_len(twin) -> int:
    return twin.admin("commands", since=10**9)["total"]


def _received(twin, since: int) -> list[dict]:
    return twin.admin("commands", since=since)["commands"]


def _targets(cmds: list[dict], name: str) -> np.ndarray:
    rows = [[c["fields"][f"input_double_register_{i}"] for i in range(6)] for c in cmds if c["name"] == name]
    return np.asarray(rows, float).reshape(-1, 6)


class Scripted(UR5ScriptedPolicy):
    """A UR5 policy whose outputs a test writes: ``script(call_index, state) -> output``."""

    def __init__(self, family: str, script, *, max_calls: int = 30, **kw):
        super().__init__(family, **kw)
        self.script, self.max_calls = script, max_calls

    def _act(self, state):
        if self.calls >= self.max_calls:  # a runner that keeps asking without acting would loop forever
            raise RuntimeError(f"policy called {self.calls} times without the episode ending")
        self.calls += 1
        return self.script(self.calls - 1, state)


# ----------------------------------------------------------------------------------------------------------
# item 2: zero and negative counts
# ----------------------------------------------------------------------------------------------------------


def test_zero_and_negative_counts_are_refused(twin, tmp_path):
    """``--steps 0`` ran 50 steps (``if steps:``); every count is refused before anything connects or moves."""
    _reset(twin)
    n0 = _log_len(twin)
    for kw in ({"steps": 0}, {"steps": -3}, {"trials": 0}, {"trials": -1}):
        t0 = time.perf_counter()
        with pytest.raises(RobotConfigError, match=f"{next(iter(kw))} must be an int >= 1"):
            run_cli(twin.host, cameras="twin", results=str(tmp_path / "r"), **kw)
        assert time.perf_counter() - t0 < 2.0  # refused, not run
    assert not (tmp_path / "r").exists() and _log_len(twin) == n0
    for bad in ({"max_steps": 0}, {"max_steps": -1}, {"max_steps": True}, {"open_loop_steps": 0},
                {"gripper_index": -1}, {"image_size": 0}):
        with pytest.raises(RobotConfigError):
            UR5Config(**bad)
    for bad in ({"horizon": 0}, {"horizon": -2}, {"period": 0}, {"action_hz": 0.0}):
        with pytest.raises(RobotConfigError):
            UR5ScriptedPolicy("pi0", **bad)
    # a policy that declares no (or a negative) horizon is refused, not rounded up to 1
    for horizon in (0, -4):
        policy = UR5ScriptedPolicy("pi0")
        policy.action_horizon = horizon
        with pytest.raises(RobotConfigError, match="action_horizon must be an int >= 1"):
            run_conditions(policy, [baseline()], UR5Config(max_steps=2, cameras=TWIN_CAMS), tmp_path / "h",
                           host=twin.host, safety=SafetyConfig(**LOOSE))
    with pytest.raises(TwinError, match="tries"):
        free_loopback_host(tries=0)
    with pytest.raises(TwinError, match="since"):
        twin.admin("commands", since=-5)  # a negative index would have read the log from its end


# ----------------------------------------------------------------------------------------------------------
# item 4: malformed policy outputs
# ----------------------------------------------------------------------------------------------------------

MALFORMED = {
    "empty chunk": (lambda i, s: np.zeros((0, 7)), r"shape \(0, 7\)"),
    "narrow rows": (lambda i, s: np.zeros((8, 3)), r"shape \(8, 3\)"),
    "no gripper column": (lambda i, s: np.zeros((8, 6)), r"shape \(8, 6\)"),
    "too wide": (lambda i, s: np.zeros((8, 9)), r"shape \(8, 9\)"),
    "3-d batch": (lambda i, s: np.zeros((1, 8, 7)), r"shape \(1, 8, 7\)"),
    "text": (lambda i, s: "move left", "returned str"),
    "mapping": (lambda i, s: {"actions": np.zeros((8, 7))}, "returned dict"),
    "None": (lambda i, s: None, "returned NoneType"),
    "ragged": (lambda i, s: [[0.0] * 7, [0.0] * 3], "not an array of numbers"),
    "all NaN": (lambda i, s: np.full((8, 7), np.nan), "non-finite"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_policy_output_ends_a_recorded_halted_episode(twin, tmp_path, kind):
    """An empty chunk made the runner ask the policy forever without moving; a row narrower than the gripper index
    raised a raw IndexError and the episode was lost. Each malformed output now ends the episode at once, with the
    arm stopped, nothing of it sent, and the episode recorded with the reason."""
    script, message = MALFORMED[kind]
    _reset(twin)
    policy = Scripted("pi0", script)
    n0 = _log_len(twin)
    res = run_conditions(policy, [baseline()], UR5Config(max_steps=5, cameras=TWIN_CAMS, gripper="none"),
                         tmp_path / "bad", host=twin.host, armed=True, safety=SafetyConfig(**LOOSE))
    assert res.completed == 1 and policy.calls == 1
    rec = ResultsStore.open(tmp_path / "bad").records()[0]
    summary = rec["summary"]
    assert summary["termination"] == ("unsafe_action" if kind == "all NaN" else "policy_error"), summary
    assert summary["error"] and re.search(message, summary["error"]), summary["error"]
    assert rec["steps_rows"] == 0
    names = [c["name"] for c in _received(twin, n0)]
    assert "SERVOJ" not in names and "SERVOL" not in names  # nothing of it reached the arm
    assert "SERVO_STOP" in names  # and the arm was told to stop
    np.testing.assert_allclose(twin.admin("status")["q"], HOME, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# item 3: the acceleration limits bound the change of the velocity vector, braking included
# ----------------------------------------------------------------------------------------------------------


def _stream_limits(start: np.ndarray, targets: np.ndarray, kind: str) -> dict:
    """Speeds and accelerations of a servo stream that starts at rest at ``start`` (joints for servoJ, the pose
    for servoL), one target every DT: joint values per joint (max), TCP values as vector norms."""
    seq = np.vstack([start, start, targets])
    out = {}
    if kind == "SERVOJ":
        qd = np.diff(seq, axis=0) / DT
        out["joint_speed"] = float(np.abs(qd).max())
        out["joint_acc"] = float(np.abs(np.diff(qd, axis=0)).max() / DT)
        poses = [KIN.fk(q) for q in seq]
    else:
        poses = [pose_to_matrix(p) for p in seq]
    v = np.diff([T[:3, 3] for T in poses], axis=0) / DT
    w = np.array([relative_rotvec(b[:3, :3], a[:3, :3]) for a, b in zip(poses, poses[1:])]) / DT
    out["tcp_speed"] = float(np.linalg.norm(v, axis=1).max())
    out["tcp_acc"] = float(np.linalg.norm(np.diff(v, axis=0), axis=1).max() / DT)
    out["tcp_rot_speed"] = float(np.linalg.norm(w, axis=1).max())
    out["tcp_rot_acc"] = float(np.linalg.norm(np.diff(w, axis=0), axis=1).max() / DT)
    out["positions"] = np.array([T[:3, 3] for T in poses])
    return out


def _alternating_y(i, state):  # the audit's policy: +-5 cm in y, every call (OpenVLA: single TCP deltas)
    return np.array([0.0, 0.05 * (-1) ** i, 0.0, 0.0, 0.0, 0.0, 1.0])


def _push_minus_y(i, state):
    return np.array([0.0, -0.05, 0.0, 0.0, 0.0, 0.0, 1.0])


def _alternating_joints(i, state):  # pi0: chunks of joint deltas whose rows flip sign every row
    return np.array([np.concatenate([0.05 * (-1) ** k * np.array([1, -1, 1, -1, 1, -1]), [0.0]]) for k in range(8)])


def _lift_joints(i, state):  # pi0: lifting the shoulder, into a low ceiling
    return np.array([np.concatenate([[0.0, -0.05 * (k + 1), 0.0, 0.0, 0.0, 0.0], [0.0]]) for k in range(8)])


HOME_TCP = KIN.fk(HOME)[:3, 3]
ADVERSARIES = {
    "alternating y (servoL)": ("openvla", _alternating_y, {}, "SERVOL"),
    "push into a wall (servoL)": ("openvla", _push_minus_y, {"workspace_min": (-0.70, HOME_TCP[1] - 0.03, 0.15)},
                                  "SERVOL"),
    "alternating joints (servoJ)": ("pi0", _alternating_joints, {}, "SERVOJ"),
    "lift into a ceiling (servoJ)": ("pi0", _lift_joints, {"workspace_max": (-0.25, 0.15, HOME_TCP[2] + 0.03)},
                                     "SERVOJ"),
}


@pytest.mark.parametrize("name", list(ADVERSARIES))
def test_adversarial_policies_stay_within_the_acceleration_limits(twin, tmp_path, name):
    """Measured on the targets the twin received: speeds and accelerations (the change of the velocity vector over
    one servo period: speeding up, slowing down and turning alike) stay within the limits; a wall or a ceiling is
    reached without braking harder than they allow, and never crossed. The audit measured 61.5 m/s^2 (limit 1.0)
    for the alternating policy, 19.5-34.7 rad/s^2 (limit 1.5) on joint streams, 15.9 m/s^2 at a wall."""
    family, script, box, kind = ADVERSARIES[name]
    safety = SafetyConfig(**LOOSE, **box)
    _reset(twin)
    n0 = _log_len(twin)
    cfg = UR5Config(max_steps=20, cameras=TWIN_CAMS, gripper="none", open_loop_steps=4)
    res = run_conditions(Scripted(family, script), [baseline()], cfg, tmp_path / "adv", host=twin.host, armed=True,
                         safety=safety)
    assert res.terminations == {"max_steps": 1}, res
    rec = ResultsStore.open(tmp_path / "adv").records()[0]
    start = np.asarray(rec["meta"]["start_q" if kind == "SERVOJ" else "start_tcp"], float)
    targets = _targets(_received(twin, n0), kind)
    assert len(targets) >= 20 * 12
    m = _stream_limits(start, targets, kind)
    print(name, {k: round(v, 4) for k, v in m.items() if k != "positions"})
    limits = {"tcp_speed": safety.max_tcp_speed, "tcp_acc": safety.max_tcp_acc,
              "tcp_rot_speed": safety.max_tcp_rot_speed, "tcp_rot_acc": safety.max_tcp_rot_acc}
    if kind == "SERVOJ":
        limits.update(joint_speed=safety.max_joint_speed, joint_acc=safety.max_joint_acc)
    for key, limit in limits.items():
        assert m[key] <= limit * (1 + 1e-6), (key, m[key], limit)
    assert m["tcp_speed"] > 0.02  # the arm did move
    p = m["positions"]
    assert np.all(p >= np.asarray(safety.workspace_min) - 1e-9) and np.all(p <= np.asarray(safety.workspace_max) + 1e-9)
    if box:  # it went up to the boundary (within 5 mm)
        gap = np.minimum(p - safety.workspace_min, np.asarray(safety.workspace_max) - p).min(axis=1)
        assert gap.min() < 0.005


# ----------------------------------------------------------------------------------------------------------
# item 11: the twin is private by default
# ----------------------------------------------------------------------------------------------------------


def _raw_admin(host: str, request: dict) -> dict:
    with socket.create_connection((host, 30020), timeout=10) as sock:
        f = sock.makefile("rwb")
        f.write((json.dumps(request) + "\n").encode())
        f.flush()
        return json.loads(f.readline())


def test_twin_listens_on_loopback_and_its_admin_port_needs_its_token(twin):
    """The admin port answered anyone and the twin bound any --host. Now a non-loopback host is refused unless
    acknowledged, and every admin request needs the twin's token, which its user alone can read."""
    for host in ("0.0.0.0", "192.0.2.1"):
        with pytest.raises(InputError, match="loopback"):
            TwinConfig(host=host)
        with pytest.raises(TwinError, match="loopback"):
            TwinProcess(host)
    assert TwinConfig(host="0.0.0.0", allow_remote=True).allow_remote  # an explicit acknowledgement
    _reset(twin)
    for request in ({"cmd": "status"}, {"cmd": "status", "token": "wrong" * 8},
                    {"cmd": "set_q", "q": (HOME + 0.3).tolist()}, {"cmd": "shutdown"}):
        reply = _raw_admin(twin.host, request)
        assert reply == {"ok": False, "error": "admin token missing or wrong"}, reply
    assert twin.alive() and np.allclose(twin.admin("status")["q"], HOME)  # neither moved nor stopped
    # the process that started it holds the token; other clients of the same user read it from a private file
    path = token_path(twin.host, 30020)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == twin.token
    assert TwinClient(twin.host).request("status")["ok"]
    with pytest.raises(TwinError, match="token missing or wrong"):
        TwinClient(twin.host, token="x" * 32).request("status")
    assert math.isfinite(_raw_admin(twin.host, {"cmd": "status", "token": twin.token})["time"])
