"""Segment everything: ``SamAutomaticMaskGenerator``, the official generator's API and results,
without its cost.

The official generator upsamples every candidate (3 per grid point) to 1024x1024 and then to the
image size in float before it filters anything. Here the same decisions are taken where they are
cheap, exactly (up to float32 rounding, as any two implementations of the upscale differ):

* The predicted-IoU filter needs no mask at all; it runs first, on the decoder's scores.
* The stability score and the box need counts and extents of ``upscale(logits) > t`` at the
  image resolution. The upscale (bilinear to the padded input, crop, bilinear to the image) is a
  separable map in which every output pixel is a convex combination of at most 3x3 neighbouring
  low-res logits. Output rows (columns) are grouped into *cells* by their first low-res tap, so
  a cell (at most 256 x 256 of them) takes its values from one fixed 3x3 low-res window. Where the
  window's minimum is above a threshold, every pixel of the cell is above it; where its maximum
  is not above it, none is. Those cells are counted by their size. Only the remaining cells, the
  ones a contour passes through, are evaluated pixel by pixel (a 3x3 -> r x c matrix product per
  cell). Work is proportional to the low-res size plus the contour length, not to the image area.
* Box NMS runs on those exact boxes before any full-size mask exists; full-size masks are built
  (the same cells, expanded) only for the survivors, and RLE-encoded in one vectorised pass.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from itertools import product
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import kernels
from . import masks as M
from .modeling import Sam
from .modeling.fast_decoder import decoder_workspace, keep_decoder_workspace, workspace_buffer
from .predictor import SamPredictor
from .upscale import CellUpscaler

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


# ------------------------------------------------------------------------- grids and crops
def build_point_grid(n_per_side: int) -> np.ndarray:
    """(n*n, 2) points evenly spaced in [0, 1]^2 (cell centres), x varying fastest."""
    offset = 1 / (2 * n_per_side)
    one = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(one[None, :], (n_per_side, 1))
    ys = np.tile(one[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(im_size: Tuple[int, int], n_layers: int, overlap_ratio: float) -> Tuple[List[List[int]], List[int]]:
    """The whole image, then (2^i)^2 overlapping crops for layer i = 1..n_layers (XYXY)."""
    crop_boxes, layer_idxs = [], []
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    crop_boxes.append([0, 0, im_w, im_h])
    layer_idxs.append(0)

    def crop_len(orig_len, n_crops, overlap):
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w = crop_len(im_w, n, overlap)
        crop_h = crop_len(im_h, n, overlap)
        xs0 = [int((crop_w - overlap) * i) for i in range(n)]
        ys0 = [int((crop_h - overlap) * i) for i in range(n)]
        for x0, y0 in product(xs0, ys0):
            crop_boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
            layer_idxs.append(i_layer + 1)
    return crop_boxes, layer_idxs


def is_box_near_crop_edge(boxes: torch.Tensor, crop_box: Sequence[int], orig_box: Sequence[int], atol: float = 20.0) -> torch.Tensor:
    """True for boxes (in the crop frame) near a crop edge that is not an image edge."""
    crop_t = torch.as_tensor(crop_box, dtype=torch.float)
    orig_t = torch.as_tensor(orig_box, dtype=torch.float)
    x0, y0 = crop_box[0], crop_box[1]
    b = (boxes + torch.tensor([[x0, y0, x0, y0]])).float()
    near_crop = torch.isclose(b, crop_t[None], atol=atol, rtol=0)
    near_image = torch.isclose(b, orig_t[None], atol=atol, rtol=0)
    return (near_crop & ~near_image).any(1)


# ------------------------------------------------------------------------------ generator
class SamAutomaticMaskGenerator:
    """Same constructor, ``generate`` and results as ``segment_anything.SamAutomaticMaskGenerator``
    1.0 (see the module doc for how it is made fast).

    One extra, keyword-only argument: ``decode_workers``, the threads that decode batches of
    prompts at once on a CPU (each with PyTorch single-threaded). None: PyTorch's thread count.
    While more than one runs, ``torch.set_num_threads(1)`` holds for the whole process (restored
    afterwards), so a program that runs other PyTorch work concurrently (a server) should pass 1.

    Another: ``snap_edges``, the final masks snapped to the image's edges (``segany.edges``; not
    SAM's output, off by default); area and bbox are those of the snapped masks, and a mask that
    snapping empties is dropped. Needs the pixels, so ``generate`` only.
    """

    def __init__(
        self,
        model: Sam,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        *,
        decode_workers: Optional[int] = None,
        snap_edges: bool = False,
    ) -> None:
        if (points_per_side is None) == (point_grids is None):
            raise ValueError("Exactly one of points_per_side or point_grids must be provided.")
        if points_per_side is not None:
            if int(points_per_side) < 1:
                raise ValueError(f"points_per_side must be >= 1, got {points_per_side}")
            if int(crop_n_layers) < 0:
                raise ValueError(f"crop_n_layers must be >= 0, got {crop_n_layers}")
            if int(crop_n_points_downscale_factor) < 1:
                raise ValueError(f"crop_n_points_downscale_factor must be >= 1, got {crop_n_points_downscale_factor}")
            self.point_grids = build_all_layer_point_grids(int(points_per_side), int(crop_n_layers), int(crop_n_points_downscale_factor))
            if any(len(g) == 0 for g in self.point_grids):
                raise ValueError("crop_n_points_downscale_factor leaves no points for the deepest crop layer")
        else:
            self.point_grids = [np.asarray(g, dtype=np.float64) for g in point_grids]
            if len(self.point_grids) < int(crop_n_layers) + 1:
                raise ValueError(f"point_grids must have one grid per layer ({int(crop_n_layers) + 1}), got {len(self.point_grids)}")
            for g in self.point_grids:
                if g.ndim != 2 or g.shape[1] != 2 or not np.all(np.isfinite(g)) or (g < 0).any() or (g > 1).any():
                    raise ValueError("each point grid must be an (N, 2) array of finite values in [0, 1]")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"Unknown output_mode {output_mode!r}; choose one of {OUTPUT_MODES}")
        if int(points_per_batch) < 1:
            raise ValueError(f"points_per_batch must be >= 1, got {points_per_batch}")
        for name, v in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh),
                        ("stability_score_offset", stability_score_offset)):
            if not np.isfinite(float(v)):  # a NaN threshold would silently switch its filter off
                raise ValueError(f"{name} must be a finite number, got {v}")
        for name, v in (("box_nms_thresh", box_nms_thresh), ("crop_nms_thresh", crop_nms_thresh)):
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0.0 <= float(crop_overlap_ratio) < 1.0:
            raise ValueError(f"crop_overlap_ratio must be in [0, 1), got {crop_overlap_ratio}")
        if min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {min_mask_region_area}")
        if decode_workers is not None and int(decode_workers) < 1:
            raise ValueError(f"decode_workers must be >= 1 or None, got {decode_workers}")
        self.decode_workers = None if decode_workers is None else int(decode_workers)
        self.snap_edges = bool(snap_edges)

        self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
        self.points_per_batch = int(points_per_batch)
        self.pred_iou_thresh = float(pred_iou_thresh)
        self.stability_score_thresh = float(stability_score_thresh)
        self.stability_score_offset = float(stability_score_offset)
        self.box_nms_thresh = float(box_nms_thresh)
        self.crop_n_layers = int(crop_n_layers)
        self.crop_nms_thresh = float(crop_nms_thresh)
        self.crop_overlap_ratio = float(crop_overlap_ratio)
        self.crop_n_points_downscale_factor = int(crop_n_points_downscale_factor)
        self.min_mask_region_area = min_mask_region_area
        self.output_mode = output_mode
        self._upscalers: Dict[tuple, CellUpscaler] = {}
        # Prompts per decoder call. A call reads the per-image maps once for all its prompts
        # (scores, first-layer attention), and holds ~10 MB per prompt at SAM's sizes: 32x32
        # points at SAM's thresholds took 5.76-6.09 s at 16, 6.35-6.62 s at 8 and 5.20-5.50 s at
        # 32, peak RSS +318 / +162 / +626 MB (2026-12-05, 2 workers; at 8 before that day's
        # decoder changes, 16 was no faster).
        self.decode_batch = min(self.points_per_batch, 16)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def generate(self, image: Any) -> List[Dict[str, Any]]:
        """Masks for an HxWx3 uint8 RGB image (or anything ``segany.io.load_image`` reads). Each
        record: segmentation (HxW bool, or an RLE dict per ``output_mode``), area (int), bbox
        (XYWH), predicted_iou, point_coords ([[x, y]]), stability_score, crop_box (XYWH)."""
        if not (isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8):
            from .io import load_image

            image = load_image(image)
        if min(image.shape[:2]) < 1:
            raise ValueError(f"image is empty: shape {image.shape}")
        return self._records(self._generate_masks(image.shape[:2], image), image)

    @torch.no_grad()
    def generate_from_embedding(self) -> List[Dict[str, Any]]:
        """``generate`` for the image the generator's predictor already holds, without embedding
        it again: the same records as ``generate(image)`` when the predictor was given that image
        (``set_image``, or ``set_embedding`` with its features).

        For callers that keep embeddings (the annotation server): build the generator on that
        predictor, ``SamAutomaticMaskGenerator(predictor, ...)``, and call this. Only the
        full-image crop is possible (``crop_n_layers=0``): other crops need the pixels. The
        predictor keeps its image (``generate`` resets it)."""
        p = self.predictor
        if not p.is_image_set:
            raise RuntimeError("generate_from_embedding needs a predictor that holds an image: call set_image or set_embedding first")
        if self.crop_n_layers:
            raise ValueError("generate_from_embedding covers the full-image crop only (crop_n_layers=0); use generate(image) for crops")
        if self.snap_edges:
            raise ValueError("snap_edges needs the image's pixels: use generate(image)")
        return self._records(self._generate_masks(tuple(p.original_size), None))

    def _records(self, data: Dict[str, Any], image: Optional[np.ndarray] = None) -> List[Dict[str, Any]]:
        """The generator's output records from the surviving masks."""
        masks = data["masks"]
        if self.min_mask_region_area > 0 and len(masks):
            data = self._postprocess_small_regions(data, self.min_mask_region_area, max(self.box_nms_thresh, self.crop_nms_thresh))
            masks = data["masks"]
        if self.snap_edges and len(masks):
            data = self._snap(data, image)
            masks = data["masks"]

        rles = M.mask_to_rle(masks) if self.output_mode != "binary_mask" else None
        areas = masks.sum((1, 2)).tolist() if len(masks) else []
        if self.output_mode == "coco_rle":
            segs = [M.rle_to_coco(r) for r in rles]
        elif self.output_mode == "uncompressed_rle":
            segs = rles
        else:
            segs = list(masks.numpy())
        boxes = M.box_xyxy_to_xywh(data["boxes"]).tolist()
        crops = M.box_xyxy_to_xywh(data["crop_boxes"]).tolist()
        out = []
        for i in range(len(segs)):
            out.append(
                {
                    "segmentation": segs[i],
                    "area": int(areas[i]),
                    "bbox": boxes[i],
                    "predicted_iou": float(data["iou_preds"][i]),
                    "point_coords": [data["points"][i].tolist()],
                    "stability_score": float(data["stability_score"][i]),
                    "crop_box": crops[i],
                }
            )
        return out

    # ----------------------------------------------------------------- internals
    def _snap(self, data: Dict[str, Any], image: np.ndarray) -> Dict[str, Any]:
        from . import edges

        low_res = self.predictor.model.prompt_encoder.mask_input_size[0]  # the low-res logits' side
        # a mask's logits were as fine as its crop's: the window follows the crop it came from
        sides = (data["crop_boxes"][:, 2:] - data["crop_boxes"][:, :2]).max(1).values.tolist()
        radii = np.array([edges.logit_radius((side, side), low_res) for side in sides])
        binary = data["masks"].numpy()
        snapped = np.empty_like(binary)
        for r in np.unique(radii):
            snapped[radii == r] = edges.snap_masks(image, binary[radii == r], int(r))
        masks = torch.from_numpy(snapped)
        keep = masks.flatten(1).any(1)
        data = {k: v[keep] for k, v in data.items()}
        data["masks"] = masks[keep]
        data["boxes"] = M.masks_to_boxes(data["masks"])
        return data

    def _set_crop_image(self, image: np.ndarray) -> None:
        """Embed a crop (hook point for callers that cache embeddings)."""
        self.predictor.set_image(image)

    def _upscaler(self) -> CellUpscaler:
        p = self.predictor
        key = (p.model.image_encoder.img_size, tuple(p.input_size), tuple(p.original_size))
        if key not in self._upscalers:
            n_low = p.model.prompt_encoder.mask_input_size[0]
            self._upscalers[key] = CellUpscaler(n_low, key[0], key[1], key[2])
        return self._upscalers[key]

    def _generate_masks(self, orig_size: Tuple[int, int], image: Optional[np.ndarray]) -> Dict[str, Any]:
        """Survivors of every crop. ``image`` None: the predictor already holds the whole image
        (one crop, never re-embedded, never reset)."""
        crop_boxes, layer_idxs = generate_crop_boxes(orig_size, self.crop_n_layers, self.crop_overlap_ratio)
        crops = [self._process_crop(image, cb, li, orig_size) for cb, li in zip(crop_boxes, layer_idxs)]
        for i, c in enumerate(crops):
            c["src"][:, 0] = i
        cat = {k: torch.cat([c[k] for c in crops]) for k in ("boxes", "iou_preds", "points", "stability_score", "crop_boxes", "src")}
        if len(crop_boxes) > 1:
            scores = 1 / M.box_xyxy_to_xywh(cat["crop_boxes"]).float()[:, 2:].prod(1)
            keep = M.nms(cat["boxes"].float(), scores, self.crop_nms_thresh)
            cat = {k: v[keep] for k, v in cat.items()}
        # full-size masks for the survivors only, crop by crop
        H, W = orig_size
        masks = torch.zeros(len(cat["boxes"]), H, W, dtype=torch.bool)
        src = cat.pop("src")
        for ci, c in enumerate(crops):
            sel = (src[:, 0] == ci).nonzero().flatten()
            if len(sel) == 0:
                continue
            x0, y0, x1, y1 = c["crop_box"]
            for s in range(0, len(sel), 32):
                part = sel[s : s + 32]
                m = c["upscaler"].masks(c["logits"][src[part, 1]], c["threshold"])
                masks[part, y0:y1, x0:x1] = m
        cat["masks"] = masks
        return cat

    def _process_crop(self, image: Optional[np.ndarray], crop_box: List[int], layer_idx: int, orig_size) -> Dict[str, Any]:
        x0, y0, x1, y1 = crop_box
        if image is None:  # generate_from_embedding: the full-image crop, already embedded
            im_size = (y1 - y0, x1 - x0)
        else:
            cropped = image[y0:y1, x0:x1, :]
            im_size = cropped.shape[:2]
            self._set_crop_image(cropped)
        up = self._upscaler()
        threshold = float(self.predictor.model.mask_threshold)
        points_all = self.point_grids[layer_idx] * np.array(im_size)[None, ::-1]
        orig_h, orig_w = orig_size
        thresh = self.pred_iou_thresh if self.pred_iou_thresh > 0.0 else None
        # the logits are only upscaled to the crop: their part in the crop's padding is not made
        visible = self.predictor._visible_embedding()
        batches = [points_all[s : s + self.points_per_batch] for s in range(0, len(points_all), self.points_per_batch)]

        def one_batch(points: np.ndarray) -> Tuple[List[torch.Tensor], ...]:
            """Survivors of the per-mask filters: their low-res logits (256 KB a mask at SAM's
            size) as one tensor, the rest as lists of per-decoder-call pieces."""
            tp = self.predictor.transform.apply_coords(points, im_size)
            in_points = torch.as_tensor(tp, device=self.predictor.device)
            in_labels = torch.ones(in_points.shape[0], dtype=torch.int, device=in_points.device)
            pts_all = torch.as_tensor(points.repeat(3, axis=0))
            min_stab = self.stability_score_thresh if self.stability_score_thresh > 0.0 else None
            pieces: Tuple[List[torch.Tensor], ...] = ([], [], [], [], [])
            survivors, n_kept = None, 0
            # the decoder's per-prompt activations (~8 MB a prompt at SAM's sizes) are decoded a
            # few prompts at a time; the results do not depend on this split
            with decoder_workspace():  # the batch's decoder calls share their temporaries
                for d in range(0, len(in_points), self.decode_batch):
                    # masks that fail pred_iou_thresh are never upscaled (the IoU head comes first)
                    low, iou = self.predictor.decode(
                        in_points[d : d + self.decode_batch, None, :], in_labels[d : d + self.decode_batch, None],
                        multimask_output=True, iou_thresh=thresh, scratch_masks=True, visible=visible,
                    )
                    low, iou = low.cpu(), iou.flatten(0, 1).cpu()
                    pts = pts_all[3 * d : 3 * (d + self.decode_batch)]
                    if thresh is None:
                        low = low.flatten(0, 1)
                    else:
                        k = iou > thresh
                        iou, pts = iou[k], pts[k]
                    stab, boxes = up.stats(low, threshold, self.stability_score_offset, min_stability=min_stab)
                    k = ~is_box_near_crop_edge(boxes, crop_box, [0, 0, orig_w, orig_h])
                    if min_stab is not None:
                        k &= stab >= min_stab
                    piece = (iou, pts, stab, boxes)
                    rows = k.nonzero().flatten()
                    if len(rows) < len(k):
                        piece = tuple(v.index_select(0, rows) for v in piece)
                    # the logits (the workspace's until the next call) of the survivors go to
                    # the batch's buffer, and from there into one tensor
                    if survivors is None:
                        survivors = workspace_buffer("survivors", (3 * len(in_points), *low.shape[1:]), low)
                    torch.index_select(low, 0, rows, out=survivors[n_kept : n_kept + len(rows)])
                    n_kept += len(rows)
                    for part, v in zip(pieces[1:], piece):
                        part.append(v)
                if survivors is not None:
                    # one allocation, on huge pages when large: the candidates' logits stay
                    # until the crop's NMS (pieces of a few masks each faulted in page by page)
                    pieces[0].append(survivors[:n_kept].clone())
            return pieces

        names = ("logits", "iou_preds", "points", "stability_score", "boxes")
        parts: Dict[str, list] = {k: [] for k in names}
        for result in self._map_batches(one_batch, batches, up):
            for name, v in zip(names, result):
                parts[name].extend(v)
        if image is not None:
            self.predictor.reset_image()
        # NMS on the small per-candidate arrays; the low-res logits (256 KB a candidate at SAM's
        # size, most of this method's memory) are gathered for the survivors only, never
        # concatenated whole (that would double the peak).
        logits = parts.pop("logits")
        d = {k: torch.cat(v) for k, v in parts.items()}
        keep = M.nms(d["boxes"].float(), d["iou_preds"], self.box_nms_thresh)
        d = {k: v[keep] for k, v in d.items()}
        d["logits"] = _gather_rows(logits, keep)
        del logits
        n = len(keep)
        offset = torch.tensor([[x0, y0, x0, y0]])
        return {
            "logits": d["logits"],
            "upscaler": up,
            "threshold": threshold,
            "crop_box": crop_box,
            "boxes": d["boxes"] + offset,
            "points": d["points"] + torch.tensor([[x0, y0]]),
            "iou_preds": d["iou_preds"],
            "stability_score": d["stability_score"],
            "crop_boxes": torch.tensor([crop_box] * n, dtype=torch.int64).reshape(n, 4),
            "src": torch.stack([torch.full((n,), 0, dtype=torch.int64), torch.arange(n)], 1),
        }

    def _map_batches(self, fn, batches: list, up: CellUpscaler):
        """``list(map(fn, batches))``, in order. On a CPU with several PyTorch threads the batches go
        to that many worker threads running PyTorch single-threaded: the decoder's ~150 small
        ops a batch scale poorly over threads (random ViT-B decoder, 64 prompts: 17.1 ms a
        prompt on 2 threads, 26.0 on 1, 13.3 on 2 workers of 1 thread). Each prompt's result
        does not depend on which worker decodes it."""
        workers = min(self.decode_workers or torch.get_num_threads(), len(batches))
        native = up.native() if up.prefer_native else None
        # the PyTorch stats path keeps buffers between calls; the native one does not
        p = self.predictor
        if workers < 2 or p.device.type != "cpu" or native is None or not getattr(p, "decode_in_threads", False):
            with decoder_workspace():  # the crop's decoder temporaries, allocated once
                return list(map(fn, batches))
        p._get_decoder_cache()  # built once, before the workers read it
        kernels.decoder_available()
        return _map_single_threaded(fn, batches, workers)

    @staticmethod
    def _postprocess_small_regions(data: Dict[str, Any], min_area: int, nms_thresh: float) -> Dict[str, Any]:
        """Fill small holes, remove small islands, recompute boxes, NMS preferring unchanged
        masks (the official ``postprocess_small_regions``)."""
        masks = data["masks"].numpy()
        new, scores = [], []
        for m in masks:
            m2, ch1 = M.remove_small_regions(m, min_area, "holes")
            m2, ch2 = M.remove_small_regions(m2, min_area, "islands")
            new.append(m2)
            scores.append(0.0 if (ch1 or ch2) else 1.0)
        new_t = torch.as_tensor(np.stack(new))
        boxes = M.masks_to_boxes(new_t)
        keep = M.nms(boxes.float(), torch.tensor(scores), nms_thresh)
        out = {k: v[keep] for k, v in data.items() if k != "masks"}
        out["masks"] = new_t[keep]
        out["boxes"] = boxes[keep]
        return out


def _map_single_threaded(fn, items: list, workers: int) -> list:
    """``list(map(fn, items))`` on ``workers`` threads, PyTorch one thread each meanwhile.

    ``torch.set_num_threads`` is process-wide (and it is what a fresh thread's PyTorch starts
    with), so it is set to 1 for the duration and restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # each worker keeps its decoder temporaries for its lifetime (the pool's, this call's)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="segany-everything", initializer=keep_decoder_workspace)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # after a failure, the batches not started are dropped
        torch.set_num_threads(before)


def _gather_rows(chunks: List[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """``torch.cat(chunks)[index]`` without forming the concatenation."""
    if not chunks:
        raise ValueError("no chunks to gather from")
    sizes = [len(c) for c in chunks]
    out = chunks[0].new_empty((len(index), *chunks[0].shape[1:]))
    start = 0
    for c, n in zip(chunks, sizes):
        sel = ((index >= start) & (index < start + n)).nonzero().flatten()
        if len(sel):
            out[sel] = c[index[sel] - start]
        start += n
    return out
