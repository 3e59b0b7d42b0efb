"""Concept discovery (step 2 of the method): from a value-vector lens to a :class:`NeuronSet` for a concept.

The authors released no clustering code (their neurons were picked by hand from a dumped top-token file), so
the paper's kNN clustering is implemented here precisely (see :func:`find_concept`), with a lexicon anchor and
an opposites filter by default (one word is a poor anchor: antonyms share contexts), the paper's single-word
mode, a keyword mode (what the robot experiments used), disjoint opposite pairs and matched random controls.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .lens import ValueVectorLens, normalize_token
from .neurons import NeuronSet, layer_subset, random_like

__all__ = [
    "NeuronSet", "OPPOSITES", "SYNONYMS", "find_concept", "find_opposites", "random_control", "concept_tokens",
    "vector_embeddings",
]

#: default synonym lists for keyword mode (the concepts the paper steers with); extend per call with synonyms=
SYNONYMS: dict[str, tuple[str, ...]] = {
    "fast": ("quick", "quickly", "rapid", "rapidly", "swift", "swiftly", "speed", "hurry", "faster", "fastest"),
    "slow": ("slowly", "slower", "slowest", "gentle", "gently", "careful", "carefully"),
    "careful": ("carefully", "gentle", "gently", "cautious", "cautiously", "precise", "slow"),
    "up": ("upward", "upwards", "above", "raise", "raised", "rise", "lift", "high", "higher"),
    "down": ("downward", "downwards", "below", "lower", "lowered", "descend", "drop", "low"),
    "high": ("higher", "highest", "up", "upper", "top", "above", "raise", "tall"),
    "low": ("lower", "lowest", "down", "bottom", "below", "beneath"),
    "left": ("leftward", "west"),
    "right": ("rightward", "east"),
    "forward": ("forwards", "ahead", "front"),
    "backward": ("backwards", "back", "behind"),
}

#: the opposite of each built-in concept (the opposites filter's default)
OPPOSITES: dict[str, str] = {"fast": "slow", "slow": "fast", "up": "down", "down": "up", "high": "low", "low": "high",
                             "left": "right", "right": "left", "forward": "backward", "backward": "forward"}

METHODS = ("knn", "keyword")
ANCHORS = ("lexicon", "word")


@dataclass
class _Candidate:
    pair: tuple[int, int]
    primary: float  # what wins a neuron contested by two opposite concepts
    info: dict


# ---------------------------------------------------------------------------------------------------------------
# words and tokens


def _normalized_vocab(lens: ValueVectorLens) -> np.ndarray:
    return lens.normalized_vocabulary()


def _check_word(word: Any) -> str:
    if not isinstance(word, str) or not word.strip():
        raise InputError(f"a concept word must be a non-empty string, got {word!r}")
    return word.strip()


def nearest_tokens(lens: ValueVectorLens, word: str, n: int = 5) -> list[str]:
    """Vocabulary strings most similar to ``word`` (for error messages)."""
    vocab = _normalized_vocab(lens)
    options = sorted({v for v in vocab if v})
    return difflib.get_close_matches(word.lower(), options, n=n, cutoff=0.5)


def _unrepresentable(lens: ValueVectorLens, word: str, why: str) -> InputError:
    near = nearest_tokens(lens, word)
    hint = f"nearest tokens: {', '.join(repr(t) for t in near)}" if near else "no similar token exists"
    return InputError(f"the word {word!r} cannot be represented in this vocabulary ({why}); {hint}")


def concept_tokens(lens: ValueVectorLens, word: str) -> tuple[list[int], list[str]]:
    """The token id(s) whose input embedding(s) stand for ``word``: one token when the word is a token (with or
    without the "▁" word-start marker), else the tokenizer's pieces (averaged by the kNN method)."""
    word = _check_word(word)
    vocab = lens.vocabulary()
    tokenizer = getattr(lens.vla, "tokenizer", None) if lens.vla is not None else None
    pieces: list[int] = []
    if tokenizer is not None:
        encoded = tokenizer(word, add_special_tokens=False).input_ids
        unk = tokenizer.unk_token_id
        if unk is not None and unk in encoded:
            raise _unrepresentable(lens, word, "the tokenizer maps part of it to the unknown token")
        # Llama sometimes emits a bare "▁" before a word that has no "▁word" token; it carries no meaning
        pieces = [int(i) for i in encoded if i < lens.vocab_rows and normalize_token(vocab[int(i)])]
        if len(pieces) == 1:
            return pieces, [vocab[pieces[0]]]
    # a vocabulary token equal to the word (exact marker forms first, then case-insensitive)
    for form in (f"▁{word}", word, f"Ġ{word}"):
        if form in vocab:
            index = vocab.index(form)
            return [index], [form]
    normalized = _normalized_vocab(lens)
    hits = np.nonzero(normalized == word.lower())[0]
    if len(hits):
        return [int(hits[0])], [vocab[int(hits[0])]]
    if not pieces:
        raise _unrepresentable(lens, word, "it is not a token and no tokenizer is available to split it")
    strings = [vocab[i] for i in pieces]
    warnings.warn(f"{word!r} is not a single token; using the mean embedding of its pieces {strings}", stacklevel=3)
    return pieces, strings


