"""Steering: nnsight edits equal plain PyTorch hooks on every forward, for every available family.

The references here are independent of the code under test: plain ``register_forward_pre_hook`` edits on
``down_proj`` (the module reading ``mlp.act``'s output), outputs captured with plain forward hooks, and
hand computations of the activation values.
"""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.rollout.conditions import Condition
from nnsight_vla.errors import IndexOutOfRangeError, InputError, UnknownFamilyError
from nnsight_vla.neurons import NeuronSet
from nnsight_vla.steering import (
    PROMPT_TEMPLATE,
    Steering,
    SteeringGroup,
    forward_count,
    load_neurons,
    prompt_baseline,
    steering_from_dict,
)

INSTRUCTION = "pick up the black bowl"
FAMILIES = ["openvla", "pi0", "pi0-fast"]
ALPHA = 6.0


# ---------------------------------------------------------------------------------------------------------------
# models and inputs (one tiny model per family, built for this module only so a failure cannot leak edits)


@pytest.fixture(scope="module", params=FAMILIES)
def vla(request):
    try:
        return nv.tiny(request.param, seed=0)
    except UnknownFamilyError as error:
        pytest.skip(f"family {request.param} not available: {error}")


@pytest.fixture(scope="module")
def openvla():
    return nv.tiny("openvla", seed=0)


def call_args(vla):
    """(images, instruction, kwargs) for one predict_action of this family."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    images = {name: image for name in vla.camera_names}
    kwargs = {}
    if vla.state_dim:
        kwargs["state"] = np.linspace(-0.5, 0.5, vla.state_dim, dtype=np.float32)
    if vla.family == "openvla":
        kwargs.update(restrict_to_action_tokens=True, unnorm_key=False)
    return images, INSTRUCTION, kwargs


def predict(vla):
    images, instruction, kwargs = call_args(vla)
    torch.manual_seed(0)  # families that sample noise (pi0) draw the same noise in every run
    return vla.predict_action(images, instruction, **kwargs)


def stack_layers(vla, stack):
    return vla._module.get_submodule(vla.stack(stack).path)


def capture(vla, fn):
    """Run ``fn`` and record, with plain forward hooks, every per-forward output: the last MLP of every stack and
    the unembedding, in call order. Returns (records, fn's result)."""
    records = []
    modules = [(s.name, stack_layers(vla, s.name)[-1].mlp.down_proj) for s in vla.stacks]
    modules.append(("lm_head", vla._module.get_submodule(vla.lm_head_path)))
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: records.append((name, o.detach().clone())))
        for name, module in modules
    ]
    try:
        result = fn()
    finally:
        for handle in handles:
            handle.remove()
    return records, result


@contextlib.contextmanager
def hook_reference(vla, by_layer, values, stack="backbone", add=False, first_only=False):
    """The reference edit: plain pre-hooks on down_proj writing (or adding) ``values`` into the chosen inputs.
    ``first_only`` edits only the first call of each layer (the prefill)."""
    layers = stack_layers(vla, stack)
    handles = []
    for layer, neurons in by_layer.items():
        calls = [0]

        def pre_hook(module, args, neurons=list(neurons), calls=calls, layer=layer):  # noqa: B006 - bound per hook
            calls[0] += 1
            if first_only and calls[0] > 1:
                return None
            x = args[0].clone()
            value = values[layer] if isinstance(values, dict) else values
            if add:
                x[..., neurons] += torch.as_tensor(value, dtype=x.dtype)
            else:
                x[..., neurons] = value
            return (x, *args[1:])

        handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def assert_same_records(got, want):
    assert [n for n, _ in got] == [n for n, _ in want], "different forward passes"
    for (name, a), (_, b) in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")  # noqa: B023 - called at once


def records_differ(a, b):
    return any(not torch.allclose(x, y, rtol=1e-5, atol=1e-5) for (_, x), (_, y) in zip(a, b))


