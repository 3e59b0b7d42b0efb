"""Activation scales: giving the steering value α a unit.

A gated MLP is unchanged when ``W_up`` is divided by ``c`` and ``W_down`` multiplied by ``c``, yet every
activation ``f(x) = act_fn(W_gate x) * W_up x`` shrinks by ``c``: a raw α ("write 4.0") means different things in
different models, or in one model after that rescale. This module measures a layer's activation scale (a
percentile of ``|mlp.act|`` over neutral queries), lets :class:`~nnsight_vla.steering.Steering` state α in that
unit (``scale=``), and can rescale a model in place so that the percentile equals a reference in every layer.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from . import files
from .activations import as_queries, read_activations
from .errors import InputError


@dataclass(frozen=True)
class ActivationScale:
    """Per-layer activation scales of one stack: ``values[l]`` is the ``percentile`` of ``|mlp.act|`` in layer
    ``l`` over ``samples`` activations (every neuron, every position, every forward) of ``queries`` inputs."""

    values: tuple[float, ...]
    percentile: float = 99.0
    stack: str = "backbone"
    samples: int = 0
    queries: int = 0
    source: str = ""

    def __post_init__(self) -> None:
        values = tuple(float(v) for v in self.values)
        if not values or not all(math.isfinite(v) and v > 0 for v in values):
            raise InputError(f"activation scales must be positive finite numbers, got {values}")
        if not 0 < float(self.percentile) <= 100:
            raise InputError(f"percentile must be in (0, 100], got {self.percentile}")
        object.__setattr__(self, "values", values)

    @property
    def num_layers(self) -> int:
        return len(self.values)

    def __getitem__(self, layer: int) -> float:
        return self.values[layer]

    def to_dict(self) -> dict:
        return {"type": "activation_scale", **asdict(self), "values": list(self.values)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "ActivationScale":
        if not isinstance(data, Mapping) or data.get("type", "activation_scale") != "activation_scale":
            raise InputError("not an activation scale (expected ActivationScale.to_dict())")
        fields = {k: data[k] for k in ("values", "percentile", "stack", "samples", "queries", "source") if k in data}
        return cls(**fields)

    def save(self, path: str | os.PathLike) -> Path:
        return files.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ActivationScale":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"cannot read an activation scale from {path}: {error}") from None


def activation_percentiles(vla, queries: Iterable[Any], percentiles: Iterable[float] = (50.0, 90.0, 99.0, 99.9),
                           stack: str = "backbone", max_samples: int = 2_000_000, seed: int = 0,
                           **predict_kwargs: Any) -> tuple[dict[float, list[float]], int]:
    """({percentile: [value per layer]}, samples per layer) of ``|mlp.act|`` over every forward of
    ``predict_action`` on ``queries``; at most ``max_samples`` values per layer are kept (a seeded uniform
    subsample), so a 7B model's calibration fits in memory."""
    queries = as_queries(queries)
    percentiles = [float(p) for p in percentiles]
    if not percentiles or not all(0 < p <= 100 for p in percentiles):
        raise InputError(f"percentiles must be in (0, 100], got {percentiles}")
    num_layers = vla.stack_dims(stack)[0]
    pooled: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
    for query in queries:
        acts = read_activations(vla, query, stack=stack, **predict_kwargs)
        for layer, steps in acts.items():
            flat = torch.cat([s.reshape(-1) for s in steps]).abs()
            if flat.numel() > max_samples:  # keep memory bounded per query too
                flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:max_samples]]
            pooled[layer].append(flat)
    generator = torch.Generator().manual_seed(seed)
    out: dict[float, list[float]] = {p: [] for p in percentiles}
    samples = 0
    for layer in range(num_layers):
        flat = torch.cat(pooled[layer])
        if flat.numel() > max_samples:
            flat = flat[torch.randperm(flat.numel(), generator=generator)[:max_samples]]
        samples = int(flat.numel())
        values = np.percentile(flat.numpy(), percentiles)
        for p, v in zip(percentiles, values):
            out[p].append(float(v))
    return out, samples


def measure_activation_scale(vla, queries: Iterable[Any], percentile: float = 99.0, stack: str = "backbone",
                             max_samples: int = 2_000_000, seed: int = 0, source: str = "",
                             **predict_kwargs: Any) -> ActivationScale:
    """Each layer's ``percentile`` of ``|mlp.act|`` over every forward of ``predict_action`` on ``queries``
    (neutral inputs: the model's ordinary regime), as an :class:`ActivationScale`."""
    queries = as_queries(queries)
    values, samples = activation_percentiles(vla, queries, (percentile,), stack, max_samples, seed, **predict_kwargs)
    return ActivationScale(tuple(values[float(percentile)]), percentile=float(percentile), stack=stack,
                           samples=samples, queries=len(queries), source=source)


def rescale_mlps(vla, scale: ActivationScale, reference: float = 1.0) -> ActivationScale:
    """Rescale ``vla`` in place so that each layer's measured scale becomes ``reference``: ``W_up`` rows divided
    by ``c_l = scale[l] / reference`` and ``W_down`` columns multiplied by it. The model computes the same function
    (up to float rounding) and its lens top-k is unchanged (each value vector is multiplied by a positive number);
    only the activations' unit changes. Returns the scale the model now has."""
    if not (isinstance(reference, (int, float)) and math.isfinite(reference) and reference > 0):
        raise InputError(f"reference must be a positive number, got {reference!r}")
    num_layers = vla.stack_dims(scale.stack)[0]
    if scale.num_layers != num_layers:
        raise InputError(f"the scale has {scale.num_layers} layers, the {scale.stack} stack has {num_layers}")
    vla.dispatch()
    modules = vla._module.get_submodule(vla.stack(scale.stack).path)
    with torch.no_grad():
        for layer, value in enumerate(scale.values):
            c = value / reference
            mlp = modules[layer].mlp
            mlp.up_proj.weight.div_(c)
            if getattr(mlp.up_proj, "bias", None) is not None:
                mlp.up_proj.bias.div_(c)
            mlp.down_proj.weight.mul_(c)
    return ActivationScale(tuple(float(reference) for _ in scale.values), percentile=scale.percentile,
                           stack=scale.stack, samples=scale.samples, queries=scale.queries,
                           source=f"rescaled to {reference:g} ({scale.source})".strip())