def _keyword_ids(lens: ValueVectorLens, words: Sequence[str]) -> np.ndarray:
    targets = {w.strip().lower() for w in words}
    normalized = _normalized_vocab(lens)
    return np.nonzero(np.isin(normalized, list(targets)))[0]


# ---------------------------------------------------------------------------------------------------------------
# embeddings


def _embedding_matrix(lens: ValueVectorLens, device) -> torch.Tensor:
    if lens.vla is None:
        raise InputError(
            "method='knn' needs the model's input embeddings; load the lens with ValueVectorLens.from_file(path, vla) "
            "or use method='keyword'"
        )
    if lens.k < 1:
        raise InputError("empty lens")
    return lens.vla.input_embeddings().detach().to(device=device, dtype=torch.float32)


def vector_embeddings(
    lens: ValueVectorLens, layer: int, neurons: Sequence[int] | slice | None = None, top: int = 5,
    temperature: float = 1.0, embeddings: torch.Tensor | None = None, device=None,
) -> torch.Tensor:
    """``z_i``: the softmax(logit / T)-weighted mean of the input embeddings of each vector's ``top`` tokens,
    for some neurons of one layer, as a ``(n, d_model)`` float32 tensor."""
    if top > lens.k:
        raise InputError(f"the kNN method uses each vector's top {top} tokens but the lens kept only {lens.k}")
    if temperature <= 0:
        raise InputError(f"temperature must be positive, got {temperature}")
    device = device or lens.device
    table = _embedding_matrix(lens, device) if embeddings is None else embeddings
    index = slice(None) if neurons is None else neurons
    ids = torch.as_tensor(lens.ids[layer, index, :top], dtype=torch.long, device=device)
    scores = torch.as_tensor(lens.scores[layer, index, :top], dtype=torch.float32, device=device)
    if int(ids.max()) >= table.shape[0]:
        raise InputError("the lens has token ids beyond the input-embedding table; the lens and model do not match")
    weights = torch.softmax(scores / temperature, dim=-1)
    return torch.einsum("nt,ntd->nd", weights, table[ids])


def _concept_vector(lens, word, synonyms, table) -> tuple[torch.Tensor, dict]:
    """Mean unit embedding of ``word`` and its synonyms; synonyms the vocabulary cannot represent are skipped
    (``used[w] = None``); the word itself must be representable."""
    units, used = [], {}
    for i, w in enumerate([word] + list(synonyms or [])):
        try:
            with warnings.catch_warnings():
                if i:
                    warnings.simplefilter("ignore")  # a multi-token synonym is fine in a lexicon
                ids, strings = concept_tokens(lens, w)
        except InputError:
            if i == 0:
                raise
            used[w] = None
            continue
        vec = table[torch.as_tensor(ids, device=table.device)].mean(dim=0)
        units.append(vec / vec.norm().clamp_min(1e-12))
        used[w] = strings
    concept = torch.stack(units).mean(dim=0)
    return concept / concept.norm().clamp_min(1e-12), used