def neuron_choice(vla, stack="backbone"):
    """Neurons in the first and last layer of a stack (two in the last)."""
    num_layers, _, d_mlp = vla.stack_dims(stack)
    return [(0, 1), (num_layers - 1, 2), (num_layers - 1, d_mlp - 3)]


def stacks_of(vla):
    return [s.name for s in vla.stacks]


def count_forwards(vla, stack, fn):
    """How many times the first layer of ``stack`` (None: the whole model) runs during ``fn``."""
    calls = []
    module = vla._module if stack is None else stack_layers(vla, stack)[0].mlp.down_proj
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        handle.remove()
    return len(calls)


@pytest.fixture(scope="module")
def unsteered(vla):
    return capture(vla, lambda: predict(vla))


# ---------------------------------------------------------------------------------------------------------------
# (a) apply(): equal to plain hooks on every forward, prefill scope, clean afterwards


@pytest.mark.parametrize("scope", ["every", "prefill"])
def test_apply_equals_plain_hooks(vla, unsteered, scope):
    for stack in stacks_of(vla):
        pairs = neuron_choice(vla, stack)
        steer = Steering(NeuronSet.for_model(vla, pairs, stack=stack, name="t"), ALPHA, scope=scope)
        with steer.apply(vla) as applied:
            steered, action = capture(vla, lambda: predict(vla))
        with hook_reference(vla, steer.resolve(vla).by_layer(), ALPHA, stack=stack, first_only=scope == "prefill"):
            reference, ref_action = capture(vla, lambda: predict(vla))
        assert_same_records(steered, reference)
        np.testing.assert_allclose(action, ref_action, rtol=1e-5, atol=1e-6)
        assert records_differ(steered, unsteered[0]), f"steering the {stack} stack must change the outputs"
        runs = sum(1 for name, _ in steered if name == stack)  # forwards through the stack in the steered run
        assert applied.steered_forwards == {stack: runs if scope == "every" else 1}
        if vla.family == "openvla":
            assert runs == 7  # prefill + 6 cached decode steps
    # the model is unchanged after the context exits
    assert vla._edits == []
    again, _ = capture(vla, lambda: predict(vla))
    assert_same_records(again, unsteered[0])


def test_prefill_differs_from_every_step_where_it_should(vla, unsteered):
    for stack in stacks_of(vla):
        pairs = neuron_choice(vla, stack)
        runs = count_forwards(vla, stack, lambda: predict(vla))
        results = {}
        for scope in ("every", "prefill"):
            with Steering(NeuronSet.for_model(vla, pairs, stack=stack), ALPHA, scope=scope).apply(vla):
                results[scope], _ = capture(vla, lambda: predict(vla))
        every, prefill = results["every"], results["prefill"]
        # the first forward through the stack is steered identically; later ones only under "every"
        stack_records = [i for i, (name, _) in enumerate(every) if name == stack]
        first = stack_records[0]
        torch.testing.assert_close(every[first][1], prefill[first][1])
        if runs > 1:
            later = stack_records[1:]
            assert any(not torch.allclose(every[i][1], prefill[i][1]) for i in later)
            assert records_differ(prefill, unsteered[0])
        else:  # a stack that runs once (pi0's backbone prefix): both scopes are the same edit
            assert_same_records(every, prefill)


def test_layer_subsets_restrict_the_set(vla, unsteered):
    stack = stacks_of(vla)[0]
    num_layers = vla.stack_dims(stack)[0]
    pairs = neuron_choice(vla, stack)
    full = NeuronSet.for_model(vla, pairs, stack=stack, name="both")
    for layers, expected in (("late", [num_layers - 1]), ("early", [0]), ([0], [0])):
        steer = Steering(full, ALPHA, layers=layers)
        assert steer.resolve(vla).layers == expected
        with steer.apply(vla):
            steered, _ = capture(vla, lambda: predict(vla))
        kept = {l: n for l, n in full.by_layer().items() if l in expected}
        with hook_reference(vla, kept, ALPHA, stack=stack):
            reference, _ = capture(vla, lambda: predict(vla))
        assert_same_records(steered, reference)


