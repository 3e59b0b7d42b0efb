"""``nnsight-vla serve``: any family, steered or not, behind openpi's websocket policy-server protocol."""

from __future__ import annotations

import signal
import sys
from typing import Annotated, List, Optional

import typer

from ..errors import InputError
from .errors import handled
from .models import FAMILY_HELP, SOURCE_HELP, load_model

CONDITION_HELP = ("a served condition (repeat, or comma-separate): steer:FILE#KEY@ALPHA/LAYERS (#KEY and /LAYERS "
                  "optional), random:..., prompt:WORD, or a conditions .json/.yaml file (see `nnsight-vla "
                  "conditions`); the first is the default, 'baseline' is always served; a client picks one with the "
                  "observation key 'condition'")


@handled
def serve(
    family: Annotated[str, typer.Option(help=FAMILY_HELP)] = "openvla",
    source: Annotated[Optional[str], typer.Option(help=SOURCE_HELP.split("; default")[0])] = None,
    tiny: Annotated[bool, typer.Option(help="serve a tiny RANDOM model of --family (tests, rehearsals)")] = False,
    seed: Annotated[int, typer.Option(help="seed of the tiny random model")] = 0,
    condition: Annotated[Optional[List[str]], typer.Option(help=CONDITION_HELP)] = None,
    default_condition: Annotated[Optional[str], typer.Option(help="the condition used when a request names none "
                                                                  "(default: the first --condition)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (0.0.0.0: every interface, for a client on "
                                           "another machine; there is no authentication)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port (openpi's default 8000; 0: a free one)")] = 8000,
    unnorm_key: Annotated[Optional[str], typer.Option(help="OpenVLA: the dataset statistics that un-normalise "
                                                           "actions (e.g. libero_10_no_noops)")] = None,
    action_dims: Annotated[Optional[int], typer.Option(min=1, help="return the first N action dimensions (as "
                                                                   "openpi's output transforms do, e.g. 7 for LIBERO)")]
    = None,
    device: Annotated[Optional[str], typer.Option(help="torch device (default: the model's)")] = None,
) -> None:
    """Serve a policy over openpi's websocket protocol, so openpi's client and evaluation scripts drive it."""
    import logging

    from ..rollout.conditions import parse_conditions
    from ..rollout.openpi_server import OpenpiServer

    if bool(source) == bool(tiny):
        raise InputError("choose the model: --source PATH|HUB_ID|shipped, or --tiny (a random model of --family)")
    vla, _ = load_model(family, source, seed, device)
    conditions = parse_conditions(condition, d_mlp=vla.d_mlp) if condition else None
    options = {"unnorm_key": unnorm_key} if unnorm_key is not None else {}
    server = OpenpiServer(vla, conditions, host=host, port=port, default=default_condition, predict_kwargs=options,
                          action_dims=action_dims)
    meta = server.policy.metadata
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    typer.echo(f"serving {meta['family']} at {server.url} (openpi protocol; actions {meta['actions_shape']})")
    typer.echo(f"conditions: {', '.join(meta['conditions'])} (default: {meta['default_condition']})")
    sys.stdout.flush()
    # Ctrl-C and SIGTERM (a service manager, `kill`) both stop it cleanly; a shell that started it in the
    # background may have left SIGINT ignored, so SIGTERM is the stop signal that always works
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        typer.echo("stopped")
    finally:
        server.close()
