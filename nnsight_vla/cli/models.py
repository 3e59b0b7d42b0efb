"""Which model a command runs on: a checkpoint folder / hub id, the shipped small VLA, or a tiny random model."""

from __future__ import annotations

from typing import Any, Optional

import typer

from ..errors import InputError

SOURCE_HELP = ("checkpoint folder or hub id; 'shipped' (the small OpenVLA trained in this project) or "
               "'shipped-base' (its language-only base); default: a tiny RANDOM model of --family")
FAMILY_HELP = "model family: openvla, pi0 or pi0-fast"


def load_model(family: str, source: Optional[str], seed: int = 0, device: Optional[str] = None,
               quiet: bool = False) -> tuple[Any, bool]:
    """(the model, whether it has trained weights). Announces which model it is on stderr."""
    from .. import models

    if source in ("shipped", "shipped-base"):
        from ..training import shipped_path

        which = "finetuned" if source == "shipped" else "base"
        if family != "openvla":
            raise InputError(f"the shipped model is an OpenVLA; got --family {family}")
        vla = models.load("openvla", str(shipped_path(which)), device=device, dispatch=True)
        note = f"model: the shipped small OpenVLA ({which}, {shipped_path(which)})"
        trained = True
    elif source:
        vla = models.load(family, source, device=device, dispatch=True)
        note = f"model: {family} from {source}"
        trained = True
    else:
        vla = models.tiny(family, seed=seed, device=device)
        note = (f"model: a tiny RANDOM {family} (seed {seed}); its value vectors carry no concepts. "
                "Pass --source FOLDER, or --source shipped for the trained small VLA.")
        trained = False
    if not quiet:
        typer.echo(note, err=True)
    return vla, trained
