"""``segany eval``: the interactive-segmentation benchmark from the command line."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

EPILOG = """examples:
  segany eval ../shared/data/coco_mval --limit 20 -o reports/tiny
  segany eval ../shared/data/horses ../shared/data/people --method sam --method grabcut -o reports/cmp
  segany eval data/annotations.json --checkpoint model.safetensors --protocol all -o reports/x
  segany eval my_masks/ --split all --protocol box --method grabcut -o reports/gc
  segany eval ../shared/data/coco128 --zoom-in --protocol clicks -o reports/zoom
  segany eval ../shared/data/horses --snap-edges -o reports/edges

DATASET is a COCO folder (annotations.json + images/) or JSON file, an SA-1B folder of per-image
JSON files, or a folder with images/ and masks/ (0 background, 128 ignore, other values objects).
Writes OUT/<dataset>.<method>.json, OUT/<dataset>.miou.png, OUT/summary.json, OUT/summary.md
and OUT/miou_vs_clicks.png (all datasets pooled).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="benchmark a model (or GrabCut) with simulated clicks, boxes, or segment-everything",
        description="Interactive-segmentation benchmark: mIoU after 1..N simulated clicks, NoC@85/90, "
        "NoF@90, box mIoU (ground-truth and jittered boxes), AR@100/1000 of segment-everything.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("datasets", nargs="+", metavar="DATASET")
    p.add_argument("--protocol", action="append", choices=["clicks", "box", "everything", "all"],
                   help="protocol(s) to run; repeatable (default: clicks and box)")
    p.add_argument("--method", action="append", choices=["sam", "grabcut"],
                   help="'sam' (the model given by --model/--checkpoint) or 'grabcut' (OpenCV baseline); repeatable (default: sam)")
    p.add_argument("--model", default=None, help="model name (default: tiny) or checkpoint path")
    p.add_argument("--checkpoint", default=None, help="weights file (.pth/.pt, or .safetensors with its config)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--split", default="val", choices=["val", "all", "train"],
                   help="images to use: the fixed validation split of segany.datasets (default), or all")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N images of each data set (after the split)")
    p.add_argument("--max-clicks", type=int, default=20, metavar="N", help="clicks per object (default 20)")
    p.add_argument("--min-area", type=int, default=0, metavar="PX", help="skip objects smaller than PX pixels (default 0: none)")
    p.add_argument("--max-objects", type=int, default=None, metavar="N", help="first N objects of each image only (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the jittered boxes (default 0)")
    p.add_argument("--points-per-side", type=int, default=None, help="segment-everything grid (generator default if unset)")
    p.add_argument("--zoom-in", action="store_true",
                   help="also run the model with RITM's zoom-in (clicks after the first predicted in a re-encoded crop "
                        "around the object), reported as '<model>+zoom'; not part of the SAM protocol")
    p.add_argument("--snap-edges", action="store_true",
                   help="also run the model with its masks snapped to the image's edges (segany.edges), reported as "
                        "'<model>+edges' (with --zoom-in also both: '<model>+zoom+edges'); not part of the SAM protocol")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="report folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def load_sam(model: str | None, checkpoint: str | None, device: str | None):
    """A model for ``--model``/``--checkpoint``. A .safetensors checkpoint that carries its config
    in the metadata (as written by segany's trainer) builds that config; others go through
    :func:`segany.checkpoints.load_model`."""
    from ..checkpoints import CheckpointError, load_model, load_state_dict_strict, read_state_dict

    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise CheckpointError(f"{checkpoint}: no such checkpoint file")
    if checkpoint is not None and checkpoint.endswith(".safetensors"):
        import json

        from safetensors import safe_open

        try:
            with safe_open(checkpoint, "pt") as f:
                meta = f.metadata() or {}
        except Exception as e:
            raise CheckpointError(f"{checkpoint}: not a valid safetensors file ({e})") from None
        if "config" in meta:
            from ..modeling import build_sam

            sam = build_sam(json.loads(meta["config"]))
            load_state_dict_strict(sam, read_state_dict(checkpoint), source=checkpoint)
            sam.model_name = model or os.path.splitext(os.path.basename(checkpoint))[0]
            return sam.to(device or "cpu").eval()
    if checkpoint is not None and model is None:
        sam = load_model(checkpoint, device=device)
        sam.model_name = os.path.splitext(os.path.basename(checkpoint))[0]
        return sam
    try:
        return load_model(model or "tiny", checkpoint=checkpoint, device=device)
    except KeyError as e:  # unknown model name
        raise CheckpointError(str(e.args[0]) if e.args else str(e)) from None


