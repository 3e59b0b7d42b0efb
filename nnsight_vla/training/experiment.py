"""The pre-registered experiment on the trained VLA (``nnsight-vla experiment``), with no hand-picked neurons:
lens and concept sets (lexicon kNN, opposites filter; all / early / late layers); alpha in units of each layer's
p99 of |mlp.act| on neutral development frames; single-step gates; closed-loop rollouts on held-out scene seeds
(baseline, prompt words, concepts over an alpha sweep and layer subsets, N random sets per concept per alpha);
paired tests with Holm over the four concepts and the :data:`PREREGISTERED` criteria, fixed before the run.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .. import files

SPEED_METRIC = "mean_disp"  # mean per-step end-effector displacement (m)
HEIGHT_METRIC = "max_height_table"  # highest end-effector point above the table (m)
CONCEPT_METRIC = {"fast": SPEED_METRIC, "slow": SPEED_METRIC, "high": HEIGHT_METRIC, "low": HEIGHT_METRIC}
OTHER_METRIC = {SPEED_METRIC: HEIGHT_METRIC, HEIGHT_METRIC: SPEED_METRIC}
PREDICTED_SIGN = {"fast": +1, "slow": -1, "high": +1, "low": -1}
PAIRS = (("fast", "slow"), ("high", "low"))
CONCEPTS = ("fast", "slow", "high", "low")

#: the success criteria, declared before the evaluation seeds were run (issue 13)
PREREGISTERED = {
    "min_effect_pct": 15.0, "max_p_holm": 0.01, "max_other_metric_pct": 5.0, "max_random_median_pct": 3.0,
    "max_success_drop_points": 20.0,
}


@dataclass
class ExperimentConfig:
    """Everything that defines the experiment (stored with the results)."""

    model: Optional[str] = None  # fine-tuned checkpoint (default: the shipped one)
    base: Optional[str] = None  # its base checkpoint, for the diff (default: the shipped one)
    size: int = 10  # neurons per concept
    k_neighbors: int = 20
    lens_k: int = 10
    percentile: float = 99.0  # alpha's unit: this percentile of |mlp.act| per layer on neutral frames
    alpha: float = 4.0  # the declared alpha, relative to the unit (chosen on development frames only)
    sweep: tuple = (1.0, 2.0, 8.0)  # further relative alphas (all layers)
    layer_subsets: tuple = ("early", "late")
    random_sets: int = 10  # random sets per concept per alpha (matched per layer)
    random_trials: int = 12  # episodes of each random set (paired with the first trials, run unsteered beside them)
    trials: int = 40  # paired episodes of baseline, concepts and prompts
    max_steps: int = 45
    seed: int = 20000  # evaluation scene seeds seed .. seed + trials - 1 (never used in development)
    gate_frames: tuple = (3000, 3001, 3002, 3003, 3004, 3005)  # development scenes of the gates and the scale
    gate_random: int = 10
    workers: int = 2
    criteria: dict = field(default_factory=lambda: dict(PREREGISTERED))

    @classmethod
    def quick(cls) -> "ExperimentConfig":
        """A small version for tests: the declared alpha only, few trials and random sets."""
        return cls(sweep=(), layer_subsets=(), random_sets=2, random_trials=2, trials=3, max_steps=12,
                   gate_frames=(3000,), gate_random=2, workers=1)

    def alphas(self) -> list[float]:
        return sorted({float(self.alpha), *map(float, self.sweep)})


def _paths(config: ExperimentConfig) -> tuple[str, str]:
    from . import shipped_path

    return (str(Path(config.model or shipped_path("finetuned")).resolve()),
            str(Path(config.base or shipped_path("base")).resolve()))


def discover(lens, config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """{layers: {concept: NeuronSet}} for "all" and each layer subset (lexicon anchor, opposites filter)."""
    from ..concepts import find_opposites

    sets: dict[str, dict[str, Any]] = {}
    for layers in ("all", *config.layer_subsets):
        sets[layers] = {}
        for a, b in PAIRS:
            sets[layers][a], sets[layers][b] = find_opposites(lens, (a, b), size=config.size,
                                                              k_neighbors=config.k_neighbors, layers=layers)
    return sets


def _name(concept: str, alpha: float, layers: str) -> str:
    return f"{concept}@a{alpha:g}/{layers}"


def build_conditions(sets: dict, scale, config: ExperimentConfig) -> tuple[list, list]:
    """(main conditions, random-set conditions): baseline, prompts, concepts over alphas and layer subsets;
    ``random_sets`` controls per concept per alpha (same neurons per layer, same alpha and unit)."""
    from ..rollout.conditions import baseline, prompt_baseline, steered
    from ..steering import Steering

    main = [baseline()] + [prompt_baseline(c) for c in CONCEPTS]
    controls = []
    for alpha in config.alphas():
        for i, concept in enumerate(CONCEPTS):
            steering = Steering(sets["all"][concept], alpha, scale=scale, name=concept)
            main.append(steered(concept, steering, alpha=alpha, layers="all", name=_name(concept, alpha, "all")))
            for r in range(config.random_sets):
                seed = 1000 * (i + 1) + r
                controls.append(steered(concept, steering.random_control(seed), alpha=alpha, layers="all",
                                        kind="control", name=f"random[{concept}]#{r}@a{alpha:g}/all"))
    for layers in config.layer_subsets:
        for concept in CONCEPTS:
            steering = Steering(sets[layers][concept], config.alpha, layers=layers, scale=scale, name=concept)
            main.append(steered(concept, steering, alpha=config.alpha, layers=layers,
                                name=_name(concept, config.alpha, layers)))
    return main, controls


def primary_first(conditions: list, config: ExperimentConfig) -> list[list]:
    """The conditions in two stages: those of the primary comparison (no steering, or the declared alpha on all
    layers) and the rest. Sweeps are trial-major, so running the stages one after the other is what makes an
    interrupted run hold the primary comparison complete; episodes do not depend on the order."""
    primary, rest = [], []
    for c in conditions:
        is_primary = c.alpha is None or (float(c.alpha) == float(config.alpha) and c.layers in (None, "all"))
        (primary if is_primary else rest).append(c)
    return [stage for stage in (primary, rest) if stage]


def analyse(store, config: ExperimentConfig) -> dict:
    """Paired tests against the baseline, Holm over the four concepts at the declared alpha, the random sets'
    distribution, the alpha sweep, layer subsets, prompts, and the pre-registered criteria."""
    from ..rollout.stats import episode_values, holm, paired

    crit = config.criteria
    values = {m: episode_values(store, m) for m in (SPEED_METRIC, HEIGHT_METRIC, "success")}
    conditions = set(values[SPEED_METRIC])
    out: dict = {"concepts": {}, "sweep": {}, "layers": {}, "prompts": {}, "random": {}}
    for concept in CONCEPTS:
        metric = CONCEPT_METRIC[concept]
        name = _name(concept, config.alpha, "all")
        if name not in conditions:
            continue
        test = paired(values[metric], name, "baseline")
        other = paired(values[OTHER_METRIC[metric]], name, "baseline")
        success = paired(values["success"], name, "baseline")
        randoms = [paired(values[metric], c, "baseline")["pct"] for c in sorted(conditions)
                   if c.startswith(f"random[{concept}]#") and c.endswith(f"@a{config.alpha:g}/all")]
        out["concepts"][concept] = {"metric": metric, **test, "other_metric_pct": other["pct"],
                                    "success_change_points": 100 * success["mean_diff"],
                                    "random_pct": randoms,
                                    "random_median_abs_pct": float(np.median(np.abs(randoms))) if randoms else None,
                                    "random_max_abs_pct": float(np.max(np.abs(randoms))) if randoms else None}
        out["sweep"][concept] = {}
        for alpha in config.alphas():
            cname = _name(concept, alpha, "all")
            if cname in conditions:
                rnd = [paired(values[metric], c, "baseline")["pct"] for c in sorted(conditions)
                       if c.startswith(f"random[{concept}]#") and c.endswith(f"@a{alpha:g}/all")]
                out["sweep"][concept][f"{alpha:g}"] = {
                    "pct": paired(values[metric], cname, "baseline")["pct"],
                    "other_pct": paired(values[OTHER_METRIC[metric]], cname, "baseline")["pct"],
                    "random_median_abs_pct": float(np.median(np.abs(rnd))) if rnd else None,
                    "random_max_abs_pct": float(np.max(np.abs(rnd))) if rnd else None}
        out["layers"][concept] = {layers: paired(values[metric], _name(concept, config.alpha, layers), "baseline")
                                  for layers in ("all", *config.layer_subsets)
                                  if _name(concept, config.alpha, layers) in conditions}
        if f"prompt:{concept}" in conditions:
            out["prompts"][concept] = {**paired(values[metric], f"prompt:{concept}", "baseline"), "metric": metric,
                                       "other_metric_pct": paired(values[OTHER_METRIC[metric]],
                                                                  f"prompt:{concept}", "baseline")["pct"]}
    adjusted = holm({c: v["p"] for c, v in out["concepts"].items()})
    criteria = {}
    for concept, v in out["concepts"].items():
        v["p_holm"] = adjusted[concept]
        sign = PREDICTED_SIGN[concept]
        sweep = [out["sweep"][concept][k]["pct"] for k in sorted(out["sweep"][concept], key=float)]
        criteria[concept] = {
            "direction_and_size": bool(sign * v["pct"] >= crit["min_effect_pct"]),
            "significant_holm": bool(v["p_holm"] < crit["max_p_holm"]),
            "other_metric_unchanged": bool(abs(v["other_metric_pct"]) < crit["max_other_metric_pct"]),
            "beyond_every_random_set": bool(v["random_pct"]) and bool(
                sign * v["pct"] > max(abs(x) for x in v["random_pct"])),
            "random_median_small": v["random_median_abs_pct"] is not None
            and bool(v["random_median_abs_pct"] < crit["max_random_median_pct"]),
            "grows_with_alpha": len(sweep) > 1 and bool(np.all(np.diff(sign * np.asarray(sweep)) >= 0)),
            "success_within_20_points": bool(abs(v["success_change_points"]) <= crit["max_success_drop_points"]),
        }
        criteria[concept]["all"] = all(criteria[concept].values())
    out["criteria"] = criteria
    out["all_criteria_met"] = bool(criteria) and all(c["all"] for c in criteria.values())
    return out


def run_experiment(out: str | os.PathLike, config: ExperimentConfig, progress: bool = True,
                   rollouts: bool = True) -> dict:
    """Run (or resume) the experiment into ``out``; returns the results (also in ``results.json``).

    ``rollouts=False`` runs no episode: it analyses the episodes already in ``out`` (after checking they were
    made by this model and these conditions) and marks the report INTERIM unless every episode is there."""
    import torch

    from .. import models
    from ..envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
    from ..lens import ValueVectorLens, checkpoint_diff
    from ..rollout.executors import Inline, Processes
    from ..rollout.policy import PolicySpec
    from ..rollout.store import ResultsStore
    from ..rollout.sweep import run_sweep
    from ..scale import measure_activation_scale
    from ..steering import Steering
    from .corpus import TASK_BASES
    from .diff import diff_summary, projection_change
    from .gates import expert_frames, queries, run_gates
    from .report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model_path, base_path = _paths(config)
    vla = models.load("openvla", model_path, dispatch=True)
    base = models.load("openvla", base_path, dispatch=True)
    kwargs = {"restrict_to_action_tokens": True}
    timing: dict = {}

    lens = ValueVectorLens(vla, k=config.lens_k, cache_dir=out / "lens", progress=progress)
    base_lens = ValueVectorLens(base, k=config.lens_k, cache_dir=out / "lens", progress=progress)
    sets = discover(lens, config)
    for layers, by_concept in sets.items():
        for concept, nset in by_concept.items():
            nset.save(out / "neurons" / f"{concept}_{layers}.json")
    frames = expert_frames(config.gate_frames)
    scale = measure_activation_scale(vla, queries(frames), percentile=config.percentile,
                                     source="arm scene, neutral instructions, development frames", **kwargs)
    scale.save(out / "activation_scale.json")
    timing["lens_concepts_scale_s"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    steerings = {c: Steering(sets["all"][c], config.alpha, scale=scale, name=c) for c in CONCEPTS}
    if not rollouts and (out / "gates.json").is_file():  # analysing a run: its gates are already measured
        gates = json.loads((out / "gates.json").read_text())
    else:
        gates = run_gates(vla, sets["all"], steerings, frames, n_random=config.gate_random, **kwargs).to_dict()
        files.write_json(out / "gates.json", _jsonable(gates), indent=1)
    timing["gates_s"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    main, controls = build_conditions(sets, scale, config)
    image_size = int(vla.image_processor.image_size[0])
    policy = vla if config.workers <= 1 else PolicySpec("load", "openvla", source=model_path)
    executor = Inline() if config.workers <= 1 else Processes(config.workers)
    from ..rollout.conditions import baseline

    folders = [(list(main), config.trials, "episodes")]
    if controls:  # the random sets' paired reference: the same trials unsteered
        folders.append(([baseline()] + list(controls), config.random_trials, "episodes_random"))
    staged = [(primary_first(conds, config), trials, folder) for conds, trials, folder in folders]
    stages = [(parts[0], trials, folder) for parts, trials, folder in staged]  # both primary comparisons first
    stages += [(parts[1], trials, folder) for parts, trials, folder in staged if len(parts) > 1]
    reports: dict = {}
    for conds, trials, folder in stages:
        rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=trials, max_steps=config.max_steps,
                                   seed=config.seed, image_size=image_size)
        env = ArmSceneEnv(rollout)
        if rollouts:
            report = run_sweep(env, policy, conds, out / folder, executor=executor, progress=progress).to_dict()
        else:
            report = _episodes_present(out / folder, env, policy, conds)
        reports.setdefault(folder, []).append(report)
    reports = {folder: _merge_reports(stage_reports) for folder, stage_reports in reports.items()}
    timing["rollouts_s"] = time.perf_counter() - t2
    store = ResultsStore.open(out / "episodes")
    store.check()
    analysis = analyse(store, config)
    if controls:
        random_store = ResultsStore.open(out / "episodes_random")
        random_store.check()
        _merge_random(analysis, random_store, config)
    diff = checkpoint_diff(base_lens, lens)
    results = {
        "config": asdict(config), "model": model_path, "base": base_path,
        "activation_scale": scale.to_dict(),
        "raw_alpha": {c: {str(l): steerings[c].raw_alpha(l) for l in sets["all"][c].layers} for c in CONCEPTS},
        "concepts": {layers: {c: {"pairs": [list(p) for p in s.pairs],
                                  "top_tokens": [lens.vector_tokens(l, n, k=5) for l, n in s.pairs]}
                              for c, s in by_concept.items()} for layers, by_concept in sets.items()},
        "gates": gates, "analysis": analysis,
        "checkpoint_diff": {"lens": diff_summary(diff), "projection": projection_change(base, vla)},
        "episodes": {"main": reports.get("episodes"), "random": reports.get("episodes_random")},
        "complete": all(r["completed"] + r["skipped"] == r["total"] for r in reports.values()),
        "timing": {**timing, "total_s": time.perf_counter() - t0},
    }
    files.write_json(out / "results.json", _jsonable(results), indent=1)
    results["report"] = [str(p) for p in write_report(out, results, store)]
    files.write_json(out / "results.json", _jsonable(results), indent=1)
    return results


def _merge_reports(reports: list[dict]) -> dict:
    """One folder's sweep reports (its stages) as one: counts summed, failures listed, stages kept."""
    merged = {"results": reports[0]["results"], "stages": reports}
    for key in ("total", "skipped", "completed", "env_steps", "wall_s", "worker_restarts"):
        merged[key] = sum(r.get(key) or 0 for r in reports)
    merged["failed"] = [f for r in reports for f in r.get("failed", [])]
    merged["stopped"] = next((r["stopped"] for r in reports if r.get("stopped")), None)
    return merged


