"""OpenVLA's ``config.json`` (the published ``OpenVLAConfig``) and the small config of ``nv.tiny("openvla")``.

Prismatic names its vision towers by timm model ids; :data:`VISION_PRESETS` says what those ids mean as
transformers configs, so the featurizers are built from transformers' own modules.
"""

from __future__ import annotations

from transformers import Dinov2WithRegistersConfig, LlamaConfig, PreTrainedConfig, SiglipVisionConfig

from ...errors import CheckpointError, InputError

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
        overrides = [o for o in (self.timm_override_act_layers or []) if o is not None]
        if overrides:
            raise CheckpointError(
                f"timm_override_act_layers={self.timm_override_act_layers} is not supported (it would change the "
                "vision towers' activation); published OpenVLA checkpoints have [null, null]"
            )
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
                (kind, {**preset, **_from_timm_kwargs(kind, o), "image_size": s})
                for (kind, preset), s, o in zip((VISION_PRESETS[i] for i in ids), sizes, overrides)
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
        raise CheckpointError(
            f"unsupported timm_model_kwargs {sorted(unknown)}; supported: {sorted(names)} and mlp_ratio"
        )
    out = {names[k]: v for k, v in kwargs.items() if k in names}
    hidden = kwargs.get("embed_dim")
    if kind == "siglip" and (hidden is not None or "mlp_ratio" in kwargs):
        hidden = hidden or VISION_PRESETS["vit_so400m_patch14_siglip_224"][1]["hidden_size"]
        out["intermediate_size"] = int(hidden * kwargs.get("mlp_ratio", 3.7362))  # timm's so400m ratio
    elif "mlp_ratio" in kwargs:
        out["mlp_ratio"] = kwargs["mlp_ratio"]
    return out


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
