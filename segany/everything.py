"""``segany everything``: segment everything in images with the automatic mask generator.

Outputs per ``--format``:

* ``sa1b`` (default): ``OUTDIR/STEM.json`` per image, SA-1B style (see ``segany.formats``).
* ``coco``: one ``OUTDIR/results.json`` with COCO results for all images (image_id = position
  in the sorted input list) plus ``OUTDIR/images.json`` mapping ids to files and sizes.
* ``png``: ``OUTDIR/STEM/MASK_NNN.png`` per mask (white on black) and ``OUTDIR/STEM/masks.json``
  with the scores and boxes.

``--overlay`` also writes ``OUTDIR/STEM.overlay.png``. An image that cannot be read or processed
is reported and skipped; the run goes on. Exit code: 0 if every image was done, 1 if some
failed, 2 if none could be done (or for bad arguments).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List

import numpy as np

from .cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, UsageError


def register(subparsers) -> None:
    from .commands import _add_model_args

    p = subparsers.add_parser(
        "everything",
        help="segment everything in images (automatic mask generation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: segany everything photos/ -o masks/ --points-per-side 32 --overlay",
    )
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched recursively)")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if needed)")
    p.add_argument("--format", default="sa1b", choices=["sa1b", "coco", "png"], help="output format (default: sa1b)")
    p.add_argument("--overlay", action="store_true", help="also write a colour overlay PNG per image")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("generator (as segment_anything.SamAutomaticMaskGenerator)")
    g.add_argument("--points-per-side", type=int, default=32)
    g.add_argument("--points-per-batch", type=int, default=64)
    g.add_argument("--pred-iou-thresh", type=float, default=None,
                   help="keep masks whose predicted IoU is above this (default: the model's calibrated value if it has one, else SAM's 0.88)")
    g.add_argument("--stability-score-thresh", type=float, default=None,
                   help="keep masks at least this stable (default: the model's calibrated value if it has one, else SAM's 0.95)")
    g.add_argument("--stability-score-offset", type=float, default=1.0)
    g.add_argument("--box-nms-thresh", type=float, default=0.7)
    g.add_argument("--crop-n-layers", type=int, default=0)
    g.add_argument("--crop-nms-thresh", type=float, default=0.7)
    g.add_argument("--crop-overlap-ratio", type=float, default=512 / 1500)
    g.add_argument("--crop-n-points-downscale-factor", type=int, default=1)
    g.add_argument("--min-mask-region-area", type=int, default=0)
    g.add_argument("--snap-edges", action="store_true",
                   help="snap the masks' outlines to the image's edges (segany.edges; not SAM's output): area and bbox follow")
    _add_model_args(p)
    p.set_defaults(func=cmd_everything)


SAM_THRESHOLDS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}  # SamAutomaticMaskGenerator's


def resolve_thresholds(model, checkpoint, pred_iou_thresh=None, stability_score_thresh=None):
    """The generator's two quality thresholds: the user's, else the model's calibrated ones (a
    model trained by segany may carry them, see ``segany.evaluate.calibrate``), else SAM's."""
    from .checkpoints import model_everything_defaults

    out = {**SAM_THRESHOLDS, **model_everything_defaults(model, checkpoint)}
    for k, v in (("pred_iou_thresh", pred_iou_thresh), ("stability_score_thresh", stability_score_thresh)):
        if v is not None:
            out[k] = v
    return out


def _collect(inputs: List[str]) -> List[Path]:
    from .io import list_images

    files: List[Path] = []
    for s in inputs:
        path = Path(s)
        if path.is_dir():
            found = list_images(path)
            if not found:
                print(f"segany everything: warning: no images in folder {path}", file=sys.stderr)
            files += found
        else:
            files.append(path)  # missing / unreadable files are reported per image
    return files


def overlay(image: np.ndarray, masks: List[np.ndarray], alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """The image with each mask (largest first) painted in a random colour."""
    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(seed)
    for m in sorted(masks, key=lambda m: -int(m.sum())):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        out[m] = out[m] * (1 - alpha) + colour * alpha
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def cmd_everything(args) -> int:
    from tqdm import tqdm

    from . import formats
    from .automatic import SamAutomaticMaskGenerator
    from .commands import load_segmenter
    from .io import atomic_save_png, atomic_write_json, load_image

    files = _collect(args.inputs)
    if not files:
        raise UsageError("no images to process")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a folder")
    thresholds = resolve_thresholds(args.model, args.checkpoint, args.pred_iou_thresh, args.stability_score_thresh)
    seg = load_segmenter(args)
    try:
        gen = SamAutomaticMaskGenerator(
            seg.predictor, points_per_side=args.points_per_side, points_per_batch=args.points_per_batch,
            **thresholds, stability_score_offset=args.stability_score_offset, box_nms_thresh=args.box_nms_thresh,
            crop_n_layers=args.crop_n_layers, crop_nms_thresh=args.crop_nms_thresh, crop_overlap_ratio=args.crop_overlap_ratio,
            crop_n_points_downscale_factor=args.crop_n_points_downscale_factor,
            min_mask_region_area=args.min_mask_region_area, output_mode="binary_mask", snap_edges=args.snap_edges,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    # stems must be unique in the output folder
    stems, seen = [], {}
    for f in files:
        s = f.stem
        seen[s] = seen.get(s, 0) + 1
        stems.append(s if seen[s] == 1 else f"{s}_{seen[s] - 1}")
    done, failed, n_masks = 0, 0, 0
    coco, images = [], []
    for image_id, (f, stem) in enumerate(tqdm(list(zip(files, stems)), desc="everything", unit="img", disable=args.no_progress)):
        try:
            img = load_image(f)
            recs = gen.generate(img)
        except Exception as e:  # noqa: BLE001 - one bad image must not stop the run
            failed += 1
            tqdm.write(f"segany everything: {f}: skipped: {e}", file=sys.stderr)
            continue
        h, w = img.shape[:2]
        if args.format == "sa1b":
            formats.write_sa1b(out / f"{stem}.json", recs, image_id, str(f), w, h)
        elif args.format == "coco":
            coco += formats.coco_results(recs, image_id)
            images.append({"id": image_id, "file_name": str(f), "width": w, "height": h})
        else:
            d = out / stem
            for i, r in enumerate(recs):
                atomic_save_png(d / f"MASK_{i:03d}.png", r["segmentation"])
            meta = [{k: r[k] for k in ("area", "bbox", "predicted_iou", "stability_score", "point_coords", "crop_box")} | {"file": f"MASK_{i:03d}.png"} for i, r in enumerate(recs)]
            atomic_write_json(d / "masks.json", {"image": str(f), "width": w, "height": h, "masks": meta}, indent=1)
        if args.overlay:
            atomic_save_png(out / f"{stem}.overlay.png", overlay(img, [r["segmentation"] for r in recs]))
        done += 1
        n_masks += len(recs)
    if args.format == "coco":
        formats.write_coco_results(out / "results.json", coco)
        atomic_write_json(out / "images.json", images)
    print(f"{done} image(s) done, {n_masks} mask(s), {failed} failed; output in {out} "
          f"(pred_iou_thresh {thresholds['pred_iou_thresh']:g}, stability_score_thresh {thresholds['stability_score_thresh']:g})")
    if failed and not done:
        return EXIT_USAGE
    return EXIT_ERROR if failed else EXIT_OK
