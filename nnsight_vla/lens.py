"""The value-vector lens (Step 1 of the method): every FFN value vector projected onto the vocabulary.

Column ``i`` of ``down_proj.weight`` in layer ``l`` is value vector ``w_{l,i}``; its projection is the
norm-free logit lens ``logits = W_U @ w_{l,i}`` with ``W_U = vla.unembedding()`` (as in the paper and the
authors' released code). :class:`ValueVectorLens` keeps the top-k token ids and scores of every vector of a stack.

How it scales (OpenVLA-7B: 32 x 11008 vectors x 32064 vocab, ~9e13 FLOP):

* vectors are streamed in chunks of ``chunk_size`` columns: one ``(chunk, d_model) @ (d_model, vocab)`` matmul
  and a ``topk`` per chunk, so peak extra memory is ``O(chunk x vocab)``; ``vectors x vocab`` never exists;
* it runs on the GPU when there is one (``device="cuda"``), with a tqdm progress bar;
* results are cached on disk (NPZ arrays + a JSON sidecar) keyed by the checkpoint's identity
  (``vla.model_key``), a fingerprint of the weights actually used, the stack, k and the number of rows;
  a second call reads the cache. A corrupt or mismatching cache file is detected and rebuilt, never trusted.

Rows of the unembedding that the tokenizer has no token for (Prismatic pads OpenVLA's 32001 tokens to 32064
rows) are left out by default: they have no string and are never generated (``include_padding=True`` keeps them).

Which stacks can be projected: the language backbone of every family. pi0's action expert has its own width
(1024 vs the backbone's 2048) and no unembedding of its own, so no projection onto the vocabulary is defined
for it; asking for it raises a clear error (the paper analyses the backbone only).

Checkpoint diff (the paper's Fig. 3): :func:`checkpoint_diff` compares the lenses of two checkpoints of one
architecture (e.g. base vs fine-tuned) per layer, per value vector and per token, split into action and
language tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from . import files
from .errors import CheckpointError, IndexOutOfRangeError, InputError

CACHE_FORMAT = "nnsight-vla value-vector lens"
CACHE_VERSION = 1
#: per-chunk budget for the (chunk x vocab) logits block
CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 1024 * 2**20}


class CacheWarning(UserWarning):
    """A lens cache file was found but not used (corrupt, truncated or for other weights); it is rebuilt."""


def default_cache_dir() -> Path:
    """``$NNSIGHT_VLA_CACHE/lens`` or ``~/.cache/nnsight_vla/lens``."""
    root = os.environ.get("NNSIGHT_VLA_CACHE") or Path.home() / ".cache" / "nnsight_vla"
    return Path(root) / "lens"


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


def weight_fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """A cheap, exact fingerprint of weight tensors, the same on every device.

    Each tensor's bit patterns, read as int16 (a 2-D ``(rows, cols)`` view), are summed per column and per row
    residue mod 3 (rows 0, 3, 6...; 1, 4, 7...; 2, 5, 8...) in int64, in one pass: exact integer arithmetic, so
    the result does not depend on summation order, thread count or device (the sums run where the weights
    live: numpy on CPU, torch on GPU; ~85 ms per OpenVLA-7B layer in float32 on 2 CPU cores). The sums are
    hashed with BLAKE2b together with shapes and dtypes. Any change of a single weight changes its column's
    sums, so an edited or retrained model never matches an old cache entry. (A fingerprint, not a
    cryptographic hash: e.g. swapping two rows whose distance is a multiple of 3 goes unnoticed.)
    """
    digest = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for tensor in tensors:
            tensor = tensor.detach()
            digest.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.device.type == "meta":
                raise CheckpointError("the model's weights are not loaded (meta tensors); call vla.dispatch() first")
            flat = tensor.reshape(tensor.shape[0], -1) if tensor.ndim != 2 else tensor
            bits = flat.contiguous().view(torch.int8 if flat.element_size() == 1 else torch.int16)
            rows, cols = bits.shape
            full = rows - rows % 3
            if bits.device.type == "cpu":  # numpy's integer reductions are much faster than torch's on CPU
                array = bits.numpy()
                sums = [array[:full].reshape(full // 3, 3 * cols).sum(0, dtype=np.int64),
                        array[full:].sum(0, dtype=np.int64)]
            else:
                sums = [bits[:full].reshape(full // 3, 3 * cols).sum(0, dtype=torch.int64).cpu().numpy(),
                        bits[full:].sum(0, dtype=torch.int64).cpu().numpy()]
            for part in sums:
                digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
    return digest.hexdigest()


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
        _ensure_weights(vla)
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
        self.key = _cache_key(self.identity())
        self.cache_path: Path | None = None
        self.from_cache = False
        self.compute_seconds = 0.0
        if cache_dir is not False:
            folder = Path(cache_dir) if cache_dir not in (None, True) else default_cache_dir()
            self.cache_path = folder / f"lens-{self.family or 'model'}-{stack}-k{self.k}-{self.key[:20]}.npz"
            loaded = _read_cache(self.cache_path, self.identity(), strict=False)
            if loaded is not None:
                self.ids, self.scores, sidecar = loaded
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
        """Write the lens: ``path`` (NPZ: ``ids``, ``scores``) + ``path.json`` (identity, checksum, token strings,
        action ids), both atomically. The NPZ is written first; the sidecar's SHA-256 of the arrays' contents
        seals the pair (a content hash, not a file hash: two processes writing the same lens agree on it)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise InputError(f"a lens file must end in .npz, got {path.name}")
        with files.atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, ids=self.ids, scores=self.scores)
        used = np.unique(self.ids)
        sidecar = {
            **self.identity(),
            "family": self.family,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "include_padding": self.include_padding,
            "arrays": {"ids": ["int32", list(self.ids.shape)], "scores": ["float32", list(self.scores.shape)]},
            "content_sha256": _content_sha256(self.ids, self.scores),
            "action_ids": [int(i) for i in self.action_ids],
            "action_note": self.action_note,
            "tokens": {str(int(i)): s for i, s in zip(used, self.token_strings(used))},
        }
        files.write_text(_sidecar(path), json.dumps(sidecar) + "\n")
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike, vla=None) -> "ValueVectorLens":
        """Read a lens written by :meth:`save` (or a cache entry).

        With ``vla``, the file must have been computed from exactly this model's weights (same model key,
        weight fingerprint and widths); otherwise a :class:`CheckpointError` says which checkpoint it belongs to.
        Without ``vla`` the lens works offline for tables, action share, diffs and keyword concepts (the kNN
        concept method needs the model's input embeddings).
        """
        path = Path(path)
        sidecar_path = _sidecar(path)
        if not path.is_file() or not sidecar_path.is_file():
            raise CheckpointError(f"no lens file at {path} (needs {path.name} and {sidecar_path.name})")
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"lens sidecar {sidecar_path} is unreadable: {error}") from None
        lens = cls.__new__(cls)
        if vla is not None:
            expected = _identity_of(vla, sidecar)
            lens_identity = {key: sidecar.get(key) for key in expected}
            if lens_identity != expected:
                raise CheckpointError(_mismatch_message(path, sidecar, expected))
        problem, arrays = _check_files(path, sidecar, sidecar)
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
        lens.key = _cache_key({k: sidecar.get(k) for k in _IDENTITY_KEYS})
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


