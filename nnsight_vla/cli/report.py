"""``nnsight-vla report``: a results folder's conditions and tests as text, or ONE self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .errors import handled


@handled
def report(
    results: Annotated[Path, typer.Argument(help="a results folder written by a sweep (libero run, ur5 run...)")],
    html: Annotated[bool, typer.Option("--html", help="write the HTML page (conditions and tests, figures, neuron "
                                                      "browser, episode media) instead of printing the table")]
    = False,
    out: Annotated[Optional[Path], typer.Option(help="where to write the page (default: RESULTS/report.html)")]
    = None,
    lens: Annotated[Optional[Path], typer.Option(help="the lens for the neuron browser: a lens .npz or the "
                                                      "table of `nnsight-vla lens --out` (.parquet/.csv/.json)")]
    = None,
    neurons: Annotated[Optional[List[str]], typer.Option(help="another neuron set to highlight (repeat): a "
                                                              "NeuronSet file, or dictionaries.yaml#KEY")] = None,
    metric: Annotated[str, typer.Option(help="the step metric compared (action_disp, disp, dz, action_dz, "
                                             "height) or an episode summary field")] = "action_disp",
    reference: Annotated[str, typer.Option(help="the condition the others are tested against")] = "baseline",
    k: Annotated[Optional[int], typer.Option(min=1, help="top tokens per vector in the browser (default: the "
                                                         "lens's k)")] = None,
    max_media_mb: Annotated[float, typer.Option(min=0, help="budget of embedded episode media (MB)")] = 25.0,
) -> None:
    """The conditions table with paired tests; with --html, one self-contained page a person can browse."""
    from ..reports.html import conditions_rows, write_html_report
    from ..rollout.stats import format_rows
    from ..rollout.store import ResultsStore

    store = ResultsStore.open(results)
    if html:
        path = write_html_report(store, out, lens=lens, metric=metric, reference=reference, neurons=neurons or (),
                                 k=k, max_media_mb=max_media_mb)
        typer.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)")
        return
    store.check()
    rows, _, note = conditions_rows(store, metric, reference)
    typer.echo(f"results: {store.root}  ({len(store.records())} episodes); {metric} per episode vs {reference}")
    typer.echo(format_rows(rows, ["condition", "kind", "episodes", "success_rate", "mean", "pct_change", "p_welch",
                                  "pairs", "mean_diff", "p_paired", "p_wilcoxon", "cohen_dz", "p_holm"]))
    if note:
        typer.echo(note)
