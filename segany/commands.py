"""Core subcommands: ``segany segment``, ``segany embed``, ``segany models``.

Registered by ``segany.cli`` through ``register(subparsers)``. Each handler returns an exit code;
bad arguments and unreadable inputs raise ``UsageError`` (or the library's ``ImageError``,
``PromptError``, ``CheckpointError``), which the CLI turns into one line on stderr and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from .cli import UsageError

DEFAULT_MODEL = "tiny"  # bundled with segany; see README

SEGMENT_EXAMPLES = """\
examples:
  segany segment photo.jpg --point 420,310 -o mask.png
  segany segment photo.jpg --point 420,310 --point 100,80,0 --overlay overlay.png
  segany segment photo.jpg --box 50,60,700,520 --model vit_b --json > result.json
  segany segment photo.jpg --point 420,310 --all-masks -o mask.png   # mask_0.png .. mask_2.png
  segany segment photo.jpg --point 420,310 --snap-edges -o mask.png      # outline snapped to image edges
  segany embed photo.jpg -o photo.emb.pt && segany segment photo.jpg --embedding photo.emb.pt --point 420,310

A point is X,Y in pixels (x to the right, y down) with an optional label: 1 foreground
(default), 0 background. One point gives three candidate masks and the best is kept; more points
or a box give one. --json prints masks as COCO RLE (pycocotools) with scores, areas and boxes.
"""

EMBED_EXAMPLES = """\
examples:
  segany embed photo.jpg -o photo.emb.pt
  segany embed photo.jpg -o photo.emb.pt --model vit_b
  segany segment photo.jpg --embedding photo.emb.pt --point 420,310 -o mask.png

The embedding is the expensive part (the image encoder); segmenting from a saved embedding takes
milliseconds. Use the same --model/--checkpoint for embed and segment.
"""

MODELS_EXAMPLES = """\
examples:
  segany models
  segany models --json

