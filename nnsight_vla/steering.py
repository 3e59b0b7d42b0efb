"""Steering (step 3 of the method): set chosen MLP activations to alpha, as nnsight edits.

A neuron is a pair (layer, i) of one stack ("backbone", or pi0's action "expert"); its activation is
``f(x)_i = mlp.act.output[..., i]``, the input of ``down_proj`` (TransformerLens ``hook_post``). The paper's rule
(``mode="overwrite"``) is ``f(x)_i <- alpha`` at every position; ``mode="add"`` is the common alternative of
steering libraries, ``f(x)_i <- f(x)_i + alpha * scale``.

Three ways to use a :class:`Steering`::

    steer = Steering(fast_neurons, alpha=10.0, layers="late")

    with steer.apply(vla):                          # (a) plain inference (and traces opened inside)
        action = vla.predict_action(image, instruction)

    with vla.predict_action(image, instruction) as tracer:
        steer.edit(vla, tracer)                     # (b) inside your own trace, every forward...
        action = tracer.result.save()               #     (edit() must come last; tracer.result still works)

    with vla.predict_action(image, instruction) as tracer:
        for step in tracer.iter[:7]:                # ...or per step, in your own loop
            steer.edit_step(vla, step)
            logits.append(vla.lm_head.output.save())

    bridge.run_with_hooks(ids, fwd_hooks=steer.transformer_lens_hooks(vla))   # (c) TransformerLens

Scope: ``"every"`` steers every forward pass that produces the action (OpenVLA: the prefill and each of the 6
cached decode steps; pi0: the backbone's prefix pass and, for the expert stack, every denoising step; pi0-FAST:
prefill and every decode step); ``"prefill"`` only the first forward pass that reaches the stack (what the
authors did for pi0-FAST; for pi0's expert stack it is the first denoising step).

How :meth:`Steering.apply` works (one stored nnsight edit, removed on exit): see :mod:`nnsight_vla.edits`.

Controls for the paper's comparisons: :meth:`Steering.random_control` (same size and per-layer counts, via
:func:`nnsight_vla.neurons.random_like`) and :func:`prompt_baseline` (the concept word added to the instruction).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from .edits import (SCOPES, AppliedSteering, Op, StackPlan, check_vla, edit_in_trace, edit_step, forward_count,
                    install, pinned_activations, write)
from .errors import IndexOutOfRangeError, InputError
from .neurons import (STACKS, NeuronSet, as_neuron_set, export_neurons, layer_subset, load_neurons,
                      random_like)

MODES = ("overwrite", "add")
#: the largest |value| a steering may write or add (raw, after the unit): far above any useful value (the paper
#: uses 2-20; natural activations are O(1-30)) and low enough that the written residual stays finite even in
#: float16 (max 65504). Beyond it every logit saturates and decoding returns garbage that looks like an action.
MAX_ABS_ALPHA = 1e4

#: the prompt baseline's template: the concept word appended to the task instruction (as in
#: ``nnsight_vla.rollout.conditions.prompt_baseline``), e.g. "pick up the black bowl fast".
PROMPT_TEMPLATE = "{instruction} {word}"

# a layer count large enough to check the syntax of a layer subset before the model is known
_ANY_DEPTH = 1 << 20


def prompt_baseline(instruction: str, word: str, template: str = PROMPT_TEMPLATE) -> str:
    """The paper's prompt baseline: the concept word put into the instruction.

    ``template`` has the fields ``{instruction}`` and ``{word}``; the default :data:`PROMPT_TEMPLATE`
    (``"{instruction} {word}"``) appends it: ``prompt_baseline("pick up the bowl", "fast")`` ->
    ``"pick up the bowl fast"``. Another wording, e.g. ``"{instruction} {word}ly"`` or ``"move {word}: {instruction}"``.
    """
    for value, what in ((instruction, "instruction"), (word, "word")):
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"prompt_baseline needs a non-empty {what} string, got {value!r}")
    if not isinstance(template, str) or "{instruction}" not in template or "{word}" not in template:
        raise InputError(f"prompt template must contain '{{instruction}}' and '{{word}}', got {template!r}")
    try:
        return template.format(instruction=instruction.strip(), word=word.strip())
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(
            f"bad prompt template {template!r} (only {{instruction}} and {{word}} are allowed): {error}"
        ) from None


def _finite(value: Any, what: str) -> float:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise InputError(f"{what} must be finite, got {number} (NaN or infinite values cannot be written into a model)")
    return number


def _layers_spec(layers: Any) -> str | list[int]:
    """Normalise a layer subset to JSON-able form and check its syntax (the depth is checked on binding)."""
    if layers is None:
        return "all"
    if isinstance(layers, str):
        layer_subset(layers, _ANY_DEPTH)
        return layers
    allowed = "'all', 'early', 'late', 'first:K', 'last:K' or a list of layer indices"
    if not isinstance(layers, Iterable):
        raise InputError(f"layers must be {allowed}, got {layers!r}")
    values = list(layers)
    if not all(_is_index(v) for v in values):
        raise InputError(f"layers must be {allowed}, got {layers!r}")
    if not values:
        raise InputError("empty layer subset: pass 'all' or at least one layer")
    return [int(v) for v in values]


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------
# from steerings to edit plans


def _plans(vla, steerings: Sequence["Steering"]) -> list[StackPlan]:
    """Validate every steering against ``vla`` and merge their writes per stack, in execution order
    (stacks in the family's order, backbone first; layers ascending; one read per layer and step)."""
    check_vla(vla)
    if not steerings:
        raise InputError("nothing to steer: the steering group is empty")
    per_stack: dict[str, dict[str, dict[int, list[Op]]]] = {}
    bound: dict[str, list[NeuronSet]] = {}
    for steer in steerings:
        neurons = steer.resolve(vla)
        slots = per_stack.setdefault(neurons.stack, {"first": {}, "rest": {}})
        bound.setdefault(neurons.stack, []).append(neurons)
        for layer, ops in steer._ops(neurons).items():
            slots["first"].setdefault(layer, []).extend(ops)
            if steer.scope == "every":
                slots["rest"].setdefault(layer, []).extend(ops)
    plans = []
    for stack in vla.stacks:
        if stack.name not in per_stack:
            continue
        layers = getattr(vla, stack.attr)
        slots = per_stack[stack.name]
        plan = StackPlan(stack.name, neurons=bound[stack.name])
        plan.first = [(layers[layer].mlp.act, tuple(ops)) for layer, ops in sorted(slots["first"].items())]
        plan.rest = [(layers[layer].mlp.act, tuple(ops)) for layer, ops in sorted(slots["rest"].items())]
        plans.append(plan)
    return plans


def _applied(vla, steerings: Sequence["Steering"]) -> contextlib.AbstractContextManager[AppliedSteering]:
    return install(vla, _plans(vla, steerings))  # every check happens in _plans, before anything is installed


def _edit_in_trace(vla, steerings: Sequence["Steering"], tracer: Any, steps: int | None) -> None:
    edit_in_trace(vla, _plans(vla, steerings), tracer, steps)


def _edit_step(vla, steerings: Sequence["Steering"], step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InputError(f"edit_step needs the loop's step index (an int >= 0), got {step!r}")
    edit_step(vla, _plans(vla, steerings), step)


# ---------------------------------------------------------------------------------------------------------------
# the public classes


class Steering:
    """Set a neuron set's activations to ``alpha`` (or add ``alpha * scale``) while the model acts.

    Args:
        neurons: a :class:`~nnsight_vla.neurons.NeuronSet`, explicit ``(layer, neuron)`` pairs, or the path of a
            YAML/JSON neuron file (ours, or the authors' flat-index dictionaries with ``key=`` and ``d_mlp=``: see
            :func:`~nnsight_vla.neurons.load_neurons`).
        alpha: the value written (overwrite) or added in units of ``scale`` (add). Must be finite.
        layers: restrict the set to a layer subset: ``"all"``, ``"early"`` (first half), ``"late"`` (second half),
            ``"first:K"``, ``"last:K"`` or a list of layers (see :func:`nnsight_vla.neurons.layer_subset`).
        mode: ``"overwrite"`` (the paper: ``f(x)_i <- alpha * scale``) or ``"add"`` (``f(x)_i <- f(x)_i + alpha *
            scale``).
        scope: ``"every"`` forward pass that produces the action (default), or ``"prefill"`` (the first one).
        stack: ``"backbone"`` or ``"expert"`` (pi0's action expert); default: the neuron set's.
        scale: the unit of alpha. Default 1: alpha is a raw activation value. An
            :class:`~nnsight_vla.scale.ActivationScale` states alpha relative to each layer's activation scale (a
            percentile of ``|mlp.act|`` on neutral inputs: ``alpha=2`` writes twice layer l's p99 into layer l),
            which means the same in any model. Add mode also takes ``{(layer, neuron): s}`` (e.g. each neuron's
            activation std). :meth:`raw_alpha` gives the value actually written.
        name: a label for results files (default: the neuron set's name).
        key, d_mlp: for neuron files of flat indices (which entry; the MLP width).

    Everything that can be checked without a model is checked here; the rest (indices and widths against the
    model's stack) on :meth:`apply` / :meth:`edit` before anything runs.
    """

    def __init__(
        self,
        neurons: Any,
        alpha: float,
        layers: Any = "all",
        mode: str = "overwrite",
        scope: str = "every",
        stack: str | None = None,
        *,
        scale: float | Mapping[tuple[int, int], float] = 1.0,
        name: str | None = None,
        key: str | None = None,
        d_mlp: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise InputError(f"unknown steering mode {mode!r}; use 'overwrite' (the paper: f(x)_i <- alpha) or 'add'")
        if scope not in SCOPES:
            raise InputError(f"unknown steering scope {scope!r}; use 'every' (every forward pass) or 'prefill'")
        if stack is not None and stack not in STACKS:
            raise InputError(f"unknown stack {stack!r}; use one of {STACKS}")
        self.neurons: NeuronSet = as_neuron_set(neurons, stack, key, d_mlp)
        if not self.neurons.pairs:
            raise InputError(f"neuron set {self.neurons.name!r} is empty: there is nothing to steer")
        self.stack: str = self.neurons.stack
        self.alpha: float = _finite(alpha, "alpha")
        self.layers: str | list[int] = _layers_spec(layers)
        self.mode: str = mode
        self.scope: str = scope
        self.scale = self._check_scale(scale)
        self._check_bound()
        self.name: str = name if name is not None else (self.neurons.name or "steering")
        if self.neurons.num_layers is not None:
            self.resolve()  # an empty layer restriction fails now, not at the first run

    def _check_scale(self, scale: Any) -> Any:
        from .scale import ActivationScale

        if isinstance(scale, ActivationScale):
            if scale.stack != self.stack:
                raise InputError(f"the activation scale was measured on the {scale.stack} stack; this steering "
                                 f"writes the {self.stack} stack")
            if self.neurons.num_layers is not None and scale.num_layers != self.neurons.num_layers:
                raise InputError(f"the activation scale has {scale.num_layers} layers; neuron set "
                                 f"{self.neurons.name!r} was made for {self.neurons.num_layers}")
            return scale
        if isinstance(scale, Mapping) and scale.get("type") == "activation_scale":
            return self._check_scale(ActivationScale.from_dict(scale))
        if isinstance(scale, Mapping):
            if self.mode != "add":
                raise InputError("per-neuron scale only applies to mode='add'")
            table = {}
            for pair, value in scale.items():
                try:
                    layer, neuron = (int(v) for v in pair)
                except (TypeError, ValueError):
                    raise InputError(f"scale keys must be (layer, neuron) pairs, got {pair!r}") from None
                table[(layer, neuron)] = _finite(value, f"scale of neuron {(layer, neuron)}")
            missing = [p for p in self.neurons.pairs if p not in table]
            if missing:
                raise InputError(f"scale has no value for neuron(s) {missing[:5]} of the set")
            return table
        value = _finite(scale, "scale")
        if value <= 0:
            raise InputError(f"scale must be positive, got {value}")
        return value

    def _check_bound(self) -> None:
        if isinstance(self.scale, dict):
            largest = abs(self.alpha) * max(abs(v) for v in self.scale.values())
        elif isinstance(self.scale, float):
            largest = abs(self.alpha) * self.scale
        else:
            largest = abs(self.alpha) * max(self.scale.values)
        if largest > MAX_ABS_ALPHA:
            raise InputError(
                f"alpha {self.alpha:g} writes {largest:.3g} into the activations (after the unit); the limit is "
                f"{MAX_ABS_ALPHA:g} (the paper uses 2-20; beyond ~1e4 logits saturate and decoding returns a "
                "meaningless action)")

    def raw_alpha(self, layer: int) -> float:
        """The value written into (overwrite) or added to (add, scalar/per-layer scale) layer ``layer``'s
        activations: ``alpha`` times the unit."""
        if isinstance(self.scale, dict):
            raise InputError("per-neuron scales have no single raw alpha per layer")
        unit = self.scale[layer] if not isinstance(self.scale, float) else self.scale
        return self.alpha * unit

    # -- the neurons actually steered ------------------------------------------------------------------------

    def resolve(self, vla: Any = None) -> NeuronSet:
        """The neurons this steering writes: the set restricted to ``layers``, with widths checked against
        ``vla``'s stack when given. Raises a clear error for a bad index, a set made for another model (stack or
        width mismatch) or a restriction that leaves nothing."""
        neurons = self.neurons
        if vla is not None:
            num_layers, _, d_mlp = _stack_dims(vla, neurons)
            neurons = NeuronSet(neurons.pairs, stack=neurons.stack, d_mlp=d_mlp, num_layers=num_layers,
                                name=neurons.name, meta=dict(neurons.meta))
        if self.layers == "all":
            return neurons
        if neurons.num_layers is None:
            raise InputError(
                f"layers={self.layers!r} needs the depth of the {neurons.stack} stack: pass the model "
                "(steer.resolve(vla)), or build the set with NeuronSet.for_model"
            )
        kept = set(layer_subset(self.layers, neurons.num_layers))
        restricted = NeuronSet(tuple(p for p in neurons.pairs if p[0] in kept), stack=neurons.stack,
                               d_mlp=neurons.d_mlp, num_layers=neurons.num_layers,
                               name=f"{neurons.name}[{self._layers_label()}]", meta=dict(neurons.meta))
        if not restricted.pairs:
            raise InputError(
                f"no neuron of {neurons.name!r} lies in layers {self.layers!r} (= {sorted(kept)} of "
                f"{neurons.num_layers}); the set has neurons in layers {neurons.layers}"
            )
        return restricted

    def _layers_label(self) -> str:
        return self.layers if isinstance(self.layers, str) else ",".join(map(str, self.layers))

    def _ops(self, neurons: NeuronSet) -> dict[int, list[Op]]:
        add = self.mode == "add"
        ops = {}
        for layer, indices in neurons.by_layer().items():
            index = torch.tensor(indices, dtype=torch.long)
            if isinstance(self.scale, dict):
                value: Any = torch.tensor([self.alpha * self.scale[(layer, i)] for i in indices], dtype=torch.float32)
            else:
                value = self.raw_alpha(layer)
            ops[layer] = [Op(index, value, add)]
        return ops

    # -- (a) plain inference, (b) inside a trace, (c) TransformerLens ----------------------------------------

    def apply(self, vla) -> contextlib.AbstractContextManager[AppliedSteering]:
        """Context manager: steer every ``vla.predict_action`` call (and every trace of ``vla``) inside it.

        Installs one stored nnsight edit on entry and removes exactly that edit on exit (also after an
        exception), leaving any edits of your own in place. Validation happens on entry, before anything is
        installed. Binds an :class:`AppliedSteering`.
        """
        return _applied(vla, [self])

    def edit(self, vla, tracer: Any, steps: int | None = None) -> None:
        """Inside your own trace: steer every forward pass of the traced call.

        Equivalent to ``for _ in tracer.iter[:steps]: vla.layers[l].mlp.act.output[..., S] = alpha`` (layers in
        order). ``steps`` defaults to :func:`forward_count` for a trace of ``predict_action`` (OpenVLA: 7; pi0:
        1 for the backbone, ``num_steps`` for the expert; pi0-FAST: its token budget ``max_new_tokens``, an upper
        bound when decoding stops at ``<eos>`` -- a shorter run then ends the block with nnsight's "was never
        reached" warning: use :meth:`apply`, or ``stop_at_eos=False``); when it is unknown (a trace of another
        function) the loop is open (``tracer.iter[:]``), which nnsight ends with that warning too. Because nnsight
        walks the forwards inside this call, put it LAST in the block (after your own reads);
        ``tracer.result.save()`` may still follow. To mix steering with your own reads on every step, call
        :meth:`edit_step` in your own ``for step in tracer.iter[...]`` loop instead.
        """
        _edit_in_trace(vla, [self], tracer, steps)

    def edit_step(self, vla, step: int) -> None:
        """Inside your own ``for step in tracer.iter[...]`` loop: write this step's edits (all steered layers, in
        order; with scope "prefill" only at step 0). Reads of layers after the steered ones may follow it.

        ``step`` is the loop's index. A stack that runs in the first forward only (pi0's backbone: the prefix, then
        cached; see the family's ``stack_forwards``) is written at step 0 only, so one loop over pi0's denoising
        steps can steer both stacks."""
        _edit_step(vla, [self], step)

    def transformer_lens_hooks(self, model: Any = None) -> list[tuple[str, Callable]]:
        """``[(f"blocks.{l}.mlp.hook_post", fn), ...]`` doing the same writes for a TransformerLens bridge
        (``bridge.run_with_hooks(ids, fwd_hooks=...)``). Each hook acts on every forward it is registered for
        (scope is the caller's: register it for the prefill only to mimic ``scope="prefill"``).

        ``model``: the VLA or the bridge, to check widths (optional when the neuron set knows its widths).
        """
        return _tl_hooks([self], model)

    # -- controls and records --------------------------------------------------------------------------------

    def random_control(self, seed: int = 0, vla: Any = None) -> "Steering":
        """The paper's random-neuron control: the same alpha, mode, scope and layers, on random neurons matched
        in number per layer to the steered set (never one of its neurons). ``vla`` supplies the widths when the
        set does not carry them."""
        steered = self.resolve(vla)
        if steered.d_mlp is None:
            raise InputError("a random control needs the MLP width: pass the model (random_control(seed, vla))")
        control = random_like(steered, seed=seed)
        scale = self.scale
        if isinstance(scale, dict):
            # per-neuron scales do not transfer to other neurons: use their mean
            scale = sum(scale.values()) / len(scale)
        return Steering(control, self.alpha, layers=self.layers, mode=self.mode, scope=self.scope,
                        stack=self.stack, scale=scale, name=f"random({self.name}, seed={seed})")

    def to_dict(self) -> dict:
        """A JSON-able description; :meth:`from_dict` rebuilds the same steering."""
        scale: Any = self.scale
        if isinstance(scale, dict):
            scale = [[layer, neuron, value] for (layer, neuron), value in sorted(scale.items())]
        elif not isinstance(scale, float):
            scale = scale.to_dict()
        return {
            "type": "steering", "name": self.name, "alpha": self.alpha, "layers": self.layers, "mode": self.mode,
            "scope": self.scope, "stack": self.stack, "scale": scale, "neurons": self.neurons.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "Steering":
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping) or data.get("type", "steering") != "steering" or "neurons" not in data:
            raise InputError("not a steering description (expected the output of Steering.to_dict())")
        scale = data.get("scale", 1.0)
        if isinstance(scale, list):
            scale = {(int(l), int(n)): float(v) for l, n, v in scale}
        return cls(NeuronSet.from_dict(data["neurons"]), data["alpha"], layers=data.get("layers", "all"),
                   mode=data.get("mode", "overwrite"), scope=data.get("scope", "every"), stack=data.get("stack"),
                   scale=scale, name=data.get("name"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Steering) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        unit = "" if self.scale == 1.0 else ("*scale" if isinstance(self.scale, dict) else
                                              f"*p{self.scale.percentile:g}" if not isinstance(self.scale, float)
                                              else f"*{self.scale:g}")
        value = f"alpha={self.alpha:g}{unit}" if self.mode == "overwrite" else f"+{self.alpha:g}{unit or '*scale'}"
        return (f"Steering({self.name!r}, {len(self.neurons)} neurons, {self.stack}, layers={self.layers!r}, "
                f"{self.mode} {value}, scope={self.scope})")


class SteeringGroup:
    """Several steerings applied together (e.g. one per stack, or two concepts). The writes are merged per
    stack and layer and issued in execution order (backbone before expert, layers ascending)."""

    def __init__(self, members: Iterable[Steering], name: str | None = None) -> None:
        self.members: list[Steering] = list(members)
        if not self.members:
            raise InputError("a SteeringGroup needs at least one Steering")
        bad = [m for m in self.members if not isinstance(m, Steering)]
        if bad:
            raise InputError(f"SteeringGroup members must be Steering objects, got {type(bad[0]).__name__}")
        self.name = name if name is not None else "+".join(m.name for m in self.members)

    def __iter__(self) -> Iterator[Steering]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def apply(self, vla) -> contextlib.AbstractContextManager[AppliedSteering]:
        """Like :meth:`Steering.apply` (one stored edit per stack)."""
        return _applied(vla, self.members)

    def edit(self, vla, tracer: Any, steps: int | None = None) -> None:
        """Like :meth:`Steering.edit`; a group spanning stacks walks them one after the other."""
        _edit_in_trace(vla, self.members, tracer, steps)

    def edit_step(self, vla, step: int) -> None:
        """Like :meth:`Steering.edit_step`."""
        _edit_step(vla, self.members, step)

    def transformer_lens_hooks(self, model: Any = None) -> list[tuple[str, Callable]]:
        """Like :meth:`Steering.transformer_lens_hooks` (backbone members only)."""
        return _tl_hooks(self.members, model)

    def random_control(self, seed: int = 0, vla: Any = None) -> "SteeringGroup":
        """A random control for every member (seeds ``seed``, ``seed + 1``, ...)."""
        return SteeringGroup([m.random_control(seed + i, vla) for i, m in enumerate(self.members)],
                             name=f"random({self.name}, seed={seed})")

    def to_dict(self) -> dict:
        return {"type": "steering_group", "name": self.name, "members": [m.to_dict() for m in self.members]}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SteeringGroup":
        if not isinstance(data, Mapping) or data.get("type") != "steering_group":
            raise InputError("not a steering group description (expected SteeringGroup.to_dict())")
        return cls([Steering.from_dict(m) for m in data["members"]], name=data.get("name"))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SteeringGroup) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        return f"SteeringGroup({self.name!r}, {self.members})"


def steering_from_dict(data: Mapping) -> Steering | SteeringGroup:
    """Rebuild a :class:`Steering` or :class:`SteeringGroup` from its ``to_dict()``."""
    if isinstance(data, Mapping) and data.get("type") == "steering_group":
        return SteeringGroup.from_dict(data)
    return Steering.from_dict(data)


# ---------------------------------------------------------------------------------------------------------------
# helpers


def _stack_dims(model: Any, neurons: NeuronSet) -> tuple[int, int, int]:
    """(num_layers, d_model, d_mlp) of the set's stack in a VLA (validated) or a TransformerLens bridge."""
    from .models.base import VLA

    if isinstance(model, VLA):
        neurons.validate(model)
        return model.stack_dims(neurons.stack)
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "d_mlp", None) is None:
        raise InputError(f"expected an nnsight_vla model or a TransformerLens bridge, got {type(model).__name__}")
    if neurons.stack != "backbone":
        raise InputError(f"a TransformerLens bridge covers the language backbone only, not the {neurons.stack} stack")
    num_layers, d_model, d_mlp = int(cfg.n_layers), int(cfg.d_model), int(cfg.d_mlp)
    if neurons.d_mlp is not None and neurons.d_mlp != d_mlp:
        raise InputError(f"neuron set {neurons.name!r} was made for d_mlp={neurons.d_mlp}, the bridge has {d_mlp}")
    if neurons.num_layers is not None and neurons.num_layers != num_layers:
        raise InputError(f"neuron set {neurons.name!r} was made for {neurons.num_layers} layers, the bridge has "
                         f"{num_layers}")
    bad = [(l, n) for l, n in neurons.pairs if l >= num_layers or n >= d_mlp]
    if bad:
        raise IndexOutOfRangeError(f"neurons outside the bridge ({num_layers} layers x {d_mlp}): {bad[:5]}")
    return num_layers, d_model, d_mlp


def _tl_hooks(steerings: Sequence[Steering], model: Any) -> list[tuple[str, Callable]]:
    per_layer: dict[int, list[Op]] = {}
    for steer in steerings:
        neurons = steer.resolve(model)  # checks the set against the model first
        if steer.stack != "backbone":
            raise InputError(
                f"TransformerLens hooks exist for the language backbone only; {steer.name!r} steers the "
                f"{steer.stack} stack"
            )
        for layer, ops in steer._ops(neurons).items():
            per_layer.setdefault(layer, []).extend(ops)

    def make(ops: list[Op]) -> Callable:
        def hook(activation: torch.Tensor, hook: Any = None) -> torch.Tensor:
            write(activation, ops)
            return activation

        return hook

    return [(f"blocks.{layer}.mlp.hook_post", make(ops)) for layer, ops in sorted(per_layer.items())]


__all__ = [
    "AppliedSteering", "MAX_ABS_ALPHA", "MODES", "PROMPT_TEMPLATE", "SCOPES", "Steering", "SteeringGroup",
    "forward_count",
    "load_neurons", "export_neurons",  # neuron files (defined in neurons.py), where steering users look for them
    "pinned_activations", "prompt_baseline", "steering_from_dict",
]
