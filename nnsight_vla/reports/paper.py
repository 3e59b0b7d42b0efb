"""The paper's LIBERO results from a results folder, beside the published numbers (PAPER.md): per-task and mean
Δ% of per-step displacement against the baseline (episode-level paired tests and the paper's step-level Welch
tests), the number of tasks where fast beats slow with p < 0.001, and the "up" early / late / all comparison.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..rollout.stats import compare_conditions, episode_values, paired_test, success_rates

#: what the paper reports for OpenVLA on LIBERO-Long (10 tasks x 10 rollouts)
PUBLISHED = {
    "fast_vs_slow_mean_pct": 27.7, "fast_vs_slow_max_pct": 148.5, "tasks_p_below_0.001": 10,
    "baseline_action_disp": 0.38, "fast_action_disp_alpha20": 0.56, "slow_action_disp": (0.25, 0.28),
    "up_vertical": {"all": 0.098, "late": 0.086, "early": 0.007},
}


def _split(name: str) -> tuple[str, str, str] | None:
    """``fast10@a20/late`` -> (concept+size, alpha, layers)."""
    if "@a" not in name or "/" not in name or name.startswith("random["):
        return None
    head, _, rest = name.partition("@a")
    alpha, _, layers = rest.partition("/")
    return head, alpha, layers


def fast_vs_slow(store, fast: str, slow: str, metric: str = "action_disp") -> dict:
    """Per task: Δ% of fast over slow, the paper's step-level Welch test and our episode-level paired test."""
    steps = {(r["condition"], r["task"]): r for r in compare_conditions(store, metric, reference=slow)
             if r["condition"] == fast}
    per_episode = episode_values(store, "mean_action_disp" if metric == "action_disp" else "mean_disp")
    rows = []
    tasks = sorted({t for (_, t) in steps if t != "all"}, key=lambda t: (len(t), t))
    for task in tasks + ["all"]:
        row = steps.get((fast, task))
        if row is None:
            continue
        pairs = sorted(k for k in per_episode.get(fast, {}) if task == "all" or k[0] == task)
        a = [per_episode[fast][k] for k in pairs if k in per_episode.get(slow, {})]
        b = [per_episode[slow][k] for k in pairs if k in per_episode.get(slow, {})]
        ep = paired_test(a, b) if len(a) > 1 else {"p": math.nan, "pct": math.nan}
        rows.append({"task": task, "pct": row["pct_change"], "p_step_welch": row["p_value"],
                     "p_episode_paired": ep["p"], "pct_episode": ep["pct"], "n_steps": row["n"],
                     "n_episodes": len(a)})
    per_task = [r for r in rows if r["task"] != "all"]
    return {"rows": rows, "tasks_p_below_0.001": sum(r["p_step_welch"] < 1e-3 for r in per_task),
            "tasks_p_below_0.001_episode": sum(r["p_episode_paired"] < 1e-3 for r in per_task),
            "mean_pct_over_tasks": float(np.nanmean([r["pct"] for r in per_task])) if per_task else math.nan,
            "max_pct_over_tasks": float(np.nanmax([r["pct"] for r in per_task])) if per_task else math.nan}


def paper_report(store, alpha: float | None = None) -> dict:
    """Every comparison the paper makes that the folder's conditions allow (see the module docstring)."""
    conditions = {r["condition"] for r in store.records()}
    parsed = {c: _split(c) for c in conditions}
    alphas = sorted({float(p[1]) for p in parsed.values() if p})
    alpha = alpha if alpha is not None else (max(alphas) if alphas else None)
    out: dict[str, Any] = {"alpha": alpha, "published": PUBLISHED, "success": success_rates(store)}
    vs_base = {(r["condition"], r["task"]): r for r in compare_conditions(store, "action_disp")}
    out["vs_baseline"] = [{"condition": c, "task": t, "pct": r["pct_change"], "p_step_welch": r["p_value"]}
                          for (c, t), r in sorted(vs_base.items()) if c != "baseline"]
    if alpha is None:
        return out
    tag = f"@a{alpha:g}/all"
    fasts = sorted(c for c in conditions if c.startswith("fast") and c.endswith(tag))
    slows = sorted(c for c in conditions if c.startswith("slow") and c.endswith(tag))
    out["fast_vs_slow"] = {f"{f} vs {s}": fast_vs_slow(store, f, s) for f in fasts for s in slows
                           if f.removeprefix("fast").split("@")[0] == s.removeprefix("slow").split("@")[0]}
    up = {}
    dz = {(r["condition"], r["task"]): r for r in compare_conditions(store, "action_dz")}
    for layers in ("all", "late", "early"):
        for c in sorted(conditions):
            p = parsed.get(c)
            if p and p[0].startswith("up") and float(p[1]) == alpha and p[2] == layers:
                up[f"{p[0]}/{layers}"] = dz[(c, "all")]["mean"]
    out["up_vertical"] = up
    return out


def markdown(report: dict) -> str:
    """The comparison as a Markdown table beside the published values."""
    lines = [f"# The paper's LIBERO comparison (alpha = {report['alpha']})", "",
             "| quantity | measured | published (OpenVLA-7B, LIBERO-Long) |", "|---|---:|---:|"]
    for name, fs in report.get("fast_vs_slow", {}).items():
        lines.append(f"| {name}: mean Δ% over tasks (step level) | {fs['mean_pct_over_tasks']:+.1f} | "
                     f"+{PUBLISHED['fast_vs_slow_mean_pct']} |")
        lines.append(f"| {name}: max Δ% over tasks | {fs['max_pct_over_tasks']:+.1f} | "
                     f"+{PUBLISHED['fast_vs_slow_max_pct']} |")
        lines.append(f"| {name}: tasks with p < 0.001 (step Welch / episode paired) | "
                     f"{fs['tasks_p_below_0.001']} / {fs['tasks_p_below_0.001_episode']} of "
                     f"{len(fs['rows']) - 1} | {PUBLISHED['tasks_p_below_0.001']} of 10 |")
    for name, value in report.get("up_vertical", {}).items():
        layers = name.rsplit("/", 1)[1]
        lines.append(f"| mean vertical displacement, {name} | {value:.3f} | "
                     f"{PUBLISHED['up_vertical'].get(layers, float('nan')):.3f} |")
    lines += ["", "Step-level Welch tests pool every step as an independent sample, as the paper does; the "
              "episode-level paired tests (one value per episode, paired by task and trial) are the conservative "
              "ones."]
    return "\n".join(lines) + "\n"
