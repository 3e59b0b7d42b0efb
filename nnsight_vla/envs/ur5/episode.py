"""One episode of a (steered) policy on the arm: plan how its actions map to the arm, observe, predict, pass every
command through the safety envelope, log each step. :func:`run_episode` returns the :class:`Episode`; storing it
(and looping over conditions) is the caller's business."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np
from PIL import Image  # at import: a first-use import inside the servo loop stalls the command stream

from ...errors import CameraError, ModelOutputError, RobotConfigError, RobotHalted, SafetyViolation
from ...rollout.conditions import Condition
from ...rollout.policy import PolicySurface, condition_context, policy_surface
from ...rollout.records import Episode, EpisodeKey, EpisodeRecorder
from .cameras import CameraSource
from .config import ACTION_SPACES, FAMILY_ACTION_SPACE, FAMILY_GRIPPER_CLOSE_ABOVE, UR5Config, is_count
from .poses import euler_to_matrix, interp_pose, matrix_to_pose, pose_to_matrix
from .robot import RobotState, UR5Robot

log = logging.getLogger("nnsight_vla.ur5")


def check_policy(policy: Any) -> PolicySurface:
    """The policy's :class:`PolicySurface`, its sizes checked (a zero or negative count is refused, not rounded)."""
    name = type(policy).__name__
    for attr, value in (("action_dim", getattr(policy, "action_dim", 1)),
                        ("action_horizon", getattr(policy, "action_horizon", 1)),
                        ("state_dim", getattr(policy, "state_dim", None))):
        if not (is_count(value) or (attr == "state_dim" and value is None)):
            raise RobotConfigError(f"{name}.{attr} must be an int >= 1{' or None' if attr == 'state_dim' else ''}, "
                                   f"got {value!r}")
    return policy_surface(policy)


@dataclass(frozen=True)
class Plan:
    """How a policy's actions drive the arm (resolved from the config and the policy's family)."""

    action_space: str
    delta_reference: str
    open_loop: int
    close_above: bool
    image_size: int | None


def resolve_plan(config: UR5Config, surface: PolicySurface) -> Plan:
    fam = surface.family
    space = config.action_space
    if space == "auto":
        if fam not in FAMILY_ACTION_SPACE:
            raise RobotConfigError(f"no default UR5 action space for family {fam!r}; set action_space to one of "
                                   f"{ACTION_SPACES[1:]}")
        space = FAMILY_ACTION_SPACE[fam]
    if surface.action_dim < 6:
        raise RobotConfigError(f"{fam} policy has action_dim {surface.action_dim}; the UR5 runner needs >= 6 "
                               "(6 joint or TCP components, optionally a gripper)")
    horizon = surface.action_horizon
    open_loop = min(config.open_loop_steps or (1 if horizon == 1 else min(horizon, 8)), horizon)
    close_above = config.gripper_close_above
    if close_above is None:
        close_above = FAMILY_GRIPPER_CLOSE_ABOVE.get(fam, True)
    size = config.image_size or surface.image_size
    if isinstance(size, (tuple, list)):
        size = int(size[0])
    ref = config.delta_reference
    if ref == "auto":
        ref = "previous" if space == "tcp_delta" else "chunk_start"
    return Plan(space, ref, int(open_loop), bool(close_above), int(size) if size else None)


def action_rows(raw: Any, surface: PolicySurface) -> np.ndarray:
    """A policy's output as rows ``(H, action_dim)`` of floats, H >= 1; :class:`ModelOutputError` for anything else
    (an empty chunk, another width, not numbers). Non-finite values are refused row by row when executed."""
    fam, dim = surface.family, surface.action_dim
    want = f"expected ({dim},) or (H, {dim}) numbers with H >= 1"
    if raw is None or isinstance(raw, (str, bytes, Mapping)):
        raise ModelOutputError(f"{fam} policy returned {type(raw).__name__}, not an action; {want}")
    try:
        rows = np.asarray(raw, dtype=float)
    except (TypeError, ValueError) as e:
        raise ModelOutputError(f"{fam} policy returned {type(raw).__name__} that is not an array of numbers ({e}); "
                               f"{want}") from None
    if rows.ndim == 1:
        rows = rows[None]
    if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] != dim:
        raise ModelOutputError(f"{fam} policy returned an action of shape {np.shape(raw)}; {want}")
    return rows


def _prepare_image(img: np.ndarray, size: int | None) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise CameraError(f"camera frame must be HxWx3 uint8, got shape {img.shape} dtype {img.dtype}")
    if size and img.shape[:2] != (size, size):
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return np.ascontiguousarray(img)


