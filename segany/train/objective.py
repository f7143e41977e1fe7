"""Prompt simulation and losses of the SAM recipe.

Shapes: K objects; masks at the decoder's low resolution L x L (L = 4 x embedding side, 256 for
the tiny model). ``gt`` (K, L, L) float {0, 1}; ``valid`` (K or 1, L, L) float, 0 on ignored
pixels (and on the padding outside the image).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def noisy_boxes(gt: torch.Tensor, scale: float, g: torch.Generator, std: float = 0.1, max_px: float = 20.0) -> torch.Tensor:
    """Tight boxes of ``gt`` (K, L, L), jittered per coordinate by N(0, std * side), clipped to
    ``max_px`` (input-frame pixels), returned in the input frame (K, 4) xyxy; ``scale`` maps
    low-res to input pixels."""
    k, h, w = gt.shape
    ys = gt.amax(dim=2) > 0  # (K, L) rows with object
    xs = gt.amax(dim=1) > 0
    ar = torch.arange(h, device=gt.device)
    y0 = torch.where(ys, ar, h).amin(1)
    y1 = torch.where(ys, ar, -1).amax(1) + 1
    ar = torch.arange(w, device=gt.device)
    x0 = torch.where(xs, ar, w).amin(1)
    x1 = torch.where(xs, ar, -1).amax(1) + 1
    box = torch.stack([x0, y0, x1, y1], 1).float() * scale
    side = torch.stack([box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]] * 2, 1)
    noise = torch.randn(box.shape, generator=g).to(gt.device) * std * side
    box = box + noise.clamp(-max_px, max_px)
    return box.clamp(0, scale * max(h, w))


def sample_points(region: torch.Tensor, g: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """One uniformly random pixel of each ``region`` (K, L, L) bool -> (K, 2) xy (low-res pixel
    coordinates) and (K,) bool "found" (False where the region is empty)."""
    k, h, w = region.shape
    flat = region.reshape(k, -1).float()
    found = flat.sum(1) > 0
    probs = torch.where(found[:, None], flat, torch.ones_like(flat))
    idx = torch.multinomial(probs.cpu(), 1, generator=g).squeeze(1).to(region.device)
    return torch.stack([idx % w, idx // w], 1).float(), found


def _user_clicks(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``segany eval``'s simulated user (:func:`segany.evaluate.metrics.next_click`) on (K, L, L)
    bool predictions of ``gt`` (K, L, L) bool, ``valid`` (K or 1, L, L). Returns xy (K, 2), labels
    (K,) bool (True: positive) and found (K,) (False where nothing is left to correct)."""
    from ..evaluate.metrics import next_click

    xy = torch.zeros(gt.shape[0], 2)
    label = torch.zeros(gt.shape[0], dtype=torch.bool)
    found = torch.zeros(gt.shape[0], dtype=torch.bool)
    ignore = (valid.expand_as(gt) <= 0.5).cpu().numpy()
    for k, (p, g) in enumerate(zip(pred.cpu().numpy(), gt.cpu().numpy())):
        c = next_click(p, g, ignore[k])
        if c is not None:
            xy[k] = torch.tensor([c.x, c.y], dtype=torch.float32)
            label[k], found[k] = c.positive, True
    return xy.to(gt.device), label.to(gt.device), found.to(gt.device)


def center_points(region: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The pixel of each ``region`` (K, L, L) bool farthest from the region's boundary -> (K, 2)
    xy (low-res pixels) and (K,) "found"; the evaluation's first click (nothing predicted yet)."""
    xy, _, found = _user_clicks(torch.zeros_like(region), region, torch.ones_like(region[:1], dtype=torch.float32))
    return xy, found


def next_clicks(
    pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, g: torch.Generator, center: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A corrective click for each prediction ``pred`` (K, L, L) bool of ``gt``: label 1 on a
    false negative, 0 on a false positive. Returns (K, 2) xy (low-res pixels) and (K,) labels.
    With no error it clicks inside the object.

    Objects where ``center`` (K,) bool is True get the evaluation's clicker (the deepest point of
    the larger error region); the others the paper's click, uniform over the error region. Uniform
    clicks teach the model clicks anywhere, including near edges; deep ones are what the standard
    benchmark protocol (and a careful person) gives."""
    g_b = gt > 0.5
    v = valid.expand_as(gt) > 0.5
    fn, fp = g_b & ~pred & v, pred & ~g_b & v
    xy, found = sample_points(fn | fp, g)
    xi, yi = xy[:, 0].long(), xy[:, 1].long()
    ar = torch.arange(len(xy), device=gt.device)
    label = fn[ar, yi, xi]
    if center is not None and center.any():
        sel = center.nonzero().flatten()
        cxy, clab, cfound = _user_clicks(pred[sel], g_b[sel], valid if valid.shape[0] == 1 else valid[sel])
        xy[sel] = torch.where(cfound[:, None], cxy, xy[sel])
        label[sel] = torch.where(cfound, clab, label[sel])
    if (~found).any():
        xy_in, _ = sample_points(g_b, g)
        xy = torch.where(found[:, None], xy, xy_in)
        label = torch.where(found, label, torch.ones_like(label))
    return xy, label.long()


def focal_loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss averaged over valid pixels: logits (K, M, L, L), gt (K, 1, L, L) -> (K, M)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, gt.expand_as(logits), reduction="none")
    p_t = p * gt + (1 - p) * (1 - gt)
    loss = ce * (1 - p_t) ** gamma
    loss = loss * (alpha * gt + (1 - alpha) * (1 - gt))
    return (loss * valid).sum((-1, -2)) / valid.sum((-1, -2)).clamp(min=1)


def dice_loss(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice over valid pixels: (K, M, L, L) -> (K, M)."""
    p = torch.sigmoid(logits) * valid
    g = gt * valid
    inter = (p * g).sum((-1, -2))
    return 1 - (2 * inter + 1) / (p.sum((-1, -2)) + g.sum((-1, -2)) + 1)


def mask_iou(logits: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of thresholded logits with gt over valid pixels: (K, M, L, L) -> (K, M)."""
    p = (logits > 0).float() * valid
    g = gt * valid
    inter = (p * g).sum((-1, -2))
    union = p.sum((-1, -2)) + g.sum((-1, -2)) - inter
    return inter / union.clamp(min=1)


def sam_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor,
    focal_weight: float = 20.0, dice_weight: float = 1.0, iou_weight: float = 1.0, focal_alpha: float = 0.25,
    focal_gamma: float = 2.0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's loss for M candidate masks per object: logits (K, M, L, L), iou_pred (K, M).

    Mask loss = 20 focal + 1 dice of the best candidate (min over M); IoU loss = MSE between
    predicted and actual IoU of every candidate. Returns (scalar loss averaged over objects,
    (K,) index of the best candidate, (K, M) actual IoUs)."""
    mask_l = focal_weight * focal_loss(logits, gt, valid, alpha=focal_alpha, gamma=focal_gamma) + dice_weight * dice_loss(logits, gt, valid)
    best_l, best = mask_l.min(1)
    with torch.no_grad():
        actual = mask_iou(logits, gt, valid)
    iou_l = F.mse_loss(iou_pred, actual, reduction="none").mean(1)
    return (best_l + iou_weight * iou_l).mean(), best, actual
