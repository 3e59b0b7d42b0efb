"""The one sweep loop: every (condition, task, trial) episode not yet in a results folder, run and committed.

An :class:`Environment` (LIBERO, the arm scene, a UR5) says which episodes exist and runs one; an executor
(:mod:`nnsight_vla.rollout.executors`) decides where episodes run. The driver process is the only writer of the
results folder, so resume works the same in every mode: committed episodes are skipped, a killed worker's
episode is run again, and a folder made with another configuration is refused.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..errors import InputError
from .conditions import Condition, check_unique
from .policy import PolicySpec, PolicySurface, policy_identity, policy_surface
from .records import Episode, EpisodeKey
from .store import ResultsStore


class Environment(Protocol):
    """What a simulator or robot offers the sweep. Parallel executors pickle it into workers (an environment that
    cannot run in another process sets ``parallel = False``)."""

    kind: str
    parallel: bool

    def bind(self, surface: PolicySurface) -> None:
        """Check the policy fits (cameras, state, action size) and fix every detail that depends on it."""

    def identity(self) -> dict:
        """Everything that defines an episode (stored in the manifest; a folder refuses another value)."""

    def episodes(self) -> list[tuple[Any, int]]:
        """The (task, trial) pairs of the sweep."""

    def run_episode(self, policy: Any, condition: Condition, task: Any, trial: int) -> Episode:
        """Run one episode (the condition's context applied around the policy's calls) and return it."""

    def close(self) -> None:
        """Free simulators, windows, connections (the sweep calls it when it ends)."""

    # optional: ``stop_reason() -> str | None``, asked after each committed episode; a reason ends the sweep


@dataclass(frozen=True)
class EpisodeJob:
    condition: Condition
    task: Any
    trial: int

    @property
    def key(self) -> EpisodeKey:
        return EpisodeKey(self.condition.name, self.task, self.trial)


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
    stopped: str | None = None  # why the environment stopped the sweep early (e.g. a robot halt)

    @property
    def steps_per_s(self) -> float:
        return self.env_steps / self.wall_s if self.wall_s > 0 else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "steps_per_s": self.steps_per_s}

    def __str__(self) -> str:
        s = (f"{self.completed} episodes run, {self.skipped} already done, {len(self.failed)} failed "
             f"(of {self.total}); {self.env_steps} policy steps in {self.wall_s:.1f} s = "
             f"{self.steps_per_s:.2f} steps/s; results in {self.results}")
        s += f"; {self.worker_restarts} worker restart(s)" if self.worker_restarts else ""
        return s + (f"; STOPPED: {self.stopped}" if self.stopped else "")


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
        if enabled and len(conditions) <= self.MAX_BARS and self.overall.isatty():
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

    def write(self, message: str) -> None:
        self.overall.write(message)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.overall.close()


class _Stop(Exception):
    """Raised by the commit callback when the environment asks the sweep to stop."""


def sweep_jobs(env: Environment, conditions: Sequence[Condition]) -> list[EpisodeJob]:
    """Every episode of a sweep, trial-major so that an interrupted sweep has balanced conditions."""
    pairs = env.episodes()
    if not pairs:
        raise InputError("the environment has no episodes to run (no tasks or zero trials)")
    return [EpisodeJob(c, task, trial) for task, trial in pairs for c in conditions]


def run_sweep(
    env: Environment,
    policy: Any,
    conditions: Sequence[Condition],
    results: Any,
    *,
    executor: Any = None,
    progress: bool = True,
    on_episode: Callable[[Episode, SweepReport], None] | None = None,
    run_info: Mapping | None = None,
) -> SweepReport:
    """Run every episode of ``env`` under every condition that ``results`` does not hold yet.

    Args:
        env: the :class:`Environment` (its episodes, its identity).
        policy: a policy object, or a :class:`~nnsight_vla.rollout.policy.PolicySpec` that workers build from.
        conditions: the conditions compared (unique names).
        results: the results folder (created; resumed when it holds episodes of the same configuration).
        executor: :class:`~nnsight_vla.rollout.executors.Inline` (default), ``Processes(...)`` or ``Ray(...)``.
        progress: progress bars with per-condition rates.
        on_episode: called in the driver after each committed episode.
        run_info: free description of this run, appended to the manifest.

    Returns a :class:`SweepReport`; episodes that raised are listed in ``report.failed`` (not committed; a rerun
    retries them). Errors that would repeat in every episode (bad input, a broken model output) stop the sweep.
    """
    from .executors import Inline

    conditions = list(conditions)
    check_unique(conditions)
    executor = executor or Inline()
    if not getattr(env, "parallel", True) and not isinstance(executor, Inline):
        raise InputError(f"the {env.kind} environment runs in this process only (executor=Inline())")
    surface = _surface(env, policy)
    env.bind(surface)
    try:
        return _sweep(env, policy, conditions, results, executor, progress, on_episode, run_info)
    finally:
        env.close()


def sweep_identity(env, policy) -> dict:
    """What defines the episodes of ``env`` run with ``policy`` (a results folder's manifest ``config``)."""
    return {**env.identity(), "policy": policy_identity(policy)}


def _sweep(env, policy, conditions, results, executor, progress, on_episode, run_info) -> SweepReport:
    identity = sweep_identity(env, policy)
    jobs = sweep_jobs(env, conditions)
    info = {"episodes": len(jobs), "executor": executor.describe(), "conditions": [c.name for c in conditions],
            **dict(run_info or {})}
    holder = ResultsStore(results)
    holder.check_usable()
    with holder.lock():  # one sweep per folder, from the manifest check to the last commit
        store = ResultsStore.create(results, identity, [c.to_dict() for c in conditions], kind=env.kind,
                                    run_info=info)
        store.clean_partial()
        store.check()  # resume only on top of episodes that can be trusted
        complete = store.completed()
        report = SweepReport(results=str(store.root), total=len(jobs))
        todo, done = [], {}
        for job in jobs:
            if job.key.id in complete:
                report.skipped += 1
                done[job.condition.name] = done.get(job.condition.name, 0) + 1
            else:
                todo.append(job)
        bars = _Progress(conditions, len(jobs) // max(1, len(conditions)), done, progress)
        t0 = time.perf_counter()

        def commit(episode: Episode) -> None:
            store.write_episode(episode)
            report.completed += 1
            report.env_steps += episode.steps
            bars.update(episode)
            if on_episode is not None:
                on_episode(episode, report)
            stop = getattr(env, "stop_reason", None)
            if stop is not None and stop():
                report.stopped = stop()
                raise _Stop

        def failed(job: EpisodeJob, exc: BaseException) -> None:
            report.failed.append({"episode": job.key.id, "error": f"{type(exc).__name__}: {exc}"})
            bars.write(f"episode {job.key.id} failed: {type(exc).__name__}: {exc}")

        try:
            if todo:
                report.worker_restarts = executor.run(todo, env, policy, store, commit, failed) or 0
        except _Stop:
            bars.write(f"sweep stopped: {report.stopped}; fix the cause, then rerun to resume")
        finally:
            report.wall_s = time.perf_counter() - t0
            bars.close()
    return report


def _surface(env: Environment, policy: Any) -> PolicySurface:
    """The policy's surface; for a spec of a large checkpoint, what the environment assumes for its family
    (workers check the real one before their first episode)."""
    if isinstance(policy, PolicySpec):
        if policy.kind == "load" and hasattr(env, "assumed_surface"):
            return env.assumed_surface(policy.family)
        return policy_surface(policy.build())
    return policy_surface(policy)
