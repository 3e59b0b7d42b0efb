"""The end-to-end experiment on the trained small OpenVLA, with no hand-picked neurons:

    python -m nnsight_vla.training.experiment --out results/trained_vla

1. lens: the value-vector lens of the fine-tuned model (and of the phase-1 base, for the checkpoint diff);
2. concepts: ``find_opposites`` (the paper's kNN clustering, disjoint sets) for (fast, slow) and (high, low),
   over all layers and, for the layer comparison, within the early and the late half of the layers;
3. conditions on NEUTRAL instructions (no speed or height word): baseline; each concept steered (overwrite with
   alpha at every position of every forward) in all / early / late layers; a random-neuron control per concept
   (same number of neurons in each layer, same alpha); the prompt baseline (the word appended to the
   instruction); an alpha sweep;
4. rollouts in the arm scene (``trials`` paired episodes per condition), logged per step;
5. statistics (Welch t-tests, scipy, one sample per episode) for the success criteria, a results table
   (JSON, CSV, Markdown), plots, and the checkpoint diff (base -> fine-tuned).

Everything is written under ``--out``; a rerun resumes the rollouts already stored there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .. import files

#: episode metrics: the speed metric and the height metric of the success criteria
SPEED_METRIC = "mean_disp"  # mean per-step end-effector displacement (m)
HEIGHT_METRIC = "max_height_table"  # highest end-effector point above the table (m)
METRICS = (SPEED_METRIC, "mean_action_disp", HEIGHT_METRIC, "mean_height_table", "steps", "success")
PAIRS = (("fast", "slow"), ("high", "low"))
CONCEPT_METRIC = {"fast": SPEED_METRIC, "slow": SPEED_METRIC, "high": HEIGHT_METRIC, "low": HEIGHT_METRIC}
PREDICTED_SIGN = {"fast": +1, "slow": -1, "high": +1, "low": -1}


@dataclass
class ExperimentConfig:
    """Everything that defines the experiment (stored with the results)."""

    model: Optional[str] = None  # fine-tuned checkpoint (default: the shipped one)
    base: Optional[str] = None  # phase-1 checkpoint for the diff (default: the shipped one)
    size: int = 10  # neurons per concept
    k_neighbors: int = 20
    alpha: float = 4.0  # the main comparison's alpha
    sweep: tuple = (1.0, 2.0, 8.0, 10.0, 16.0)  # further alphas (all layers; 10 is the paper's UR5 value)
    layer_subsets: tuple = ("early", "late")
    trials: int = 20
    max_steps: int = 45
    seed: int = 1000
    control_seed: int = 0
    workers: int = 2
    lens_k: int = 10

    @classmethod
    def quick(cls) -> "ExperimentConfig":
        """A small version for tests: main conditions only, few trials."""
        return cls(trials=4, max_steps=20, sweep=(), layer_subsets=(), workers=1)


def _paths(config: ExperimentConfig) -> tuple[str, str]:
    from . import shipped_path

    model = config.model or str(shipped_path("finetuned"))
    base = config.base or str(shipped_path("base"))
    return model, base


# -- concept discovery --------------------------------------------------------------------------------------------


def discover(lens, config: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """{layers: {concept: NeuronSet}} for "all" and each layer subset (disjoint within each pair)."""
    from ..concepts import find_opposites

    sets: dict[str, dict[str, Any]] = {}
    for layers in ("all", *config.layer_subsets):
        sets[layers] = {}
        for a, b in PAIRS:
            set_a, set_b = find_opposites(lens, (a, b), size=config.size, k_neighbors=config.k_neighbors,
                                          layers=layers)
            sets[layers][a], sets[layers][b] = set_a, set_b
    return sets


def build_conditions(sets: dict, config: ExperimentConfig, vla) -> list:
    """Baseline, steered (all / subsets, alpha + sweep), random controls, prompt baselines."""
    from ..concepts import random_control
    from ..rollout.conditions import baseline, check_unique, prompt_baseline, steered
    from ..steering import Steering

    conds = [baseline()]
    concepts = [c for pair in PAIRS for c in pair]
    all_sets = sets["all"]
    for concept in concepts:
        conds.append(steered(concept, Steering(all_sets[concept], alpha=config.alpha), alpha=config.alpha,
                             layers="all"))
    used = [p for s in all_sets.values() for p in s.pairs]
    for i, concept in enumerate(concepts):
        control = random_control(all_sets[concept], seed=config.control_seed + i, exclude=used)
        conds.append(steered(f"random[{concept}]", Steering(control, alpha=config.alpha), alpha=config.alpha,
                             layers="all", kind="control"))
    for concept in concepts:
        conds.append(prompt_baseline(concept))
    for layers in config.layer_subsets:
        for concept in concepts:
            conds.append(steered(concept, Steering(sets[layers][concept], alpha=config.alpha, layers=layers),
                                 alpha=config.alpha, layers=layers))
    for alpha in config.sweep:
        for concept in concepts:
            conds.append(steered(concept, Steering(all_sets[concept], alpha=alpha), alpha=alpha, layers="all"))
    check_unique(conds)
    for c in conds:
        if c.steering is not None:
            c.steering.resolve(vla)  # fail early on a bad set
    return conds


# -- statistics ---------------------------------------------------------------------------------------------------


def episode_table(store) -> dict[str, dict[str, np.ndarray]]:
    """{condition: {metric: per-episode values (trial order)}}."""
    out: dict[str, dict[str, list]] = {}
    for row in sorted(store.summaries(), key=lambda r: (r["condition"], r["trial"])):
        bucket = out.setdefault(row["condition"], {m: [] for m in METRICS})
        for m in METRICS:
            v = row.get(m)
            bucket[m].append(float("nan") if v is None else float(v))
    return {c: {m: np.asarray(v, float) for m, v in d.items()} for c, d in out.items()}


def welch(a: np.ndarray, b: np.ndarray) -> dict:
    """Welch's t-test of a vs b (two-sided) with the means and the difference."""
    from scipy import stats

    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    out = {"mean_a": float(a.mean()) if a.size else math.nan, "mean_b": float(b.mean()) if b.size else math.nan,
           "n_a": int(a.size), "n_b": int(b.size), "t": math.nan, "p": math.nan}
    out["diff"] = out["mean_a"] - out["mean_b"]
    if a.size > 1 and b.size > 1 and (a.std() > 0 or b.std() > 0):
        res = stats.ttest_ind(a, b, equal_var=False)
        out["t"], out["p"] = float(res.statistic), float(res.pvalue)
    return out


