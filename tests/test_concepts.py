"""Concept discovery on a tiny model with planted concept neurons: the paper's kNN method and keyword mode
recover exactly the planted (layer, neuron) pairs; opposites, layer subsets, random controls, files, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nnsight_vla as nv
from nnsight_vla.concepts import (
    NeuronSet,
    concept_tokens,
    find_concept,
    find_opposites,
    random_control,
)
from nnsight_vla.errors import IndexOutOfRangeError, InputError
from nnsight_vla.lens import ValueVectorLens

FAST = ["fast", "quick", "rapid", "swift", "hurry", "speed"]
SLOW = ["slow", "slowly", "careful", "gentle", "carefully", "gently"]
PLANTED = {
    "fast": [(1, 5), (1, 77), (2, 30), (2, 64), (3, 11), (3, 100)],
    "slow": [(0, 3), (2, 31), (3, 12), (3, 50)],
}
BOTH = (2, 90)  # promotes two "fast" and two "slow" words: contested between the opposites


def token_id(vla, word):
    ids = vla.tokenizer(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{word!r} must be one token of the tiny tokenizer, got {ids}"
    return ids[0]


def plant(vla, pairs_words, gen):
    """Set each chosen value vector to a positive combination of the unembedding rows of its words, so that
    exactly those words are its top tokens (W_U[t] . w is ~5 for them, ~2-3 at most for other tokens)."""
    unembedding = vla.unembedding()
    with torch.no_grad():
        for (layer, neuron), words in pairs_words:
            ids = [token_id(vla, w) for w in words]
            direction = sum(unembedding[i] / unembedding[i].norm() ** 2 for i in ids)
            vla.value_vectors(layer)[:, neuron] = 5 * direction


@pytest.fixture(scope="module")
def planted():
    """A tiny OpenVLA (d_model 128) with a semantic embedding structure (synonyms near each other) and planted
    concept neurons: each planted vector promotes 3 words of its concept."""
    vla = nv.tiny("openvla", seed=5, text=dict(hidden_size=128))
    gen = torch.Generator().manual_seed(0)
    embeddings = vla.input_embeddings()
    with torch.no_grad():
        for group in (FAST, SLOW):
            ids = [token_id(vla, w) for w in group]
            anchor = embeddings[ids[0]].clone()
            for i in ids[1:]:
                embeddings[i] = anchor + 0.3 * anchor.norm() / 128**0.5 * torch.randn(128, generator=gen)
    rng = np.random.default_rng(0)
    assignments = [(pair, list(rng.choice(group, 3, replace=False)))
                   for concept, group in (("fast", FAST), ("slow", SLOW)) for pair in PLANTED[concept]]
    assignments.append((BOTH, ["quick", "swift", "slowly", "gently"]))
    plant(vla, assignments, gen)
    lens = ValueVectorLens(vla, k=10, cache_dir=False, progress=False)
    # precondition, from the lens tables: each planted vector's top tokens are exactly its words
    for (layer, neuron), words in assignments:
        assert {t.lstrip("▁") for t in lens.vector_tokens(layer, neuron, len(words))} == set(words)
    return vla, lens


def reference_cosines(vla, top=5):
    """Independent reference for the kNN step: dense logits, top-5, softmax-weighted input embeddings, cosine to
    the concept word's embedding, for every value vector (layer, neuron)."""
    emb = vla.input_embeddings().detach().double()
    unembedding = vla.unembedding().detach().double()[: len(vla.tokenizer)]
    concept = emb[token_id(vla, "fast")]
    out = np.zeros((vla.num_layers, vla.d_mlp))
    for layer in range(vla.num_layers):
        logits = (unembedding @ vla.value_vectors(layer).detach().double()).T  # (d_mlp, vocab)
        top_scores, top_ids = torch.topk(logits, top, dim=1)
        z = (torch.softmax(top_scores, dim=1)[..., None] * emb[top_ids]).sum(1)
        out[layer] = torch.nn.functional.cosine_similarity(z, concept[None], dim=1).numpy()
    return out


