"""``nnsight-vla info | lens | lens-diff | concepts``: the model's tree, the value-vector lens, concept neurons."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from ..errors import InputError
from .errors import handled, progress_enabled
from .models import FAMILY_HELP, SOURCE_HELP, load_model

Family = Annotated[str, typer.Option(help=FAMILY_HELP)]
Source = Annotated[Optional[str], typer.Option(help=SOURCE_HELP)]
Device = Annotated[Optional[str], typer.Option(help="torch device for the lens (default: cuda if available, else cpu)")]
CacheDir = Annotated[Optional[str], typer.Option(help="lens cache folder (default: ~/.cache/nnsight_vla/lens)")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars (shown on a terminal only)")]
Seed = Annotated[int, typer.Option(help="seed of the tiny random model used without --source")]


@handled
def info(family: Family = "openvla", source: Source = None) -> None:
    """Print a model's uniform tree: stacks, widths, action tokens."""
    vla, _ = load_model(family, source)
    typer.echo(vla.describe())
    try:
        ids = vla.action_token_ids
        typer.echo(f"action tokens: {len(ids)} ids, {ids[0]}..{ids[-1]}")
    except InputError as error:  # a family without action tokens says why
        typer.echo(f"action tokens: none ({error})")


@handled
def lens(
    family: Family = "openvla",
    source: Source = None,
    layer: Annotated[Optional[int], typer.Option(help="layer to show (default: the last)")] = None,
    neuron: Annotated[Optional[int], typer.Option(min=0, help="one neuron (index into d_mlp) to show")] = None,
    k: Annotated[int, typer.Option(min=1, help="top tokens kept per value vector")] = 10,
    show: Annotated[int, typer.Option(min=1, help="how many vectors to print")] = 10,
    out: Annotated[Optional[str], typer.Option(help="write the full top-token table (.parquet / .csv / .json)")] = None,
    share_out: Annotated[Optional[str], typer.Option(help="write the per-layer action-token share table")] = None,
    plot: Annotated[Optional[str], typer.Option(help="write the action-share figure (.png)")] = None,
    device: Device = None,
    cache_dir: CacheDir = None,
    seed: Seed = 0,
    progress: Progress = True,
) -> None:
    """Value-vector lens: each vector's top tokens (action tokens marked *) and the action-token share per layer."""
    from ..lens import ValueVectorLens

    vla, _ = load_model(family, source, seed, device)
    lens = ValueVectorLens(vla, k=k, device=device, cache_dir=cache_dir, progress=progress_enabled(progress))
    typer.echo(str(lens))
    if neuron is not None and neuron >= lens.d_mlp:
        raise InputError(f"--neuron {neuron} is out of range: the model has {lens.d_mlp} neurons per layer")
    table = lens.top_tokens(layer if layer is not None else (None if neuron is not None else lens.num_layers - 1),
                            neuron)
    shown = table[table.neuron.isin(sorted(table.neuron.unique())[:show])]
    for (l, n), group in shown.groupby(["layer", "neuron"]):
        tokens = ", ".join(f"{t!r}{'*' if a else ''}" for t, a in zip(group.token, group.is_action))
        typer.echo(f"L{l:>3} N{n:>6}: {tokens}")
    if lens.has_action_tokens:
        share = lens.action_token_share()
        typer.echo("action-token share of top-k tokens per layer (* = action token above):")
        typer.echo(share[["layer", "share", "vectors_with_action"]].to_string(index=False))
        if share_out:
            typer.echo(f"wrote {lens.export(share_out, 'action_share')}")
        if plot:
            from ..reports.lens_plots import plot_action_share

            typer.echo(f"wrote {plot_action_share(lens, plot)}")
    else:
        typer.echo(lens.action_note)
    if out:
        typer.echo(f"wrote {lens.export(out, 'top_tokens')}")


