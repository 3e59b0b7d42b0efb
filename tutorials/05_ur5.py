# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 5 · Rehearsing on the UR5 twin, then the real arm
#
# **What you learn:** the safety envelope every arm command passes through (what it clamps, what it refuses); the
# controller twin (a fake UR5 controller that speaks the real RTDE / dashboard / script protocols, with a MuJoCo
# arm inside); a dry run (nothing is sent); a short *armed* run against the twin, unsteered vs neuron-steered; and
# what changes for the real arm (`--armed`, the config file, the safe defaults).
#
# **Needs:** the robot and simulator extras (`pip install -e ".[robot,sim]"`: `ur_rtde`, MuJoCo, robosuite for the
# twin's UR5e model), `MUJOCO_GL=egl`. Offline; the twin listens on a free loopback address (127.0.0.x).
# **Time:** ≈ 25 s on 2 CPU cores (measured 20–26 s; the twin starts in a few seconds; five short episodes).
#
# Nothing here can move a real robot: every connection goes to the twin this notebook starts.

# %%
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import json
import logging
import time
from pathlib import Path

import numpy as np

import nnsight_vla as nv
from nnsight_vla.reports import plots
from nnsight_vla.rollout.conditions import Condition, SpeedSteering, baseline
from nnsight_vla.rollout.stats import compare_conditions, format_rows
from nnsight_vla.rollout.store import ResultsStore
from nnsight_vla.envs.ur5 import SafetyConfig, SafetyEnvelope, SafetyViolation, URKinematics
from nnsight_vla.envs.ur5 import DEFAULT_HOME_Q, UR5Config, UR5ScriptedPolicy, load_config, probe_controller, \
    run_conditions
from nnsight_vla.envs.ur5 import TwinProcess, free_loopback_host

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "05_ur5"
OUT.mkdir(parents=True, exist_ok=True)
HOME = np.array(DEFAULT_HOME_Q)
logging.getLogger("nnsight_vla").setLevel(logging.WARNING)

# %% [markdown]
# ## The safety envelope, offline
#
# `SafetyConfig` holds the limits (conservative defaults for a UR5 on a table: TCP ≤ 0.25 m/s, joints ≤ 0.5 rad/s,
# a workspace box in front of the base, ≤ 2.5 cm and ≤ 0.05 rad per policy action...). `SafetyEnvelope` checks a
# command and returns what may be sent plus the names of the rules that changed it (`fired`); a NaN/inf target is
# refused outright (`SafetyViolation`, nothing is sent).

# %%
safety = SafetyConfig()
print({k: v for k, v in safety.to_dict().items() if k.startswith(("max_", "workspace", "watchdog"))})
envelope = SafetyEnvelope(safety)
kin = URKinematics("UR5")

# a policy asks for a big joint jump: clamped to max_joint_step per action
checked = envelope.action_joint(HOME, HOME + [0.3, -0.2, 0.0, 0.0, 0.0, 0.01])
print("joint jump  ->", checked.fired, np.round(checked.value - HOME, 3))
assert "joint_step" in checked.fired

# a TCP target 30 cm above the home pose, i.e. far and outside the workspace box: step-clamped and kept in the box
pose = kin.fk_pose(HOME)
target = pose.copy()
target[2] += 0.30
checked = envelope.action_tcp(pose, target, HOME)
print("TCP +30 cm  ->", checked.fired, "moved", round(float(np.linalg.norm(checked.value[:3] - pose[:3])), 4), "m")
assert "tcp_step" in checked.fired and envelope.in_workspace(checked.value)

# with a box whose ceiling is 1 cm above the home TCP, a 2 cm lift is cut at the ceiling
low_ceiling = SafetyEnvelope(SafetyConfig(workspace_max=(-0.25, 0.15, float(pose[2]) + 0.01)))
target = pose.copy()
target[2] += 0.02
checked = low_ceiling.action_tcp(pose, target, HOME)
print("lift +2 cm  ->", checked.fired, "z gained", round(float(checked.value[2] - pose[2]), 4), "m")
assert "workspace" in checked.fired

# a target with a NaN is refused, never sent
try:
    envelope.action_joint(HOME, HOME + [np.nan, 0, 0, 0, 0, 0])
except SafetyViolation as refused:
    print("NaN target  -> refused:", refused)

