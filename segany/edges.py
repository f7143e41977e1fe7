"""Edge snapping (opt-in): move a mask's outline onto the image's edges.

SAM's masks come from low-res logits (256 x 256 over the 1024 px frame; the bundled ``tiny``
model's are 128 x 128 over 512 px) upsampled bilinearly, so at the original size an outline can
only bend once per logit: 4 image pixels for a 512 px photo with ``tiny``, 16 for a 4000 px photo
with SAM. :func:`snap_to_edges` smooths the mask's probability with a colour guided filter (He,
Sun and Tang, "Guided Image Filtering", ECCV 2010, eq. 19-21) steered by the photo: inside a
window of about one logit the output is a local linear function of the pixel colours, so the 0.5
level follows the image's edges where the upsampled logits only pass near them. An outline that
misses an edge by up to about half the window radius lands on it (tests/test_refine.py).

Only the band where the mask is in doubt is filtered: far from it the probability is flat and
the plain threshold stands, so the cost follows the outline's bounding box, not the photo's size.

It is not part of SAM (the official code has nothing like it) and changes masks, so it is never
applied by the drop-in API (``SamPredictor``, ``SamAutomaticMaskGenerator``): ask for it with
``Segmenter.predict(..., snap_edges=True)``, ``segany segment --snap-edges`` or ``segany eval --snap-edges``.
The defaults (window radius 1.5 logits, ``eps`` 1e-3 on [0, 1] colours, logits divided by 4
before the sigmoid; colour rather than gray guide) were chosen on the training split of
``../shared/data`` with the bundled model; README (Evaluation) has what they change on the
validation split.
"""
from __future__ import annotations

import cv2
import numpy as np

DEFAULT_EPS = 1e-3
DEFAULT_TEMPERATURE = 4.0
DEFAULT_RADIUS_LOGITS = 1.5
# |logit| / temperature beyond this: the probability is within 0.25% of 0 or 1 (flat for the filter)
_SATURATED = 6.0


def logit_radius(image_shape, low_res_side: int, logits: float = DEFAULT_RADIUS_LOGITS) -> int:
    """``logits`` low-res logits in image pixels (at least 1): the default window radius."""
    return max(1, int(round(logits * max(image_shape[:2]) / float(low_res_side))))


def _guide(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"snap_to_edges: the image must be (H, W, 3) RGB or (H, W) gray, got shape {image.shape}")
    return image.astype(np.float32) / (255.0 if image.dtype == np.uint8 else 1.0)


def guided_filter(guide: np.ndarray, src: np.ndarray, radius: int, eps: float, subsample: int = 1) -> np.ndarray:
    """He et al.'s guided filter with a colour guide: ``guide`` (H, W, 3) float32, ``src`` (H, W)
    float32 -> (H, W) float32. Box windows of side 2 * radius + 1 (OpenCV's box filter, O(1) per
    pixel); the per-window 3 x 3 covariance (+ eps I) is inverted in closed form.

    ``subsample`` > 1: the fast guided filter (He and Sun 2015): the linear coefficients are fitted
    on images shrunk that many times (radius likewise) and brought back to full size bilinearly,
    so large photos cost ``subsample``**2 times less; the output keeps the full-size guide's
    detail."""
    if radius < 1:
        return src.astype(np.float32, copy=True)
    h, w = src.shape
    full_guide = guide
    if subsample > 1:
        size = (max(1, round(w / subsample)), max(1, round(h / subsample)))
        guide = cv2.resize(guide, size, interpolation=cv2.INTER_AREA)
        src = cv2.resize(src, size, interpolation=cv2.INTER_AREA)
        radius = max(1, round(radius / subsample))
    k = (2 * radius + 1, 2 * radius + 1)

    def mean(x: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(x, -1, k, borderType=cv2.BORDER_REFLECT)

    I = [np.ascontiguousarray(guide[..., c]) for c in range(3)]
    m = [mean(c) for c in I]
    mp = mean(src)
    cov = [mean(c * src) - mc * mp for c, mc in zip(I, m)]
    v = {(i, j): mean(I[i] * I[j]) - m[i] * m[j] + (eps if i == j else 0.0) for i in range(3) for j in range(i, 3)}
    # inverse of the symmetric [[v00 v01 v02] [v01 v11 v12] [v02 v12 v22]] by cofactors
    c00 = v[1, 1] * v[2, 2] - v[1, 2] * v[1, 2]
    c01 = v[0, 2] * v[1, 2] - v[0, 1] * v[2, 2]
    c02 = v[0, 1] * v[1, 2] - v[0, 2] * v[1, 1]
    c11 = v[0, 0] * v[2, 2] - v[0, 2] * v[0, 2]
    c12 = v[0, 1] * v[0, 2] - v[0, 0] * v[1, 2]
    c22 = v[0, 0] * v[1, 1] - v[0, 1] * v[0, 1]
    det = v[0, 0] * c00 + v[0, 1] * c01 + v[0, 2] * c02
    a = [(c00 * cov[0] + c01 * cov[1] + c02 * cov[2]) / det,
         (c01 * cov[0] + c11 * cov[1] + c12 * cov[2]) / det,
         (c02 * cov[0] + c12 * cov[1] + c22 * cov[2]) / det]
    b = mp - a[0] * m[0] - a[1] * m[1] - a[2] * m[2]
    coeffs = [mean(x) for x in (*a, b)]
    if subsample > 1:
        coeffs = [cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR) for x in coeffs]
    return coeffs[0] * full_guide[..., 0] + coeffs[1] * full_guide[..., 1] + coeffs[2] * full_guide[..., 2] + coeffs[3]


