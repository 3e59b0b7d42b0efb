"""The paper's episode figures, drawn from a results folder (:class:`nnsight_vla.rollout.store.ResultsStore`):
per-step and cumulative displacement (:func:`plot_displacement`), height trajectories (:func:`plot_height`),
a metric against alpha (:func:`plot_alpha_sweep`), early / late / all layer bars (:func:`plot_layer_bars`) and
every figure a folder supports (:func:`plot_all`). Each returns the saved path, or the ``Figure`` when ``out`` is
None (see :mod:`.figures`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..rollout.store import ResultsStore
from .figures import legend as _legend, new_figure, save_figure as _save, styles as _styles

#: axis labels of the step metrics (one unit per quantity in every figure: mm per step, cm of height)
METRIC_LABELS = {
    "action_disp": "per-step displacement |a_xyz| (action units)",
    "disp": "per-step displacement (mm)",
    "dz": "vertical displacement per step (mm)",
    "action_dz": "vertical displacement a_z (action units)",
    "height": "end-effector height (cm)",
    "height_rel": "height above start (cm)",
}
#: factor from the stored unit (metres) to the plotted one
METRIC_SCALE = {"disp": 1000.0, "dz": 1000.0, "height": 100.0, "height_rel": 100.0}


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.0):
    fig = new_figure(width * ncols, height)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _store(source):
    return source if isinstance(source, ResultsStore) else ResultsStore.open(source)


def _episode_series(store, column: str, conditions: Sequence[str] | None, task: Any) -> dict[str, list[np.ndarray]]:
    """{condition: [per-episode array of ``column``]} for the selected conditions and task."""
    import pyarrow.parquet as pq

    out: dict[str, list[np.ndarray]] = {}
    for record in store.records():
        if conditions is not None and record["condition"] not in conditions:
            continue
        if task is not None and str(record["task"]) != str(task):
            continue
        table = pq.read_table(store.episodes_dir / record["steps_file"], columns=[column])
        values = table.column(0).to_numpy(zero_copy_only=False).astype(float) * METRIC_SCALE.get(column, 1.0)
        out.setdefault(record["condition"], []).append(values)
    order = conditions if conditions is not None else sorted(out, key=lambda c: (c != "baseline", c))
    return {c: out[c] for c in order if c in out}


def _ragged_mean(series: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SEM at each step over the episodes still running at that step."""
    length = max(len(s) for s in series)
    grid = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        grid[i, : len(s)] = s
    finite = np.isfinite(grid)
    n = finite.sum(axis=0)
    total = np.where(finite, grid, 0.0).sum(axis=0)
    mean = np.where(n > 0, total / np.maximum(n, 1), np.nan)
    sq = np.where(finite, (grid - mean) ** 2, 0.0).sum(axis=0)
    sem = np.where(n > 1, np.sqrt(sq / np.maximum(n - 1, 1)) / np.sqrt(np.maximum(n, 1)), 0.0)
    return mean, sem


def _title(ax, text: str, task: Any) -> None:
    ax.set_title(text + ("" if task is None else f" (task {task})"), fontsize=10)


def plot_displacement(
    results,
    out: str | os.PathLike | None = None,
    *,
    metric: str = "action_disp",
    conditions: Sequence[str] | None = None,
    task: Any = None,
):
    """Per-step displacement over time (mean +- SEM over the episodes still running) and cumulative displacement,
    by condition; grey steps (right axis): how many episodes are still running at each step (episodes end on
    success, so late steps average fewer of them).

    ``metric``: ``"action_disp"`` (the executed translation command; the paper's scale) or ``"disp"`` (mm).
    The cumulative panel is the running sum of ``metric`` within each episode, averaged over episodes.
    """
    store = _store(results)
    series = _episode_series(store, metric, conditions, task)
    fig, (ax1, ax2) = _figure(2)
    if series:
        lengths = [len(e) for eps in series.values() for e in eps]
        running = [sum(n > t for n in lengths) for t in range(max(lengths))]
        twin = ax1.twinx()
        twin.step(np.arange(len(running)), running, where="post", color="0.6", lw=0.8)
        twin.set_ylabel("episodes still running (all conditions)", fontsize=7, color="0.4")
        twin.tick_params(labelsize=6, colors="0.4")
        twin.set_ylim(0, max(running) * 1.05)
    for (cond, eps), style in zip(series.items(), _styles(len(series))):
        mean, sem = _ragged_mean(eps)
        steps = np.arange(len(mean))
        ax1.plot(steps, mean, label=f"{cond} (mean {np.nanmean(np.concatenate(eps)):.3g})", lw=1.2, **style)
        ax1.fill_between(steps, mean - sem, mean + sem, color=style["color"], alpha=0.2, lw=0)
        cmean, csem = _ragged_mean([np.nancumsum(e) for e in eps])
        ax2.plot(steps, cmean, label=cond, lw=1.5, **style)
        ax2.fill_between(steps, cmean - csem, cmean + csem, color=style["color"], alpha=0.2, lw=0)
    label = METRIC_LABELS.get(metric, metric)
    ax1.set_xlabel("policy step")
    ax1.set_ylabel(label)
    _title(ax1, "per-step displacement", task)
    ax2.set_xlabel("policy step")
    ax2.set_ylabel("cumulative " + label.split(" (")[0].replace("per-step ", ""))
    _title(ax2, "cumulative displacement", task)
    if len(series) <= 8:
        _legend(fig, [ax1, ax2], len(series))
    else:
        _legend(fig, [ax2], len(series))  # one shared legend: the condition names (means are in the tables)
    return _save(fig, out)