# %% [markdown]
# ## Start the twin
#
# `TwinProcess` runs the twin in its own process (ur_rtde's constructors hold the GIL while they wait, so an
# in-process fake controller would deadlock) on a free loopback address; ur_rtde always uses the ports
# 30004 / 30003 / 29999, so each twin gets its own 127.0.0.x. From a shell: `nnsight-vla ur5 twin --host 127.0.0.2`.
# `probe_controller` is the runner's first check on any controller (plain sockets, short timeouts: an unreachable or
# hung controller fails in well under a second instead of hanging).

# %%
twin = TwinProcess(free_loopback_host()).start()
print("twin at", twin.host, "pid", twin.pid)
info = probe_controller(twin.host)
print(f"controller: {info.model} serial {info.serial}, PolyScope {info.polyscope}, e-Series: {info.e_series}")

# %% [markdown]
# ## A dry run
#
# Without `armed=True` (the CLI's `--armed`) the runner creates nothing that could move the arm: it reads the robot
# state (`rtde_receive`), runs the policy on the camera images, passes every command it *would* send through the
# envelope and writes it to the command log. The twin's own counters prove nothing arrived.
#
# `UR5Config` describes the episodes (task, instruction, steps, action rate, cameras...). The twin renders a scene
# and a wrist camera (`twin:scene`, `twin:wrist`). `state_timeout_s` is relaxed to 1 s because the twin is a Python
# process on a busy 2-core machine (a real controller streams every 8 ms; keep the default 0.2 s there).

# %%
CAMERAS = {"base": "twin:scene", "wrist": "twin:wrist", "primary": "twin:scene"}
config = UR5Config(max_steps=6, cameras=CAMERAS, instruction="move the toy to the right")
rehearsal = SafetyConfig(state_timeout_s=1.0)
before = twin.admin("stats")
dry = run_conditions(UR5ScriptedPolicy("pi0"), [baseline()], config, OUT / "dry", host=twin.host,
                     armed=False, safety=rehearsal)
after = twin.admin("stats")
print(dry)
for counter in ("input_packages", "scripts", "io_writes"):
    print(f"  twin {counter}: {before[counter]} -> {after[counter]}")
    assert before[counter] == after[counter]  # nothing reached the controller
log_file = next((OUT / "dry" / "commands").glob("*.jsonl"))
entries = [json.loads(line) for line in log_file.read_text().splitlines()]
would = [e for e in entries if e["kind"] == "servoJ"]
print(f"command log: {len(would)} servoJ commands that WOULD have been sent (armed={would[0]['armed']}), e.g.",
      np.round(would[-1]["sent"], 4))

# %% [markdown]
# ## Armed, against the twin: unsteered vs steered
#
# Armed, the runner uploads ur_rtde's control script and streams servoJ/servoL targets at 125 Hz, each action
# interpolated over 1/`action_hz`. First a scripted policy (no model) whose speed a `SpeedSteering` doubles — the
# runner's mechanics in isolation — then a real network: a tiny random π0 whose action-expert neurons are steered
# with `nnsight_vla.Steering` (the same object as in tutorials 3 and 4). π0 outputs chunks of joint deltas, executed
# open loop for `open_loop_steps` actions before the policy is asked again.

# %%
conditions = [baseline(), Condition("fast", steering=SpeedSteering(2.0), kind="steered", concept="speed")]
armed = run_conditions(UR5ScriptedPolicy("pi0", period=3), conditions, config, OUT / "armed_scripted",
                       host=twin.host, armed=True, safety=rehearsal)
print(armed)
store = ResultsStore.open(OUT / "armed_scripted")
by = {s["condition"]: s for s in store.summaries()}
print(f"mean end-effector displacement per step: baseline {by['baseline']['mean_disp'] * 1000:.1f} mm, "
      f"fast {by['fast']['mean_disp'] * 1000:.1f} mm")
assert by["fast"]["mean_disp"] > 1.4 * by["baseline"]["mean_disp"]

# %%
pi0 = nv.tiny("pi0", seed=0)
expert = nv.NeuronSet.for_model(pi0, [(layer, n) for layer in range(2) for n in range(16)], stack="expert",
                                name="probe")
steered_conditions = [baseline(), Condition("steer@a30", steering=nv.Steering(expert, alpha=30.0), kind="steered")]
# a random network's joint deltas are arbitrary: scale them down; its first call is slow: a generous watchdog
tiny_config = UR5Config(max_steps=4, cameras=CAMERAS, open_loop_steps=2, action_scale=0.3)
tiny_safety = SafetyConfig(state_timeout_s=1.0, watchdog_s=60.0)
result = run_conditions(pi0, steered_conditions, tiny_config, OUT / "armed_pi0", host=twin.host, armed=True,
                        safety=tiny_safety)
