"""TransformerLens views of the PaliGemma backbone of pi0 and pi0-FAST.

TransformerLens has no PaliGemma adapter, but PaliGemma's language model is a Gemma 1 nested under
``model.language_model``: the adapter here is TL's own Gemma 1 adapter with its paths moved under that prefix (as
TL does for Idefics3 / Emu3) plus the SigLIP tower and projector, registered out of tree. pi0's backbone has no
head, so :func:`pi0_backbone_bridge` wraps it in a ``PaliGemmaForConditionalGeneration`` skeleton that shares
its tensors and ties ``lm_head`` to the embedding. Bridges wrap shared-weight clones: no copies, nnsight's tree
stays untouched.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import PaliGemmaForConditionalGeneration

from .transformer_lens import bridge_tokenizer, shared_weight_clone

ARCHITECTURE = "PaliGemmaForConditionalGeneration"


def paligemma_adapter_class():
    """The TL architecture adapter for ``PaliGemmaForConditionalGeneration`` (built on first use)."""
    global _ADAPTER
    if _ADAPTER is None:
        from transformer_lens.model_bridge.generalized_components import (
            SiglipVisionEncoderBridge,
            VisionProjectionBridge,
        )
        from transformer_lens.model_bridge.supported_architectures.gemma1 import Gemma1ArchitectureAdapter

        class PaliGemmaArchitectureAdapter(Gemma1ArchitectureAdapter):
            """Gemma 1 text blocks under ``model.language_model``, SigLIP tower, linear projector, tied lm_head."""

            _testing_lm_attr = "model.language_model"

            def __init__(self, cfg: Any) -> None:
                super().__init__(cfg)
                self.cfg.is_multimodal = True
                self._extract_vision_dims(cfg)
                self._reprefix_components("model.", "model.language_model.")
                tower = SiglipVisionEncoderBridge(name="model.vision_tower", config=self.cfg)
                self.components["vision_encoder"] = tower
                self.components["vision_projector"] = VisionProjectionBridge(name="model.multi_modal_projector")

        _ADAPTER = PaliGemmaArchitectureAdapter
    return _ADAPTER


_ADAPTER = None


def register_paligemma_adapter() -> type:
    """Register the PaliGemma adapter with TransformerLens (idempotent); return the adapter class."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    adapter = paligemma_adapter_class()
    ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, adapter)
    return adapter


def _bridge(clone: nn.Module, tokenizer):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    register_paligemma_adapter()
    tok, folder = bridge_tokenizer(tokenizer)
    bridge = build_bridge_from_module(clone, ARCHITECTURE, hf_config=clone.config, tokenizer=tok)
    bridge._nnsight_vla_tokenizer_dir = folder  # keep a temporary tokenizer folder alive with the bridge
    return bridge


def paligemma_bridge(model: nn.Module, tokenizer=None):
    """A ``TransformerBridge`` over a shared-weight clone of a ``PaliGemmaForConditionalGeneration``."""
    return _bridge(shared_weight_clone(model, PaliGemmaForConditionalGeneration), tokenizer)


def pi0_backbone_bridge(pi0: nn.Module, tokenizer=None):
    """A ``TransformerBridge`` over pi0's PaliGemma backbone, as a ``PaliGemmaForConditionalGeneration`` that shares
    pi0's ``model.vlm`` tensors and whose ``lm_head`` is the tied input embedding."""
    vlm = pi0.model.vlm
    config = copy.deepcopy(vlm.config)
    config.tie_word_embeddings = True
    with torch.device("meta"):
        clone = PaliGemmaForConditionalGeneration(config)
    state = {f"model.{name}": tensor for name, tensor in vlm.state_dict().items()}
    state["lm_head.weight"] = vlm.language_model.embed_tokens.weight
    clone.load_state_dict(state, assign=True, strict=True)
    clone.lm_head.weight = clone.model.language_model.embed_tokens.weight
    for name, buf in vlm.named_buffers():
        owner, _, attr = name.rpartition(".")
        clone.model.get_submodule(owner)._buffers[attr] = buf
    return _bridge(clone.eval(), tokenizer)
