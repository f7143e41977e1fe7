"""Metrics and the simulated user of the interactive-segmentation benchmark.

All masks are bool (H, W) numpy arrays; ``ignore`` (or ``None``) marks pixels that count
neither as object nor as background (e.g. the 128-valued band of GrabCut/Berkeley masks, or COCO
crowd regions): they are left out of every IoU and are never clicked.

The click simulator follows RITM's ``Clicker._get_next_click`` (Sofiiuk et al. 2022), the
protocol SimpleClick, SAM and most interactive-segmentation papers report:

* false negatives ``fn = gt & ~pred`` and false positives ``fp = ~gt & pred`` (ignore removed);
* both maps are **zero-padded by one pixel** before the Euclidean distance transform
  (``cv2.DIST_L2``, exact mask). OpenCV treats pixels outside the image as infinitely far from
  the background, so without padding an object touching the image border would have its
  "deepest" point on the border. With the padding the image border counts as a boundary, so
  the click lands where a person would put it: well inside the visible part of the object;
* the click goes into the error region whose distance maximum is larger (false negative ->
  positive click, false positive -> negative click; ties go to the negative click, as in RITM),
  at that maximum (first in row-major order), never on a pixel already clicked;
* the first click (empty prediction) is therefore the interior point farthest from the object's
  boundary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

IOU_THRESHOLDS = tuple(np.round(np.arange(0.5, 0.951, 0.05), 2).tolist())  # COCO 0.5:0.95


def _valid(shape: Tuple[int, int], ignore: Optional[np.ndarray]) -> np.ndarray:
    if ignore is None:
        return np.ones(shape, dtype=bool)
    if ignore.shape != shape:
        raise ValueError(f"ignore map has shape {ignore.shape}, the mask {shape}")
    return ~ignore.astype(bool)


def mask_iou(pred: np.ndarray, gt: np.ndarray, ignore: Optional[np.ndarray] = None) -> float:
    """IoU of two bool (H, W) masks over the pixels not in ``ignore``. Two empty masks: 1.0."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction has shape {pred.shape}, ground truth {gt.shape}")
    valid = _valid(gt.shape, ignore)
    inter = np.count_nonzero(pred & gt & valid)
    union = np.count_nonzero((pred | gt) & valid)
    return float(inter / union) if union else 1.0


@dataclass(frozen=True)
class Click:
    x: int  # column (pixel index)
    y: int  # row
    positive: bool

    @property
    def xy(self) -> Tuple[float, float]:
        """Continuous image coordinates of the pixel centre (what the model is given)."""
        return (self.x + 0.5, self.y + 0.5)


def _padded_dt(region: np.ndarray) -> np.ndarray:
    padded = np.pad(region.astype(np.uint8), 1, mode="constant")
    return cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]


def next_click(
    pred: np.ndarray,
    gt: np.ndarray,
    ignore: Optional[np.ndarray] = None,
    clicked: Optional[np.ndarray] = None,
) -> Optional[Click]:
    """The simulated user's next click for prediction ``pred`` of object ``gt`` (see module doc).

    ``clicked``: bool (H, W) of pixels already clicked (never clicked twice). Returns ``None``
    when there is nothing left to correct (no error pixel that can be clicked)."""
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    valid = _valid(gt.shape, ignore)
    fn_dt = _padded_dt(gt & ~pred & valid)
    fp_dt = _padded_dt(~gt & pred & valid)
    if clicked is not None:
        fn_dt[clicked] = 0
        fp_dt[clicked] = 0
    fn_max, fp_max = float(fn_dt.max()), float(fp_dt.max())
    if fn_max <= 0 and fp_max <= 0:
        return None
    positive = fn_max > fp_max
    dt = fn_dt if positive else fp_dt
    y, x = np.unravel_index(int(np.argmax(dt)), dt.shape)
    return Click(int(x), int(y), bool(positive))


def simulate_clicks(
    predict,
    gt: np.ndarray,
    ignore: Optional[np.ndarray] = None,
    max_clicks: int = 20,
) -> Tuple[List[float], List[Click]]:
    """Run the simulated user for ``max_clicks`` clicks.

    ``predict(clicks) -> bool (H, W)`` is called with the list of all clicks so far (the method
    keeps its own state, e.g. the previous logits). Returns the IoU after each click (length
    ``max_clicks``) and the clicks made. When the prediction has no clickable error left, the
    user stops and the last IoU is carried forward to the remaining clicks."""
    if max_clicks < 1:
        raise ValueError("max_clicks must be >= 1")
    gt = np.asarray(gt, dtype=bool)
    if not (gt & _valid(gt.shape, ignore)).any():
        raise ValueError("object has no pixel outside the ignore region")
    pred = np.zeros_like(gt)
    clicked = np.zeros_like(gt)
    clicks: List[Click] = []
    ious: List[float] = []
    for _ in range(max_clicks):
        c = next_click(pred, gt, ignore, clicked)
        if c is None:
            ious.append(ious[-1])
            continue
        clicks.append(c)
        clicked[c.y, c.x] = True
        pred = np.asarray(predict(list(clicks)), dtype=bool)
        if pred.shape != gt.shape:
            raise ValueError(f"method returned a mask of shape {pred.shape} for an image of shape {gt.shape}")
        ious.append(mask_iou(pred, gt, ignore))
    return ious, clicks


