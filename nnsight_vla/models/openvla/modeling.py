"""The OpenVLA network on transformers' modules: DINOv2 + SigLIP featurizers, Prismatic's projector, Llama-2.

Both featurizers are read at the output of their second-to-last block, patch tokens only, no final norm
(Prismatic's ``get_intermediate_layers(n={depth - 2})``); the projector is "fused-gelu-mlp"; the image patches
are inserted after ``<s>``. The published remote code targets transformers 4.40 and timm, so it is rebuilt here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers import (
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionModel,
)

from .configuration import OpenVLAConfig

class PrismaticVisionBackbone(nn.Module):
    """DINOv2 (+ SigLIP) patch features from the second-to-last block, concatenated along the feature axis."""

    def __init__(self, configs: list[PreTrainedConfig]):
        super().__init__()
        self.featurizer = _featurizer(configs[0])
        self.fused_featurizer = _featurizer(configs[1]) if len(configs) > 1 else None
        self.embed_dim = sum(c.hidden_size for c in configs)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.fused_featurizer is None:
            return _penultimate_patches(self.featurizer, pixel_values)
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat(
            [_penultimate_patches(self.featurizer, img), _penultimate_patches(self.fused_featurizer, img_fused)], dim=2
        )


def _featurizer(config: PreTrainedConfig) -> nn.Module:
    if isinstance(config, Dinov2WithRegistersConfig):
        return Dinov2WithRegistersModel(config)
    return SiglipVisionModel(config)


def _penultimate_patches(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    # Prismatic reads timm's get_intermediate_layers(n={depth - 2}): the output of the second-to-last block,
    # prefix tokens dropped, no final norm. The last block is never run.
    pixel_values = pixel_values.to(next(model.parameters()).dtype)
    hidden = model.embeddings(pixel_values)
    if isinstance(model, Dinov2WithRegistersModel):
        blocks, prefix = model.encoder.layer, 1 + model.config.num_register_tokens
    else:
        blocks, prefix = model.encoder.layers, 0
    for block in blocks[:-1]:
        hidden = block(hidden, None)
    return hidden[:, prefix:]


class PrismaticProjector(nn.Module):
    """Prismatic's projector: fused "fc1 -> GELU -> fc2 -> GELU -> fc3", or "fc1 -> GELU -> fc2"."""

    def __init__(self, fused: bool, vision_dim: int, llm_dim: int):
        super().__init__()
        self.fused = fused
        if fused:
            self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
            self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
            self.fc3 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1, self.act_fn2 = nn.GELU(), nn.GELU()
        else:
            self.fc1 = nn.Linear(vision_dim, llm_dim)
            self.fc2 = nn.Linear(llm_dim, llm_dim)
            self.act_fn1 = nn.GELU()

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.act_fn1(self.fc1(patches)))
        return self.fc3(self.act_fn2(x)) if self.fused else x


class OpenVLAForActionPrediction(PreTrainedModel):
    """The OpenVLA network: vision backbone, projector and Llama, one forward per generated token."""

    config_class = OpenVLAConfig
    config: OpenVLAConfig
    base_model_prefix = "openvla"
    _supports_sdpa = True
    _no_split_modules = ["PrismaticProjector", "LlamaDecoderLayer"]

    def __init__(self, config: OpenVLAConfig):
        super().__init__(config)
        self.vision_backbone = PrismaticVisionBackbone(config.featurizer_configs())
        self.projector = PrismaticProjector(
            bool(config.use_fused_vision_backbone), self.vision_backbone.embed_dim, config.text_config.hidden_size
        )
        text_config = copy.deepcopy(config.text_config)
        text_config._attn_implementation = "sdpa"
        self.language_model = LlamaForCausalLM(text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # only the projector is ours; the sub-models initialise themselves
        if isinstance(module, nn.Linear) and module in self.projector.modules():
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        cache: Any = None,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        """A multimodal prefill (``pixel_values`` given: patches inserted after ``<s>``) or a text-only /
        cached decode step. With a padding ``attention_mask`` (the whole sequence so far, text positions only
        for the prefill) the position ids skip the padding. Returns ``CausalLMOutputWithPast``."""
        if pixel_values is None:
            if attention_mask is not None and position_ids is None:
                position_ids = _positions(attention_mask)[:, -input_ids.shape[1]:]
            return self.language_model(
                input_ids=input_ids, cache=cache, use_cache=use_cache, attention_mask=attention_mask,
                position_ids=position_ids,
            )
        if cache is not None:
            raise ValueError("a multimodal prefill cannot continue a cache")
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
            if position_ids is None:
                position_ids = _positions(attention_mask)
        return self.language_model(
            inputs_embeds=embeds, use_cache=use_cache, attention_mask=attention_mask, position_ids=position_ids
        )


def _positions(mask: torch.Tensor) -> torch.Tensor:
    # padding keeps its neighbour's position (it is masked); real tokens count 0, 1, 2, ... as in a single row
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
