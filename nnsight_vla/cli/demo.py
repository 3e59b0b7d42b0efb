"""``nnsight-vla demo``: the README's main job, the whole method on the shipped small VLA."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .errors import handled, progress_enabled


@handled
def demo(
    out: Annotated[Path, typer.Option(help="folder for the demo's tables, episodes and plots (new, empty, or a "
                                           "previous demo's)")] = Path("results/demo"),
    seed: Annotated[int, typer.Option(help="first scene seed and the random controls' seed")] = 0,
    trials: Annotated[int, typer.Option(min=1, help="episodes per condition")] = 4,
    max_steps: Annotated[int, typer.Option(min=1, help="policy steps per episode")] = 30,
    alpha: Annotated[Optional[float], typer.Option(help="steering value (default: the demo's own)")] = None,
    model: Annotated[Optional[str], typer.Option(help="a fine-tuned checkpoint folder (default: the shipped "
                                                      "model)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (terminal only)")] = True,
) -> None:
    """The whole pipeline on the shipped small VLA: lens, concept discovery, steered vs unsteered rollouts, plots."""
    from ..demo import check_output_folder, run_demo

    if alpha is not None and not math.isfinite(alpha):
        raise InputError(f"--alpha must be a finite number, got {alpha}")
    check_output_folder(out)
    run_demo(seed=seed, out=out, trials=trials, max_steps=max_steps, alpha=alpha, model=model,
             progress=progress_enabled(progress))
