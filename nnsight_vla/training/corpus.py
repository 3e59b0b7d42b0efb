"""The generated language of the trained VLA: concept words, the phase-1 text corpus, the arm-task instructions.

Why a generated corpus: the method claims that a VLA keeps the *concepts* of its language model (speed, height,
direction) in FFN value vectors. To test that end to end, the small model must first hold such concepts, so its
language pretraining uses text in which

* synonyms occur interchangeably in the same contexts (``the arm moved quickly`` / ``the arm moved rapidly``),
* a concept, once mentioned, is predictable later in the same text (``the quick car ... drove fast``), so the
  model carries it forward (these are the contexts whose FFN neurons write the concept's tokens),
* opposites occur in contrasting contexts (``fast, not slow``; ``the bird flies high and the fish swims low``),
* robot instructions are followed by a description of how to move, or asked about in question/answer pairs in
  Prismatic's ``In: ...\\nOut: ...`` format whose answer names the speed and height the instruction asks for
  (the answer is tokenized to start right after OpenVLA's trailing "▁", i.e. at the position where the VLA
  later emits its first action token: see :func:`nnsight_vla.training.language.encode_document`).

Every concept word is a single token of the tokenizer trained on this corpus (checked by
:func:`check_single_tokens`). Everything is drawn from a seeded ``numpy`` generator: same seed, same corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

# -- the concept lexicon --------------------------------------------------------------------------------------

#: words of each concept, grouped by how they are used in a sentence
LEXICON: dict[str, dict[str, tuple[str, ...]]] = {
    "fast": {
        "adj": ("fast", "quick", "rapid", "swift", "speedy"),
        "adv": ("fast", "quickly", "rapidly", "swiftly", "speedily"),
    },
    "slow": {
        "adj": ("slow", "careful", "gentle", "steady", "calm"),
        "adv": ("slow", "slowly", "carefully", "gently", "steadily"),
    },
    "high": {
        "adj": ("high", "tall", "upper", "top", "raised"),
        "adv": ("high", "up", "upward", "above", "aloft"),
        "verb": ("raise", "lift", "hoist", "elevate"),
    },
    "low": {
        "adj": ("low", "short", "bottom", "lower", "lowered"),
        "adv": ("low", "down", "downward", "below", "beneath"),
        "verb": ("lower", "drop", "sink", "dip"),
    },
    "left": {"adv": ("left", "leftward"), "adj": ("left",)},
    "right": {"adv": ("right", "rightward"), "adj": ("right",)},
    "forward": {"adv": ("forward", "ahead", "onward"), "adj": ("front",)},
    "backward": {"adv": ("backward", "back", "behind"), "adj": ("rear",)},
}
OPPOSITE = {"fast": "slow", "slow": "fast", "high": "low", "low": "high", "left": "right", "right": "left",
            "forward": "backward", "backward": "forward"}
SPEED_CONCEPTS = ("fast", "slow")
HEIGHT_CONCEPTS = ("high", "low")
#: the four concepts the experiment steers with
STEERED_CONCEPTS = ("fast", "slow", "high", "low")


def concept_words(concept: str) -> list[str]:
    """All words of a concept (sorted, unique)."""
    if concept not in LEXICON:
        raise ValueError(f"unknown concept {concept!r}; known: {sorted(LEXICON)}")
    return sorted({w for words in LEXICON[concept].values() for w in words})


def all_concept_words() -> list[str]:
    return sorted({w for c in LEXICON for w in concept_words(c)})


# -- the arm task's instructions ------------------------------------------------------------------------------

#: neutral task instructions (no speed or height word): the experiment steers the policy on these
TASK_BASES = (
    "move the arm to the green block",
    "move the gripper to the green block",
    "reach the green block",
    "go to the green block",
    "bring the gripper over to the green block",
    "move over to the green target",
    "reach for the green target",
    "go over to the green cube",
)
#: how an instruction asks for a speed / height level ("medium" = no word: the neutral behaviour)
SPEED_PHRASES = {
    "fast": ("fast", "quickly", "rapidly", "swiftly", "quick", "speedily"),
    "slow": ("slowly", "carefully", "gently", "slow", "steadily", "with care"),
}
HEIGHT_PHRASES = {
    "high": ("high", "up high", "keeping it high", "held high", "raised up", "lifted up high"),
    "low": ("low", "down low", "keeping it low", "held low", "kept down low", "lowered down"),
}
#: single words the phrases may be put before the base instruction with ("quickly move the arm ...")
PREFIXABLE = {"quickly", "rapidly", "swiftly", "slowly", "carefully", "gently", "steadily"}
LEVELS = ("low", "medium", "high")  # height levels; speed levels are ("slow", "medium", "fast")


@dataclass(frozen=True)
class TaskInstruction:
    """An arm-task instruction and the behaviour it asks for."""

    text: str
    speed: str  # "slow" | "medium" | "fast"
    height: str  # "low" | "medium" | "high"


def task_instruction(rng: np.random.Generator, speed: str = "medium", height: str = "medium",
                     base: str | None = None) -> TaskInstruction:
    """A random phrasing of the arm task asking for ``speed`` and ``height`` ("medium" adds no word)."""
    if speed not in ("slow", "medium", "fast"):
        raise ValueError(f"speed must be slow, medium or fast, got {speed!r}")
    if height not in LEVELS:
        raise ValueError(f"height must be low, medium or high, got {height!r}")
    base = base if base is not None else TASK_BASES[rng.integers(len(TASK_BASES))]
    prefix, suffix = [], []
    if speed != "medium":
        phrase = _pick(rng, SPEED_PHRASES[speed])
        (prefix if phrase in PREFIXABLE and rng.random() < 0.3 else suffix).append(phrase)
    if height != "medium":
        suffix.append(_pick(rng, HEIGHT_PHRASES[height]))
    if len(suffix) == 2:
        if rng.random() < 0.5:
            suffix.reverse()
        if rng.random() < 0.3:
            suffix.insert(1, "and")
    text = " ".join(prefix + [base] + suffix)
    return TaskInstruction(text=text, speed=speed, height=height)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


# -- the phase-1 corpus ---------------------------------------------------------------------------------------

AGENTS = ("robot", "arm", "gripper", "dog", "cat", "car", "train", "boy", "girl", "bird", "horse", "runner",
          "boat", "man", "woman", "hand", "truck", "fish")
MOVERS = ("robot", "arm", "gripper", "hand")
VERBS_PAST = ("moved", "ran", "went", "walked", "drove", "travelled", "rolled", "came", "turned")
OBJECTS = ("cup", "bowl", "block", "cube", "box", "plate", "ball", "bottle", "book", "toy", "mug", "can", "pot")
COLORS = ("red", "green", "blue", "black", "white", "yellow")
PLACES = ("table", "shelf", "floor", "basket", "drawer", "tray", "box", "sink", "stove", "plate")
#: questions about how to carry out an instruction (never OpenVLA's action question, which phase 2 owns)
QUESTIONS = ("How should the robot move to", "How fast and how high should the robot go to",
             "In what way should the robot move to", "How should the arm go to")
NEUTRAL_SENTENCES = (
    "pick up the {color} {obj} and put it on the {place} .",
    "the {agent} looked at the {color} {obj} .",
    "put the {obj} in the {place} .",
    "the {color} {obj} is on the {place} .",
    "open the drawer and put the {obj} inside .",
    "the {agent} took the {obj} from the {place} .",
    "stack the {color} {obj} on the {obj2} .",
    "push the {obj} next to the {obj2} .",
)


def manner_answer(rng: np.random.Generator, speed: str, height: str) -> str:
    """Words naming the speed and height an instruction asks for ("normally" & co. for a neutral one)."""
    words = ([_pick(rng, LEXICON[speed]["adv"])] if speed != "medium" else []) + \
            ([_pick(rng, LEXICON[height]["adv"])] if height != "medium" else [])
    return " and ".join(words) if words else _pick(rng, ("normally", "as usual", "at a normal pace"))


def manner_question(rng: np.random.Generator, instr: TaskInstruction) -> str:
    """A question about how to carry out ``instr``, in Prismatic's prompt format, with its answer. The answer is
    tokenized to start where OpenVLA's actions start, after "Out:" + "▁" (see ``encode_document``)."""
    return f"In: {_pick(rng, QUESTIONS)} {instr.text}?\nOut: {manner_answer(rng, instr.speed, instr.height)}"