# -- recovery of planted neurons -----------------------------------------------------------------------------


@pytest.mark.parametrize("k_neighbors", [10, 20, 40])
def test_knn_recovers_exactly_the_planted_neurons(planted, k_neighbors):
    _, lens = planted
    for concept, pairs in PLANTED.items():
        found = find_concept(lens, concept, size=len(pairs), method="knn", k_neighbors=k_neighbors)
        assert found.pairs == tuple(sorted(pairs)), (concept, k_neighbors, found.meta["scores"])
        assert found.meta["method"] == "knn" and found.meta["k_neighbors"] == k_neighbors
        assert found.name == concept and found.num_layers == 4 and found.d_mlp == 128


def test_knn_matches_an_independent_reference(planted):
    vla, lens = planted
    cos = reference_cosines(vla)
    # the paper's single-word anchor, no filter; size == k: the plain kNN neighbourhood
    found = find_concept(lens, "fast", size=6, k_neighbors=6, anchor="word", opposite=None)
    ref = np.argsort(-cos.reshape(-1))[:6]
    assert found.pairs == tuple(sorted(divmod(int(i), vla.d_mlp) for i in ref))
    recorded = {(s["layer"], s["neuron"]): s["cosine"] for s in found.meta["scores"]}
    for (layer, neuron), value in recorded.items():
        assert value == pytest.approx(cos[layer, neuron], abs=1e-4)
    # the planted neurons are far from everything else (so the test can fail if the embedding step breaks)
    planted_mask = np.zeros_like(cos, dtype=bool)
    for layer, neuron in PLANTED["fast"]:
        planted_mask[layer, neuron] = True
    others = ~planted_mask
    others[BOTH] = False  # half fast, half slow: in between
    assert cos[planted_mask].min() > 0.9 and cos[others].max() < 0.75 and 0.5 < cos[BOTH] < 0.9


def test_knn_drops_neighbourhood_outliers(planted):
    """With k_neighbors > size the extra neighbours are random vectors that happen to lie near the concept;
    the cluster (most central members) is still exactly the planted group, and its scores say why."""
    _, lens = planted
    found = find_concept(lens, "fast", size=6, k_neighbors=20)
    assert found.pairs == tuple(sorted(PLANTED["fast"]))
    central = [s["centrality"] for s in found.meta["scores"]]
    assert central == sorted(central, reverse=True) and min(central) > 0.5
    assert all(any(t.lstrip("▁") in FAST for t in s["tokens"][:3]) for s in found.meta["scores"])


def test_keyword_mode_recovers_exactly_the_planted_neurons(planted):
    _, lens = planted
    for concept, pairs in PLANTED.items():
        synonyms = FAST[1:] if concept == "fast" else SLOW[1:]
        found = find_concept(lens, concept, size=len(pairs), method="keyword", synonyms=synonyms)
        assert found.pairs == tuple(sorted(pairs)), (concept, found.meta["scores"])
        assert all(s["count"] == 3 for s in found.meta["scores"])
    # built-in synonyms (what the robot experiments used: top-6 by keyword frequency)
    assert find_concept(lens, "fast", size=6, method="keyword").pairs == tuple(sorted(PLANTED["fast"]))


def test_random_neurons_are_not_recovered(planted):
    _, lens = planted
    fast = find_concept(lens, "fast", size=6)
    slow = find_concept(lens, "slow", size=4)
    assert not set(fast.pairs) & set(slow.pairs)
    control = random_control(fast, seed=3, exclude=slow.pairs)
    assert len(control) == 6 and not set(control.pairs) & (set(fast.pairs) | set(slow.pairs))
    assert {l: len(n) for l, n in control.by_layer().items()} == {l: len(n) for l, n in fast.by_layer().items()}
    # a random set is not a concept: none of its vectors carries a fast word among its top tokens
    for layer, neuron in control.pairs:
        assert not {t.lstrip("▁") for t in lens.vector_tokens(layer, neuron, 3)} & set(FAST)


