"""LIBERO observations to model inputs (rotated camera frames, JPEG round trip, resize and crop, the 8-d state)
and model outputs to LIBERO actions (first 7 dims, the family's gripper convention), per resolved recipe."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping

import numpy as np

from ...errors import LiberoError
from ...models.preprocessing import resize_with_pad
from .config import LIBERO_ACTION_DIM, LIBERO_STATE_DIM, ResolvedRecipe


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """robosuite (x, y, z, w) quaternion -> axis-angle vector, robosuite's convention (angle in [0, 2 pi])."""
    q = np.asarray(quat, np.float64).reshape(4)
    w = float(np.clip(q[3], -1.0, 1.0))
    s = math.sqrt(max(0.0, 1.0 - w * w))
    if s < 1e-9:
        return np.zeros(3)
    return q[:3] * (2.0 * math.acos(w) / s)


def libero_state(obs: Mapping) -> np.ndarray:
    """The 8-d state openpi's LIBERO policies take: eef pos, axis-angle of eef quat, gripper qpos (2)."""
    return np.concatenate([
        np.asarray(obs["robot0_eef_pos"], np.float64),
        quat_to_axis_angle(obs["robot0_eef_quat"]),
        np.asarray(obs["robot0_gripper_qpos"], np.float64),
    ]).astype(np.float32)


def prepare_image(image: np.ndarray, recipe: ResolvedRecipe) -> np.ndarray:
    """A rendered LIBERO frame -> the model's input image: rotate 180 degrees, then the family's resize."""
    from PIL import Image

    img = np.ascontiguousarray(np.asarray(image)[::-1, ::-1])
    h, w = recipe.image_size
    if recipe.resize == "pad":
        return resize_with_pad(img, h, w)
    pil = Image.fromarray(img)
    if recipe.jpeg:  # the training data went through JPEG (RLDS); match it
        buf = io.BytesIO()
        pil.save(buf, format="JPEG", quality=95)
        buf.seek(0)
        pil = Image.open(buf).convert("RGB")
    pil = pil.resize((w, h), Image.LANCZOS)
    if recipe.center_crop < 1.0:
        side = math.sqrt(recipe.center_crop)
        cw, ch = w * side, h * side
        box = ((w - cw) / 2, (h - ch) / 2, (w + cw) / 2, (h + ch) / 2)
        pil = pil.resize((w, h), Image.BILINEAR, box=box)
    return np.asarray(pil)


def map_action(raw: np.ndarray, gripper: str) -> np.ndarray:
    """A model action row -> the 7-d LIBERO action (first 7 dims; gripper mapped per family)."""
    action = np.asarray(raw, np.float64).reshape(-1)[:LIBERO_ACTION_DIM].copy()
    if not np.all(np.isfinite(action)):
        raise LiberoError(f"the policy returned a non-finite action {action.tolist()}; refusing to execute it")
    if gripper == "openvla":  # [0, 1] -> [-1, 1], binarise, invert (OpenVLA: 1 = open; LIBERO: -1 = open)
        g = 2.0 * action[-1] - 1.0
        action[-1] = -float(np.sign(g))
    elif gripper == "binarize":
        action[-1] = float(np.sign(action[-1]))
    return action


class PolicyAdapter:
    """Turns LIBERO observations into a family's inputs and its outputs into a queue of LIBERO actions."""

    def __init__(self, policy: Any, recipe: ResolvedRecipe):
        self.policy = policy
        self.recipe = recipe
        self._pad = (recipe.state_dim or 0) - LIBERO_STATE_DIM
        self._kwargs = dict(recipe.predict_kwargs)

    def inputs(self, obs: Mapping) -> tuple[dict, np.ndarray | None]:
        images = {model: prepare_image(obs[f"{cam}_image"], self.recipe) for model, cam in self.recipe.cameras}
        state = None
        if self.recipe.state_dim is not None:
            state = libero_state(obs)
            if self._pad > 0:  # openpi pads the state to the model's width with zeros
                state = np.concatenate([state, np.zeros(self._pad, np.float32)])
        return images, state

    def predict(self, obs: Mapping, instruction: str) -> np.ndarray:
        """Query the policy; returns the rows to execute open loop, shape (k, action_dim)."""
        images, state = self.inputs(obs)
        if state is None:
            out = self.policy.predict_action(images, instruction, **self._kwargs)
        else:
            out = self.policy.predict_action(images, instruction, state=state, **self._kwargs)
        out = np.asarray(out, np.float64)
        if out.ndim == 1:
            out = out[None]
        if out.ndim != 2 or out.shape[1] < LIBERO_ACTION_DIM:
            raise LiberoError(
                f"{self.recipe.family} policy returned an action of shape {out.shape}; expected "
                f"({self.recipe.action_dim},) or (H, {self.recipe.action_dim})"
            )
        return out[: self.recipe.open_loop_steps]