# ---------------------------------------------------------------------------------------------------------------
# cache internals

_IDENTITY_KEYS = ("format", "version", "model_key", "fingerprint", "stack", "k", "vocab_rows", "num_layers", "d_mlp",
                  "d_model", "dtype")


def _cache_key(identity: dict) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=20).hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _content_sha256(ids: np.ndarray, scores: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in (ids, scores):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _check_files(path: Path, sidecar: dict, identity: dict) -> tuple[str, tuple | None]:
    """'' and the arrays if the NPZ is readable, matches the expected shapes and its sidecar's content checksum,
    else the problem."""
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, scores = data["ids"], data["scores"]
    except Exception as error:  # noqa: BLE001 - any unreadable file is simply corrupt
        return f"unreadable ({type(error).__name__}: {error})", None
    shape = (identity["num_layers"], identity["d_mlp"], identity["k"])
    if ids.shape != shape or scores.shape != shape or ids.dtype != np.int32 or scores.dtype != np.float32:
        return f"arrays have shapes {ids.shape}/{scores.shape}, expected {shape}", None
    if sidecar.get("content_sha256") != _content_sha256(ids, scores):
        return "checksum mismatch (the arrays changed after they were written)", None
    if ids.size and (ids.min() < 0 or ids.max() >= identity["vocab_rows"]):
        return "token ids outside the vocabulary", None
    if not np.all(np.isfinite(scores)):
        return "non-finite scores", None
    return "", (ids, scores)


def _read_cache(path: Path, identity: dict, strict: bool) -> tuple | None:
    """The cached arrays, or None (with a :class:`CacheWarning` when a file existed but was unusable)."""
    sidecar_path = _sidecar(path)
    if not path.exists() and not sidecar_path.exists():
        return None
    try:
        sidecar = json.loads(sidecar_path.read_text())
        problem = "" if {k: sidecar.get(k) for k in identity} == identity else "it was computed from other weights"
    except (OSError, ValueError) as error:
        problem, sidecar = f"sidecar unreadable ({error})", None
    arrays = None
    if not problem:
        problem, arrays = _check_files(path, sidecar, identity)
    if problem:
        if strict:
            raise CheckpointError(f"lens cache {path}: {problem}")
        warnings.warn(f"lens cache {path} is not usable ({problem}); rebuilding it", CacheWarning, stacklevel=3)
        return None
    return arrays[0], arrays[1], sidecar


def _identity_of(vla, sidecar: dict) -> dict:
    """The identity a file must carry to belong to ``vla`` (with the file's own stack, k and dtype)."""
    stack = sidecar.get("stack", "backbone")
    num_layers, d_model, d_mlp = vla.stack_dims(stack)
    _ensure_weights(vla)
    rows = int(sidecar.get("vocab_rows", 0))
    fingerprint = weight_fingerprint(
        [vla.value_vectors(layer, stack) for layer in range(num_layers)] + [vla.unembedding()[:rows]]
    )
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "model_key": vla.model_key, "fingerprint": fingerprint,
        "stack": stack, "k": sidecar.get("k"), "vocab_rows": rows, "num_layers": num_layers, "d_mlp": d_mlp,
        "d_model": d_model, "dtype": sidecar.get("dtype"),
    }


