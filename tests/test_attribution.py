"""Gradients on the action path: the teacher-forced forward against greedy decoding and the flow's first step,
nnsight's ``.grad`` and the attribution scores against finite differences, and attribution patching against real
activation patching. References are plain PyTorch: forward hooks on the torch modules, no nnsight.

The models are tiny and float64, with RMSNorms kept in float64 (see ``exact_norms``), so finite differences are
exact to ~1e-9 and patching effects are not lost in rounding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.attribution import Attribution, attribute, patching_effect, teacher_forced
from nnsight_vla.errors import IndexOutOfRangeError, InputError
from nnsight_vla.neurons import NeuronSet

INSTRUCTION = "pick up the black bowl"
STATE = np.array([0.3, -0.2, 0.5, 0.1, 0.0, 0.7, -0.4])


@pytest.fixture(scope="module")
def exact_norms():
    """transformers' Llama and Gemma RMSNorms compute in float32 whatever the model's dtype, which leaves a float64
    model float32-rounded: central differences would measure rounding noise (~1e-7) instead of slopes. The same
    formulas without the cast, for this module's models only (restored afterwards)."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    originals = LlamaRMSNorm.forward, GemmaRMSNorm.forward

    def llama(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    def gemma(self, x):
        return self._norm(x) * (1.0 + self.weight)

    LlamaRMSNorm.forward, GemmaRMSNorm.forward = llama, gemma
    yield
    LlamaRMSNorm.forward, GemmaRMSNorm.forward = originals


@pytest.fixture(scope="module")
def openvla(exact_norms):
    return nv.tiny("openvla", seed=0, dtype="float64")


@pytest.fixture(scope="module")
def pi0(exact_norms):
    return nv.tiny("pi0", seed=0, dtype="float64")


@pytest.fixture(scope="module")
def pi0_fast(exact_norms):
    return nv.tiny("pi0-fast", seed=0, dtype="float64")


@pytest.fixture(scope="module")
def cams(images):
    return {"base": images["a"], "wrist": images["b"]}


@pytest.fixture(scope="module")
def forced(openvla, pi0, pi0_fast, images, cams):
    """One teacher-forced forward per family (OpenVLA restricted to action tokens, so 'value' is meaningful)."""
    return {
        "openvla": teacher_forced(openvla, images["a"], INSTRUCTION, restrict_to_action_tokens=True),
        "pi0": teacher_forced(pi0, cams, INSTRUCTION, STATE, seed=3),
        "pi0-fast": teacher_forced(pi0_fast, cams, INSTRUCTION, STATE),
    }


def act_module(vla, stack, layer):
    """The torch module behind ``vla.<stack>[layer].mlp.act`` (its output is the MLP post-activation)."""
    return vla._module.get_submodule(vla.stack(stack).path)[layer].mlp.act


def plain_objective(case, target, stack="backbone", edit=None):
    """The objective from a plain forward of the teacher-forced inputs; ``edit(layer) -> fn(out)`` patches acts."""
    handles = []
    if edit is not None:
        for layer, fn in edit.items():
            module = act_module(case.vla, stack, layer)
            handles.append(module.register_forward_hook(lambda m, a, o, fn=fn: fn(o.clone())))
    try:
        with torch.no_grad():
            out = case.vla._module(**case.inputs)
        return float(case.objective(out, **target))
    finally:
        for handle in handles:
            handle.remove()


def outputs_per_call(module, fn):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen


# -- the teacher-forced forward is the forward(s) that make the action ------------------------------------------


@pytest.mark.parametrize("family", ["openvla", "pi0-fast"])
def test_teacher_forcing_reproduces_every_decode_step(forced, images, cams, family):
    """The one forward's last n positions carry the logits and activations of predict_action's n forwards."""
    case = forced[family]
    vla = case.vla
    obs = (images["a"], INSTRUCTION, None) if family == "openvla" else (cams, INSTRUCTION, STATE)
    kwargs = {"restrict_to_action_tokens": True} if family == "openvla" else {}
    head = vla._module.get_submodule(vla.lm_head_path)
    act = act_module(vla, "backbone", 1)
    steps_act = []
    handle = act.register_forward_hook(lambda m, a, o: steps_act.append(o.detach().clone()))
    try:
        steps = outputs_per_call(head, lambda: vla.predict_action(*obs, **kwargs))
    finally:
        handle.remove()
    n = len(case.tokens)
    assert len(steps) == n
    whole_act = outputs_per_call(act, lambda: vla._module(**case.inputs))[0]
    with torch.no_grad():
        logits = vla._module(**case.inputs).logits
    for k in range(n):
        torch.testing.assert_close(logits[0, case.positions[k]], steps[k][0, -1], rtol=1e-9, atol=1e-9)
    if family == "pi0-fast":  # greedy: each generated token is the argmax at its position
        np.testing.assert_array_equal(logits[0, case.positions].argmax(-1).numpy(), case.tokens)
    # prefill positions, then one position per decode step: the same activations
    torch.testing.assert_close(whole_act, torch.cat(steps_act, dim=1), rtol=1e-9, atol=1e-9)
    if family == "openvla":  # greedy over the action tokens picked exactly these ids
        ids = torch.as_tensor(vla.action_token_ids)
        picked = ids[logits[0, case.positions][:, ids].argmax(-1)]
        np.testing.assert_array_equal(picked.numpy(), case.tokens)


def test_pi0_forward_is_the_first_denoising_step(forced, cams, pi0):
    """pi0's forward is predict_action's step 0: with one Euler step the action is x - 1 * velocity."""
    case = forced["pi0"]
    with torch.no_grad():
        velocity = pi0._module(**case.inputs).logits[0]
    normalised = pi0.predict_action(cams, INSTRUCTION, STATE, seed=3, num_steps=1, unnormalize=False)
    expected = (case.noise[0] - velocity)[:, : pi0.action_dim].numpy()
    np.testing.assert_allclose(normalised, expected, rtol=0, atol=1e-6)  # predict_action returns float32
    action = pi0.predict_action(cams, INSTRUCTION, STATE, seed=3, num_steps=1)
    with torch.no_grad():
        out = pi0._module(**case.inputs)
    for dim in (0, 4):
        assert float(case.objective(out, "action", dim=dim)) == pytest.approx(action[:, dim].mean(), abs=1e-6)
        assert float(case.objective(out, "action", dim=dim, horizon=2)) == pytest.approx(action[2, dim], abs=1e-6)
    assert float(case.objective(out, "velocity", dim=[1, 2], horizon=0)) == pytest.approx(
        float(velocity[0, 1] + velocity[0, 2]), abs=1e-12)


def test_openvla_objectives_by_hand(forced, openvla):
    """value = expected bin centre under the softmax over the 256 action tokens; action = its un-normalisation."""
    case = forced["openvla"]
    with torch.no_grad():
        logits = openvla._module(**case.inputs).logits[0].numpy()
    ids = openvla.action_token_ids
    stats = next(iter(openvla.bins.norm_stats.values()))["action"]
    for dim in (0, 3, 6):
        row = logits[case.positions[dim]]
        probs = np.exp(row[ids] - row[ids].max())
        probs /= probs.sum()
        # token id t decodes to bin centre centers[vocab - t - 1] (the published formula, clipped at the end)
        centers = openvla.bins.centers[np.clip(openvla.bins.vocab - ids - 1, 0, len(openvla.bins.centers) - 1)]
        value = float(probs @ centers)
        low, high = stats["q01"][dim], stats["q99"][dim]
        action = 0.5 * (value + 1) * (high - low) + low if stats.get("mask", [True] * 7)[dim] else value
        logprob = row[case.tokens[dim]] - np.log(np.exp(row - row.max()).sum()) - row.max()
        out = torch.as_tensor(logits[None])
        assert float(case.objective(out, "value", dim=dim)) == pytest.approx(value, abs=1e-12)
        assert float(case.objective(out, "action", dim=dim)) == pytest.approx(action, abs=1e-12)
        assert float(case.objective(out, "logit", token=dim)) == pytest.approx(row[case.tokens[dim]], abs=1e-12)
        assert float(case.objective(out, "logprob", dim=dim)) == pytest.approx(logprob, abs=1e-10)
    both = float(case.objective(torch.as_tensor(logits[None]), "value", dim=[0, 3]))
    assert both == pytest.approx(sum(float(case.objective(torch.as_tensor(logits[None]), "value", dim=d))
                                     for d in (0, 3)), abs=1e-12)


# -- nnsight's .grad in the trace and the scores, against finite differences --------------------------------------

FD_CASES = [
    ("openvla", "backbone", 2, {"kind": "value", "dim": 2}),
    ("openvla", "backbone", 0, {"kind": "logit", "token": 5}),
    ("pi0", "backbone", 0, {"kind": "action", "dim": 1}),
    ("pi0", "expert", 1, {"kind": "velocity", "dim": 3, "horizon": 2}),
    ("pi0-fast", "backbone", 1, {"kind": "logprob", "token": 2}),
]


@pytest.mark.parametrize("family,stack,layer,target", FD_CASES)
def test_trace_grad_equals_finite_differences(forced, family, stack, layer, target):
    """``with y.backward(): g = act.grad.save()`` inside ``forced.trace()`` is dy/da, element by element."""
    case = forced[family]
    vla = case.vla
    layers = getattr(vla, vla.stack(stack).attr)
    with case.trace():
        act = layers[layer].mlp.act.output
        y = case.objective(vla.output, **target)
        with y.backward():
            grad = act.grad.save()
        value = float(y.detach()).save()
    assert value == pytest.approx(plain_objective(case, target), abs=1e-12)
    length, width = grad.shape[1:]
    h = 1e-5
    for pos, neuron in [(length - 1, 3), (length - 3, width - 5), (length // 2, width // 2 + 13), (0, width - 1)]:

        def bump(delta, pos=pos, neuron=neuron):
            def fn(out):
                out[0, pos, neuron] += delta
                return out
            return {layer: fn}

        fd = (plain_objective(case, target, stack, bump(h)) - plain_objective(case, target, stack, bump(-h))) / (2 * h)
        assert float(grad[0, pos, neuron]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("family,stack,layer,target", FD_CASES)
def test_scores_are_the_derivative_of_scaling_each_neuron(forced, family, stack, layer, target):
    """score(n) = sum_p a_p dy/da_p = d/ds y(a_n -> s * a_n at every position) at s = 1 (central differences)."""
    case = forced[family]
    result = attribute(case, stack=stack, layers=[layer], **target)
    assert result.scores.shape == (1, case.vla.stack_dims(stack)[2])
    assert result.value == pytest.approx(plain_objective(case, target), abs=1e-12)
    h = 1e-5
    top = [n for _, n in result.ranking()[:3]]
    for neuron in top + [11, result.d_mlp - 1]:

        def scale(s, neuron=neuron):
            def fn(out):
                out[..., neuron] *= s
                return out
            return {layer: fn}

        fd = (plain_objective(case, target, stack, scale(1 + h)) - plain_objective(case, target, stack, scale(1 - h)))
        fd /= 2 * h
        scale_of = np.abs(result.scores).max()
        assert result.score(layer, neuron) == pytest.approx(fd, rel=1e-5, abs=1e-7 * scale_of)


# -- attribution patching approximates real patching --------------------------------------------------------------


@pytest.mark.parametrize("family,stack,target", [
    ("openvla", "backbone", {"kind": "value", "dim": 1}),
    ("pi0", "backbone", {"kind": "action", "dim": 0}),
    ("pi0", "expert", {"kind": "action", "dim": 5}),
    ("pi0-fast", "backbone", {"kind": "logprob", "token": 0}),
])
@pytest.mark.parametrize("with_reference", [False, True])
def test_attribution_patching_approximates_real_patching(forced, family, stack, target, with_reference):
    """Patching one neuron (to 0, or to a reference r) at every position: the real change vs the estimate.

    Along phi(s) = y(a + s (r - a)), attribution patching is -phi'(0) and real patching phi(0) - phi(1); by Taylor's
    theorem (Lagrange remainder) their gap is -phi''(xi) / 2 for some xi in [0, 1]. That is checked exactly for the
    top neurons, with phi'' from finite differences on a grid along the path (10 % slack for its sampling). What it
    implies on these tiny models (effects close to linear) is checked over the top 6 and 6 random neurons: Pearson
    r >= 0.95 (measured 0.975-0.9999) and the same sign wherever the real effect is >= 10 % of the largest."""
    case = forced[family]
    vla = case.vla
    num_layers, _, d_mlp = vla.stack_dims(stack)
    rng = np.random.default_rng(7)
    reference = None
    if with_reference:
        reference = {layer: rng.normal(0.0, 0.05, d_mlp) for layer in range(num_layers)}
    result = attribute(case, stack=stack, reference=reference, **target)
    picked = result.ranking()[:6]
    picked += [(int(rng.integers(num_layers)), int(rng.integers(d_mlp))) for _ in range(6)]
    estimate = np.array([result.score(*pair) for pair in picked])

    def patch_to(layer, neuron, s):
        """Move the neuron a fraction s of the way to its patch value, at every position (plain hook)."""
        def fn(out):
            r = 0.0 if reference is None else float(reference[layer][neuron])
            out[..., neuron] = out[..., neuron] + s * (r - out[..., neuron])
            return out
        return {layer: fn}

    clean = plain_objective(case, target)
    real = np.array([clean - plain_objective(case, target, stack, patch_to(l, n, 1.0)) for l, n in picked])
    # the library's own patching (nnsight edits) is the same measurement
    np.testing.assert_allclose(patching_effect(case, picked, stack=stack, reference=reference, **target), real,
                               rtol=1e-9, atol=1e-12)
    big = np.abs(real) >= 0.1 * np.abs(real).max()
    assert np.corrcoef(estimate, real)[0, 1] >= 0.95
    assert big.sum() >= 3
    np.testing.assert_array_equal(np.sign(estimate[big]), np.sign(real[big]))
    h = 0.125
    grid = np.arange(-1, 10) * h
    for (layer, neuron), est, got in list(zip(picked, estimate, real))[:2]:
        phi = np.array([plain_objective(case, target, stack, patch_to(layer, neuron, s)) for s in grid])
        curvature = (phi[:-2] - 2 * phi[1:-1] + phi[2:]) / h**2  # phi'' at s = 0, 1/8, ..., 1
        remainder = -2 * (got - est)  # = phi''(xi) for some xi in [0, 1]
        slack = 0.1 * np.ptp(curvature) + 1e-9 * np.abs(real).max()
        assert curvature.min() - slack <= remainder <= curvature.max() + slack


def test_pi0_last_backbone_layer_does_not_reach_the_action(forced, pi0):
    """The expert reads the backbone's keys and values, made from each layer's input: the last backbone MLP is
    off the action path (its scores are 0 and patching it changes nothing)."""
    case = forced["pi0"]
    last = pi0.num_layers - 1
    result = attribute(case, kind="action", dim=0)
    assert np.all(result.scores[result.layers.index(last)] == 0)
    assert np.any(result.scores[result.layers.index(0)] != 0)
    assert np.all(patching_effect(case, [(last, 5), (last, 60)], kind="action", dim=0) == 0)


# -- the result types, side effects and errors -------------------------------------------------------------------


def test_ranking_table_and_neuron_set(forced, openvla):
    result = attribute(forced["openvla"], dim=0, layers=[1, 3])
    assert isinstance(result, Attribution) and result.layers == (1, 3)
    table = result.table()
    assert len(table) == 2 * openvla.d_mlp and list(table["rank"][:3]) == [1, 2, 3]
    assert np.all(np.diff(np.abs(table["score"].to_numpy())) <= 0)
    top = result.top(5)
    assert isinstance(top, NeuronSet) and len(top) == 5 and top.stack == "backbone" and top.d_mlp == openvla.d_mlp
    assert [tuple(p) for p in top.meta["ranking"]] == result.ranking()[:5]
    assert top.meta["target"]["kind"] == "value"
    positive, negative = result.ranking("positive")[0], result.ranking("negative")[0]
    assert result.score(*positive) == result.scores.max() and result.score(*negative) == result.scores.min()
    top.validate(openvla)


def test_positions_split_the_sum(forced):
    case = forced["openvla"]
    whole = attribute(case, dim=4, layers=[2])
    with torch.no_grad():
        length = case.vla._module(**case.inputs).logits.shape[1]
    head = attribute(case, dim=4, layers=[2], positions=np.arange(0, length - 7))
    tail = attribute(case, dim=4, layers=[2], positions=case.positions)
    np.testing.assert_allclose(head.scores + tail.scores, whole.scores, rtol=1e-9, atol=1e-15)


def test_traces_leave_the_weights_alone(forced, pi0):
    case = forced["pi0"]
    attribute(case, stack="expert")
    with case.trace():
        act = pi0.expert_layers[0].mlp.act.output
        y = case.objective(pi0.output)
        with y.backward():
            grad = act.grad.save()
    assert grad.abs().sum() > 0
    params = list(pi0._module.parameters())
    assert all(p.requires_grad for p in params) and all(p.grad is None for p in params)


def test_pi0_fast_action_tokens_and_explicit_tokens(pi0_fast, cams):
    ids = pi0_fast.action_token_ids
    marker = pi0_fast.tokenizer("Action: ", add_special_tokens=False).input_ids
    tokens = [*marker, int(ids[3]), int(ids[40]), int(ids[7]), pi0_fast.tokenizer.eos_token_id]
    case = teacher_forced(pi0_fast, cams, INSTRUCTION, STATE, tokens=tokens)
    np.testing.assert_array_equal(case.action_tokens, np.arange(len(marker), len(marker) + 3))
    prefix = pi0_fast.prepare(cams, INSTRUCTION, STATE)["input_ids"].shape[1]
    assert case.inputs["input_ids"].shape[1] == prefix + len(tokens) - 1
    result = attribute(case, token=case.action_tokens)
    assert result.target["kind"] == "logprob" and np.abs(result.scores).max() > 0


def test_errors(forced, openvla, pi0, images, cams):
    case = forced["openvla"]
    with pytest.raises(InputError, match="velocity"):
        attribute(case, kind="velocity")
    with pytest.raises(IndexOutOfRangeError, match="out of range"):
        attribute(case, dim=7)
    with pytest.raises(InputError, match="horizon"):
        attribute(case, horizon=1)
    with pytest.raises(InputError, match="not both"):
        attribute(case, dim=1, token=1)
    with pytest.raises(InputError, match="token="):
        attribute(forced["pi0-fast"], dim=1)
    with pytest.raises(InputError, match="dim="):
        attribute(forced["pi0"], token=1)
    with pytest.raises(IndexOutOfRangeError, match="horizon"):
        attribute(forced["pi0"], horizon=5)
    with pytest.raises(InputError, match="no robot state"):
        teacher_forced(openvla, images["a"], INSTRUCTION, STATE)
    with pytest.raises(InputError, match="takes the options"):
        teacher_forced(openvla, images["a"], INSTRUCTION, seed=1)
    with pytest.raises(InputError, match="generates no tokens"):
        teacher_forced(pi0, cams, INSTRUCTION, STATE, tokens=[1, 2])
    with pytest.raises(InputError, match="time"):
        teacher_forced(pi0, cams, INSTRUCTION, STATE, time=0.0)
    with pytest.raises(IndexOutOfRangeError, match="token ids"):
        teacher_forced(openvla, images["a"], INSTRUCTION, tokens=[1, 10**6])
    with pytest.raises(InputError, match="reference has no entry"):
        attribute(case, layers=[0, 1], reference={0: np.zeros(openvla.d_mlp)})
    with pytest.raises(IndexOutOfRangeError, match="d_mlp"):
        patching_effect(case, [(0, openvla.d_mlp)])
    with pytest.raises(InputError, match="positive integer"):
        attribute(case, layers=[0]).top(0)
