"""The methods the benchmark can run, behind one small interface.

A method embeds/prepares an image once (``set_image``), then answers, per object, a growing list
of clicks (``predict_clicks``; ``reset`` starts a new object) or a box (``predict_box``), each with
a bool (H, W) mask at the image's size.

* :class:`SamMethod` -- any segany/SAM model through :class:`segany.predictor.SamPredictor`,
  as in the SAM paper: the first click asks for three masks and keeps the one with the highest
  predicted IoU; later clicks ask for one mask and feed the previous low-res logits back as the
  mask prompt. Boxes ask for one mask.
* :class:`GrabCutMethod` -- OpenCV GrabCut, the classical no-learning reference.
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence

import cv2
import numpy as np

from .metrics import Click


class Method:
    name = "method"
    supports_everything = False

    def set_image(self, image: np.ndarray) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the previous object's state (before its first click)."""

    def predict_clicks(self, clicks: Sequence[Click]) -> np.ndarray:
        raise NotImplementedError

    def predict_box(self, box: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SamMethod(Method):
    """A segany/SAM model under the SAM paper's protocol (see the module doc).

    ``zoom_in``: from the second click on, the model looks at a crop around the current mask and
    the positive clicks (their bounding box grown ``zoom_expansion`` times around its centre, a
    square of at least ``zoom_min_side`` of the image's longer side), re-encoded at the model's
    input size, with the previous logits cropped into its mask prompt; the crop's logits replace
    the previous ones inside it. This is RITM's "ZoomIn" (Sofiiuk et al. 2022), not part of the
    SAM protocol: it costs one image encoding per click whose crop changed, and helps where
    objects are small in the frame. Off by default; ``segany eval --zoom-in`` reports it as its
    own method (``<model>+zoom``). Zoom-in only changes corrective clicks, so such a method skips
    the segment-everything protocol (its proposals would be the plain model's, at full cost).

    ``snap_edges``: every returned mask (clicks, boxes and segment-everything proposals) is snapped
    to the image's edges by :mod:`segany.edges`; the logits fed back to the next click stay the
    model's. Not part of the SAM protocol either: ``segany eval --snap-edges`` reports it as
    ``<model>+edges``."""

    supports_everything = True

    def __init__(self, model, name: Optional[str] = None, zoom_in: bool = False, zoom_expansion: float = 1.4,
                 zoom_min_side: float = 0.2, snap_edges: bool = False) -> None:
        from ..predictor import SamPredictor

        self.model = model
        self.predictor = SamPredictor(model)
        self.name = (name or getattr(model, "model_name", "sam")) + ("+zoom" if zoom_in else "") + ("+edges" if snap_edges else "")
        self.zoom_in = zoom_in
        self.supports_everything = not zoom_in
        self.snap_edges = snap_edges
        self.zoom_expansion = float(zoom_expansion)
        self.zoom_min_side = float(zoom_min_side)
        self._logits: Optional[np.ndarray] = None
        self._image: Optional[np.ndarray] = None
        self._full: Optional[np.ndarray] = None  # zoom-in: the current full-size logits
        self._crop_predictor = SamPredictor(model) if zoom_in else None
        self._crop: Optional[tuple] = None

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)
        self._image = image
        self._logits = None
        self._full = None
        self._crop = None

    def reset(self) -> None:
        self._logits = None
        self._full = None

    def predict_clicks(self, clicks: Sequence[Click]) -> np.ndarray:
        if not self.snap_edges:
            return self._predict_clicks(clicks)
        full = self._predict_clicks(clicks, full_logits=True)
        return self._snapped(full)

    def _snapped(self, full_logits: np.ndarray) -> np.ndarray:
        from .. import edges

        low_res = 4 * self.predictor.features.shape[-1]
        return edges.snap_to_edges(self._image, full_logits, edges.logit_radius(self._image.shape, low_res))

    def _predict_clicks(self, clicks: Sequence[Click], full_logits: bool = False) -> np.ndarray:
        """The mask for ``clicks`` (bool), or with ``full_logits`` its full-size logits."""
        coords = np.array([c.xy for c in clicks], dtype=np.float64)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
        first = len(clicks) == 1 or self._logits is None
        if self.zoom_in and not first:
            crop = self._zoom_crop(clicks)
            if crop is not None:
                self._predict_in_crop(crop, coords, labels)
                return self._full if full_logits else self._full > self.model.mask_threshold
        # zoom-in keeps the full-size logits: the next crop's mask prompt is cut from them
        # the first click is ambiguous: SAM's best of three candidates (only that one upscaled)
        predict = self.predictor.predict_best if first else partial(self.predictor.predict, multimask_output=False)
        masks, scores, logits = predict(coords, labels, mask_input=None if first else self._logits,
                                        return_logits=self.zoom_in or full_logits)
        i = int(np.argmax(scores))
        self._logits = logits[i : i + 1]
        if not (self.zoom_in or full_logits):
            return masks[i]
        if self.zoom_in:
            self._full = masks[i]
        return masks[i] if full_logits else masks[i] > self.model.mask_threshold

    def _zoom_crop(self, clicks: Sequence[Click]) -> Optional[tuple]:
        """The crop (x0, y0, x1, y1) for the next prediction, or None when it would cover most of
        the image (then the whole image is used)."""
        h, w = self._image.shape[:2]
        xs = [c.x for c in clicks if c.positive]
        ys = [c.y for c in clicks if c.positive]
        current = self._full > self.model.mask_threshold
        rows, cols = np.flatnonzero(current.any(1)), np.flatnonzero(current.any(0))
        if len(rows):
            xs += [int(cols[0]), int(cols[-1])]
            ys += [int(rows[0]), int(rows[-1])]
        if not xs:
            return None
        cx, cy = (min(xs) + max(xs) + 1) / 2, (min(ys) + max(ys) + 1) / 2
        side = max(max(xs) - min(xs) + 1, max(ys) - min(ys) + 1) * self.zoom_expansion
        side = max(side, self.zoom_min_side * max(h, w), 16.0)
        x0, x1 = int(max(0, np.floor(cx - side / 2))), int(min(w, np.ceil(cx + side / 2)))
        y0, y1 = int(max(0, np.floor(cy - side / 2))), int(min(h, np.ceil(cy + side / 2)))
        if (x1 - x0) * (y1 - y0) > 0.8 * h * w:
            return None
        return x0, y0, x1, y1

    def _predict_in_crop(self, crop: tuple, coords: np.ndarray, labels: np.ndarray) -> None:
        x0, y0, x1, y1 = crop
        cp = self._crop_predictor
        if self._crop != crop:
            cp.set_image(np.ascontiguousarray(self._image[y0:y1, x0:x1]))
            self._crop = crop
        local = coords - np.array([x0, y0], dtype=np.float64)
        inside = (local[:, 0] >= 0) & (local[:, 0] < x1 - x0) & (local[:, 1] >= 0) & (local[:, 1] < y1 - y0)
        prompt = _mask_prompt(cp, self._full[y0:y1, x0:x1])
        masks, _, _ = cp.predict(local[inside], labels[inside], mask_input=prompt, multimask_output=False, return_logits=True)
        full = self._full.copy()
        full[y0:y1, x0:x1] = masks[0]
        self._full = full
        self._logits = _mask_prompt(self.predictor, full)

    def predict_box(self, box: np.ndarray) -> np.ndarray:
        masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float64), multimask_output=False, return_logits=self.snap_edges)
        return self._snapped(masks[0]) if self.snap_edges else masks[0]

    def generate(self, image: np.ndarray, **kwargs) -> List[dict]:
        """Segment-everything proposals from ``segany.automatic.SamAutomaticMaskGenerator``."""
        try:
            from ..automatic import SamAutomaticMaskGenerator
        except ImportError as e:
            raise RuntimeError(f"the 'everything' protocol needs segany.automatic ({e})") from None
        return SamAutomaticMaskGenerator(self.model, snap_edges=self.snap_edges, **kwargs).generate(image)


