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
# # 6 · Remote execution on a (self-hosted) NDIF server
#
# **What you learn:** how a traced, steered `predict_action` runs where the weights are (an NDIF server), what
# travels with a request and what does not, how to check all of it offline — nnsight's `remote="local"` and the
# stricter server simulation — and, in the slow part, against a real NDIF stack started on this machine.
#
# **Needs:** the core install. The real-server part additionally needs the server environment (a separate venv with
# ndif 0.1.2 and Ray, and Redis; `python -m nnsight_vla.remote.stack install` creates them, a few minutes online) and
# runs only when `NNSIGHT_VLA_TUTORIAL_SLOW=1` is set (the test suite does so under `pytest -m slow`).
# **Time:** default path ≈ 10 s on 2 CPU cores (measured 5–9 s); with the real server about 1–3 min more (measured
# 61 s in all: the stack started in 32 s, the first request, which deploys the model, took 7 s, a warm one 0.1 s).
#
# See `docs/remote.md` for serving nnsight-vla from a lab's GPU cluster.

# %%
import os
import time
from pathlib import Path

import numpy as np
import torch

import nnsight_vla as nv
from nnsight_vla import remote as rm
from nnsight_vla.errors import InputError

START = time.perf_counter()
HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
OUT = Path(os.environ.get("NNSIGHT_VLA_TUTORIAL_OUT") or HERE / "_out") / "06_remote"
OUT.mkdir(parents=True, exist_ok=True)
SLOW = os.environ.get("NNSIGHT_VLA_TUTORIAL_SLOW") == "1"
torch.set_num_threads(1)  # a Ray model actor computes with one thread; so do we, so results match bit for bit

vla = nv.tiny("openvla", seed=0)
image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
INSTRUCTION = "pick up the black bowl"
KW = dict(restrict_to_action_tokens=True)
steer = nv.Steering([(2, 3), (2, 7), (3, 11)], alpha=8.0)

# %% [markdown]
# ## The model key
#
# A remote request names the model by its **key**: the family class plus a JSON of what rebuilds it (checkpoint,
# revision, dtype; for tiny models the seed and config). The server imports the class and rebuilds the model from
# it, so nnsight-vla must be installed on the server. Weights never travel; a client can hold a meta model
# (`nv.load(...)` without weights) and still run everything below remotely.

# %%
print(vla.model_key)

# %% [markdown]
# ## `remote="local"`: nnsight's offline check
#
# The block is serialised as for a server (its source and the variables it reads; modules by reference) and run
# here. `remote_predict_action` is the one-call form: `predict_action` with a `Steering` applied *inside* the
# (remote) trace via `steer.edit(vla, tracer)`.

# %%
local = vla.predict_action(image, INSTRUCTION, **KW)
with steer.apply(vla):
    steered_here = vla.predict_action(image, INSTRUCTION, **KW)
steered_local_sim = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote="local", **KW)
print("unsteered:", np.round(local, 4))
print("steered:  ", np.round(steered_local_sim, 4))
assert np.array_equal(steered_local_sim, steered_here) and not np.array_equal(steered_here, local)

# %% [markdown]
# A hand-written remote block: values come back only when saved **by name inside the block**, so a list that
# collects per-forward results is created inside it (`list().save()`).

# %%
with vla.predict_action(image, INSTRUCTION, remote="local", **KW) as tracer:
    logits = list().save()
    for _ in tracer.iter[:7]:
        vla.layers[2].mlp.act.output[..., [3, 7]] = 8.0
        logits.append(vla.lm_head.output)
    action = tracer.result.save()
print(f"{len(logits)} logit tensors back, action {np.round(action, 4)}")

