"""The value-vector lens on disk: cache identity, weight fingerprint, sealed NPZ + JSON sidecar, tables.

A lens file is ``<name>.npz`` (``ids``, ``scores``) plus ``<name>.npz.json`` (identity, token strings, action
ids). One SHA-256 seals the arrays AND every sidecar field but the timestamp, so an edited token string or
action-id list is refused like a flipped array byte. It detects corruption and edits, not forgery: a lens file
is only as trustworthy as whoever wrote it (docs/trust.md). Temp files of killed writers are removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from . import files
from .errors import CheckpointError, InputError

CACHE_FORMAT = "nnsight-vla value-vector lens"
#: 2: the checksum covers the sidecar (tokens, action ids, identity), not only the arrays
CACHE_VERSION = 2

IDENTITY_KEYS = ("format", "version", "model_key", "fingerprint", "stack", "k", "vocab_rows", "num_layers", "d_mlp",
                 "d_model", "dtype")
#: sidecar fields outside the checksum: the checksum itself, and the time of writing (two processes writing the
#: same lens agree on the checksum, so a pair written by different processes still matches)
_UNSEALED = ("content_sha256", "created")
#: how long a temp file of a dead writer is left alone (a writer on another host of a shared cache folder has a pid
#: this host cannot check), and the age after which any temp file is an orphan
ORPHAN_GRACE_S = 600.0
ORPHAN_MAX_AGE_S = 86400.0
# files.atomic_path's temp names: .<name>.<pid>-<thread>.tmp
_TEMP = re.compile(r"^\.(?P<name>lens-.+\.npz(?:\.json)?)\.(?P<pid>\d+)-\d+\.tmp$")


class CacheWarning(UserWarning):
    """A lens cache file was found but not used (corrupt, truncated or for other weights); it is rebuilt."""


def default_cache_dir() -> Path:
    """``$NNSIGHT_VLA_CACHE/lens`` or ``~/.cache/nnsight_vla/lens``."""
    root = os.environ.get("NNSIGHT_VLA_CACHE") or Path.home() / ".cache" / "nnsight_vla"
    return Path(root) / "lens"


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


def cache_key(identity: dict) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=20).hexdigest()


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def content_sha256(ids: np.ndarray, scores: np.ndarray, sidecar: dict) -> str:
    """SHA-256 of the arrays and of every sidecar field but the checksum and the timestamp (canonical JSON)."""
    digest = hashlib.sha256()
    for array in (ids, scores):
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).data)
    sealed = {key: value for key, value in sidecar.items() if key not in _UNSEALED}
    digest.update(json.dumps(sealed, sort_keys=True, ensure_ascii=True, separators=(",", ":")).encode())
    return digest.hexdigest()


def write_lens(path: Path, ids: np.ndarray, scores: np.ndarray, sidecar: dict) -> Path:
    """Write the NPZ, then the sealed sidecar, each atomically (the sidecar's checksum seals the pair)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"a lens file must end in .npz, got {path.name}")
    with files.atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, ids=ids, scores=scores)
    sidecar = {**sidecar, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    sidecar["content_sha256"] = content_sha256(ids, scores, sidecar)
    files.write_text(sidecar_path(path), json.dumps(sidecar) + "\n")
    return path


def _check_sidecar_fields(sidecar: dict, vocab_rows: int) -> str:
    """'' when the token strings and action ids are well formed, else the problem."""
    action_ids = sidecar.get("action_ids", [])
    if not isinstance(action_ids, list) or not all(type(i) is int and 0 <= i < vocab_rows for i in action_ids):
        return "action ids are not token ids of the vocabulary"
    tokens = sidecar.get("tokens", {})
    if not isinstance(tokens, dict) or not all(
        isinstance(key, str) and key.isdigit() and int(key) < vocab_rows and isinstance(value, str)
        for key, value in tokens.items()
    ):
        return "token strings are not a map from token id to string"
    return ""


def check_files(path: Path, sidecar: dict, identity: dict) -> tuple[str, tuple | None]:
    """'' and the arrays if the NPZ is readable, matches the expected shapes and the sidecar's checksum (arrays
    and sidecar fields), else the problem."""
    if sidecar.get("format") != CACHE_FORMAT or sidecar.get("version") != CACHE_VERSION:
        return (f"written as {sidecar.get('format')!r} version {sidecar.get('version')!r}; this nnsight-vla reads "
                f"version {CACHE_VERSION} (rebuild the lens)"), None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, scores = data["ids"], data["scores"]
    except Exception as error:  # noqa: BLE001 - any unreadable file is simply corrupt
        return f"unreadable ({type(error).__name__}: {error})", None
    try:
        shape = (int(identity["num_layers"]), int(identity["d_mlp"]), int(identity["k"]))
        vocab_rows = int(identity["vocab_rows"])
    except (KeyError, TypeError, ValueError):
        return "the sidecar lacks the lens's dimensions", None
    if ids.shape != shape or scores.shape != shape or ids.dtype != np.int32 or scores.dtype != np.float32:
        return f"arrays have shapes {ids.shape}/{scores.shape}, expected {shape}", None
    if sidecar.get("content_sha256") != content_sha256(ids, scores, sidecar):
        return "checksum mismatch (the arrays or the sidecar changed after they were written)", None
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_rows):
        return "token ids outside the vocabulary", None
    if not np.all(np.isfinite(scores)):
        return "non-finite scores", None
    problem = _check_sidecar_fields(sidecar, vocab_rows)
    return (problem, None) if problem else ("", (ids, scores))


