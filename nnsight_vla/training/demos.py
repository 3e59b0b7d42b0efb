"""Scripted demonstrations in the arm scene, rendered headless: the phase-2 (action) training data.

Each episode draws a speed level (slow / medium / fast) and a height level (low / medium / high), an instruction
that asks for them ("medium" adds no word, so neutral instructions show medium behaviour), and runs the
:class:`~nnsight_vla.envs.arm_scene.ScriptedExpert` with those settings. Half of the episodes execute the
expert's action plus Gaussian noise while recording the clean expert action as the label (DART): the policy
then also sees states slightly off the expert's path and learns to come back.

Episodes are independent and seeded by (seed, episode index), so the data are the same whether they are made
by one process or several.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .. import files
from .corpus import task_instruction

SPEED_LEVELS = ("slow", "medium", "fast")
HEIGHT_LEVELS = ("low", "medium", "high")


@dataclass(frozen=True)
class DemoPlan:
    """One demonstration episode."""

    index: int
    scene_seed: int
    speed: str
    height: str
    instruction: str
    noise: float  # std of the executed-action noise, relative to the speed (0: clean)
    lift: float = 0.0  # metres above the scene's start height (recovery demonstrations)


def plan_demos(n_episodes: int, seed: int = 0, noise: float = 0.3, noisy_fraction: float = 0.5) -> list[DemoPlan]:
    """Balanced plan: the 9 (speed, height) combinations in turn, random phrasings and scene layouts. The scene
    and the noise are drawn apart from the phrasing, so rephrasing the instructions keeps the rendered data."""
    plans = []
    for i in range(int(n_episodes)):
        rng = np.random.default_rng([seed, i, 17])
        speed = SPEED_LEVELS[i % 3]
        height = HEIGHT_LEVELS[(i // 3) % 3]
        scene_seed = int(rng.integers(2**31))
        noisy = rng.random() < noisy_fraction
        instr = task_instruction(np.random.default_rng([seed, i, 18]), speed, height)
        plans.append(DemoPlan(index=i, scene_seed=scene_seed, speed=speed, height=height, instruction=instr.text,
                              noise=float(noise) if noisy else 0.0))
    return plans


def plan_recovery_demos(n_episodes: int, seed: int = 0, first_index: int = 0, noise: float = 0.3,
                        lift: tuple[float, float] = (0.15, 0.5), noisy_fraction: float = 0.5) -> list[DemoPlan]:
    """Episodes that start ``lift`` (uniform range, metres) above the usual start, so the expert first comes
    down to the transport height: states a policy reaches when it overshoots, which the ordinary demonstrations
    (rising from near the table) never show. Same level cycle and phrasing as :func:`plan_demos`, own random
    streams; indices from ``first_index`` (after the ordinary episodes)."""
    plans = []
    for k in range(int(n_episodes)):
        i = int(first_index) + k
        rng = np.random.default_rng([seed, i, 19])
        speed = SPEED_LEVELS[k % 3]
        height = HEIGHT_LEVELS[(k // 3) % 3]
        scene_seed = int(rng.integers(2**31))
        noisy = rng.random() < noisy_fraction
        up = float(rng.uniform(*lift))
        instr = task_instruction(np.random.default_rng([seed, i, 20]), speed, height)
        plans.append(DemoPlan(index=i, scene_seed=scene_seed, speed=speed, height=height, instruction=instr.text,
                              noise=float(noise) if noisy else 0.0, lift=up))
    return plans


def physical_plan(plan: DemoPlan) -> dict:
    """What decides an episode's frames and actions (everything but the instruction's wording). A zero ``lift``
    is left out, so the rendered caches of plans made before the field existed stay valid."""
    return {k: v for k, v in asdict(plan).items() if k != "instruction" and not (k == "lift" and v == 0.0)}


def merge_demos(first: dict, second: dict) -> dict:
    """Two demonstration sets as one; the second's episode numbers follow the first's."""
    offset = len(first["episodes"])
    merged = {k: np.concatenate([first[k], second[k]]) for k in first if k not in ("episodes", "episode")}
    merged["episode"] = np.concatenate([first["episode"], second["episode"] + offset])
    merged["episodes"] = list(first["episodes"]) + list(second["episodes"])
    return merged


def _run_episode(scene, plan: DemoPlan, max_steps: int) -> dict:
    from ..envs.arm_scene import HEIGHTS, SPEEDS, ScriptedExpert

    expert = ScriptedExpert(speed=SPEEDS[plan.speed], height=HEIGHTS[plan.height], hover=scene.config.hover)
    rng = np.random.default_rng([plan.scene_seed, 99])
    obs = scene.reset(plan.scene_seed, lift=plan.lift)
    images, actions, eef, target = [], [], [], []
    for _ in range(max_steps):
        action = expert(obs)
        images.append(obs["image"])
        actions.append(action)
        eef.append(obs["eef_pos"])
        target.append(obs["target_pos"])
        executed = action.copy()
        if plan.noise > 0:
            executed[:3] += rng.normal(0.0, plan.noise * expert.speed, size=3)
        obs = scene.step(executed)
        if scene.success(obs):
            break
    return {"images": np.stack(images), "actions": np.stack(actions).astype(np.float32),
            "eef": np.stack(eef).astype(np.float32), "target": np.stack(target).astype(np.float32),
            "success": scene.success(obs)}


_WORKER_SCENE = None


def _worker_init(image_size: int) -> None:
    global _WORKER_SCENE
    from ..envs.arm_scene import ArmScene, SceneConfig

    _WORKER_SCENE = ArmScene(SceneConfig(image_size=image_size))


def _worker_run(args) -> dict:
    plan, max_steps = args
    return _run_episode(_WORKER_SCENE, plan, max_steps)


def collect_demos(plans: list[DemoPlan], image_size: int, max_steps: int = 60, workers: int = 1,
                  progress: bool = True) -> dict:
    """Run the planned episodes; return flat per-step arrays plus per-episode records.

    Returns a dict with ``images`` (N, H, W, 3) uint8, ``actions`` (N, 7) float32 (the expert's clean actions),
    ``episode`` (N,), ``step`` (N,), ``eef`` / ``target`` (N, 3), and ``episodes`` (list of dicts: the plan plus
    ``steps`` and ``success``).
    """
    from tqdm.auto import tqdm

    jobs = [(p, max_steps) for p in plans]
    bar = tqdm(total=len(jobs), desc="demonstrations", disable=not progress, unit="ep", mininterval=10)
    results = []
    if workers <= 1:
        _worker_init(image_size)
        for job in jobs:
            results.append(_worker_run(job))
            bar.update()
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_worker_init, initargs=(image_size,)) as pool:
            for res in pool.imap(_worker_run, jobs, chunksize=4):  # ordered: same data as one process
                results.append(res)
                bar.update()
    bar.close()
    episodes = []
    for plan, res in zip(plans, results):
        episodes.append({**asdict(plan), "steps": int(len(res["actions"])), "success": bool(res["success"])})
    return {
        "images": np.concatenate([r["images"] for r in results]),
        "actions": np.concatenate([r["actions"] for r in results]),
        "eef": np.concatenate([r["eef"] for r in results]),
        "target": np.concatenate([r["target"] for r in results]),
        "episode": np.concatenate([np.full(len(r["actions"]), i, np.int32) for i, r in enumerate(results)]),
        "step": np.concatenate([np.arange(len(r["actions"]), dtype=np.int32) for r in results]),
        "episodes": episodes,
    }


def save_demos(path: str | os.PathLike, demos: dict) -> Path:
    """Write demonstrations to one NPZ (atomically); episode records go in as JSON text."""
    path = Path(path)
    arrays = {k: v for k, v in demos.items() if k != "episodes"}
    with files.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays, episodes_json=np.array(json.dumps(demos["episodes"])))
    return path


def load_demos(path: str | os.PathLike) -> dict:
    """Read what :func:`save_demos` wrote."""
    with np.load(path, allow_pickle=False) as data:
        out = {k: data[k] for k in data.files if k != "episodes_json"}
        out["episodes"] = json.loads(str(data["episodes_json"]))
    return out
