"""The paper's LIBERO grid (Häon et al., CoRL 2025) as conditions: concept neuron sets (found by the lens, or
read from the authors' ``dictionaries.yaml``), cluster sizes x alphas x layer subsets, random-neuron controls
matched per layer, and the prompt baselines; plus the episode count and a time estimate for ``--dry-run``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ...errors import InputError
from ...rollout.conditions import Condition, baseline, check_unique, prompt_baseline, steered
from .config import SUITE_MAX_STEPS

#: the paper's sweep (Sec. 5 / PAPER.md)
PAPER_SIZES = (10, 20)
PAPER_ALPHAS = (2.0, 4.0, 6.0, 8.0, 10.0, 20.0)
PAPER_LAYERS = ("early", "late", "all")
PAPER_CONCEPTS = ("fast", "slow", "up")


@dataclass(frozen=True)
class PaperGrid:
    """What the grid contains (stored with the results): every concept x size x alpha on all layers (the paper's
    sweep, ~37 conditions x 100 episodes on LIBERO-Long); the other layer subsets and ``random_sets`` matched
    random controls of every (concept, size, subset) at ``layer_alpha``; the prompt baseline of each word."""

    concepts: tuple[str, ...] = PAPER_CONCEPTS
    sizes: tuple[int, ...] = PAPER_SIZES
    alphas: tuple[float, ...] = PAPER_ALPHAS
    layers: tuple[str, ...] = PAPER_LAYERS
    layer_alpha: float = 10.0
    random_sets: int = 1
    prompts: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _check(grid: PaperGrid) -> None:
    for name in ("concepts", "sizes", "alphas", "layers"):
        if not getattr(grid, name):
            raise InputError(f"the paper grid needs at least one of {name}")
    if any(not isinstance(s, int) or s < 1 for s in grid.sizes):
        raise InputError(f"cluster sizes must be positive ints, got {grid.sizes}")
    if grid.random_sets < 0:
        raise InputError(f"random_sets must be >= 0, got {grid.random_sets}")


def concept_sets_from_lens(lens, grid: PaperGrid) -> dict[tuple[str, int], Any]:
    """{(concept, size): NeuronSet} by lexicon-anchored kNN with the opposites filter; sizes share one ranking
    (the size-10 set is the first 10 of the size-20 set)."""
    from ...concepts import find_concept
    from ...neurons import NeuronSet

    out = {}
    for concept in grid.concepts:
        largest = find_concept(lens, concept, size=max(grid.sizes), k_neighbors=max(40, max(grid.sizes)))
        scores = largest.meta["scores"]
        for size in grid.sizes:
            pairs = tuple((s["layer"], s["neuron"]) for s in scores[:size])
            out[(concept, size)] = NeuronSet(pairs, stack=largest.stack, d_mlp=largest.d_mlp,
                                             num_layers=largest.num_layers, name=concept,
                                             meta={**largest.meta, "size": size})
    return out


def concept_sets_from_file(path: str, keys: Sequence[str], d_mlp: int,
                           num_layers: int) -> dict[tuple[str, int], Any]:
    """{(key, size): NeuronSet} from the authors' ``dictionaries.yaml`` (flat index = layer x d_mlp + neuron)."""
    from ...neurons import NeuronSet
    from ...neurons import load_neurons

    out = {}
    for key in keys:
        neurons = load_neurons(path, key=key, d_mlp=d_mlp)
        out[(key, len(neurons))] = NeuronSet(neurons.pairs, stack=neurons.stack, d_mlp=d_mlp, num_layers=num_layers,
                                             name=key, meta=dict(neurons.meta))
    return out


def paper_conditions(sets: dict[tuple[str, int], Any], grid: PaperGrid, seed: int = 0) -> list[Condition]:
    """Baseline; every (concept set, alpha) on all layers; the other subsets at ``layer_alpha``; random controls
    (same neurons per layer, same alpha) at ``layer_alpha``; the prompt baseline of each concept word."""
    from ...steering import Steering

    _check(grid)
    out, controls = [baseline()], []
    for (concept, size), neurons in sorted(sets.items()):
        plan = [(float(a), "all") for a in grid.alphas if "all" in grid.layers]
        plan += [(float(grid.layer_alpha), layers) for layers in grid.layers
                 if layers != "all" or float(grid.layer_alpha) not in {float(a) for a in grid.alphas}]
        for alpha, layers in plan:
            try:
                steering = Steering(neurons, alpha, layers=layers, name=f"{concept}{size}")
                steering.resolve()
            except InputError:  # no neuron of this set in these layers: nothing to steer
                continue
            out.append(steered(concept, steering, alpha=alpha, layers=layers,
                               name=f"{concept}{size}@a{alpha:g}/{layers}"))
            if alpha != float(grid.layer_alpha):
                continue
            for r in range(grid.random_sets):
                control = steering.random_control(seed + 997 * r + size)
                controls.append(steered(concept, control, alpha=alpha, layers=layers, kind="control",
                                        name=f"random[{concept}{size}]#{r}@a{alpha:g}/{layers}"))
    prompts = [prompt_baseline(c) for c in dict.fromkeys(c for c, _ in sets)] if grid.prompts else []
    out = out + controls + prompts
    check_unique(out)
    return out


def estimate(n_episodes: int, suite: str, max_steps: int | None = None, *, sim_step_s: float = 0.2,
             policy_call_s: float = 0.15, workers: int = 1, batch: int = 1, settle_steps: int = 15,
             reset_s: float = 3.0) -> dict:
    """Upper bound of the sweep's wall time (every episode runs to max steps): simulator steps spread over
    ``workers``, policy calls batched ``batch`` at a time on one device. The defaults are assumptions (256 px
    LIBERO rendering ~0.2 s/step on one CPU core; OpenVLA-7B bf16 ~0.15 s per action on one GPU): pass
    measured values."""
    steps = max_steps or SUITE_MAX_STEPS.get(suite)
    if steps is None:
        raise InputError(f"suite {suite!r} has no standard max steps; pass max_steps")
    sim = n_episodes * ((steps + settle_steps) * sim_step_s + reset_s) / max(1, workers)
    policy = n_episodes * steps * policy_call_s / max(1, batch)
    hours = max(sim, policy) / 3600
    return {"episodes": n_episodes, "max_steps": steps, "simulator_hours": sim / 3600,
            "policy_hours": policy / 3600, "hours_upper_bound": hours,
            "assumptions": {"sim_step_s": sim_step_s, "policy_call_s": policy_call_s, "workers": workers,
                            "batch": batch, "reset_s": reset_s}}
