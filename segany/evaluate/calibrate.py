"""Pick segment-everything thresholds for a model from data it was trained on.

SAM's generator defaults (``pred_iou_thresh=0.88``, ``stability_score_thresh=0.95``) fit SAM's
own IoU head and logit scale. A smaller model predicts lower IoUs and softer logits, so at those
thresholds it proposes next to nothing. This tool runs the generator with both filters off on
images of the *training* split (never the validation split), matches every proposal to the
ground-truth objects, and chooses the pair of thresholds with the best F1 at IoU 0.5:

* precision: kept proposals whose best ground-truth IoU is >= 0.5 (an under-estimate: data sets
  do not label every region a person would accept);
* recall: ground-truth objects matched by some kept proposal at IoU >= 0.5.

Because the generator's NMS keeps the proposal with the higher predicted IoU, thresholding the
NMS survivors by predicted IoU afterwards gives the same set as thresholding first.

    python -m segany.evaluate.calibrate ../shared/data/coco128 ../shared/data/feral_cats --model tiny \
        --write segany/weights/tiny.safetensors
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List, Sequence, Tuple

import numpy as np

IOU_GRID = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))
STABILITY_GRID = tuple(np.round(np.arange(0.0, 0.96, 0.05), 2))


def proposal_table(generator, datasets: Sequence, images_per_set: int, seed: int = 0) -> Tuple[np.ndarray, int]:
    """Run ``generator`` (filters off) over the first ``images_per_set`` images (shuffled by
    ``seed``) of each data set. Returns rows (predicted_iou, stability, best gt IoU, image, gt
    index of that IoU) as a float array (P, 5), and the number of ground-truth objects."""
    from pycocotools import mask as mask_utils

    rows: List[Tuple[float, float, float, int, int]] = []
    n_gt = 0
    image_no = 0
    rng = np.random.default_rng(seed)
    for ds in datasets:
        order = rng.permutation(len(ds))[:images_per_set]
        for i in order:
            image, masks, _ = ds[int(i)]
            if not masks:
                continue
            recs = generator.generate(image)
            gts = mask_utils.encode(np.asfortranarray(np.stack(masks, -1).astype(np.uint8)))
            props = [r["segmentation"] for r in recs]
            if props:
                props = mask_utils.encode(np.asfortranarray(np.stack(props, -1).astype(np.uint8)))
                ious = np.asarray(mask_utils.iou(props, gts, [0] * len(gts))).reshape(len(recs), len(gts))
                best = ious.argmax(1)
                for r, b, row in zip(recs, best, ious):
                    rows.append((r["predicted_iou"], r["stability_score"], float(row[b]), image_no, n_gt + int(b)))
            n_gt += len(masks)
            image_no += 1
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5), n_gt


def choose(table: np.ndarray, n_gt: int, match_iou: float = 0.5) -> Dict[str, float]:
    """The (pred_iou_thresh, stability_score_thresh) of best F1 over the grids, with its figures."""
    best = {"f1": -1.0}
    for ti in IOU_GRID:
        for ts in STABILITY_GRID:
            kept = table[(table[:, 0] > ti) & (table[:, 1] >= ts)]
            if len(kept) == 0:
                continue
            good = kept[kept[:, 2] >= match_iou]
            precision = len(good) / len(kept)
            recall = len(np.unique(good[:, 4])) / max(1, n_gt)
            f1 = 2 * precision * recall / max(1e-9, precision + recall)
            if f1 > best["f1"]:
                best = {"pred_iou_thresh": float(ti), "stability_score_thresh": float(ts), "f1": round(f1, 4),
                        "precision": round(precision, 4), "recall": round(recall, 4), "kept": int(len(kept))}
    return best


def write_defaults(path: str, result: Dict[str, float]) -> None:
    """Store the chosen thresholds in the .safetensors file's metadata (key "everything"),
    tensors untouched, atomically; ``segany everything``/``annotate`` then use them by default."""
    from safetensors import safe_open

    from ..checkpoints import EVERYTHING_KEYS
    from ..train.export import write_safetensors

    with safe_open(path, framework="pt") as f:
        meta = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    chosen = {k: result[k] for k in EVERYTHING_KEYS}
    meta["everything"] = json.dumps({**chosen, "calibration": {k: v for k, v in result.items() if k not in chosen}})
    write_safetensors(tensors, path, meta)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", nargs="+", help="data sets (their training split is used)")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--images", type=int, default=20, help="images per data set")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--write", metavar="MODEL.safetensors", help="store the chosen thresholds in this model file")
    args = ap.parse_args(argv)

    import torch

    from ..automatic import SamAutomaticMaskGenerator
    from ..checkpoints import load_model
    from ..datasets import open_dataset, split

    if args.threads:
        torch.set_num_threads(args.threads)
    sam = load_model(args.model, checkpoint=args.checkpoint)
    gen = SamAutomaticMaskGenerator(sam, points_per_side=args.points_per_side, pred_iou_thresh=0.0,
                                    stability_score_thresh=0.0)
    sets = [split(open_dataset(p), "train") for p in args.data]
    table, n_gt = proposal_table(gen, sets, args.images)
    result = choose(table, n_gt)
    result.update(proposals=int(len(table)), gt_objects=n_gt, images_per_set=args.images,
                  points_per_side=args.points_per_side)
    print(json.dumps(result))
    if args.write:
        write_defaults(args.write, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
