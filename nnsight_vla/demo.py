"""The README's first command (``nnsight-vla demo``): the whole method on the shipped small OpenVLA, offline.

Lens (top tokens, action-token share), automatic concept sets for fast / slow / high / low (lexicon kNN with
the opposites filter, no hand-picking), alpha in units of each layer's activation scale, and closed-loop
rollouts in the MuJoCo arm scene on neutral instructions: baseline, each concept steered, a matched random set
for each concept, and the prompt baseline of each word. A table (printed; CSV / JSON / Markdown) and figures go
to ``--out``; rerunning resumes the stored episodes.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

from . import files
from .errors import InputError

MARKER = ".nnsight-vla-demo"
CONCEPTS = ("fast", "slow", "high", "low")


def _stage(message: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:6.1f}s] {message}", flush=True)


def check_output_folder(out: str | os.PathLike) -> Path:
    """The demo writes into a new or empty folder, or one a previous demo wrote (it resumes there); never into
    someone else's files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; choose a folder for the demo's results")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InputError(f"{out} is not empty and was not written by the demo; choose a new or empty folder")
    return out


def run_demo(seed: int = 0, out: str | os.PathLike = "results/demo", trials: int = 4, max_steps: int = 30,
             alpha: Optional[float] = None, model: Optional[str] = None, progress: bool = True) -> dict:
    """Run the demo (see the module docstring); returns the results (also in ``results.json``)."""
    import torch

    from . import models
    from .envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
    from .lens import ValueVectorLens
    from .reports.lens_plots import plot_action_share, plot_token_table
    from .reports.plots import plot_all
    from .rollout.conditions import baseline, prompt_baseline, steered
    from .rollout.stats import episode_values, paired
    from .rollout.store import ResultsStore
    from .rollout.sweep import run_sweep
    from .scale import measure_activation_scale
    from .steering import Steering
    from .training import shipped_path
    from .training.corpus import TASK_BASES
    from .training.experiment import CONCEPT_METRIC, OTHER_METRIC, ExperimentConfig, discover
    from .training.gates import expert_frames, queries

    t0 = time.perf_counter()
    out = check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("results of `nnsight-vla demo`\n")
    torch.set_num_threads(1)
    defaults = ExperimentConfig(layer_subsets=())
    alpha = defaults.alpha if alpha is None else float(alpha)
    if not math.isfinite(alpha):
        raise InputError(f"alpha must be finite, got {alpha}")
    model_path = str(Path(model or shipped_path("finetuned")).resolve())
    vla = models.load("openvla", model_path, dispatch=True)
    _stage(f"loaded {vla.describe()}", t0)

    lens = ValueVectorLens(vla, k=defaults.lens_k, cache_dir=out / "lens", progress=progress)
    share = lens.action_token_share()
    base_path = shipped_path("base") if model is None else None
    base_lens = ValueVectorLens(models.load("openvla", str(base_path), dispatch=True), k=defaults.lens_k,
                                cache_dir=out / "lens", progress=progress) if base_path else None
    plot_action_share(lens, out / "plots" / "action_share.png", base=base_lens)
    _stage("lens: action-token share of the top-10 tokens per layer: "
           + " ".join(f"L{int(r.layer)}={r.share:.2f}" for r in share.itertuples()), t0)

    sets = discover(lens, defaults)["all"]
    for concept, nset in sets.items():
        nset.save(out / "neurons" / f"{concept}.json")
        table = lens.top_tokens(neuron=None, layer=None, k=5)
        keep = set(nset.pairs)
        table = table[[(l, n) in keep for l, n in zip(table.layer, table.neuron)]]
        plot_token_table(table, out / "plots" / f"tokens_{concept}.png", k=5,
                         title=f'value vectors found for "{concept}" (top-5 tokens; red: action token)')
        words = [" ".join(t.strip("▁") for t in lens.vector_tokens(l, n, k=3)) for l, n in nset.pairs[:3]]
        _stage(f'"{concept}": {len(nset)} neurons in layers {nset.layers}; first ones promote: {words}', t0)
    scale = measure_activation_scale(vla, queries(expert_frames(defaults.gate_frames[:2], (0, 8))),
                                     percentile=defaults.percentile, restrict_to_action_tokens=True)
    scale.save(out / "activation_scale.json")
    _stage(f"alpha = {alpha:g} x each layer's p{defaults.percentile:g} of |activation| = "
           + ", ".join(f"L{l}: {alpha * v:.2f}" for l, v in enumerate(scale.values)), t0)

    conditions = [baseline()]
    for concept, nset in sets.items():
        steering = Steering(nset, alpha, scale=scale, name=concept)
        conditions.append(steered(concept, steering, alpha=alpha, layers="all", name=f"{concept}@a{alpha:g}"))
    for i, (concept, nset) in enumerate(sets.items()):
        control = Steering(nset, alpha, scale=scale, name=concept).random_control(seed + i)
        conditions.append(steered(concept, control, alpha=alpha, layers="all", kind="control",
                                  name=f"random[{concept}]@a{alpha:g}"))
    conditions += [prompt_baseline(c) for c in CONCEPTS]
    rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=trials, max_steps=max_steps, seed=1000 + seed,
                               image_size=int(vla.image_processor.image_size[0]))
    _stage(f"rollouts: {len(conditions)} conditions x {trials} episodes x <= {max_steps} steps (neutral "
           f"instructions; scene seeds {rollout.seed}..{rollout.seed + trials - 1})", t0)
    run_sweep(ArmSceneEnv(rollout), vla, conditions, out / "episodes", progress=progress, run_info={"demo": True})
    store = ResultsStore.open(out / "episodes")
    store.check()

    values = {m: episode_values(store, m) for m in ("mean_disp", "max_height_table", "success")}
    rows = []
    for cond in conditions:
        concept = cond.concept if cond.concept in CONCEPTS else None
        metric = CONCEPT_METRIC.get(concept or "", "mean_disp")
        row = {"condition": cond.name, "kind": cond.kind,
               "disp_mm": 1000 * _mean(values["mean_disp"][cond.name]),
               "height_cm": 100 * _mean(values["max_height_table"][cond.name]),
               "success": _mean(values["success"][cond.name])}
        if cond.name != "baseline":
            test = paired(values[metric], cond.name, "baseline")
            row.update(metric=metric, pct=test["pct"], p=test["p"],
                       other_pct=paired(values[OTHER_METRIC[metric]], cond.name, "baseline")["pct"])
        rows.append(row)
    files.write_text(out / "results.csv", _csv(rows))
    files.write_text(out / "RESULTS.md", _markdown(rows, model_path, alpha, defaults.percentile, trials, max_steps))
    plots = [str(p) for p in plot_all(store, out / "plots")]
    results = {"model": model_path, "alpha": alpha, "alpha_unit": scale.to_dict(), "trials": trials,
               "max_steps": max_steps, "seed": seed, "rows": rows,
               "neurons": {c: [list(p) for p in s.pairs] for c, s in sets.items()},
               "controls": {c.concept: [list(p) for p in c.steering.neurons.pairs] for c in conditions
                            if c.kind == "control"},
               "plots": plots, "seconds": time.perf_counter() - t0}
    files.write_text(out / "results.json", json.dumps(results, indent=1, default=float))
    print()
    print(_markdown(rows, model_path, alpha, defaults.percentile, trials, max_steps).split("\n\n", 2)[2])
    _stage(f"wrote {out}/RESULTS.md, results.csv, results.json and {len(plots) + 1 + len(sets)} figures in "
           f"{out}/plots", t0)
    return results


