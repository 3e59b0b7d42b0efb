"""FAST's numeric steps and its place in the PaliGemma vocabulary, as pure functions.

A normalised action chunk ``(T, D)`` becomes FAST characters in four steps: DCT-II along time per dimension
(``norm="ortho"``), times ``scale`` and rounded, flattened frequency-major (coefficient 0 of every dimension
first, as the published ``physical-intelligence/fast`` does, so BPE merges the mostly-zero high frequencies),
then shifted by ``min_token`` into characters that a BPE turns into FAST ids. pi0-FAST writes FAST id t as
vocabulary id ``V - 1 - 128 - t`` (V = 257152 for PaliGemma): the end of the vocabulary, below its last 128 ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.fft import dct, idct

PALIGEMMA_VOCAB_SIZE = 257152  # the PaliGemma sentencepiece vocabulary (not the padded embedding size)
PALIGEMMA_SKIP_TOKENS = 128  # last ids of that vocabulary are special tokens; FAST tokens sit just below


def chunk_to_coefficients(chunk: np.ndarray, scale: float) -> np.ndarray:
    """Quantised DCT coefficients of one chunk: ``round(dct_ortho(chunk, axis=0) * scale)``, int64 ``(T, D)``.

    Rounding is numpy's half-to-even (``np.rint``), as in the published processor.
    """
    coeffs = dct(np.asarray(chunk, dtype=np.float64), type=2, axis=0, norm="ortho")
    return np.rint(coeffs * scale).astype(np.int64)


def coefficients_to_chunk(coefficients: np.ndarray, scale: float) -> np.ndarray:
    """Inverse of :func:`chunk_to_coefficients` up to rounding: ``idct_ortho(coefficients / scale, axis=0)``."""
    return idct(np.asarray(coefficients, dtype=np.float64) / scale, type=2, axis=0, norm="ortho")



def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _int_ids(ids: Any, what: str) -> tuple[Any, np.ndarray]:
    """Return (object to compute with, int64 numpy view for checks); keeps torch tensors as tensors."""
    if isinstance(ids, (bool, np.bool_)):
        raise TypeError(f"{what} must be integer token ids, got a bool")
    if is_torch(ids):
        if ids.dtype.is_floating_point or ids.dtype.is_complex or str(ids.dtype) == "torch.bool":
            raise TypeError(f"{what} must be integer token ids, got a tensor of dtype {ids.dtype}")
        return ids, ids.detach().cpu().numpy().astype(np.int64)
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integer token ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    return (int(arr) if arr.ndim == 0 else arr), arr


def action_token_ids(
    vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE,
    fast_vocab_size: int = 2048,
    *,
    skip_tokens: int = PALIGEMMA_SKIP_TOKENS,
) -> range:
    """The VLM ids that carry FAST tokens, ascending: ``range(V - skip - n, V - skip)``.

    FAST id 0 is the *last* id of this range (``V - 1 - skip``), FAST id ``n - 1`` the first.
    ``vlm_vocab_size`` is the text tokenizer's vocabulary size (257152 for PaliGemma), not the
    (possibly padded) embedding size.
    """
    vlm_vocab_size, fast_vocab_size, skip_tokens = int(vlm_vocab_size), int(fast_vocab_size), int(skip_tokens)
    if fast_vocab_size <= 0 or skip_tokens < 0:
        raise ValueError(f"need fast_vocab_size > 0 and skip_tokens >= 0, got {fast_vocab_size}, {skip_tokens}")
    start = vlm_vocab_size - skip_tokens - fast_vocab_size
    if start < 0:
        raise ValueError(
            f"a VLM vocabulary of {vlm_vocab_size} ids cannot hold {fast_vocab_size} FAST tokens "
            f"below its last {skip_tokens} special ids"
        )
    return range(start, vlm_vocab_size - skip_tokens)


def fast_to_vlm_ids(
    fast_ids: Any,
    vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE,
    *,
    fast_vocab_size: int | None = None,
    skip_tokens: int = PALIGEMMA_SKIP_TOKENS,
) -> Any:
    """Map FAST ids to VLM ids: ``vlm_vocab_size - 1 - skip_tokens - fast_id`` (openpi's convention).

    Accepts an int (returns an int), a sequence / numpy array (returns int64 numpy) or a torch tensor
    (returns a tensor). Raises ``ValueError`` for ids outside ``[0, fast_vocab_size)`` (or, when
    ``fast_vocab_size`` is None, ids that would leave the VLM vocabulary).
    """
    obj, arr = _int_ids(fast_ids, "fast_ids")
    upper = fast_vocab_size if fast_vocab_size is not None else vlm_vocab_size - skip_tokens
    bad = arr[(arr < 0) | (arr >= upper)]
    if bad.size:
        raise ValueError(
            f"FAST ids must lie in [0, {upper}); got {sorted(set(bad.ravel().tolist()))[:10]}"
        )
    return vlm_vocab_size - 1 - skip_tokens - obj


def vlm_to_fast_ids(
    vlm_ids: Any,
    vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE,
    *,
    fast_vocab_size: int | None = None,
    skip_tokens: int = PALIGEMMA_SKIP_TOKENS,
    check: bool = True,
) -> Any:
    """Inverse of :func:`fast_to_vlm_ids` (the same formula: the map is an involution).

    With ``check=True`` (default) ids outside :func:`action_token_ids` raise ``ValueError``; with
    ``check=False`` the raw arithmetic is returned (out-of-range results then make
    :meth:`FastActionTokenizer.decode` report an invalid sequence instead of raising).
    """
    obj, arr = _int_ids(vlm_ids, "vlm_ids")
    if check:
        n = fast_vocab_size if fast_vocab_size is not None else vlm_vocab_size - skip_tokens
        valid = action_token_ids(vlm_vocab_size, n, skip_tokens=skip_tokens)
        bad = arr[(arr < valid.start) | (arr >= valid.stop)]
        if bad.size:
            raise ValueError(
                f"VLM ids {sorted(set(bad.ravel().tolist()))[:10]} are not FAST action tokens; "
                f"action tokens are [{valid.start}, {valid.stop}) for a {vlm_vocab_size}-id vocabulary"
            )
    return vlm_vocab_size - 1 - skip_tokens - obj
