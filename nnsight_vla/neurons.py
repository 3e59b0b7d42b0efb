"""Neuron sets: the (layer, neuron) pairs of one stack that the method steers.

A neuron is an index into ``d_mlp`` of one layer of a named stack ("backbone", or "expert" for pi0's action
expert): its value vector is column ``neuron`` of ``down_proj.weight`` and its activation is
``mlp.act.output[..., neuron]``. Flat indices ``layer * d_mlp + neuron`` (the authors' YAML files) are accepted
on input and converted.

The authors' released files (``dictionaries.yaml``) are read by :meth:`NeuronSet.load` with ``key=`` and
``d_mlp=``: ``{name: {flat: [top tokens]}}`` (OpenVLA, d_mlp 11008) or ``{name: [flat, ...]}`` (pi0-FAST,
d_mlp 16384); :meth:`NeuronSet.save_authors` writes our sets in the same format. Layer subsets: see
:func:`layer_subset`.
"""

from __future__ import annotations

import json
import numbers
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from . import files
from .errors import IndexOutOfRangeError, InputError

STACKS = ("backbone", "expert")
#: keys under which a single-set file holds flat indices (with ``d_mlp``)
_FLAT_KEYS = ("neurons", "indices", "flat")
#: what an error about flat indices says about the widths
_WIDTHS = "the MLP width, e.g. vla.d_mlp; 11008 for OpenVLA-7B, 16384 for pi0-FAST"


