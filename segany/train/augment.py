"""Training augmentations and conversion of a sample to the model's input frame.

A sample is ``(image (H, W, 3) uint8, masks (N, H, W) bool, ignore (H, W) bool)``. The model
frame is the image resized so that its longest side is ``size`` (then zero-padded to a square by
``Sam.preprocess``), as at inference.

Augmentations (the SAM paper's list): copy-paste of objects from another image, scale jitter
(with a random crop when the scaled image overflows the frame), horizontal flip, colour jitter.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import cv2
import numpy as np

Arrays = Tuple[np.ndarray, np.ndarray, np.ndarray]


def as_arrays(image: np.ndarray, masks: List[np.ndarray], ignore: Optional[np.ndarray]) -> Arrays:
    """Data-set sample -> (image, masks (N, H, W) bool, ignore (H, W) bool)."""
    h, w = image.shape[:2]
    m = np.stack(masks).astype(bool) if len(masks) else np.zeros((0, h, w), bool)
    ig = ignore.astype(bool) if ignore is not None else np.zeros((h, w), bool)
    return image, m, ig


def resize(sample: Arrays, scale: float) -> Arrays:
    """Scale image (area/bilinear) and masks (bilinear on 0/1, threshold 0.5) by ``scale``."""
    image, masks, ignore = sample
    h, w = image.shape[:2]
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if (nh, nw) == (h, w):
        return sample
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, (nw, nh), interpolation=interp)

    def rs(m: np.ndarray) -> np.ndarray:
        return cv2.resize(m.astype(np.uint8) * 255, (nw, nh), interpolation=cv2.INTER_LINEAR) > 127

    masks = np.stack([rs(m) for m in masks]) if len(masks) else np.zeros((0, nh, nw), bool)
    return image, masks, rs(ignore)


def to_frame(sample: Arrays, size: int) -> Arrays:
    """Resize so that the longest side is ``size`` (the model's input frame)."""
    h, w = sample[0].shape[:2]
    return resize(sample, size / max(h, w))


def crop(sample: Arrays, size: int, rng: np.random.Generator) -> Arrays:
    """Random ``size`` x ``size`` window where the image is larger than that."""
    image, masks, ignore = sample
    h, w = image.shape[:2]
    y0 = int(rng.integers(0, h - size + 1)) if h > size else 0
    x0 = int(rng.integers(0, w - size + 1)) if w > size else 0
    sl = (slice(y0, y0 + size), slice(x0, x0 + size))
    return image[sl], masks[:, sl[0], sl[1]], ignore[sl]


def hflip(sample: Arrays) -> Arrays:
    image, masks, ignore = sample
    return image[:, ::-1].copy(), masks[:, :, ::-1].copy(), ignore[:, ::-1].copy()


def colour_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.25) -> np.ndarray:
    """Random brightness, contrast, saturation and a little hue shift."""
    x = image.astype(np.float32)
    x = x * (1 + rng.uniform(-strength, strength))  # brightness
    mean = x.mean()
    x = (x - mean) * (1 + rng.uniform(-strength, strength)) + mean  # contrast
    gray = x.mean(axis=2, keepdims=True)
    x = (x - gray) * (1 + rng.uniform(-strength, strength)) + gray  # saturation
    x = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < 0.3:
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(rng.integers(-8, 9))) % 180).astype(np.uint8)
        x = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return x


def copy_paste(dst: Arrays, src: Arrays, rng: np.random.Generator, max_objects: int = 2) -> Arrays:
    """Paste up to ``max_objects`` objects of ``src`` (rescaled to ``dst``'s size, randomly
    shifted) onto ``dst``. Pasted pixels occlude ``dst``'s objects and ignore region; the pasted
    objects become new objects."""
    image, masks, ignore = dst
    h, w = image.shape[:2]
    if len(src[1]) == 0:
        return dst
    s_img, s_masks, _ = resize(src, min(h / src[0].shape[0], w / src[0].shape[1]))
    sh, sw = s_img.shape[:2]
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[:sh, :sw] = s_img
    image, masks, ignore = image.copy(), masks.copy(), ignore.copy()
    pick = rng.permutation(len(s_masks))[:max_objects]
    new = []
    for k in pick:
        m = np.zeros((h, w), bool)
        m[:sh, :sw] = s_masks[k]
        ys, xs = np.nonzero(m)
        if len(ys) == 0:
            continue
        # random shift that keeps the object's box inside the image
        dy = int(rng.integers(-ys.min(), h - ys.max()))
        dx = int(rng.integers(-xs.min(), w - xs.max()))
        M = np.float32([[1, 0, dx], [0, 1, dy]])
        m = cv2.warpAffine(m.astype(np.uint8), M, (w, h), flags=cv2.INTER_NEAREST) > 0
        src_px = cv2.warpAffine(canvas, M, (w, h), flags=cv2.INTER_LINEAR)
        image[m] = src_px[m]
        masks &= ~m[None]
        ignore &= ~m
        new = [n & ~m for n in new] + [m]
    if new:
        masks = np.concatenate([masks, np.stack(new)], axis=0)
    return image, masks, ignore


def drop_small(sample: Arrays, min_area: int) -> Arrays:
    image, masks, ignore = sample
    keep = masks.reshape(len(masks), -1).sum(1) >= min_area
    return image, masks[keep], ignore


def augment(
    sample: Arrays,
    size: int,
    rng: np.random.Generator,
    other: Optional[Arrays] = None,
    scale_range: Tuple[float, float] = (0.5, 1.5),
    p_copy_paste: float = 0.25,
    min_area: int = 100,
) -> Arrays:
    """Full training pipeline -> a sample in the model frame (sides <= ``size``)."""
    sample = to_frame(sample, size)
    if other is not None and rng.random() < p_copy_paste:
        sample = copy_paste(sample, to_frame(other, size), rng)
    lo, hi = np.log(scale_range[0]), np.log(scale_range[1])
    sample = resize(sample, float(np.exp(rng.uniform(lo, hi))))
    sample = crop(sample, size, rng)
    if rng.random() < 0.5:
        sample = hflip(sample)
    image, masks, ignore = sample
    image = colour_jitter(image, rng)
    return drop_small((image, masks, ignore), min_area)
