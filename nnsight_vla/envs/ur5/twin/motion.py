"""What the twin controller's trajectory generator does with each command: servoJ/servoL track their target with
a lookahead lag, moveJ/moveL follow trapezoidal profiles, speedJ/speedL integrate velocities, stops decelerate."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from ..poses import interp_matrix, pose_to_matrix, relative_rotvec
from .arm import Arm

_JOINT_VMAX = math.pi  # rad/s, UR5 hardware joint speed limit
_Q_LIMIT = 2 * math.pi


def _trapezoid(dist: float, v: float, a: float) -> tuple[float, Callable[[float], float]]:
    """Duration and progress function s(t) in [0, dist] of a trapezoidal (or triangular) profile."""
    v, a = max(v, 1e-6), max(a, 1e-6)
    if dist <= 0:
        return 0.0, lambda t: 0.0
    t_acc = v / a
    if a * t_acc * t_acc >= dist:  # triangular
        t_acc = math.sqrt(dist / a)
        v = a * t_acc
        total = 2 * t_acc
    else:
        total = 2 * t_acc + (dist - a * t_acc * t_acc) / v

    def s(t: float) -> float:
        t = min(max(t, 0.0), total)
        if t < t_acc:
            return 0.5 * a * t * t
        if t > total - t_acc:
            r = total - t
            return dist - 0.5 * a * r * r
        return 0.5 * a * t_acc * t_acc + v * (t - t_acc)

    return total, s


class Motion:
    """Joint-space state of the arm and the active motion (servo, speed, move, stop)."""

    def __init__(self, arm: Arm, q0):
        self.arm = arm
        self.q = np.array(q0, dtype=float)
        self.qd = np.zeros(6)
        self.qdd = np.zeros(6)
        self.target_q = self.q.copy()
        self.mode = "idle"
        self.params: dict[str, Any] = {}
        self.done = True
        self.ik_failures = 0

    # -- starting motions
    def servo_j(self, q, lookahead: float) -> None:
        if self.mode != "servo":
            self.mode = "servo"
        self.params = {"q": np.asarray(q, float), "lookahead": float(lookahead)}
        self.done = True

    def servo_l(self, pose, lookahead: float) -> None:
        pose = np.asarray(pose, float)
        last = self.params.get("pose") if self.mode == "servo" else None
        if last is not None and np.array_equal(last, pose):
            self.params["lookahead"] = float(lookahead)
            return
        q, ok = self.arm.ik(pose_to_matrix(pose), self.params.get("q", self.q) if self.mode == "servo" else self.q)
        if not ok:
            self.ik_failures += 1
            return
        self.mode = "servo"
        self.params = {"q": q, "lookahead": float(lookahead), "pose": pose}

    def speed_j(self, qd, acc: float) -> None:
        self.mode = "speedj"
        self.params = {"qd": np.asarray(qd, float), "a": max(float(acc), 1e-3)}

    def speed_l(self, xd, acc: float) -> None:
        self.mode = "speedl"
        self.params = {"xd": np.asarray(xd, float), "a": max(float(acc), 1e-3),
                       "x_cmd": self.params.get("x_cmd", np.zeros(6)) if self.mode == "speedl" else np.zeros(6)}

    def move_j(self, q1, v: float, a: float) -> bool:
        q0 = self.q.copy()
        q1 = np.asarray(q1, float)
        dist = float(np.max(np.abs(q1 - q0)))
        total, s = _trapezoid(dist, v, a)
        self.mode, self.done = "movej", False
        self.params = {"q0": q0, "q1": q1, "dist": dist, "total": total, "s": s, "t": 0.0}
        self.qd[:] = 0
        return True

    def move_l(self, pose1, v: float, a: float) -> bool:
        T0 = self.arm.fk(self.q)
        T1 = pose_to_matrix(pose1)
        q_end, ok = self.arm.ik(T1, self.q)
        if not ok:
            self.ik_failures += 1
            return False
        dist = float(np.linalg.norm(T1[:3, 3] - T0[:3, 3]))
        ang = float(np.linalg.norm(relative_rotvec(T1[:3, :3], T0[:3, :3])))
        length = max(dist, ang * 0.1)  # pure rotations: treat 1 rad as 10 cm of path
        total, s = _trapezoid(length, v, a)
        self.mode, self.done = "movel", False
        self.params = {"T0": T0, "T1": T1, "len": length, "total": total, "s": s, "t": 0.0, "q_end": q_end}
        self.qd[:] = 0
        return True

    def stop(self, decel: float) -> None:
        if self.mode == "idle":
            self.done = True
            return
        self.mode, self.done = "stopping", False
        self.params = {"a": max(float(decel), 0.05)}

    def halt(self) -> None:
        """Immediate stop (protective / emergency stop)."""
        self.mode, self.params, self.done = "idle", {}, True
        self.qd[:] = 0
        self.qdd[:] = 0
        self.target_q = self.q.copy()

    # -- one physics tick
    def step(self, dt: float) -> None:
        q_prev, qd_prev = self.q.copy(), self.qd.copy()
        mode, p = self.mode, self.params
        if mode == "servo":
            tau = max(p["lookahead"], 2 * dt)
            v = np.clip((p["q"] - self.q) / tau, -_JOINT_VMAX, _JOINT_VMAX)
            self.q = self.q + v * dt
            self.target_q = p["q"]
        elif mode == "speedj":
            dv = np.clip(p["qd"] - self.qd, -p["a"] * dt, p["a"] * dt)
            self.qd = np.clip(self.qd + dv, -_JOINT_VMAX, _JOINT_VMAX)
            self.q = self.q + self.qd * dt
            self.target_q = self.q
        elif mode == "speedl":
            dx = np.clip(p["xd"] - p["x_cmd"], -p["a"] * dt, p["a"] * dt)
            p["x_cmd"] = p["x_cmd"] + dx
            J = self.arm.jacobian(self.q)
            qd = np.linalg.solve(J.T @ J + 1e-4 * np.eye(6), J.T @ p["x_cmd"])
            self.q = self.q + np.clip(qd, -_JOINT_VMAX, _JOINT_VMAX) * dt
            self.target_q = self.q
        elif mode == "movej":
            p["t"] += dt
            frac = p["s"](p["t"]) / p["dist"] if p["dist"] > 0 else 1.0
            self.q = p["q0"] + (p["q1"] - p["q0"]) * frac
            self.target_q = p["q1"]
            if p["t"] >= p["total"]:
                self.q, self.mode, self.done = p["q1"].copy(), "idle", True
        elif mode == "movel":
            p["t"] += dt
            frac = p["s"](p["t"]) / p["len"] if p["len"] > 0 else 1.0
            q, ok = self.arm.ik(interp_matrix(p["T0"], p["T1"], frac), self.q, iters=20)
            if ok:
                self.q = q
            self.target_q = p["q_end"]
            if p["t"] >= p["total"]:
                self.q, self.mode, self.done = p["q_end"].copy(), "idle", True
        elif mode == "stopping":
            speed = np.max(np.abs(self.qd)) if np.any(self.qd) else 0.0
            if speed <= p["a"] * dt:
                self.mode, self.qd, self.done = "idle", np.zeros(6), True
            else:
                self.qd = self.qd * (1.0 - p["a"] * dt / speed)
                self.q = self.q + self.qd * dt
            self.target_q = self.q
        self.q = np.clip(self.q, -_Q_LIMIT, _Q_LIMIT)
        if mode not in ("stopping",):
            self.qd = (self.q - q_prev) / dt
        self.qdd = (self.qd - qd_prev) / dt
