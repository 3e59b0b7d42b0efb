"""pi0-FAST on transformers' PaliGemmaForConditionalGeneration: the FAST id layout, openpi's prompt, traced edits
vs plain hooks on every forward, prefill-only steering, FAST decoding with its fallback, checkpoints (PaliGemma
format + fast_tokenizer/), TransformerLens, bad input."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.errors import CheckpointError, InputError
from nnsight_vla.models.fast_tokenizer import FastActionTokenizer, FastDecodeError

INSTRUCTION = "Pick_up the black bowl"
STATE = np.array([0.3, -0.2, 0.5, 0.1, 0.0, 0.7, -0.4])


@pytest.fixture(scope="module")
def vla():
    return nv.tiny("pi0-fast", seed=0)


@pytest.fixture(scope="module")
def cams(images):
    return {"base": images["a"], "wrist": images["b"]}


def capture(module, fn):
    seen = []
    handle = module.register_forward_hook(lambda m, a, o: seen.append(o.detach().clone()))
    try:
        result = fn()
    finally:
        handle.remove()
    return seen, result


def pre_hook(module, neurons, alpha, calls=None):
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


def planted_answer(vla, chunk):
    """The ids a trained pi0-FAST writes for ``chunk`` (openpi's postfix): "Action: " + FAST ids + "|" + <eos>."""
    tok = vla.tokenizer
    fast = vla.action_tokenizer.encode(chunk)
    vocab = vla.vlm_vocab_size
    mapped = [vocab - 1 - 128 - t for t in fast]  # the paper's formula, written out independently
    marker = tok("Action: ", add_special_tokens=False).input_ids
    return marker + mapped + tok("|", add_special_tokens=False).input_ids + [tok.eos_token_id]


def test_uniform_tree_and_vocabulary_layout(vla):
    assert vla.family == "pi0-fast"
    assert vla.stack_dims() == (2, 64, 128) and len(vla.layers) == 2
    assert vla.vlm_vocab_size == 1024 and vla.vocab_size == 1088  # embedding padded by 64, like PaliGemma's 257216
    tok = vla.tokenizer
    assert tok.convert_ids_to_tokens(1023) == "<seg127>" and tok.convert_ids_to_tokens(1024) == "<image>"
    assert tok.convert_ids_to_tokens(895) == "<loc0255>"  # just below the 128 special <seg> ids
    n_fast = vla.action_tokenizer.fast_vocab_size
    expected = sorted(1024 - 1 - 128 - t for t in range(n_fast))
    np.testing.assert_array_equal(vla.action_token_ids, expected)
    assert all(t.startswith("<loc") for t in tok.convert_ids_to_tokens(vla.action_token_ids.tolist()))
    # PaliGemma's lm_head is tied to the input embedding
    assert vla.unembedding().data_ptr() == vla.input_embeddings().data_ptr()
    with pytest.raises(InputError, match="no 'expert' stack"):
        vla.stack_dims("expert")


def test_prompt_is_openpis(vla, cams):
    q01 = np.array(vla.norm_stats["state"]["q01"])
    q99 = np.array(vla.norm_stats["state"]["q99"])
    normalised = (STATE - q01) / (q99 - q01 + 1e-6) * 2 - 1
    bins = np.floor((normalised + 1) / 2 * 256).astype(int)  # 256 equal bins over [-1, 1)
    expected = f"Task: pick up the black bowl, State: {' '.join(map(str, bins))};\n"
    assert vla.prompt(INSTRUCTION, STATE) == expected
    inputs = vla.prepare(cams, INSTRUCTION, STATE)
    ids = inputs["input_ids"][0].tolist()
    n_image = 2 * (32 // 8) ** 2
    assert ids[:n_image] == [vla.config.image_token_id] * n_image and ids[n_image] == vla.tokenizer.bos_token_id
    assert vla.tokenizer.decode(ids[n_image + 1:]) == expected
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    assert (inputs["token_type_ids"] == 0).all()  # the whole prefix attends bidirectionally


def test_traced_edit_equals_plain_hook_on_every_forward(vla, cams):
    m, layer, neurons, alpha = vla._module, 1, [3, 7, 100], 5.0
    n = vla.forward_count()
    traced = []
    with vla.predict_action(cams, INSTRUCTION, STATE, stop_at_eos=False) as tracer:
        for _ in tracer.iter[:n]:
            vla.layers[layer].mlp.act.output[..., neurons] = alpha
            traced.append(vla.lm_head.output.save())
    h = pre_hook(m.model.language_model.layers[layer].mlp.down_proj, neurons, alpha)
    try:
        reference, ref_tokens = capture(
            m.lm_head, lambda: vla.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False)
        )
    finally:
        h.remove()
    plain, plain_tokens = capture(m.lm_head, lambda: vla.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False))
    assert len(traced) == len(reference) == n == 12  # prefill + 11 cached forwards
    for got, want in zip(traced, reference):
        torch.testing.assert_close(got, want)
    assert not torch.allclose(reference[0], plain[0]), "the edit must change the logits"
    again, _ = capture(m.lm_head, lambda: vla.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False))
    for got, want in zip(again, plain):
        torch.testing.assert_close(got, want)  # clean after the trace


