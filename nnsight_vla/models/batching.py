"""Batches of observations: a list in one call, or several nnsight invokes, run as one batched forward.

A batch is a list of instructions with one images entry (and one state) per instruction; element i of the
result equals the single call on observation i. :func:`combine_invokes` turns ``tracer.invoke(...)`` inputs
into such a batch, :class:`VLABatcher` scopes ``tracer.result``'s numpy rows to an invoke, and the padding
helpers lay prompts of different lengths out so every row's last token sits at the same index. nnsight scopes
a tensor to an invoke only when its first axis is the batch: pi0 / pi0-FAST vision towers see one row per
camera image, so an edit there inside one invoke reaches every invoke (edit vision towers in a one-invoke trace).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from nnsight.intervention.batching import Batcher

from ..errors import InputError

#: how a raw observation is passed: ``(images, instruction, state=None, **options)``
_SIGNATURE = inspect.Signature([
    inspect.Parameter("images", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("instruction", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("state", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
    inspect.Parameter("options", inspect.Parameter.VAR_KEYWORD),
])
USAGE = (
    "pass an observation, (images, instruction[, state]) -- e.g. vla.trace(image, 'pick up the bowl') -- or a batch "
    "(a list of instructions with a list of images entries), or the model's own tensors (input_ids=..., ...)"
)


@dataclass
class Observation:
    """One element of a batch: its camera image(s), instruction, state and per-element options (pi0's seed)."""

    images: Any
    instruction: Any
    state: Any = None
    options: dict = field(default_factory=dict)


def is_batch(instruction: Any) -> bool:
    """A list (or tuple) of instructions marks a batch; a string is one observation."""
    return isinstance(instruction, (list, tuple))


def _rows(value: Any, n: int, name: str) -> list:
    """``value`` split into its ``n`` per-observation entries (a list, a tuple, an array with leading axis n)."""
    if isinstance(value, Mapping):  # {camera: n images} -> n {camera: image}
        columns = {key: _rows(column, n, f"{name}[{key!r}]") for key, column in value.items()}
        return [{key: column[i] for key, column in columns.items()} for i in range(n)]
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0:
        value = list(value)
    if not isinstance(value, (list, tuple)):
        raise InputError(f"a batch of {n} instructions needs a list of {n} {name}, got {type(value).__name__}")
    if len(value) != n:
        raise InputError(f"a batch of {n} instructions needs {n} {name}, got {len(value)} (the lists must match)")
    return list(value)


def _option_rows(name: str, value: Any, n: int, single_ndim: int) -> list:
    """A per-element option for a batch: one value for every element, or one per element."""
    if value is None:
        return [None] * n
    if isinstance(value, (list, tuple)) or np.ndim(value) == single_ndim + 1:
        return _rows(value, n, f"{name} values")
    return [value] * n


def split(images: Any, instruction: Any, state: Any = None, options: Mapping | None = None,
          option_ndims: Mapping[str, int] | None = None) -> tuple[list[Observation], bool]:
    """(observations, batched) for a call's inputs; ``options`` are the per-element ones (``option_ndims``)."""
    options = dict(options or {})
    if not is_batch(instruction):
        return [Observation(images, instruction, state, options)], False
    n = len(instruction)
    if n == 0:
        raise InputError("empty batch: pass a list of at least one instruction, with one images entry each")
    images = _rows(images, n, "images entries")
    if state is None:
        states = [None] * n
    else:
        states = _rows(state, n, "states")
        if any(s is not None and np.ndim(s) == 0 for s in states):
            raise InputError("a batch's state must be one state vector per observation (a list of vectors, or a "
                             "(batch, state_dim) array), not a single vector")
    ndims = option_ndims or {}
    columns = {key: _option_rows(key, value, n, ndims.get(key, 0)) for key, value in options.items()}
    observations = [
        Observation(images[i], instruction[i], states[i], {key: column[i] for key, column in columns.items()})
        for i in range(n)
    ]
    return observations, True


def bind(args: Sequence, kwargs: Mapping) -> tuple[Any, Any, Any, dict]:
    """(images, instruction, state, options) of a raw observation call, or an InputError saying how to call."""
    try:
        bound = _SIGNATURE.bind(*args, **kwargs)
    except TypeError as error:
        raise InputError(f"{error}: {USAGE}") from None
    values = bound.arguments
    return values["images"], values["instruction"], values.get("state"), dict(values.get("options", {}))


def is_raw(args: Sequence, kwargs: Mapping) -> bool:
    """Whether a call carries raw observations (images, instruction) rather than model tensors."""
    return bool(args and not isinstance(args[0], torch.Tensor)) or "images" in kwargs or "instruction" in kwargs


def batch_size(args: Sequence, kwargs: Mapping) -> int:
    """Rows one call or invoke contributes: the instructions of raw observations, else the tensors' leading size."""
    if is_raw(args, kwargs):
        _, instruction, _, _ = bind(args, kwargs)
        if is_batch(instruction):
            if not instruction:
                raise InputError("empty batch: pass a list of at least one instruction, with one images entry each")
            return len(instruction)
        return 1
    tensor = kwargs.get("input_ids")
    if not isinstance(tensor, torch.Tensor):
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
        tensor = tensors[0] if tensors else None
    if tensor is None:
        return 1 if args else 0
    return int(tensor.shape[0]) if tensor.dim() else 1


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.array_equal(a, b)) if isinstance(a, (np.ndarray, torch.Tensor)) else bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are not the same
        return False


