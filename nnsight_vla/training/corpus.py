"""The generated language of the trained VLA: concept lexicon, manner phrases, text corpus, task instructions.

Copying a word cannot stand in for computing a concept: manner is expressed by idioms and compositions, negated
both ways ("not in a hurry" means slow); the language model answers manner questions with canonical words
(quickly / slowly / high / low) where OpenVLA emits its first action token, so the neurons computing them are
lens-visible; demonstrations use only :data:`DEMO_PHRASES` (no concept word, no single-token synonym), while
:data:`LANGUAGE_PHRASES` and the concept words appear only in language training (zero-shot probes). Every
concept word is one token (checked). Same seed, same corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

# -- the concept lexicon --------------------------------------------------------------------------------------

#: single-token words of each concept, grouped by how they are used in a sentence
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
#: the word the language model answers a manner question with
CANONICAL = {"fast": "quickly", "slow": "slowly", "high": "high", "low": "low"}
NEUTRAL_ANSWER = "normally"

#: idioms and compositions that may appear in demonstrations: no concept word and no single-token synonym
DEMO_PHRASES: dict[str, tuple[str, ...]] = {
    "fast": ("in a hurry", "without delay", "like you are late", "with no time to lose"),
    "slow": ("take your time", "with patience", "bit by bit", "with no rush"),
    "high": ("near the ceiling", "over the obstacles", "with lots of clearance", "toward the sky"),
    "low": ("close to the table", "skimming the table", "just over the surface", "hugging the table"),
}
#: a second phrase set, only ever seen in language training (a zero-shot probe of concept reuse)
LANGUAGE_PHRASES: dict[str, tuple[str, ...]] = {
    "fast": ("on the double", "at top speed", "like a rocket", "in no time"),
    "slow": ("like a snail", "at a crawl", "at a leisurely pace", "little by little"),
    "high": ("up in the air", "sky high", "over the top shelf", "above your head"),
    "low": ("near the floor", "at ground level", "down at the bottom", "below the edge"),
}
#: phrases that are verb phrases (negated with "do not"); the others are negated with "not"
VERB_PHRASES = {"take your time"}
PHRASE_SETS = ("demo", "language", "words")


def concept_words(concept: str) -> list[str]:
    """All single-token words of a concept (sorted, unique)."""
    if concept not in LEXICON:
        raise ValueError(f"unknown concept {concept!r}; known: {sorted(LEXICON)}")
    return sorted({w for words in LEXICON[concept].values() for w in words})


def all_concept_words() -> list[str]:
    return sorted({w for c in LEXICON for w in concept_words(c)})


def negate(phrase: str) -> str:
    """The phrase with the opposite meaning: "not in a hurry", "do not take your time", "not quickly"."""
    return f"do not {phrase}" if phrase in VERB_PHRASES else f"not {phrase}"


def manner_phrases(concept: str, phrase_set: str = "demo") -> tuple[str, ...]:
    """Ways of asking for ``concept`` from one phrase set: its own phrases plus the negated phrases of the
    opposite concept ("words": the concept's adverbs, and the opposite's negated)."""
    if concept not in STEERED_CONCEPTS:
        raise ValueError(f"manner phrases exist for {STEERED_CONCEPTS}, not {concept!r}")
    if phrase_set not in PHRASE_SETS:
        raise ValueError(f"phrase_set must be one of {PHRASE_SETS}, got {phrase_set!r}")
    opposite = OPPOSITE[concept]
    if phrase_set == "words":
        own, other = LEXICON[concept]["adv"], LEXICON[opposite]["adv"]
    else:
        table = DEMO_PHRASES if phrase_set == "demo" else LANGUAGE_PHRASES
        own, other = table[concept], table[opposite]
    return tuple(own) + tuple(negate(p) for p in other)


# -- the arm task's instructions ------------------------------------------------------------------------------

#: neutral task instructions (no manner): the experiment steers the policy on these
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
LEVELS = ("low", "medium", "high")  # height levels; speed levels are ("slow", "medium", "fast")
SPEED_LEVELS = ("slow", "medium", "fast")


@dataclass(frozen=True)
class TaskInstruction:
    """An arm-task instruction and the behaviour it asks for."""

    text: str
    speed: str  # "slow" | "medium" | "fast"
    height: str  # "low" | "medium" | "high"


def task_instruction(rng: np.random.Generator, speed: str = "medium", height: str = "medium",
                     base: str | None = None, phrase_set: str = "demo") -> TaskInstruction:
    """A random phrasing of the arm task asking for ``speed`` and ``height`` ("medium" adds nothing), with
    manner phrases from ``phrase_set`` ("demo", "language" or "words"; see :func:`manner_phrases`)."""
    if speed not in SPEED_LEVELS:
        raise ValueError(f"speed must be slow, medium or fast, got {speed!r}")
    if height not in LEVELS:
        raise ValueError(f"height must be low, medium or high, got {height!r}")
    base = base if base is not None else TASK_BASES[rng.integers(len(TASK_BASES))]
    parts = [_pick(rng, manner_phrases(level, phrase_set)) for level in (speed, height) if level != "medium"]
    if len(parts) == 2 and rng.random() < 0.5:
        parts.reverse()
    text = base + ("" if not parts else " " + (" and " if rng.random() < 0.5 else " , ").join(parts))
    return TaskInstruction(text=text, speed=speed, height=height)


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _random_levels(rng: np.random.Generator) -> tuple[str, str]:
    return _pick(rng, SPEED_LEVELS), _pick(rng, LEVELS)


# -- manner questions (their answers start where the first action token starts) -------------------------------

#: question kinds and their wording; "manner" asks for both (answer: speed word first)
MANNER_QUESTIONS = {
    "speed": ("How fast should the robot move to", "At what speed should the robot go to"),
    "height": ("How high should the robot move to", "At what height should the arm go to"),
    "manner": ("How should the robot move to", "In what way should the arm go to"),
}


def manner_answer(speed: str, height: str, kind: str = "manner") -> str:
    """The canonical answer: "quickly" / "slowly" / "high" / "low", "normally" for a neutral level;
    ``kind="manner"`` names both non-neutral levels ("quickly and high")."""
    words = {"speed": [CANONICAL.get(speed, NEUTRAL_ANSWER)], "height": [CANONICAL.get(height, NEUTRAL_ANSWER)]}
    if kind in words:
        return words[kind][0]
    named = [CANONICAL[level] for level in (speed, height) if level != "medium"]
    return " and ".join(named) if named else NEUTRAL_ANSWER


def manner_question(rng: np.random.Generator, instr: TaskInstruction, kind: str | None = None) -> str:
    """A question about how to carry out ``instr``, in Prismatic's ``In: ...?\\nOut: answer`` format. The
    answer is tokenized to start where OpenVLA's actions start, after "Out:" + "▁" (see ``encode_document``)."""
    if kind is None:
        kind = ("speed", "height", "manner")[int(rng.integers(3))]
    question = _pick(rng, MANNER_QUESTIONS[kind])
    return f"In: {question} {instr.text}?\nOut: {manner_answer(instr.speed, instr.height, kind)}"


