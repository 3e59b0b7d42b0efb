"""LIBERO sweep configuration and the per-family recipes of the standard evaluation (OpenVLA's and openpi's
LIBERO scripts): suites and max steps, settle steps, camera handling, gripper conventions, open-loop chunks.
A recipe is resolved against a policy's surface before anything runs, so a model LIBERO cannot feed is refused
with a reason."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping

import numpy as np

from ...errors import LiberoError
from ...rollout.policy import PolicySurface

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


def resolve_recipe(config: LiberoConfig, surface: PolicySurface) -> ResolvedRecipe:
    """Check that LIBERO can provide what the policy needs and fix every recipe detail."""
    family = surface.family
    if family not in FAMILY_RECIPES:
        raise LiberoError(
            f"no LIBERO recipe for model family {family!r}; supported families: {', '.join(FAMILY_RECIPES)}"
        )
    base = FAMILY_RECIPES[family]
    cameras = []
    for name in surface.camera_names:
        if name not in CAMERA_ALIASES:
            raise LiberoError(
                f"{family} model wants camera {name!r}, which LIBERO cannot provide; LIBERO renders "
                f"{', '.join(LIBERO_CAMERAS)} (model camera names understood: {', '.join(sorted(CAMERA_ALIASES))})"
            )
        cameras.append((name, CAMERA_ALIASES[name]))
    if not cameras:
        raise LiberoError(f"{family} model declares no cameras; LIBERO policies need at least one image")
    state_dim = surface.state_dim
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
    action_dim = surface.action_dim
    if action_dim < LIBERO_ACTION_DIM:
        raise LiberoError(
            f"{family} model outputs {action_dim}-d actions; LIBERO needs {LIBERO_ACTION_DIM} "
            "(dx, dy, dz, droll, dpitch, dyaw, gripper)"
        )
    size = config.image_size or surface.image_size or 224
    size = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    horizon = surface.action_horizon  # None: not known before a worker loads the model
    horizon = None if horizon is None else max(1, int(horizon))
    open_loop = config.open_loop_steps or base.open_loop_steps
    if horizon is not None and open_loop > horizon:
        if config.open_loop_steps is not None:
            raise LiberoError(f"open_loop_steps={open_loop} exceeds the model's action horizon {horizon}")
        open_loop = horizon
    kwargs: dict = dict(config.predict_kwargs)
    keys = surface.norm_keys
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


def identity_config(config: LiberoConfig, recipe: ResolvedRecipe) -> dict:
    """The part of a run's configuration that defines an episode (stored in the results manifest; the sweep adds
    the policy's identity)."""
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
    }




def assumed_surface(family: str) -> PolicySurface:
    """A family's surface as LIBERO assumes it before a worker loads a large checkpoint (checked afterwards)."""
    if family not in FAMILY_CAMERAS:
        raise LiberoError(f"no LIBERO recipe for model family {family!r}; supported: {', '.join(FAMILY_CAMERAS)}")
    return PolicySurface(family=family, camera_names=FAMILY_CAMERAS[family],
                         state_dim=None if family == "openvla" else LIBERO_STATE_DIM, action_dim=LIBERO_ACTION_DIM,
                         action_horizon=1 if family == "openvla" else None)


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


