"""OpenVLA on transformers 5: the uniform tree, traced edits vs plain hooks, checkpoints, TransformerLens, bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.errors import CheckpointError, IndexOutOfRangeError, InputError, UnknownFamilyError

INSTRUCTION = "pick up the black bowl"


def lm_head_logits(vla, fn):
    """Run ``fn`` and collect every lm_head output with a plain forward hook (independent of nnsight)."""
    seen = []
    handle = vla._module.language_model.lm_head.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


def overwrite_pre_hook(vla, layer, neurons, alpha):
    """The reference edit: a plain PyTorch pre-hook on down_proj overwriting the chosen inputs."""
    down = vla._module.language_model.model.layers[layer].mlp.down_proj

    def hook(module, args):
        x = args[0].clone()
        x[..., neurons] = alpha
        return (x,)

    return down.register_forward_pre_hook(hook)


def test_uniform_tree(tiny_openvla):
    vla = tiny_openvla
    assert vla.family == "openvla"
    assert vla.num_layers == 4 and vla.d_model == 64 and vla.d_mlp == 128
    assert len(vla.layers) == vla.num_layers
    assert vla.layers[0].mlp.act is not None and vla.lm_head is not None
    # the 256 action tokens are the last ids of the tokenizer vocabulary (before the padding rows)
    ids = vla.action_token_ids
    assert len(ids) == 256 and ids[-1] == vla.config.token_vocab_size - 1 == vla.vocab_size - 65
    assert vla.tokenizer.convert_ids_to_tokens(int(ids[-1])) == "<act_0>"


def test_act_output_is_post_activation(tiny_openvla, images):
    """mlp.act's output is act_fn(gate(x)) * up(x), recomputed here from the MLP's input and its weights."""
    vla = tiny_openvla
    mlp = vla._module.language_model.model.layers[1].mlp
    captured = {}
    h = mlp.register_forward_hook(lambda m, a, o: captured.setdefault("x", a[0].detach().clone()))
    with vla.predict_action(images["a"], INSTRUCTION) as tracer:  # noqa: F841 (the `with` target makes it a trace)
        act = vla.layers[1].mlp.act.output.save()
    h.remove()
    x = captured["x"]
    expected = torch.nn.functional.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    assert act.shape[-1] == vla.d_mlp
    torch.testing.assert_close(act, expected, rtol=1e-5, atol=1e-6)


def test_traced_edit_equals_plain_hook_on_every_forward(tiny_openvla, images):
    vla, neurons, layer, alpha = tiny_openvla, [3, 7, 11], 2, 4.0
    traced = []
    with vla.predict_action(images["a"], INSTRUCTION, restrict_to_action_tokens=True) as tracer:
        for _ in tracer.iter[:7]:
            vla.layers[layer].mlp.act.output[..., neurons] = alpha
            traced.append(vla.lm_head.output.save())
    handle = overwrite_pre_hook(vla, layer, neurons, alpha)
    try:
        reference = lm_head_logits(vla, lambda: vla.generate_action_tokens(images["a"], INSTRUCTION, 7, True))
    finally:
        handle.remove()
    plain = lm_head_logits(vla, lambda: vla.generate_action_tokens(images["a"], INSTRUCTION, 7, True))
    assert len(traced) == len(reference) == 7  # prefill + 6 cached steps
    for got, want in zip(traced, reference):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(reference[0], plain[0]), "the edit must change the logits"
    # the model is clean after the trace: a plain run equals the unedited reference
    again = lm_head_logits(vla, lambda: vla.generate_action_tokens(images["a"], INSTRUCTION, 7, True))
    for got, want in zip(again, plain):
        torch.testing.assert_close(got, want)


def test_edit_on_first_forward_only_differs(tiny_openvla, images):
    """Without tracer.iter the edit applies to the first forward only: later steps see the unedited model."""
    vla = tiny_openvla
    with vla.predict_action(images["a"], INSTRUCTION, restrict_to_action_tokens=True) as tracer:
        vla.layers[2].mlp.act.output[..., [3]] = 9.0
        first = tracer.result.save()
    with vla.predict_action(images["a"], INSTRUCTION, restrict_to_action_tokens=True) as tracer:
        for _ in tracer.iter[:7]:
            vla.layers[2].mlp.act.output[..., [3]] = 9.0
        every = tracer.result.save()
    assert first.shape == every.shape == (7,)


def test_image_changes_first_token_logits(tiny_openvla, images):
    """Guard against the known transformers >= 4.50 bug where OpenVLA silently ignores the image."""
    vla = tiny_openvla
    la = lm_head_logits(vla, lambda: vla.generate_action_tokens(images["a"], INSTRUCTION, 1))[0][0, -1]
    lb = lm_head_logits(vla, lambda: vla.generate_action_tokens(images["b"], INSTRUCTION, 1))[0][0, -1]
    assert (la - lb).abs().max() > 1e-4


def test_prompt_format(tiny_openvla, images):
    vla = tiny_openvla
    assert vla.prompt("Pick Up The Bowl") == "In: What action should the robot take to pick up the bowl?\nOut:"
    ids, pixels = vla.prepare(images["a"], "pick")
    assert ids[0, 0].item() == vla.tokenizer.bos_token_id
    assert ids[0, -1].item() == vla.tokenizer.convert_tokens_to_ids("▁")  # OpenVLA's appended empty token
    assert pixels.shape == (1, 6, 56, 56)


def test_hub_prompt_is_used_as_is(tiny_openvla, images):
    """An instruction that already is the hub's prompt is tokenized as the hub's processor + predict_action do."""
    vla = tiny_openvla
    wrapped = f"In: What action should the robot take to {INSTRUCTION}?\nOut:"
    assert vla.prompt(wrapped) == wrapped
    ids, _ = vla.prepare(images["a"], wrapped)
    assert ids[0].tolist() == vla.tokenizer(wrapped).input_ids + [vla.tokenizer.convert_tokens_to_ids("▁")]
    same = vla.predict_action(images["a"], INSTRUCTION)
    np.testing.assert_array_equal(vla.predict_action(images["a"], wrapped), same)
    for partial in ["In: What action should the robot take to pick up the bowl?", "pick up the bowl?\nOut:"]:
        with pytest.raises(InputError, match="partly wrapped"):
            vla.predict_action(images["a"], partial)


def test_hub_keyword_arguments(tiny_openvla, images):
    vla = tiny_openvla
    plain = vla.predict_action(images["a"], INSTRUCTION, unnorm_key="tiny")
    greedy = vla.predict_action(images["a"], INSTRUCTION, unnorm_key="tiny", do_sample=False)
    np.testing.assert_array_equal(greedy, plain)
    with pytest.raises(InputError, match="do_sample=True.*greedily"):
        vla.predict_action(images["a"], INSTRUCTION, do_sample=True)


def test_action_decoding_matches_published_formula(tiny_openvla):
    """Bins, clipping and un-normalisation, recomputed from the published formulas."""
    vla = tiny_openvla
    vocab = vla.config.token_vocab_size
    ids = np.array([vocab - 1, vocab - 256, vocab - 128, 5, vocab - 1, vocab - 2, vocab - 3])
    bins = np.linspace(-1, 1, 256)
    centers = (bins[:-1] + bins[1:]) / 2
    norm = centers[np.clip(vocab - ids - 1, 0, 254)]
    stats = vla.config.norm_stats["tiny"]["action"]
    lo, hi, mask = map(np.asarray, (stats["q01"], stats["q99"], stats["mask"]))
    expected = np.where(mask, 0.5 * (norm + 1) * (hi - lo) + lo, norm)
    np.testing.assert_allclose(vla.bins.decode(ids, None), expected)
    assert vla.bins.decode(ids, None)[-1] == norm[-1]  # gripper is not un-normalised


def test_predict_action_shape_and_determinism(tiny_openvla, images):
    a = tiny_openvla.predict_action(images["a"], INSTRUCTION)
    b = tiny_openvla.predict_action({"primary": images["a"]}, INSTRUCTION)
    assert a.shape == (7,) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_checkpoint_round_trip(tiny_openvla, images, tmp_path):
    vla = tiny_openvla
    vla.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) >= 2  # sharded, like the published checkpoint
    # the published names, not ours
    assert "vision_backbone.featurizer.blocks.0.attn.qkv.weight" in keys
    assert "vision_backbone.featurizer.blocks.0.ls1.scale_factor" in keys
    assert "vision_backbone.fused_featurizer.attn_pool.kv.weight" in keys
    assert "language_model.model.layers.0.mlp.down_proj.weight" in keys
    assert not any("q_proj" in k and "vision" in k for k in keys)
    loaded = nv.load("openvla", str(tmp_path))
    assert not loaded.dispatched  # meta build first, weights on the first run
    a = vla.predict_action(images["a"], INSTRUCTION, unnorm_key=False, restrict_to_action_tokens=True)
    b = loaded.predict_action(images["a"], INSTRUCTION, unnorm_key=False, restrict_to_action_tokens=True)
    np.testing.assert_array_equal(a, b)
    ours, theirs = vla._module.state_dict(), loaded._module.state_dict()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)


def test_partial_and_missing_checkpoints(tiny_openvla, tmp_path):
    vla = tiny_openvla
    vla.save_pretrained(tmp_path / "full")
    with pytest.raises(CheckpointError, match="does not exist|no config.json"):
        nv.load("openvla", str(tmp_path / "nowhere"))
    partial = tmp_path / "partial"
    shutil.copytree(tmp_path / "full", partial)
    shard = sorted(partial.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(CheckpointError, match="partial checkpoint.*missing"):
        nv.load("openvla", str(partial), dispatch=True)
    no_weights = tmp_path / "no_weights"
    shutil.copytree(tmp_path / "full", no_weights)
    for f in no_weights.glob("model*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        nv.load("openvla", str(no_weights), dispatch=True)


def test_hub_id_offline_fails_clearly():
    with pytest.raises(CheckpointError, match="hub"):
        nv.load("openvla", "openvla/openvla-7b")


def test_unknown_family_lists_known():
    with pytest.raises(UnknownFamilyError, match="openvla.*pi0"):
        nv.load("octo", "x")
    with pytest.raises(UnknownFamilyError):
        nv.tiny("rt2")


def test_unnorm_key_errors(tiny_openvla, images):
    with pytest.raises(InputError, match="unknown unnorm_key 'bridge_orig'.*tiny"):
        tiny_openvla.predict_action(images["a"], INSTRUCTION, unnorm_key="bridge_orig")
    two = nv.tiny("openvla", norm_stats={"a": nv.tiny("openvla").config.norm_stats["tiny"], "b": {"action": {
        "q01": [0] * 7, "q99": [1] * 7}}})
    with pytest.raises(InputError, match=r"pass unnorm_key=one of \['a', 'b'\]"):
        two.predict_action(images["a"], INSTRUCTION)
    assert two.predict_action(images["a"], INSTRUCTION, unnorm_key="b").shape == (7,)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((32, 32, 4), np.uint8), r"shape \(H, W, 3\)"),
        (np.zeros((32, 32, 3), np.float32), "must be uint8"),
        ("image.png", "numpy array or a PIL image"),
    ],
)
def test_bad_images(tiny_openvla, bad, message):
    with pytest.raises(InputError, match=message):
        tiny_openvla.predict_action(bad, INSTRUCTION)


def test_bad_instruction_and_state(tiny_openvla, images):
    with pytest.raises(InputError, match="instruction"):
        tiny_openvla.predict_action(images["a"], "")
    with pytest.raises(InputError, match="no robot state"):
        tiny_openvla.predict_action(images["a"], INSTRUCTION, state=[0.0] * 8)
    with pytest.raises(InputError, match="needs 1 camera"):
        tiny_openvla.predict_action([images["a"], images["b"]], INSTRUCTION)


def test_layer_index_errors(tiny_openvla):
    with pytest.raises(IndexOutOfRangeError, match="layer 4 is out of range.*4 layers"):
        tiny_openvla.value_vectors(4)
    assert tiny_openvla.check_layer(-1) == 3
    with pytest.raises(InputError, match="no 'expert' stack"):
        tiny_openvla.value_vectors(0, stack="expert")


def test_scan_detects_a_broken_tree(tiny_openvla):
    """The load-time scan names a module whose shapes do not match the uniform tree."""
    vla = tiny_openvla
    mlp = vla._module.language_model.model.layers[1].mlp
    original = mlp.down_proj
    mlp.down_proj = torch.nn.Linear(vla.d_mlp // 2, vla.d_model, bias=False)
    try:
        with pytest.raises(CheckpointError, match=r"layers.1.mlp.down_proj.weight has shape"):
            vla.check_tree()
    finally:
        mlp.down_proj = original
    vla.check_tree()


def test_transformer_lens_hook_post_equals_nnsight_edit(tiny_openvla, images):
    vla, layer, neurons, alpha = tiny_openvla, 2, [5, 9], 3.0
    bridge = vla.to_transformer_lens()
    ids = torch.tensor([[1, 40, 41, 300, 700, 12]])

    def overwrite(x, hook):
        x[..., neurons] = alpha
        return x

    with torch.no_grad():
        tl_logits = bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", overwrite)])
        tl_plain = bridge(ids)
    with vla.trace(ids, fn=vla._module.language_model.forward):
        vla.layers[layer].mlp.act.output[..., neurons] = alpha
        nn_logits = vla.lm_head.output.save()
    torch.testing.assert_close(tl_logits, nn_logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tl_logits, tl_plain)
    # the bridge shares weights and leaves the nnsight model working
    assert bridge.blocks[0].mlp is not None
    assert tiny_openvla.predict_action(images["a"], INSTRUCTION).shape == (7,)


def test_one_line_with_of_another_context_runs_the_call(tiny_openvla, images):
    """`with something: a = vla.predict_action(...)` on one line runs the call (nnsight alone returns a tracer)."""
    import contextlib

    expected = tiny_openvla.predict_action(images["a"], INSTRUCTION)
    with contextlib.nullcontext(): action = tiny_openvla.predict_action(images["a"], INSTRUCTION)  # noqa: E701
    assert isinstance(action, np.ndarray)
    np.testing.assert_array_equal(action, expected)


def test_forward_count(tiny_openvla):
    assert tiny_openvla.forward_count() == 7
    assert tiny_openvla.stack_forwards("backbone") == list(range(7))


def test_hub_processor_tensors_get_a_clear_error(tiny_openvla, images):
    ids, pixels = tiny_openvla.prepare(images["a"], INSTRUCTION)
    with pytest.raises(InputError, match="builds the prompt itself"):
        tiny_openvla.predict_action(input_ids=ids, pixel_values=pixels, unnorm_key="tiny", do_sample=False)
