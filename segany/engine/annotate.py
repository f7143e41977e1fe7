"""``segany annotate``: segment everything in many images, resumably, on one machine or a Ray cluster.

A job is (inputs, OUTDIR, options). Per image it writes ``<rel>.json`` (SA-1B record, see
:mod:`segany.engine.sa1b`), optionally ``<rel stem>.overlay.jpg`` and a copy of the image, and
one line in ``OUTDIR/manifest.jsonl``. At the end ``OUTDIR/summary.json`` holds the totals.

Crash safety (a run may be killed at any instant, even with ``kill -9``, and rerun):

* every file is written to a temporary name in its folder and renamed into place; the JSON is
  renamed last, so "JSON exists and parses" means all of the image's outputs are complete;
* an image is done when its JSON (and any requested overlay / image copy) exists and is valid;
  a rerun skips done images and processes the rest;
* temporary files left by a killed run are removed when the next run starts;
* the manifest is compacted at the start of each run (see :mod:`segany.engine.manifest`), so it
  ends with exactly one line per image;
* ``OUTDIR/job.json`` pins the model and options: rerunning into the same OUTDIR with different
  ones is refused (use a new OUTDIR, or ``--redo`` to overwrite everything);
* a lock on ``OUTDIR/.annotate.lock`` keeps two runs from writing the same OUTDIR at once (the
  kernel drops it when the process dies, so a killed run never leaves a stale lock).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np

from ..io import ImageError, atomic_write_bytes, atomic_write_json, load_image
from . import sa1b
from .inputs import OVERLAY_SUFFIX, Item, collect
from .manifest import MANIFEST, ManifestWriter, compact, latest_by_image, read_manifest

LOCK = ".annotate.lock"
JOB = "job.json"
SUMMARY = "summary.json"


class JobError(ValueError):
    """The job cannot start: OUTDIR is busy, or holds a job with other options."""


# SamAutomaticMaskGenerator's defaults (the official ones); job.json records the full set.
AMG_DEFAULTS: Dict[str, Any] = {
    "points_per_side": 32, "points_per_batch": 64, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95,
    "stability_score_offset": 1.0, "box_nms_thresh": 0.7, "crop_n_layers": 0, "crop_nms_thresh": 0.7,
    "crop_overlap_ratio": 512 / 1500, "crop_n_points_downscale_factor": 1, "min_mask_region_area": 0,
    "snap_edges": False,  # segany's own: masks snapped to the image's edges (segany.edges)
}


@dataclass
class EngineOptions:
    """Everything that determines an image's outputs (plus where the model runs)."""

    model: str = "tiny"
    checkpoint: Optional[str] = None
    amg: Dict[str, Any] = field(default_factory=dict)  # SamAutomaticMaskGenerator keyword arguments
    min_masks: int = 0  # fewer masks (after filters): the image is recorded 'rejected', no JSON
    max_masks: int = 0  # keep the best N by predicted IoU (0: all)
    min_area: float = 0.0  # drop masks smaller than this: pixels if >= 1, else a fraction of the image
    max_area: float = 1.0  # drop masks larger than this fraction of the image
    overlay: bool = False
    copy_images: bool = False
    max_pixels: Optional[int] = None  # refuse larger images (default: segany.io.MAX_PIXELS)
    # where and how fast; not part of the outputs
    device: str = "cpu"
    threads: int = 0

    def identity(self) -> Dict[str, Any]:
        """What job.json pins: the options that change outputs."""
        d = dataclasses.asdict(self)
        for k in ("device", "threads"):
            d.pop(k)
        d["amg"] = {**AMG_DEFAULTS, **d["amg"]}
        d["amg"].pop("points_per_batch")  # batching changes speed, not results
        if d["checkpoint"]:
            from ..checkpoints import CheckpointError, safetensors_config

            if not os.path.isfile(d["checkpoint"]):
                raise CheckpointError(f"{d['checkpoint']}: no such checkpoint file")

            if safetensors_config(d["checkpoint"]) is not None:
                d["model"] = None  # the file carries its own config; --model plays no part
            # the weights themselves, so that a file retrained in place is not taken for the old one
            d["checkpoint_sha256"] = _sha256(d["checkpoint"])
            d["checkpoint"] = os.path.abspath(d["checkpoint"])
        return d


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- one image
def load_engine_model(name: str, checkpoint: Optional[str], device: str = "cpu"):
    """``--model``/``--checkpoint`` to a model: a .safetensors that carries its config (as
    ``segany train`` writes) is built from that config; anything else goes through
    :func:`segany.checkpoints.load_model`."""
    from ..checkpoints import load_model, safetensors_config

    if checkpoint is not None and safetensors_config(checkpoint) is not None:
        return load_model(str(checkpoint), device=device)
    return load_model(resolve_model_name(name), checkpoint=checkpoint, device=device)


