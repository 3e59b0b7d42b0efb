"""Environments for (steered) VLA policies, each a :class:`nnsight_vla.rollout.sweep.Environment` (make the
environment, run one episode): :mod:`.arm_scene` (the trained small VLA's MuJoCo scene), :mod:`.libero`
(the LIBERO simulator, ``sim`` extra) and :mod:`.ur5` (a UR5 over ur_rtde, and its controller twin). Import the
subpackages directly; nothing heavy is imported with this package."""