def plot_height(
    results,
    out: str | os.PathLike | None = None,
    *,
    column: str = "height",
    conditions: Sequence[str] | None = None,
    task: Any = None,
    max_episodes: int = 50,
):
    """End-effector height over time: every episode as a thin line, the condition mean as a thick line."""
    store = _store(results)
    series = _episode_series(store, column, conditions, task)
    fig, (ax,) = _figure(1, width=6.5)
    for (cond, eps), style in zip(series.items(), _styles(len(series))):
        mean, _ = _ragged_mean(eps)
        ax.plot(np.arange(len(mean)), mean, lw=2.0, label=f"{cond} (n={len(eps)})", **style)
        for e in eps[:max_episodes]:
            ax.plot(np.arange(len(e)), e, color=style["color"], lw=0.5, alpha=0.35)
    ax.set_xlabel("policy step")
    ax.set_ylabel(METRIC_LABELS.get(column, column))
    _title(ax, "end-effector height", task)
    _legend(fig, [ax], len(series))
    return _save(fig, out)


def _condition_means(store, metric: str, task: Any = None) -> dict[str, tuple[float, float, int]]:
    """{condition: (mean, sem, n)} of a step metric pooled over steps (the paper's level)."""
    out = {}
    for cond, eps in _episode_series(store, metric, None, task).items():
        values = np.concatenate(eps)
        values = values[np.isfinite(values)]
        n = values.size
        sem = float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        out[cond] = (float(values.mean()) if n else float("nan"), sem, n)
    return out


def plot_alpha_sweep(
    results,
    out: str | os.PathLike | None = None,
    *,
    metric: str = "action_disp",
    reference: str = "baseline",
    task: Any = None,
):
    """``metric`` (mean +- SEM over steps) against alpha, one line per (concept, layer subset); the reference
    condition as a dashed horizontal line. Uses the conditions' ``alpha``/``concept``/``layers`` fields."""
    store = _store(results)
    conds = store.manifest.get("conditions", {})
    means = _condition_means(store, metric, task)
    curves: dict[tuple, list] = {}
    for name, (mean, sem, _) in means.items():
        c = conds.get(name, {})
        if c.get("alpha") is None:
            continue
        group = (c.get("concept") or name, c.get("layers") or "", c.get("kind") or "")
        curves.setdefault(group, []).append((float(c["alpha"]), mean, sem))
    fig, (ax,) = _figure(1, width=6.0)
    # one colour per concept (a control shares its concept's colour, dashed), one marker per layer subset: more
    # curves than a colour cycle has would otherwise repeat colours
    concepts = sorted({concept for concept, _, _ in curves})
    palette = {c: f"C{i % 10}" for i, c in enumerate(concepts)}
    markers = {"all": "o", "early": "s", "late": "^"}
    for (concept, layers, kind), points in sorted(curves.items()):
        points.sort()
        a, m, s = (np.asarray(v) for v in zip(*points))
        control = kind == "control"
        label = ("random " if control and not concept.startswith("random") else "") + f"{concept} / {layers}"
        ax.errorbar(a, m, yerr=s, fmt=markers.get(layers, "D") + ("--" if control else "-"), ms=4, capsize=2,
                    color=palette[concept], alpha=0.55 if control else 1.0, label=label.rstrip(" /"))
    if reference in means:
        ax.axhline(means[reference][0], color="k", ls=":", lw=1, label=reference)
    ax.set_xlabel("alpha (activation value written)")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    _title(ax, "alpha sweep", task)
    if curves or reference in means:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: the curves stay visible
    return _save(fig, out)


