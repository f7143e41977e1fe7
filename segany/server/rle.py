"""COCO RLE helpers for the server: encode masks, and validate RLE that clients send.

Client RLE is checked in Python *before* pycocotools sees it: pycocotools' C decoder trusts its
input (a count string ending mid-number is read past its end; counts summing to more than
height*width overrun the output buffer), so a malformed annotation must be refused here.
"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
from pycocotools import mask as mask_utils


class RLEError(ValueError):
    """A segmentation is not a valid COCO RLE for the image."""


def encode(mask: np.ndarray) -> Dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str} (compressed COCO RLE)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def _string_counts(s: str) -> List[int]:
    """Decode pycocotools' compressed count string (same algorithm as ``rleFrString``)."""
    counts: List[int] = []
    p, n = 0, len(s)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                raise RLEError("RLE counts string ends in the middle of a number")
            c = ord(s[p]) - 48
            if c < 0 or c > 63:
                raise RLEError(f"RLE counts contains an invalid character {s[p]!r}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
            if k > 13:
                raise RLEError("RLE counts contains a number that is too large")
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def validate(seg: Any, height: int, width: int) -> Dict[str, Any]:
    """Check a client segmentation and return it as compressed RLE {"size", "counts": str}."""
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        raise RLEError("segmentation must be a COCO RLE object {\"size\": [h, w], \"counts\": ...}")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        raise RLEError("segmentation.size must be [height, width] integers")
    if size != [height, width]:
        raise RLEError(f"segmentation.size {size} does not match the image size [{height}, {width}]")
    counts = seg["counts"]
    if isinstance(counts, str):
        if len(counts) > 8 * height * width + 64:
            raise RLEError("RLE counts string is longer than any mask of this size")
        values = _string_counts(counts)
    elif isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
        values = counts
    else:
        raise RLEError("segmentation.counts must be a compressed string or a list of integers")
    if any(v < 0 for v in values):
        raise RLEError("RLE counts contain a negative run length")
    if sum(values) != height * width:
        raise RLEError(f"RLE run lengths sum to {sum(values)}, expected height*width = {height * width}")
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": values}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {"size": [height, width], "counts": counts}


def area_bbox(rle: Dict[str, Any]) -> tuple:
    """(area, [x, y, w, h]) of a *validated* compressed RLE."""
    r = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(r)), [float(v) for v in mask_utils.toBbox(r)]


def decode(rle: Dict[str, Any]) -> np.ndarray:
    r = {"size": rle["size"], "counts": rle["counts"].encode("ascii") if isinstance(rle["counts"], str) else rle["counts"]}
    return mask_utils.decode(r).astype(bool)
