"""Batched inference (issue 16 item 1) and raw-input traces (issue 17 item 1) on every family.

Every batched result is compared with the single calls on each element (and logits with the plain-PyTorch
forward hooks of those single calls), steered batches with single calls under a plain PyTorch pre-hook, and
multi-invoke traces with single calls carrying the same edit as a hook.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from nnsight_vla.errors import InputError
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.steering import Steering

FAMILIES = ["openvla", "pi0", "pi0-fast"]
# token lengths differ a lot, so batches need padding (for pi0: past the processor's 48-token padding)
INSTRUCTIONS = [
    "pick up the black bowl",
    "put the black bowl on the plate and then push the red block to the left of the stove and close the drawer",
    "go",
]
NEURONS, LAYER, ALPHA = [3, 7, 11], 0, 4.0  # layer 0: pi0's expert never sees the last MLP


@pytest.fixture(scope="module")
def models(tiny_families):
    return tiny_families


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]
    states = [rng.uniform(-1, 1, 7) for _ in range(3)]
    return images, states


def observation_args(family, batch):
    """(images entries, states) of the batch in the family's form (None states for OpenVLA)."""
    images, states = batch
    if family == "openvla":
        return list(images), None
    return [{"base": img, "wrist": images[(i + 1) % 3]} for i, img in enumerate(images)], list(states)


def output_module(vla):
    """The module whose output decides the action at every forward: lm_head, or pi0's velocity projection."""
    m = vla._module
    if vla.family == "openvla":
        return m.language_model.lm_head
    return m.action_out_proj if vla.family == "pi0" else m.lm_head


def captured(module, fn):
    seen = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out.detach().float().clone()))
    try:
        result = fn()
    finally:
        handle.remove()
    return seen, result


def down_pre_hook(vla):
    """The reference edit of steering: a plain PyTorch pre-hook on layer LAYER's down_proj (every call)."""
    layers = {"openvla": "language_model.model.layers", "pi0": "model.vlm.language_model.layers",
              "pi0-fast": "model.language_model.layers"}[vla.family]
    down = vla._module.get_submodule(layers)[LAYER].mlp.down_proj

    def hook(module, args):
        x = args[0].clone()
        x[..., NEURONS] = ALPHA
        return (x,)

    return down.register_forward_pre_hook(hook)


def single_kwargs(family, i):
    return {"seed": i} if family == "pi0" else {"stop_at_eos": False} if family == "pi0-fast" else {}


def batch_kwargs(family):
    return {"seed": [0, 1, 2]} if family == "pi0" else {"stop_at_eos": False} if family == "pi0-fast" else {}


def singles(vla, images, states):
    return [vla.predict_action(images[i], INSTRUCTIONS[i], state=None if states is None else states[i],
                               **single_kwargs(vla.family, i)) for i in range(3)]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single_calls_per_element(models, batch, family):
    vla = models[family]
    images, states = observation_args(family, batch)
    out = output_module(vla)
    batched_logits, batched = captured(out, lambda: vla.predict_action(images, INSTRUCTIONS, state=states,
                                                                       **batch_kwargs(family)))
    rows = [d.token_ids.tolist() for d in vla.last_decodes] if family == "pi0-fast" else None
    per_call = [captured(out, lambda i=i: singles_one(vla, images, states, i)) for i in range(3)]
    expected = np.stack([actions for _, actions in per_call])
    assert batched.shape == (3, *expected.shape[1:])
    if family == "pi0":
        np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(batched, expected)  # the same tokens, decoded the same way
    assert len(batched_logits) == len(per_call[0][0])
    for step, logits in enumerate(batched_logits):
        for i, (single_logits, _) in enumerate(per_call):
            torch.testing.assert_close(logits[i, -1], single_logits[step][0, -1], rtol=1e-4, atol=1e-5)
    if family == "pi0-fast":  # every row decoded its own tokens, as its single call does
        assert rows == [vla.generate_tokens(images[i], INSTRUCTIONS[i], states[i], stop_at_eos=False).tolist()
                        for i in range(3)]


def singles_one(vla, images, states, i):
    return vla.predict_action(images[i], INSTRUCTIONS[i], state=None if states is None else states[i],
                              **single_kwargs(vla.family, i))


@pytest.mark.parametrize("family", FAMILIES)
def test_steering_applies_to_the_whole_batch(models, batch, family):
    vla = models[family]
    images, states = observation_args(family, batch)
    steer = Steering(NeuronSet.for_model(vla, [(LAYER, n) for n in NEURONS]), ALPHA)
    with steer.apply(vla):
        applied = vla.predict_action(images, INSTRUCTIONS, state=states, **batch_kwargs(family))
    with vla.predict_action(images, INSTRUCTIONS, state=states, **batch_kwargs(family)) as tracer:
        steer.edit(vla, tracer)
        edited = tracer.result.save()
    handle = down_pre_hook(vla)
    try:
        expected = np.stack(singles(vla, images, states))
    finally:
        handle.remove()
    plain = np.stack(singles(vla, images, states))
    tol = dict(rtol=1e-5, atol=1e-6) if family == "pi0" else dict(rtol=0, atol=0)
    np.testing.assert_allclose(applied, expected, **tol)
    np.testing.assert_allclose(edited, expected, **tol)
    if family != "pi0-fast":  # the random tiny pi0-FAST decodes to the same fallback chunk either way
        assert not np.allclose(applied, plain)


