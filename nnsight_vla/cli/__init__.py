"""The ``nnsight-vla`` command line: one typer app, one thin module per command group, one error handler.

Commands call library functions that return data and print it here. Heavy libraries (torch, nnsight,
simulators) are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import typer

from . import demo as _demo, libero as _libero, method as _method, remote as _remote, training as _training
from . import report as _report, serve as _serve, ur5 as _ur5

app = typer.Typer(rich_markup_mode=None, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Trace, read and steer robot VLA models (OpenVLA, pi0, pi0-FAST).")
app.command("info")(_method.info)
app.command("lens")(_method.lens)
app.command("lens-diff")(_method.lens_diff)
app.command("concepts")(_method.concepts)
app.command("scale")(_method.scale)
app.command("demo")(_demo.demo)
app.command("train")(_training.train)
app.command("experiment")(_training.experiment)
app.command("replication")(_training.replication)
app.command("serve")(_serve.serve)
app.command("report")(_report.report)
app.add_typer(_libero.app, name="libero")
app.add_typer(_ur5.app, name="ur5")
app.add_typer(_remote.app, name="remote")


@app.command("conditions")
def conditions() -> None:
    """Print the condition syntax shared by `libero run` and `ur5 run`."""
    from ..rollout.conditions import CONDITION_SYNTAX

    typer.echo(CONDITION_SYNTAX)


def main() -> None:  # console-script entry point
    app()


__all__ = ["app", "main"]
