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
# # 1 · Tracing a VLA with nnsight and TransformerLens syntax
#
# **What you learn:** the uniform module tree every family shares (`vla.layers[i].mlp.act`), reading and editing
# MLP activations over *every* forward pass that `predict_action` makes (`tracer.iter`), why such an edit is
# exactly a plain PyTorch hook, and the same neurons seen through TransformerLens (`blocks.{l}.mlp.hook_post`).
# All three families (OpenVLA, π0, π0-FAST), on tiny random models of the exact architectures.
#
# **Needs:** the core install (`pip install -e .`); offline, no GPU, no simulator.
# **Time:** ≈ 15 s on 2 CPU cores (measured 6–21 s as a script, 14 s as a notebook, depending on the machine's load;
# most of it imports and building the TransformerLens bridges).
#
# Run it as a script (`python tutorials/01_tracing.py`) or as a notebook (`jupytext --to notebook
# tutorials/01_tracing.py`, or open the file in Jupyter with the jupytext extension). Output goes to
# `$NNSIGHT_VLA_TUTORIAL_OUT` (default `tutorials/_out/`).

# %%
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

import nnsight_vla as nv

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "01_tracing"
OUT.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
print("families:", nv.families())

# %% [markdown]
# ## A model and an observation
#
# `nv.tiny(family, seed=...)` builds a small random model of the real architecture, offline and deterministic in
# its seed (OpenVLA here: DINOv2 + SigLIP featurizers → projector → Llama). A real checkpoint loads the same way
# with `nv.load("openvla", "path/or/hub-id")` and exposes exactly the same tree.

# %%
vla = nv.tiny("openvla", seed=0)
print(vla.describe())
print("action tokens:", len(vla.action_token_ids), "ids", vla.action_token_ids[0], "..", vla.action_token_ids[-1])

rng = np.random.default_rng(0)
image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)  # any HxWx3 uint8 camera image
INSTRUCTION = "pick up the black bowl"
# restrict_to_action_tokens: a random model would otherwise emit word tokens, which OpenVLA maps to clipped bins
KW = dict(restrict_to_action_tokens=True)
action = vla.predict_action(image, INSTRUCTION, **KW)
print("action (dx, dy, dz, droll, dpitch, dyaw, gripper):", np.round(action, 4))

# %% [markdown]
# ## The uniform tree
#
# Every gated MLP of every family gets a parameter-free `act` module whose output is
# `act_fn(gate_proj(x)) * up_proj(x)`: the input of `down_proj`, one value per neuron. That is the activation the
# paper steers, and TransformerLens's `hook_post`. Aliases give every family the same names:
# `vla.layers` (language backbone), `vla.expert_layers` (π0's action expert), `vla.lm_head`.

# %%
print(vla.layers[0].mlp)
print("num_layers", vla.num_layers, "d_model", vla.d_model, "d_mlp", vla.d_mlp)

# %% [markdown]
# ## Reading activations on every forward pass
#
# OpenVLA's `predict_action` generates 7 action tokens: one prefill forward pass and 6 cached decode passes
# (`vla.forward_count()` says so for every family). `predict_action` is *traceable*: inside
# `with vla.predict_action(...) as tracer:` the body describes what to read or change, and
# `for _ in tracer.iter[:N]:` applies it to forwards 0..N-1. (Without `tracer.iter` a request hits the first forward
# only.) Lists created outside the block can be appended to inside it.

# %%
N = vla.forward_count()
print("forwards per predict_action:", N)
acts, logits = [], []
with vla.predict_action(image, INSTRUCTION, **KW) as tracer:
    for _ in tracer.iter[:N]:
        acts.append(vla.layers[2].mlp.act.output.save())  # (batch, positions, d_mlp)
        logits.append(vla.lm_head.output.save())  # (batch, positions, vocab)
    traced_action = tracer.result.save()  # what predict_action returned
for step, (a, lg) in enumerate(zip(acts, logits)):
    print(f"forward {step}: act {tuple(a.shape)}, next token {int(lg[0, -1].argmax())}")
assert np.array_equal(traced_action, action)  # reading changes nothing

# %% [markdown]
# Two things to know about these blocks (nnsight 0.8):
#
# * values come out of the block only through `.save()`: a variable first assigned inside the block (say
#   `acts = [... .save() ...]`, the list itself unsaved) does not exist after it — append to a list created before
#   the block, as above, or save the list (`acts = list().save()`);
# * nnsight reads the block's source to run it, so trace in a file, a notebook or an IPython shell; a block typed
#   into `python -` or `python -c` has no source to read and fails.