# %% [markdown]
# ## The server simulation: what a real server would do
#
# `remote="local"` runs the block against *your* model object, so it misses two pitfalls that a real server shows.
# `ServerSimulationBackend` (`backend=` on any trace) deserialises the request against a **separate** model rebuilt
# from the key (with the server's default dtype), runs it on a worker thread as an NDIF model actor does and returns
# only the saved values:
#
# 1. a list created *outside* the block comes back empty (the server appends to a copy);
# 2. stored edits — `with steer.apply(vla):` — live in the client process and cannot travel: a remote trace inside
#    one is refused with a clear error instead of silently running unsteered.

# %%
server = rm.ServerSimulationBackend(vla)
sim_action = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, backend=server, **KW)
assert np.array_equal(sim_action, steered_here)
print(f"simulated server: steered action equal to local; request {len(server.payload)} bytes, "
      f"result {server.result_bytes} bytes")

outside = []
with vla.predict_action(image, INSTRUCTION, backend=rm.ServerSimulationBackend(vla), **KW) as tracer:
    for _ in tracer.iter[:7]:
        outside.append(vla.lm_head.output.save())
print("list from outside the block after a (simulated) server run:", outside)
assert outside == []

try:
    with steer.apply(vla):
        with vla.predict_action(image, INSTRUCTION, backend=rm.ServerSimulationBackend(vla), **KW) as tracer:
            tracer.result.save()
except InputError as refused:
    print("stored edit + remote trace -> refused:", str(refused)[:160], "...")

# %% [markdown]
# **Sessions** batch several traces into one request (one round trip), and values flow between them: here layer 1's
# hidden state of the first prompt is patched into the second.

# %%
with vla.session(backend=rm.ServerSimulationBackend(vla)):
    with vla.predict_action(image, INSTRUCTION):
        hidden = vla.layers[1].output.save()
    with vla.predict_action(image, "open the top drawer", **KW) as second:
        vla.layers[1].output[:, -1, :] = hidden[:, -1, :]
        patched = second.result.save()
print("patched action:", np.round(patched, 4))

# %% [markdown]
# **The lens where the weights are.** `remote_lens_topk` runs the value-vector projection (tutorial 2) inside a
# remote session, so a client with a meta model gets the lens tables of a checkpoint it never downloads.

# %%
ids, scores = rm.remote_lens_topk(vla, k=5, backend=rm.ServerSimulationBackend(vla))
unembedding = vla.unembedding()[: len(vla.tokenizer)].detach()
reference = torch.topk(unembedding @ vla.value_vectors(3).detach(), 5, dim=0).indices.T.numpy()
assert np.array_equal(ids[3], reference)
print("remote lens:", ids.shape, "layer 3, vector 0 ->", vla.tokenizer.convert_ids_to_tokens(ids[3, 0].tolist()))

# %% [markdown]
# **A one-call check**, also from the shell (`nnsight-vla remote check --simulate`, or `--host URL` for a server):

# %%
report = rm.remote_check(simulate=True)
print({k: report[k] for k in ("ok", "equal_to_local", "simulated_s")})
assert report["ok"]

# %% [markdown]
# ## Settings
#
# `remote=True` uses the configured host: `NNSIGHT_VLA_HOST` (or `NDIF_HOST`, else nnsight's
# `CONFIG.API.HOST`), the key from `NNSIGHT_VLA_API_KEY` (or `NDIF_API_KEY`), a per-step connect timeout and a
# whole-job deadline. `remote=` also takes a URL or a `RemoteSettings`. The key is held in a `Secret` that never
# prints, pickles or lands in a result file.

# %%
settings = rm.remote_settings(host="http://127.0.0.1:8001", api_key="my-key", connect_timeout=5, timeout=120)
print(settings.describe(), repr(settings.api_key))

# %% [markdown]
# ## What a server agrees to build
#
# The key is the client's choice, so the server's operator decides which keys it builds (docs/remote.md §6): an
# allowlist of classes (the nnsight-vla families), checkpoint roots and hub ids, and a size cap measured on the meta
# device. The check runs before the key's class is imported; a refused checkpoint gets one message whatever the
# reason. (The code of the `with` block still runs on the server: NDIF's design; isolate the server, docs/trust.md.)

