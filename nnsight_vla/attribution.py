"""Gradients on the action path: one teacher-forced, grad-enabled forward per action, and attribution patching.

``predict_action`` decodes under ``no_grad``, one forward per token. :func:`teacher_forced` replays a decoded action
as ONE forward of the root module (OpenVLA / pi0-FAST: the prompt plus the generated tokens but the last, so the last
``n`` positions predict the ``n`` tokens; pi0: one flow step from fixed noise and time), and
:meth:`TeacherForced.trace` runs it as an nnsight trace in which ``.output`` and ``.grad`` work. :func:`attribute`
scores every ``mlp.act`` neuron by activation x gradient of one objective (attribution patching: the first-order
estimate of patching the neuron at every position); :func:`patching_effect` measures the real change.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .errors import IndexOutOfRangeError, InputError
from .neurons import NeuronSet

#: objectives per family; the first is the default
KINDS = {
    "openvla": ("value", "action", "logit", "logprob"),
    "pi0-fast": ("logprob", "logit"),
    "pi0": ("action", "velocity"),
}
_OPTIONS = {
    "openvla": {"unnorm_key": None, "restrict_to_action_tokens": False},
    "pi0-fast": {"max_new_tokens": None, "stop_at_eos": True},
    "pi0": {"seed": 0, "noise": None, "time": 1.0},
}


@contextlib.contextmanager
def frozen_parameters(module: torch.nn.Module):
    """Parameters stop requiring grad inside the block (restored after): gradients reach activations only."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass(frozen=True, eq=False)
