"""SA-1B per-image records as the data engine writes and checks them.

One JSON per image, the layout of the SA-1B release::

    {"image": {"image_id": int, "width": W, "height": H, "file_name": "dir/x.jpg"},
     "annotations": [{"id": int, "segmentation": {"size": [H, W], "counts": "<COCO RLE>"},
                      "bbox": [x, y, w, h], "area": int, "predicted_iou": float,
                      "stability_score": float, "point_coords": [[x, y]], "crop_box": [x, y, w, h]}]}

``file_name`` is the image's path relative to the annotated input root (posix separators), so a
folder of these JSONs plus the images (``segany annotate --copy-images``) is a self-contained
SA-1B style data set. The content depends only on the image, the model and the options (no
timings, no host names), so two runs of the same job write byte-identical files.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

# Top-level JSON files the engine writes next to the per-image records; never image records.
NON_RECORD_JSON = {"summary.json", "annotations.json", "job.json"}


def stable_image_id(rel: str) -> int:
    """Integer id from the image's relative path: equal on every run, machine and worker."""
    return int(hashlib.sha1(rel.encode("utf-8")).hexdigest()[:12], 16)


def encode_mask(mask: np.ndarray) -> Dict[str, Any]:
    """bool (H, W) -> COCO compressed RLE with ``counts`` as str (JSON-ready)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": rle["counts"].decode("ascii")}


def decode_rle(seg: Dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed str/bytes counts or uncompressed list counts) -> bool (H, W)."""
    from pycocotools import mask as mask_utils

    if isinstance(seg.get("counts"), list):
        rle = mask_utils.frPyObjects(seg, *seg["size"])
    else:
        rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]}
    return mask_utils.decode(rle).astype(bool)


def rle_area_bbox(seg: Dict[str, Any]) -> Tuple[int, List[float]]:
    from pycocotools import mask as mask_utils

    rle = {"size": list(seg["size"]), "counts": seg["counts"].encode("ascii") if isinstance(seg["counts"], str) else seg["counts"]}
    return int(mask_utils.area(rle)), [float(v) for v in mask_utils.toBbox(rle)]


def _normalise_segmentation(seg: Any) -> Dict[str, Any]:
    if isinstance(seg, np.ndarray):
        return encode_mask(seg)
    if isinstance(seg, dict) and "counts" in seg and "size" in seg:
        counts = seg["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if isinstance(counts, list):
            return encode_mask(decode_rle(seg))
        return {"size": [int(seg["size"][0]), int(seg["size"][1])], "counts": counts}
    raise ValueError(f"unsupported segmentation of type {type(seg).__name__}")


def _floats(v: Any) -> Any:
    a = np.asarray(v, dtype=np.float64)
    return a.tolist()


def build_record(rel: str, width: int, height: int, masks: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """SA-1B record from ``SamAutomaticMaskGenerator.generate`` output (any output mode)."""
    anns = []
    for i, m in enumerate(masks):
        seg = _normalise_segmentation(m["segmentation"])
        ann: Dict[str, Any] = {
            "id": i,
            "segmentation": seg,
            "bbox": [float(x) for x in m.get("bbox", rle_area_bbox(seg)[1])],
            "area": int(m.get("area", rle_area_bbox(seg)[0])),
        }
        for key in ("predicted_iou", "stability_score"):
            if key in m:
                ann[key] = round(float(m[key]), 6)
        if "point_coords" in m:
            ann["point_coords"] = _floats(m["point_coords"])
        if "crop_box" in m:
            ann["crop_box"] = [float(x) for x in m["crop_box"]]
        anns.append(ann)
    return {
        "image": {"image_id": stable_image_id(rel), "width": int(width), "height": int(height), "file_name": rel},
        "annotations": anns,
    }


def read_record(path: str) -> Optional[Dict[str, Any]]:
    """The record at ``path`` if it exists, parses and has the SA-1B shape; else None."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not is_record(data):
        return None
    return data


def is_record(data: Any) -> bool:
    return (
        isinstance(data, dict)
        and isinstance(data.get("image"), dict)
        and isinstance(data.get("annotations"), list)
        and all(k in data["image"] for k in ("width", "height"))
    )


def check_record(data: Any, image_size: Optional[Tuple[int, int]] = None) -> List[str]:
    """Problems with one record (empty list when it is valid): shape, RLE decodability, sizes,
    area and bbox consistent with the mask, unique ids. ``image_size`` = (H, W) of the image
    file if known."""
    if not is_record(data):
        return ["not an SA-1B record (needs 'image' with width/height and an 'annotations' list)"]
    problems = []
    im = data["image"]
    h, w = int(im["height"]), int(im["width"])
    if image_size is not None and tuple(image_size) != (h, w):
        problems.append(f"image is {image_size[1]}x{image_size[0]} but the record says {w}x{h}")
    ids = set()
    for k, a in enumerate(data["annotations"]):
        where = f"annotation {k}"
        if not isinstance(a, dict) or "segmentation" not in a:
            problems.append(f"{where}: no segmentation")
            continue
        if a.get("id") in ids:
            problems.append(f"{where}: duplicate id {a.get('id')}")
        ids.add(a.get("id"))
        seg = a["segmentation"]
        try:
            if list(seg["size"]) != [h, w]:
                problems.append(f"{where}: mask size {seg['size']} != image {[h, w]}")
                continue
            area, bbox = rle_area_bbox(seg) if not isinstance(seg.get("counts"), list) else (int(decode_rle(seg).sum()), None)
        except Exception as e:  # noqa: BLE001 - any decoding failure is a finding
            problems.append(f"{where}: segmentation does not decode ({type(e).__name__}: {e})")
            continue
        if area == 0:
            problems.append(f"{where}: empty mask")
        if "area" in a and int(a["area"]) != area:
            problems.append(f"{where}: area {a['area']} != mask area {area}")
        if bbox is not None and "bbox" in a and (len(a["bbox"]) != 4 or max(abs(float(x) - y) for x, y in zip(a["bbox"], bbox)) > 1.0):
            problems.append(f"{where}: bbox {a['bbox']} != mask bbox {bbox}")
    return problems


def iter_records(root: str) -> Iterable[Tuple[str, str]]:
    """(path, relative posix path) of every candidate per-image JSON under ``root``, sorted."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.endswith(".json") or f.startswith("."):
                continue
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if rel in NON_RECORD_JSON:
                continue
            out.append((path, rel))
    return sorted(out, key=lambda t: t[1])


def overlay(image: np.ndarray, record: Dict[str, Any], alpha: float = 0.5) -> np.ndarray:
    """Preview: every mask filled with a fixed colour (by index) and outlined, largest first."""
    import cv2

    out = image.astype(np.float32).copy()
    anns = sorted(record["annotations"], key=lambda a: -int(a.get("area", 0)))
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, size=(max(1, len(anns)), 3)).astype(np.float32)
    edges = np.zeros(image.shape[:2], dtype=np.uint8)
    for a, c in zip(anns, colours):
        m = decode_rle(a["segmentation"])
        if m.shape != image.shape[:2]:
            continue
        out[m] = out[m] * (1 - alpha) + c * alpha
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(edges, contours, -1, 1, 1)
    out[edges > 0] = 255
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)
