"""Batched ``predict_action`` vs one call per observation, on the medium models (issue 16's CPU target).

For N observations (different images, instructions of different lengths), one repetition times N single calls and
one batched call on the same observations, in a shuffled order; the figure is the median of per-repetition
ratios (N single calls / one batched call): how much faster a policy server answers N waiting workers by batching.
Every repetition also checks that the batched actions equal the single calls' per element (max |difference|).
Target: >= 1.5x at N = 8 on the medium OpenVLA (CPU). Results: ``benchmarks/results/batching.json``.

    python benchmarks/bench_batching.py [--sizes 1 4 8 16] [--reps 5] [--threads 1] [--families openvla pi0 pi0-fast]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

import nnsight_vla as nv

from bench_steering import MEDIUM

RESULTS = Path(__file__).resolve().parent / "results" / "batching.json"
WORDS = ["pick up the black bowl", "open the top drawer of the cabinet and put the bowl inside",
         "push the plate to the front of the stove", "put the cream cheese in the bowl",
         "turn on the stove and put the moka pot on it", "go"]


def observations(vla, n: int, seed: int = 0) -> tuple[list, list[str], list | None, dict, list[dict]]:
    """n observations in the family's batched form, and each one's single-call keyword arguments."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(n)]
    instructions = [WORDS[i % len(WORDS)] for i in range(n)]
    if vla.family != "openvla":
        images = [{name: img for name in vla.camera_names} for img in images]
    states = [rng.uniform(-0.5, 0.5, vla.state_dim).astype(np.float32) for _ in range(n)] if vla.state_dim else None
    if vla.family == "openvla":
        batched, single = {"unnorm_key": False}, [{"unnorm_key": False} for _ in range(n)]
    elif vla.family == "pi0":
        batched, single = {"seed": list(range(n))}, [{"seed": i} for i in range(n)]
    else:  # pi0-FAST: a fixed number of generated tokens, so random weights cost the same per call
        batched, single = {"stop_at_eos": False}, [{"stop_at_eos": False} for _ in range(n)]
    return images, instructions, states, batched, single


def measure(vla, n: int, reps: int) -> dict:
    images, instructions, states, batched_kw, single_kw = observations(vla, n)

    def singles() -> np.ndarray:
        return np.stack([vla.predict_action(images[i], instructions[i],
                                            **({} if states is None else {"state": states[i]}), **single_kw[i])
                         for i in range(n)])

    def batched() -> np.ndarray:
        return np.asarray(vla.predict_action(images, instructions,
                                             **({} if states is None else {"state": states}), **batched_kw))

    singles(), batched()  # warm-up
    times: dict[str, list[float]] = {"singles": [], "batched": []}
    max_diff = 0.0
    for _ in range(reps):
        order = ["singles", "batched"]
        random.shuffle(order)
        out = {}
        for name in order:
            t = time.perf_counter()
            out[name] = singles() if name == "singles" else batched()
            times[name].append(time.perf_counter() - t)
        max_diff = max(max_diff, float(np.max(np.abs(out["singles"] - out["batched"]))))
    ratios = [s / b for s, b in zip(times["singles"], times["batched"])]
    return {"n": n, "reps": reps, "singles_s": float(np.median(times["singles"])),
            "batched_s": float(np.median(times["batched"])), "speedup": float(np.median(ratios)),
            "observations_per_s_batched": n / float(np.median(times["batched"])),
            "max_abs_diff": max_diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="observations per batch")
    ap.add_argument("--reps", type=int, default=5, help="paired repetitions per size")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--families", nargs="+", default=list(MEDIUM), help="families to measure")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    logging.getLogger("nnsight_vla").setLevel(logging.ERROR)  # random pi0-FAST weights do not decode (logged)
    rows = []
    for family in args.families:
        vla = nv.tiny(family, seed=0, **MEDIUM[family])
        for n in args.sizes:
            row = {"family": family, "size": "medium", **measure(vla, n, args.reps)}
            print(f"{family:9s} N={n:3d}: {row['singles_s']:.3f} s one at a time, {row['batched_s']:.3f} s batched "
                  f"-> {row['speedup']:.2f}x (max |diff| {row['max_abs_diff']:.2e})", flush=True)
            rows.append(row)
        del vla
    result = {"benchmark": "batching", "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__, "load_average": os.getloadavg()},
              "target": "speedup >= 1.5 at N = 8 on the medium OpenVLA (CPU)", "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
