"""LIBERO runner overhead: the runner's episode loop vs a bare loop doing the same work, in one run.

Both loops reset the same task to the same initial state, run the same settle steps, and then for ``--steps``
steps prepare the camera image with the recipe (rotate, JPEG, resize, crop), call the same policy, map the
gripper and step the environment. The runner additionally applies the condition's context, records every step
(metrics, timings), computes the summary and commits the episode to a results folder (Parquet + JSON, atomic).
The ratio runner / bare is the runner's own overhead (target <= 1.05). Repetitions alternate bare/runner so
load from other processes hits both alike; the reported ``ratio`` is the median of the paired ratios of process
CPU time (rendering runs in-process on CPU, so this counts everything the episode costs and nothing the
neighbours on a shared machine cost); the wall-clock ratio is reported too.

Also reports environment-only steps/s for a few render settings (camera size, anti-aliasing), since rendering
dominates a step on CPU.

    MUJOCO_GL=egl python benchmarks/bench_libero.py [--policy tiny|scripted] [--steps 150] [--reps 3] < /dev/null

Writes ``benchmarks/results/libero.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from nnsight_vla import files  # noqa: E402
from nnsight_vla.envs import libero as L  # noqa: E402
from nnsight_vla.rollout.conditions import baseline  # noqa: E402
from nnsight_vla.rollout.policy import policy_surface  # noqa: E402
from nnsight_vla.rollout.records import environment_versions  # noqa: E402
from nnsight_vla.rollout.store import ResultsStore  # noqa: E402


def bare_episode(task: L.LiberoTask, policy, recipe: L.ResolvedRecipe, cfg: L.LiberoConfig, trial: int):
    """The minimum loop: what any evaluation script must do. Returns (wall s, process CPU s)."""
    t0, c0 = time.perf_counter(), time.process_time()
    env = task.env
    env.seed(L.episode_seed(cfg.seed, task.info.task_id, trial))
    env.reset()
    for robot in env.env.robots:  # same soft-reset hygiene as the runner
        robot.gripper.current_action[:] = 0
    obs = env.set_init_state(task.init_states[trial])
    for _ in range(cfg.settle_steps):
        obs, _, _, _ = env.step(list(L.DUMMY_ACTION))
    cams = recipe.cameras
    instruction = task.info.instruction
    for _ in range(cfg.resolved_max_steps()):
        images = {model: L.prepare_image(obs[f"{cam}_image"], recipe) for model, cam in cams}
        raw = policy.predict_action(images, instruction)
        action = L.map_action(np.asarray(raw).reshape(-1, 7)[0], recipe.gripper)
        obs, _, done, _ = env.step(action.tolist())
        if done:
            break
    return time.perf_counter() - t0, time.process_time() - c0


def runner_episode(task, policy, recipe, cfg, trial, store: ResultsStore):
    t0, c0 = time.perf_counter(), time.process_time()
    episode = L.run_episode(task, policy, recipe, baseline(), trial, cfg)
    store.write_episode(episode)
    return time.perf_counter() - t0, time.process_time() - c0, episode.summary


def env_only_steps_per_s(camera_size: int, offsamples: int | None, cameras, steps: int = 60) -> dict:
    cfg = L.LiberoConfig(suite="libero_10", tasks=(0,), camera_size=camera_size, offsamples=offsamples,
                         hard_reset=False)
    t0 = time.perf_counter()
    task = L.LiberoTask("libero_10", 0, camera_size=camera_size, cameras=cameras, offsamples=offsamples,
                        hard_reset=False)
    create = time.perf_counter() - t0
    t0 = time.perf_counter()
    task.reset(0, 0)
    reset = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        task.step(list(L.DUMMY_ACTION))
    step = (time.perf_counter() - t0) / steps
    task.close()
    del cfg
    return {"camera_size": camera_size, "offsamples": offsamples if offsamples is not None else "default (4)",
            "cameras": list(cameras), "env_create_s": round(create, 2), "soft_reset_s": round(reset, 3),
            "step_s": round(step, 4), "steps_per_s": round(1 / step, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", choices=["tiny", "scripted"], default="tiny")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--camera-size", type=int, default=128)
    ap.add_argument("--offsamples", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "libero.json")
    ap.add_argument("--skip-render-table", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (oversubscribed threads crawl under load)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    if args.policy == "tiny":
        import nnsight_vla as nv

        policy = nv.tiny("openvla", seed=0)
    else:
        policy = L.ScriptedPolicy("openvla", image_size=224)
    cfg = L.LiberoConfig(suite="libero_10", tasks=(0,), trials=1, max_steps=args.steps, camera_size=args.camera_size,
                         offsamples=args.offsamples, hard_reset=False)
    recipe = L.resolve_recipe(cfg, policy_surface(policy))
    t0 = time.perf_counter()
    task = L.task_env(cfg, recipe, 0)
    create_s = time.perf_counter() - t0

    # warm-up (first policy call, caches)
    bare_episode(task, policy, recipe, L.LiberoConfig(**{**cfg.__dict__, "max_steps": 5}), 0)
    pairs, cpu_pairs, bare_times, runner_times, bare_cpu, runner_cpu, summaries = [], [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            store = ResultsStore.create(Path(tmp) / f"r{rep}", {"bench": rep}, [baseline().to_dict()], kind="bench")
            order = ("bare", "runner") if rep % 2 == 0 else ("runner", "bare")
            times = {}
            for which in order:
                if which == "bare":
                    times["bare"], times["bare_cpu"] = bare_episode(task, policy, recipe, cfg, trial=rep % 50)
                else:
                    times["runner"], times["runner_cpu"], summary = runner_episode(task, policy, recipe, cfg,
                                                                                  rep % 50, store)
                    summaries.append(summary)
            bare_times.append(times["bare"])
            runner_times.append(times["runner"])
            bare_cpu.append(times["bare_cpu"])
            runner_cpu.append(times["runner_cpu"])
            pairs.append(times["runner"] / times["bare"])
            cpu_pairs.append(times["runner_cpu"] / times["bare_cpu"])
            print(f"rep {rep}: bare {times['bare']:.2f} s ({times['bare_cpu']:.2f} s CPU), runner "
                  f"{times['runner']:.2f} s ({times['runner_cpu']:.2f} s CPU), ratio wall {pairs[-1]:.3f} "
                  f"CPU {cpu_pairs[-1]:.3f}", flush=True)
    L.close_envs()
    total_steps = args.steps + cfg.settle_steps
    result = {
        "benchmark": "libero runner overhead vs bare env stepping + the same policy call",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_avg_1min": os.getloadavg()[0]},
        "versions": environment_versions(),
        "policy": args.policy, "torch_threads": args.threads, "suite": "libero_10", "task": 0,
        "policy_steps": args.steps,
        "settle_steps": cfg.settle_steps, "camera_size": args.camera_size, "offsamples": args.offsamples,
        "image_size": list(recipe.image_size), "reps": args.reps,
        "env_create_s": round(create_s, 2),
        "bare_s": [round(t, 3) for t in bare_times],
        "runner_s": [round(t, 3) for t in runner_times],
        "bare_cpu_s": [round(t, 3) for t in bare_cpu],
        "runner_cpu_s": [round(t, 3) for t in runner_cpu],
        "ratio_pairs_wall": [round(r, 4) for r in pairs],
        "ratio_pairs_cpu": [round(r, 4) for r in cpu_pairs],
        # process CPU time is what the runner adds; wall time on a shared machine also measures the neighbours
        "ratio": round(statistics.median(cpu_pairs), 4),
        "ratio_cpu_of_medians": round(statistics.median(runner_cpu) / statistics.median(bare_cpu), 4),
        "ratio_wall": round(statistics.median(pairs), 4),
        "target_ratio": 1.05,
        "runner_steps_per_s_incl_reset_and_settle": round(total_steps / statistics.median(runner_times), 2),
        "runner_policy_steps_per_s": round(statistics.median(s["steps_per_s"] for s in summaries), 2),
        "policy_s_per_call": round(statistics.median(s["policy_s"] / max(1, s["policy_calls"]) for s in summaries), 4),
        "env_s_per_step": round(statistics.median(s["env_s"] / max(1, s["steps"]) for s in summaries), 4),
    }
    if not args.skip_render_table:
        result["env_only"] = [
            env_only_steps_per_s(256, None, ("agentview", "robot0_eye_in_hand")),  # openpi / two cameras
            env_only_steps_per_s(256, None, ("agentview",)),  # the OpenVLA recipe: one camera at 256 px
            env_only_steps_per_s(256, 0, ("agentview",)),
            env_only_steps_per_s(128, 0, ("agentview",)),
            env_only_steps_per_s(64, 0, ("agentview",)),
        ]
    files.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("ratio", "ratio_cpu_of_medians", "ratio_wall", "runner_policy_steps_per_s",
                                             "env_create_s")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