def read_sidecar(path: Path) -> dict:
    """The sidecar of a lens file as a dict (``CheckpointError`` when missing or unreadable)."""
    side = sidecar_path(path)
    if not path.is_file() or not side.is_file():
        raise CheckpointError(f"no lens file at {path} (needs {path.name} and {side.name})")
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"lens sidecar {side} is unreadable: {error}") from None
    if not isinstance(sidecar, dict):
        raise CheckpointError(f"lens sidecar {side} is not a JSON object")
    return sidecar


def read_cache(path: Path, identity: dict, strict: bool) -> tuple | None:
    """The cached arrays, or None (with a :class:`CacheWarning` when a file existed but was unusable)."""
    side = sidecar_path(path)
    if not path.exists() and not side.exists():
        return None
    try:
        sidecar = json.loads(side.read_text())
        if not isinstance(sidecar, dict):
            raise ValueError("not a JSON object")
        problem = "" if {k: sidecar.get(k) for k in identity} == identity else "it was computed from other weights"
    except (OSError, ValueError) as error:
        problem, sidecar = f"sidecar unreadable ({error})", None
    arrays = None
    if not problem:
        problem, arrays = check_files(path, sidecar, identity)
    if problem:
        if strict:
            raise CheckpointError(f"lens cache {path}: {problem}")
        warnings.warn(f"lens cache {path} is not usable ({problem}); rebuilding it", CacheWarning, stacklevel=3)
        return None
    return arrays[0], arrays[1], sidecar


def clean_orphans(folder: str | os.PathLike, now: float | None = None) -> list[Path]:
    """Remove temp files that killed lens writers left in ``folder``; returns what was removed.

    A temp file (``.lens-*.npz[.json].<pid>-<thread>.tmp``) is an orphan when its writer's pid is not alive on
    this host and it is older than :data:`ORPHAN_GRACE_S`, or when it is older than :data:`ORPHAN_MAX_AGE_S`
    whatever its pid. A live writer's temp file is never touched.
    """
    folder = Path(folder)
    now = time.time() if now is None else now
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat().st_mtime
        except OSError:
            continue
        pid = int(match["pid"])
        own = pid == os.getpid()
        if age > ORPHAN_MAX_AGE_S or (not own and age > ORPHAN_GRACE_S and not files.pid_alive(pid)):
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def mismatch_message(path: Path, sidecar: dict, expected: dict) -> str:
    differs = [key for key in expected if sidecar.get(key) != expected[key]]
    lines = [f"lens file {path} was not computed from this model ({', '.join(differs)} differ):"]
    for key in differs:
        lines.append(f"  {key}: file has {sidecar.get(key)!r}, this model has {expected[key]!r}")
    lines.append("a lens is only valid for the exact weights it was computed from; build ValueVectorLens(vla)")
    return "\n".join(lines)


def ensure_weights(vla) -> None:
    # nnsight builds real checkpoints on the meta device; the lens needs the actual weights
    if not getattr(vla, "dispatched", True):
        vla.dispatch()


def identity_of(vla, sidecar: dict) -> dict:
    """The identity a file must carry to belong to ``vla`` (with the file's own stack, k and dtype)."""
    stack = sidecar.get("stack", "backbone")
    num_layers, d_model, d_mlp = vla.stack_dims(stack)
    ensure_weights(vla)
    rows = int(sidecar.get("vocab_rows", 0))
    fingerprint = weight_fingerprint(
        [vla.value_vectors(layer, stack) for layer in range(num_layers)] + [vla.unembedding()[:rows]]
    )
    return {
        "format": CACHE_FORMAT, "version": CACHE_VERSION, "model_key": vla.model_key, "fingerprint": fingerprint,
        "stack": stack, "k": sidecar.get("k"), "vocab_rows": rows, "num_layers": num_layers, "d_mlp": d_mlp,
        "d_model": d_model, "dtype": sidecar.get("dtype"),
    }


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