def resolve_model_name(name: str) -> str:
    """``name`` if the registry knows it (or it is a file); a bundled ``segany/weights/<name>.safetensors``
    otherwise (it carries its config); else a ``CheckpointError`` listing the known names."""
    from ..checkpoints import CheckpointError, resolve_name

    try:
        resolve_name(name)
        return name
    except KeyError as e:
        if os.path.exists(name):
            return name
        bundled = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", f"{name}.safetensors")
        if os.path.isfile(bundled):
            return bundled
        raise CheckpointError(str(e).strip("'\"") + " (or give --checkpoint)") from None


class Annotator:
    """Holds one model and one mask generator; turns an :class:`Item` into outputs + a record.
    Used as is by the single-process run and inside every Ray worker."""

    def __init__(self, opts: EngineOptions) -> None:
        import torch

        from ..automatic import SamAutomaticMaskGenerator

        if opts.threads > 0:
            torch.set_num_threads(opts.threads)
        self.opts = opts
        self.model = load_engine_model(opts.model, opts.checkpoint, opts.device)
        kwargs = {**AMG_DEFAULTS, **opts.amg}
        kwargs["output_mode"] = "coco_rle"
        self.generator = SamAutomaticMaskGenerator(self.model, **kwargs)

    def _filter(self, masks: List[Dict[str, Any]], h: int, w: int) -> List[Dict[str, Any]]:
        o = self.opts
        lo = max(1.0, o.min_area if o.min_area >= 1 else o.min_area * h * w)  # never an empty mask
        hi = o.max_area * h * w
        keep = [m for m in masks if lo <= float(m["area"]) <= hi]
        if o.max_masks > 0 and len(keep) > o.max_masks:
            order = sorted(range(len(keep)), key=lambda i: -float(keep[i].get("predicted_iou", 0.0)))
            chosen = set(order[: o.max_masks])
            keep = [m for i, m in enumerate(keep) if i in chosen]
        return keep

    def process(self, item: Item, outdir: str) -> Dict[str, Any]:
        """Do one image; never raises for a problem with the image (it becomes the record's
        ``reason``), only for a problem with OUTDIR (disk full, permissions)."""
        t0 = time.perf_counter()
        rec: Dict[str, Any] = {"image": item.rel, "output": item.json_rel, "source": item.source}
        try:
            image = load_image(item.source, max_pixels=self.opts.max_pixels)
        except ImageError as e:
            return _finish(rec, "failed", t0, reason=str(e), outdir=outdir)
        except OSError as e:  # unreadable file: permissions, I/O error
            return _finish(rec, "failed", t0, reason=f"{item.source}: cannot read ({e})", outdir=outdir)
        h, w = image.shape[:2]
        try:
            masks = self.generator.generate(image)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on a huge image: this image fails, the job goes on
            return _finish(rec, "failed", t0, reason=f"segmentation failed: {type(e).__name__}: {e}", outdir=outdir)
        masks = self._filter(masks, h, w)
        if len(masks) < self.opts.min_masks:
            return _finish(rec, "rejected", t0, masks=len(masks), reason=f"{len(masks)} masks, fewer than --min-masks {self.opts.min_masks}", outdir=outdir)
        record = sa1b.build_record(item.rel, w, h, masks)
        # Outputs other than the JSON first: the JSON is the "done" mark.
        if self.opts.copy_images:
            dst = os.path.join(outdir, item.rel)
            if os.path.abspath(dst) != os.path.abspath(item.source):
                with open(item.source, "rb") as f:
                    atomic_write_bytes(dst, f.read())
        if self.opts.overlay:
            _save_jpeg(os.path.join(outdir, item.overlay_rel), sa1b.overlay(image, record))
        atomic_write_json(os.path.join(outdir, item.json_rel), record)
        return _finish(rec, "ok", t0, masks=len(masks))


