"""pi0 on transformers' PI0ForConditionalGeneration: the two stacks, traced edits vs plain hooks on every denoising
step, the forward schedule, checkpoints in transformers' PI0 format, TransformerLens, bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from transformers import PI0ForConditionalGeneration

import nnsight_vla as nv
from nnsight_vla.errors import CheckpointError, InputError, VLAError

INSTRUCTION = "pick up the black bowl"
STATE = np.array([0.3, -0.2, 0.5, 0.1, 0.0, 0.7, -0.4])


@pytest.fixture(scope="module")
def vla():
    return nv.tiny("pi0", seed=0)


@pytest.fixture(scope="module")
def cams(images):
    return {"base": images["a"], "wrist": images["b"]}


def pre_hook(module, neurons, alpha, calls=None):
    """The reference edit: a plain PyTorch pre-hook on down_proj, optionally only on the given call indices."""
    count = [0]

    def hook(mod, args):
        index = count[0]
        count[0] += 1
        if calls is not None and index not in calls:
            return None
        x = args[0].clone()
        x[..., neurons] = alpha
        return (x,)

    return module.register_forward_pre_hook(hook)


def capture(module, fn):
    """Run ``fn`` and collect every output of ``module`` with a plain forward hook."""
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        result = fn()
    finally:
        handle.remove()
    return seen, result


def down(vla, stack, layer):
    m = vla._module
    layers = m.model.vlm.language_model.layers if stack == "backbone" else m.model.dit.layers
    return layers[layer].mlp.down_proj


def test_uniform_tree(vla):
    assert vla.family == "pi0"
    assert vla.stack_dims("backbone") == (2, 64, 128)
    assert vla.stack_dims("expert") == (2, 32, 64)
    assert len(vla.layers) == 2 and len(vla.expert_layers) == 2
    assert vla.layers[0].mlp.act is not None and vla.expert_layers[1].mlp.act is not None
    # lm_head is PaliGemma's tied unembedding: the backbone's input embedding itself, no copy, no scaling
    embed = vla._module.model.vlm.language_model.embed_tokens.weight
    assert vla.unembedding().data_ptr() == embed.data_ptr() == vla.input_embeddings().data_ptr()
    assert vla.vocab_size == 1024 and vla.unembedding().shape == (1024, vla.d_model)
    assert "unembed.weight" not in vla._module.state_dict()  # adds no checkpoint key
    assert vla.action_horizon == 5 and vla.action_dim == 7 and vla.state_dim == 7


def test_no_action_tokens(vla):
    with pytest.raises(VLAError, match="pi0 has no action tokens"):
        vla.action_token_ids  # noqa: B018 (the property raises)


def test_lm_head_is_logit_lens_of_the_backbone(vla):
    """vla.lm_head.output == final hidden state @ E.T, with E the raw embedding matrix."""
    m = vla._module
    ids = torch.tensor([[2, 40, 41, 300, 12]])

    def fn(input_ids):
        return m.unembed(m.model.vlm(input_ids=input_ids).last_hidden_state)

    with vla.trace(ids, fn=fn):
        logits = vla.lm_head.output.save()
    with torch.no_grad():
        hidden = m.model.vlm(input_ids=ids).last_hidden_state
    torch.testing.assert_close(logits, hidden @ m.model.vlm.language_model.embed_tokens.weight.T)


def test_flow_equals_transformers_sample_actions(vla, cams):
    """Our loop (prefix in the first root forward) is transformers' own sample_actions, step for step."""
    inputs = vla.prepare(cams, INSTRUCTION, STATE)
    noise = vla.sample_noise(3)
    reference = vla._module.sample_actions(
        state=inputs["state"], input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"], noise=noise,
        attention_mask=inputs["attention_mask"], pixel_attention_mask=inputs["pixel_attention_mask"],
    )
    ours = vla.predict_action(cams, INSTRUCTION, STATE, seed=3, unnormalize=False)
    np.testing.assert_allclose(ours, reference[0, :, :7].numpy(), rtol=0, atol=1e-6)