# %% [markdown]
# ## Editing: set chosen neurons to α on every forward
#
# Assignments inside the block are edits. Requests inside one step must follow execution order (edit layer 1
# before layer 3). Here neurons 3, 7 and 11 of layer 2 are set to 4.0 at every position of every forward.

# %%
LAYER, NEURONS, ALPHA = 2, [3, 7, 11], 4.0
edited_logits = []
with vla.predict_action(image, INSTRUCTION, **KW) as tracer:
    for _ in tracer.iter[:N]:
        vla.layers[LAYER].mlp.act.output[..., NEURONS] = ALPHA
        edited_logits.append(vla.lm_head.output.save())
    edited_action = tracer.result.save()
print("unedited:", np.round(action, 4))
print("edited:  ", np.round(edited_action, 4))

# %% [markdown]
# ## The same edit as a plain PyTorch hook
#
# The reference: a forward pre-hook on `down_proj` that overwrites the same inputs. nnsight's edit and the hook give
# identical logits on all 7 forwards and the identical action; the model is clean again after the trace.
# (`envoy._module` is nnsight's handle on the underlying `torch.nn.Module`.)

# %%
down_proj = vla.layers[LAYER].mlp.down_proj._module
lm_head = vla.lm_head._module


def overwrite(module, args):
    x = args[0].clone()
    x[..., NEURONS] = ALPHA
    return (x,)


def run_with_plain_hooks(pre_hook=None):
    seen = []
    handles = [lm_head.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))]
    if pre_hook is not None:
        handles.append(down_proj.register_forward_pre_hook(pre_hook))
    try:
        result = vla.predict_action(image, INSTRUCTION, **KW)
    finally:
        for handle in handles:
            handle.remove()
    return seen, result


hooked_logits, hooked_action = run_with_plain_hooks(overwrite)
assert len(hooked_logits) == len(edited_logits) == N == 7
for ours, reference in zip(edited_logits, hooked_logits):
    torch.testing.assert_close(ours, reference)
assert np.array_equal(edited_action, hooked_action)
clean_logits, clean_action = run_with_plain_hooks()
assert np.array_equal(clean_action, action)  # no edit left behind
print("nnsight edit == plain PyTorch pre-hook on all 7 forwards; the model is clean afterwards")

# %% [markdown]
# `nnsight_vla.Steering` packages exactly this edit (any neuron set, layer subsets, every or first forward) so you
# do not write the loop yourself; tutorial 3 uses it:

# %%
steer = nv.Steering([(LAYER, n) for n in NEURONS], alpha=ALPHA)
with steer.apply(vla):
    steered_action = vla.predict_action(image, INSTRUCTION, **KW)
assert np.array_equal(steered_action, edited_action)
print(steer)

# %% [markdown]
# ## TransformerLens syntax
#
# `vla.to_transformer_lens()` returns a TransformerLens `TransformerBridge` over the language backbone (a clone that
# shares the weights). Its `blocks.{l}.mlp.hook_post` is the same activation as `vla.layers[l].mlp.act`. TL runs
# the language model on token ids, so the nnsight side traces one language-model forward with `vla.trace(ids,
# fn=...)` to compare like with like.

# %%
bridge = vla.to_transformer_lens()
ids = torch.tensor([[1, 40, 41, 300, 700, 12]])
with torch.no_grad():
    tl_logits, cache = bridge.run_with_cache(ids)
    tl_edited = bridge.run_with_hooks(
        ids, fwd_hooks=[(f"blocks.{LAYER}.mlp.hook_post",
                         lambda x, hook: x.index_fill_(-1, torch.tensor(NEURONS), ALPHA))]
    )
language_model = vla._module.language_model  # the Llama inside OpenVLA
with vla.trace(ids, fn=language_model.forward):
    nn_act = vla.layers[LAYER].mlp.act.output.save()
with vla.trace(ids, fn=language_model.forward):
    vla.layers[LAYER].mlp.act.output[..., NEURONS] = ALPHA
    nn_edited = vla.lm_head.output.save()
