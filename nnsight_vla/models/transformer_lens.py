"""TransformerLens views of a VLA's language backbone.

TransformerLens 4's ``TransformerBridge`` rewires the module it wraps in place (bridge components replace
submodules). Our nnsight tree must stay intact, so the bridge wraps a *shared-weight clone*: a fresh module
skeleton whose parameters and buffers are the very same tensors (no copy, no extra memory). Weight edits are
seen by both; hooks and module surgery on one do not touch the other. :class:`MultimodalBridge` feeds a bridge the
embeddings of an observation (image(s) included), so TransformerLens sees ``predict_action``'s first forward.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any, Callable

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from ..errors import InputError


def shared_weight_clone(module: nn.Module, build: Callable[[object], nn.Module]) -> nn.Module:
    """A new module built by ``build(config)`` on the meta device, then pointed at ``module``'s tensors."""
    with torch.device("meta"):
        clone = build(copy.deepcopy(module.config))
    clone.load_state_dict(module.state_dict(), assign=True, strict=True)
    for name, buf in module.named_buffers():
        owner, _, attr = name.rpartition(".")
        clone.get_submodule(owner)._buffers[attr] = buf
    return clone.eval()


def bridge_tokenizer(tokenizer):
    """TransformerLens re-loads the tokenizer from its ``name_or_path``: give an in-memory one a folder."""
    if tokenizer is None or tokenizer.init_kwargs.get("name_or_path"):
        return tokenizer, None
    folder = tempfile.TemporaryDirectory(prefix="nnsight_vla_tok_")
    tokenizer.save_pretrained(folder.name)
    return AutoTokenizer.from_pretrained(folder.name), folder


def build_bridge(module: nn.Module, architecture: str, build: Callable[[object], nn.Module], tokenizer=None):
    """A ``TransformerBridge`` (``blocks.{l}.mlp.hook_post`` etc.) over a shared-weight clone of ``module``."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    clone = shared_weight_clone(module, build)
    tok, folder = bridge_tokenizer(tokenizer)
    bridge = build_bridge_from_module(clone, architecture, hf_config=clone.config, tokenizer=tok)
    bridge._nnsight_vla_tokenizer_dir = folder  # keep the tokenizer folder alive as long as the bridge
    return bridge


def llama_bridge(language_model: nn.Module, tokenizer=None):
    """The TransformerLens bridge of a ``LlamaForCausalLM`` (OpenVLA's backbone)."""
    return build_bridge(language_model, "LlamaForCausalLM", LlamaForCausalLM, tokenizer)


# -- the image in TransformerLens: the backbone's first forward as inputs_embeds ----------------------------------


def multimodal_inputs(vla, images: Any, instruction: str, state: Any = None) -> tuple[torch.Tensor, dict]:
    """``(inputs_embeds, kwargs)``: what the backbone's first ``predict_action`` forward takes, for a bridge.

    From ``vla.forward_inputs`` (one observation). OpenVLA: Prismatic's projected patches spliced after ``<s>``.
    pi0-FAST: SigLIP features in the ``<image>`` slots, ``token_type_ids`` zeros (bidirectional prefix). pi0:
    ``embed_prefix`` (cameras, right-padded prompt) with its ``attention_mask``, ``position_ids`` and
    ``token_type_ids``. Gemma's sqrt(d) scaling happens inside the model, as for transformers' own call."""
    if not isinstance(instruction, str):
        raise InputError("multimodal_inputs takes one observation (an instruction string), not a batch")
    vla.dispatch()
    model = vla._module
    param = next(model.parameters())
    family = vla.family
    if family not in ("openvla", "pi0-fast", "pi0"):
        raise InputError(f"no multimodal TransformerLens inputs for family {family!r}")
    inputs = {k: v.to(param.device) for k, v in vla.forward_inputs(images, instruction, state).items()}
    ids, pixel_values = inputs["input_ids"], inputs["pixel_values"].to(param.dtype)
    if family == "openvla":
        patches = model.projector(model.vision_backbone(pixel_values))
        embeds = model.get_input_embeddings()(ids)
        return torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1), {}
    if family == "pi0-fast":
        image_slots = ids == vla.config.image_token_id
        embeds = model.get_input_embeddings()(ids.masked_fill(image_slots, 0))
        features = model.model.get_image_features(pixel_values).pooler_output.to(embeds.dtype)
        embeds = embeds.masked_scatter(image_slots[..., None], features)
        return embeds, {"token_type_ids": inputs["token_type_ids"]}
    embeds = model.model.embed_prefix(ids, pixel_values, inputs["pixel_attention_mask"])
    mask = inputs["attention_mask"]
    positions = mask.cumsum(-1) - 1  # as PI0Model counts them
    return embeds, {"attention_mask": mask, "position_ids": positions, "token_type_ids": torch.zeros_like(mask)}


def multimodal_embeds(vla, images: Any, instruction: str, state: Any = None) -> torch.Tensor:
    """The exact ``inputs_embeds`` (1, T, d_model) of the backbone's first forward (see :func:`multimodal_inputs`)."""
    return multimodal_inputs(vla, images, instruction, state)[0]


class MultimodalBridge:
    """A TransformerLens bridge that takes observations: ``run_with_cache(images, instruction, state=None)``.

    Each call builds :func:`multimodal_inputs` and runs the bridge on the embeddings, reproducing the first
    forward of ``predict_action`` (``blocks.{l}.mlp.hook_post`` = ``vla.layers[l].mlp.act.output``). Every other
    attribute is the wrapped bridge's. pi0's prompt is right-padded: its last real position is
    ``attention_mask.sum() - 1``, see :meth:`inputs`."""

    def __init__(self, bridge: Any, vla: Any) -> None:
        self.bridge = bridge
        self.vla = vla

    def inputs(self, images: Any, instruction: str, state: Any = None) -> tuple[torch.Tensor, dict]:
        return multimodal_inputs(self.vla, images, instruction, state)

    def __call__(self, images: Any, instruction: str, state: Any = None, **kwargs: Any) -> Any:
        embeds, extra = self.inputs(images, instruction, state)
        return self.bridge(embeds, **extra, **kwargs)

    def run_with_cache(self, images: Any, instruction: str, state: Any = None, **kwargs: Any) -> Any:
        embeds, extra = self.inputs(images, instruction, state)
        return self.bridge.run_with_cache(embeds, **extra, **kwargs)

    def run_with_hooks(self, images: Any, instruction: str, state: Any = None, **kwargs: Any) -> Any:
        embeds, extra = self.inputs(images, instruction, state)
        return self.bridge.run_with_hooks(embeds, **extra, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["bridge"], name)


def multimodal_bridge(vla, bridge: Any = None) -> MultimodalBridge:
    """``vla.to_transformer_lens()`` (or ``bridge``) taking observations with their image(s)."""
    return MultimodalBridge(vla.to_transformer_lens() if bridge is None else bridge, vla)
