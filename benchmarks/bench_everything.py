"""Segment-everything speed and memory: segany vs segment_anything 1.0, same weights, same image,
same embeddings (computed once and given to both), so only ``generate`` after the embedding is
timed. Each (implementation, configuration) runs in its own process; peak memory is the rise of
the process's peak RSS during ``generate``.

Weights are random (no official checkpoint is available offline) with SAM's real prompt encoder
and mask decoder sizes (256 dims, 256x256 low-res masks, 1024 input); random weights give
noisier masks than trained ones, which is the harder case for segany (more contour cells).

    python benchmarks/bench_everything.py [--side 32] [--size 600x800] [--configs plain,crops] [--rounds 2]
    BENCH_WEIGHTS=segany/weights/tiny.safetensors BENCH_IMAGE=photo.jpg python benchmarks/bench_everything.py --defaults ...

The default thresholds are permissive (pred_iou_thresh 0, stability 0.8) so that many masks
reach the post-processing; ``--defaults`` uses the generator's defaults (0.88, 0.95) instead.

BENCH_WEIGHTS: a segany .safetensors (config in its metadata) instead of random weights; the
reference gets the same prompt encoder and mask decoder. BENCH_IMAGE: a real photo instead of
the synthetic image. BENCH_THREADS: torch threads (2). BENCH_DENORMALS=1: keep denormal floats
(flushed to zero by default, in both implementations: see child()).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

CONFIG = {
    "image_size": 1024,
    "prompt_embed_dim": 256,
    "encoder": {"type": "vit", "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": [0], "patch_size": 16, "window_size": 4},
    "decoder": {"depth": 2, "mlp_dim": 2048, "num_heads": 8, "iou_head_hidden_dim": 256},
}
GEN = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.8, "box_nms_thresh": 0.7}
# the generator's own defaults (pred_iou_thresh 0.88, stability_score_thresh 0.95, box_nms 0.7):
# what a user gets, and where filtering by predicted IoU before the upscaling pays (--defaults)
DEFAULTS = {"pred_iou_thresh": 0.88, "stability_score_thresh": 0.95, "box_nms_thresh": 0.7}


def _thresholds() -> dict:
    """The run's thresholds: --thresholds IOU,STAB, else --defaults, else the permissive ones."""
    if os.environ.get("BENCH_THRESHOLDS"):
        iou, stab = (float(v) for v in os.environ["BENCH_THRESHOLDS"].split(","))
        return {"pred_iou_thresh": iou, "stability_score_thresh": stab, "box_nms_thresh": 0.7}
    return DEFAULTS if os.environ.get("BENCH_DEFAULTS") == "1" else GEN


def _rss_peak_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(impl: str, config: str, side: int, size) -> dict:
    import numpy as np
    import torch

    from core_helpers import reference_model, test_image
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.modeling.build import build_sam, randomize_
    from segany.predictor import SamPredictor

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if os.environ.get("BENCH_DENORMALS") != "1":
        # The random weights (std 0.5) drive attention scores far apart, and the softmax then
        # gives denormal weights; on Intel cores (Sapphire Rapids here) each arithmetic op on a
        # denormal takes a microcode assist, and both implementations ran ~12x slower (segany's
        # 8x8 grid 16.7 s vs 1.4 s; the reference's 32x32 did not finish in 8 min). Trained
        # weights do not get there (tiny.safetensors, cat.png, 32x32: 5.74 s vs 5.95 s with
        # flush-to-zero), so the benchmark flushes them, for both; set before any thread starts,
        # which inherit it. BENCH_DENORMALS=1 keeps them.
        torch.set_flush_denormal(True)
    weights, image = os.environ.get("BENCH_WEIGHTS"), os.environ.get("BENCH_IMAGE")
    if weights:
        from safetensors.torch import load_file

        from segany.checkpoints import safetensors_config

        model_config = safetensors_config(weights)
        ours = build_sam(model_config).eval()
        ours.load_state_dict(load_file(weights))
    else:
        model_config = CONFIG
        ours = randomize_(build_sam(CONFIG), seed=1, std=0.5)
    if image:
        from segany.io import load_image

        img = load_image(image)
    else:
        img = test_image(*size, seed=0)
    gen_kw = _thresholds()
    kw = dict(gen_kw, points_per_side=side, crop_n_layers=1 if config == "crops" else 0)
    # embeddings of every crop, once, from segany's encoder
    cache = {}
    emb = SamPredictor(ours)

    def features(crop):
        key = (crop.shape, crop.tobytes()[:4096], int(crop.sum()))
        if key not in cache:
            emb.set_image(crop)
            cache[key] = (emb.features, emb.original_size, emb.input_size)
        return cache[key]

    if impl == "segany":
        gen = SamAutomaticMaskGenerator(ours, **kw)

        def set_crop(crop):
            f, o, i = features(crop)
            gen.predictor.set_embedding(f, o, i)

        gen._set_crop_image = set_crop
    else:
        from reference import load_reference

        sa, _ = load_reference()
        if weights:
            from reference import reference_decoder_model

            ref = reference_decoder_model(sa, ours, model_config)
        else:
            ref = reference_model(CONFIG)
            ref.load_state_dict(ours.state_dict())

        gen = sa.SamAutomaticMaskGenerator(ref, **kw)
        p = gen.predictor

        def set_image(crop, image_format="RGB"):
            f, o, i = features(crop)
            p.reset_image()
            p.features, p.original_size, p.input_size, p.is_image_set = f, o, i, True

        p.set_image = set_image
    # pre-compute the embeddings outside the timed part
    from segany.automatic import generate_crop_boxes

    for x0, y0, x1, y1 in generate_crop_boxes(img.shape[:2], kw["crop_n_layers"], 512 / 1500)[0]:
        features(img[y0:y1, x0:x1])
    import gc

    gc.collect()
    base = _rss_peak_kb()
    _reset_peak()
    t = time.perf_counter()
    recs = gen.generate(img)
    dt = time.perf_counter() - t
    n_crops = len(generate_crop_boxes(img.shape[:2], kw["crop_n_layers"], kw.get("crop_overlap_ratio", 512 / 1500))[0])
    peak = _rss_peak_kb()
    rles = []
    from segany import masks as M

    for r in recs:
        rles.append({"rle": M.encode_rle(r["segmentation"]), "iou": r["predicted_iou"], "stab": r["stability_score"], "pt": r["point_coords"][0]})
    return {"time_s": dt, "peak_mb": max(0, peak - base) / 1024, "n": len(recs), "rles": rles, "crops": n_crops}


