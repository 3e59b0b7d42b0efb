"""The results store: a folder of finished episodes, the single source of truth for resume and reports.

Layout (one writer at a time, the sweep's driver process)::

    manifest.json                       config (what defines an episode), conditions, versions, runs
    episodes/<episode_id>.parquet       per-step records
    episodes/<episode_id>.json          summary + key + condition + config hash + checksums (commit marker)
    media/<episode_id>.{mp4,gif}|/      optional frames
    .lock                               held by the running sweep (flock)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .. import files
from ..errors import ConfigMismatchError, ResultsError
from .records import Episode, EpisodeKey, config_hash, environment_versions, jsonable, now, write_frames

FORMAT = "nnsight-vla-results"
EPISODE_FORMAT = "nnsight-vla-episode"
FORMAT_VERSION = 2


def record_digest(record: Mapping) -> str:
    """sha256 of an episode record's canonical JSON, its own ``record_sha256`` field left out."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def atomic_write_json(path: Path, data: Any) -> None:
    files.write_json(path, jsonable(data), indent=1, sort_keys=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the results store ----------------------------------------------------------------------------------------


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Human-readable differences between two JSON-able configs."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            where = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{where}: absent in the folder, {new[k]!r} now")
            elif k not in new:
                out.append(f"{where}: {old[k]!r} in the folder, absent now")
            else:
                out.extend(_diff(old[k], new[k], where))
        return out
    return [] if old == new else [f"{prefix or 'value'}: {old!r} in the folder, {new!r} now"]


