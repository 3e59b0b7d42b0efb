"""Activations, activation scales (alpha with units), pinned activations and the single-step causal checks,
each against an independent reference: plain PyTorch hooks on ``down_proj`` and dense numpy computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

import nnsight_vla as nv
from nnsight_vla.activations import Query, grid, read_activations
from nnsight_vla.causal import ablation_effect, action_effect, decode, neuron_response
from nnsight_vla.errors import InputError
from nnsight_vla.lens import ValueVectorLens
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.scale import ActivationScale, measure_activation_scale, rescale_mlps
from nnsight_vla.steering import Steering, pinned_activations

INSTRUCTIONS = ["pick up the bowl", "put the cup on the plate", "open the drawer"]


@pytest.fixture(scope="module")
def vla():
    torch.set_num_threads(1)
    return nv.tiny("openvla", seed=3)


@pytest.fixture(scope="module")
def images(vla):
    rng = np.random.default_rng(0)
    size = vla.image_processor.image_size[0]
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]


def hooked(vla, pre_hook=None):
    """Run the model's MLPs with plain PyTorch pre-hooks on down_proj: capture (and optionally edit) its input."""
    captured: dict[int, list[torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(vla._module.language_model.model.layers):
        def hook(module, args, i=i):
            x = args[0]
            if pre_hook is not None:
                x = pre_hook(i, x.clone())
            captured.setdefault(i, []).append(x[0].detach().clone())
            return (x,)
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    return captured, handles


def release(handles):
    for h in handles:
        h.remove()


def test_read_activations_equals_a_plain_hook(vla, images):
    acts = read_activations(vla, Query(images[0], INSTRUCTIONS[0]))
    captured, handles = hooked(vla)
    try:
        vla.predict_action(images[0], INSTRUCTIONS[0])
    finally:
        release(handles)
    assert set(acts) == set(range(vla.num_layers)) and len(acts[0]) == vla.forward_count() == 7
    for layer in acts:
        for ours, ref in zip(acts[layer], captured[layer]):
            torch.testing.assert_close(ours, ref)
    first = read_activations(vla, Query(images[0], INSTRUCTIONS[0]), layers=[-1], forwards="first")
    assert list(first) == [vla.num_layers - 1] and len(first[vla.num_layers - 1]) == 1


def test_activation_scale_is_a_percentile_of_the_hooked_activations(vla, images, tmp_path):
    queries = grid(images[:2], INSTRUCTIONS[:2])
    scale = measure_activation_scale(vla, queries, percentile=90.0)
    captured, handles = hooked(vla)
    try:
        for q in queries:
            vla.predict_action(q.images, q.instruction)
    finally:
        release(handles)
    for layer in range(vla.num_layers):
        pooled = torch.cat([t.reshape(-1) for t in captured[layer]]).abs().numpy()
        assert scale[layer] == pytest.approx(np.percentile(pooled, 90.0), rel=1e-6)
    assert scale.queries == 4 and scale.percentile == 90.0
    back = ActivationScale.load(scale.save(tmp_path / "scale.json"))
    assert back == scale
    with pytest.raises(InputError, match="positive finite"):
        ActivationScale((1.0, 0.0))


def test_rescaling_preserves_the_function_and_the_lens(images):
    vla = nv.tiny("openvla", seed=4)
    queries = grid(images, INSTRUCTIONS)
    scale = measure_activation_scale(vla, queries)
    lens_before = ValueVectorLens(vla, k=5, cache_dir=False, progress=False)
    ids, pixels = vla.prepare(images[0], INSTRUCTIONS[0])
    with torch.no_grad():
        logits_before = vla._module(input_ids=ids, pixel_values=pixels).logits
    actions_before = decode(vla, queries)
    after = rescale_mlps(vla, scale, reference=1.0)
    with torch.no_grad():
        logits_after = vla._module(input_ids=ids, pixel_values=pixels).logits
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(decode(vla, queries), actions_before)
    lens_after = ValueVectorLens(vla, k=5, cache_dir=False, progress=False)
    np.testing.assert_array_equal(lens_after.ids, lens_before.ids)
    measured = measure_activation_scale(vla, queries)
    np.testing.assert_allclose(measured.values, 1.0, rtol=1e-3)
    assert after.values == (1.0,) * vla.num_layers


def test_steering_in_units_of_the_activation_scale_writes_alpha_times_each_layers_scale(vla, images):
    scale = ActivationScale(tuple(0.5 + l for l in range(vla.num_layers)), percentile=99.0)
    pairs = [(0, 3), (1, 7), (3, 11)]
    steering = Steering(NeuronSet.for_model(vla, pairs), 2.0, scale=scale)
    assert [steering.raw_alpha(l) for l in (0, 1, 3)] == [1.0, 3.0, 7.0]

    def write(layer, x):
        for l, n in pairs:
            if l == layer:
                x[..., n] = 2.0 * scale[l]
        return x

    captured, handles = hooked(vla, write)
    try:
        reference = vla.predict_action(images[1], INSTRUCTIONS[1])
    finally:
        release(handles)
    with steering.apply(vla):
        ours = vla.predict_action(images[1], INSTRUCTIONS[1])
    np.testing.assert_array_equal(ours, reference)
    back = Steering.from_dict(steering.to_dict())
    assert back.to_dict() == steering.to_dict() and back.raw_alpha(3) == 7.0


def test_pinned_last_position_equals_a_hook_on_the_last_position(vla, images):
    d = vla.d_mlp
    first, rest = torch.linspace(-1, 1, d), torch.linspace(1, -1, d)

    def write(layer, x):
        if layer == 2:
            x[..., -1, :] = first if x.shape[1] > 1 else rest  # the prefill has many positions, decode steps one
        return x

    captured, handles = hooked(vla, write)
    try:
        reference = vla.predict_action(images[2], INSTRUCTIONS[2])
    finally:
        release(handles)
    with pinned_activations(vla, {2: (first, rest)}, positions="last"):
        ours = vla.predict_action(images[2], INSTRUCTIONS[2])
    np.testing.assert_array_equal(ours, reference)
    np.testing.assert_array_equal(vla.predict_action(images[2], INSTRUCTIONS[2]), decode(vla, [(images[2],
                                                                                                INSTRUCTIONS[2])])[0])
    with pytest.raises(InputError, match="finite numbers"):
        with pinned_activations(vla, {2: torch.full((d,), float("nan"))}):
            pass


def test_action_effect_matches_a_manual_decode_and_counts_random_sets(vla, images):
    queries = grid(images, INSTRUCTIONS[:2])
    steering = Steering(NeuronSet.for_model(vla, [(2, 5), (3, 9), (3, 40)]), 30.0)
    effect = action_effect(vla, steering, queries, n_random=3)
    base = decode(vla, queries)
    with steering.apply(vla):
        steered = np.stack([vla.predict_action(q.images, q.instruction) for q in queries])
    speed = lambda a: np.linalg.norm(a[:, :3], axis=1)  # noqa: E731
    assert effect.delta["speed"] == pytest.approx(float(np.mean(speed(steered) - speed(base))))
    np.testing.assert_allclose(effect.per_dim, (steered - base).mean(0))
    assert len(effect.random["speed"]) == 3 and effect.queries == len(queries)
    assert effect.beyond_random("speed") == (abs(effect.delta["speed"]) > max(abs(v) for v in effect.random["speed"]))
    with pytest.raises(InputError, match="n_random"):
        action_effect(vla, steering, queries, n_random=-1)


def test_neuron_response_equals_hooked_last_positions_and_scipy(vla, images):
    neurons = NeuronSet.for_model(vla, [(1, 2), (3, 4)])
    pos = grid(images, ["go fast"])
    neg = grid(images, ["go slowly"])
    response = neuron_response(vla, neurons, pos, neg)
    values = {}
    for name, qs in (("pos", pos), ("neg", neg)):
        rows = []
        for q in qs:
            captured, handles = hooked(vla)
            try:
                vla.predict_action(q.images, q.instruction)
            finally:
                release(handles)
            rows.append([captured[l][0][-1, n].item() for l, n in neurons.pairs])
        values[name] = np.array(rows)
    np.testing.assert_allclose(response.positive, values["pos"].mean(0), rtol=1e-5)
    np.testing.assert_allclose(response.negative, values["neg"].mean(0), rtol=1e-5)
    t = stats.ttest_ind(values["pos"], values["neg"], axis=0, equal_var=False).statistic
    np.testing.assert_allclose(response.t, t, rtol=1e-4)
    with pytest.raises(InputError, match="two queries"):
        neuron_response(vla, neurons, pos[:1], neg)


def test_ablation_effect_reports_the_gap_with_and_without_the_layers(vla, images):
    a, b = grid(images, ["move fast"]), grid(images, ["move slowly"])
    neutral = grid(images, INSTRUCTIONS)
    result = ablation_effect(vla, [2, 3], a, b, neutral, summary="speed")
    speed = lambda acts: np.linalg.norm(acts[:, :3], axis=1).mean()  # noqa: E731
    assert result.gap == pytest.approx(speed(decode(vla, a)) - speed(decode(vla, b)))
    assert result.layers == [2, 3]
    if result.gap:
        assert result.removed == pytest.approx(1 - result.gap_ablated / result.gap)


def test_batched_decode_equals_one_by_one(vla, images):
    queries = grid(images, INSTRUCTIONS)
    steering = Steering(NeuronSet.for_model(vla, [(2, 5), (3, 9)]), 30.0)
    for steer in (None, steering):
        np.testing.assert_array_equal(decode(vla, queries, steer, batch_size=4),
                                      decode(vla, queries, steer, batch_size=1))
    with pytest.raises(InputError, match="batch_size"):
        decode(vla, queries, batch_size=0)
