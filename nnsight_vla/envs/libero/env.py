"""LIBERO as a rollout environment: its episodes (task x trial), its identity, and one episode's run.

An episode: reset to the trial's stored initial state with the episode's seed (a function of seed, task and
trial only, the same in every condition), settle with no-op actions, then query the policy (chunks executed
open loop) under the condition's context until the task is done or ``max_steps`` ran. Positions are read from
the simulator's end-effector site. Success is the environment's ``done``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from ...errors import LiberoError
from ...rollout.conditions import Condition
from ...rollout.policy import PolicySurface, condition_context
from ...rollout.records import Episode, EpisodeKey, EpisodeRecorder
from ...rollout.seeding import seed_everything
from .config import DUMMY_ACTION, LiberoConfig, ResolvedRecipe, assumed_surface, identity_config, resolve_recipe
from .observations import PolicyAdapter, map_action
from .task import LiberoTask, episode_seed, suite_tasks


def run_episode(task: LiberoTask, policy: Any, recipe: ResolvedRecipe, condition: Condition, trial: int,
                config: LiberoConfig) -> Episode:
    """Run one episode of ``task`` under ``condition`` and return it (not yet written anywhere)."""
    max_steps = config.resolved_max_steps()
    seed = episode_seed(config.seed, task.info.task_id, trial)
    key = EpisodeKey(condition.name, task.info.task_id, int(trial))
    instruction = condition.instruction(task.info.instruction)
    adapter = PolicyAdapter(policy, recipe)
    obs = task.reset(trial, seed)
    seed_everything(seed)
    if callable(getattr(type(policy), "reset", None)):  # stateful policies (openpi-style) start afresh
        policy.reset()
    if callable(getattr(type(policy), "seed_episode", None)):  # a policy server keeps an RNG stream per episode
        policy.seed_episode(seed)
    for _ in range(config.settle_steps):
        obs, _, _, _ = task.step(list(DUMMY_ACTION))
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
    with condition_context(policy, condition):
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


_CACHE: dict = {}  # this process's simulator (one at a time), shared by every LiberoEnv and sweep


def task_env(config: LiberoConfig, recipe: ResolvedRecipe, task_id: int) -> LiberoTask:
    """This process's simulator for ``task_id`` with the config's render settings: consecutive episodes and sweeps
    with the same settings reuse it (building one takes 5-16 s); :func:`close_envs` frees it."""
    cameras = recipe.libero_cameras
    if config.video and "agentview" not in cameras:
        cameras = ("agentview",) + cameras
    want = {"suite": config.suite, "task_id": int(task_id), "camera_size": config.camera_size,
            "cameras": tuple(cameras), "offsamples": config.offsamples, "hard_reset": config.hard_reset,
            "render_device": config.render_device,
            # robosuite refuses steps past its horizon; LIBERO's default 1000 covers every standard suite
            "horizon": max(1000, config.resolved_max_steps() + config.settle_steps + 10)}
    env = _CACHE.get("env")
    if env is None or env.settings != want:
        close_envs()
        env = _CACHE["env"] = LiberoTask(want["suite"], want["task_id"], camera_size=want["camera_size"],
                                         cameras=want["cameras"], offsamples=want["offsamples"],
                                         hard_reset=want["hard_reset"], render_device=want["render_device"],
                                         horizon=want["horizon"])
    return env


def close_envs() -> None:
    """Close this process's cached LIBERO simulator (see :func:`task_env`)."""
    env = _CACHE.pop("env", None)
    if env is not None:
        env.close()


class LiberoEnv:
    """The LIBERO :class:`~nnsight_vla.rollout.sweep.Environment` for ``config``: episodes are every selected task
    of the suite times ``config.trials``. Simulators come from :func:`task_env` (built once per process and
    settings, kept after the sweep for the next one; :func:`close_envs` frees them)."""

    kind = "libero"
    parallel = True

    def __init__(self, config: LiberoConfig):
        if not isinstance(config, LiberoConfig):
            raise LiberoError(f"LiberoEnv needs a LiberoConfig, got {type(config).__name__}")
        self.config = config
        self.recipe: ResolvedRecipe | None = None
        self._task_ids: list[int] | None = None

    def assumed_surface(self, family: str) -> PolicySurface:
        return assumed_surface(family)

    def bind(self, surface: PolicySurface) -> None:
        self.recipe = resolve_recipe(self.config, surface)
        self.config.resolved_max_steps()
        self._task_ids = [t.task_id for t in suite_tasks(self.config.suite, self.config.tasks)]

    def verify(self, surface: PolicySurface) -> None:
        """The loaded policy must match what the sweep assumed from its family."""
        actual = resolve_recipe(self.config, surface)
        assumed = self._bound()
        diffs = [f"{k}: assumed {getattr(assumed, k)!r}, model gives {getattr(actual, k)!r}"
                 for k in assumed.__dataclass_fields__
                 if getattr(assumed, k) is not None and getattr(actual, k) != getattr(assumed, k)]
        if diffs:
            raise LiberoError("the loaded policy does not match what the sweep assumed from its family ("
                              + "; ".join(diffs) + "); set these explicitly in LiberoConfig (e.g. image_size, "
                              "open_loop_steps)")

    def _bound(self) -> ResolvedRecipe:
        if self.recipe is None:
            raise LiberoError("LiberoEnv.bind(policy surface) must run before episodes")
        return self.recipe

    def identity(self) -> dict:
        return identity_config(self.config, self._bound())

    def episodes(self) -> list[tuple[int, int]]:
        if self._task_ids is None:
            self._bound()
        return [(task, trial) for task in self._task_ids for trial in range(self.config.trials)]

    def run_episode(self, policy: Any, condition: Condition, task: int, trial: int) -> Episode:
        env = task_env(self.config, self._bound(), task)
        episode = run_episode(env, policy, self._bound(), condition, trial, self.config)
        episode.summary["env_create_s"] = env.create_s
        episode.meta.update({"pid": os.getpid()})
        return episode

    def close(self) -> None:
        """Nothing to free per sweep: the simulator stays cached for the next one (see :func:`close_envs`)."""


def first_frames(config: LiberoConfig, task_id: int, trials: int = 1) -> list[np.ndarray]:
    """The agent-view frames the policy sees first in the given trials of a task (for single-step checks)."""
    env = LiberoEnv(config)
    env.bind(PolicySurface("openvla", ("primary",), None, 7, 1))
    try:
        task = task_env(config, env.recipe, task_id)
        frames = []
        for trial in range(trials):
            obs = task.reset(trial, episode_seed(config.seed, task_id, trial))
            for _ in range(config.settle_steps):
                obs, _, _, _ = task.step(list(DUMMY_ACTION))
            frames.append(np.ascontiguousarray(obs["agentview_image"][::-1, ::-1]))
        return frames
    finally:
        close_envs()
