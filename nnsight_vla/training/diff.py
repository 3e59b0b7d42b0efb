"""Where fine-tuning changed the model, read through the value-vector lens: the share of the change of the
vocabulary projections ``W_U W_out`` that falls on action-token rows, and the lens-level diff totals (top-k
tokens gained and lost, action vs language). The paper finds fine-tuning mostly changes the action side."""

from __future__ import annotations

import numpy as np


def projection_change(base_vla, tuned_vla) -> dict:
    """Where fine-tuning changed the value vectors' vocabulary projections ``W_U W_out``: per layer, the share
    of the squared change ``|W_U' W_out' - W_U W_out|^2`` that falls on action-token rows (vs the share of rows
    they are). A share well above the row share means fine-tuning mostly changed action-token projections."""
    import torch

    n_tokens = len(tuned_vla.tokenizer) - 1  # without <PAD>
    action = np.zeros(n_tokens, bool)
    action[np.asarray(tuned_vla.action_token_ids)] = True
    act = torch.as_tensor(action)
    rows = []
    with torch.no_grad():
        wb, wt = base_vla.unembedding()[:n_tokens].float(), tuned_vla.unembedding()[:n_tokens].float()
        for layer in range(tuned_vla.num_layers):
            pb = wb @ base_vla.value_vectors(layer).float()
            pt = wt @ tuned_vla.value_vectors(layer).float()
            energy = ((pt - pb) ** 2).sum(dim=1)
            # the same split for the change caused by the value vectors alone (unembedding held fixed)
            delta = tuned_vla.value_vectors(layer).float() - base_vla.value_vectors(layer).float()
            vec_only = ((wb @ delta) ** 2).sum(1)
            rows.append({
                "layer": layer,
                "action_share_of_change": float(energy[act].sum() / energy.sum()),
                "action_share_of_change_vectors_only": float(vec_only[act].sum() / vec_only.sum()),
                "mean_change_action_row": float(energy[act].mean()),
                "mean_change_language_row": float(energy[~act].mean()),
            })
    total_change = sum(r["mean_change_action_row"] * action.sum() + r["mean_change_language_row"] * (~action).sum()
                       for r in rows)
    action_change = sum(r["mean_change_action_row"] * action.sum() for r in rows)
    return {"action_row_share": float(action.mean()), "layers": rows,
            "action_share_of_change": float(action_change / total_change)}


def diff_summary(diff) -> dict:
    """Totals of the lens-level checkpoint diff (top-k token entries gained/lost, action vs language)."""
    layers = diff.layers
    gained_a, gained_l = int(layers.gained_action.sum()), int(layers.gained_language.sum())
    lost_a, lost_l = int(layers.lost_action.sum()), int(layers.lost_language.sum())
    return {
        "gained_action": gained_a, "gained_language": gained_l, "lost_action": lost_a, "lost_language": lost_l,
        "gained_action_share": gained_a / max(1, gained_a + gained_l),
        "kept_fraction": float(layers.kept_fraction.mean()),
        "action_share_base": [float(x) for x in layers.action_share_base],
        "action_share_tuned": [float(x) for x in layers.action_share_tuned],
    }
