"""What the model-free scripted policies (LIBERO's and the UR5's) share: the VLA call surface and its input checks.

A scripted policy stands in for a model in smoke runs, rehearsals and runner benchmarks, so it validates its
inputs like a real model (camera names, HxWx3 uint8 images, a non-empty instruction) and keeps the last ones for
inspection. Subclasses set the family's surface in ``__init__`` and compute actions in ``_act``.
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from ..errors import InputError


class ScriptedPolicyBase:
    """Base of the scripted policies: ``predict_action`` checks the inputs, then calls ``_act``.

    Subclasses set ``family``, ``camera_names``, ``state_dim``, ``action_dim``, ``action_horizon``, ``speed``
    and ``delay_s`` (seconds of simulated inference time per call).
    """

    family: str
    camera_names: tuple[str, ...]
    delay_s: float = 0.0

    def __init__(self) -> None:
        self.calls = 0
        self.last_images: dict | None = None
        self.last_instruction: str | None = None
        self.last_state: np.ndarray | None = None

    def reset(self) -> None:
        """Start a new episode (runners call this before the first step)."""
        self.calls = 0

    def predict_action(self, images: Any, instruction: str, state: Any = None, **_: Any) -> np.ndarray:
        if not isinstance(images, Mapping):
            if len(self.camera_names) != 1:
                raise InputError(f"{self.family} needs images for cameras {self.camera_names}")
            images = {self.camera_names[0]: images}
        for name in self.camera_names:
            img = images.get(name)
            if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise InputError(f"camera {name!r}: expected an HxWx3 uint8 image, got {getattr(img, 'shape', img)}")
        if not isinstance(instruction, str) or not instruction:
            raise InputError("instruction must be a non-empty string")
        self.last_images, self.last_instruction = dict(images), instruction
        if self.delay_s:
            time.sleep(self.delay_s)
        return self._act(state)

    def _act(self, state: Any) -> np.ndarray:
        raise NotImplementedError
