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
# # 3 · Finding concept neurons automatically, and steering with them
#
# **What you learn:** the paper's Steps 2 and 3 on a model whose concepts are known. Find the value vectors of a
# concept word automatically (kNN clustering in embedding space, or keyword matching), as opposite pairs
# (fast/slow, high/low) and within layer subsets (early/late/all); steer the policy by setting those neurons'
# activations to α on every forward pass; compare with the two controls the paper uses — random neurons (same
# number per layer, same α) and the prompt baseline (the word put into the instruction); sweep α; and watch the
# arm in closed loop. With figures.
#
# **Needs:** the core install, the shipped small OpenVLA (`nnsight_vla/data/openvla_small`) and the simulator
# extra for the arm scene (`pip install -e ".[sim]"`, `MUJOCO_GL=egl`). Offline, no GPU.
# **Time:** ≈ 40 s on 2 CPU cores (measured 33–39 s; about half of it the closed-loop rollouts).
#
# The shipped model was trained so that, in the arm scene, speed words in the instruction (fast, quick... /
# slow, careful...) set the step size and height words (high, up... / low, down...) the transport height. The
# experiments below give it **neutral** instructions ("move the arm to the green block") and ask whether steering
# the concept neurons alone moves the arm faster/slower/higher/lower.

# %%
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import contextlib
import time
from pathlib import Path

import numpy as np
import torch

import nnsight_vla as nv
from nnsight_vla.reports import plots
from nnsight_vla.concepts import find_concept, find_opposites, random_control
from nnsight_vla.rollout.conditions import baseline, prompt_baseline, steered
from nnsight_vla.rollout.stats import compare_conditions, format_rows
from nnsight_vla.rollout.store import ResultsStore
from nnsight_vla.lens import ValueVectorLens
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.steering import Steering

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "03_concepts_and_steering"
OUT.mkdir(parents=True, exist_ok=True)
torch.set_num_threads(1)  # a small model: one thread is the fastest and the steadiest on a shared machine

try:
    from nnsight_vla.training import shipped_model, shipped_path

    vla = shipped_model("finetuned", dispatch=True)
    MODEL_PATH, TRAINED = str(shipped_path("finetuned")), True
except (ImportError, FileNotFoundError) as missing:  # a source checkout without the trained weights
    print(f"NOTE: the shipped model is missing ({missing}).\n"
          "      Falling back to a tiny RANDOM model: the code runs, the effects mean nothing.")
    vla, MODEL_PATH, TRAINED = nv.tiny("openvla", seed=0), "tiny", False
print(vla.describe())
lens = ValueVectorLens(vla, k=10, cache_dir=OUT / "lens_cache", progress=False)

# %% [markdown]
# ## Step 2: a concept's neurons, automatically
#
# **kNN (the paper's method).** Each value vector is embedded as the softmax(logit)-weighted mean of the input
# embeddings of its top-5 lens tokens; the concept is embedded as the mean of its **lexicon**'s input embeddings
# (the word and its synonyms: `anchor="lexicon"`, the default; the paper's `anchor="word"` uses the word alone, and
# one word is a poor anchor, since antonyms share contexts); vectors whose top tokens contain an *opposite* word are
# dropped first; the `k_neighbors` vectors nearest the concept (cosine) form its neighbourhood, and the `size` most
# central members of it are the concept's cluster. **Keyword** (what the paper's robot experiments used): vectors
# ranked by how many of their top-k tokens are the word or a synonym.

# %%
fast_knn = find_concept(lens, "fast", size=10, method="knn", k_neighbors=20)
print(fast_knn)
for info in fast_knn.meta["scores"][:6]:
    print(f"  L{info['layer']} N{info['neuron']:>3}  cos {info['cosine']:+.3f}  {info['tokens']}")
fast_word = find_concept(lens, "fast", size=10, anchor="word", opposite=None)  # the paper's single-word anchor
slow_words = {"slow", "slowly", "carefully", "gently", "steadily"}


