"""VLA families as nnsight models: a registry, ``load`` and ``tiny``."""

from __future__ import annotations

from typing import Any

from .base import VLA
from .registry import families, get, register


def load(family: str, source: str, *, revision: str | None = None, dtype: Any = None, device: Any = None,
         dispatch: bool = False, **kwargs: Any) -> VLA:
    """Load a VLA checkpoint as a traceable nnsight model.

    Args:
        family: "openvla", "pi0" or "pi0-fast" (see :func:`families`).
        source: a local checkpoint folder or a Hugging Face hub id, in the family's published layout.
        revision: hub revision.
        dtype: weight dtype, e.g. "bfloat16" (default float32).
        device: where the weights go, e.g. "cuda" (default "cpu").
        dispatch: load the weights now; by default they load on the first run (the structure is built on the
            meta device right away, so the module tree can be inspected for free).
    """
    return get(family)(source, revision=revision, dtype=dtype, device=device, dispatch=dispatch, **kwargs)


def tiny(family: str, seed: int = 0, dtype: Any = None, device: Any = None, **config: Any) -> VLA:
    """A small random model of the exact architecture of ``family``, built offline and deterministic in ``seed``.

    Keyword arguments override the family's tiny configuration (see the family module's ``tiny_config``).
    """
    return get(family)(None, tiny={"seed": seed, "config": config}, dtype=dtype, device=device)


__all__ = ["VLA", "families", "get", "load", "register", "tiny"]