def test_prefill_only_vs_every_forward(vla, cams):
    """Prefill-only steering (the authors' pi0-FAST setting) == a hook on the first forward only; it differs from
    every-forward steering from the second forward on."""
    m, layer, neurons, alpha = vla._module, 0, [1, 2, 50], 8.0
    down = m.model.language_model.layers[layer].mlp.down_proj
    with vla.predict_action(cams, INSTRUCTION, STATE, stop_at_eos=False) as tracer:
        vla.layers[layer].mlp.act.output[..., neurons] = alpha  # no tracer.iter: the first forward only
    prefill_tokens = vla.last_decode.token_ids
    prefill, every = [], []
    with vla.predict_action(cams, INSTRUCTION, STATE, stop_at_eos=False) as tracer:
        for step in tracer.iter[:12]:
            if step == 0:
                vla.layers[layer].mlp.act.output[..., neurons] = alpha
            prefill.append(vla.lm_head.output.save())
    with vla.predict_action(cams, INSTRUCTION, STATE, stop_at_eos=False) as tracer:
        for _step in tracer.iter[:12]:
            vla.layers[layer].mlp.act.output[..., neurons] = alpha
            every.append(vla.lm_head.output.save())
    h = pre_hook(down, neurons, alpha, calls={0})
    try:
        reference, ref_tokens = capture(
            m.lm_head, lambda: vla.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False)
        )
    finally:
        h.remove()
    np.testing.assert_array_equal(prefill_tokens, ref_tokens)
    for got, want in zip(prefill, reference):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(prefill[0], every[0])  # the prefill is edited the same way
    assert all(not torch.allclose(a, b) for a, b in zip(prefill[1:], every[1:]))


def test_forward_count(vla, cams):
    m = vla._module
    assert vla.forward_count() == vla.max_new_tokens == 12 and vla.forward_count(max_new_tokens=4) == 4
    assert vla.stack_forwards("backbone", max_new_tokens=3) == [0, 1, 2]
    calls, tokens = capture(m.lm_head, lambda: vla.generate_tokens(cams, INSTRUCTION, STATE, max_new_tokens=5))
    assert len(calls) == len(tokens) <= vla.forward_count(max_new_tokens=5)


def test_planted_tokens_decode_end_to_end(vla, cams, caplog):
    """Force the answer a trained model would write (through lm_head, with nnsight): the chunk comes back."""
    rng = np.random.default_rng(1)
    chunk = np.clip(np.cumsum(rng.normal(0, 0.1, (8, 7)), axis=0), -1, 1)
    plan = planted_answer(vla, chunk)
    with vla.predict_action(cams, INSTRUCTION, STATE, max_new_tokens=len(plan) + 10) as tracer:
        for step in tracer.iter[: len(plan)]:
            vla.lm_head.output[0, -1, plan[step]] = 1e4
        actions = tracer.result.save()
    assert vla.last_decode.valid and vla.last_decode.token_ids.tolist() == plan  # stopped at <eos>
    # FAST round trip is exact up to its quantisation; un-normalise with openpi's quantile formula
    normalised = vla.action_tokenizer.decode(vla.action_tokenizer.encode(chunk))
    assert np.abs(normalised - chunk).max() < 0.1
    q01 = np.array(vla.norm_stats["actions"]["q01"])
    q99 = np.array(vla.norm_stats["actions"]["q99"])
    np.testing.assert_allclose(actions, (normalised + 1) / 2 * (q99 - q01 + 1e-6) + q01, rtol=1e-6, atol=1e-9)
    assert actions.shape == (8, 7)