def _finish(rec: Dict[str, Any], status: str, t0: float, masks: int = 0, reason: Optional[str] = None,
            outdir: Optional[str] = None) -> Dict[str, Any]:
    if status != "ok" and outdir is not None:
        # Outputs of an earlier run of this image (only with --redo: done images are not redone
        # otherwise) would say "done" for an image that is now failed/rejected: remove them.
        for rel in (rec["output"], str(Path(rec["image"]).with_suffix("").as_posix()) + OVERLAY_SUFFIX):
            try:
                os.unlink(os.path.join(outdir, rel))
            except FileNotFoundError:
                pass
    rec.update(status=status, masks=int(masks), seconds=round(time.perf_counter() - t0, 4), reason=reason)
    return rec


def _save_jpeg(path: str, array: np.ndarray) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=85)
    atomic_write_bytes(path, buf.getvalue())


def is_done(item: Item, outdir: str, opts: EngineOptions) -> Optional[Dict[str, Any]]:
    """The image's record if all its requested outputs exist and its JSON is valid, else None."""
    record = sa1b.read_record(os.path.join(outdir, item.json_rel))
    if record is None:
        return None
    if opts.overlay and not os.path.isfile(os.path.join(outdir, item.overlay_rel)):
        return None
    if opts.copy_images and not os.path.isfile(os.path.join(outdir, item.rel)):
        return None
    return record


# --------------------------------------------------------------------------- the job
@dataclass
class Plan:
    items: List[Item]
    todo: List[Item]
    outdir: str
    lock_fd: int

    def release(self) -> None:
        if self.lock_fd >= 0:
            os.close(self.lock_fd)  # closing drops the flock
            self.lock_fd = -1


def _remove_stale_temps(outdir: str) -> int:
    """Temporary files of writes that a killed run never renamed (``.NAME.XXXX.tmp``)."""
    n = 0
    for dirpath, _, files in os.walk(outdir):
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


