"""OpenVLA (Prismatic DINOv2 + SigLIP vision, fused-GELU projector, Llama-2), split the transformers way.

``configuration`` (config.json, tiny config), ``modeling`` (the network on transformers' modules), ``conversion``
(the published checkpoint layout), ``processing`` (prompt, image transform, action bins) and ``family`` (the
registered nnsight model). Importing the package registers the ``openvla`` family.
"""

from __future__ import annotations

from .configuration import IMAGE_SIZES, LLAMA2_7B, TIMM_IDS, TINY_NORM_STATS, VISION_PRESETS, OpenVLAConfig, tiny_config
from .conversion import DINOV2_RULES, PRISMATIC_LAYOUT, SIGLIP_RULES, original_state_dict
from .family import OpenVLA
from .modeling import OpenVLAForActionPrediction, PrismaticProjector, PrismaticVisionBackbone, _penultimate_patches
from .processing import PROMPT, ActionBins, PrismaticImageTransform, default_image_config

__all__ = [
    "DINOV2_RULES", "IMAGE_SIZES", "LLAMA2_7B", "PRISMATIC_LAYOUT", "PROMPT", "SIGLIP_RULES", "TIMM_IDS",
    "TINY_NORM_STATS", "VISION_PRESETS", "ActionBins", "OpenVLA", "OpenVLAConfig", "OpenVLAForActionPrediction",
    "PrismaticImageTransform", "PrismaticProjector", "PrismaticVisionBackbone", "_penultimate_patches",
    "default_image_config", "original_state_dict", "tiny_config",
]
