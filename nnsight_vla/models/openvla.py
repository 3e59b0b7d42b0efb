"""OpenVLA (Prismatic DINOv2 + SigLIP vision, fused-GELU projector, Llama-2) re-implemented for transformers 5.

The published checkpoint (``openvla/openvla-7b``) ships remote code written for transformers 4.40 and timm
0.9; on transformers >= 4.50 it silently ignores the image (openvla issue 346), and timm needs torchvision.
Here the same architecture is built from transformers' own modules:

* ``vision_backbone.featurizer``: ``Dinov2WithRegistersModel`` (timm ``vit_large_patch14_reg4_dinov2``),
* ``vision_backbone.fused_featurizer``: ``SiglipVisionModel`` (timm ``vit_so400m_patch14_siglip_224``),
  both read at the output of the second-to-last block, patch tokens only, no final norm (Prismatic's
  ``get_intermediate_layers(n={depth - 2})``),
* ``projector``: fc1 -> GELU -> fc2 -> GELU -> fc3 (Prismatic's "fused-gelu-mlp"),
* ``language_model``: ``LlamaForCausalLM``; the image patches are inserted after ``<s>``.

The checkpoint layout is the published one: :data:`PRISMATIC_LAYOUT` converts timm's names (fused ``qkv``,
``ls1.scale_factor``, ``pos_embed`` without a class position, ``attn_pool``) to transformers' and back, so
real checkpoints load and tiny checkpoints save in exactly the published format.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoTokenizer,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from ..errors import CheckpointError, InputError
from .base import VLA, as_uint8_image, check_instruction
from .checkpoints import (
    Layout,
    Rule,
    SafetensorsCheckpoint,
    load_layout,
    materialize_rest,
    read_json,
    resolve_folder,
    save_safetensors,
    write_json_atomic,
)
from .registry import register
from .tree import Stack

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"

# What Prismatic's timm model ids mean, as transformers configs (timm defaults: exact GELU, LayerNorm eps 1e-6).
VISION_PRESETS: dict[str, tuple[str, dict]] = {
    "vit_large_patch14_reg4_dinov2.lvd142m": (
        "dinov2",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, patch_size=14,
             num_register_tokens=4, layerscale_value=1e-5, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True),
    ),
    "vit_so400m_patch14_siglip_224": (
        "siglip",
        dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14,
             hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=True),
    ),
}
TIMM_IDS = {
    "dinosiglip-vit-so-224px": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
}
IMAGE_SIZES = {"dinosiglip-vit-so-224px": [224, 224]}
LLAMA2_7B = dict(
    hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
    vocab_size=32064, max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=32000, tie_word_embeddings=False,
)


class OpenVLAConfig(PreTrainedConfig):
    """The ``config.json`` of an OpenVLA checkpoint (same fields as the published ``OpenVLAConfig``).

    ``vision_configs`` is ours: explicit transformers configs for the two featurizers. Published checkpoints do
    not carry it (their featurizers follow from ``timm_model_ids``); small models save it so their tiny vision
    towers can be rebuilt.
    """

    model_type = "openvla"
    sub_configs_defaults = {"text_config": LlamaConfig}

    vision_backbone_id: str = "dinosiglip-vit-so-224px"
    llm_backbone_id: str = "llama2-7b-pure"
    arch_specifier: str = "no-align+fused-gelu-mlp"
    use_fused_vision_backbone: bool | None = True
    image_resize_strategy: str = "resize-naive"
    text_config: dict | PreTrainedConfig | None = None
    llm_max_length: int = 2048
    pad_token_id: int | None = 32000
    pad_to_multiple_of: int = 64
    output_projector_states: bool = False
    norm_stats: dict | None = None
    n_action_bins: int = 256
    timm_model_ids: list | None = None
    timm_override_act_layers: list | None = None
    image_sizes: list | None = None
    hf_llm_id: str | None = None
    vision_configs: list | None = None
    timm_model_kwargs: list | None = None

    def featurizer_configs(self) -> list[PreTrainedConfig]:
        """transformers configs of the (one or two) featurizers, from ``vision_configs`` or the timm ids."""
        if self.vision_configs:
            specs = [(c["kind"], {k: v for k, v in c.items() if k != "kind"}) for c in self.vision_configs]
        else:
            ids = self.timm_model_ids or TIMM_IDS.get(self.vision_backbone_id)
            if not ids or any(i not in VISION_PRESETS for i in ids):
                raise CheckpointError(
                    f"unsupported vision backbone {self.vision_backbone_id!r} (timm ids {ids}); "
                    f"supported: {', '.join(VISION_PRESETS)}"
                )
            sizes = self.image_sizes or IMAGE_SIZES.get(self.vision_backbone_id, [224] * len(ids))
            overrides = self.timm_model_kwargs or [{}] * len(ids)
            specs = [
                (VISION_PRESETS[i][0], {**VISION_PRESETS[i][1], **_from_timm_kwargs(VISION_PRESETS[i][0], o), "image_size": s})
                for i, s, o in zip(ids, sizes, overrides)
            ]
        configs = []
        for kind, kwargs in specs:
            cls = {"dinov2": Dinov2WithRegistersConfig, "siglip": SiglipVisionConfig}.get(kind)
            if cls is None:
                raise CheckpointError(f"unknown featurizer kind {kind!r} in vision_configs (use 'dinov2' or 'siglip')")
            config = cls(**kwargs)
            config._attn_implementation = "sdpa"
            configs.append(config)
        if not self.use_fused_vision_backbone and len(configs) != 1:
            raise CheckpointError("use_fused_vision_backbone is false but two featurizers are configured")
        return configs

    @property
    def token_vocab_size(self) -> int:
        """The tokenizer's vocabulary without Prismatic's padding rows (32000 for openvla-7b)."""
        return self.text_config.vocab_size - self.pad_to_multiple_of


def _from_timm_kwargs(kind: str, kwargs: dict) -> dict:
    """timm ``create_model`` overrides (as small reference checkpoints record them) -> transformers config fields."""
    names = {"embed_dim": "hidden_size", "depth": "num_hidden_layers", "num_heads": "num_attention_heads",
             "patch_size": "patch_size", "img_size": "image_size"}
    unknown = set(kwargs) - set(names) - {"mlp_ratio"}
    if unknown:
        raise CheckpointError(f"unsupported timm_model_kwargs {sorted(unknown)}; supported: {sorted(names)} and mlp_ratio")
    out = {names[k]: v for k, v in kwargs.items() if k in names}
    hidden = kwargs.get("embed_dim")
    if kind == "siglip" and (hidden is not None or "mlp_ratio" in kwargs):
        hidden = hidden or VISION_PRESETS["vit_so400m_patch14_siglip_224"][1]["hidden_size"]
        out["intermediate_size"] = int(hidden * kwargs.get("mlp_ratio", 3.7362))  # timm's so400m ratio
    elif "mlp_ratio" in kwargs:
        out["mlp_ratio"] = kwargs["mlp_ratio"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# modules


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
    ):
        """A multimodal prefill (``pixel_values`` given: patches inserted after ``<s>``) or a text-only /
        cached decode step. Returns transformers' ``CausalLMOutputWithPast`` (``.logits``, ``.cache``)."""
        if pixel_values is None:
            return self.language_model(input_ids=input_ids, cache=cache, use_cache=use_cache, attention_mask=attention_mask)
        if cache is not None:
            raise ValueError("a multimodal prefill cannot continue a cache")
        patches = self.projector(self.vision_backbone(pixel_values))
        embeds = self.get_input_embeddings()(input_ids)
        embeds = torch.cat([embeds[:, :1], patches.to(embeds.dtype), embeds[:, 1:]], dim=1)
        if attention_mask is not None:
            ones = attention_mask.new_ones(attention_mask.shape[0], patches.shape[1])
            attention_mask = torch.cat([attention_mask[:, :1], ones, attention_mask[:, 1:]], dim=1)
        return self.language_model(inputs_embeds=embeds, use_cache=use_cache, attention_mask=attention_mask)


