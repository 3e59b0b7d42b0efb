"""The one image preprocessing module: openpi's letterbox arithmetic, pinned on shapes where truncation and
rounding disagree, and the pixels checked against an independent PIL paste."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nnsight_vla.errors import InputError
from nnsight_vla.models.preprocessing import as_uint8_image, letterbox_geometry, resize_with_pad

# (source h, w) -> (resized h, w, top, left) in a 224 x 224 target, by openpi's formula:
# ratio = max(w / 224, h / 224); size = int(side / ratio); offset = int((224 - size) / 2)
PINNED = {
    (256, 256): (224, 224, 0, 0),
    (480, 640): (168, 224, 28, 0),      # 480 / (640 / 224) = 168.0 exactly
    (100, 70): (224, 156, 0, 34),       # 70 / (100 / 224) = 156.8: truncated (rounding would give 157)
    (300, 200): (224, 149, 0, 37),      # 200 / (300 / 224) = 149.33; (224 - 149) / 2 = 37.5 -> 37
    (2, 9): (49, 223, 87, 0),           # 9 / (9 / 224) = 223.99999999999997 in floats: openpi keeps a black column
}


@pytest.mark.parametrize("shape", sorted(PINNED))
def test_letterbox_geometry_is_openpis_truncation(shape):
    assert letterbox_geometry(*shape, 224, 224) == PINNED[shape]


def _independent(image: np.ndarray, height: int, width: int) -> np.ndarray:
    # what openpi does, written out with PIL: resize to the pinned size, paste on a black canvas at the offset
    new_h, new_w, top, left = PINNED[image.shape[:2]]
    canvas = Image.new("RGB", (width, height), 0)
    canvas.paste(Image.fromarray(image).resize((new_w, new_h), resample=Image.BILINEAR), (left, top))
    return np.asarray(canvas)


@pytest.mark.parametrize("shape", sorted(PINNED))
def test_resize_with_pad_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = resize_with_pad(image, 224, 224)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.array_equal(out, _independent(image, 224, 224))


def test_resize_with_pad_batches_and_identity():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (2, 3, 100, 70, 3), dtype=np.uint8)
    out = resize_with_pad(batch, 224, 224)
    assert out.shape == (2, 3, 224, 224, 3)
    assert np.array_equal(out[1, 2], _independent(batch[1, 2], 224, 224))
    same = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(same, 224, 224) is same


def test_non_square_target():
    # 480 x 640 into 224 x 320: ratio = max(640 / 320, 480 / 224) = 2.142857..; 640 / ratio = 298.66 -> 298
    assert letterbox_geometry(480, 640, 224, 320) == (224, 298, 0, 11)
    image = np.full((480, 640, 3), 200, np.uint8)
    out = resize_with_pad(image, 224, 320)
    assert (out[:, :11] == 0).all() and (out[:, 11 + 298:] == 0).all() and (out[:, 11:309] == 200).all()


def test_as_uint8_image_rejects_floats_and_accepts_pil():
    with pytest.raises(InputError, match="uint8"):
        as_uint8_image(np.zeros((8, 8, 3), np.float32))
    pil = Image.new("L", (5, 4), 7)
    assert as_uint8_image(pil).shape == (4, 5, 3)
