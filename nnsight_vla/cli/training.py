"""``nnsight-vla train | experiment``: the small OpenVLA trained in the project, and its pre-registered
experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import handled, progress_enabled


@handled
def train(
    out: Annotated[Path, typer.Option(help="where the base and fine-tuned checkpoints and training_log.json go")]
    = Path("nnsight_vla/data"),
    seed: Annotated[int, typer.Option(help="the one seed of every random draw (corpus, demos, weights)")] = 0,
    work: Annotated[Optional[Path], typer.Option(help="cache of rendered demonstrations (default: "
                                                      "~/.cache/nnsight_vla/train_work)")] = None,
    quick: Annotated[bool, typer.Option(help="a few-minute configuration (weak model; for tests)")] = False,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (fixed: results depend on it)")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="processes rendering demonstrations")] = 2,
    phase1_steps: Annotated[Optional[int], typer.Option(min=1, help="language pretraining steps")] = None,
    phase2_steps: Annotated[Optional[int], typer.Option(min=1, help="action fine-tuning (LoRA) steps")] = None,
    episodes: Annotated[Optional[int], typer.Option(min=1, help="demonstration episodes")] = None,
    action_input_noise: Annotated[Optional[float], typer.Option(
        min=0.0, max=0.99, help="phase 2: chance that each teacher-forced action token in the input is replaced by "
                                "the same dimension's token of a random other step (labels kept), so the model "
                                "reads the arm's state from the image rather than from the previous dimension's "
                                "true token; default 0")] = None,
    recovery_episodes: Annotated[Optional[int], typer.Option(
        min=0, help="phase 2: extra demonstrations that start 0.15-0.5 m above the usual start, so the expert "
                    "first comes down (states a policy reaches when it overshoots); default 0")] = None,
    phase2_seed: Annotated[Optional[int], typer.Option(
        help="phase 2 draws from fresh random streams seeded with this (default: it continues phases 0-1b's), "
             "which lets a run start from a saved base (--from-base)")] = None,
    from_base: Annotated[Optional[Path], typer.Option(
        help="folder of a finished run with the same settings outside phase 2: this run takes its base "
             "checkpoint and phase 0-1b records instead of training them (needs --phase2-seed)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (terminal only) and "
                                           "step records as JSON lines on stdout (also when redirected)")] = True,
) -> None:
    """Train the small OpenVLA (vision, language, grounding, LoRA actions) and write both checkpoints."""
    from ..training.train import TrainConfig, train as run

    config = TrainConfig.quick(seed) if quick else TrainConfig(seed=seed)
    config.threads, config.workers = threads, workers
    for name, value in (("phase1_steps", phase1_steps), ("phase2_steps", phase2_steps), ("n_episodes", episodes),
                        ("action_input_noise", action_input_noise), ("recovery_episodes", recovery_episodes),
                        ("phase2_seed", phase2_seed)):
        if value is not None:
            setattr(config, name, value)
    log = run(out, config, work=work, progress=progress_enabled(progress), records=progress, from_base=from_base)
    typer.echo(json.dumps({"out": str(out), "timings_s": {k: round(v, 1) for k, v in log["timings"].items()},
                           "final": log["final"]}, indent=1, default=float))


@handled
def experiment(
    out: Annotated[Path, typer.Option(help="results folder (resumable)")] = Path("results/trained_vla"),
    model: Annotated[Optional[str], typer.Option(help="fine-tuned checkpoint (default: the shipped one)")] = None,
    base: Annotated[Optional[str], typer.Option(help="its base checkpoint, for the diff (default: shipped)")] = None,
    trials: Annotated[Optional[int], typer.Option(min=1, help="paired episodes per condition (pre-registered: 40)")]
    = None,
    random_sets: Annotated[Optional[int], typer.Option(min=0, help="random sets per concept per alpha "
                                                                   "(pre-registered: 10)")] = None,
    workers: Annotated[int, typer.Option(min=1, help="worker processes for the rollouts")] = 2,
    quick: Annotated[bool, typer.Option(help="declared alpha only, few trials (tests); not the pre-registered run")]
    = False,
    analyse_only: Annotated[bool, typer.Option(help="run no episode: report on the episodes already in --out "
                                                    "(marked INTERIM unless all are there)")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (terminal only)")] = True,
) -> None:
    """The pre-registered experiment on the trained model (docs/trained_vla/PREREGISTRATION.md): lens, concepts,
    gates, paired rollouts on held-out seeds, statistics, criteria, plots. Resumable."""
    from ..training.experiment import ExperimentConfig, run_experiment
    from ..training.report import markdown

    config = ExperimentConfig.quick() if quick else ExperimentConfig()
    config.model, config.base, config.workers = model, base, workers
    if trials is not None:
        config.trials = trials
    if random_sets is not None:
        config.random_sets = random_sets
    typer.echo(markdown(run_experiment(out, config, progress=progress_enabled(progress), rollouts=not analyse_only)))


@handled
def replication(
    runs: Annotated[list[str], typer.Argument(help="two or more LABEL=FOLDER, each an `experiment` results folder "
                                                   "(e.g. 'seed 0=results/seed0')")],
    out: Annotated[Optional[Path], typer.Option(help="write the markdown here as well as printing it")] = None,
) -> None:
    """The pre-registered criteria across training seeds: met only where every run meets them."""
    from .. import files
    from ..errors import InputError
    from ..training.report import replication_markdown

    loaded = {}
    for run in runs:
        label, sep, folder = run.partition("=")
        if not sep or not label or not folder:
            raise InputError(f"expected LABEL=FOLDER, got {run!r}")
        path = Path(folder) / "results.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist: run `nnsight-vla experiment --out {folder}` first")
        loaded[label] = json.loads(path.read_text())
    try:
        text = replication_markdown(loaded)
    except ValueError as e:
        raise InputError(str(e)) from None
    if out is not None:
        files.write_text(out, text)
    typer.echo(text)
