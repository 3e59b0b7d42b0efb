"""Sweeps on the arm through the one sweep loop (:func:`run_conditions`, a :class:`~.env.UR5Env` under
:func:`~nnsight_vla.rollout.sweep.run_sweep`), and building a policy from the command line's ``--policy``."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import RobotConfigError, RobotHalted
from ...rollout.conditions import Condition
from ...rollout.sweep import run_sweep
from .cameras import CameraSource
from .config import UR5Config
from .env import UR5Env
from .episode import check_policy
from .robot import UR5Robot
from .safety import SafetyConfig
from .scripted import UR5ScriptedPolicy

log = logging.getLogger("nnsight_vla.ur5")


@dataclass
class SweepResult:
    """What :func:`run_conditions` did."""

    results: str
    completed: int = 0
    skipped: int = 0
    halted: str | None = None
    terminations: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_conditions(policy: Any, conditions: Sequence[Condition], config: UR5Config, results: str | os.PathLike, *,
                   host: str, armed: bool = False, safety: SafetyConfig | None = None, trials: int = 1,
                   cameras: Mapping[str, CameraSource] | None = None, robot: UR5Robot | None = None,
                   command_log: bool = True) -> SweepResult:
    """Run every (trial, condition) episode not yet in ``results`` on the robot at ``host`` through the one sweep
    loop (:func:`nnsight_vla.rollout.sweep.run_sweep` with a :class:`~.env.UR5Env`), conditions interleaved
    within each trial (slow drift of the cell then affects all conditions alike).

    A halt (safety stop, lost connection, watchdog) ends the sweep after committing the episode it interrupted:
    a human decides whether and when to continue (rerunning resumes with the missing episodes)."""
    check_policy(policy)
    env = UR5Env(config, host, armed=armed, safety=safety, trials=trials, cameras=cameras, robot=robot,
                 command_log=Path(results) / "commands" if command_log else None)
    out = SweepResult(results=str(results))
    t_start = time.perf_counter()
    try:
        report = run_sweep(env, policy, conditions, results, progress=False,
                           run_info={"host": host, "trials": trials})
    except RobotHalted as e:  # halted before an episode could start: nothing to record
        out.halted = f"{e.rule}: {e.reason}"
        log.error("robot halted before an episode could start: %s", e.reason)
        return out
    finally:
        out.wall_s = time.perf_counter() - t_start
    out.completed, out.skipped, out.halted = report.completed, report.skipped, report.stopped
    out.terminations = dict(env.terminations)
    if out.halted:
        log.error("sweep stopped after a halt; fix the cause, then rerun to resume")
    return out


def build_policy(spec: str, family: str, seed: int) -> Any:
    if spec == "scripted":
        return UR5ScriptedPolicy(family)
    if spec == "tiny":
        import nnsight_vla as nv

        return nv.tiny(family, seed=seed)
    if spec.startswith("load:"):
        import nnsight_vla as nv

        return nv.load(family, spec[5:])
    raise RobotConfigError(f"--policy must be 'scripted', 'tiny' or 'load:<checkpoint>', got {spec!r}")
