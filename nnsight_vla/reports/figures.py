"""Shared figure machinery: matplotlib's object API on an Agg canvas (no pyplot, no global backend change),
atomic saving (PNG or any suffix matplotlib knows), distinct styles and a legend that stays readable for many
curves."""

from __future__ import annotations

import os
from pathlib import Path

from .. import files


def new_figure(width: float, height: float):
    """A constrained-layout ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def styles(n: int) -> list[dict]:
    """Distinct line styles for ``n`` curves: the default colour cycle up to 10, then tab20 colours crossed with
    dash patterns (a sweep has dozens of conditions; repeated colours would make curves indistinguishable)."""
    if n <= 10:
        return [{"color": f"C{i}"} for i in range(n)]
    from matplotlib import colormaps

    tab20 = colormaps["tab20"]
    return [{"color": tab20(i % 20), "ls": ("-", "--", ":", "-.")[(i // 20) % 4]} for i in range(n)]


def legend(fig, axes, n: int) -> None:
    """Legend inside the axes for a few curves; for many, one legend outside on the right (inside, it would
    cover the curves and squeeze the axes to nothing)."""
    if n == 0:
        return
    if n <= 8:
        for ax in axes:
            ax.legend(fontsize=7)
        return
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=6, ncols=1 + n // 30)
    fig.set_figheight(max(fig.get_figheight(), 0.16 * min(n, 30) + 1.0))


def save_figure(fig, out: str | os.PathLike | None):
    """Write ``fig`` atomically to ``out`` (format from the suffix, PNG by default); return the path, or the
    figure itself when ``out`` is None."""
    if out is None:
        return fig
    out = Path(out)
    with files.atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
    return out
