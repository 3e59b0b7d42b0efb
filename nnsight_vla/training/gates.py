"""Single-step causal gates on the trained VLA, checked on development frames before any rollout: zero-shot
concept words move the decoded action the word's way; mean-ablating the late MLPs at the action positions
removes >= 50 % of the gap between opposite manner phrases; >= 7 of 10 neurons of each discovered set respond
to their concept; each set at alpha moves its metric the predicted way, beyond every random set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..activations import Query
from ..causal import DEFAULT_SUMMARIES, ablation_effect, action_effect, decode, neuron_response
from ..neurons import layer_subset
from .corpus import DEMO_PHRASES, LANGUAGE_PHRASES, LEXICON, OPPOSITE, STEERED_CONCEPTS, TASK_BASES, negate

#: the action summary each concept acts on, and the predicted sign
CONCEPT_SUMMARY = {"fast": ("speed", +1), "slow": ("speed", -1), "high": ("dz", +1), "low": ("dz", -1)}
DEV_SEEDS = tuple(range(3000, 3006))  # development scenes (the experiment's rollouts use other seeds)
FRAME_STEPS = (0, 4, 8, 12)


def expert_frames(seeds: Sequence[int] = DEV_SEEDS, steps: Sequence[int] = FRAME_STEPS, image_size: int = 64
                  ) -> list[np.ndarray]:
    """Camera frames along the scripted expert's (medium speed, medium height) trajectories: the states a policy
    visits, from the start to the approach."""
    from ..envs.arm_scene import HEIGHTS, SPEEDS, ScriptedExpert, scene

    arm = scene(image_size)
    frames = []
    for seed in seeds:
        obs = arm.reset(int(seed))
        expert = ScriptedExpert(speed=SPEEDS["medium"], height=HEIGHTS["medium"], hover=arm.config.hover)
        for step in range(max(steps) + 1):
            if step in steps:
                frames.append(obs["image"])
            obs = arm.step(expert(obs))
    return frames


def queries(frames: Sequence[np.ndarray], phrases: Sequence[str] = ("",), bases: Sequence[str] = TASK_BASES[:3]
            ) -> list[Query]:
    """Every frame with every base instruction + phrase ("" = the neutral instruction)."""
    return [Query(f, f"{b} {p}".strip()) for f in frames for b in bases for p in phrases]


def concept_phrases(concept: str, which: str = "demo") -> list[str]:
    """Ways of asking for a concept: "demo" (the demonstrations' idioms and negated opposites), "language" (the
    language-only idioms), "words" (its single-word adverbs, zero-shot for the policy)."""
    if which == "words":
        return list(LEXICON[concept]["adv"])
    table = DEMO_PHRASES if which == "demo" else LANGUAGE_PHRASES
    return list(table[concept]) + [negate(p) for p in table[OPPOSITE[concept]]]


@dataclass
class GateReport:
    """Each gate's measurements and whether it passed."""

    results: dict = field(default_factory=dict)
    passed: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"results": self.results, "passed": self.passed, "all_passed": all(self.passed.values())}


def prompt_shifts(vla, frames, which: str = "words", **predict_kwargs: Any) -> dict:
    """Per concept: the mean shift of its summary when its phrases are added to neutral instructions."""
    base = decode(vla, queries(frames), **predict_kwargs)
    out = {}
    for concept in STEERED_CONCEPTS:
        summary, sign = CONCEPT_SUMMARY[concept]
        fn = DEFAULT_SUMMARIES[summary]
        shifts = []
        for phrase in concept_phrases(concept, which):
            acts = decode(vla, queries(frames, (phrase,)), **predict_kwargs)
            shifts.append(float(np.mean(fn(acts) - fn(base))))
        out[concept] = {"summary": summary, "predicted_sign": sign, "mean_shift": float(np.mean(shifts)),
                        "shifts": shifts, "right_way": bool(np.sign(np.mean(shifts)) == sign),
                        "baseline": float(np.mean(fn(base)))}
    return out