def run(args) -> int:
    from ..cli import UsageError
    from ..io import atomic_write_json
    from .methods import GrabCutMethod, SamMethod
    from .plot import plot_miou
    from .runner import DatasetError, dataset_name, evaluate, load_dataset, markdown_table, pool, table

    protocols = args.protocol or ["clicks", "box"]
    protocols = ["clicks", "box", "everything"] if "all" in protocols else list(dict.fromkeys(protocols))
    methods_wanted = list(dict.fromkeys(args.method or ["sam"]))
    if args.max_clicks < 1:
        raise UsageError("--max-clicks must be at least 1")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    if args.max_objects is not None and args.max_objects < 1:
        raise UsageError("--max-objects must be at least 1")
    if args.zoom_in and "sam" not in methods_wanted:
        raise UsageError("--zoom-in needs --method sam")
    if args.snap_edges and "sam" not in methods_wanted:
        raise UsageError("--snap-edges needs --method sam")
    if (args.model or args.checkpoint) and "sam" not in methods_wanted:
        raise UsageError("--model/--checkpoint given but --method does not include 'sam'")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"{args.output} exists and is not a folder")

    datasets = []
    seen: Dict[str, int] = {}
    for path in args.datasets:
        try:
            ds = load_dataset(path, args.split)
        except DatasetError as e:
            raise UsageError(str(e)) from None
        name = dataset_name(path)
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 1
        if len(ds) == 0:
            raise UsageError(f"{path}: no images in split {args.split!r}")
        datasets.append((name, path, ds))

    methods = []
    for m in methods_wanted:
        if m == "sam":
            sam = load_sam(args.model, args.checkpoint, args.device)
            methods.append(SamMethod(sam))
            if args.zoom_in:
                methods.append(SamMethod(sam, zoom_in=True))
            if args.snap_edges:
                methods.append(SamMethod(sam, snap_edges=True))
            if args.zoom_in and args.snap_edges:
                methods.append(SamMethod(sam, zoom_in=True, snap_edges=True))
        else:
            methods.append(GrabCutMethod())
    if "everything" in protocols and not any(m.supports_everything for m in methods):
        print("note: the 'everything' protocol needs a model; GrabCut skips it", file=sys.stderr)
    ev_kwargs = {"points_per_side": args.points_per_side} if args.points_per_side else {}

    os.makedirs(args.output, exist_ok=True)
    rows: List[dict] = []
    by_method: Dict[str, List[dict]] = {}
    for name, path, ds in datasets:
        curves = {}
        for m in methods:
            rep = evaluate(ds, m, protocols, args.max_clicks, args.limit, args.seed, args.min_area,
                           max_objects=args.max_objects,
                           progress=not args.no_progress, desc=f"{name} [{m.name}]", everything_kwargs=ev_kwargs)
            rep = {"dataset": name, "path": os.path.abspath(path), "split": args.split, "limit": args.limit, **rep}
            atomic_write_json(os.path.join(args.output, f"{name}.{m.name}.json"), rep, indent=1)
            for s in rep["skipped"]:
                print(f"skipped {name} #{s['index']} {s['name']}: {s['error']}", file=sys.stderr)
            rows.append({k: v for k, v in rep.items() if k != "per_object"})
            by_method.setdefault(m.name, []).append(rep)
            if rep.get("clicks", {}).get("miou"):
                curves[m.name] = rep["clicks"]["miou"]
        if curves:
            plot_miou(os.path.join(args.output, f"{name}.miou.png"), curves, title=f"{name}: mIoU vs. clicks")
    pooled = {}
    if len(datasets) > 1:
        for mname, reps in by_method.items():
            pooled[mname] = pool(reps)
            rows.append({"dataset": "pooled", **pooled[mname]})
    summary = {"split": args.split, "limit": args.limit, "max_clicks": args.max_clicks, "protocols": protocols,
               "rows": rows, "pooled": pooled}
    atomic_write_json(os.path.join(args.output, "summary.json"), summary, indent=1)
    from ..io import atomic_write_text

    atomic_write_text(os.path.join(args.output, "summary.md"), markdown_table(rows) + "\n")
    curves = {}
    for mname, reps in by_method.items():
        src = pooled.get(mname) or reps[0]
        if src.get("clicks", {}).get("miou"):
            curves[mname] = src["clicks"]["miou"]
    if curves:
        label = "all data sets pooled" if len(datasets) > 1 else datasets[0][0]
        plot_miou(os.path.join(args.output, "miou_vs_clicks.png"), curves, title=f"mIoU vs. clicks ({label}, split {args.split})")
    print(table(rows))
    print(f"reports in {args.output}")
    return 0
