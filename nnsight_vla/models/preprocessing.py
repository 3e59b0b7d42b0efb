"""Image preprocessing shared by every family and environment: input validation and openpi's letterbox resize.

One implementation, so a LIBERO rollout, the UR5 adapter and a model's own ``prepare`` feed identical pixels.
:func:`resize_with_pad` follows openpi's ``openpi_client.image_tools.resize_with_pad`` arithmetic exactly
(the resize pi0 and pi0-FAST were trained with), including its float truncation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError


def as_uint8_image(image: Any, where: str = "image") -> np.ndarray:
    """Validate one camera image: an HxWx3 uint8 array (or a PIL image). Returns the array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise InputError(f"{where} must be an HxWx3 uint8 numpy array or a PIL image, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise InputError(f"{where} must have shape (H, W, 3) (RGB, channels last), got {image.shape}")
    if image.dtype != np.uint8:
        raise InputError(
            f"{where} must be uint8 (0..255), got {image.dtype}; convert with (img * 255).round().astype(np.uint8) "
            "if it is a float image in [0, 1]"
        )
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise InputError(f"{where} is too small: {image.shape}")
    return image


def letterbox_geometry(cur_height: int, cur_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(resized height, resized width, top, left) of openpi's letterbox: scale by the larger side ratio and
    truncate (``int(cur / ratio)``, in floating point, as openpi computes it), centre with the floor of half."""
    ratio = max(cur_width / width, cur_height / height)
    new_height, new_width = max(1, int(cur_height / ratio)), max(1, int(cur_width / ratio))
    top, left = max(0, int((height - new_height) / 2)), max(0, int((width - new_width) / 2))
    return new_height, new_width, top, left


def resize_with_pad(images: np.ndarray, height: int, width: int, method: Any = None) -> np.ndarray:
    """Letterbox uint8 image(s) ``[..., H, W, C]`` into ``height`` x ``width``: aspect kept, bilinear by default
    (``method``: a PIL resampling filter), black bars, the image centred. Already the right size: returned as is."""
    images = np.asarray(images)
    if images.shape[-3:-1] == (height, width):
        return images
    method = Image.Resampling.BILINEAR if method is None else method
    flat = images.reshape(-1, *images.shape[-3:])
    new_height, new_width, top, left = letterbox_geometry(*flat.shape[1:3], height, width)
    out = np.zeros((flat.shape[0], height, width, flat.shape[-1]), dtype=flat.dtype)
    for image, canvas in zip(flat, out):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        resized = np.asarray(pil.resize((new_width, new_height), resample=method))
        canvas[top:top + new_height, left:left + new_width] = resized.reshape(new_height, new_width, -1)
    return out.reshape(*images.shape[:-3], height, width, images.shape[-1])
