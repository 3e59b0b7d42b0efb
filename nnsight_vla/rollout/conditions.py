"""Experimental conditions: what varies between otherwise identical episodes (baseline, steered, random-neuron
control, prompt baseline), one registry of steering kinds, and one syntax for conditions on the command line.

A runner uses three things from a :class:`Condition`: the instruction it gives the policy, the context it runs
the policy in (e.g. a ``Steering.apply(vla)``) and its JSON description, stored with every episode and rebuilt
by :meth:`Condition.from_dict` through :func:`steering_from_dict` (every steering kind round-trips).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import ConditionError

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

    @classmethod
    def from_dict(cls, data: Mapping) -> "Condition":
        """Inverse of :meth:`to_dict` (the steering through :func:`steering_from_dict`)."""
        if not isinstance(data, Mapping) or "name" not in data:
            raise ConditionError(f"not a condition description (expected Condition.to_dict()): {data!r}")
        allowed = {"name", "kind", "prompt", "concept", "alpha", "layers", "steering"}
        unknown = set(data) - allowed
        if unknown:
            raise ConditionError(f"condition {data['name']!r}: unknown field(s) {sorted(unknown)}; allowed: "
                                 f"{sorted(allowed)}")
        steering = data.get("steering")
        return cls(data["name"], steering=None if steering is None else steering_from_dict(steering),
                   prompt=data.get("prompt"), kind=data.get("kind") or "", concept=data.get("concept"),
                   alpha=data.get("alpha"), layers=data.get("layers"))

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
    """``nnsight_vla.steering.Steering(neurons, alpha=alpha, layers=layers)``."""
    from ..steering import Steering

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
            raise ConditionError(
                f"SpeedSteering needs a policy with a 'speed' attribute; {type(policy).__name__} has none")
        old = policy.speed
        policy.speed = old * self.scale
        try:
            yield policy
        finally:
            policy.speed = old

    def to_dict(self) -> dict:
        return {"type": "speed_scale", "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SpeedSteering":
        return cls(float(data["scale"]))


# -- the registry of steering kinds ---------------------------------------------------------------------------

#: ``{"type" of a steering's to_dict(): a function rebuilding it}``; extend with :func:`register_steering_kind`
STEERING_KINDS: dict[str, Callable[[Mapping], Any]] = {}


def register_steering_kind(type_name: str, from_dict: Callable[[Mapping], Any]) -> None:
    """Make ``{"type": type_name, ...}`` steering descriptions rebuildable everywhere (conditions files, the
    policy server, worker processes)."""
    STEERING_KINDS[type_name] = from_dict


def _builtin_kinds() -> None:
    if "steering" in STEERING_KINDS:
        return
    from ..steering import Steering, SteeringGroup

    STEERING_KINDS.setdefault("steering", Steering.from_dict)
    STEERING_KINDS.setdefault("steering_group", SteeringGroup.from_dict)
    STEERING_KINDS.setdefault("speed_scale", SpeedSteering.from_dict)


def steering_from_dict(data: Mapping) -> Any:
    """Rebuild any registered steering kind from its ``to_dict()`` (a ``Steering`` when ``type`` is absent)."""
    if not isinstance(data, Mapping):
        raise ConditionError(f"a steering description is a mapping, got {type(data).__name__}")
    _builtin_kinds()
    kind = data.get("type", "steering")
    if kind not in STEERING_KINDS:
        raise ConditionError(f"unknown steering type {kind!r}; registered: {sorted(STEERING_KINDS)}")
    return STEERING_KINDS[kind](data)


# -- conditions from files and the command line ---------------------------------------------------------------

CONDITION_SYNTAX = """\
baseline                         the task's own instruction, no intervention
prompt:WORD                      the word appended to the instruction (the paper's prompt baseline)
speed:FACTOR                     scale a scripted policy's speed (no model; rehearsals)
steer:FILE[#KEY]@ALPHA[/LAYERS][~SCALE]
                                 overwrite the neurons of FILE (a NeuronSet from `nnsight-vla concepts`, or the
                                 authors' dictionaries.yaml with #KEY) with ALPHA in LAYERS (all, early, late,
                                 first:K, last:K); ~SCALE: alpha in units of an ActivationScale JSON file
random:FILE[#KEY]@ALPHA[/LAYERS][~SCALE][:SEED]
                                 the matched random-neuron control of that set
FILE.json / FILE.yaml            a list of Condition.to_dict() entries"""


def load_conditions(path: str | os.PathLike) -> list[Condition]:
    """Conditions from a JSON or YAML file: a list (or ``{"conditions": [...]}``) of ``Condition.to_dict()``
    entries; steering descriptions of any registered kind."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConditionError(f"cannot read conditions file {path}: {exc}") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the file's fault
        fmt = "YAML" if path.suffix in (".yaml", ".yml") else "JSON"
        raise ConditionError(f"{path} is not valid {fmt}: {exc}") from None
    if isinstance(data, Mapping):
        data = data.get("conditions", data)
    if not isinstance(data, list):
        raise ConditionError(f"{path}: expected a list of conditions")
    return [Condition.from_dict(entry) for entry in data]


_STEER = re.compile(r"^(?P<kind>steer|random):(?P<file>[^#@]+)(?:#(?P<key>[^@]+))?@(?P<alpha>[^/~:]+)"
                    r"(?:/(?P<layers>[^~:]+))?(?:~(?P<scale>[^:]+))?(?::(?P<seed>\d+))?$")


def parse_condition(spec: str, d_mlp: int | None = None) -> list[Condition]:
    """One command-line condition (see :data:`CONDITION_SYNTAX`); a conditions file gives several. ``d_mlp``:
    the model's MLP width, needed to read flat neuron indices (the authors' ``dictionaries.yaml``)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConditionError("empty condition; syntax:\n" + CONDITION_SYNTAX)
    spec = spec.strip()
    if spec == "baseline":
        return [baseline()]
    if spec.startswith("prompt:"):
        return [prompt_baseline(spec[len("prompt:"):])]
    if spec.startswith("speed:"):
        try:
            factor = float(spec[len("speed:"):])
        except ValueError:
            raise ConditionError(f"bad speed condition {spec!r}; use speed:FACTOR, e.g. speed:1.5") from None
        return [Condition(f"speed:{factor:g}", steering=SpeedSteering(factor), kind="steered", concept="speed",
                          alpha=factor)]
    match = _STEER.match(spec)
    if match:
        return [_steer_condition(match, d_mlp)]
    if spec.endswith((".json", ".yaml", ".yml")):
        return load_conditions(spec)
    raise ConditionError(f"cannot read condition {spec!r}; syntax:\n" + CONDITION_SYNTAX)


def _steer_condition(match: re.Match, d_mlp: int | None) -> Condition:
    from ..scale import ActivationScale
    from ..neurons import load_neurons
    from ..steering import Steering

    kind, file, key = match["kind"], match["file"], match["key"]
    try:
        alpha = float(match["alpha"])
    except ValueError:
        raise ConditionError(f"alpha must be a number, got {match['alpha']!r}") from None
    layers = match["layers"] or "all"
    scale: Any = 1.0
    if match["scale"]:
        scale = ActivationScale.load(match["scale"])
    neurons = load_neurons(file, key=key, d_mlp=d_mlp)
    steering = Steering(neurons, alpha, layers=layers, scale=scale)
    concept = neurons.name or (key or Path(file).stem)
    label = f"{concept}@a{alpha:g}/{layers}"
    if kind == "random":
        seed = int(match["seed"] or 0)
        if neurons.d_mlp is None:
            raise ConditionError(f"a random control needs the MLP width: {file} does not record d_mlp")
        steering = steering.random_control(seed)
        return Condition(f"random[{concept}]@a{alpha:g}/{layers}:{seed}", steering=steering, kind="control",
                         concept=concept, alpha=alpha, layers=layers)
    return Condition(label, steering=steering, kind="steered", concept=concept, alpha=alpha, layers=layers)


def parse_conditions(specs: Iterable[str], d_mlp: int | None = None) -> list[Condition]:
    """Every condition of several command-line specs (each may be comma-separated), names checked unique."""
    out: list[Condition] = []
    for spec in specs:
        for part in _split(spec):
            out.extend(parse_condition(part, d_mlp))
    check_unique(out)
    return out


def _split(spec: str) -> list[str]:
    # commas separate conditions, except inside a layer list such as /3,4,5
    parts: list[str] = []
    for piece in spec.split(","):
        if parts and piece.strip().isdigit() and re.search(r"/[\d,]+$", parts[-1]):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return [p for p in parts if p.strip()]