def _check(image: np.ndarray, masks: np.ndarray, what: str) -> np.ndarray:
    if masks.ndim not in (2, 3):
        raise ValueError(f"snap_to_edges: {what} must be (H, W) or (C, H, W), got shape {masks.shape}")
    image = np.asarray(image)
    if image.shape[:2] != masks.shape[-2:]:
        raise ValueError(f"snap_to_edges: image is {image.shape[1]}x{image.shape[0]} but the {what} are {masks.shape[-1]}x{masks.shape[-2]}")
    return image


def _snap_band(image: np.ndarray, p: np.ndarray, doubt: np.ndarray, out: np.ndarray, radius: int, eps: float) -> None:
    """Filter the probability ``p`` (H, W) around the pixels in ``doubt`` (their bounding box,
    grown so that every output there sees the same windows as on the whole image) and write the
    thresholded result into ``out`` there."""
    rows, cols = np.flatnonzero(doubt.any(axis=1)), np.flatnonzero(doubt.any(axis=0))
    if len(rows) == 0:
        return
    h, w = p.shape
    grow = 4 * radius + 2  # a pixel's output reads probabilities up to 2 * radius away
    y0, y1 = max(0, rows[0] - grow), min(h, rows[-1] + 1 + grow)
    x0, x1 = max(0, cols[0] - grow), min(w, cols[-1] + 1 + grow)
    # windows wider than ~9 px are fitted on a shrunk image (photos well above 1000 px)
    q = guided_filter(_guide(image[y0:y1, x0:x1]), np.ascontiguousarray(p[y0:y1, x0:x1]), radius, eps, max(1, radius // 4))
    out[y0:y1, x0:x1] = q > 0.5


def snap_to_edges(
    image: np.ndarray,
    logits: np.ndarray,
    radius: int,
    eps: float = DEFAULT_EPS,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Full-size mask logits (H, W) or (C, H, W) -> snapped bool masks of the same shape.

    ``image``: the photo the logits belong to, (H, W, 3) uint8 RGB (or (H, W) gray); ``radius``:
    the window radius in pixels (see :func:`logit_radius`). From radius 8 on, the filter runs
    ``radius // 4`` times shrunk (see :func:`guided_filter`)."""
    logits = np.asarray(logits, dtype=np.float32)
    image = _check(image, logits, "logits")
    if not np.isfinite(logits).all():
        raise ValueError("snap_to_edges: logits contain NaN or infinity")
    if temperature <= 0 or eps <= 0:
        raise ValueError(f"snap_to_edges: temperature and eps must be > 0, got {temperature}, {eps}")
    flat = logits.reshape(-1, *logits.shape[-2:])
    out = flat > 0
    for i, z in enumerate(flat):
        p = 1.0 / (1.0 + np.exp(-np.clip(z / temperature, -30.0, 30.0)))
        _snap_band(image, p.astype(np.float32), np.abs(z) < _SATURATED * temperature, out[i], int(radius), float(eps))
    return out.reshape(logits.shape)


def snap_masks(image: np.ndarray, masks: np.ndarray, radius: int, eps: float = DEFAULT_EPS) -> np.ndarray:
    """Bool masks (H, W) or (C, H, W), without logits (e.g. segment-everything's) -> snapped bool
    masks: the guided filter of the mask itself ("guided feathering" in He et al.), over the band
    of ``2 * radius`` around its outline."""
    masks = np.asarray(masks, dtype=bool)
    image = _check(image, masks, "masks")
    if eps <= 0:
        raise ValueError(f"snap_to_edges: eps must be > 0, got {eps}")
    flat = masks.reshape(-1, *masks.shape[-2:])
    out = flat.copy()
    k = np.ones((3, 3), np.uint8)
    for i, m in enumerate(flat):
        m8 = m.view(np.uint8)
        outline = cv2.dilate(m8, k) != cv2.erode(m8, k)
        _snap_band(image, m.astype(np.float32), outline, out[i], int(radius), float(eps))
    return out.reshape(masks.shape)