print(result)
store_pi0 = ResultsStore.open(OUT / "armed_pi0")
steps = {c: store_pi0.steps(conditions=[c]).to_pandas() for c in ("baseline", "steer@a30")}
raw0 = {c: np.asarray(t["raw_action"].iloc[0]) for c, t in steps.items()}
print("first raw action, baseline :", np.round(raw0["baseline"], 3))
print("first raw action, steered  :", np.round(raw0["steer@a30"], 3))
print("safety clamps per step (steered):", steps["steer@a30"]["safety_clamps"].tolist())
assert np.abs(raw0["baseline"] - raw0["steer@a30"]).max() > 1e-3

# %% [markdown]
# The results folders have the same layout as LIBERO's (tutorial 4), so the same statistics and figures apply;
# each folder also keeps the command log of every run (`commands/*.jsonl`).

# %%
rows = compare_conditions(store, "disp", per_task=False)
print(format_rows(rows, ["condition", "n", "mean", "pct_change", "p_value"]))
for path in plots.plot_all(store, OUT / "plots"):
    print("wrote", path.relative_to(OUT))
twin.stop()

# %% [markdown]
# ## The real arm
#
# The same runner talks to a real UR controller; what changes:
#
# 1. **A config file for your cell** with a `robot:` section (`UR5Config`: task, instruction, cameras as OpenCV
#    device indices or stream URLs, action rate, home pose, expected model and serial number) and a `safety:`
#    section (`SafetyConfig`: *measure your workspace box*, keep speeds low at first). Unknown keys are errors, so a
#    typo cannot silently drop a limit.
# 2. **A dry run first** (the default): it connects read-only, checks the controller's model, serial and that the
#    reported TCP matches the UR5 kinematics, runs the policy on live images and logs every command it would send.
# 3. **`--armed`** only then. The arm first moves to `home_q` slowly (moveJ); a protective or emergency stop, a lost
#    connection, stale state or a policy slower than `watchdog_s` stops the arm and halts the sweep, which never
#    resumes by itself: fix the cause and rerun (finished episodes are kept and skipped).

# %%
cell = OUT / "cell.yaml"
cell.write_text("""\
robot:
  task: transport_high
  instruction: pick up the toy and move it to the right
  max_steps: 50
  action_hz: 10
  cameras: {base: "0", wrist: "1"}      # OpenCV devices (or stream URLs)
  expected_model: UR5
  expected_serial: "2019300001"         # refuse any other robot
safety:
  workspace_min: [-0.65, -0.30, 0.18]   # measured in the robot base frame, metres
  workspace_max: [-0.30, 0.10, 0.55]
  max_tcp_speed: 0.10                   # start slow
  max_joint_speed: 0.3
  watchdog_s: 1.0
""")
robot_config, cell_safety = load_config(cell)
print(robot_config.task, robot_config.camera_map, "| TCP speed limit", cell_safety.max_tcp_speed, "m/s")

# %% [markdown]
# ```bash
# # rehearse on the twin (same command as for the robot, with the twin's cameras)
# nnsight-vla ur5 twin --host 127.0.0.2 &
# nnsight-vla ur5 run --host 127.0.0.2 --cameras twin --policy load:/models/pi0 --family pi0 \
#     --conditions baseline,prompt:fast --results runs/rehearsal                # dry run
# nnsight-vla ur5 run --host 127.0.0.2 --cameras twin ... --armed
#
# # the robot
# nnsight-vla ur5 run --host 192.168.1.10 --config cell.yaml --policy load:/models/pi0 --family pi0 \
#     --conditions baseline,prompt:fast --trials 5 --results runs/ur5          # dry run: check the log
# nnsight-vla ur5 run --host 192.168.1.10 --config cell.yaml ... --armed       # moves the arm
# ```
#
# Neuron-steered conditions take the same syntax as `libero run`: a `concepts` output file and an alpha, e.g.
# `--conditions baseline,steer:fast.json@10,random:fast.json@10:0` (`nnsight-vla conditions` prints the syntax); from
# Python, `run_conditions(vla, sweep_grid(...), config, results, host=..., armed=True, safety=...)`.

# %%
(OUT / "done.txt").write_text(f"05_ur5 ok in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