def summary_rows(table: dict, conditions: Sequence, reference: str = "baseline") -> list[dict]:
    """One row per condition: mean and SEM of each metric, % change and Welch p vs the reference."""
    ref = table.get(reference, {})
    rows = []
    for cond in conditions:
        data = table.get(cond.name)
        if data is None:
            continue
        row = {"condition": cond.name, "kind": cond.kind, "concept": cond.concept, "alpha": cond.alpha,
               "layers": cond.layers, "episodes": int(len(data[SPEED_METRIC]))}
        for m in METRICS:
            v = data[m][np.isfinite(data[m])]
            row[m] = float(v.mean()) if v.size else math.nan
            row[f"{m}_sem"] = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
            if m in (SPEED_METRIC, HEIGHT_METRIC, "mean_action_disp") and cond.name != reference and m in ref:
                test = welch(data[m], ref[m])
                row[f"{m}_pct"] = 100.0 * test["diff"] / abs(test["mean_b"]) if test["mean_b"] else math.nan
                row[f"{m}_p"] = test["p"]
        rows.append(row)
    return rows


def key_tests(table: dict, config: ExperimentConfig) -> dict:
    """The success criteria, computed from the stored episodes."""
    a = f"@a{config.alpha:g}/all"
    tests: dict[str, Any] = {}

    def get(name, metric):
        return table.get(name, {}).get(metric)

    for hi, lo in PAIRS:
        metric = CONCEPT_METRIC[hi]
        x, y = get(hi + a, metric), get(lo + a, metric)
        if x is not None and y is not None:
            t = welch(x, y)
            t["metric"], t["predicted"] = metric, f"{hi} > {lo}"
            t["direction_ok"] = bool(t["diff"] > 0)
            t["pass_p<0.01"] = bool(t["direction_ok"] and t["p"] < 0.01)
            tests[f"{hi}_vs_{lo}"] = t
    base = table.get("baseline")
    for concept in CONCEPT_METRIC:
        metric = CONCEPT_METRIC[concept]
        for name, label in ((concept + a, f"{concept}_vs_baseline"), (f"random[{concept}]" + a, f"random[{concept}]_vs_baseline"),
                            (f"prompt:{concept}", f"prompt:{concept}_vs_baseline")):
            x = get(name, metric)
            if x is None or base is None:
                continue
            t = welch(x, base[metric])
            t["metric"] = metric
            t["direction_ok"] = bool(np.sign(t["diff"]) == PREDICTED_SIGN[concept])
            if name.startswith("random["):
                t["pass_p>0.05"] = bool(not (t["p"] < 0.05))
            tests[label] = t
    # random controls: also on the other metric (a control should move neither)
    for concept in CONCEPT_METRIC:
        other = HEIGHT_METRIC if CONCEPT_METRIC[concept] == SPEED_METRIC else SPEED_METRIC
        x = get(f"random[{concept}]" + a, other)
        if x is not None and base is not None:
            tests[f"random[{concept}]_vs_baseline_{other}"] = {**welch(x, base[other]), "metric": other}
    return tests


