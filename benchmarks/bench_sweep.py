"""The sweep's throughput: episodes per hour with N worker processes (and with the policy server, optionally
batching same-condition requests) against the one-process reference loop, on the same episodes.

    MUJOCO_GL=egl python benchmarks/bench_sweep.py [--workers 2] [--trials 4] [--steps 20] < /dev/null

The policy is the shipped small OpenVLA in the arm scene (steered and unsteered conditions); every mode runs the
same (condition, trial) episodes into its own results folder, and the episodes are checked equal across modes.
Writes ``benchmarks/results/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the parallel modes")
    ap.add_argument("--trials", type=int, default=4, help="episodes per condition")
    ap.add_argument("--steps", type=int, default=20, help="policy steps per episode")
    ap.add_argument("--max-batch", type=int, default=4, help="policy server batching (when the model batches)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sweep.json")
    args = ap.parse_args()

    import torch

    from nnsight_vla.envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
    from nnsight_vla.neurons import NeuronSet
    from nnsight_vla.rollout.conditions import baseline, steered
    from nnsight_vla.rollout.executors import Inline, Processes
    from nnsight_vla.rollout.policy import PolicySpec
    from nnsight_vla.rollout.store import ResultsStore
    from nnsight_vla.rollout.sweep import run_sweep
    from nnsight_vla.steering import Steering
    from nnsight_vla.training import shipped_model, shipped_path
    from nnsight_vla.training.corpus import TASK_BASES

    torch.set_num_threads(1)
    vla = shipped_model(dispatch=True)
    neurons = NeuronSet.for_model(vla, [(vla.num_layers - 1, i) for i in range(8)], name="probe")
    conditions = [baseline(), steered("probe", Steering(neurons, 2.0), alpha=2.0, layers="all")]
    config = ArmRolloutConfig(instructions=TASK_BASES, trials=args.trials, max_steps=args.steps)
    spec = PolicySpec("load", "openvla", source=str(shipped_path("finetuned")))
    modes = {"inline": (vla, Inline()), f"processes({args.workers})": (spec, Processes(args.workers)),
             f"server({args.workers})": (spec, Processes(args.workers, policy_server=True)),
             f"server({args.workers}, batch {args.max_batch})": (
                 spec, Processes(args.workers, policy_server=True, max_batch=args.max_batch))}
    rows, finals = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (policy, executor) in modes.items():
            folder = Path(tmp) / name.replace(" ", "_").replace(",", "")
            t0 = time.perf_counter()
            cpu0 = os.times()
            report = run_sweep(ArmSceneEnv(config), policy, conditions, folder, executor=executor, progress=False)
            wall = time.perf_counter() - t0
            cpu1 = os.times()
            finals[name] = {r["episode_id"]: r["summary"]["final_pos"] for r in ResultsStore.open(folder).records()}
            rows.append({"mode": name, "episodes": report.completed, "wall_s": wall,
                         "episodes_per_hour": 3600 * report.completed / wall,
                         "driver_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system),
                         "children_cpu_s": (cpu1.children_user - cpu0.children_user)
                         + (cpu1.children_system - cpu0.children_system)})
            print(f"{name:28s} {report.completed} episodes in {wall:6.1f} s = {rows[-1]['episodes_per_hour']:7.0f}/h",
                  flush=True)
    reference = rows[0]["episodes_per_hour"]
    for row in rows:
        row["vs_inline"] = row["episodes_per_hour"] / reference
    same = all(finals[name] == finals["inline"] for name in finals)
    result = {"benchmark": "sweep", "when": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
              "loadavg": os.getloadavg(), "platform": platform.platform(), "workers": args.workers,
              "trials": args.trials, "steps": args.steps, "conditions": len(conditions), "rows": rows,
              "episodes_equal_across_modes": same}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({r["mode"]: round(r["vs_inline"], 2) for r in rows}), "episodes equal:", same)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
