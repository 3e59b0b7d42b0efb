"""Checkpoint diff (the paper's Fig. 3): how the value-vector lens changed between two checkpoints of one
architecture (e.g. base vs fine-tuned), per layer, per value vector and per token, split into action and
language tokens. :func:`checkpoint_diff` builds a :class:`CheckpointDiff` of three tables.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import InputError
from .lens_cache import ensure_weights, write_table

if TYPE_CHECKING:
    from .lens import ValueVectorLens


@dataclass
class CheckpointDiff:
    """How the value-vector projections changed between two checkpoints of one architecture.

    Tables (pandas DataFrames):
        vectors: one row per value vector: layer, neuron, kept (top-k tokens present in both), gained_action,
            gained_language, lost_action, lost_language, changed (k - kept) and, when both lenses still hold their
            models, weight_change (``|w_tuned - w_base| / |w_base|``) and score_shift (mean change of the logits
            of the base's top-k tokens: ``W_U' w' - W_U w`` at those tokens).
        layers: one row per layer: mean kept fraction, vectors changed, gained/lost action/language token
            entries, action share of top-k tokens in base and tuned, and the share of gained entries that are
            action tokens.
        tokens: per layer and token: in how many vectors' top-k it appears in base and tuned, and the change.
    """

    base: ValueVectorLens
    tuned: ValueVectorLens
    vectors: Any
    layers: Any
    tokens: Any
    meta: dict = field(default_factory=dict)

    def top_vectors(self, n: int = 20, layer: int | None = None, by: str = "changed"):
        """The value vectors that changed most (by "changed", "weight_change" or "score_shift")."""
        frame = self.vectors if layer is None else self.vectors[self.vectors.layer == self.base.check_layer(layer)]
        if by not in frame.columns:
            known = ", ".join(c for c in frame.columns if c not in ("layer", "neuron"))
            raise InputError(f"unknown column {by!r}; use one of {known}")
        key = frame[by].abs() if by == "score_shift" else frame[by]
        ordered = frame.assign(_key=key).sort_values(["_key", "layer", "neuron"], ascending=[False, True, True])
        return ordered.drop(columns="_key").head(n)

    def top_tokens(self, n: int = 20, layer: int | None = None, kind: str | None = None, direction: str = "gained"):
        """Tokens that gained (or lost) most top-k appearances, optionally in one layer and of one kind
        ("action" or "language")."""
        frame = self.tokens
        if layer is not None:
            frame = frame[frame.layer == self.base.check_layer(layer)]
        if kind not in (None, "action", "language"):
            raise InputError(f"kind must be 'action', 'language' or None, got {kind!r}")
        if kind is not None:
            frame = frame[frame.is_action == (kind == "action")]
        if direction not in ("gained", "lost"):
            raise InputError(f"direction must be 'gained' or 'lost', got {direction!r}")
        return frame.sort_values("delta", ascending=direction == "lost").head(n)

    def export(self, folder: str | os.PathLike, fmt: str = "parquet") -> dict[str, Path]:
        """Write the three tables to ``folder`` (``vectors.<fmt>``, ``layers.<fmt>``, ``tokens.<fmt>``)."""
        folder = Path(folder)
        return {name: write_table(getattr(self, name), folder / f"{name}.{fmt}", meta={**self.meta, "table": name})
                for name in ("vectors", "layers", "tokens")}


def checkpoint_diff(base: ValueVectorLens, tuned: ValueVectorLens, chunk_size: int = 1024) -> CheckpointDiff:
    """Compare two lenses of the same architecture (e.g. a base VLM/VLA and its robot fine-tune).

    Refuses lenses of different stacks, widths, vocabularies or k. Token-set changes are computed from the lenses
    alone; weight and logit changes additionally need both lenses' models (``lens.vla``).
    """
    import pandas as pd

    for name in ("stack", "num_layers", "d_mlp", "d_model", "vocab_rows", "k"):
        if getattr(base, name) != getattr(tuned, name):
            raise InputError(
                f"cannot diff lenses of different architectures: {name} is {getattr(base, name)!r} in the base "
                f"({base.family}, {base.num_layers} layers x {base.d_mlp} vectors, vocab {base.vocab_rows}, "
                f"k={base.k}) but {getattr(tuned, name)!r} in the tuned lens ({tuned.family}, {tuned.num_layers} "
                f"layers x {tuned.d_mlp} vectors, vocab {tuned.vocab_rows}, k={tuned.k})"
            )
    action = base.action_mask() | tuned.action_mask()
    b, t = base.ids, tuned.ids
    in_tuned = (b[..., :, None] == t[..., None, :]).any(-1)  # base token kept in tuned
    in_base = (t[..., :, None] == b[..., None, :]).any(-1)
    lost, gained = ~in_tuned, ~in_base
    b_act, t_act = action[b], action[t]
    L, N, k = b.shape
    vectors = pd.DataFrame({
        "layer": np.repeat(np.arange(L), N), "neuron": np.tile(np.arange(N), L),
        "kept": in_tuned.sum(-1).reshape(-1),
        "gained_action": (gained & t_act).sum(-1).reshape(-1), "gained_language": (gained & ~t_act).sum(-1).reshape(-1),
        "lost_action": (lost & b_act).sum(-1).reshape(-1), "lost_language": (lost & ~b_act).sum(-1).reshape(-1),
    })
    vectors["changed"] = k - vectors["kept"]
    if base.vla is not None and tuned.vla is not None:
        weight_change, score_shift = _weight_changes(base, tuned, chunk_size)
        vectors["weight_change"] = weight_change.reshape(-1)
        vectors["score_shift"] = score_shift.reshape(-1)
    by_layer = vectors.groupby("layer")
    layers = pd.DataFrame({
        "layer": np.arange(L),
        "kept_fraction": by_layer["kept"].mean().to_numpy() / k,
        "vectors_changed": by_layer["changed"].apply(lambda c: float((c > 0).mean())).to_numpy(),
        **{col: by_layer[col].sum().to_numpy() for col in ("gained_action", "gained_language", "lost_action",
                                                          "lost_language")},
        "action_share_base": b_act.mean(axis=(1, 2)),
        "action_share_tuned": t_act.mean(axis=(1, 2)),
    })
    gained_total = layers.gained_action + layers.gained_language
    layers["gained_action_fraction"] = np.where(
        gained_total > 0, layers.gained_action / gained_total.clip(lower=1), 0.0
    )
    tokens = _token_changes(base, tuned, action)
    meta = {"base": {"model_key": base.model_key, "fingerprint": base.fingerprint},
            "tuned": {"model_key": tuned.model_key, "fingerprint": tuned.fingerprint},
            "stack": base.stack, "k": k}
    return CheckpointDiff(base, tuned, vectors, layers, tokens, meta)


def _token_changes(base: ValueVectorLens, tuned: ValueVectorLens, action: np.ndarray):
    import pandas as pd

    rows = []
    V = base.vocab_rows
    for layer in range(base.num_layers):
        count_b = np.bincount(base.ids[layer].reshape(-1), minlength=V)
        count_t = np.bincount(tuned.ids[layer].reshape(-1), minlength=V)
        ids = np.nonzero(count_b != count_t)[0]
        rows.append(pd.DataFrame({"layer": layer, "token_id": ids, "count_base": count_b[ids],
                                  "count_tuned": count_t[ids], "delta": count_t[ids] - count_b[ids],
                                  "is_action": action[ids]}))
    frame = pd.concat(rows, ignore_index=True)
    base_vocab, tuned_vocab = base._vocab_array(), tuned._vocab_array()
    vocab = np.where(base_vocab != "", base_vocab, tuned_vocab)  # offline lenses each know their own tokens
    frame.insert(2, "token", vocab[frame.token_id.to_numpy()] if len(frame) else [])
    return frame


def _weight_changes(base: ValueVectorLens, tuned: ValueVectorLens, chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per vector: relative weight change and the mean logit change at the base's top-k tokens."""
    ensure_weights(base.vla)
    ensure_weights(tuned.vla)
    device = torch.device(base.device)
    rows = base.vocab_rows
    weight_change = np.zeros((base.num_layers, base.d_mlp), dtype=np.float32)
    score_shift = np.zeros_like(weight_change)
    with torch.no_grad():
        u_b = base.vla.unembedding()[:rows].detach().to(device, torch.float32)
        u_t = tuned.vla.unembedding()[:rows].detach().to(device, torch.float32)
        for layer in range(base.num_layers):
            w_b_all = base.vla.value_vectors(layer, base.stack).detach()
            w_t_all = tuned.vla.value_vectors(layer, tuned.stack).detach()
            for start in range(0, base.d_mlp, chunk_size):
                stop = min(start + chunk_size, base.d_mlp)
                w_b = w_b_all[:, start:stop].to(device, torch.float32).T  # (chunk, d)
                w_t = w_t_all[:, start:stop].to(device, torch.float32).T
                norm = w_b.norm(dim=1).clamp_min(1e-12)
                weight_change[layer, start:stop] = ((w_t - w_b).norm(dim=1) / norm).cpu().numpy()
                ids = torch.as_tensor(base.ids[layer, start:stop], device=device, dtype=torch.long)
                before = torch.einsum("ckd,cd->ck", u_b[ids], w_b)
                after = torch.einsum("ckd,cd->ck", u_t[ids], w_t)
                score_shift[layer, start:stop] = (after - before).mean(dim=1).cpu().numpy()
    return weight_change, score_shift
