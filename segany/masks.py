"""Mask utilities shared by the automatic generator, the data engine, the server and the trainer.

Everything here is exact (no approximation) and vectorised where it matters:

* RLE: ``mask_to_rle`` / ``rle_to_mask`` (uncompressed, column-major counts, the format of
  ``segment_anything.utils.amg.mask_to_rle_pytorch``), ``encode_rle`` / ``decode_rle`` (COCO
  compressed RLE, byte-identical to ``pycocotools.mask.encode``, ``counts`` as ``str``),
  ``rle_to_coco`` (uncompressed -> compressed), ``area_from_rle``, ``validate_rle_counts``
  (checks untrusted counts against a mask size without decoding them).
* Boxes: ``masks_to_boxes`` (XYXY, inclusive pixel indices, ``[0, 0, 0, 0]`` for an empty mask,
  like ``batched_mask_to_box``), ``box_xyxy_to_xywh``.
* ``stability_score`` (IoU of the masks thresholded at ``t + offset`` and ``t - offset``).
* ``nms`` / ``batched_nms``: greedy non-maximum suppression with torchvision's semantics
  (stable descending sort by score, suppress when IoU > threshold, float32 arithmetic, boxes
  XYXY without +1), without torchvision.
* ``remove_small_regions``: fill small holes / remove small islands with OpenCV connected
  components, as the official generator does.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]


def _np_bool(masks: ArrayLike) -> np.ndarray:
    if isinstance(masks, torch.Tensor):
        masks = masks.detach().cpu().numpy()
    m = np.asarray(masks)
    if m.dtype != np.bool_:
        m = m != 0
    return m


# --------------------------------------------------------------------------------------- RLE
def mask_to_rle(masks: ArrayLike) -> List[Dict[str, Any]]:
    """(N, H, W) or (H, W) masks -> uncompressed RLEs ``{"size": [h, w], "counts": [int, ...]}``.

    Counts run over the mask in column-major (Fortran) order and start with the number of zeros
    (0 if the first pixel is set). A single (H, W) mask gives a list of one RLE."""
    m = _np_bool(masks)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W) or (H, W), got shape {m.shape}")
    n, h, w = m.shape
    size = h * w
    if n == 0:
        return []
    if size == 0:
        return [{"size": [h, w], "counts": []} for _ in range(n)]
    flat = np.ascontiguousarray(m.transpose(0, 2, 1)).reshape(n, size)
    change = flat[:, 1:] != flat[:, :-1]
    rows, cols = np.nonzero(change)
    splits = np.searchsorted(rows, np.arange(1, n))
    per_mask = np.split(cols + 1, splits)
    first = flat[:, 0]
    out = []
    for i in range(n):
        edges = np.concatenate(([0], per_mask[i], [size]))
        runs = np.diff(edges).tolist()
        counts = [0] + runs if first[i] else runs
        out.append({"size": [h, w], "counts": counts})
    return out


def rle_to_mask(rle: Dict[str, Any]) -> np.ndarray:
    """Uncompressed or COCO-compressed RLE -> (H, W) bool mask."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(validate_rle_counts(rle["counts"], h, w), dtype=np.int64)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def area_from_rle(rle: Dict[str, Any]) -> int:
    """Number of foreground pixels of an uncompressed or COCO RLE."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = _counts_from_string(counts)
    return int(sum(counts[1::2]))


def _counts_to_string(counts: Sequence[int]) -> str:
    # pycocotools' rleToString: deltas against the count two back (from the 4th on), 5 bits per
    # character, continuation bit 0x20, sign bit 0x10, offset by '0'.
    out = []
    for i, x in enumerate(counts):
        x = int(x)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _counts_from_string(s: Union[str, bytes]) -> List[int]:
    # pycocotools' rleFrString, but checked: pycocotools' C decoder reads past the end of a
    # string that stops mid-number; here any malformed string raises ValueError.
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise ValueError("RLE counts string ends in the middle of a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"RLE counts contains an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
            if k > 13:
                raise ValueError("RLE counts contains a number that is too large")
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def validate_rle_counts(counts: Union[str, bytes, Sequence[int]], height: int, width: int) -> List[int]:
    """Run lengths of an RLE's ``counts`` (COCO compressed ``str``/``bytes``, or uncompressed
    integers), checked to describe a ``height`` x ``width`` mask: well-formed, no negative run,
    runs summing to ``height * width``. Raises ``ValueError`` otherwise.

    Nothing is allocated at the mask's size, so this is the check to run on untrusted RLE before
    pycocotools' C decoder sees it (that decoder trusts its input: counts summing to more than
    height*width overrun its output buffer)."""
    values = _counts_from_string(counts) if isinstance(counts, (str, bytes)) else [int(v) for v in counts]
    if any(v < 0 for v in values):
        raise ValueError("RLE counts contain a negative run length")
    total = sum(values)
    if total != height * width:
        raise ValueError(f"RLE run lengths sum to {total}, expected height*width = {height * width}")
    return values


def rle_to_coco(rle: Dict[str, Any]) -> Dict[str, Any]:
    """Uncompressed RLE -> COCO compressed RLE ``{"size": [h, w], "counts": str}`` (the
    reference's ``coco_encode_rle``, without pycocotools)."""
    h, w = (int(v) for v in rle["size"])
    return {"size": [h, w], "counts": _counts_to_string(rle["counts"])}


def coco_to_rle(rle: Dict[str, Any]) -> Dict[str, Any]:
    """COCO compressed RLE -> uncompressed RLE (counts as a list of ints)."""
    h, w = (int(v) for v in rle["size"])
    return {"size": [h, w], "counts": _counts_from_string(rle["counts"])}


def encode_rle(mask: ArrayLike) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """(H, W) mask -> COCO RLE ``{"size": [h, w], "counts": str}``; (N, H, W) -> list of them.
    Equal to ``pycocotools.mask.encode`` with ``counts`` decoded to ``str`` (JSON-ready)."""
    m = _np_bool(mask)
    rles = [rle_to_coco(r) for r in mask_to_rle(m)]
    return rles[0] if m.ndim == 2 else rles


def decode_rle(rle: Union[Dict[str, Any], Sequence[Dict[str, Any]]]) -> np.ndarray:
    """COCO (or uncompressed) RLE -> (H, W) bool mask; a list of RLEs -> (N, H, W)."""
    if isinstance(rle, dict):
        return rle_to_mask(rle)
    masks = [rle_to_mask(r) for r in rle]
    if not masks:
        raise ValueError("decode_rle needs at least one RLE to know the mask size")
    return np.stack(masks)


# ------------------------------------------------------------------------------------- boxes
def masks_to_boxes(masks: ArrayLike) -> torch.Tensor:
    """(..., H, W) masks -> (..., 4) XYXY boxes of int64 inclusive pixel indices; an empty mask
    gives [0, 0, 0, 0] (``segment_anything.utils.amg.batched_mask_to_box``)."""
    m = torch.as_tensor(_np_bool(masks)) if not isinstance(masks, torch.Tensor) else masks.bool()
    shape = m.shape
    if m.ndim < 2:
        raise ValueError(f"masks must be (..., H, W), got shape {tuple(shape)}")
    h, w = shape[-2:]
    if m.numel() == 0:
        return torch.zeros(*shape[:-2], 4, dtype=torch.int64)
    m = m.reshape(-1, h, w)
    rows = m.any(-1)
    cols = m.any(-2)
    ar_h = torch.arange(h)
    ar_w = torch.arange(w)
    y1 = torch.where(rows, ar_h, -1).amax(-1)
    y0 = torch.where(rows, ar_h, h).amin(-1)
    x1 = torch.where(cols, ar_w, -1).amax(-1)
    x0 = torch.where(cols, ar_w, w).amin(-1)
    out = torch.stack([x0, y0, x1, y1], -1)
    empty = ~rows.any(-1)
    out[empty] = 0
    return out.reshape(*shape[:-2], 4)


def box_xyxy_to_xywh(boxes: ArrayLike) -> ArrayLike:
    """XYXY -> XYWH (last axis), same type as the input; W = x1 - x0 (inclusive boxes keep the
    official generator's convention)."""
    if isinstance(boxes, torch.Tensor):
        out = boxes.clone()
    else:
        out = np.array(boxes, copy=True)
    out[..., 2] = out[..., 2] - out[..., 0]
    out[..., 3] = out[..., 3] - out[..., 1]
    return out


# --------------------------------------------------------------------------------- stability
def stability_score(logits: torch.Tensor, mask_threshold: float = 0.0, offset: float = 1.0) -> torch.Tensor:
    """IoU of ``logits > t + offset`` and ``logits > t - offset`` over the last two axes (the
    first is contained in the second). NaN for a mask empty at both thresholds, like the
    reference."""
    inter = (logits > (mask_threshold + offset)).sum((-1, -2), dtype=torch.int64)
    union = (logits > (mask_threshold - offset)).sum((-1, -2), dtype=torch.int64)
    return inter.float() / union.float()


# --------------------------------------------------------------------------------------- NMS
def box_iou_matrix(boxes: np.ndarray) -> np.ndarray:
    """Pairwise IoU of XYXY boxes, float32, as torchvision computes it (no +1)."""
    b = np.asarray(boxes, dtype=np.float32)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    xx1 = np.maximum(b[:, None, 0], b[None, :, 0])
    yy1 = np.maximum(b[:, None, 1], b[None, :, 1])
    xx2 = np.minimum(b[:, None, 2], b[None, :, 2])
    yy2 = np.minimum(b[:, None, 3], b[None, :, 3])
    w = np.maximum(np.float32(0), xx2 - xx1)
    h = np.maximum(np.float32(0), yy2 - yy1)
    inter = w * h
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area[:, None] + area[None, :] - inter)


