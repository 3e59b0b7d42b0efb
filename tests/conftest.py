"""Shared fixtures: tiny models are built once per session (they are deterministic in their seed)."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub; a hub id must fail fast and clearly


@pytest.fixture(scope="session")
def tiny_openvla():
    import nnsight_vla as nv

    return nv.tiny("openvla", seed=0)


@pytest.fixture(scope="session")
def images():
    rng = np.random.default_rng(0)
    return {
        "a": rng.integers(0, 256, (64, 80, 3), dtype=np.uint8),
        "b": rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
    }
