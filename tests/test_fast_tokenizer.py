"""FAST action tokenizer: DCT step, round trips, files, invalid sequences, PaliGemma id mapping.

References are computed here independently of the module: the orthonormal DCT-II is a direct cosine
sum in numpy, token strings are built by hand and encoded with the raw ``tokenizers`` objects.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from nnsight_vla.models.fast_tokenizer import (
    DecodeResult,
    FastActionTokenizer,
    FastDecodeError,
    FastEncodeError,
    action_token_ids,
    chunk_to_coefficients,
    coefficients_to_chunk,
    fast_to_vlm_ids,
    vlm_to_fast_ids,
)
from nnsight_vla.errors import CheckpointError

T, D, SCALE = 16, 7, 10.0
LOGGER = "nnsight_vla.models.fast_tokenizer"


# ---------------------------------------------------------------- independent references


def dct_matrix(n: int) -> np.ndarray:
    """Orthonormal DCT-II as a direct cosine sum: C[k, t] = s_k cos(pi k (2t + 1) / 2n)."""
    k = np.arange(n)[:, None]
    t = np.arange(n)[None, :]
    c = np.cos(np.pi * k * (2 * t + 1) / (2 * n))
    s = np.full((n, 1), np.sqrt(2.0 / n))
    s[0] = np.sqrt(1.0 / n)
    return s * c


def ref_quantised(chunk: np.ndarray, scale: float = SCALE) -> np.ndarray:
    return np.rint(dct_matrix(chunk.shape[0]) @ chunk * scale).astype(np.int64)


def ref_reconstruct(q: np.ndarray, scale: float = SCALE) -> np.ndarray:
    return dct_matrix(q.shape[0]).T @ (q / scale)


def smooth_chunks(rng: np.random.Generator, n: int, t: int = T, d: int = D) -> np.ndarray:
    """Normalised, smooth action chunks: offset + two sinusoids + small noise, within about [-1, 1]."""
    time = np.linspace(0.0, 1.0, t)[None, :, None]
    off = rng.uniform(-0.3, 0.3, (n, 1, d))
    a1, f1 = rng.uniform(0.1, 0.5, (n, 1, d)), rng.uniform(0.2, 1.5, (n, 1, d))
    p1 = rng.uniform(0, 2 * np.pi, (n, 1, d))
    a2, f2 = rng.uniform(0.0, 0.2, (n, 1, d)), rng.uniform(1.5, 3.0, (n, 1, d))
    noise = 0.01 * rng.standard_normal((n, t, d))
    return off + a1 * np.sin(2 * np.pi * f1 * time + p1) + a2 * np.cos(2 * np.pi * f2 * time) + noise


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1234)
    return smooth_chunks(rng, 400), smooth_chunks(rng, 60)


@pytest.fixture(scope="module")
def fast(data):
    train, test = data
    # the margin keeps held-out chunks inside the alphabet, so round trips are pure quantisation
    return FastActionTokenizer.train(train, vocab_size=384, scale=SCALE, coefficient_range=(-60, 60))


# ---------------------------------------------------------------- the numeric steps


def test_dct_matches_direct_cosine_sum():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (13, 3))
    c = dct_matrix(13)
    assert np.allclose(c @ c.T, np.eye(13), atol=1e-12)  # the reference itself is orthonormal
    q = chunk_to_coefficients(x, 7.0)
    assert q.dtype == np.int64 and q.shape == (13, 3)
    np.testing.assert_array_equal(q, np.rint(c @ x * 7.0))
    np.testing.assert_allclose(coefficients_to_chunk(q, 7.0), c.T @ q / 7.0, atol=1e-12)
    # unrounded, the pair is an exact inverse
    np.testing.assert_allclose(coefficients_to_chunk(c @ x * 7.0, 7.0), x, atol=1e-12)


def test_token_string_is_frequency_major(fast, data):
    """The BPE input is chr(q - min_token) of the (T, D) coefficients in C order, as published."""
    x = data[1][0]
    q = ref_quantised(x)
    expected = "".join(chr(int(v) - fast.min_token) for v in q.ravel(order="C"))
    assert fast.tokenizer.decode(fast.encode(x)) == expected
    assert fast.tokenizer.encode(expected).ids == fast.encode(x)


# ---------------------------------------------------------------- round trips


def test_round_trip_equals_reference_quantisation(fast, data):
    _, test = data
    ids = fast.encode_batch(test)
    decoded = fast.decode_batch(ids, T, D)
    assert decoded.shape == (len(test), T, D)
    for x, y in zip(test, decoded):
        np.testing.assert_allclose(y, ref_reconstruct(ref_quantised(x)), atol=1e-12)


def test_round_trip_error_within_quantisation_bound(fast, data):
    """Bound: each coefficient is off by at most 0.5/scale; the inverse DCT is C^T, so
    |err[t]| <= 0.5/scale * sum_k |C[k, t]| <= 0.5/scale * sqrt(T) (Cauchy-Schwarz, unit columns),
    and per dimension ||err||_2 = ||coefficient error||_2 <= 0.5/scale * sqrt(T), i.e. RMS <= 0.5/scale."""
    _, test = data
    err = fast.decode_batch(fast.encode_batch(test), T, D) - test
    tight = 0.5 / SCALE * np.abs(dct_matrix(T)).sum(axis=0).max()
    assert tight <= 0.5 / SCALE * np.sqrt(T) + 1e-12
    assert np.abs(err).max() <= tight + 1e-12
    rms_per_dim = np.sqrt((err**2).mean(axis=1))  # (chunk, dim)
    assert rms_per_dim.max() <= 0.5 / SCALE + 1e-12
    # and it is a real quantiser, not an identity: some error must be present
    assert np.abs(err).max() > 1e-4


def test_compression(fast, data):
    lengths = np.array([len(ids) for ids in fast.encode_batch(data[1])])
    assert lengths.max() < T * D
    assert lengths.mean() < 0.5 * T * D  # smooth chunks compress well (about 4x here)


def test_determinism(data):
    train, test = data
    a = FastActionTokenizer.train(train, vocab_size=384, coefficient_range=(-60, 60))
    b = FastActionTokenizer.train(train, vocab_size=384, coefficient_range=(-60, 60))
    assert a.tokenizer.to_str() == b.tokenizer.to_str()
    assert a.encode_batch(test) == b.encode_batch(test)
    assert a.encode(test[0]) == a.encode(test[0])


def test_torch_inputs(fast, data):
    torch = pytest.importorskip("torch")
    x = data[1][1]
    ids = fast.encode(torch.tensor(x))
    assert ids == fast.encode(x)
    np.testing.assert_allclose(fast.decode(torch.tensor(ids), T, D), fast.decode(ids, T, D))


# ---------------------------------------------------------------- files


def test_save_load_round_trip(fast, data, tmp_path):
    fast.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "processor_config.json").read_text())
    assert cfg["min_token"] == fast.min_token and cfg["scale"] == 10 and cfg["vocab_size"] == 384
    assert cfg["action_dim"] == D and cfg["time_horizon"] == T
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = FastActionTokenizer.from_pretrained(tmp_path)
    assert loaded.encode_batch(data[1]) == fast.encode_batch(data[1])
    ids = fast.encode(data[1][2])
    np.testing.assert_array_equal(loaded.decode(ids), fast.decode(ids))  # T, D from the config
    # the saved BPE is an ordinary transformers tokenizer folder too
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "".join(chr(int(v) - fast.min_token) for v in ref_quantised(data[1][2]).ravel())
    assert hf(text, add_special_tokens=False)["input_ids"] == ids


def _published_style_folder(root, train, *, subfolder=None, shift=200):
    """A folder laid out like physical-intelligence/fast, built with the tokenizers library directly:
    ByteLevel BPE whose initial alphabet is chr(0..range) and processor_config.json with the published
    keys. ``shift`` lowers min_token so characters are >= 128, i.e. multi-byte in UTF-8."""
    q = np.concatenate([ref_quantised(x).ravel() for x in train])
    min_token = int(q.min()) - shift
    strings = ["".join(chr(int(v) - min_token) for v in ref_quantised(x).ravel()) for x in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    span = int(q.max()) - min_token
    tok.train_from_iterator(
        strings,
        trainers.BpeTrainer(vocab_size=600, min_frequency=2, show_progress=False, special_tokens=[],
                            initial_alphabet=[chr(i) for i in range(span + 1)], max_token_length=10000),
    )
    tok_dir = root / subfolder if subfolder else root
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tok_dir / "tokenizer.json"))
    (root / "processor_config.json").write_text(json.dumps({
        "action_dim": None,
        "auto_map": {"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"},
        "min_token": min_token,
        "processor_class": "UniversalActionProcessor",
        "scale": 10,
        "time_horizon": None,
        "vocab_size": 600,
    }))
    return tok, min_token


@pytest.mark.parametrize("subfolder", [None, "bpe_tokenizer"])
def test_loads_published_layout(data, tmp_path, subfolder):
    train, test = data
    raw, min_token = _published_style_folder(tmp_path, train, subfolder=subfolder)
    fast = FastActionTokenizer.from_pretrained(tmp_path)
    assert fast.min_token == min_token and fast.scale == 10 and fast.time_horizon is None
    x = train[5]  # a training chunk: inside this tokenizer's data range
    text = "".join(chr(int(v) - min_token) for v in ref_quantised(x).ravel())
    ids = fast.encode(x)
    assert ids == raw.encode(text).ids
    np.testing.assert_allclose(fast.decode(ids, T, D), ref_reconstruct(ref_quantised(x)), atol=1e-12)
    with pytest.raises(ValueError, match="time_horizon and action_dim"):
        fast.decode(ids)  # the published config leaves both unset


def test_byte_level_cut_mid_character_is_invalid(data, tmp_path, caplog):
    train, _ = data
    raw, _ = _published_style_folder(tmp_path, train)
    fast = FastActionTokenizer.from_pretrained(tmp_path, time_horizon=T, action_dim=D)
    # a token holding a lone UTF-8 lead byte decodes to U+FFFD
    partial = [i for i in range(raw.get_vocab_size()) if "\ufffd" in raw.decode([i])]
    assert partial, "expected lone-lead-byte tokens in a byte-level BPE over multi-byte characters"
    ids = fast.encode(train[0]) + [partial[0]]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = fast.decode_with_info(ids)
    assert not res.valid and "outside the FAST alphabet" in res.error
    np.testing.assert_array_equal(res.actions, np.zeros((T, D)))
    assert "invalid FAST sequence" in caplog.text


def test_trained_byte_level_round_trip(data, tmp_path):
    train, test = data
    fast = FastActionTokenizer.train(train, vocab_size=512, byte_level=True, coefficient_range=(-60, 60))
    fast.save_pretrained(tmp_path)
    loaded = FastActionTokenizer.from_pretrained(tmp_path)
    ids = loaded.encode_batch(test[:10])
    assert ids == fast.encode_batch(test[:10])
    for x, y in zip(test[:10], loaded.decode_batch(ids)):
        np.testing.assert_allclose(y, ref_reconstruct(ref_quantised(x)), atol=1e-12)


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="processor_config"):
        FastActionTokenizer.from_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"scale": 10, "min_token": -5}))
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        FastActionTokenizer.from_pretrained(tmp_path)
    # a hub id that cannot be fetched (no cache, no network allowed) fails with a clear error
    with pytest.raises(CheckpointError, match="hub"):
        FastActionTokenizer.from_pretrained(
            "physical-intelligence/fast", cache_dir=tmp_path / "hub", local_files_only=True
        )


# ---------------------------------------------------------------- invalid sequences


def test_truncated_sequence(fast, data, caplog):
    x = data[1][3]
    ids = fast.encode(x)
    cut = ids[:-2]
    # default: the published behaviour, zeros of the expected shape, logged and flagged
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        res = fast.decode_with_info(cut, T, D)
    assert isinstance(res, DecodeResult)
    assert not res.valid and res.actions.shape == (T, D) and not res.actions.any()
    assert res.expected_coefficients == T * D and 0 < res.n_coefficients < T * D
    assert "expected time_horizon * action_dim" in res.error
    assert "invalid FAST sequence" in caplog.text
    np.testing.assert_array_equal(fast.decode(cut, T, D), np.zeros((T, D)))
    with pytest.raises(FastDecodeError, match="coefficients"):
        fast.decode(cut, T, D, strict=True)
    # relaxed: the missing (highest-frequency) coefficients become zero
    n_kept = len(fast.tokenizer.decode(cut))
    q = ref_quantised(x).ravel()
    q[n_kept:] = 0
    res = fast.decode_with_info(cut, T, D, relaxed=True)
    assert res.valid and res.repaired and res.n_coefficients == n_kept
    np.testing.assert_allclose(res.actions, ref_reconstruct(q.reshape(T, D)), atol=1e-12)


def test_invalid_sequences_fall_back(fast, data, caplog):
    ids = fast.encode(data[1][4])
    n = fast.fast_vocab_size
    cases = {
        "empty": [],
        "negative id": ids[:3] + [-1] + ids[3:],
        "id past the vocab": ids + [n],
        "vlm ids": list(fast.fast_to_vlm_ids(ids)),
        "too long": ids + ids,
    }
    for name, seq in cases.items():
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            res = fast.decode_with_info(seq, T, D)
        assert not res.valid, name
        np.testing.assert_array_equal(res.actions, np.zeros((T, D)), err_msg=name)
        assert res.error and "invalid FAST sequence" in caplog.text, name
        with pytest.raises(FastDecodeError):
            fast.decode(seq, T, D, strict=True)
    assert "vlm_to_fast_ids" in fast.decode_with_info(cases["vlm ids"], T, D).error
    # relaxed repairs counts, not emptiness: nothing decoded is still invalid
    assert not fast.decode_with_info([], T, D, relaxed=True).valid
    # a wrong action_dim that does not divide the count is just another invalid sequence
    assert not fast.decode_with_info(ids, T, D + 1).valid
    # relaxed cuts a too-long sequence back to the first T * D coefficients
    res = fast.decode_with_info(ids + ids, T, D, relaxed=True)
    assert res.valid and res.repaired
    np.testing.assert_allclose(res.actions, fast.decode(ids, T, D), atol=1e-12)
    # batch decode keeps going past invalid rows
    out = fast.decode_batch([ids, [], ids], T, D)
    assert out.shape == (3, T, D) and not out[1].any() and np.array_equal(out[0], out[2])


def test_random_garbage_never_crashes(fast):
    rng = np.random.default_rng(7)
    n = fast.fast_vocab_size
    for _ in range(200):
        seq = rng.integers(-5, n + 5, size=rng.integers(0, 80)).tolist()
        logging.getLogger(LOGGER).disabled = True
        try:
            res = fast.decode_with_info(seq, T, D, relaxed=bool(rng.integers(2)))
        finally:
            logging.getLogger(LOGGER).disabled = False
        assert res.actions.shape == (T, D) and np.isfinite(res.actions).all()


def test_decode_argument_errors(fast):
    with pytest.raises(ValueError, match="one flat sequence"):
        fast.decode([[1, 2], [3, 4]], T, D)
    with pytest.raises(TypeError, match="integers"):
        fast.decode([1.5, 2.0], T, D)
    with pytest.raises(ValueError, match="positive integer"):
        fast.decode([1, 2], 0, D)


# ---------------------------------------------------------------- bad chunks


def test_bad_chunks_raise(fast):
    good = np.zeros((T, D))
    with pytest.raises(FastEncodeError, match="rank 2"):
        fast.encode(np.zeros(T))
    with pytest.raises(FastEncodeError, match="rank 2"):
        fast.encode(np.zeros((1, T, D)))
    with pytest.raises(FastEncodeError, match="action_dim=7"):
        fast.encode(np.zeros((T, D + 1)))
    bad = good.copy()
    bad[3, 2] = np.nan
    with pytest.raises(FastEncodeError, match=r"non-finite.*\(3, 2\)"):
        fast.encode(bad)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError):  # FastEncodeError is a ValueError
        fast.encode(bad)
    with pytest.raises(FastEncodeError, match="batch"):
        fast.encode_batch(good)


def test_far_out_of_range_chunk_is_clipped_with_warning(fast, caplog):
    x = np.full((T, D), 5.0)
    x[:, 0] = -5.0
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ids = fast.encode(x)
    assert "outside what this tokenizer can represent" in caplog.text
    # reference: the quantised coefficients clipped to the trained alphabet [-60, 60]
    q = np.clip(ref_quantised(x), -60, 60)
    assert (fast.min_token, fast.max_token) == (-60, 60)
    np.testing.assert_allclose(fast.decode(ids, T, D), ref_reconstruct(q), atol=1e-12)
    with pytest.raises(FastEncodeError, match="outside what this tokenizer can represent"):
        fast.encode(x, on_out_of_range="raise")


def test_train_errors(data):
    train, _ = data
    with pytest.raises(ValueError, match="vocab_size=32 must be at least"):
        FastActionTokenizer.train(train, vocab_size=32)
    bad = train[:10].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(FastEncodeError, match="NaN"):
        FastActionTokenizer.train(bad, vocab_size=384)
    with pytest.raises(FastEncodeError, match="many chunks"):
        FastActionTokenizer.train(train[0], vocab_size=384)


# ---------------------------------------------------------------- PaliGemma vocabulary mapping


def test_paligemma_id_mapping():
    # hand-computed: 257152 - 1 - 128 - t
    assert fast_to_vlm_ids(0, 257152) == 257023
    assert fast_to_vlm_ids(5, 257152) == 257018
    assert fast_to_vlm_ids(2047, 257152, fast_vocab_size=2048) == 254976
    np.testing.assert_array_equal(fast_to_vlm_ids([0, 1, 2047], 257152), [257023, 257022, 254976])
    assert vlm_to_fast_ids(257023, 257152) == 0
    np.testing.assert_array_equal(vlm_to_fast_ids([254976, 257023], 257152, fast_vocab_size=2048), [2047, 0])
    ids = action_token_ids(257152, 2048)
    assert ids == range(254976, 257024) and len(ids) == 2048
    assert 257023 in ids and 257024 not in ids and 254975 not in ids
    with pytest.raises(ValueError, match="FAST ids"):
        fast_to_vlm_ids(2048, 257152, fast_vocab_size=2048)
    with pytest.raises(ValueError, match="FAST ids"):
        fast_to_vlm_ids(-1, 257152)
    with pytest.raises(ValueError, match="not FAST action tokens"):
        vlm_to_fast_ids(257100, 257152)  # one of the 128 special ids at the end
    with pytest.raises(TypeError):
        fast_to_vlm_ids([0.5], 257152)


def test_mapping_round_trip_through_tokenizer(fast, data):
    torch = pytest.importorskip("torch")
    ids = fast.encode(data[1][0])
    vlm = fast.fast_to_vlm_ids(ids, 257152)
    assert all(v in fast.action_token_ids(257152) for v in vlm)
    assert list(fast.vlm_to_fast_ids(vlm, 257152)) == ids
    tvlm = fast.fast_to_vlm_ids(torch.tensor(ids), 257152)
    assert isinstance(tvlm, torch.Tensor) and tvlm.tolist() == list(vlm)
    # a non-action token from the model (e.g. EOS id 1) decodes to a flagged fallback, not a crash
    raw = fast.vlm_to_fast_ids(np.append(vlm, 1), 257152, check=False)
    assert not fast.decode_with_info(raw, T, D).valid