def layer_subset(spec: Any, num_layers: int) -> list[int]:
    """The sorted layers ``spec`` names in a stack of ``num_layers``: ``"all"``; ``"early"`` = first half
    ``0..n//2-1``; ``"late"`` = second half ``n//2..n-1`` (OpenVLA 16..31, pi0-FAST 9..17); ``"first:K"`` /
    ``"last:K"``; or a list of layers (negative count from the end).

    The authors' code has no layer-subset option: a set's layers are the ones its hand-picked neurons sit in
    (their OpenVLA files use layers 15..31). So ``"late"`` is not their split: their ``up_20`` has one neuron
    in layer 15 and keeps 19 of 20 under ``"late"``; steer their sets with ``"all"`` to reproduce a run."""
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
        data = dict(stack=self.stack, d_mlp=self.d_mlp, num_layers=self.num_layers, name=self.name,
                    meta=dict(self.meta))
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
        """From :meth:`to_dict`'s format, flat indices ``{"neurons": [flat...], "d_mlp": N}``, or a reference to a
        file ``{"file": PATH, "key": ENTRY, "d_mlp": N[, "num_layers": L]}`` (e.g. the authors'
        ``dictionaries.yaml`` in a conditions file; read by :meth:`load`)."""
        if not isinstance(data, Mapping):
            raise InputError(f"a neuron set description is a mapping, got {type(data).__name__}")
        if "file" in data and "pairs" not in data:
            return cls.load(data["file"], d_mlp=data.get("d_mlp"), key=data.get("key"),
                            stack=data.get("stack", "backbone"), num_layers=data.get("num_layers"))
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
    def load(cls, path: str | os.PathLike, d_mlp: int | None = None, *, key: str | None = None,
             stack: str = "backbone", num_layers: int | None = None) -> "NeuronSet":
        """Read a neuron file: :meth:`save`'s format, flat indices under ``neurons`` (with ``d_mlp``), a bare list of
        flat indices, or the authors' ``dictionaries.yaml``: ``{name: {flat: [top tokens]}}`` (OpenVLA) or
        ``{name: [flat, ...]}`` (pi0-FAST). Pick an entry with ``key=`` (or ``"FILE#KEY"``); flat indices
        ``layer * d_mlp + neuron`` need ``d_mlp=``. ``stack`` / ``num_layers`` label sets read from flat indices."""
        path, key = _split_key(Path(path), key)
        data = _read_neuron_file(path)
        if isinstance(data, Mapping) and ("pairs" in data or any(k in data for k in _FLAT_KEYS)):
            if key is not None:
                raise InputError(f"{path} holds a single neuron set; key={key!r} only selects an entry of a "
                                 "dictionaries file")
            if d_mlp is not None and "pairs" not in data:
                data = {**data, "d_mlp": d_mlp}
            if "pairs" not in data and "d_mlp" not in data:
                raise InputError(f"{path} holds flat neuron indices without d_mlp; pass d_mlp= ({_WIDTHS})")
            if "pairs" not in data:
                data = {"stack": stack, "num_layers": num_layers, "name": path.stem, **data}
            return cls.from_dict(data)
        if isinstance(data, list):
            if d_mlp is None:
                raise InputError(f"{path} holds a bare list of flat indices; pass d_mlp= ({_WIDTHS})")
            return cls.from_flat(_flat_ints(data, path.stem, path), int(d_mlp), stack=stack, num_layers=num_layers,
                                 name=path.stem, meta={"source": str(path)})
        if not isinstance(data, Mapping) or not data:
            raise InputError(f"{path} is not a neuron file (expected pairs, flat indices or named dictionaries)")
        if key is None and all(_is_int(k) for k in data):  # a single {flat: tokens} mapping
            entry, name = data, path.stem
        else:
            entries = [str(k) for k in data]
            if key is None:
                filled = [str(k) for k, v in data.items() if v]
                if len(filled) != 1:
                    raise InputError(f"{path} holds several neuron dictionaries (the authors' format); pick one with "
                                     f"key= or FILE#KEY (one of {filled})")
                key = filled[0]
            matches = [k for k in data if str(k) == str(key)]
            if not matches:
                raise InputError(f"{path} has no entry {key!r}; entries: {entries}")
            entry, name = data[matches[0]], str(key)
        if not entry:
            raise InputError(f"neuron dictionary {name!r} in {path} is empty (the authors' no-op entry, like "
                             "'blank'; for no intervention use the baseline condition)")
        if not isinstance(entry, (Mapping, list, tuple)):
            raise InputError(f"entry {name!r} of {path} must map flat neuron indices to tokens, or list flat indices")
        flat = _flat_ints(list(entry), name, path)
        if d_mlp is None:
            raise InputError(f"entry {name!r} of {path} holds flat indices (layer * d_mlp + neuron); pass d_mlp= "
                             f"({_WIDTHS})")
        meta: dict = {"source": str(path), "key": name}
        if isinstance(entry, Mapping):
            meta["tokens"] = {str(k): list(v) if isinstance(v, (list, tuple)) else v for k, v in entry.items()}
        return cls.from_flat(flat, int(d_mlp), stack=stack, num_layers=num_layers, name=name, meta=meta)

    # -- the authors' format ----------------------------------------------------------------------------------

    def to_authors(self, tokens: Mapping | Callable | None = None, *, as_list: bool = False) -> dict | list:
        """This set as one entry of the authors' ``dictionaries.yaml``: ``{flat: [top tokens]}`` (their OpenVLA
        layout) or, with ``as_list``, ``[flat, ...]`` (their pi0-FAST layout). ``tokens``: ``{(layer, neuron):
        [...]}`` or a function of (layer, neuron); default: the lens tokens in ``meta`` (find_concept's scores,
        or an imported entry's tokens), else ``[]``."""
        flat = self.flat()
        if as_list:
            return flat
        lookup = _token_lookup(self, tokens)
        return {index: [str(t) for t in lookup(layer, neuron)] for index, (layer, neuron) in zip(flat, self.pairs)}

    def save_authors(self, path: str | os.PathLike, name: str | None = None, *,
                     tokens: Mapping | Callable | None = None, as_list: bool = False) -> Path:
        """Write this set as entry ``name`` (default: its name) of an authors'-format dictionaries file (YAML, or
        JSON by suffix), keeping the file's other entries; see :meth:`to_authors`. Read back with
        ``NeuronSet.load(path, key=name, d_mlp=...)``, and by the authors' own loader."""
        path = Path(path)
        name = str(name or self.name or "").strip()
        if not name:
            raise InputError("an entry of a dictionaries file needs a name: pass name=")
        if self.d_mlp is None:
            raise InputError(f"neuron set {self.name!r} has no d_mlp: flat indices cannot be written")
        yaml_file = path.suffix in (".yaml", ".yml")
        if not yaml_file and path.suffix != ".json":
            raise InputError(f"a dictionaries file ends in .yaml or .json, got {path.name}")
        entries: dict = {}
        if path.exists():
            entries = _read_neuron_file(path) or {}
            if not isinstance(entries, Mapping) or "pairs" in entries or not all(
                    isinstance(v, (Mapping, list, tuple)) or v is None for v in entries.values()):
                raise InputError(f"{path} exists and is not a dictionaries file ({{name: {{flat: tokens}}}}); "
                                 "refusing to overwrite it")
            entries = dict(entries)
        entries[name] = self.to_authors(tokens, as_list=as_list)
        path.parent.mkdir(parents=True, exist_ok=True)
        if yaml_file:
            import yaml

            text = yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, default_flow_style=None, width=1 << 20)
        else:
            text = json.dumps(entries, indent=1, ensure_ascii=False) + "\n"
        return files.write_text(path, text)

    def __repr__(self) -> str:
        layers = ",".join(map(str, self.layers))
        return f"NeuronSet({self.name!r}, {len(self)} neurons, {self.stack}, layers [{layers}])"


