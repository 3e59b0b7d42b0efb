"""Light action fine-tuning with LoRA (``peft``), as the published LIBERO OpenVLA checkpoints were tuned.

Low-rank adapters go on every linear layer of the Llama; the action tokens' rows of the input embedding and
of ``lm_head`` are trained (peft's trainable tokens); the vision towers and the projector are trained in full.
Everything else of the language model stays as language pretraining left it, so the policy has to build on the
language model's features. After training the adapters are merged into the weights (``merge_and_unload``), so
the checkpoint keeps OpenVLA's layout and loads with ``nv.load``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

from torch import nn

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (OpenVLA's LIBERO fine-tunes used rank 32 on a 4096-wide model)."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def target_pattern(language_model_prefix: str = "language_model") -> str:
    """The regular expression (peft full-matches module names) of the Llama's linear layers only; the vision
    towers also have ``q_proj``-style names and must not get adapters."""
    names = "|".join(LLAMA_LINEARS)
    return rf"{language_model_prefix}\.model\.layers\.\d+\.(self_attn|mlp)\.({names})"


def attach_lora(model: nn.Module, action_token_ids: Sequence[int], settings: LoraSettings = LoraSettings(),
                full: Sequence[str] = ("vision_backbone", "projector")):
    """Wrap ``model`` (an ``OpenVLAForActionPrediction``) for LoRA training, in place; returns the peft model.

    Trainable afterwards: the adapters, the rows ``action_token_ids`` of ``embed_tokens`` and ``lm_head``, and
    every parameter of the submodules named in ``full``."""
    from peft import LoraConfig, get_peft_model

    ids = [int(i) for i in action_token_ids]
    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, bias="none",
        target_modules=target_pattern(),
        trainable_token_indices={"embed_tokens": ids, "lm_head": ids},
    )
    peft_model = get_peft_model(model, config)
    for name in full:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    return peft_model


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters and the trained token rows into the base weights; returns the plain model (the same
    object that was wrapped, with its original module objects back in place)."""
    return peft_model.merge_and_unload()


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return int(trainable), int(total)