def _mean(values: dict) -> float:
    finite = [v for v in values.values() if v == v]
    return sum(finite) / len(finite) if finite else float("nan")


def _fmt(v, fmt: str) -> str:
    return "" if v is None or v != v else format(v, fmt)


def _markdown(rows: list[dict], model: str, alpha: float, percentile: float, trials: int, max_steps: int) -> str:
    lines = [f"# nnsight-vla demo\n\nModel `{model}`; alpha = {alpha:g} x each layer's p{percentile:g} of "
             f"|activation|; {trials} paired episodes per condition, <= {max_steps} steps.",
             "Δ% is the condition's own metric (fast / slow: displacement per step; high / low: max height) "
             "against the baseline, paired by trial; 'other' is the other metric's Δ%.",
             "| condition | kind | disp/step (mm) | max height (cm) | success | Δ% | p | other Δ% |\n"
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines[-1] += (f"\n| {r['condition']} | {r['kind']} | {r['disp_mm']:.2f} | {r['height_cm']:.1f} | "
                      f"{r['success']:.2f} | {_fmt(r.get('pct'), '+.1f')} | {_fmt(r.get('p'), '.2g')} | "
                      f"{_fmt(r.get('other_pct'), '+.1f')} |")
    return "\n\n".join(lines) + "\n"


def _csv(rows: list[dict]) -> str:
    import csv
    import io

    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