def plot_layer_bars(
    results,
    out: str | os.PathLike | None = None,
    *,
    metric: str = "action_dz",
    reference: str = "baseline",
    alpha: float | None = None,
    layer_order: Sequence[str] = ("early", "late", "all"),
    task: Any = None,
):
    """Bars of ``metric`` per concept and layer subset (early / late / all) at one alpha (default: the largest
    alpha of each concept), with the reference condition as a dashed line."""
    store = _store(results)
    conds = store.manifest.get("conditions", {})
    means = _condition_means(store, metric, task)
    table: dict[str, dict[str, tuple]] = {}
    for name, stat in means.items():
        c = conds.get(name, {})
        if c.get("alpha") is None or c.get("layers") is None:
            continue
        if alpha is not None and float(c["alpha"]) != float(alpha):
            continue
        concept = c.get("concept") or name
        prev = table.setdefault(concept, {}).get(c["layers"])
        if prev is None or float(c["alpha"]) > prev[0]:
            table[concept][c["layers"]] = (float(c["alpha"]), *stat)
    layers = [l for l in layer_order if any(l in v for v in table.values())]
    layers += sorted({l for v in table.values() for l in v} - set(layers))
    fig, (ax,) = _figure(1, width=max(5.0, 1.2 * len(table) * max(1, len(layers)) / 2 + 3))
    width = 0.8 / max(1, len(layers))
    x = np.arange(len(table))
    for j, layer in enumerate(layers):
        vals = [table[c].get(layer, (np.nan, np.nan, 0.0, 0))[1:3] for c in table]
        m = np.array([v[0] for v in vals], float)
        s = np.array([v[1] for v in vals], float)
        ax.bar(x + (j - (len(layers) - 1) / 2) * width, m, width, yerr=s, capsize=2, label=layer)
    if reference in means:
        ax.axhline(means[reference][0], color="k", ls="--", lw=1, label=reference)
    ax.set_xticks(x, list(table) or [])
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    _title(ax, "layer subsets" + ("" if alpha is None else f" at alpha={alpha:g}"), task)
    if layers or reference in means:
        ax.legend(fontsize=7)
    return _save(fig, out)


def _run_conditions(store) -> set[str]:
    return {r["condition"] for r in store.records()}


def plot_all(results, out_dir: str | os.PathLike, *, reference: str = "baseline") -> list[Path]:
    """Every episode figure the results support, saved as PNG in ``out_dir``. Returns the paths."""
    store = _store(results)
    out_dir = Path(out_dir)
    # joint-space runs (pi0 on the UR5) have no translation command: skip the action-unit figures there
    action = store.steps(columns=["action_disp"]).column("action_disp").to_numpy(zero_copy_only=False)
    has_action = bool(np.isfinite(np.asarray(action, np.float64)).any())
    files = [plot_displacement(store, out_dir / "displacement_action.png", metric="action_disp")] if has_action else []
    files += [
        plot_displacement(store, out_dir / "displacement_eef.png", metric="disp"),
        plot_height(store, out_dir / "height.png"),
    ]
    conds = [c for name, c in store.manifest.get("conditions", {}).items() if name in _run_conditions(store)]
    alphas: dict = {}
    for c in conds:
        if c.get("alpha") is not None:
            alphas.setdefault((c.get("concept"), c.get("layers")), set()).add(float(c["alpha"]))
    subsets = {c.get("layers") for c in conds if c.get("layers") is not None}
    # a sweep needs two alphas of one concept, a layer comparison two subsets: anything less is a degenerate plot
    if has_action and any(len(v) > 1 for v in alphas.values()):
        files.append(plot_alpha_sweep(store, out_dir / "alpha_sweep.png", reference=reference))
    if has_action and len(subsets) > 1:
        files.append(plot_layer_bars(store, out_dir / "layers_vertical.png", metric="action_dz", reference=reference))
        files.append(plot_layer_bars(store, out_dir / "layers_displacement.png", metric="action_disp",
                                     reference=reference))
    return files