@pytest.mark.parametrize("case", ["no-marker", "foreign-token", "truncated", "padding-row"])
def test_undecodable_sequences_fall_back(vla, case, caplog):
    rng = np.random.default_rng(2)
    plan = planted_answer(vla, np.clip(np.cumsum(rng.normal(0, 0.1, (8, 7)), axis=0), -1, 1))
    marker = len(vla.tokenizer("Action: ", add_special_tokens=False).input_ids)
    if case == "no-marker":
        ids = plan[marker:]
    elif case == "foreign-token":
        ids = plan[: marker + 2] + [40] + plan[marker + 2:]
    elif case == "truncated":
        ids = plan[: marker + 3] + plan[-2:]  # too few coefficients
    else:
        ids = plan[: marker + 2] + [1050] + plan[marker + 2:]  # an embedding padding row, beyond the tokenizer
    with caplog.at_level(logging.WARNING, logger="nnsight_vla.models"):
        decoded = vla.extract_actions(ids)
    assert not decoded.valid and decoded.error
    np.testing.assert_array_equal(decoded.actions, np.zeros((8, 7)))
    assert any("do not decode" in r.message or "invalid FAST" in r.message for r in caplog.records)
    with pytest.raises(FastDecodeError):
        vla.extract_actions(ids, strict=True)


def test_random_model_output_gives_the_logged_fallback(vla, cams, caplog):
    with caplog.at_level(logging.WARNING, logger="nnsight_vla.models"):
        actions = vla.predict_action(cams, INSTRUCTION, STATE)
    assert not vla.last_decode.valid
    q01 = np.array(vla.norm_stats["actions"]["q01"])
    q99 = np.array(vla.norm_stats["actions"]["q99"])
    np.testing.assert_allclose(actions, np.broadcast_to((q99 - q01 + 1e-6) / 2 + q01, (8, 7)))  # zeros, un-normalised
    assert any("do not decode" in r.message for r in caplog.records)
    np.testing.assert_array_equal(vla.predict_action(cams, INSTRUCTION, STATE, unnormalize=False), np.zeros((8, 7)))


def test_checkpoint_round_trip(vla, cams, tmp_path):
    vla.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "paligemma"
    fast = json.loads((tmp_path / "fast_tokenizer" / "processor_config.json").read_text())
    assert fast["time_horizon"] == 8 and fast["action_dim"] == 7
    stats = json.loads((tmp_path / "norm_stats.json").read_text())["norm_stats"]
    assert stats["actions"]["q01"] == vla.norm_stats["actions"]["q01"]
    assert json.loads((tmp_path / "generation_config.json").read_text())["max_new_tokens"] == 12
    loaded = nv.load("pi0-fast", str(tmp_path))
    assert not loaded.dispatched
    a = vla.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False)
    b = loaded.generate_tokens(cams, INSTRUCTION, STATE, stop_at_eos=False)
    np.testing.assert_array_equal(a, b)
    ours, theirs = vla._module.state_dict(), loaded._module.state_dict()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], msg=name)
    np.testing.assert_array_equal(loaded.action_token_ids, vla.action_token_ids)
    chunk = np.linspace(-0.5, 0.5, 56).reshape(8, 7)
    assert loaded.action_tokenizer.encode(chunk) == vla.action_tokenizer.encode(chunk)