def lexicon(word: str, synonyms: Sequence[str] | None = None, anchor: str = "lexicon") -> list[str]:
    """The words standing for a concept: ``word`` plus ``synonyms`` (explicit), else, with the lexicon anchor,
    the built-in :data:`SYNONYMS` of the word."""
    if synonyms is not None:
        extra = list(synonyms)
    else:
        extra = list(SYNONYMS.get(word.lower(), ())) if anchor == "lexicon" else []
    return [word] + [w for w in extra if w.lower() != word.lower()]


def _excluded(lens: ValueVectorLens, layer_ids: np.ndarray, words: Sequence[str], top: int) -> np.ndarray:
    """(len(layer_ids), d_mlp) mask of the vectors with one of ``words`` among their top ``top`` tokens."""
    ids = _keyword_ids(lens, words)
    if not len(ids):
        return np.zeros((len(layer_ids), lens.d_mlp), dtype=bool)
    return np.isin(lens.ids[layer_ids, :, :top], ids).any(-1)


# ---------------------------------------------------------------------------------------------------------------
# ranking


def _check_size(size: Any, name: str = "size") -> int:
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
        raise InputError(f"{name} must be a positive int, got {size!r}")
    return int(size)


def _rank_knn(lens, word, size, k_neighbors, layer_ids, synonyms, top, temperature, chunk,
              excluded: np.ndarray) -> tuple[list, dict]:
    k_neighbors = _check_size(k_neighbors, "k_neighbors")
    n_candidates = len(layer_ids) * lens.d_mlp - int(excluded.sum())
    if k_neighbors > n_candidates:
        raise InputError(f"k_neighbors={k_neighbors} exceeds the {n_candidates} value vectors of the chosen layers "
                         "(after the opposites filter)")
    if size > k_neighbors:
        raise InputError(
            f"size={size} is larger than k_neighbors={k_neighbors}: the cluster is chosen inside the concept's "
            f"k-neighbourhood; raise k_neighbors (the paper uses 10, 20 or 40) or lower size"
        )
    device = torch.device(lens.device)
    table = _embedding_matrix(lens, device)
    concept, used = _concept_vector(lens, word, synonyms, table)
    cosine = np.full((lens.num_layers, lens.d_mlp), -np.inf, dtype=np.float64)
    with torch.no_grad():
        for row, layer in enumerate(layer_ids):
            for start in range(0, lens.d_mlp, chunk):
                stop = min(start + chunk, lens.d_mlp)
                z = vector_embeddings(lens, layer, slice(start, stop), top, temperature, table, device)
                cos = (z @ concept) / z.norm(dim=1).clamp_min(1e-12)
                cosine[layer, start:stop] = cos.double().cpu().numpy()
            cosine[layer, excluded[row]] = -np.inf
        flat = cosine.reshape(-1)
        # stable order: by cosine, then by (layer, neuron)
        order = np.lexsort((np.arange(flat.size), -flat))[:k_neighbors]
        members = [divmod(int(i), lens.d_mlp) for i in order]
        z = torch.stack([vector_embeddings(lens, l, [n], top, temperature, table, device)[0] for l, n in members])
        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        between = (z @ z.T).double().cpu().numpy()
    to_concept = flat[order]
    centrality = (to_concept + between.sum(axis=1) - np.diag(between)) / len(members)
    ranked = np.lexsort((-to_concept, -centrality))
    candidates = []
    for i in ranked:
        layer, neuron = members[i]
        candidates.append(_Candidate((layer, neuron), float(to_concept[i]), {
            "layer": layer, "neuron": neuron, "cosine": round(float(to_concept[i]), 6),
            "centrality": round(float(centrality[i]), 6), "tokens": lens.vector_tokens(layer, neuron, top),
        }))
    params = {"k_neighbors": k_neighbors, "top_tokens": top, "temperature": temperature, "concept_tokens": used}
    return candidates, params