class TeacherForced:
    """One forward that makes an action, as the root module's keyword ``inputs`` (batch of one).

    OpenVLA / pi0-FAST: ``tokens`` are the generated ids and ``positions`` (counted from the end) the positions
    whose logits predict them; pi0: ``noise`` (x at ``time``) enters the expert, and there are no tokens.
    """

    vla: Any
    inputs: Mapping[str, torch.Tensor]
    tokens: np.ndarray | None = None
    unnorm_key: Any = None
    noise: torch.Tensor | None = None
    time: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.vla.family

    @property
    def positions(self) -> np.ndarray | None:
        """Sequence positions (negative: from the end) whose logits predict ``tokens[k]``; None for pi0."""
        return None if self.tokens is None else np.arange(-len(self.tokens), 0)

    @property
    def action_tokens(self) -> np.ndarray:
        """Indices k of ``tokens`` that are action tokens (OpenVLA bins, pi0-FAST's FAST ids)."""
        if self.tokens is None:
            raise InputError("pi0 has no action tokens: attribute its flow output (kind='action' or 'velocity')")
        return np.flatnonzero(np.isin(self.tokens, self.vla.action_token_ids))

    def trace(self, grad: bool = True):
        """An nnsight trace of the forward. ``grad``: built with gradients w.r.t. activations (parameters are
        frozen while it runs, so no ``.grad`` accumulates on the weights); False runs it under ``no_grad``.

        ``with forced.trace(): a = vla.layers[l].mlp.act.output; y = forced.objective(vla.output)`` then
        ``with y.backward(): g = a.grad.save()`` (reverse layer order), or ``torch.autograd.grad(y, [a])``."""
        module = self.vla._module

        def forward(**inputs: Any) -> Any:
            if not grad:
                with torch.no_grad():
                    return module(**inputs)
            # a fresh leaf that requires grad: every activation downstream is in the graph, weights frozen or not
            inputs["pixel_values"] = inputs["pixel_values"].detach().clone().requires_grad_(True)
            with torch.enable_grad(), frozen_parameters(module):
                return module(**inputs)

        return self.vla.trace(fn=forward, **self.inputs)

    def kind(self, kind: str | None = None) -> str:
        """``kind`` checked for this family (None: the family's default)."""
        kinds = KINDS[self.family]
        if kind is None:
            return kinds[0]
        if kind not in kinds:
            raise InputError(f"objective {kind!r} is not defined for {self.family}; use one of {', '.join(kinds)}")
        return kind

    def objective(self, output: Any, kind: str | None = None, dim: Any = None, token: Any = None,
                  horizon: int | None = None) -> torch.Tensor:
        """The scalar to attribute, from the forward's output (or its ``.logits``); sums over the chosen indices.

        OpenVLA (token k = action dim k): ``"value"`` the expected normalised action over the 256 bins (softmax over
        action tokens), ``"action"`` the same un-normalised, ``"logit"`` / ``"logprob"`` of the generated token.
        pi0-FAST: ``"logprob"`` / ``"logit"`` of generated ``token`` (int, list; None: all). pi0: ``"action"``
        the one-step estimate ``x - t * v`` (un-normalised), ``"velocity"`` v, of ``dim`` (None: all), averaged
        over the chunk or at ``horizon``."""
        logits = getattr(output, "logits", output)
        kind = self.kind(kind)
        if self.family == "pi0":
            if token is not None:
                raise InputError("pi0 has no tokens: choose an action dimension with dim= (and horizon=)")
            return self._flow_objective(logits, kind, dim, horizon)
        if horizon is not None:
            raise InputError(f"horizon= is for pi0's chunk; {self.family} attributes generated tokens (token=)")
        index = self._token_index(dim, token)
        rows = logits[0, torch.as_tensor(self.positions[index], device=logits.device)]
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        tokens = torch.as_tensor(self.tokens[index], device=logits.device)
        arange = torch.arange(len(index), device=logits.device)
        if kind == "logit":
            return rows[arange, tokens].sum()
        if kind == "logprob":
            return torch.log_softmax(rows, dim=-1)[arange, tokens].sum()
        ids = self.vla.action_token_ids
        centers = torch.as_tensor(self.vla.bins.normalized(ids), dtype=rows.dtype, device=rows.device)
        value = torch.softmax(rows[:, torch.as_tensor(ids, device=rows.device)], dim=-1) @ centers
        if kind == "action" and self.unnorm_key is not False:
            stats = self.vla.bins.norm_stats[self.vla.bins.unnorm_key(self.unnorm_key)]["action"]
            if index.max() >= len(stats["q01"]):
                raise IndexOutOfRangeError(f"the statistics un-normalise {len(stats['q01'])} action dims; "
                                           f"token {int(index.max())} has none (use kind='value')")
            low, high = (torch.as_tensor(np.asarray(stats[k])[index], dtype=rows.dtype) for k in ("q01", "q99"))
            mask = torch.as_tensor(np.asarray(stats.get("mask", np.ones(len(stats["q01"]), bool)))[index])
            value = torch.where(mask.to(rows.device), 0.5 * (value + 1) * (high - low).to(rows.device)
                                + low.to(rows.device), value)
        return value.sum()

    def _token_index(self, dim: Any, token: Any) -> np.ndarray:
        if dim is not None and self.family != "openvla":
            raise InputError("pi0-FAST's actions are FAST tokens, not one token per dimension: choose token=")
        if dim is not None and token is not None:
            raise InputError("give dim= or token= (for OpenVLA, token k is action dim k), not both")
        chosen = token if token is not None else dim
        n = len(self.tokens)
        if chosen is None:
            return np.arange(n)
        index = np.atleast_1d(np.asarray(chosen))
        if index.dtype.kind not in "iu" or index.size == 0 or index.ndim != 1:
            raise InputError(f"dim/token must be an int or a list of ints, got {chosen!r}")
        if ((index < -n) | (index >= n)).any():
            raise IndexOutOfRangeError(f"token index {chosen!r} is out of range for {n} teacher-forced tokens")
        return index % n

    def _flow_objective(self, velocity: torch.Tensor, kind: str, dim: Any, horizon: int | None) -> torch.Tensor:
        n_dims, chunk = self.vla.action_dim, velocity.shape[1]
        dims = np.arange(n_dims) if dim is None else np.atleast_1d(np.asarray(dim))
        if dims.dtype.kind not in "iu" or dims.size == 0 or ((dims < -n_dims) | (dims >= n_dims)).any():
            raise IndexOutOfRangeError(f"dim must be in 0..{n_dims - 1} (pi0's action dims), got {dim!r}")
        if horizon is not None and not -chunk <= int(horizon) < chunk:
            raise IndexOutOfRangeError(f"horizon must be in 0..{chunk - 1} (the chunk), got {horizon!r}")
        dims = torch.as_tensor(dims % n_dims, device=velocity.device)
        v = velocity[0].to(torch.promote_types(velocity.dtype, torch.float32))
        out = v
        if kind == "action":
            out = self.noise[0].to(v.device, v.dtype) - self.time * v
            stats = self.vla.stats
            if stats:
                mean, std = (torch.as_tensor(stats[k], dtype=v.dtype, device=v.device)
                             for k in ("actions_mean", "actions_std"))
                out = out[:, : len(mean)] * (std + 1e-8) + mean
        out = out[:, dims]
        out = out.mean(0) if horizon is None else out[int(horizon)]
        return out.sum()


