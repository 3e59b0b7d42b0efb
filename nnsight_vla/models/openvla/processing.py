"""OpenVLA's inputs and outputs: the prompt, Prismatic's image transform and the 256-bin action tokenizer.

:class:`PrismaticImageTransform` reads the published ``preprocessor_config.json`` and reproduces it without
torchvision; :class:`ActionBins` maps action token ids to bin centres and un-normalised actions.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image
from transformers import Dinov2WithRegistersConfig, PreTrainedConfig

from ...errors import CheckpointError, InputError
from ..checkpoints import check_quantiles
from ..preprocessing import as_uint8_image

PROMPT = "In: What action should the robot take to {instruction}?\nOut:"


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
            raise CheckpointError(
                f"image_resize_strategy {strategy!r} is not one of resize-naive, resize-crop, letterbox"
            )
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
            raise CheckpointError(
                f"model has no usable action tokens (n_action_bins={n_bins}, vocab={token_vocab_size})"
            )
        self.vocab = token_vocab_size
        self.n_bins = n_bins
        bins = np.linspace(-1, 1, n_bins)
        self.centers = (bins[:-1] + bins[1:]) / 2.0
        self.norm_stats = check_norm_stats(norm_stats)

    @property
    def token_ids(self) -> np.ndarray:
        return np.arange(self.vocab - self.n_bins, self.vocab)

    def unnorm_key(self, key: str | None) -> str:
        keys = list(self.norm_stats)
        if not keys:
            raise InputError(
                "this checkpoint has no norm_stats, so actions cannot be un-normalised; pass unnorm_key=False"
            )
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



def check_norm_stats(norm_stats: Any) -> dict:
    """OpenVLA's ``norm_stats`` checked: per dataset ``action.q01 <= action.q99`` (numbers, equal lengths) and
    an optional boolean ``mask`` of the same length. Returns it (``{}`` for None)."""
    if norm_stats is None:
        return {}
    if not isinstance(norm_stats, Mapping):
        raise CheckpointError(f"norm_stats must map dataset names to statistics, got {type(norm_stats).__name__}")
    for key, entry in norm_stats.items():
        action = entry.get("action") if isinstance(entry, Mapping) else None
        where = f"norm_stats[{key!r}]['action']"
        size = check_quantiles(action, where)
        mask = action.get("mask")
        if mask is not None:
            if not isinstance(mask, (list, tuple)) or not all(isinstance(m, (bool, np.bool_)) for m in mask):
                raise CheckpointError(f"{where}['mask'] must be a list of booleans, got {mask!r}")
            if len(mask) != size:
                raise CheckpointError(f"{where}['mask'] has {len(mask)} entries for {size} action dimensions")
    return dict(norm_stats)
