"""The ``nnsight-vla`` command line. Heavy imports happen inside the commands, so ``--help`` is instant."""

from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trace, read and steer robot VLA models.")


@app.command()
def info(
    family: str = typer.Argument("openvla", help="openvla, pi0 or pi0-fast"),
    source: Optional[str] = typer.Option(None, help="checkpoint folder or hub id (default: a tiny random model)"),
) -> None:
    """Print a model's uniform tree: stacks, widths, action tokens."""
    import nnsight_vla as nv

    vla = nv.load(family, source) if source else nv.tiny(family)
    typer.echo(vla.describe())
    try:
        ids = vla.action_token_ids
        typer.echo(f"action tokens: {len(ids)} ids, {ids[0]}..{ids[-1]}")
    except Exception as error:  # noqa: BLE001 - a family without action tokens says why
        typer.echo(f"action tokens: none ({error})")


@app.command()
def demo(
    seed: int = typer.Option(0, help="seed of the tiny model and the synthetic image"),
    alpha: float = typer.Option(8.0, help="value the steered activations are overwritten with"),
) -> None:
    """Load a small offline OpenVLA, trace it, steer a few MLP neurons over every forward, print the action change."""
    from .demo import run_demo

    run_demo(seed=seed, alpha=alpha)


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()
