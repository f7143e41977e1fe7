"""Reading and writing mask annotations: SA-1B per-image JSON and COCO results.

SA-1B per image (what ``segany everything`` writes, the data engine writes, the web server
saves and the trainer reads)::

    {"image": {"image_id": int, "file_name": str, "width": int, "height": int},
     "annotations": [{"id": int, "segmentation": {"size": [h, w], "counts": str},
                      "area": int, "bbox": [x, y, w, h], "predicted_iou": float,
                      "point_coords": [[x, y]], "stability_score": float,
                      "crop_box": [x, y, w, h]}, ...]}

COCO results (one file for many images): a list of
``{"image_id", "category_id", "segmentation", "bbox", "area", "score"}``; ``score`` is the
predicted IoU. Segmentations are COCO compressed RLE with ``counts`` as ``str``.
All writers are atomic (``segany.io``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Sequence

import numpy as np

from . import masks as M
from .io import PathLike, atomic_write_json


class FormatError(ValueError):
    """A file is not valid SA-1B / COCO annotation JSON; the message says what is wrong."""


def _coco_seg(seg: Any) -> Dict[str, Any]:
    if isinstance(seg, dict):
        return M.rle_to_coco(seg) if isinstance(seg.get("counts"), list) else {"size": list(seg["size"]), "counts": seg["counts"]}
    return M.encode_rle(np.asarray(seg))


def sa1b_record(records: Sequence[Dict[str, Any]], image_id: int, file_name: str, width: int, height: int) -> Dict[str, Any]:
    """An SA-1B per-image dict from generator records (any output_mode)."""
    anns = []
    for i, r in enumerate(records):
        seg = _coco_seg(r["segmentation"])
        if list(seg["size"]) != [height, width]:
            raise ValueError(f"mask {i} has size {seg['size']}, image is {[height, width]}")
        ann = {"id": i, "segmentation": seg, "area": int(r.get("area", M.area_from_rle(seg))), "bbox": [float(v) for v in r["bbox"]]}
        for k in ("predicted_iou", "stability_score"):
            if k in r:
                ann[k] = float(r[k])
        if "point_coords" in r:
            ann["point_coords"] = [[float(v) for v in p] for p in r["point_coords"]]
        if "crop_box" in r:
            ann["crop_box"] = [float(v) for v in r["crop_box"]]
        anns.append(ann)
    return {"image": {"image_id": int(image_id), "file_name": str(file_name), "width": int(width), "height": int(height)}, "annotations": anns}


def write_sa1b(path: PathLike, records: Sequence[Dict[str, Any]], image_id: int, file_name: str, width: int, height: int) -> Dict[str, Any]:
    """Write one image's masks as SA-1B JSON (atomically); returns the dict written."""
    data = sa1b_record(records, image_id, file_name, width, height)
    atomic_write_json(path, data)
    return data


def read_sa1b(path: PathLike, decode: bool = False) -> Dict[str, Any]:
    """Read and validate an SA-1B per-image JSON. With ``decode=True`` each annotation gains
    ``"mask"``: an (H, W) bool array."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), dict) or not isinstance(data.get("annotations"), list):
        raise FormatError(f"{path}: expected an object with 'image' and 'annotations'")
    img = data["image"]
    for k in ("width", "height"):
        if not isinstance(img.get(k), int) or img[k] < 1:
            raise FormatError(f"{path}: image.{k} must be a positive integer")
    for i, ann in enumerate(data["annotations"]):
        seg = ann.get("segmentation") if isinstance(ann, dict) else None
        if not isinstance(seg, dict) or "counts" not in seg or "size" not in seg:
            raise FormatError(f"{path}: annotation {i} has no RLE segmentation")
        if list(seg["size"]) != [img["height"], img["width"]]:
            raise FormatError(f"{path}: annotation {i} size {seg['size']} does not match the image {[img['height'], img['width']]}")
        if decode:
            try:
                ann["mask"] = M.decode_rle(seg)
            except ValueError as e:
                raise FormatError(f"{path}: annotation {i}: {e}") from None
    return data


def coco_results(records: Sequence[Dict[str, Any]], image_id: int, category_id: int = 1) -> List[Dict[str, Any]]:
    """COCO result entries for one image's masks (score = predicted IoU)."""
    out = []
    for r in records:
        seg = _coco_seg(r["segmentation"])
        out.append({
            "image_id": int(image_id), "category_id": int(category_id), "segmentation": seg,
            "bbox": [float(v) for v in r["bbox"]], "area": int(r.get("area", M.area_from_rle(seg))),
            "score": float(r.get("predicted_iou", 1.0)),
        })
    return out


def write_coco_results(path: PathLike, results: Iterable[Dict[str, Any]]) -> None:
    atomic_write_json(path, list(results))


def read_coco_results(path: PathLike) -> List[Dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list) or not all(isinstance(d, dict) and "image_id" in d and "segmentation" in d for d in data):
        raise FormatError(f"{path}: expected a list of COCO results with image_id and segmentation")
    return data