def nms(boxes: ArrayLike, scores: ArrayLike, iou_threshold: float) -> torch.Tensor:
    """Indices (int64, by decreasing score) of the boxes kept by greedy NMS: a box is dropped when
    its IoU with a kept, higher-scoring box is > ``iou_threshold``. Ties in score keep the input
    order (stable sort). Same semantics as ``torchvision.ops.nms``."""
    b = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    b = b.astype(np.float32).reshape(-1, 4)
    s = s.astype(np.float32).reshape(-1)
    if len(b) != len(s):
        raise ValueError(f"nms: {len(b)} boxes but {len(s)} scores")
    if len(b) == 0:
        return torch.empty(0, dtype=torch.int64)
    order = torch.sort(torch.as_tensor(s), descending=True, stable=True).indices.numpy()
    b = b[order]
    # One IoU row per kept box against the boxes after it that are still in, never the whole
    # matrix (segment everything brings thousands of boxes, of which a few hundred are kept);
    # the float32 operations are box_iou_matrix's, in its order.
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    thr = np.float32(iou_threshold)
    n = len(order)
    removed = np.zeros(n, dtype=bool)
    keep = []
    for i in range(n):
        if removed[i]:
            continue
        keep.append(i)
        rest = i + 1 + np.flatnonzero(~removed[i + 1 :])
        if len(rest) == 0:
            break
        r = b[rest]
        w = np.maximum(np.float32(0), np.minimum(b[i, 2], r[:, 2]) - np.maximum(b[i, 0], r[:, 0]))
        h = np.maximum(np.float32(0), np.minimum(b[i, 3], r[:, 3]) - np.maximum(b[i, 1], r[:, 1]))
        inter = w * h
        with np.errstate(divide="ignore", invalid="ignore"):
            removed[rest] = inter / (area[i] + area[rest] - inter) > thr
    return torch.as_tensor(order[np.asarray(keep, dtype=np.int64)], dtype=torch.int64)


