"""Shared fixtures: tiny models are built once per session (they are deterministic in their seed)."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; a hub id must fail fast and clearly


@pytest.fixture(scope="session")
def tiny_openvla():
    import nnsight_vla as nv

    return nv.tiny("openvla", seed=0)


@pytest.fixture(scope="module")
def tiny_families(tiny_openvla):
    """A tiny model of each family, with the pi0-FAST "does not decode" warning (random weights never decode)
    silenced while the module's tests run and its level restored after them."""
    import nnsight_vla as nv

    logger = logging.getLogger("nnsight_vla.models.pi0_fast")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield {"openvla": tiny_openvla, "pi0": nv.tiny("pi0", seed=0), "pi0-fast": nv.tiny("pi0-fast", seed=0)}
    logger.setLevel(level)


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return {
        "a": rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
    }


def _eventually(check, timeout: float = 5.0, interval: float = 0.01):
    """Poll ``check`` until it holds, then return its value: an assertion-style check holds when it returns
    ``None`` without an AssertionError, a predicate when it returns something true. After ``timeout`` seconds it
    runs once more and its failure goes through.

    For what a controller streams at 125 Hz: a fixed sleep before asserting is a race on a loaded CI machine,
    a deadline is not (the assertion itself is unchanged)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except AssertionError:
            value = False
        if value is None or value:
            return value
        time.sleep(interval)
    value = check()
    if not (value is None or value):
        raise AssertionError(f"still false after {timeout} s")
    return value


@pytest.fixture(scope="session")
def eventually():
    """``eventually(lambda: <assertion or bool>, timeout=5.0)``: poll a state check instead of sleeping."""
    return _eventually


@pytest.fixture(scope="session")
def until_halted(eventually):
    """``until_halted(robot, timeout=5.0)``: call ``robot.check()`` (what the runner does before every command)
    until it raises :class:`RobotHalted`, and return that exception; the client's 125 Hz stream shows a
    controller-side stop a little after it happened."""
    from nnsight_vla.errors import RobotHalted

    def wait(robot, timeout: float = 5.0):
        def halted():
            try:
                robot.check()
            except RobotHalted as e:
                return e
            return False

        return eventually(halted, timeout=timeout)

    return wait