torch.testing.assert_close(cache[f"blocks.{LAYER}.mlp.hook_post"], nn_act, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(tl_edited, nn_edited, rtol=1e-5, atol=1e-5)
print("TL blocks.{l}.mlp.hook_post == nnsight layers[l].mlp.act.output, reading and editing")
# the steering object writes the same hooks for TL:
with torch.no_grad():
    tl_steered = bridge.run_with_hooks(ids, fwd_hooks=steer.transformer_lens_hooks(vla))
torch.testing.assert_close(tl_steered, nn_edited, rtol=1e-5, atol=1e-5)

# %% [markdown]
# ## π0 and π0-FAST: the same tree, other forward schedules
#
# * **π0** makes an action chunk by flow matching: `num_steps` denoising steps, one forward each
#   (`vla.forward_count()`). The PaliGemma backbone runs only in step 0 (its keys/values are cached); the action
#   expert runs in every step. `vla.stack_forwards(stack)` says which forwards reach a stack: touch the backbone
#   only there (asking for the backbone in step 1 would stall the loop, and nnsight warns).
# * **π0-FAST** writes FAST action tokens with a PaliGemma, one forward per token; with `stop_at_eos=False` it makes
#   exactly `vla.forward_count()` forwards (a tiny random model writes no valid FAST sequence and returns openpi's
#   zero fallback with a logged warning — the edit still changes the tokens).
#
# For each family: edit neurons of every stack on every forward it runs, and compare with plain pre-hooks.

# %%
logging.getLogger("nnsight_vla").setLevel(logging.ERROR)  # silence the tiny π0-FAST's fallback warning


def plain_pre_hook(envoy, neurons, alpha):
    def hook(module, args):
        x = args[0].clone()
        x[..., neurons] = alpha
        return (x,)

    return envoy._module.register_forward_pre_hook(hook)


for family in ("pi0", "pi0-fast"):
    model = nv.tiny(family, seed=0)
    cams = {name: rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) for name in model.camera_names}
    state = np.linspace(-0.5, 0.5, model.state_dim, dtype=np.float32)
    kwargs = {"stop_at_eos": False} if family == "pi0-fast" else {}
    n = model.forward_count()
    stacks = [s.attr for s in model.stacks]
    print(f"\n{model.describe()}\n  forwards per predict_action: {n}; stacks: {stacks}")
    for s in model.stacks:
        print(f"  {s.attr} runs in forwards {model.stack_forwards(s.name)}")
    baseline = model.predict_action(cams, INSTRUCTION, state, **kwargs)
    tokens_before = model.last_decode.token_ids.copy() if family == "pi0-fast" else None
    with model.predict_action(cams, INSTRUCTION, state, **kwargs) as tracer:
        for step in tracer.iter[:n]:
            if step in model.stack_forwards("backbone"):
                model.layers[1].mlp.act.output[..., [3, 5]] = 20.0
            if "expert_layers" in stacks:
                model.expert_layers[0].mlp.act.output[..., [1, 2]] = 20.0
        traced = tracer.result.save()
    handles = [plain_pre_hook(model.layers[1].mlp.down_proj, [3, 5], 20.0)]
    if "expert_layers" in stacks:
        handles.append(plain_pre_hook(model.expert_layers[0].mlp.down_proj, [1, 2], 20.0))
    try:
        hooked = model.predict_action(cams, INSTRUCTION, state, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert np.array_equal(traced, hooked), family
    print(f"  chunk {traced.shape}: traced edit == plain hooks; max |edited - unedited| = "
          f"{np.abs(traced - baseline).max():.4f}")
    if family == "pi0":
        assert not np.allclose(traced, baseline), "the edit changes pi0's actions"
    else:  # both runs fall back to the zero chunk; the generated tokens show the edit
        tokens_after = model.last_decode.token_ids  # of the last call: the hooked run, equal to the traced one
        print(f"  generated tokens unedited {tokens_before.tolist()}\n"
              f"                   edited   {tokens_after.tolist()}")
        assert not np.array_equal(tokens_before, tokens_after)
    bridge = model.to_transformer_lens()  # the PaliGemma backbone (π0's expert has no unembedding, so no TL view)
    hook_names = [name for name in bridge.hook_dict if name.startswith("blocks.") and name.endswith("mlp.hook_post")]
    print(f"  TransformerLens bridge over the backbone: {hook_names}")

# %% [markdown]
# ## Summary
#
# * `vla.layers[i].mlp.act` (and `vla.expert_layers[i].mlp.act`) is the same activation in every family and equals
#   TransformerLens's `blocks.{i}.mlp.hook_post`;
# * `with vla.predict_action(...) as tracer: for _ in tracer.iter[:vla.forward_count()]: ...` reaches every forward
#   that makes the action (OpenVLA: 7, one per action token), and `vla.stack_forwards(stack)` says which of them
#   reach a stack (π0's backbone: only the first);
# * an nnsight edit there is bit-for-bit a plain PyTorch pre-hook on `down_proj`, and leaves the model clean.
#
# Next: tutorial 2 projects every value vector onto the vocabulary.

# %%
(OUT / "done.txt").write_text(f"01_tracing ok in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