def test_apply_also_steers_traces_opened_inside(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(1, 4), (2, 9)]), ALPHA)
    with hook_reference(vla, steer.neurons.by_layer(), ALPHA):
        reference, _ = capture(vla, lambda: predict(vla))
    images, instruction, kwargs = call_args(vla)
    traced = []
    with steer.apply(vla) as applied:
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            for _ in tracer.iter[:7]:
                act = vla.layers[2].mlp.act.output.save()  # the user sees the steered activation
                traced.append(vla.lm_head.output.save())
    lm_reference = [o for name, o in reference if name == "lm_head"]
    for got, want in zip(traced, lm_reference, strict=True):
        torch.testing.assert_close(got, want)
    assert torch.all(act[..., 9] == ALPHA)
    assert applied.steered_forwards == {"backbone": 7}


def test_users_own_stored_edit_is_kept(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(1, 4)]), ALPHA)
    with vla.edit(inplace=True) as tracer:
        for _ in tracer.iter[:7]:
            vla.layers[3].mlp.act.output[..., 11] = -2.0
    mine = list(vla._edits)
    try:
        with steer.apply(vla):
            assert len(vla._edits) == 2
            both, _ = capture(vla, lambda: predict(vla))
        assert vla._edits == mine  # only our edit was removed
        with hook_reference(vla, {1: [4]}, ALPHA), hook_reference(vla, {3: [11]}, -2.0):
            reference, _ = capture(vla, lambda: predict(vla))
        assert_same_records(both, reference)
    finally:
        vla.clear_edits()


# ---------------------------------------------------------------------------------------------------------------
# (b) inside the user's own trace


def test_edit_in_trace_equals_plain_hooks(vla):
    images, instruction, kwargs = call_args(vla)
    for stack in stacks_of(vla):
        steer = Steering(NeuronSet.for_model(vla, neuron_choice(vla, stack), stack=stack), ALPHA)
        with hook_reference(vla, steer.neurons.by_layer(), ALPHA, stack=stack):
            reference, ref_action = capture(vla, lambda: predict(vla))
        runs = count_forwards(vla, stack, lambda: predict(vla))
        assert forward_count(vla, stack, **kwargs) == runs
        root_forwards = count_forwards(vla, None, lambda: predict(vla))

        def traced_edit():  # noqa: B023 - defined and called within one loop iteration
            torch.manual_seed(0)
            with vla.predict_action(images, instruction, **kwargs) as tracer:
                steer.edit(vla, tracer)  # noqa: B023 - steps from forward_count (OpenVLA: 7)
                result = tracer.result.save()
            return result

        steered, action = capture(vla, traced_edit)
        assert_same_records(steered, reference)
        np.testing.assert_allclose(action, ref_action, rtol=1e-5, atol=1e-6)

        def traced_steps():
            torch.manual_seed(0)
            with vla.predict_action(images, instruction, **kwargs) as tracer:
                for step in tracer.iter[:root_forwards]:  # noqa: B023 - called within its loop iteration
                    steer.edit_step(vla, step)  # noqa: B023
            return None

        per_step, _ = capture(vla, traced_steps)
        assert_same_records(per_step, reference)
    assert vla._edits == []


def test_edit_step_with_reads_in_the_users_loop(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(0, 1), (3, 2), (3, 100)]), ALPHA)
    with hook_reference(vla, steer.neurons.by_layer(), ALPHA):
        reference, _ = capture(vla, lambda: predict(vla))
    images, instruction, kwargs = call_args(vla)
    logits = []
    with vla.predict_action(images, instruction, **kwargs) as tracer:
        for step in tracer.iter[:7]:
            steer.edit_step(vla, step)
            logits.append(vla.lm_head.output.save())
    for got, (_, want) in zip(logits, [r for r in reference if r[0] == "lm_head"], strict=True):
        torch.testing.assert_close(got, want)


