"""Where the sweep's episodes run: in this process, in spawned worker processes, or on a Ray cluster.

Every executor gets the pending jobs, the environment and the policy (or its spec) and calls ``commit`` with
each finished episode in the driver (the results store's only writer) and ``failed`` with each episode that
raised. Workers build their own environment and policy once and reuse them; ``Processes(policy_server=True)``
keeps one model in a server process for all simulator workers (one GPU, many CPU simulators).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing as mp
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..errors import InputError, VLAError
from .policy import PolicySpec, policy_surface
from .records import Episode
from .sweep import EpisodeJob

_WORKER: dict = {}  # per-process cache: env, policy, whether the policy was checked against the env


def _env_vars(threads: int) -> dict:
    keep = {k: os.environ[k] for k in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "MUJOCO_EGL_DEVICE_ID") if k in os.environ}
    return {**keep, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def _payload(obj: Any, what: str) -> bytes:
    try:
        return pickle.dumps(obj)
    except Exception as exc:
        hint = ("pass a PolicySpec (e.g. PolicySpec('load', 'openvla', source=...)) so each worker builds its own "
                "copy" if what == "policy" else "use executor=Inline()")
        raise InputError(
            f"the {what} ({type(obj).__name__}) cannot be sent to worker processes ({exc}); {hint}") from None


def run_job(job: EpisodeJob, env: Any, policy: Any, cache: dict) -> Episode:
    """Run one job with a (cached) environment and policy; the real policy is checked against what the driver
    assumed before the first episode."""
    if cache.get("checked") is not policy:
        verify = getattr(env, "verify", None)
        if verify is not None:
            verify(policy_surface(policy))
        cache["checked"] = policy
    episode = env.run_episode(policy, job.condition, job.task, job.trial)
    episode.meta.setdefault("pid", os.getpid())
    return episode


def _worker_init(env_payload: bytes, policy_payload: bytes, env_vars: Mapping[str, str], threads: int) -> None:
    os.environ.update(env_vars)
    for name in ("env", "policy", "checked"):
        _WORKER.pop(name, None)
    _WORKER.update(env_payload=env_payload, policy_payload=policy_payload, threads=threads)


def _worker_state() -> tuple[Any, Any]:
    if "policy" not in _WORKER:
        threads = _WORKER.get("threads") or 0
        if threads:
            with contextlib.suppress(ImportError):
                import torch

                torch.set_num_threads(threads)
        obj = pickle.loads(_WORKER["policy_payload"])
        # a PolicySpec, or a policy-server client (its class has build()); never ask a model instance for
        # attributes it lacks (nnsight forwards unknown names to the torch module)
        _WORKER["policy"] = obj.build() if callable(getattr(type(obj), "build", None)) else obj
        _WORKER["env"] = pickle.loads(_WORKER["env_payload"])
    return _WORKER["env"], _WORKER["policy"]


def _worker_run(job: EpisodeJob) -> Episode:
    """Entry point of a worker process (process pool and Ray)."""
    env, policy = _worker_state()
    return run_job(job, env, policy, _WORKER)


@dataclass(frozen=True)
class Inline:
    """Run every episode in this process, one after the other (the only choice for a real robot)."""

    def describe(self) -> dict:
        return {"executor": "inline"}

    def run(self, jobs, env, policy, store, commit: Callable, failed: Callable) -> int:
        local = policy.build() if isinstance(policy, PolicySpec) else policy
        cache: dict = {}
        for job in jobs:
            try:
                episode = run_job(job, env, local, cache)
            except (KeyboardInterrupt, VLAError):  # systematic (bad input, broken model output): stop, say why
                raise
            except Exception as exc:  # a crashing episode must not take the sweep down
                failed(job, exc)
                continue
            commit(episode)
        return 0


@dataclass(frozen=True)
class Processes:
    """Run episodes in ``workers`` spawned processes on this machine (``threads`` torch threads each); a dead
    pool is replaced up to ``max_restarts`` times. ``policy_server``: one server process owns the model and
    answers every worker (see :mod:`nnsight_vla.rollout.server`), batching requests of the same condition that
    arrive within ``max_wait_s`` up to ``max_batch``."""

    workers: int
    threads: int = 1
    max_restarts: int = 3
    policy_server: bool = False
    max_batch: int = 1
    max_wait_s: float = 0.005

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise InputError(f"workers must be an int >= 1, got {self.workers!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"threads must be an int >= 1, got {self.threads!r}")
        if not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InputError(f"max_batch must be an int >= 1, got {self.max_batch!r}")
        if not self.max_wait_s >= 0:
            raise InputError(f"max_wait_s must be >= 0, got {self.max_wait_s!r}")

    def describe(self) -> dict:
        return {"executor": "processes", "workers": self.workers, "threads": self.threads,
                "policy_server": self.policy_server, "max_batch": self.max_batch}

    def run(self, jobs, env, policy, store, commit: Callable, failed: Callable) -> int:
        from concurrent.futures.process import BrokenProcessPool

        server = None
        if self.policy_server:
            from .server import PolicyServer

            server = PolicyServer(policy, max_batch=self.max_batch, max_wait_s=self.max_wait_s)
            policy_payload = pickle.dumps(server.client())
        else:
            policy_payload = _payload(policy, "policy")
        env_payload = _payload(env, "environment")
        restarts = 0
        pending = list(jobs)
        ctx = mp.get_context("spawn")
        try:
            while pending:
                pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_worker_init,
                                              initargs=(env_payload, policy_payload, _env_vars(self.threads),
                                                        self.threads))
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
                    if pending and restarts >= self.max_restarts:
                        raise VLAError(
                            f"worker processes died {restarts + 1} times (killed or out of memory?); committed "
                            f"episodes are safe in {store.root}; {len(pending)} remain: rerun the same command to "
                            "resume"
                        )
                    if pending:
                        restarts += 1
        finally:
            if server is not None:
                server.close()
        return restarts


@dataclass(frozen=True)
class Ray:
    """Run episodes as Ray tasks (``workers`` at a time) on the cluster at ``address`` (None: a local Ray started
    for the sweep and stopped after it)."""

    workers: int
    address: str | None = None
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise InputError(f"workers must be an int >= 1, got {self.workers!r}")

    def describe(self) -> dict:
        return {"executor": "ray", "workers": self.workers, "threads": self.threads}

    def run(self, jobs, env, policy, store, commit: Callable, failed: Callable) -> int:
        try:
            import ray
        except ImportError:
            raise InputError("the Ray executor needs Ray: pip install 'nnsight-vla[cluster]'") from None
        started = False
        if not ray.is_initialized():
            kwargs = {"address": self.address} if self.address else {"num_cpus": self.workers,
                                                                       "include_dashboard": False}
            ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
            started = True
        try:
            env_ref = ray.put(_payload(env, "environment"))
            policy_ref = ray.put(_payload(policy, "policy"))
            remote = ray.remote(num_cpus=self.threads, max_retries=3, retry_exceptions=False)(_ray_entry)
            in_flight: dict = {}
            queue = list(jobs)
            while queue or in_flight:
                while queue and len(in_flight) < self.workers:
                    job = queue.pop(0)
                    in_flight[remote.remote(job, env_ref, policy_ref, _env_vars(self.threads), self.threads)] = job
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
        return 0


def _ray_entry(job: EpisodeJob, env_payload: bytes, policy_payload: bytes, env_vars: Mapping[str, str],
               threads: int) -> Episode:
    # Ray resolves the object refs to bytes; its workers are reused, so the cache is kept per payload
    if _WORKER.get("policy_payload") != policy_payload or _WORKER.get("env_payload") != env_payload:
        _worker_init(env_payload, policy_payload, env_vars, threads)
    os.environ.update(env_vars)
    return _worker_run(job)
