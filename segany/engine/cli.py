"""``segany annotate`` and ``segany dataset``: the data engine's commands."""
from __future__ import annotations

import argparse
import json
import os
import sys

ANNOTATE_HELP = """\
Segment everything in many images and write one SA-1B JSON per image (mirroring the input tree),
a manifest.jsonl of what was done and a summary. Rerunning the same command resumes: images whose
outputs exist and are valid are skipped; a run killed at any moment loses nothing.

examples:
  segany annotate photos/ -o annotations/
  segany annotate photos/ more.jpg list.txt -o out/ --overlay --points-per-side 16
  segany annotate photos/ -o out/ --checkpoint runs/r1/best.safetensors --min-masks 3
  segany annotate /shared/photos -o /shared/out --ray                       # local Ray, one worker per CPU
  segany annotate /shared/photos -o /shared/out --ray ray://head:10001 --workers 8 --gpus-per-worker 1
"""

DATASET_HELP = """\
Work with SA-1B folders (one JSON per image, as 'segany annotate' writes):

  segany dataset stats OUT/                       counts, masks per image, mask sizes, scores
  segany dataset verify OUT/ [--images ROOT]      every record decodes and matches its image
  segany dataset to-coco OUT/ -o OUT/annotations.json   one COCO file (for 'segany train --data OUT/')
  segany dataset from-coco coco.json --images IMGDIR -o SA1B/   COCO -> per-image SA-1B JSON
"""


def _add_amg_options(p: argparse.ArgumentParser) -> None:
    from .annotate import AMG_DEFAULTS

    g = p.add_argument_group("segment-everything options (as SamAutomaticMaskGenerator)")
    g.add_argument("--points-per-side", type=int, default=AMG_DEFAULTS["points_per_side"])
    g.add_argument("--points-per-batch", type=int, default=AMG_DEFAULTS["points_per_batch"])
    g.add_argument("--pred-iou-thresh", type=float, default=None,
                   help=f"default: the model's calibrated value if it has one, else SAM's {AMG_DEFAULTS['pred_iou_thresh']}")
    g.add_argument("--stability-score-thresh", type=float, default=None,
                   help=f"default: the model's calibrated value if it has one, else SAM's {AMG_DEFAULTS['stability_score_thresh']}")
    g.add_argument("--stability-score-offset", type=float, default=AMG_DEFAULTS["stability_score_offset"])
    g.add_argument("--box-nms-thresh", type=float, default=AMG_DEFAULTS["box_nms_thresh"])
    g.add_argument("--crop-n-layers", type=int, default=AMG_DEFAULTS["crop_n_layers"])
    g.add_argument("--crop-nms-thresh", type=float, default=AMG_DEFAULTS["crop_nms_thresh"])
    g.add_argument("--crop-overlap-ratio", type=float, default=AMG_DEFAULTS["crop_overlap_ratio"])
    g.add_argument("--crop-n-points-downscale-factor", type=int, default=AMG_DEFAULTS["crop_n_points_downscale_factor"])
    g.add_argument("--min-mask-region-area", type=int, default=AMG_DEFAULTS["min_mask_region_area"], help="remove holes/islands smaller than this (pixels)")
    g.add_argument("--snap-edges", action="store_true", help="snap the masks' outlines to the image's edges (segany.edges; not SAM's output)")
    q = p.add_argument_group("quality filters (after the generator)")
    q.add_argument("--min-masks", type=int, default=0, help="an image with fewer masks is recorded 'rejected' and gets no JSON")
    q.add_argument("--max-masks", type=int, default=0, help="keep the N masks with the best predicted IoU (0: all)")
    q.add_argument("--min-area", type=float, default=0.0, help="drop smaller masks: pixels if >= 1, else a fraction of the image")
    q.add_argument("--max-area", type=float, default=1.0, help="drop masks larger than this fraction of the image")


AMG_KEYS = ("points_per_side", "points_per_batch", "pred_iou_thresh", "stability_score_thresh", "stability_score_offset",
            "box_nms_thresh", "crop_n_layers", "crop_nms_thresh", "crop_overlap_ratio", "crop_n_points_downscale_factor",
            "min_mask_region_area", "snap_edges")


def options_from_args(args: argparse.Namespace):
    from .annotate import EngineOptions

    for k in ("points_per_side", "points_per_batch"):
        if getattr(args, k) < 1:
            raise _usage(f"--{k.replace('_', '-')} must be at least 1")
    if not 0 <= args.max_area <= 1:
        raise _usage("--max-area is a fraction of the image, between 0 and 1")
    from ..everything import resolve_thresholds

    amg = {k: getattr(args, k) for k in AMG_KEYS}
    amg.update(resolve_thresholds(args.model, args.checkpoint, args.pred_iou_thresh, args.stability_score_thresh))
    return EngineOptions(
        model=args.model, checkpoint=args.checkpoint, amg=amg,
        min_masks=args.min_masks, max_masks=args.max_masks, min_area=args.min_area, max_area=args.max_area,
        overlay=args.overlay, copy_images=args.copy_images, max_pixels=args.max_pixels,
        device=args.device, threads=args.threads,
    )