def noc(ious: Sequence[float], threshold: float, max_clicks: Optional[int] = None) -> int:
    """Number of clicks to reach IoU >= ``threshold``; ``max_clicks`` (default len(ious)) if never."""
    n = len(ious) if max_clicks is None else max_clicks
    for i, v in enumerate(ious[:n]):
        if v >= threshold:
            return i + 1
    return n


def summarize_clicks(per_object: Sequence[Sequence[float]], max_clicks: int) -> Dict[str, object]:
    """mIoU after 1..max_clicks, NoC@85/90 and NoF@85/90 (% of objects never reaching it)."""
    if not per_object:
        return {"objects": 0}
    a = np.asarray([list(r)[:max_clicks] for r in per_object], dtype=np.float64)
    if a.shape[1] != max_clicks:
        raise ValueError(f"every object needs {max_clicks} IoUs, got {a.shape[1]}")
    out: Dict[str, object] = {"objects": int(a.shape[0]), "miou": [round(float(v), 5) for v in a.mean(0)]}
    for t in (0.85, 0.90):
        n = np.asarray([noc(r, t, max_clicks) for r in a])
        reached = a.max(1) >= t
        key = int(round(t * 100))
        out[f"noc{key}"] = round(float(n.mean()), 4)
        out[f"nof{key}"] = int((~reached).sum())
        out[f"nof{key}_pct"] = round(100.0 * float((~reached).mean()), 3)
    return out


# ------------------------------------------------------------------------------------ boxes
def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of a bool mask as float xyxy in pixel-edge coordinates (x1 = last column + 1),
    the convention of the training code's prompts."""
    ys = np.flatnonzero(mask.any(1))
    xs = np.flatnonzero(mask.any(0))
    if len(xs) == 0:
        raise ValueError("empty mask has no box")
    return np.array([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=np.float64)


def jitter_box(box: np.ndarray, size: Tuple[int, int], rng: np.random.Generator, std: float = 0.1, max_px: float = 20.0) -> np.ndarray:
    """The SAM paper's noisy box: each coordinate moved by N(0, ``std`` x box side), clipped to
    ``max_px`` pixels, then clipped to the image and kept non-degenerate (at least 1 px)."""
    h, w = size
    side = np.array([box[2] - box[0], box[3] - box[1]] * 2, dtype=np.float64)
    b = box + np.clip(rng.normal(size=4) * std * side, -max_px, max_px)
    b[[0, 2]] = np.clip(b[[0, 2]], 0, w)
    b[[1, 3]] = np.clip(b[[1, 3]], 0, h)
    x0, x1 = sorted((b[0], b[2]))
    y0, y1 = sorted((b[1], b[3]))
    if x1 - x0 < 1:
        x0, x1 = max(0.0, min(x0, w - 1.0)), max(0.0, min(x0, w - 1.0)) + 1
    if y1 - y0 < 1:
        y0, y1 = max(0.0, min(y0, h - 1.0)), max(0.0, min(y0, h - 1.0)) + 1
    return np.array([x0, y0, x1, y1])


# ------------------------------------------------------------------------- average recall
def _iou_matrix(proposals: Sequence[np.ndarray], gts: Sequence[np.ndarray], ignore: Optional[np.ndarray]) -> np.ndarray:
    if not proposals or not gts:
        return np.zeros((len(proposals), len(gts)))
    valid = _valid(gts[0].shape, ignore).reshape(-1)
    P = np.stack([np.asarray(p, dtype=bool).reshape(-1)[valid] for p in proposals]).astype(np.float32)
    G = np.stack([np.asarray(g, dtype=bool).reshape(-1)[valid] for g in gts]).astype(np.float32)
    inter = P @ G.T
    union = P.sum(1)[:, None] + G.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_recall(ious: np.ndarray, threshold: float) -> np.ndarray:
    """COCO-style greedy matching: proposals (rows, ranked best first) each take the unmatched
    ground truth (column) of highest IoU >= threshold. Returns bool (G,) matched."""
    g = ious.shape[1]
    matched = np.zeros(g, dtype=bool)
    for row in ious:
        cand = np.where(~matched & (row >= threshold), row, -1.0)
        j = int(np.argmax(cand)) if g else 0
        if g and cand[j] >= 0:
            matched[j] = True
    return matched


def proposal_recall(
    proposals: Sequence[np.ndarray],
    gts: Sequence[np.ndarray],
    ignore: Optional[np.ndarray] = None,
    ks: Sequence[int] = (100, 1000),
    thresholds: Sequence[float] = IOU_THRESHOLDS,
) -> Dict[int, List[int]]:
    """For each k: the number of ground-truth objects recalled by the top-k ``proposals`` (ranked
    best first) at each IoU threshold. Sum over images, divide by the object count, and average
    over thresholds for AR@k."""
    full = _iou_matrix(list(proposals[: max(ks)]), list(gts), ignore)
    return {k: [int(match_recall(full[:k], t).sum()) for t in thresholds] for k in ks}