def test_group_spanning_stacks(vla):
    """pi0: one steering per stack; the backbone runs once (prefix), the expert on every denoising step."""
    if len(vla.stacks) < 2:
        pytest.skip(f"{vla.family} has one stack")
    members = [Steering(NeuronSet.for_model(vla, neuron_choice(vla, s), stack=s), ALPHA) for s in stacks_of(vla)]
    group = SteeringGroup(members)
    with contextlib.ExitStack() as hooks:
        for steer in members:
            hooks.enter_context(hook_reference(vla, steer.neurons.by_layer(), ALPHA, stack=steer.stack))
        reference, _ = capture(vla, lambda: predict(vla))
    with group.apply(vla) as applied:
        steered, _ = capture(vla, lambda: predict(vla))
    assert_same_records(steered, reference)
    images, instruction, kwargs = call_args(vla)
    assert applied.steered_forwards == {s: forward_count(vla, s, **kwargs) for s in stacks_of(vla)}

    root_forwards = count_forwards(vla, None, lambda: predict(vla))

    def traced_edit():
        torch.manual_seed(0)
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            group.edit(vla, tracer)

    def traced_steps():
        torch.manual_seed(0)
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            for step in tracer.iter[:root_forwards]:
                group.edit_step(vla, step)

    def traced_edit_steps():
        torch.manual_seed(0)
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            group.edit(vla, tracer, steps=root_forwards)  # the prefix-only backbone still gets one step

    for fn in (traced_edit, traced_steps, traced_edit_steps):
        got, _ = capture(vla, fn)
        assert_same_records(got, reference)
    assert vla._edits == []


def test_edit_step_prefill_scope(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(2, 5)]), ALPHA, scope="prefill")
    with hook_reference(vla, {2: [5]}, ALPHA, first_only=True):
        reference, _ = capture(vla, lambda: predict(vla))
    images, instruction, kwargs = call_args(vla)

    def traced():
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            for step in tracer.iter[:7]:
                steer.edit_step(vla, step)
                vla.lm_head.output.save()

    steered, _ = capture(vla, traced)
    assert_same_records(steered, reference)


def test_group_merges_same_layer_and_scopes(openvla):
    vla = openvla
    a = Steering(NeuronSet.for_model(vla, [(2, 5), (3, 7)], name="a"), ALPHA)
    b = Steering(NeuronSet.for_model(vla, [(2, 6)], name="b"), -3.0, mode="add", scope="prefill")
    group = SteeringGroup([a, b])
    with group.apply(vla):
        steered, _ = capture(vla, lambda: predict(vla))
    with hook_reference(vla, {2: [5], 3: [7]}, ALPHA), hook_reference(vla, {2: [6]}, -3.0, add=True, first_only=True):
        reference, _ = capture(vla, lambda: predict(vla))
    assert_same_records(steered, reference)
    images, instruction, kwargs = call_args(vla)

    def traced():
        with vla.predict_action(images, instruction, **kwargs) as tracer:
            group.edit(vla, tracer)

    in_trace, _ = capture(vla, traced)
    assert_same_records(in_trace, reference)
    assert SteeringGroup.from_dict(json.loads(json.dumps(group.to_dict()))) == group


# ---------------------------------------------------------------------------------------------------------------
# add vs overwrite, against a hand computation