def _episodes_present(folder: Path, env, policy, conditions: list) -> dict:
    """Without running anything: check that ``folder`` holds episodes of this environment, policy and these
    conditions, and count how many of this stage's episodes are there (a sweep report with nothing run)."""
    from ..errors import ResultsError
    from ..rollout.store import ResultsStore
    from ..rollout.sweep import sweep_identity, sweep_jobs

    store = ResultsStore.open(folder)
    store.check()
    problems = store.mismatches(sweep_identity(env, policy), [c.to_dict() for c in conditions], kind=env.kind)
    if any(not p.startswith("condition") for p in problems):
        raise ResultsError(f"{folder} holds episodes of another model or setup than this experiment's "
                           f"({'; '.join(problems)}); analyse it with the settings it was run with")
    if problems:
        raise ResultsError(f"{folder}: a condition was run with another definition ({'; '.join(problems)})")
    jobs = sweep_jobs(env, conditions)
    complete = store.completed()
    present = sum(job.key.id in complete for job in jobs)
    return {"results": str(folder), "total": len(jobs), "skipped": present, "completed": 0, "failed": [],
            "env_steps": 0, "wall_s": 0.0, "worker_restarts": 0, "stopped": None}


def _merge_random(analysis: dict, store, config: ExperimentConfig) -> None:
    """Random sets' % changes (paired with the unsteered episodes of their own folder) into the analysis, and
    the criteria that depend on them recomputed."""
    from ..rollout.stats import episode_values, paired

    crit = config.criteria
    for concept, v in analysis["concepts"].items():
        metric = CONCEPT_METRIC[concept]
        values = episode_values(store, metric)
        for alpha in config.alphas():
            names = sorted(c for c in values if c.startswith(f"random[{concept}]#") and c.endswith(f"@a{alpha:g}/all"))
            pct = [paired(values, c, "baseline")["pct"] for c in names]
            entry = analysis["sweep"][concept].get(f"{alpha:g}")
            if entry is not None and pct:
                entry["random_pct"] = pct
                entry["random_median_abs_pct"] = float(np.median(np.abs(pct)))
                entry["random_max_abs_pct"] = float(np.max(np.abs(pct)))
            if alpha == float(config.alpha) and pct:
                v["random_pct"] = pct
                v["random_median_abs_pct"] = float(np.median(np.abs(pct)))
                v["random_max_abs_pct"] = float(np.max(np.abs(pct)))
                c = analysis["criteria"][concept]
                c["beyond_every_random_set"] = bool(PREDICTED_SIGN[concept] * v["pct"] > max(abs(x) for x in pct))
                c["random_median_small"] = bool(v["random_median_abs_pct"] < crit["max_random_median_pct"])
                c["all"] = all(val for key, val in c.items() if key != "all")
    analysis["all_criteria_met"] = all(c["all"] for c in analysis["criteria"].values())


