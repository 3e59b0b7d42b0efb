"""The arm as a rollout environment: the robot connection and cameras, the episodes (task x trial), and one
episode through :func:`~.episode.run_episode`. In-process only; after a halt the sweep stops (``stop_reason``)
and a human decides whether to continue."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

from ...errors import CameraError, RobotConfigError
from ...rollout.conditions import Condition
from ...rollout.policy import PolicySurface
from ...rollout.records import Episode
from .cameras import CameraSource, open_camera
from .config import UR5Config, is_count
from .episode import resolve_plan, run_episode
from .robot import UR5Robot
from .safety import SafetyConfig


class UR5Env:
    """A UR5 at ``host`` (a dry run unless ``armed``) as a :class:`~nnsight_vla.rollout.sweep.Environment`:
    ``trials`` episodes of ``config.task``. Connects on :meth:`bind`, closes what it opened on :meth:`close`;
    ``robot`` / ``cameras`` may be passed in (then they stay open). ``command_log``: a folder for the JSONL log of
    every command."""

    kind = "ur5"
    parallel = False

    def __init__(self, config: UR5Config, host: str, *, armed: bool = False, safety: SafetyConfig | None = None,
                 trials: int = 1, cameras: Mapping[str, CameraSource] | None = None, robot: UR5Robot | None = None,
                 command_log: str | os.PathLike | None = None):
        if not is_count(trials):
            raise RobotConfigError(f"trials must be an int >= 1, got {trials!r}")
        self.config, self.host, self.armed, self.trials = config, host, armed, trials
        self.safety = safety or SafetyConfig()
        self.robot, self.cameras = robot, dict(cameras) if cameras is not None else None
        self._own_robot, self._own_cams = robot is None, []
        self.command_log = None if command_log is None else Path(command_log)
        self.plan = None
        self.terminations: dict[str, int] = {}
        self._stop: str | None = None

    def bind(self, surface: PolicySurface) -> None:
        self.plan = resolve_plan(self.config, surface)
        if self.robot is None:
            self.robot = UR5Robot(self.host, armed=self.armed, safety=self.safety, config=self.config)
            self.robot.connect()
        if self.cameras is None:
            self.cameras = {}
            for name in surface.camera_names:
                spec = self.config.camera_map.get(name)
                if spec is None:
                    self.close()
                    raise CameraError(f"no camera configured for the policy's camera {name!r}; set robot.cameras")
                cam = open_camera(spec, self.host)
                self._own_cams.append(cam)
                self.cameras[name] = cam

    def identity(self) -> dict:
        info = self.robot.info if self.robot is not None else None
        robot_config = {k: v for k, v in self.config.to_dict().items() if k not in ("cameras", "connect_timeout")}
        return {"robot_config": robot_config, "safety": self.safety.to_dict(),
                "armed": self.robot.armed if self.robot else self.armed, "plan": asdict(self.plan),
                "robot": {"model": info.model, "serial": info.serial} if info else None}

    def episodes(self) -> list[tuple[str, int]]:
        return [(self.config.task, trial) for trial in range(self.trials)]

    def run_episode(self, policy: Any, condition: Condition, task: str, trial: int) -> Episode:
        if self.command_log is not None:  # opened with the first episode, inside the results folder the sweep made
            self.robot.open_command_log(self.command_log / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
            self.command_log = None
        episode = run_episode(self.robot, policy, condition, self.config, self.cameras, trial=trial)
        term = episode.summary["termination"]
        self.terminations[term] = self.terminations.get(term, 0) + 1
        if self.robot.halted is not None:
            self._stop = f"{self.robot.halted.rule}: {self.robot.halted.reason}"
        elif term == "camera_error":
            self._stop = f"camera: {episode.summary['error']}"
        return episode

    def stop_reason(self) -> str | None:
        """Why the sweep must stop after the episode just committed (a halt, a failed camera), or None."""
        return self._stop

    def close(self) -> None:
        for cam in self._own_cams:
            with contextlib.suppress(Exception):
                cam.close()
        self._own_cams = []
        if self._own_robot and self.robot is not None:
            self.robot.close()
