"""Issue 15 on the UR5, end to end through the real ur_rtde client and the controller twin: counts refused (item 2),
malformed policy outputs ending in a recorded, halted episode (item 4).

The reference is what the twin received: its log of every RTDE package the client sent (``input_double_register_0..5``
hold a servoJ / servoL target).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

pytest.importorskip("rtde_control")
pytest.importorskip("mujoco")

from nnsight_vla.envs.ur5 import (  # noqa: E402
    DEFAULT_HOME_Q,
    RobotConfigError,
    SafetyConfig,
    TwinError,
    TwinProcess,
    UR5Config,
    UR5ScriptedPolicy,
    free_loopback_host,
    run_cli,
    run_conditions,
)
from nnsight_vla.rollout.conditions import baseline  # noqa: E402
from nnsight_vla.rollout.store import ResultsStore  # noqa: E402

HOME = np.array(DEFAULT_HOME_Q)
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
            run_cli(twin.host, cameras="twin", results=str(tmp_path / "r"), plots=False, **kw)
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