def _split_key(path: Path, key: str | None) -> tuple[Path, str | None]:
    """``FILE#KEY`` -> (FILE, KEY) when FILE exists and the whole name does not."""
    name = str(path)
    if "#" in name and not path.exists():
        file, _, inline = name.rpartition("#")
        if key is not None and key != inline:
            raise InputError(f"two keys for {file}: {inline!r} in the path and key={key!r}")
        return Path(file), inline
    return path, key


def _read_neuron_file(path: Path) -> Any:
    if not path.is_file():
        raise InputError(f"neuron file {path} does not exist")
    try:
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except Exception as error:  # noqa: BLE001 - any parse error is a bad file
        raise InputError(f"could not parse neuron file {path}: {error}") from None


def _is_int(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, np.integer)):
        return True
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _flat_ints(values: list, name: str, path: Path) -> list[int]:
    bad = [v for v in values if not _is_int(v)]
    if bad:
        raise InputError(f"entry {name!r} of {path} must hold flat neuron indices (ints); got {bad[:3]}")
    return [int(v) for v in values]


def _token_lookup(neurons: NeuronSet, tokens: Mapping | Callable | None) -> Callable[[int, int], list]:
    if callable(tokens):
        return lambda layer, neuron: list(tokens(layer, neuron))
    if tokens is not None:
        table = {tuple(map(int, k)): v for k, v in tokens.items()}
        return lambda layer, neuron: list(table.get((layer, neuron), []))
    table = {(int(s["layer"]), int(s["neuron"])): s.get("tokens", []) for s in neurons.meta.get("scores", [])
             if isinstance(s, Mapping) and "layer" in s and "neuron" in s}
    imported = neurons.meta.get("tokens") if isinstance(neurons.meta.get("tokens"), Mapping) else {}
    for index, words in imported.items():
        if _is_int(index) and neurons.d_mlp:
            table.setdefault(divmod(int(index), neurons.d_mlp), words)
    return lambda layer, neuron: list(table.get((layer, neuron), []) or [])


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


# ---------------------------------------------------------------------------------------------------------------
# neuron files and the forms a set is given in


def load_neurons(path: str | os.PathLike, key: str | None = None, d_mlp: int | None = None,
                 stack: str = "backbone") -> NeuronSet:
    """Read a neuron set from a YAML/JSON file (:meth:`NeuronSet.load`), checked to be for ``stack``.

    Accepted layouts: :meth:`NeuronSet.save`'s (``pairs``); flat indices under ``neurons`` with ``d_mlp``; a bare
    list of flat indices ``layer * d_mlp + i``; the authors' dictionaries ``{name: {flat_index: [top tokens]}}``
    (OpenVLA) or ``{name: [flat, ...]}`` (pi0-FAST), one entry picked with ``key=`` (optional when the file holds
    one non-empty entry). Flat indices need ``d_mlp=`` (11008 for OpenVLA-7B, 16384 for pi0-FAST).
    """
    neurons = NeuronSet.load(path, d_mlp=d_mlp, key=key, stack=stack)
    if neurons.stack != stack:
        _stack_mismatch(neurons, stack, f"the set in {path}")
    return neurons


