"""Experimental conditions compared in one sweep: baseline, steered, random-neuron control, prompt baseline.

A :class:`Condition` is what varies between episodes that are otherwise identical (same task, same initial
state, same seed). Runners (LIBERO, UR5) only use three things from it: the instruction it gives the policy
(:meth:`Condition.instruction`), the context it runs the policy in (:meth:`Condition.context`, e.g. a
``Steering.apply(vla)`` that overwrites neuron activations) and a JSON description (:meth:`Condition.to_dict`)
stored with every episode.

Steering objects are opaque here: anything with ``.apply(vla)`` (a context manager) and ``.to_dict()``.
The grid helpers build them through a factory the caller passes (by default ``nnsight_vla.Steering``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import VLAError
from ..errors import ConditionError  # noqa: F401 (re-exported)

#: the condition kinds the grid helpers produce (``kind`` is free text for hand-made conditions)
KINDS = ("baseline", "steered", "control", "prompt")

_SLUG_BAD = re.compile(r"[^A-Za-z0-9._@+=-]+")


@dataclass(frozen=True)
class Condition:
    """One experimental condition.

    Args:
        name: unique, human-readable name, e.g. ``"baseline"``, ``"fast@a10/late"``, ``"random@a10/late"``,
            ``"prompt:fast"``. Used as the key of every episode in the results store.
        steering: ``None`` or an object with ``apply(vla)`` (context manager) and ``to_dict()``.
        prompt: ``None`` (use the task instruction) or a template containing ``{instruction}``, e.g.
            ``"{instruction} fast"``.
        kind: "baseline" | "steered" | "control" | "prompt" (set by the grid helpers; plots group by it).
        concept, alpha, layers: what a steered/control condition steers (for plots: alpha-sweep curves and
            early/late/all bars). Optional, purely descriptive.
    """

    name: str
    steering: Any = None
    prompt: str | None = None
    kind: str = ""
    concept: str | None = None
    alpha: float | None = None
    layers: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConditionError(f"a condition needs a non-empty name, got {self.name!r}")
        if self.steering is not None:
            missing = [m for m in ("apply", "to_dict") if not callable(getattr(self.steering, m, None))]
            if missing:
                raise ConditionError(
                    f"condition {self.name!r}: steering must have .apply(vla) and .to_dict(); "
                    f"{type(self.steering).__name__} lacks {', '.join(missing)}"
                )
        if self.prompt is not None:
            if not isinstance(self.prompt, str) or "{instruction}" not in self.prompt:
                raise ConditionError(
                    f"condition {self.name!r}: prompt must be a template containing '{{instruction}}', "
                    f"e.g. '{{instruction}} fast'; got {self.prompt!r}"
                )
            try:
                self.prompt.format(instruction="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ConditionError(
                    f"condition {self.name!r}: prompt {self.prompt!r} is not a valid template "
                    f"(only the field {{instruction}} is allowed; write literal braces as {{{{ }}}}): {exc}"
                ) from None
        if self.alpha is not None and not math.isfinite(float(self.alpha)):
            raise ConditionError(f"condition {self.name!r}: alpha must be finite, got {self.alpha!r}")
        if not self.kind:
            inferred = "steered" if self.steering is not None else "prompt" if self.prompt else "baseline"
            object.__setattr__(self, "kind", inferred)

    def instruction(self, text: str) -> str:
        """The instruction the policy sees under this condition."""
        return text if self.prompt is None else self.prompt.format(instruction=text)

    def context(self, vla: Any):
        """The context to run the policy in: ``steering.apply(vla)``, or a no-op context."""
        return contextlib.nullcontext() if self.steering is None else self.steering.apply(vla)

    def to_dict(self) -> dict:
        """JSON-able description (stored with every episode; two conditions with equal dicts are the same)."""
        steering = None
        if self.steering is not None:
            steering = self.steering.to_dict()
            try:
                json.dumps(steering)
            except TypeError as exc:
                raise ConditionError(
                    f"condition {self.name!r}: steering.to_dict() must return JSON-able data: {exc}"
                ) from None
        return {
            "name": self.name,
            "kind": self.kind,
            "prompt": self.prompt,
            "concept": self.concept,
            "alpha": None if self.alpha is None else float(self.alpha),
            "layers": self.layers,
            "steering": steering,
        }

    @property
    def slug(self) -> str:
        """A file-name-safe, collision-free identifier derived from the name (names may contain '/', ':')."""
        return condition_slug(self.name)


def condition_slug(name: str) -> str:
    """File-name-safe id of a condition name: readable part + 8 hex digits of the name's hash."""
    readable = _SLUG_BAD.sub("-", name).strip("-.")[:48] or "condition"
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    return f"{readable}-{digest}"


def _fmt_alpha(alpha: float) -> str:
    return f"{float(alpha):g}"


# -- building blocks ---------------------------------------------------------------------------------------------


def baseline(name: str = "baseline") -> Condition:
    """No intervention, the task's own instruction."""
    return Condition(name, kind="baseline")


