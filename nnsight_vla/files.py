"""Atomic file writes. Every result, table, plot, neuron set and checkpoint file is written through here: a temp
file in the same folder, flushed to disk, then renamed onto the target, so a reader, or a run resumed after a
crash, sees the old file or the new one and never half of one."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that wants a file name (``fig.savefig``,
    ``pq.write_table``, ``frame.to_csv``; ``np.savez`` appends ``.npz`` to a name, so give it ``open(tmp, "wb")``).
    When the block ends without error the file is synced and renamed onto ``path``, otherwise removed; the parent
    folder is created. The temp name (``.<name>.<pid>-<thread>.tmp``) is hidden and matches no ``*.json``-style
    pattern, so a file left by a killed process is never mistaken for a result; writers that pick a format by
    suffix must be told the format (``fig.savefig(tmp, format="png")``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> Path:
    """Write ``data`` as JSON (plus a final newline) atomically; ``dumps_kwargs`` go to :func:`json.dumps`."""
    return write_text(path, json.dumps(data, indent=indent, **dumps_kwargs) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a zombie counts as gone): decides whether a temp file's writer or
    a started service is still there."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True  # no /proc: kill(0) said it exists
