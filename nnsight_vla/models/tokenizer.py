"""Small Llama-style tokenizers built offline, for tiny and trained small models.

The real OpenVLA tokenizer is Llama-2's SentencePiece BPE (32000 tokens, ``<unk> <s> </s>`` first, words
start with "▁", a ``<PAD>`` appended at id 32000) whose last 256 ids were repurposed as action bins. This
builds the same shape at a small size with the ``tokenizers`` library: a BPE trained on a corpus, then
``n_action_tokens`` dedicated tokens occupying the last ids of the vocabulary, then ``<PAD>``.
"""

from __future__ import annotations

import string
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# A built-in corpus for tiny random models: robot instructions plus the concept words the paper steers with.
TINY_CORPUS = [
    "pick up the black bowl and place it on the plate",
    "put both the alphabet soup and the tomato sauce in the basket",
    "open the top drawer of the cabinet and put the bowl inside",
    "turn on the stove and put the moka pot on it",
    "move the arm fast quick rapid swift hurry speed",
    "move the arm slow slowly careful carefully gentle gently",
    "lift the object high up raise above top upward",
    "keep the object low down lower below bottom downward",
    "push the block left right forward backward",
    "what action should the robot take to stack the cubes",
]


def action_token_name(bin_index: int) -> str:
    """The token string of action bin ``bin_index`` in small tokenizers."""
    return f"<act_{bin_index}>"


def train_language_bpe(corpus: Iterable[str], n_language: int, special_tokens: list[str], *,
                       prepend_scheme: str, filler: str) -> Tokenizer:
    """A byte-level-alphabet BPE over ``corpus`` with exactly ``n_language`` ids: ``special_tokens`` first, then
    the learned pieces, padded with inert ``filler.format(i)`` tokens when a small corpus does not reach the size
    (so later ids are exact). Spaces are "▁" (Metaspace, ``prepend_scheme`` "first" for Llama, "never" for Gemma).
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    alphabet = sorted(set(string.ascii_letters + string.digits + string.punctuation + "\n▁"))
    trainer = trainers.BpeTrainer(vocab_size=n_language, special_tokens=special_tokens, initial_alphabet=alphabet,
                                  min_frequency=1, show_progress=False)
    tok.train_from_iterator(list(corpus), trainer=trainer)
    padding = [filler.format(i) for i in range(n_language - tok.get_vocab_size())]
    if padding:
        tok.add_tokens(padding)
    return tok


def build_llama_style_tokenizer(
    corpus: Iterable[str] = TINY_CORPUS,
    vocab_size: int = 1024,
    n_action_tokens: int = 256,
) -> PreTrainedTokenizerFast:
    """Train a Llama-style BPE tokenizer of exactly ``vocab_size`` tokens (+ ``<PAD>``) on ``corpus``.

    Ids 0, 1, 2 are ``<unk> <s> </s>``; the last ``n_action_tokens`` ids are action tokens (id
    ``vocab_size - 1 - b`` is bin ``b``, as in OpenVLA); ``<PAD>`` is id ``vocab_size``. Encoding prepends
    ``<s>``. The standalone "▁" token exists (OpenVLA appends it to every prompt).
    """
    n_language = vocab_size - n_action_tokens
    if n_language < 128:
        raise ValueError(
            f"vocab_size {vocab_size} leaves only {n_language} language tokens; use at least {n_action_tokens + 128}"
        )
    tok = train_language_bpe(corpus, n_language, ["<unk>", "<s>", "</s>"], prepend_scheme="first",
                             filler="<unused_{}>")
    tok.add_tokens([action_token_name(b) for b in reversed(range(n_action_tokens))])
    tok.add_special_tokens(["<PAD>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    assert tok.get_vocab_size() == vocab_size + 1, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<PAD>"
    )
