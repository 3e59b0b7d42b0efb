"""The published openvla-7b parameter layout <-> our module tree (timm names <-> transformers names).

:data:`PRISMATIC_LAYOUT` converts timm's names (fused ``qkv``, ``ls1.scale_factor``, ``pos_embed`` without a
class position, ``attn_pool``) to transformers' and back, so real checkpoints load and tiny checkpoints save in
exactly the published format.
"""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import Layout, Rule

def _cat0(tensors):
    return [torch.cat(tensors, dim=0)]


def _chunk3(tensors):
    return list(torch.chunk(tensors[0], 3, dim=0))


def _split_q_kv(tensors):
    dim = tensors[0].shape[0] // 3
    return list(torch.split(tensors[0], [dim, 2 * dim], dim=0))


def _prepend_zero_position(tensors):
    # timm (no_embed_class) has no position for the class token; transformers adds position 0 to it
    pos = tensors[0]
    return [torch.cat([pos.new_zeros(pos.shape[0], 1, pos.shape[2]), pos], dim=1)]


def _drop_class_position(tensors):
    return [tensors[0][:, 1:]]


def _squeeze0(tensors):
    return [tensors[0].reshape(tensors[0].shape[1:])]


def _unsqueeze0(tensors):
    return [tensors[0].unsqueeze(0)]


def _wb(ours: str, original: str) -> Rule:
    return Rule((ours + ".{p}",), (original + ".{p}",))


DINOV2_RULES = (
    Rule(("embeddings.cls_token",), ("cls_token",)),
    Rule(("embeddings.register_tokens",), ("reg_token",)),
    Rule(("embeddings.position_embeddings",), ("pos_embed",), _prepend_zero_position, _drop_class_position,
         note="timm has no class-token position; ours is a zero row 0"),
    Rule(("embeddings.mask_token",), (),
         note="transformers-only (masked pretraining); absent from checkpoints, unused"),
    _wb("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    _wb("encoder.layer.{i}.norm1", "blocks.{i}.norm1"),
    Rule(("encoder.layer.{i}.attention.q_proj.{p}", "encoder.layer.{i}.attention.k_proj.{p}",
          "encoder.layer.{i}.attention.v_proj.{p}"), ("blocks.{i}.attn.qkv.{p}",), _chunk3, _cat0,
         note="timm fuses q, k, v"),
    _wb("encoder.layer.{i}.attention.o_proj", "blocks.{i}.attn.proj"),
    Rule(("encoder.layer.{i}.layer_scale1.lambda1",), ("blocks.{i}.ls1.scale_factor",),
         note="OpenVLA renamed timm's LayerScale gamma to scale_factor"),
    _wb("encoder.layer.{i}.norm2", "blocks.{i}.norm2"),
    _wb("encoder.layer.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    _wb("encoder.layer.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    Rule(("encoder.layer.{i}.layer_scale2.lambda1",), ("blocks.{i}.ls2.scale_factor",)),
    _wb("layernorm", "norm"),
)

SIGLIP_RULES = (
    Rule(("embeddings.position_embedding.weight",), ("pos_embed",), _squeeze0, _unsqueeze0,
         note="timm keeps a leading batch axis"),
    _wb("embeddings.patch_embedding", "patch_embed.proj"),
    _wb("encoder.layers.{i}.layer_norm1", "blocks.{i}.norm1"),
    Rule(("encoder.layers.{i}.self_attn.q_proj.{p}", "encoder.layers.{i}.self_attn.k_proj.{p}",
          "encoder.layers.{i}.self_attn.v_proj.{p}"), ("blocks.{i}.attn.qkv.{p}",), _chunk3, _cat0),
    _wb("encoder.layers.{i}.self_attn.out_proj", "blocks.{i}.attn.proj"),
    _wb("encoder.layers.{i}.layer_norm2", "blocks.{i}.norm2"),
    _wb("encoder.layers.{i}.mlp.fc1", "blocks.{i}.mlp.fc1"),
    _wb("encoder.layers.{i}.mlp.fc2", "blocks.{i}.mlp.fc2"),
    _wb("post_layernorm", "norm"),
    Rule(("head.probe",), ("attn_pool.latent",)),
    Rule(("head.attention.in_proj_weight",), ("attn_pool.q.weight", "attn_pool.kv.weight"), _cat0, _split_q_kv,
         note="timm's separate q and fused kv are torch MultiheadAttention's in_proj"),
    Rule(("head.attention.in_proj_bias",), ("attn_pool.q.bias", "attn_pool.kv.bias"), _cat0, _split_q_kv),
    _wb("head.attention.out_proj", "attn_pool.proj"),
    _wb("head.layernorm", "attn_pool.norm"),
    _wb("head.mlp.fc1", "attn_pool.mlp.fc1"),
    _wb("head.mlp.fc2", "attn_pool.mlp.fc2"),
)

#: Our parameter names <-> the published openvla-7b names. Unused in the forward but present in the checkpoint
#: (and therefore kept): the last block of each featurizer, DINOv2's final norm, SigLIP's final norm and head.
PRISMATIC_LAYOUT = (
    Layout()
    .add("vision_backbone.featurizer.", "vision_backbone.featurizer.", DINOV2_RULES)
    .add("vision_backbone.fused_featurizer.", "vision_backbone.fused_featurizer.", SIGLIP_RULES)
    .add("projector.", "projector.", (Rule(("{rest}",), ("{rest}",)),))
    .add("language_model.", "language_model.", (Rule(("{rest}",), ("{rest}",)),))
)


def original_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the published openvla-7b names and shapes (works on the meta device)."""
    return PRISMATIC_LAYOUT.to_original(model.state_dict())