def export_neurons(neurons: Any, path: str | os.PathLike, name: str | None = None, *, lens: Any = None,
                   k: int | None = None, as_list: bool = False) -> Path:
    """Write a neuron set (or a :class:`Steering`'s) as entry ``name`` of an authors'-format ``dictionaries.yaml``
    (``{name: {flat: [top tokens]}}``; other entries kept). Tokens: each vector's top-``k`` from ``lens`` (a
    :class:`~nnsight_vla.lens.ValueVectorLens` of the same model) when given, else the lens tokens in the set's
    meta. ``as_list``: the pi0-FAST layout ``{name: [flat, ...]}``."""
    neurons = getattr(neurons, "neurons", neurons)
    if not isinstance(neurons, NeuronSet):
        raise InputError(f"export_neurons needs a NeuronSet or a Steering, got {type(neurons).__name__}")
    tokens = None
    if lens is not None:
        if (lens.d_mlp, lens.stack) != (neurons.d_mlp, neurons.stack):
            raise InputError(f"the lens is of a {lens.stack} stack with d_mlp={lens.d_mlp}; the set "
                             f"{neurons.name!r} is for the {neurons.stack} stack with d_mlp={neurons.d_mlp}")
        tokens = lambda layer, neuron: lens.vector_tokens(layer, neuron, k)  # noqa: E731
    return neurons.save_authors(path, name, tokens=tokens, as_list=as_list)


def _stack_mismatch(neurons: NeuronSet, stack: str, what: str) -> None:
    raise InputError(
        f"{what} is for the {neurons.stack!r} stack, but stack={stack!r} was asked for; a set made for one stack "
        "cannot steer another (build one Steering per stack, and combine them with SteeringGroup)"
    )


def as_neuron_set(neurons: Any, stack: str | None = None, key: str | None = None,
                  d_mlp: int | None = None) -> NeuronSet:
    """What a :class:`~nnsight_vla.steering.Steering` accepts as its neurons, as a :class:`NeuronSet` of
    ``stack``: a set, a file (:func:`load_neurons`), a dict of :meth:`NeuronSet.to_dict`'s form, or (layer,
    neuron) pairs."""
    if isinstance(neurons, NeuronSet):
        if stack is not None and stack != neurons.stack:
            _stack_mismatch(neurons, stack, f"neuron set {neurons.name!r}")
        if d_mlp is not None and neurons.d_mlp is not None and int(d_mlp) != neurons.d_mlp:
            raise InputError(f"neuron set {neurons.name!r} was made for d_mlp={neurons.d_mlp}, not {d_mlp}")
        return neurons
    stack = stack or "backbone"
    if stack not in STACKS:
        raise InputError(f"unknown stack {stack!r}; use one of {STACKS}")
    if isinstance(neurons, (str, os.PathLike)):
        return load_neurons(neurons, key=key, d_mlp=d_mlp, stack=stack)
    if isinstance(neurons, Mapping):
        data = dict(neurons)
        if "pairs" not in data and d_mlp is not None:
            data.setdefault("d_mlp", d_mlp)
        result = NeuronSet.from_dict(data)
        if result.stack != stack:
            _stack_mismatch(result, stack, "the neuron set")
        return result
    if isinstance(neurons, Iterable):
        pairs = []
        for item in neurons:
            try:
                layer, neuron = item
            except (TypeError, ValueError):
                raise InputError(
                    f"neurons must be (layer, neuron) pairs, a NeuronSet or a file path; got the item {item!r}"
                ) from None
            if not (_is_index(layer) and _is_index(neuron)):
                raise InputError(f"a neuron is a pair of ints (layer, neuron), got {item!r}")
            pairs.append((int(layer), int(neuron)))
        return NeuronSet(tuple(pairs), stack=stack, d_mlp=None if d_mlp is None else int(d_mlp))
    raise InputError(f"neurons must be a NeuronSet, (layer, neuron) pairs or a file path, got {type(neurons).__name__}")


def _is_index(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # not a digit string, unlike _is_int
