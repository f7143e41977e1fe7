"""Speed and memory of segany vs the official ``segment_anything`` 1.0 on this machine, same
weights, one markdown table.

Every row runs in its own subprocess; rows that compare timings run segany and the reference
alternately, call by call (machine noise hits both), and report medians and their ratio. The
reference runs in a process of its own beside the row's, driven over a pipe and timed there
(:class:`_Reference`), with the environment its users have: without the huge-page allocator
that ``import segany`` turns on for its process (``--reference-huge-pages`` gives it that too;
``--reference-in-process``, the way this script ran before 2026-12-05, shares segany's process
and so its allocator). Click rows pause 30 ms before each timed call (:data:`SETTLE`).
Weights are random (no official checkpoint offline), except in click_bundled. Timings depend on
weight values in two ways: denormal floats slow Intel cores many-fold (see bench_everything.py;
these std-0.05 weights give none that matter: the click with flush-to-zero 32.2 vs 36.7 ms,
noise), and segany's thresholded upscale skips blocks of the image that a mask's low-res logits
decide, which smooth masks of a trained model have and the ragged masks of random weights mostly
do not (hence the click_bundled row).

    python benchmarks/bench_speed.py                       # vit_b, 600x900 photo-sized input
    python benchmarks/bench_speed.py --rows gemm,encoder,click --repeats 5
    python benchmarks/bench_speed.py --rows rss --rss-model vit_h
    python benchmarks/bench_speed.py --agreement 20        # int8 vs float32 mask IoU on photos
    python benchmarks/bench_speed.py --rows click,click_bundled --size 1500x2000
    python benchmarks/bench_speed.py --rows encoder --reference-huge-pages   # the reference with segany's allocator
    python benchmarks/bench_speed.py --isa avx2            # an AVX2 machine, emulated on an AVX-512 one

``--isa avx2`` holds both sides to AVX2 on an AVX-512 machine (the brief's users have AVX2
CPUs; the development VM has AVX-512): PyTorch's kernels (``ATEN_CPU_CAPABILITY``), MKL
(``MKL_ENABLE_INSTRUCTIONS``) and oneDNN (``DNNL_MAX_CPU_ISA``) for both, segany's native
kernels built with ``-march=haswell`` (``SEGANY_KERNEL_MARCH``). An emulation: the same cores,
caches and clock, with AVX2's 16 vector registers and 8 lanes. PyTorch's int8 layers are held
there too (fbgemm: ``FBGEMM_ENABLE_INSTRUCTIONS``; segany's int8 mode then picks fbgemm and float32
attention, as on an AVX2 CPU: see ``segany.quantize``); onnxruntime chooses its kernels from the
CPU itself and is not held back: the table marks its rows.

Rows: gemm (machine float32 GEMM rate), encoder (fp32), encoder_int8 (PyTorch dynamic int8),
encoder_ort / encoder_ort_int8 (onnxruntime; needs an export, slow the first time), click (one
click -> the best mask at the original size incl. prompt encoding and postprocessing: segany's
predict_best with return_low_res=False, and beside it the same with the low-res logits and
segany's predict + argmax, the reference's calls), click_refine (a
second click: two points and the previous logits as mask_input, one mask), click_bundled
(the same with the bundled trained model on 5 photos of ../shared/data), rss (peak RSS of
set_image + one click, separate processes), everything (segany.automatic vs the reference's
SamAutomaticMaskGenerator.generate on a fixed embedding, if segany/automatic.py exists).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ARGS = None  # the parsed command line (set in main)
ENCODER_TFLOP = {"vit_b": 0.0, "vit_l": 0.0, "vit_h": 0.0}  # filled by _encoder_flops


def _image(h=None, w=None):
    import numpy as np

    if h is None:
        h, w = (int(v) for v in os.environ.get("SEGANY_BENCH_SIZE", "600x900").split("x"))

    photos = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "*" / "images" / "*.jpg")))
    if photos:
        from PIL import Image

        img = Image.open(photos[0]).convert("RGB").resize((w, h), Image.BILINEAR)
        return np.asarray(img)
    return np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _models(name, seed=1):
    """(reference module, segany model, reference model) with the same random weights; the
    reference model in a process of its own (a :class:`_Reference`) unless ``--reference-in-process``."""
    import segany
    from reference import load_reference
    from segany.modeling.build import randomize_

    sa, mobile_sam = load_reference()
    if name == "vit_t":  # MobileSAM's TinyViT: the reference is the mobile_sam package
        sa = mobile_sam
    ours = randomize_(segany.sam_model_registry[name](), seed=seed).eval()
    if ARGS.reference_in_process:
        ref = sa.sam_model_registry[name]()
        ref.load_state_dict(ours.state_dict())
        return sa, ours, ref.eval()
    return sa, ours, _Reference({"build": "registry", "model": name}, ours.state_dict())


# Whether the user set PyTorch's huge-page switch before this script ran (``import segany`` sets
# it for its own process, and child processes would inherit it).
_THP_PRESET = os.environ.get("THP_MEM_ALLOC_ENABLE")


class _Measured(float):
    """Seconds a call took, measured where it ran (in a :class:`_Reference`'s process)."""


def _took(obj):
    """What an alternated call returns: the time its own process measured where ``obj`` is a
    :class:`_Reference` (else None: :func:`_alternate` measures it)."""
    return obj.seconds if isinstance(obj, _Reference) else None


class _Reference:
    """The reference model in a process of its own, with the environment its users have.

    ``import segany`` turns on PyTorch's huge-page allocator (``THP_MEM_ALLOC_ENABLE``, see
    ``segany.allocator``) for its whole process. A reference sharing segany's process ran faster
    with it than anyone running the official package does (vit_b encoder, 2026-12-05: 8.6-9.7 s
    with it, 9.5-12.2 s without, separate processes alternating), which made segany's ratios look
    worse than what a user switching gets. Here the variable is taken out of the child's
    environment unless it was set before this script started (``--reference-huge-pages`` keeps it).

    Calls go over a pipe and return their result; ``seconds`` is the last call's time measured in
    the child around the call alone (no pickling), so rows still alternate call by call."""

    def __init__(self, build: dict, state_dict=None):
        import multiprocessing as mp
        import tempfile

        import torch

        self.seconds = None
        weights = None
        if state_dict is not None:
            fd, weights = tempfile.mkstemp(suffix=".pt")
            os.close(fd)
            torch.save(state_dict, weights)
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        saved = dict(os.environ)
        if not ARGS.reference_huge_pages and _THP_PRESET is None:
            os.environ.pop("THP_MEM_ALLOC_ENABLE", None)
            os.environ["SEGANY_ALLOCATOR"] = "default"  # (where the child imports segany to build a model)
        try:
            self._proc = ctx.Process(target=_reference_main, args=(child, build, weights, torch.get_num_threads()), daemon=True)
            self._proc.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        try:
            self._reply()  # built
        finally:
            if weights:
                os.unlink(weights)

    def _reply(self):
        ok, value, seconds = pickle.loads(self._conn.recv_bytes())
        if not ok:
            raise RuntimeError(f"reference process: {value}")
        self.seconds = _Measured(seconds)
        return value

    def call(self, method: str, *args, **kw):
        # Plain pickle, not the connection's own: ``import torch`` registers reducers with it that
        # move a tensor's storage into shared memory to send it, which freed the memory under
        # any numpy view of the tensor (the onnxruntime rows' input: a crash in onnxruntime)
        self._conn.send_bytes(pickle.dumps((method, args, kw)))
        return self._reply()

    # the reference API the rows use
    def image_encoder(self, x):
        return self.call("encode", x)

    def predict(self, **kw):
        return self.call("predict", **kw)


def _reference_main(conn, build, weights, threads):
    """The child of :class:`_Reference`: builds the reference model, then serves calls."""
    import torch

    torch.set_num_threads(threads)
    torch.set_grad_enabled(False)
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from reference import load_reference

    sa, mobile_sam = load_reference()
    try:
        if build["build"] == "registry":
            mod = mobile_sam if build["model"] == "vit_t" else sa
            model = mod.sam_model_registry[build["model"]]()
        elif build["build"] == "config":
            from core_helpers import reference_model

            model = reference_model(build["config"])
        else:  # "bundled": the reference's prompt encoder and decoder with the bundled model's weights
            import segany
            from reference import reference_decoder_model
            from segany.checkpoints import safetensors_config

            model = reference_decoder_model(sa, segany.load_model("tiny"), safetensors_config(ROOT / "segany" / "weights" / "tiny.safetensors"))
        if weights:
            model.load_state_dict(torch.load(weights, weights_only=True))
        model.eval()
        state = {"predictor": sa.SamPredictor(model), "generator": None}
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send_bytes(pickle.dumps((False, repr(e), 0.0)))
        return
    conn.send_bytes(pickle.dumps((True, None, 0.0)))

    def set_embedding(features, original_size, input_size):
        p = state["predictor"]
        p.reset_image()
        p.original_size, p.input_size = tuple(original_size), tuple(input_size)
        p.features = features
        p.is_image_set = True

    def generate(img, **kw):
        if state["generator"] is None:
            state["generator"] = sa.SamAutomaticMaskGenerator(model, **kw)
        return state["generator"].generate(img)

    methods = {"encode": lambda x: model.image_encoder(x), "predict": lambda **kw: state["predictor"].predict(**kw),
               "set_embedding": set_embedding, "generate": generate}
    while True:
        try:
            method, args, kw = pickle.loads(conn.recv_bytes())
        except EOFError:
            return
        try:
            t = time.perf_counter()
            out = methods[method](*args, **kw)
            reply = (True, out, time.perf_counter() - t)
        except Exception as e:  # noqa: BLE001
            reply = (False, repr(e), 0.0)
        conn.send_bytes(pickle.dumps(reply))


def _alternate(fns, repeats, warmup=1, settle=0.0):
    """fns: {label: callable}; alternates them; returns {label: [seconds]}. The order rotates
    every repeat: a call right after another of the same code finds its weights and maps still
    in the cache, one right after the reference's finds them evicted. A callable may return the
    seconds its own process measured (:class:`_Measured`); ``settle`` seconds pass before each
    timed call (see :data:`SETTLE`)."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    out = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(repeats):
        for k, f in items[i % len(items):] + items[: i % len(items)]:
            if settle:
                time.sleep(settle)
            t = time.perf_counter()
            r = f()
            out[k].append(r if isinstance(r, _Measured) else time.perf_counter() - t)
    return out


# With the reference in a process of its own, the process that just ran a call keeps its OpenMP
# threads spinning ~8 ms after it (libgomp's default wait policy, measured on this VM), on the
# same two cores the other process's call then runs on (segany's click, two runs each: 17.8 ms
# back to back, 16.6-16.9 ms after the pause). So timed calls start after this pause, as an
# interactive click does (a user's pause is far longer; in one process, a click after 30 ms of
# sleep read 17.3 ms against 16.0 back to back: what ran before it matters more than how long
# ago). The encoder's seconds-long calls do not need it.
SETTLE = 0.03


def _encoder_flops(model) -> float:
    """Multiply-adds x2 of the image encoder at its input size, counted with torch's FLOP counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    S = model.image_encoder.img_size
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.image_encoder(torch.zeros(1, 3, S, S))
    return float(fc.get_total_flops())


# ----------------------------------------------------------------------------- workers
def w_gemm(a):
    import torch

    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    ts = _alternate({"mm": lambda: torch.mm(x, y)}, 10)["mm"]
    return {"gflops": 2 * n**3 / min(ts) / 1e9, "gflops_median": 2 * n**3 / statistics.median(ts) / 1e9}


def w_encoder(a):
    import torch

    sa, ours, ref = _models(a.model)
    S = ours.image_encoder.img_size
    x = ours.preprocess(torch.randn(1, 3, S, S) * 50 + 120)
    variant = a.variant
    if variant == "int8":
        from segany.quantize import quantize_model

        fast = quantize_model(ours).image_encoder
    elif variant in ("ort", "ort_int8"):
        from segany.onnx import _session, export_onnx
        from segany.quantize import quantize_onnx

        d = Path(a.onnx_dir) / a.model
        if not (d / "encoder.onnx").exists():
            export_onnx(ours, d, postprocess=False)
        path = quantize_onnx(d, parts=("encoder",))["encoder"] if variant == "ort_int8" else d / "encoder.onnx"
        sess = _session(path)
        xn = x.numpy()
        fast = lambda _x: torch.from_numpy(sess.run(None, {"image": xn})[0])  # noqa: E731
    else:
        fast = ours.image_encoder
    res = {}
    outs = {}

    def timed(key, f):
        def run():
            outs[key] = f(x)
            return _took(ref) if key == "ref" else None
        return run

    with torch.no_grad():
        # no warm-up run: the first runs are timed too (and give the parity numbers)
        ts = _alternate({"ours": timed("ours", fast), "ref": timed("ref", ref.image_encoder)}, a.repeats, warmup=0)
    ys, yr = outs["ours"], outs["ref"]
    res["max_abs_diff"] = float((ys - yr).abs().max())
    res["ref_abs_max"] = float(yr.abs().max())
    res["cos"] = float(torch.nn.functional.cosine_similarity(ys.flatten(), yr.flatten(), dim=0))
    res.update({k: statistics.median(v) for k, v in ts.items()})
    res["flops"] = _encoder_flops(ours)
    return res


def _share_embedding(p1, p2):
    """Gives the reference predictor ``p2`` segany predictor ``p1``'s embedding (the reference's
    own encoder would be timed otherwise)."""
    if isinstance(p2, _Reference):
        p2.call("set_embedding", p1.features.clone(), p1.original_size, p1.input_size)
        return
    p2.reset_image()
    p2.original_size = tuple(p1.original_size)
    p2.input_size = tuple(p1.input_size)
    p2.features = p1.features.clone()
    p2.is_image_set = True


def _time_clicks(p1, p2, img, n_clicks, repeats, seed=0):
    """Alternating best-mask clicks (one random foreground point each) on the image both
    predictors hold: seconds per click {"ours": [...], "ours_low_res": [...], "ours_all": [...],
    "ref": [...]}, the smallest IoU between their masks and the largest score difference over the
    first 5 clicks.

    The reference has one way to it, ``predict`` (three candidates at the original size) and
    ``argmax``: "ref". segany's call for the best mask at the original size is ``predict_best``
    (the IoU head picks the candidate before the upscaling) with ``return_low_res=False`` (the
    mask and its score; the mask's part in the input's padding is not computed): "ours"; the
    same with the low-res logits a refinement click feeds back: "ours_low_res"; its ``predict``
    + ``argmax``, the reference's exact calls: "ours_all"."""
    import numpy as np

    rng = np.random.default_rng(seed)
    clicks = [np.array([[rng.uniform(0, img.shape[1]), rng.uniform(0, img.shape[0])]]) for _ in range(n_clicks)]
    lab = np.array([1])
    its = {k: iter(clicks * (repeats + 1)) for k in ("ours", "ours_low_res", "ours_all", "ref")}

    def best(p, it):
        m, s, _ = p.predict(point_coords=next(it), point_labels=lab)
        m[int(np.argmax(s))]
        return _took(p)

    def best_only(p, it, low_res):
        return p.predict_best(point_coords=next(it), point_labels=lab, return_low_res=low_res)[0][0]

    ts = _alternate({"ours": lambda: best_only(p1, its["ours"], False), "ours_low_res": lambda: best_only(p1, its["ours_low_res"], True),
                     "ours_all": lambda: best(p1, its["ours_all"]), "ref": lambda: best(p2, its["ref"])}, repeats, warmup=1,
                    settle=SETTLE if isinstance(p2, _Reference) else 0.0)
    ious, sdiff = [], 0.0
    for c in clicks[:5]:
        m1, s1, _ = p1.predict(point_coords=c, point_labels=lab)
        m2, s2, _ = p2.predict(point_coords=c, point_labels=lab)
        mb, sb, _ = p1.predict_best(point_coords=c, point_labels=lab)
        mo, so, _ = p1.predict_best(point_coords=c, point_labels=lab, return_low_res=False)
        m1, s1 = np.concatenate([m1, mb, mo]), np.concatenate([s1, sb, so])
        m2, s2 = np.concatenate([m2, m2[int(np.argmax(s2))][None].repeat(2, 0)]), np.concatenate([s2, [s2.max()] * 2])
        ious.append(min((1.0 if (x | y).sum() == 0 else (x & y).sum() / (x | y).sum()) for x, y in zip(m1, m2)))
        sdiff = max(sdiff, float(np.abs(s1 - s2).max()))
    return ts, float(min(ious)), sdiff


def _click_row(a, timer):
    """A click row on random weights: ``timer(p1, p2, img, n_clicks, repeats)`` as _time_clicks."""
    from segany.predictor import SamPredictor

    sa, ours, ref = _models(a.model)
    img = _image()
    p1, p2 = SamPredictor(ours), ref if isinstance(ref, _Reference) else sa.SamPredictor(ref)
    p1.set_image(img)
    _share_embedding(p1, p2)
    ts, iou, sdiff = timer(p1, p2, img, a.repeats * 4, a.repeats * 3)
    res = {k: statistics.median(v) for k, v in ts.items()}
    res.update({"min_mask_iou": iou, "max_score_diff": sdiff, "size": list(img.shape[:2])})
    return res


def w_click(a):
    return _click_row(a, _time_clicks)


def _time_refinements(p1, p2, img, n_clicks, repeats, seed=0):
    """Alternating refinement clicks, as an interactive tool sends the second and later ones and
    the official notebook shows them: two points and the previous click's best low-res logits
    as ``mask_input``, ``multimask_output=False``, one mask at the original size. The previous
    logits are the reference's for both. Returns seconds per click {"ours": [...], "ref": [...]},
    the smallest mask IoU and the largest score difference over the first 5 clicks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    H, W = img.shape[:2]
    prompts = []
    for _ in range(n_clicks):
        pts = rng.uniform((0, 0), (W, H), size=(2, 2))
        m, s, low = p2.predict(point_coords=pts[:1], point_labels=np.array([1]))
        prompts.append(dict(point_coords=pts, point_labels=np.array([1, 0]), mask_input=low[int(np.argmax(s))][None],
                            multimask_output=False))
    its = {k: iter(prompts * (repeats + 1)) for k in ("ours", "ref")}

    def ref_click():
        p2.predict(**next(its["ref"]))
        return _took(p2)

    ts = _alternate({"ours": lambda: p1.predict(**next(its["ours"])), "ref": ref_click},
                    repeats, warmup=1, settle=SETTLE if isinstance(p2, _Reference) else 0.0)
    ious, sdiff = [], 0.0
    for kw in prompts[:5]:
        m1, s1, _ = p1.predict(**kw)
        m2, s2, _ = p2.predict(**kw)
        x, y = m1[0], m2[0]
        ious.append(1.0 if (x | y).sum() == 0 else (x & y).sum() / (x | y).sum())
        sdiff = max(sdiff, float(np.abs(s1 - s2).max()))
    return ts, float(min(ious)), sdiff


def w_click_refine(a):
    return _click_row(a, _time_refinements)


def w_click_bundled(a):
    """The click row with the bundled trained model on real photos (resized to ``--size``): its
    masks are smooth where random weights give ragged ones, which changes what the postprocess
    costs. The reference runs its own prompt encoder and mask decoder with the same weights."""
    import numpy as np
    from PIL import Image

    import segany
    from reference import load_reference, reference_decoder_model
    from segany.checkpoints import safetensors_config
    from segany.predictor import SamPredictor

    sa, _ = load_reference()
    ours = segany.load_model("tiny").eval()
    if ARGS.reference_in_process:
        ref = reference_decoder_model(sa, ours, safetensors_config(ROOT / "segany" / "weights" / "tiny.safetensors"))
    else:
        ref = _Reference({"build": "bundled"})
    h, w = (int(v) for v in a.size.split("x"))
    photos = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "*" / "images" / "*.jpg")))[::97][:5]
    if not photos:
        raise SystemExit("click_bundled needs the photos of ../shared/data")
    p1, p2 = SamPredictor(ours), ref if isinstance(ref, _Reference) else sa.SamPredictor(ref)
    ts = {"ours": [], "ours_low_res": [], "ours_all": [], "ref": []}
    ious, sdiff = [], 0.0
    for i, path in enumerate(photos):
        img = np.asarray(Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR))
        p1.set_image(img)
        _share_embedding(p1, p2)
        t, iou, sd = _time_clicks(p1, p2, img, 4, a.repeats * 2, seed=i)
        for k in ts:
            ts[k] += t[k]
        ious.append(iou)
        sdiff = max(sdiff, sd)
    res = {k: statistics.median(v) for k, v in ts.items()}
    res.update({"min_mask_iou": float(min(ious)), "max_score_diff": sdiff, "size": [h, w], "photos": len(photos)})
    return res


def w_rss(a):
    import numpy as np

    img = _image()
    if a.variant == "ref":  # (no `import segany` here: it would turn on its huge-page allocator, see _Reference)
        from reference import load_reference

        sa, _ = load_reference()
        model = sa.sam_model_registry[a.model]()
        pred = sa.SamPredictor(model.eval())
    else:
        import segany
        from segany.modeling.build import randomize_
        from segany.predictor import SamPredictor

        model = randomize_(segany.sam_model_registry[a.model](), seed=1).eval()
        pred = SamPredictor(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pred.set_image(img)
    pred.predict(point_coords=np.array([[100.0, 100.0]]), point_labels=np.array([1]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_mib": peak / 1024, "after_load_mib": before / 1024}


def w_everything(a):
    import numpy as np
    import torch

    from reference import load_reference
    from segany.automatic import SamAutomaticMaskGenerator
    from segany.modeling.build import build_sam, randomize_

    sa, _ = load_reference()
    cfg = {
        "image_size": 1024, "prompt_embed_dim": 256,
        "encoder": {"type": "vit", "embed_dim": 32, "depth": 1, "num_heads": 2, "global_attn_indexes": [0], "patch_size": 16, "window_size": 4},
    }
    ours = randomize_(build_sam(cfg), seed=1).eval()
    from core_helpers import reference_model

    img = _image()
    g1 = SamAutomaticMaskGenerator(ours, points_per_side=a.side)
    if ARGS.reference_in_process:
        ref = reference_model(cfg)
        ref.load_state_dict(ours.state_dict())
        g2 = sa.SamAutomaticMaskGenerator(ref.eval(), points_per_side=a.side)
        generate_ref = lambda: g2.generate(img)  # noqa: E731
    else:
        ref = _Reference({"build": "config", "config": cfg}, ours.state_dict())

        def generate_ref():
            ref.call("generate", img, points_per_side=a.side)
            return ref.seconds
    ts = _alternate({"ours": lambda: g1.generate(img), "ref": generate_ref}, max(1, a.repeats // 2), warmup=0)
    return {k: statistics.median(v) for k, v in ts.items()}


def w_agreement(a):
    """int8 vs float32 masks (best of 3, one random foreground click) on real photos."""
    import numpy as np
    import torch

    from segany.predictor import SamPredictor
    from segany.quantize import quantize_model

    try:
        from segany.checkpoints import load_model

        model = load_model(a.model, download=False) if a.model != "vit_b" else None
    except Exception:
        model = None
    if model is None:
        import segany
        from segany.modeling.build import randomize_

        model = randomize_(segany.sam_model_registry["vit_b"](), seed=1).eval()
        name = "vit_b (random weights: smoke number only)"
    else:
        name = a.model
    variants = {"torch-int8": SamPredictor(quantize_model(model))}
    if a.onnx_dir:
        from segany.onnx import OnnxPredictor, export_onnx

        import tempfile

        # exported afresh: a cached export of an older checkpoint with the same name would not fit
        d = Path(tempfile.mkdtemp(prefix="agree_" + a.model + "_", dir=a.onnx_dir if os.path.isdir(a.onnx_dir) else None))
        export_onnx(model, d, postprocess=False)
        variants["onnxruntime-int8"] = OnnxPredictor(model, d, int8=True)
    base = SamPredictor(model)
    photos = sorted(glob.glob(str(ROOT.parent / "shared" / "data" / "*" / "images" / "*.jpg")))
    rng = np.random.default_rng(0)
    pick = [photos[i] for i in rng.choice(len(photos), size=min(a.agreement, len(photos)), replace=False)]
    from PIL import Image

    ious = {k: [] for k in variants}
    for path in pick:
        img = np.asarray(Image.open(path).convert("RGB"))
        base.set_image(img)
        for p in variants.values():
            p.set_image(img)
        for _ in range(3):
            c = np.array([[rng.uniform(0, img.shape[1]), rng.uniform(0, img.shape[0])]])
            m0, s0, _ = base.predict(point_coords=c, point_labels=np.array([1]))
            b0 = m0[int(np.argmax(s0))]
            for k, p in variants.items():
                m, s, _ = p.predict(point_coords=c, point_labels=np.array([1]))
                b = m[int(np.argmax(s0))]  # same token as float32, so the IoU measures mask quality
                u = (b | b0).sum()
                ious[k].append(1.0 if u == 0 else float((b & b0).sum() / u))
    return {"model": name, "photos": len(pick), **{k: float(np.mean(v)) for k, v in ious.items()}}


# What --isa sets for every process of the run (see the module docstring).
ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
                    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "SEGANY_KERNEL_MARCH": "haswell"}}
NOT_HELD = "; not held to AVX2 (chooses its kernels from the CPU)"  # (the rows --isa cannot emulate)

def w_info(a):
    from segany import kernels

    return {"lanes": kernels.decoder_lanes()}


WORKERS = {"info": w_info, "gemm": w_gemm, "encoder": w_encoder, "click": w_click, "click_refine": w_click_refine, "click_bundled": w_click_bundled, "rss": w_rss, "everything": w_everything, "agreement": w_agreement}


def _run(a, worker, **extra):
    # the worker parses its own arguments: every option a worker reads must be passed on
    cmd = [sys.executable, __file__, "--worker", worker, "--model", extra.get("model", a.model), "--repeats", str(a.repeats),
           "--side", str(a.side), "--onnx-dir", a.onnx_dir, "--variant", extra.get("variant", ""), "--agreement", str(a.agreement), "--size", a.size]
    cmd += ["--reference-huge-pages"] * a.reference_huge_pages + ["--reference-in-process"] * a.reference_in_process
    env = dict(os.environ)
    if worker == "rss" and extra.get("variant") == "ref" and a.reference_huge_pages:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        print(r.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--rows", default="gemm,encoder,encoder_int8,encoder_ort,encoder_ort_int8,click,click_refine,rss,everything")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rss-model", default="vit_b")
    ap.add_argument("--side", type=int, default=16, help="points per side for the everything row")
    ap.add_argument("--onnx-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "segany-bench-onnx"))
    ap.add_argument("--agreement", type=int, default=0, help="number of photos for the int8 agreement row")
    ap.add_argument("--size", default="600x900", help="HxW of the test photo (clicks are upscaled to it)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--reference-huge-pages", action="store_true",
                    help="give the reference segany's huge-page allocator (THP_MEM_ALLOC_ENABLE=1) as well")
    ap.add_argument("--reference-in-process", action="store_true",
                    help="run the reference in segany's process (then with segany's allocator too), as before 2026-12-05")
    ap.add_argument("--isa", choices=("native", "avx2"), default="native",
                    help="avx2: hold both sides to AVX2 instructions (an AVX2 machine emulated; see above)")
    a = ap.parse_args()
    global ARGS
    ARGS = a
    if a.isa != "native" and not a.worker:
        os.environ.update(ISA_ENV[a.isa])  # (before torch is imported here; workers and the reference inherit it)
    if not a.worker and "segany" in sys.modules:
        raise RuntimeError("bench_speed.py: segany was imported by the main process; its environment would reach the reference")
    os.environ["SEGANY_BENCH_SIZE"] = a.size
    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return
    rows = [r for r in a.rows.split(",") if r]
    if a.agreement and "agreement" not in rows:
        rows.append("agreement")
    import torch

    # (asked in a worker: `import segany` here would put its huge-page allocator setting into this
    # process's environment, which every row's processes inherit, the reference's included)
    info = _run(a, "info") or {"lanes": 0}
    isa = f"PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}, " + (
        f"segany kernels {info['lanes'] * 32}-bit vectors" if info["lanes"] else "segany kernels off")
    if a.isa != "native":
        isa += f" (--isa {a.isa}: emulated on this CPU)"
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, model {a.model}, "
          f"random weights, medians of {a.repeats}+ alternating runs; each row a separate process; {isa}\n", file=sys.stderr)
    lines = ["| measurement | reference | segany | ratio | notes |", "|---|---|---|---|---|"]
    gemm = None
    if "gemm" in rows:
        gemm = _run(a, "gemm")
        if gemm:
            lines.append(f"| float32 GEMM rate (2048² torch.mm, best of 10) | | {gemm['gflops']:.0f} GFLOP/s | | machine reference |")
    for row, variant, label in [("encoder", "fp32", "fp32"), ("encoder_int8", "int8", "int8 (PyTorch dynamic)"),
                                ("encoder_ort", "ort", "onnxruntime fp32"), ("encoder_ort_int8", "ort_int8", "onnxruntime int8")]:
        if row not in rows:
            continue
        r = _run(a, "encoder", variant=variant)
        if not r:
            lines.append(f"| {a.model} image embedding, {label} | | failed | | |")
            continue
        note = f"{r['flops'] / r['ours'] / 1e9:.0f} GFLOP/s achieved ({r['flops'] / 1e12:.2f} TFLOP)"
        if gemm:
            note += f" vs {gemm['gflops']:.0f} GEMM"
        if a.isa != "native" and variant.startswith("ort"):
            note += NOT_HELD
        note += f"; max abs diff {r['max_abs_diff']:.1e} (|ref| ≤ {r['ref_abs_max']:.2f}), cos {r['cos']:.5f}"
        lines.append(f"| {a.model} image embedding, {label} | {r['ref']:.2f} s | {r['ours']:.2f} s | {r['ours'] / r['ref']:.2f}× | {note} |")
    for row, what in [("click", "(prompt + decoder + postprocess)"), ("click_refine", ""), ("click_bundled", "bundled model on {photos} real photos")]:
        r = _run(a, row) if row in rows else None
        if r and row == "click_refine":
            lines.append(
                f"| refinement click → one mask at {r['size'][0]}x{r['size'][1]} (2 points + the previous logits as mask_input, "
                f"multimask_output=False) | {r['ref'] * 1e3:.1f} ms | {r['ours'] * 1e3:.1f} ms | {r['ours'] / r['ref']:.3f}× | "
                f"`predict` on both sides; min mask IoU {r['min_mask_iou']:.4f}, max score diff {r['max_score_diff']:.1e} |")
        elif r:
            lines.append(
                f"| one click → best mask at {r['size'][0]}x{r['size'][1]}, {what.format(photos=r.get('photos'))} | {r['ref'] * 1e3:.1f} ms | "
                f"{r['ours'] * 1e3:.1f} ms | {r['ours'] / r['ref']:.3f}× | `predict_best(..., return_low_res=False)`; with the low-res "
                f"logits (`predict_best`): {r['ours_low_res'] * 1e3:.1f} ms, {r['ours_low_res'] / r['ref']:.3f}×; `predict` + argmax "
                f"(3 masks at the original size and their logits, as the reference): {r['ours_all'] * 1e3:.1f} ms, {r['ours_all'] / r['ref']:.2f}×; "
                f"min mask IoU {r['min_mask_iou']:.4f}, max score diff {r['max_score_diff']:.1e} |")
    if "rss" in rows:
        ref = _run(a, "rss", model=a.rss_model, variant="ref")
        ours = _run(a, "rss", model=a.rss_model, variant="ours")
        if ref and ours:
            lines.append(f"| peak RSS, {a.rss_model} set_image + click | {ref['peak_mib']:.0f} MiB | {ours['peak_mib']:.0f} MiB | "
                         f"{ours['peak_mib'] / ref['peak_mib']:.2f}× | after model build: ref {ref['after_load_mib']:.0f}, segany {ours['after_load_mib']:.0f} MiB |")
    if "everything" in rows and (ROOT / "segany" / "automatic.py").exists():
        r = _run(a, "everything")
        if r:
            lines.append(f"| segment everything, {a.side}x{a.side} points, generate() (tiny encoder, SAM decoder) | {r['ref']:.2f} s | {r['ours']:.2f} s | "
                         f"{r['ours'] / r['ref']:.3f}× | see benchmarks/bench_everything.py for more |")
    if "agreement" in rows:
        r = _run(a, "agreement", model="tiny")
        if r:
            parts = ", ".join(f"{k} mean IoU {v:.3f}" for k, v in r.items() if k not in ("model", "photos"))
            lines.append(f"| int8 vs float32 best-mask agreement ({r['model']}, {r['photos']} photos × 3 clicks) | | | | {parts}"
                         f"{' (onnxruntime' + NOT_HELD[1:] + ')' if a.isa != 'native' else ''} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
