"""Does the trained policy do the task when its own actions feed back? A few unsteered episodes in the arm scene.

Token accuracy on held-out frames does not answer it: a policy can score well one step at a time and still drift
out of the demonstrations' states in closed loop, where no steering result means anything. The check runs on
development scenes (neither the gates' nor the experiment's evaluation seeds) and states its thresholds.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DEV_SEED = 4000            # scenes 4000.. : apart from the gates' (3000..) and the evaluation seeds (20000..)
MIN_SUCCESS_RATE = 0.1     # the shipped policy: 0.275 at baseline over the 40 evaluation scenes
MAX_HEIGHT_FACTOR = 1.5    # median highest point at most 1.5 x the demonstrations' "high" transport height


def closed_loop_check(vla: Any, trials: int = 16, max_steps: int = 45, seed: int = DEV_SEED) -> dict:
    """Run ``trials`` unsteered episodes of ``vla`` (trial k: scene ``seed + k``, the task phrasings in turn) and
    return their success rate, the median of each episode's highest point above the table, the mean displacement
    per step, and ``healthy``: success rate >= :data:`MIN_SUCCESS_RATE` and that median height at most
    :data:`MAX_HEIGHT_FACTOR` x the demonstrations' highest transport height."""
    from ..envs.arm_scene import HEIGHTS, TASK, ArmRolloutConfig, ArmSceneEnv
    from ..rollout.conditions import baseline
    from ..rollout.policy import policy_surface
    from .corpus import TASK_BASES

    env = ArmSceneEnv(ArmRolloutConfig(instructions=TASK_BASES, trials=trials, max_steps=max_steps, seed=seed,
                                       image_size=int(vla.image_processor.image_size[0])))
    env.bind(policy_surface(vla))
    summaries = [env.run_episode(vla, baseline(), TASK, trial).summary for trial in range(trials)]
    success = float(np.mean([s["success"] for s in summaries]))
    height = float(np.median([s["max_height_table"] for s in summaries]))
    ceiling = MAX_HEIGHT_FACTOR * HEIGHTS["high"]
    return {"trials": trials, "max_steps": max_steps, "seeds": [seed, seed + trials - 1],
            "success_rate": success, "median_max_height_table": height,
            "mean_disp": float(np.mean([s["mean_disp"] for s in summaries])),
            "thresholds": {"min_success_rate": MIN_SUCCESS_RATE, "max_median_height": ceiling},
            "healthy": bool(success >= MIN_SUCCESS_RATE and height <= ceiling)}