def test_state_normalisation_and_unnormalisation(vla, cams):
    stats = vla.stats
    inputs = vla.prepare(cams, INSTRUCTION, STATE)
    expected = (STATE - np.array(stats["state_mean"])) / (np.array(stats["state_std"]) + 1e-8)
    np.testing.assert_allclose(inputs["state"][0, :7].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert inputs["state"].shape == (1, 8) and inputs["state"][0, 7] == 0  # zero-padded to max_state_dim
    raw = vla.predict_action(cams, INSTRUCTION, STATE, unnormalize=False)
    actions = vla.predict_action(cams, INSTRUCTION, STATE)
    # transformers' own PI0Processor.normalize must map our actions back to the model's output
    back = vla.processor.normalize(torch.as_tensor(actions), "actions").numpy()
    np.testing.assert_allclose(back, raw, rtol=1e-4, atol=1e-5)
    assert not np.allclose(actions, raw)


def test_act_output_is_post_activation_in_both_stacks(vla, cams):
    """mlp.act's output is gelu_tanh(gate(x)) * up(x), recomputed from each MLP call's input and its weights."""
    m = vla._module
    got = {}
    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        for step in tracer.iter[:3]:
            if step == 0:
                got["backbone", 0] = vla.layers[1].mlp.act.output.save()
            got["expert", step] = vla.expert_layers[0].mlp.act.output.save()
    mlps = {"backbone": m.model.vlm.language_model.layers[1].mlp, "expert": m.model.dit.layers[0].mlp}
    inputs = {name: [] for name in mlps}
    handles = [mlp.register_forward_pre_hook(lambda mod, a, n=name: inputs[n].append(a[0].detach().clone()))
               for name, mlp in mlps.items()]
    vla.predict_action(cams, INSTRUCTION, STATE)
    for h in handles:
        h.remove()
    assert len(inputs["backbone"]) == 1 and len(inputs["expert"]) == 3  # prefix once, expert every step
    gelu = torch.nn.GELU(approximate="tanh")
    for (name, step), act in got.items():
        x, mlp = inputs[name][step], mlps[name]
        expected = gelu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
        torch.testing.assert_close(act, expected, rtol=1e-5, atol=1e-6)


def test_forward_schedule(vla, cams):
    m = vla._module
    assert vla.forward_count() == 3 and vla.forward_count(num_steps=5) == 5
    assert vla.stack_forwards("backbone") == [0] and vla.stack_forwards("expert", num_steps=4) == [0, 1, 2, 3]
    watched = {
        "root": m.action_out_proj, "backbone": m.model.vlm.language_model.layers[0], "expert": m.model.dit.layers[1]
    }
    for steps in (3, 5):
        calls = {name: 0 for name in watched}
        handles = [mod.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))  # noqa: B023
                   for name, mod in watched.items()]
        try:
            vla.predict_action(cams, INSTRUCTION, STATE, num_steps=steps)
        finally:
            for h in handles:
                h.remove()
        assert calls["root"] == vla.forward_count(num_steps=steps) == steps
        assert calls["backbone"] == len(vla.stack_forwards("backbone", num_steps=steps)) == 1
        assert calls["expert"] == len(vla.stack_forwards("expert", num_steps=steps)) == steps


def test_traced_edit_equals_plain_hook_on_every_step(vla, cams):
    """Backbone (its one prefix forward) + expert (every step), traced == plain pre-hooks, step by step."""
    m, bl, el, bn, en, alpha = vla._module, 1, 0, [3, 5, 17], [1, 2], 4.0
    traced = []
    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        for step in tracer.iter[: vla.forward_count()]:
            if step in vla.stack_forwards("backbone"):
                vla.layers[bl].mlp.act.output[..., bn] = alpha
            vla.expert_layers[el].mlp.act.output[..., en] = alpha
            traced.append(vla.action_out_proj.output.save())
        result = tracer.result.save()
    handles = [pre_hook(down(vla, "backbone", bl), bn, alpha), pre_hook(down(vla, "expert", el), en, alpha)]
    try:
        reference, ref_result = capture(m.action_out_proj, lambda: vla.predict_action(cams, INSTRUCTION, STATE))
    finally:
        for h in handles:
            h.remove()
    plain, plain_result = capture(m.action_out_proj, lambda: vla.predict_action(cams, INSTRUCTION, STATE))
    assert len(traced) == len(reference) == 3
    for got, want in zip(traced, reference):
        torch.testing.assert_close(got, want)
    np.testing.assert_array_equal(result, ref_result)
    assert not np.allclose(ref_result, plain_result), "the edit must change the actions"
    again, again_result = capture(m.action_out_proj, lambda: vla.predict_action(cams, INSTRUCTION, STATE))
    np.testing.assert_array_equal(again_result, plain_result)  # the model is clean after the trace