@handled
def lens_diff(
    base: Annotated[str, typer.Option(help="the base checkpoint (e.g. the VLM before robot fine-tuning)")],
    tuned: Annotated[str, typer.Option(help="the fine-tuned checkpoint of the same architecture")],
    family: Family = "openvla",
    k: Annotated[int, typer.Option(min=1, help="top tokens kept per value vector")] = 10,
    out: Annotated[Optional[str], typer.Option(help="folder for the vectors/layers/tokens tables (Parquet)")] = None,
    plot: Annotated[Optional[str], typer.Option(help="write the per-layer diff figure (.png)")] = None,
    show: Annotated[int, typer.Option(min=1, help="how many of the most changed vectors to print")] = 10,
    device: Device = None,
    cache_dir: CacheDir = None,
    progress: Progress = True,
) -> None:
    """Checkpoint diff (base vs fine-tuned): top tokens gained and lost per layer, action vs language tokens."""
    from ..lens import ValueVectorLens, checkpoint_diff

    lenses = [ValueVectorLens(load_model(family, source, device=device)[0], k=k, device=device, cache_dir=cache_dir,
                              progress=progress_enabled(progress)) for source in (base, tuned)]
    diff = checkpoint_diff(*lenses)
    typer.echo(diff.layers.to_string(index=False))
    typer.echo(diff.top_vectors(show).to_string(index=False))
    if out:
        for path in diff.export(out).values():
            typer.echo(f"wrote {path}")
    if plot:
        from ..reports.lens_plots import plot_checkpoint_diff

        typer.echo(f"wrote {plot_checkpoint_diff(diff, plot)}")


@handled
def concepts(
    word: Annotated[str, typer.Argument(help="the concept, e.g. fast, slow, up, high")],
    out: Annotated[Path, typer.Option(help="where to write the NeuronSet (.json or .yaml); the opposite and the "
                                            "control go next to it as <stem>_<word><suffix>")],
    family: Family = "openvla",
    source: Source = None,
    method: Annotated[str, typer.Option(help="knn (the paper's clustering) or keyword")] = "knn",
    size: Annotated[int, typer.Option(min=1, help="neurons in the set (paper: 10 or 20)")] = 20,
    k_neighbors: Annotated[int, typer.Option(min=1, help="kNN neighbourhood (paper: 10, 20 or 40)")] = 20,
    layers: Annotated[str, typer.Option(help="all, early, late, first:K, last:K or comma-separated layers")] = "all",
    synonyms: Annotated[Optional[List[str]], typer.Option(help="the concept's lexicon beyond WORD (repeat); "
                                                                "default: the built-in one")] = None,
    anchor: Annotated[str, typer.Option(help="lexicon (word + synonyms) or word (the paper's single word)")] = (
        "lexicon"),
    opposite: Annotated[Optional[str], typer.Option(help="also find the opposite concept (disjoint sets; each "
                                                         "side drops vectors naming the other)")] = None,
    control: Annotated[bool, typer.Option(help="also write a random control matched per layer")] = False,
    seed: Seed = 0,
    k: Annotated[int, typer.Option(min=1, help="top tokens kept per value vector by the lens")] = 10,
    device: Device = None,
    cache_dir: CacheDir = None,
    progress: Progress = True,
) -> None:
    """Find the neurons of a concept (kNN or keyword over the lens) and write a NeuronSet file."""
    import warnings

    from ..concepts import find_concept, find_opposites, random_control
    from ..lens import ValueVectorLens

    layer_spec: object = layers
    if layers and all(part.strip().lstrip("-").isdigit() for part in layers.split(",")):
        layer_spec = [int(part) for part in layers.split(",")]
    if out.suffix not in (".json", ".yaml", ".yml"):
        raise InputError(f"--out must end in .json or .yaml, got {out}")
    vla, trained = load_model(family, source, seed, device)
    if not trained:
        warnings.warn("searching concepts in a RANDOM model: whatever is found carries no meaning", stacklevel=1)
    lens = ValueVectorLens(vla, k=k, device=device, cache_dir=cache_dir, progress=progress_enabled(progress))
    kwargs = dict(size=size, method=method, k_neighbors=k_neighbors, layers=layer_spec, anchor=anchor)
    if opposite:
        sets = list(find_opposites(lens, (word, opposite), synonyms=(synonyms or None, None), **kwargs))
    else:
        sets = [find_concept(lens, word, synonyms=synonyms or None, **kwargs)]
    if control:
        sets.append(random_control(sets[0], seed=seed, exclude=[p for s in sets[1:] for p in s.pairs]))
    names = [out] + [out.with_name(f"{out.stem}_{suffix}{out.suffix}")
                     for suffix in ([opposite] if opposite else []) + (["random"] if control else [])]
    for neuron_set, target in zip(sets, names):
        typer.echo(f"{neuron_set!r} -> {neuron_set.save(target)}")
        for score in neuron_set.meta.get("scores", [])[:10]:
            typer.echo(f"  L{score['layer']:>3} N{score['neuron']:>6}: {', '.join(map(repr, score['tokens'][:6]))}")