def _rank_keyword(lens, word, layer_ids, words, top_k, excluded: np.ndarray) -> tuple[list, dict]:
    for w in words:
        _check_word(w)
    match_ids = _keyword_ids(lens, words)
    if not len(match_ids):
        raise _unrepresentable(lens, word, f"no token of the vocabulary is any of {words}")
    top_k = lens._check_k(top_k)
    ids = lens.ids[layer_ids, :, :top_k]
    scores = lens.scores[layer_ids, :, :top_k]
    hit = np.isin(ids, match_ids)
    count = np.where(excluded, 0, hit.sum(-1))
    recip = (hit / (np.arange(top_k) + 1.0)).sum(-1)
    best = np.where(hit, scores, -np.inf).max(-1)
    flat = np.nonzero(count.reshape(-1) > 0)[0]
    c, r, b = count.reshape(-1)[flat], recip.reshape(-1)[flat], best.reshape(-1)[flat]
    order = flat[np.lexsort((flat, -b, -r, -c))]
    vocab = lens.vocabulary()
    candidates = []
    for index in order:
        row, neuron = divmod(int(index), lens.d_mlp)
        layer = int(layer_ids[row])
        hits = hit[row, neuron]
        primary = float(count[row, neuron]) + float(recip[row, neuron]) / (top_k + 1)
        candidates.append(_Candidate((layer, neuron), primary, {
            "layer": layer, "neuron": neuron, "count": int(count[row, neuron]),
            "matched": [vocab[int(t)] for t in ids[row, neuron][hits]],
            "tokens": [vocab[int(t)] for t in ids[row, neuron]],
        }))
    params = {"words": words, "top_k": top_k, "matching_token_ids": len(match_ids)}
    return candidates, params


