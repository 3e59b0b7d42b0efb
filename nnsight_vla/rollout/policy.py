"""What a policy must offer a rollout, how workers build one, and how a condition is applied around its calls.

Any object with the :class:`Policy` surface can be rolled out: an nnsight-vla model, a scripted policy, a
client of a policy server. :class:`PolicySpec` is the picklable recipe worker processes build a policy from
(and the policy's identity in a results manifest).
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import asdict, dataclass
from typing import Any, ContextManager, Mapping, Protocol, runtime_checkable

import numpy as np

from ..errors import InputError


@runtime_checkable
class Policy(Protocol):
    """The surface a rollout uses. ``predict_action`` returns one action ``(action_dim,)`` or a chunk
    ``(horizon, action_dim)``; ``camera_names`` are the images it takes (a mapping ``{camera: HxWx3 uint8}``),
    ``state_dim`` the robot state's size (None: no state)."""

    family: str
    camera_names: tuple[str, ...]
    action_dim: int

    def predict_action(self, images: Any, instruction: str, state: Any = None, **kwargs: Any) -> np.ndarray: ...


@dataclass(frozen=True)
class PolicySurface:
    """A policy's surface as plain data (what environments check their inputs and outputs against)."""

    family: str
    camera_names: tuple[str, ...]
    state_dim: int | None
    action_dim: int
    action_horizon: int | None
    image_size: Any = None
    norm_keys: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def policy_surface(policy: Any) -> PolicySurface:
    """The :class:`PolicySurface` of a policy object, with a clear error for an object that is not one."""
    if isinstance(policy, PolicySurface):
        return policy
    missing = [a for a in ("family", "camera_names", "action_dim", "predict_action") if not hasattr(policy, a)]
    if missing:
        raise InputError(
            f"{type(policy).__name__} is not a VLA policy: it lacks {', '.join(missing)} (a policy has family, "
            "camera_names, state_dim, action_dim, action_horizon and predict_action(images, instruction, state))"
        )
    horizon = getattr(policy, "action_horizon", 1)
    if horizon is not None and (isinstance(horizon, bool) or int(horizon) < 1):
        raise InputError(f"{type(policy).__name__}.action_horizon must be a positive number of actions per call "
                         f"(or None when it varies), got {horizon!r}")
    state_dim = getattr(policy, "state_dim", None)
    image_size = getattr(policy, "image_size", None) or getattr(getattr(policy, "image_processor", None),
                                                                 "image_size", None)
    return PolicySurface(
        family=str(policy.family), camera_names=tuple(policy.camera_names),
        state_dim=None if state_dim is None else int(state_dim), action_dim=int(policy.action_dim),
        action_horizon=None if horizon is None else int(horizon),
        image_size=tuple(image_size) if isinstance(image_size, (list, tuple)) else image_size,
        norm_keys=_norm_keys(policy),
    )


def _norm_keys(policy: Any) -> tuple[str, ...] | None:
    """Dataset keys of an OpenVLA-style policy's action statistics (None when it has none)."""
    for holder in (policy, getattr(policy, "bins", None), getattr(policy, "config", None)):
        stats = getattr(holder, "norm_stats", None) if holder is not None else None
        if isinstance(stats, Mapping) and stats:
            return tuple(sorted(stats))
    return None


def condition_context(policy: Any, condition: Any) -> ContextManager:
    """The context a policy's calls run in under ``condition``: the condition's steering applied to the model,
    or, for a policy-server client, the server applying it around each call."""
    if hasattr(policy, "condition_context"):
        return policy.condition_context(condition)
    return condition.context(policy) if condition is not None else contextlib.nullcontext()


KINDS = ("tiny", "load", "factory")


@dataclass(frozen=True)
class PolicySpec:
    """How a worker process builds the policy (picklable; also the policy's identity in the results).

    kind: "tiny" (``nnsight_vla.tiny(family, seed=seed)``), "load" (``nnsight_vla.load(family, source)``) or
    "factory" (``factory="module:function"`` called with ``options``, e.g. an environment's scripted policy)."""

    kind: str
    family: str
    source: str | None = None
    seed: int = 0
    factory: str | None = None
    options: tuple = ()  # sorted (key, value) pairs; hashable and picklable

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"PolicySpec kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "load" and not self.source:
            raise InputError("PolicySpec(kind='load') needs source (a checkpoint folder or hub id)")
        if self.kind == "factory" and (not self.factory or ":" not in self.factory):
            raise InputError("PolicySpec(kind='factory') needs factory='package.module:function'")
        if isinstance(self.options, Mapping):
            object.__setattr__(self, "options", tuple(sorted(self.options.items())))

    @classmethod
    def from_factory(cls, factory: str, family: str, /, **options: Any) -> "PolicySpec":
        return cls("factory", family, factory=factory, options=tuple(sorted(options.items())))

    def build(self) -> Any:
        options = dict(self.options)
        if self.kind == "factory":
            module, _, name = self.factory.partition(":")
            return getattr(importlib.import_module(module), name)(**options)
        from .. import models

        if self.kind == "tiny":
            return models.tiny(self.family, seed=self.seed, **options)
        return models.load(self.family, self.source, **options)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "family": self.family, "source": self.source, "seed": self.seed,
                "factory": self.factory, "options": {k: v for k, v in self.options}}

    def identity(self) -> dict:
        """The identity of the model this spec builds, equal to that model's own (so a results folder does not
        depend on the executor: a sweep run in-process can be resumed with worker processes and back). A
        checkpoint is opened on the meta device for it (config and tokenizer only, no weights)."""
        if self.kind == "factory":
            return self.to_dict()
        options = {k: v for k, v in self.options if k != "dispatch"}
        return policy_identity(PolicySpec(self.kind, self.family, self.source, self.seed, options=options).build())


def policy_identity(policy: Any) -> dict:
    """What identifies a policy in a results manifest (never memory addresses)."""
    if callable(getattr(policy, "identity", None)):
        return dict(policy.identity())
    if callable(getattr(policy, "to_dict", None)) and not hasattr(policy, "model_key"):
        return dict(policy.to_dict())
    out = {"class": f"{type(policy).__module__}.{type(policy).__qualname__}", "family": getattr(policy, "family", None)}
    key = getattr(policy, "model_key", None)
    if isinstance(key, str):
        out["model_key"] = key
    return out
