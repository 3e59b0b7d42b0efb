"""Closed-loop rollouts of the trained VLA in the arm scene, under experimental conditions, logged with the
shared episode recorder (:mod:`nnsight_vla.envs.episodes`) into a resumable results folder.

Each step: render the scene camera, ``vla.predict_action(image, condition.instruction(text),
restrict_to_action_tokens=True)`` inside ``condition.context(vla)`` (e.g. a ``Steering.apply``), execute the
7-dim action, record the end-effector position. An episode ends when the gripper rests above the target
(success) or after ``max_steps``.

Why ``restrict_to_action_tokens=True``: steering concept neurons may make the model prefer a *word* (e.g.
"fast") over any action token; OpenVLA's published decoding would map such a token to an extreme clipped bin,
which would fake a large motion. Taking the best action token measures what the steering does to the action.

Trials are paired across conditions: trial ``k`` uses the same scene layout (seed ``seed + k``) and the same
neutral instruction (``TASK_BASES[k % 8]``) in every condition, so differences come from the condition alone.
Episodes can be spread over worker processes (``workers``); the driver is the only writer of the results.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..envs.conditions import Condition
from ..envs.episodes import Episode, EpisodeKey, EpisodeRecorder, ResultsStore

TASK = "arm_reach"


@dataclass(frozen=True)
class RolloutConfig:
    """What defines an episode (stored in the results manifest)."""

    model: str  # checkpoint folder
    max_steps: int = 60
    seed: int = 1000
    image_size: int = 64
    restrict_to_action_tokens: bool = True
    robot: str = "Panda"

    def to_dict(self) -> dict:
        from ..envs.arm_scene import SceneConfig

        return {**asdict(self), "scene": asdict(SceneConfig(image_size=self.image_size)), "task": TASK}


def trial_instruction(trial: int) -> str:
    """The neutral instruction of trial ``trial``."""
    from .corpus import TASK_BASES

    return TASK_BASES[int(trial) % len(TASK_BASES)]


def run_episode(vla, scene, condition: Condition, trial: int, config: RolloutConfig) -> Episode:
    """One closed-loop episode of ``condition``, trial ``trial``."""
    text = trial_instruction(trial)
    instruction = condition.instruction(text)
    obs = scene.reset(config.seed + int(trial))
    key = EpisodeKey(condition.name, TASK, int(trial))
    recorder = EpisodeRecorder(key, obs["eef_pos"], meta={
        "instruction": instruction, "base_instruction": text, "scene_seed": config.seed + int(trial),
        "target_pos": obs["target_pos"].tolist(), "table_z": obs["table_z"],
    })
    success = False
    with condition.context(vla):
        for _ in range(config.max_steps):
            t0 = time.perf_counter()
            action = np.asarray(vla.predict_action(
                obs["image"], instruction, restrict_to_action_tokens=config.restrict_to_action_tokens))
            t1 = time.perf_counter()
            obs = scene.step(action)
            t2 = time.perf_counter()
            success = scene.success(obs)
            recorder.record(obs["eef_pos"], action, policy_call=True, policy_s=t1 - t0, env_s=t2 - t1,
                            reward=float(success), done=success)
            if success:
                break
    episode = recorder.finish(success)
    z = np.asarray(episode.columns["eef_z"], np.float64)
    table = float(obs["table_z"])
    episode.summary.update({
        "max_height_table": float(z.max() - table) if len(z) else float("nan"),
        "mean_height_table": float(z.mean() - table) if len(z) else float("nan"),
        "final_lateral_error": float(abs(obs["eef_pos"][1] - obs["target_pos"][1])),
    })
    return episode


# -- running many episodes ----------------------------------------------------------------------------------------

_W: dict = {}


def _worker_init(config_dict: dict) -> None:
    import torch

    torch.set_num_threads(1)
    config = RolloutConfig(**{k: v for k, v in config_dict.items() if k in RolloutConfig.__dataclass_fields__})
    _W["config"] = config
    _W["vla"], _W["scene"] = _load(config)


def _load(config: RolloutConfig):
    import nnsight_vla as nv

    from ..envs.arm_scene import ArmScene, SceneConfig

    vla = nv.load("openvla", config.model, dispatch=True)
    scene = ArmScene(SceneConfig(image_size=config.image_size), robot=config.robot)
    return vla, scene


def _worker_run(job) -> Episode:
    condition_dict, trial = job
    return run_episode(_W["vla"], _W["scene"], condition_from_dict(condition_dict), trial, _W["config"])


def condition_from_dict(data: dict) -> Condition:
    """Rebuild a :class:`Condition` from ``Condition.to_dict()`` (steering via ``steering_from_dict``)."""
    steering = None
    if data.get("steering") is not None:
        from ..steering import steering_from_dict

        steering = steering_from_dict(data["steering"])
    return Condition(data["name"], steering=steering, prompt=data.get("prompt"), kind=data.get("kind", ""),
                     concept=data.get("concept"), alpha=data.get("alpha"), layers=data.get("layers"))


def run_conditions(
    store: ResultsStore,
    conditions: Sequence[Condition],
    trials: int,
    config: RolloutConfig,
    workers: int = 1,
    progress: bool = True,
    vla=None,
    scene=None,
) -> int:
    """Run ``trials`` episodes of every condition not yet in ``store``; returns how many episodes ran.

    ``workers > 1`` spreads episodes over spawned processes (each loads the model and a scene); otherwise they
    run here (``vla`` / ``scene`` may be passed in to reuse them).
    """
    from tqdm.auto import tqdm

    jobs = [(c, t) for c in conditions for t in range(trials) if not store.is_complete(EpisodeKey(c.name, TASK, t))]
    if not jobs:
        return 0
    bar = tqdm(total=len(jobs), desc="rollouts", unit="ep", disable=not progress, mininterval=10)
    with store.lock():
        if workers <= 1:
            own_scene = scene is None  # a scene made here is closed here (its GL context dies before exit)
            if vla is None:
                vla, scene = _load(config)
            elif scene is None:
                from ..envs.arm_scene import ArmScene, SceneConfig

                scene = ArmScene(SceneConfig(image_size=config.image_size), robot=config.robot)
            try:
                for condition, trial in jobs:
                    store.write_episode(run_episode(vla, scene, condition, trial, config))
                    bar.update()
            finally:
                if own_scene:
                    scene.close()
        else:
            ctx = mp.get_context("spawn")
            payload = [(c.to_dict(), t) for c, t in jobs]
            with ctx.Pool(workers, initializer=_worker_init, initargs=(asdict(config),)) as pool:
                for episode in pool.imap_unordered(_worker_run, payload, chunksize=2):
                    store.write_episode(episode)
                    bar.update()
    bar.close()
    return len(jobs)
