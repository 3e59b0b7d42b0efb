"""Grounding questions about demonstration frames (the VLM stage before action fine-tuning): which side of the
gripper the target is on, how high the gripper is, whether it is above the target, and manner questions about
instructions, answered with one word where OpenVLA's first action token goes. They make the language model read
the image (trained on actions alone, the small model guessed the direction). Images are shifted a few pixels.
"""

from __future__ import annotations

import numpy as np
import torch

from .language import IGNORE, pad_batch

QUESTIONS = {
    "side": "Which side of the gripper is the green block on",
    "height": "How high is the gripper",
    "above": "Is the gripper above the green block",
    "manner": None,  # "How should the robot move to {instruction}", drawn per sample (see corpus.manner_question)
}

ANSWER_WORDS = ("left", "right", "below", "low", "middle", "high", "yes", "no")


def answers(eef: np.ndarray, target: np.ndarray, table_z: float = 0.8,
            above_tol: float = 0.035) -> dict[str, list[str]]:
    """The answer to each question for frames with gripper positions ``eef`` and target positions ``target``.

    Image right is world +y (the camera looks along -x).
    """
    dy = target[:, 1] - eef[:, 1]
    above = np.abs(dy) < above_tol
    side = np.where(above, "below", np.where(dy > 0, "right", "left"))
    z = eef[:, 2] - table_z
    height = np.where(z < 0.09, "low", np.where(z < 0.17, "middle", "high"))
    return {"side": side.tolist(), "height": height.tolist(), "above": np.where(above, "yes", "no").tolist()}


def shift_image(image: np.ndarray, rng: np.random.Generator, max_shift: int) -> np.ndarray:
    """Translate by up to ``max_shift`` pixels in each direction, replicating the border."""
    if max_shift <= 0:
        return image
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
    padded = np.pad(image, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return padded[max_shift + dy: max_shift + dy + h, max_shift + dx: max_shift + dx + w]


class VQABatches:
    """(input_ids, pixel_values, labels) batches of grounding questions on demonstration frames ``rows``."""

    def __init__(self, vla, demos: dict, rows: np.ndarray, seed: int = 0, max_shift: int = 2):
        self.vla = vla
        self.images = demos["images"]
        self.rows = np.asarray(rows)
        self.answers = answers(demos["eef"], demos["target"])
        tok = vla.tokenizer
        self.pad, self.eos = tok.pad_token_id, tok.eos_token_id
        self.prompts = {k: self._question_ids(q) for k, q in QUESTIONS.items() if q is not None}
        words = sorted({w for v in self.answers.values() for w in v})
        self.answer_ids = {w: tok(w, add_special_tokens=False).input_ids for w in words}
        self._manner_rng = np.random.default_rng([seed, 4242])
        self.rng = np.random.default_rng(seed)
        self.max_shift = max_shift

    def reseed(self, seed) -> None:
        """Draw the following batches from a fresh generator seeded with ``seed``."""
        self._manner_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 4242])
        self.rng = np.random.default_rng(seed)

    def _manner(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        from .corpus import LEVELS, PHRASE_SETS, SPEED_LEVELS, manner_question, task_instruction

        instr = task_instruction(rng, SPEED_LEVELS[int(rng.integers(3))], LEVELS[int(rng.integers(3))],
                                 phrase_set=PHRASE_SETS[int(rng.integers(len(PHRASE_SETS)))])
        text = manner_question(rng, instr)
        cut = text.index("\nOut:") + len("\nOut:")
        prompt = self._question_ids(text[: cut - len("?\nOut:")])
        answer = self.vla.tokenizer(text[cut:].strip(), add_special_tokens=False).input_ids + [self.eos]
        return prompt, np.asarray(answer, np.int64)

    def _question_ids(self, question: str) -> np.ndarray:
        # Prismatic's "In: ...\nOut:" plus the "▁" that OpenVLA appends: the answer starts where actions do
        ids = self.vla.tokenizer(f"In: {question}?\nOut:").input_ids
        if self.vla.empty_token_id is not None:
            ids = ids + [self.vla.empty_token_id]
        return np.asarray(ids, np.int64)

    def batch(self, size: int, rows=None, kinds=None, shift: bool = True):
        rng = self.rng
        if rows is None:
            rows = self.rows[rng.integers(len(self.rows), size=size)]
        if kinds is None:
            kinds = [list(QUESTIONS)[k] for k in rng.integers(len(QUESTIONS), size=len(rows))]
        seqs, labels, pixels = [], [], []
        for i, kind in zip(rows, kinds):
            if kind == "manner":
                prompt, target = self._manner(rng)
            else:
                prompt = self.prompts[kind]
                target = np.asarray(self.answer_ids[self.answers[kind][i]] + [self.eos], np.int64)
            seqs.append(np.concatenate([prompt, target]))
            labels.append(np.concatenate([np.full(len(prompt), IGNORE), target]))
            image = shift_image(self.images[i], rng, self.max_shift) if shift else self.images[i]
            pixels.append(self.vla.image_processor(image))
        ids, lab = pad_batch(seqs, labels, self.pad)
        return ids, torch.stack(pixels), lab


@torch.no_grad()
def vqa_accuracy(model, data: VQABatches, rows: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Exact-answer accuracy (first answer token, greedy) per question kind on ``rows`` (no shift)."""
    model.eval()
    out = {}
    for kind in QUESTIONS:
        if kind == "manner":
            continue
        correct = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            ids, pixels, labels = data.batch(0, rows=chunk, kinds=[kind] * len(chunk), shift=False)
            logits = model(input_ids=ids, pixel_values=pixels).logits
            n_patches = logits.shape[1] - ids.shape[1]
            target = labels[:, 1:]
            first = (target != IGNORE).float().argmax(1)
            pred = logits[:, n_patches:-1].argmax(-1)
            idx = torch.arange(len(chunk))
            correct.append((pred[idx, first] == target[idx, first]).float())
        out[kind] = float(torch.cat(correct).mean())
    return out
