"""``segany dataset stats|verify|to-coco|from-coco`` on SA-1B folders (one JSON per image).

The loop these close: ``segany annotate`` writes an SA-1B folder -> ``verify`` checks it ->
``segany serve`` to review -> ``to-coco`` makes one COCO file that ``segany train --data`` reads ->
``segany annotate`` again with the new weights. ``from-coco`` brings an existing COCO set in.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..io import IMAGE_EXTENSIONS, atomic_write_bytes, atomic_write_json
from . import sa1b
from .manifest import MANIFEST, latest_by_image, read_manifest


def _load(path: str) -> Tuple[Optional[Any], Optional[str]]:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read()), None
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    except OSError as e:
        return None, f"cannot read ({e})"


def records(folder: str) -> List[Tuple[str, str, Optional[Dict[str, Any]], Optional[str]]]:
    """(path, rel, record or None, problem or None) of every per-image JSON under ``folder``;
    COCO files lying there are not records and are left out."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder")
    out = []
    for path, rel in sa1b.iter_records(folder):
        data, err = _load(path)
        if err is None and isinstance(data, dict) and "images" in data and "image" not in data:
            continue  # a COCO file
        if err is None and not sa1b.is_record(data):
            err = "not an SA-1B record (needs 'image' with width/height and an 'annotations' list)"
        out.append((path, rel, data if err is None else None, err))
    return out


# --------------------------------------------------------------------------- stats
def stats(folder: str) -> Dict[str, Any]:
    per_image, areas, ious, stabs = [], [], [], []
    bad = 0
    for _, _, rec, err in records(folder):
        if rec is None:
            bad += 1
            continue
        im = rec["image"]
        n_px = max(1, int(im["width"]) * int(im["height"]))
        per_image.append(len(rec["annotations"]))
        for a in rec["annotations"]:
            areas.append(float(a.get("area", 0)) / n_px)
            if "predicted_iou" in a:
                ious.append(float(a["predicted_iou"]))
            if "stability_score" in a:
                stabs.append(float(a["stability_score"]))
    n = np.asarray(per_image, dtype=np.float64)
    st: Dict[str, Any] = {
        "images": len(per_image),
        "unreadable_records": bad,
        "masks": int(n.sum()) if len(n) else 0,
        "images_without_masks": int((n == 0).sum()) if len(n) else 0,
        "masks_per_image": {k: (round(float(f(n)), 2) if len(n) else 0.0) for k, f in
                            (("mean", np.mean), ("median", np.median), ("min", np.min), ("max", np.max))},
        "mask_area_fraction": {f"p{q}": (round(float(np.percentile(areas, q)), 5) if areas else 0.0) for q in (10, 50, 90)},
        "predicted_iou_mean": round(float(np.mean(ious)), 4) if ious else None,
        "stability_score_mean": round(float(np.mean(stabs)), 4) if stabs else None,
    }
    mpath = os.path.join(folder, MANIFEST)
    if os.path.exists(mpath):
        last = latest_by_image(read_manifest(mpath))
        st["manifest"] = dict(Counter(r.get("status", "?") for r in last.values()))
    return st


def format_stats(st: Dict[str, Any]) -> str:
    m, a = st["masks_per_image"], st["mask_area_fraction"]
    lines = [
        f"images: {st['images']}" + (f" (+{st['unreadable_records']} unreadable records)" if st["unreadable_records"] else ""),
        f"masks: {st['masks']} ({st['images_without_masks']} images without masks)",
        f"masks per image: mean {m['mean']}, median {m['median']}, min {m['min']}, max {m['max']}",
        f"mask area / image area: p10 {a['p10']}, p50 {a['p50']}, p90 {a['p90']}",
    ]
    if st["predicted_iou_mean"] is not None:
        lines.append(f"mean predicted IoU {st['predicted_iou_mean']}, mean stability {st['stability_score_mean']}")
    if "manifest" in st:
        lines.append("manifest: " + ", ".join(f"{k} {v}" for k, v in sorted(st["manifest"].items())))
    return "\n".join(lines)