def _policy_state(st: RobotState, state_dim: int | None, gripper_state: float) -> np.ndarray | None:
    if state_dim is None:
        return None
    g = 0.0 if not math.isfinite(gripper_state) else gripper_state
    vec = np.concatenate([st.q, [g]]).astype(np.float32)
    if state_dim >= len(vec):
        return np.concatenate([vec, np.zeros(state_dim - len(vec), np.float32)])
    return vec[:state_dim]


def _tcp_target(pose_ref: np.ndarray, row: np.ndarray, scale: float) -> np.ndarray:
    """Base-frame TCP delta (dx, dy, dz, droll, dpitch, dyaw) applied to ``pose_ref``."""
    T = pose_to_matrix(pose_ref)
    out = np.eye(4)
    out[:3, :3] = euler_to_matrix(*row[3:6]) @ T[:3, :3]
    out[:3, 3] = T[:3, 3] + scale * row[:3]
    return matrix_to_pose(out)


def _predict(policy, condition: Condition, images, instruction, state, robot: UR5Robot,
             executor: concurrent.futures.ThreadPoolExecutor):
    """Query the policy in a worker thread while the main thread keeps checking the robot; the watchdog halts
    the robot when no answer comes within ``watchdog_s`` of the observation."""

    def call():
        with condition_context(policy, condition):
            if state is None:
                return policy.predict_action(images, instruction)
            return policy.predict_action(images, instruction, state=state)

    fut = executor.submit(call)
    while True:
        try:
            return fut.result(timeout=min(0.02, robot.dt * 2))
        except concurrent.futures.TimeoutError:
            robot.kick()
            if robot.armed and robot._servoing:
                robot.hold()
            try:
                robot.watchdog.check()
            except RobotHalted as e:
                robot.halt(e)


def _execute(robot: UR5Robot, plan: Plan, config: UR5Config, row: np.ndarray, first: bool, q_ref, pose_ref,
             n_servo: int):
    """One action: the action-level checks, then ``n_servo`` servo commands from the previous action's target to
    this one's. Returns (checked action, what was executed as a delta)."""
    if plan.action_space == "tcp_delta":
        base = pose_ref if (first and plan.delta_reference == "chunk_start") else robot.pose_action
        start = robot.pose_action.copy()
        checked = robot.action_tcp(_tcp_target(base, row, config.action_scale))
        for i in range(1, n_servo + 1):
            robot.servo_tcp(interp_pose(start, checked.value, i / n_servo))
        return checked, np.concatenate([checked.value[:3] - base[:3], row[3:6]])
    start = robot.q_action.copy()
    if plan.action_space == "joint_abs":
        target_q = row[:6]
    elif plan.delta_reference == "previous":
        target_q = start + config.action_scale * row[:6]
    else:
        target_q = q_ref + config.action_scale * row[:6]
    checked = robot.action_joint(target_q)
    for i in range(1, n_servo + 1):
        robot.servo_joint(start + (checked.value - start) * (i / n_servo))
    return checked, checked.value - (q_ref if plan.delta_reference == "chunk_start" else start)


#: errors that end an episode early (the arm stopped) and are recorded with it, and the episode's termination
_ENDINGS = ((SafetyViolation, "unsafe_action"), (ModelOutputError, "policy_error"), (CameraError, "camera_error"))