def test_add_and_overwrite_against_hand_computation(openvla):
    vla = openvla
    layer, neurons = 2, [3, 40, 77]
    down = stack_layers(vla, "backbone")[layer].mlp.down_proj

    def first_forward_io(steer=None):
        seen = {}

        def hook(module, args, output):
            seen.setdefault("x", args[0].detach().clone())
            seen.setdefault("y", output.detach().clone())

        handle = down.register_forward_hook(hook)
        try:
            with steer.apply(vla) if steer else contextlib.nullcontext():
                predict(vla)
        finally:
            handle.remove()
        return seen["x"], seen["y"]

    x0, _ = first_forward_io()
    others = [i for i in range(vla.d_mlp) if i not in neurons]
    pairs = [(layer, n) for n in neurons]
    # overwrite: f(x)_i = alpha exactly, the rest untouched (no earlier layer is steered)
    x, y = first_forward_io(Steering(NeuronSet.for_model(vla, pairs), ALPHA))
    assert torch.all(x[..., neurons] == ALPHA)
    torch.testing.assert_close(x[..., others], x0[..., others])
    torch.testing.assert_close(y, x @ down.weight.T)
    # add with one scale: f(x)_i + alpha * scale
    x, y = first_forward_io(Steering(NeuronSet.for_model(vla, pairs), 2.0, mode="add", scale=1.5))
    torch.testing.assert_close(x[..., neurons], x0[..., neurons] + 3.0)
    torch.testing.assert_close(x[..., others], x0[..., others])
    torch.testing.assert_close(y, x @ down.weight.T)
    # add with per-neuron scales
    scale = {(layer, 3): 1.0, (layer, 40): -2.0, (layer, 77): 0.5}
    x, _ = first_forward_io(Steering(NeuronSet.for_model(vla, pairs), 4.0, mode="add", scale=scale))
    torch.testing.assert_close(x[..., neurons], x0[..., neurons] + torch.tensor([4.0, -8.0, 2.0]))


# ---------------------------------------------------------------------------------------------------------------
# (c) TransformerLens


def backbone_forward(vla):
    """One forward of the language backbone over token ids, returning logits (what a TL bridge computes)."""
    module = vla._module
    if vla.family == "openvla":
        return lambda ids: module.language_model(input_ids=ids).logits
    if vla.family == "pi0-fast":  # a TL bridge attends causally: token_type_ids = 1
        return lambda ids: module(input_ids=ids, token_type_ids=torch.ones_like(ids)).logits
    if vla.family == "pi0":
        def forward(ids):
            hidden = module.model.vlm(input_ids=ids, token_type_ids=torch.ones_like(ids)).last_hidden_state
            return module.unembed(hidden)
        return forward
    raise NotImplementedError(vla.family)


def test_transformer_lens_hooks_equal_nnsight_edit(vla):
    num_layers, _, d_mlp = vla.stack_dims("backbone")
    steer = Steering(NeuronSet.for_model(vla, [(0, 3), (num_layers - 1, 5), (num_layers - 1, 9)]), 3.0)
    hooks = steer.transformer_lens_hooks(vla)
    assert [name for name, _ in hooks] == ["blocks.0.mlp.hook_post", f"blocks.{num_layers - 1}.mlp.hook_post"]
    bridge = vla.to_transformer_lens()
    ids = torch.tensor([[2, 40, 41, 300, 700, 12]])
    with torch.no_grad():
        tl_logits = bridge.run_with_hooks(ids, fwd_hooks=hooks)
        tl_plain = bridge(ids)
    fn = backbone_forward(vla)
    with vla.trace(ids, fn=fn) as tracer:
        plain = tracer.result.save()
    with vla.trace(ids, fn=fn) as tracer:
        steer.edit(vla, tracer, steps=1)
        edited = tracer.result.save()
    with steer.apply(vla):
        with vla.trace(ids, fn=fn) as tracer:
            applied = tracer.result.save()
    torch.testing.assert_close(tl_plain, plain, rtol=1e-5, atol=1e-5)  # same model on both sides
    torch.testing.assert_close(tl_logits, edited, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tl_logits, applied, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tl_logits, tl_plain)
    # the bridge's widths are checked too
    assert len(steer.transformer_lens_hooks(bridge)) == 2
    with pytest.raises(IndexOutOfRangeError):
        Steering([(0, d_mlp + 5)], 1.0).transformer_lens_hooks(bridge)
    if "expert" in stacks_of(vla):
        with pytest.raises(InputError, match="backbone only"):
            Steering(NeuronSet.for_model(vla, [(0, 1)], stack="expert"), 1.0).transformer_lens_hooks(vla)


# ---------------------------------------------------------------------------------------------------------------
# validation before anything runs, and exception safety