def batched_nms(boxes: ArrayLike, scores: ArrayLike, idxs: ArrayLike, iou_threshold: float) -> torch.Tensor:
    """NMS done independently per category ``idxs`` (``torchvision.ops.batched_nms``): boxes of
    different categories never suppress each other. Indices by decreasing score."""
    b = torch.as_tensor(boxes).float().reshape(-1, 4)
    s = torch.as_tensor(scores).float().reshape(-1)
    c = torch.as_tensor(idxs).reshape(-1)
    if b.numel() == 0:
        return torch.empty(0, dtype=torch.int64)
    if len(c) != len(b):
        raise ValueError(f"batched_nms: {len(b)} boxes but {len(c)} category ids")
    cats = torch.unique(c)
    if len(cats) == 1:
        return nms(b, s, iou_threshold)
    kept = [torch.nonzero(c == k).flatten()[nms(b[c == k], s[c == k], iou_threshold)] for k in cats]
    keep = torch.cat(kept)
    order = torch.sort(s[keep], descending=True, stable=True).indices
    return keep[order]


# ------------------------------------------------------------------------- small regions
def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fill holes (``mode="holes"``) or remove islands (``mode="islands"``) smaller than
    ``area_thresh`` pixels (8-connectivity). Returns (mask, changed). When every island is
    small, the largest one is kept. Same result as the official generator's function."""
    import cv2

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = _np_bool(mask)
    correct_holes = mode == "holes"
    working = (correct_holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0] + small
    if not correct_holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(regions, fill), True
