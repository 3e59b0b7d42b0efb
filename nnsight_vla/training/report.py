"""The experiment's report: RESULTS.md (criteria, main table, gates, sweep, layers, prompts, neurons) and the
figures a reader looks at first (effects beside their random sets, the alpha sweep, early / late / all)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .. import files
from ..reports.figures import new_figure, save_figure

METRIC_LABEL = {"mean_disp": "displacement per step", "max_height_table": "max height above table"}
COLORS = {"fast": "tab:red", "slow": "tab:blue", "high": "tab:green", "low": "tab:purple"}


CRITERIA = (("direction_and_size", "Δ% ≥ 15, right way"), ("significant_holm", "p_holm < 0.01"),
            ("other_metric_unchanged", "other metric < 5 %"), ("beyond_every_random_set", "beyond every random set"),
            ("random_median_small", "random median < 3 %"), ("grows_with_alpha", "grows with α"),
            ("success_within_20_points", "success ±20 pts"))


def _f(v, fmt: str = "+.1f") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, fmt)


def _interim(results: dict) -> list[str]:
    """A warning paragraph when the report is computed on part of the episodes (an interrupted run)."""
    if results.get("complete", True):
        return []
    counts = "; ".join(f"{name}: {r['completed'] + r['skipped']} of {r['total']}"
                       for name, r in results["episodes"].items() if r)
    return [f"**INTERIM: not every episode has run** ({counts}). Each comparison uses the trials present for "
            "both of its conditions (n in results.json); rerun `nnsight-vla experiment` with the same --out to "
            "finish.", ""]


def markdown(results: dict) -> str:
    cfg, a, gates = results["config"], results["analysis"], results["gates"]
    lines = [
        "# Trained small OpenVLA: lens -> concepts -> steering -> behaviour (pre-registered)",
        "",
        f"Model `{results['model']}`. alpha = {cfg['alpha']:g} x the per-layer p{cfg['percentile']:g} of |mlp.act| "
        f"on neutral development frames (raw values per layer in results.json); {cfg['trials']} paired episodes "
        f"per condition on held-out scene seeds {cfg['seed']}..{cfg['seed'] + cfg['trials'] - 1}, neutral "
        f"instructions; {cfg['random_sets']} random sets per concept per alpha ({cfg['random_trials']} episodes "
        "each). Δ% against the baseline; p: paired t-test, Holm-corrected over the four concepts.",
        "",
        *_interim(results),
        f"## Criteria (fixed before the run): {'ALL MET' if a['all_criteria_met'] else 'NOT ALL MET'}",
        "",
        "| concept | " + " | ".join(name for _, name in CRITERIA) + " |",
        "|---|" + "---|" * len(CRITERIA),
    ]
    for concept, c in a["criteria"].items():
        cells = ["yes" if c[k] else "**no**" for k, _ in CRITERIA]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    lines += ["", "## Main comparison", "",
              "| condition | metric | Δ% | p (Holm) | d_z | other metric Δ% | random median abs Δ% "
              "| random max abs Δ% |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
    for concept, v in a["concepts"].items():
        lines.append(f"| {concept} @ α={cfg['alpha']:g} | {METRIC_LABEL[v['metric']]} | {_f(v['pct'])} | "
                     f"{_f(v.get('p_holm'), '.2g')} | {_f(v['cohen_dz'], '.2f')} | {_f(v['other_metric_pct'])} | "
                     f"{_f(v['random_median_abs_pct'], '.1f')} | {_f(v['random_max_abs_pct'], '.1f')} |")
    for concept, v in a["prompts"].items():
        metric = v.get("metric") or a["concepts"].get(concept, {}).get("metric", "mean_disp")  # the concept's own
        lines.append(f"| prompt \"... {concept}\" | {METRIC_LABEL[metric]} | "
                     f"{_f(v['pct'])} | {_f(v['p'], '.2g')} (unadjusted) | {_f(v['cohen_dz'], '.2f')} | "
                     f"{_f(v['other_metric_pct'])} | | |")
    lines += ["", "## Alpha sweep (all layers): Δ% of the concept's metric, random sets' median / max |Δ%|", "",
              "| concept | " + " | ".join(f"α={k}" for k in sorted(next(iter(a["sweep"].values()), {}), key=float))
              + " |", "|---|" + "---:|" * len(next(iter(a["sweep"].values()), {}))]
    for concept, by_alpha in a["sweep"].items():
        cells = [f"{_f(v['pct'])} ({_f(v.get('random_median_abs_pct'), '.1f')} / "
                 f"{_f(v.get('random_max_abs_pct'), '.1f')})"
                 for _, v in sorted(by_alpha.items(), key=lambda kv: float(kv[0]))]
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    if any(len(v) > 1 for v in a["layers"].values()):
        lines += ["", f"## Layer subsets at α={cfg['alpha']:g} (sets found within each subset)", "",
                  "| concept | " + " | ".join(next(iter(a["layers"].values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(a["layers"].values())))]
        for concept, by_layers in a["layers"].items():
            lines.append(f"| {concept} | " + " | ".join(f"{_f(v['pct'])} (p={_f(v['p'], '.2g')})"
                                                        for v in by_layers.values()) + " |")
    lines += ["", "## Single-step gates (development frames)", ""]
    for name, ok in gates["passed"].items():
        lines.append(f"- {name}: **{'pass' if ok else 'FAIL'}**")
    ablation = gates["results"]["late_ablation"]
    lines.append("- gap removed by mean-ablating MLPs at the action positions: " + "; ".join(
        f"{k}: {100 * v['removed']:.0f} %" for k, v in ablation.items()))
    lines.append("- neurons responding in the predicted direction: " + "; ".join(
        f"{c}: {sum(r['responding'])}/{len(r['responding'])}" for c, r in gates["results"]["neuron_response"].items()))
    lines.append("- zero-shot words, mean shift of the action summary: " + "; ".join(
        f"{c}: {v['mean_shift']:+.3f} ({v['summary']})" for c, v in gates["results"]["zero_shot_words"].items()))
    lines += ["", "## Discovered neurons (all layers) and their top tokens", ""]
    for concept, info in results["concepts"]["all"].items():
        tops = "; ".join(f"L{l}/{n}: {' '.join(t.strip('▁') for t in toks[:3])}"
                         for (l, n), toks in zip(info["pairs"], info["top_tokens"]))
        lines.append(f"- **{concept}**: {tops}")
    proj = results["checkpoint_diff"]["projection"]
    lines += ["", "## Checkpoint diff (base -> fine-tuned)", "",
              f"{100 * proj['action_share_of_change']:.1f} % of the change of the value vectors' vocabulary "
              f"projections falls on action-token rows (they are {100 * proj['action_row_share']:.0f} % of the rows)."]
    return "\n".join(lines) + "\n"


def replication_markdown(runs: dict[str, dict]) -> str:
    """The pre-registered criteria across training seeds: a criterion holds only if it holds on every run.

    ``runs`` maps a label (e.g. "seed 0") to an experiment's results.json; the runs must share the declared
    alpha and the criteria's thresholds, else comparing them would not be the pre-registered test."""
    if len(runs) < 2:
        raise ValueError("a replication needs at least two experiment results")
    configs = {label: (r["config"]["alpha"], r["config"]["percentile"], r["config"]["trials"],
                       r["config"]["seed"], json.dumps(r["config"]["criteria"], sort_keys=True))
               for label, r in runs.items()}
    if len(set(configs.values())) > 1:
        raise ValueError("the runs were not evaluated with the same pre-registered settings "
                         f"(alpha, percentile, trials, seeds, criteria): {configs}")
    labels = list(runs)
    concepts = list(next(iter(runs.values()))["analysis"]["criteria"])
    cfg = next(iter(runs.values()))["config"]
    lines = ["# Replication across training seeds (pre-registered criteria)", "",
             f"alpha = {cfg['alpha']:g} x per-layer p{cfg['percentile']:g}; {cfg['trials']} paired episodes per "
             f"condition on scene seeds {cfg['seed']}..{cfg['seed'] + cfg['trials'] - 1}. A criterion is met only "
             "if it holds on every run.", "",
             *[f"**{label} is INTERIM**: not every episode of its experiment has run (see its RESULTS.md)." + "\n"
               for label, r in runs.items() if not r.get("complete", True)],
             "## Criteria: met on every run?", "",
             "| concept | " + " | ".join(name for _, name in CRITERIA) + " |",
             "|---|" + "---|" * len(CRITERIA)]
    for concept in concepts:
        cells = []
        for key, _ in CRITERIA:
            held = [bool(runs[label]["analysis"]["criteria"][concept][key]) for label in labels]
            cells.append("yes" if all(held) else "**no**" + ("" if not any(held) else
                         " (" + ", ".join(lab for lab, h in zip(labels, held) if h) + " only)"))
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    lines += ["", f"## Main comparison at α = {cfg['alpha']:g}", "",
              "| concept | run | Δ% | p (Holm) | other metric Δ% | random median / max abs Δ% | "
              "success Δ (points) |", "|---|---|---:|---:|---:|---:|---:|"]
    for concept in concepts:
        for label in labels:
            v = runs[label]["analysis"]["concepts"][concept]
            lines.append(f"| {concept} | {label} | {_f(v['pct'])} | {_f(v.get('p_holm'), '.2g')} | "
                         f"{_f(v['other_metric_pct'])} | {_f(v['random_median_abs_pct'], '.1f')} / "
                         f"{_f(v['random_max_abs_pct'], '.1f')} | {_f(v.get('success_change_points'), '+.1f')} |")
    sweeps = {label: r["analysis"]["sweep"] for label, r in runs.items()}
    alphas = sorted({a for s in sweeps.values() for by in s.values() for a in by}, key=float)
    lines += ["", "## Alpha sweep (all layers): Δ% of the concept's metric", "",
              "| concept | run | " + " | ".join(f"α={a}" for a in alphas) + " |", "|---|---|" + "---:|" * len(alphas)]
    for concept in concepts:
        for label in labels:
            by = sweeps[label].get(concept, {})
            lines.append(f"| {concept} | {label} | " + " | ".join(_f(by[a]["pct"]) if a in by else "-"
                                                                  for a in alphas) + " |")
    subsets = list(next(iter(runs.values()))["analysis"]["layers"][concepts[0]])
    if len(subsets) > 1:
        lines += ["", "## Layer subsets at the declared α: Δ%", "",
                  "| concept | run | " + " | ".join(subsets) + " |", "|---|---|" + "---:|" * len(subsets)]
        for concept in concepts:
            for label in labels:
                by = runs[label]["analysis"]["layers"][concept]
                lines.append(f"| {concept} | {label} | " + " | ".join(_f(by[s]["pct"]) if s in by else "-"
                                                                      for s in subsets) + " |")
    gate_names = list(next(iter(runs.values()))["gates"]["passed"])
    lines += ["", "## Single-step gates", "", "| gate | " + " | ".join(labels) + " |",
              "|---|" + "---|" * len(labels)]
    for gate in gate_names:
        lines.append(f"| {gate} | " + " | ".join("pass" if runs[lab]["gates"]["passed"].get(gate) else "**FAIL**"
                                                  for lab in labels) + " |")
    lines.append("| neurons responding (fast / slow / high / low) | " + " | ".join(
        " / ".join(f"{sum(r['responding'])}/{len(r['responding'])}"
                   for r in runs[lab]["gates"]["results"]["neuron_response"].values()) for lab in labels) + " |")
    return "\n".join(lines) + "\n"