def _compare(a, b) -> str:
    from segany import masks as M

    if len(a) != len(b):
        return f"count {len(a)} vs {len(b)}"
    if not a:
        return "0 masks"
    import numpy as np

    A = np.stack([M.decode_rle(r["rle"]).ravel() for r in a]).astype(np.float32)
    B = np.stack([M.decode_rle(r["rle"]).ravel() for r in b]).astype(np.float32)
    inter = A @ B.T
    iou = inter / np.maximum(A.sum(1)[:, None] + B.sum(1)[None] - inter, 1)
    best = iou.max(1)
    ds = max(abs(x["stab"] - b[j]["stab"]) for x, j in zip(a, iou.argmax(1)))
    return f"{len(a)} = {len(b)} masks, min IoU {best.min():.4f}, max |d stability| {ds:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=32)
    ap.add_argument("--size", default="600x800", help="HxW")
    ap.add_argument("--configs", default="plain,crops")
    ap.add_argument("--defaults", action="store_true", help="the generator's default thresholds instead of the permissive ones")
    ap.add_argument("--thresholds", metavar="IOU,STAB", help="pred_iou_thresh,stability_score_thresh (e.g. a model's calibrated pair)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="processes per side and configuration, alternating order (segany, reference, reference, segany, ...): "
                         "the best time and the highest peak memory count, every run is printed")
    ap.add_argument("--child", nargs=2, metavar=("IMPL", "CONFIG"))
    a = ap.parse_args()
    size = tuple(int(v) for v in a.size.split("x"))
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.side, size)))
        return
    if a.defaults:
        os.environ["BENCH_DEFAULTS"] = "1"  # read by the child processes
    if a.thresholds:
        os.environ["BENCH_THRESHOLDS"] = a.thresholds
    load = os.getloadavg()
    rows = []
    for config in a.configs.split(","):
        runs: dict = {"segany": [], "reference": []}
        for i in range(max(1, a.rounds)):
            for impl in ("segany", "reference") if i % 2 == 0 else ("reference", "segany"):
                out = subprocess.run([sys.executable, __file__, "--side", str(a.side), "--size", a.size, "--child", impl, config],
                                     capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{config} {impl} failed:\n{out.stderr[-3000:]}")
                runs[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{config} {impl}: {runs[impl][-1]['time_s']:.2f} s, peak +{runs[impl][-1]['peak_mb']:.0f} MB", file=sys.stderr)
        res = {}
        for impl, rs in runs.items():  # the best time, the highest peak, the first run's masks
            res[impl] = dict(rs[0], time_s=min(r["time_s"] for r in rs), peak_mb=max(r["peak_mb"] for r in rs),
                             times=[r["time_s"] for r in rs])
        s, r = res["segany"], res["reference"]
        if s["crops"] != (1 if config == "plain" else 5):
            sys.exit(f"{config}: ran {s['crops']} crops")  # the configuration must reach the generator
        rows.append((config, s, r, _compare(s["rles"], r["rles"])))
    what = os.path.basename(os.environ["BENCH_WEIGHTS"]) if os.environ.get("BENCH_WEIGHTS") else "random vit_b-size decoder"
    img = os.path.basename(os.environ["BENCH_IMAGE"]) if os.environ.get("BENCH_IMAGE") else f"synthetic {size[0]}x{size[1]}"
    th = _thresholds()
    rounds = f", best of {a.rounds} runs a side" if a.rounds > 1 else ""
    print(f"\nsegment everything, {what}, {img}, {a.side}x{a.side} points, {os.environ.get('BENCH_THREADS', '2')} threads{rounds}, "
          f"pred_iou_thresh {th['pred_iou_thresh']}, stability_score_thresh {th['stability_score_thresh']}, "
          f"generate() after the embedding; load average {load[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end ({os.cpu_count()} cores)\n")
    print("| config | segany s | reference s | time ratio | segany peak MB | reference peak MB | memory ratio | parity |")
    print("|---|---|---|---|---|---|---|---|")
    for config, s, r, par in rows:
        print(f"| {config} | {s['time_s']:.2f} | {r['time_s']:.2f} | {s['time_s'] / r['time_s']:.3f}x | {s['peak_mb']:.0f} | {r['peak_mb']:.0f} | "
              f"{s['peak_mb'] / max(r['peak_mb'], 1e-9):.2f}x | {par} |")
    if a.rounds > 1:
        print()
        for config, s, r, _ in rows:
            print(f"{config}: segany runs {', '.join(f'{t:.2f}' for t in s['times'])} s; reference runs {', '.join(f'{t:.2f}' for t in r['times'])} s")


if __name__ == "__main__":
    main()