def test_fast_tokenizer_folder_options(vla, tmp_path, monkeypatch):
    vla.save_pretrained(tmp_path / "ck")
    moved = tmp_path / "fast"
    shutil.move(str(tmp_path / "ck" / "fast_tokenizer"), moved)
    with pytest.raises(CheckpointError, match="no fast_tokenizer/ folder"):
        nv.load("pi0-fast", str(tmp_path / "ck"))
    loaded = nv.load("pi0-fast", str(tmp_path / "ck"), fast_tokenizer=str(moved))
    assert loaded.action_horizon == 8
    # a relative folder travels in the model key as an absolute path (a server's working folder differs)
    monkeypatch.chdir(tmp_path)
    relative = nv.load("pi0-fast", "ck", fast_tokenizer="fast")
    assert str(moved.resolve()) in relative.model_key and '"fast"' not in relative.model_key
    # a universal FAST tokenizer leaves the chunk shape open: it must be given
    config = json.loads((moved / "processor_config.json").read_text())
    config.update(time_horizon=None, action_dim=None)
    (moved / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="action_horizon= and action_dim="):
        nv.load("pi0-fast", str(tmp_path / "ck"), fast_tokenizer=str(moved))
    shaped = nv.load("pi0-fast", str(tmp_path / "ck"), fast_tokenizer=str(moved), action_horizon=8, action_dim=7)
    assert (shaped.action_horizon, shaped.action_dim) == (8, 7)
    assert json.loads(shaped.model_key.split(":", 1)[1])["action_horizon"] == 8
    with pytest.raises(CheckpointError, match="hub"):
        nv.load("pi0-fast", "physical-intelligence/pi0-fast-droid")
    with pytest.raises(CheckpointError, match="holds a 'paligemma' model"):
        nv.load("pi0", str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="does not fit"):
        nv.tiny("pi0-fast", vocab=300, n_loc=44)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(images="drop-wrist"), "missing wrist"),
        (dict(state=np.zeros(3)), "state of dimension 7"),
        (dict(state=[0.0, np.inf, 0, 0, 0, 0, 0]), "NaN or infinite"),
        (dict(state=None), "needs the robot state"),
        (dict(horizon=9), "chunks of 8 actions"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(images="float"), "must be uint8"),
    ],
)
def test_bad_input(vla, cams, change, message):
    kwargs = dict(images=cams, instruction=INSTRUCTION, state=STATE)
    kwargs.update(change)
    if kwargs["images"] == "drop-wrist":
        kwargs["images"] = {"base": cams["base"]}
    elif kwargs["images"] == "float":
        kwargs["images"] = {"base": cams["base"] / 255.0, "wrist": cams["wrist"]}
    with pytest.raises(InputError, match=message):
        vla.predict_action(kwargs.pop("images"), kwargs.pop("instruction"), **kwargs)


def test_horizon_slices_the_chunk(vla, cams):
    full = vla.predict_action(cams, INSTRUCTION, STATE, unnormalize=False, max_new_tokens=2)
    assert vla.predict_action(cams, INSTRUCTION, STATE, unnormalize=False, max_new_tokens=2, horizon=3).shape == (3, 7)
    assert full.shape == (8, 7)


def test_transformer_lens_hook_post_equals_nnsight_edit(vla, cams):
    layer, neurons, alpha = 1, [5, 9], 3.0
    bridge = vla.to_transformer_lens()
    ids = torch.tensor([[2, 40, 41, 300, 700, 12]])

    def overwrite(x, hook):
        x[..., neurons] = alpha
        return x

    for token_type_ids in (torch.ones_like(ids), torch.zeros_like(ids)):  # causal suffix, bidirectional prefix
        with torch.no_grad():
            tl_logits = bridge.run_with_hooks(ids, token_type_ids=token_type_ids,
                                              fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", overwrite)])
            tl_plain = bridge(ids, token_type_ids=token_type_ids)
        with vla.trace(ids, token_type_ids=token_type_ids, fn=vla._module.forward):
            vla.layers[layer].mlp.act.output[..., neurons] = alpha
            nn_logits = vla.lm_head.output.save()
        torch.testing.assert_close(tl_logits, nn_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(tl_logits, tl_plain)
    assert vla.generate_tokens(cams, INSTRUCTION, STATE, max_new_tokens=2).shape == (2,)  # tree untouched


def test_tiny_fast_tokenizer_is_deterministic(vla):
    from nnsight_vla.models.pi0_fast import tiny_fast_tokenizer

    other = tiny_fast_tokenizer()
    assert isinstance(other, FastActionTokenizer)
    chunk = np.linspace(-0.9, 0.9, 56).reshape(8, 7)
    assert other.encode(chunk) == vla.action_tokenizer.encode(chunk)
    assert np.abs(other.decode(other.encode(chunk)) - chunk).max() < 0.1