# %%
from nnsight_vla.errors import CheckpointError
from nnsight_vla.remote.policy import ServerPolicy

policy = ServerPolicy.from_env({"NVLA_SERVER_CHECKPOINT_ROOTS": "/data/checkpoints",
                                "NVLA_SERVER_HUB_IDS": "openvla/*"})
print("admitted:", policy.admit(vla.model_key).class_path)
for refused in ['this.Zen:{"tiny": {"seed": 0}}',
                'nnsight_vla.models.openvla.OpenVLA:{"family": "openvla", "source": "/data/checkpoints/../../etc"}']:
    try:
        policy.admit(refused)
    except CheckpointError as error:
        print("refused:", error)

# %% [markdown]
# ## A real NDIF server on this machine (slow part)
#
# `nnsight_vla.remote.stack` starts the whole stack on 127.0.0.1 — Redis, an S3 stand-in (moto), Ray with the NDIF
# controller and CPU model actors, ndif's API under gunicorn — in its own venv, and stops exactly what it started.
# Every service listens on loopback only; `up` checks each listening socket and refuses otherwise. From a shell:
#
# ```bash
# python -m nnsight_vla.remote.stack install      # once: Redis + the server venv (/work/venvs/ndif)
# NVLA_NDIF_PORT_BASE=18700 python -m nnsight_vla.remote.stack up       # prints the API URL when ready
# NNSIGHT_VLA_HOST=http://127.0.0.1:18701 nnsight-vla remote check   # a steered remote trace == local
# NVLA_NDIF_PORT_BASE=18700 python -m nnsight_vla.remote.stack down
# ```
#
# The same from Python, run only with `NNSIGHT_VLA_TUTORIAL_SLOW=1`:

# %%
if SLOW:
    from nnsight import CONFIG

    from nnsight_vla.remote import stack as ndif_stack

    os.environ.setdefault("NVLA_NDIF_HOME", "/tmp/nvla-ndif-tutorial")
    os.environ.setdefault("NVLA_NDIF_PORT_BASE", "18700")  # away from the defaults and the test suite's stack
    CONFIG.APP.REMOTE_LOGGING = False  # no per-request status lines
    already_up = ndif_stack.status()["connected"]
    t0 = time.perf_counter()
    try:
        state = ndif_stack.up(timeout=300)
    except ndif_stack.StackError:
        ndif_stack.down()
        raise
    print(f"stack up in {time.perf_counter() - t0:.0f} s at {state['api_url']} (logs: {state['logs']})")
    try:
        real = rm.remote_settings(host=state["api_url"], connect_timeout=10, timeout=240)
        t0 = time.perf_counter()
        remote_action = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote=real, **KW)
        print(f"first request (deploys the model): {time.perf_counter() - t0:.1f} s")
        assert np.array_equal(remote_action, steered_here)
        t0 = time.perf_counter()
        again = rm.remote_predict_action(vla, image, INSTRUCTION, steering=steer, remote=real, **KW)
        print(f"warm request: {time.perf_counter() - t0:.2f} s; steered remote action == local: "
              f"{np.array_equal(again, steered_here)}")
        ids_remote, _ = rm.remote_lens_topk(vla, k=5, remote=real)
        assert np.array_equal(ids_remote, ids)
        print("deployed models:", rm.remote_check(real.host, run=False)["deployed"])
    finally:
        if not already_up:
            ndif_stack.down()
            print("stack stopped")
else:
    print("real-server part skipped (set NNSIGHT_VLA_TUTORIAL_SLOW=1 to run it)")

# %%
(OUT / "done.txt").write_text(f"06_remote ok (slow part: {SLOW}) in {time.perf_counter() - START:.1f} s\n")
print(f"done in {time.perf_counter() - START:.1f} s")
