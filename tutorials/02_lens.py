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
# # 2 · The value-vector lens
#
# **What you learn:** projecting every FFN value vector of a VLA onto its vocabulary (the paper's Step 1): the top
# tokens of each vector, which vectors speak of a concept ("fast", "high"...), the share of action tokens per layer,
# and what action fine-tuning changed (base vs fine-tuned checkpoint), with figures; the disk cache; the CLI.
#
# **Needs:** the core install and the shipped small OpenVLA (`nnsight_vla/data/openvla_small`, fine-tuned, and
# `openvla_small_base`, its language-only base; both ship with the package). Offline, no GPU.
# **Time:** ≈ 10 s on 2 CPU cores (measured 6–7 s).
#
# The shipped model is an OpenVLA of the exact architecture (DINOv2 + SigLIP → projector → Llama, 6 layers ×
# 384 value vectors, 1024-token vocabulary whose last 256 tokens are action bins), trained in two phases inside the
# project: language pretraining on a corpus in which speed and height words (fast/quick/slow/careful,
# high/up/low/down...) behave like real language, then action fine-tuning on scripted demonstrations in a
# table-top arm scene where those words in the instruction control how fast and how high the arm moves. Its
# concepts are known, so what the lens finds can be checked. Everything here works unchanged on OpenVLA-7B
# (`nv.load("openvla", "openvla/openvla-7b")`, 32 × 11008 vectors; a GPU helps).

# %%
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

import nnsight_vla as nv
from nnsight_vla.lens import ValueVectorLens, checkpoint_diff
from nnsight_vla.reports.lens_plots import plot_action_share, plot_checkpoint_diff, plot_token_table

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "02_lens"
OUT.mkdir(parents=True, exist_ok=True)
CACHE = OUT / "lens_cache"

# %% [markdown]
# ## The models
#
# `shipped_model(...)` loads the shipped checkpoints through the real loader, `nv.load("openvla", folder)`.

# %%
try:
    from nnsight_vla.training import shipped_model

    vla = shipped_model("finetuned", dispatch=True)
    base = shipped_model("base", dispatch=True)
    TRAINED = True
except (ImportError, FileNotFoundError) as missing:  # a source checkout without the trained weights
    print(f"NOTE: the shipped model is missing ({missing}).\n"
          "      Falling back to two tiny RANDOM models: the code runs, the tables mean nothing.")
    vla, base = nv.tiny("openvla", seed=0), nv.tiny("openvla", seed=1)
    TRAINED = False
print(vla.describe())
print("action tokens:", len(vla.action_token_ids), "ids",
      vla.tokenizer.convert_ids_to_tokens([int(vla.action_token_ids[0]), int(vla.action_token_ids[-1])]))

# %% [markdown]
# ## Projecting every value vector
#
# Column *i* of layer *l*'s `down_proj.weight` is value vector $w_{l,i}$: what neuron *i* adds to the residual
# stream, scaled by its activation. The lens multiplies it with the unembedding, $W_U w_{l,i}$, and keeps the top-k
# tokens — what that neuron "says". The projection is streamed in chunks (memory bounded by chunk × vocab) and
# cached on disk under a fingerprint of the weights, so the second call is a file read.

# %%
t0 = time.perf_counter()
lens = ValueVectorLens(vla, k=10, cache_dir=CACHE, progress=False)
t1 = time.perf_counter()
again = ValueVectorLens(vla, k=10, cache_dir=CACHE, progress=False)
t2 = time.perf_counter()
print(lens)
print(f"computed in {t1 - t0:.2f} s; from the cache in {t2 - t1:.3f} s (from_cache={again.from_cache})")
assert again.from_cache and np.array_equal(again.ids, lens.ids)

# %% [markdown]
# `top_tokens` returns a long table (one row per vector and rank): `token` is the raw string (`▁fast`), `word` the
# normalised word (`fast`), `score` the logit $W_U[t] \cdot w$, `is_action` whether it is an action token.

# %%
table = lens.top_tokens(layer=-1)  # the last layer, every vector
print(table.head(12).to_string(index=False))

# %% [markdown]
# **Which vectors speak of a concept?** Filter the table by word: the vectors whose top-5 contain a speed or a
# height word, by layer. (Tutorial 3 turns this into an automatic method.)

# %%
frame = lens.to_frame(k=5)
CONCEPT_WORDS = {"fast": ["fast", "quick", "quickly", "rapid", "rapidly", "swift", "swiftly"],
                 "slow": ["slow", "slowly", "careful", "carefully", "gentle", "gently", "steady"],
                 "high": ["high", "up", "upward", "raise", "lift", "above", "raised"],
                 "low": ["low", "down", "downward", "lower", "below", "drop", "beneath"]}