def _mismatch_message(path: Path, sidecar: dict, expected: dict) -> str:
    differs = [key for key in expected if sidecar.get(key) != expected[key]]
    lines = [f"lens file {path} was not computed from this model ({', '.join(differs)} differ):"]
    for key in differs:
        lines.append(f"  {key}: file has {sidecar.get(key)!r}, this model has {expected[key]!r}")
    lines.append("a lens is only valid for the exact weights it was computed from; build ValueVectorLens(vla)")
    return "\n".join(lines)


def _ensure_weights(vla) -> None:
    # nnsight builds real checkpoints on the meta device; the lens needs the actual weights
    if not getattr(vla, "dispatched", True):
        vla.dispatch()


def _tokenizer_size(vla) -> int | None:
    tokenizer = getattr(vla, "tokenizer", None)
    return None if tokenizer is None else len(tokenizer)


def write_table(frame, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Write a DataFrame atomically as Parquet, CSV or JSON (by suffix). Parquet keeps ``meta`` in its schema
    metadata; JSON writes ``{"meta": ..., "rows": [...]}``; CSV is the bare table."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".csv", ".json"):
        raise InputError(f"unsupported table format {path.suffix!r}; use .parquet, .csv or .json")
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(frame, preserve_index=False)
        if meta:
            arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                   b"nnsight_vla": json.dumps(meta).encode()})
        with files.atomic_path(path) as tmp:
            pq.write_table(arrow, tmp)
    elif suffix == ".csv":
        with files.atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    else:
        rows = json.loads(frame.to_json(orient="records"))
        files.write_text(path, json.dumps({"meta": meta or {}, "rows": rows}) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------------------
# checkpoint diff


@dataclass
class CheckpointDiff:
    """How the value-vector projections changed between two checkpoints of one architecture.

    Tables (pandas DataFrames):
        vectors: one row per value vector: layer, neuron, kept (top-k tokens present in both), gained_action,
            gained_language, lost_action, lost_language, changed (k - kept) and, when both lenses still hold their
            models, weight_change (``|w_tuned - w_base| / |w_base|``) and score_shift (mean change of the logits
            of the base's top-k tokens: ``W_U' w' - W_U w`` at those tokens).
        layers: one row per layer: mean kept fraction, vectors changed, gained/lost action/language token
            entries, action share of top-k tokens in base and tuned, and the share of gained entries that are
            action tokens.
        tokens: per layer and token: in how many vectors' top-k it appears in base and tuned, and the change.
    """

    base: ValueVectorLens
    tuned: ValueVectorLens
    vectors: Any
    layers: Any
    tokens: Any
    meta: dict = field(default_factory=dict)

    def top_vectors(self, n: int = 20, layer: int | None = None, by: str = "changed"):
        """The value vectors that changed most (by "changed", "weight_change" or "score_shift")."""
        frame = self.vectors if layer is None else self.vectors[self.vectors.layer == self.base.check_layer(layer)]
        if by not in frame.columns:
            raise InputError(f"unknown column {by!r}; use one of {', '.join(c for c in frame.columns if c not in ('layer', 'neuron'))}")
        key = frame[by].abs() if by == "score_shift" else frame[by]
        return frame.assign(_key=key).sort_values(["_key", "layer", "neuron"], ascending=[False, True, True]).drop(columns="_key").head(n)

    def top_tokens(self, n: int = 20, layer: int | None = None, kind: str | None = None, direction: str = "gained"):
        """Tokens that gained (or lost) most top-k appearances, optionally in one layer and of one kind
        ("action" or "language")."""
        frame = self.tokens
        if layer is not None:
            frame = frame[frame.layer == self.base.check_layer(layer)]
        if kind not in (None, "action", "language"):
            raise InputError(f"kind must be 'action', 'language' or None, got {kind!r}")
        if kind is not None:
            frame = frame[frame.is_action == (kind == "action")]
        if direction not in ("gained", "lost"):
            raise InputError(f"direction must be 'gained' or 'lost', got {direction!r}")
        return frame.sort_values("delta", ascending=direction == "lost").head(n)

    def export(self, folder: str | os.PathLike, fmt: str = "parquet") -> dict[str, Path]:
        """Write the three tables to ``folder`` (``vectors.<fmt>``, ``layers.<fmt>``, ``tokens.<fmt>``)."""
        folder = Path(folder)
        return {name: write_table(getattr(self, name), folder / f"{name}.{fmt}", meta={**self.meta, "table": name})
                for name in ("vectors", "layers", "tokens")}


def checkpoint_diff(base: ValueVectorLens, tuned: ValueVectorLens, chunk_size: int = 1024) -> CheckpointDiff:
    """Compare two lenses of the same architecture (e.g. a base VLM/VLA and its robot fine-tune).

    Refuses lenses of different stacks, widths, vocabularies or k. Token-set changes are computed from the lenses
    alone; weight and logit changes additionally need both lenses' models (``lens.vla``).
    """
    import pandas as pd

    for name in ("stack", "num_layers", "d_mlp", "d_model", "vocab_rows", "k"):
        if getattr(base, name) != getattr(tuned, name):
            raise InputError(
                f"cannot diff lenses of different architectures: {name} is {getattr(base, name)!r} in the base "
                f"({base.family}, {base.num_layers} layers x {base.d_mlp} vectors, vocab {base.vocab_rows}, "
                f"k={base.k}) but {getattr(tuned, name)!r} in the tuned lens ({tuned.family}, {tuned.num_layers} "
                f"layers x {tuned.d_mlp} vectors, vocab {tuned.vocab_rows}, k={tuned.k})"
            )
    action = base.action_mask() | tuned.action_mask()
    b, t = base.ids, tuned.ids
    in_tuned = (b[..., :, None] == t[..., None, :]).any(-1)  # base token kept in tuned
    in_base = (t[..., :, None] == b[..., None, :]).any(-1)
    lost, gained = ~in_tuned, ~in_base
    b_act, t_act = action[b], action[t]
    L, N, k = b.shape
    vectors = pd.DataFrame({
        "layer": np.repeat(np.arange(L), N), "neuron": np.tile(np.arange(N), L),
        "kept": in_tuned.sum(-1).reshape(-1),
        "gained_action": (gained & t_act).sum(-1).reshape(-1), "gained_language": (gained & ~t_act).sum(-1).reshape(-1),
        "lost_action": (lost & b_act).sum(-1).reshape(-1), "lost_language": (lost & ~b_act).sum(-1).reshape(-1),
    })
    vectors["changed"] = k - vectors["kept"]
    if base.vla is not None and tuned.vla is not None:
        weight_change, score_shift = _weight_changes(base, tuned, chunk_size)
        vectors["weight_change"] = weight_change.reshape(-1)
        vectors["score_shift"] = score_shift.reshape(-1)
    by_layer = vectors.groupby("layer")
    layers = pd.DataFrame({
        "layer": np.arange(L),
        "kept_fraction": by_layer["kept"].mean().to_numpy() / k,
        "vectors_changed": by_layer["changed"].apply(lambda c: float((c > 0).mean())).to_numpy(),
        **{col: by_layer[col].sum().to_numpy() for col in ("gained_action", "gained_language", "lost_action",
                                                          "lost_language")},
        "action_share_base": b_act.mean(axis=(1, 2)),
        "action_share_tuned": t_act.mean(axis=(1, 2)),
    })
    gained_total = layers.gained_action + layers.gained_language
    layers["gained_action_fraction"] = np.where(gained_total > 0, layers.gained_action / gained_total.clip(lower=1), 0.0)
    tokens = _token_changes(base, tuned, action)
    meta = {"base": {"model_key": base.model_key, "fingerprint": base.fingerprint},
            "tuned": {"model_key": tuned.model_key, "fingerprint": tuned.fingerprint},
            "stack": base.stack, "k": k}
    return CheckpointDiff(base, tuned, vectors, layers, tokens, meta)


def _token_changes(base: ValueVectorLens, tuned: ValueVectorLens, action: np.ndarray):
    import pandas as pd

    rows = []
    V = base.vocab_rows
    for layer in range(base.num_layers):
        count_b = np.bincount(base.ids[layer].reshape(-1), minlength=V)
        count_t = np.bincount(tuned.ids[layer].reshape(-1), minlength=V)
        ids = np.nonzero(count_b != count_t)[0]
        rows.append(pd.DataFrame({"layer": layer, "token_id": ids, "count_base": count_b[ids],
                                  "count_tuned": count_t[ids], "delta": count_t[ids] - count_b[ids],
                                  "is_action": action[ids]}))
    frame = pd.concat(rows, ignore_index=True)
    base_vocab, tuned_vocab = base._vocab_array(), tuned._vocab_array()
    vocab = np.where(base_vocab != "", base_vocab, tuned_vocab)  # offline lenses each know their own tokens
    frame.insert(2, "token", vocab[frame.token_id.to_numpy()] if len(frame) else [])
    return frame


def _weight_changes(base: ValueVectorLens, tuned: ValueVectorLens, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per vector: relative weight change and the mean logit change at the base's top-k tokens."""
    _ensure_weights(base.vla)
    _ensure_weights(tuned.vla)
    device = torch.device(base.device)
    rows = base.vocab_rows
    weight_change = np.zeros((base.num_layers, base.d_mlp), dtype=np.float32)
    score_shift = np.zeros_like(weight_change)
    with torch.no_grad():
        u_b = base.vla.unembedding()[:rows].detach().to(device, torch.float32)
        u_t = tuned.vla.unembedding()[:rows].detach().to(device, torch.float32)
        for layer in range(base.num_layers):
            w_b_all = base.vla.value_vectors(layer, base.stack).detach()
            w_t_all = tuned.vla.value_vectors(layer, tuned.stack).detach()
            for start in range(0, base.d_mlp, chunk_size):
                stop = min(start + chunk_size, base.d_mlp)
                w_b = w_b_all[:, start:stop].to(device, torch.float32).T  # (chunk, d)
                w_t = w_t_all[:, start:stop].to(device, torch.float32).T
                norm = w_b.norm(dim=1).clamp_min(1e-12)
                weight_change[layer, start:stop] = ((w_t - w_b).norm(dim=1) / norm).cpu().numpy()
                ids = torch.as_tensor(base.ids[layer, start:stop], device=device, dtype=torch.long)
                before = torch.einsum("ckd,cd->ck", u_b[ids], w_b)
                after = torch.einsum("ckd,cd->ck", u_t[ids], w_t)
                score_shift[layer, start:stop] = (after - before).mean(dim=1).cpu().numpy()
    return weight_change, score_shift


# ---------------------------------------------------------------------------------------------------------------
# CLI (mounted by nnsight_vla.cli as `nnsight-vla lens ...` and `nnsight-vla lens-diff ...`)