def _mask_prompt(predictor, logits: np.ndarray) -> np.ndarray:
    """Full-size logits (H, W) of ``predictor``'s image -> its low-res mask prompt (1, n, n): the
    image's resize to the model frame, padding as background, area-averaged to the prompt grid."""
    h, w = predictor.input_size
    size = predictor.model.image_encoder.img_size
    n = predictor.model.prompt_encoder.mask_input_size[0]
    frame = np.full((size, size), -20.0, dtype=np.float32)
    frame[:h, :w] = cv2.resize(logits.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(frame, (n, n), interpolation=cv2.INTER_AREA)[None]


class GrabCutMethod(Method):
    """OpenCV GrabCut (Rother et al. 2004), 5 iterations, under the same protocols.

    Box: the box is probable foreground, everything else definite background (what
    ``GC_INIT_WITH_RECT`` does).

    Clicks (``GC_INIT_WITH_MASK``), re-run after every click:

    * region of interest = the box around the positive clicks and the previous result, grown by
      ``margin`` (default: 15 % of the image's longer side, at least 20 px) -- outside it is
      definite background, inside probable foreground where the previous result was foreground
      (everything inside on the first click) and probable background elsewhere;
    * each click paints a disk of ``seed_radius`` px as definite foreground (positive) or
      definite background (negative), like a user's dot in GrabCut tools.

    GrabCut runs on a crop: the region of interest (or box) grown by ``margin`` once more, so the
    background colour model is learnt from the object's surroundings. Outside the crop is
    background, as it would be without cropping. If the crop has no background pixel (the
    region covers the image) its 1-pixel frame becomes probable background, since GrabCut needs
    background samples.
    """

    name = "grabcut"

    def __init__(self, iterations: int = 5, margin: Optional[float] = None, seed_radius: int = 3) -> None:
        self.iterations = iterations
        self.margin = margin
        self.seed_radius = seed_radius
        self._bgr: Optional[np.ndarray] = None
        self._prev: Optional[np.ndarray] = None

    def set_image(self, image: np.ndarray) -> None:
        self._bgr = np.ascontiguousarray(image[..., ::-1])
        self._prev = None

    def reset(self) -> None:
        self._prev = None

    def _margin(self) -> float:
        h, w = self._bgr.shape[:2]
        return float(self.margin) if self.margin is not None else max(20.0, 0.15 * max(h, w))

    def _run(self, mask: np.ndarray, roi) -> np.ndarray:
        """GrabCut with ``mask`` labels on the crop ``roi`` (x0, y0, x1, y1) grown by the margin;
        returns the full-size bool result."""
        h, w = mask.shape
        m = int(round(self._margin()))
        x0, y0 = max(0, roi[0] - m), max(0, roi[1] - m)
        x1, y1 = min(w, roi[2] + m), min(h, roi[3] + m)
        sub = np.ascontiguousarray(mask[y0:y1, x0:x1])
        if not ((sub == cv2.GC_BGD) | (sub == cv2.GC_PR_BGD)).any():
            for edge in (sub[0, :], sub[-1, :], sub[:, 0], sub[:, -1]):
                edge[edge != cv2.GC_FGD] = cv2.GC_PR_BGD
        bgd = np.zeros((1, 65), np.float64)
        fgd = np.zeros((1, 65), np.float64)
        img = np.ascontiguousarray(self._bgr[y0:y1, x0:x1])
        cv2.grabCut(img, sub, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        out = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = (sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)
        return out

    def predict_box(self, box: np.ndarray) -> np.ndarray:
        h, w = self._bgr.shape[:2]
        x0, y0 = int(np.floor(max(0.0, box[0]))), int(np.floor(max(0.0, box[1])))
        x1, y1 = int(np.ceil(min(float(w), box[2]))), int(np.ceil(min(float(h), box[3])))
        x0, y0 = min(x0, w - 1), min(y0, h - 1)
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        mask = np.full((h, w), cv2.GC_BGD, np.uint8)
        mask[y0:y1, x0:x1] = cv2.GC_PR_FGD
        try:
            return self._run(mask, (x0, y0, x1, y1))
        except cv2.error:  # degenerate colour model (e.g. a 1-pixel box): the box itself
            return mask == cv2.GC_PR_FGD

    def predict_clicks(self, clicks: Sequence[Click]) -> np.ndarray:
        h, w = self._bgr.shape[:2]
        margin = self._margin()
        xs = [c.x for c in clicks if c.positive]
        ys = [c.y for c in clicks if c.positive]
        if self._prev is not None and self._prev.any():
            py = np.flatnonzero(self._prev.any(1))
            px = np.flatnonzero(self._prev.any(0))
            xs += [int(px[0]), int(px[-1])]
            ys += [int(py[0]), int(py[-1])]
        if not xs:  # only negative clicks and nothing predicted: nothing to segment
            self._prev = np.zeros((h, w), bool)
            return self._prev
        x0, x1 = int(max(0, min(xs) - margin)), int(min(w, max(xs) + 1 + margin))
        y0, y1 = int(max(0, min(ys) - margin)), int(min(h, max(ys) + 1 + margin))
        mask = np.full((h, w), cv2.GC_BGD, np.uint8)
        if self._prev is None:
            mask[y0:y1, x0:x1] = cv2.GC_PR_FGD
        else:
            mask[y0:y1, x0:x1] = np.where(self._prev[y0:y1, x0:x1], cv2.GC_PR_FGD, cv2.GC_PR_BGD)
        for c in clicks:
            cv2.circle(mask, (c.x, c.y), self.seed_radius, int(cv2.GC_FGD if c.positive else cv2.GC_BGD), -1)
        fg = (mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)
        try:
            result = self._run(mask, (x0, y0, x1, y1)) if fg.any() else np.zeros((h, w), bool)
        except cv2.error:  # degenerate colour model
            result = fg
        self._prev = result
        return result
