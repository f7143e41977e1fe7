"""Throughput of ``segany annotate``: single process vs Ray workers, on the same images.

    python benchmarks/bench_engine.py --images 6 --workers 2 --points-per-side 8
    python benchmarks/bench_engine.py --checkpoint runs/r1/best.safetensors --points-per-side 32

Model: ``--checkpoint`` if given, else the bundled tiny model (segany/weights/tiny.safetensors) if
present, else the tiny config with random weights (same compute per image; the mask count, and so
the post-processing time, differs). Images: generated 640x480 scenes of flat-coloured shapes on
noise. Every configuration writes to a fresh OUTDIR; the times are wall clock for the whole job
(model loading and, for Ray, starting the actors included) and the mean time per image inside a
worker (from the manifest); the outputs of the Ray run are checked to be identical to the
single-process run's.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def make_images(root: str, n: int, seed: int = 0) -> None:
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        a = (rng.integers(0, 40, (480, 640, 3)) + rng.integers(0, 200, 3)).clip(0, 255).astype(np.uint8)
        for _ in range(8):
            c = tuple(int(v) for v in rng.integers(0, 256, 3))
            x, y = int(rng.integers(0, 600)), int(rng.integers(0, 440))
            if rng.random() < 0.5:
                cv2.rectangle(a, (x, y), (x + int(rng.integers(20, 200)), y + int(rng.integers(20, 200))), c, -1)
            else:
                cv2.ellipse(a, (x, y), (int(rng.integers(10, 100)), int(rng.integers(10, 100))), float(rng.uniform(0, 180)), 0, 360, c, -1)
        Image.fromarray(a).save(os.path.join(root, f"scene_{i:04d}.jpg"), quality=92)


def model_file(tmp: str, checkpoint: str | None) -> tuple:
    if checkpoint:
        return checkpoint, "given checkpoint"
    from segany.train.export import TINY_CONFIG, bundled_path, save_safetensors

    path = bundled_path("tiny")
    if os.path.exists(path):
        try:
            from segany.checkpoints import load_model

            snap = os.path.join(tmp, "tiny.safetensors")  # a snapshot: the bundled file may be retrained meanwhile
            shutil.copyfile(path, snap)
            load_model(snap)
            return snap, "bundled tiny weights"
        except Exception as e:  # noqa: BLE001 - e.g. still being written
            print(f"bundled weights unusable ({e}); using random weights", file=sys.stderr)
    from segany.modeling.build import build_sam, randomize_

    m = build_sam(TINY_CONFIG)
    randomize_(m, seed=1, std=0.1)
    out = os.path.join(tmp, "tiny_random.safetensors")
    save_safetensors(m, out, half=False)
    return out, "tiny config, random weights"


def outputs(d: str) -> dict:
    res = {}
    for dp, _, fs in os.walk(d):
        for f in fs:
            if f.endswith(".json") and f not in ("summary.json", "job.json"):
                with open(os.path.join(dp, f), "rb") as fh:
                    res[os.path.relpath(os.path.join(dp, f), d)] = fh.read()
    return res


def image_seconds(outdir: str, n: int, wall: float) -> float:
    """Sum of the per-image seconds recorded in the manifest (time spent inside a worker on the
    images: reading, segmenting, writing; no model loading, no scheduling)."""
    from segany.engine.manifest import read_manifest

    secs = [r["seconds"] for r in read_manifest(os.path.join(outdir, "manifest.jsonl")) if r.get("seconds")]
    return sum(secs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--points-per-side", type=int, default=8)
    ap.add_argument("--ray-address", default=None, help="an existing cluster (default: a local Ray with --workers CPUs)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args()

    from segany.engine import EngineOptions, run_job

    tmp = tempfile.mkdtemp(prefix="bench_engine_")
    src = os.path.join(tmp, "images")
    make_images(src, a.images)
    ckpt, what = model_file(tmp, a.checkpoint)
    amg = {"points_per_side": a.points_per_side}
    ncpu = os.cpu_count() or 1
    print(f"{a.images} images 640x480, model: {what} ({ckpt}), points_per_side {a.points_per_side}, {ncpu} CPUs visible")
    results = []

    def record(name: str, s: dict, wall: float, outdir: str, workers: int) -> None:
        busy = image_seconds(outdir, a.images, wall)
        r = {"config": name, "images": a.images, "wall_s": round(wall, 2), "images_per_s": round(a.images / wall, 3),
             "per_image_s": round(busy / a.images, 3), "ok": s["ok"], "masks": s["masks"], "workers": workers}
        results.append(r)
        print(f"{name:<34} wall {wall:7.2f} s  {r['images_per_s']:6.3f} images/s (whole job)   "
              f"{r['per_image_s']:.3f} s per image in a worker   masks {s['masks']}")

    ref_out = None
    for name, threads in (("single process, 1 thread", 1), (f"single process, {ncpu} threads", ncpu)):
        out = os.path.join(tmp, f"single_{threads}")
        t0 = time.perf_counter()
        s = run_job([src], out, EngineOptions(checkpoint=ckpt, amg=amg, threads=threads), progress=False, log=lambda m: None)
        record(name, s, time.perf_counter() - t0, out, 1)
        if ref_out is None:
            ref_out = outputs(out)
        elif outputs(out) != ref_out:
            print("  note: outputs differ from the 1-thread run (float rounding with more threads)")

    import ray

    t0 = time.perf_counter()
    if a.ray_address:
        ray.init(address=a.ray_address, log_to_driver=False)
    else:
        ray.init(num_cpus=a.workers, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t0
    print(f"ray.init: {ray_start:.2f} s (not counted below)")
    out = os.path.join(tmp, "ray")
    t0 = time.perf_counter()
    s = run_job([src], out, EngineOptions(checkpoint=ckpt, amg=amg, threads=1), progress=False, use_ray=True,
                workers=a.workers, cpus_per_worker=1, log=lambda m: None)
    record(f"ray, {a.workers} workers x 1 CPU", s, time.perf_counter() - t0, out, a.workers)
    same = outputs(out) == ref_out
    print(f"ray outputs identical to the single-process (1 thread) run: {same}")
    ray.shutdown()
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"results": results, "ray_init_s": round(ray_start, 2), "ray_outputs_identical": same,
                       "model": what, "cpus": ncpu}, f, indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