def test_layer_subsets(planted):
    _, lens = planted
    late = find_concept(lens, "fast", size=4, layers="late", k_neighbors=10)
    assert late.pairs == ((2, 30), (2, 64), (3, 11), (3, 100))
    early = find_concept(lens, "fast", size=2, layers="early", method="keyword")
    assert early.pairs == ((1, 5), (1, 77))
    assert find_concept(lens, "fast", size=2, layers=[3], method="keyword").pairs == ((3, 11), (3, 100))
    assert late.meta["layers"] == "late"


@pytest.mark.parametrize("method", ["knn", "keyword"])
def test_opposites_are_disjoint_and_contested_neurons_are_resolved(planted, method):
    _, lens = planted
    fast, slow = find_opposites(lens, ("fast", "slow"), size=6 if method == "keyword" else 4, method=method,
                                k_neighbors=10, filter_opposites=False)
    assert not set(fast.pairs) & set(slow.pairs)
    if method == "keyword":
        # BOTH promotes 2 words of each concept: equal counts, so the better-ranked matches decide
        tokens = [t.lstrip("▁") for t in lens.vector_tokens(*BOTH, 4)]
        winner = "fast" if tokens[0] in FAST else "slow"
        assert {"layer": 2, "neuron": 90, "to": winner} in fast.meta["contested"]
        assert BOTH not in (slow.pairs if winner == "fast" else fast.pairs)
        assert set(fast.pairs) == set(PLANTED["fast"])
        # only 4 slow vectors are planted: they rank first (3 matches), chance matches fill the rest
        ranked = slow.meta["scores"]
        assert {(r["layer"], r["neuron"]) for r in ranked[:4]} == set(PLANTED["slow"])
        assert [r["count"] for r in ranked] == [3, 3, 3, 3, 1, 1]
    else:
        assert set(fast.pairs) <= set(PLANTED["fast"]) and set(slow.pairs) == set(PLANTED["slow"])
    assert fast.meta["opposite"] == "slow" and slow.meta["opposite"] == "fast"


@pytest.mark.parametrize("method", ["knn", "keyword"])
def test_opposites_filter_drops_mixed_polarity_vectors(planted, method):
    """The default filter: BOTH (top tokens from both lexicons) is dropped from either side before ranking, so it
    is never contested; the planted pure vectors are still found."""
    _, lens = planted
    fast, slow = find_opposites(lens, ("fast", "slow"), size=4, method=method, k_neighbors=10,
                                synonyms=(FAST[1:], SLOW[1:]))
    assert BOTH not in fast.pairs and BOTH not in slow.pairs and not fast.meta["contested"]
    assert set(fast.pairs) <= set(PLANTED["fast"]) and set(slow.pairs) == set(PLANTED["slow"])
    assert fast.meta["filtered_by_opposite"] >= 1 and "slowly" in fast.meta["opposite_words"]
    # without the filter, BOTH is a candidate of both rankings
    unfiltered = find_concept(lens, "fast", size=10, k_neighbors=10, method=method, synonyms=FAST[1:], opposite=None)
    assert BOTH in unfiltered.pairs


def test_lexicon_anchor_matches_an_independent_reference(planted):
    """anchor='lexicon': the concept is the mean of the unit embeddings of the word and its synonyms (computed
    here densely); the recorded cosines equal the reference's."""
    vla, lens = planted
    emb = vla.input_embeddings().detach().double()
    units = [emb[token_id(vla, w)] / emb[token_id(vla, w)].norm() for w in FAST]
    concept = torch.stack(units).mean(0)
    unembedding = vla.unembedding().detach().double()[: len(vla.tokenizer)]
    cos = np.zeros((vla.num_layers, vla.d_mlp))
    for layer in range(vla.num_layers):
        logits = (unembedding @ vla.value_vectors(layer).detach().double()).T
        top_scores, top_ids = torch.topk(logits, 5, dim=1)
        z = (torch.softmax(top_scores, dim=1)[..., None] * emb[top_ids]).sum(1)
        cos[layer] = torch.nn.functional.cosine_similarity(z, concept[None], dim=1).numpy()
    found = find_concept(lens, "fast", size=6, k_neighbors=6, synonyms=FAST[1:], opposite=None)
    assert found.pairs == tuple(sorted(divmod(int(i), vla.d_mlp) for i in np.argsort(-cos.reshape(-1))[:6]))
    for score in found.meta["scores"]:
        assert score["cosine"] == pytest.approx(cos[score["layer"], score["neuron"]], abs=1e-4)
    assert found.meta["anchor"] == "lexicon" and set(found.meta["concept_tokens"]) == set(FAST)