# -- checkpoint diff ---------------------------------------------------------------------------------------------


def projection_change(base_vla, tuned_vla) -> dict:
    """Where fine-tuning changed the value vectors' vocabulary projections ``W_U W_out``: per layer, the share
    of the squared change ``|W_U' W_out' - W_U W_out|^2`` that falls on action-token rows (vs the share of rows
    they are). A share well above the row share means fine-tuning mostly changed action-token projections."""
    import torch

    n_tokens = len(tuned_vla.tokenizer) - 1  # without <PAD>
    action = np.zeros(n_tokens, bool)
    action[np.asarray(tuned_vla.action_token_ids)] = True
    act = torch.as_tensor(action)
    rows = []
    with torch.no_grad():
        wb, wt = base_vla.unembedding()[:n_tokens].float(), tuned_vla.unembedding()[:n_tokens].float()
        for layer in range(tuned_vla.num_layers):
            pb = wb @ base_vla.value_vectors(layer).float()
            pt = wt @ tuned_vla.value_vectors(layer).float()
            energy = ((pt - pb) ** 2).sum(dim=1)
            # the same split for the change caused by the value vectors alone (unembedding held fixed)
            vec_only = ((wb @ (tuned_vla.value_vectors(layer).float() - base_vla.value_vectors(layer).float())) ** 2).sum(1)
            rows.append({
                "layer": layer,
                "action_share_of_change": float(energy[act].sum() / energy.sum()),
                "action_share_of_change_vectors_only": float(vec_only[act].sum() / vec_only.sum()),
                "mean_change_action_row": float(energy[act].mean()),
                "mean_change_language_row": float(energy[~act].mean()),
            })
    total_change = sum(r["mean_change_action_row"] * action.sum() + r["mean_change_language_row"] * (~action).sum()
                       for r in rows)
    action_change = sum(r["mean_change_action_row"] * action.sum() for r in rows)
    return {"action_row_share": float(action.mean()), "layers": rows,
            "action_share_of_change": float(action_change / total_change)}


