"""The experiment's report: RESULTS.md (criteria, main table, gates, sweep, layers, prompts, neurons) and the
figures a reader looks at first (effects beside their random sets, the alpha sweep, early / late / all)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .. import files
from ..reports.figures import new_figure, save_figure

METRIC_LABEL = {"mean_disp": "displacement per step", "max_height_table": "max height above table"}
COLORS = {"fast": "tab:red", "slow": "tab:blue", "high": "tab:green", "low": "tab:purple"}


def _f(v, fmt: str = "+.1f") -> str:
    if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))):
        return "-" if v is None or math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, fmt)


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
        f"## Criteria (fixed before the run): {'ALL MET' if a['all_criteria_met'] else 'NOT ALL MET'}",
        "",
        "| concept | Δ% ≥ 15, right way | p_holm < 0.01 | other metric < 5 % | beyond every random set | "
        "random median < 3 % | grows with α | success ±20 pts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for concept, c in a["criteria"].items():
        cells = ["yes" if c[k] else "**no**" for k in ("direction_and_size", "significant_holm",
                                                       "other_metric_unchanged", "beyond_every_random_set",
                                                       "random_median_small", "grows_with_alpha",
                                                       "success_within_20_points")]
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