def prompt_baseline(word: str, template: str = "{instruction} {word}", name: str | None = None) -> Condition:
    """The concept word added to the instruction (the paper's prompt baseline), e.g. ``"{instruction} fast"``."""
    if not isinstance(word, str) or not word.strip():
        raise ConditionError(f"prompt_baseline needs a non-empty word, got {word!r}")
    if "{instruction}" not in template:
        raise ConditionError(f"prompt template must contain '{{instruction}}', got {template!r}")
    prompt = template.replace("{word}", word)
    return Condition(name or f"prompt:{word}", prompt=prompt, kind="prompt", concept=word)


def steered(
    concept: str,
    steering: Any,
    *,
    alpha: float | None = None,
    layers: str | None = None,
    kind: str = "steered",
    name: str | None = None,
) -> Condition:
    """A steered condition named ``{concept}@a{alpha}/{layers}`` (or ``name``)."""
    if name is None:
        name = concept
        if alpha is not None:
            name += f"@a{_fmt_alpha(alpha)}"
        if layers is not None:
            name += f"/{layers}"
    return Condition(name, steering=steering, kind=kind, concept=concept, alpha=alpha, layers=layers)


def default_steering_factory(neurons: Any, alpha: float, layers: str) -> Any:
    """``nnsight_vla.Steering(neurons, alpha=alpha, layers=layers)`` (imported lazily)."""
    try:
        from ..steering import Steering  # type: ignore[import-not-found]
    except ImportError as exc:  # pragma: no cover - depends on the steering module landing
        raise ConditionError(
            "nnsight_vla.steering.Steering is not available; pass make_steering=callable(neurons, alpha, layers)"
            f" to sweep_grid ({exc})"
        ) from None
    return Steering(neurons, alpha=alpha, layers=layers)


def sweep_grid(
    concepts: Mapping[str, Any] | None = None,
    alphas: Sequence[float] = (10.0,),
    layers: Sequence[str] = ("all",),
    *,
    controls: Mapping[str, Any] | None = None,
    prompts: Mapping[str, str] | Iterable[str] | None = None,
    include_baseline: bool = True,
    make_steering: Callable[[Any, float, str], Any] | None = None,
) -> list[Condition]:
    """The paper's sweep as a list of conditions.

    Args:
        concepts: ``{concept name: neuron set}``; each gets one steered condition per alpha x layer subset,
            named ``"{concept}@a{alpha}/{layers}"``.
        alphas: activation values written into the neurons.
        layers: layer subsets, e.g. ``("early", "late", "all")`` (passed to ``make_steering`` as is).
        controls: ``{name: neuron set}`` of random-neuron controls (size-matched by the caller), steered with the
            same alphas and layers; kind ``"control"``, named ``"{name}@a{alpha}/{layers}"`` (e.g. ``random@a10/late``).
        prompts: prompt baselines: words (``["fast"]`` -> ``"{instruction} fast"``) or ``{word: template}``
            with templates containing ``{instruction}``.
        include_baseline: add the unsteered ``"baseline"`` condition first.
        make_steering: ``(neurons, alpha, layers) -> steering``; default ``nnsight_vla.Steering``.

    Returns the conditions in a stable order (baseline, steered, controls, prompts). Names must be unique.
    """
    make = make_steering or default_steering_factory
    alphas = list(alphas)
    layers = list(layers)
    if (concepts or controls) and (not alphas or not layers):
        raise ConditionError("sweep_grid needs at least one alpha and one layer subset to steer anything")
    out: list[Condition] = [baseline()] if include_baseline else []
    for group, kind in ((concepts or {}, "steered"), (controls or {}, "control")):
        for concept, neurons in group.items():
            for layer_subset in layers:
                for alpha in alphas:
                    out.append(
                        steered(concept, make(neurons, float(alpha), layer_subset), alpha=float(alpha),
                                layers=layer_subset, kind=kind)
                    )
    if prompts:
        items = prompts.items() if isinstance(prompts, Mapping) else ((w, "{instruction} {word}") for w in prompts)
        for word, template in items:
            out.append(prompt_baseline(word, template))
    check_unique(out)
    return out


def check_unique(conditions: Sequence[Condition]) -> None:
    """Raise when two conditions share a name (or a file slug)."""
    seen: dict[str, str] = {}
    for cond in conditions:
        if not isinstance(cond, Condition):
            raise ConditionError(f"expected Condition objects, got {type(cond).__name__}: {cond!r}")
        if cond.name in seen:
            raise ConditionError(f"two conditions are named {cond.name!r}; condition names must be unique")
        seen[cond.name] = cond.slug
    if not conditions:
        raise ConditionError("no conditions given; pass at least one (e.g. [baseline()])")


class SpeedSteering:
    """A steering for policies with a ``speed`` attribute (e.g. ``ScriptedPolicy``): multiplies it inside
    :meth:`apply`. It stands in for neuron steering where no model is involved (smoke runs, rehearsals, tests)."""

    def __init__(self, scale: float):
        self.scale = float(scale)
        if not math.isfinite(self.scale):
            raise ConditionError(f"speed scale must be finite, got {scale!r}")

    @contextlib.contextmanager
    def apply(self, policy: Any):
        if not hasattr(policy, "speed"):
            raise ConditionError(f"SpeedSteering needs a policy with a 'speed' attribute; {type(policy).__name__} has none")
        old = policy.speed
        policy.speed = old * self.scale
        try:
            yield policy
        finally:
            policy.speed = old

    def to_dict(self) -> dict:
        return {"type": "speed_scale", "scale": self.scale}