Downloaded weights live in $SEGANY_HOME, else $XDG_CACHE_HOME/segany, else ~/.cache/segany.
"""


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    p = subparsers.add_parser(
        "segment", help="segment an object from points and/or a box",
        description="Segment the object at the given points and/or box and write its mask.",
        epilog=SEGMENT_EXAMPLES, formatter_class=fmt,
    )
    p.add_argument("image", help="image file (JPEG, PNG, TIFF, WebP, ...)")
    p.add_argument("--point", action="append", default=[], metavar="X,Y[,LABEL]", help="a click; repeat for more (LABEL 1 = object, 0 = background)")
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box around the object, in pixels")
    _add_model_args(p)
    p.add_argument("--embedding", metavar="EMB.pt", help="use an embedding saved by 'segany embed' instead of running the encoder")
    p.add_argument("-o", "--output", metavar="MASK.png", help="where to write the mask (default: IMAGE_STEM.mask.png in the current folder)")
    p.add_argument("--overlay", metavar="OVERLAY.png", help="also write the image with the mask and prompts drawn on it")
    p.add_argument("--all-masks", action="store_true", help="write every candidate mask (MASK_0.png, MASK_1.png, ...), not only the best")
    p.add_argument("--json", action="store_true", help="print the result as JSON (scores, areas, boxes, COCO RLE masks) instead of text")
    p.add_argument("--snap-edges", action="store_true",
                   help="snap the mask's outline to the image's edges (guided filter, segany.edges): not SAM's own output; "
                        "helps most where a mask's edge runs along a visible edge")
    p.set_defaults(func=cmd_segment)

    p = subparsers.add_parser(
        "embed", help="compute an image embedding once, to segment it many times",
        description="Run the image encoder and save the embedding (features and image sizes).",
        epilog=EMBED_EXAMPLES, formatter_class=fmt,
    )
    p.add_argument("image", help="image file")
    p.add_argument("-o", "--output", metavar="EMB.pt", help="embedding file to write (default: IMAGE_STEM.emb.pt in the current folder)")
    _add_model_args(p)
    p.set_defaults(func=cmd_embed)

    p = subparsers.add_parser(
        "models", help="list the models segany knows and whether their weights are here",
        description="List models: name, description, where the weights are and whether they are present.",
        epilog=MODELS_EXAMPLES, formatter_class=fmt,
    )
    p.add_argument("--json", action="store_true", help="print as JSON")
    p.set_defaults(func=cmd_models)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="NAME", help=f"model name from 'segany models' (default: {DEFAULT_MODEL})")
    g.add_argument("--checkpoint", metavar="PATH", help="weights file (.pth/.pt official format, or .safetensors); the model is recognised from it")
    g.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="image-encoder precision; bfloat16/float16 need --device cuda (the mask decoder stays float32)")
    g.add_argument("--backend", default="torch", choices=["torch", "onnxruntime", "torch-int8", "onnxruntime-int8"],
                   help="what runs the model (default: torch). onnxruntime gives the same masks (needs the 'onnx' "
                        "extra); the int8 ones are faster and approximate")
    g.add_argument("--onnx-dir", metavar="DIR",
                   help="with an onnxruntime backend: the model's 'segany export-onnx' folder; exported there first "
                        "if it holds none (default: a temporary export on every run)")


# ------------------------------------------------------------------------------ model loading
def load_segmenter(args):
    """A ``Segmenter`` for --model/--checkpoint/--device/--dtype, or ``UsageError``."""
    import torch

    from .checkpoints import VARIANTS, load_model, resolve_name
    from .predictor import Segmenter

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was given but PyTorch sees no CUDA GPU (use --device cpu)")
    if args.dtype != "float32" and args.device != "cuda":
        raise UsageError(f"--dtype {args.dtype} is for --device cuda only; on CPU segany runs float32")
    if args.checkpoint:
        path = Path(args.checkpoint)
        if not path.is_file():
            raise UsageError(f"--checkpoint {path}: no such file")
        sam = load_model(args.model, checkpoint=path) if args.model else load_model(str(path))
    else:
        name = args.model or DEFAULT_MODEL
        try:
            resolve_name(name)
        except KeyError:
            if name == DEFAULT_MODEL:
                raise UsageError(
                    f"the bundled {DEFAULT_MODEL!r} model is not in this installation; "
                    f"pass --model NAME (one of {', '.join(sorted(VARIANTS))}) or --checkpoint PATH"
                ) from None
            raise UsageError(f"unknown model {name!r}; 'segany models' lists them (known: {', '.join(sorted(VARIANTS))})") from None
        sam = load_model(name)
    backend = getattr(args, "backend", "torch")
    onnx_dir = getattr(args, "onnx_dir", None)
    if backend != "torch" and (args.device != "cpu" or args.dtype != "float32"):
        raise UsageError(f"--backend {backend} runs on the CPU in float32: leave out --device/--dtype")
    if onnx_dir and not backend.startswith("onnxruntime"):
        raise UsageError("--onnx-dir is for --backend onnxruntime or onnxruntime-int8")
    if backend.startswith("onnxruntime"):
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
        except ImportError:
            raise UsageError(f"--backend {backend} needs onnx and onnxruntime: pip install 'segany[onnx]'") from None
        if onnx_dir and not (Path(onnx_dir) / "encoder.onnx").is_file():
            from .onnx import export_onnx

            export_onnx(sam, onnx_dir, postprocess=False)
    sam = sam.to(args.device)
    if args.dtype != "float32":
        # Only the encoder runs in half precision: it is where the time goes, and the decoder's
        # small outputs (scores, thresholded logits) are the part most sensitive to rounding.
        sam.image_encoder.to(getattr(torch, args.dtype))
    try:
        return Segmenter(sam, backend=backend, onnx_dir=onnx_dir)
    except (ValueError, OSError) as e:  # an --onnx-dir export of another model, none, or a read-only one
        raise UsageError(str(e)) from None


# ------------------------------------------------------------------------------------ parsing
def parse_numbers(text: str, what: str, counts: Tuple[int, ...]) -> List[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise UsageError(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(values) not in counts:
        raise UsageError(f"{what} {text!r}: expected {' or '.join(map(str, counts))} comma-separated numbers, got {len(values)}")
    if not all(np.isfinite(values)):
        raise UsageError(f"{what} {text!r}: values must be finite")
    return values


def parse_points(specs: List[str]) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    if not specs:
        return None, None
    coords, labels = [], []
    for spec in specs:
        v = parse_numbers(spec, "--point", (2, 3))
        label = 1 if len(v) == 2 else v[2]
        if label not in (0, 1):
            raise UsageError(f"--point {spec!r}: label must be 1 (object) or 0 (background), got {label:g}")
        coords.append(v[:2])
        labels.append(int(label))
    return np.array(coords, dtype=np.float64), np.array(labels, dtype=np.int64)


def _default_output(image: str, suffix: str) -> Path:
    return Path.cwd() / (Path(image).stem + suffix)


def _numbered(path: Path, i: int) -> Path:
    return path.with_name(f"{path.stem}_{i}{path.suffix}")


# ----------------------------------------------------------------------------------- commands
def cmd_segment(args) -> int:
    from .io import atomic_save_png, load_image
    from .predictor import load_embedding_file

    coords, labels = parse_points(args.point)
    box = parse_numbers(args.box, "--box", (4,)) if args.box else None
    if coords is None and box is None:
        raise UsageError("give at least one --point X,Y or a --box X0,Y0,X1,Y1 (see --help)")
    image = load_image(args.image)  # ImageError names the file
    seg = load_segmenter(args)
    if args.embedding:
        try:
            emb = load_embedding_file(args.embedding)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--embedding: {e}") from None
        if tuple(emb["original_size"]) != image.shape[:2]:
            h, w = emb["original_size"]
            raise UsageError(
                f"--embedding {args.embedding} was made from a {w}x{h} image, "
                f"but {args.image} is {image.shape[1]}x{image.shape[0]}"
            )
        try:
            seg.load_embedding(args.embedding, image=image)
        except ValueError as e:
            raise UsageError(f"--embedding: {e}") from None
    else:
        seg.set_image(image)
    pred = seg.predict(points=coords, labels=labels, box=box, snap_edges=args.snap_edges)  # PromptError names the bad prompt

    order = list(range(len(pred.scores)))
    best = int(np.argmax(pred.scores))
    keep = order if args.all_masks else [best]
    out = Path(args.output) if args.output else _default_output(args.image, ".mask.png")
    paths = {i: (_numbered(out, i) if args.all_masks else out) for i in keep}
    for i in keep:
        atomic_save_png(paths[i], pred.masks[i])
    if args.overlay:
        atomic_save_png(args.overlay, draw_overlay(image, pred.masks[best], coords, labels, box))

    if args.json:
        result = {
            "image": str(args.image),
            "height": int(image.shape[0]),
            "width": int(image.shape[1]),
            "model": seg.model_name,
            "best": best,
            "masks": [mask_record(pred.masks[i], float(pred.scores[i]), i, str(paths.get(i)) if i in paths else None) for i in order],
            "overlay": str(args.overlay) if args.overlay else None,
        }
        print(json.dumps(result))
    else:
        for i in order:
            tag = " (best)" if i == best else ""
            dest = f" -> {paths[i]}" if i in paths else ""
            print(f"mask {i}: score {pred.scores[i]:.3f}, area {int(pred.masks[i].sum())} px{tag}{dest}")
        if args.overlay:
            print(f"overlay -> {args.overlay}")
    return 0


def mask_record(mask: np.ndarray, score: float, index: int, path: Optional[str]) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)] if len(xs) else [0, 0, 0, 0]
    return {
        "index": index,
        "score": score,
        "area": int(mask.sum()),
        "bbox": bbox,  # COCO xywh
        "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "file": path,
    }


def draw_overlay(image: np.ndarray, mask: np.ndarray, coords, labels, box) -> np.ndarray:
    """The image with the mask tinted blue, foreground points green, background red, box yellow."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    color = np.array([30, 144, 255], dtype=np.float32)
    out[mask] = out[mask] * 0.45 + color * 0.55
    img = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(img)
    r = max(3, round(max(image.shape[:2]) / 150))
    if box is not None:
        draw.rectangle(list(box), outline=(255, 215, 0), width=max(1, r // 2))
    if coords is not None:
        for (x, y), lab in zip(coords, labels):
            fill = (0, 200, 0) if lab == 1 else (220, 30, 30)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill, outline=(255, 255, 255))
    return np.asarray(img)


def cmd_embed(args) -> int:
    seg = load_segmenter(args)
    seg.set_image(args.image)  # ImageError names the file
    out = Path(args.output) if args.output else _default_output(args.image, ".emb.pt")
    seg.save_embedding(out)
    h, w = seg.predictor.original_size
    print(f"embedding of {args.image} ({w}x{h}, model {seg.model_name}) -> {out}")
    return 0


def cmd_models(args) -> int:
    from .checkpoints import list_models

    rows = []
    for v in list_models():
        rows.append(model_status(v))
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "size unknown"
        state = "present" if r["present"] else "absent (downloaded on first use)" if r["url"] else "absent"
        aliases = f" (also: {', '.join(r['aliases'])})" if r["aliases"] else ""
        print(f"{r['name']}{aliases}: {r['description']}")
        print(f"    {r['path']}  [{state}, {size}]")
    return 0


def model_status(v) -> dict:
    from .download import checkpoint_path

    if v.bundled:
        path = Path(__file__).parent / "weights" / v.bundled
    else:
        path = checkpoint_path(v)
    present = path.is_file()
    return {
        "name": v.name,
        "aliases": list(v.aliases),
        "description": v.description,
        "bundled": bool(v.bundled),
        "url": v.url,
        "path": str(path),
        "present": present,
        "size": path.stat().st_size if present else v.size,
        "sha256": v.sha256,
    }


if __name__ == "__main__":  # pragma: no cover - convenience
    from .cli import main

    sys.exit(main())
