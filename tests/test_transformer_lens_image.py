"""TransformerLens with the image: the bridge fed ``multimodal_inputs`` reproduces ``predict_action``'s first
forward (every ``hook_post`` = ``vla.layers[l].mlp.act.output``, the logits) for OpenVLA, pi0-FAST and pi0's
backbone. References: nnsight traces of ``predict_action`` and plain PyTorch forward hooks on the torch modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.errors import InputError
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.steering import Steering
from nnsight_vla.models.transformer_lens import (
    MultimodalBridge,
    multimodal_bridge,
    multimodal_embeds,
    multimodal_inputs,
)

INSTRUCTION = "pick up the black bowl"
STATE = np.array([0.3, -0.2, 0.5, 0.1, 0.0, 0.7, -0.4])
FAMILIES = ["openvla", "pi0-fast", "pi0"]


@pytest.fixture(scope="module")
def models():
    return {family: nv.tiny(family, seed=0) for family in FAMILIES}


@pytest.fixture(scope="module")
def bridges(models):
    return {family: multimodal_bridge(vla) for family, vla in models.items()}


def observation(family, images):
    if family == "openvla":
        return images["a"], INSTRUCTION, None
    return {"base": images["a"], "wrist": images["b"]}, INSTRUCTION, STATE


def first_forward(vla, obs):
    """nnsight: every backbone layer's ``mlp.act`` output and the lm_head output in predict_action's first forward."""
    with vla.predict_action(*obs) as tracer:
        acts = list().save()
        for layer in range(vla.num_layers):
            acts.append(vla.layers[layer].mlp.act.output)
        if vla.family != "pi0":  # pi0 never runs its (tied) lm_head: it decodes no tokens
            logits = vla.lm_head.output.save()
        result = tracer.result.save()
    return acts, (logits if vla.family != "pi0" else None), result


def language_model(vla):
    m = vla._module
    return {"openvla": lambda: m.language_model.model, "pi0-fast": lambda: m.model.language_model,
            "pi0": lambda: m.model.vlm.language_model}[vla.family]()


def plain_first_call(vla, obs):
    """Plain PyTorch: the inputs_embeds the language model receives and its output, on the first call."""
    seen = []

    def hook(mod, args, kwargs, out):
        if not seen:  # the first forward only (OpenVLA's decode steps pass input_ids)
            seen.append((kwargs["inputs_embeds"].detach().clone(), out.last_hidden_state.detach().clone()))

    handle = language_model(vla).register_forward_hook(hook, with_kwargs=True)
    try:
        vla.predict_action(*obs)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_embeds_are_what_the_language_model_receives(models, images, family):
    vla = models[family]
    obs = observation(family, images)
    received, _ = plain_first_call(vla, obs)
    with torch.no_grad():
        embeds = multimodal_embeds(vla, *obs)
    assert embeds.shape == received.shape
    torch.testing.assert_close(embeds, received, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_cache_reproduces_the_first_forward(models, bridges, images, family):
    vla, bridge = models[family], bridges[family]
    obs = observation(family, images)
    acts, logits, _ = first_forward(vla, obs)
    with torch.no_grad():
        tl_logits, cache = bridge.run_with_cache(*obs)
    for layer, act in enumerate(acts):
        torch.testing.assert_close(cache[f"blocks.{layer}.mlp.hook_post"], act, rtol=1e-4, atol=1e-5)
    if family == "pi0":
        # the prompt is right-padded; compare every real position against the plain backbone's own unembedding
        _, extra = multimodal_inputs(vla, *obs)
        real = extra["attention_mask"][0].bool()
        _, hidden = plain_first_call(vla, obs)
        with torch.no_grad():
            expected = vla._module.unembed(hidden)
        torch.testing.assert_close(tl_logits[0, real], expected[0, real], rtol=1e-4, atol=1e-4)
        last = int(real.nonzero().max())
        assert last == int(extra["attention_mask"].sum()) - 1
    else:
        assert tl_logits.shape == logits.shape
        torch.testing.assert_close(tl_logits[0, -1], logits[0, -1], rtol=1e-4, atol=1e-4)
        # the first action token comes out of that last position
        if family == "openvla":
            first = int(logits[0, -1].argmax())
            assert int(tl_logits[0, -1].argmax()) == first


@pytest.mark.parametrize("family", ["openvla", "pi0-fast"])
def test_run_with_hooks_equals_the_nnsight_edit_of_the_first_forward(models, bridges, images, family):
    """An overwrite on hook_post in TL = the same overwrite of mlp.act in predict_action's first forward."""
    vla, bridge = models[family], bridges[family]
    obs = observation(family, images)
    layer, neurons, alpha = 1, [5, 9, 40], 3.0

    def overwrite(x, hook):
        x[..., neurons] = alpha
        return x

    with torch.no_grad():
        edited = bridge.run_with_hooks(*obs, fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", overwrite)])
        plain = bridge(*obs)
    with vla.predict_action(*obs):
        vla.layers[layer].mlp.act.output[..., neurons] = alpha  # first forward only (no tracer.iter)
        logits = vla.lm_head.output.save()
    torch.testing.assert_close(edited[0, -1], logits[0, -1], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(edited[0, -1], plain[0, -1])
    # a Steering's TransformerLens hooks go through the wrapper unchanged
    steer = Steering(NeuronSet.for_model(vla, [(layer, n) for n in neurons]), alpha=alpha)
    with torch.no_grad():
        steered = bridge.run_with_hooks(*obs, fwd_hooks=steer.transformer_lens_hooks(vla))
    torch.testing.assert_close(steered, edited, rtol=0, atol=0)


def test_pi0_fast_embeds_equal_the_bridges_own_pixel_path(models, bridges, images):
    """PaliGemma's adapter also takes pixel_values itself: both routes give the same forward."""
    vla = models["pi0-fast"]
    obs = observation("pi0-fast", images)
    inputs = vla.prepare(*obs)
    with torch.no_grad():
        direct = bridges["pi0-fast"].bridge(inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                            token_type_ids=inputs["token_type_ids"])
        via_embeds = bridges["pi0-fast"](*obs)
    torch.testing.assert_close(via_embeds, direct, rtol=1e-5, atol=1e-5)


def test_wrapper_delegates_and_shares_weights(models, bridges, images):
    vla, bridge = models["openvla"], bridges["openvla"]
    assert isinstance(bridge, MultimodalBridge) and bridge.cfg is bridge.bridge.cfg
    assert len(bridge.blocks) == vla.num_layers
    own = multimodal_bridge(vla, bridge.bridge)
    assert own.bridge is bridge.bridge
    before = vla.predict_action(images["a"], INSTRUCTION)
    with torch.no_grad():
        bridge.run_with_cache(images["a"], INSTRUCTION)
    np.testing.assert_array_equal(vla.predict_action(images["a"], INSTRUCTION), before)  # nnsight tree untouched
    down = vla._module.language_model.model.layers[0].mlp.down_proj.weight
    shared = dict(bridge.blocks[0].mlp.named_parameters())["_original_component.down_proj._original_component.weight"]
    assert shared.data_ptr() == down.data_ptr()


def test_errors(models, images):
    with pytest.raises(InputError, match="no robot state"):
        multimodal_inputs(models["openvla"], images["a"], INSTRUCTION, STATE)
    with pytest.raises(InputError):
        multimodal_inputs(models["pi0"], images["a"], INSTRUCTION, STATE)  # pi0 needs two cameras