def promoting_slow(neurons):
    """How many vectors of a set have a slow word among their top-5 tokens."""
    return sum(any(t.strip("▁") in slow_words for t in lens.vector_tokens(l, n, k=5)) for l, n in neurons.pairs)


print(f"'fast' vectors that promote a SLOW word: single-word anchor {promoting_slow(fast_word)} of "
      f"{len(fast_word)}; lexicon anchor + opposites filter {promoting_slow(fast_knn)} of {len(fast_knn)}")
fast_kw = find_concept(lens, "fast", size=10, method="keyword")
print(fast_kw, "| shared with kNN:", len(set(fast_kw.pairs) & set(fast_knn.pairs)))
for info in fast_kw.meta["scores"][:3]:
    print(f"  L{info['layer']} N{info['neuron']:>3}  matches {info['matched']}")

# %% [markdown]
# **Opposite pairs** come out disjoint (a vector both rankings want goes to the concept it is closer to), and
# **layer subsets** restrict the candidates: early = first half of the layers, late = second half. Random controls
# have the same number of neurons in each layer as the set they control for, none of them in either concept.

# %%
SIZE = 10
sets = {}
for layers in ("all", "early", "late"):
    for pair in (("fast", "slow"), ("high", "low")):
        a, b = find_opposites(lens, pair, size=SIZE, k_neighbors=20, layers=layers)
        sets[pair[0], layers], sets[pair[1], layers] = a, b
for concept in ("fast", "slow", "high", "low"):
    print(f"{concept:5s} all: layers {sets[concept, 'all'].layers}; top tokens of its best vector: "
          f"{sets[concept, 'all'].meta['scores'][0]['tokens']}")
used = [p for (c, layers), s in sets.items() if layers == "all" for p in s.pairs]
controls = {c: random_control(sets[c, "all"], seed=i, exclude=used)
            for i, c in enumerate(("fast", "slow", "high", "low"))}
print(controls["fast"], "by layer:", controls["fast"].by_layer())

# neuron sets are files (JSON/YAML; the authors' flat-index YAML files load too)
path = sets["fast", "all"].save(OUT / "fast.json")
assert NeuronSet.load(path).pairs == sets["fast", "all"].pairs

# %% [markdown]
# ## Step 3: steering, with α in the model's own units
#
# `Steering(neurons, alpha)` overwrites the neurons' activations with α at every position of every forward pass of
# `predict_action` (tutorial 1 shows this is exactly a PyTorch hook). **What α means** is the first question: the
# paper's α = 10 is a raw number, large or small depending on the model's activation scale. We measure that scale:
# each layer's 99th percentile of |activation| on neutral inputs (the states the policy visits, neutral
# instructions), and give α in those units: `Steering(neurons, 4, scale=scale)` writes 4 × p99 of each layer.

# %%
from nnsight_vla.activations import grid
from nnsight_vla.causal import ablation_effect, action_effect, neuron_response
from nnsight_vla.scale import measure_activation_scale
from nnsight_vla.training.corpus import CANONICAL, TASK_BASES
from nnsight_vla.training.gates import expert_frames

image_size = int(vla.image_processor.image_size[0])
frames = expert_frames((3000, 3001), image_size=image_size)  # development scenes, along the expert's path
neutral = grid(frames, TASK_BASES[:3])
scale = measure_activation_scale(vla, neutral, restrict_to_action_tokens=True)
print("p99 |activation| per layer:", [round(v, 2) for v in scale.values])
ALPHA = 4.0  # x p99: the experiment's pre-registered value (docs/trained_vla/PREREGISTRATION.md)
steer = {c: Steering(sets[c, "all"], ALPHA, scale=scale, name=c) for c in ("fast", "slow", "high", "low")}
print(steer["fast"], "-> raw values per layer:", {l: round(steer["fast"].raw_alpha(l), 2)
                                                  for l in sets["fast", "all"].layers})