# ---------------------------------------------------------------------------------------------------------------
# the published checkpoint layout


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
    Rule(("embeddings.mask_token",), (), note="transformers-only (masked pretraining); absent from checkpoints, unused"),
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


# ---------------------------------------------------------------------------------------------------------------
# preprocessing and action decoding


class PrismaticImageTransform:
    """OpenVLA's image preprocessing without torchvision: resize (PIL bicubic, as torchvision does for PIL
    images), centre crop, scale to [0, 1], normalise with each featurizer's mean/std, stack channels.

    Reads the published ``preprocessor_config.json`` (PrismaticImageProcessor), using its ``tvf_*`` parameters
    verbatim when present (the published means/stds are bfloat16-rounded).
    """

    def __init__(self, config: dict):
        self.config = dict(config)
        sizes = [tuple(s) for s in config.get("input_sizes", [(3, 224, 224)])]
        strategy = config.get("image_resize_strategy", "resize-naive")
        if strategy not in ("resize-naive", "resize-crop", "letterbox"):
            raise CheckpointError(f"image_resize_strategy {strategy!r} is not one of resize-naive, resize-crop, letterbox")
        means = config.get("means", [(0.5, 0.5, 0.5)] * len(sizes))
        stds = config.get("stds", [(0.5, 0.5, 0.5)] * len(sizes))
        resize = config.get("tvf_resize_params")
        crop = config.get("tvf_crop_params")
        norm = config.get("tvf_normalize_params")
        self.steps = []
        for i, (_, h, w) in enumerate(sizes):
            size = resize[i]["size"] if resize else ((h, w) if strategy == "resize-naive" else h)
            interpolation = resize[i].get("interpolation", 3) if resize else 3
            out = tuple(crop[i]["output_size"]) if crop else (h, w)
            mean = norm[i]["mean"] if norm else list(means[i])
            std = norm[i]["std"] if norm else list(stds[i])
            self.steps.append((size, interpolation, out, np.asarray(mean, np.float32), np.asarray(std, np.float32)))
        self.letterbox = strategy == "letterbox" or bool(config.get("tvf_do_letterbox"))
        fill = config.get("tvf_letterbox_fill")
        self.fill = tuple(fill) if fill else tuple(int(x * 255) for x in means[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return self.steps[0][2]

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        """An HxWx3 uint8 image -> (3 * n_featurizers, H', W') float32 pixel values."""
        from PIL import Image

        pil = Image.fromarray(as_uint8_image(image))
        if self.letterbox:
            w, h = pil.size
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), self.fill)
            canvas.paste(pil, ((side - w) // 2, (side - h) // 2))
            pil = canvas
        planes = []
        for size, interpolation, (ch, cw), mean, std in self.steps:
            if isinstance(size, int):  # shorter side to `size`, like torchvision
                w, h = pil.size
                scale = size / min(w, h)
                target = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
                resized = pil.resize(target if scale != 1 else (w, h), Image.Resampling(interpolation))
            else:
                resized = pil.resize((size[1], size[0]), Image.Resampling(interpolation))
            w, h = resized.size
            top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
            cropped = resized.crop((left, top, left + cw, top + ch))
            array = np.asarray(cropped, dtype=np.float32) / 255.0
            planes.append(((array - mean) / std).transpose(2, 0, 1))
        return torch.from_numpy(np.concatenate(planes, axis=0))

    def to_dict(self) -> dict:
        return dict(self.config)


def default_image_config(configs: list[PreTrainedConfig], strategy: str = "resize-naive") -> dict:
    """A ``preprocessor_config.json`` in the published PrismaticImageProcessor format for these featurizers."""
    means = [[0.485, 0.456, 0.406] if isinstance(c, Dinov2WithRegistersConfig) else [0.5, 0.5, 0.5] for c in configs]
    stds = [[0.229, 0.224, 0.225] if isinstance(c, Dinov2WithRegistersConfig) else [0.5, 0.5, 0.5] for c in configs]
    sizes = [[3, c.image_size, c.image_size] for c in configs]
    return {
        "image_processor_type": "PrismaticImageProcessor",
        "processor_class": "PrismaticProcessor",
        "use_fused_vision_backbone": len(configs) > 1,
        "image_resize_strategy": strategy,
        "input_sizes": sizes,
        "interpolations": ["bicubic"] * len(configs),
        "means": means,
        "stds": stds,
        "tvf_resize_params": [
            {"size": [s[1], s[2]], "interpolation": 3, "max_size": None, "antialias": True} for s in sizes
        ],
        "tvf_crop_params": [{"output_size": [s[1], s[2]]} for s in sizes],
        "tvf_normalize_params": [{"mean": m, "std": s, "inplace": False} for m, s in zip(means, stds)],
        "tvf_do_letterbox": False,
        "tvf_letterbox_fill": None,
    }


class ActionBins:
    """OpenVLA's 256-bin action tokenizer: token id <-> bin centre in [-1, 1] <-> un-normalised action."""

    def __init__(self, token_vocab_size: int, n_bins: int, norm_stats: dict | None):
        if n_bins < 2 or n_bins > token_vocab_size:
            raise CheckpointError(f"model has no usable action tokens (n_action_bins={n_bins}, vocab={token_vocab_size})")
        self.vocab = token_vocab_size
        self.n_bins = n_bins
        bins = np.linspace(-1, 1, n_bins)
        self.centers = (bins[:-1] + bins[1:]) / 2.0
        self.norm_stats = norm_stats or {}

    @property
    def token_ids(self) -> np.ndarray:
        return np.arange(self.vocab - self.n_bins, self.vocab)

    def unnorm_key(self, key: str | None) -> str:
        keys = list(self.norm_stats)
        if not keys:
            raise InputError("this checkpoint has no norm_stats, so actions cannot be un-normalised; pass unnorm_key=False")
        if key is None:
            if len(keys) != 1:
                raise InputError(f"this model was trained on {len(keys)} datasets; pass unnorm_key=one of {keys}")
            return keys[0]
        if key not in self.norm_stats:
            raise InputError(f"unknown unnorm_key {key!r}; this checkpoint has statistics for: {keys}")
        return key

    def action_dim(self, key: str | None) -> int:
        if key is False or not self.norm_stats:
            return 7
        return len(self.norm_stats[self.unnorm_key(key)]["action"]["q01"])

    def normalized(self, token_ids: np.ndarray) -> np.ndarray:
        discretized = self.vocab - np.asarray(token_ids)
        return self.centers[np.clip(discretized - 1, 0, self.centers.shape[0] - 1)]

    def decode(self, token_ids: np.ndarray, key: str | None | bool) -> np.ndarray:
        normalized = self.normalized(token_ids)
        if key is False:
            return normalized
        stats = self.norm_stats[self.unnorm_key(key)]["action"]
        low, high = np.asarray(stats["q01"]), np.asarray(stats["q99"])
        mask = np.asarray(stats.get("mask", np.ones_like(low, dtype=bool)))
        return np.where(mask, 0.5 * (normalized + 1) * (high - low) + low, normalized)


# ---------------------------------------------------------------------------------------------------------------
# the nnsight model


TINY_NORM_STATS = {
    "tiny": {
        "action": {
            "q01": [-0.03, -0.03, -0.03, -0.1, -0.1, -0.1, 0.0],
            "q99": [0.03, 0.03, 0.03, 0.1, 0.1, 0.1, 1.0],
            "mask": [True, True, True, True, True, True, False],
        }
    }
}


def tiny_config(overrides: dict | None = None) -> OpenVLAConfig:
    """The config of a tiny OpenVLA: same wiring, small widths. ``overrides`` may set ``text`` (Llama fields),
    ``featurizer`` / ``fused_featurizer`` (vision fields), ``image_size``, ``vocab`` (tokenizer size, a multiple
    of 64), ``norm_stats``."""
    overrides = dict(overrides or {})
    vocab = int(overrides.pop("vocab", 1024))
    image_size = int(overrides.pop("image_size", 56))
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False)
    text.update(overrides.pop("text", {}))
    text.update(vocab_size=vocab + 64, pad_token_id=vocab)
    dino = dict(kind="dinov2", hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=4, patch_size=14,
                num_register_tokens=4, layerscale_value=0.1, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
                image_size=image_size)
    dino.update(overrides.pop("featurizer", {}))
    siglip = dict(kind="siglip", hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
                  patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=True, image_size=image_size)
    siglip.update(overrides.pop("fused_featurizer", {}))
    norm_stats = overrides.pop("norm_stats", TINY_NORM_STATS)
    if overrides:
        raise InputError(f"unknown tiny OpenVLA overrides: {sorted(overrides)}")
    return OpenVLAConfig(
        text_config=text, vision_configs=[dino, siglip], norm_stats=norm_stats, pad_token_id=vocab,
        image_sizes=[image_size, image_size], timm_model_ids=list(TIMM_IDS["dinosiglip-vit-so-224px"]),
        timm_override_act_layers=[None, None], hf_llm_id="meta-llama/Llama-2-7b-hf",
    )


@register("openvla")
class OpenVLA(VLA):
    """OpenVLA as an nnsight model with the uniform tree (``vla.layers[i].mlp.act``).

    ``predict_action(image, instruction, unnorm_key=None)`` returns the 7-dim action
    (dx, dy, dz, droll, dpitch, dyaw, gripper) as numpy, decoded from 7 greedily generated action tokens,
    one forward pass each (prefill + 6 cached steps): ``tracer.iter[:]`` reaches all seven.
    """

    stacks = (Stack("backbone", "layers", "language_model.model.layers"),)
    lm_head_path = "language_model.lm_head"
    camera_names = ("primary",)

    # -- loading -------------------------------------------------------------------------------------------

    def _load_processors(self, source, *, revision, tiny) -> None:
        if tiny is not None:
            from .tokenizer import build_llama_style_tokenizer

            self.config = tiny_config(tiny.get("config"))
            self.tokenizer = build_llama_style_tokenizer(vocab_size=self.config.token_vocab_size)
            self.image_processor = PrismaticImageTransform(default_image_config(self.config.featurizer_configs()))
        else:
            self.folder = resolve_folder(source, revision, patterns=("*.json", "*.safetensors", "tokenizer*"))
            self.config = OpenVLAConfig.from_dict(read_json(self.folder, "config.json"))
            try:
                # config= keeps transformers from re-reading config.json (whose auto_map would ask about remote code)
                self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder), config=self.config, trust_remote_code=False)
            except Exception as error:  # noqa: BLE001
                raise CheckpointError(f"could not load the tokenizer from {self.folder}: {error}") from error
            image_config = (
                read_json(self.folder, "preprocessor_config.json")
                if (self.folder / "preprocessor_config.json").is_file()
                else default_image_config(self.config.featurizer_configs(), self.config.image_resize_strategy)
            )
            self.image_processor = PrismaticImageTransform(image_config)
        self.bins = ActionBins(self.config.token_vocab_size, self.config.n_action_bins, self.config.norm_stats)
        self.empty_token_id = self._empty_token_id()

    def _empty_token_id(self) -> int | None:
        # OpenVLA appends Llama's "▁" token (id 29871) to every prompt, as seen in training
        token_id = self.tokenizer.convert_tokens_to_ids("▁")
        return None if token_id is None or token_id == self.tokenizer.unk_token_id else int(token_id)

    def _build(self, source, *, revision, dtype, device, tiny, meta) -> nn.Module:
        from .base import resolve_dtype

        if meta:
            return OpenVLAForActionPrediction(self.config)
        if tiny is not None:
            torch.manual_seed(int(tiny.get("seed", 0)))
            model = OpenVLAForActionPrediction(self.config)
            # the published layout has no class-token position for DINOv2: keep tiny models representable in it
            with torch.no_grad():
                model.vision_backbone.featurizer.embeddings.position_embeddings[:, 0].zero_()
            return model.to(dtype=resolve_dtype(dtype) or torch.float32, device=device or "cpu")
        with torch.device("meta"):
            model = OpenVLAForActionPrediction(self.config)
        load_layout(model, SafetensorsCheckpoint(self.folder), PRISMATIC_LAYOUT, resolve_dtype(dtype) or torch.float32, device)
        materialize_rest(model, device)
        return model

    def save_pretrained(self, folder) -> None:
        """Write a checkpoint in the published openvla-7b layout: config.json, preprocessor_config.json,
        tokenizer files and (sharded) safetensors under the original parameter names."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.dispatch()
        config = self.config.to_dict()
        config["architectures"] = ["OpenVLAForActionPrediction"]
        config["auto_map"] = {
            "AutoConfig": "configuration_prismatic.OpenVLAConfig",
            "AutoModelForVision2Seq": "modeling_prismatic.OpenVLAForActionPrediction",
        }
        write_json_atomic(folder / "config.json", config)
        write_json_atomic(folder / "preprocessor_config.json", self.image_processor.to_dict())
        self.tokenizer.save_pretrained(str(folder))
        save_safetensors(original_state_dict(self._module), folder, max_shard_size=self._shard_size())

    def _shard_size(self) -> int | str:
        # tiny checkpoints are sharded too, so the sharded-index code path is what tests exercise
        n_bytes = sum(p.numel() * p.element_size() for p in self._module.parameters())
        return max(n_bytes // 2 + 1, 1024) if n_bytes < 1e9 else "5GB"

    # -- the uniform surface -------------------------------------------------------------------------------

    @property
    def action_token_ids(self) -> np.ndarray:
        """Ids of the 256 action tokens: the last 256 ids of the tokenizer's vocabulary (31744..31999 for 7B)."""
        return self.bins.token_ids

    @property
    def action_dim(self) -> int:
        return self.bins.action_dim(None if len(self.bins.norm_stats) == 1 else False)

    def forward_count(self, unnorm_key: str | None | bool = None, **_: Any) -> int:
        """One forward per action token: the multimodal prefill, then a cached step per further token (7)."""
        return self.bins.action_dim(unnorm_key)

    def input_embeddings(self) -> torch.Tensor:
        return self._module.language_model.get_input_embeddings().weight

    def to_transformer_lens(self, stack: str = "backbone"):
        """A TransformerLens ``TransformerBridge`` over the Llama backbone, sharing its weights."""
        from .transformer_lens import llama_bridge

        self.stack(stack)
        self.dispatch()
        return llama_bridge(self._module.language_model, self.tokenizer)

    # -- inference -----------------------------------------------------------------------------------------

    def prompt(self, instruction: str) -> str:
        """OpenVLA's prompt for an instruction (lower-cased, as in the published predict_action)."""
        return PROMPT.format(instruction=check_instruction(instruction).lower())

    def prepare(self, image: Any, instruction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (1, T), pixel_values (1, 6, H, W)) for one image and instruction."""
        pixel_values = self.image_processor(as_uint8_image(image, "image")).unsqueeze(0)
        ids = self.tokenizer(self.prompt(instruction), return_tensors="pt").input_ids
        if self.empty_token_id is not None and ids[0, -1].item() != self.empty_token_id:
            ids = torch.cat([ids, torch.tensor([[self.empty_token_id]])], dim=1)
        return ids, pixel_values

    def _predict_action(
        self, images: Any, instruction: str, state: Any = None, unnorm_key: str | None | bool = None,
        restrict_to_action_tokens: bool = False,
    ) -> np.ndarray:
        """Greedy-decode the 7 action tokens and un-normalise them.

        Args:
            images: one HxWx3 uint8 image (or ``{"primary": image}``).
            instruction: the task, e.g. "pick up the black bowl".
            unnorm_key: which dataset statistics to un-normalise with (required when the checkpoint has several);
                ``False`` returns the normalised [-1, 1] actions.
            restrict_to_action_tokens: pick the best *action* token at each step. Off by default, as in the
                published code, where a non-action token maps to a clipped extreme bin.
        """
        if state is not None:
            raise InputError("OpenVLA takes no robot state; pass state=None")
        (image,) = self.images_by_camera(images)
        n_tokens = self.bins.action_dim(unnorm_key)
        ids = self.generate_action_tokens(image, instruction, n_tokens, restrict_to_action_tokens)
        return self.bins.decode(ids, unnorm_key)

    def generate_action_tokens(
        self, image: Any, instruction: str, n_tokens: int = 7, restrict_to_action_tokens: bool = False
    ) -> np.ndarray:
        """The greedily generated action token ids (one forward pass per token)."""
        input_ids, pixel_values = self.prepare(image, instruction)
        return self.greedy_action_tokens(input_ids, pixel_values, n_tokens, restrict_to_action_tokens)

    def greedy_action_tokens(
        self, input_ids: torch.Tensor, pixel_values: torch.Tensor, n_tokens: int = 7, restrict_to_action_tokens: bool = False
    ) -> np.ndarray:
        """Greedy decoding from prepared inputs: a multimodal prefill, then one cached forward per further token."""
        model = self._module
        param = next(model.parameters())
        input_ids, pixel_values = input_ids.to(param.device), pixel_values.to(param.device, param.dtype)
        allowed = None
        if restrict_to_action_tokens:
            allowed = torch.full((self.vocab_size,), float("-inf"), device=param.device)
            allowed[torch.as_tensor(self.action_token_ids, device=param.device)] = 0.0
        tokens = []
        with torch.no_grad():
            out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
            for step in range(n_tokens):
                logits = out.logits[:, -1].float()
                if allowed is not None:
                    logits = logits + allowed
                next_id = logits.argmax(dim=-1)
                tokens.append(int(next_id[0]))
                if step + 1 < n_tokens:
                    out = model(input_ids=next_id[:, None], cache=out.cache, use_cache=True)
        return np.asarray(tokens)

    def _scan_call(self):
        ids = torch.ones(1, 4, dtype=torch.long)
        size = self.image_processor.image_size
        channels = 3 * len(self.image_processor.steps)
        pixels = torch.zeros(1, channels, *size)
        return self._module.forward, (), {"input_ids": ids, "pixel_values": pixels}