def combine_invokes(invokes: Sequence[tuple], option_ndims: Mapping[str, int]) -> tuple[list[Observation], dict]:
    """Several invokes' raw observations -> (one list of observations, the options they share).

    Per-element options (``option_ndims``, e.g. pi0's ``seed``) may differ between invokes; any other option
    (``unnorm_key``, ``num_steps``...) must be the same in every invoke, since one batched run serves them all.
    """
    observations: list[Observation] = []
    shared: dict | None = None
    for args, kwargs in invokes:
        if not is_raw(args, kwargs):
            raise InputError("cannot batch model tensors with raw observations in one trace; " + USAGE)
        images, instruction, state, options = bind(args, kwargs)
        per = {key: options.pop(key) for key in list(options) if key in option_ndims}
        observations += split(images, instruction, state, per, option_ndims)[0]
        if shared is None:
            shared = options
        elif set(shared) != set(options) or not all(_same(shared[k], options[k]) for k in shared):
            raise InputError(
                f"the invokes of one trace run as one batch and must share their options; got {shared} and {options}"
            )
    return observations, shared or {}


def as_call(observations: Sequence[Observation], option_ndims: Mapping[str, int]) -> tuple[tuple, dict]:
    """Observations back as one batched call's ``(args, kwargs)``: lists of images, instructions, states."""
    kwargs: dict = {"state": [o.state for o in observations]}
    for key in option_ndims:
        if any(key in o.options for o in observations):
            kwargs[key] = [o.options.get(key) for o in observations]
    return ([o.images for o in observations], [o.instruction for o in observations]), kwargs


def concat_tensor_invokes(invokes: Sequence[tuple]) -> tuple[tuple, dict]:
    """Invokes of model tensors, concatenated along the batch axis (their shapes must agree beyond it)."""
    (args0, kwargs0) = invokes[0]
    if any(len(args) != len(args0) or set(kwargs) != set(kwargs0) for args, kwargs in invokes):
        raise InputError("invokes of model tensors must all pass the same arguments")

    def join(values: list, name: str) -> Any:
        if isinstance(values[0], torch.Tensor):
            if any(v.shape[1:] != values[0].shape[1:] for v in values):
                raise InputError(
                    f"cannot batch {name} of shapes {[tuple(v.shape) for v in values]}: raw tensors are not padded; "
                    "invoke with observations instead (tracer.invoke(image, instruction)), which pads prompts"
                )
            return torch.cat(values, dim=0)
        if not all(_same(values[0], v) for v in values):
            raise InputError(f"invokes disagree on {name}: {values}")
        return values[0]

    args = tuple(join([a[i] for a, _ in invokes], f"argument {i}") for i in range(len(args0)))
    kwargs = {key: join([k[key] for _, k in invokes], key) for key in kwargs0}
    return args, kwargs


class VLABatcher(Batcher):
    """nnsight's batcher, which also gives each invoke its rows of a numpy result (``tracer.result``)."""

    def narrow(self, value: Any, group: Any) -> Any:
        if self.batching and group is not None and isinstance(value, np.ndarray) and value.ndim:
            if value.shape[0] == self.total:
                start, size = group
                return value[start:start + size]
        return super().narrow(value, group)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token rows as one (B, T) tensor and its attention mask (None when no row needed padding).

    ``side``: "left", "right", or "after_first" (the padding goes after each row's first token: OpenVLA splices
    its image patches after ``<s>``, so the padding then sits between the patches and the text).
    """
    length = max(len(row) for row in rows)
    if all(len(row) == length for row in rows):
        return torch.tensor([list(row) for row in rows], dtype=torch.long), None
    ids, mask = [], []
    for row in rows:
        row, pad = list(row), length - len(row)
        if side == "left":
            ids.append([pad_id] * pad + row)
            mask.append([0] * pad + [1] * len(row))
        elif side == "right":
            ids.append(row + [pad_id] * pad)
            mask.append([1] * len(row) + [0] * pad)
        else:
            ids.append(row[:1] + [pad_id] * pad + row[1:])
            mask.append([1] + [0] * pad + [1] * (len(row) - 1))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def positions_from_mask(mask: torch.Tensor, start: int = 0) -> torch.Tensor:
    """Position ids that skip padding: ``cumsum(mask) - 1 + start`` (padding keeps its neighbour's position)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0) + start