def test_first_step_only_vs_every_step(vla, cams):
    """Expert: editing the first denoising step only differs from every step. Backbone: it runs once, through
    the KV cache, so the first-forward edit *is* the every-step edit."""
    neurons, alpha = [4, 9], 6.0
    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        vla.expert_layers[1].mlp.act.output[..., neurons] = alpha
        first = tracer.result.save()
    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        for _ in tracer.iter[:3]:
            vla.expert_layers[1].mlp.act.output[..., neurons] = alpha
        every = tracer.result.save()
    h = pre_hook(down(vla, "expert", 1), neurons, alpha, calls={0})
    first_ref = vla.predict_action(cams, INSTRUCTION, STATE)
    h.remove()
    np.testing.assert_array_equal(first, first_ref)
    assert not np.allclose(first, every)

    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        vla.layers[0].mlp.act.output[..., neurons] = alpha
        prefix_only = tracer.result.save()
    with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
        for step in tracer.iter[:3]:
            if step in vla.stack_forwards("backbone"):
                vla.layers[0].mlp.act.output[..., neurons] = alpha
        scheduled = tracer.result.save()
    h = pre_hook(down(vla, "backbone", 0), neurons, alpha)  # on every call: there is only one
    always = vla.predict_action(cams, INSTRUCTION, STATE)
    h.remove()
    np.testing.assert_array_equal(prefix_only, scheduled)
    np.testing.assert_array_equal(prefix_only, always)
    assert not np.allclose(prefix_only, vla.predict_action(cams, INSTRUCTION, STATE))


