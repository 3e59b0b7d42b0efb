"""Issue 15 on the UR5, end to end through the real ur_rtde client and the controller twin: counts refused (item 2).

The reference is what the twin received: its log of every RTDE package the client sent.
"""

from __future__ import annotations

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