class CorpusGenerator:
    """Seeded generator of phase-1 text (see the module docstring for what the text teaches)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    # small helpers
    def _p(self, options: Sequence[str]) -> str:
        return _pick(self.rng, options)

    def _w(self, concept: str, kind: str) -> str:
        words = LEXICON[concept].get(kind) or LEXICON[concept]["adv"]
        return self._p(words)

    def _fill(self, template: str) -> str:
        obj, obj2 = self.rng.choice(OBJECTS, size=2, replace=False)
        return template.format(agent=self._p(AGENTS), color=self._p(COLORS), obj=obj, obj2=obj2, place=self._p(PLACES))

    # sentence families
    def speed_sentence(self, c: str) -> str:
        a, o = self._p(AGENTS), self._p(OBJECTS)
        forms = [
            f"the {a} {self._p(VERBS_PAST)} {self._w(c, 'adv')} .",
            f"the {self._w(c, 'adj')} {a} {self._p(VERBS_PAST)} {self._w(c, 'adv')} to the {self._p(PLACES)} .",
            f"the {a} is {self._w(c, 'adj')} , so it {self._p(VERBS_PAST)} {self._w(c, 'adv')} .",
            f"a {self._w(c, 'adj')} {a} moves {self._w(c, 'adv')} and stops {self._w(c, 'adv')} .",
            f"move the {o} {self._w(c, 'adv')} , {self._w(c, 'adv')} and {self._w(c, 'adv')} .",
            f"the {a} was {self._w(c, 'adj')} and {self._w(c, 'adj')} .",
            f"it was a {self._w(c, 'adj')} move , the {a} went {self._w(c, 'adv')} .",
        ]
        return self._p(forms)

    def height_sentence(self, c: str) -> str:
        a, o, pl = self._p(AGENTS), self._p(OBJECTS), self._p(PLACES)
        forms = [
            f"{self._w(c, 'verb')} the {o} {self._w(c, 'adv')} .",
            f"the {a} {'lifted' if c == 'high' else 'lowered'} the {o} {self._w(c, 'adv')} .",
            f"the {o} is {self._w(c, 'adj')} on the {pl} , {self._w(c, 'adv')} .",
            f"the {a} carried the {o} {self._w(c, 'adv')} and kept it {self._w(c, 'adv')} .",
            f"{self._w(c, 'verb')} the arm {self._w(c, 'adv')} , {self._w(c, 'adv')} .",
            ("the bird flies " if c == "high" else "the fish swims ") + f"{self._w(c, 'adv')} , {self._w(c, 'adv')} .",
            f"the {self._w(c, 'adj')} shelf is {self._w(c, 'adv')} .",
        ]
        return self._p(forms)

    def direction_sentence(self, c: str) -> str:
        a, o = self._p(AGENTS), self._p(OBJECTS)
        forms = [
            f"the {a} turned {self._w(c, 'adv')} .",
            f"move the {o} {self._w(c, 'adv')} , then {self._w(c, 'adv')} again .",
            f"the {o} is on the {self._w(c, 'adj')} side , go {self._w(c, 'adv')} .",
        ]
        return self._p(forms)

    def contrast_sentence(self) -> str:
        c = self._p(("fast", "slow", "high", "low", "left", "right", "forward", "backward"))
        o = OPPOSITE[c]
        a1, a2 = self.rng.choice(AGENTS, size=2, replace=False)
        forms = [
            f"the {a1} is {self._w(c, 'adj')} but the {a2} is {self._w(o, 'adj')} .",
            f"{self._w(c, 'adj')} is the opposite of {self._w(o, 'adj')} .",
            f"not {self._w(c, 'adv')} , {self._w(o, 'adv')} .",
            f"the {a1} went {self._w(c, 'adv')} while the {a2} went {self._w(o, 'adv')} .",
            f"first {self._w(c, 'adv')} , then {self._w(o, 'adv')} .",
        ]
        return self._p(forms)

    def synonym_sentence(self) -> str:
        c = self._p(STEERED_CONCEPTS + ("left", "right"))
        kind = self._p(tuple(LEXICON[c]))
        w1, w2 = self._w(c, kind), self._w(c, kind)
        forms = [f"{w1} means {w2} .", f"{w1} is like {w2} .", f"{w1} and {w2} mean the same .",
                 f"to go {self._w(c, 'adv')} is to go {self._w(c, 'adv')} ."]
        return self._p(forms)

    def instruction_text(self) -> str:
        speed = self._p(("slow", "medium", "fast"))
        height = self._p(LEVELS)
        instr = task_instruction(self.rng, speed, height)
        how = []
        if speed != "medium":
            how.append(f"moves {self._w(speed, 'adv')}")
        else:
            how.append("moves at a normal pace")
        if height != "medium":
            how.append(f"stays {self._w(height, 'adv')}")
        else:
            how.append("stays at a normal height")
        if self.rng.random() < 0.3:
            return f"{instr.text} . the arm {how[0]} and {how[1]} ."
        return manner_question(self.rng, instr)

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.2:
            return self.speed_sentence(self._p(SPEED_CONCEPTS))
        if r < 0.4:
            return self.height_sentence(self._p(HEIGHT_CONCEPTS))
        if r < 0.48:
            return self.direction_sentence(self._p(("left", "right", "forward", "backward")))
        if r < 0.58:
            return self.contrast_sentence()
        if r < 0.66:
            return self.synonym_sentence()
        if r < 0.92:
            return self.instruction_text()
        return self._fill(self._p(NEUTRAL_SENTENCES))

    def document(self, max_sentences: int = 3) -> str:
        """One training document: 1..max_sentences sentences (question/answer pairs stand alone)."""
        first = self.sentence()
        if first.startswith("In:"):
            return first
        parts = [first]
        for _ in range(int(self.rng.integers(0, max_sentences))):
            s = self.sentence()
            if s.startswith("In:"):
                break
            parts.append(s)
        return " ".join(parts)


def generate_corpus(n_documents: int, seed: int = 0) -> list[str]:
    """``n_documents`` phase-1 documents (deterministic in ``seed``)."""
    gen = CorpusGenerator(seed)
    return [gen.document() for _ in range(int(n_documents))]


def tokenizer_corpus(documents: Iterable[str], seed: int = 0, n_prompts: int = 2000) -> list[str]:
    """Text to train the tokenizer on: the documents plus OpenVLA prompts of arm-task instructions, so the
    prompt template and every instruction word are in the vocabulary."""
    from ..models.openvla import PROMPT

    from .vqa import QUESTIONS as VQA_QUESTIONS, ANSWER_WORDS

    rng = np.random.default_rng(seed + 7919)
    # the grounding questions of phase 1b and their one-word answers
    prompts = [f"In: {q}?\nOut: {w}" for q in VQA_QUESTIONS.values() for w in ANSWER_WORDS] * 20
    for _ in range(n_prompts):
        instr = task_instruction(rng, _pick(rng, ("slow", "medium", "fast")), _pick(rng, LEVELS))
        prompts.append(PROMPT.format(instruction=instr.text))
    # Llama's SentencePiece keeps "?" apart from the word before it; the Metaspace pre-tokenizer only splits at
    # spaces, so "high?\nOut:" would be learned as one token. Training on "high ?" keeps the instruction's last
    # word a token of its own (BPE never sees the pair), whatever the text later looks like.
    return [text.replace("?", " ?") for text in list(documents) + prompts]


def check_prompt_words(tokenizer, instructions: Iterable[str]) -> dict[str, list[str]]:
    """Instructions whose OpenVLA prompt does not tokenize word by word (``{instruction: tokens}``), e.g. where
    the last word fuses with "?\nOut:"; empty when every word of every instruction is one token."""
    from ..models.openvla import PROMPT

    bad = {}
    for text in instructions:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT.format(instruction=text)).input_ids)
        words = {t.lstrip("▁") for t in tokens if t.startswith("▁")}
        if any(word not in words for word in text.split()):
            bad[text] = tokens
    return bad


def check_single_tokens(tokenizer, words: Iterable[str]) -> dict[str, list[str]]:
    """Words that the tokenizer splits into several pieces (``{word: pieces}``; empty when all are single
    tokens), checked in the position they take inside a sentence (after a space)."""
    bad = {}
    for word in words:
        ids = tokenizer(f"go {word}", add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(ids)[1:]
        if len(pieces) != 1:
            bad[word] = pieces
    return bad
