"""The small OpenVLA that is trained: its dimensions, how it is built, how its action statistics are set.

The model is an :class:`nnsight_vla.models.openvla.OpenVLA` of the exact architecture (DINOv2 + SigLIP
featurizers, fused-GELU projector, Llama), built like ``nv.tiny("openvla", ...)`` and then given the tokenizer
trained on the corpus; it is saved with the family's own ``save_pretrained`` (the published checkpoint layout)
and read back with ``nv.load("openvla", folder)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class ModelDims:
    """Widths of the trained model (defaults: ~2.6 M parameters, ~10 MB per float32 checkpoint)."""

    hidden: int = 128
    layers: int = 8
    heads: int = 4
    mlp: int = 512
    vocab: int = 1024
    image_size: int = 64
    patch: int = 8
    vision_hidden: int = 48
    vision_layers: int = 4
    vision_heads: int = 2

    def overrides(self) -> dict:
        """``tiny_config`` overrides for these widths."""
        return {
            "vocab": self.vocab,
            "image_size": self.image_size,
            "text": dict(hidden_size=self.hidden, intermediate_size=self.mlp, num_hidden_layers=self.layers,
                         num_attention_heads=self.heads, num_key_value_heads=self.heads, max_position_embeddings=256),
            "featurizer": dict(hidden_size=self.vision_hidden, num_hidden_layers=self.vision_layers,
                               num_attention_heads=self.vision_heads, patch_size=self.patch),
            "fused_featurizer": dict(hidden_size=self.vision_hidden, intermediate_size=4 * self.vision_hidden,
                                     num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
                                     patch_size=self.patch),
        }

    def to_dict(self) -> dict:
        return asdict(self)


def build_vla(dims: ModelDims, tokenizer, seed: int = 0):
    """A freshly initialised OpenVLA of ``dims`` (deterministic in ``seed``) using ``tokenizer``."""
    import nnsight_vla as nv

    if len(tokenizer) != dims.vocab + 1:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens; the model expects {dims.vocab} + <PAD>")
    vla = nv.tiny("openvla", seed=seed, **dims.overrides())
    vla.tokenizer = tokenizer
    vla.empty_token_id = vla._empty_token_id()  # OpenVLA's trailing "▁", looked up in the new vocabulary
    return vla


def set_norm_stats(vla, key: str, stats: dict) -> None:
    """Record the action statistics under ``key`` in the model's config (saved in config.json's norm_stats)."""
    from ..models.openvla import ActionBins

    vla.config.norm_stats = {key: stats}
    vla.bins = ActionBins(vla.config.token_vocab_size, vla.config.n_action_bins, vla.config.norm_stats)


def parameter_count(module: torch.nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))
