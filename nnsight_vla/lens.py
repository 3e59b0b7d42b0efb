"""The value-vector lens (Step 1 of the method): every FFN value vector projected onto the vocabulary.

Column ``i`` of layer ``l``'s ``down_proj.weight`` is value vector ``w_{l,i}``; its projection is the norm-free logit
lens ``W_U @ w_{l,i}`` with ``W_U = vla.unembedding()`` (as in the paper and the authors' code). Vectors are streamed
in column chunks (one matmul and a top-k per chunk: peak memory ``O(chunk x vocab)``), on the GPU when there is one.
:class:`ValueVectorLens` keeps the top-k ids and scores per vector, cached on disk by model key and a weight
fingerprint (:mod:`.lens_cache`). Unembedding rows with no token (OpenVLA's padding) are left out by default. Only
the language backbone has a projection (pi0's action expert has no unembedding). :func:`checkpoint_diff`
(:mod:`.lens_diff`) compares two checkpoints' lenses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .errors import CheckpointError, IndexOutOfRangeError, InputError
from .lens_cache import (
    CACHE_FORMAT,
    CACHE_VERSION,
    IDENTITY_KEYS,
    CacheWarning,
    cache_key,
    check_files,
    clean_orphans,
    default_cache_dir,
    ensure_weights,
    identity_of,
    mismatch_message,
    read_cache,
    read_sidecar,
    weight_fingerprint,
    write_lens,
    write_table,
)
from .lens_diff import CheckpointDiff, checkpoint_diff

__all__ = [
    "CACHE_FORMAT", "CACHE_VERSION", "CHUNK_BYTES", "CacheWarning", "CheckpointDiff", "ValueVectorLens",
    "auto_chunk_size", "checkpoint_diff", "default_cache_dir", "default_device", "normalize_token", "project_topk",
    "weight_fingerprint", "write_table",
]
#: per-chunk budget for the (chunk x vocab) logits block
CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def normalize_token(token: Any) -> str:
    """A token string for matching words: word-start markers ("▁" SentencePiece, "Ġ" byte-level BPE) and
    surrounding spaces removed, lower-cased. ``"▁Fast"`` -> ``"fast"``; None (no token) -> ``""``."""
    if token is None:
        return ""
    return str(token).replace("▁", " ").replace("Ġ", " ").strip().lower()


# ---------------------------------------------------------------------------------------------------------------
# the streamed projection


def auto_chunk_size(vocab: int, device: str | torch.device, dtype: torch.dtype = torch.float32) -> int:
    """Columns per chunk so that the (chunk x vocab) logits block fits the device's budget."""
    kind = torch.device(device).type
    budget = CHUNK_BYTES.get(kind, CHUNK_BYTES["cpu"])
    itemsize = torch.empty((), dtype=dtype).element_size()
    return int(max(16, budget // (vocab * itemsize)))


def project_topk(
    matrices: Sequence[torch.Tensor] | Sequence[Callable[[], torch.Tensor]],
    unembedding: torch.Tensor,
    k: int,
    *,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    desc: str = "value-vector lens",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of ``unembedding @ W[:, i]`` for every column i of every matrix, streamed in column chunks.

    Args:
        matrices: one ``(d_model, n)`` matrix per layer (value vectors as columns), or zero-argument callables
            returning them (so layers can be fetched lazily).
        unembedding: ``(vocab, d_model)``.
        k: tokens kept per vector.
        chunk_size: columns per matmul (default: :func:`auto_chunk_size`); peak extra memory is
            ``chunk_size x vocab`` scores plus one converted weight chunk.
        device: where to compute (default: "cuda" when available).
        dtype: compute dtype (float32 by default, whatever the weights' dtype).

    Returns:
        ``ids`` int32 and ``scores`` float32 arrays of shape ``(layers, n, k)``, sorted by descending score.
    """
    device = torch.device(device or default_device())
    vocab, d_model = unembedding.shape
    if not 1 <= k <= vocab:
        raise InputError(f"k={k} is out of range: it must be between 1 and the vocabulary size ({vocab})")
    chunk_size = int(chunk_size or auto_chunk_size(vocab, device, dtype))
    if chunk_size < 1:
        raise InputError(f"chunk_size must be a positive number of vectors, got {chunk_size}")
    getters = [m if callable(m) else (lambda m=m: m) for m in matrices]
    with torch.no_grad():
        # the transposed view needs no copy: BLAS/cuBLAS read it as a transposed operand
        unembed_t = unembedding.detach().to(device=device, dtype=dtype).T
        first = getters[0]() if getters else None
        n = int(first.shape[1]) if first is not None else 0
        ids = np.empty((len(getters), n, k), dtype=np.int32)
        scores = np.empty((len(getters), n, k), dtype=np.float32)
        n_chunks = -(-n // chunk_size) if n else 0
        bar = _progress(total=len(getters) * n_chunks, desc=desc, enabled=progress)
        try:
            for layer, get in enumerate(getters):
                weight = first if layer == 0 else get()
                if tuple(weight.shape) != (d_model, n):
                    raise InputError(
                        f"layer {layer} value vectors have shape {tuple(weight.shape)}, expected ({d_model}, {n})"
                    )
                weight = weight.detach()
                for start in range(0, n, chunk_size):
                    stop = min(start + chunk_size, n)
                    block = weight[:, start:stop].to(device=device, dtype=dtype, non_blocking=True)
                    logits = torch.matmul(block.T, unembed_t)  # (chunk, vocab)
                    top = torch.topk(logits, k, dim=1, sorted=True)
                    ids[layer, start:stop] = top.indices.to("cpu", torch.int32).numpy()
                    scores[layer, start:stop] = top.values.to("cpu", torch.float32).numpy()
                    del logits, top, block
                    bar.update(1)
        finally:
            bar.close()
    return ids, scores


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled, leave=False)


# ---------------------------------------------------------------------------------------------------------------
# the lens


class ValueVectorLens:
    """Top-k vocabulary projections of every value vector of one stack of a VLA, cached on disk.

    Args:
        vla: a model from :func:`nnsight_vla.load` / :func:`nnsight_vla.tiny` (weights are loaded if needed).
        k: top tokens kept per value vector (10 in the authors' code; the kNN concept method uses the top 5).
        stack: "backbone" (the language model; the only stack with a projection onto the vocabulary).
        chunk_size: value vectors per matmul (default: sized so a chunk's logits take <= 128 MiB on CPU,
            1 GiB on GPU).
        device: where to compute (default "cuda" when available, else "cpu").
        cache_dir: cache folder (default :func:`default_cache_dir`); ``False`` disables the cache.
        progress: show tqdm progress bars.
        dtype: compute dtype (default float32).
        include_padding: also project onto unembedding rows that have no token (padding rows).

    Attributes:
        ids, scores: ``(num_layers, d_mlp, k)`` int32 token ids / float32 logits, best first.
        from_cache: whether this lens was read from the cache; ``cache_path``: its NPZ file (or None).
        has_action_tokens / action_note: whether action tokens are flagged, and why not.
    """

    def __init__(
        self,
        vla,
        k: int = 10,
        stack: str = "backbone",
        chunk_size: int | None = None,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
        progress: bool = True,
        dtype: str | torch.dtype | None = None,
        include_padding: bool = False,
    ) -> None:
        from .models.base import resolve_dtype

        self.vla = vla
        self.stack = stack
        self.device = str(device or default_device())
        self.dtype = resolve_dtype(dtype) or torch.float32
        self.progress = progress
        self.chunk_size = chunk_size
        self.family = getattr(vla, "family", "")
        self.model_key = vla.model_key
        self.num_layers, self.d_model, self.d_mlp = vla.stack_dims(stack)
        self.stack_attr = vla.stack(stack).attr
        ensure_weights(vla)
        unembedding = vla.unembedding()
        rows, width = unembedding.shape
        if width != self.d_model:
            raise InputError(
                f"no projection onto the vocabulary is defined for the {stack!r} stack of {self.family}: its "
                f"residual width is {self.d_model} but the unembedding maps width {width}. The value-vector lens "
                "(like the paper) analyses the language backbone only; use stack='backbone'"
            )
        n_tokens = _tokenizer_size(vla)
        self.vocab_rows = int(rows) if include_padding or n_tokens is None else int(min(rows, n_tokens))
        self.include_padding = include_padding
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= self.vocab_rows:
            raise InputError(
                f"k={k!r} is out of range: it must be an int between 1 and the vocabulary size ({self.vocab_rows})"
            )
        self.k = int(k)
        self._vocab: list[str] | None = None
        self._token_strings: dict[int, str] = {}
        self._set_action_ids(vla)
        self.fingerprint = weight_fingerprint(
            [vla.value_vectors(layer, stack) for layer in range(self.num_layers)] + [unembedding[: self.vocab_rows]]
        )
        self.key = cache_key(self.identity())
        self.cache_path: Path | None = None
        self.from_cache = False
        self.compute_seconds = 0.0
        if cache_dir is not False:
            folder = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
            self.cache_path = folder / f"lens-{self.family or 'model'}-{stack}-k{self.k}-{self.key[:20]}.npz"
            clean_orphans(folder)
            loaded = read_cache(self.cache_path, self.identity(), strict=False)
            if loaded is not None:
                self.ids, self.scores, _ = loaded
                self.from_cache = True
                return
        started = time.perf_counter()
        self.ids, self.scores = self._project()
        self.compute_seconds = time.perf_counter() - started
        if self.cache_path is not None:
            self.save(self.cache_path)

    # -- construction helpers ----------------------------------------------------------------------------------

    def _project(self) -> tuple[np.ndarray, np.ndarray]:
        vla, stack = self.vla, self.stack
        unembedding = vla.unembedding()[: self.vocab_rows]
        getters = [lambda layer=layer: vla.value_vectors(layer, stack) for layer in range(self.num_layers)]
        return project_topk(
            getters, unembedding, self.k, chunk_size=self.chunk_size, device=self.device, dtype=self.dtype,
            progress=self.progress, desc=f"value-vector lens ({self.family} {stack})",
        )

    def _set_action_ids(self, vla) -> None:
        try:
            ids = np.asarray(vla.action_token_ids, dtype=np.int64)
            self.action_ids = ids[ids < self.vocab_rows]
            self.action_note = ""
        except Exception as error:  # noqa: BLE001 - a family without action tokens (pi0) says why
            self.action_ids = np.zeros(0, dtype=np.int64)
            self.action_note = f"{self.family} has no action tokens ({error}); none are flagged"

    @property
    def has_action_tokens(self) -> bool:
        return len(self.action_ids) > 0

    def identity(self) -> dict:
        """What a cache entry must match: model key, weight fingerprint, stack, k, rows, dtype."""
        return {
            "format": CACHE_FORMAT, "version": CACHE_VERSION, "model_key": self.model_key,
            "fingerprint": self.fingerprint, "stack": self.stack, "k": self.k, "vocab_rows": self.vocab_rows,
            "num_layers": self.num_layers, "d_mlp": self.d_mlp, "d_model": self.d_model,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the lens: ``path`` (NPZ: ``ids``, ``scores``) + ``path.json`` (identity, token strings, action
        ids), both atomically, the NPZ first. The sidecar's SHA-256 seals the arrays' contents and every sidecar
        field but the timestamp (a content hash, not a file hash: two processes writing the same lens agree)."""
        used = np.unique(self.ids)
        sidecar = {
            **self.identity(),
            "family": self.family,
            "include_padding": self.include_padding,
            "arrays": {"ids": ["int32", list(self.ids.shape)], "scores": ["float32", list(self.scores.shape)]},
            "action_ids": [int(i) for i in self.action_ids],
            "action_note": self.action_note,
            "tokens": {str(int(i)): s for i, s in zip(used, self.token_strings(used))},
        }
        return write_lens(Path(path), self.ids, self.scores, sidecar)

    @classmethod
    def from_file(cls, path: str | os.PathLike, vla=None) -> "ValueVectorLens":
        """Read a lens written by :meth:`save` (or a cache entry).

        With ``vla``, the file must have been computed from exactly this model's weights (same model key,
        weight fingerprint and widths); otherwise a :class:`CheckpointError` says which checkpoint it belongs to.
        Without ``vla`` the lens works offline for tables, action share, diffs and keyword concepts (the kNN
        concept method needs the model's input embeddings).
        """
        path = Path(path)
        sidecar = read_sidecar(path)
        lens = cls.__new__(cls)
        if vla is not None:
            expected = identity_of(vla, sidecar)
            lens_identity = {key: sidecar.get(key) for key in expected}
            if lens_identity != expected:
                raise CheckpointError(mismatch_message(path, sidecar, expected))
        problem, arrays = check_files(path, sidecar, sidecar)
        if problem:
            raise CheckpointError(f"lens file {path} is corrupt: {problem}")
        lens.ids, lens.scores = arrays
        lens.vla = vla
        lens.stack = sidecar["stack"]
        lens.k = int(sidecar["k"])
        lens.family = sidecar.get("family", "")
        lens.model_key = sidecar["model_key"]
        lens.fingerprint = sidecar["fingerprint"]
        lens.num_layers, lens.d_mlp, lens.d_model = sidecar["num_layers"], sidecar["d_mlp"], sidecar["d_model"]
        lens.stack_attr = getattr(vla.stack(lens.stack), "attr", lens.stack) if vla is not None else lens.stack
        lens.vocab_rows = int(sidecar["vocab_rows"])
        lens.include_padding = bool(sidecar.get("include_padding", False))
        lens.dtype = getattr(torch, sidecar.get("dtype", "float32"))
        lens.device, lens.progress, lens.chunk_size = default_device(), False, None
        lens.action_ids = np.asarray(sidecar.get("action_ids", []), dtype=np.int64)
        lens.action_note = sidecar.get("action_note", "")
        lens.key = cache_key({k: sidecar.get(k) for k in IDENTITY_KEYS})
        lens.cache_path, lens.from_cache, lens.compute_seconds = path, True, 0.0
        lens._vocab = None
        lens._token_strings = {int(i): s for i, s in sidecar.get("tokens", {}).items()}
        return lens

    # -- token strings -----------------------------------------------------------------------------------------

    def vocabulary(self) -> list[str]:
        """Token strings of every projected row (``""`` for rows with no token). Needs the model's tokenizer;
        a lens read from a file without a model knows only the tokens that occur in its tables."""
        if self._vocab is None:
            tokenizer = getattr(self.vla, "tokenizer", None) if self.vla is not None else None
            if tokenizer is not None:
                tokens = tokenizer.convert_ids_to_tokens(list(range(self.vocab_rows)))
                self._vocab = [t if isinstance(t, str) else "" for t in tokens]
            else:
                self._vocab = [self._token_strings.get(i, "") for i in range(self.vocab_rows)]
        return self._vocab

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        vocab = self.vocabulary()
        return [vocab[int(i)] for i in ids]

    def _vocab_array(self) -> np.ndarray:
        if getattr(self, "_vocab_np", None) is None:
            self._vocab_np = np.asarray(self.vocabulary(), dtype=object)
        return self._vocab_np

    def normalized_vocabulary(self) -> np.ndarray:
        """:func:`normalize_token` of every projected row (object array), for matching words."""
        if getattr(self, "_normalized", None) is None:
            self._normalized = np.asarray([normalize_token(t) for t in self.vocabulary()], dtype=object)
        return self._normalized

    def action_mask(self) -> np.ndarray:
        """Boolean ``(vocab_rows,)``: True at action-token ids."""
        mask = np.zeros(self.vocab_rows, dtype=bool)
        mask[self.action_ids] = True
        return mask

    # -- tables ------------------------------------------------------------------------------------------------

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
            raise InputError(f"layer must be an int, got {layer!r}")
        if not -self.num_layers <= layer < self.num_layers:
            raise IndexOutOfRangeError(
                f"layer {layer} is out of range: the {self.stack} stack has {self.num_layers} layers "
                f"(valid: 0..{self.num_layers - 1}, or negative from the end)"
            )
        return int(layer) % self.num_layers

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.k
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= self.k:
            raise InputError(
                f"k={k!r} is out of range: this lens kept the top {self.k} tokens per vector (1..{self.k}); "
                f"build ValueVectorLens(vla, k={k}) for more"
            )
        return int(k)

    def _neurons(self, neuron) -> np.ndarray:
        neurons = np.arange(self.d_mlp) if neuron is None else np.atleast_1d(np.asarray(neuron))
        if neurons.dtype.kind not in "iu":
            raise InputError(f"neuron must be an int or a list of ints, got {neuron!r}")
        bad = neurons[(neurons < -self.d_mlp) | (neurons >= self.d_mlp)]
        if len(bad):
            raise IndexOutOfRangeError(
                f"neuron {int(bad[0])} is out of range: each layer has {self.d_mlp} value vectors (0..{self.d_mlp - 1})"
            )
        return neurons % self.d_mlp

    def top_tokens(self, layer: int | None = None, neuron: int | Sequence[int] | None = None, k: int | None = None):
        """Top-k tokens of value vectors as a long table (pandas DataFrame).

        Args:
            layer: one layer (negative counts from the end) or None for every layer.
            neuron: one neuron, a list of neurons, or None for all of the layer(s).
            k: how many of the lens's top tokens to show (<= the lens's k).

        Columns: layer, neuron, rank (0 = best), token_id, token (raw string, e.g. "▁fast"), word (normalised:
        marker stripped, lower-case), score (the logit ``W_U[token] . w``), is_action.
        """
        import pandas as pd

        k = self._check_k(k)
        layers = np.arange(self.num_layers) if layer is None else np.asarray([self.check_layer(layer)])
        neurons = self._neurons(neuron)
        ids = self.ids[np.ix_(layers, neurons)][..., :k]
        scores = self.scores[np.ix_(layers, neurons)][..., :k]
        n_l, n_n = len(layers), len(neurons)
        flat_ids = ids.reshape(-1)
        tokens = self._vocab_array()[flat_ids]
        return pd.DataFrame({
            "layer": np.repeat(layers, n_n * k).astype(np.int32),
            "neuron": np.tile(np.repeat(neurons, k), n_l).astype(np.int32),
            "rank": np.tile(np.arange(k), n_l * n_n).astype(np.int16),
            "token_id": flat_ids,
            "token": tokens,
            "word": self.normalized_vocabulary()[flat_ids],
            "score": scores.reshape(-1),
            "is_action": self.action_mask()[flat_ids],
        })

    def to_frame(self, k: int | None = None):
        """Every vector's top tokens (:meth:`top_tokens` over all layers)."""
        return self.top_tokens(None, None, k)

    def action_token_share(self, k: int | None = None):
        """Per layer: the share of top-k tokens that are action tokens (paper: ~0.49 in OpenVLA's layer 31).

        Columns: layer, vectors, top_tokens (vectors x k), action_tokens, share, vectors_with_action (fraction
        of vectors with at least one action token in their top-k). Raises for a model without action tokens.
        """
        import pandas as pd

        if not self.has_action_tokens:
            raise InputError(f"action-token share is undefined: {self.action_note or 'no action tokens are known'}")
        k = self._check_k(k)
        is_action = self.action_mask()[self.ids[..., :k]]
        counts = is_action.sum(axis=(1, 2))
        return pd.DataFrame({
            "layer": np.arange(self.num_layers),
            "vectors": self.d_mlp,
            "top_tokens": self.d_mlp * k,
            "action_tokens": counts,
            "share": counts / float(self.d_mlp * k),
            "vectors_with_action": is_action.any(axis=2).mean(axis=1),
        })

    def vector_tokens(self, layer: int, neuron: int, k: int | None = None) -> list[str]:
        """The top-k token strings of one value vector."""
        layer = self.check_layer(layer)
        (neuron,) = self._neurons(neuron)
        return self.token_strings(self.ids[layer, neuron, : self._check_k(k)])

    def export(self, path: str | os.PathLike, table: str = "top_tokens", k: int | None = None) -> Path:
        """Write a table atomically; the format follows the suffix: ``.parquet``, ``.csv`` or ``.json``.

        ``table``: "top_tokens" (every vector's top-k, long format) or "action_share" (per layer).
        """
        if table == "top_tokens":
            frame = self.to_frame(k)
        elif table == "action_share":
            frame = self.action_token_share(k)
        else:
            raise InputError(f"unknown table {table!r}; use 'top_tokens' or 'action_share'")
        return write_table(frame, path, meta={**self.identity(), "table": table, "family": self.family})

    def __repr__(self) -> str:
        where = f", cache {self.cache_path}" if self.cache_path else ""
        return (f"ValueVectorLens({self.family} {self.stack}: {self.num_layers} layers x {self.d_mlp} vectors, "
                f"vocab {self.vocab_rows}, k={self.k}{', from cache' if self.from_cache else ''}{where})")


def _tokenizer_size(vla) -> int | None:
    tokenizer = getattr(vla, "tokenizer", None)
    return None if tokenizer is None else len(tokenizer)
