"""FAST action tokenizer (Pertsch et al. 2025), the action codec of pi0-FAST: DCT + BPE, both directions.

:class:`FastActionTokenizer` trains, encodes, decodes, saves and loads the published ``physical-intelligence/fast``
layout (``processor_config.json`` + the BPE's ``tokenizer.json``; no checkpoint code is ever run). The numeric steps
and the PaliGemma id mapping live in :mod:`.fast_codec`. A sequence that does not decode gives zeros of the expected
shape (what openpi does) with a logged warning; :meth:`~FastActionTokenizer.decode_with_info` says why, and
``strict=True`` raises :class:`FastDecodeError`. Zeros are zeros in normalised space: after un-normalisation they
are the centre of the range, "no motion" only for centred delta actions.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from huggingface_hub import snapshot_download
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .. import files
from ..errors import CheckpointError, FastDecodeError, FastEncodeError
from .fast_codec import (
    PALIGEMMA_SKIP_TOKENS,
    PALIGEMMA_VOCAB_SIZE,
    action_token_ids,
    chunk_to_coefficients,
    coefficients_to_chunk,
    fast_to_vlm_ids,
    is_torch,
    vlm_to_fast_ids,
)

logger = logging.getLogger(__name__)

__all__ = [
    "PALIGEMMA_SKIP_TOKENS", "PALIGEMMA_VOCAB_SIZE", "DecodeResult", "FastActionTokenizer", "FastDecodeError",
    "FastEncodeError", "action_token_ids", "chunk_to_coefficients", "coefficients_to_chunk", "fast_to_vlm_ids",
    "vlm_to_fast_ids",
]

PROCESSOR_CONFIG_NAME = "processor_config.json"
_CONFIG_CANDIDATES = (PROCESSOR_CONFIG_NAME, "preprocessor_config.json")
# Older transformers saved a processor's tokenizer flat; newer ones may put it in a sub-folder named
# after the processor attribute ("bpe_tokenizer" in the published processor).
_TOKENIZER_DIR_CANDIDATES = (".", "bpe_tokenizer", "tokenizer")
_MAX_CHAR = 0xD7FF  # chr() above this hits the surrogate range, which tokenizers (Rust) cannot hold


@dataclass(frozen=True)
class DecodeResult:
    """What :meth:`FastActionTokenizer.decode_with_info` returns.

    ``actions``: ``(time_horizon, action_dim)`` float64, zeros when ``valid`` is False.
    ``valid``: the actions came from the tokens (possibly repaired, see ``repaired``).
    ``error``: why the sequence was rejected (None when valid).
    ``n_coefficients``: how many coefficients the tokens decoded to (0 if they did not decode at all);
    ``expected_coefficients`` = ``time_horizon * action_dim``.
    ``repaired``: ``relaxed=True`` zero-padded a short sequence or cut a long one.
    """

    actions: np.ndarray
    valid: bool
    error: str | None = None
    n_coefficients: int = 0
    expected_coefficients: int = 0
    repaired: bool = False


class FastActionTokenizer:
    """DCT + BPE action tokenizer, compatible with the published ``physical-intelligence/fast`` files.

    Build one with :meth:`train` (fits the BPE on action chunks) or :meth:`from_pretrained`
    (a folder in the published layout, or a hub id). ``action_dim`` / ``time_horizon`` are optional
    defaults for :meth:`decode` (the published universal tokenizer leaves both unset); when
    ``action_dim`` is set, :meth:`encode` also checks chunks against it.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        scale: float = 10.0,
        vocab_size: int | None = None,
        min_token: int = 0,
        action_dim: int | None = None,
        time_horizon: int | None = None,
    ):
        # accept a transformers PreTrainedTokenizerFast too; the work is done on its Rust backend, so
        # transformers' own pre/post-processing (special tokens, space clean-up) never interferes
        backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        if not isinstance(backend, Tokenizer):
            raise TypeError(
                "tokenizer must be a tokenizers.Tokenizer or a transformers PreTrainedTokenizerFast, "
                f"got {type(tokenizer).__name__}"
            )
        if not np.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.tokenizer: Tokenizer = backend
        self.scale = float(scale)
        self.vocab_size = int(vocab_size) if vocab_size is not None else backend.get_vocab_size()
        self.min_token = int(min_token)
        self.action_dim = _opt_pos_int(action_dim, "action_dim")
        self.time_horizon = _opt_pos_int(time_horizon, "time_horizon")
        self._representable: np.ndarray | None = None  # lazily probed, see _alphabet()

    # ------------------------------------------------------------------ properties

    @property
    def fast_vocab_size(self) -> int:
        """Number of FAST token ids the BPE model really has (ids are ``0 .. fast_vocab_size - 1``)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def max_token(self) -> int:
        """Largest quantised coefficient the vocabulary can represent (``min_token`` is the smallest)."""
        return self.min_token + int(np.flatnonzero(self._alphabet())[-1])

    def __repr__(self) -> str:
        return (
            f"FastActionTokenizer(scale={self.scale:g}, vocab_size={self.vocab_size}, "
            f"fast_vocab_size={self.fast_vocab_size}, min_token={self.min_token}, "
            f"action_dim={self.action_dim}, time_horizon={self.time_horizon})"
        )

    def _alphabet(self) -> np.ndarray:
        """Boolean mask over shifted values 0..K: True where ``chr(v)`` survives encode -> decode.

        Probed once instead of trusted from the config: the published fit only guarantees the
        alphabet fits in ``[0, vocab_size]``, and a byte-level BPE can have holes (values never seen
        in training), which BPE would otherwise drop silently.
        """
        if self._representable is None:
            top = min(max(self.vocab_size, self.fast_vocab_size), _MAX_CHAR)
            chars = [chr(i) for i in range(top + 1)]
            encs = self.tokenizer.encode_batch(chars, add_special_tokens=False)
            decs = self.tokenizer.decode_batch([e.ids for e in encs], skip_special_tokens=False)
            mask = np.array([d == c for d, c in zip(decs, chars)], dtype=bool)
            if not mask.any():
                raise CheckpointError(
                    "this BPE tokenizer cannot represent any FAST coefficient (no chr(0..vocab_size) "
                    "character survives encode -> decode); is it really a FAST tokenizer?"
                )
            self._representable = mask
        return self._representable

    # ------------------------------------------------------------------ encode

    def _chunk_to_string(self, chunk: Any, on_out_of_range: str) -> str:
        if on_out_of_range not in ("clip", "raise"):
            raise ValueError(f"on_out_of_range must be 'clip' or 'raise', got {on_out_of_range!r}")
        if is_torch(chunk):
            chunk = chunk.detach().cpu().numpy()
        try:
            arr = np.asarray(chunk, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise FastEncodeError(f"an action chunk must be a numeric (time_horizon, action_dim) array: {exc}") from exc
        if arr.ndim != 2:
            raise FastEncodeError(
                f"an action chunk must have rank 2 (time_horizon, action_dim); got shape {arr.shape}. "
                "Use encode_batch for (batch, time_horizon, action_dim)."
            )
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise FastEncodeError(f"an action chunk must be non-empty, got shape {arr.shape}")
        if self.action_dim is not None and arr.shape[1] != self.action_dim:
            raise FastEncodeError(
                f"this tokenizer was configured for action_dim={self.action_dim}; got a chunk of shape {arr.shape}"
            )
        if not np.isfinite(arr).all():
            bad = np.argwhere(~np.isfinite(arr))
            raise FastEncodeError(
                f"action chunk has {len(bad)} non-finite value(s) (NaN/inf), first at (t, d)="
                f"{tuple(int(i) for i in bad[0])}; FAST needs finite, normalised actions"
            )
        shifted = chunk_to_coefficients(arr, self.scale).ravel() - self.min_token  # frequency-major
        alphabet = self._alphabet()
        ok = (shifted >= 0) & (shifted < alphabet.size)
        ok[ok] = alphabet[shifted[ok]]
        if not ok.all():
            # Why not fail: values slightly outside the fitted range are normal for quantile-normalised
            # data; snapping to the nearest representable coefficient is the least damaging encoding.
            n_bad = int((~ok).sum())
            lo, hi = self.min_token, self.max_token
            msg = (
                f"{n_bad} of {shifted.size} quantised DCT coefficients fall outside what this tokenizer "
                f"can represent (range [{lo}, {hi}] at scale {self.scale:g}, e.g. "
                f"{int(shifted[~ok][0]) + self.min_token}); is the chunk normalised to about [-1, 1]? "
                f"(max |action| = {np.abs(arr).max():.3g})"
            )
            if on_out_of_range == "raise":
                raise FastEncodeError(msg)
            logger.warning("%s Clipping them to the nearest representable value.", msg)
            valid_vals = np.flatnonzero(alphabet)
            pos = np.clip(np.searchsorted(valid_vals, shifted), 1, valid_vals.size - 1) if valid_vals.size > 1 else None
            if pos is None:
                shifted = np.full_like(shifted, valid_vals[0])
            else:
                left, right = valid_vals[pos - 1], valid_vals[pos]
                nearest = np.where(np.abs(shifted - left) <= np.abs(right - shifted), left, right)
                shifted = np.where(ok, shifted, nearest)
        return "".join(map(chr, shifted.tolist()))

    def encode(self, chunk: Any, *, on_out_of_range: str = "clip") -> list[int]:
        """FAST token ids of one action chunk ``(time_horizon, action_dim)`` (normalised to about [-1, 1]).

        Raises :class:`FastEncodeError` for a chunk that is not rank 2, has the wrong ``action_dim``
        (when configured), or holds NaN/inf. Coefficients the vocabulary cannot represent (chunk far
        outside the normalised range) are clipped to the nearest representable value with a logged
        warning (``on_out_of_range="clip"``, the published behaviour made visible) or raise
        (``on_out_of_range="raise"``). Actions themselves are never clipped.
        """
        return self.encode_batch([chunk], on_out_of_range=on_out_of_range)[0]

    def encode_batch(self, chunks: Any, *, on_out_of_range: str = "clip") -> list[list[int]]:
        """:meth:`encode` for a ``(batch, T, D)`` array or a sequence of ``(T_i, D)`` chunks."""
        if is_torch(chunks):
            chunks = chunks.detach().cpu().numpy()
        if isinstance(chunks, np.ndarray) and chunks.ndim != 3:
            raise FastEncodeError(
                f"encode_batch wants (batch, time_horizon, action_dim) or a list of chunks; got shape {chunks.shape}"
            )
        strings = [self._chunk_to_string(c, on_out_of_range) for c in chunks]
        encs = self.tokenizer.encode_batch(strings, add_special_tokens=False)
        ids = [e.ids for e in encs]
        # BPE silently drops characters it has no token for; the alphabet probe should make that
        # impossible, and this check guarantees a token sequence never lies about its chunk.
        for s, d in zip(strings, self.tokenizer.decode_batch(ids, skip_special_tokens=False)):
            if s != d:
                raise FastEncodeError(
                    "the BPE tokenizer did not encode the coefficient string losslessly "
                    f"({len(s)} characters in, {len(d)} out); the tokenizer files do not match this FAST config"
                )
        return ids

    # ------------------------------------------------------------------ decode

    def _resolve_shape(self, time_horizon: int | None, action_dim: int | None) -> tuple[int, int]:
        t = _opt_pos_int(time_horizon, "time_horizon") or self.time_horizon
        d = _opt_pos_int(action_dim, "action_dim") or self.action_dim
        if t is None or d is None:
            raise ValueError(
                "decoding needs time_horizon and action_dim: pass them to decode() or set them on the "
                f"tokenizer (got time_horizon={t}, action_dim={d})"
            )
        return t, d

    def decode_with_info(
        self, token_ids: Any, time_horizon: int | None = None, action_dim: int | None = None, *,
        strict: bool = False, relaxed: bool = False,
    ) -> DecodeResult:
        """Decode one FAST sequence and say whether it was valid (see :class:`DecodeResult`).

        A sequence is invalid when an id is outside ``[0, fast_vocab_size)``, a decoded character is
        outside the FAST alphabet (e.g. a byte-level BPE cut mid-character), or it decodes to a
        number of coefficients other than ``time_horizon * action_dim``. Invalid -> zeros, a logged
        warning and ``valid=False``; with ``strict=True`` -> :class:`FastDecodeError`.
        ``relaxed=True`` instead zero-pads a short (truncated) sequence / cuts a long one to the expected
        length; because the order is frequency-major, padding drops only the highest frequencies.
        """
        t, d = self._resolve_shape(time_horizon, action_dim)
        expected = t * d
        if is_torch(token_ids):
            token_ids = token_ids.detach().cpu().numpy()
        arr = np.asarray(token_ids)
        if arr.ndim != 1:
            raise ValueError(f"token_ids must be one flat sequence of ids, got shape {arr.shape} (use decode_batch)")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"token_ids must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64)

        def fail(reason: str, n: int = 0) -> DecodeResult:
            if strict:
                raise FastDecodeError(reason)
            logger.warning("invalid FAST sequence, returning zeros of shape (%d, %d): %s", t, d, reason)
            return DecodeResult(np.zeros((t, d)), False, reason, n, expected, False)

        if arr.size == 0:
            return fail("empty token sequence")
        out_of_vocab = arr[(arr < 0) | (arr >= self.fast_vocab_size)]
        if out_of_vocab.size:
            hint = ""
            if (out_of_vocab >= self.fast_vocab_size).all() and out_of_vocab.min() > 100_000:
                hint = " (these look like VLM ids: convert them with vlm_to_fast_ids first)"
            return fail(
                f"{out_of_vocab.size} id(s) outside the FAST vocabulary [0, {self.fast_vocab_size}): "
                f"{sorted(set(out_of_vocab.tolist()))[:10]}{hint}"
            )
        text = self.tokenizer.decode(arr.tolist(), skip_special_tokens=False)
        vals = np.fromiter(map(ord, text), dtype=np.int64, count=len(text))
        alphabet = self._alphabet()
        in_alpha = vals < alphabet.size
        in_alpha[in_alpha] = alphabet[vals[in_alpha]]
        if not in_alpha.all():
            first = int(vals[~in_alpha][0])
            return fail(
                f"{int((~in_alpha).sum())} decoded character(s) outside the FAST alphabet (e.g. U+{first:04X})",
                len(vals),
            )
        n = len(vals)
        repaired = False
        if n != expected:
            if not relaxed:
                return fail(
                    f"tokens decode to {n} coefficients, expected time_horizon * action_dim = {t} * {d} = {expected}",
                    n,
                )
            repaired = True
            logger.info("FAST sequence has %d coefficients, expected %d: %s", n, expected,
                        "zero-padding the missing high frequencies" if n < expected else "dropping the extra ones")
        coeffs = np.zeros(expected, dtype=np.int64)
        coeffs[: min(n, expected)] = vals[:expected] + self.min_token
        actions = coefficients_to_chunk(coeffs.reshape(t, d), self.scale)
        return DecodeResult(actions, True, None, n, expected, repaired)

    def decode(
        self, token_ids: Any, time_horizon: int | None = None, action_dim: int | None = None, *,
        strict: bool = False, relaxed: bool = False,
    ) -> np.ndarray:
        """Actions ``(time_horizon, action_dim)`` (float64) of one FAST sequence; zeros if it is invalid.

        See :meth:`decode_with_info` for what counts as invalid and for the ``strict`` / ``relaxed``
        options; use that method when you need to know whether the fallback was taken.
        """
        return self.decode_with_info(token_ids, time_horizon, action_dim, strict=strict, relaxed=relaxed).actions

    def decode_batch_with_info(
        self, sequences: Iterable[Any], time_horizon: int | None = None, action_dim: int | None = None, *,
        strict: bool = False, relaxed: bool = False,
    ) -> list[DecodeResult]:
        """:meth:`decode_with_info` for each sequence (sequences may have different lengths)."""
        return [self.decode_with_info(s, time_horizon, action_dim, strict=strict, relaxed=relaxed) for s in sequences]

    def decode_batch(
        self, sequences: Iterable[Any], time_horizon: int | None = None, action_dim: int | None = None, *,
        strict: bool = False, relaxed: bool = False,
    ) -> np.ndarray:
        """Actions ``(batch, time_horizon, action_dim)``; invalid sequences give zero chunks (logged)."""
        t, d = self._resolve_shape(time_horizon, action_dim)
        results = self.decode_batch_with_info(sequences, t, d, strict=strict, relaxed=relaxed)
        return np.stack([r.actions for r in results]) if results else np.zeros((0, t, d))

    # ------------------------------------------------------------------ VLM vocabulary

    def fast_to_vlm_ids(self, fast_ids: Any, vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE) -> Any:
        """:func:`fast_to_vlm_ids` checked against this tokenizer's vocabulary."""
        return fast_to_vlm_ids(fast_ids, vlm_vocab_size, fast_vocab_size=self.fast_vocab_size)

    def vlm_to_fast_ids(self, vlm_ids: Any, vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE, *, check: bool = True) -> Any:
        """:func:`vlm_to_fast_ids` checked against this tokenizer's vocabulary."""
        return vlm_to_fast_ids(vlm_ids, vlm_vocab_size, fast_vocab_size=self.fast_vocab_size, check=check)

    def action_token_ids(self, vlm_vocab_size: int = PALIGEMMA_VOCAB_SIZE) -> range:
        """The VLM ids that are this tokenizer's action tokens (see :func:`action_token_ids`)."""
        return action_token_ids(vlm_vocab_size, self.fast_vocab_size)

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        action_chunks: Any,
        *,
        vocab_size: int = 1024,
        scale: float = 10.0,
        min_frequency: int = 2,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        byte_level: bool = False,
        coefficient_range: tuple[int, int] | None = None,
        max_token_length: int = 10000,
    ) -> "FastActionTokenizer":
        """Fit a FAST tokenizer: quantise the DCT of every chunk, then train a BPE on the strings.

        ``action_chunks``: ``(N, T, D)`` or a sequence of ``(T_i, D)`` normalised chunks (same ``D``).
        ``min_token`` and the alphabet come from the smallest / largest quantised coefficient seen;
        ``vocab_size`` must be at least the alphabet size (``max - min + 1``). ``time_horizon`` /
        ``action_dim`` default to the chunks' shape when all chunks share it. ``coefficient_range=(lo, hi)``
        widens the alphabet beyond the data's range (margin for unseen chunks; values outside the
        alphabet are clipped at encode time), as quantised coefficients, i.e. already times ``scale``.

        ``byte_level=False`` (default) trains a plain BPE on the characters (no pre-tokenizer, a
        ``Fuse`` decoder): every coefficient is one character, merges may span the whole chunk.
        ``byte_level=True`` uses the published processor's pipeline (ByteLevel pre-tokenizer and
        decoder), with all 256 bytes in the base vocabulary so no value is unrepresentable.
        Training is deterministic for the same data and settings.
        """
        if is_torch(action_chunks):
            action_chunks = action_chunks.detach().cpu().numpy()
        if isinstance(action_chunks, np.ndarray) and action_chunks.ndim == 2:
            raise FastEncodeError("train() wants many chunks: (N, T, D) or a list of (T, D) arrays, got one 2-D array")
        chunks = [np.asarray(c, dtype=np.float64) for c in action_chunks]
        if not chunks:
            raise FastEncodeError("train() needs at least one action chunk")
        for i, c in enumerate(chunks):
            if c.ndim != 2 or 0 in c.shape:
                raise FastEncodeError(
                    f"chunk {i} must be a non-empty (time_horizon, action_dim) array, got shape {c.shape}"
                )
            if not np.isfinite(c).all():
                raise FastEncodeError(f"chunk {i} has NaN/inf values; FAST needs finite, normalised actions")
        dims = {c.shape[1] for c in chunks}
        if len(dims) != 1:
            raise FastEncodeError(f"all chunks must share action_dim, got {sorted(dims)}")
        horizons = {c.shape[0] for c in chunks}
        if action_dim is None:
            action_dim = dims.pop()
        if time_horizon is None and len(horizons) == 1:
            time_horizon = next(iter(horizons))

        coeffs = [chunk_to_coefficients(c, scale).ravel() for c in chunks]
        lo = int(min(c.min() for c in coeffs))
        hi = int(max(c.max() for c in coeffs))
        if coefficient_range is not None:
            want_lo, want_hi = (int(v) for v in coefficient_range)
            if want_lo > want_hi:
                raise ValueError(f"coefficient_range must be (lo, hi) with lo <= hi, got {coefficient_range}")
            lo, hi = min(lo, want_lo), max(hi, want_hi)
        alphabet_size = hi - lo + 1
        if alphabet_size > vocab_size:
            raise ValueError(
                f"quantised DCT coefficients span {alphabet_size} values ([{lo}, {hi}] at scale {scale:g}); "
                f"vocab_size={vocab_size} must be at least that (raise vocab_size or lower scale)"
            )
        if alphabet_size > _MAX_CHAR:
            raise ValueError(f"coefficient range {alphabet_size} is too wide to map onto characters; lower scale")
        if vocab_size - alphabet_size < min(100, vocab_size // 4):
            logger.warning(
                "the coefficient alphabet (%d values) leaves few BPE merges in vocab_size=%d; "
                "consider a larger vocab_size",
                alphabet_size, vocab_size,
            )
        strings = ["".join(map(chr, (c - lo).tolist())) for c in coeffs]

        tok = Tokenizer(models.BPE())
        if byte_level:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            initial = pre_tokenizers.ByteLevel.alphabet()
        else:
            tok.decoder = decoders.Fuse()  # without a decoder, decode() would join tokens with spaces
            initial = [chr(i) for i in range(alphabet_size)]
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=initial,
            max_token_length=max_token_length,
        )
        tok.train_from_iterator(strings, trainer=trainer, length=len(strings))
        return cls(
            tok, scale=scale, vocab_size=vocab_size, min_token=lo, action_dim=action_dim, time_horizon=time_horizon
        )

    # ------------------------------------------------------------------ files

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write the published layout: ``processor_config.json``, ``tokenizer.json``, ``tokenizer_config.json``.

        The folder loads back with :meth:`from_pretrained`, and its tokenizer with transformers'
        ``AutoTokenizer`` / ``PreTrainedTokenizerFast``. No ``auto_map`` is written: this folder
        carries no processor code, so transformers' ``AutoProcessor`` cannot load it.
        """
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        files.write_text(out / "tokenizer.json", self.tokenizer.to_str(pretty=True))
        files.write_text(
            out / "tokenizer_config.json",
            json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                        "model_max_length": 1_000_000}, indent=2),
        )
        files.write_text(out / "special_tokens_map.json", "{}")
        config = {
            "action_dim": self.action_dim,
            "min_token": self.min_token,
            "processor_class": "UniversalActionProcessor",
            "scale": _json_number(self.scale),
            "time_horizon": self.time_horizon,
            "vocab_size": self.vocab_size,
        }
        files.write_text(out / PROCESSOR_CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        time_horizon: int | None = None,
        action_dim: int | None = None,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
    ) -> "FastActionTokenizer":
        """Load a FAST tokenizer folder (published layout) or a hub id (e.g. ``physical-intelligence/fast``).

        Reads ``processor_config.json`` (or ``preprocessor_config.json``) for ``scale``, ``min_token``,
        ``vocab_size``, ``action_dim``, ``time_horizon`` and the BPE from ``tokenizer.json`` (at the top or
        in a ``bpe_tokenizer/`` / ``tokenizer/`` sub-folder). Hub ids are fetched with ``huggingface_hub``
        (JSON files only; the repository's Python is never run); offline this raises
        :class:`~nnsight_vla.errors.CheckpointError`. ``time_horizon`` / ``action_dim`` override the config.
        """
        folder = _resolve_folder(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
        config_path = next((folder / n for n in _CONFIG_CANDIDATES if (folder / n).is_file()), None)
        if config_path is None:
            raise CheckpointError(
                f"{folder} has no {' or '.join(_CONFIG_CANDIDATES)}; a FAST tokenizer folder needs one "
                "(with scale, min_token, vocab_size)"
            )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"cannot read {config_path}: {exc}") from exc
        # some savers nest the processor's kwargs
        if "min_token" not in config and isinstance(config.get("processor_kwargs"), dict):
            config = config["processor_kwargs"]
        missing = [k for k in ("min_token", "scale") if config.get(k) is None]
        if missing:
            raise CheckpointError(f"{config_path} lacks {missing}; a FAST processor config needs scale and min_token")
        candidates = (folder / sub / "tokenizer.json" for sub in _TOKENIZER_DIR_CANDIDATES)
        tok_path = next((path for path in candidates if path.is_file()), None)
        if tok_path is None:
            raise CheckpointError(
                f"{folder} has no tokenizer.json (looked in {', '.join(_TOKENIZER_DIR_CANDIDATES)}); "
                "the FAST BPE tokenizer must be saved next to the processor config"
            )
        try:
            tok = Tokenizer.from_file(str(tok_path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"cannot load the BPE tokenizer {tok_path}: {exc}") from exc
        try:
            return cls(
                tok,
                scale=float(config["scale"]),
                vocab_size=config.get("vocab_size"),
                min_token=int(config["min_token"]),
                action_dim=action_dim if action_dim is not None else config.get("action_dim"),
                time_horizon=time_horizon if time_horizon is not None else config.get("time_horizon"),
            )
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"bad value in {config_path}: {exc}") from exc

    def as_hf_tokenizer(self):
        """The BPE as a transformers ``PreTrainedTokenizerFast`` (shares this tokenizer's backend)."""
        return PreTrainedTokenizerFast(tokenizer_object=self.tokenizer, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _opt_pos_int(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or int(value) != value or int(value) <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def _json_number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def _resolve_folder(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> Path:
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    looks_like_repo = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not path.exists()
    if not looks_like_repo:
        raise CheckpointError(f"{name!r} is neither an existing folder nor a hub id of the form 'owner/name'")
    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=["*.json"],  # config + tokenizer; never the repository's Python code
            )
        )
    except Exception as exc:
        raise CheckpointError(
            f"{name!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}). Offline? Download the folder elsewhere and pass its path."
        ) from exc
