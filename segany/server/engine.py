"""The model side of the server: image embeddings computed once, kept in a bounded LRU, and
prompted from many request threads.

* Embeddings run on one worker thread (the encoder is the expensive part and two at once would
  only fight over the same cores); each image has a status (queued / running / ready / error) with
  elapsed time and an estimate from the previous runs, which the page shows as progress.
* Each cached embedding owns its own ``SamPredictor`` (``set_embedding``) and lock, so clients on
  different images never share predictor state and clients on the same image take turns.
* A prediction keeps its low-res logits on the server under a short token; the next click sends
  the token back as ``mask_input_id`` instead of 256x256 floats.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..automatic import SamAutomaticMaskGenerator
from ..predictor import PromptError, SamPredictor, _check_in_image, _finite
from . import rle as rle_utils
from .storage import ImageRecord


class NotReady(RuntimeError):
    pass


@dataclass
class Entry:
    key: tuple
    predictor: SamPredictor
    lock: threading.Lock = field(default_factory=threading.Lock)
    logits: "OrderedDict[str, torch.Tensor]" = field(default_factory=OrderedDict)
    max_logits: int = 48  # 3 per click; 48 x 256 x 256 float32 = 12 MB per cached image
    pixels: Optional[np.ndarray] = None  # the image, read on the first snap_edges request only

    def keep_logits(self, t: torch.Tensor) -> str:
        token = uuid.uuid4().hex[:16]
        self.logits[token] = t
        while len(self.logits) > self.max_logits:
            self.logits.popitem(last=False)
        return token


@dataclass
class Job:
    key: tuple
    state: str = "queued"  # queued | running | ready | error
    queued_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    error: Optional[str] = None
    future: Optional[Future] = None


def _key(rec: ImageRecord) -> tuple:
    return (rec.id, rec.mtime_ns, rec.size)


class ModelService:
    def __init__(self, model, cache_size: int = 8, max_parallel_predict: int = 2) -> None:
        self.model = model
        self.name = getattr(model, "model_name", "custom")
        self.cache_size = max(1, int(cache_size))
        self._cache: "OrderedDict[tuple, Entry]" = OrderedDict()
        self._jobs: Dict[tuple, Job] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="segany-embed")
        self._durations: deque = deque(maxlen=8)
        # All model calls run on these few threads, whatever thread serves the request: torch
        # keeps per-thread state (intra-op pools, allocator arenas), so letting every one of the
        # server's request threads call it would grow memory with the number of clients.
        self._pool = ThreadPoolExecutor(max_workers=max(1, max_parallel_predict), thread_name_prefix="segany-predict")
        self._proposal_lock = threading.Lock()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ embeddings
    def status(self, rec: ImageRecord) -> Dict[str, Any]:
        k = _key(rec)
        with self._lock:
            if k in self._cache:
                return {"state": "ready", "progress": 1.0}
            job = self._jobs.get(k)
        if job is None:
            return {"state": "none", "progress": 0.0}
        now = time.monotonic()
        out: Dict[str, Any] = {"state": job.state}
        estimate = float(np.mean(self._durations)) if self._durations else None
        out["estimate_s"] = estimate
        if job.state == "running" and job.started_at is not None:
            elapsed = now - job.started_at
            out["elapsed_s"] = round(elapsed, 3)
            out["progress"] = round(min(0.95, elapsed / estimate), 3) if estimate else None
        elif job.state == "queued":
            out["progress"] = 0.0
        elif job.state == "error":
            out["error"] = job.error
            out["progress"] = 0.0
        else:
            out["progress"] = 1.0
        return out

    def request(self, rec: ImageRecord, load_pixels) -> Dict[str, Any]:
        """Start embedding ``rec`` unless it is cached or already under way; returns status."""
        k = _key(rec)
        with self._lock:
            if k in self._cache:
                self._cache.move_to_end(k)
                return {"state": "ready", "progress": 1.0}
            job = self._jobs.get(k)
            if job is None or job.state == "error":
                job = Job(k)
                self._jobs[k] = job
                job.future = self._executor.submit(self._embed, job, rec, load_pixels)
        return self.status(rec)

    def _embed(self, job: Job, rec: ImageRecord, load_pixels) -> None:
        job.state, job.started_at = "running", time.monotonic()
        try:
            image = load_pixels(rec)
            p = SamPredictor(self.model)
            p.set_image(image)
            # warm the upscaler so the first click is as fast as the rest
            p.upscale(torch.zeros(1, 1, *self.model.prompt_encoder.mask_input_size))
            entry = Entry(job.key, p)
        except Exception as e:  # an unreadable image is reported, never raised in the worker
            job.state, job.error, job.finished_at = "error", f"{type(e).__name__}: {e}", time.monotonic()
            return
        job.finished_at = time.monotonic()
        self._durations.append(job.finished_at - job.started_at)
        with self._lock:
            self._cache[job.key] = entry
            self._cache.move_to_end(job.key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            self._jobs.pop(job.key, None)
        job.state = "ready"

    def entry(self, rec: ImageRecord, load_pixels, wait: float = 120.0) -> Entry:
        """The cached embedding of ``rec``, computing it first (waiting up to ``wait`` s)."""
        k = _key(rec)
        with self._lock:
            e = self._cache.get(k)
            if e is not None:
                self._cache.move_to_end(k)
                return e
        self.request(rec, load_pixels)
        with self._lock:
            e = self._cache.get(k)
            job = self._jobs.get(k)
        if e is not None:
            return e
        if job is not None and job.future is not None:
            try:
                job.future.result(timeout=wait)
            except TimeoutError:
                raise NotReady(f"embedding of {rec.id!r} is still being computed; poll GET /api/status/{rec.id}") from None
        with self._lock:
            e = self._cache.get(k)
        if e is None:
            st = self.status(rec)
            if st.get("state") == "error":
                raise PromptError(f"cannot embed {rec.id!r}: {st.get('error')}")
            raise NotReady(f"embedding of {rec.id!r} is not ready (state {st.get('state')})")
        return e

    def cache_info(self) -> Dict[str, Any]:
        with self._lock:
            return {"size": len(self._cache), "capacity": self.cache_size, "images": [k[0] for k in self._cache]}

    # ------------------------------------------------------------ prompts
    def predict(
        self,
        entry: Entry,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        box: Optional[Sequence[float]],
        mask_input_id: Optional[str],
        multimask: bool,
        snap_edges: bool = False,
        load_pixels: Optional[Callable[[], np.ndarray]] = None,
    ) -> Dict[str, Any]:
        """Masks for one prompt on a cached embedding. ``snap_edges``: outlines snapped to the
        image's edges (``segany.edges``); the image is read once with ``load_pixels`` and kept
        with the entry (H x W x 3 bytes) for later requests."""
        t0 = time.perf_counter()
        pc = np.asarray(points, dtype=np.float64).reshape(-1, 2) if len(points) else None
        pl = np.asarray(labels, dtype=np.int64) if len(points) else None
        if pc is None and len(labels):
            raise PromptError("labels given without points")
        if pc is not None and len(labels) != len(pc):
            raise PromptError(f"{len(pc)} points but {len(labels)} labels")
        b = None if box is None else np.asarray(box, dtype=np.float64)
        if pc is None and b is None:
            raise PromptError("give at least one point or a box")

        def run():
            with entry.lock:
                mask_input = None
                if mask_input_id is not None:
                    t = entry.logits.get(mask_input_id)
                    if t is None:
                        raise PromptError(f"unknown or expired mask_input_id {mask_input_id!r}; send the prompt without it")
                    mask_input = t.numpy()
                masks, scores, low, timing = _predict(entry.predictor, pc, pl, b, mask_input, multimask, upscale=not snap_edges)
                if snap_edges:
                    masks = _snap(entry, low, load_pixels, timing)
                tokens = [entry.keep_logits(torch.from_numpy(low[i : i + 1].copy())) for i in range(len(scores))]
                return masks, scores, tokens, timing

        masks, scores, tokens, timing = self._pool.submit(run).result()
        t1 = time.perf_counter()
        out = []
        for i in range(len(scores)):
            seg = rle_utils.encode(masks[i])
            area, bbox = rle_utils.area_bbox(seg)
            out.append({"segmentation": seg, "score": float(scores[i]), "area": area, "bbox": bbox, "logits_id": tokens[i]})
        best = int(np.argmax(scores))
        timing["encode_ms"] = round((time.perf_counter() - t1) * 1000, 2)
        return {"masks": out, "best": best, "elapsed_ms": round((time.perf_counter() - t0) * 1000, 2), "timing": timing}

    # ------------------------------------------------------------ proposals
    def proposals(self, entry: Entry, **kw) -> List[Dict[str, Any]]:
        """See ``_proposals``; runs on the model threads."""
        return self._pool.submit(self._proposals, entry, **kw).result()

    def _proposals(self, entry: Entry, max_masks: int = 100, min_area_fraction: float = 0.0005, **generator_kw) -> List[Dict[str, Any]]:
        """Segment everything on the *cached* embedding: ``SamAutomaticMaskGenerator`` on the
        entry's predictor (``generate_from_embedding``: one full-image crop, no re-embedding),
        then masks smaller than ``min_area_fraction`` of the image dropped and at most
        ``max_masks`` kept, by decreasing predicted IoU. ``generator_kw`` are the generator's
        arguments (points_per_side, pred_iou_thresh, ...; the API's defaults are those of
        ``ProposalRequest``). Segmentations are COCO RLE with string counts and bboxes
        pycocotools' XYWH, like the rest of the API."""
        with self._proposal_lock:
            with entry.lock:
                p = entry.predictor
                h, w = p.original_size
                # one decode thread: other requests run PyTorch concurrently (see decode_workers)
                gen = SamAutomaticMaskGenerator(p, output_mode="coco_rle", decode_workers=1, **generator_kw)
                records = gen.generate_from_embedding()
        records.sort(key=lambda r: -r["predicted_iou"])
        min_area = max(1, min_area_fraction * h * w)
        results = []
        for r in records:
            if r["area"] < min_area:
                continue
            seg = r["segmentation"]
            _, bbox = rle_utils.area_bbox(seg)
            results.append({
                "segmentation": seg, "area": r["area"], "bbox": bbox,
                "predicted_iou": r["predicted_iou"], "stability_score": r["stability_score"],
                "point_coords": [[float(x), float(y)] for x, y in r["point_coords"]],
                "crop_box": [float(v) for v in r["crop_box"]],
            })
            if len(results) >= max_masks:
                break
        return results


