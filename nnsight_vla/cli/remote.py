"""``nnsight-vla remote check | stack``: remote execution on an NDIF-style server."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from ..errors import InputError
from .errors import handled
from .models import FAMILY_HELP

app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                  help="Remote execution on an NDIF-style server (docs/remote.md).")


@app.command("check")
@handled
def check(
    host: Annotated[Optional[str], typer.Option(help="server URL (default: NNSIGHT_VLA_HOST / NDIF_HOST)")] = None,
    family: Annotated[str, typer.Option(help=FAMILY_HELP)] = "openvla",
    source: Annotated[Optional[str], typer.Option(help="checkpoint path as the server sees it (default: a tiny "
                                                       "model)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the tiny model")] = 0,
    run: Annotated[bool, typer.Option(help="also run a steered trace remotely and compare it with the local one")]
    = True,
    simulate: Annotated[bool, typer.Option(help="check remote-safety offline (nnsight's remote='local')")] = False,
) -> None:
    """Check a server: reachability, the model key, a remote steered trace equal to the local one (JSON)."""
    from ..remote.helpers import remote_check

    report = remote_check(host, family=family, source=source, seed=seed, run=run, simulate=simulate)
    typer.echo(json.dumps(report, indent=2))
    if not report["ok"]:
        raise typer.Exit(1)


ACTIONS = ("up", "down", "status", "install")


@app.command("stack")
@handled
def stack(action: Annotated[str, typer.Argument(help="up, down, status or install")] = "status") -> None:
    """Install, start, stop or query a loopback NDIF stack (for tests and rehearsals; see docs/remote.md)."""
    from ..remote import stack as ndif

    if action not in ACTIONS:
        raise InputError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)}")
    if action == "up":
        try:
            typer.echo(json.dumps(ndif.up(), indent=2))
        except Exception:
            ndif.down()
            raise
    elif action == "down":
        ndif.down()
    elif action == "install":
        ndif.install()
    else:
        state = ndif.status()
        typer.echo(json.dumps(state, indent=2))
        if not state["connected"]:
            raise typer.Exit(1)
