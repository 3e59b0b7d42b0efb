"""Checks that stop a broken forward from becoming a normal-looking action (ModelOutputError instead).

NaN weights, an overflowing edit or a saturated residual make every logit NaN or equal; greedy decoding would
then pick token 0 at every step, which OpenVLA's bins turn into an ordinary extreme-bin action.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ModelOutputError


def check_logits(logits: torch.Tensor, family: str, step: int, rows: Sequence[int] | None = None) -> None:
    """Refuse next-token logits (B, V) that are non-finite or all equal in any row (``rows``: the rows to check)."""
    values = logits if rows is None else logits[list(rows)]
    labels = list(range(logits.shape[0])) if rows is None else list(rows)
    finite = torch.isfinite(values).all(dim=-1)
    if not bool(finite.all()):
        bad = [labels[i] for i in torch.nonzero(~finite).flatten().tolist()]
        raise ModelOutputError(
            f"{family}: the logits of forward {step} contain NaN or infinite values (batch row(s) {bad}); the "
            "weights or an edit broke the forward, so no action is returned"
        )
    constant = (values == values[..., :1]).all(dim=-1)
    if bool(constant.any()):
        bad = [labels[i] for i in torch.nonzero(constant).flatten().tolist()]
        raise ModelOutputError(
            f"{family}: all {logits.shape[-1]} logits of forward {step} are equal (batch row(s) {bad}), so greedy "
            "decoding has no choice (it would return token 0); an edit or the weights saturated the model"
        )


def check_finite(values: torch.Tensor, family: str, what: str) -> None:
    """Refuse a non-finite model output (pi0's flow velocity, its final action chunk)."""
    finite = torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=-1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ModelOutputError(
            f"{family}: {what} contains NaN or infinite values (batch row(s) {bad}); the weights or an edit broke "
            "the forward, so no action is returned"
        )
