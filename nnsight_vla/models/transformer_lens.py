"""TransformerLens views of a VLA's language backbone.

TransformerLens 4's ``TransformerBridge`` rewires the module it wraps in place (bridge components replace
submodules). Our nnsight tree must stay intact, so the bridge wraps a *shared-weight clone*: a fresh module
skeleton whose parameters and buffers are the very same tensors (no copy, no extra memory). Weight edits are
seen by both; hooks and module surgery on one do not touch the other.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Callable

import torch
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM


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
