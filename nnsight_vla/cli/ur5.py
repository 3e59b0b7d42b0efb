"""``nnsight-vla ur5 run | twin``: steered policies on a UR5 (a dry run unless --armed), and the controller twin."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from .errors import handled

app = typer.Typer(no_args_is_help=True, help="Run steered policies on a UR5 (dry run unless --armed), or its twin.")


@app.command("run")
@handled
def run(
    host: Annotated[str, typer.Option(help="robot controller address")],
    armed: Annotated[bool, typer.Option("--armed", help="really move the arm (default: dry run, nothing is sent)")]
    = False,
    config: Annotated[Optional[str], typer.Option(help="YAML/JSON with robot: and safety: sections")] = None,
    policy: Annotated[str, typer.Option(help="scripted | tiny | load:<checkpoint folder>")] = "scripted",
    family: Annotated[str, typer.Option(help="model family for tiny/load policies")] = "pi0",
    instruction: Annotated[Optional[str], typer.Option(help="task instruction")] = None,
    conditions: Annotated[str, typer.Option(help="comma-separated conditions, e.g. baseline,prompt:fast")]
    = "baseline",
    steps: Annotated[Optional[int], typer.Option(help="policy steps per episode")] = None,
    trials: Annotated[int, typer.Option(help="episodes per condition")] = 1,
    results: Annotated[str, typer.Option(help="results folder")] = "runs/ur5",
    cameras: Annotated[Optional[str], typer.Option(help="'twin' or base=0,wrist=1 (OpenCV devices)")] = None,
    expected_model: Annotated[Optional[str], typer.Option(help="refuse any other robot model (default UR5)")] = None,
    verbose: Annotated[bool, typer.Option(help="log every command")] = False,
) -> None:
    """Run a sweep of conditions on the robot at --host (a dry run unless --armed)."""
    from ..envs.ur5 import run_cli

    run_cli(host, armed=armed, config=config, policy=policy, family=family, instruction=instruction,
            conditions=conditions, steps=steps, trials=trials, results=results, cameras=cameras,
            expected_model=expected_model, verbose=verbose)


@app.command("twin")
@handled
def twin(
    host: Annotated[str, typer.Option(help="address to serve on (loopback)")] = "127.0.0.1",
    model: Annotated[str, typer.Option(help="UR5 or UR5e (the simulated arm and the reported model)")] = "UR5",
) -> None:
    """Start the UR controller twin (the real RTDE / dashboard / script protocols on loopback, MuJoCo arm)."""
    from ..envs.ur5.twin import twin_cli

    twin_cli(host=host, model=model)