# -- files ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_neuron_sets_round_trip(planted, tmp_path, suffix):
    vla, lens = planted
    found = find_concept(lens, "fast", size=6)
    back = NeuronSet.load(found.save(tmp_path / f"fast{suffix}"))
    assert back == found and back.meta["method"] == "knn" and back.meta["scores"][0]["tokens"]
    back.validate(vla)
    # the authors' format: flat indices layer * d_mlp + neuron
    (tmp_path / "authors.yaml").write_text("neurons: " + str(found.flat()) + "\nd_mlp: 128\n")
    assert NeuronSet.load(tmp_path / "authors.yaml").pairs == found.pairs


# -- words and bad input -------------------------------------------------------------------------------------


def test_multi_token_words(planted):
    vla, lens = planted
    ids, strings = concept_tokens(lens, "Fast")  # not a token itself, but "▁fast" is (case-insensitive match)
    assert strings == ["▁fast"]
    with pytest.warns(UserWarning, match="not a single token"):
        ids, strings = concept_tokens(lens, "fastquick")
    assert strings == ["▁fast", "qu", "ick"]
    with pytest.warns(UserWarning, match="not a single token"):
        found = find_concept(lens, "fastquick", size=3, k_neighbors=10)
    assert found.meta["concept_tokens"] == {"fastquick": ["▁fast", "qu", "ick"]}
    with pytest.raises(InputError, match="nearest tokens: .*'fast'"):
        find_concept(lens, "fastt", method="keyword", synonyms=[])


def test_bad_input(planted, tmp_path):
    vla, lens = planted
    with pytest.raises(InputError, match="cannot be represented.*unknown token"):
        find_concept(lens, "日本")
    with pytest.raises(InputError, match="non-empty string"):
        find_concept(lens, "  ")
    with pytest.raises(InputError, match="size=30 is larger than k_neighbors=20"):
        find_concept(lens, "fast", size=30, k_neighbors=20)
    with pytest.raises(InputError, match="size must be a positive int"):
        find_concept(lens, "fast", size=0)
    with pytest.raises(InputError, match="unknown method 'cluster'"):
        find_concept(lens, "fast", method="cluster")
    with pytest.raises(IndexOutOfRangeError, match="layer 9 is out of range"):
        find_concept(lens, "fast", layers=[9])
    with pytest.raises(InputError, match="unknown layer subset"):
        find_concept(lens, "fast", layers="middle")
    with pytest.raises(InputError, match="exceeds the 1[0-9][0-9] value vectors"):
        find_concept(lens, "fast", size=5, k_neighbors=200, layers=[0])
    with pytest.raises(InputError, match="kept the top 10"):
        find_concept(lens, "fast", method="keyword", top_k=50)
    with pytest.raises(InputError, match="must be two words"):
        find_opposites(lens, ("fast",))
    with pytest.raises(InputError, match="must differ"):
        find_opposites(lens, ("fast", "Fast"), method="keyword")
    offline = ValueVectorLens.from_file(lens.save(tmp_path / "lens.npz"))
    with pytest.raises(InputError, match="needs the model's input embeddings"):
        find_concept(offline, "fast")
    # keyword mode works offline from the stored token strings
    assert find_concept(offline, "fast", size=6, method="keyword").pairs == tuple(sorted(PLANTED["fast"]))
    small = ValueVectorLens(vla, k=3, cache_dir=False, progress=False)
    with pytest.raises(InputError, match="top 5 tokens but the lens kept only 3"):
        find_concept(small, "fast", size=3, k_neighbors=10)
