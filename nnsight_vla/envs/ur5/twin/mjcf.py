"""The twin's MuJoCo scene, composed from robosuite's models: a UR5e arm with a Robotiq 85 gripper whose link
offsets follow the chosen model's published DH parameters, a table, a toy block and a fixed scene camera."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET

import numpy as np

from ....errors import TwinError
from ..kinematics import UR_DH_PARAMS

ARM_JOINTS = ("shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint", "wrist_1_joint", "wrist_2_joint",
              "wrist_3_joint")
TABLE_TOP_Z = 0.8


def build_mjcf(model: str, toy_xy_world: tuple[float, float], camera_size: int) -> str:
    """Compose the scene from robosuite's models (UR5e + Robotiq 85, table, toy, cameras) as MJCF text."""
    logging.getLogger("robosuite").setLevel(logging.ERROR)  # robosuite's "private macro file" warnings
    from robosuite.models import MujocoWorldBase
    from robosuite.models.arenas import TableArena
    from robosuite.models.grippers import gripper_factory
    from robosuite.models.objects import BoxObject
    from robosuite.models.robots import UR5e

    world = MujocoWorldBase()
    robot = UR5e()
    robot.add_gripper(gripper_factory("Robotiq85Gripper"))
    robot.set_base_xpos([0.0, 0.0, TABLE_TOP_Z])
    world.merge(robot)
    world.merge(TableArena(table_full_size=(1.1, 1.2, 0.05), table_offset=(0.3, 0.0, TABLE_TOP_Z)))
    toy = BoxObject(name="toy", size=[0.02, 0.02, 0.02], rgba=[0.9, 0.15, 0.1, 1.0], density=300)
    body = toy.get_obj()
    body.set("pos", f"{toy_xy_world[0]} {toy_xy_world[1]} {TABLE_TOP_Z + 0.021}")
    world.worldbody.append(body)
    world.merge_assets(toy)

    # Link offsets = the published DH parameters of the model (robosuite's mesh offsets differ by mm;
    # for the UR5 they differ by cm, and the meshes then sit slightly off their joints).
    dh = UR_DH_PARAMS[model]
    d1, d4, d5, d6 = dh["d"][0], dh["d"][3], dh["d"][4], dh["d"][5]
    a2, a3 = -dh["a"][1], -dh["a"][2]
    offsets = {
        "robot0_shoulder_link": f"0 0 {d1}",
        "robot0_forearm_link": f"0 -0.131 {a2}",
        "robot0_wrist_1_link": f"0 0 {a3}",
        "robot0_wrist_2_link": f"0 {d4 - (0.138 - 0.131)} 0",
        "robot0_wrist_3_link": f"0 0 {d5}",
        "robot0_right_hand": f"0 {d6} 0",
    }
    for name, pos in offsets.items():
        el = world.worldbody.find(f".//body[@name='{name}']")
        if el is None:  # pragma: no cover - robosuite layout changed
            raise TwinError(f"robosuite's UR5e model has no body {name!r}; cannot set {model} geometry")
        el.set("pos", pos)
    # robosuite's Robotiq 85 joints have no armature or damping: its tiny finger links under the kp=20 position
    # actuators are unstable at a 2 ms step (finger velocities of hundreds of rad/s, the fingers end outside
    # their joint range and do not reopen); a little rotor inertia and damping makes them close and open cleanly
    for joint in world.worldbody.iter("joint"):
        if joint.get("name", "").startswith("gripper0_"):
            joint.set("armature", "0.01")
            joint.set("damping", "0.1")

    # a fixed scene camera looking at the table from the front-right, slightly above
    cam_pos = np.array([1.25, -0.55, TABLE_TOP_Z + 0.75])
    target = np.array([0.35, 0.0, TABLE_TOP_Z + 0.15])
    fwd = target - cam_pos
    fwd /= np.linalg.norm(fwd)
    right = np.cross(fwd, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    cam = ET.SubElement(world.worldbody, "camera")
    cam.set("name", "scene")
    cam.set("mode", "fixed")
    cam.set("pos", " ".join(f"{v:.4f}" for v in cam_pos))
    cam.set("xyaxes", " ".join(f"{v:.4f}" for v in (*right, *up)))
    cam.set("fovy", "50")
    xml = world.get_xml()
    # an offscreen buffer just large enough for the images, no multisampling: software GL (llvmpipe) on a
    # CPU-only machine renders a 64x64 frame in ~10-40 ms this way instead of ~50-70 ms
    return xml.replace("<visual>", f'<visual><global offwidth="{max(64, camera_size)}" '
                                   f'offheight="{max(64, camera_size)}"/><quality offsamples="0"/>', 1)