def _jsonable(obj):
    from ..rollout.records import jsonable

    return jsonable(obj)


def main_table(results: dict) -> list[dict]:
    """One row per condition kind of the main comparison (for reports and the CLI)."""
    a = results["analysis"]
    rows = []
    for concept, v in a["concepts"].items():
        rows.append({"condition": f"{concept} (alpha {results['config']['alpha']:g} x p"
                                  f"{results['config']['percentile']:g})", "metric": v["metric"],
                     "pct": v["pct"], "p_holm": v.get("p_holm", math.nan), "cohen_dz": v["cohen_dz"],
                     "other_metric_pct": v["other_metric_pct"], "random_median_abs_pct": v["random_median_abs_pct"],
                     "random_max_abs_pct": v["random_max_abs_pct"]})
    for concept, v in a["prompts"].items():
        rows.append({"condition": f'prompt "... {concept}"', "metric": CONCEPT_METRIC[concept], "pct": v["pct"],
                     "p_holm": math.nan, "cohen_dz": v["cohen_dz"], "other_metric_pct": v["other_metric_pct"],
                     "random_median_abs_pct": math.nan, "random_max_abs_pct": math.nan})
    return rows


def results_json(out: str | os.PathLike) -> dict:
    return json.loads((Path(out) / "results.json").read_text())
