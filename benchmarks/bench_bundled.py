"""The bundled ``tiny`` model on real photos, per backend: embedding (``set_image``) and one click.

No reference: the official package has no EfficientNet encoder. The rows are segany's backends
for this model, timed in one process on the same photos, each backend over all photos in turn, the order
rotating per round (machine noise hits all):

* ``torch``: the default (at inference the backbone's BatchNorms folded into its convolutions,
  ReLU6 inside oneDNN's convolution: ``segany.modeling.efficientnet``);
* ``torch, module path``: the same model through its modules as written (what training runs, and
  what inference ran before the folding), for the ratio;
* ``onnxruntime``: ``segany.onnx.OnnxPredictor`` on an export made first (float32, same masks).

A click is ``predict_best`` (the best candidate at the photo's size); the embedding is the whole
``set_image`` (resize, normalisation, encoder, the decoder's per-image cache).

    python benchmarks/bench_bundled.py                # 5 photos of ../shared/data, 3 rounds
    python benchmarks/bench_bundled.py --photos 10 --rounds 5
"""
from __future__ import annotations

import argparse
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _photos(n: int) -> list:
    from PIL import Image

    paths = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "*" / "images" / "*.jpg")))[::97][:n]
    if not paths:
        raise SystemExit("bench_bundled needs the photos of ../shared/data")
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="passes over the photos (embeddings per photo and backend)")
    ap.add_argument("--clicks", type=int, default=5, help="clicks per photo and round")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import torch

    import segany
    from segany.modeling.efficientnet import EfficientNetEncoder
    from segany.predictor import SamPredictor

    torch.set_num_threads(a.threads)
    model = segany.load_model("tiny").eval()
    modules = segany.load_model("tiny").eval()
    enc = modules.image_encoder
    assert isinstance(enc, EfficientNetEncoder)
    enc._folded_ok = lambda x: False  # this copy always runs its modules
    predictors = {"torch": SamPredictor(model), "torch, module path": SamPredictor(modules)}
    try:
        from segany.onnx import OnnxPredictor, export_onnx

        tmp = tempfile.TemporaryDirectory(prefix="segany-bench-bundled-")
        export_onnx(model, tmp.name, postprocess=False)
        predictors["onnxruntime"] = OnnxPredictor(model, tmp.name, threads=a.threads)
    except ImportError:
        print("onnx/onnxruntime not installed: no onnxruntime row", file=sys.stderr)
    photos = _photos(a.photos)
    rng = np.random.default_rng(0)
    embed = {k: [] for k in predictors}
    click = {k: [] for k in predictors}
    agree = []
    for p in predictors.values():  # warm-up: first-call allocations, oneDNN primitive caches
        p.set_image(photos[0])
        p.predict_best(np.array([[10.0, 10.0]]), np.array([1]))
    points = [rng.uniform((0, 0), (img.shape[1], img.shape[0]), size=(a.clicks, 1, 2)) for img in photos]
    names = list(predictors)
    for r in range(a.rounds):
        # A backend takes all photos in a row, as one session would: interleaving backends per
        # photo made torch's set_image ~70 ms slower (the others' memory traffic and allocations
        # between its calls: fresh pages to fault in), which no single-backend user sees.
        # The order rotates per round, so slow stretches of the machine hit every backend.
        for name in names[r % len(names):] + names[: r % len(names)]:
            p = predictors[name]
            for i, img in enumerate(photos):
                t = time.perf_counter()
                p.set_image(img)
                embed[name].append(time.perf_counter() - t)
                for pt in points[i]:
                    t = time.perf_counter()
                    p.predict_best(pt, np.array([1]))
                    click[name].append(time.perf_counter() - t)
    for i, img in enumerate(photos):  # the backends' best masks for each photo's first click
        masks = {}
        for name, p in predictors.items():
            p.set_image(img)
            masks[name] = p.predict_best(points[i][0], np.array([1]))[0][0]
        base = masks["torch, module path"]
        for name, m in masks.items():
            if name != "torch, module path":
                u = (m | base).sum()
                agree.append(1.0 if u == 0 else float((m & base).sum() / u))
    ms = lambda v: statistics.median(v) * 1e3  # noqa: E731
    base_e, base_c = ms(embed["torch, module path"]), ms(click["torch, module path"])
    sizes = sorted({f"{im.shape[1]}x{im.shape[0]}" for im in photos})
    print(f"bundled tiny, torch {torch.__version__}, {a.threads} threads, {len(photos)} photos ({', '.join(sizes)}), "
          f"{a.rounds} rounds x {a.clicks} clicks, medians; each round runs the backends one after another, all photos each\n")
    print("| backend | set_image (ms) | vs module path | one click, predict_best (ms) | vs module path |")
    print("|---|---:|---:|---:|---:|")
    for name in predictors:
        e, c = ms(embed[name]), ms(click[name])
        print(f"| {name} | {e:.1f} | {e / base_e:.2f}x | {c:.2f} | {c / base_c:.2f}x |")
    print(f"\nbest-mask IoU against the module path: min {min(agree):.4f} over {len(agree)} photos x backends")


if __name__ == "__main__":
    main()