def teacher_forced(vla, images: Any, instruction: str, state: Any = None, *, tokens: Any = None,
                   **options: Any) -> TeacherForced:
    """The forward that makes ``predict_action``'s action, as one teacher-forced, traceable forward.

    Built on ``vla.forward_inputs`` (the first forward) plus ``tokens`` (default: what ``predict_action`` generates
    greedily). Options: OpenVLA ``unnorm_key``, ``restrict_to_action_tokens``; pi0-FAST ``max_new_tokens``,
    ``stop_at_eos``; pi0 ``seed`` / ``noise`` (x at ``time``; default the seed's initial noise) and ``time``
    (default 1.0, the first Euler step).
    """
    family = vla.family
    if family not in _OPTIONS:
        raise InputError(f"no teacher-forced forward for family {family!r}")
    if not isinstance(instruction, str):
        raise InputError("teacher_forced takes one observation (an instruction string), not a batch")
    unknown = sorted(set(options) - set(_OPTIONS[family]))
    if unknown:
        raise InputError(f"{family} takes the options {', '.join(_OPTIONS[family])}; got {', '.join(unknown)}")
    options = {**_OPTIONS[family], **options}
    vla.dispatch()
    param = next(vla._module.parameters())
    if family == "pi0":
        if tokens is not None:
            raise InputError("pi0 generates no tokens; its forward is one flow step (noise=, time=)")
        time = options["time"]
        if isinstance(time, bool) or not isinstance(time, (int, float)) or not 0.0 < float(time) <= 1.0:
            raise InputError(f"time must be a number in (0, 1] (1 = pure noise, the first step), got {time!r}")
        inputs = vla.forward_inputs(images, instruction, state, seed=options["seed"], noise=options["noise"])
        inputs["timestep"] = torch.full_like(inputs["timestep"], float(time))
        inputs = {key: value.to(param.device) for key, value in inputs.items()}
        return TeacherForced(vla, inputs, noise=inputs["noise"], time=float(time), meta={"options": options})
    if family == "openvla":
        if state is not None:
            raise InputError("OpenVLA takes no robot state; pass state=None")
        if tokens is None:
            (image,) = vla.images_by_camera(images)
            n = vla.forward_count(unnorm_key=options["unnorm_key"])
            tokens = vla.generate_action_tokens(image, instruction, n, options["restrict_to_action_tokens"])
    elif tokens is None:
        tokens = vla.generate_tokens(images, instruction, state, options["max_new_tokens"], options["stop_at_eos"])
    tokens = _check_tokens(tokens, vla.vocab_size)
    inputs = vla.forward_inputs(images, instruction, state)
    forced = torch.as_tensor(tokens[:-1], dtype=inputs["input_ids"].dtype)[None]
    if "token_type_ids" in inputs:  # pi0-FAST: the prefix attends bidirectionally, the generated tokens causally
        inputs["token_type_ids"] = torch.cat([inputs["token_type_ids"], torch.ones_like(forced)], dim=1)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], forced], dim=1)
    if "attention_mask" in inputs:  # (one observation is not padded; kept general)
        inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(forced)], dim=1)
    if "position_ids" in inputs:
        steps = torch.arange(1, forced.shape[1] + 1, dtype=inputs["position_ids"].dtype)[None]
        inputs["position_ids"] = torch.cat([inputs["position_ids"], inputs["position_ids"][:, -1:] + steps], dim=1)
    inputs = {key: value.to(param.device) for key, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
    return TeacherForced(vla, inputs, tokens, unnorm_key=options.get("unnorm_key"), meta={"options": options})


def _check_tokens(tokens: Any, vocab: int) -> np.ndarray:
    array = np.asarray(tokens).reshape(-1)
    if array.size == 0 or array.dtype.kind not in "iu":
        raise InputError(f"tokens must be a non-empty sequence of vocabulary ids, got {tokens!r}")
    if ((array < 0) | (array >= vocab)).any():
        raise IndexOutOfRangeError(f"token ids must be in 0..{vocab - 1}, got {array.tolist()}")
    return array.astype(np.int64)


@dataclass(frozen=True)
class Attribution:
    """Attribution-patching scores: ``scores[i, n]`` = sum over positions of (a - reference) * dObjective/da
    for neuron n of ``layers[i]``, the first-order estimate of objective(clean) - objective(patched)."""

    scores: np.ndarray
    layers: tuple[int, ...]
    stack: str
    num_layers: int
    d_mlp: int
    value: float
    target: dict

    def score(self, layer: int, neuron: int) -> float:
        return float(self.scores[self.layers.index(layer), neuron])

    def _order(self, sign: str) -> tuple[np.ndarray, np.ndarray]:
        keys = {"abs": -np.abs(self.scores), "positive": -self.scores, "negative": self.scores}
        if sign not in keys:
            raise InputError(f"sign must be 'abs', 'positive' or 'negative', got {sign!r}")
        return np.unravel_index(np.argsort(keys[sign], axis=None, kind="stable"), self.scores.shape)

    def ranking(self, sign: str = "abs") -> list[tuple[int, int]]:
        """(layer, neuron) pairs, best first: by |score| (``"abs"``), by score (``"positive"``: neurons that raise
        the objective), or by -score (``"negative"``)."""
        rows, cols = self._order(sign)
        return [(self.layers[r], int(c)) for r, c in zip(rows, cols)]

    def table(self, sign: str = "abs") -> pd.DataFrame:
        """One row per neuron (layer, neuron, score, rank), in ranking order."""
        rows, cols = self._order(sign)
        return pd.DataFrame({"layer": np.asarray(self.layers)[rows], "neuron": cols, "score": self.scores[rows, cols],
                             "rank": np.arange(1, rows.size + 1)})

    def top(self, k: int = 20, sign: str = "abs", name: str = "attribution") -> NeuronSet:
        """The ``k`` best-ranked neurons as a NeuronSet (the ranking and scores in its meta)."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InputError(f"k must be a positive integer, got {k!r}")
        pairs = self.ranking(sign)[: int(k)]
        meta = {"method": "attribution patching", "target": self.target, "sign": sign, "objective": self.value,
                "ranking": [list(p) for p in pairs], "scores": [self.score(*p) for p in pairs]}
        return NeuronSet(tuple(pairs), stack=self.stack, d_mlp=self.d_mlp, num_layers=self.num_layers, name=name,
                         meta=meta)


def _chosen_layers(vla, stack: str, layers: Any) -> list[int]:
    num_layers = vla.stack_dims(stack)[0]
    if layers is None:
        return list(range(num_layers))
    return sorted({vla.check_layer(layer, stack) for layer in layers})


def _reference(reference: Any, layer: int, act: torch.Tensor) -> torch.Tensor | None:
    """The patch value of one layer, broadcastable to its (1, T, d_mlp) activation (None: zero)."""
    if reference is None:
        return None
    if layer not in reference:
        raise InputError(f"reference has no entry for layer {layer} (give one per attributed layer)")
    ref = torch.as_tensor(np.asarray(reference[layer]), dtype=act.dtype, device=act.device)
    if ref.shape not in (act.shape[-1:], act.shape[-2:]):
        raise InputError(f"reference for layer {layer} has shape {tuple(ref.shape)}; expected "
                         f"({act.shape[-1]},) or {tuple(act.shape[-2:])}")
    return ref


def _positions(positions: Any, length: int) -> Any:
    if positions is None:
        return slice(None)
    index = np.atleast_1d(np.asarray(positions))
    if index.dtype.kind not in "iu" or index.size == 0 or ((index < -length) | (index >= length)).any():
        raise IndexOutOfRangeError(f"positions must be ints in -{length}..{length - 1}, got {positions!r}")
    return torch.as_tensor(index % length)


def attribute(forced: TeacherForced, kind: str | None = None, *, dim: Any = None, token: Any = None,
              horizon: int | None = None, stack: str = "backbone", layers: Any = None, positions: Any = None,
              reference: Mapping[int, Any] | None = None) -> Attribution:
    """Activation x gradient for every ``mlp.act`` neuron of ``layers`` of ``stack``, one backward pass.

    The objective is ``forced.objective(kind, dim, token, horizon)``. The score of neuron n is
    sum over ``positions`` (default all) of (a - r) * dy/da, r = ``reference[layer]`` ((d_mlp,) or (T, d_mlp);
    default 0: zero-ablation), which estimates y(clean) - y(patched at those positions) to first order."""
    vla = forced.vla
    stack = vla.stack(stack).name
    num_layers, _, d_mlp = vla.stack_dims(stack)
    chosen = _chosen_layers(vla, stack, layers)
    kind = forced.kind(kind)
    target = {"kind": kind, "dim": dim, "token": token, "horizon": horizon, "stack": stack}
    modules = getattr(vla, vla.stack(stack).attr)
    with forced.trace():
        acts = [modules[layer].mlp.act.output for layer in chosen]
        value = forced.objective(vla.output, kind, dim=dim, token=token, horizon=horizon)
        # autograd.grad, not .backward(): no .grad accumulates, and a layer off the objective's path gets zeros
        grads = torch.autograd.grad(value, acts, allow_unused=True)
        rows = []
        for layer, act, grad in zip(chosen, acts, grads):
            where = _positions(positions, act.shape[1])
            if grad is None:
                rows.append(torch.zeros(d_mlp, dtype=torch.float64))
                continue
            ref = _reference(reference, layer, act)
            delta = act.detach()[0] - (0 if ref is None else ref)
            rows.append((delta.double() * grad[0].double())[where].sum(0).cpu())
        result = (torch.stack(rows).numpy(), float(value.detach())).save()
    scores, value = result
    return Attribution(scores, tuple(chosen), stack, num_layers, d_mlp, value, target)


def patching_effect(forced: TeacherForced, neurons: Iterable[Sequence[int]] | NeuronSet, kind: str | None = None, *,
                    dim: Any = None, token: Any = None, horizon: int | None = None, stack: str | None = None,
                    positions: Any = None, reference: Mapping[int, Any] | None = None) -> np.ndarray:
    """The real effect y(clean) - y(patched) of patching each neuron alone (to 0 or ``reference``) at
    ``positions``, one traced forward per neuron: what :func:`attribute`'s scores estimate."""
    vla = forced.vla
    stack = (neurons.stack if isinstance(neurons, NeuronSet) else "backbone") if stack is None else stack
    modules = getattr(vla, vla.stack(stack).attr)
    pairs = [(vla.check_layer(int(layer), stack), int(neuron)) for layer, neuron in neurons]
    d_mlp = vla.stack_dims(stack)[2]
    bad = [pair for pair in pairs if not 0 <= pair[1] < d_mlp]
    if bad:
        raise IndexOutOfRangeError(f"neurons {bad} are out of range for d_mlp={d_mlp}")
    target = {"kind": forced.kind(kind), "dim": dim, "token": token, "horizon": horizon}

    def run(pair: tuple[int, int] | None) -> float:
        with forced.trace(grad=False):
            if pair is not None:
                layer, neuron = pair
                act = modules[layer].mlp.act.output
                ref = _reference(reference, layer, act)
                where = _positions(positions, act.shape[1])
                patch = 0.0 if ref is None else (ref[..., neuron] if ref.dim() == 1 else ref[where, neuron])
                act[0, where, neuron] = patch
            value = float(forced.objective(vla.output, **target)).save()
        return value

    clean = run(None)
    return np.asarray([clean - run(pair) for pair in pairs])