def plot_effects(results: dict, out: Path) -> Path:
    """Each concept's Δ% at the declared alpha beside its random sets (dots) and its prompt baseline."""
    a = results["analysis"]
    fig = new_figure(7.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for i, (concept, v) in enumerate(a["concepts"].items()):
        ax.bar(i - 0.2, v["pct"], width=0.35, color=COLORS[concept], label="steered" if i == 0 else None)
        if concept in a["prompts"]:
            ax.bar(i + 0.2, a["prompts"][concept]["pct"], width=0.35, color=COLORS[concept], alpha=0.35,
                   hatch="//", label="prompt word" if i == 0 else None)
        rnd = v.get("random_pct") or []
        ax.scatter(np.full(len(rnd), i - 0.2) + np.linspace(-0.1, 0.1, max(len(rnd), 1))[:len(rnd)], rnd, s=10,
                   color="0.3", zorder=3, label="random sets" if i == 0 else None)
    ax.axhline(0, color="k", lw=0.8)
    for y in (15, -15):
        ax.axhline(y, color="0.6", lw=0.8, ls=":")
    ax.set_xticks(range(len(a["concepts"])),
                  [f"{c}\n({METRIC_LABEL[v['metric']]})" for c, v in a["concepts"].items()], fontsize=8)
    ax.set_ylabel("change vs baseline (%)")
    ax.set_title(f"Steering at α = {results['config']['alpha']:g} × p{results['config']['percentile']:g} "
                 f"(dotted: the ±15 % criterion)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def plot_sweep(results: dict, out: Path) -> Path:
    """Δ% against relative alpha per concept, with the random sets' max |Δ%| as a grey band."""
    a = results["analysis"]
    fig = new_figure(6.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for concept, by_alpha in a["sweep"].items():
        xs = sorted(by_alpha, key=float)
        ax.plot([float(x) for x in xs], [by_alpha[x]["pct"] for x in xs], "o-", color=COLORS[concept], label=concept)
        band = [by_alpha[x].get("random_max_abs_pct") or 0 for x in xs]
        ax.fill_between([float(x) for x in xs], [-b for b in band], band, color="0.5", alpha=0.08)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel(f"α (× per-layer p{results['config']['percentile']:g} of |activation|)")
    ax.set_ylabel("change of the concept's metric vs baseline (%)")
    ax.set_title("Alpha sweep (grey: random sets' max |Δ%|)", fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, out)


def write_report(out: Path, results: dict, store) -> list[Path]:
    """RESULTS.md and the figures (including the shared episode figures of the main store)."""
    from ..reports.plots import plot_all

    written = [files.write_text(out / "RESULTS.md", markdown(results)),
               plot_effects(results, out / "plots" / "effects.png")]
    if any(len(v) > 1 for v in results["analysis"]["sweep"].values()):
        written.append(plot_sweep(results, out / "plots" / "alpha_sweep.png"))
    written += plot_all(store, out / "plots")
    return [Path(p) for p in written]