def prepare(items: List[Item], outdir: str, opts: EngineOptions, redo: bool = False) -> Plan:
    """Lock OUTDIR, check/pin the job options, clean up after a killed run, compact the manifest
    and list the images still to do."""
    os.makedirs(outdir, exist_ok=True)
    fd = os.open(os.path.join(outdir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JobError(f"{outdir}: another 'segany annotate' run is writing to this folder") from None
    try:
        ident = opts.identity()
        job_path = os.path.join(outdir, JOB)
        if os.path.exists(job_path) and not redo:
            try:
                with open(job_path) as f:
                    old = json.load(f)
            except ValueError:
                old = None
            if old is not None and old != ident:
                diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
                raise JobError(
                    f"{outdir} holds a job with other options ({', '.join(diff)}); "
                    "use another output folder, or --redo to redo every image with the new ones"
                )
        atomic_write_json(job_path, ident, indent=1)
        _remove_stale_temps(outdir)
        manifest = os.path.join(outdir, MANIFEST)
        last = latest_by_image(read_manifest(manifest))
        job_images = {it.rel for it in items}
        kept: List[Dict[str, Any]] = [r for k, r in last.items() if k not in job_images]  # other jobs' lines
        todo: List[Item] = []
        for it in items:
            record = None if redo else is_done(it, outdir, opts)
            if record is None:
                todo.append(it)
                continue
            prev = last.get(it.rel)
            if prev is not None and prev.get("status") == "ok":
                kept.append(prev)
            else:  # the run that wrote it died before its manifest line
                kept.append({"image": it.rel, "output": it.json_rel, "source": it.source, "status": "ok",
                             "masks": len(record["annotations"]), "seconds": None, "reason": None})
        compact(manifest, kept)
        return Plan(items=items, todo=todo, outdir=outdir, lock_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def summarize(plan: Plan, processed: int, wall: float) -> Dict[str, Any]:
    last = latest_by_image(read_manifest(os.path.join(plan.outdir, MANIFEST)))
    recs = [last[it.rel] for it in plan.items if it.rel in last]
    ok = [r for r in recs if r["status"] == "ok"]
    failed = [r for r in recs if r["status"] == "failed"]
    rejected = [r for r in recs if r["status"] == "rejected"]
    masks = sum(int(r["masks"]) for r in ok)
    return {
        "images": len(plan.items),
        "ok": len(ok),
        "failed": len(failed),
        "rejected": len(rejected),
        "missing": len(plan.items) - len(recs),
        "masks": masks,
        "masks_per_image": round(masks / len(ok), 2) if ok else 0.0,
        "skipped_done": len(plan.items) - len(plan.todo),
        "processed_this_run": processed,
        "seconds_this_run": round(wall, 2),
        "images_per_s": round(processed / wall, 3) if wall > 0 and processed else 0.0,
        "failures": [{"image": r["image"], "reason": r["reason"]} for r in failed],
    }


def run_job(
    inputs: Sequence[str],
    outdir: str,
    opts: EngineOptions,
    *,
    redo: bool = False,
    progress: bool = True,
    ray_address: Optional[str] = None,
    use_ray: bool = False,
    workers: Optional[int] = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    ray_options: Optional[Dict[str, Any]] = None,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Dict[str, Any]:
    """Run (or resume) a job; returns the summary (also written to OUTDIR/summary.json)."""
    outdir = os.path.abspath(outdir)
    if not (opts.checkpoint and opts.checkpoint.endswith(".safetensors")):
        resolve_model_name(opts.model)  # an unknown model name fails here, before anything is written
    items = collect(inputs, outdir=outdir)
    plan = prepare(items, outdir, opts, redo=redo)
    try:
        if len(plan.todo) < len(items):
            log(f"{len(items) - len(plan.todo)} of {len(items)} images already done; {len(plan.todo)} to do")
        t0 = time.perf_counter()
        processed = 0
        if plan.todo:
            if use_ray:
                from .ray_runner import run_on_ray

                records = run_on_ray(plan.todo, outdir, opts, address=ray_address, workers=workers,
                                     cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                     log=log, **(ray_options or {}))
            else:
                records = _local(plan.todo, outdir, opts)
            processed = _consume(records, plan, progress)
        summary = summarize(plan, processed, time.perf_counter() - t0)
        atomic_write_json(os.path.join(outdir, SUMMARY), summary, indent=1)
        return summary
    finally:
        plan.release()


def _local(todo: List[Item], outdir: str, opts: EngineOptions) -> Iterator[Dict[str, Any]]:
    annotator = Annotator(opts)  # loads the model once
    for it in todo:
        yield annotator.process(it, outdir)


def _consume(records: Iterable[Dict[str, Any]], plan: Plan, progress: bool) -> int:
    from tqdm import tqdm

    n = failed = masks = 0
    bar = tqdm(total=len(plan.todo), unit="img", desc="annotate", disable=not progress, dynamic_ncols=True)
    with ManifestWriter(os.path.join(plan.outdir, MANIFEST)) as mf:
        last_sync = time.monotonic()
        for rec in records:
            mf.append(rec)
            if time.monotonic() - last_sync > 5.0:
                mf.sync()
                last_sync = time.monotonic()
            n += 1
            masks += rec["masks"] if rec["status"] == "ok" else 0
            failed += rec["status"] != "ok"
            bar.update(1)
            bar.set_postfix(masks_per_img=f"{masks / max(1, n - failed):.1f}", failed=failed, refresh=False)
    bar.close()
    return n


def format_summary(s: Dict[str, Any], outdir: str) -> str:
    lines = [
        f"images: {s['images']} (ok {s['ok']}, failed {s['failed']}, rejected {s['rejected']}"
        + (f", not done {s['missing']}" if s["missing"] else "") + f"; {s['skipped_done']} already done before this run)",
        f"masks: {s['masks']} ({s['masks_per_image']} per image)",
        f"this run: {s['processed_this_run']} images in {s['seconds_this_run']} s = {s['images_per_s']} images/s",
    ]
    for f in s["failures"][:20]:
        lines.append(f"  failed: {f['image']}: {f['reason']}")
    if len(s["failures"]) > 20:
        lines.append(f"  ... and {len(s['failures']) - 20} more (see {os.path.join(outdir, MANIFEST)})")
    lines.append(f"outputs: {outdir} (manifest {MANIFEST}, totals {SUMMARY})")
    return "\n".join(lines)
