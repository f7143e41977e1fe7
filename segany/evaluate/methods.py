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
    supports_everything = True

    def __init__(self, model, name: Optional[str] = None) -> None:
        from ..predictor import SamPredictor

        self.model = model
        self.predictor = SamPredictor(model)
        self.name = name or getattr(model, "model_name", "sam")
        self._logits: Optional[np.ndarray] = None
        self._image: Optional[np.ndarray] = None

    def set_image(self, image: np.ndarray) -> None:
        self.predictor.set_image(image)
        self._image = image
        self._logits = None

    def reset(self) -> None:
        self._logits = None

    def predict_clicks(self, clicks: Sequence[Click]) -> np.ndarray:
        coords = np.array([c.xy for c in clicks], dtype=np.float64)
        labels = np.array([1 if c.positive else 0 for c in clicks], dtype=np.int64)
        first = len(clicks) == 1 or self._logits is None
        masks, scores, logits = self.predictor.predict(
            coords, labels, mask_input=None if first else self._logits, multimask_output=first
        )
        i = int(np.argmax(scores))
        self._logits = logits[i : i + 1]
        return masks[i]

    def predict_box(self, box: np.ndarray) -> np.ndarray:
        masks, scores, _ = self.predictor.predict(box=np.asarray(box, dtype=np.float64), multimask_output=False)
        return masks[0]

    def generate(self, image: np.ndarray, **kwargs) -> List[dict]:
        """Segment-everything proposals from ``segany.automatic.SamAutomaticMaskGenerator``."""
        try:
            from ..automatic import SamAutomaticMaskGenerator
        except ImportError as e:
            raise RuntimeError(f"the 'everything' protocol needs segany.automatic ({e})") from None
        return SamAutomaticMaskGenerator(self.model, **kwargs).generate(image)


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