class _OptionError(ValueError):
    pass


def _usage(msg: str) -> Exception:
    return _OptionError(msg)


def _error(args: argparse.Namespace, e: Exception) -> int:
    """Usage and input errors: one line on stderr, exit code 2 (as segany.cli does)."""
    name = args.command + (f" {args.dataset_command}" if getattr(args, "dataset_command", None) else "")
    print(f"segany {name}: error: {e}", file=sys.stderr)
    return 2


def run_annotate(args: argparse.Namespace) -> int:
    from .annotate import JobError, format_summary, run_job
    from .inputs import InputError

    try:
        opts = options_from_args(args)
    except _OptionError as e:
        return _error(args, e)
    use_ray = args.ray is not None
    if not use_ray and (args.workers is not None or args.gpus_per_worker):
        return _error(args, _OptionError("--workers / --gpus-per-worker need --ray"))
    try:
        summary = run_job(
            args.inputs, args.output, opts, redo=args.redo, progress=not args.no_progress,
            use_ray=use_ray, ray_address=None if args.ray in (None, "local") else args.ray,
            workers=args.workers, cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
        )
    except (InputError, JobError) as e:
        return _error(args, e)
    except RuntimeError as e:  # Ray missing, not enough resources, workers that cannot start
        print(f"segany annotate: error: {e}", file=sys.stderr)
        return 1
    print(format_summary(summary, os.path.abspath(args.output)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("annotate", help="segment everything in many images (resumable; Ray for clusters)",
                              description=ANNOTATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image folders (recursive), image files, or .txt lists of paths")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--model", default="tiny", help="model name (see 'segany models') or a checkpoint path")
    p.add_argument("--checkpoint", default=None, help="weights file (.pth, or .safetensors with its config)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--overlay", action="store_true", help="also write <name>.overlay.jpg previews")
    p.add_argument("--copy-images", action="store_true", help="copy each image next to its JSON (a self-contained SA-1B folder)")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (recorded as failed)")
    p.add_argument("--redo", action="store_true", help="process every image again, even if done")
    p.add_argument("--no-progress", action="store_true")
    r = p.add_argument_group("Ray (past one machine)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray: a cluster address (e.g. ray://head:10001 or auto), or none to start Ray locally")
    r.add_argument("--workers", type=int, default=None, help="model-holding workers (default: as many as the resources allow)")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, default=0.0)
    _add_amg_options(p)
    p.set_defaults(func=run_annotate)

    d = subparsers.add_parser("dataset", help="stats / verify / to-coco / from-coco for SA-1B folders",
                              description=DATASET_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ds = d.add_subparsers(dest="dataset_command", metavar="ACTION", required=True)
    s = ds.add_parser("stats", help="counts and distributions")
    s.add_argument("folder")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=run_dataset)
    v = ds.add_parser("verify", help="check every record (exit 1 on problems)")
    v.add_argument("folder")
    v.add_argument("--images", default=None, help="image root, if the images are not next to the JSON files")
    v.add_argument("--no-images", action="store_true", help="check the records only")
    v.set_defaults(func=run_dataset)
    c = ds.add_parser("to-coco", help="all records -> one COCO instance file")
    c.add_argument("folder")
    c.add_argument("-o", "--output", required=True)
    c.set_defaults(func=run_dataset)
    f = ds.add_parser("from-coco", help="COCO instance file -> one SA-1B JSON per image")
    f.add_argument("coco")
    f.add_argument("-o", "--output", required=True)
    f.add_argument("--images", default=None, help="folder holding the COCO file_names (to copy them, with --copy-images)")
    f.add_argument("--copy-images", action="store_true")
    f.set_defaults(func=run_dataset)


def run_dataset(args: argparse.Namespace) -> int:
    try:
        return _run_dataset(args)
    except (ValueError, FileNotFoundError) as e:
        return _error(args, e)


def _run_dataset(args: argparse.Namespace) -> int:
    from . import dataset as D

    cmd = args.dataset_command
    if cmd == "stats":
        st = D.stats(args.folder)
        print(json.dumps(st, indent=1) if args.json else D.format_stats(st))
        return 0
    if cmd == "verify":
        problems, n = D.verify(args.folder, images=args.images, check_images=not args.no_images)
        for p in problems[:200]:
            print(p)
        if len(problems) > 200:
            print(f"... and {len(problems) - 200} more")
        print(f"{n} records checked, {len(problems)} problems", file=sys.stderr)
        return 1 if problems else 0
    if cmd == "to-coco":
        n_img, n_ann = D.to_coco(args.folder, args.output)
        print(f"wrote {args.output}: {n_img} images, {n_ann} annotations")
        return 0
    if cmd == "from-coco":
        n_img, n_ann = D.from_coco(args.coco, args.output, images=args.images, copy_images=args.copy_images)
        print(f"wrote {n_img} records ({n_ann} annotations) to {args.output}")
        return 0
    raise _usage(f"unknown dataset action {cmd!r}")