def _predict(p: SamPredictor, pc, pl, b, mask_input, multimask: bool, upscale: bool = True):
    """``SamPredictor.predict`` (same checks, same messages, same masks), but the low-res logits
    are upscaled only where the result can be foreground: bilinear weights are non-negative, so
    an output pixel whose source taps are all <= threshold is background. Only the rows and
    columns whose taps reach the mask's low-res bounding box are computed. ``upscale`` False: no
    masks (None), for callers that make their own from the logits."""
    coords_t = labels_t = box_t = mask_t = None
    if pc is not None:
        _finite("point_coords", pc)
        if not np.all(np.isin(pl, (-1, 0, 1))):
            raise PromptError(f"point_labels must be 1 (foreground), 0 (background) or -1 (ignore), got {np.unique(pl).tolist()}")
        _check_in_image("point", pc, p.original_size)
        coords_t = torch.as_tensor(p.transform.apply_coords(pc, p.original_size), dtype=torch.float)[None]
        labels_t = torch.as_tensor(pl.astype(np.int64), dtype=torch.int)[None]
    if b is not None:
        b = b.reshape(4)
        _finite("box", b)
        if b[2] < b[0] or b[3] < b[1]:
            raise PromptError(f"box must be (x0, y0, x1, y1) with x0 <= x1 and y0 <= y1, got {b.tolist()}")
        _check_in_image("box corner", b.reshape(2, 2), p.original_size)
        box_t = torch.as_tensor(p.transform.apply_boxes(b, p.original_size), dtype=torch.float)
    if mask_input is not None:
        mask_t = torch.as_tensor(np.asarray(mask_input, dtype=np.float32))[None]
    t0 = time.perf_counter()
    low, iou = p.decode(coords_t, labels_t, box_t, mask_t, multimask)
    low, iou = low[0], iou[0]
    t1 = time.perf_counter()
    masks = _upscale_masks(p, low) if upscale else None
    timing = {"decode_ms": round((t1 - t0) * 1000, 2), "upscale_ms": round((time.perf_counter() - t1) * 1000, 2)}
    return masks, iou.numpy(), low.numpy(), timing