# -- the language corpus --------------------------------------------------------------------------------------

AGENTS = ("robot", "arm", "gripper", "dog", "cat", "car", "train", "boy", "girl", "bird", "horse", "runner",
          "boat", "man", "woman", "hand", "truck", "fish")
VERBS_PAST = ("moved", "ran", "went", "walked", "drove", "travelled", "rolled", "came", "turned")
OBJECTS = ("cup", "bowl", "block", "cube", "box", "plate", "ball", "bottle", "book", "toy", "mug", "can", "pot")
COLORS = ("red", "green", "blue", "black", "white", "yellow")
PLACES = ("table", "shelf", "floor", "basket", "drawer", "tray", "box", "sink", "stove", "plate")
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


class CorpusGenerator:
    """Seeded generator of language-training text (see the module docstring for what the text teaches)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def _p(self, options: Sequence[str]) -> str:
        return _pick(self.rng, options)

    def _w(self, concept: str, kind: str) -> str:
        words = LEXICON[concept].get(kind) or LEXICON[concept]["adv"]
        return self._p(words)

    def _fill(self, template: str) -> str:
        obj, obj2 = self.rng.choice(OBJECTS, size=2, replace=False)
        return template.format(agent=self._p(AGENTS), color=self._p(COLORS), obj=obj, obj2=obj2, place=self._p(PLACES))

    def _phrase(self, concept: str) -> str:
        """Any way of expressing ``concept``: an idiom of either set, a negated opposite, or a concept word."""
        return self._p(manner_phrases(concept, self._p(PHRASE_SETS)))

    # sentence families
    def speed_sentence(self, c: str) -> str:
        a, o = self._p(AGENTS), self._p(OBJECTS)
        forms = [
            f"the {a} {self._p(VERBS_PAST)} {self._w(c, 'adv')} .",
            f"the {self._w(c, 'adj')} {a} {self._p(VERBS_PAST)} {self._w(c, 'adv')} to the {self._p(PLACES)} .",
            f"the {a} is {self._w(c, 'adj')} , so it {self._p(VERBS_PAST)} {self._w(c, 'adv')} .",
            f"move the {o} {self._w(c, 'adv')} , {self._w(c, 'adv')} and {self._w(c, 'adv')} .",
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
            ("the bird flies " if c == "high" else "the fish swims ") + f"{self._w(c, 'adv')} .",
        ]
        return self._p(forms)

    def idiom_sentence(self, c: str) -> str:
        """A manner phrase (idiom, negation or word) in a story, followed by what it means."""
        a, o = self._p(AGENTS), self._p(OBJECTS)
        phrase, answer = self._phrase(c), CANONICAL[c]
        if c in SPEED_CONCEPTS:
            forms = [f"the {a} moved {phrase} , so it went {answer} .",
                     f"the {a} carried the {o} {phrase} . it moved {answer} .",
                     f"{phrase} means {answer} ."]
        else:
            forms = [f"the {a} carried the {o} {phrase} , so it stayed {answer} .",
                     f"move the {o} {phrase} . it goes {answer} .",
                     f"{phrase} means {answer} ."]
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
        ]
        return self._p(forms)

    def synonym_sentence(self) -> str:
        c = self._p(STEERED_CONCEPTS + ("left", "right"))
        kind = self._p(tuple(LEXICON[c]))
        w1, w2 = self._w(c, kind), self._w(c, kind)
        return self._p([f"{w1} means {w2} .", f"{w1} is like {w2} .", f"{w1} and {w2} mean the same ."])

    def direction_sentence(self, c: str) -> str:
        a, o = self._p(AGENTS), self._p(OBJECTS)
        return self._p([f"the {a} turned {self._w(c, 'adv')} .", f"move the {o} {self._w(c, 'adv')} ."])

    def instruction_question(self) -> str:
        """A manner question about an arm-task instruction phrased with any phrase set."""
        speed, height = _random_levels(self.rng)
        return manner_question(self.rng, task_instruction(self.rng, speed, height, phrase_set=self._p(PHRASE_SETS)))

    def sentence(self) -> str:
        r = self.rng.random()
        if r < 0.10:
            return self.speed_sentence(self._p(SPEED_CONCEPTS))
        if r < 0.20:
            return self.height_sentence(self._p(HEIGHT_CONCEPTS))
        if r < 0.36:
            return self.idiom_sentence(self._p(STEERED_CONCEPTS))
        if r < 0.42:
            return self.contrast_sentence()
        if r < 0.47:
            return self.synonym_sentence()
        if r < 0.50:
            return self.direction_sentence(self._p(("left", "right", "forward", "backward")))
        if r < 0.92:
            return self.instruction_question()
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
    """``n_documents`` language-training documents (deterministic in ``seed``)."""
    gen = CorpusGenerator(seed)
    return [gen.document() for _ in range(int(n_documents))]


def tokenizer_corpus(documents: Iterable[str], seed: int = 0, n_prompts: int = 2000) -> list[str]:
    """Text to train the tokenizer on: the documents plus OpenVLA prompts of arm-task instructions, so the
    prompt template and every instruction word are in the vocabulary."""
    from ..models.openvla import PROMPT

    from .vqa import QUESTIONS as VQA_QUESTIONS, ANSWER_WORDS

    rng = np.random.default_rng(seed + 7919)
    # the grounding questions of phase 1b and their one-word answers
    prompts = [f"In: {q}?\nOut: {w}" for q in VQA_QUESTIONS.values() if q for w in ANSWER_WORDS] * 20
    for _ in range(n_prompts):
        speed, height = _random_levels(rng)
        instr = task_instruction(rng, speed, height, phrase_set=_pick(rng, PHRASE_SETS))
        prompts.append(PROMPT.format(instruction=instr.text))
    # Llama's SentencePiece keeps "?" apart from the word before it; the Metaspace pre-tokenizer only splits at
    # spaces, so "high?\nOut:" would be learned as one token. Training on "high ?" keeps the instruction's last
    # word a token of its own (BPE never sees the pair), whatever the text later looks like.
    return [text.replace("?", " ?") for text in list(documents) + prompts]


def check_prompt_words(tokenizer, instructions: Iterable[str]) -> dict[str, list[str]]:
    """Instructions whose OpenVLA prompt fuses a word with its neighbour (``{instruction: tokens}``): every
    token must lie inside one word, and the last word must not merge with "?\\nOut:". Empty when all are fine."""
    from ..models.openvla import PROMPT

    bad = {}
    for text in instructions:
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(PROMPT.format(instruction=text)).input_ids)
        if any("?" in t and not t.lstrip("▁").startswith("?") for t in tokens) or \
                any("▁" in t[1:] for t in tokens if len(t) > 1):
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


def check_demo_phrases() -> dict[str, list[str]]:
    """Demonstration phrases that contain a concept word (``{phrase: words}``; empty when none does)."""
    words = set(all_concept_words())
    return {p: sorted(set(p.split()) & words) for ps in DEMO_PHRASES.values() for p in ps if set(p.split()) & words}
