"""A small OpenVLA trained inside the project, so the whole method can be shown end to end on a model whose
concepts are known: corpus, demonstrations, phases (vision, language, grounding, LoRA actions), the one-command
training (``nnsight-vla train``), single-step gates and the pre-registered experiment (``nnsight-vla
experiment``). The shipped weights: :func:`shipped_model` (``"finetuned"`` or ``"base"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"finetuned": "openvla_small", "base": "openvla_small_base"}


def shipped_path(which: str = "finetuned") -> Path:
    """Folder of a shipped checkpoint: ``"finetuned"`` (phase 2, the policy) or ``"base"`` (phase 1, language
    only; the reference of the checkpoint diff)."""
    if which not in SHIPPED:
        raise ValueError(f"unknown shipped model {which!r}; use one of {sorted(SHIPPED)}")
    path = DATA_DIR / SHIPPED[which]
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the shipped {which} checkpoint is missing at {path}; train it with "
            "`python -m nnsight_vla.training.train --seed 0 --out nnsight_vla/data`"
        )
    return path


def shipped_model(which: str = "finetuned", **load_kwargs: Any):
    """The shipped small OpenVLA, loaded through the real loader ``nv.load("openvla", folder)``.

    The fine-tuned model's actions are un-normalised with its single ``norm_stats`` key (``"arm_scene"``), so
    ``vla.predict_action(image, instruction)`` returns OSC_POSE actions for
    :class:`~nnsight_vla.envs.arm_scene.ArmScene`.
    """
    import nnsight_vla as nv

    return nv.load("openvla", str(shipped_path(which)), **load_kwargs)


__all__ = ["DATA_DIR", "SHIPPED", "shipped_path", "shipped_model"]