def test_backbone_edit_at_a_step_it_does_not_run_is_cut_with_a_warning(vla, cams):
    """Why stack_forwards exists: asking for backbone step 1 parks the loop, and nnsight says so."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with vla.predict_action(cams, INSTRUCTION, STATE) as tracer:
            for _ in tracer.iter[:3]:
                vla.layers[0].mlp.act.output[..., [1]] = 2.0
    assert any("never reached" in str(w.message) for w in caught)


def test_noise_is_seeded(vla, cams):
    a = vla.predict_action(cams, INSTRUCTION, STATE, seed=1)
    b = vla.predict_action(cams, INSTRUCTION, STATE, seed=1)
    c = vla.predict_action(cams, INSTRUCTION, STATE, seed=2)
    d = vla.predict_action(cams, INSTRUCTION, STATE, noise=vla.sample_noise(1)[0].numpy())
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, d)
    assert not np.allclose(a, c)
    assert a.shape == (5, 7) and a.dtype == np.float32
    np.testing.assert_array_equal(vla.predict_action([cams["base"], cams["wrist"]], INSTRUCTION, STATE, seed=1), a)
    np.testing.assert_array_equal(vla.predict_action(cams, INSTRUCTION, STATE, seed=1, horizon=2), a[:2])


def test_checkpoint_round_trip(vla, cams, tmp_path):
    vla.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    processor = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["model_type"] == "pi0" and config["architectures"] == ["PI0ForConditionalGeneration"]
    assert processor["processor_class"] == "PI0Processor"
    assert processor["state_mean"] == pytest.approx(vla.stats["state_mean"])
    assert processor["image_processor"]["image_processor_type"] == "PI0ImageProcessor"
    # transformers' own loader reads the folder too
    assert isinstance(PI0ForConditionalGeneration.from_pretrained(str(tmp_path)), PI0ForConditionalGeneration)
    loaded = nv.load("pi0", str(tmp_path))
    assert not loaded.dispatched  # structure on meta first, weights on the first run
    expected = vla.predict_action(cams, INSTRUCTION, STATE)
    np.testing.assert_array_equal(loaded.predict_action(cams, INSTRUCTION, STATE), expected)
    ours, theirs = vla._module.state_dict(), loaded._module.state_dict()
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_checkpoint_errors(vla, tmp_path):
    with pytest.raises(CheckpointError, match="hub"):
        nv.load("pi0", "lerobot/pi0_base")
    with pytest.raises(CheckpointError, match="does not exist"):
        nv.load("pi0", str(tmp_path / "nowhere"))
    vla.save_pretrained(tmp_path / "ck")
    with pytest.raises(CheckpointError, match="holds a 'pi0' model"):
        nv.load("pi0-fast", str(tmp_path / "ck"))
    (tmp_path / "ck" / "processor_config.json").unlink()
    with pytest.raises(CheckpointError, match="image processor"):
        nv.load("pi0", str(tmp_path / "ck"))


def test_without_statistics():
    bare = nv.tiny("pi0", stats=None)
    assert bare.state_dim is None and bare.action_dim == 8
    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    assert bare.predict_action(images, INSTRUCTION, [0.1, 0.2, 0.3]).shape == (5, 8)
    with pytest.raises(InputError, match="1..8 numbers"):
        bare.predict_action(images, INSTRUCTION, np.zeros(9))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(images="drop-wrist"), "missing wrist"),
        (dict(images="one"), "needs 2 camera images"),
        (dict(state=np.zeros(6)), "state of dimension 7"),
        (dict(state=[0.0, np.nan, 0, 0, 0, 0, 0]), "NaN"),
        (dict(state=None), "needs the robot state"),
        (dict(horizon=6), "chunks of 5 actions"),
        (dict(horizon=0), "chunks of 5 actions"),
        (dict(num_steps=0), "num_steps"),
        (dict(noise=np.zeros((4, 8))), "noise must be"),
        (dict(instruction=""), "instruction"),
    ],
)
def test_bad_input(vla, cams, change, message):
    kwargs = dict(images=cams, instruction=INSTRUCTION, state=STATE)
    kwargs.update(change)
    if kwargs["images"] == "drop-wrist":
        kwargs["images"] = {"base": cams["base"]}
    elif kwargs["images"] == "one":
        kwargs["images"] = cams["base"]
    with pytest.raises(InputError, match=message):
        vla.predict_action(kwargs.pop("images"), kwargs.pop("instruction"), **kwargs)


def test_scan_detects_a_broken_expert(vla):
    mlp = vla._module.model.dit.layers[1].mlp
    original = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(10, 32, bias=False)
    try:
        with pytest.raises(CheckpointError, match=r"dit.layers.1.mlp.down_proj.weight has shape"):
            vla.check_tree()
    finally:
        mlp.down_proj = original
    vla.check_tree()


def test_transformer_lens_hook_post_equals_nnsight_edit(vla, cams):
    layer, neurons, alpha = 1, [5, 9], 3.0
    bridge = vla.to_transformer_lens()
    ids = torch.tensor([[2, 40, 41, 300, 700, 12]])
    causal = torch.ones_like(ids)  # TL's convention; PaliGemma's own default attends bidirectionally
    m = vla._module

    def overwrite(x, hook):
        x[..., neurons] = alpha
        return x

    with torch.no_grad():
        hooks = [(f"blocks.{layer}.mlp.hook_post", overwrite)]
        tl_logits = bridge.run_with_hooks(ids, token_type_ids=causal, fwd_hooks=hooks)
        tl_plain = bridge(ids)

    def backbone(input_ids, token_type_ids):
        return m.unembed(m.model.vlm(input_ids=input_ids, token_type_ids=token_type_ids).last_hidden_state)

    with vla.trace(ids, causal, fn=backbone):
        vla.layers[layer].mlp.act.output[..., neurons] = alpha
        nn_logits = vla.lm_head.output.save()
    torch.testing.assert_close(tl_logits, nn_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tl_logits, tl_plain)
    with pytest.raises(InputError, match="expert"):
        vla.to_transformer_lens("expert")
    assert vla.predict_action(cams, INSTRUCTION, STATE).shape == (5, 7)  # the nnsight tree is untouched