best_vectors = []
for concept, words in CONCEPT_WORDS.items():
    hits = frame[frame.word.isin(words)]
    per_layer = hits.groupby("layer").neuron.nunique().reindex(range(lens.num_layers), fill_value=0)
    print(f"{concept:5s} vectors with a {concept} word in their top 5, per layer: {per_layer.tolist()}")
    # the vectors with most of these words in their top 5 (then the highest score)
    ranked = hits.groupby(["layer", "neuron"]).score.agg(["size", "max"]).sort_values(["size", "max"])
    best_vectors += list(ranked.index[-3:][::-1])
    if len(ranked):
        layer, neuron = ranked.index[-1]
        print(f"      e.g. L{layer} N{neuron}: {lens.vector_tokens(int(layer), int(neuron), 8)}")

# %%
chosen = pd.DataFrame(best_vectors, columns=["layer", "neuron"]).drop_duplicates()
shown = lens.top_tokens().merge(chosen, on=["layer", "neuron"])
print("wrote", plot_token_table(shown, OUT / "concept_vectors.png", k=8, title="Value vectors of four concepts"))

# %% [markdown]
# ## Action tokens per layer
#
# The paper finds that OpenVLA's late layers carry many action-token vectors (~49 % of layer 31's top tokens). Here:
# the share of top-k tokens that are action tokens, and the fraction of vectors with at least one, per layer.

# %%
share = lens.action_token_share()
print(share.to_string(index=False))
print("wrote", plot_action_share(lens, OUT / "action_share.png", title=f"{vla.family}: action tokens per layer"))

# %% [markdown]
# ## Base vs fine-tuned
#
# `checkpoint_diff` compares the lenses of two checkpoints of one architecture: per layer, how many top-k entries
# were gained and lost, split into action and language tokens; per vector, how much it changed (also in weight
# space, since both lenses hold their models); per token, in how many vectors' top-k it appears before and after.
# Fine-tuning on actions should add action tokens to value vectors — which layers took them is what the figure shows.

# %%
base_lens = ValueVectorLens(base, k=10, cache_dir=CACHE, progress=False)
diff = checkpoint_diff(base_lens, lens)
columns = ["layer", "kept_fraction", "vectors_changed", "gained_action", "gained_language", "lost_language",
           "action_share_base", "action_share_tuned"]
print(diff.layers[columns].round(3).to_string(index=False))
print("\nvectors that changed most:")
print(diff.top_vectors(5, by="weight_change")[["layer", "neuron", "changed", "gained_action", "weight_change"]]
      .round(3).to_string(index=False))
print("\nlanguage tokens that gained most top-k appearances:")
print(diff.top_tokens(8, kind="language")[["layer", "token", "count_base", "count_tuned", "delta"]]
      .to_string(index=False))
print("wrote", plot_checkpoint_diff(diff, OUT / "checkpoint_diff.png"))
if TRAINED:
    # fine-tuning on actions put action tokens into value vectors that had none in the base
    assert diff.layers.action_share_tuned.sum() > diff.layers.action_share_base.sum()

# %% [markdown]
# ## Files and the command line
#
# Tables export to Parquet / CSV / JSON (atomically, with the lens identity in the metadata); a lens file reads
# back without the model (for tables, diffs and keyword concepts).

# %%
paths = {
    "top tokens": lens.export(OUT / "top_tokens.parquet"),
    "action share": lens.export(OUT / "action_share.csv", table="action_share"),
    "lens": lens.save(OUT / "lens.npz"),
    **{f"diff {name}": path for name, path in diff.export(OUT / "diff").items()},
}
for name, path in paths.items():
    print(f"{name:15s} -> {path.relative_to(OUT)}")
offline = ValueVectorLens.from_file(OUT / "lens.npz")  # no model needed
assert np.array_equal(offline.ids, lens.ids)
print(offline)

# %% [markdown]
# The same from a shell:
#
# ```bash
# nnsight-vla lens --source nnsight_vla/data/openvla_small --layer 5 --out top.parquet --plot share.png
# nnsight-vla lens-diff --base nnsight_vla/data/openvla_small_base --tuned nnsight_vla/data/openvla_small \
#     --out diff/ --plot diff.png
# ```
#
# Next: tutorial 3 finds concept neurons automatically and steers the policy with them.

# %%
(OUT / "done.txt").write_text(f"02_lens ok (trained model: {TRAINED}) in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
