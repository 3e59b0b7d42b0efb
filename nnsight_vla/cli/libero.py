"""``nnsight-vla libero run | report``: sweeps of conditions in the LIBERO simulator, and their statistics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import InputError
from .errors import handled, progress_enabled
from .models import FAMILY_HELP

app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                  help="Run steered policies in the LIBERO simulator and report.")

CONDITION_HELP = ("a condition (repeat, or comma-separate): baseline, prompt:WORD, steer:FILE[#KEY]@ALPHA[/LAYERS], "
                  "random:FILE[#KEY]@ALPHA[/LAYERS][:SEED], speed:FACTOR, or a conditions .json/.yaml file "
                  "(see `nnsight-vla conditions`)")


def make_policy(family: str, checkpoint: Optional[str], tiny: bool, scripted: bool, seed: int):
    """The policy spec the options name (exactly one of checkpoint / tiny / scripted)."""
    from ..rollout.policy import PolicySpec

    if sum(bool(x) for x in (checkpoint, tiny, scripted)) != 1:
        raise InputError("choose exactly one policy: --checkpoint PATH, --tiny or --scripted")
    if scripted:
        from ..envs.libero import scripted_spec

        return scripted_spec(family)
    if tiny:
        return PolicySpec("tiny", family, seed=seed)
    return PolicySpec("load", family, source=checkpoint)


def executor_for(workers: int, backend: str, ray_address: Optional[str], policy_server: bool, max_batch: int):
    from ..rollout.executors import Inline, Processes, Ray

    if workers < 0:
        raise InputError(f"--workers must be >= 0, got {workers}")
    if workers == 0:
        if policy_server:
            raise InputError("--policy-server needs --workers N > 0 (it serves one model to N simulator workers)")
        return Inline()
    if backend == "ray":
        return Ray(workers, address=ray_address)
    if backend != "process":
        raise InputError(f"--backend must be process or ray, got {backend!r}")
    return Processes(workers, policy_server=policy_server, max_batch=max_batch)


@app.command("run")
@handled
def run(
    results: Annotated[Path, typer.Argument(help="results folder (created; resumed if it holds this sweep)")],
    suite: Annotated[str, typer.Option(help="libero_spatial, libero_object, libero_goal, libero_10 or libero_90")]
    = "libero_10",
    tasks: Annotated[Optional[str], typer.Option(help="task ids: '0-9', '0,3,5' or all")] = None,
    trials: Annotated[int, typer.Option(min=1, help="episodes per task and condition")] = 10,
    seed: Annotated[int, typer.Option(help="base seed of the episodes (and of --tiny)")] = 7,
    family: Annotated[str, typer.Option(help=FAMILY_HELP)] = "openvla",
    checkpoint: Annotated[Optional[str], typer.Option(help="the policy: a checkpoint folder or hub id")] = None,
    tiny: Annotated[bool, typer.Option(help="the policy: a tiny random model of --family")] = False,
    scripted: Annotated[bool, typer.Option(help="the policy: a scripted one (no model; smoke runs)")] = False,
    condition: Annotated[Optional[List[str]], typer.Option(help=CONDITION_HELP)] = None,
    baseline: Annotated[bool, typer.Option(help="include the unsteered baseline")] = True,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="policy steps per episode (default: the suite's)")]
    = None,
    settle_steps: Annotated[int, typer.Option(min=0, help="no-op steps before the policy acts")] = 15,
    camera_size: Annotated[int, typer.Option(min=16, help="rendered camera size (the recipe: 256)")] = 256,
    offsamples: Annotated[Optional[int], typer.Option(min=0, help="MuJoCo anti-aliasing samples (0 renders faster)")]
    = None,
    hard_reset: Annotated[bool, typer.Option(help="rebuild the MuJoCo model at every reset (robosuite default)")]
    = True,
    open_loop_steps: Annotated[Optional[int], typer.Option(min=1, help="chunk actions executed per call")] = None,
    workers: Annotated[int, typer.Option(min=0, help="0: run here; N: N worker processes or Ray tasks")] = 0,
    backend: Annotated[str, typer.Option(help="process (this machine) or ray")] = "process",
    ray_address: Annotated[Optional[str], typer.Option(help="an existing Ray cluster (default: a local one)")] = None,
    policy_server: Annotated[bool, typer.Option(help="one process owns the model, workers send observations")]
    = False,
    max_batch: Annotated[int, typer.Option(min=1, help="policy server: batch up to N same-condition requests")] = 1,
    video: Annotated[bool, typer.Option(help="keep agent-view frames of every episode")] = False,
    restrict_to_action_tokens: Annotated[bool, typer.Option(help="OpenVLA: decode the best action token at each "
                                                                  "step")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (terminal only)")] = True,
) -> None:
    """Run a sweep of conditions over LIBERO tasks (resumable; the standard OpenVLA / openpi recipe)."""
    from ..envs.libero import LiberoConfig, LiberoEnv, parse_task_range
    from ..rollout.conditions import baseline as make_baseline, check_unique, parse_conditions
    from ..rollout.sweep import run_sweep

    spec = make_policy(family, checkpoint, tiny, scripted, seed)
    executor = executor_for(workers, backend, ray_address, policy_server, max_batch)
    d_mlp = _d_mlp(family, checkpoint) if any("#" in c for c in condition or []) else None
    conds = ([make_baseline()] if baseline else []) + parse_conditions(condition or [], d_mlp=d_mlp)
    check_unique(conds)
    cfg = LiberoConfig(suite=suite, tasks=parse_task_range(tasks), trials=trials, seed=seed, max_steps=max_steps,
                       settle_steps=settle_steps, camera_size=camera_size, offsamples=offsamples,
                       hard_reset=hard_reset, open_loop_steps=open_loop_steps, video=video,
                       predict_kwargs={"restrict_to_action_tokens": True} if restrict_to_action_tokens else ())
    report = run_sweep(LiberoEnv(cfg), spec, conds, results, executor=executor, progress=progress_enabled(progress))
    typer.echo(str(report))
    if report.failed:
        lines = "\n  ".join(f"{f['episode']}: {f['error']}" for f in report.failed[:10])
        raise InputError(f"{len(report.failed)} episode(s) failed (not recorded; rerun to retry):\n  {lines}")


def _d_mlp(family: str, checkpoint: Optional[str]) -> int:
    """The MLP width of the policy (for flat neuron indices in the authors' files), from its config alone."""
    if not checkpoint:
        from .. import models

        return models.tiny(family).d_mlp
    from .. import models

    return models.load(family, checkpoint).d_mlp  # built on the meta device: no weights are read


@app.command("report")
@handled
def report(
    results: Annotated[Path, typer.Argument(help="a results folder written by a sweep")],
    metric: Annotated[str, typer.Option(help="a step metric (action_disp, disp, dz, height...) or, with --level "
                                             "episode, a summary field")] = "action_disp",
    reference: Annotated[str, typer.Option(help="the condition the others are compared with")] = "baseline",
    level: Annotated[str, typer.Option(help="episode (one sample per episode, the default test) or step (pooled "
                                            "steps, as the paper)")] = "episode",
    plots: Annotated[bool, typer.Option(help="draw the paper's figures")] = True,
    out: Annotated[Optional[Path], typer.Option(help="folder for the figures (default: RESULTS/plots)")] = None,
) -> None:
    """Success rates, per-task and overall comparisons against a reference condition, and the paper's figures."""
    from ..rollout.stats import compare_conditions, format_rows, success_rates
    from ..rollout.store import ResultsStore

    store = ResultsStore.open(results)
    store.check()
    typer.echo(f"results: {store.root}  ({len(store.records())} episodes)")
    typer.echo("\nsuccess rate")
    typer.echo(format_rows(success_rates(store), ["task", "condition", "episodes", "successes", "success_rate"]))
    typer.echo(f"\n{metric} ({level} level) vs {reference}")
    rows = compare_conditions(store, metric, reference, level=level)
    typer.echo(format_rows(rows, ["task", "condition", "n", "mean", "sem", "pct_change", "p_value"]))
    if plots:
        from ..reports.plots import plot_all

        files = [str(p) for p in plot_all(store, out or store.root / "plots", reference=reference)]
        typer.echo("\nfigures:\n  " + "\n  ".join(files))


def _floats(text: str, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not values:
        raise InputError(f"--{what} is empty")
    return values


@app.command("paper")
@handled
def paper(
    results: Annotated[Path, typer.Argument(help="results folder (created; resumed if it holds this sweep)")],
    checkpoint: Annotated[Optional[str], typer.Option(help="the OpenVLA checkpoint (folder or hub id)")] = None,
    tiny: Annotated[bool, typer.Option(help="a tiny random OpenVLA instead (smoke runs)")] = False,
    neurons: Annotated[Optional[Path], typer.Option(help="the authors' dictionaries.yaml (flat index = layer x "
                                                         "d_mlp + neuron); default: find the concepts with the lens")]
    = None,
    keys: Annotated[str, typer.Option(help="entries of --neurons to steer, comma-separated")] = "fast_10,slow_10,up_10",
    concepts: Annotated[str, typer.Option(help="concept words found with the lens (without --neurons)")]
    = "fast,slow,up",
    sizes: Annotated[str, typer.Option(help="cluster sizes (the paper: 10,20)")] = "10,20",
    alphas: Annotated[str, typer.Option(help="values written into the neurons (the paper: 2,4,6,8,10,20)")]
    = "2,4,6,8,10,20",
    layers: Annotated[str, typer.Option(help="layer subsets (the paper: early,late,all); the alpha sweep runs on "
                                             "all layers, the other subsets at --layer-alpha")] = "early,late,all",
    layer_alpha: Annotated[float, typer.Option(help="alpha of the layer-subset comparison and the random controls")]
    = 10.0,
    random_sets: Annotated[int, typer.Option(min=0, help="random controls per concept set and layer subset at "
                                                         "--layer-alpha (the paper: one control)")] = 1,
    prompts: Annotated[bool, typer.Option(help="add the prompt baseline of each concept word")] = True,
    suite: Annotated[str, typer.Option(help="LIBERO suite (the paper: libero_10 = LIBERO-Long)")] = "libero_10",
    tasks: Annotated[Optional[str], typer.Option(help="task ids: '0-9', '0,3,5' or all")] = None,
    trials: Annotated[int, typer.Option(min=1, help="episodes per task and condition (the paper: 10)")] = 10,
    seed: Annotated[int, typer.Option(help="base seed of the episodes (the standard recipe: 7)")] = 7,
    max_steps: Annotated[Optional[int], typer.Option(min=1, help="policy steps per episode (default: the suite's; "
                                                                 "another value is a recorded deviation)")] = None,
    camera_size: Annotated[int, typer.Option(min=16, help="rendered camera size (the recipe: 256)")] = 256,
    workers: Annotated[int, typer.Option(min=0, help="0: run here; N: N simulator processes")] = 0,
    policy_server: Annotated[bool, typer.Option(help="one process owns the model, workers send observations")]
    = False,
    max_batch: Annotated[int, typer.Option(min=1, help="policy server: batch up to N same-condition requests")] = 1,
    restrict_to_action_tokens: Annotated[bool, typer.Option(help="decode the best action token at each step "
                                                                  "(a deviation from the published decoding)")]
    = False,
    dry_run: Annotated[bool, typer.Option(help="print the episode count and a time estimate; run nothing")] = False,
    sim_step_s: Annotated[float, typer.Option(help="dry run: seconds per simulator step (measure yours)")] = 0.2,
    policy_call_s: Annotated[float, typer.Option(help="dry run: seconds per policy call at batch 1")] = 0.15,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (terminal only)")] = True,
) -> None:
    """The paper's LIBERO grid in one command: concepts -> sizes x alphas x layers + random controls + prompt
    baselines -> resumable sweep (standard OpenVLA recipe) -> the report beside the published numbers."""
    import json as _json

    from ..envs.libero import LiberoConfig, LiberoEnv, parse_task_range, suite_tasks
    from ..envs.libero.paper import (PaperGrid, concept_sets_from_file, concept_sets_from_lens, estimate,
                                     paper_conditions)
    from ..rollout.sweep import run_sweep

    grid = PaperGrid(concepts=tuple(c.strip() for c in (keys if neurons else concepts).split(",") if c.strip()),
                     sizes=tuple(int(s) for s in _floats(sizes, "sizes")), alphas=_floats(alphas, "alphas"),
                     layers=tuple(s.strip() for s in layers.split(",") if s.strip()), layer_alpha=layer_alpha,
                     random_sets=random_sets, prompts=prompts)
    spec = make_policy("openvla", checkpoint, tiny, False, seed)
    executor = executor_for(workers, "process", None, policy_server, max_batch)
    cfg = LiberoConfig(suite=suite, tasks=parse_task_range(tasks), trials=trials, seed=seed, max_steps=max_steps,
                       camera_size=camera_size,
                       predict_kwargs={"restrict_to_action_tokens": True} if restrict_to_action_tokens else ())
    from .. import models

    vla = spec.build() if tiny else models.load("openvla", checkpoint)  # no weights read before the sweep
    if neurons:
        sets = concept_sets_from_file(str(neurons), grid.concepts, vla.d_mlp, vla.num_layers)
    else:
        from ..lens import ValueVectorLens

        if not tiny:
            vla.dispatch()
        sets = concept_sets_from_lens(ValueVectorLens(vla, progress=progress_enabled(progress)), grid)
    conditions = paper_conditions(sets, grid, seed=seed)
    n_tasks = len(cfg.tasks) if cfg.tasks else len(suite_tasks(suite))
    n_episodes = len(conditions) * n_tasks * trials
    plan = estimate(n_episodes, suite, max_steps, sim_step_s=sim_step_s, policy_call_s=policy_call_s,
                    workers=max(1, workers), batch=max_batch)
    typer.echo(f"{len(conditions)} conditions x {n_tasks} tasks x {trials} trials = {n_episodes} episodes; "
               f"at most {plan['hours_upper_bound']:.1f} h ({plan['simulator_hours']:.1f} h of simulation over "
               f"{max(1, workers)} worker(s), {plan['policy_hours']:.1f} h of policy calls at batch {max_batch}; "
               f"assumed {sim_step_s} s/step, {policy_call_s} s/call)")
    if dry_run:
        return
    deviations = {name: value for name, value, default in (
        ("restrict_to_action_tokens", restrict_to_action_tokens, False), ("max_steps", max_steps, None),
        ("camera_size", camera_size, 256)) if value != default}
    report = run_sweep(LiberoEnv(cfg), spec, conditions, results, executor=executor,
                       progress=progress_enabled(progress),
                       run_info={"paper_grid": grid.to_dict(), "deviations_from_recipe": deviations,
                                 "neurons": str(neurons) if neurons else "lens"})
    typer.echo(str(report))
    from ..reports.paper import markdown, paper_report
    from ..rollout.records import jsonable
    from ..rollout.store import ResultsStore

    store = ResultsStore.open(results)
    store.check()
    out = paper_report(store)
    (Path(results) / "paper.json").write_text(_json.dumps(jsonable(out), indent=1))
    text = markdown(out)
    (Path(results) / "paper.md").write_text(text)
    typer.echo(text)