def late_ablation(vla, frames, **predict_kwargs: Any) -> dict:
    """Share of the fast-vs-slow speed gap and the high-vs-low dz gap (demonstration phrases) removed by
    mean-ablating the late half of the MLPs (and, for comparison, the early half)."""
    out = {}
    neutral = queries(frames)
    for pair, summary in ((("fast", "slow"), "speed"), (("high", "low"), "dz")):
        a = queries(frames, concept_phrases(pair[0]))
        b = queries(frames, concept_phrases(pair[1]))
        for half in ("late", "early"):
            layers = layer_subset(half, vla.num_layers)
            result = ablation_effect(vla, layers, a, b, neutral, summary=summary, **predict_kwargs)
            out[f"{pair[0]}_vs_{pair[1]}/{half}"] = result.to_dict()
    return out


def responses(vla, sets: dict, frames, **predict_kwargs: Any) -> dict:
    """Per concept set: which neurons are more active on the concept's phrases than on the opposite's."""
    out = {}
    for concept, neurons in sets.items():
        phrases = concept_phrases(concept) + concept_phrases(concept, "words")
        opposite = concept_phrases(OPPOSITE[concept]) + concept_phrases(OPPOSITE[concept], "words")
        r = neuron_response(vla, neurons, queries(frames[::2], phrases, TASK_BASES[:1]),
                            queries(frames[::2], opposite, TASK_BASES[:1]), **predict_kwargs)
        out[concept] = r.to_dict()
    return out


def steering_effects(vla, steerings: dict, frames, n_random: int = 10, seed: int = 0,
                     **predict_kwargs: Any) -> dict:
    """Per concept: the single-step effect of its steering beside ``n_random`` random sets of the same shape."""
    qs = queries(frames)
    base = decode(vla, qs, **predict_kwargs)
    out = {}
    for concept, steering in steerings.items():
        summary, sign = CONCEPT_SUMMARY[concept]
        effect = action_effect(vla, steering, qs, n_random=n_random, seed=seed, baseline=base, **predict_kwargs)
        record = effect.to_dict()
        record.update(summary=summary, predicted_sign=sign,
                      right_way=bool(np.sign(effect.delta[summary]) == sign),
                      beyond_random=effect.beyond_random(summary))
        out[concept] = record
    return out


def run_gates(vla, sets: dict, steerings: dict, frames=None, n_random: int = 10, seed: int = 0,
              **predict_kwargs: Any) -> GateReport:
    """Every gate on ``vla`` for the discovered ``sets`` and their ``steerings`` (see the module docstring)."""
    frames = expert_frames() if frames is None else frames
    report = GateReport()
    words = prompt_shifts(vla, frames, "words", **predict_kwargs)
    report.results["zero_shot_words"] = words
    report.results["language_idioms"] = prompt_shifts(vla, frames, "language", **predict_kwargs)
    report.results["demo_phrases"] = prompt_shifts(vla, frames, "demo", **predict_kwargs)
    report.passed["zero_shot_words"] = all(v["right_way"] for v in words.values())
    ablation = late_ablation(vla, frames, **predict_kwargs)
    report.results["late_ablation"] = ablation
    report.passed["late_ablation_removes_half"] = all(
        v["removed"] >= 0.5 for k, v in ablation.items() if k.endswith("/late"))
    resp = responses(vla, sets, frames, **predict_kwargs)
    report.results["neuron_response"] = resp
    report.passed["neurons_respond_7_of_10"] = all(
        sum(r["responding"]) >= 0.7 * len(r["responding"]) for r in resp.values())
    effects = steering_effects(vla, steerings, frames, n_random=n_random, seed=seed, **predict_kwargs)
    report.results["steering"] = effects
    report.passed["steering_right_way_beyond_random"] = all(
        e["right_way"] and e["beyond_random"] for e in effects.values())
    return report
