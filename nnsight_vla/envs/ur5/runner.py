"""Sweeps on the arm: every (trial, condition) episode not yet in a results folder (:func:`run_conditions`), and
``nnsight-vla ur5 run`` (:func:`run_cli`). Each episode is :func:`~.episode.run_episode`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Mapping, Sequence

from ...errors import CameraError, RobotConfigError, RobotHalted
from ...rollout.conditions import Condition, baseline, check_unique, parse_conditions
from ...rollout.policy import policy_identity
from ...rollout.records import EpisodeKey
from ...rollout.store import ResultsStore
from .cameras import CameraSource, open_camera
from .config import UR5Config, is_count, load_config
from .episode import check_policy, resolve_plan, run_episode
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
    episodes: list[str] = field(default_factory=list)
    terminations: dict = field(default_factory=dict)
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def run_conditions(policy: Any, conditions: Sequence[Condition], config: UR5Config, results: str | os.PathLike, *,
                   host: str, armed: bool = False, safety: SafetyConfig | None = None, trials: int = 1,
                   cameras: Mapping[str, CameraSource] | None = None, robot: UR5Robot | None = None,
                   command_log: bool = True) -> SweepResult:
    """Run every (trial, condition) episode not yet in ``results`` on the robot at ``host``, conditions
    interleaved within each trial (slow drift of the cell then affects all conditions alike).

    A halt (safety stop, lost connection, watchdog) ends the sweep after committing the episode it interrupted:
    a human decides whether and when to continue (rerunning resumes with the missing episodes)."""
    conditions = list(conditions)
    check_unique(conditions)
    if not is_count(trials):
        raise RobotConfigError(f"trials must be an int >= 1, got {trials!r}")
    safety = safety or SafetyConfig()
    surface = check_policy(policy)
    plan = resolve_plan(config, surface)
    out = SweepResult(results=str(results))
    t_start = time.perf_counter()
    own_robot = robot is None
    if robot is None:
        robot = UR5Robot(host, armed=armed, safety=safety, config=config)
        robot.connect()
    own_cams: list[CameraSource] = []
    try:
        if cameras is None:
            cameras = {}
            for name in surface.camera_names:
                spec = config.camera_map.get(name)
                if spec is None:
                    raise CameraError(f"no camera configured for the policy's camera {name!r}; set robot.cameras")
                cam = open_camera(spec, host)
                own_cams.append(cam)
                cameras[name] = cam
        ident = {"robot_config": {k: v for k, v in config.to_dict().items() if k not in ("cameras", "connect_timeout")},
                 "safety": safety.to_dict(), "armed": robot.armed, "plan": asdict(plan),
                 "robot": {"model": robot.info.model, "serial": robot.info.serial} if robot.info else None,
                 "policy": policy_identity(policy)}
        store = ResultsStore.create(results, ident, [c.to_dict() for c in conditions], kind="ur5",
                                    run_info={"host": host, "trials": trials,
                                              "conditions": [c.name for c in conditions]})
        out.results = str(store.root)
        if command_log:
            robot.open_command_log(store.root / "commands" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.jsonl")
        with store.lock():
            store.clean_partial()
            done = store.completed()
            for trial in range(trials):
                for cond in conditions:
                    key = EpisodeKey(cond.name, config.task, trial)
                    if key.id in done:
                        out.skipped += 1
                        continue
                    try:
                        episode = run_episode(robot, policy, cond, config, cameras, trial=trial)
                    except RobotHalted as e:  # halted before the episode started: nothing to record
                        out.halted = f"{e.rule}: {e.reason}"
                        log.error("robot halted before episode %s could start: %s", key.id, e.reason)
                        return out
                    store.write_episode(episode)
                    out.completed += 1
                    out.episodes.append(key.id)
                    term = episode.summary["termination"]
                    out.terminations[term] = out.terminations.get(term, 0) + 1
                    if robot.halted is not None or term == "camera_error":
                        out.halted = (f"{robot.halted.rule}: {robot.halted.reason}" if robot.halted is not None
                                      else f"camera: {episode.summary['error']}")
                        log.error("sweep stopped after a halt; fix the cause, then rerun to resume")
                        return out
    finally:
        out.wall_s = time.perf_counter() - t_start
        for cam in own_cams:
            with contextlib.suppress(Exception):
                cam.close()
        if own_robot:
            robot.close()
    return out


def _build_policy(spec: str, family: str, seed: int) -> Any:
    if spec == "scripted":
        return UR5ScriptedPolicy(family)
    if spec == "tiny":
        import nnsight_vla as nv

        return nv.tiny(family, seed=seed)
    if spec.startswith("load:"):
        import nnsight_vla as nv

        return nv.load(family, spec[5:])
    raise RobotConfigError(f"--policy must be 'scripted', 'tiny' or 'load:<checkpoint>', got {spec!r}")


def run_cli(host: str, armed: bool = False, config: str | os.PathLike | None = None, *, policy: str = "scripted",
            family: str = "pi0", instruction: str | None = None, task: str | None = None,
            conditions: str = "baseline", steps: int | None = None, trials: int = 1,
            results: str = "runs/ur5", cameras: str | None = None, expected_model: str | None = None,
            verbose: bool = False) -> SweepResult:
    """``nnsight-vla ur5 run``: a sweep on the robot at ``host`` (a dry run unless ``armed``).

    ``config``: YAML/JSON with ``robot:`` (:class:`UR5Config`) and ``safety:`` (:class:`SafetyConfig`) sections.
    ``cameras="twin"`` uses the controller twin's renders (``scene`` for base/primary, ``wrist``).
    Returns the :class:`SweepResult`; raises :class:`RobotError` for setup problems and ``SystemExit(3)`` after a
    halt (the reason is printed). Figures are the caller's (``reports.plots.plot_all(result.results, ...)``): the
    environments layer does not import the reports layer."""
    for name, value in (("steps", steps), ("trials", trials)):  # refused before anything connects
        if value is not None and not is_count(value):
            raise RobotConfigError(f"--{name} must be an int >= 1, got {value!r}")
    logging.basicConfig(level=logging.INFO if verbose or not armed else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ur5_cfg, safety = load_config(config)
    changes: dict[str, Any] = {}
    if instruction:
        changes["instruction"] = instruction
    if task:
        changes["task"] = task
    if steps is not None:
        changes["max_steps"] = steps
    if expected_model:
        changes["expected_model"] = expected_model
    if cameras == "twin":
        changes["cameras"] = {"primary": "twin:scene", "base": "twin:scene", "wrist": "twin:wrist"}
    elif cameras:
        changes["cameras"] = dict(item.split("=", 1) for item in cameras.split(","))
    if changes:
        ur5_cfg = replace(ur5_cfg, **changes)
    pol = _build_policy(policy, family, ur5_cfg.seed)
    conds = parse_conditions([conditions], d_mlp=getattr(pol, "d_mlp", None)) if conditions.strip() else [baseline()]
    if not armed:
        print(f"DRY RUN on {host}: commands are checked and logged, nothing is sent (use --armed to move the arm)")
    res = run_conditions(pol, conds, ur5_cfg, results, host=host, armed=armed, safety=safety, trials=trials)
    print(f"{res.completed} episode(s) written to {res.results} ({res.skipped} already there); "
          f"terminations: {res.terminations}")
    if res.halted:
        print(f"ROBOT HALTED: {res.halted}")
        raise SystemExit(3)
    return res
