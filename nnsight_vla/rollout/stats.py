"""Statistics over a results store: samples per condition and task, comparisons against a reference condition
(Welch tests at the step or episode level), success rates, and plain-text tables."""

from __future__ import annotations

import math
import os
import warnings
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .records import STEP_METRICS, _mean
from .store import ResultsStore


def _as_store(source: "ResultsStore | str | os.PathLike") -> ResultsStore:
    return source if isinstance(source, ResultsStore) else ResultsStore.open(source)


def metric_samples(
    source: "ResultsStore | str | os.PathLike", metric: str, *, level: str = "step"
) -> dict[tuple[str, str], np.ndarray]:
    """Samples of ``metric`` per (condition, task).

    ``level="step"``: every step of every episode is a sample (``metric`` is a step column, e.g.
    ``action_disp``, ``disp``, ``dz``); this is how the paper pools. ``level="episode"``: one sample per
    episode, the episode's summary field ``metric`` if it exists (``success``, ``steps``, ``mean_disp``...) or
    else the episode mean of the step column (independent samples: the conservative test).
    """
    store = _as_store(source)
    if level not in ("step", "episode"):
        raise InputError(f"level must be 'step' or 'episode', got {level!r}")
    out: dict[tuple[str, str], list] = {}
    if level == "episode":
        summaries = store.summaries()
        if summaries and metric in summaries[0]:
            for row in summaries:
                value = row.get(metric)
                out.setdefault((row["condition"], str(row["task"])), []).append(
                    float("nan") if value is None else float(value)
                )
            return {k: np.asarray(v, np.float64) for k, v in out.items()}
    import pyarrow.parquet as pq

    for record in store.records():
        path = store.episodes_dir / record["steps_file"]
        if metric not in pq.read_schema(path).names:
            raise InputError(
                f"unknown metric {metric!r}; step metrics: {', '.join(STEP_METRICS)}"
                + ("; episode metrics: " + ", ".join(sorted(record["summary"])) if level == "episode" else "")
            )
        values = pq.read_table(path, columns=[metric]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
        bucket = out.setdefault((record["condition"], str(record["task"])), [])
        if level == "step":
            bucket.append(values)
        else:
            bucket.append(np.asarray([_mean(values)]))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def compare_conditions(
    source: "ResultsStore | str | os.PathLike",
    metric: str = "action_disp",
    reference: str = "baseline",
    *,
    level: str = "step",
    per_task: bool = True,
) -> list[dict]:
    """Mean of ``metric`` per condition (per task and over all tasks), % change vs ``reference`` and the
    Welch t-test p-value (``scipy.stats.ttest_ind(equal_var=False)``) of condition vs reference.

    Returns rows ``{"task", "condition", "n", "n_episodes", "mean", "std", "sem", "reference", "ref_mean",
    "pct_change", "t_stat", "p_value"}``; ``task == "all"`` rows pool every task. See :func:`metric_samples`
    for ``level``.
    """
    from scipy import stats

    samples = metric_samples(source, metric, level=level)
    if not samples:
        return []
    conditions = sorted({c for c, _ in samples}, key=lambda c: (c != reference, c))
    if reference not in conditions:
        raise InputError(
            f"reference condition {reference!r} has no episodes; conditions with results: {', '.join(conditions)}"
        )
    tasks = sorted({t for _, t in samples}, key=lambda t: (len(t), t))
    counts: dict[tuple[str, str], int] = {}
    for row in _as_store(source).summaries():
        key = (row["condition"], str(row["task"]))
        counts[key] = counts.get(key, 0) + 1
    groups = [(t, {c: samples.get((c, t)) for c in conditions}) for t in tasks] if per_task else []
    pooled = {c: np.concatenate([samples[(c, t)] for t in tasks if (c, t) in samples]) for c in conditions}
    groups.append(("all", pooled))
    rows = []
    for task, by_cond in groups:
        ref = by_cond.get(reference)
        ref = None if ref is None else ref[np.isfinite(ref)]
        for cond in conditions:
            values = by_cond.get(cond)
            if values is None:
                continue
            values = values[np.isfinite(values)]
            n = int(values.size)
            mean = float(values.mean()) if n else float("nan")
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            row = {
                "task": task, "condition": cond, "n": n,
                "n_episodes": sum(v for (c, t), v in counts.items() if c == cond and (task == "all" or t == task)),
                "mean": mean, "std": std, "sem": std / math.sqrt(n) if n > 1 else float("nan"),
                "reference": reference, "ref_mean": float("nan"), "pct_change": float("nan"),
                "t_stat": float("nan"), "p_value": float("nan"),
            }
            if ref is not None and ref.size:
                row["ref_mean"] = float(ref.mean())
                if row["ref_mean"] != 0:
                    row["pct_change"] = (mean - row["ref_mean"]) / abs(row["ref_mean"]) * 100.0
                if cond != reference and n > 1 and ref.size > 1:
                    with warnings.catch_warnings():  # identical samples (e.g. scripted policies): t = inf, p = 0
                        warnings.simplefilter("ignore", RuntimeWarning)
                        res = stats.ttest_ind(values, ref, equal_var=False)
                    row["t_stat"], row["p_value"] = float(res.statistic), float(res.pvalue)
            rows.append(row)
    return rows


def success_rates(source: "ResultsStore | str | os.PathLike") -> list[dict]:
    """Success rate per condition, per task and over all tasks: rows ``{task, condition, episodes, successes,
    success_rate}``."""
    acc: dict[tuple[str, str], list[int]] = {}
    for row in _as_store(source).summaries():
        for task in (str(row["task"]), "all"):
            acc.setdefault((row["condition"], task), []).append(int(bool(row.get("success"))))
    return [
        {"task": t, "condition": c, "episodes": len(v), "successes": sum(v), "success_rate": sum(v) / len(v)}
        for (c, t), v in sorted(acc.items(), key=lambda kv: (kv[0][1] == "all", kv[0][1], kv[0][0]))
    ]


def format_rows(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of result rows (for reports and the CLI)."""
    if not rows:
        return "(no episodes)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def paired_test(treated: Sequence[float], control: Sequence[float]) -> dict:
    """Paired comparison of per-episode values (trial k of each condition shares its seed and instruction):
    mean difference, % change of the means, paired t-test, Wilcoxon signed-rank test and Cohen's d_z."""
    from scipy import stats

    a, b = np.asarray(treated, np.float64), np.asarray(control, np.float64)
    if a.shape != b.shape:
        raise InputError(f"paired samples must have equal length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    d = a - b
    out = {"n": int(d.size), "mean_treated": float(a.mean()) if a.size else math.nan,
           "mean_control": float(b.mean()) if b.size else math.nan,
           "mean_diff": float(d.mean()) if d.size else math.nan,
           "t": math.nan, "p": math.nan, "p_wilcoxon": math.nan, "cohen_dz": math.nan, "pct": math.nan}
    if b.size and b.mean() != 0:
        out["pct"] = 100.0 * (a.mean() - b.mean()) / abs(b.mean())
    if d.size > 1:
        sd = d.std(ddof=1)
        if sd > 0:
            res = stats.ttest_rel(a, b)
            out["t"], out["p"] = float(res.statistic), float(res.pvalue)
            out["cohen_dz"] = float(d.mean() / sd)
        elif d.mean() != 0:  # every pair moved by the same amount: as certain as it gets
            sign = math.copysign(math.inf, d.mean())
            out["t"], out["p"], out["cohen_dz"] = sign, 0.0, sign
        else:
            out["t"], out["p"], out["cohen_dz"] = 0.0, 1.0, 0.0
        if np.any(d != 0):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
        else:
            out["p_wilcoxon"] = 1.0
    return out


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values (family-wise error control over the given tests)."""
    items = sorted(pvalues.items(), key=lambda kv: (math.isnan(kv[1]), kv[1]))
    m = len(items)
    adjusted: dict[str, float] = {}
    running = 0.0
    for rank, (name, p) in enumerate(items):
        value = 1.0 if math.isnan(p) else min(1.0, (m - rank) * p)
        running = max(running, value)
        adjusted[name] = running
    return adjusted


def episode_values(source: "ResultsStore | str | os.PathLike", metric: str) -> dict[str, dict[tuple, float]]:
    """{condition: {(task, trial): summary[metric]}} (the pairs of :func:`paired_test`)."""
    out: dict[str, dict[tuple, float]] = {}
    for row in _as_store(source).summaries():
        value = row.get(metric)
        out.setdefault(row["condition"], {})[(str(row["task"]), int(row["trial"]))] = (
            math.nan if value is None else float(value))
    return out


def paired(values: Mapping[str, Mapping[tuple, float]], treated: str, control: str) -> dict:
    """:func:`paired_test` of two conditions over the episodes both have."""
    if treated not in values or control not in values:
        raise InputError(f"no episodes for {treated!r} or {control!r}")
    keys = sorted(set(values[treated]) & set(values[control]))
    return paired_test([values[treated][k] for k in keys], [values[control][k] for k in keys])
