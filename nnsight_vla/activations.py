"""Reading ``mlp.act`` over the forward passes of ``predict_action`` calls, with nnsight.

The method's later steps (activation scales, neuron responses, ablations) need the activations a model produces
on its own inputs. :func:`read_activations` traces one ``predict_action`` call and returns, for chosen layers of
one stack, the activations of each forward pass that runs that stack (OpenVLA: the prefill and 6 decode steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from .errors import InputError


@dataclass(frozen=True)
class Query:
    """One model input: camera image(s), an instruction and (for families that take it) the robot state."""

    images: Any
    instruction: str
    state: Any = None


def as_queries(items: Iterable[Any]) -> list[Query]:
    """Queries from :class:`Query` objects, ``(images, instruction[, state])`` tuples or
    ``{"images", "instruction", "state"}`` mappings."""
    out = []
    for item in items:
        if isinstance(item, Query):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Query(item["images"], item["instruction"], item.get("state")))
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            out.append(Query(*item))
        else:
            raise InputError("a query is (images, instruction[, state]), a mapping or a Query; "
                             f"got {type(item).__name__}")
    if not out:
        raise InputError("no queries given")
    return out


def grid(images: Sequence[Any], instructions: Sequence[str], state: Any = None) -> list[Query]:
    """Every image with every instruction (images outer)."""
    return [Query(image, text, state) for image in images for text in instructions]


def read_activations(vla, query: Query, layers: Sequence[int] | None = None, stack: str = "backbone",
                     forwards: str = "all", **predict_kwargs: Any) -> dict[int, list[torch.Tensor]]:
    """``{layer: [activation of each forward]}`` for one ``predict_action`` call; each tensor is ``(tokens,
    d_mlp)`` (batch dimension dropped). ``forwards``: "all" the forwards that run ``stack``, or "first"."""
    if forwards not in ("all", "first"):
        raise InputError(f"forwards must be 'all' or 'first', got {forwards!r}")
    num_layers = vla.stack_dims(stack)[0]
    layers = list(range(num_layers)) if layers is None else sorted({vla.check_layer(l, stack) for l in layers})
    runs = list(vla.stack_forwards(stack, **predict_kwargs))
    if forwards == "first":
        runs = runs[:1]
    modules = getattr(vla, vla.stack(stack).attr)
    wanted = set(runs)
    with vla.predict_action(query.images, query.instruction, query.state, **predict_kwargs) as tracer:
        saved = list().save()
        for step in tracer.iter[: max(runs) + 1]:
            if step in wanted:
                saved.append([modules[layer].mlp.act.output.detach()[0].float().cpu() for layer in layers])
    return {layer: [per_step[i] for per_step in saved] for i, layer in enumerate(layers)}


def last_position(vla, query: Query, layers: Sequence[int] | None = None, stack: str = "backbone",
                  **predict_kwargs: Any) -> dict[int, torch.Tensor]:
    """``{layer: (d_mlp,)}``: the activations at the last position of the first forward (OpenVLA: the prompt
    position that predicts the first action token)."""
    acts = read_activations(vla, query, layers, stack, forwards="first", **predict_kwargs)
    return {layer: steps[0][-1] for layer, steps in acts.items()}