def diff_summary(diff) -> dict:
    """Totals of the lens-level checkpoint diff (top-k token entries gained/lost, action vs language)."""
    layers = diff.layers
    gained_a, gained_l = int(layers.gained_action.sum()), int(layers.gained_language.sum())
    lost_a, lost_l = int(layers.lost_action.sum()), int(layers.lost_language.sum())
    return {
        "gained_action": gained_a, "gained_language": gained_l, "lost_action": lost_a, "lost_language": lost_l,
        "gained_action_share": gained_a / max(1, gained_a + gained_l),
        "kept_fraction": float(layers.kept_fraction.mean()),
        "action_share_base": [float(x) for x in layers.action_share_base],
        "action_share_tuned": [float(x) for x in layers.action_share_tuned],
    }


# -- activation probe (diagnostic for alpha) ---------------------------------------------------------------------


def activation_probe(vla, sets: dict, image: np.ndarray) -> dict:
    """Mean activation of each concept set's neurons on the last prompt position, for neutral instructions and
    instructions carrying each concept's words (plain forward hooks on ``mlp.act``; read-only). Puts alpha in
    the scale of the activations the model produces by itself."""
    import torch

    from .corpus import TASK_BASES, manner_phrases

    layers = vla._module.get_submodule(vla.stack("backbone").path)
    phrases = {"neutral": [""], **{c: manner_phrases(c, "words") for c in ("fast", "slow", "high", "low")}}
    out: dict[str, dict[str, float]] = {}
    captured: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.act.register_forward_hook(lambda m, i, o, idx=idx: captured.__setitem__(idx, o[0, -1].detach()))
             for idx, layer in enumerate(layers)]
    try:
        means: dict[str, list] = {}
        for label, words in phrases.items():
            acts = []
            for base in TASK_BASES[:4]:
                for word in words[:3]:
                    ids, pixels = vla.prepare(image, f"{base} {word}".strip())
                    with torch.no_grad():
                        vla._module(input_ids=ids, pixel_values=pixels)
                    acts.append({k: v.clone() for k, v in captured.items()})
            means[label] = acts
        for concept, nset in sets.items():
            out[concept] = {}
            for label, acts in means.items():
                vals = [float(a[layer][neuron]) for a in acts for layer, neuron in nset.pairs]
                out[concept][label] = float(np.mean(vals))
            all_vals = torch.cat([a[l].flatten() for a in means["neutral"] for l in a])
            out[concept]["_all_neurons_neutral_p99"] = float(torch.quantile(all_vals.abs(), 0.99))
    finally:
        for h in hooks:
            h.remove()
    return out