def _rank(lens, word, method, size, k_neighbors, layers, synonyms, top_k, temperature, chunk, anchor="lexicon",
          opposite: Any = "auto", opposite_synonyms: Sequence[str] | None = None):
    if not isinstance(lens, ValueVectorLens):
        raise InputError(f"find_concept needs a ValueVectorLens, got {type(lens).__name__}")
    word = _check_word(word)
    size = _check_size(size)
    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; use 'knn' (the paper's clustering) or 'keyword'")
    if anchor not in ANCHORS:
        raise InputError(f"unknown anchor {anchor!r}; use 'lexicon' (word + synonyms, the default) or 'word' "
                         "(the paper)")
    if synonyms is not None and (isinstance(synonyms, str) or not all(isinstance(w, str) for w in synonyms)):
        raise InputError(f"synonyms must be a list of words, got {synonyms!r}")
    layer_ids = np.asarray(layer_subset(layers, lens.num_layers))
    # keyword mode always matches a lexicon (a single word rarely fills top-k lists); knn anchors as asked
    words = lexicon(word, synonyms, "lexicon" if method == "keyword" else anchor)
    if opposite == "auto":
        opposite = OPPOSITES.get(word.lower())
    opposite_words: list[str] = []
    if opposite is not None:
        opposite = _check_word(opposite)
        if opposite.lower() == word.lower():
            raise InputError(f"a concept and its opposite must differ, got {word!r} twice")
        opposite_words = [w for w in lexicon(opposite, opposite_synonyms, "lexicon")
                          if w.lower() not in {x.lower() for x in words}]
    excluded = _excluded(lens, layer_ids, opposite_words, 5 if method == "knn" else (top_k or lens.k))
    if method == "knn":
        candidates, params = _rank_knn(lens, word, size, k_neighbors, layer_ids, words[1:], 5, temperature, chunk,
                                       excluded)
    else:
        candidates, params = _rank_keyword(lens, word, layer_ids, words, top_k, excluded)
    params = {"method": method, "word": word, "size": size, "anchor": anchor,
              "layers": layers if isinstance(layers, str) or layers is None else [int(l) for l in layers],
              "opposite": opposite, "opposite_words": opposite_words, "filtered_by_opposite": int(excluded.sum()),
              **params}
    return candidates, params


def _to_set(lens, word, chosen: list[_Candidate], params: dict) -> NeuronSet:
    if len(chosen) < params["size"]:
        warnings.warn(f"only {len(chosen)} value vectors match {word!r} ({params['method']}); asked for "
                      f"{params['size']}", stacklevel=3)
    meta = {**params, "found": len(chosen), "model_key": lens.model_key, "fingerprint": lens.fingerprint,
            "lens_k": lens.k, "scores": [c.info for c in chosen]}
    return NeuronSet(tuple(c.pair for c in chosen), stack=lens.stack, d_mlp=lens.d_mlp, num_layers=lens.num_layers,
                     name=word, meta=meta)


# ---------------------------------------------------------------------------------------------------------------
# public API


def find_concept(
    lens: ValueVectorLens,
    word: str,
    size: int = 20,
    method: str = "knn",
    k_neighbors: int = 20,
    layers: Any = "all",
    synonyms: Sequence[str] | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    *,
    anchor: str = "lexicon",
    opposite: str | None = "auto",
    opposite_synonyms: Sequence[str] | None = None,
) -> NeuronSet:
    """The value vectors of ``lens`` that stand for ``word``, as a :class:`NeuronSet`.

    ``method="knn"`` (the paper's method), defined precisely:

    1. **Vector embedding.** Value vector ``i`` with top-5 tokens ``t_1..t_5`` and lens logits ``s_1..s_5`` is
       mapped to ``z_i = sum_j softmax(s / T)_j * E[t_j]`` (``E`` = the input embeddings, T = 1 by default).
    2. **Concept anchor.** ``anchor="lexicon"`` (the default): ``c`` is the mean of the unit-normalised embeddings
       of the word and its lexicon (``synonyms=``, else the built-in :data:`SYNONYMS`; words the vocabulary cannot
       represent are skipped and recorded). ``anchor="word"`` (the paper): ``c = E[word]`` alone. One word is a poor
       anchor: antonyms share contexts, so ``cos(E[fast], E[slow])`` can be as high as ``cos(E[fast], E[quickly])``
       and a single-word neighbourhood mixes polarities.
    3. **Opposites filter** (default on, ``opposite="auto"``): vectors whose top-5 tokens contain a word of the
       opposite concept's lexicon (:data:`OPPOSITES`) are dropped before the search. ``opposite=None`` disables it.
    4. **kNN.** ``N`` = the ``k_neighbors`` remaining vectors (of the chosen layers) nearest to ``c`` by cosine.
    5. **The cluster nearest the concept** = the ``size`` members of ``N`` that are most central in it: member
       ``j`` scores ``(cos(z_j, c) + sum_{m in N, m != j} cos(z_j, z_m)) / |N|`` (ties by ``cos(z_j, c)``); with
       ``size == k_neighbors`` this is the neighbourhood itself. ``size > k_neighbors`` is an error.

    ``method="keyword"`` (what the robot experiments used, top-6): vectors ranked by how many of their top-k lens
    tokens are in the lexicon (case-insensitive, "▁" stripped), ties by reciprocal ranks then the best matching
    logit; the opposites filter applies too.

    Layer subsets ``layers=``: "all", "early", "late", "first:K", "last:K" or a list (see
    :func:`nnsight_vla.neurons.layer_subset`).

    Args:
        lens: a :class:`ValueVectorLens` (for ``method="knn"`` it must hold its model).
        word: the concept, e.g. "fast", "up", "careful".
        size: neurons returned (paper sweep: 10 or 20; robot experiments: 6 with keyword mode).
        method: "knn" (the paper's clustering) or "keyword" (frequency of lexicon words in top-k tokens).
        k_neighbors: kNN neighbourhood size (10, 20 or 40 in the paper); must be >= size.
        layers: "all", "early", "late", "first:K", "last:K" or a list of layers: the candidate value vectors.
        synonyms: the concept's lexicon beyond ``word``; None = the built-in :data:`SYNONYMS` (lexicon anchor,
            keyword mode) or nothing (``anchor="word"``).
        top_k: keyword mode: how many of each vector's top tokens are searched (default: the lens's k).
        temperature: knn: softmax temperature over the top-5 logits.
        anchor: "lexicon" (default: the mean embedding of the word and its synonyms) or "word" (the paper's
            single-word anchor).
        opposite: the opposite concept whose words exclude a vector ("auto": :data:`OPPOSITES`; None: no filter).
        opposite_synonyms: the opposite's lexicon beyond its word (None: built-in).

    Returns:
        A NeuronSet named ``word`` whose ``meta`` records the method, parameters, the concept tokens and one
        score record per neuron (cosine/centrality or match count, and the vector's top tokens), best first.
    """
    candidates, params = _rank(lens, word, method, size, k_neighbors, layers, synonyms, top_k, temperature,
                               chunk_size, anchor, opposite, opposite_synonyms)
    return _to_set(lens, params["word"], candidates[:params["size"]], params)


def find_opposites(
    lens: ValueVectorLens,
    pair: Sequence[str] = ("fast", "slow"),
    size: int = 20,
    method: str = "knn",
    k_neighbors: int = 20,
    layers: Any = "all",
    synonyms: Sequence[Sequence[str] | None] | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    *,
    anchor: str = "lexicon",
    filter_opposites: bool = True,
) -> tuple[NeuronSet, NeuronSet]:
    """Neuron sets for two opposite concepts (fast/slow, up/down, high/low) in one call, guaranteed disjoint.

    With ``filter_opposites`` (default) each side drops the vectors whose top tokens contain a word of the other
    side's lexicon. A vector that both rankings still select goes to the concept it is closer to (knn: higher
    cosine to the concept; keyword: more matches, then better-ranked matches) and is dropped from the other, whose
    next candidate (if its ranking has one: knn ranks only the k_neighbors neighbourhood) takes its place; an
    exact tie drops it from both. ``meta["contested"]`` lists them. ``synonyms`` is None or a pair of lists.
    Other arguments as :func:`find_concept`.
    """
    if isinstance(pair, str) or len(pair) != 2:
        raise InputError(f"pair must be two words, e.g. ('fast', 'slow'), got {pair!r}")
    if synonyms is not None and (isinstance(synonyms, str) or len(synonyms) != 2):
        raise InputError("synonyms for find_opposites must be a pair: (synonyms of the first, of the second)")
    syn = list(synonyms or (None, None))
    ranked = [_rank(lens, w, method, size, k_neighbors, layers, s, top_k, temperature, chunk_size, anchor,
                    other if filter_opposites else None, other_syn)
              for w, s, other, other_syn in ((pair[0], syn[0], pair[1], syn[1]), (pair[1], syn[1], pair[0], syn[0]))]
    (cand_a, params_a), (cand_b, params_b) = ranked
    if params_a["word"].lower() == params_b["word"].lower():
        raise InputError(f"the two words of an opposite pair must differ, got {pair!r}")
    primary_a = {c.pair: c.primary for c in cand_a}
    primary_b = {c.pair: c.primary for c in cand_b}
    contested = sorted(set(primary_a) & set(primary_b))
    drop_a = {p for p in contested if primary_b[p] >= primary_a[p]}
    drop_b = {p for p in contested if primary_a[p] >= primary_b[p]}
    record = [{"layer": p[0], "neuron": p[1], "to": params_a["word"] if p not in drop_a else
               params_b["word"] if p not in drop_b else None} for p in contested]
    sets = []
    for cands, params, drop, other in ((cand_a, params_a, drop_a, params_b), (cand_b, params_b, drop_b, params_a)):
        chosen = [c for c in cands if c.pair not in drop][:params["size"]]
        params = {**params, "opposite": other["word"], "contested": record}
        sets.append(_to_set(lens, params["word"], chosen, params))
    return sets[0], sets[1]


def random_control(reference: NeuronSet, seed: int = 0, exclude: Sequence[Sequence[int]] = ()) -> NeuronSet:
    """A random control set matched to ``reference``: the same number of neurons in each layer, none of them in
    ``reference`` or ``exclude`` (e.g. the opposite concept's set)."""
    return random_like(reference, seed=seed, exclude=[tuple(p) for p in exclude])