def _forward_counter(vla):
    calls = []
    handle = vla._module.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda v: Steering(NeuronSet.for_model(v, [(1, 3)]), float("nan")), InputError, "alpha must be finite"),
        (lambda v: Steering(NeuronSet.for_model(v, [(1, 3)]), math.inf), InputError, "alpha must be finite"),
        (lambda v: Steering(NeuronSet.for_model(v, [(1, 3)]), "big"), InputError, "alpha must be a number"),
        (lambda v: Steering([(1, -1)], 1.0), IndexOutOfRangeError, "negative index"),
        (lambda v: Steering(NeuronSet((), d_mlp=128, num_layers=4), 1.0), InputError, "is empty"),
        (lambda v: Steering([], 1.0), InputError, "is empty"),
        (lambda v: Steering([(1, 3)], 1.0, mode="replace"), InputError, "unknown steering mode"),
        (lambda v: Steering([(1, 3)], 1.0, scope="decode"), InputError, "unknown steering scope"),
        (lambda v: Steering([(1, 3)], 1.0, stack="vision"), InputError, "unknown stack"),
        (lambda v: Steering([(1, 3)], 1.0, layers="middle"), InputError, "unknown layer subset"),
        (lambda v: Steering([(1, 3)], 1.0, layers=[]), InputError, "empty layer subset"),
        (lambda v: Steering([(1, 3)], 1.0, scale={(1, 3): 2.0}), InputError, "only applies to mode='add'"),
        (lambda v: Steering([(1, 3)], 1.0, scale=-2.0), InputError, "scale must be positive"),
        # beyond the stated bound logits saturate (issue 15: alpha 1e20 decoded token 0 as a normal action)
        (lambda v: Steering([(1, 3)], 1e20), InputError, "the limit is 10000"),
        (lambda v: Steering([(1, 3)], -2e4), InputError, "the limit is 10000"),
        (lambda v: Steering([(1, 3)], 100.0, mode="add", scale=500.0), InputError, "the limit is 10000"),
        (lambda v: Steering([(1, 3)], 1.0, mode="add", scale=float("inf")), InputError, "scale must be finite"),
        (lambda v: Steering([(1, "a")], 1.0), InputError, "pair of ints"),
        (lambda v: Steering(NeuronSet.for_model(v, [(1, 3)]), 1.0, stack="expert"), InputError, "cannot steer another"),
        # a restriction that leaves nothing: caught at construction when the set knows its depth
        (lambda v: Steering(NeuronSet.for_model(v, [(0, 3)]), 1.0, layers="late"), InputError, "no neuron of"),
    ],
)
def test_bad_steering_is_rejected_at_construction(openvla, make, error, message):
    with pytest.raises(error, match=message):
        make(openvla)


@pytest.mark.parametrize(
    "steer, error, message",
    [
        (lambda v: Steering([(1, 128)], 1.0), IndexOutOfRangeError, r"outside the backbone stack.*\(1, 128\)"),
        (lambda v: Steering([(4, 3)], 1.0), IndexOutOfRangeError, r"outside the backbone stack.*\(4, 3\)"),
        (lambda v: Steering(NeuronSet(((1, 3),), d_mlp=256, num_layers=4), 1.0), InputError, "d_mlp=256"),
        (lambda v: Steering(NeuronSet(((1, 3),), d_mlp=128, num_layers=32), 1.0), InputError, "32 layers"),
        (lambda v: Steering([(1, 3)], 1.0, stack="expert"), InputError, "no 'expert' stack"),
        (lambda v: Steering([(0, 3)], 1.0, layers="late"), InputError, "no neuron of"),
        (lambda v: Steering([(1, 3)], 1.0, layers=[9]), IndexOutOfRangeError, "layer 9 is out of range"),
    ],
)
def test_bad_steering_for_the_model_fails_before_anything_runs(openvla, steer, error, message):
    vla = openvla
    steering = steer(vla)
    calls, handle = _forward_counter(vla)
    try:
        with pytest.raises(error, match=message):
            with steering.apply(vla):
                pytest.fail("the block must not run")
        with pytest.raises(error, match=message):
            with vla.predict_action(*call_args(vla)[:2], **call_args(vla)[2]) as tracer:
                steering.edit(vla, tracer)
        with pytest.raises(error, match=message):
            steering.transformer_lens_hooks(vla)
    finally:
        handle.remove()
    assert vla._edits == []
    # the failed trace never reached the model's forward
    assert calls == []