@handled
def scale(
    out: Annotated[Path, typer.Option(help="the ActivationScale JSON to write (use it as steer:FILE@ALPHA~OUT)")],
    family: Family = "openvla",
    source: Source = None,
    suite: Annotated[str, typer.Option(help="LIBERO suite whose task prompts and first frames are the inputs")]
    = "libero_10",
    tasks: Annotated[Optional[str], typer.Option(help="task ids: '0-9', '0,3,5' or all")] = None,
    trials: Annotated[int, typer.Option(min=1, help="initial states per task (frames after the settle steps)")] = 1,
    percentiles: Annotated[str, typer.Option(help="percentiles of |mlp.act| to report per layer")]
    = "50,90,99,99.9",
    percentile: Annotated[float, typer.Option(help="the percentile that becomes the unit of alpha in --out")] = 99.0,
    dtype: Annotated[Optional[str], typer.Option(help="weight dtype, e.g. bfloat16 for a 7B model on a GPU")] = None,
    device: Device = None,
    seed: Seed = 0,
) -> None:
    """Measure a model's activation scale: per-layer percentiles of |mlp.act| on LIBERO task prompts, so that
    alpha can be compared across models (a gated MLP's activations have no fixed unit)."""
    import json

    from ..activations import Query
    from ..envs.libero import LiberoConfig, first_frames, parse_task_range, suite_tasks
    from ..scale import ActivationScale, activation_percentiles

    wanted = sorted({float(p) for p in percentiles.split(",") if p.strip()} | {float(percentile)})
    if source:
        from .. import models

        vla = models.load(family, source, dtype=dtype, device=device, dispatch=True)
    else:
        vla, _ = load_model(family, None, seed, device)
    config = LiberoConfig(suite=suite, tasks=parse_task_range(tasks), trials=trials, camera_size=256)
    queries = []
    for task in suite_tasks(suite, config.tasks):
        for frame in first_frames(config, task.task_id, trials):
            queries.append(Query({name: frame for name in vla.camera_names}, task.instruction,
                                 None if vla.state_dim is None else [0.0] * vla.state_dim))
    table, samples = activation_percentiles(vla, queries, wanted)
    typer.echo("layer  " + "  ".join(f"p{p:g}".rjust(9) for p in wanted))
    for layer in range(vla.num_layers):
        typer.echo(f"{layer:>5}  " + "  ".join(f"{table[p][layer]:9.3f}" for p in wanted))
    unit = ActivationScale(tuple(table[float(percentile)]), percentile=float(percentile), samples=samples,
                           queries=len(queries), source=f"{suite} task prompts, first frames")
    path = unit.save(out)
    (path.with_suffix(".percentiles.json")).write_text(json.dumps(
        {"percentiles": {f"{p:g}": v for p, v in table.items()}, "samples_per_layer": samples,
         "queries": len(queries), "model": vla.describe()}, indent=1))
    typer.echo(f"wrote {path} (alpha unit: p{percentile:g}) and {path.with_suffix('.percentiles.json')}")
