"""What an NDIF server running nnsight-vla agrees to build from a client's model key (its operator's policy).

A key names a class to import and a checkpoint to read: both are the client's choice. :meth:`ServerPolicy.admit`
checks the key BEFORE anything is imported: the class is on an allowlist, a local checkpoint lies under an allowed
root (no ``..``, no symlink out), a hub id matches an allowed pattern, a tiny spec stays small. A refused source
gets one message whatever the reason, so a client cannot probe which paths exist. :meth:`ServerPolicy.check_size`
caps the size measured on the meta device (:mod:`.keys`). Stdlib only: the server checks before importing.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

#: the file an operator points NVLA_SERVER_POLICY at (JSON with the fields of ServerPolicy); the NVLA_SERVER_*
#: variables below override single fields
POLICY_VAR = "NVLA_SERVER_POLICY"
ENV_FIELDS = {
    "model_classes": "NVLA_SERVER_MODEL_CLASSES",  # comma separated import paths
    "checkpoint_roots": "NVLA_SERVER_CHECKPOINT_ROOTS",  # os.pathsep separated folders
    "hub_ids": "NVLA_SERVER_HUB_IDS",  # comma separated patterns ("openvla/openvla-7b", "lerobot/*")
    "max_bytes": "NVLA_SERVER_MAX_BYTES",
    "max_tiny_bytes": "NVLA_SERVER_MAX_TINY_BYTES",
}
FAMILY_CLASSES = (
    "nnsight_vla.models.openvla.OpenVLA",
    "nnsight_vla.models.pi0.PI0",
    "nnsight_vla.models.pi0_fast.PI0Fast",
)
MAX_KEY_CHARS = 65536
#: the largest integer a tiny model's config may hold (widths, layers, vocabulary: the tokenizer is built before
#: any weight, so its size is bounded here, not by the meta-device measurement)
MAX_TINY_INT = 65536
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,127}$")
# the key fields that name what to read: nnsight-vla's "source", nnsight's HuggingFace keys' "repo_id"
_SOURCE_FIELDS = ("source", "repo_id")


def _refused(what: str) -> CheckpointError:
    return CheckpointError(f"model key refused by this server's policy: {what}")


@dataclass(frozen=True)
class Admitted:
    """A key that passed :meth:`ServerPolicy.admit`: its class path and fields, and whether it is a tiny model."""

    class_path: str
    fields: dict
    tiny: bool


@dataclass(frozen=True)
class ServerPolicy:
    """An operator's allowlist for model keys. Defaults: the three nnsight-vla families, no local checkpoint, no
    hub id, tiny models up to 256 MiB, anything up to 64 GiB.

    ``checkpoint_roots``: folders whose sub-folders clients may name by absolute path; ``hub_ids``: fnmatch
    patterns of hub ids the server may download or read from its cache; sizes in bytes, in the dtype the model
    is held in."""

    model_classes: tuple[str, ...] = FAMILY_CLASSES
    checkpoint_roots: tuple[str, ...] = ()
    hub_ids: tuple[str, ...] = ()
    max_bytes: int = 64 << 30
    max_tiny_bytes: int = 256 << 20
    _resolved_roots: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_tiny_bytes"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise CheckpointError(f"server policy: {name} must be a positive number of bytes, got {value!r}")
        roots = []
        for root in self.checkpoint_roots:
            if not os.path.isabs(root):
                raise CheckpointError(f"server policy: checkpoint root {root!r} must be an absolute path")
            roots.append(os.path.realpath(root))
        object.__setattr__(self, "_resolved_roots", tuple(roots))

    # -- configuration ---------------------------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "ServerPolicy":
        """The policy of this server process: defaults, then the JSON file named by ``NVLA_SERVER_POLICY``, then
        the ``NVLA_SERVER_*`` variables. A policy that cannot be read is an error (never a silent default)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        path = env.get(POLICY_VAR)
        if path:
            try:
                values = json.loads(Path(path).read_text())
            except (OSError, ValueError) as error:
                raise CheckpointError(f"server policy {path} ({POLICY_VAR}) is unreadable: {error}") from None
            if not isinstance(values, dict) or set(values) - set(ENV_FIELDS):
                raise CheckpointError(
                    f"server policy {path} must be a JSON object with fields among {sorted(ENV_FIELDS)}"
                )
        for name, var in ENV_FIELDS.items():
            raw = env.get(var)
            if raw is None:
                continue
            if name.startswith("max_"):
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise CheckpointError(f"{var} must be a number of bytes, got {raw!r}") from None
            else:
                separator = os.pathsep if name == "checkpoint_roots" else ","
                values[name] = [item.strip() for item in raw.split(separator) if item.strip()]
        for name in ("model_classes", "checkpoint_roots", "hub_ids"):
            if name in values:
                if not isinstance(values[name], list) or not all(isinstance(v, str) for v in values[name]):
                    raise CheckpointError(f"server policy: {name} must be a list of strings")
                values[name] = tuple(values[name])
        return cls(**values)

    # -- checks ------------------------------------------------------------------------------------------------

    def admit(self, model_key: str) -> Admitted:
        """Check a full key (``"import.path.Class:{json}"``) without importing anything; raise a
        :class:`CheckpointError` saying what is not allowed (a refused source: one message for every reason)."""
        if not isinstance(model_key, str) or len(model_key) > MAX_KEY_CHARS or ":" not in model_key:
            raise _refused(f"not a model key of at most {MAX_KEY_CHARS} characters (\"import.path.Class:{{json}}\")")
        class_path, _, suffix = model_key.partition(":")
        if class_path not in self.model_classes:
            raise _refused(
                f"model class {class_path!r} is not served here (this server builds: {', '.join(self.model_classes)})"
            )
        try:
            fields = json.loads(suffix)
        except ValueError:
            raise _refused("the part after the class is not JSON") from None
        if not isinstance(fields, dict):
            raise _refused("the part after the class is not a JSON object")
        sources = [fields[name] for name in _SOURCE_FIELDS if fields.get(name) is not None]
        tiny = fields.get("tiny")
        if tiny is not None:
            if sources:
                raise _refused("a key names either a tiny model or a checkpoint, not both")
            self._check_tiny(tiny)
        elif not sources:
            raise _refused("the key names no checkpoint and no tiny model")
        for source in sources:
            self._check_source(source)
        revision = fields.get("revision")
        if revision is not None and (not isinstance(revision, str) or not _REVISION.match(revision)
                                     or ".." in revision):
            raise _refused("the revision is not a branch, tag or commit name")
        return Admitted(class_path, fields, tiny is not None)

    def _check_tiny(self, tiny: Any) -> None:
        if not isinstance(tiny, dict):
            raise _refused("the tiny spec is not a JSON object")

        def ints(value: Any):
            if isinstance(value, dict):
                for item in value.values():
                    yield from ints(item)
            elif isinstance(value, list):
                for item in value:
                    yield from ints(item)
            elif type(value) is int:
                yield value

        largest = max(ints(tiny.get("config", {})), default=0)
        if largest > MAX_TINY_INT:
            raise _refused(f"a tiny model's config holds the number {largest}; at most {MAX_TINY_INT} is allowed")

    def _check_source(self, source: Any) -> None:
        refused = _refused(
            f"source {source!r} is not a checkpoint this server serves (local folders under the roots the operator "
            "allows, hub ids the operator allows)"
        )
        if not isinstance(source, str) or not source or "\x00" in source:
            raise refused
        if _HUB_ID.match(source) and ".." not in source:
            if any(fnmatch.fnmatchcase(source, pattern) for pattern in self.hub_ids):
                return
            raise refused
        # a local folder: absolute, no '..' component, and (symlinks resolved) strictly inside an allowed root
        if not os.path.isabs(source) or ".." in Path(source).parts or not self._resolved_roots:
            raise refused
        real = os.path.realpath(source)
        inside = any(os.path.commonpath([real, root]) == root for root in self._resolved_roots)
        if not inside or not os.path.isdir(real):
            raise refused

    def check_size(self, size_bytes: int, tiny: bool) -> None:
        """Refuse a model whose weights (measured without allocating them) exceed the cap."""
        cap = self.max_tiny_bytes if tiny else self.max_bytes
        if size_bytes > cap:
            kind = "a tiny model" if tiny else "a model"
            raise _refused(
                f"{kind} of {size_bytes / 2**20:,.1f} MiB exceeds this server's cap of {cap / 2**20:,.1f} MiB"
            )