class ResultsStore:
    """A folder of finished episodes: the single source of truth for resume, in every execution mode.

    Guarantees:

    * each finished episode is committed atomically: its Parquet is written (temp file + ``os.replace``) before
      its JSON, and only an episode whose JSON exists and whose Parquet has the recorded number of rows counts;
      a sweep killed at any moment leaves at most an uncounted partial episode, which a resume runs again;
    * ``manifest.json`` holds the config that defines an episode; opening the folder with a different config
      raises :class:`ConfigMismatchError` naming every difference; a condition name reused with a different
      definition is refused as well (new conditions, tasks and trials may be added to a folder);
    * one sweep at a time writes to a folder (an advisory ``flock`` on ``.lock``, released if the process dies).

    Use :meth:`create` to start or resume a sweep and :meth:`open` to read results.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.episodes_dir = self.root / "episodes"
        self.media_dir = self.root / "media"
        self._lock_fh = None

    # opening --------------------------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | os.PathLike) -> "ResultsStore":
        """Open an existing results folder for reading."""
        store = cls(root)
        if not (store.root / "manifest.json").is_file():
            raise ResultsError(
                f"{store.root} is not an nnsight-vla results folder (no manifest.json); "
                "point at the folder a sweep wrote (its --results)"
            )
        _ = store.manifest  # parse now: a corrupt manifest is reported here
        return store

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        config: Mapping,
        conditions: Sequence[Mapping] = (),
        *,
        kind: str = "episodes",
        run_info: Mapping | None = None,
    ) -> "ResultsStore":
        """Create a results folder, or reopen one for resuming after checking its config matches.

        Args:
            root: the folder (created if missing; must be writable).
            config: JSON-able dict of everything that defines an episode (simulator, recipe, policy identity).
                Must be equal to the folder's config when the folder exists.
            conditions: ``Condition.to_dict()`` of each condition of this run; a name already in the folder must
                have the same definition.
            kind: what wrote the folder ("libero", "ur5"...); must match too.
            run_info: free description of this run (task range, trials, workers...), appended to the manifest.
        """
        store = cls(root)
        store._check_writable()
        config = jsonable(dict(config))
        cond_dicts = {c["name"]: jsonable(dict(c)) for c in conditions}
        manifest_path = store.root / "manifest.json"
        if manifest_path.is_file():
            manifest = store.manifest
            problems = store.mismatches(config, conditions, kind=kind)
            if problems:
                raise ConfigMismatchError(
                    f"results folder {store.root} was made with a different config; refusing to mix episodes "
                    "from different setups in one comparison. Differences:\n  - " + "\n  - ".join(problems)
                    + "\nUse a new results folder, or run with the folder's settings (see its manifest.json)."
                )
            manifest.setdefault("conditions", {}).update(cond_dicts)
        else:
            store.check_usable()
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "kind": kind,
                "created": now(),
                "config": config,
                "config_hash": config_hash(config),
                "conditions": cond_dicts,
                "versions": environment_versions(),
                "runs": [],
            }
        if run_info is not None:
            manifest.setdefault("runs", []).append(
                {"started": now(), "host": socket.gethostname(), "pid": os.getpid(), **jsonable(dict(run_info))}
            )
        store.episodes_dir.mkdir(exist_ok=True)
        atomic_write_json(manifest_path, manifest)
        store._manifest = manifest
        return store

    def mismatches(self, config: Mapping, conditions: Sequence[Mapping] = (), *,
                   kind: str = "episodes") -> list[str]:
        """What differs between this folder's manifest and a run of ``config`` / ``conditions`` / ``kind``
        (empty: its episodes belong to that run; read-only). Condition entries start with ``condition``."""
        manifest = self.manifest
        problems = []
        if manifest.get("kind") != kind:
            problems.append(f"kind: {manifest.get('kind')!r} in the folder, {kind!r} now")
        problems.extend(_diff(manifest.get("config", {}), jsonable(dict(config))))
        for c in conditions:
            cdict = jsonable(dict(c))
            old = manifest.get("conditions", {}).get(cdict["name"])
            if old is not None and old != cdict:
                problems.extend(f"condition {cdict['name']!r}: " + d for d in _diff(old, cdict))
        return problems

    def check_usable(self) -> None:
        """Raise unless the folder can be written and is new, empty, or already an nnsight-vla results folder."""
        self._check_writable()
        if (self.root / "manifest.json").is_file():
            return
        existing = [p.name for p in self.root.iterdir() if not p.name.startswith(".")]
        if existing:
            raise ResultsError(
                f"{self.root} is not empty ({', '.join(sorted(existing)[:5])}...) and is not an nnsight-vla "
                "results folder (no manifest.json); choose an empty or new folder"
            )

    def _check_writable(self) -> None:
        root = self.root
        try:
            if root.exists() and not root.is_dir():
                raise ResultsError(f"results folder {root} exists and is not a folder; choose a folder path")
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
        except ResultsError:
            raise
        except OSError as exc:
            raise ResultsError(
                f"cannot write to results folder {root}: {exc.strerror or exc}. "
                "Choose a folder you can create and write to."
            ) from None

    @property
    def manifest(self) -> dict:
        cached = getattr(self, "_manifest", None)
        if cached is None:
            path = self.root / "manifest.json"
            try:
                cached = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ResultsError(f"cannot read {path}: {exc}") from None
            if cached.get("format") != FORMAT:
                raise ResultsError(f"{path} is not an nnsight-vla results manifest (format {cached.get('format')!r})")
            if cached.get("format_version", 0) > FORMAT_VERSION:
                raise ResultsError(
                    f"{path} has format version {cached['format_version']}; this nnsight-vla reads up to "
                    f"{FORMAT_VERSION}. Upgrade nnsight-vla."
                )
            self._manifest = cached
        return cached

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    # locking --------------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's write lock (one sweep at a time; released automatically if the process dies)."""
        import fcntl

        fh = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise ResultsError(
                f"another sweep is writing to {self.root} ({holder or 'unknown process'}); wait for it to finish "
                "or use another results folder"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n")
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    # episodes -------------------------------------------------------------------------------------------------

    def _paths(self, episode_id: str) -> tuple[Path, Path]:
        return self.episodes_dir / f"{episode_id}.parquet", self.episodes_dir / f"{episode_id}.json"

    def _load_record(self, json_path: Path, check_rows: bool = True) -> dict | None:
        """The episode JSON if the episode is complete, None if it is not (a resume runs it again). Raises
        :class:`ResultsError` for a record that was altered or does not belong here (see :meth:`_check_record`)."""
        try:
            record = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or record.get("format") != EPISODE_FORMAT:
            return None
        problem = self._check_record(json_path, record)
        if problem:
            raise ResultsError(f"{json_path}: {problem}. Remove the file (and its .parquet) to run the episode "
                               "again, or use a fresh results folder; nothing was read from it.")
        steps_path = json_path.with_name(record.get("steps_file", ""))
        if not steps_path.is_file():
            return None
        if check_rows:
            import pyarrow.parquet as pq

            try:
                if pq.read_metadata(steps_path).num_rows != record.get("steps_rows"):
                    return None
            except Exception:
                return None
        return record

    def _check_record(self, json_path: Path, record: dict) -> str | None:
        """Why a committed record cannot be trusted (None if it can): edited after writing (its checksum), a copy
        under another name, a key that does not give its id, or another configuration's episode."""
        if record.get("format_version") != FORMAT_VERSION:
            return (f"episode format version {record.get('format_version')!r}, this nnsight-vla reads "
                    f"{FORMAT_VERSION}")
        if record.get("record_sha256") != record_digest(record):
            return "the record does not match its checksum (edited after it was written?)"
        if record.get("episode_id") != json_path.stem:
            return f"the file name does not match its episode id {record.get('episode_id')!r} (a copied episode?)"
        try:
            key = EpisodeKey(record["condition"], record["task"], int(record["trial"]))
        except (KeyError, TypeError, ValueError):
            return "the record has no valid (condition, task, trial) key"
        if key.id != record["episode_id"]:
            return f"its key {key.to_dict()} does not give its episode id"
        if record.get("config_hash") != self.manifest.get("config_hash"):
            return (f"it was made with config {record.get('config_hash')!r}, this folder's config is "
                    f"{self.manifest.get('config_hash')!r}")
        if record["condition"] not in self.manifest.get("conditions", {}):
            return f"its condition {record['condition']!r} is not in the folder's manifest"
        return None

    def records(self, *, check: bool = True) -> list[dict]:
        """The JSON records of all complete episodes (sorted by condition, task, trial)."""
        if not self.episodes_dir.is_dir():
            return []
        out = []
        for path in sorted(self.episodes_dir.glob("*.json")):
            record = self._load_record(path, check_rows=check)
            if record is not None:
                out.append(record)
        return out

    def completed(self) -> set[str]:
        """Ids of complete episodes (what a resume skips)."""
        return {r["episode_id"] for r in self.records()}

    def is_complete(self, key: EpisodeKey) -> bool:
        return self._load_record(self._paths(key.id)[1]) is not None

    def write_episode(self, episode: Episode, *, fps: int = 20) -> Path:
        """Commit a finished episode (idempotent: an already complete episode is left as it is).

        Returns the path of the episode's JSON record.
        """
        import pyarrow.parquet as pq

        episode_id = episode.key.id
        steps_path, json_path = self._paths(episode_id)
        if self._load_record(json_path) is not None:
            return json_path  # never record an episode twice
        buf = io.BytesIO()
        pq.write_table(episode.table(), buf, compression="zstd")
        data = buf.getvalue()
        files.write_bytes(steps_path, data)
        media = None
        if episode.frames:
            self.media_dir.mkdir(exist_ok=True)
            media = write_frames(self.media_dir / episode_id, episode.frames, fps=fps).relative_to(self.root)
        record = {
            "format": EPISODE_FORMAT,
            "format_version": FORMAT_VERSION,
            "episode_id": episode_id,
            **episode.key.to_dict(),
            "summary": episode.summary,
            "meta": episode.meta,
            "config_hash": self.manifest.get("config_hash"),
            "steps_file": steps_path.name,
            "steps_rows": episode.steps,
            "steps_sha256": hashlib.sha256(data).hexdigest(),
            "media": None if media is None else str(media),
            "finished": now(),
            "host": socket.gethostname(),
        }
        record = jsonable(record)
        record["record_sha256"] = record_digest(record)
        atomic_write_json(json_path, record)  # the commit point
        _fsync_dir(self.episodes_dir)
        return json_path

    def clean_partial(self) -> int:
        """Remove temp files and Parquet files without a committed JSON (left by a killed sweep).

        Only call while holding :meth:`lock`. Returns the number of files removed."""
        removed = 0
        if not self.episodes_dir.is_dir():
            return 0
        complete = self.completed()
        candidates = list(self.episodes_dir.iterdir())
        if self.media_dir.is_dir():
            candidates += list(self.media_dir.iterdir())
        for path in candidates:
            temp = path.name.startswith(".") and ".tmp" in path.name
            orphan = path.parent == self.episodes_dir and path.suffix == ".parquet" and path.stem not in complete
            if temp or orphan:
                if path.is_dir():
                    import shutil

                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        path.unlink()
                removed += 1
        return removed

    def verify(self) -> list[str]:
        """Check every committed episode: its record (see :meth:`_check_record`) and its Parquet against the
        recorded sha256. Returns the problems (empty when everything can be trusted)."""
        problems = []
        if not self.episodes_dir.is_dir():
            return problems
        for json_path in sorted(self.episodes_dir.glob("*.json")):
            try:
                record = self._load_record(json_path, check_rows=False)
            except ResultsError as exc:
                problems.append(str(exc))
                continue
            if record is None:
                continue
            path = self.episodes_dir / record["steps_file"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                problems.append(f"{record['episode_id']}: {exc}")
                continue
            if digest != record.get("steps_sha256"):
                problems.append(f"{record['episode_id']}: steps file does not match its recorded checksum "
                                "(edited after it was written?)")
        return problems

    def check(self) -> None:
        """Raise :class:`ResultsError` listing every problem :meth:`verify` finds (resume and reports call it:
        no table or plot is made from episodes that cannot be trusted)."""
        problems = self.verify()
        if problems:
            raise ResultsError(f"{len(problems)} episode file(s) in {self.root} cannot be trusted:\n  - "
                               + "\n  - ".join(problems[:20]))

    def steps(self, *, conditions: Sequence[str] | None = None, tasks: Sequence[Any] | None = None,
              columns: Sequence[str] | None = None):
        """All per-step records (a ``pyarrow.Table``), optionally filtered by condition names and tasks."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tasks_s = None if tasks is None else {str(t) for t in tasks}
        tables = []
        for record in self.records():
            if conditions is not None and record["condition"] not in conditions:
                continue
            if tasks_s is not None and str(record["task"]) not in tasks_s:
                continue
            tables.append(pq.read_table(self.episodes_dir / record["steps_file"], columns=columns))
        if not tables:
            return pa.table({}) if columns is None else pa.table({c: pa.array([]) for c in columns})
        return pa.concat_tables(tables, promote_options="default")

    def summaries(self) -> list[dict]:
        """One flat dict per complete episode: key, summary fields and the condition's kind/concept/alpha/layers."""
        conds = self.manifest.get("conditions", {})
        out = []
        for record in self.records():
            cdict = conds.get(record["condition"], {})
            row = {
                "episode_id": record["episode_id"],
                "condition": record["condition"],
                "task": record["task"],
                "trial": record["trial"],
                "kind": cdict.get("kind"),
                "concept": cdict.get("concept"),
                "alpha": cdict.get("alpha"),
                "layers": cdict.get("layers"),
            }
            row.update({k: v for k, v in record["summary"].items() if not isinstance(v, (list, dict))})
            out.append(row)
        return out


