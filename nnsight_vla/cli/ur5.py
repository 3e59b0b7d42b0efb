"""``nnsight-vla ur5 run | twin``: steered policies on a UR5 (a dry run unless --armed), and the controller twin."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import RobotConfigError
from .errors import handled

app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                  help="Run steered policies on a UR5 (dry run unless --armed), or its twin.")


def run_command(host: str, armed: bool = False, config: Optional[str] = None, *, policy: str = "scripted",
                family: str = "pi0", instruction: Optional[str] = None, task: Optional[str] = None,
                conditions: str = "baseline", steps: Optional[int] = None, trials: int = 1, results: str = "runs/ur5",
                cameras: Optional[str] = None, expected_model: Optional[str] = None, verbose: bool = False,
                plots: bool = True) -> Any:
    """What ``nnsight-vla ur5 run`` does; returns the :class:`~nnsight_vla.envs.ur5.SweepResult`. A halt exits
    with code 4 after saying why (committed episodes are kept; rerunning resumes)."""
    from ..envs.ur5 import build_policy, load_config, run_conditions
    from ..envs.ur5.config import is_count
    from ..rollout.conditions import baseline, parse_conditions

    for name, value in (("steps", steps), ("trials", trials)):  # refused before anything connects
        if value is not None and not is_count(value):
            raise RobotConfigError(f"--{name} must be an int >= 1, got {value!r}")
    logging.basicConfig(level=logging.INFO if verbose or not armed else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg, safety = load_config(config)
    changes: dict[str, Any] = {k: v for k, v in (("instruction", instruction), ("task", task), ("max_steps", steps),
                                                 ("expected_model", expected_model)) if v}
    if cameras == "twin":
        changes["cameras"] = {"primary": "twin:scene", "base": "twin:scene", "wrist": "twin:wrist"}
    elif cameras:
        changes["cameras"] = dict(item.split("=", 1) for item in cameras.split(","))
    if changes:
        cfg = replace(cfg, **changes)
    pol = build_policy(policy, family, cfg.seed)
    conds = parse_conditions([conditions], d_mlp=getattr(pol, "d_mlp", None)) if conditions.strip() else [baseline()]
    if not armed:
        typer.echo(f"DRY RUN on {host}: commands are checked and logged, nothing is sent (use --armed to move the arm)")
    res = run_conditions(pol, conds, cfg, results, host=host, armed=armed, safety=safety, trials=trials)
    typer.echo(f"{res.completed} episode(s) written to {res.results} ({res.skipped} already there); "
               f"terminations: {res.terminations}")
    if plots and res.completed:
        from ..reports.plots import plot_all

        plot_all(res.results, Path(res.results) / "plots")
    if res.halted:
        typer.echo(f"ROBOT HALTED: {res.halted}", err=True)
        raise typer.Exit(4)
    return res


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
    task: Annotated[Optional[str], typer.Option(help="task name of the episode keys")] = None,
    conditions: Annotated[str, typer.Option(help="comma-separated conditions in the shared syntax (see "
                                                 "`nnsight-vla conditions`): baseline, prompt:WORD, "
                                                 "steer:FILE@ALPHA/LAYERS, random:..., speed:F")] = "baseline",
    steps: Annotated[Optional[int], typer.Option(help="policy steps per episode (>= 1)")] = None,
    trials: Annotated[int, typer.Option(help="episodes per condition (>= 1)")] = 1,
    results: Annotated[str, typer.Option(help="results folder")] = "runs/ur5",
    cameras: Annotated[Optional[str], typer.Option(help="'twin' or base=0,wrist=1 (OpenCV devices)")] = None,
    expected_model: Annotated[Optional[str], typer.Option(help="refuse any other robot model (default UR5)")] = None,
    plots: Annotated[bool, typer.Option(help="draw the episode figures into RESULTS/plots")] = True,
    verbose: Annotated[bool, typer.Option(help="log every command")] = False,
) -> None:
    """Run a sweep of conditions on the robot at --host (a dry run unless --armed)."""
    run_command(host, armed=armed, config=config, policy=policy, family=family, instruction=instruction, task=task,
                conditions=conditions, steps=steps, trials=trials, results=results, cameras=cameras,
                expected_model=expected_model, verbose=verbose, plots=plots)


@app.command("twin")
@handled
def twin(
    host: Annotated[str, typer.Option(help="loopback address to serve on (e.g. 127.0.0.2 for a second twin)")]
    = "127.0.0.1",
    model: Annotated[str, typer.Option(help="UR5 or UR5e (the simulated arm and the reported model)")] = "UR5",
    controller_version: Annotated[str, typer.Option(help="reported version: 3.x (CB3, 125 Hz) or 5.x "
                                                         "(e-Series, 500 Hz)")] = "3.15.8.106339",
    camera_size: Annotated[int, typer.Option(help="rendered camera size")] = 64,
    collision_stop: Annotated[bool, typer.Option(help="protective stop on contact with the table")] = True,
    allow_remote: Annotated[bool, typer.Option(help="serve on a non-loopback address (only behind a firewall you "
                                                    "control: the protocols have no authentication)")] = False,
) -> None:
    """Start the UR controller twin (the real RTDE / dashboard / script protocols, a MuJoCo arm) until Ctrl-C."""
    from ..envs.ur5.twin import twin_cli

    twin_cli(host=host, model=model, controller_version=controller_version, camera_size=camera_size,
             collision_stop=collision_stop, allow_remote=allow_remote)