def test_misuse_outside_or_inside_traces(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(1, 3)]), 1.0)
    with pytest.raises(InputError, match="must be called inside a trace"):
        steer.edit(vla, None)
    with pytest.raises(InputError, match="must be called inside a trace"):
        steer.edit_step(vla, 0)
    images, instruction, kwargs = call_args(vla)
    with pytest.raises(InputError, match="cannot be entered inside a trace"):
        with vla.predict_action(images, instruction, **kwargs):
            with steer.apply(vla):
                pass
    with pytest.raises(InputError, match="nnsight_vla model"):
        with steer.apply(torch.nn.Linear(2, 2)):
            pass
    assert vla._edits == []


def test_model_is_clean_after_any_exception(openvla):
    vla = openvla
    reference, _ = capture(vla, lambda: predict(vla))
    steer = Steering(NeuronSet.for_model(vla, [(1, 3), (2, 8)]), ALPHA)
    images, instruction, kwargs = call_args(vla)
    # a bad input raising inside predict_action, mid-run of the stored edit
    with pytest.raises(InputError, match="shape"):
        with steer.apply(vla):
            vla.predict_action(np.zeros((8, 8), np.uint8), instruction, **kwargs)
    # an error raised by the model after a few steered forwards (here: inside the 3rd decode step)
    calls = [0]

    def explode(module, args):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom in forward 3")

    handle = vla._module.language_model.lm_head.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom in forward 3"):
            with steer.apply(vla):
                predict(vla)
    finally:
        handle.remove()
    # a user error inside the with-block, after a steered call
    with pytest.raises(ZeroDivisionError):
        with steer.apply(vla):
            predict(vla)
            raise ZeroDivisionError("division by zero")
    # an error inside the user's own trace body, nested in apply()
    with pytest.raises(KeyError):
        with steer.apply(vla):
            with vla.predict_action(images, instruction, **kwargs):
                vla.layers[1].mlp.act.output.save()
                {}["missing"]
    assert vla._edits == []
    after, _ = capture(vla, lambda: predict(vla))
    assert_same_records(after, reference)
    # and steering still works afterwards
    with steer.apply(vla) as applied:
        predict(vla)
    assert applied.steered_forwards == {"backbone": 7}


# ---------------------------------------------------------------------------------------------------------------
# controls, records, files


def test_random_control_matches_size_and_layers(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(1, 3), (3, 5), (3, 6), (3, 9), (0, 2)], name="fast"), 8.0,
                     layers="late", scope="prefill")
    control = steer.random_control(seed=3)
    steered, random = steer.resolve(vla), control.resolve(vla)
    assert {l: len(n) for l, n in random.by_layer().items()} == {l: len(n) for l, n in steered.by_layer().items()}
    assert not set(random.pairs) & set(steered.pairs)
    assert (control.alpha, control.mode, control.scope, control.layers) == (8.0, "overwrite", "prefill", "late")
    assert control.random_control(0) != steer.random_control(0)
    assert steer.random_control(seed=3) == control  # deterministic in the seed
    with control.apply(vla):
        predict(vla)
    # pairs without widths get them from the model
    assert len(Steering([(1, 3), (2, 4)], 1.0).random_control(0, vla=vla).resolve(vla)) == 2
    with pytest.raises(InputError, match="needs the MLP width"):
        Steering([(1, 3)], 1.0).random_control(0)


