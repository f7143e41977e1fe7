"""COCO RLE helpers for the server: encode masks, and validate RLE that clients send.

Client RLE is checked in Python *before* pycocotools sees it: pycocotools' C decoder trusts its
input (a count string ending mid-number is read past its end; counts summing to more than
height*width overrun the output buffer), so a malformed annotation must be refused here, by
``segany.masks.validate_rle_counts``, whose ``ValueError`` becomes ``RLEError`` (a 400).
"""
from __future__ import annotations

from typing import Any, Dict

import numpy as np
from pycocotools import mask as mask_utils

from ..masks import validate_rle_counts


class RLEError(ValueError):
    """A segmentation is not a valid COCO RLE for the image."""


def encode(mask: np.ndarray) -> Dict[str, Any]:
    """(H, W) bool -> {"size": [H, W], "counts": str} (compressed COCO RLE)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


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
    elif not (isinstance(counts, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in counts)):
        raise RLEError("segmentation.counts must be a compressed string or a list of integers")
    try:
        values = validate_rle_counts(counts, height, width)
    except ValueError as e:
        raise RLEError(str(e)) from None
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [height, width], "counts": values}, height, width)
        return {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {"size": [height, width], "counts": counts}


def area_bbox(rle: Dict[str, Any]) -> tuple:
    """(area, [x, y, w, h]) of a *validated* compressed RLE."""
    r = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return int(mask_utils.area(r)), [float(v) for v in mask_utils.toBbox(r)]

