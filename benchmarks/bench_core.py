"""Core benchmark: segany vs the official ``segment_anything`` 1.0, same run, same weights, same image.

    .venv/bin/python benchmarks/bench_core.py            # vit_b, 1500x2000 image
    .venv/bin/python benchmarks/bench_core.py --model vit_t --clicks 20

Both sides load the same random ViT-B weights, saved in the official checkpoint format, and embed
the same photo-sized image (a smooth gradient plus noise, so nothing is trivially compressible).
Each side runs in its own subprocess so that peak resident memory (``ru_maxrss``) is its own.
Measured per side:

* encoder: seconds for ``set_image`` (resize + normalise + image encoder), best of ``--encodes``;
* click: one foreground point -> masks at the original size (``predict``), median of ``--clicks``
  after one warm-up;
* peak RSS of the whole process (import, model, image, embedding, prediction).

With ``--rounds`` > 1 each side runs in several processes (order official, segany, segany,
official, ...): the best encoder time and click median, and the highest peak RSS are reported.

The official side runs in the environment a user of it has: ``import segany`` turns on
PyTorch's huge-page allocator (``THP_MEM_ALLOC_ENABLE=1``, see ``segany.allocator``), which
child processes would inherit, and it is taken out of the official side's environment unless it
was set before this script started. ``--official-huge-pages`` gives the official side the same
allocator (on the Intel development VM it took the official vit_b encoder from 14-15 s to 10-11 s).

Prints a markdown table with segany/official ratios; lower is better.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 20, size=(h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def run_side(side: str, model: str, weights: str, image_path: str, encodes: int, clicks: int, out: str) -> None:
    import torch

    torch.set_grad_enabled(False)
    image = np.load(image_path)
    if side == "segany":
        sys.path.insert(0, str(ROOT))
        from segany import SamPredictor, sam_model_registry
    else:
        sys.path.insert(0, str(ROOT / "tests"))
        from reference import load_reference

        sa, ms = load_reference()
        mod = ms if model == "vit_t" else sa
        sam_model_registry, SamPredictor = mod.sam_model_registry, mod.SamPredictor
    sam = sam_model_registry[model](checkpoint=weights).eval()
    predictor = SamPredictor(sam)
    enc_times = []
    for _ in range(encodes):
        t = time.perf_counter()
        predictor.set_image(image)
        enc_times.append(time.perf_counter() - t)
    h, w = image.shape[:2]
    point, label = np.array([[w * 0.45, h * 0.55]]), np.array([1])
    masks, scores, _ = predictor.predict(point_coords=point, point_labels=label)  # warm-up
    click_times = []
    for _ in range(clicks):
        t = time.perf_counter()
        masks, scores, _ = predictor.predict(point_coords=point, point_labels=label)
        click_times.append(time.perf_counter() - t)
    np.save(out + ".mask.npy", masks[int(np.argmax(scores))])
    result = {
        "encoder_s": min(enc_times),
        "click_ms": statistics.median(click_times) * 1000,
        # Linux reports ru_maxrss in KiB (macOS in bytes).
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20 if sys.platform == "darwin" else 1 << 10),
        "threads": torch.get_num_threads(),
        "mask_shape": list(masks.shape),
    }
    Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "vit_t"])
    ap.add_argument("--size", default="1500x2000", help="image HxW (default 1500x2000)")
    ap.add_argument("--encodes", type=int, default=2, help="set_image runs per side; the best counts")
    ap.add_argument("--clicks", type=int, default=10, help="timed clicks per side; the median counts")
    ap.add_argument("--rounds", type=int, default=2, help="processes per side, alternating order; best times, highest memory count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official-huge-pages", action="store_true",
                    help="run the official side with segany's huge-page allocator setting too (THP_MEM_ALLOC_ENABLE=1)")
    ap.add_argument("--side", choices=["segany", "official"], help=argparse.SUPPRESS)  # child mode
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(args.side, args.model, args.weights, args.image, args.encodes, args.clicks, args.out)
        return

    import torch

    # the environment as the user had it, before segany's import changes the allocator setting
    official_env = dict(os.environ)
    if args.official_huge_pages:
        official_env["THP_MEM_ALLOC_ENABLE"] = "1"
    sys.path.insert(0, str(ROOT))
    from segany import sam_model_registry
    from segany.modeling.build import randomize_

    h, w = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, f"random_{args.model}.pth")
        torch.save(randomize_(sam_model_registry[args.model](), seed=args.seed).state_dict(), weights)
        image_path = os.path.join(tmp, "image.npy")
        np.save(image_path, make_image(h, w, args.seed))
        runs = {"official": [], "segany": []}
        # Sequential (the sides must not share the CPU), in ABBA order over rounds so that a
        # machine getting busier or quieter during the run favours neither side.
        order = [("official", "segany") if r % 2 == 0 else ("segany", "official") for r in range(args.rounds)]
        for r, sides in enumerate(order):
            for side in sides:
                out = os.path.join(tmp, f"{side}.json")
                cmd = [sys.executable, __file__, "--side", side, "--model", args.model, "--weights", weights,
                       "--image", image_path, "--out", out, "--encodes", str(args.encodes), "--clicks", str(args.clicks)]
                subprocess.run(cmd, check=True, env=official_env if side == "official" else None)
                runs[side].append(json.loads(Path(out).read_text()))
        results = {
            side: {
                "encoder_s": min(x["encoder_s"] for x in rs),
                "click_ms": min(x["click_ms"] for x in rs),
                "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
                "threads": rs[0]["threads"],
            }
            for side, rs in runs.items()
        }
        a = np.load(os.path.join(tmp, "segany.json.mask.npy"))
        b = np.load(os.path.join(tmp, "official.json.mask.npy"))
        union = int((a | b).sum())
        iou = float((a & b).sum() / union) if union else 1.0  # both empty: identical

    s, o = results["segany"], results["official"]
    print(f"model {args.model} (random weights, seed {args.seed}), image {w}x{h} (WxH), "
          f"torch {torch.__version__}, {s['threads']} threads, {os.cpu_count()} CPUs visible; official side "
          f"{'with' if official_env.get('THP_MEM_ALLOC_ENABLE') == '1' else 'without'} huge pages; "
          f"best masks agree: IoU {iou:.5f} (areas {int(a.sum())} / {int(b.sum())} px)\n")
    print("| metric | official | segany | segany / official |")
    print("|---|---:|---:|---:|")
    print(f"| encoder (s, best of {args.encodes} x {args.rounds}) | {o['encoder_s']:.2f} | {s['encoder_s']:.2f} | {s['encoder_s'] / o['encoder_s']:.2f}x |")
    print(f"| one click (ms, median of {args.clicks}, best of {args.rounds}) | {o['click_ms']:.1f} | {s['click_ms']:.1f} | {s['click_ms'] / o['click_ms']:.2f}x |")
    print(f"| peak RSS (MB) | {o['peak_rss_mb']:.0f} | {s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] / o['peak_rss_mb']:.2f}x |")


if __name__ == "__main__":
    main()
