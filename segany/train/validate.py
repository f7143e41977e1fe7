"""Quick validation during training (the full benchmark is ``segany eval``).

On a fixed set of validation images (evenly spaced in the val split of every set, each resized
to the model frame), for up to ``objects_per_image`` objects per image:

* box: the object's tight box, single-mask output -> IoU;
* clicks: the standard interactive protocol -- each click at the point farthest from the boundary
  of the larger error region (first click: inside the object), previous low-res logits as mask
  input; first click multimask, keeping the mask with the highest predicted IoU -> IoU after
  1..``clicks`` clicks.

``score`` = mean of box mIoU and mIoU@``clicks``: the number the trainer keeps the best model by.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import torch

from ..modeling.sam import Sam
from . import augment as A


def next_click(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> Tuple[Tuple[int, int], int]:
    """(x, y), label of the standard corrective click for bool (H, W) maps."""
    fn = gt & ~pred & valid
    fp = pred & ~gt & valid
    dfn = cv2.distanceTransform(np.pad(fn, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    dfp = cv2.distanceTransform(np.pad(fp, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    is_pos = dfn.max() >= dfp.max()
    d = dfn if is_pos else dfp
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return (int(x), int(y)), int(is_pos)


def iou(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> float:
    inter = (pred & gt & valid).sum()
    union = ((pred | gt) & valid).sum()
    return float(inter / union) if union else 1.0


def val_items(val_sets: Sequence, max_images: int) -> List[Tuple[int, int]]:
    """(set index, image index) pairs, evenly spaced within each set's val split."""
    per = math.ceil(max_images / max(1, len(val_sets)))
    items = []
    for s, ds in enumerate(val_sets):
        n = len(ds)
        idx = sorted(set(int(i) for i in np.linspace(0, n - 1, min(per, n)))) if n else []
        items += [(s, i) for i in idx]
    return items[:max_images] if len(items) > max_images else items


@torch.no_grad()
def validate(model: Sam, val_sets: Sequence, max_images: int = 60, objects_per_image: int = 2, clicks: int = 5, min_area: int = 400) -> Dict[str, float]:
    """``min_area``: smallest object (pixels in a 512 px frame; scaled with the model's frame)."""
    was_training = model.training
    model.eval()
    device = model.device
    size = model.img_size
    min_px = max(1, int(min_area * (size / 512) ** 2))
    box_ious, click_ious = [], []
    for s, i in val_items(val_sets, max_images):
        image, masks, ignore, = A.to_frame(A.as_arrays(*val_sets[s][i]), size)
        areas = masks.reshape(len(masks), -1).sum(1)
        objs = [j for j in range(len(masks)) if areas[j] >= min_px][:objects_per_image]
        if not objs:
            continue
        gts = masks[objs]
        valid = ~ignore
        h, w = image.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().to(device)
        emb = model.image_encoder(model.preprocess(x)[None])
        pe = model.prompt_encoder.get_dense_pe()
        k = len(objs)

        def decode(points, boxes, mask_in, multimask):
            sparse, dense = model.prompt_encoder(points=points, boxes=boxes, masks=mask_in)
            low, pred_iou = model.mask_decoder(emb, pe, sparse, dense, multimask)
            if multimask:  # keep the candidate with the highest predicted IoU
                best = pred_iou.argmax(1)
                low = low[torch.arange(k), best][:, None]
            full = model.postprocess_masks(low, (h, w), (h, w))[:, 0] > 0
            return low, full.cpu().numpy()

        # box prompt
        boxes = []
        for m in gts:
            ys, xs = np.nonzero(m)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        _, pred = decode(None, torch.tensor(boxes, dtype=torch.float32, device=device), None, False)
        box_ious += [iou(p, m, valid) for p, m in zip(pred, gts)]

        # clicks
        pts = np.zeros((k, 0, 2), np.float32)
        lbl = np.zeros((k, 0), np.int64)
        pred = np.zeros_like(gts)
        low, per_obj = None, [[] for _ in range(k)]
        for c in range(clicks):
            new = [next_click(pred[j], gts[j], valid) for j in range(k)]
            pts = np.concatenate([pts, np.array([[p] for p, _ in new], np.float32)], 1)
            lbl = np.concatenate([lbl, np.array([[l] for _, l in new], np.int64)], 1)
            points = (torch.from_numpy(pts).to(device), torch.from_numpy(lbl).to(device))
            low, pred = decode(points, None, low if c > 0 else None, c == 0)
            for j in range(k):
                per_obj[j].append(iou(pred[j], gts[j], valid))
        click_ious += per_obj
    if was_training:
        model.train()
    ci = np.array(click_ious) if click_ious else np.zeros((0, clicks))
    out = {"objects": len(box_ious), "box_miou": float(np.mean(box_ious)) if box_ious else 0.0}
    for c in range(clicks):
        out[f"miou@{c + 1}"] = float(ci[:, c].mean()) if len(ci) else 0.0
    out["score"] = (out["box_miou"] + out[f"miou@{clicks}"]) / 2
    return {k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in out.items()}