# -- reporting ----------------------------------------------------------------------------------------------------


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = [("condition", "condition"), ("kind", "kind"), ("episodes", "n"),
            (SPEED_METRIC, "disp/step (mm)"), (f"{SPEED_METRIC}_pct", "Δ%"), (f"{SPEED_METRIC}_p", "p"),
            (HEIGHT_METRIC, "max height (cm)"), (f"{HEIGHT_METRIC}_pct", "Δ%"), (f"{HEIGHT_METRIC}_p", "p"),
            ("success", "success"), ("steps", "steps")]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _ in cols:
            v = r.get(key)
            if key == SPEED_METRIC and v is not None:
                v = f"{1000 * v:.2f} ± {1000 * r.get(SPEED_METRIC + '_sem', math.nan):.2f}"
            elif key == HEIGHT_METRIC and v is not None:
                v = f"{100 * v:.1f} ± {100 * r.get(HEIGHT_METRIC + '_sem', math.nan):.1f}"
            elif key.endswith("_pct") and v is not None:
                v = f"{v:+.1f}"
            elif key.endswith("_p") and v is not None:
                v = f"{v:.2g}"
            cells.append(_fmt(v, 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _jsonable(obj):
    from ..rollout.records import jsonable as conv

    return conv(obj)


def plot_key_effects(rows: list[dict], out: Path, alpha: float) -> Path:
    """Bars of the speed and the height metric for every condition at the main alpha (all layers) with SEM,
    coloured by kind, the baseline as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pick = [r for r in rows if r["kind"] in ("baseline", "prompt")
            or (r["kind"] in ("steered", "control") and r.get("layers") == "all" and r.get("alpha") == alpha)]
    colors = {"baseline": "0.4", "steered": "tab:blue", "control": "tab:gray", "prompt": "tab:orange"}
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (metric, scale, label) in enumerate(((SPEED_METRIC, 1000, "mean displacement per step (mm)"),
                                                (HEIGHT_METRIC, 100, "max height above table (cm)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        x = np.arange(len(pick))
        ax.bar(x, [scale * r[metric] for r in pick], yerr=[scale * r[metric + "_sem"] for r in pick], capsize=2,
               color=[colors.get(r["kind"], "k") for r in pick])
        base = next((r for r in pick if r["condition"] == "baseline"), None)
        if base:
            ax.axhline(scale * base[metric], color="k", ls="--", lw=1)
        ax.set_xticks(x, [r["condition"] for r in pick], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel(label)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    return out


# -- the driver ---------------------------------------------------------------------------------------------------


def run_experiment(out: str | os.PathLike, config: ExperimentConfig, progress: bool = True) -> dict:
    """Run (or resume) the experiment into ``out`` and write the tables and plots; returns the results dict."""
    import torch

    import nnsight_vla as nv

    from ..envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
    from ..lens import ValueVectorLens, checkpoint_diff
    from ..rollout.executors import Inline, Processes
    from ..rollout.policy import PolicySpec
    from ..rollout.stats import compare_conditions
    from ..rollout.store import ResultsStore
    from ..rollout.sweep import run_sweep
    from .corpus import TASK_BASES

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model_path, base_path = _paths(config)
    vla = nv.load("openvla", model_path, dispatch=True)
    base = nv.load("openvla", base_path, dispatch=True)

    # 1-2. lens and concepts
    lens = ValueVectorLens(vla, k=config.lens_k, cache_dir=out / "lens", progress=progress)
    base_lens = ValueVectorLens(base, k=config.lens_k, cache_dir=out / "lens", progress=progress)
    sets = discover(lens, config)
    (out / "neurons").mkdir(exist_ok=True)
    for layers, by_concept in sets.items():
        for concept, nset in by_concept.items():
            nset.save(out / "neurons" / f"{concept}_{layers}.json")
    concept_info = {layers: {c: {"pairs": [list(p) for p in s.pairs],
                                 "top_tokens": [lens.vector_tokens(l, n, k=5) for l, n in s.pairs]}
                             for c, s in by_concept.items()} for layers, by_concept in sets.items()}

    # 3. conditions
    conditions = build_conditions(sets, config, vla)
    image_size = int(vla.image_processor.image_size[0])
    rollout = ArmRolloutConfig(instructions=TASK_BASES, trials=config.trials, max_steps=config.max_steps,
                               seed=config.seed, image_size=image_size)

    # 4. rollouts
    t_roll = time.perf_counter()
    policy = vla if config.workers <= 1 else PolicySpec("load", "openvla", source=str(Path(model_path).resolve()))
    executor = Inline() if config.workers <= 1 else Processes(config.workers)
    report = run_sweep(ArmSceneEnv(rollout), policy, conditions, out / "episodes_store", executor=executor,
                       progress=progress)
    ran = report.completed
    store = ResultsStore.open(out / "episodes_store")
    rollout_s = time.perf_counter() - t_roll

    # 5. statistics, diff, tables, plots
    table = episode_table(store)
    rows = summary_rows(table, conditions)
    tests = key_tests(table, config)
    step_level = compare_conditions(store, "disp", level="step", per_task=False)
    diff = checkpoint_diff(base_lens, lens)
    diff.export(out / "checkpoint_diff", fmt="csv")
    scene_image = _first_frame(rollout)
    results = {
        "config": asdict(config),
        "model": model_path, "base": base_path,
        "concepts": concept_info,
        "conditions": [c.to_dict() for c in conditions],
        "rows": rows,
        "tests": tests,
        "criteria": criteria(tests),
        "step_level_disp": step_level,
        "checkpoint_diff": {"lens": diff_summary(diff), "projection": projection_change(base, vla)},
        "activation_probe": activation_probe(vla, sets["all"], scene_image),
        "timing": {"rollout_s": rollout_s, "episodes_run": ran, "total_s": time.perf_counter() - t0},
    }
    files.write_text(out / "results.json", json.dumps(_jsonable(results), indent=1))
    _write_csv(out / "results.csv", rows)
    plots = []
    try:
        from ..reports.plots import plot_all

        plots += [str(p) for p in plot_all(store, out / "plots")]
    except Exception as error:  # noqa: BLE001 - the shared plots are a bonus; ours below are the key figure
        results["plots_error"] = repr(error)
    plots.append(str(plot_key_effects(rows, out / "plots" / "key_effects.png", config.alpha)))
    results["plots"] = plots
    files.write_text(out / "results.json", json.dumps(_jsonable(results), indent=1))
    files.write_text(out / "RESULTS.md", report_markdown(results))
    return results


def _first_frame(rollout) -> np.ndarray:
    from ..envs.arm_scene import scene

    return scene(rollout.image_size).reset(rollout.seed)["image"]


def criteria(tests: dict) -> dict:
    """The issue's success criteria as booleans (with the p-values they rest on)."""
    out = {}
    for key in ("fast_vs_slow", "high_vs_low"):
        if key in tests:
            out[key] = {"p": tests[key]["p"], "direction_ok": tests[key]["direction_ok"], "pass": tests[key]["pass_p<0.01"]}
    controls = {k: v for k, v in tests.items() if k.startswith("random[") and k.endswith("_vs_baseline")}
    if controls:
        out["random_controls_null"] = {"p": {k: v["p"] for k, v in controls.items()},
                                       "pass": all(v["pass_p>0.05"] for v in controls.values())}
    return out


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("condition", "kind", "concept", "alpha", "layers"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in keys})
    files.write_text(path, buf.getvalue())


def report_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        "# Trained small OpenVLA: lens -> find_concept -> steering -> behaviour",
        "",
        f"Model: `{results['model']}`; {cfg['trials']} paired episodes per condition (neutral instructions), "
        f"{cfg['size']} neurons per concept (kNN, k={cfg['k_neighbors']}), alpha={cfg['alpha']:g} unless stated. "
        "disp/step: mean end-effector displacement per step; max height: highest end-effector point above the "
        "table. Δ% and p (Welch, per-episode values) are against the baseline.",
        "",
        "## Success criteria",
        "",
    ]
    for key, c in results["criteria"].items():
        if key == "random_controls_null":
            ps = ", ".join(f"{k.split('_vs')[0]} p={v:.2g}" for k, v in c["p"].items())
            lines.append(f"- random controls do not move their metric (p > 0.05): **{'yes' if c['pass'] else 'no'}** ({ps})")
        else:
            t = results["tests"][key]
            lines.append(f"- {t['predicted']} on {t['metric']}: diff {t['diff']:+.4g}, p = {t['p']:.2g} -> "
                         f"**{'pass' if c['pass'] else 'FAIL'}** (p < 0.01, predicted direction)")
    proj = results["checkpoint_diff"]["projection"]
    lens = results["checkpoint_diff"]["lens"]
    lines += [
        f"- checkpoint diff: {100 * proj['action_share_of_change']:.1f} % of the change of the value vectors' "
        f"vocabulary projections falls on action-token rows (they are {100 * proj['action_row_share']:.0f} % of "
        f"the rows); {100 * lens['gained_action_share']:.1f} % of the top-{cfg['lens_k']} token entries gained "
        "in fine-tuning are action tokens.",
        "",
        "## All conditions",
        "",
        markdown_table(results["rows"]),
        "",
        "## Discovered neurons (all layers) and their top tokens",
        "",
    ]
    for concept, info in results["concepts"]["all"].items():
        tops = "; ".join(f"L{l}/{n}: {' '.join(t.strip('▁') for t in toks[:3])}"
                         for (l, n), toks in zip(info["pairs"], info["top_tokens"]))
        lines.append(f"- **{concept}**: {tops}")
    return "\n".join(lines) + "\n"