# --------------------------------------------------------------------------- verify
def _image_size(path: str) -> Tuple[int, int]:
    """(H, W) as ``load_image`` will see it (EXIF rotation applied), reading the header only."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - broken EXIF is ignored by load_image too
            orientation = 1
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def find_image(folder: str, json_path: str, rec: Dict[str, Any], images: Optional[str] = None) -> Optional[str]:
    name = str(rec["image"].get("file_name", ""))
    cands = []
    if name:
        if images:
            cands.append(os.path.join(images, name))
        cands += [os.path.join(os.path.dirname(json_path), os.path.basename(name)), os.path.join(folder, name)]
    stem = os.path.splitext(json_path)[0]
    cands += [stem + e for e in IMAGE_EXTENSIONS] + [stem + e.upper() for e in IMAGE_EXTENSIONS]
    return next((c for c in cands if os.path.isfile(c)), None)


def verify(folder: str, images: Optional[str] = None, check_images: bool = True) -> Tuple[List[str], int]:
    """(problems, records checked). Checks each record (see :func:`sa1b.check_record`), that its
    image exists and has the recorded size, and that the manifest agrees with the files."""
    problems: List[str] = []
    recs = records(folder)
    for path, rel, rec, err in recs:
        if rec is None:
            problems.append(f"{rel}: {err}")
            continue
        size = None
        if check_images:
            img = find_image(folder, path, rec, images)
            if img is None:
                problems.append(f"{rel}: image {rec['image'].get('file_name')!r} not found (give --images ROOT, or --no-images)")
            else:
                try:
                    size = _image_size(img)
                except Exception as e:  # noqa: BLE001
                    problems.append(f"{rel}: image {img} unreadable ({e})")
        problems += [f"{rel}: {p}" for p in sa1b.check_record(rec, size)]
    mpath = os.path.join(folder, MANIFEST)
    if os.path.exists(mpath):
        present = {rel for _, rel, rec, _ in recs if rec is not None}
        for r in latest_by_image(read_manifest(mpath)).values():
            if r.get("status") == "ok" and r.get("output") not in present:
                problems.append(f"{MANIFEST}: {r['image']} is 'ok' but {r.get('output')} is missing or invalid")
    return problems, len(recs)


# --------------------------------------------------------------------------- COCO
CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}
EXTRA_KEYS = ("predicted_iou", "stability_score", "point_coords", "crop_box")


def to_coco(folder: str, output: str) -> Tuple[int, int]:
    """Every valid record under ``folder`` -> one COCO instance file (``file_name`` as in the
    records; keeps the records' image ids; annotation ids 1..N). Raises on invalid records."""
    images, anns = [], []
    bad = []
    root = os.path.abspath(folder)
    for path, rel, rec, err in records(folder):
        if rec is None:
            bad.append(f"{rel}: {err}")
            continue
        im = rec["image"]
        # file_name relative to the folder when the image lies inside it (records edited in
        # 'segany serve' hold the bare file name), else as recorded
        file_name = im.get("file_name", rel)
        img = find_image(folder, path, rec)
        if img is not None and os.path.abspath(img).startswith(root + os.sep):
            file_name = os.path.relpath(os.path.abspath(img), root).replace(os.sep, "/")
        image_id = int(im.get("image_id", sa1b.stable_image_id(file_name)))
        images.append({"id": image_id, "file_name": file_name, "width": int(im["width"]), "height": int(im["height"])})
        for a in rec["annotations"]:
            seg = a["segmentation"]
            area, bbox = sa1b.rle_area_bbox(seg)
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": 1, "segmentation": seg,
                   "area": area, "bbox": bbox, "iscrowd": 0}
            ann.update({k: a[k] for k in EXTRA_KEYS if k in a})
            anns.append(ann)
    if bad:
        raise ValueError(f"{len(bad)} invalid records, e.g. {bad[0]} (run 'segany dataset verify')")
    ids = Counter(im["id"] for im in images)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise ValueError(f"image id {dup[0]} is used by more than one record")
    coco = {"info": {"description": f"converted by segany dataset to-coco from {os.path.abspath(folder)}"},
            "images": images, "annotations": anns, "categories": [CATEGORY]}
    atomic_write_json(output, coco)
    return len(images), len(anns)


def from_coco(coco_path: str, output: str, images: Optional[str] = None, copy_images: bool = False) -> Tuple[int, int]:
    """A COCO instance file -> ``<output>/<file_name stem>.json`` per image (crowd annotations
    are left out: SA-1B has none). Polygons and uncompressed RLE become compressed RLE."""
    with open(coco_path) as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "images" not in coco:
        raise ValueError(f"{coco_path}: not a COCO instance file (no 'images')")
    if copy_images and not images:
        raise ValueError("--copy-images needs --images (where the COCO file_names are)")
    from pycocotools import mask as mask_utils

    by_image: Dict[Any, list] = {}
    for a in coco.get("annotations", []):
        by_image.setdefault(a["image_id"], []).append(a)
    n_ann = 0
    seen = set()
    for im in coco["images"]:
        h, w = int(im["height"]), int(im["width"])
        rel = Path(im["file_name"]).as_posix()
        out_rel = str(Path(rel).with_suffix(".json"))
        if out_rel in seen:
            raise ValueError(f"{coco_path}: two images map to {out_rel}")
        seen.add(out_rel)
        out_anns = []
        for a in by_image.get(im["id"], []):
            if a.get("iscrowd", 0):
                continue
            seg = a["segmentation"]
            if isinstance(seg, list):
                if not seg:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
                seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                seg = sa1b._normalise_segmentation(seg)
            area, bbox = sa1b.rle_area_bbox(seg)
            if area == 0:
                continue
            ann = {"id": len(out_anns), "segmentation": seg, "bbox": bbox, "area": area}
            ann.update({k: a[k] for k in EXTRA_KEYS if k in a})
            out_anns.append(ann)
        rec = {"image": {"image_id": im["id"], "width": w, "height": h, "file_name": rel}, "annotations": out_anns}
        if copy_images:
            src = os.path.join(images, rel)
            dst = os.path.join(output, rel)
            if os.path.abspath(src) != os.path.abspath(dst):
                with open(src, "rb") as f:
                    atomic_write_bytes(dst, f.read())
        atomic_write_json(os.path.join(output, out_rel), rec)
        n_ann += len(out_anns)
    return len(coco["images"]), n_ann
