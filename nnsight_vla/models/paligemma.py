"""PaliGemma pieces shared by the pi0 and pi0-fast families.

* :func:`build_paligemma_style_tokenizer`: a small tokenizer with the *layout* of PaliGemma's 257152-token
  vocabulary (``<pad> <eos> <bos> <unk>`` first, language pieces, then ``<loc....>`` tokens, then the 128
  ``<seg...>`` tokens as the last ids, ``<image>`` right after the vocabulary). The FAST id formula
  ``id = V - 1 - 128 - t`` therefore lands on ``<loc>`` tokens exactly as it does on the real vocabulary.
* :class:`PI0ImageProcessorPil`: transformers' ``PI0ImageProcessor`` (resize inside 224x224 keeping the aspect
  ratio, rescale to [-1, 1], pad to 224x224) on transformers' PIL backend. The published class needs torchvision,
  which does not install beside torch 2.13 here; this twin reads and writes the same ``image_processor`` dict.
* :class:`TiedUnembedding`: an ``lm_head`` for a backbone whose output projection is its input embedding.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from transformers import PreTrainedTokenizerFast
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import PILImageResampling

from .tokenizer import TINY_CORPUS, train_language_bpe

#: PaliGemma's sentencepiece vocabulary: 256000 Gemma pieces + 1024 ``<loc>`` + 128 ``<seg>`` tokens.
PALIGEMMA_VOCAB_SIZE = 257152
PALIGEMMA_SEG_TOKENS = 128

# Widths of the tiny Gemma backbone and SigLIP tower that tiny pi0 and pi0-FAST models share.
TINY_GEMMA = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                   vision_use_head=False)

# Prompts the tiny tokenizers should split into few pieces (openpi's pi0 and pi0-FAST prompt formats).
PALIGEMMA_TINY_CORPUS = [
    *TINY_CORPUS,
    "Task: pick up the black bowl, State: 128 127 0 255 64 191 3;\nAction: |",
    "Task: put the bowl on the plate, State: 12 34 56 78 90 123 245;\nAction: |",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 128 200 255",
]


def loc_token(index: int) -> str:
    return f"<loc{index:04d}>"


def seg_token(index: int) -> str:
    return f"<seg{index:03d}>"


def build_paligemma_style_tokenizer(
    vocab_size: int = 1024,
    n_loc: int = 256,
    n_seg: int = PALIGEMMA_SEG_TOKENS,
    corpus: Iterable[str] = PALIGEMMA_TINY_CORPUS,
) -> PreTrainedTokenizerFast:
    """A Gemma-style BPE of exactly ``vocab_size`` ids laid out like PaliGemma's vocabulary, plus ``<image>``.

    Ids 0..3 are ``<pad> <eos> <bos> <unk>`` (Gemma's), then language pieces (BPE trained on ``corpus``, padded
    with inert ``<unusedN>`` fillers), then ``n_loc`` ``<loc....>`` tokens, then ``n_seg`` ``<seg...>`` tokens
    ending at id ``vocab_size - 1``; ``<image>`` is id ``vocab_size``. Encoding adds no special tokens (prompts
    put ``<bos>`` in explicitly, as openpi and transformers' PI0 processor do).
    """
    n_language = vocab_size - n_loc - n_seg
    if n_language < 128:
        raise ValueError(
            f"vocab_size {vocab_size} leaves {n_language} language ids after {n_loc} <loc> and {n_seg} <seg> tokens; "
            "use at least 128 more"
        )
    # Gemma keeps spaces as "▁" inside pieces and adds no dummy prefix
    tok = train_language_bpe(corpus, n_language, ["<pad>", "<eos>", "<bos>", "<unk>"], prepend_scheme="never",
                             filler="<unused{}>")
    tok.add_tokens([loc_token(i) for i in range(n_loc)] + [seg_token(i) for i in range(n_seg)])
    tok.add_special_tokens(["<image>"])
    if tok.get_vocab_size() != vocab_size + 1 or tok.token_to_id(seg_token(n_seg - 1)) != vocab_size - 1:
        raise RuntimeError(f"tiny PaliGemma tokenizer layout is off: {tok.get_vocab_size()} ids")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


class PI0ImageProcessorPil(PilBackend):
    """transformers' ``PI0ImageProcessor`` on the PIL backend (same attributes, same saved dict).

    Resize so the image fits ``size`` (max height/width, aspect kept, bicubic), rescale to [0, 1], normalise
    with mean = std = 0.5 (-> [-1, 1]), then pad bottom/right with 0 to ``pad_size``.
    """

    resample = PILImageResampling.BICUBIC
    image_mean = [0.5, 0.5, 0.5]
    image_std = [0.5, 0.5, 0.5]
    size = {"max_height": 224, "max_width": 224}
    default_to_square = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True
    image_seq_length = 256
    pad_size = {"height": 224, "width": 224}
    do_pad = True

    @classmethod
    def from_config_dict(cls, data: dict) -> "PI0ImageProcessorPil":
        """Build from a saved ``image_processor`` dict (``processor_config.json`` or ``preprocessor_config.json``)."""
        keep = {k: v for k, v in data.items() if k not in ("image_processor_type", "processor_class", "backend")}
        return cls(**keep)


class TiedUnembedding(nn.Module):
    """``lm_head`` of a backbone whose unembedding is its (tied) input embedding: ``logits = h @ E.T``.

    The embedding is referenced, not registered, so this module adds no parameters and no checkpoint keys.
    ``weight`` is the embedding matrix itself (not scaled: Gemma multiplies by sqrt(d_model) on the *input*
    side only; PaliGemma's tied ``lm_head`` is the raw matrix).
    """

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._embedding = [embedding]  # a list keeps nn.Module from registering it as a child

    @property
    def weight(self) -> torch.Tensor:
        return self._embedding[0].weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden, self.weight.to(hidden.dtype))

    def extra_repr(self) -> str:
        vocab, dim = self.weight.shape
        return f"in_features={dim}, out_features={vocab}, tied to the input embedding"
