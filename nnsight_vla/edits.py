"""Stored nnsight edits that write MLP activations on every forward of an action (the engine of steering).

An edit is a list of ``Op`` writes per layer, merged per stack into a ``StackPlan``: ``first`` for the stack's
first forward pass and ``rest`` for the later ones. :func:`install` stores ONE nnsight edit per plan on the model
(``vla.edit(inplace=True)``) whose body walks ``tracer.iter[:]`` and ends quietly when the run has no further
forward, so it needs no forward count and works for 7 OpenVLA tokens, any number of denoising steps, or a decode
that stops at EOS; on exit it removes exactly those edits (never a user's own). A stored edit is replayed by
nnsight on every call through the interleaver (``vla.predict_action`` called plainly, and traces opened inside);
calling the torch module directly bypasses it. :func:`edit_in_trace` / :func:`edit_step` do the same writes
inside a user's own trace. :mod:`nnsight_vla.steering` builds the plans from neuron sets and alphas.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch
from nnsight.intervention.interleaver import OutOfOrderError

from .errors import InputError

#: ``"every"``: every forward pass that produces the action; ``"prefill"``: only the first that reaches the stack
SCOPES = ("every", "prefill")


@dataclass(frozen=True)
class Op:
    """One write into a layer's activations: ``out[..., index] = value`` or ``+= value`` (at every position, or
    at the last one only)."""

    index: torch.Tensor
    value: Any  # float, or a per-neuron tensor (add mode with per-neuron scales)
    add: bool
    last_only: bool = False


def write(out: torch.Tensor, ops: Sequence[Op]) -> None:
    for op in ops:
        value = op.value
        if isinstance(value, torch.Tensor):
            value = value.to(device=out.device, dtype=out.dtype)
        target = out[..., -1:, :] if op.last_only else out
        if op.add:
            target[..., op.index] += value
        else:
            target[..., op.index] = value


def steer_step(targets: Sequence[tuple[Any, Sequence[Op]]]) -> None:
    """Inside a worker: write every target of one forward pass, in execution (layer) order."""
    for act, ops in targets:
        write(act.output, ops)


def _store_edit(vla, first, rest, counter: list) -> None:
    # The block below is captured by nnsight and stored on the model (not run here). On every later run it
    # walks the forward passes (tracer.iter), writing the targets of each; when the run has no further forward,
    # nnsight throws OutOfOrderError into the parked loop, which simply ends the edit (no warning, no error).
    # Exactly one new edit is appended; apply() finds and removes it by identity.
    with vla.edit(inplace=True) as tracer:
        steps = tracer.iter[:] if rest else tracer.iter[:1]
        try:
            for step in steps:
                steer_step(first if step == 0 else rest)
                counter[0] += 1
        except OutOfOrderError:
            pass


@dataclass
class StackPlan:
    """The merged writes of one stack: ``first`` for its first forward pass, ``rest`` for the later ones."""

    stack: str
    first: list = field(default_factory=list)
    rest: list = field(default_factory=list)
    neurons: list = field(default_factory=list)


def check_vla(vla: Any) -> None:
    from .models.base import VLA

    if not isinstance(vla, VLA):
        raise InputError(f"steering needs an nnsight_vla model (nv.load / nv.tiny), got {type(vla).__name__}")


class AppliedSteering:
    """What ``with steer.apply(vla) as applied:`` binds: the model, the neuron sets actually steered, and how
    many forward passes of each stack have been steered so far (``applied.steered_forwards``)."""

    def __init__(self, vla, plans: list[StackPlan], counters: dict[str, list]):
        self.vla = vla
        self.neurons = [n for plan in plans for n in plan.neurons]
        self._counters = counters

    @property
    def steered_forwards(self) -> dict[str, int]:
        """{stack: number of forward passes steered since the block was entered}."""
        return {stack: counter[0] for stack, counter in self._counters.items()}

    def __repr__(self) -> str:
        return f"AppliedSteering({self.neurons}, steered_forwards={self.steered_forwards})"


def pinned_activations(vla, values: Mapping[int, Any], stack: str = "backbone", scope: str = "every",
                       positions: str = "all") -> contextlib.AbstractContextManager[AppliedSteering]:
    """Context manager: overwrite whole layers' activations with fixed vectors, ``mlp.act.output[..., :] =
    values[layer]`` (a ``(d_mlp,)`` tensor, broadcast over positions; or a pair ``(first, rest)``: one vector for
    the first forward, one for the later ones), on every forward (or the first, ``scope="prefill"``), at every
    position or at the last one only (``positions="last"``: the prompt position that predicts the first action
    token, then each decode step's). With zeros it knocks a layer's MLP out; with its mean on reference inputs
    it is a mean ablation. Installed and removed like :meth:`Steering.apply`."""
    check_vla(vla)
    if scope not in SCOPES:
        raise InputError(f"unknown scope {scope!r}; use one of {SCOPES}")
    if positions not in ("all", "last"):
        raise InputError(f"positions must be 'all' or 'last', got {positions!r}")
    num_layers, _, d_mlp = vla.stack_dims(stack)
    modules = getattr(vla, vla.stack(stack).attr)
    first, rest = [], []
    for layer in sorted(values):
        checked = vla.check_layer(layer, stack)
        pair = values[layer] if isinstance(values[layer], (tuple, list)) else (values[layer], values[layer])
        ops = []
        for value in pair:
            value = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
            if value.numel() != d_mlp or not torch.isfinite(value).all():
                raise InputError(f"layer {layer}: pinned activations must be {d_mlp} finite numbers")
            ops.append(Op(torch.arange(d_mlp), value, False, positions == "last"))
        first.append((modules[checked].mlp.act, (ops[0],)))
        rest.append((modules[checked].mlp.act, (ops[1],)))
    if not first:
        raise InputError("no layers to pin")
    plan = StackPlan(stack, first=first, rest=rest if scope == "every" else [])
    return install(vla, [plan])


@contextlib.contextmanager
def install(vla, plans: list[StackPlan]) -> Iterator[AppliedSteering]:
    if vla.interleaver.interleaving:
        raise InputError(
            "steer.apply(vla) cannot be entered inside a trace of the same model; "
            "call steer.edit(vla, tracer) or steer.edit_step(vla, step) there instead"
        )
    installed: list = []
    counters: dict[str, list] = {}
    try:
        for plan in plans:
            before = list(vla._edits)
            counter = counters[plan.stack] = [0]
            _store_edit(vla, plan.first, plan.rest, counter)
            installed += [m for m in vla._edits if not any(m is b for b in before)]
        yield AppliedSteering(vla, plans, counters)
    finally:
        # remove exactly our edits: a user's own stored edits (vla.edit(inplace=True)) stay
        vla._edits = [m for m in vla._edits if not any(m is ours for ours in installed)]


def check_in_trace(vla, what: str) -> None:
    if not vla.interleaver.interleaving:
        raise InputError(
            f"steer.{what}(vla, ...) must be called inside a trace of vla "
            "(with vla.predict_action(...) as tracer: ...); outside traces use `with steer.apply(vla):`"
        )


def forward_count(vla, stack: str = "backbone", tracer: Any = None, **predict_kwargs: Any) -> int | None:
    """How many forward passes reach ``stack``'s layers in one ``predict_action`` call (None when unknown).

    Asks the family: ``vla.stack_forwards(stack, **predict_kwargs)`` (the forwards a stack runs in, e.g. pi0's
    backbone ``[0]``; OpenVLA: one per action token, i.e. 7). With ``tracer`` (a trace of ``vla.predict_action``),
    the call's own keyword arguments are used; a trace of any other function gives None.
    """
    if tracer is not None:
        fn = getattr(tracer, "fn", None)
        if getattr(fn, "__name__", None) != "predict_action":
            return None
        predict_kwargs = {**dict(getattr(tracer, "kwargs", None) or {}), **predict_kwargs}
    for name in ("images", "instruction", "state"):
        predict_kwargs.pop(name, None)
    try:
        return len(vla.stack_forwards(stack, **predict_kwargs))
    except (InputError, NotImplementedError):
        return None  # predict_action itself will report a bad argument


def prefix_only(vla, stack: str) -> bool:
    """Whether a stack runs in the first forward of a call only (pi0's backbone: the prefix, then cached)."""
    try:
        return list(vla.stack_forwards(stack)) == [0]
    except NotImplementedError:
        return False


def edit_in_trace(vla, plans: list[StackPlan], tracer: Any, steps: int | None) -> None:
    """Inside the user's trace of ``vla``: walk its forward passes, writing each plan's ops (stacks in turn)."""
    check_in_trace(vla, "edit")
    if steps is not None:
        steps = int(steps)
        if steps < 1:
            raise InputError(f"steps must be a positive number of forward passes, got {steps}")
    for position, plan in enumerate(plans):
        if not plan.rest or prefix_only(vla, plan.stack):
            count = 1  # prefill scope, or a stack that only runs in the first forward (pi0's backbone)
        else:
            count = steps if steps is not None else forward_count(vla, plan.stack, tracer=tracer)
        if count is None and position + 1 < len(plans):
            raise InputError(
                f"the number of forward passes of the {plan.stack} stack is unknown for this call; pass steps= "
                "(a steering group spanning stacks walks them one after the other)"
            )
        for step in tracer.iter[:count]:
            steer_step(plan.first if step == 0 else plan.rest)


def edit_step(vla, plans: list[StackPlan], step: int) -> None:
    """Inside the user's ``for step in tracer.iter[...]`` loop: write this step's ops of every plan."""
    check_in_trace(vla, "edit_step")
    for plan in plans:
        if step == 0:
            steer_step(plan.first)
        elif not prefix_only(vla, plan.stack):  # asking a prefix-only stack for step 1 would stall the loop
            steer_step(plan.rest)
