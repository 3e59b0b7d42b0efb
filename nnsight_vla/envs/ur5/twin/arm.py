"""The twin's simulated arm: the MuJoCo model of the arm, gripper and toy, with kinematics in the UR base frame
computed by MuJoCo itself (an independent check of the runner's DH kinematics)."""

from __future__ import annotations

import numpy as np

from ..poses import pose_to_matrix, relative_rotvec
from .config import TwinConfig
from .mjcf import ARM_JOINTS, build_mjcf

_RZ_PI = np.diag([-1.0, -1.0, 1.0, 1.0])  # UR "base" frame = robosuite/ROS base_link turned by pi about z


class Arm:
    """MuJoCo model of the arm + gripper + toy; kinematics in the UR base frame."""

    def __init__(self, cfg: TwinConfig):
        import mujoco

        self.mj = mujoco
        self.cfg = cfg
        toy_world = (-cfg.toy_position[0], -cfg.toy_position[1])  # UR base -> world (turned by pi about z)
        self.m = mujoco.MjModel.from_xml_string(build_mjcf(cfg.model, toy_world, cfg.camera_size))
        self.d = mujoco.MjData(self.m)
        self.kd = mujoco.MjData(self.m)  # scratch data for FK/IK
        self.qadr = np.array([self.m.joint(f"robot0_{j}").qposadr[0] for j in ARM_JOINTS])
        self.vadr = np.array([self.m.joint(f"robot0_{j}").dofadr[0] for j in ARM_JOINTS])
        self.base_id = self.m.body("robot0_base").id
        self.flange_id = self.m.body("robot0_right_hand").id
        self.toy_id = self.m.body("toy_main").id
        self.grip_act = [self.m.actuator(n).id for n in ("gripper0_finger_1", "gripper0_finger_2")]
        self.grip_qadr = self.m.joint("gripper0_finger_joint").qposadr[0]
        # geoms for the collision check: arm/gripper collision geoms against the table
        robot_geoms, table_geoms = set(), set()
        for i in range(self.m.ngeom):
            name = self.m.geom(i).name
            if (name.startswith("robot0_") and name.endswith("_col") and name != "robot0_base_col") or (
                name.startswith("gripper0_") and name.endswith("collision")
            ):
                robot_geoms.add(i)
            elif name.startswith("table") or name == "floor":
                table_geoms.add(i)
        self.robot_geoms, self.table_geoms = robot_geoms, table_geoms
        self.tcp = pose_to_matrix(cfg.tcp_offset)
        self.d.qpos[self.qadr] = cfg.initial_q
        mujoco.mj_forward(self.m, self.d)
        self.T_world_urbase = self._T_world_body(self.d, self.base_id) @ _RZ_PI
        self.T_urbase_world = np.linalg.inv(self.T_world_urbase)

    @staticmethod
    def _T_world_body(d, body_id) -> np.ndarray:
        T = np.eye(4)
        T[:3, :3] = d.xmat[body_id].reshape(3, 3)
        T[:3, 3] = d.xpos[body_id]
        return T

    def flange_T(self, d) -> np.ndarray:
        """Flange pose in the UR base frame from a data whose kinematics are up to date."""
        return self.T_urbase_world @ self._T_world_body(d, self.flange_id)

    def fk(self, q, tcp: np.ndarray | None = None) -> np.ndarray:
        """TCP pose (4x4, UR base frame) of joint vector ``q``."""
        self.kd.qpos[self.qadr] = q
        self.mj.mj_kinematics(self.m, self.kd)
        return self.flange_T(self.kd) @ (self.tcp if tcp is None else tcp)

    def ik(self, T_target: np.ndarray, q_seed, tcp: np.ndarray | None = None, iters: int = 100):
        """Damped least squares on MuJoCo's Jacobian; returns (q, converged)."""
        mj, m, kd = self.mj, self.m, self.kd
        tcp = self.tcp if tcp is None else tcp
        T_flange_des = self.T_world_urbase @ T_target @ np.linalg.inv(tcp)  # world frame
        q = np.array(q_seed, dtype=float)
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        for _ in range(iters):
            kd.qpos[self.qadr] = q
            mj.mj_kinematics(m, kd)
            mj.mj_comPos(m, kd)
            T = self._T_world_body(kd, self.flange_id)
            e_p = T_flange_des[:3, 3] - T[:3, 3]
            e_r = relative_rotvec(T_flange_des[:3, :3], T[:3, :3])
            if np.linalg.norm(e_p) < 1e-6 and np.linalg.norm(e_r) < 1e-5:
                return q, True
            mj.mj_jacBody(m, kd, jacp, jacr, self.flange_id)
            J = np.vstack([jacp[:, self.vadr], jacr[:, self.vadr]])
            e = np.concatenate([e_p, e_r])
            dq = J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(6), e)
            n = np.linalg.norm(dq)
            if n > 0.3:
                dq *= 0.3 / n
            q = q + dq
        kd.qpos[self.qadr] = q
        mj.mj_kinematics(m, kd)
        T = self._T_world_body(kd, self.flange_id)
        ok = np.linalg.norm(T_flange_des[:3, 3] - T[:3, 3]) < 1e-4
        return q, bool(ok)

    def jacobian(self, q) -> np.ndarray:
        """6x6 Jacobian of the TCP (linear; angular) in the UR base frame."""
        mj, m, kd = self.mj, self.m, self.kd
        kd.qpos[self.qadr] = q
        mj.mj_kinematics(m, kd)
        mj.mj_comPos(m, kd)
        jacp, jacr = np.zeros((3, m.nv)), np.zeros((3, m.nv))
        p_tcp_world = (self._T_world_body(kd, self.flange_id) @ self.tcp)[:3, 3]
        mj.mj_jac(m, kd, jacp, jacr, p_tcp_world, self.flange_id)
        R = self.T_urbase_world[:3, :3]
        return np.vstack([R @ jacp[:, self.vadr], R @ jacr[:, self.vadr]])

    def table_contact(self) -> float:
        """Largest penetration (m) of an arm/gripper collision geom into the table or floor."""
        worst = 0.0
        for i in range(self.d.ncon):
            c = self.d.contact[i]
            g1, g2 = int(c.geom1), int(c.geom2)
            robot, table = self.robot_geoms, self.table_geoms
            if (g1 in robot and g2 in table) or (g2 in robot and g1 in table):
                worst = max(worst, -float(c.dist))
        return worst
