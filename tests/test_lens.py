"""The value-vector lens: streamed projection == dense reference, cache hits / invalidation / corruption,
token tables, action share, checkpoint diff, plots, CLI and bad input."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.errors import CheckpointError, IndexOutOfRangeError, InputError
from nnsight_vla.lens import (
    CacheWarning,
    ValueVectorLens,
    checkpoint_diff,
    project_topk,
    weight_fingerprint,
)


def dense_reference(vla, k, rows=None):
    """Full (vocab x d_mlp) logits per layer with one matmul, then topk: the computation the lens streams."""
    unembedding = vla.unembedding().detach().double()
    if rows is not None:
        unembedding = unembedding[:rows]
    ids, scores = [], []
    for layer in range(vla.num_layers):
        logits = unembedding @ vla.value_vectors(layer).detach().double()  # (vocab, d_mlp)
        top = torch.topk(logits, k, dim=0)
        ids.append(top.indices.T.numpy())
        scores.append(top.values.T.numpy())
    return np.stack(ids), np.stack(scores)


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def lens(tiny_openvla, tmp_path_factory):
    return ValueVectorLens(tiny_openvla, k=10, cache_dir=tmp_path_factory.mktemp("lens"), progress=False)


# -- the projection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [7, 128, 1000])
def test_streamed_lens_equals_dense_reference(tiny_openvla, chunk_size):
    vla = tiny_openvla
    lens = ValueVectorLens(vla, k=10, chunk_size=chunk_size, cache_dir=False, progress=False)
    rows = len(vla.tokenizer)  # 1025 tokens; the 63 padding rows of the 1088-row unembedding are left out
    ids, scores = dense_reference(vla, 10, rows)
    assert lens.ids.shape == (vla.num_layers, vla.d_mlp, 10) and lens.vocab_rows == rows
    np.testing.assert_array_equal(lens.ids, ids)
    np.testing.assert_allclose(lens.scores, scores, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(lens.scores, axis=-1) <= 0)  # best first


def test_include_padding_projects_every_row(tiny_openvla):
    lens = ValueVectorLens(tiny_openvla, k=3, cache_dir=False, progress=False, include_padding=True)
    ids, _ = dense_reference(tiny_openvla, 3)
    assert lens.vocab_rows == tiny_openvla.vocab_size == 1088
    np.testing.assert_array_equal(lens.ids, ids)


def test_project_topk_on_random_matrices():
    gen = torch.Generator().manual_seed(0)
    unembedding = torch.randn(300, 24, generator=gen)
    mats = [torch.randn(24, 50, generator=gen) for _ in range(3)]
    ids, scores = project_topk(mats, unembedding, 4, chunk_size=16, device="cpu", progress=False)
    for layer, mat in enumerate(mats):
        top = torch.topk(unembedding.double() @ mat.double(), 4, dim=0)
        np.testing.assert_array_equal(ids[layer], top.indices.T.numpy())
        np.testing.assert_allclose(scores[layer], top.values.T.numpy(), rtol=1e-5, atol=1e-5)
    # bfloat16 weights are projected in float32
    ids16, _ = project_topk([m.bfloat16() for m in mats], unembedding.bfloat16(), 1, device="cpu", progress=False)
    ref = torch.topk(unembedding.bfloat16().float() @ mats[0].bfloat16().float(), 1, dim=0).indices.T.numpy()
    np.testing.assert_array_equal(ids16[0], ref)


# -- tables --------------------------------------------------------------------------------------------------


def test_top_tokens_table(lens, tiny_openvla):
    vla = tiny_openvla
    table = lens.top_tokens(layer=-1, neuron=[0, 5], k=4)
    assert list(table.columns) == ["layer", "neuron", "rank", "token_id", "token", "word", "score", "is_action"]
    assert len(table) == 2 * 4 and set(table.layer) == {vla.num_layers - 1} and set(table.neuron) == {0, 5}
    ref_ids, ref_scores = dense_reference(vla, 4, len(vla.tokenizer))
    row = table[table.neuron == 5].sort_values("rank")
    np.testing.assert_array_equal(row.token_id, ref_ids[-1, 5])
    np.testing.assert_allclose(row.score, ref_scores[-1, 5], rtol=1e-5, atol=1e-6)
    assert list(row.token) == vla.tokenizer.convert_ids_to_tokens([int(i) for i in ref_ids[-1, 5]])
    action = set(int(i) for i in vla.action_token_ids)
    assert list(row.is_action) == [int(i) in action for i in ref_ids[-1, 5]]
    assert len(lens.top_tokens()) == vla.num_layers * vla.d_mlp * lens.k


def test_action_token_share_counts_action_ids(lens, tiny_openvla):
    share = lens.action_token_share()
    ids, _ = dense_reference(tiny_openvla, 10, len(tiny_openvla.tokenizer))
    # tiny tokenizer: action bins are ids 768..1023 (1023 - b for bin b)
    expected = ((ids >= 768) & (ids <= 1023)).mean(axis=(1, 2))
    np.testing.assert_allclose(share.share.to_numpy(), expected)
    assert list(share.layer) == list(range(tiny_openvla.num_layers))
    np.testing.assert_allclose(share.vectors_with_action, ((ids >= 768) & (ids <= 1023)).any(-1).mean(-1))


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_export_round_trip(lens, tmp_path, suffix):
    import pandas as pd

    path = lens.export(tmp_path / f"top{suffix}")
    if suffix == ".parquet":
        back = pd.read_parquet(path)
    elif suffix == ".csv":
        back = pd.read_csv(path, keep_default_na=False)
    else:
        data = json.loads(path.read_text())
        assert data["meta"]["fingerprint"] == lens.fingerprint
        back = pd.DataFrame(data["rows"])
    assert len(back) == lens.ids.size
    np.testing.assert_array_equal(back.token_id.to_numpy(), lens.ids.reshape(-1))
    share = lens.export(tmp_path / f"share{suffix}", table="action_share")
    assert share.exists()


# -- cache ---------------------------------------------------------------------------------------------------


def test_cache_hit_is_identical_and_skips_compute(tiny_openvla, cache, monkeypatch):
    first = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    assert not first.from_cache and first.cache_path.exists()
    sidecar = json.loads(first.cache_path.with_name(first.cache_path.name + ".json").read_text())
    assert sidecar["model_key"] == tiny_openvla.model_key and sidecar["k"] == 10

    def boom(self):
        raise AssertionError("a cache hit must not recompute")

    monkeypatch.setattr(ValueVectorLens, "_project", boom)
    second = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    assert second.from_cache and second.cache_path == first.cache_path
    np.testing.assert_array_equal(second.ids, first.ids)
    np.testing.assert_array_equal(second.scores, first.scores)


def test_cache_is_keyed_by_model_weights_and_k(tiny_openvla, cache):
    base = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    other_k = ValueVectorLens(tiny_openvla, k=5, cache_dir=cache, progress=False)
    assert other_k.cache_path != base.cache_path and not other_k.from_cache
    seed1 = nv.tiny("openvla", seed=1)
    other_seed = ValueVectorLens(seed1, cache_dir=cache, progress=False)
    assert not other_seed.from_cache and other_seed.cache_path != base.cache_path
    # same model key, weights changed in place (a retrained folder): new fingerprint, new entry, fresh results
    before = other_seed.fingerprint
    with torch.no_grad():
        seed1.value_vectors(2)[:, 7] = seed1.unembedding()[100] * 50
    edited = ValueVectorLens(seed1, cache_dir=cache, progress=False)
    assert edited.model_key == other_seed.model_key and edited.fingerprint != before
    assert not edited.from_cache and edited.cache_path != other_seed.cache_path
    assert edited.ids[2, 7, 0] == 100
    np.testing.assert_array_equal(edited.ids, dense_reference(seed1, 10, len(seed1.tokenizer))[0])


def test_weight_fingerprint_is_exact():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 300, generator=gen)
    b = a.clone()
    assert weight_fingerprint([a]) == weight_fingerprint([b])
    b[17, 211] = torch.nextafter(b[17, 211], torch.tensor(10.0))  # one ulp in one weight
    assert weight_fingerprint([a]) != weight_fingerprint([b])
    c = a.clone()
    c[[0, 1]] = c[[1, 0]]  # two rows swapped: same column sums, different sums per row residue mod 3
    assert weight_fingerprint([a]) != weight_fingerprint([c])
    assert weight_fingerprint([a.bfloat16()]) != weight_fingerprint([a])
    assert weight_fingerprint([a.T]) != weight_fingerprint([a])
    assert weight_fingerprint([a[:-1]]) != weight_fingerprint([a[1:]])  # 63 rows: a tail outside the residues
    # exact integer sums: the same digest for a non-contiguous view of the same values
    assert weight_fingerprint([a.T.contiguous().T]) == weight_fingerprint([a])


@pytest.mark.parametrize("damage", ["flip_npz", "truncate_npz", "bad_sidecar", "other_weights"])
def test_corrupt_cache_is_rebuilt(tiny_openvla, cache, damage):
    good = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    path = good.cache_path
    sidecar = path.with_name(path.name + ".json")
    if damage == "flip_npz":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate_npz":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "bad_sidecar":
        sidecar.write_text(sidecar.read_text()[:50])
    else:  # a sidecar that claims other weights (e.g. copied from another checkpoint)
        meta = json.loads(sidecar.read_text())
        meta["fingerprint"] = "0" * 32
        sidecar.write_text(json.dumps(meta))
    with pytest.warns(CacheWarning, match="rebuilding"):
        rebuilt = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    assert not rebuilt.from_cache
    np.testing.assert_array_equal(rebuilt.ids, good.ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        again = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    assert again.from_cache


def test_lens_file_from_another_checkpoint_is_refused(tiny_openvla, tmp_path):
    lens = ValueVectorLens(tiny_openvla, cache_dir=False, progress=False)
    path = lens.save(tmp_path / "lens.npz")
    same = ValueVectorLens.from_file(path, tiny_openvla)
    np.testing.assert_array_equal(same.ids, lens.ids)
    other = nv.tiny("openvla", seed=2)
    with pytest.raises(CheckpointError, match="not computed from this model") as error:
        ValueVectorLens.from_file(path, other)
    assert "fingerprint" in str(error.value) and '"seed": 2' in str(error.value)
    # offline (no model): tables still work from the stored token strings
    offline = ValueVectorLens.from_file(path)
    assert list(offline.top_tokens(0, 3).token) == list(lens.top_tokens(0, 3).token)
    np.testing.assert_allclose(offline.action_token_share().share, lens.action_token_share().share)
    data = bytearray(path.read_bytes())
    data[-30] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        ValueVectorLens.from_file(path)


def _edit_sidecar(path, edit):
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text())
    edit(meta)
    sidecar.write_text(json.dumps(meta))


def _rename_a_token(meta):
    token_id = next(iter(meta["tokens"]))
    meta["tokens"][token_id] = "▁EDITED"


def _drop_an_action_id(meta):
    assert meta["action_ids"], "the tiny OpenVLA flags action tokens"
    meta["action_ids"] = meta["action_ids"][1:]


def _add_an_action_id(meta):
    meta["action_ids"] = sorted({*meta["action_ids"], 0})


@pytest.mark.parametrize("edit", [_rename_a_token, _drop_an_action_id, _add_an_action_id])
def test_lens_file_checksum_covers_tokens_and_action_ids(tiny_openvla, tmp_path, edit):
    """The sidecar's token strings and action ids are what an offline lens (no model) shows and counts: an edited
    one is refused like a flipped array byte, not trusted."""
    lens = ValueVectorLens(tiny_openvla, cache_dir=False, progress=False)
    path = lens.save(tmp_path / "lens.npz")
    ValueVectorLens.from_file(path)  # intact: readable offline
    _edit_sidecar(path, edit)
    with pytest.raises(CheckpointError, match="corrupt.*checksum mismatch"):
        ValueVectorLens.from_file(path)
    with pytest.raises(CheckpointError, match="corrupt.*checksum mismatch"):
        ValueVectorLens.from_file(path, tiny_openvla)


@pytest.mark.parametrize("edit", [_rename_a_token, _drop_an_action_id])
def test_cache_with_edited_sidecar_is_rebuilt(tiny_openvla, cache, edit):
    good = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    _edit_sidecar(good.cache_path, edit)
    with pytest.warns(CacheWarning, match="checksum mismatch.*rebuilding"):
        rebuilt = ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    assert not rebuilt.from_cache
    offline = ValueVectorLens.from_file(rebuilt.cache_path)  # the rewritten pair is whole again
    assert "▁EDITED" not in offline._token_strings.values()
    np.testing.assert_array_equal(offline.action_ids, good.action_ids)


def test_older_cache_version_is_named(tiny_openvla, tmp_path):
    from nnsight_vla.lens_cache import content_sha256

    lens = ValueVectorLens(tiny_openvla, cache_dir=False, progress=False)
    path = lens.save(tmp_path / "lens.npz")

    def as_version_1(meta):
        meta["version"] = 1
        meta["content_sha256"] = content_sha256(lens.ids, lens.scores, meta)  # even with a matching checksum

    _edit_sidecar(path, as_version_1)
    with pytest.raises(CheckpointError, match="version 1; this nnsight-vla reads version 2"):
        ValueVectorLens.from_file(path)


def test_orphan_temp_files_of_killed_writers_are_removed(tiny_openvla, cache):
    """A writer SIGKILLed inside its atomic write leaves its hidden temp file; the next lens that opens the cache
    folder removes it once it is past the grace period (its pid is dead), and leaves a live writer's alone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from nnsight_vla.lens_cache import ORPHAN_GRACE_S

    cache.mkdir(parents=True)
    target = cache / "lens-openvla-backbone-k10-0123456789abcdef0123.npz"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nfrom pathlib import Path\nfrom nnsight_vla import files\n"
         "with files.atomic_path(Path(sys.argv[1])) as tmp:\n"
         "    tmp.write_bytes(b'half a lens'); print('writing', flush=True); time.sleep(120)\n",
         str(target)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout.readline().strip() == "writing"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(30)
    (orphan,) = [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert orphan.name.startswith(f".{target.name}.{writer.pid}-")
    fresh_orphan = cache / f".{target.name}.json.{writer.pid}-1.tmp"  # the same dead writer, just now
    fresh_orphan.write_bytes(b"{")
    live = cache / f".{target.name}.{os.getpid()}-1.tmp"  # a live writer (this process), long at work
    live.write_bytes(b"in progress")
    old = time.time() - ORPHAN_GRACE_S - 60
    for path in (orphan, live):
        os.utime(path, (old, old))
    ValueVectorLens(tiny_openvla, cache_dir=cache, progress=False)
    left = {p.name for p in cache.iterdir()}
    assert orphan.name not in left
    assert fresh_orphan.name in left and live.name in left


def test_split_modules_keep_the_lens_names():
    """lens.py was split (cache I/O, checkpoint diff); every public name still imports from nnsight_vla.lens."""
    from pathlib import Path

    import nnsight_vla.lens as lens_module
    from nnsight_vla import lens_cache, lens_diff

    for name in ("ValueVectorLens", "checkpoint_diff", "CheckpointDiff", "project_topk", "normalize_token",
                 "CacheWarning", "default_cache_dir", "weight_fingerprint", "write_table", "auto_chunk_size",
                 "CACHE_FORMAT", "CACHE_VERSION"):
        assert hasattr(lens_module, name), name
    assert lens_module.CheckpointDiff is lens_diff.CheckpointDiff
    assert lens_module.CacheWarning is lens_cache.CacheWarning
    for module in (lens_module, lens_cache, lens_diff):
        assert len(Path(module.__file__).read_text().splitlines()) <= 600, module.__name__


# -- bad input -----------------------------------------------------------------------------------------------


def test_bad_input(lens, tiny_openvla):
    vla = tiny_openvla
    with pytest.raises(InputError, match="between 1 and the vocabulary size"):
        ValueVectorLens(vla, k=5000, cache_dir=False, progress=False)
    with pytest.raises(InputError, match="k=0"):
        ValueVectorLens(vla, k=0, cache_dir=False, progress=False)
    with pytest.raises(IndexOutOfRangeError, match="layer 4 is out of range"):
        lens.top_tokens(layer=4)
    with pytest.raises(IndexOutOfRangeError, match="neuron 128 is out of range"):
        lens.top_tokens(layer=0, neuron=128)
    with pytest.raises(InputError, match="kept the top 10"):
        lens.top_tokens(layer=0, k=11)
    with pytest.raises(InputError, match="no 'expert' stack"):
        ValueVectorLens(vla, stack="expert", cache_dir=False, progress=False)
    with pytest.raises(InputError, match="unsupported table format"):
        lens.export("x.xlsx")
    with pytest.raises(InputError, match="must end in .npz"):
        lens.save("lens.bin")


# -- checkpoint diff -----------------------------------------------------------------------------------------


def test_checkpoint_diff_finds_planted_fine_tuning(tiny_openvla, tmp_path):
    """A "fine-tune" that rewrites 5 value vectors of layer 3 to promote action tokens: the diff finds exactly
    those vectors, counts their gained action tokens, and sees every other vector unchanged."""
    base = ValueVectorLens(tiny_openvla, cache_dir=False, progress=False)
    tuned_vla = nv.tiny("openvla", seed=0)  # same architecture and weights
    changed = [3, 40, 41, 90, 127]
    action_ids = tuned_vla.action_token_ids[:4]
    with torch.no_grad():
        direction = tuned_vla.unembedding()[torch.as_tensor(action_ids)].sum(0) * 20
        for n in changed:
            tuned_vla.value_vectors(3)[:, n] = direction
    tuned = ValueVectorLens(tuned_vla, cache_dir=False, progress=False)
    diff = checkpoint_diff(base, tuned)
    vec = diff.vectors.set_index(["layer", "neuron"])
    moved = vec[vec.changed > 0]
    assert sorted(moved.index) == [(3, n) for n in changed]
    assert (moved.weight_change > 0).all() and (vec.drop(moved.index).weight_change == 0).all()
    assert (vec.drop(moved.index).kept == 10).all()
    # independent count: tuned top tokens of a changed vector that are action tokens and not in the base top-k
    for n in changed:
        new = set(tuned.ids[3, n]) - set(base.ids[3, n])
        assert vec.loc[(3, n), "gained_action"] == sum(int(t) in set(map(int, tuned_vla.action_token_ids)) for t in new)
        assert set(action_ids) <= set(int(t) for t in tuned.ids[3, n])
    layers = diff.layers.set_index("layer")
    assert layers.loc[3, "gained_action"] > 0 and layers.loc[[0, 1, 2], "vectors_changed"].eq(0).all()
    assert layers.loc[3, "action_share_tuned"] > layers.loc[3, "action_share_base"]
    gained = diff.top_tokens(n=4, layer=3, kind="action")
    assert set(gained.token_id) == set(int(i) for i in action_ids) and (gained.delta == len(changed)).all()
    top = diff.top_vectors(5, by="weight_change")
    assert sorted(zip(top.layer, top.neuron)) == [(3, n) for n in changed]
    written = diff.export(tmp_path / "diff")
    assert all(p.exists() for p in written.values())
    from nnsight_vla.reports.lens_plots import plot_checkpoint_diff

    png = plot_checkpoint_diff(diff, tmp_path / "diff.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_diff_refuses_other_architectures(lens):
    narrow = nv.tiny("openvla", seed=0, text=dict(intermediate_size=64))
    other = ValueVectorLens(narrow, cache_dir=False, progress=False)
    with pytest.raises(InputError, match="different architectures: d_mlp"):
        checkpoint_diff(lens, other)


# -- plots and CLI -------------------------------------------------------------------------------------------


def test_plots(lens, tmp_path):
    from nnsight_vla.reports.lens_plots import plot_action_share, plot_token_table

    for path in (plot_action_share(lens, tmp_path / "share.png"),
                 plot_token_table(lens.top_tokens(3, list(range(8))), tmp_path / "table.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    table = lens.export(tmp_path / "share.parquet", table="action_share")
    assert plot_action_share(table).axes  # a Figure when out is None


# -- other families ------------------------------------------------------------------------------------------


def _tiny_or_skip(family):
    from nnsight_vla.errors import UnknownFamilyError

    try:
        return nv.tiny(family)
    except UnknownFamilyError as error:  # the family module is not part of this installation
        pytest.skip(str(error))


def test_pi0_backbone_has_no_action_tokens_and_the_expert_no_projection():
    vla = _tiny_or_skip("pi0")
    lens = ValueVectorLens(vla, cache_dir=False, progress=False)
    ids, _ = dense_reference(vla, 10, min(vla.vocab_size, len(vla.tokenizer)))
    np.testing.assert_array_equal(lens.ids, ids)
    assert not lens.has_action_tokens and "no action tokens" in lens.action_note
    assert not lens.top_tokens(0).is_action.any()
    with pytest.raises(InputError, match="action-token share is undefined"):
        lens.action_token_share()
    expert_width = vla.stack_dims("expert")[1]
    assert expert_width != vla.d_model
    with pytest.raises(InputError, match=f"no projection onto the vocabulary is defined for the 'expert' stack.*"
                                         f"width is {expert_width}"):
        ValueVectorLens(vla, stack="expert", cache_dir=False, progress=False)


def test_pi0_fast_flags_fast_action_tokens():
    vla = _tiny_or_skip("pi0-fast")
    lens = ValueVectorLens(vla, cache_dir=False, progress=False)
    action = set(int(i) for i in vla.action_token_ids)
    table = lens.top_tokens()
    assert list(table.is_action) == [int(i) in action for i in table.token_id]
    np.testing.assert_allclose(lens.action_token_share().share,
                               np.isin(lens.ids, list(action)).mean(axis=(1, 2)))
