"""Figures of the value-vector lens: action-token share per layer, top-token tables, checkpoint diffs.

Each function returns the saved path, or the ``Figure`` when ``out`` is None (see :mod:`.figures`). Inputs are
lenses / diffs or the tables they export, so figures can be redrawn from files.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .figures import new_figure, save_figure as _save

ACTION_COLOR = "#d62728"
LANGUAGE_COLOR = "#1f77b4"


def _figure(width: float, height: float, ncols: int = 1):
    fig = new_figure(width * ncols, height)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def _layer_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _share_table(source: Any):
    import pandas as pd

    if hasattr(source, "action_token_share"):
        return source.action_token_share()
    if isinstance(source, pd.DataFrame):
        return source
    return pd.read_parquet(source) if str(source).endswith(".parquet") else pd.read_csv(source)


def plot_action_share(source: Any, out: str | os.PathLike | None = None, title: str | None = None, *,
                      base: Any = None, chance: float | None = None):
    """Share of top-k tokens that are action tokens, per layer (bars; ``base``: the base checkpoint's beside them,
    as in the paper's figure), the fraction of value vectors with at least one action token in their top-k
    (line), and the chance level (dashed): the share of the vocabulary that is action tokens (a lens knows it;
    pass ``chance=`` for a table). ``source`` / ``base``: a lens, its ``action_token_share()`` table or that
    table's exported file."""
    table = _share_table(source)
    if chance is None and hasattr(source, "action_ids") and getattr(source, "vocab_rows", 0):
        chance = len(source.action_ids) / source.vocab_rows
    fig, (ax,) = _figure(max(4.0, 0.22 * len(table) + 2.5), 3.6)
    layers = table["layer"].to_numpy()
    width = 0.4 if base is not None else 0.8
    if base is not None:
        base_table = _share_table(base)
        ax.bar(base_table["layer"].to_numpy() - width / 2, base_table["share"], width=width, color="0.6",
               label="base checkpoint")
    ax.bar(layers + (width / 2 if base is not None else 0), table["share"], width=width, color=ACTION_COLOR,
           alpha=0.8, label="action share of top-k tokens" + (" (fine-tuned)" if base is not None else ""))
    if "vectors_with_action" in table:
        ax.plot(layers, table["vectors_with_action"], color="black", marker="o", ms=3, lw=1,
                label="vectors with >= 1 action token")
    if chance is not None:
        ax.axhline(chance, color="k", ls="--", lw=0.8, label=f"chance: {100 * chance:.0f} % of the vocabulary")
    for x, y in zip(layers, table["share"]):
        if len(layers) <= 40:
            ax.text(x + (width / 2 if base is not None else 0), y, f"{y:.2f}", ha="center", va="bottom", fontsize=6)
    _layer_axis(ax)
    ax.set_ylabel("fraction")
    ax.set_ylim(0, 1.05)
    ax.set_title(title or "Action tokens among value-vector top tokens", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, out)


def plot_token_table(table: Any, out: str | os.PathLike | None = None, max_rows: int = 30, k: int | None = None,
                     title: str | None = None):
    """A top-token table as a figure: one row per value vector (layer, neuron), one column per rank; action
    tokens in red. ``table``: a ``lens.top_tokens(...)`` DataFrame (long format)."""
    frame = table.sort_values(["layer", "neuron", "rank"])
    vectors = frame[["layer", "neuron"]].drop_duplicates().head(max_rows)
    k = int(k or frame["rank"].max() + 1)
    cells, colors, labels = [], [], []
    for layer, neuron in vectors.itertuples(index=False):
        rows = frame[(frame.layer == layer) & (frame.neuron == neuron)].head(k)
        tokens = [str(t).replace("▁", "_")[:14] for t in rows.token]
        action = list(rows.is_action)
        tokens += [""] * (k - len(tokens))
        action += [False] * (k - len(action))
        cells.append(tokens)
        colors.append(["#f7d4d4" if a else "white" for a in action])
        labels.append(f"L{layer} N{neuron}")
    fig, (ax,) = _figure(max(4.0, 1.05 * k + 1.0), 0.28 * len(cells) + 0.9)
    ax.axis("off")
    if cells:
        grid = ax.table(cellText=cells, cellColours=colors, rowLabels=labels, colLabels=[str(i) for i in range(k)],
                        loc="center", cellLoc="center")
        grid.auto_set_font_size(False)
        grid.set_fontsize(7)
        grid.scale(1, 1.1)
    ax.set_title(title or "Top tokens of value vectors (red: action token)", fontsize=10)
    return _save(fig, out)


def plot_checkpoint_diff(diff: Any, out: str | os.PathLike | None = None, title: str | None = None):
    """The paper's Fig. 3 view of a :class:`nnsight_vla.lens.CheckpointDiff`: per layer, top-k token entries
    gained (up) and lost (down), split into action and language tokens; and the action share of top-k tokens
    before and after. ``diff``: a CheckpointDiff or its ``layers`` table."""
    layers = getattr(diff, "layers", diff)
    x = layers["layer"].to_numpy()
    fig, (ax1, ax2) = _figure(max(4.5, 0.22 * len(x) + 3.0), 3.8, ncols=2)
    ga, gl = layers["gained_action"].to_numpy(), layers["gained_language"].to_numpy()
    la, ll = layers["lost_action"].to_numpy(), layers["lost_language"].to_numpy()
    ax1.bar(x, ga, color=ACTION_COLOR, label="action tokens")
    ax1.bar(x, gl, bottom=ga, color=LANGUAGE_COLOR, label="language tokens")
    ax1.bar(x, -la, color=ACTION_COLOR, alpha=0.5)
    ax1.bar(x, -ll, bottom=-la, color=LANGUAGE_COLOR, alpha=0.5)
    ax1.axhline(0, color="black", lw=0.6)
    _layer_axis(ax1)
    ax1.set_ylabel("top-k entries gained (+) / lost (-)")
    ax1.set_title("Top-token changes per layer", fontsize=10)
    ax1.legend(fontsize=7)
    ax2.plot(x, layers["action_share_base"], marker="o", ms=3, color="gray", label="base")
    ax2.plot(x, layers["action_share_tuned"], marker="o", ms=3, color=ACTION_COLOR, label="tuned")
    _layer_axis(ax2)
    ax2.set_ylabel("action share of top-k tokens")
    peak = float(np.nanmax(np.r_[layers["action_share_base"], layers["action_share_tuned"]]))
    ax2.set_ylim(0, max(0.05, peak * 1.15))
    ax2.set_title("Action-token share", fontsize=10)
    ax2.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, out)
