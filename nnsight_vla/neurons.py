"""Neuron sets: the (layer, neuron) pairs of one stack that the method steers.

A neuron is an index into ``d_mlp`` of one layer of a named stack ("backbone", or "expert" for pi0's action
expert): its value vector is column ``neuron`` of ``down_proj.weight`` and its activation is
``mlp.act.output[..., neuron]``. Flat indices ``layer * d_mlp + neuron`` (the authors' YAML files) are accepted
on input and converted.

Layer subsets ("temporal localization" in the paper) are named:

* ``"all"``: every layer;
* ``"early"``: the first half of the stack, layers ``0 .. n//2 - 1``;
* ``"late"``: the second half, layers ``n//2 .. n - 1`` (the authors' released clusters sit in 15..31 of 32);
* ``"first:K"`` / ``"last:K"``: the first / last K layers;
* an explicit list of layer indices (negative ones count from the end), or ``range``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from . import files
from .errors import IndexOutOfRangeError, InputError

STACKS = ("backbone", "expert")


def layer_subset(spec: Any, num_layers: int) -> list[int]:
    """The sorted layer indices named by ``spec`` for a stack of ``num_layers`` layers (see module docstring)."""
    if num_layers < 1:
        raise InputError("a stack needs at least one layer")
    if spec is None or spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str):
        if spec == "early":
            return list(range(max(num_layers // 2, 1)))
        if spec == "late":
            return list(range(num_layers // 2, num_layers))
        if spec.startswith(("first:", "last:")):
            kind, _, count = spec.partition(":")
            try:
                k = int(count)
            except ValueError:
                raise InputError(f"bad layer subset {spec!r}: K must be an integer") from None
            if not 1 <= k <= num_layers:
                raise IndexOutOfRangeError(f"layer subset {spec!r} asks for {k} of {num_layers} layers")
            return list(range(k)) if kind == "first" else list(range(num_layers - k, num_layers))
        raise InputError(
            f"unknown layer subset {spec!r}; use 'all', 'early', 'late', 'first:K', 'last:K' or a list of layers"
        )
    layers = sorted({_check_layer(int(layer), num_layers) for layer in spec})
    if not layers:
        raise InputError("empty layer subset")
    return layers


def _check_layer(layer: int, num_layers: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise IndexOutOfRangeError(f"layer {layer} is out of range for a stack of {num_layers} layers")
    return layer % num_layers


@dataclass(frozen=True)
class NeuronSet:
    """An immutable set of (layer, neuron) pairs of one stack, with where it came from.

    Attributes:
        pairs: sorted, unique (layer, neuron) pairs.
        stack: "backbone" or "expert".
        d_mlp / num_layers: the widths it was made for (checked against a model before steering).
        name: e.g. "fast"; meta: free-form provenance (method, k, source checkpoint ...), JSON-serialisable.
    """

    pairs: tuple[tuple[int, int], ...]
    stack: str = "backbone"
    d_mlp: int | None = None
    num_layers: int | None = None
    name: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.stack not in STACKS:
            raise InputError(f"unknown stack {self.stack!r}; use one of {STACKS}")
        pairs = tuple(sorted({(int(l), int(n)) for l, n in self.pairs}))
        for layer, neuron in pairs:
            if layer < 0 or neuron < 0:
                raise IndexOutOfRangeError(f"negative index in neuron ({layer}, {neuron})")
            if self.num_layers is not None and layer >= self.num_layers:
                raise IndexOutOfRangeError(f"layer {layer} >= num_layers {self.num_layers} in neuron set {self.name!r}")
            if self.d_mlp is not None and neuron >= self.d_mlp:
                raise IndexOutOfRangeError(f"neuron {neuron} >= d_mlp {self.d_mlp} in neuron set {self.name!r}")
        object.__setattr__(self, "pairs", pairs)

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_flat(cls, indices: Iterable[int], d_mlp: int, **kwargs: Any) -> "NeuronSet":
        """From flat indices ``layer * d_mlp + neuron`` (the authors' YAML format)."""
        if d_mlp <= 0:
            raise InputError("d_mlp must be positive")
        pairs = []
        for index in indices:
            index = int(index)
            if index < 0:
                raise IndexOutOfRangeError(f"negative flat neuron index {index}")
            pairs.append(divmod(index, d_mlp))
        return cls(tuple(pairs), d_mlp=d_mlp, **kwargs)

    @classmethod
    def for_model(cls, vla, pairs: Iterable[Sequence[int]], stack: str = "backbone", **kwargs: Any) -> "NeuronSet":
        """Explicit pairs for ``vla`` (widths filled in and checked)."""
        num_layers, _, d_mlp = vla.stack_dims(stack)
        return cls(tuple((l % num_layers if l < 0 else l, n) for l, n in pairs), stack=stack, d_mlp=d_mlp,
                   num_layers=num_layers, **kwargs)

    # -- views ----------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.pairs)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.pairs)

    def __contains__(self, pair) -> bool:
        return tuple(pair) in set(self.pairs)

    @property
    def layers(self) -> list[int]:
        """The layers that hold at least one neuron, ascending (= execution order)."""
        return sorted({layer for layer, _ in self.pairs})

    def by_layer(self) -> dict[int, list[int]]:
        """{layer: [neurons]} in ascending layer order."""
        grouped: dict[int, list[int]] = defaultdict(list)
        for layer, neuron in self.pairs:
            grouped[layer].append(neuron)
        return dict(sorted(grouped.items()))

    def flat(self, d_mlp: int | None = None) -> list[int]:
        """Flat indices ``layer * d_mlp + neuron``."""
        d_mlp = d_mlp or self.d_mlp
        if d_mlp is None:
            raise InputError("flat indices need d_mlp")
        return [layer * d_mlp + neuron for layer, neuron in self.pairs]

    def restrict(self, layers: Any) -> "NeuronSet":
        """The subset in a layer subset ("early", "late", "all", a list ...)."""
        if self.num_layers is None:
            raise InputError("restricting to a layer subset needs num_layers; build the set with NeuronSet.for_model")
        keep = set(layer_subset(layers, self.num_layers))
        return self._replace(tuple(p for p in self.pairs if p[0] in keep), name=f"{self.name}[{layers}]")

    def _replace(self, pairs, **changes) -> "NeuronSet":
        data = dict(stack=self.stack, d_mlp=self.d_mlp, num_layers=self.num_layers, name=self.name, meta=dict(self.meta))
        data.update(changes)
        return NeuronSet(tuple(pairs), **data)

    def __or__(self, other: "NeuronSet") -> "NeuronSet":
        self._check_compatible(other)
        return self._replace(self.pairs + other.pairs, name=f"{self.name}|{other.name}")

    def _check_compatible(self, other: "NeuronSet") -> None:
        if (self.stack, self.d_mlp, self.num_layers) != (other.stack, other.d_mlp, other.num_layers):
            raise InputError("cannot combine neuron sets made for different stacks or widths")

    # -- checks ---------------------------------------------------------------------------------------------

    def validate(self, vla) -> None:
        """Raise a clear error unless every neuron exists in ``vla``'s stack and the widths match."""
        if not self.pairs:
            raise InputError(f"neuron set {self.name!r} is empty")
        try:
            num_layers, _, d_mlp = vla.stack_dims(self.stack)
        except InputError as error:
            raise InputError(f"neuron set {self.name!r} is for the {self.stack!r} stack: {error}") from None
        if self.d_mlp is not None and self.d_mlp != d_mlp:
            raise InputError(
                f"neuron set {self.name!r} was made for d_mlp={self.d_mlp}, but the {self.stack} stack of this "
                f"{vla.family} model has d_mlp={d_mlp}"
            )
        if self.num_layers is not None and self.num_layers != num_layers:
            raise InputError(
                f"neuron set {self.name!r} was made for {self.num_layers} layers, but the {self.stack} stack of "
                f"this {vla.family} model has {num_layers}"
            )
        bad = [(l, n) for l, n in self.pairs if l >= num_layers or n >= d_mlp]
        if bad:
            raise IndexOutOfRangeError(
                f"neuron set {self.name!r} has neurons outside the {self.stack} stack "
                f"({num_layers} layers x {d_mlp} neurons): {bad[:5]}"
            )

    # -- serialisation --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "name": self.name, "stack": self.stack, "d_mlp": self.d_mlp, "num_layers": self.num_layers,
            "pairs": [list(p) for p in self.pairs], "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "NeuronSet":
        """From :meth:`to_dict`'s format, or the authors' format ``{"neurons": [flat...], "d_mlp": N}``."""
        if "pairs" in data:
            return cls(tuple(tuple(p) for p in data["pairs"]), stack=data.get("stack", "backbone"),
                       d_mlp=data.get("d_mlp"), num_layers=data.get("num_layers"), name=data.get("name", ""),
                       meta=data.get("meta", {}))
        flat_key = next((k for k in ("neurons", "indices", "flat") if k in data), None)
        if flat_key is None or "d_mlp" not in data:
            raise InputError(
                "a neuron set file needs 'pairs' ([[layer, neuron], ...]) or flat indices under 'neurons' with 'd_mlp'"
            )
        return cls.from_flat(data[flat_key], int(data["d_mlp"]), stack=data.get("stack", "backbone"),
                             num_layers=data.get("num_layers"), name=data.get("name", ""))

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (``.json``) or YAML (``.yaml``/``.yml``) atomically (missing parent folders are made)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        else:
            text = json.dumps(self.to_dict(), indent=2) + "\n"
        return files.write_text(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike, d_mlp: int | None = None) -> "NeuronSet":
        """Read a file written by :meth:`save`, or an authors'-style YAML/JSON of flat indices
        (a bare list of ints needs ``d_mlp``)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
        if isinstance(data, list):
            if d_mlp is None:
                raise InputError(f"{path} holds a bare list of flat indices; pass d_mlp= to convert them")
            return cls.from_flat(data, d_mlp, name=path.stem)
        if d_mlp is not None and "pairs" not in data:
            data = {**data, "d_mlp": d_mlp}
        return cls.from_dict(data)

    def __repr__(self) -> str:
        layers = ",".join(map(str, self.layers))
        return f"NeuronSet({self.name!r}, {len(self)} neurons, {self.stack}, layers [{layers}])"


def random_like(reference: NeuronSet, seed: int = 0, exclude: Iterable[tuple[int, int]] = ()) -> NeuronSet:
    """A random control: the same number of neurons per layer as ``reference``, drawn uniformly from each layer
    (never a neuron of ``reference`` or ``exclude``)."""
    if reference.d_mlp is None:
        raise InputError("a random control needs the reference set's d_mlp")
    rng = np.random.default_rng(seed)
    banned = set(reference.pairs) | set(map(tuple, exclude))
    pairs = []
    for layer, neurons in reference.by_layer().items():
        pool = np.array([n for n in range(reference.d_mlp) if (layer, n) not in banned])
        if len(pool) < len(neurons):
            raise InputError(f"layer {layer} has too few free neurons for a random control")
        pairs += [(layer, int(n)) for n in rng.choice(pool, size=len(neurons), replace=False)]
    return reference._replace(tuple(pairs), name=f"random_like({reference.name})",
                              meta={"control": "random", "seed": seed, "reference": reference.name})
