"""Where one click's time goes in segany (no reference: the pieces are segany's own).

Times, each on its own (median of ``--clicks`` calls, after warm-up), on one image embedding:

* ``predict``: the whole ``SamPredictor.predict`` (validation, prompt encoder, decoder, masks to
  the original size, to numpy); ``predict_best``: the same for the best candidate alone;
* ``prompt encoder``: points -> sparse embeddings;
* ``decoder``: the mask decoder on the cached per-image state (``predict_masks_fast``), of which
  ``two-way transformer`` (both layers and the final attention), the IoU head and hypernetwork
  MLPs, and ``output upscaling`` (first transposed conv on the factored tokens, then the native
  tail, or PyTorch without it);
* ``masks to original size``: the low-res logits to bool masks at the image size;
* ``after a 30 ms pause``: ``predict_best`` and one small two-thread PyTorch operation with a
  30 ms sleep before each call, as ``bench_speed`` times a click (a user's click comes after a
  pause): what a pause costs on this machine (the small operation's extra is waking the idle
  OpenMP thread; a click's was not, see docs/performance.md, fifteenth session).

Pieces timed apart run with warmer caches than inside one click (where each piece first reads
weights and maps the previous one evicted), so they sum to less than ``predict``.

    python benchmarks/bench_click_split.py                      # random vit_b weights, 1500x2000
    python benchmarks/bench_click_split.py --model tiny --size 600x900

``--ab-token-kernels``: instead, ``predict_best`` with the decoder's native token kernels on
and off (``SEGANY_TOKEN_KERNELS``), alternating, back to back and after a 30 ms pause (a user's
click comes after one; see bench_speed.SETTLE), with the ratio on/off.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _median_ms(fn, n: int, warmup: int = 3, pause: float = 0.0) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        time.sleep(pause)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def _image(h: int, w: int) -> np.ndarray:
    photos = sorted((ROOT.parent / "shared" / "data").glob("*/images/*.jpg"))
    if photos:
        from PIL import Image

        return np.asarray(Image.open(photos[0]).convert("RGB").resize((w, h), Image.BILINEAR))
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b", help="vit_b/vit_l/vit_h/vit_t (random weights) or tiny (bundled, trained)")
    ap.add_argument("--size", default="1500x2000", help="HxW of the image")
    ap.add_argument("--clicks", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ab-token-kernels", action="store_true", help="A/B the native token kernels instead (see above)")
    a = ap.parse_args()

    import torch

    import segany
    from segany import kernels
    from segany.modeling import fast_decoder as fd
    from segany.modeling.build import randomize_
    from segany.predictor import SamPredictor

    torch.set_num_threads(a.threads)
    if a.model == "tiny":
        sam = segany.load_model("tiny").eval()
    else:
        sam = randomize_(segany.sam_model_registry[a.model](), seed=0).eval()
    h, w = (int(v) for v in a.size.split("x"))
    img = _image(h, w)
    p = SamPredictor(sam)
    p.set_image(img)
    point, label = np.array([[w / 2, h / 2]]), np.array([1])
    coords = torch.as_tensor(p.transform.apply_coords(point.astype(np.float64), p.original_size), dtype=torch.float)[None]
    labels = torch.ones(1, 1, dtype=torch.int)
    pe, dec = sam.prompt_encoder, sam.mask_decoder
    cache = p._get_decoder_cache()
    if a.ab_token_kernels:
        _ab_token_kernels(p, point, label, a.clicks, h, w, a.model)
        return

    with torch.no_grad():
        sparse, _ = pe(points=(coords, labels), boxes=None, masks=None)
        tokens0 = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens0[None], sparse), dim=1)
        idx = range(dec.num_mask_tokens)[1:]  # the 3 multimask outputs, as predict_masks_fast runs them
        used = torch.tensor([0] + [1 + j for j in idx])
        queries, upscale_in = fd._transformer_cached(dec, tokens, cache, used)
        hyper_in = torch.stack([dec.output_hypernetworks_mlps[j](queries[:, 1 + i, :]) for i, j in enumerate(idx)], dim=1)
        low_res, _ = fd.predict_masks_fast(dec, sparse, cache)

        def in_a_call(fn):
            # the decoder's pieces with the kernel choices predict_masks_fast makes for its call
            def run():
                fd._per_thread.native = fd._native_ok_now(sparse)
                fd._per_thread.tokens = fd._per_thread.native and kernels.tokens_usable()
                try:
                    return fn()
                finally:
                    fd._per_thread.native = fd._per_thread.tokens = None
            return run

        best = lambda: p.predict_best(point_coords=point, point_labels=label)  # noqa: E731
        rows = [
            ("predict (3 masks at the original size, as numpy)", lambda: p.predict(point_coords=point, point_labels=label)),
            ("predict_best (the best mask alone at the original size)", best),
            ("prompt encoder", lambda: pe(points=(coords, labels), boxes=None, masks=None)),
            ("decoder (3 low-res masks + IoU)", lambda: fd.predict_masks_fast(dec, sparse, cache)),
            ("  two-way transformer", in_a_call(lambda: fd._transformer_cached(dec, tokens, cache, used))),
            ("  IoU head + hypernetwork MLPs", in_a_call(lambda: (fd._mlp_head(dec.iou_prediction_head, queries[:, 0, :]),
                                                                  [fd._mlp_head(dec.output_hypernetworks_mlps[j], queries[:, 1 + i, :]) for i, j in enumerate(idx)]))),
            ("  output upscaling", in_a_call(lambda: fd._upscale_masks(dec, upscale_in, hyper_in, *cache.hw))),
            ("masks to original size (3, thresholded)", lambda: p.upscale(low_res, threshold=sam.mask_threshold)),
            ("masks to original size (best one only)", lambda: p.upscale(low_res[:, :1], threshold=sam.mask_threshold)),
        ]
        results = [(name, _median_ms(fn, a.clicks)) for name, fn in rows]
        x = torch.randn(1 << 16)
        y = torch.empty_like(x)
        two_threads = lambda: torch.mul(x, 2.0, out=y)  # noqa: E731 (64K floats: split over the threads)
        results += [
            ("predict_best after a 30 ms pause", _median_ms(best, a.clicks, pause=0.03)),
            ("a two-thread PyTorch operation (64K floats), back to back", _median_ms(two_threads, a.clicks)),
            ("the same after a 30 ms pause", _median_ms(two_threads, a.clicks, pause=0.03)),
        ]

    print(f"{a.model} ({'bundled' if a.model == 'tiny' else 'random weights'}), image {h}x{w}, embedding "
          f"{cache.hw[0]}x{cache.hw[1]}, torch {torch.__version__}, {a.threads} threads, native kernels "
          f"{'on' if kernels.available() and kernels.decoder_available() else 'off'}; median of {a.clicks} each\n")
    print("| piece | ms |\n|---|---:|")
    for name, ms in results:
        print(f"| {name} | {ms:.2f} |")


def _ab_token_kernels(p, point, label, clicks: int, h: int, w: int, model: str) -> None:
    import os

    times = {(mode, pause): [] for mode in ("on", "off") for pause in (0.0, 0.03)}
    for i in range(clicks):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            os.environ["SEGANY_TOKEN_KERNELS"] = "1" if mode == "on" else "0"
            p.predict_best(point_coords=point, point_labels=label)  # (the previous mode's state out of the way)
            for pause in (0.0, 0.03):
                time.sleep(pause)
                t = time.perf_counter()
                p.predict_best(point_coords=point, point_labels=label)
                times[(mode, pause)].append(time.perf_counter() - t)
    os.environ.pop("SEGANY_TOKEN_KERNELS")
    print(f"{model}, image {h}x{w}, predict_best, token kernels on/off alternating, median of {clicks} each\n")
    print("| before the click | on (ms) | off (ms) | on / off |\n|---|---:|---:|---:|")
    for pause, label_ in ((0.0, "the same click (back to back)"), (0.03, "a 30 ms pause")):
        on, off = (statistics.median(times[(m, pause)]) * 1e3 for m in ("on", "off"))
        print(f"| {label_} | {on:.2f} | {off:.2f} | {on / off:.3f} |")


if __name__ == "__main__":
    main()
