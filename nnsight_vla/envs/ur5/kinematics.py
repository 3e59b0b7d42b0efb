"""Universal Robots arm geometry: the published DH parameters, the home pose, forward / inverse kinematics and
the Jacobian of the TCP in the UR base frame (what the safety envelope checks commands with)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ...errors import SafetyConfigError
from .poses import matrix_to_pose, pose_to_matrix, relative_rotvec, rotation_angle

#: published DH parameters of Universal Robots arms (d and a in metres); alpha is shared by all of them
UR_DH_PARAMS: dict[str, dict[str, tuple[float, ...]]] = {
    "UR3": {"d": (0.1519, 0, 0, 0.11235, 0.08535, 0.0819), "a": (0, -0.24365, -0.21325, 0, 0, 0)},
    "UR5": {"d": (0.089159, 0, 0, 0.10915, 0.09465, 0.0823), "a": (0, -0.425, -0.39225, 0, 0, 0)},
    "UR10": {"d": (0.1273, 0, 0, 0.163941, 0.1157, 0.0922), "a": (0, -0.612, -0.5723, 0, 0, 0)},
    "UR3e": {"d": (0.15185, 0, 0, 0.13105, 0.08535, 0.0921), "a": (0, -0.24355, -0.2132, 0, 0, 0)},
    "UR5e": {"d": (0.1625, 0, 0, 0.1333, 0.0997, 0.0996), "a": (0, -0.425, -0.3922, 0, 0, 0)},
    "UR10e": {"d": (0.1807, 0, 0, 0.17415, 0.11985, 0.11655), "a": (0, -0.6127, -0.57155, 0, 0, 0)},
}
UR_DH_ALPHA = (math.pi / 2, 0.0, 0.0, math.pi / 2, -math.pi / 2, 0.0)

#: a common "home" pose: upper arm vertical, forearm horizontal, tool pointing down, in front of the base (-x)
DEFAULT_HOME_Q = (0.0, -math.pi / 2, math.pi / 2, -math.pi / 2, -math.pi / 2, 0.0)


class URKinematics:
    """Forward/inverse kinematics of a UR arm from its published DH parameters (UR base frame).

    ``tcp_offset`` is the TCP pose in the flange frame (as set on the teach pendant / with ``setTcp``).
    """

    def __init__(self, model: str = "UR5", tcp_offset: Sequence[float] = (0, 0, 0, 0, 0, 0)):
        if model not in UR_DH_PARAMS:
            raise SafetyConfigError(f"unknown robot model {model!r}; known models: {', '.join(UR_DH_PARAMS)}")
        self.model = model
        self.d = np.asarray(UR_DH_PARAMS[model]["d"], float)
        self.a = np.asarray(UR_DH_PARAMS[model]["a"], float)
        self.alpha = np.asarray(UR_DH_ALPHA, float)
        self.tcp = pose_to_matrix(tcp_offset)

    def frames(self, q) -> list[np.ndarray]:
        """Base-frame transforms of the 6 DH frames (the last one is the flange)."""
        q = np.asarray(q, float).reshape(6)
        T = np.eye(4)
        out = []
        for i in range(6):
            ct, st = math.cos(q[i]), math.sin(q[i])
            ca, sa = math.cos(self.alpha[i]), math.sin(self.alpha[i])
            A = np.array([[ct, -st * ca, st * sa, self.a[i] * ct],
                          [st, ct * ca, -ct * sa, self.a[i] * st],
                          [0.0, sa, ca, self.d[i]],
                          [0.0, 0.0, 0.0, 1.0]])
            T = T @ A
            out.append(T)
        return out

    def fk(self, q) -> np.ndarray:
        """4x4 TCP pose in the base frame."""
        return self.frames(q)[-1] @ self.tcp

    def fk_pose(self, q) -> np.ndarray:
        return matrix_to_pose(self.fk(q))

    def jacobian(self, q) -> np.ndarray:
        """6x6 geometric Jacobian of the TCP (linear rows first), base frame."""
        return self.fk_jacobian(q)[1]

    def fk_jacobian(self, q) -> tuple[np.ndarray, np.ndarray]:
        """The TCP pose (4x4) and its Jacobian, from one pass over the frames."""
        Ts = self.frames(q)
        T = Ts[-1] @ self.tcp
        J = np.zeros((6, 6))
        z, o = np.array([0.0, 0.0, 1.0]), np.zeros(3)
        for i in range(6):
            J[:3, i] = np.cross(z, T[:3, 3] - o)
            J[3:, i] = z
            z, o = Ts[i][:3, 2], Ts[i][:3, 3]
        return T, J

    def ik(self, T_target, q_seed, *, iters: int = 60, tol: float = 1e-6) -> tuple[np.ndarray, bool]:
        """Damped least-squares inverse kinematics from ``q_seed``; returns (q, converged)."""
        T_target = np.asarray(T_target, float)
        if T_target.shape == (6,):
            T_target = pose_to_matrix(T_target)
        q = np.asarray(q_seed, float).reshape(6).copy()
        for _ in range(iters):
            T, J = self.fk_jacobian(q)
            e = np.concatenate([T_target[:3, 3] - T[:3, 3], relative_rotvec(T_target[:3, :3], T[:3, :3])])
            if np.linalg.norm(e[:3]) < tol and np.linalg.norm(e[3:]) < 10 * tol:
                return q, True
            dq = J.T @ np.linalg.solve(J @ J.T + 1e-6 * np.eye(6), e)
            n = float(np.linalg.norm(dq))
            if n > 0.5:
                dq *= 0.5 / n
            q = q + dq
        T = self.fk(q)
        ok = np.linalg.norm(T_target[:3, 3] - T[:3, 3]) < 1e-4 and rotation_angle(T_target[:3, :3], T[:3, :3]) < 1e-3
        return q, bool(ok)
