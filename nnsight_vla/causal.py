"""Causal checks before rollouts: what a neuron set does to one decoded action, and where a concept is computed.

One decoding step already tells whether an edit reaches the action: :func:`action_effect` (the action's shift
under a steering, beside random sets of the same shape), :func:`neuron_response` (activations on concept vs
opposite inputs) and :func:`ablation_effect` (how much of a prompt-driven action gap survives mean-ablating some
MLP layers). Actions are decoded through ``vla.predict_action``, so what is measured is what a rollout executes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .activations import Query, as_queries, read_activations
from .errors import InputError
from .neurons import NeuronSet

Summary = Callable[[np.ndarray], np.ndarray]


def _rows(actions: np.ndarray) -> np.ndarray:
    """(N, D) or (N, H, D) actions -> (N, H, D)."""
    return actions[:, None, :] if actions.ndim == 2 else actions


#: summaries of an (N, D) or (N, H, D) batch of end-effector delta actions, one value per query
DEFAULT_SUMMARIES: dict[str, Summary] = {
    "speed": lambda a: np.linalg.norm(_rows(a)[..., :3], axis=-1).mean(-1),
    "dz": lambda a: _rows(a)[..., 2].mean(-1),
}


def decode(vla, queries: Iterable[Any], steering: Any = None, batch_size: int = 32, **predict_kwargs: Any
           ) -> np.ndarray:
    """The actions ``vla.predict_action`` returns for ``queries`` (stacked), under ``steering`` (anything with
    ``apply(vla)``: a Steering, a SteeringGroup) or unsteered. Queries go in batches of ``batch_size`` (each
    element equal to its single call); ``batch_size=1`` calls one by one."""
    queries = as_queries(queries)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    context = steering.apply(vla) if steering is not None else contextlib.nullcontext()
    out = []
    with context:
        for start in range(0, len(queries), batch_size):
            chunk = queries[start:start + batch_size]
            if batch_size == 1:
                out += [np.asarray(vla.predict_action(q.images, q.instruction, q.state, **predict_kwargs))
                        for q in chunk]
                continue
            states = None if all(q.state is None for q in chunk) else [q.state for q in chunk]
            actions = vla.predict_action([q.images for q in chunk], [q.instruction for q in chunk], states,
                                         **predict_kwargs)
            out += list(np.asarray(actions))
    return np.stack(out)


@dataclass
class Effect:
    """What one steering does to the decoded actions of a query set, beside random sets of the same shape.

    ``delta[s]``: mean over queries of summary ``s`` (steered minus unsteered); ``relative[s]``: that over the
    unsteered mean's magnitude; ``per_dim``: mean shift of each action dimension; ``random[s]``: the same delta
    for each random set; ``beyond_random(s)``: the steering's |delta| exceeds every random set's."""

    name: str
    queries: int
    baseline: dict[str, float]
    delta: dict[str, float]
    relative: dict[str, float]
    per_dim: list[float]
    random: dict[str, list[float]] = field(default_factory=dict)

    def beyond_random(self, summary: str) -> bool:
        others = self.random.get(summary, [])
        return bool(others) and abs(self.delta[summary]) > max(abs(v) for v in others)

    def random_median_relative(self, summary: str) -> float:
        """Median over the random sets of |delta| / |baseline| (the control's typical size)."""
        others = self.random.get(summary, [])
        base = abs(self.baseline[summary]) or float("nan")
        return float(np.median([abs(v) / base for v in others])) if others else float("nan")

    def to_dict(self) -> dict:
        return {"name": self.name, "queries": self.queries, "baseline": self.baseline, "delta": self.delta,
                "relative": self.relative, "per_dim": self.per_dim, "random": self.random,
                "beyond_random": {s: self.beyond_random(s) for s in self.delta},
                "random_median_relative": {s: self.random_median_relative(s) for s in self.delta}}


def _summarize(actions: np.ndarray, summaries: Mapping[str, Summary]) -> dict[str, np.ndarray]:
    return {name: np.asarray(fn(actions), dtype=np.float64) for name, fn in summaries.items()}


def action_effect(vla, steering, queries: Iterable[Any], summaries: Mapping[str, Summary] | None = None,
                  n_random: int = 10, seed: int = 0, baseline: np.ndarray | None = None,
                  **predict_kwargs: Any) -> Effect:
    """The single-step effect of ``steering`` on the actions decoded for ``queries``, with ``n_random``
    random-neuron controls (``steering.random_control(seed + i, vla)``: same size, layers, alpha and unit).

    ``baseline``: the unsteered actions of these queries, when already decoded (saves a pass)."""
    if not isinstance(n_random, int) or isinstance(n_random, bool) or n_random < 0:
        raise InputError(f"n_random must be an int >= 0, got {n_random!r}")
    queries = as_queries(queries)
    summaries = dict(DEFAULT_SUMMARIES if summaries is None else summaries)
    base = decode(vla, queries, **predict_kwargs) if baseline is None else np.asarray(baseline)
    if len(base) != len(queries):
        raise InputError(f"baseline has {len(base)} actions for {len(queries)} queries")
    base_s = _summarize(base, summaries)

    def shift(steer) -> tuple[dict[str, float], np.ndarray]:
        actions = decode(vla, queries, steer, **predict_kwargs)
        s = _summarize(actions, summaries)
        return {k: float(np.mean(s[k] - base_s[k])) for k in summaries}, actions

    delta, steered = shift(steering)
    per_dim = (_rows(steered) - _rows(base)).mean(axis=(0, 1)).tolist()
    random = {k: [] for k in summaries}
    for i in range(n_random):
        control, _ = shift(steering.random_control(seed + i, vla))
        for k, v in control.items():
            random[k].append(v)
    baseline_means = {k: float(np.mean(v)) for k, v in base_s.items()}
    relative = {k: delta[k] / abs(baseline_means[k]) if baseline_means[k] else float("nan") for k in summaries}
    return Effect(getattr(steering, "name", "steering"), len(queries), baseline_means, delta, relative, per_dim, random)


@dataclass
class Response:
    """Per-neuron activations (last position of the first forward) on concept vs opposite queries."""

    neurons: list[tuple[int, int]]
    positive: np.ndarray  # (n_neurons,) mean activation on concept queries
    negative: np.ndarray  # mean on opposite queries
    t: np.ndarray  # Welch t statistic of the difference
    p: np.ndarray  # two-sided p value

    def responding(self, alpha: float = 0.05) -> np.ndarray:
        """Neurons more active on the concept than on its opposite (p < alpha), i.e. that respond in the direction
        in which steering writes them (overwrite with a large positive value = "the concept is present")."""
        return (self.t > 0) & (self.p < alpha)

    def fraction_responding(self, alpha: float = 0.05) -> float:
        return float(self.responding(alpha).mean()) if len(self.neurons) else float("nan")

    def to_dict(self, alpha: float = 0.05) -> dict:
        return {"neurons": [list(p) for p in self.neurons], "positive": self.positive.tolist(),
                "negative": self.negative.tolist(), "t": self.t.tolist(), "p": self.p.tolist(),
                "responding": self.responding(alpha).tolist(), "fraction_responding": self.fraction_responding(alpha)}


def _last_position(vla, queries: Sequence[Query], layers: Sequence[int], stack: str,
                   **predict_kwargs: Any) -> dict[int, np.ndarray]:
    """{layer: (n_queries, d_mlp)} activations at the last position of the first forward."""
    rows: dict[int, list] = {layer: [] for layer in layers}
    for query in queries:
        acts = read_activations(vla, query, layers, stack, forwards="first", **predict_kwargs)
        for layer in layers:
            rows[layer].append(acts[layer][0][-1].numpy())
    return {layer: np.stack(v) for layer, v in rows.items()}


def neuron_response(vla, neurons: NeuronSet, positive: Iterable[Any], negative: Iterable[Any],
                    **predict_kwargs: Any) -> Response:
    """Each neuron's activation at the last position of the first forward (where OpenVLA predicts the first
    action token) on ``positive`` (concept) vs ``negative`` (opposite) queries, with a Welch t-test."""
    from scipy import stats

    pos_q, neg_q = as_queries(positive), as_queries(negative)
    if len(pos_q) < 2 or len(neg_q) < 2:
        raise InputError("neuron_response needs at least two queries on each side")
    layers = neurons.layers
    pos = _last_position(vla, pos_q, layers, neurons.stack, **predict_kwargs)
    neg = _last_position(vla, neg_q, layers, neurons.stack, **predict_kwargs)
    a = np.stack([pos[l][:, n] for l, n in neurons.pairs], axis=1)
    b = np.stack([neg[l][:, n] for l, n in neurons.pairs], axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        test = stats.ttest_ind(a, b, axis=0, equal_var=False)
    t = np.nan_to_num(np.asarray(test.statistic, dtype=np.float64))
    p = np.nan_to_num(np.asarray(test.pvalue, dtype=np.float64), nan=1.0)
    return Response(list(neurons.pairs), a.mean(0), b.mean(0), t, p)


def mean_activations(vla, queries: Iterable[Any], layers: Sequence[int], stack: str = "backbone",
                     positions: str = "all", **predict_kwargs: Any) -> dict[int, Any]:
    """Mean activations on ``queries``: ``positions="all"``: ``{layer: (d_mlp,)}`` over every position of every
    forward; ``"last"``: ``{layer: (first, rest)}``, the mean at the last position of the first forward and the
    mean over the later (decode) forwards (see :func:`~nnsight_vla.steering.pinned_activations`)."""
    if positions not in ("all", "last"):
        raise InputError(f"positions must be 'all' or 'last', got {positions!r}")
    sums: dict = {}
    for query in as_queries(queries):
        acts = read_activations(vla, query, layers, stack, **predict_kwargs)
        for layer, steps in acts.items():
            if positions == "all":
                parts = [torch.cat(steps)]
            else:
                parts = [steps[0][-1:], torch.cat([s[-1:] for s in steps[1:]]) if len(steps) > 1 else steps[0][-1:]]
            acc = sums.setdefault(layer, [[0, 0] for _ in parts])
            for slot, part in zip(acc, parts):
                slot[0] = slot[0] + part.sum(0)
                slot[1] += part.shape[0]
    out: dict = {}
    for layer, acc in sums.items():
        means = [total / count for total, count in acc]
        out[layer] = means[0] if positions == "all" else tuple(means)
    return out


@dataclass
class Ablation:
    """A prompt-driven gap in an action summary, with and without ablating some MLP layers."""

    layers: list[int]
    summary: str
    gap: float  # mean summary on queries_a minus on queries_b, intact model
    gap_ablated: float  # the same with the layers mean-ablated
    removed: float  # 1 - gap_ablated / gap

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def ablation_effect(vla, layers: Sequence[int], queries_a: Iterable[Any], queries_b: Iterable[Any],
                    reference: Iterable[Any], summary: str = "speed", summaries: Mapping[str, Summary] | None = None,
                    stack: str = "backbone", positions: str = "last", **predict_kwargs: Any) -> Ablation:
    """How much of the gap ``summary(a) - summary(b)`` disappears when the MLPs of ``layers`` are mean-ablated:
    their activations pinned to their mean on ``reference`` queries (neutral inputs), at the positions where the
    action is read (``positions="last"``: the last prompt position and each decode step, position-aligned across
    prompts of different lengths) or at every position (``"all"``: a much harsher knock-out). A concept
    computed in those layers loses its gap (``removed`` near 1); one computed elsewhere keeps it (near 0)."""
    from .edits import pinned_activations

    summaries = dict(DEFAULT_SUMMARIES if summaries is None else summaries)
    if summary not in summaries:
        raise InputError(f"unknown summary {summary!r}; have {sorted(summaries)}")
    fn = summaries[summary]
    a, b = as_queries(queries_a), as_queries(queries_b)
    layers = sorted({vla.check_layer(l, stack) for l in layers})
    gap = float(fn(decode(vla, a, **predict_kwargs)).mean() - fn(decode(vla, b, **predict_kwargs)).mean())
    means = mean_activations(vla, reference, layers, stack, positions=positions, **predict_kwargs)
    with pinned_activations(vla, means, stack, positions=positions):
        ablated = float(fn(decode(vla, a, **predict_kwargs)).mean() - fn(decode(vla, b, **predict_kwargs)).mean())
    removed = 1.0 - ablated / gap if gap else float("nan")
    return Ablation(layers, summary, gap, ablated, removed)
