"""Phase 1: language pretraining of the Llama backbone on the generated corpus (next-token prediction).

Only ``language_model`` (the Llama) is trained; the vision tower and projector keep their initial weights
until phase 2, as a language model is what a VLM's backbone starts from. The same text batches are mixed into
phase 2 (:class:`TextBatches` is shared) so that the language neurons survive the action fine-tuning.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

IGNORE = -100


ANSWER_MARK = "\nOut:"


def encode_document(tokenizer, text: str, empty_token_id: int | None) -> list[int]:
    """Token ids of a document (``<s>`` first). A question/answer document ``In: ...?\\nOut: answer`` is encoded
    as OpenVLA's prompt -- the question ending with "Out:" plus the standalone "▁" token that OpenVLA appends --
    followed by the answer, so the answer is predicted exactly where phase 2 predicts the first action token."""
    if ANSWER_MARK in text and empty_token_id is not None:
        cut = text.index(ANSWER_MARK) + len(ANSWER_MARK)
        prompt, answer = text[:cut], text[cut:].strip()
        return tokenizer(prompt).input_ids + [empty_token_id] + tokenizer(answer, add_special_tokens=False).input_ids
    return tokenizer(text).input_ids


class TextBatches:
    """Tokenised documents, served as right-padded random batches from a seeded generator.

    Each document is ``<s> text </s>`` (truncated to ``max_len``; question/answer documents as in
    :func:`encode_document`); the labels are the inputs with padding ignored (the model shifts them itself).
    """

    def __init__(self, tokenizer, documents: Sequence[str], max_len: int = 48, seed: int = 0):
        if not documents:
            raise ValueError("no documents to train on")
        eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id
        empty = tokenizer.convert_tokens_to_ids("▁")
        empty = None if empty is None or empty == tokenizer.unk_token_id else int(empty)
        self.docs = []
        for text in documents:
            ids = encode_document(tokenizer, text, empty)[: max_len - 1] + [eos]
            self.docs.append(np.asarray(ids, dtype=np.int64))
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.docs)

    def batch(self, size: int, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, labels), both (size, T)."""
        if indices is None:
            indices = self.rng.integers(len(self.docs), size=size)
        docs = [self.docs[int(i)] for i in indices]
        return pad_batch(docs, docs, self.pad)


def pad_batch(seqs: Sequence, labels: Sequence, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token sequences and their labels into (B, T) int64 tensors: ``pad`` in the ids, ``IGNORE`` in
    the labels (every training batch -- text, actions, grounding questions -- is built this way)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    lab = np.full((len(seqs), width), IGNORE, dtype=np.int64)
    for row, (s, l) in enumerate(zip(seqs, labels)):
        ids[row, : len(s)] = s
        lab[row, : len(l)] = l
    return torch.from_numpy(ids), torch.from_numpy(lab)


def lm_loss(language_model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a causal LM (padding ignored)."""
    logits = language_model(input_ids=ids).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE
    )


def cosine_schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10 % (a multiplier of the base learning rate)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(params, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (1-d tensors), as usual for transformers
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )


def train_language(
    language_model: nn.Module,
    batches: TextBatches,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    warmup: int = 50,
    log: Callable[[dict], None] | None = None,
    log_every: int = 25,
    eval_batches: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``language_model`` for ``steps`` AdamW steps on ``batches``; returns the loss records."""
    from tqdm.auto import tqdm

    language_model.train()
    opt = make_optimizer(language_model.parameters(), lr)
    records = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="phase 1 (language)", disable=not progress, mininterval=10)
    running = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * cosine_schedule(step, steps, warmup)
        ids, labels = batches.batch(batch_size)
        loss = lm_loss(language_model, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(language_model.parameters(), 1.0)
        opt.step()
        running.append(float(loss.detach()))
        if (step + 1) % log_every == 0 or step + 1 == steps:
            record = {"phase": 1, "step": step + 1, "loss": float(np.mean(running)), "lr": opt.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - t0}
            if eval_batches is not None:
                record["eval_loss"] = evaluate_lm(language_model, *eval_batches)
                language_model.train()
            running = []
            records.append(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            if log is not None:
                log(record)
    language_model.eval()
    return records


@torch.no_grad()
def evaluate_lm(language_model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    language_model.eval()
    return float(lm_loss(language_model, ids, labels))


@torch.no_grad()
def manner_accuracy(language_model: nn.Module, tokenizer, n_per_cell: int = 24, seed: int = 0) -> dict[str, float]:
    """Does the language model compute the manner an instruction asks for? Accuracy of the canonical answer
    (argmax among quickly / slowly / normally, or high / low / normally) to "How fast / How high should the
    robot move to {instruction}?", per phrase set (demo, language, words) and polarity (plain phrases vs
    negated opposites: copying a word gets the negated ones wrong)."""
    from .corpus import (CANONICAL, DEMO_PHRASES, LANGUAGE_PHRASES, LEXICON, NEUTRAL_ANSWER, OPPOSITE, TASK_BASES,
                         negate)

    language_model.eval()
    empty = tokenizer.convert_tokens_to_ids("▁")
    rng = np.random.default_rng(seed)
    sets = {"demo": DEMO_PHRASES, "language": LANGUAGE_PHRASES,
            "words": {c: LEXICON[c]["adv"] for c in ("fast", "slow", "high", "low")}}
    out = {}
    for set_name, table in sets.items():
        for negated in (False, True):
            correct = []
            for concept in ("fast", "slow", "high", "low"):
                kind = "fast" if concept in ("fast", "slow") else "high"
                question = f"How {kind} should the robot move to"
                options = [CANONICAL[kind], CANONICAL[OPPOSITE[kind]], NEUTRAL_ANSWER]
                option_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in options]
                source = table[OPPOSITE[concept]] if negated else table[concept]
                prompts = []
                for _ in range(n_per_cell // 4):
                    phrase = source[int(rng.integers(len(source)))]
                    base = TASK_BASES[int(rng.integers(len(TASK_BASES)))]
                    prompts.append(f"In: {question} {base} {negate(phrase) if negated else phrase}?\nOut:")
                for text in prompts:
                    ids = tokenizer(text).input_ids + [empty]
                    logits = language_model(input_ids=torch.tensor([ids])).logits[0, -1]
                    pick = options[int(torch.argmax(logits[option_ids]))]
                    correct.append(pick == CANONICAL[concept])
            out[f"{set_name}{'_negated' if negated else ''}"] = float(np.mean(correct))
    return out