def _snap(entry: Entry, low: np.ndarray, load_pixels, timing: dict) -> np.ndarray:
    """The masks of ``low`` (C, l, l) logits snapped to the entry's image edges."""
    from .. import edges

    t0 = time.perf_counter()
    p = entry.predictor
    if entry.pixels is None:
        if load_pixels is None:
            raise PromptError("snap_edges needs the image, and this server cannot read it")
        pixels = np.asarray(load_pixels())
        if pixels.shape[:2] != tuple(p.original_size):
            raise PromptError("snap_edges: the image changed since it was embedded; embed it again")
        entry.pixels = pixels
    full = p.upscale(torch.from_numpy(np.ascontiguousarray(low))).numpy()
    masks = edges.snap_to_edges(entry.pixels, full, edges.logit_radius(entry.pixels.shape, low.shape[-1]))
    timing["snap_ms"] = round((time.perf_counter() - t0) * 1000, 2)
    return masks


def _upscale_masks(p: SamPredictor, low: torch.Tensor, tile: int = 48) -> np.ndarray:
    """(C, l, l) logits -> (C, H, W) bool masks at the original size, equal to
    ``p.upscale(low) > 0``, computed only where the answer is in doubt.

    Each output pixel is a weighted sum, with non-negative weights, of at most 4 x 4 low-res
    logits. So for a tile of output pixels, if every low-res logit its taps can reach is > 0 the
    whole tile is foreground, if every one is <= 0 it is background, and only the remaining
    (boundary) tiles are interpolated, exactly as the predictor does."""
    thr = p.model.mask_threshold
    resize = getattr(p, "_resize", None)
    if resize is None or not hasattr(resize, "axes") or thr != 0.0:
        return (p.upscale(low) > thr).numpy()
    (ih, wh), (iw, ww) = resize.axes
    h, w = p.original_size
    spans = getattr(resize, "_segany_spans", None)
    if spans is None:  # first/last low-res index each output row/column really uses
        big = 1 << 30
        spans = (
            torch.where(wh != 0, ih, big).min(1).values.numpy(), torch.where(wh != 0, ih, -1).max(1).values.numpy(),
            torch.where(ww != 0, iw, big).min(1).values.numpy(), torch.where(ww != 0, iw, -1).max(1).values.numpy(),
        )
        resize._segany_spans = spans
    lo_h, hi_h, lo_w, hi_w = spans
    out = np.zeros((low.shape[0], h, w), dtype=bool)
    ntaps = iw.shape[1]
    ys = np.arange(0, h, tile)
    xs = np.arange(0, w, tile)
    # low-res span of each tile row / column: [r0, r1) x [c0, c1)
    r0 = np.minimum.reduceat(lo_h, ys)
    r1 = np.maximum.reduceat(hi_h, ys) + 1
    c0 = np.minimum.reduceat(lo_w, xs)
    c1 = np.maximum.reduceat(hi_w, xs) + 1
    area = (r1 - r0)[:, None] * (c1 - c0)[None, :]
    for c in range(low.shape[0]):
        x = low[c].float()
        pos = (x > thr).numpy()
        if not pos.any():
            continue
        sat = np.zeros((pos.shape[0] + 1, pos.shape[1] + 1), np.int64)  # summed-area table
        sat[1:, 1:] = pos.cumsum(0).cumsum(1)
        n = sat[r1][:, c1] - sat[r0][:, c1] - sat[r1][:, c0] + sat[r0][:, c0]
        full = n == area
        mixed = (n > 0) & ~full
        if mixed.mean() > 0.35:  # ragged mask: one vectorised pass beats many tiles
            out[c] = _interp_block(x, ih, wh, iw, ww, 0, h, 0, w, thr)
            continue
        for ty, tx in zip(*np.nonzero(full)):
            out[c, ys[ty] : ys[ty] + tile, xs[tx] : xs[tx] + tile] = True
        for ty in np.nonzero(mixed.any(1))[0]:
            y0, y1 = int(ys[ty]), min(h, int(ys[ty]) + tile)
            band = (x[ih[y0:y1], :] * wh[y0:y1, :, None]).sum(-2)  # (tile rows, l)
            for tx in np.nonzero(mixed[ty])[0]:
                x0, x1 = int(xs[tx]), min(w, int(xs[tx]) + tile)
                o = band[:, iw[x0:x1, 0]] * ww[x0:x1, 0]
                for t in range(1, ntaps):
                    o = o + band[:, iw[x0:x1, t]] * ww[x0:x1, t]
                out[c, y0:y1, x0:x1] = (o > thr).numpy()
    return out


def _interp_block(x, ih, wh, iw, ww, y0, y1, x0, x1, thr) -> np.ndarray:
    band = (x[ih[y0:y1], :] * wh[y0:y1, :, None]).sum(-2)
    o = band[:, iw[x0:x1, 0]] * ww[x0:x1, 0]
    for t in range(1, iw.shape[1]):
        o = o + band[:, iw[x0:x1, t]] * ww[x0:x1, t]
    return (o > thr).numpy()