# %% [markdown]
# ## Three causal checks on single actions
#
# Before any rollout: (1) does the **model** use the word — the gap in its first action between "… quickly" and
# "… slowly", and how much of it disappears when late MLP layers are mean-ablated; (2) do the **neurons** respond
# to their word (activation at the position that predicts the first action token, concept vs opposite phrasing);
# (3) does **steering** them shift the action beyond random sets of the same shape (`action_effect`, with random
# controls: same size per layer, same α and unit). `restrict_to_action_tokens=True` picks the best *action* token:
# steering a word concept can make the model prefer the word itself.

# %%
KW = {"restrict_to_action_tokens": True}
late = list(range(vla.num_layers // 2, vla.num_layers))
fast_q = grid(frames, [f"{b} {CANONICAL['fast']}" for b in TASK_BASES[:3]])
slow_q = grid(frames, [f"{b} {CANONICAL['slow']}" for b in TASK_BASES[:3]])
ablation = ablation_effect(vla, late, fast_q, slow_q, reference=neutral, summary="speed", **KW)
print(f"(1) speed gap quickly - slowly: {ablation.gap:+.3f}; with layers {late} mean-ablated: "
      f"{ablation.gap_ablated:+.3f} ({100 * ablation.removed:.0f}% removed)")
response = neuron_response(vla, sets["fast", "all"], fast_q, slow_q, **KW)
print(f"(2) 'fast' neurons more active on 'quickly' than on 'slowly' (p < 0.05): "
      f"{int(response.responding().sum())} of {len(response.neurons)}")
effects = {}
for concept, summary in (("fast", "speed"), ("slow", "speed"), ("high", "dz"), ("low", "dz")):
    effects[concept] = e = action_effect(vla, steer[concept], neutral, n_random=4, **KW)
    print(f"(3) {concept:5s} Δ{summary} {e.delta[summary]:+.3f} ({100 * e.relative[summary]:+.0f}%); random sets "
          f"{[round(v, 3) for v in e.random[summary]]}; beyond every random set: {e.beyond_random(summary)}")

# %% [markdown]
# **The α sweep** (relative units): effect against strength for the speed concepts, next to their random controls.

# %%
ALPHAS = (1.0, 2.0, 4.0, 8.0)
sweep = {name: [] for name in ("fast", "slow", "random[fast]", "random[slow]")}
for alpha in ALPHAS:
    for concept in ("fast", "slow"):
        s = Steering(sets[concept, "all"], alpha, scale=scale)
        e = action_effect(vla, s, neutral, n_random=1, **KW)
        sweep[concept].append(e.delta["speed"])
        sweep[f"random[{concept}]"].append(e.random["speed"][0])
for name, values in sweep.items():
    print(f"{name:13s} Δspeed at α={[f'{a:g}' for a in ALPHAS]} x p99: {np.round(values, 3).tolist()}")


def first_logits(steering=None):
    """lm_head output of the first forward for the first query (steered inside ``steering.apply``)."""
    query = neutral[0]
    logits = []
    with steering.apply(vla) if steering is not None else contextlib.nullcontext():
        with vla.predict_action(query.images, query.instruction, **KW):
            logits.append(vla.lm_head.output.save())
    return logits[0]


# whatever the behaviour, steering must reach the model's output
assert not torch.allclose(first_logits(steer["fast"]), first_logits())

# %%
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CONCEPTS = ("fast", "slow", "high", "low")
fig = Figure(figsize=(9, 3.6), layout="constrained")
FigureCanvasAgg(fig)
ax1, ax2 = fig.subplots(1, 2)
for name, values in sweep.items():
    ax1.plot(ALPHAS, values, "o--" if name.startswith("random") else "o-", label=name)
ax1.axhline(0, color="k", ls=":")
ax1.set(xscale="log", xlabel="α (× each layer's p99 |activation|)", ylabel="Δ speed of the first action",
        title="α sweep")
ax1.set_xticks(ALPHAS, [f"{a:g}" for a in ALPHAS])
ax1.minorticks_off()
ax1.legend(fontsize=7)
x = np.arange(4)
summary = {"fast": "speed", "slow": "speed", "high": "dz", "low": "dz"}
ax2.bar(x - 0.2, [100 * effects[c].relative[summary[c]] for c in CONCEPTS], 0.4, label="steered")
for i, c in enumerate(CONCEPTS):
    base = abs(effects[c].baseline[summary[c]]) or 1.0
    ax2.plot([i + 0.2] * len(effects[c].random[summary[c]]),
             [100 * v / base for v in effects[c].random[summary[c]]], "k.", label="random sets" if i == 0 else None)
ax2.set_xticks(x, ["fast\n(speed)", "slow\n(speed)", "high\n(dz)", "low\n(dz)"])
ax2.set(ylabel="% change vs unsteered", title=f"single-step effect (α = {ALPHA:g} × p99)")
ax2.axhline(0, color="k", lw=0.6)
ax2.legend(fontsize=7)
fig.savefig(OUT / "steering_single_step.png", dpi=110)
print("wrote", OUT / "steering_single_step.png")

# %% [markdown]
# ## Closed loop in the arm scene
#
# The real test: the policy acts, the scene moves, the next image is rendered, for a few dozen steps. Each
# condition runs on the same scene seeds with the same neutral instructions (trial *k* is identical across
# conditions); episodes go into the same resumable results folder and per-step records as the LIBERO and UR5
# runners (tutorials 4 and 5), so the same statistics and figures apply.

# %%
from nnsight_vla.envs.arm_scene import ArmRolloutConfig, ArmSceneEnv
from nnsight_vla.rollout.sweep import run_sweep

conditions = [baseline()] + [steered(c, steer[c], alpha=ALPHA, layers="all") for c in CONCEPTS] + [
    steered("fast", steer["fast"].random_control(0, vla), alpha=ALPHA, layers="all", kind="control",
            name="random[fast]"),
    prompt_baseline("fast")]
config = ArmRolloutConfig(instructions=TASK_BASES, trials=2, max_steps=20, image_size=image_size)
t0 = time.perf_counter()
report = run_sweep(ArmSceneEnv(config), vla, conditions, OUT / "rollouts", progress=False)
print(f"{report.completed} episodes in {time.perf_counter() - t0:.1f} s")
store = ResultsStore.open(OUT / "rollouts")
rows = compare_conditions(store, "disp", level="step", per_task=False)
print("end-effector displacement per step (m), vs baseline:")
print(format_rows(rows, ["condition", "n", "mean", "pct_change", "p_value"]))
heights = {s["condition"]: [] for s in store.summaries()}
for s in store.summaries():
    heights[s["condition"]].append(s["max_height_table"])
print("highest point above the table (m):", {c: round(float(np.mean(v)), 3) for c, v in heights.items()})
for figure in plots.plot_all(store, OUT / "plots"):
    print("wrote", figure.relative_to(OUT))

# %% [markdown]
# How to read these numbers: a concept's neurons *cause* its behaviour when steering them moves the arm the way the
# word does (fast: larger steps, slow: smaller; high/low: transport height), clearly more than random sets with the
# same α, unit and number of neurons per layer, and without the word in the instruction. The prompt baseline shows
# what the word itself does. With two trials per condition these are illustrations, not evidence. The
# pre-registered experiment (40 paired trials on held-out seeds, ten random sets per concept and α, the α sweep and
# layer subsets in closed loop, paired tests with Holm) is one command,
#
# ```bash
# nnsight-vla experiment --out results/trained_vla
# ```
#
# and its measured results on the shipped model, with what passed and what failed, are in `docs/trained_vla/`,
# with the replication on a second training seed (it did not replicate: that seed's policy fails the task in
# closed loop, and on it α = 4 × p99 moves nothing, while its speed sets act single-step from 16–24 × p99).
# The same discovery from a shell: `nnsight-vla concepts --source nnsight_vla/data/openvla_small --word fast
# --opposite slow --control --out neurons/fast.json`.

# %%
(OUT / "done.txt").write_text(f"03 ok (trained model: {TRAINED}) in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
