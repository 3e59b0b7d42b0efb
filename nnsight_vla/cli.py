"""The ``nnsight-vla`` command line.

Each sub-command is a plain, typed function living next to the code it drives (``lens_cli`` in lens.py,
``run_cli`` in envs/libero.py ...); this module only mounts them and turns user errors into a one-line message
with exit code 2. Mounting imports those modules (about 0.1 s on top of torch and nnsight, which the package needs anyway).
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Trace, read and steer robot VLA models.")


def _errors_as_messages(fn: Callable) -> Callable:
    """Run ``fn``; print a user error (VLAError / OSError) as one line and exit 2; an int result is the exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import VLAError

        try:
            result = fn(*args, **kwargs)
        except (VLAError, OSError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        if isinstance(result, int) and not isinstance(result, bool) and result != 0:
            raise typer.Exit(result)

    return wrapper


def _mount(group: typer.Typer, name: str, module: str, function: str, help: str) -> None:
    """Mount ``module.function`` (a plain typed function) as ``group name``; typer reads its signature."""
    group.command(name, help=help)(_errors_as_messages(getattr(importlib.import_module(module), function)))


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
    seed: int = typer.Option(0, help="first scene seed and the random control's seed"),
    out: str = typer.Option("results/demo", help="folder for the demo's tables, episodes and plots"),
    trials: int = typer.Option(4, min=1, help="episodes per condition"),
    max_steps: int = typer.Option(30, min=1, help="policy steps per episode"),
    alpha: Optional[float] = typer.Option(None, help="value written into the concept neurons (default: 10)"),
    model: Optional[str] = typer.Option(None, help="a fine-tuned checkpoint folder (default: the shipped model)"),
    no_progress: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """The whole pipeline on the shipped small VLA: lens, concept discovery, steered vs unsteered rollouts, plots."""
    from .demo import run_demo

    run_demo(seed=seed, out=out, trials=trials, max_steps=max_steps, alpha=alpha, model=model,
             progress=not no_progress)


_mount(app, "lens", "nnsight_vla.lens", "lens_cli", "Value-vector lens: top tokens per vector, action-token share per layer.")
_mount(app, "lens-diff", "nnsight_vla.lens", "diff_cli", "Checkpoint diff (base vs fine-tuned): tokens gained and lost per layer.")
_mount(app, "concepts", "nnsight_vla.concepts", "concepts_cli", "Find the neurons of a concept (kNN or keyword) and write a NeuronSet.")

libero = typer.Typer(no_args_is_help=True, help="Run steered policies in the LIBERO simulator and report.")
app.add_typer(libero, name="libero")
_mount(libero, "run", "nnsight_vla.envs.libero", "run_cli", "Run a sweep of conditions over LIBERO tasks (resumable).")
_mount(libero, "report", "nnsight_vla.envs.libero", "report_cli", "Statistics and plots from a results folder.")

ur5 = typer.Typer(no_args_is_help=True, help="Run steered policies on a UR5 (dry run unless --armed), or its twin.")
app.add_typer(ur5, name="ur5")


@ur5.command("run")
def ur5_run(
    host: str = typer.Option(..., help="robot controller address"),
    armed: bool = typer.Option(False, "--armed", help="really move the arm (default: dry run, nothing is sent)"),
    config: Optional[str] = typer.Option(None, help="YAML/JSON with robot: and safety: sections"),
    policy: str = typer.Option("scripted", help="scripted | tiny | load:<checkpoint folder>"),
    family: str = typer.Option("pi0", help="model family for tiny/load policies"),
    instruction: Optional[str] = typer.Option(None, help="task instruction"),
    conditions: str = typer.Option("baseline", help="comma-separated conditions, e.g. baseline,prompt:fast"),
    steps: Optional[int] = typer.Option(None, help="policy steps per episode"),
    trials: int = typer.Option(1, help="episodes per condition"),
    results: str = typer.Option("runs/ur5", help="results folder"),
    cameras: Optional[str] = typer.Option(None, help="'twin' or base=0,wrist=1 (OpenCV devices)"),
    expected_model: Optional[str] = typer.Option(None, help="refuse any other robot model (default UR5)"),
    verbose: bool = typer.Option(False, help="log every command"),
) -> None:
    """Run a sweep of conditions on the robot at --host (a dry run unless --armed)."""
    from .envs.ur5 import run_cli

    _errors_as_messages(run_cli)(host, armed=armed, config=config, policy=policy, family=family,
                                 instruction=instruction, conditions=conditions, steps=steps, trials=trials,
                                 results=results, cameras=cameras, expected_model=expected_model, verbose=verbose)


_mount(ur5, "twin", "nnsight_vla.envs.ur5_twin", "twin_cli", "Start the UR controller twin (real protocol on loopback, MuJoCo arm).")

remote = typer.Typer(no_args_is_help=True, help="Remote execution on an NDIF-style server.")
app.add_typer(remote, name="remote")
_mount(remote, "check", "nnsight_vla.remote", "remote_check_cli", "Check a server: reachability, a remote steered trace equal to the local one.")
_mount(remote, "stack", "nnsight_vla.ndif_stack", "stack_cli", "up / down / status / install a loopback NDIF stack (for tests and rehearsal).")


def main() -> None:  # console-script entry point
    app()


if __name__ == "__main__":
    main()


__all__ = ["app", "main"]