def test_to_dict_round_trip_and_condition(openvla):
    vla = openvla
    steer = Steering(NeuronSet.for_model(vla, [(1, 3), (3, 5)], name="up", meta={"k": 10}), 4.0, layers="late",
                     mode="add", scope="prefill", scale={(1, 3): 0.5, (3, 5): 2.0})
    data = json.loads(json.dumps(steer.to_dict()))
    again = Steering.from_dict(data)
    assert again == steer and steering_from_dict(data) == steer
    assert again.resolve(vla).pairs == ((3, 5),)
    group = SteeringGroup([steer, Steering([(0, 1)], 2.0)])
    assert steering_from_dict(json.loads(json.dumps(group.to_dict()))) == group
    condition = Condition("up@a4/late", steering=steer, alpha=4.0, layers="late")
    assert condition.to_dict()["steering"] == steer.to_dict()
    with condition.context(vla):
        assert len(vla._edits) == 1
    assert vla._edits == []
    with pytest.raises(InputError, match="not a steering description"):
        Steering.from_dict({"alpha": 1})


def test_prompt_baseline():
    assert PROMPT_TEMPLATE == "{instruction} {word}"
    assert prompt_baseline("pick up the bowl", "fast") == "pick up the bowl fast"
    assert prompt_baseline(" pick up the bowl ", "up", "move {word}: {instruction}") == "move up: pick up the bowl"
    condition = Condition("p", prompt=PROMPT_TEMPLATE.replace("{word}", "fast"))
    assert condition.instruction("x") == prompt_baseline("x", "fast")
    with pytest.raises(InputError, match="word"):
        prompt_baseline("pick", "")
    with pytest.raises(InputError, match="must contain"):
        prompt_baseline("pick", "fast", "{word} only")


def test_neuron_files(openvla, tmp_path):
    vla = openvla
    # the authors' intervention dictionaries: {name: {flat index: top tokens}}
    authors = tmp_path / "dictionaries.yaml"
    authors.write_text(
        "blank: {}\n\nup_2:\n  261: ['up', 'Up']\n  390: ['high']\n\nslow_1:\n  5: ['slow']\n"
    )
    steer = Steering(authors, 4.0, key="up_2", d_mlp=vla.d_mlp)
    assert steer.neurons.pairs == ((2, 5), (3, 6)) and steer.name == "up_2"
    assert steer.neurons.meta["tokens"]["261"] == ["up", "Up"]
    with steer.apply(vla) as applied:
        predict(vla)
    assert applied.neurons[0].pairs == ((2, 5), (3, 6))
    with pytest.raises(InputError, match="pick one with key="):
        load_neurons(authors, d_mlp=128)
    with pytest.raises(InputError, match="no entry 'fast'"):
        load_neurons(authors, key="fast", d_mlp=128)
    with pytest.raises(InputError, match="pass d_mlp="):
        Steering(authors, 4.0, key="up_2")
    with pytest.raises(InputError, match="is empty"):
        load_neurons(authors, key="blank", d_mlp=128)
    # a bare list of flat indices, and our own format
    flat = tmp_path / "flat.json"
    flat.write_text("[261, 5]")
    assert load_neurons(flat, d_mlp=128).pairs == ((0, 5), (2, 5))
    ours = NeuronSet.for_model(vla, [(1, 2)], name="ours").save(tmp_path / "ours.yaml")
    assert Steering(ours, 1.0).neurons == NeuronSet.for_model(vla, [(1, 2)], name="ours")
    with pytest.raises(InputError, match="does not exist"):
        Steering(tmp_path / "nowhere.yaml", 1.0)
    with pytest.raises(InputError, match="cannot steer another"):
        Steering(ours, 1.0, stack="expert")


def test_apply_on_a_model_loaded_without_weights(openvla, tmp_path):
    """nv.load builds on the meta device and loads weights on the first run: the stored edit survives dispatch."""
    openvla.save_pretrained(tmp_path)
    loaded = nv.load("openvla", str(tmp_path))
    assert not loaded.dispatched
    steer = Steering([(1, 3), (2, 5)], ALPHA)
    with steer.apply(loaded) as applied:
        got = predict(loaded)
    assert loaded.dispatched and applied.steered_forwards == {"backbone": 7}
    with hook_reference(openvla, {1: [3], 2: [5]}, ALPHA):
        want = predict(openvla)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(predict(loaded), predict(openvla))
