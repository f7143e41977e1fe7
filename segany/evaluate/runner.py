"""Run the benchmark protocols on data sets and write reports.

Data sets are read with :mod:`segany.datasets` (COCO JSON with RLE or polygons, SA-1B per-image
JSON, images + mask files with 128 = ignore); ``split="val"`` keeps the project's fixed
validation split (:func:`segany.datasets.split`), ``limit`` the first N images of it.

Protocols (``PROTOCOLS``):

* ``clicks`` -- the simulated user of :mod:`segany.evaluate.metrics`, ``max_clicks`` clicks per
  object; mIoU after every click, NoC@85/90, NoF@85/90;
* ``box`` -- the object's tight ground-truth box, and the same box jittered as in the SAM paper
  (N(0, 0.1 x side) per coordinate, at most 20 px; seeded by ``seed``, image index and object
  index, so every method sees the same boxes); one mask each -> mIoU;
* ``everything`` -- segment-everything proposals ranked by predicted IoU; COCO-style recall of the
  ground-truth objects by the top 100 / 1000 at IoU 0.50:0.05:0.95 -> AR@100, AR@1000 (models
  only).
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from .methods import Method
from .metrics import IOU_THRESHOLDS, jitter_box, mask_box, mask_iou, proposal_recall, simulate_clicks, summarize_clicks

PROTOCOLS = ("clicks", "box", "everything")
AR_KS = (100, 1000)


class DatasetError(ValueError):
    """A data set path that cannot be read."""


def load_dataset(path: str, split: str = "val"):
    """The :mod:`segany.datasets` reader for ``path``, restricted to ``split`` ("val" or "all")."""
    from .. import datasets as D

    if not os.path.exists(path):
        raise DatasetError(f"{path}: no such data set")
    if split not in ("val", "all", "train"):
        raise DatasetError(f"split must be 'val', 'train' or 'all', got {split!r}")
    try:
        ds = D.open_dataset(path)
    except (ValueError, KeyError, OSError) as e:
        raise DatasetError(f"{path}: cannot read data set ({type(e).__name__}: {e})") from None
    if split != "all":
        ds = D.split(ds, split)
    return ds


def dataset_name(path: str) -> str:
    p = os.path.abspath(path.rstrip("/"))
    if os.path.isfile(p):
        stem = os.path.splitext(os.path.basename(p))[0]
        base = os.path.basename(os.path.dirname(p))
        p = base if stem == "annotations" else f"{base}_{stem}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(p)) or "dataset"


def _box_rng(seed: int, image_index: int, object_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, image_index, object_index])


def evaluate(
    dataset,
    method: Method,
    protocols: Sequence[str] = ("clicks", "box"),
    max_clicks: int = 20,
    limit: Optional[int] = None,
    seed: int = 0,
    min_area: int = 0,
    max_objects: Optional[int] = None,
    progress: bool = True,
    desc: str = "",
    everything_kwargs: Optional[dict] = None,
) -> Dict[str, object]:
    """Run ``protocols`` with ``method`` on ``dataset`` (samples ``(image, masks, ignore)`` and
    ``names``). A sample that fails to load or to run is recorded under ``skipped`` and left out.
    ``max_objects``: evaluate only the first N objects (in annotation order) of each image.
    Returns the report dict."""
    bad = [p for p in protocols if p not in PROTOCOLS]
    if bad:
        raise ValueError(f"unknown protocol {bad[0]!r}; known: {', '.join(PROTOCOLS)}")
    protocols = [p for p in PROTOCOLS if p in protocols]
    if "everything" in protocols and not method.supports_everything:
        protocols.remove("everything")
    n = len(dataset) if limit is None else min(len(dataset), int(limit))
    names = getattr(dataset, "names", None) or [str(i) for i in range(len(dataset))]
    per_object: List[dict] = []
    skipped: List[dict] = []
    small = 0
    recalled = {k: np.zeros(len(IOU_THRESHOLDS), dtype=np.int64) for k in AR_KS}
    ev_objects = 0
    t0 = time.perf_counter()
    it = range(n)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc=desc or method.name, unit="img", dynamic_ncols=True)
    for i in it:
        name = names[i]
        try:
            image, masks, ignore = dataset[i]
            if ignore is not None and not ignore.any():
                ignore = None
            method.set_image(image)
        except Exception as e:  # unreadable image/annotation, wrong shapes, ...
            skipped.append({"index": i, "name": name, "error": f"{type(e).__name__}: {e}"})
            continue
        valid = None if ignore is None else ~ignore
        objs = []
        for j, gt in enumerate(masks):
            area = int(np.count_nonzero(gt if valid is None else gt & valid))
            if area == 0 or area < min_area:
                small += 1
                continue
            objs.append((j, gt))
        if max_objects is not None:
            objs = objs[:max_objects]
        for j, gt in objs:
            rec: Dict[str, object] = {"image": name, "object": j, "area": int(gt.sum())}
            try:
                if "clicks" in protocols:
                    method.reset()
                    ious, clicks = simulate_clicks(method.predict_clicks, gt, ignore, max_clicks)
                    rec["clicks"] = [round(v, 5) for v in ious]
                    rec["first_click"] = [clicks[0].x, clicks[0].y]
                if "box" in protocols:
                    box = mask_box(gt)
                    jb = jitter_box(box, gt.shape, _box_rng(seed, i, j))
                    rec["box_iou"] = round(mask_iou(method.predict_box(box), gt, ignore), 5)
                    rec["jitter_box_iou"] = round(mask_iou(method.predict_box(jb), gt, ignore), 5)
            except Exception as e:
                skipped.append({"index": i, "name": name, "object": j, "error": f"{type(e).__name__}: {e}"})
                continue
            per_object.append(rec)
        if "everything" in protocols and objs:
            try:
                anns = method.generate(image, **(everything_kwargs or {}))
                anns = sorted(anns, key=lambda a: -float(a.get("predicted_iou", 0.0)))
                props = [np.asarray(a["segmentation"], dtype=bool) for a in anns]
                r = proposal_recall(props, [g for _, g in objs], ignore, AR_KS)
                for k in AR_KS:
                    recalled[k] += np.asarray(r[k])
                ev_objects += len(objs)
            except Exception as e:
                skipped.append({"index": i, "name": name, "protocol": "everything", "error": f"{type(e).__name__}: {e}"})
    report: Dict[str, object] = {
        "method": method.name,
        "protocols": list(protocols),
        "max_clicks": max_clicks,
        "images_in_split": len(dataset),
        "images": n,
        "objects": len(per_object),
        "objects_below_min_area": small,
        "min_area": min_area,
        "max_objects_per_image": max_objects,
        "seed": seed,
        "seconds": round(time.perf_counter() - t0, 2),
        "skipped": skipped,
    }
    report.update(summarize(per_object, protocols, max_clicks))
    if "everything" in protocols:
        report["everything"] = everything_summary(recalled, ev_objects)
    report["per_object"] = per_object
    return report


def everything_summary(recalled: Dict[int, np.ndarray], objects: int) -> Dict[str, object]:
    out: Dict[str, object] = {"objects": objects, "iou_thresholds": list(IOU_THRESHOLDS)}
    for k, counts in recalled.items():
        rec = (np.asarray(counts, dtype=np.float64) / objects) if objects else np.zeros(len(IOU_THRESHOLDS))
        out[f"ar{k}"] = round(float(rec.mean()), 5) if objects else None
        out[f"recall{k}"] = [round(float(v), 5) for v in rec]
        out[f"recalled{k}"] = [int(v) for v in counts]  # objects recalled per threshold
    return out


def summarize(per_object: Sequence[dict], protocols: Sequence[str], max_clicks: int) -> Dict[str, object]:
    """Aggregate per-object records (as in a report's ``per_object``) into the headline metrics."""
    out: Dict[str, object] = {}
    if "clicks" in protocols:
        out["clicks"] = summarize_clicks([r["clicks"] for r in per_object if "clicks" in r], max_clicks)
    if "box" in protocols:
        b = [r["box_iou"] for r in per_object if "box_iou" in r]
        jb = [r["jitter_box_iou"] for r in per_object if "jitter_box_iou" in r]
        out["box"] = {
            "objects": len(b),
            "miou_gt_box": round(float(np.mean(b)), 5) if b else None,
            "miou_jittered_box": round(float(np.mean(jb)), 5) if jb else None,
        }
    return out


def pool(reports: Sequence[Dict[str, object]]) -> Dict[str, object]:
    """One report over all objects of several reports of the same method."""
    if not reports:
        raise ValueError("nothing to pool")
    protocols = [p for p in PROTOCOLS if all(p in r["protocols"] for r in reports)]
    max_clicks = int(reports[0]["max_clicks"])
    objs = [o for r in reports for o in r["per_object"]]
    out: Dict[str, object] = {
        "method": reports[0]["method"],
        "datasets": [r.get("dataset") for r in reports],
        "protocols": protocols,
        "max_clicks": max_clicks,
        "images": sum(int(r["images"]) for r in reports),
        "objects": len(objs),
        "skipped": sum(len(r["skipped"]) for r in reports),
    }
    out.update(summarize(objs, protocols, max_clicks))
    if "everything" in protocols:
        objects = sum(int(r["everything"]["objects"]) for r in reports)
        recalled = {k: sum(np.asarray(r["everything"][f"recalled{k}"], dtype=np.int64) for r in reports) for k in AR_KS}
        out["everything"] = everything_summary(recalled, objects)
    return out


# ------------------------------------------------------------------------------- printing
def _fmt(v, digits=3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cells(rows: Sequence[Dict[str, object]]):
    head = ["dataset", "method", "images", "objects", "mIoU@1", "@3", "@5", "@max", "NoC85", "NoC90", "NoF90%", "box", "jit.box", "AR@100", "AR@1000"]
    lines = []
    for r in rows:
        c = r.get("clicks") or {}
        miou = c.get("miou") or []
        b = r.get("box") or {}
        e = r.get("everything") or {}
        pick = lambda k: float(miou[k - 1]) if len(miou) >= k else None  # noqa: E731
        lines.append([
            str(r.get("dataset", "")), str(r["method"]), str(r["images"]), str(r["objects"]),
            _fmt(pick(1)), _fmt(pick(3)), _fmt(pick(5)), _fmt(float(miou[-1]) if miou else None),
            _fmt(c.get("noc85"), 2), _fmt(c.get("noc90"), 2), _fmt(c.get("nof90_pct"), 1),
            _fmt(b.get("miou_gt_box")), _fmt(b.get("miou_jittered_box")), _fmt(e.get("ar100")), _fmt(e.get("ar1000")),
        ])
    return head, lines


def table(rows: Sequence[Dict[str, object]]) -> str:
    """A fixed-width text table of report rows (each with ``dataset`` and ``method``)."""
    head, lines = _cells(rows)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(s.ljust(w) if i < 2 else s.rjust(w) for i, (s, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines])


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    """The same table in Markdown (for READMEs)."""
    head, lines = _cells(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(l) + " |" for l in lines]
    return "\n".join(out)