def run_episode(robot: UR5Robot, policy: Any, condition: Condition, config: UR5Config,
                cameras: Mapping[str, CameraSource], *, trial: int = 0) -> Episode:
    """One episode of ``policy`` under ``condition`` on ``robot``; returns it (not yet stored).

    Ends after ``config.max_steps`` actions, or early, with the arm stopped, when the robot halts (summary
    ``termination``: ``halted:<rule>``, with ``halt_reason``), the policy outputs a non-finite action
    (``unsafe_action``; it is never sent), a malformed one (``policy_error``: empty, another width, not numbers)
    or a camera fails (``camera_error``). The per-step records up to that point are kept either way."""
    surface = check_policy(policy)
    plan = resolve_plan(config, surface)
    missing = [c for c in surface.camera_names if c not in cameras]
    if missing:
        raise CameraError(f"{surface.family} policy needs camera(s) {missing}; the robot config maps "
                          f"{sorted(cameras)} (set robot.cameras, e.g. {{'{missing[0]}': '0'}})")
    key = EpisodeKey(condition.name, config.task, int(trial))
    instruction = condition.instruction(config.instruction)
    if callable(getattr(type(policy), "reset", None)):
        policy.reset()
    if config.home_q is not None:
        robot.move_to(config.home_q)
        time.sleep(config.settle_s)
    st0 = robot.check()
    recorder = EpisodeRecorder(key, st0.tcp_xyz, action_xyz=(0, 1, 2) if plan.action_space == "tcp_delta" else None,
                               meta={"instruction": config.instruction, "policy_instruction": instruction,
                                     "condition": condition.to_dict(), "armed": robot.armed,
                                     "action_space": plan.action_space, "open_loop_steps": plan.open_loop,
                                     "start_q": st0.q.tolist(), "start_tcp": st0.tcp_pose.tolist(),
                                     "robot": asdict(robot.info) if robot.info else None})
    termination, halt_reason, error = "max_steps", None, None
    n_servo = max(1, int(round(config.servo_hz / config.action_hz)))
    grip_idx = config.gripper_index
    if grip_idx is not None and grip_idx >= surface.action_dim:
        grip_idx = None  # the policy has no gripper output
    sent_before, rules_before = robot.sent, dict(robot.rule_counts)
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
    perf = time.perf_counter
    try:
        robot.begin_servo()
        step = 0
        while step < config.max_steps:
            st = robot.check()
            try:
                images = {name: _prepare_image(cameras[name].read(), plan.image_size)
                          for name in surface.camera_names}
            except CameraError:
                # a controller that just died explains a dead twin camera: report the robot's reason if so
                for _ in range(5):
                    time.sleep(robot.dt)
                    robot.check()
                raise
            if config.video:
                recorder.add_frame(images[surface.camera_names[0]])
            grip_state = robot.gripper.state() if robot.gripper else float("nan")
            state_vec = _policy_state(st, surface.state_dim, grip_state)
            robot.watchdog.feed(time.monotonic())
            t0 = perf()
            raw = _predict(policy, condition, images, instruction, state_vec, robot, executor)
            policy_s = perf() - t0
            rows = action_rows(raw, surface)
            q_ref, pose_ref = st.q.copy(), st.tcp_pose.copy()
            for j, row in enumerate(rows[: plan.open_loop]):
                if step >= config.max_steps:
                    break
                if not np.all(np.isfinite(row)):
                    raise SafetyViolation(f"policy output a non-finite action at step {step} "
                                          f"({np.array2string(row, precision=4)}); nothing of it was sent")
                t0 = perf()
                rules_step = sum(robot.rule_counts.values())
                checked, executed = _execute(robot, plan, config, row, j == 0, q_ref, pose_ref, n_servo)
                g_cmd = float("nan")
                if grip_idx is not None:
                    g_val = float(row[grip_idx])
                    closed = g_val > config.gripper_threshold if plan.close_above else g_val < config.gripper_threshold
                    robot.set_gripper(closed)
                    g_cmd = float(closed)
                env_s = perf() - t0
                after = robot.check()
                recorder.record(after.tcp_xyz, np.concatenate([executed, [g_cmd]]), raw_action=row,
                                gripper=g_cmd, gripper_state=robot.gripper.state() if robot.gripper else float("nan"),
                                policy_call=(j == 0), policy_s=policy_s if j == 0 else 0.0, env_s=env_s,
                                tcp_speed=float(np.linalg.norm(after.tcp_speed[:3])),
                                safety_clamps=float(sum(robot.rule_counts.values()) - rules_step),
                                held=float(checked.held),
                                **{f"q{i}": float(after.q[i]) for i in range(6)})
                step += 1
    except RobotHalted as e:
        termination, halt_reason = f"halted:{e.rule}", e.reason
    except tuple(cls for cls, _ in _ENDINGS) as e:
        termination, error = next(name for cls, name in _ENDINGS if isinstance(e, cls)), str(e)
        log.error("episode %s: %s; the arm was stopped", key.id, e)
        with contextlib.suppress(RobotHalted):
            robot.stop(termination.replace("_", " "))
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        if robot.halted is None:
            with contextlib.suppress(Exception):
                robot.end_servo()
    rules = {r: n - rules_before.get(r, 0) for r, n in robot.rule_counts.items() if n - rules_before.get(r, 0)}
    summary = {"termination": termination, "completed": termination == "max_steps", "halt_reason": halt_reason,
               "error": error, "armed": robot.armed, "commands_sent": robot.sent - sent_before,
               "safety_rules": rules, "max_steps": config.max_steps, "action_hz": config.action_hz,
               "servo_hz": config.servo_hz}
    if robot.halted is not None:
        summary["halted_wall"] = robot.halted_at
    return recorder.finish(False, summary=summary)
