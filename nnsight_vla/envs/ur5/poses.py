"""Pose and rotation math for UR poses ``[x, y, z, rx, ry, rz]`` (position + rotation vector, UR base frame).

Written once for the runner, the safety envelope and the twin. Scalar math on Python floats: these run inside
the 125 Hz servo loop and the twin's physics tick (several times faster than scipy's ``Rotation`` per call, and
nothing is imported on first use).
"""

from __future__ import annotations

import math

import numpy as np


def rotvec_to_matrix(rv) -> np.ndarray:
    """Rotation vector (axis x angle) -> 3x3 rotation matrix (Rodrigues)."""
    x, y, z = (float(v) for v in np.asarray(rv, dtype=float).reshape(3))
    angle = math.sqrt(x * x + y * y + z * z)
    if angle < 1e-12:
        return np.eye(3)
    kx, ky, kz = x / angle, y / angle, z / angle
    c, s = math.cos(angle), math.sin(angle)
    C = 1.0 - c
    return np.array([[c + kx * kx * C, kx * ky * C - kz * s, kx * kz * C + ky * s],
                     [ky * kx * C + kz * s, c + ky * ky * C, ky * kz * C - kx * s],
                     [kz * kx * C - ky * s, kz * ky * C + kx * s, c + kz * kz * C]])


def matrix_to_rotvec(R) -> np.ndarray:
    """3x3 rotation matrix -> rotation vector with its angle in [0, pi] (UR's convention), via a quaternion."""
    (m00, m01, m02), (m10, m11, m12), (m20, m21, m22) = np.asarray(R, dtype=float).reshape(3, 3).tolist()
    tr = m00 + m11 + m22
    if tr >= m00 and tr >= m11 and tr >= m22:
        s = 2.0 * math.sqrt(max(1.0 + tr, 0.0))
        w, x, y, z = 0.25 * s, (m21 - m12) / s, (m02 - m20) / s, (m10 - m01) / s
    elif m00 >= m11 and m00 >= m22:
        s = 2.0 * math.sqrt(max(1.0 + m00 - m11 - m22, 1e-300))
        w, x, y, z = (m21 - m12) / s, 0.25 * s, (m01 + m10) / s, (m02 + m20) / s
    elif m11 >= m22:
        s = 2.0 * math.sqrt(max(1.0 + m11 - m00 - m22, 1e-300))
        w, x, y, z = (m02 - m20) / s, (m01 + m10) / s, 0.25 * s, (m12 + m21) / s
    else:
        s = 2.0 * math.sqrt(max(1.0 + m22 - m00 - m11, 1e-300))
        w, x, y, z = (m10 - m01) / s, (m02 + m20) / s, (m12 + m21) / s, 0.25 * s
    if w < 0:
        w, x, y, z = -w, -x, -y, -z
    n = math.sqrt(x * x + y * y + z * z)
    if n < 1e-15:
        return np.zeros(3)
    k = 2.0 * math.atan2(n, w) / n
    return np.array([x * k, y * k, z * k])


def pose_to_matrix(pose) -> np.ndarray:
    """UR pose ``[x, y, z, rx, ry, rz]`` -> 4x4 homogeneous matrix."""
    pose = np.asarray(pose, dtype=float).reshape(6)
    T = np.eye(4)
    T[:3, :3] = rotvec_to_matrix(pose[3:])
    T[:3, 3] = pose[:3]
    return T


def matrix_to_pose(T) -> np.ndarray:
    """4x4 homogeneous matrix -> UR pose ``[x, y, z, rx, ry, rz]``."""
    T = np.asarray(T, dtype=float)
    return np.concatenate([T[:3, 3], matrix_to_rotvec(T[:3, :3])])


def rotation_angle(R_a, R_b) -> float:
    """Angle (rad) of the rotation taking ``R_b`` to ``R_a``."""
    c = (np.trace(np.asarray(R_a) @ np.asarray(R_b).T) - 1.0) / 2.0
    return float(math.acos(min(1.0, max(-1.0, c))))


def relative_rotvec(R_to, R_from) -> np.ndarray:
    """Rotation vector (base frame) of the rotation taking ``R_from`` to ``R_to``."""
    return matrix_to_rotvec(np.asarray(R_to) @ np.asarray(R_from).T)


def interp_matrix(Ta, Tb, f: float) -> np.ndarray:
    """The pose a fraction ``f`` of the way from ``Ta`` to ``Tb`` (4x4): straight line, shortest rotation."""
    Ta, Tb = np.asarray(Ta, float), np.asarray(Tb, float)
    T = np.eye(4)
    T[:3, :3] = rotvec_to_matrix(f * relative_rotvec(Tb[:3, :3], Ta[:3, :3])) @ Ta[:3, :3]
    T[:3, 3] = Ta[:3, 3] + f * (Tb[:3, 3] - Ta[:3, 3])
    return T


def interp_pose(a, b, f: float) -> np.ndarray:
    """The UR pose a fraction ``f`` of the way from pose ``a`` to pose ``b``."""
    return matrix_to_pose(interp_matrix(pose_to_matrix(a), pose_to_matrix(b), f))


def euler_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Rotation about the fixed x, then y, then z axes (scipy's ``from_euler("xyz")``): Rz @ Ry @ Rx."""
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch), math.sin(pitch), math.cos(yaw),
                              math.sin(yaw))
    return np.array([[cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
                     [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
                     [-sp, cp * sr, cp * cr]])