@pytest.mark.parametrize("family", FAMILIES)
def test_invokes_batch_and_each_edit_stays_in_its_element(models, batch, family):
    vla = models[family]
    images, states = observation_args(family, batch)
    state = (lambda i: None) if states is None else (lambda i: states[i])
    shared = {"stop_at_eos": False} if family == "pi0-fast" else {}
    own = (lambda i: {"seed": i}) if family == "pi0" else (lambda i: {})
    # the backbone runs in every forward, except pi0's (its prefix is cached after the first)
    count = 1 if family == "pi0" else vla.forward_count()
    with vla.predict_action(**shared) as tracer:
        with tracer.invoke(images[0], INSTRUCTIONS[0], state=state(0), **own(0)):
            for _ in tracer.iter[:count]:
                vla.layers[LAYER].mlp.act.output[..., NEURONS] = ALPHA
            first = tracer.result.save()
        with tracer.invoke(images[1], INSTRUCTIONS[1], state=state(1), **own(1)):
            second = tracer.result.save()
    handle = down_pre_hook(vla)
    try:
        steered_first = singles_one(vla, images, states, 0)
    finally:
        handle.remove()
    plain_second = singles_one(vla, images, states, 1)
    assert first.shape == (1, *steered_first.shape) and second.shape == (1, *plain_second.shape)
    tol = dict(rtol=1e-5, atol=1e-6) if family == "pi0" else dict(rtol=0, atol=0)
    np.testing.assert_allclose(first[0], steered_first, **tol)
    np.testing.assert_allclose(second[0], plain_second, **tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_observation_trace_is_the_first_forward(models, batch, family):
    """``vla.trace(image, instruction[, state])`` runs predict_action's first forward, as LanguageModel.trace(text)."""
    vla = models[family]
    images, states = observation_args(family, batch)
    state = None if states is None else states[0]
    kwargs = {"state": state} if state is not None else {}
    first, _ = captured(output_module(vla), lambda: singles_one(vla, images, states, 0))
    with vla.trace(images[0], INSTRUCTIONS[0], **kwargs):
        out = output_module_envoy(vla).output.save()
    torch.testing.assert_close(out.float()[:, -1], first[0][:, -1], rtol=1e-5, atol=1e-6)
    # several observations in invokes: one padded batch, each row its own first forward
    with vla.trace() as tracer:
        with tracer.invoke(images[1], INSTRUCTIONS[1], **({"state": states[1]} if states else {})):
            a = output_module_envoy(vla).output.save()
        with tracer.invoke(images[0], INSTRUCTIONS[0], **kwargs):
            b = output_module_envoy(vla).output.save()
    with vla.trace(images[1], INSTRUCTIONS[1], **({"state": states[1]} if states else {})):
        alone = output_module_envoy(vla).output.save()
    torch.testing.assert_close(a[:, -1], alone[:, -1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.float()[:, -1], first[0][:, -1], rtol=1e-4, atol=1e-5)


def output_module_envoy(vla):
    return vla.action_out_proj if vla.family == "pi0" else vla.lm_head


@pytest.mark.parametrize("family", FAMILIES)
def test_model_tensors_still_trace(models, family):
    vla = models[family]
    fn, args, kwargs = vla._scan_call()
    with vla.trace(*args, **kwargs):
        out = vla.layers[0].mlp.act.output.save()
    assert out.shape[-1] == vla.d_mlp


def test_wrong_raw_inputs_are_clear(models, batch):
    vla = models["openvla"]
    image = batch[0][0]
    for call, message in [
        (lambda: vla.trace("pick up the bowl"), "instruction"),
        (lambda: vla.trace(42, "pick up the bowl"), "image"),
        (lambda: vla.trace(image, "pick", state=[1.0, 2.0]), "no robot state"),
        (lambda: vla.trace(image, "pick", unnorm_key="tiny"), "no options"),
    ]:
        with pytest.raises(InputError, match=message):
            with call():
                vla.lm_head.output.save()
    with pytest.raises(InputError, match="instruction"):
        vla.forward_inputs(image, None)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_batches_are_refused(models, batch, family):
    vla = models[family]
    images, states = observation_args(family, batch)
    state = None if states is None else states
    with pytest.raises(InputError, match="3 instructions needs 3"):
        vla.predict_action(images[:2], INSTRUCTIONS, state=state)
    with pytest.raises(InputError, match="empty batch"):
        vla.predict_action([], [], state=[] if states else None)
    with pytest.raises(InputError, match="camera"):  # a single call given a list of observations
        vla.predict_action(images, INSTRUCTIONS[0], state=None if states is None else states[0])
    if states is not None:
        with pytest.raises(InputError, match="3 instructions needs 3 states"):
            vla.predict_action(images, INSTRUCTIONS, state=states[:2])
        with pytest.raises(InputError, match="one state vector per observation"):
            vla.predict_action(images, INSTRUCTIONS, state=[0.1, 0.2, 0.3])


def test_invokes_must_share_their_options(models, batch):
    vla = models["openvla"]
    images = batch[0]
    with pytest.raises(InputError, match="share their options"):
        with vla.predict_action() as tracer:
            with tracer.invoke(images[0], "pick", unnorm_key="tiny"):
                tracer.result.save()
            with tracer.invoke(images[1], "pick", unnorm_key=False):
                tracer.result.save()
    ids, pixels = vla.prepare(images[0], "pick")
    with pytest.raises(InputError, match="raw observations"):
        with vla.trace() as tracer:
            with tracer.invoke(input_ids=ids, pixel_values=pixels):
                vla.lm_head.output.save()
            with tracer.invoke(images[1], "pick"):
                vla.lm_head.output.save()


def test_pi0_per_element_seeds_and_noise(models, batch):
    vla = models["pi0"]
    images, states = observation_args("pi0", batch)
    noise = np.random.default_rng(5).normal(size=(3, vla.config.chunk_size, vla.config.max_action_dim))
    batched = vla.predict_action(images, INSTRUCTIONS, state=states, noise=noise)
    for i in range(3):
        single = vla.predict_action(images[i], INSTRUCTIONS[i], state=states[i], noise=noise[i])
        np.testing.assert_allclose(batched[i], single, rtol=1e-5, atol=1e-6)
    same_seed = vla.predict_action(images, INSTRUCTIONS, state=states, seed=7)
    np.testing.assert_allclose(same_seed[2], vla.predict_action(images[2], INSTRUCTIONS[2], state=states[2], seed=7),
                               rtol=1e-5, atol=1e-6)


def test_pi0_fast_rows_stop_at_their_own_eos(models, batch):
    """A row that writes <eos> early stops there (as its single call does) while the others keep decoding."""
    vla = models["pi0-fast"]
    images, states = observation_args("pi0-fast", batch)
    eos = vla.tokenizer.eos_token_id
    with vla.predict_action() as tracer:
        with tracer.invoke(images[0], INSTRUCTIONS[0], state=states[0]):
            for step in tracer.iter[:3]:
                if step == 2:
                    vla.lm_head.output[:, -1, eos] = 1e4
                else:
                    vla.lm_head.output.save()
        with tracer.invoke(images[1], INSTRUCTIONS[1], state=states[1]):
            pass
    rows = [d.token_ids.tolist() for d in vla.last_decodes]
    assert len(rows[0]) == 3 and rows[0][-1] == eos
    assert len(rows[1]) == vla.max_new_tokens
    assert rows[1] == vla.generate_tokens(images[1], INSTRUCTIONS[1], states[1]).tolist()
    counter = [0]

    def plant(module, args, out):
        counter[0] += 1
        if counter[0] == 3:
            out.logits[:, -1, eos] = 1e4

    handle = vla._module.register_forward_hook(plant)
    try:
        single = vla.generate_tokens(images[0], INSTRUCTIONS[0], states[0]).tolist()
    finally:
        handle.remove()
    assert rows[0] == single


@pytest.mark.parametrize("family", FAMILIES)
def test_steer_edit_in_one_invoke_steers_that_element_only(models, batch, family):
    vla = models[family]
    images, states = observation_args(family, batch)
    state = (lambda i: None) if states is None else (lambda i: states[i])
    shared = {"stop_at_eos": False} if family == "pi0-fast" else {}
    own = (lambda i: {"seed": i}) if family == "pi0" else (lambda i: {})
    steer = Steering(NeuronSet.for_model(vla, [(LAYER, n) for n in NEURONS]), ALPHA)
    with vla.predict_action(**shared) as tracer:
        with tracer.invoke(images[2], INSTRUCTIONS[2], state=state(2), **own(2)):
            plain = tracer.result.save()
        with tracer.invoke(images[0], INSTRUCTIONS[0], state=state(0), **own(0)):
            steer.edit(vla, tracer)
            steered = tracer.result.save()
    handle = down_pre_hook(vla)
    try:
        expected = singles_one(vla, images, states, 0)
    finally:
        handle.remove()
    tol = dict(rtol=1e-5, atol=1e-6) if family == "pi0" else dict(rtol=0, atol=0)
    np.testing.assert_allclose(steered[0], expected, **tol)
    np.testing.assert_allclose(plain[0], singles_one(vla, images, states, 2), **tol)
