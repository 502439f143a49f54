"""Model inputs from PIL images, in numpy: the cold query path runs without torch, and reader threads
that prepare inputs run no torch op (each one forks an OpenMP team that competes with the model's)."""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)


def vit_pixels(img: Image.Image, size: int) -> np.ndarray:
    """The whole image resized to a square (no crop: nothing near the border is lost and every image
    of a batch has the same grid), ImageNet-normalised. -> (3, size, size) float32"""
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    return np.ascontiguousarray((x - _MEAN) / _STD)
